//! Item 3 (log-probs and entropy with the sampling temperature) against the
//! numpy reference, and the whole path on a real (tiny, random) model: padded
//! batch -> completion log-probs -> GRPO loss -> gradients of the model's
//! variables, accumulated over micro-batches.

use candle_core::{DType, Device, Tensor, Var};
use learner::accumulation::GradAccumulator;
use learner::batch::{IGNORE_INDEX, PaddedBatch, SequenceTokens, pad_batch};
use learner::grpo_config::{GrpoConfig, ImportanceSamplingLevel, LossType};
use learner::loss::{LossInputs, Normalizers, grpo_loss};
use model::logprobs::{entropy, selective_log_softmax};
use model::{CausalLM, ModelConfig, Weights};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/grpo_fixture.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().expect("number")),
    }
}

fn flatten(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    flat(v, &mut out);
    out
}

#[test]
fn selective_log_softmax_and_entropy_match_reference_with_temperature() {
    let f = fixture();
    for case in f["logprobs"].as_array().unwrap() {
        let temp = case["temperature"].as_f64().unwrap();
        let logits = Tensor::from_vec(flatten(&case["logits"]), (2, 3, 11), &Device::Cpu).unwrap();
        let targets: Vec<u32> = flatten(&case["targets"])
            .iter()
            .map(|x| *x as u32)
            .collect();
        let targets = Tensor::from_vec(targets, (2, 3), &Device::Cpu).unwrap();
        let want_lp = flatten(&case["logprobs"]);
        let want_h = flatten(&case["entropy"]);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let l = logits.to_dtype(dtype).unwrap();
            let lp = selective_log_softmax(&l, &targets, temp).unwrap();
            let h = entropy(&l, temp).unwrap();
            let lp = lp
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let h = h
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (i, (g, w)) in lp.iter().zip(&want_lp).enumerate() {
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "T={temp} {dtype:?} logp[{i}] {g} vs {w}"
                );
            }
            for (i, (g, w)) in h.iter().zip(&want_h).enumerate() {
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "T={temp} {dtype:?} entropy[{i}] {g} vs {w}"
                );
            }
        }
    }
}

const VOCAB: usize = 32;
const TEMPERATURE: f64 = 0.8;

fn tiny_model() -> (Vec<Var>, CausalLM) {
    // A tiny Qwen2 (2 layers, hidden 32), random weights, f64.
    let json = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    });
    let cfg =
        ModelConfig::from_json_str(&json.to_string(), std::path::Path::new("<test>")).unwrap();
    let weights = Weights::random(&cfg, 7, &Device::Cpu, DType::F64).unwrap();
    let (vars, view) = model::decoder::trainable(&weights).unwrap();
    let lm = CausalLM::new(&cfg, &view).unwrap();
    (vars.into_iter().map(|(_, v)| v).collect(), lm)
}

fn sequences() -> Vec<SequenceTokens> {
    let lens = [
        (3, 4),
        (1, 2),
        (5, 0),
        (2, 5),
        (4, 1),
        (2, 3),
        (3, 5),
        (1, 1),
    ];
    let mut next = 2u32;
    lens.iter()
        .map(|&(p, c)| {
            let mut take = |n: usize| -> Vec<u32> {
                (0..n)
                    .map(|_| {
                        next = (next * 7 + 3) % (VOCAB as u32 - 2) + 2;
                        next
                    })
                    .collect()
            };
            SequenceTokens {
                prompt_ids: take(p),
                completion_ids: take(c),
            }
        })
        .collect()
}

#[test]
fn completion_logprobs_follow_the_labels_of_the_padded_batch() {
    let (_, lm) = tiny_model();
    let batch = pad_batch(&sequences(), 0, None, &Device::Cpu).unwrap();
    let out = batch.completion_logprobs(&lm, TEMPERATURE, true).unwrap();
    let lp = out.logprobs.to_vec2::<f64>().unwrap();
    // Independent path: the full-sequence logits at position t score labels[t].
    let logits = lm.forward(&batch.input_ids, &batch.attention_mask).unwrap();
    let labels = batch.labels.to_vec2::<i64>().unwrap();
    let (p, k) = (batch.prompt_width, batch.logits_to_keep);
    let mut checked = 0;
    for (i, row) in labels.iter().enumerate() {
        for (t, &label) in row.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            let l = logits.get(i).unwrap().get(t).unwrap().unsqueeze(0).unwrap();
            let target = Tensor::new(&[label as u32], &Device::Cpu).unwrap();
            let want = selective_log_softmax(&l, &target, TEMPERATURE)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0];
            let j = t + 1 - p;
            assert!(j < k);
            assert!(
                (lp[i][j] - want).abs() < 1e-9,
                "row {i} col {j}: {} vs {want}",
                lp[i][j]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, batch.num_completion_tokens());
    let h = out.entropy.unwrap().to_vec2::<f64>().unwrap();
    assert!(h.iter().flatten().all(|x| x.is_finite() && *x >= 0.0));
}

fn loss_inputs(lm: &CausalLM, batch: &PaddedBatch, seed: f64) -> LossInputs {
    let out = batch.completion_logprobs(lm, TEMPERATURE, true).unwrap();
    let (b, k) = out.logprobs.dims2().unwrap();
    // Off-policy old / reference / rollout log-probs: the current ones shifted
    // by a deterministic pattern.
    let shift = |s: f64| {
        let v: Vec<f64> = (0..b * k)
            .map(|i| ((i as f64 + seed) * s).sin() * 0.3)
            .collect();
        (out.logprobs.detach() + Tensor::from_vec(v, (b, k), &Device::Cpu).unwrap()).unwrap()
    };
    let adv: Vec<f64> = (0..b).map(|i| ((i as f64 + seed) * 1.7).cos()).collect();
    let mut inputs = LossInputs::new(
        out.logprobs.clone(),
        batch.response_mask.clone(),
        Tensor::new(adv.as_slice(), &Device::Cpu).unwrap(),
    );
    inputs.old_logprobs = Some(shift(1.3));
    inputs.ref_logprobs = Some(shift(2.1));
    inputs.rollout_logprobs = Some(shift(0.7));
    inputs.entropy = out.entropy;
    inputs
}

#[test]
fn model_gradients_accumulated_over_four_micro_batches_equal_the_full_batch() {
    let (vars, mut lm) = tiny_model();
    lm.set_logits_chunk_elements(2 * 2 * VOCAB);
    let seqs = sequences();
    let max_len = 6;
    for (loss_type, level) in [
        (LossType::Grpo, ImportanceSamplingLevel::Token),
        (LossType::Bnpo, ImportanceSamplingLevel::Sequence),
        (LossType::DrGrpo, ImportanceSamplingLevel::Token),
        (LossType::Dapo, ImportanceSamplingLevel::Sequence),
    ] {
        let cfg = GrpoConfig {
            loss_type,
            importance_sampling_level: level,
            beta: 0.04,
            entropy_coef: 0.01,
            ..GrpoConfig::default()
        };
        // The full batch, padded once. Its inputs use per-row constants so
        // that the micro-batches see the same old/ref/rollout values.
        let full_batch = pad_batch(&seqs, 0, Some(max_len), &Device::Cpu).unwrap();
        let full = loss_inputs(&lm, &full_batch, 0.0);
        let norm = Normalizers::for_batch(&full.response_mask, max_len).unwrap();
        let g_full = grpo_loss(&cfg, &full, &norm, cfg.beta)
            .unwrap()
            .loss
            .backward()
            .unwrap();

        // Four micro-batches of two rows, each padded on its own (different
        // prompt widths), with the rows' constants taken from the full batch;
        // log-probs in the autograd graph, then with the logits recomputed in
        // the backward (in chunks of two positions), then with the decoder
        // layers recomputed too (gradient checkpointing).
        for (recompute_logits, layers) in [(false, false), (true, false), (true, true)] {
            lm.set_gradient_checkpointing(layers);
            let mut acc = GradAccumulator::new(&vars);
            for m in 0..4 {
                let rows = 2 * m..2 * m + 2;
                let mb = pad_batch(&seqs[rows.clone()], 0, Some(max_len), &Device::Cpu).unwrap();
                let (out, checkpointed) = if recompute_logits {
                    let ck = lm
                        .checkpointed_logprobs(
                            &mb.input_ids,
                            &mb.attention_mask,
                            mb.logits_to_keep,
                            TEMPERATURE,
                            true,
                        )
                        .unwrap();
                    (ck.token_logprobs(), Some(ck))
                } else {
                    (
                        mb.completion_logprobs(&lm, TEMPERATURE, true).unwrap(),
                        None,
                    )
                };
                let sub = full.narrow_rows(rows).unwrap();
                let mut inputs =
                    LossInputs::new(out.logprobs, mb.response_mask.clone(), sub.advantages);
                inputs.old_logprobs = sub.old_logprobs;
                inputs.ref_logprobs = sub.ref_logprobs;
                inputs.rollout_logprobs = sub.rollout_logprobs;
                inputs.entropy = out.entropy;
                let loss = grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap().loss;
                match checkpointed {
                    Some(ck) => acc.backward_checkpointed(&loss, ck).unwrap(),
                    None => acc.backward(&loss).unwrap(),
                }
            }
            let mut worst = 0f64;
            for v in &vars {
                let a = acc.grad(v).expect("accumulated gradient");
                let f = g_full.get(v.as_tensor()).expect("full gradient");
                let d = (a - f)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap();
                worst = worst.max(d.to_scalar::<f64>().unwrap());
            }
            assert!(
                worst < 1e-6,
                "{loss_type:?}/{level:?} (recompute_logits {recompute_logits}, \
                 layers {layers}): max |acc - full| = {worst:e}"
            );
        }
        lm.set_gradient_checkpointing(false);
    }
}
