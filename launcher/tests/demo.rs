//! The README's main command, `launcher --config configs/demo.yaml`, with
//! fewer steps: the real rollout server and two real learner ranks on CPU,
//! from the repository root, into a temporary run folder. Checks the run
//! folder (manifest, train and eval logs with the supervised warm-up, report,
//! checkpoint), the progress lines echoed from rank 0 and the closing
//! message.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const LAUNCHER: &str = env!("CARGO_BIN_EXE_launcher");

#[test]
fn the_demo_runs_end_to_end_with_few_steps() {
    // `cargo test -p launcher` builds only the launcher: build the others.
    let learner = e2e::workspace_bin("learner");
    let server = e2e::workspace_bin("rollout-server");
    assert_eq!(learner.parent(), server.parent());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let started = Instant::now();
    let output = Command::new(LAUNCHER)
        .current_dir(e2e::repo_root())
        .env("TANDEM_BIN_DIR", learner.parent().unwrap())
        .env("RUST_LOG", "warn")
        .args(["--config", "configs/demo.yaml", "--out"])
        .arg(&out)
        .args([
            "train.sft_warmup_steps=4",
            "train.sft_target_loss=null",
            "train.max_steps=3",
            "train.warmup_steps=1",
            "eval.eval_steps=2",
            "eval.max_examples=8",
            "checkpoint.save_steps=2",
        ])
        .output()
        .expect("run the launcher");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "launcher failed ({}) after {:?}:\n{stderr}",
        output.status,
        started.elapsed()
    );

    // Progress from rank 0, and where everything is.
    for line in [
        "launcher: rank 0: sft 4/4 ",
        "launcher: rank 0: eval step 0: pass@1 ",
        "launcher: rank 0: step 3/3 ",
        "launcher: rank 0: eval step 3: pass@1 ",
    ] {
        assert!(stderr.contains(line), "no {line:?} in:\n{stderr}");
    }
    let done = stderr
        .lines()
        .find(|l| l.starts_with("launcher: done. Run folder: "))
        .unwrap_or_else(|| panic!("no closing message in:\n{stderr}"));
    assert!(done.contains(&out.display().to_string()), "{done}");
    assert!(
        done.contains("report.md") && done.contains("checkpoints"),
        "{done}"
    );

    check_run_folder(&out);
}

fn check_run_folder(out: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.is_object(), "{manifest}");

    let train = e2e::read_jsonl(&out.join("train_log.jsonl"));
    let sft: Vec<_> = train
        .iter()
        .filter(|l| l["phase"] == "sft")
        .map(|l| l["sft_step"].as_u64().unwrap())
        .collect();
    assert_eq!(sft, [1, 2, 3, 4], "warm-up lines of {train:?}");
    for l in train.iter().filter(|l| l["phase"] == "sft") {
        assert!(l.get("step").is_none(), "{l}");
        assert!(l["loss"].as_f64().unwrap().is_finite(), "{l}");
    }
    let steps: Vec<_> = train.iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3]);
    for l in train.iter().filter(|l| l.get("step").is_some()) {
        let reward = l["reward"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&reward), "{l}");
        // Weights after the warm-up are version 1; step s pushes s + 1.
        assert_eq!(l["weight_version"], l["step"].as_u64().unwrap() + 1, "{l}");
    }

    let eval = e2e::read_jsonl(&out.join("eval_log.jsonl"));
    let eval_steps: Vec<_> = eval.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, [0, 2, 3]);
    for l in &eval {
        assert_eq!(l["num_questions"], 8, "{l}");
        let p = l["pass_at_k"]["pass@1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{l}");
    }

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("pass@1"), "{report}");
    assert!(
        report.contains("- **Supervised warm-up**: 4 steps; learning rate 0.001 (constant); "),
        "{report}"
    );
    for ckpt in ["step_000002", "step_000003"] {
        let dir = out.join("checkpoints").join(ckpt);
        assert!(dir.join("config.json").is_file(), "{}", dir.display());
    }
    assert!(out.join("logs/learner-rank0.log").is_file());
    assert!(out.join("logs/rollout-0.log").is_file());
}
