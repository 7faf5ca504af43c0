//! Forward+backward of one optimizer update's micro-batches when completion
//! lengths vary, as in a GRPO batch: the rows cut into micro-batches in the
//! batch's order (each padded to its longest row), and ordered by length
//! first (`batch::plan_micro_batches`, what the learner does).
//!
//! `cargo run --release -p learner --bin bench_micro_batches -- [tiny|small]
//! [--groups 8] [--group-size 8] [--micro-batches 4] [--max-completion 256]`;
//! prints a Markdown table. Completion lengths: each group draws a typical
//! length uniformly in 8..=max, each completion within +-50% of it (seeded).

use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use learner::batch::{SequenceTokens, pad_batch, padded_tokens, plan_micro_batches};
use model::decoder::trainable;
use model::presets::{self, Preset};
use model::{CausalLM, Weights};

struct Args {
    preset: Preset,
    groups: usize,
    group_size: usize,
    micro_batches: usize,
    max_completion: usize,
    max_tokens: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        preset: Preset::Small,
        groups: 8,
        group_size: 8,
        micro_batches: 4,
        max_completion: 256,
        max_tokens: 4096,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "tiny" => a.preset = Preset::Tiny,
            "small" => a.preset = Preset::Small,
            "--groups" => a.groups = number("--groups")?,
            "--group-size" => a.group_size = number("--group-size")?,
            "--micro-batches" => a.micro_batches = number("--micro-batches")?,
            "--max-completion" => a.max_completion = number("--max-completion")?,
            "--max-tokens" => a.max_tokens = number("--max-tokens")?,
            other => bail!(
                "unknown argument {other:?}: expected tiny|small, --groups N, --group-size N, \
                 --micro-batches N, --max-completion N, --max-tokens N"
            ),
        }
    }
    if a.groups == 0 || a.group_size == 0 || a.micro_batches == 0 || a.max_completion < 16 {
        bail!("--groups, --group-size and --micro-batches must be >= 1, --max-completion >= 16");
    }
    Ok(a)
}

/// xorshift64*: reproducible lengths and ids without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One forward+backward over each micro-batch of `plan`; seconds.
fn run(
    lm: &CausalLM,
    rows: &[SequenceTokens],
    plan: &[Vec<Vec<usize>>],
    device: &Device,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for indices in plan.iter().flatten() {
        let seqs: Vec<SequenceTokens> = indices.iter().map(|&i| rows[i].clone()).collect();
        let padded = pad_batch(&seqs, 0, None, device)?;
        let ck = lm.checkpointed_logprobs(
            &padded.input_ids,
            &padded.attention_mask,
            padded.logits_to_keep,
            1.0,
            false,
        )?;
        let d = padded.response_mask.to_dtype(ck.logprobs().dtype())?;
        ck.backward(Some(&d), None)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    model::allocator::keep_freed_buffers();
    let a = parse_args()?;
    let device = Device::Cpu;
    let cfg = presets::config(a.preset, 100, 1, 0)?;
    let weights = Weights::random(&cfg, 0, &device, DType::F32)?;
    let (_vars, view) = trainable(&weights)?;
    let lm = CausalLM::new(&cfg, &view)?;

    let mut rng = Rng(0x5eed);
    let mut rows = Vec::new();
    for _ in 0..a.groups {
        let prompt: Vec<u32> = (0..32).map(|_| 4 + rng.below(90) as u32).collect();
        let typical = 8 + rng.below(a.max_completion - 7);
        for _ in 0..a.group_size {
            let spread = typical / 2;
            let len = (typical - spread + rng.below(2 * spread + 1)).clamp(1, a.max_completion);
            let completion: Vec<u32> = (0..len).map(|_| 4 + rng.below(90) as u32).collect();
            rows.push(SequenceTokens {
                prompt_ids: prompt.clone(),
                completion_ids: completion,
            });
        }
    }
    let lengths: Vec<(usize, usize)> = rows
        .iter()
        .map(|r| (r.prompt_ids.len(), r.completion_ids.len()))
        .collect();
    let max_rows = rows.len().div_ceil(a.micro_batches);
    let name = match a.preset {
        Preset::Tiny => "tiny",
        _ => "small",
    };
    println!(
        "| model | rows | micro-batches | micro-batch rows | padded tokens | forward+backward (s) |"
    );
    println!("|---|---|---|---|---|---|");
    let budget_label = format!("ordered by length, <= {} tokens", a.max_tokens);
    for (label, by_length, budget) in [
        ("batch order", false, None),
        ("ordered by length", true, None),
        (budget_label.as_str(), true, Some(a.max_tokens)),
    ] {
        let plan = plan_micro_batches(&lengths, 1, a.micro_batches, max_rows, by_length, budget);
        let count: usize = plan.iter().map(Vec::len).sum();
        // Warm-up, then the median of three.
        run(&lm, &rows, &plan, &device)?;
        let mut times: Vec<f64> = (0..3)
            .map(|_| run(&lm, &rows, &plan, &device))
            .collect::<anyhow::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | {} | {count} | {label} | {} | {:.2} |",
            rows.len(),
            padded_tokens(&lengths, &plan),
            times[1]
        );
    }
    let real: usize = lengths.iter().map(|(p, k)| p + k).sum();
    println!("\n(tokens without padding: {real})");
    Ok(())
}
