//! The model in another dtype or on another device against CPU f32, the
//! reference: logits, completion log-probs and their gradients, for the same
//! weights and tokens, through the full autograd graph and through the
//! learner's gradient-checkpointed path. On the CPU this checks the reduced-precision path
//! (f16: candle's CPU matmul has no bf16); with `--features cuda` on a GPU
//! machine, the same comparison runs for CUDA f32 and bf16.
//!
//! Tolerances are stated per case in [`Tolerance`]: f32 on another device
//! differs only by summation order; f16/bf16 by their mantissas (10 and 7
//! bits), relative to the reference's scale.

use std::collections::BTreeMap;
use std::path::Path;

use model::decoder::trainable;
use model::weights::Weights;
use model::{CausalLM, DType, Device, ModelConfig, Tensor};
use serde_json::json;

/// A small Qwen2 with every term (biases, GQA, tied embeddings) and logits
/// large enough that precision matters.
fn config() -> ModelConfig {
    let raw = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 211,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.1,
        "tie_word_embeddings": true,
        "eos_token_id": 1,
    });
    ModelConfig::from_map(raw.as_object().unwrap().clone(), Path::new("test")).unwrap()
}

struct Outputs {
    logits: Vec<f32>,
    logprobs: Vec<f32>,
    grads: BTreeMap<String, Vec<f32>>,
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// With `gradient_checkpointing`, the log-probs and their gradients come
/// from the learner's memory-saving path (logits and decoder layers
/// recomputed in the backward).
fn run(
    cfg: &ModelConfig,
    weights: &Weights,
    device: &Device,
    dtype: DType,
    gradient_checkpointing: bool,
) -> Outputs {
    let mut w = Weights::new(BTreeMap::new());
    for (name, t) in weights.iter() {
        w.insert(name.clone(), t.to_device(device).unwrap());
    }
    let w = w.to_dtype(dtype).unwrap();
    let (vars, view) = trainable(&w).unwrap();
    let mut lm = CausalLM::new(cfg, &view).unwrap();
    lm.set_gradient_checkpointing(gradient_checkpointing);
    let (b, t, k) = (3, 40, 24);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % 211) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), device).unwrap();
    // Left padding on one row, as the learner's batches have.
    let mut mask = vec![1u32; b * t];
    mask[t..t + 5].fill(0);
    let mask = Tensor::from_vec(mask, (b, t), device).unwrap();
    let logits = lm.forward(&ids, &mask).unwrap();
    let (logprobs, grads) = if gradient_checkpointing {
        let ck = lm
            .checkpointed_logprobs(&ids, &mask, k, 1.0, false)
            .unwrap();
        let logprobs = ck.logprobs().clone();
        let d = logprobs.ones_like().unwrap();
        (logprobs, ck.backward(Some(&d), None).unwrap())
    } else {
        let lp = lm.completion_logprobs(&ids, &mask, k, 1.0, false).unwrap();
        let grads = lp.logprobs.sum_all().unwrap().backward().unwrap();
        (lp.logprobs, grads)
    };
    assert_eq!(logprobs.dtype(), DType::F32, "log-probs are reduced in f32");
    Outputs {
        logits: host(&logits),
        logprobs: host(&logprobs),
        grads: vars
            .iter()
            .map(|(name, var)| {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                (name.clone(), host(g))
            })
            .collect(),
    }
}

/// Max and mean absolute difference.
fn abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
    let max = d.iter().cloned().fold(0.0, f32::max);
    (max, d.iter().sum::<f32>() / d.len() as f32)
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Stated tolerances, as fractions of the reference's scale (its max |value|
/// for logits, its L2 norm per gradient tensor) and absolute for log-probs.
struct Tolerance {
    logits_max: f32,
    logprobs_max: f32,
    logprobs_mean: f32,
    grad_rel: f32,
}

fn check(device: Device, dtype: DType, tol: Tolerance) {
    let cfg = config();
    let weights = Weights::random(&cfg, 11, &Device::Cpu, DType::F32).unwrap();
    let reference = run(&cfg, &weights, &Device::Cpu, DType::F32, false);
    for gradient_checkpointing in [false, true] {
        let got = run(&cfg, &weights, &device, dtype, gradient_checkpointing);
        let what =
            format!("{device:?} {dtype:?} (gradient checkpointing {gradient_checkpointing})");
        compare(&what, &reference, &got, &tol);
    }
}

fn compare(what: &str, reference: &Outputs, got: &Outputs, tol: &Tolerance) {
    let scale = reference.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (lmax, lmean) = abs_diff(&got.logits, &reference.logits);
    println!("{what}: logits |ref| max {scale:.3}, diff max {lmax:.2e} mean {lmean:.2e}");
    assert!(
        lmax <= tol.logits_max * scale,
        "{what}: logits differ by {lmax} (scale {scale})"
    );

    let (pmax, pmean) = abs_diff(&got.logprobs, &reference.logprobs);
    println!("{what}: log-probs diff max {pmax:.2e} mean {pmean:.2e}");
    assert!(
        pmax <= tol.logprobs_max,
        "{what}: log-probs max diff {pmax}"
    );
    assert!(
        pmean <= tol.logprobs_mean,
        "{what}: log-probs mean diff {pmean}"
    );

    let mut worst = (0f32, String::new());
    for (name, g_ref) in &reference.grads {
        let g = &got.grads[name];
        let diff: Vec<f32> = g.iter().zip(g_ref).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(g_ref).max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!(
        "{what}: worst gradient relative L2 error {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= tol.grad_rel,
        "{what}: gradient of {} off by {} (relative L2)",
        worst.1,
        worst.0
    );
}

#[test]
fn f16_on_the_cpu_matches_f32() {
    check(
        Device::Cpu,
        DType::F16,
        Tolerance {
            logits_max: 1e-2,
            logprobs_max: 2e-2,
            logprobs_mean: 5e-3,
            grad_rel: 2e-2,
        },
    );
}

/// The scores of a few sequences by a reward model (`*ForSequenceClassification`)
/// of [`config`]'s shape on `dev` in `dtype`, the same weights whatever the
/// device.
fn reward_scores(dev: &Device, dtype: DType) -> Vec<f32> {
    let mut raw = config().raw.clone();
    raw.insert(
        "architectures".into(),
        json!(["Qwen2ForSequenceClassification"]),
    );
    raw.insert("id2label".into(), json!({"0": "LABEL_0"}));
    raw.insert("pad_token_id".into(), json!(0));
    let cfg = ModelConfig::from_map(raw, Path::new("test")).unwrap();
    let mut w = Weights::random(&cfg, 4, dev, dtype).unwrap();
    let head: Vec<f32> = (0..cfg.hidden_size)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.05)
        .collect();
    let head = Tensor::from_vec(head, (1, cfg.hidden_size), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    w.insert("score.weight", head);
    let seqs = vec![vec![5u32, 9, 13, 2], vec![7, 8, 9, 10, 11, 12, 0], vec![3]];
    let rm = model::SequenceClassifier::new(&cfg, &w).unwrap();
    rm.scores(&seqs).unwrap().concat()
}

#[test]
fn a_reward_model_in_f16_on_the_cpu_matches_f32() {
    let f32s = reward_scores(&Device::Cpu, DType::F32);
    let f16s = reward_scores(&Device::Cpu, DType::F16);
    let scale = f32s.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3, "{f32s:?}");
    let (max, _) = abs_diff(&f32s, &f16s);
    assert!(max <= 1e-2 * (1.0 + scale), "{f32s:?} vs {f16s:?}");
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("these tests need a CUDA GPU (cuda:0)")
    }

    #[test]
    fn cuda_f32_matches_cpu_f32() {
        check(
            gpu(),
            DType::F32,
            Tolerance {
                logits_max: 1e-5,
                logprobs_max: 1e-4,
                logprobs_mean: 1e-5,
                grad_rel: 1e-4,
            },
        );
    }

    /// LoRA dropout on the GPU (cuRAND masks seeded per linear): one seed
    /// gives one forward, another seed another, and gradient
    /// checkpointing's second pass over the layers draws the same masks (its
    /// gradients are the full graph's).
    #[test]
    fn cuda_lora_dropout_is_seeded_and_replayed_by_gradient_checkpointing() {
        use model::lora::{Lora, LoraConfig, TargetModules};
        let dev = gpu();
        let cfg = config();
        let w = Weights::random(&cfg, 3, &dev, DType::F32).unwrap();
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
            dropout: 0.3,
            use_dora: false,
            modules_to_save: Vec::new(),
        };
        let fresh = config.init(&cfg, &w, 1, &dev, DType::F32).unwrap();
        let mut adapters = fresh.clone();
        for (name, t) in fresh.iter() {
            if name.contains(".lora_B.") {
                let noise = Tensor::randn(0f32, 0.3, t.shape(), &dev).unwrap();
                adapters.insert(name.clone(), noise);
            }
        }
        let (vars, view) = trainable(&adapters).unwrap();
        let base = CausalLM::with_lora(
            &cfg,
            &w,
            &Lora {
                config,
                adapters: view,
            },
        )
        .unwrap();
        let x = Tensor::new(&[[0u32, 3, 5, 7, 9, 2, 4], [0, 0, 8, 6, 1, 30, 31]], &dev).unwrap();
        let m = Tensor::new(&[[1u32; 7], [0, 0, 1, 1, 1, 1, 1]], &dev).unwrap();
        let mut lm = base.with_dropout(5);
        let forward = |lm: &CausalLM| host(&lm.forward(&x, &m).unwrap());
        let a = forward(&lm);
        assert_eq!(a, forward(&lm));
        assert!(abs_diff(&a, &forward(&base.with_dropout(6))).0 > 1e-4);
        assert!(abs_diff(&a, &forward(&base)).0 > 1e-4);
        for layers in [false, true] {
            lm.set_gradient_checkpointing(layers);
            let full = lm.completion_logprobs(&x, &m, 5, 0.9, false).unwrap();
            let expected = full.logprobs.sum_all().unwrap().backward().unwrap();
            let ck = lm.checkpointed_logprobs(&x, &m, 5, 0.9, false).unwrap();
            let ones = ck.logprobs().ones_like().unwrap();
            let got = ck.backward(Some(&ones), None).unwrap();
            for (name, var) in &vars {
                let (g, e) = (
                    host(got.get(var.as_tensor()).unwrap()),
                    host(expected.get(var.as_tensor()).unwrap()),
                );
                let (max, _) = abs_diff(&g, &e);
                assert!(
                    max <= 1e-4 * (1.0 + norm(&e)),
                    "{name} (layers checkpointed {layers}): differs by {max}"
                );
            }
        }
    }

    /// A reward model on the GPU scores as on the CPU: f32 to summation
    /// order, bf16 within its 8 bits.
    #[test]
    fn cuda_reward_model_scores_match_the_cpu() {
        let cpu = reward_scores(&Device::Cpu, DType::F32);
        let scale = cpu.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (dtype, rel) in [(DType::F32, 1e-5), (DType::BF16, 5e-2)] {
            let gpu = reward_scores(&gpu(), dtype);
            let (max, _) = abs_diff(&cpu, &gpu);
            assert!(max <= rel * (1.0 + scale), "{dtype:?}: {cpu:?} vs {gpu:?}");
        }
    }

    #[test]
    fn cuda_bf16_matches_cpu_f32() {
        // bf16 keeps 8 significant bits to f16's 11: about 8x the error
        // seen for f16 on the CPU (logits 2e-2, log-probs 1e-2 max and
        // 2.5e-3 mean, gradients 5e-3), with a margin of 2.
        check(
            gpu(),
            DType::BF16,
            Tolerance {
                logits_max: 6e-2,
                logprobs_max: 2e-1,
                logprobs_mean: 4e-2,
                grad_rel: 1e-1,
            },
        );
    }
}
