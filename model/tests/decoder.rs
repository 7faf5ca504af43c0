//! The decoder against itself: KV-cached decoding against the full forward,
//! padding invariance, gradients against finite differences, save/load
//! round-trips and errors on bad folders.

use std::path::Path;

use model::decoder::{LogitsWanted, trainable};
use model::lora::{Lora, LoraConfig, TargetModules};
use model::weights::Weights;
use model::{CausalLM, DType, Device, KvCache, ModelConfig, ModelError, Tensor};
use serde_json::json;

fn config(arch: &str) -> ModelConfig {
    let mut raw = json!({
        "architectures": [arch],
        "vocab_size": 37,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.2,
        "tie_word_embeddings": arch == "Qwen2ForCausalLM",
        "eos_token_id": 1,
    });
    if arch == "Qwen3ForCausalLM" {
        raw["head_dim"] = json!(12);
    }
    if arch == "LlamaForCausalLM" {
        raw["rope_theta"] = json!(500000.0);
        raw["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8});
    }
    ModelConfig::from_map(raw.as_object().unwrap().clone(), Path::new("test")).unwrap()
}

const ARCHS: [&str; 3] = ["Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"];

/// Random weights with non-trivial norms and biases, so that no term hides.
fn random_model(arch: &str, seed: u64, dtype: DType) -> (ModelConfig, Weights) {
    let cfg = config(arch);
    let mut w = Weights::random(&cfg, seed, &Device::Cpu, DType::F32).unwrap();
    let names: Vec<String> = w.names().cloned().collect();
    for name in &names {
        if name.ends_with("norm.weight") || name.ends_with(".bias") {
            let t = w.get(name).unwrap().clone();
            let noise = Tensor::randn(0f32, 0.3, t.shape(), &Device::Cpu).unwrap();
            let base = if name.ends_with(".bias") { 0.0 } else { 1.0 };
            w.insert(name.clone(), (noise + base).unwrap());
        }
    }
    (cfg, w.to_dtype(dtype).unwrap())
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff_f64(a, b) as f32
}

#[test]
fn kv_cached_decoding_matches_the_full_forward_at_every_position() {
    for arch in ARCHS {
        let (cfg, w) = random_model(arch, 1, DType::F32);
        let lm = CausalLM::new(&cfg, &w).unwrap();
        let seqs: Vec<Vec<u32>> = vec![
            vec![3, 5, 7, 11, 13, 17, 19, 23, 29, 31],
            vec![2, 4, 6, 8, 10, 12],
            vec![36, 1, 0, 9, 9, 9, 9, 20],
        ];
        // Reference: each sequence alone, full forward.
        let full: Vec<Tensor> = seqs
            .iter()
            .map(|s| {
                let x = ids(std::slice::from_ref(s));
                let m = Tensor::ones(x.shape(), DType::U32, &Device::Cpu).unwrap();
                lm.forward(&x, &m).unwrap().squeeze(0).unwrap()
            })
            .collect();
        // Cached: prefill different prompt lengths together, then decode one
        // token at a time; sequences leave when done, a new one joins midway.
        let mut cache = KvCache::new(&cfg, 4, 32, &Device::Cpu, DType::F32).unwrap();
        let slots: Vec<usize> = (0..2).map(|_| cache.allocate().unwrap()).collect();
        let prompt = [3usize, 2];
        let entries: Vec<(usize, &[u32])> = vec![
            (slots[0], &seqs[0][..prompt[0]]),
            (slots[1], &seqs[1][..prompt[1]]),
        ];
        let all = lm
            .forward_cached(&mut cache, &entries, LogitsWanted::All)
            .unwrap();
        for (b, p) in prompt.iter().enumerate() {
            for pos in 0..*p {
                let got = all.get(b).unwrap().get(pos).unwrap();
                let want = full[b].get(pos).unwrap();
                assert!(max_abs_diff(&got, &want) < 1e-4, "{arch} prefill pos {pos}");
            }
        }
        let mut running: Vec<(usize, usize, usize)> = vec![(0, slots[0], 3), (1, slots[1], 2)];
        let mut step = 0;
        while !running.is_empty() {
            if step == 2 {
                let slot = cache.allocate().unwrap();
                let l = lm
                    .forward_cached(&mut cache, &[(slot, &seqs[2][..4])], LogitsWanted::Last)
                    .unwrap();
                assert!(max_abs_diff(&l.get(0).unwrap(), &full[2].get(3).unwrap()) < 1e-4);
                running.push((2, slot, 4));
            }
            let entries: Vec<(usize, &[u32])> = running
                .iter()
                .map(|&(s, slot, pos)| (slot, &seqs[s][pos..pos + 1]))
                .collect();
            let logits = lm
                .forward_cached(&mut cache, &entries, LogitsWanted::Last)
                .unwrap();
            for (b, &(s, _, pos)) in running.iter().enumerate() {
                let d = max_abs_diff(&logits.get(b).unwrap(), &full[s].get(pos).unwrap());
                assert!(d < 1e-4, "{arch} seq {s} pos {pos}: {d}");
            }
            for r in running.iter_mut() {
                r.2 += 1;
            }
            running.retain(|&(s, slot, pos)| {
                let done = pos == seqs[s].len();
                if done {
                    cache.release(slot);
                }
                !done
            });
            step += 1;
        }
        assert_eq!(cache.num_free(), 4);
    }
}

#[test]
fn n_samples_share_a_copied_prefill() {
    let (cfg, w) = random_model("Qwen2ForCausalLM", 2, DType::F32);
    let lm = CausalLM::new(&cfg, &w).unwrap();
    let mut cache = KvCache::new(&cfg, 3, 16, &Device::Cpu, DType::F32).unwrap();
    let a = cache.allocate().unwrap();
    lm.forward_cached(&mut cache, &[(a, &[4, 5, 6])], LogitsWanted::Last)
        .unwrap();
    let b = cache.allocate().unwrap();
    cache.copy_prefix(a, b, 3).unwrap();
    let out = lm
        .forward_cached(&mut cache, &[(a, &[7]), (b, &[8])], LogitsWanted::Last)
        .unwrap();
    let m = Tensor::ones((1, 4), DType::U32, &Device::Cpu).unwrap();
    let want_a = lm
        .forward(&ids(&[vec![4, 5, 6, 7]]), &m)
        .unwrap()
        .get(0)
        .unwrap()
        .get(3)
        .unwrap();
    let want_b = lm
        .forward(&ids(&[vec![4, 5, 6, 8]]), &m)
        .unwrap()
        .get(0)
        .unwrap()
        .get(3)
        .unwrap();
    assert!(max_abs_diff(&out.get(0).unwrap(), &want_a) < 1e-4);
    assert!(max_abs_diff(&out.get(1).unwrap(), &want_b) < 1e-4);
}

#[test]
fn padded_batches_give_each_sequence_its_own_log_probs() {
    for arch in ARCHS {
        let (cfg, w) = random_model(arch, 3, DType::F32);
        let lm = CausalLM::new(&cfg, &w).unwrap();
        let a = vec![5u32, 6, 7, 8, 9, 10, 11];
        let b = vec![12u32, 13, 14, 15];
        let alone = |s: &Vec<u32>| {
            let x = ids(std::slice::from_ref(s));
            let m = Tensor::ones(x.shape(), DType::U32, &Device::Cpu).unwrap();
            lm.completion_logprobs(&x, &m, s.len() - 1, 0.8, true)
                .unwrap()
        };
        let (la, lb) = (alone(&a), alone(&b));
        // Left padding: b's tokens sit at the right end.
        let x = ids(&[a.clone(), [vec![0, 0, 0], b.clone()].concat()]);
        let m = ids(&[vec![1; 7], vec![0, 0, 0, 1, 1, 1, 1]]);
        let batch = lm.completion_logprobs(&x, &m, 6, 0.8, true).unwrap();
        let got_a = batch.logprobs.get(0).unwrap();
        let got_b = batch.logprobs.get(1).unwrap().narrow(0, 3, 3).unwrap();
        assert!(
            max_abs_diff(&got_a, &la.logprobs.get(0).unwrap()) < 1e-5,
            "{arch} left a"
        );
        assert!(
            max_abs_diff(&got_b, &lb.logprobs.get(0).unwrap()) < 1e-5,
            "{arch} left b"
        );
        let ent_b = batch
            .entropy
            .as_ref()
            .unwrap()
            .get(1)
            .unwrap()
            .narrow(0, 3, 3)
            .unwrap();
        assert!(max_abs_diff(&ent_b, &lb.entropy.unwrap().get(0).unwrap()) < 1e-5);
        // Right padding: logits of the real positions are unchanged.
        let x = ids(&[a.clone(), [b.clone(), vec![0, 0, 0]].concat()]);
        let m = ids(&[vec![1; 7], vec![1, 1, 1, 1, 0, 0, 0]]);
        let logits = lm.forward(&x, &m).unwrap();
        let alone_b = lm
            .forward(
                &ids(std::slice::from_ref(&b)),
                &Tensor::ones((1, 4), DType::U32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let d = max_abs_diff(
            &logits.get(1).unwrap().narrow(0, 0, 4).unwrap(),
            &alone_b.get(0).unwrap(),
        );
        assert!(d < 1e-5, "{arch} right padding {d}");
        assert!(
            logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())
        );
    }
}

#[test]
fn gradients_of_log_probs_match_finite_differences() {
    for arch in ARCHS {
        let (cfg, w) = random_model(arch, 4, DType::F64);
        let (vars, view) = trainable(&w).unwrap();
        let lm = CausalLM::new(&cfg, &view).unwrap();
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        let objective = |lm: &CausalLM| logprob_entropy_objective(lm, &x, &m);
        let grads = objective(&lm).backward().unwrap();
        // The backward keeps the parameters' gradients and nothing else (no
        // gradient of the attention mask or the rotary tables).
        assert_only_parameter_gradients(arch, &vars, &grads);
        // One element of every tensor kind: embeddings, projections, biases, norms.
        let checked = check_against_finite_differences(arch, &vars, &grads, || {
            objective(&lm).to_scalar::<f64>().unwrap()
        });
        assert_eq!(checked, cfg.tensor_shapes().len());
    }
}

/// On the CPU in f32 the full-sequence forward runs fused kernels (RMSNorm,
/// attention, SwiGLU, linears: `model::fused`); in f64 it runs candle's ops
/// spelled out. The two give the same log-probs and gradients, for every
/// architecture, padded rows included.
#[test]
fn fused_f32_kernels_give_the_spelled_out_f64_gradients() {
    for arch in ARCHS {
        let (cfg, w64) = random_model(arch, 5, DType::F64);
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        let run = |w: &Weights| {
            let (vars, view) = trainable(w).unwrap();
            let lm = CausalLM::new(&cfg, &view).unwrap();
            let lp = lm.completion_logprobs(&x, &m, 4, 0.9, true).unwrap();
            let objective = logprob_entropy_objective(&lm, &x, &m);
            let grads = objective.backward().unwrap();
            let grads: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(name, v)| {
                    let g = grads.get(v.as_tensor()).unwrap();
                    (name.clone(), g.to_dtype(DType::F64).unwrap())
                })
                .collect();
            (lp.logprobs.to_dtype(DType::F64).unwrap(), grads)
        };
        let (lp64, g64) = run(&w64);
        let (lp32, g32) = run(&w64.to_dtype(DType::F32).unwrap());
        let d = max_abs_diff_f64(&lp32, &lp64);
        assert!(d < 1e-4, "{arch} log-probs: {d}");
        for ((name, a), (_, r)) in g32.iter().zip(&g64) {
            let scale = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale.to_scalar::<f64>().unwrap().max(1e-3);
            let diff = max_abs_diff_f64(a, r);
            assert!(
                diff < 1e-3 * scale,
                "{arch} {name}: {diff} (largest {scale})"
            );
        }
    }
}

/// Summed completion log-probs plus 0.3 x summed entropy of the last 4
/// positions: both carry gradients to it.
fn logprob_entropy_objective(lm: &CausalLM, x: &Tensor, m: &Tensor) -> Tensor {
    let lp = lm.completion_logprobs(x, m, 4, 0.9, true).unwrap();
    (lp.logprobs.sum_all().unwrap() + (lp.entropy.unwrap().sum_all().unwrap() * 0.3).unwrap())
        .unwrap()
}

/// The backward's store holds the variables' gradients and nothing else
/// (none kept for the attention mask, the rotary tables, a frozen weight).
fn assert_only_parameter_gradients(
    arch: &str,
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
) {
    let kept: Vec<Vec<usize>> = grads
        .get_ids()
        .filter(|id| !vars.iter().any(|(_, v)| v.as_tensor().id() == **id))
        .filter_map(|id| grads.get_id(*id).map(|t| t.dims().to_vec()))
        .collect();
    assert!(
        kept.is_empty(),
        "{arch}: gradients kept for non-parameters {kept:?}"
    );
}

/// Checks one element of each variable's autograd gradient against a
/// central finite difference of `objective` (f64); returns how many were
/// checked.
fn check_against_finite_differences(
    arch: &str,
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    objective: impl Fn() -> f64,
) -> usize {
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
        let flat_g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let k = (name.len() * 7919) % flat.len();
        let eps = 1e-5;
        let eval_at = |delta: f64| -> f64 {
            let mut p = flat.clone();
            p[k] += delta;
            var.set(&Tensor::from_vec(p, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            objective()
        };
        let fd = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps);
        var.set(&orig).unwrap();
        assert!(
            (fd - flat_g[k]).abs() < 1e-5 * (1.0 + fd.abs()),
            "{arch} {name}[{k}]: autograd {} vs fd {fd}",
            flat_g[k]
        );
    }
    vars.len()
}

/// Max |a - b| over every element, read in f64 whatever the dtype.
fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .unwrap()
}

/// A loss that is not linear in its inputs, so that the gradients handed to
/// the checkpointed backward differ per token.
fn nonlinear_loss(lp: &Tensor, entropy: Option<&Tensor>) -> Tensor {
    let weights = Tensor::from_vec(
        (0..lp.elem_count())
            .map(|i| 0.5 + i as f64 * 0.1)
            .collect::<Vec<_>>(),
        lp.shape(),
        &Device::Cpu,
    )
    .and_then(|w| w.to_dtype(lp.dtype()))
    .unwrap();
    let mut loss = (lp.exp().unwrap() * &weights).unwrap().sum_all().unwrap();
    if let Some(ent) = entropy {
        loss = (loss + (ent.sqr().unwrap() * 0.3).unwrap().sum_all().unwrap()).unwrap();
    }
    loss
}

#[test]
fn checkpointed_logits_give_the_same_log_probs_and_gradients() {
    // With the decoder layers checkpointed too (gradient checkpointing) and
    // without: the same values and gradients as the full autograd graph. In
    // f32 on the CPU the output embedding's gradient is summed over chunks
    // in place (fused kernels): to f32's precision.
    let cases = ARCHS
        .iter()
        .flat_map(|a| [(*a, false), (*a, true)])
        .flat_map(|(a, l)| [(a, l, DType::F64), (a, l, DType::F32)]);
    for (arch, layers, dtype) in cases {
        let (tol_values, tol_grads) = if dtype == DType::F64 {
            (1e-12, 1e-10)
        } else {
            (1e-5, 1e-5)
        };
        let (cfg, w) = random_model(arch, 5, dtype);
        let (vars, view) = trainable(&w).unwrap();
        let mut lm = CausalLM::new(&cfg, &view).unwrap();
        lm.set_gradient_checkpointing(layers);
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        for with_entropy in [false, true] {
            let full = lm
                .completion_logprobs(&x, &m, 5, 0.9, with_entropy)
                .unwrap();
            let expected = nonlinear_loss(&full.logprobs, full.entropy.as_ref())
                .backward()
                .unwrap();
            // Chunks of 1, 2 and all 5 positions (a batch of 2 rows).
            for positions in [1, 2, 5] {
                lm.set_logits_chunk_elements(positions * 2 * cfg.vocab_size);
                let ck = lm
                    .checkpointed_logprobs(&x, &m, 5, 0.9, with_entropy)
                    .unwrap();
                assert!(max_abs_diff_f64(ck.logprobs(), &full.logprobs) < tol_values);
                if let (Some(a), Some(b)) = (ck.entropy(), &full.entropy) {
                    assert!(max_abs_diff_f64(a, b) < tol_values);
                }
                let leaf = nonlinear_loss(ck.logprobs(), ck.entropy())
                    .backward()
                    .unwrap();
                let d_lp = leaf.get(ck.logprobs()).cloned();
                let d_ent = ck.entropy().and_then(|e| leaf.get(e)).cloned();
                let got = ck.backward(d_lp.as_ref(), d_ent.as_ref()).unwrap();
                for (name, var) in &vars {
                    let (Some(a), Some(b)) =
                        (got.get(var.as_tensor()), expected.get(var.as_tensor()))
                    else {
                        panic!("{arch} {name} (layers checkpointed {layers}): missing gradient");
                    };
                    let scale = b
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    let diff = max_abs_diff_f64(a, b);
                    assert!(
                        diff <= tol_grads * (1.0 + scale),
                        "{arch} {name} ({dtype:?}, chunks of {positions}, entropy \
                         {with_entropy}, layers checkpointed {layers}): differs by {diff}"
                    );
                }
            }
            lm.set_logits_chunk_elements(1 << 24);
        }
    }
}

fn write_folder(dir: &Path, arch: &str) -> (ModelConfig, Weights) {
    let (cfg, w) = random_model(arch, 5, DType::F32);
    std::fs::write(dir.join("config.json"), cfg.to_json_string()).unwrap();
    w.save(&dir.join("model.safetensors")).unwrap();
    (cfg, w)
}

#[test]
fn bad_folders_give_errors_that_name_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_folder(d, "LlamaForCausalLM");
    assert!(CausalLM::from_dir(d, &Device::Cpu, DType::F32).is_ok());

    // Unknown architecture.
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        text.replace("LlamaForCausalLM", "MambaForCausalLM"),
    )
    .unwrap();
    let e = ModelConfig::from_dir(d).unwrap_err().to_string();
    assert!(
        e.contains("MambaForCausalLM") && e.contains("config.json"),
        "{e}"
    );

    // Unsupported field value.
    std::fs::write(
        d.join("config.json"),
        text.replace("\"llama3\"", "\"yarn\""),
    )
    .unwrap();
    let e = ModelConfig::from_dir(d).unwrap_err().to_string();
    assert!(e.contains("rope_type") && e.contains("yarn"), "{e}");
    std::fs::write(d.join("config.json"), &text).unwrap();

    // Shape mismatch: the config says a wider MLP than the weights hold.
    std::fs::write(
        d.join("config.json"),
        text.replace("\"intermediate_size\": 48", "\"intermediate_size\": 50"),
    )
    .unwrap();
    let e = CausalLM::from_dir(d, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[50, 32]"),
        "{e}"
    );
    std::fs::write(d.join("config.json"), &text).unwrap();

    // Missing tensor.
    let w = Weights::load(d, &Device::Cpu, DType::F32).unwrap();
    let mut kept = std::collections::BTreeMap::new();
    for (n, t) in w
        .iter()
        .filter(|(n, _)| !n.contains("layers.1.self_attn.k_proj"))
    {
        kept.insert(n.clone(), t.clone());
    }
    Weights::new(kept)
        .save(&d.join("model.safetensors"))
        .unwrap();
    let e = CausalLM::from_dir(d, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("model.safetensors"),
        "{e}"
    );

    // Corrupt weight file.
    std::fs::write(
        d.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    let e = Weights::load(d, &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(e, ModelError::WeightFile { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // Missing weight file, and a shard the index names but that is absent.
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = Weights::load(d, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = Weights::load(d, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    // Missing config.
    let empty = tempfile::tempdir().unwrap();
    let e = ModelConfig::from_dir(empty.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn out_of_range_inputs_are_errors_not_panics() {
    let (cfg, w) = random_model("Qwen2ForCausalLM", 6, DType::F32);
    let lm = CausalLM::new(&cfg, &w).unwrap();
    let x = ids(&[vec![1, 2, 99]]);
    let m = Tensor::ones((1, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(lm.forward(&x, &m).unwrap_err().to_string().contains("99"));
    let mut cache = KvCache::new(&cfg, 1, 4, &Device::Cpu, DType::F32).unwrap();
    let s = cache.allocate().unwrap();
    let e = lm
        .forward_cached(&mut cache, &[(s, &[1, 2, 3, 4, 5])], LogitsWanted::Last)
        .unwrap_err();
    assert!(e.to_string().contains("KV cache"), "{e}");
    assert_eq!(
        cache.len(s),
        Some(0),
        "a refused step leaves the cache as it was"
    );
    assert!(
        lm.forward_cached(&mut cache, &[(0, &[])], LogitsWanted::Last)
            .is_err()
    );
}
#[test]
fn a_saved_folder_loads_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = model::presets::init_model(model::presets::Preset::Tiny, dir.path(), 7).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let w = Weights::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let again = tempfile::tempdir().unwrap();
    let tok = model::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
    let cfg2 = ModelConfig::from_dir(dir.path()).unwrap();
    assert_eq!(cfg, cfg2);
    model::pretrained::save_pretrained(again.path(), &cfg2, &w, &tok).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let a = std::fs::read(dir.path().join(f)).unwrap();
        let b = std::fs::read(again.path().join(f)).unwrap();
        assert!(a == b, "{f} differs after a load/save round trip");
    }
    // Same seed, same bytes; another seed, other weights.
    let same = tempfile::tempdir().unwrap();
    model::presets::init_model(model::presets::Preset::Tiny, same.path(), 7).unwrap();
    let other = tempfile::tempdir().unwrap();
    model::presets::init_model(model::presets::Preset::Tiny, other.path(), 8).unwrap();
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(bytes(dir.path()), bytes(same.path()));
    assert_ne!(bytes(dir.path()), bytes(other.path()));
    assert!(
        cfg.num_parameters() < 1_000_000,
        "tiny has {} parameters",
        cfg.num_parameters()
    );
}

#[test]
fn preset_sizes() {
    use model::presets::{Preset, config};
    assert!(config(Preset::Tiny, 100, 1, 0).unwrap().num_parameters() < 600_000);
    let small = config(Preset::Small, 100, 1, 0).unwrap().num_parameters();
    assert!(
        (15_000_000..25_000_000).contains(&small),
        "small has {small}"
    );
}

// ---- LoRA

fn lora_config(targets: TargetModules, r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 6.0,
        target_modules: targets,
        use_rslora: false,
        dropout: 0.0,
        use_dora: false,
        modules_to_save: Vec::new(),
    }
}

/// Adapters with a random `B` too (a fresh one is zero), so that the
/// adapters change the output; DoRA's magnitudes moved off the row norms
/// they start at (0.5x to 1.5x), so that they change it too.
fn random_lora(cfg: &ModelConfig, base: &Weights, config: LoraConfig, dtype: DType) -> Lora {
    let fresh = config.init(cfg, base, 11, &Device::Cpu, dtype).unwrap();
    let mut adapters = fresh.clone();
    for (name, t) in fresh.iter() {
        if name.contains(".lora_B.") {
            let noise = Tensor::randn(0f32, 0.3, t.shape(), &Device::Cpu).unwrap();
            adapters.insert(name.clone(), noise.to_dtype(dtype).unwrap());
        }
        if name.ends_with(".lora_magnitude_vector") {
            let factor = Tensor::rand(0.5f32, 1.5, t.shape(), &Device::Cpu).unwrap();
            let moved = (t * factor.to_dtype(dtype).unwrap()).unwrap();
            adapters.insert(name.clone(), moved);
        }
    }
    Lora { config, adapters }
}

#[test]
fn fresh_lora_adapters_leave_the_model_as_it_was() {
    for arch in ARCHS {
        let (cfg, w) = random_model(arch, 21, DType::F32);
        let config = lora_config(TargetModules::AllLinear, 4);
        let adapters = config.init(&cfg, &w, 3, &Device::Cpu, DType::F32).unwrap();
        // Seeded: the same bytes again; B starts at zero, A does not.
        let again = config.init(&cfg, &w, 3, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(adapters.len(), 2 * 7 * cfg.num_hidden_layers);
        for (name, t) in adapters.iter() {
            let a = max_abs_diff_f64(t, again.get(name).unwrap());
            assert_eq!(a, 0.0, "{name} differs between two inits with one seed");
            let largest = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if name.contains(".lora_B.") {
                assert_eq!(largest, 0.0);
            } else {
                // PEFT's Kaiming-uniform bound, 1/sqrt(in_features).
                let bound = 1.0 / (t.dim(1).unwrap() as f32).sqrt();
                assert!(
                    largest > 0.0 && largest <= bound,
                    "{name}: {largest} vs {bound}"
                );
            }
        }
        let lora = Lora { config, adapters };
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        let base = CausalLM::new(&cfg, &w).unwrap().forward(&x, &m).unwrap();
        let adapted = CausalLM::with_lora(&cfg, &w, &lora)
            .unwrap()
            .forward(&x, &m)
            .unwrap();
        assert_eq!(max_abs_diff(&base, &adapted), 0.0, "{arch}");
    }
}

#[test]
fn a_lora_model_computes_what_its_merged_weights_compute() {
    // The adapter path (W x + s B A x, base frozen) against the plain model
    // on W + s B A, in f64: for each way of naming targets.
    let targets = [
        TargetModules::AllLinear,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        TargetModules::Names(vec![
            "layers.1.mlp.down_proj".into(),
            "self_attn.o_proj".into(),
        ]),
        TargetModules::Regex(r"model\.layers\.0\..*_proj".into()),
    ];
    let cases = ARCHS
        .iter()
        .zip(targets.iter().cycle())
        .chain([(&ARCHS[0], &targets[3])]);
    // Each also with DoRA: `m / ||W + s B A|| (W + s B A)` per row merged.
    for ((arch, targets), use_dora) in cases
        .clone()
        .map(|c| (c, false))
        .chain(cases.map(|c| (c, true)))
    {
        let (cfg, w) = random_model(arch, 22, DType::F64);
        let mut config = lora_config(targets.clone(), 3);
        config.use_rslora = *arch == "LlamaForCausalLM";
        config.use_dora = use_dora;
        let lora = random_lora(&cfg, &w, config.clone(), DType::F64);
        let merged = config.merge(&cfg, &w, &lora.adapters).unwrap();
        assert_eq!(merged.len(), config.adapted(&cfg).unwrap().len());
        let mut merged_weights = w.clone();
        for (name, t) in merged {
            assert!(
                max_abs_diff_f64(&t, w.get(&name).unwrap()) > 0.0,
                "{name} unchanged"
            );
            merged_weights.insert(name, t);
        }
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        let lora_model = CausalLM::with_lora(&cfg, &w, &lora).unwrap();
        let adapted = lora_model.forward(&x, &m).unwrap();
        let plain = CausalLM::new(&cfg, &merged_weights)
            .unwrap()
            .forward(&x, &m)
            .unwrap();
        let base = CausalLM::new(&cfg, &w).unwrap().forward(&x, &m).unwrap();
        assert!(
            max_abs_diff_f64(&adapted, &base) > 1e-3,
            "{arch}: adapters did nothing"
        );
        assert!(
            max_abs_diff_f64(&adapted, &plain) < 1e-10,
            "{arch} {targets:?} DoRA {use_dora}"
        );
        // Adapters off: the base model exactly (the KL reference of a LoRA run).
        let off = lora_model.without_lora().unwrap().forward(&x, &m).unwrap();
        assert_eq!(max_abs_diff_f64(&off, &base), 0.0, "{arch}");
    }
}

#[test]
fn lora_gradients_match_finite_differences_and_skip_the_frozen_base() {
    // Without dropout, and with PEFT's lora_dropout under one seed (the same
    // masks on every forward: finite differences see one function, and the
    // layers run again by gradient checkpointing draw the masks again).
    // DoRA's row norms are constants of its backward pass (as PEFT has
    // it), which finite differences of the whole cannot see: its
    // magnitudes are checked against them, its A and B against PEFT's
    // gradients (peft_reference.rs).
    let cases = ARCHS
        .iter()
        .map(|a| (*a, 0.0, false))
        .chain([(ARCHS[0], 0.3, false), (ARCHS[2], 0.5, false)])
        .chain([(ARCHS[1], 0.0, true), (ARCHS[0], 0.3, true)]);
    for (arch, dropout, use_dora) in cases {
        let (cfg, w) = random_model(arch, 23, DType::F64);
        let mut config = lora_config(TargetModules::AllLinear, 2);
        config.dropout = dropout;
        config.use_dora = use_dora;
        let lora = random_lora(&cfg, &w, config, DType::F64);
        let (vars, view) = trainable(&lora.adapters).unwrap();
        let trained = Lora {
            config: lora.config.clone(),
            adapters: view,
        };
        let mut lm = CausalLM::with_lora(&cfg, &w, &trained).unwrap();
        if dropout > 0.0 {
            let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4]]);
            let m = ids(&[vec![1; 7]]);
            let plain = lm.forward(&x, &m).unwrap();
            lm = lm.with_dropout(77);
            assert!(max_abs_diff_f64(&lm.forward(&x, &m).unwrap(), &plain) > 1e-6);
        }
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        let objective = |lm: &CausalLM| logprob_entropy_objective(lm, &x, &m);
        let grads = objective(&lm).backward().unwrap();
        // The frozen base gets no gradient at all (not a zero one: none is
        // made), nor does anything else but the adapters.
        assert_only_parameter_gradients(arch, &vars, &grads);
        let checked: Vec<(String, candle_core::Var)> = vars
            .iter()
            .filter(|(name, _)| !use_dora || name.ends_with(".lora_magnitude_vector"))
            .cloned()
            .collect();
        check_against_finite_differences(arch, &checked, &grads, || {
            objective(&lm).to_scalar::<f64>().unwrap()
        });
        // The checkpointed paths (logits, and the layers with gradient
        // checkpointing) give the adapters the same gradients.
        for layers in [false, true] {
            lm.set_gradient_checkpointing(layers);
            lm.set_logits_chunk_elements(2 * 2 * cfg.vocab_size);
            let full = lm.completion_logprobs(&x, &m, 5, 0.9, false).unwrap();
            let expected = nonlinear_loss(&full.logprobs, None).backward().unwrap();
            let ck = lm.checkpointed_logprobs(&x, &m, 5, 0.9, false).unwrap();
            let leaf = nonlinear_loss(ck.logprobs(), None).backward().unwrap();
            let d_lp = leaf.get(ck.logprobs()).cloned();
            let got = ck.backward(d_lp.as_ref(), None).unwrap();
            for (name, var) in &vars {
                let (a, b) = (
                    got.get(var.as_tensor()).unwrap(),
                    expected.get(var.as_tensor()).unwrap(),
                );
                assert!(
                    max_abs_diff_f64(a, b) < 1e-10,
                    "{arch} {name} layers {layers}"
                );
            }
            for (name, t) in w.iter() {
                assert!(got.get(t).is_none(), "{arch}: frozen {name} got a gradient");
            }
        }
    }
}

/// PEFT's `modules_to_save`: whole modules train as copies beside the
/// adapters (matched as PEFT does, by the end of the module's name). The
/// model runs on the copies, a merge hands them out, the base gets no
/// gradient, and the copies' gradients match finite differences.
#[test]
fn lora_modules_to_save_train_whole_copies() {
    for arch in ["LlamaForCausalLM", "Qwen3ForCausalLM"] {
        let (cfg, w) = random_model(arch, 25, DType::F64);
        let mut config = lora_config(TargetModules::Names(vec!["q_proj".into()]), 2);
        config.modules_to_save = vec!["lm_head".into(), "embed_tokens".into(), "norm".into()];
        let saved: Vec<String> = config
            .saved_weights(&cfg)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // "norm" ends every norm's name: the final one and each layer's.
        let norms = if arch == "Qwen3ForCausalLM" { 4 } else { 2 };
        assert_eq!(saved.len(), 3 + norms * cfg.num_hidden_layers, "{saved:?}");
        assert_eq!(saved[0], "model.embed_tokens.weight");
        assert_eq!(saved[saved.len() - 1], "lm_head.weight");
        assert!(saved.contains(&"model.layers.1.post_attention_layernorm.weight".into()));
        let fresh = random_lora(&cfg, &w, config, DType::F64);
        for name in &saved {
            let copy = fresh.adapters.get(name).unwrap();
            assert_eq!(max_abs_diff_f64(copy, w.get(name).unwrap()), 0.0, "{name}");
        }
        // Copies moved off the base: the model runs on them, as a plain
        // model of the merged weights does.
        let mut adapters = fresh.adapters.clone();
        for name in &saved {
            let t = adapters.get(name).unwrap().clone();
            let noise = Tensor::randn(0f64, 0.2, t.shape(), &Device::Cpu).unwrap();
            adapters.insert(name.clone(), (t + noise).unwrap());
        }
        let lora = Lora {
            config: fresh.config.clone(),
            adapters,
        };
        let lm = CausalLM::with_lora(&cfg, &w, &lora).unwrap();
        assert!(
            lm.without_lora().is_none(),
            "the base's modules are not held"
        );
        let merged = lora.config.merge(&cfg, &w, &lora.adapters).unwrap();
        for name in &saved {
            assert_eq!(
                max_abs_diff_f64(&merged[name], lora.adapters.get(name).unwrap()),
                0.0
            );
        }
        let mut plain = w.clone();
        for (name, t) in merged {
            plain.insert(name, t);
        }
        let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
        let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
        let adapted = lm.forward(&x, &m).unwrap();
        let reference = CausalLM::new(&cfg, &plain)
            .unwrap()
            .forward(&x, &m)
            .unwrap();
        assert!(max_abs_diff_f64(&adapted, &reference) < 1e-10, "{arch}");
        let base = CausalLM::new(&cfg, &w).unwrap().forward(&x, &m).unwrap();
        assert!(max_abs_diff_f64(&adapted, &base) > 1e-3, "{arch}");

        let (vars, view) = trainable(&lora.adapters).unwrap();
        let trained = Lora {
            config: lora.config.clone(),
            adapters: view,
        };
        let lm = CausalLM::with_lora(&cfg, &w, &trained).unwrap();
        let objective = |lm: &CausalLM| logprob_entropy_objective(lm, &x, &m);
        let grads = objective(&lm).backward().unwrap();
        // Nothing but the adapters and the saved copies: the frozen base
        // gets none.
        assert_only_parameter_gradients(arch, &vars, &grads);
        check_against_finite_differences(arch, &vars, &grads, || {
            objective(&lm).to_scalar::<f64>().unwrap()
        });

        // PEFT's files: the copies under `base_model.model.<name>`, the
        // list in adapter_config.json; read back the same.
        let dir = tempfile::tempdir().unwrap();
        lora.save_peft(dir.path(), "/models/base").unwrap();
        let file = saved_adapter_file(dir.path());
        assert!(file.get("base_model.model.lm_head.weight").is_some());
        assert!(file.get("base_model.model.model.norm.weight").is_some());
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["modules_to_save"],
            json!(["lm_head", "embed_tokens", "norm"])
        );
        let back = Lora::load_peft(dir.path(), &Device::Cpu, DType::F64).unwrap();
        assert_eq!(back.config, lora.config);
        assert!(back.config.same_adapters(&lora.config, &cfg).unwrap());
        back.check(&cfg).unwrap();
        for (name, t) in lora.adapters.iter() {
            assert_eq!(max_abs_diff_f64(back.adapters.get(name).unwrap(), t), 0.0);
        }
    }

    // What cannot be: tied embeddings, a name that matches nothing, a
    // module that is both adapted and saved.
    let tied = config("Qwen2ForCausalLM");
    let untied = config("LlamaForCausalLM");
    for (cfg, targets, save, says) in [
        (&tied, "q_proj", "lm_head", "tie_word_embeddings"),
        (&tied, "q_proj", "embed_tokens", "tie_word_embeddings"),
        (&untied, "q_proj", "score", "matches no module"),
        (
            &untied,
            "q_proj",
            "self_attn.q_proj",
            "also gives an adapter",
        ),
    ] {
        let mut config = lora_config(TargetModules::Names(vec![targets.into()]), 2);
        config.modules_to_save = vec![save.into()];
        let e = config.saved_weights(cfg).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains(save), "{save}: {e}");
    }
    // A tied model's norms may still train.
    let mut config = lora_config(TargetModules::AllLinear, 2);
    config.modules_to_save = vec!["model.norm".into()];
    assert_eq!(
        config.saved_weights(&tied).unwrap(),
        vec![("model.norm.weight".to_string(), vec![32])]
    );
}

#[test]
fn lora_dropout_is_seeded_and_off_outside_training_forwards() {
    let (cfg, w) = random_model(ARCHS[0], 24, DType::F32);
    let x = ids(&[vec![0, 3, 5, 7, 9, 2, 4], vec![0, 0, 8, 6, 1, 30, 31]]);
    let m = ids(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]]);
    let forward = |lm: &CausalLM| lm.forward(&x, &m).unwrap();
    let mut config = lora_config(TargetModules::AllLinear, 4);
    config.dropout = 0.2;
    let lm = CausalLM::with_lora(&cfg, &w, &random_lora(&cfg, &w, config, DType::F32)).unwrap();
    let plain = forward(&lm);
    // One seed, one set of masks; another seed, others.
    let (a, b) = (forward(&lm.with_dropout(1)), forward(&lm.with_dropout(1)));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &forward(&lm.with_dropout(2))) > 1e-4);
    assert!(max_abs_diff(&a, &plain) > 1e-4);
    // Without a seed (scoring, old and reference log-probs) nothing drops.
    assert_eq!(max_abs_diff(&forward(&lm), &plain), 0.0);
    // lora_dropout 0: a seed changes nothing.
    let mut config = lora_config(TargetModules::AllLinear, 4);
    config.dropout = 0.0;
    let lm = CausalLM::with_lora(&cfg, &w, &random_lora(&cfg, &w, config, DType::F32)).unwrap();
    assert_eq!(
        max_abs_diff(&forward(&lm.with_dropout(9)), &forward(&lm)),
        0.0
    );
}

/// The tensors of the `adapter_model.safetensors` PEFT's folder `dir` holds,
/// by the names written there.
fn saved_adapter_file(dir: &Path) -> Weights {
    Weights::load_files(
        &[dir.join(model::lora::ADAPTER_WEIGHTS_FILE)],
        dir,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn lora_targets_and_adapter_folders_are_checked_and_round_trip() {
    let (cfg, w) = random_model("Qwen2ForCausalLM", 24, DType::F32);
    let count = |t: TargetModules| lora_config(t, 2).adapted(&cfg).map(|a| a.len());
    assert_eq!(count(TargetModules::AllLinear).unwrap(), 14);
    assert_eq!(
        count(TargetModules::Names(vec!["q_proj".into()])).unwrap(),
        2
    );
    assert_eq!(
        count(TargetModules::Names(vec![
            "mlp.up_proj".into(),
            "layers.0.self_attn.k_proj".into()
        ]))
        .unwrap(),
        3
    );
    assert_eq!(
        count(TargetModules::Regex(r".*\.(q|v)_proj".into())).unwrap(),
        4
    );
    for (bad, says) in [
        (TargetModules::Names(vec!["lm_head".into()]), "lm_head"),
        (TargetModules::Names(vec!["q_prj".into()]), "q_prj"),
        (TargetModules::Names(vec![]), "empty"),
        (TargetModules::Regex("lm_head".into()), "matches no"),
        (TargetModules::Regex("(".into()), "("),
    ] {
        let e = count(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
    assert!(
        lora_config(TargetModules::AllLinear, 0)
            .adapted(&cfg)
            .is_err()
    );
    let mut rs = lora_config(TargetModules::AllLinear, 4);
    assert_eq!(rs.scaling(), 1.5);
    rs.use_rslora = true;
    assert_eq!(rs.scaling(), 3.0);

    // PEFT's folder: prefixed names, its config keys; read back as written.
    let lora = random_lora(
        &cfg,
        &w,
        lora_config(
            TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            2,
        ),
        DType::F32,
    );
    let dir = tempfile::tempdir().unwrap();
    lora.save_peft(dir.path(), "/models/base").unwrap();
    let file = saved_adapter_file(dir.path());
    let names: Vec<&String> = file.names().collect();
    assert!(
        names.contains(
            &&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        )
    );
    assert_eq!(names.len(), 8);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(model::lora::ADAPTER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 2);
    assert_eq!(config["lora_alpha"], 6.0);
    assert_eq!(config["target_modules"], json!(["q_proj", "v_proj"]));
    assert_eq!(config["base_model_name_or_path"], "/models/base");
    let back = Lora::load_peft(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(back.config, lora.config);
    for (name, t) in lora.adapters.iter() {
        assert_eq!(
            max_abs_diff_f64(t, back.adapters.get(name).unwrap()),
            0.0,
            "{name}"
        );
    }
    // An adapter the config does not target, or a missing one, is refused by name.
    let mut extra = lora.clone();
    extra.config.target_modules = TargetModules::Names(vec!["q_proj".into()]);
    let e = CausalLM::with_lora(&cfg, &w, &extra)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("v_proj.lora_A.weight"), "{e}");
    let mut missing = lora.clone();
    missing.config.target_modules = TargetModules::AllLinear;
    let e = CausalLM::with_lora(&cfg, &w, &missing)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lora_A.weight") || e.contains("lora_B.weight"),
        "{e}"
    );
    // A DoRA config without its magnitudes is refused by name.
    let mut v = config.clone();
    v["use_dora"] = json!(true);
    std::fs::write(
        dir.path().join(model::lora::ADAPTER_CONFIG_FILE),
        v.to_string(),
    )
    .unwrap();
    let e = Lora::load_peft(dir.path(), &Device::Cpu, DType::F32)
        .unwrap()
        .check(&cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains(".lora_magnitude_vector"), "{e}");
    // DoRA's folder: PEFT's magnitude names (no `.weight`), `use_dora`.
    let mut config = lora_config(TargetModules::Names(vec!["v_proj".into()]), 2);
    config.use_dora = true;
    let lora = random_lora(&cfg, &w, config, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    lora.save_peft(dir.path(), "/models/base").unwrap();
    let file = saved_adapter_file(dir.path());
    let magnitude = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector";
    assert_eq!(file.get(magnitude).unwrap().dims(), [16]);
    let back = Lora::load_peft(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert!(back.config.use_dora);
    assert_eq!(back.check(&cfg).unwrap().len(), 2);
    for (name, t) in lora.adapters.iter() {
        assert_eq!(
            max_abs_diff(t, back.adapters.get(name).unwrap()),
            0.0,
            "{name}"
        );
    }
}
