//! The GRPO numerics against the independent numpy reference
//! (`tests/reference/grpo_reference.py` -> `tests/reference/grpo_fixture.json`).

use candle_core::{DType, Device, Tensor, Var};
use learner::advantages::{compute_advantages, compute_gdpo_advantages};
use learner::batch::{SequenceTokens, pad_batch};
use learner::grpo_config::{GrpoConfig, KlCtrlType, KlEstimator, MultiObjectiveAggregation};
use learner::kl::{KlController, kl_estimate};
use learner::loss::{LossInputs, Normalizers, grpo_loss, masked_mean, masked_normalize};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/grpo_fixture.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture present");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn v1(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn v2(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().expect("array").iter().map(v1).collect()
}

fn t2(v: &Value) -> Tensor {
    let rows = v2(v);
    let (b, k) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, k), &Device::Cpu).unwrap()
}

fn t1(v: &Value) -> Tensor {
    Tensor::new(v1(v).as_slice(), &Device::Cpu).unwrap()
}

fn close(name: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs();
    assert!(
        err <= tol * (1.0 + want.abs()),
        "{name}: got {got}, want {want} (err {err:e})"
    );
}

fn close_vec(name: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&format!("{name}[{i}]"), *g, *w, tol);
    }
}

#[test]
fn advantages_match_reference() {
    let f = fixture();
    for case in f["advantages"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg: GrpoConfig = serde_json::from_value(serde_json::json!({
            "scale_rewards": case["scale_rewards"],
            "adv_estimator": case["adv_estimator"],
        }))
        .unwrap();
        let g = case["group_size"].as_u64().unwrap() as usize;
        let out = compute_advantages(&v1(&case["rewards"]), g, &cfg).unwrap();
        close_vec(name, &out.advantages, &v1(&case["advantages"]), 1e-12);
        let s = &case["stats"];
        let st = out.stats;
        for (k, got) in [
            ("reward_mean", st.reward_mean),
            ("reward_std", st.reward_std),
            ("reward_min", st.reward_min),
            ("reward_max", st.reward_max),
            ("frac_reward_zero_std", st.frac_reward_zero_std),
            ("advantage_mean", st.advantage_mean),
            ("advantage_std", st.advantage_std),
            ("advantage_min", st.advantage_min),
            ("advantage_max", st.advantage_max),
        ] {
            close(&format!("{name}.{k}"), got, s[k].as_f64().unwrap(), 1e-12);
        }
        assert_eq!(st.num_groups as u64, s["num_groups"].as_u64().unwrap());
        assert!(out.advantages.iter().all(|a| a.is_finite()));
    }
}

/// TRL's multi_objective_aggregation: normalize_then_sum (GDPO).
#[test]
fn gdpo_advantages_match_reference() {
    let f = fixture();
    let cfg = GrpoConfig {
        multi_objective_aggregation: MultiObjectiveAggregation::NormalizeThenSum,
        ..GrpoConfig::default()
    };
    cfg.validate().unwrap();
    for case in f["advantages_gdpo"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let values: Vec<Vec<f64>> = case["values"].as_array().unwrap().iter().map(v1).collect();
        let g = case["group_size"].as_u64().unwrap() as usize;
        let out = compute_gdpo_advantages(
            &v1(&case["totals"]),
            &values,
            &v1(&case["weights"]),
            g,
            &cfg,
        )
        .unwrap();
        close_vec(name, &out.advantages, &v1(&case["advantages"]), 1e-12);
        // The logged reward stays the weighted sum.
        let totals = v1(&case["totals"]);
        close(
            &format!("{name}.reward_mean"),
            out.stats.reward_mean,
            totals.iter().sum::<f64>() / totals.len() as f64,
            1e-12,
        );
    }
    // GDPO is GRPO's: another estimator or scaling is refused, by name.
    for bad in [
        GrpoConfig {
            adv_estimator: learner::grpo_config::AdvantageEstimator::Rloo,
            ..cfg.clone()
        },
        GrpoConfig {
            scale_rewards: learner::grpo_config::ScaleRewards::None,
            ..cfg.clone()
        },
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("multi_objective_aggregation"), "{e}");
    }
}

#[test]
fn kl_estimators_match_reference() {
    let f = fixture();
    let kl = &f["kl"];
    let logp = t1(&kl["logprobs"]);
    let refp = t1(&kl["ref_logprobs"]);
    for (key, est) in [
        ("k1", KlEstimator::K1),
        ("k2", KlEstimator::K2),
        ("k3", KlEstimator::K3),
    ] {
        let got = kl_estimate(&logp, &refp, est, 20.0)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        close_vec(key, &got, &v1(&kl[key]), 1e-12);
        assert!(got.iter().all(|x| x.is_finite()), "{key} finite");
    }
}

#[test]
fn adaptive_kl_controller_matches_reference_and_restores() {
    let f = fixture();
    let c = &f["kl_controller"];
    let cfg = GrpoConfig {
        beta: c["beta"].as_f64().unwrap(),
        target_kl: c["target_kl"].as_f64().unwrap(),
        kl_horizon: c["kl_horizon"].as_f64().unwrap(),
        kl_ctrl_type: KlCtrlType::Adaptive,
        ..GrpoConfig::default()
    };
    cfg.validate().unwrap();
    let kls = v1(&c["kls"]);
    let ns = v1(&c["n_steps"]);
    let want = v1(&c["values"]);
    let mut ctrl = KlController::from_config(&cfg);
    for i in 0..kls.len() {
        // Save and restore mid-run: the restored controller continues exactly.
        if i == 3 {
            let saved = ctrl.to_json().unwrap();
            ctrl = KlController::from_json(&saved).unwrap();
        }
        ctrl.update(kls[i], ns[i] as usize).unwrap();
        close(&format!("beta[{i}]"), ctrl.value(), want[i], 1e-14);
    }
    assert_eq!(ctrl.num_updates, kls.len() as u64);
}

#[test]
fn masked_mean_and_normalize_match_reference() {
    let f = fixture();
    let m = &f["masked"];
    let x = t2(&m["x"]);
    let mask = t2(&m["mask"]);
    let all = masked_mean(&x, &mask, None)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    close("mean_all", all, m["mean_all"].as_f64().unwrap(), 1e-12);
    let d1 = masked_mean(&x, &mask, Some(1))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    close_vec("mean_dim1", &d1, &v1(&m["mean_dim1"]), 1e-12);
    assert!(d1.iter().all(|v| v.is_finite()), "an all-zero row gives 0");
    let d0 = masked_mean(&x, &mask, Some(0))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    close_vec("mean_dim0", &d0, &v1(&m["mean_dim0"]), 1e-12);
    let c = m["normalize_constant"].as_f64().unwrap();
    let na = masked_normalize(&x, &mask, c, None)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    close(
        "normalize_all",
        na,
        m["normalize_all"].as_f64().unwrap(),
        1e-12,
    );
    let n1 = masked_normalize(&x, &mask, c, Some(1))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    close_vec("normalize_dim1", &n1, &v1(&m["normalize_dim1"]), 1e-12);
    assert!(masked_normalize(&x, &mask, 0.0, None).is_err());
}

#[test]
fn every_loss_variant_matches_reference_value_gradient_and_metrics() {
    let f = fixture();
    let data = &f["loss"]["data"];
    let max_len = data["max_completion_length"].as_u64().unwrap() as usize;
    let mask = t2(&data["mask"]);
    let norm = Normalizers::for_batch(&mask, max_len).unwrap();
    let cases = f["loss"]["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    for lt in ["luspo", "vespo"] {
        assert!(
            cases.iter().any(|c| c["config"]["loss_type"] == lt),
            "{lt} in the fixture"
        );
    }
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg: GrpoConfig = serde_json::from_value(case["config"].clone())
            .unwrap_or_else(|e| panic!("{name}: config: {e}"));
        cfg.validate().unwrap();
        let var = Var::from_tensor(&t2(&data["logprobs"])).unwrap();
        let mut inputs = LossInputs::new(
            var.as_tensor().clone(),
            mask.clone(),
            t1(&data["advantages"]),
        );
        if case["off_policy"].as_bool().unwrap() {
            inputs.old_logprobs = Some(t2(&data["old"]));
        }
        inputs.ref_logprobs = Some(t2(&data["ref"]));
        inputs.rollout_logprobs = Some(t2(&data["rollout"]));
        inputs.entropy = Some(t2(&data["entropy"]));
        inputs.rewards = Some(t1(&data["rewards"]));
        let out = grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap();
        let loss = out.loss.to_scalar::<f64>().unwrap();
        close(
            &format!("{name}.loss"),
            loss,
            case["loss"].as_f64().unwrap(),
            1e-12,
        );
        let m = &out.metrics;
        close(&format!("{name}.metrics.loss"), m.loss, loss, 1e-12);
        for (k, got) in [
            ("pg_loss", m.pg_loss),
            ("kl_loss", m.kl_loss),
            ("entropy_loss", m.entropy_loss),
        ] {
            close(
                &format!("{name}.{k}"),
                got,
                case[k].as_f64().unwrap(),
                1e-12,
            );
        }
        // Gradient w.r.t. the log-probs: candle autograd vs numpy central FD.
        let grads = out.loss.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .expect("gradient reaches logprobs");
        let g = g.to_vec2::<f64>().unwrap().concat();
        let want = v2(&case["grad_logprobs"]).concat();
        for (i, (a, b)) in g.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-7, "{name}: grad[{i}] {a} vs fd {b}");
        }
        // Metrics.
        let s = m.summary();
        let rm = &case["metrics"];
        for (k, got) in [
            ("clip_ratio_low", s.clip_ratio_low),
            ("clip_ratio_high", s.clip_ratio_high),
            ("clip_ratio_region", s.clip_ratio_region),
            ("ratio_mean", s.ratio_mean),
            ("ratio_min", s.ratio_min),
            ("ratio_max", s.ratio_max),
            ("approx_kl", s.approx_kl),
            ("num_tokens", s.num_tokens),
        ] {
            close(
                &format!("{name}.metrics.{k}"),
                got,
                rm[k].as_f64().unwrap(),
                1e-12,
            );
        }
        close(
            &format!("{name}.kl"),
            s.kl.unwrap(),
            rm["kl"].as_f64().unwrap(),
            1e-12,
        );
        close(
            &format!("{name}.entropy"),
            s.entropy.unwrap(),
            rm["entropy"].as_f64().unwrap(),
            1e-12,
        );
        match rm.get("vespo_phi_seq_mean") {
            Some(want) => close(
                &format!("{name}.metrics.vespo_phi_seq_mean"),
                s.vespo_phi_seq_mean.expect("vespo measures phi"),
                want.as_f64().unwrap(),
                1e-12,
            ),
            None => assert!(s.vespo_phi_seq_mean.is_none(), "{name}"),
        }
        if cfg.vllm_importance_sampling_correction {
            for (k, got) in [
                (
                    "importance_sampling_ratio_mean",
                    s.importance_sampling_ratio_mean,
                ),
                (
                    "importance_sampling_ratio_min",
                    s.importance_sampling_ratio_min,
                ),
                (
                    "importance_sampling_ratio_max",
                    s.importance_sampling_ratio_max,
                ),
                (
                    "sampling_logp_difference_mean",
                    s.sampling_logp_difference_mean,
                ),
                (
                    "sampling_logp_difference_max",
                    s.sampling_logp_difference_max,
                ),
            ] {
                close(
                    &format!("{name}.metrics.{k}"),
                    got.expect("measured"),
                    rm[k].as_f64().unwrap(),
                    1e-12,
                );
            }
        } else {
            assert!(s.importance_sampling_ratio_mean.is_none(), "{name}");
        }
    }
}

#[test]
fn loss_is_computed_in_f32_too() {
    // The production dtype: same values within f32 precision.
    let f = fixture();
    let data = &f["loss"]["data"];
    let case = &f["loss"]["cases"][0];
    let cfg: GrpoConfig = serde_json::from_value(case["config"].clone()).unwrap();
    let f32t = |v: &Value| t2(v).to_dtype(DType::F32).unwrap();
    let mask = f32t(&data["mask"]);
    let norm = Normalizers::for_batch(&mask, 8).unwrap();
    let mut inputs = LossInputs::new(
        f32t(&data["logprobs"]),
        mask,
        t1(&data["advantages"]).to_dtype(DType::F32).unwrap(),
    );
    inputs.old_logprobs = Some(f32t(&data["old"]));
    inputs.ref_logprobs = Some(f32t(&data["ref"]));
    inputs.rollout_logprobs = Some(f32t(&data["rollout"]));
    inputs.entropy = Some(f32t(&data["entropy"]));
    let out = grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap();
    assert_eq!(out.loss.dtype(), DType::F32);
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    close("f32 loss", loss, case["loss"].as_f64().unwrap(), 1e-5);
}

#[test]
fn batch_padding_matches_reference() {
    let f = fixture();
    let b = &f["batch"];
    let to_u32 = |v: &Value| -> Vec<u32> { v1(v).iter().map(|x| *x as u32).collect() };
    let seqs: Vec<SequenceTokens> = b["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["completions"].as_array().unwrap())
        .map(|(p, c)| SequenceTokens {
            prompt_ids: to_u32(p),
            completion_ids: to_u32(c),
        })
        .collect();
    let width = b["completion_width"].as_u64().unwrap() as usize;
    let pad = b["pad_token_id"].as_u64().unwrap() as u32;
    let out = pad_batch(&seqs, pad, Some(width), &Device::Cpu).unwrap();
    let u =
        |t: &Tensor| -> Vec<Vec<f64>> { t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap() };
    assert_eq!(u(&out.input_ids), v2(&b["input_ids"]));
    assert_eq!(u(&out.attention_mask), v2(&b["attention_mask"]));
    assert_eq!(u(&out.position_ids), v2(&b["position_ids"]));
    assert_eq!(u(&out.labels), v2(&b["labels"]));
    assert_eq!(u(&out.completion_ids), v2(&b["completion_ids"]));
    assert_eq!(u(&out.response_mask), v2(&b["response_mask"]));
    assert_eq!(
        out.logits_to_keep,
        b["logits_to_keep"].as_u64().unwrap() as usize
    );
    assert_eq!(out.labels.dtype(), DType::I64);
    assert_eq!(out.input_ids.dtype(), DType::U32);
    // Every completion token sits in the last K columns.
    let ids = out.input_ids.to_vec2::<u32>().unwrap();
    for (row, s) in ids.iter().zip(&seqs) {
        let tail = &row[row.len() - width..];
        assert_eq!(&tail[..s.completion_ids.len()], s.completion_ids.as_slice());
    }
    // Width defaults to the longest completion; errors are reported.
    let auto = pad_batch(&seqs, pad, None, &Device::Cpu).unwrap();
    assert_eq!(auto.logits_to_keep, 3);
    assert!(pad_batch(&seqs, pad, Some(2), &Device::Cpu).is_err());
    assert!(pad_batch(&[], pad, None, &Device::Cpu).is_err());
    let empty_prompt = [SequenceTokens {
        prompt_ids: vec![],
        completion_ids: vec![1],
    }];
    assert!(pad_batch(&empty_prompt, pad, None, &Device::Cpu).is_err());
}
