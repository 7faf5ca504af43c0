//! Model throughput: forward+backward, prefill and batched decode, for the
//! embedded presets.
//! `cargo run --release -p model --bin bench -- [tiny|small|qwen2.5-0.5b]...
//! [--device cpu|cuda:N] [--dtype auto|bfloat16|float32] [--bandwidth-gbs N]`
//! Prints a Markdown table (the README's numbers come from it). With the
//! GPU's memory bandwidth, decode rows also show the memory-bandwidth bound:
//! each decode step reads every weight once, so a batch of B makes at most
//! B x bandwidth / weight bytes tokens per second.

use std::time::Instant;

use model::decoder::{LogitsWanted, trainable};
use model::device::{DTypeSpec, DeviceSpec};
use model::presets::{self, Preset};
use model::{CausalLM, DType, Device, KvCache, Tensor, Weights};

/// Repeats `f` until at least `min_secs` have passed; returns seconds per call.
fn time<F: FnMut() -> model::Result<()>>(
    dev: &Device,
    min_secs: f64,
    mut f: F,
) -> model::Result<f64> {
    f()?; // warm-up
    dev.synchronize()?;
    let start = Instant::now();
    let mut n = 0u32;
    while n == 0 || start.elapsed().as_secs_f64() < min_secs {
        f()?;
        // GPU work is asynchronous: count it only once it is done.
        dev.synchronize()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

fn random_ids(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % vocab) as u32)
        .collect()
}

fn main() -> model::Result<()> {
    let mut presets: Vec<Preset> = Vec::new();
    let (mut device, mut dtype, mut bandwidth_gbs) = (DeviceSpec::Cpu, DTypeSpec::Auto, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| model::ModelError::Invalid(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--device" => device = value()?.parse()?,
            "--dtype" => dtype = value()?.parse()?,
            "--bandwidth-gbs" => {
                let v = value()?;
                bandwidth_gbs =
                    Some(v.parse::<f64>().map_err(|e| {
                        model::ModelError::Invalid(format!("--bandwidth-gbs {v}: {e}"))
                    })?)
            }
            preset => presets.push(preset.parse()?),
        }
    }
    if presets.is_empty() {
        presets = vec![Preset::Tiny, Preset::Small];
    }
    let dev = device.open()?;
    let dtype = dtype.resolve(&dev)?;
    println!(
        "device {}, dtype {dtype:?}",
        model::device::device_name(&dev)
    );
    println!("| model | params | measure | shape | tokens/s | bandwidth bound |");
    println!("|---|---|---|---|---|---|");
    for preset in presets {
        let cfg = presets::config(preset, 100, 1, 0)?;
        let weights = Weights::random(&cfg, 0, &dev, dtype)?;
        let weight_bytes = cfg.num_parameters() * dtype.size_in_bytes();
        let name = format!("{preset:?}").to_lowercase();
        let params = format!("{:.2}M", cfg.num_parameters() as f64 / 1e6);
        let row = |what: &str, shape: String, tps: f64, bound: Option<f64>| {
            let bound = bound.map_or(String::new(), |b| format!("{b:.0}"));
            println!("| {name} | {params} | {what} | {shape} | {tps:.0} | {bound} |");
        };

        // Forward + backward of completion log-probs, batch 8 x 128.
        let (b, t) = (8, 128);
        let (_vars, view) = trainable(&weights)?;
        let lm = CausalLM::new(&cfg, &view)?;
        let ids = Tensor::from_vec(random_ids(b * t, cfg.vocab_size, 1), (b, t), &dev)?;
        let mask = Tensor::ones((b, t), DType::U32, &dev)?;
        let s = time(&dev, 3.0, || {
            let lp = lm.completion_logprobs(&ids, &mask, t - 1, 1.0, false)?;
            lp.logprobs.sum_all()?.backward()?;
            Ok(())
        })?;
        row(
            "forward+backward",
            format!("{b}x{t}"),
            (b * t) as f64 / s,
            None,
        );

        // Prefill: 8 prompts of 128 tokens in one forward.
        let lm = CausalLM::new(&cfg, &weights)?;
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| random_ids(t, cfg.vocab_size, i)).collect();
        let mut cache = KvCache::new(&cfg, b, t + 1, &dev, dtype)?;
        let slots: Vec<usize> = (0..b).filter_map(|_| cache.allocate()).collect();
        let s = time(&dev, 3.0, || {
            for &slot in &slots {
                cache.truncate(slot, 0)?;
            }
            let entries: Vec<(usize, &[u32])> = slots
                .iter()
                .zip(&prompts)
                .map(|(&s, p)| (s, p.as_slice()))
                .collect();
            lm.forward_cached(&mut cache, &entries, LogitsWanted::Last)?;
            Ok(())
        })?;
        row("prefill", format!("{b}x{t}"), (b * t) as f64 / s, None);

        // Decode: batch B, 16-token prompts, 16 new tokens each (greedy).
        for batch in [1usize, 8, 64, 256] {
            let (prompt_len, new_tokens) = (16, 16);
            let mut cache = KvCache::new(&cfg, batch, prompt_len + new_tokens, &dev, dtype)?;
            let slots: Vec<usize> = (0..batch).filter_map(|_| cache.allocate()).collect();
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|i| random_ids(prompt_len, cfg.vocab_size, i))
                .collect();
            let mut decode_secs = 0.0;
            let mut rounds = 0;
            while rounds == 0 || decode_secs < 3.0 {
                for &slot in &slots {
                    cache.truncate(slot, 0)?;
                }
                let entries: Vec<(usize, &[u32])> = slots
                    .iter()
                    .zip(&prompts)
                    .map(|(&s, p)| (s, p.as_slice()))
                    .collect();
                let mut logits = lm.forward_cached(&mut cache, &entries, LogitsWanted::Last)?;
                let start = Instant::now();
                for _ in 0..new_tokens {
                    let next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
                    let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                    let entries: Vec<(usize, &[u32])> = slots
                        .iter()
                        .zip(&toks)
                        .map(|(&s, t)| (s, t.as_slice()))
                        .collect();
                    logits = lm.forward_cached(&mut cache, &entries, LogitsWanted::Last)?;
                }
                decode_secs += start.elapsed().as_secs_f64();
                rounds += 1;
            }
            let tokens = (batch * new_tokens * rounds) as f64;
            let bound = bandwidth_gbs.map(|gbs| batch as f64 * gbs * 1e9 / weight_bytes as f64);
            row(
                "decode",
                format!("batch {batch}"),
                tokens / decode_secs,
                bound,
            );
        }
    }
    Ok(())
}
