//! Model throughput: forward+backward, prefill and batched decode, for the
//! embedded presets.
//! `cargo run --release -p model --bin bench -- [tiny|small|qwen2.5-0.5b]...
//! [--device cpu|cuda:N] [--dtype auto|bfloat16|float32] [--bandwidth-gbs N]
//! [--only train|prefill|decode]`
//! Prints a Markdown table (the README's numbers come from it); the
//! forward+backward rows also give the memory the step needs (CPU: peak
//! resident memory, measured in a process of its own; GPU: device memory
//! held by the autograd graph when the backward starts). With the
//! GPU's memory bandwidth, decode rows also show the memory-bandwidth bound:
//! each decode step reads every weight once, so a batch of B makes at most
//! B x bandwidth / weight bytes tokens per second.

use std::time::Instant;

use model::decoder::{LogitsWanted, trainable};
use model::device::{DTypeSpec, DeviceSpec};
use model::lora::{Lora, LoraConfig, TargetModules};
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

/// What a forward+backward keeps for the backward pass.
#[derive(Clone, Copy, PartialEq)]
enum TrainMode {
    /// Everything, the logits included: `completion_logprobs`.
    LogitsKept,
    /// The logits recomputed in the backward (`train.recompute_logits`, the
    /// learner's default).
    LogitsRecomputed,
    /// The decoder layers recomputed too (`train.gradient_checkpointing`).
    LayersRecomputed,
    /// LoRA (`model.use_peft`, rank 16 on every linear) on a frozen base,
    /// logits recomputed: only the adapters get gradients.
    Lora,
    /// The same with DoRA (`model.use_dora`): each forward also makes
    /// every adapted linear's `B A` and its row norms.
    Dora,
}

impl TrainMode {
    const ALL: [TrainMode; 5] = [
        TrainMode::LogitsKept,
        TrainMode::LogitsRecomputed,
        TrainMode::LayersRecomputed,
        TrainMode::Lora,
        TrainMode::Dora,
    ];

    /// The `--peak-memory-of` argument.
    fn arg(self) -> &'static str {
        match self {
            TrainMode::LogitsKept => "kept",
            TrainMode::LogitsRecomputed => "recomputed",
            TrainMode::LayersRecomputed => "layers",
            TrainMode::Lora => "lora",
            TrainMode::Dora => "dora",
        }
    }

    fn label(self) -> &'static str {
        match self {
            TrainMode::LogitsKept => "forward+backward, logits kept",
            TrainMode::LogitsRecomputed => "forward+backward, logits recomputed",
            TrainMode::LayersRecomputed => "forward+backward, logits and layers recomputed",
            TrainMode::Lora => "forward+backward, LoRA r 16 all-linear, logits recomputed",
            TrainMode::Dora => "forward+backward, DoRA r 16 all-linear, logits recomputed",
        }
    }

    /// The model for this mode, its trainable parameters made from
    /// `weights` (every weight, or fresh LoRA adapters).
    fn model(
        self,
        cfg: &model::ModelConfig,
        weights: &Weights,
        dtype: DType,
    ) -> model::Result<CausalLM> {
        if matches!(self, TrainMode::Lora | TrainMode::Dora) {
            let config = LoraConfig {
                r: 16,
                alpha: 32.0,
                target_modules: TargetModules::AllLinear,
                use_rslora: false,
                dropout: 0.0,
                use_dora: self == TrainMode::Dora,
                modules_to_save: Vec::new(),
            };
            let device = weights
                .iter()
                .next()
                .map_or(Device::Cpu, |(_, t)| t.device().clone());
            let fresh = config.init(cfg, weights, 0, &device, dtype)?;
            let (_vars, adapters) = trainable(&fresh)?;
            return CausalLM::with_lora(cfg, weights, &Lora { config, adapters });
        }
        let (_vars, view) = trainable(weights)?;
        let mut lm = CausalLM::new(cfg, &view)?;
        lm.set_gradient_checkpointing(self == TrainMode::LayersRecomputed);
        Ok(lm)
    }
}

impl std::str::FromStr for TrainMode {
    type Err = model::ModelError;
    fn from_str(s: &str) -> model::Result<Self> {
        TrainMode::ALL
            .into_iter()
            .find(|m| m.arg() == s)
            .ok_or_else(|| model::ModelError::Invalid(format!("unknown train mode {s:?}")))
    }
}

/// The completion log-probs of a forward for `mode`, and what its backward
/// needs; dropping the result frees the graph.
fn train_forward<'m>(
    lm: &'m CausalLM,
    ids: &Tensor,
    mask: &Tensor,
    mode: TrainMode,
) -> model::Result<Result<model::decoder::CheckpointedLogProbs<'m>, Tensor>> {
    let k = ids.dim(1)? - 1;
    Ok(if mode == TrainMode::LogitsKept {
        Err(lm.completion_logprobs(ids, mask, k, 1.0, false)?.logprobs)
    } else {
        Ok(lm.checkpointed_logprobs(ids, mask, k, 1.0, false)?)
    })
}

/// One forward+backward of completion log-probs (`lm` built by
/// [`TrainMode::model`]).
fn train_step(lm: &CausalLM, ids: &Tensor, mask: &Tensor, mode: TrainMode) -> model::Result<()> {
    match train_forward(lm, ids, mask, mode)? {
        Ok(ck) => {
            let d = ck.logprobs().ones_like()?;
            ck.backward(Some(&d), None)?;
        }
        Err(logprobs) => {
            logprobs.sum_all()?.backward()?;
        }
    }
    Ok(())
}

/// Hidden mode `--peak-memory-of PRESET kept|recomputed|layers` (CPU, Linux): one
/// [`train_step`] of batch 8 x 128; prints how far the peak resident memory
/// rose above the resident memory before it, in bytes. Run in a process of
/// its own, with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so
/// that freed buffers leave the resident set and the peak is what was live.
fn peak_memory_of(preset: Preset, mode: TrainMode) -> model::Result<()> {
    let kib = |field: &str| -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let cfg = presets::config(preset, 100, 1, 0)?;
    let weights = Weights::random(&cfg, 0, &Device::Cpu, DType::F32)?;
    let lm = mode.model(&cfg, &weights, DType::F32)?;
    let (b, t) = (8, 128);
    let ids = Tensor::from_vec(random_ids(b * t, cfg.vocab_size, 1), (b, t), &Device::Cpu)?;
    let mask = Tensor::ones((b, t), DType::U32, &Device::Cpu)?;
    // Writing 5 resets the peak (VmHWM) to the current resident size.
    std::fs::write("/proc/self/clear_refs", "5")
        .map_err(|e| model::ModelError::Invalid(format!("/proc/self/clear_refs: {e}")))?;
    let before = kib("VmRSS:");
    train_step(&lm, &ids, &mask, mode)?;
    let peak = kib("VmHWM:");
    let (Some(before), Some(peak)) = (before, peak) else {
        return Err(model::ModelError::Invalid(
            "no VmRSS/VmHWM in /proc/self/status".into(),
        ));
    };
    println!("{}", peak.saturating_sub(before) * 1024);
    Ok(())
}

/// On a GPU: the device memory the forward's autograd graph holds when the
/// backward would start (free memory before the forward minus after it,
/// each read after a synchronize so that freed temporaries are returned).
/// `None` on the CPU.
fn gpu_graph_memory(
    dev: &Device,
    lm: &CausalLM,
    ids: &Tensor,
    mask: &Tensor,
    mode: TrainMode,
) -> model::Result<Option<u64>> {
    let free = || -> model::Result<Option<usize>> {
        dev.synchronize()?;
        Ok(model::device::gpu_memory(dev)?.map(|(free, _)| free))
    };
    let Some(before) = free()? else {
        return Ok(None);
    };
    let held = train_forward(lm, ids, mask, mode)?;
    let after = free()?;
    drop(held);
    Ok(after.map(|after| before.saturating_sub(after) as u64))
}

/// [`peak_memory_of`] in a child process; `None` where it cannot run.
fn peak_memory_growth(preset: Preset, mode: TrainMode) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let name = preset.name();
    let mode = mode.arg();
    let out = std::process::Command::new(exe)
        .args(["--peak-memory-of", name, mode])
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "peak memory of {name} ({mode}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Empties `slots` and prefills `prompts` into them in one batched
/// forward; the logits of each prompt's last token.
fn prefill(
    lm: &CausalLM,
    cache: &mut KvCache,
    slots: &[usize],
    prompts: &[Vec<u32>],
) -> model::Result<Tensor> {
    for &slot in slots {
        cache.truncate(slot, 0)?;
    }
    let entries: Vec<(usize, &[u32])> = slots
        .iter()
        .zip(prompts)
        .map(|(&s, p)| (s, p.as_slice()))
        .collect();
    lm.forward_cached(cache, &entries, LogitsWanted::Last)
}

fn random_ids(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % vocab) as u32)
        .collect()
}

fn main() -> model::Result<()> {
    model::allocator::keep_freed_buffers();
    let mut presets: Vec<Preset> = Vec::new();
    let (mut device, mut dtype, mut bandwidth_gbs) = (DeviceSpec::Cpu, DTypeSpec::Auto, None);
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| model::ModelError::Invalid(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--device" => device = value()?.parse()?,
            "--dtype" => dtype = value()?.parse()?,
            "--only" => {
                let v = value()?;
                if !["train", "prefill", "decode"].contains(&v.as_str()) {
                    return Err(model::ModelError::Invalid(format!(
                        "--only {v}: expected train, prefill or decode"
                    )));
                }
                only = Some(v)
            }
            "--peak-memory-of" => {
                let preset: Preset = value()?.parse()?;
                return peak_memory_of(preset, value()?.parse()?);
            }
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

        let wanted = |measure: &str| only.as_deref().is_none_or(|o| o == measure);
        let (b, t) = (8, 128);

        // Forward + backward of completion log-probs, batch 8 x 128, in each
        // TrainMode.
        if wanted("train") {
            let ids = Tensor::from_vec(random_ids(b * t, cfg.vocab_size, 1), (b, t), &dev)?;
            let mask = Tensor::ones((b, t), DType::U32, &dev)?;
            for mode in TrainMode::ALL {
                let lm = mode.model(&cfg, &weights, DType::F32)?;
                let mut step = || train_step(&lm, &ids, &mask, mode);
                let memory = if dev.is_cpu() {
                    peak_memory_growth(preset, mode).map(|b| ("peak", b))
                } else {
                    gpu_graph_memory(&dev, &lm, &ids, &mask, mode)?.map(|b| ("graph", b))
                };
                let s = time(&dev, 3.0, &mut step)?;
                let what = match memory {
                    Some((kind, bytes)) => format!(
                        "{} ({kind} +{:.0} MiB)",
                        mode.label(),
                        bytes as f64 / (1 << 20) as f64
                    ),
                    None => mode.label().to_string(),
                };
                row(&what, format!("{b}x{t}"), (b * t) as f64 / s, None);
            }
        }

        let lm = CausalLM::new(&cfg, &weights)?;

        // Prefill: 8 prompts of 128 tokens in one forward.
        if wanted("prefill") {
            let prompts: Vec<Vec<u32>> = (0..b).map(|i| random_ids(t, cfg.vocab_size, i)).collect();
            let mut cache = KvCache::new(&cfg, b, t + 1, &dev, dtype)?;
            let slots: Vec<usize> = (0..b).filter_map(|_| cache.allocate()).collect();
            let s = time(&dev, 3.0, || {
                prefill(&lm, &mut cache, &slots, &prompts)?;
                Ok(())
            })?;
            row("prefill", format!("{b}x{t}"), (b * t) as f64 / s, None);
        }

        // Decode: batch B, 16-token prompts, 16 new tokens each (greedy).
        let batches: &[usize] = if wanted("decode") {
            &[1, 8, 64, 256]
        } else {
            &[]
        };
        for &batch in batches {
            let (prompt_len, new_tokens) = (16, 16);
            let mut cache = KvCache::new(&cfg, batch, prompt_len + new_tokens, &dev, dtype)?;
            let slots: Vec<usize> = (0..batch).filter_map(|_| cache.allocate()).collect();
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|i| random_ids(prompt_len, cfg.vocab_size, i))
                .collect();
            let mut decode_secs = 0.0;
            let mut rounds = 0;
            while rounds == 0 || decode_secs < 3.0 {
                let mut logits = prefill(&lm, &mut cache, &slots, &prompts)?;
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
