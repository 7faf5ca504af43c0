//! How many sequences the KV cache holds on a GPU, from vLLM's
//! `--gpu-memory-utilization`: this server may use that fraction of the GPU's
//! total memory; its weights and a reserve for one step's activations come
//! first, the KV cache gets the rest, preallocated once.
//!
//! The cache is slot-based (each slot holds one sequence of `max_model_len`
//! tokens), so the budget becomes a number of slots: `--max-num-seqs` when
//! they fit, fewer (with a warning) when not, and an error when not even one
//! sequence fits. On the CPU the cache holds `--max-num-seqs` slots.

use candle_core::DType;
use model::ModelConfig;

/// What the budget is computed from (bytes unless named otherwise).
#[derive(Debug, Clone, Copy)]
pub struct KvBudgetInput {
    pub total: usize,
    /// Free memory after the weights were loaded.
    pub free_after_load: usize,
    /// What loading the weights took (free before - free after).
    pub weights: usize,
    /// Peak activations of one step (see [`activation_reserve`]).
    pub activations: usize,
    /// `--gpu-memory-utilization`, in (0, 1].
    pub utilization: f64,
    pub bytes_per_slot: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
}

/// The outcome: slots to allocate and the bytes they take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    pub slots: usize,
    pub kv_bytes: usize,
    /// Bytes the utilization left for the cache.
    pub available: usize,
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(b: usize) -> String {
    format!("{:.2} GiB", b as f64 / GIB)
}

/// Checks `--gpu-memory-utilization` (vLLM's range).
pub fn check_utilization(u: f64) -> anyhow::Result<()> {
    if !(u > 0.0 && u <= 1.0) {
        anyhow::bail!(
            "--gpu-memory-utilization must be in (0, 1], got {u}: it is the fraction of the GPU's \
             memory this server may use (0.9 alone on a GPU; e.g. 0.3 when a learner shares it)"
        );
    }
    Ok(())
}

/// Slots that fit, or an error that says which flag to change.
pub fn kv_cache_slots(i: KvBudgetInput) -> anyhow::Result<KvBudget> {
    check_utilization(i.utilization)?;
    let allowed = (i.total as f64 * i.utilization) as usize;
    let used = i.weights + i.activations;
    // Never plan on memory another process already holds.
    let reserve_free = i.free_after_load.saturating_sub(i.activations);
    let available = allowed.saturating_sub(used).min(reserve_free);
    let fit = available / i.bytes_per_slot.max(1);
    if fit == 0 {
        anyhow::bail!(
            "not enough GPU memory for the KV cache of one sequence of --max-model-len {} \
             ({} needed, {} left of --gpu-memory-utilization {} x {} total after {} of weights \
             and {} reserved for activations, {} free on the GPU): raise \
             --gpu-memory-utilization, lower --max-model-len, or free the GPU",
            i.max_model_len,
            gib(i.bytes_per_slot),
            gib(available),
            i.utilization,
            gib(i.total),
            gib(i.weights),
            gib(i.activations),
            gib(i.free_after_load),
        );
    }
    let slots = fit.min(i.max_num_seqs);
    Ok(KvBudget {
        slots,
        kv_bytes: slots * i.bytes_per_slot,
        available,
    })
}

/// Peak activation bytes of one engine step, an upper estimate: a prefill of
/// `max_prefill_tokens` (attention scores and probabilities in f32, the MLP's
/// three intermediate tensors) or a decode of `max_num_seqs` (f32 logits and
/// the sampler's copies of them), whichever is larger, plus 10% slack for the
/// allocator.
pub fn activation_reserve(
    cfg: &ModelConfig,
    max_prefill_tokens: usize,
    max_num_seqs: usize,
    max_model_len: usize,
    dtype: DType,
) -> usize {
    let el = dtype.size_in_bytes();
    let t = max_prefill_tokens;
    let span = max_model_len.min(t);
    let scores = 2 * cfg.num_attention_heads * t * span * 4;
    let mlp = 3 * t * cfg.intermediate_size * el;
    let hidden = 4 * t * cfg.hidden_size * el;
    let prefill = scores + mlp + hidden;
    let decode = 4 * max_num_seqs * cfg.vocab_size * 4;
    prefill.max(decode) * 11 / 10
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: usize = 1 << 30;

    fn input() -> KvBudgetInput {
        KvBudgetInput {
            total: 80 * G,
            free_after_load: 78 * G,
            weights: G,
            activations: 3 * G,
            utilization: 0.9,
            bytes_per_slot: G / 2,
            max_num_seqs: 256,
            max_model_len: 32768,
        }
    }

    #[test]
    fn the_cache_takes_what_the_utilization_leaves() {
        // 0.9 x 80 = 72 GiB; minus 1 GiB weights and 3 GiB activations = 68
        // GiB: 136 slots of 0.5 GiB, below --max-num-seqs 256.
        let b = kv_cache_slots(input()).unwrap();
        assert_eq!(b.slots, 136);
        assert_eq!(b.kv_bytes, 68 * G);
        // When they all fit, --max-num-seqs is the cap.
        let b = kv_cache_slots(KvBudgetInput {
            max_num_seqs: 64,
            ..input()
        })
        .unwrap();
        assert_eq!((b.slots, b.kv_bytes), (64, 32 * G));
    }

    #[test]
    fn memory_held_by_another_process_is_not_planned_on() {
        // A learner on the same GPU holds 60 GiB: 18 GiB free after the load,
        // 15 GiB after the activation reserve: 30 slots, not 136.
        let b = kv_cache_slots(KvBudgetInput {
            free_after_load: 18 * G,
            ..input()
        })
        .unwrap();
        assert_eq!(b.slots, 30);
    }

    #[test]
    fn too_little_memory_names_the_flags() {
        let e = kv_cache_slots(KvBudgetInput {
            utilization: 0.05,
            ..input()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--gpu-memory-utilization"), "{e}");
        assert!(e.contains("--max-model-len 32768"), "{e}");
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            let e = check_utilization(bad).unwrap_err().to_string();
            assert!(e.contains("(0, 1]"), "{e}");
        }
    }

    #[test]
    fn the_activation_reserve_grows_with_the_prefill_and_the_batch() {
        let cfg = model::presets::config(model::presets::Preset::Qwen25_0_5B, 100, 1, 0).unwrap();
        let small = activation_reserve(&cfg, 2048, 64, 4096, DType::BF16);
        let big = activation_reserve(&cfg, 8192, 64, 4096, DType::BF16);
        assert!(big > small);
        // Decode-bound: 4 copies of 1024 x 151936 f32 logits, + 10%.
        let decode = activation_reserve(&cfg, 16, 1024, 4096, DType::BF16);
        assert_eq!(decode, 4 * 1024 * 151_936 * 4 * 11 / 10);
    }
}
