//! GRPO step time and its parts, for the embedded presets with 1 and 2
//! learner ranks on CPU: runs the real launcher (one rollout server plus the
//! learners) on configs/demo.yaml for a few steps and averages each timing of
//! train_log.jsonl over the steps after the first (which pays for warm-up).
//!
//! `cargo build --release -p launcher -p learner -p rollout-server &&
//!  target/release/bench_step [--steps N] [tiny|small]...` from the repository
//! root; prints a Markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

const PARTS: [&str; 7] = [
    "generate",
    "score",
    "forward_backward",
    "allreduce",
    "optimizer",
    "weight_sync",
    "total",
];

fn main() -> anyhow::Result<()> {
    let mut steps = 5usize;
    let mut presets = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => {
                steps = args
                    .next()
                    .context("--steps needs a number")?
                    .parse()
                    .context("--steps needs a number")?
            }
            "tiny" | "small" => presets.push(a),
            other => bail!("unknown argument {other:?}: expected --steps N, tiny or small"),
        }
    }
    if presets.is_empty() {
        presets = vec!["tiny".into(), "small".into()];
    }
    if steps < 2 {
        bail!("--steps must be at least 2 (the first step is not counted)");
    }
    let launcher = std::env::current_exe()?
        .parent()
        .context("no folder for the bench binary")?
        .join("launcher");
    let scratch = std::env::temp_dir().join(format!("tandem-bench-step-{}", std::process::id()));
    println!(
        "| model | learner ranks | step (s) | generate | score | forward+backward | all-reduce | optimizer | weight sync | tokens/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for preset in &presets {
        for ranks in [1usize, 2] {
            let out = scratch.join(format!("{preset}-{ranks}"));
            let means = run(&launcher, preset, ranks, steps, &out)?;
            let f = |k: &str| means.get(k).copied().unwrap_or(f64::NAN);
            println!(
                "| {preset} | {ranks} | {:.2} | {:.2} | {:.3} | {:.2} | {:.3} | {:.3} | {:.3} | {:.0} |",
                f("total"),
                f("generate"),
                f("score"),
                f("forward_backward"),
                f("allreduce"),
                f("optimizer"),
                f("weight_sync"),
                f("tokens_per_s"),
            );
        }
    }
    // Best effort: only the scratch runs of this process live there.
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Means of the timings (and tokens/s) over steps 2..=steps.
fn run(
    launcher: &Path,
    preset: &str,
    ranks: usize,
    steps: usize,
    out: &Path,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let status = Command::new(launcher)
        .args(["--config", "configs/demo.yaml", "--device", "cpu"])
        .args(["--learner-ranks", &ranks.to_string()])
        .arg("--out")
        .arg(out)
        .args([
            format!("model.preset={preset}"),
            format!("train.max_steps={steps}"),
            "train.sft_warmup_steps=0".into(),
            "eval.eval_steps=0".into(),
            format!("checkpoint.save_steps={}", steps + 1),
        ])
        .status()
        .with_context(|| format!("running {}", launcher.display()))?;
    if !status.success() {
        bail!("{preset} with {ranks} rank(s): the launcher exited with {status}");
    }
    let log = PathBuf::from(out).join("train_log.jsonl");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v.get("step").is_some() && v.get("phase").is_none())
        .skip(1)
        .collect();
    if lines.is_empty() {
        bail!("{}: no GRPO steps after the first", log.display());
    }
    let mut sums = std::collections::BTreeMap::new();
    for line in &lines {
        for part in PARTS {
            if let Some(x) = line["timings"][part].as_f64() {
                *sums.entry(part.to_string()).or_insert(0.0) += x;
            }
        }
        if let Some(x) = line["tokens_per_s"].as_f64() {
            *sums.entry("tokens_per_s".to_string()).or_insert(0.0) += x;
        }
    }
    let n = lines.len() as f64;
    Ok(sums.into_iter().map(|(k, v)| (k, v / n)).collect())
}
