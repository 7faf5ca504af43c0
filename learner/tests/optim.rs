//! AdamW against hand-computed values, exact resume, LR schedules, clipping.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use learner::optim::{
    AdamW, AdamWConfig, LrSchedule, LrSchedulerType, OptimizerConfig, clip_grad_norm, global_norm,
    uses_weight_decay,
};

fn var(values: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn bits(v: &Var) -> Vec<u32> {
    values(v).iter().map(|x| x.to_bits()).collect()
}

/// Two AdamW steps, written out from torch.optim.AdamW's update rule in f64:
/// p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
#[test]
fn adamw_matches_hand_computed_two_steps() {
    let p0 = [1.0f64, -2.0, 0.5];
    let grads = [[0.5f64, -1.0, 0.0], [0.1, 0.2, -0.3]];
    let (lr, wd, b1, b2, eps) = (0.1, 0.01, 0.9, 0.999, 1e-8);

    let w = var(&p0.map(|x| x as f32), &[3]);
    let config = AdamWConfig {
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
    };
    let mut opt = AdamW::new(vec![("mlp.up_proj.weight".into(), w.clone())], config).unwrap();

    let (mut p, mut m, mut v) = (p0, [0.0f64; 3], [0.0f64; 3]);
    // The same numbers, printed by plain Python from the same formulas.
    let literal = [
        [0.899000002, -1.898000001, 0.4995],
        [0.8177969063826517, -1.8449993939894944, 0.5734141788496808],
    ];
    for (t, g) in grads.iter().enumerate() {
        let step = (t + 1) as i32;
        for i in 0..3 {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            p[i] -= lr / (1.0 - b1.powi(step)) * m[i]
                / ((v[i]).sqrt() / (1.0 - b2.powi(step)).sqrt() + eps);
        }
        let g = Tensor::from_slice(&g.map(|x| x as f32), 3, &Device::Cpu).unwrap();
        opt.step(&[g], lr).unwrap();
        let got = values(&w);
        for i in 0..3 {
            assert!(
                (got[i] as f64 - p[i]).abs() < 1e-6,
                "step {step} [{i}]: {} vs {}",
                got[i],
                p[i]
            );
            assert!((p[i] - literal[t][i]).abs() < 1e-12);
        }
    }
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn no_weight_decay_on_biases_and_norms() {
    for (name, decays) in [
        ("model.embed_tokens.weight", true),
        ("model.layers.0.self_attn.q_proj.weight", true),
        ("model.layers.0.self_attn.q_proj.bias", false),
        ("model.layers.0.input_layernorm.weight", false),
        ("model.layers.0.post_attention_layernorm.weight", false),
        ("model.norm.weight", false),
        ("encoder.final_norm.weight", false),
        ("lm_head.weight", true),
        ("normalizer.weight", true),
    ] {
        assert_eq!(uses_weight_decay(name), decays, "{name}");
    }
    // With a zero gradient only the decay moves a parameter.
    let (w, b) = (var(&[1.0, 2.0], &[2]), var(&[1.0, 2.0], &[2]));
    let config = AdamWConfig {
        weight_decay: 0.5,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(
        vec![
            ("proj.weight".into(), w.clone()),
            ("proj.bias".into(), b.clone()),
        ],
        config,
    )
    .unwrap();
    let zero = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    opt.step(&[zero.clone(), zero], 0.1).unwrap();
    assert_eq!(values(&w), vec![0.95, 1.9]);
    assert_eq!(values(&b), vec![1.0, 2.0]);
}

/// A deterministic "gradient" of the current parameters.
fn fake_grad(p: &Var, k: usize) -> Tensor {
    let t = p.as_tensor();
    ((t.sqr().unwrap() * 0.3).unwrap()
        - t.sin().unwrap().affine(1.0 + k as f64 * 0.1, 0.05).unwrap())
    .unwrap()
}

fn make_params(seed: f32) -> Vec<(String, Var)> {
    let w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
    vec![
        ("layer.weight".into(), var(&w, &[4, 3])),
        ("layer.bias".into(), var(&[0.1, -0.2, 0.3], &[3])),
        ("model.norm.weight".into(), var(&[1.0, 1.0, 1.0], &[3])),
    ]
}

fn train(opt: &mut AdamW, vars: &[Var], schedule: &LrSchedule, steps: std::ops::Range<usize>) {
    for k in steps {
        let mut grads: Vec<Tensor> = vars.iter().map(|v| fake_grad(v, k)).collect();
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!(norm.is_finite());
        opt.step(&grads, schedule.lr_at(k)).unwrap();
    }
}

#[test]
fn save_and_load_continue_bit_identically() {
    let config = OptimizerConfig {
        learning_rate: 0.05,
        weight_decay: 0.1,
        lr_scheduler_type: LrSchedulerType::Cosine,
        warmup_steps: 2,
        ..OptimizerConfig::default()
    };
    let schedule = LrSchedule::new(&config, 10).unwrap();

    // Uninterrupted: 10 steps.
    let params = make_params(0.0);
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, config.adamw()).unwrap();
    train(&mut opt, &vars, &schedule, 0..10);

    // Interrupted after 4 steps: save weights + optimizer, rebuild everything.
    let dir = tempfile::tempdir().unwrap();
    let params = make_params(0.0);
    let first_vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut first = AdamW::new(params, config.adamw()).unwrap();
    train(&mut first, &first_vars, &schedule, 0..4);
    first.save(dir.path()).unwrap();
    let weights: HashMap<String, Tensor> = first
        .names()
        .into_iter()
        .zip(&first_vars)
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    drop(first);

    let loaded =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let params: Vec<(String, Var)> = ["layer.weight", "layer.bias", "model.norm.weight"]
        .iter()
        .map(|n| (n.to_string(), Var::from_tensor(&loaded[*n]).unwrap()))
        .collect();
    let resumed_vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut resumed = AdamW::new(params, config.adamw()).unwrap();
    resumed.load(dir.path()).unwrap();
    assert_eq!(resumed.step_count(), 4);
    train(&mut resumed, &resumed_vars, &schedule, 4..10);

    for (a, b) in vars.iter().zip(&resumed_vars) {
        assert_eq!(bits(a), bits(b));
    }
    // And the parameters did move.
    assert_ne!(values(&vars[0]), values(&make_params(0.0)[0].1));
}

#[test]
fn load_rejects_a_different_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut opt = AdamW::new(make_params(0.0), AdamWConfig::default()).unwrap();
    let grads: Vec<Tensor> = opt.vars().iter().map(|v| fake_grad(v, 0)).collect();
    opt.step(&grads, 0.1).unwrap();
    opt.save(dir.path()).unwrap();

    let other = vec![("layer.weight".into(), var(&[0.0; 12], &[4, 3]))];
    let err = AdamW::new(other, AdamWConfig::default())
        .unwrap()
        .load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer.bias"), "{err}");

    let mut wrong_shape = make_params(0.0);
    wrong_shape[1].1 = var(&[0.0; 4], &[4]);
    let err = AdamW::new(wrong_shape, AdamWConfig::default())
        .unwrap()
        .load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer.bias.exp_avg"), "{err}");

    let missing = tempfile::tempdir().unwrap();
    let err = opt.load(missing.path()).unwrap_err().to_string();
    assert!(err.contains("optimizer.json"), "{err}");
}

fn schedule(
    kind: LrSchedulerType,
    warmup_steps: usize,
    warmup_ratio: f64,
    max_steps: usize,
) -> LrSchedule {
    let config = OptimizerConfig {
        learning_rate: 2.0,
        lr_scheduler_type: kind,
        warmup_steps,
        warmup_ratio,
        ..OptimizerConfig::default()
    };
    LrSchedule::new(&config, max_steps).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn schedules_match_transformers_at_key_steps() {
    // warmup 2 of 10 steps, base lr 2.0.
    let s = schedule(LrSchedulerType::Linear, 2, 0.0, 10);
    for (step, lr) in [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (6, 1.0),
        (9, 0.25),
        (10, 0.0),
        (12, 0.0),
    ] {
        assert!(
            close(s.lr_at(step), lr),
            "linear step {step}: {}",
            s.lr_at(step)
        );
    }
    let s = schedule(LrSchedulerType::Cosine, 2, 0.0, 10);
    let cos_quarter = 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()); // 0.853553...
    for (step, lr) in [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (4, 2.0 * cos_quarter),
        (6, 1.0),
        (10, 0.0),
        (14, 0.0),
    ] {
        assert!(
            close(s.lr_at(step), lr),
            "cosine step {step}: {}",
            s.lr_at(step)
        );
    }
    // transformers' get_cosine_with_min_lr_schedule_with_warmup, min_lr_rate
    // 0.1: factor = cosine x 0.9 + 0.1.
    let s = LrSchedule::new(
        &OptimizerConfig {
            learning_rate: 2.0,
            lr_scheduler_type: LrSchedulerType::CosineWithMinLr,
            warmup_steps: 2,
            min_lr_rate: 0.1,
            ..OptimizerConfig::default()
        },
        10,
    )
    .unwrap();
    for (step, lr) in [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (4, 2.0 * (cos_quarter * 0.9 + 0.1)),
        (6, 2.0 * 0.55),
        (10, 0.2),
        (14, 0.2),
    ] {
        assert!(
            close(s.lr_at(step), lr),
            "cosine_with_min_lr step {step}: {}",
            s.lr_at(step)
        );
    }
    let s = schedule(LrSchedulerType::ConstantWithWarmup, 4, 0.0, 10);
    for (step, lr) in [(0, 0.0), (1, 0.5), (3, 1.5), (4, 2.0), (100, 2.0)] {
        assert!(close(s.lr_at(step), lr), "constant_with_warmup step {step}");
    }
    let s = schedule(LrSchedulerType::Constant, 0, 0.0, 0);
    assert_eq!((s.lr_at(0), s.lr_at(1000)), (2.0, 2.0));
    // Tandem's `constant` warms up too (transformers' `constant_with_warmup`).
    let s = schedule(LrSchedulerType::Constant, 4, 0.0, 10);
    assert!(close(s.lr_at(1), 0.5) && close(s.lr_at(7), 2.0));
    // warmup_steps wins over warmup_ratio, as in transformers.
    assert_eq!(
        schedule(LrSchedulerType::Linear, 3, 0.5, 10).warmup_steps,
        3
    );
    // warmup_ratio 0.1 of 15 steps -> ceil(1.5) = 2 warmup steps.
    let s = schedule(LrSchedulerType::Linear, 0, 0.1, 15);
    assert_eq!(s.warmup_steps, 2);
    assert!(close(s.lr_at(1), 1.0));
    // No warmup: the first step uses the full rate.
    assert!(close(
        schedule(LrSchedulerType::Linear, 0, 0.0, 4).lr_at(0),
        2.0
    ));
}

#[test]
fn config_is_strict_and_validated() {
    let bad = |c: OptimizerConfig| c.validate().unwrap_err().to_string();
    let err = bad(OptimizerConfig {
        adam_beta2: 1.0,
        ..OptimizerConfig::default()
    });
    assert!(err.contains("adam_beta2"), "{err}");
    let parsed: OptimizerConfig = serde_json::from_value(
        serde_json::json!({"learning_rate": 3e-6, "lr_scheduler_type": "cosine"}),
    )
    .unwrap();
    assert_eq!(parsed.learning_rate, 3e-6);
    assert_eq!(parsed.max_grad_norm, 1.0);
    let err = serde_json::from_value::<OptimizerConfig>(serde_json::json!({"learning_rat": 1.0}))
        .unwrap_err();
    assert!(err.to_string().contains("learning_rat"), "{err}");
}

#[test]
fn clipping_follows_torch() {
    let dev = Device::Cpu;
    // Norm 13 (3-4-12): above max 1.3 -> scaled by 1.3 / (13 + 1e-6).
    let mut grads = vec![
        Tensor::new(&[3.0f32, 4.0], &dev).unwrap(),
        Tensor::new(&[[12.0f32]], &dev).unwrap(),
    ];
    let norm = clip_grad_norm(&mut grads, 1.3).unwrap();
    assert!((norm - 13.0).abs() < 1e-9);
    let coef = 1.3 / (13.0 + 1e-6);
    let a = grads[0].to_vec1::<f32>().unwrap();
    assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-6 && (a[1] as f64 - 4.0 * coef).abs() < 1e-6);
    assert!((global_norm(&grads).unwrap() - 1.3).abs() < 1e-5);
    assert_eq!(grads[1].dims(), &[1, 1]);

    // Below the max: untouched.
    let mut small = vec![Tensor::new(&[0.3f32, 0.4], &dev).unwrap()];
    assert!((clip_grad_norm(&mut small, 1.0).unwrap() - 0.5).abs() < 1e-7);
    assert_eq!(small[0].to_vec1::<f32>().unwrap(), vec![0.3, 0.4]);

    // max_norm 0 only measures.
    let mut big = vec![Tensor::new(&[30.0f32, 40.0], &dev).unwrap()];
    assert_eq!(clip_grad_norm(&mut big, 0.0).unwrap(), 50.0);
    assert_eq!(big[0].to_vec1::<f32>().unwrap(), vec![30.0, 40.0]);

    // Non-finite: reported, nothing scaled.
    let mut nan = vec![
        Tensor::new(&[f32::NAN, 1.0], &dev).unwrap(),
        Tensor::new(&[100.0f32], &dev).unwrap(),
    ];
    assert!(clip_grad_norm(&mut nan, 1.0).unwrap().is_nan());
    assert_eq!(nan[1].to_vec1::<f32>().unwrap(), vec![100.0]);
    let mut inf = vec![Tensor::new(&[f32::INFINITY], &dev).unwrap()];
    assert_eq!(clip_grad_norm(&mut inf, 1.0).unwrap(), f64::INFINITY);
}

/// A bf16 parameter gets an f32 master: 100 steps of lr 1e-4 move the weight
/// 1.0 -> ~0.99, while updating bf16 directly would round each step away
/// (bf16's spacing at 1.0 is 2^-7). The parameter equals the f32 run rounded
/// to bf16, and save/load continues exactly.
#[test]
fn bf16_parameters_keep_an_f32_master_and_resume_exactly() {
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let make = |dtype: DType| {
        let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
    };
    let grad = Tensor::new(&[1.0f32, -1.0, 0.5, 2.0], &Device::Cpu).unwrap();
    let run = |opt: &mut AdamW, steps: std::ops::Range<u32>| {
        for _ in steps {
            opt.step(std::slice::from_ref(&grad), 1e-4).unwrap();
        }
    };
    let reference = make(DType::F32);
    let mut opt32 = AdamW::new(vec![("w".into(), reference.clone())], cfg).unwrap();
    run(&mut opt32, 0..100);

    let low = make(DType::BF16);
    let mut opt = AdamW::new(vec![("w".into(), low.clone())], cfg).unwrap();
    run(&mut opt, 0..40);
    let dir = tempfile::tempdir().unwrap();
    opt.save(dir.path()).unwrap();
    // Resume: the bf16 weights as a checkpoint holds them, plus the state.
    let resumed = Var::from_tensor(&low.as_tensor().copy().unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), resumed.clone())], cfg).unwrap();
    opt.load(dir.path()).unwrap();
    run(&mut opt, 40..100);

    let got: Vec<f32> = resumed
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = reference
        .as_tensor()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);
    assert!(
        got.iter().all(|&x| x != 1.0),
        "{got:?}: the updates were rounded away"
    );
}
