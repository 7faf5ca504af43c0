//! Finite-difference checks of every loss variant's gradient, gradient
//! accumulation over micro-batches (and ranks) against the full batch, and the
//! edge cases of the issue (zero-std groups, empty responses, ratio overflow).

use candle_core::{D, DType, Device, Tensor, Var};
use learner::accumulation::{GradAccumulator, accumulate_gradients};
use learner::advantages::compute_advantages;
use learner::grpo_config::{
    AdvantageEstimator, GrpoConfig, ImportanceSamplingLevel, KlEstimator, LossType, PolicyLoss,
    ScaleRewards, VllmImportanceSamplingMode,
};
use learner::loss::{LossInputs, LossOutput, Normalizers, grpo_loss, micro_batch_ranges};

const DEV: Device = Device::Cpu;

/// Deterministic xorshift: the tests need no RNG crate.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.range(lo, hi)).collect()
    }
}

fn t(v: Vec<f64>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

fn mask_from_lengths(lengths: &[usize], k: usize) -> Tensor {
    let v: Vec<f64> = lengths
        .iter()
        .flat_map(|&n| (0..k).map(move |j| if j < n { 1.0 } else { 0.0 }))
        .collect();
    t(v, (lengths.len(), k))
}

/// Every loss variant worth a gradient check.
fn variants() -> Vec<(String, GrpoConfig)> {
    let base = GrpoConfig {
        epsilon: 0.2,
        epsilon_high: Some(0.28),
        beta: 0.05,
        entropy_coef: 0.01,
        vllm_importance_sampling_mode: VllmImportanceSamplingMode::TokenTruncate,
        vllm_importance_sampling_cap: 1.6,
        ..GrpoConfig::default()
    };
    let mut out = Vec::new();
    // Not Cispo nor Vespo: their weights are held constant on purpose (a
    // stop-gradient), so their gradient is not the derivative of their
    // value; a hand-computed test in loss.rs and the numpy reference
    // (grpo_reference.rs) check them.
    for lt in [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
        LossType::Sapo,
        LossType::Luspo,
    ] {
        for lvl in [
            ImportanceSamplingLevel::Token,
            ImportanceSamplingLevel::Sequence,
        ] {
            out.push((
                format!("{lt:?}/{lvl:?}"),
                GrpoConfig {
                    loss_type: lt,
                    importance_sampling_level: lvl,
                    ..base.clone()
                },
            ));
        }
    }
    for pl in [PolicyLoss::NoBaseline, PolicyLoss::ReinforceWithBaseline] {
        out.push((
            format!("{pl:?}"),
            GrpoConfig {
                policy_loss: pl,
                ..base.clone()
            },
        ));
    }
    for est in [KlEstimator::K1, KlEstimator::K2] {
        out.push((
            format!("{est:?}"),
            GrpoConfig {
                kl_estimator: est,
                loss_type: LossType::Grpo,
                ..base.clone()
            },
        ));
    }
    for mode in [
        VllmImportanceSamplingMode::TokenMask,
        VllmImportanceSamplingMode::SequenceTruncate,
        VllmImportanceSamplingMode::SequenceMask,
    ] {
        out.push((
            format!("{mode:?}"),
            GrpoConfig {
                vllm_importance_sampling_mode: mode,
                vllm_importance_sampling_cap: 1.3,
                ..base.clone()
            },
        ));
    }
    out.push((
        "use_bias_correction_kl".into(),
        GrpoConfig {
            use_bias_correction_kl: true,
            ..base.clone()
        },
    ));
    out.push((
        "delta".into(),
        GrpoConfig {
            delta: Some(1.4),
            ..base.clone()
        },
    ));
    // The mask is held constant, so its gradient is the masked loss's.
    out.push((
        "off_policy_mask_threshold".into(),
        GrpoConfig {
            off_policy_mask_threshold: Some(0.0),
            ..base.clone()
        },
    ));
    out
}

struct Data {
    logp: Vec<f64>,
    old: Tensor,
    refp: Tensor,
    rollout: Tensor,
    entropy: Vec<f64>,
    mask: Tensor,
    adv: Tensor,
    rewards: Tensor,
    b: usize,
    k: usize,
}

fn data(seed: u64) -> Data {
    let (b, k) = (5, 4);
    let mut rng = Rng(seed);
    let logp = rng.vec(b * k, -3.0, -0.05);
    let old: Vec<f64> = logp.iter().map(|x| x + rng.range(-0.5, 0.5)).collect();
    let refp: Vec<f64> = logp.iter().map(|x| x + rng.range(-0.4, 0.4)).collect();
    let rollout: Vec<f64> = old.iter().map(|x| x + rng.range(-0.5, 0.5)).collect();
    Data {
        entropy: rng.vec(b * k, 0.1, 2.0),
        old: t(old, (b, k)),
        refp: t(refp, (b, k)),
        rollout: t(rollout, (b, k)),
        mask: mask_from_lengths(&[4, 2, 0, 3, 1], k),
        adv: Tensor::new(rng.vec(b, -1.5, 1.5).as_slice(), &DEV).unwrap(),
        rewards: Tensor::new(rng.vec(b, 0.0, 1.0).as_slice(), &DEV).unwrap(),
        logp,
        b,
        k,
    }
}

fn loss_at(cfg: &GrpoConfig, d: &Data, logp: &Tensor, entropy: &Tensor) -> Tensor {
    let mut inputs = LossInputs::new(logp.clone(), d.mask.clone(), d.adv.clone());
    inputs.old_logprobs = Some(d.old.clone());
    inputs.ref_logprobs = Some(d.refp.clone());
    inputs.rollout_logprobs = Some(d.rollout.clone());
    inputs.entropy = Some(entropy.clone());
    inputs.rewards = Some(d.rewards.clone());
    let norm = Normalizers::for_batch(&d.mask, 6).unwrap();
    grpo_loss(cfg, &inputs, &norm, cfg.beta).unwrap().loss
}

#[test]
fn finite_difference_gradients_of_every_loss_variant() {
    let h = 1e-6;
    for (name, cfg) in variants() {
        cfg.validate().unwrap();
        let d = data(0x9e3779b97f4a7c15);
        let (b, k) = (d.b, d.k);
        let lp = Var::from_tensor(&t(d.logp.clone(), (b, k))).unwrap();
        let en = Var::from_tensor(&t(d.entropy.clone(), (b, k))).unwrap();
        let loss = loss_at(&cfg, &d, lp.as_tensor(), en.as_tensor());
        let grads = loss.backward().unwrap();
        let g_lp = grads.get(lp.as_tensor()).unwrap().flatten_all().unwrap();
        let g_lp = g_lp.to_vec1::<f64>().unwrap();
        let g_en = grads.get(en.as_tensor()).unwrap().flatten_all().unwrap();
        let g_en = g_en.to_vec1::<f64>().unwrap();
        let en_t = t(d.entropy.clone(), (b, k));
        let lp_t = t(d.logp.clone(), (b, k));
        let scalar = |x: Tensor| x.to_scalar::<f64>().unwrap();
        for i in 0..b * k {
            let mut p = d.logp.clone();
            let mut m = d.logp.clone();
            p[i] += h;
            m[i] -= h;
            let fd = (scalar(loss_at(&cfg, &d, &t(p, (b, k)), &en_t))
                - scalar(loss_at(&cfg, &d, &t(m, (b, k)), &en_t)))
                / (2.0 * h);
            assert!(
                (fd - g_lp[i]).abs() < 1e-6,
                "{name}: d/dlogp[{i}] autograd {} vs fd {fd}",
                g_lp[i]
            );
            let mut p = d.entropy.clone();
            let mut m = d.entropy.clone();
            p[i] += h;
            m[i] -= h;
            let fd = (scalar(loss_at(&cfg, &d, &lp_t, &t(p, (b, k))))
                - scalar(loss_at(&cfg, &d, &lp_t, &t(m, (b, k)))))
                / (2.0 * h);
            assert!(
                (fd - g_en[i]).abs() < 1e-6,
                "{name}: d/dentropy[{i}] autograd {} vs fd {fd}",
                g_en[i]
            );
        }
        // The empty response (row 2) receives no gradient.
        assert!(g_lp[2 * k..3 * k].iter().all(|g| *g == 0.0), "{name}");
    }
}

/// A tiny "model": logits = h @ W, with W the shared trainable parameter, so
/// that accumulation sums gradients into one variable, as with a real model.
struct Toy {
    w: Var,
    h: Tensor,       // [B, K, Dm]
    targets: Tensor, // [B, K] u32
    mask: Tensor,
    adv: Tensor,
    old: Tensor,
    refp: Tensor,
    rollout: Tensor,
    b: usize,
}

const TEMPERATURE: f64 = 0.7;

fn token_logprobs(logits: &Tensor, targets: &Tensor) -> (Tensor, Tensor) {
    let z = (logits / TEMPERATURE).unwrap();
    let logsm = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
    let lp = logsm
        .gather(&targets.unsqueeze(2).unwrap(), 2)
        .unwrap()
        .squeeze(2)
        .unwrap();
    let ent = (logsm.exp().unwrap() * &logsm)
        .unwrap()
        .sum(2)
        .unwrap()
        .neg()
        .unwrap();
    (lp, ent)
}

impl Toy {
    fn new() -> Toy {
        let (b, k, dm, v) = (10, 6, 4, 7);
        let mut rng = Rng(12345);
        let w = Var::from_tensor(&t(rng.vec(dm * v, -1.0, 1.0), (dm, v))).unwrap();
        let h = Tensor::from_vec(rng.vec(b * k * dm, -1.0, 1.0), (b, k, dm), &DEV).unwrap();
        let targets: Vec<u32> = (0..b * k)
            .map(|_| (rng.uniform() * v as f64) as u32)
            .collect();
        let targets = Tensor::from_vec(targets, (b, k), &DEV).unwrap();
        let logits = h.broadcast_matmul(w.as_tensor()).unwrap();
        let (lp, _) = token_logprobs(&logits, &targets);
        let lp = lp.detach();
        let noise = |rng: &mut Rng, s: f64| t(rng.vec(b * k, -s, s), (b, k));
        let old = (&lp + noise(&mut rng, 0.4)).unwrap();
        let refp = (&lp + noise(&mut rng, 0.3)).unwrap();
        let rollout = (&old + noise(&mut rng, 0.4)).unwrap();
        Toy {
            w,
            h,
            targets,
            mask: mask_from_lengths(&[6, 2, 0, 5, 1, 6, 3, 4, 6, 2], k),
            adv: Tensor::new(rng.vec(b, -1.5, 1.5).as_slice(), &DEV).unwrap(),
            old,
            refp,
            rollout,
            b,
        }
    }

    /// [`Self::forward`] on any rows, in the order given.
    fn forward_rows(&self, rows: &[usize]) -> LossInputs {
        let idx: Vec<u32> = rows.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &DEV).unwrap();
        let pick = |x: &Tensor| x.index_select(&idx, 0).unwrap();
        let logits = pick(&self.h).broadcast_matmul(self.w.as_tensor()).unwrap();
        let (lp, ent) = token_logprobs(&logits, &pick(&self.targets));
        let mut inputs = LossInputs::new(lp, pick(&self.mask), pick(&self.adv));
        inputs.old_logprobs = Some(pick(&self.old));
        inputs.ref_logprobs = Some(pick(&self.refp));
        inputs.rollout_logprobs = Some(pick(&self.rollout));
        inputs.entropy = Some(ent);
        inputs
    }

    /// Runs the model on rows `rows` and assembles the loss inputs.
    fn forward(&self, rows: std::ops::Range<usize>) -> LossInputs {
        self.forward_rows(&rows.collect::<Vec<_>>())
    }

    /// The whole batch at once: `w`'s gradient, the loss and its normalisers.
    fn full_batch(&self, cfg: &GrpoConfig, max_len: usize) -> (Tensor, LossOutput, Normalizers) {
        let full = self.forward(0..self.b);
        let norm = Normalizers::for_batch(&full.response_mask, max_len).unwrap();
        let out = grpo_loss(cfg, &full, &norm, cfg.beta).unwrap();
        let grads = out.loss.backward().unwrap();
        let g = grads.get(self.w.as_tensor()).unwrap().clone();
        (g, out, norm)
    }
}

fn accumulation_configs() -> Vec<GrpoConfig> {
    let mut out = Vec::new();
    for lt in [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
        LossType::Cispo,
        LossType::Sapo,
        LossType::Luspo,
        LossType::Vespo,
    ] {
        for lvl in [
            ImportanceSamplingLevel::Token,
            ImportanceSamplingLevel::Sequence,
        ] {
            out.push(GrpoConfig {
                loss_type: lt,
                importance_sampling_level: lvl,
                epsilon_high: Some(0.28),
                beta: 0.05,
                entropy_coef: 0.01,
                vllm_importance_sampling_mode: VllmImportanceSamplingMode::TokenTruncate,
                vllm_importance_sampling_cap: 1.6,
                ..GrpoConfig::default()
            });
        }
    }
    out
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn four_micro_batches_accumulate_to_the_full_batch_gradient() {
    let toy = Toy::new();
    let max_len = 8;
    for cfg in accumulation_configs() {
        let (g_full, out_full, norm_full) = toy.full_batch(&cfg, max_len);

        // Four uneven micro-batches (3, 3, 2, 2 rows), global normalisers.
        let ranges = micro_batch_ranges(toy.b, 4);
        assert_eq!(
            ranges.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [3, 3, 2, 2]
        );
        let masks: Vec<Tensor> = ranges
            .iter()
            .map(|r| toy.mask.narrow(0, r.start, r.len()).unwrap())
            .collect();
        let mask_refs: Vec<&Tensor> = masks.iter().collect();
        let norm = Normalizers::for_micro_batches(&mask_refs, max_len, 1, Ok).unwrap();
        assert_eq!(norm, norm_full);
        let (grads, metrics) = accumulate_gradients(
            &cfg,
            cfg.beta,
            &norm,
            std::slice::from_ref(&toy.w),
            4,
            |i| Ok(toy.forward(ranges[i].clone()).into()),
        )
        .unwrap();
        let g_acc = grads.get(toy.w.as_tensor()).unwrap();
        let diff = max_abs_diff(g_acc, &g_full);
        assert!(
            diff < 1e-6,
            "{:?}/{:?}: |acc - full| = {diff:e}",
            cfg.loss_type,
            cfg.importance_sampling_level
        );
        assert!(
            diff < 1e-12,
            "f64 accumulation should be exact to rounding, got {diff:e}"
        );
        // The merged metrics are the full batch's.
        let full_loss = out_full.loss.to_scalar::<f64>().unwrap();
        assert!((metrics.loss - full_loss).abs() < 1e-12);
        let (s_acc, s_full) = (metrics.summary(), out_full.metrics.summary());
        assert!((s_acc.clip_ratio_region - s_full.clip_ratio_region).abs() < 1e-12);
        assert!((s_acc.ratio_mean - s_full.ratio_mean).abs() < 1e-12);
        assert_eq!(s_acc.ratio_max, s_full.ratio_max);
        assert!((s_acc.kl.unwrap() - s_full.kl.unwrap()).abs() < 1e-12);
        assert!((s_acc.entropy.unwrap() - s_full.entropy.unwrap()).abs() < 1e-12);
        assert_eq!(s_acc.num_tokens, s_full.num_tokens);
    }
}

/// The learner orders an update's rows by length before cutting them into
/// micro-batches (less padding): any rows in any micro-batch give the full
/// batch's gradient, since every loss type normalizes over the update.
#[test]
fn micro_batches_of_rows_ordered_by_length_accumulate_to_the_full_batch_gradient() {
    let toy = Toy::new();
    let max_len = 8;
    let lengths: Vec<(usize, usize)> = [6, 2, 0, 5, 1, 6, 3, 4, 6, 2]
        .iter()
        .map(|&k| (3, k))
        .collect();
    let plan = learner::batch::plan_micro_batches(&lengths, 1, 3, 4, true, None);
    let micro_batches = &plan[0];
    assert_eq!(
        micro_batches,
        &vec![vec![2, 4, 1, 9], vec![6, 7, 3], vec![0, 5, 8]]
    );
    for cfg in accumulation_configs() {
        let (g_full, out_full, _) = toy.full_batch(&cfg, max_len);

        let idx_mask = |rows: &[usize]| toy.forward_rows(rows).response_mask;
        let masks: Vec<Tensor> = micro_batches.iter().map(|r| idx_mask(r)).collect();
        let mask_refs: Vec<&Tensor> = masks.iter().collect();
        let norm = Normalizers::for_micro_batches(&mask_refs, max_len, 1, Ok).unwrap();
        let (grads, metrics) = accumulate_gradients(
            &cfg,
            cfg.beta,
            &norm,
            std::slice::from_ref(&toy.w),
            micro_batches.len(),
            |i| Ok(toy.forward_rows(&micro_batches[i]).into()),
        )
        .unwrap();
        let diff = max_abs_diff(grads.get(toy.w.as_tensor()).unwrap(), &g_full);
        assert!(
            diff < 1e-12,
            "{:?}/{:?}: |sorted micro-batches - full| = {diff:e}",
            cfg.loss_type,
            cfg.importance_sampling_level
        );
        let full_loss = out_full.loss.to_scalar::<f64>().unwrap();
        assert!((metrics.loss - full_loss).abs() < 1e-12);
    }
}

#[test]
fn micro_batches_on_two_ranks_sum_to_the_global_batch_gradient() {
    // Rank 0 holds rows 0..6, rank 1 rows 6..10; two micro-batches each. The
    // all-reduce of counts and of gradients is a sum.
    let toy = Toy::new();
    let max_len = 8;
    let ranks = [vec![0..3, 3..6], vec![6..8, 8..10]];
    let count = |r: &std::ops::Range<usize>| -> [f64; 2] {
        let m = toy.mask.narrow(0, r.start, r.len()).unwrap();
        [
            r.len() as f64,
            m.sum_all().unwrap().to_scalar::<f64>().unwrap(),
        ]
    };
    let global = ranks
        .iter()
        .flatten()
        .map(count)
        .fold([0.0, 0.0], |a, c| [a[0] + c[0], a[1] + c[1]]);
    for cfg in accumulation_configs() {
        let mut g_sum: Option<Tensor> = None;
        for rank in &ranks {
            let masks: Vec<Tensor> = rank
                .iter()
                .map(|r| toy.mask.narrow(0, r.start, r.len()).unwrap())
                .collect();
            let refs: Vec<&Tensor> = masks.iter().collect();
            let norm =
                Normalizers::for_micro_batches(&refs, max_len, 2, |_local| Ok(global)).unwrap();
            let mut acc = GradAccumulator::new(std::slice::from_ref(&toy.w));
            for r in rank {
                let out = grpo_loss(&cfg, &toy.forward(r.clone()), &norm, cfg.beta).unwrap();
                acc.backward(&out.loss).unwrap();
            }
            assert_eq!(acc.num_backward(), 2);
            let g = acc.grad(&toy.w).unwrap().clone();
            g_sum = Some(match g_sum {
                Some(s) => (s + g).unwrap(),
                None => g,
            });
        }
        let g_sum = g_sum.unwrap();
        // The global-batch loss: for bnpo, the mean over ranks of each rank's
        // token mean (TRL's per-rank bnpo averaged by DDP); otherwise the loss
        // of the whole batch at once.
        let want = if cfg.loss_type == LossType::Bnpo {
            let mut total: Option<Tensor> = None;
            for rank in &ranks {
                let rows = rank[0].start..rank[rank.len() - 1].end;
                let inputs = toy.forward(rows);
                let norm = Normalizers::for_batch(&inputs.response_mask, max_len).unwrap();
                let l = (grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap().loss / 2.0).unwrap();
                total = Some(match total {
                    Some(t) => (t + l).unwrap(),
                    None => l,
                });
            }
            total.unwrap()
        } else {
            let inputs = toy.forward(0..toy.b);
            let norm = Normalizers::for_batch(&inputs.response_mask, max_len).unwrap();
            grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap().loss
        };
        let g_want = want
            .backward()
            .unwrap()
            .get(toy.w.as_tensor())
            .unwrap()
            .clone();
        let diff = max_abs_diff(&g_sum, &g_want);
        assert!(
            diff < 1e-12,
            "{:?}/{:?}: {diff:e}",
            cfg.loss_type,
            cfg.importance_sampling_level
        );
    }
}

#[test]
fn zero_std_groups_give_zero_advantage_and_no_nan() {
    for est in [AdvantageEstimator::Grpo, AdvantageEstimator::Rloo] {
        for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            let cfg = GrpoConfig {
                adv_estimator: est,
                scale_rewards: scale,
                scale_rewards_epsilon: 0.0, // even without the epsilon
                ..GrpoConfig::default()
            };
            let rewards = [0.3, 0.3, 0.3, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1];
            let out = compute_advantages(&rewards, 3, &cfg).unwrap();
            assert!(out.advantages.iter().all(|a| a.is_finite()));
            assert_eq!(&out.advantages[0..3], &[0.0; 3]);
            assert_eq!(&out.advantages[6..9], &[0.0; 3]);
            assert!((out.stats.frac_reward_zero_std - 2.0 / 3.0).abs() < 1e-15);
            // Everything tied, and a group of one.
            let out = compute_advantages(&[0.1; 6], 3, &cfg).unwrap();
            assert!(out.advantages.iter().all(|a| *a == 0.0));
            assert_eq!(out.stats.frac_reward_zero_std, 1.0);
            assert!(out.stats.advantage_std.is_finite());
            let out = compute_advantages(&[0.5, 2.0], 1, &cfg).unwrap();
            assert_eq!(out.advantages, vec![0.0, 0.0]);
        }
    }
    let cfg = GrpoConfig::default();
    assert!(compute_advantages(&[1.0, 2.0, 3.0], 2, &cfg).is_err());
    assert!(compute_advantages(&[1.0, f64::NAN], 2, &cfg).is_err());
    assert!(compute_advantages(&[], 2, &cfg).is_err());
    assert!(compute_advantages(&[1.0], 0, &cfg).is_err());
}

fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite())
}

#[test]
fn empty_responses_contribute_nothing_and_never_nan() {
    let (b, k) = (3, 4);
    for (name, cfg) in variants() {
        // Whole batch empty: loss 0, gradient 0, metrics finite.
        let zero_mask = t(vec![0.0; b * k], (b, k));
        let lp = Var::from_tensor(&t(vec![-1.0; b * k], (b, k))).unwrap();
        let mut inputs = LossInputs::new(
            lp.as_tensor().clone(),
            zero_mask.clone(),
            t(vec![1.0, -1.0, 0.5], (1, 3)).squeeze(0).unwrap(),
        );
        inputs.ref_logprobs = Some(t(vec![-2.0; b * k], (b, k)));
        inputs.rollout_logprobs = Some(t(vec![-1.5; b * k], (b, k)));
        inputs.entropy = Some(t(vec![1.0; b * k], (b, k)));
        inputs.rewards = Some(Tensor::new(&[1.0, 0.0, 1.0], &DEV).unwrap());
        let norm = Normalizers::for_batch(&zero_mask, 6).unwrap();
        let out = grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap();
        assert_eq!(out.loss.to_scalar::<f64>().unwrap(), 0.0, "{name}");
        let g = out.loss.backward().unwrap();
        let g = g.get(lp.as_tensor()).unwrap();
        assert!(all_finite(g), "{name}");
        assert_eq!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        let s = out.metrics.summary();
        for x in [
            s.loss,
            s.pg_loss,
            s.kl_loss,
            s.entropy_loss,
            s.approx_kl,
            s.clip_ratio_low,
            s.clip_ratio_high,
            s.clip_ratio_region,
            s.ratio_mean,
            s.ratio_min,
            s.ratio_max,
        ] {
            assert!(x.is_finite(), "{name}: {s:?}");
        }
        assert!(s.kl.unwrap().is_finite() && s.entropy.unwrap().is_finite());

        // A garbage-filled empty row (NaN and inf in its padding) changes nothing.
        let d = data(7);
        let mut lp_rows = d.logp.clone();
        let mut old = d.old.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for j in 0..d.k {
            lp_rows[2 * d.k + j] = f64::NAN;
            old[2 * d.k + j] = f64::INFINITY;
        }
        let clean = loss_at(
            &cfg,
            &d,
            &t(d.logp.clone(), (d.b, d.k)),
            &t(d.entropy.clone(), (d.b, d.k)),
        );
        let d2 = Data {
            old: t(old, (d.b, d.k)),
            ..data(7)
        };
        let dirty = loss_at(
            &cfg,
            &d2,
            &t(lp_rows, (d.b, d.k)),
            &t(d.entropy.clone(), (d.b, d.k)),
        );
        let (c, x) = (
            clean.to_scalar::<f64>().unwrap(),
            dirty.to_scalar::<f64>().unwrap(),
        );
        assert!(x.is_finite() && (c - x).abs() < 1e-12, "{name}: {c} vs {x}");
    }
}

#[test]
fn ratio_overflow_is_clipped_not_inf() {
    let (b, k) = (2, 3);
    let mask = t(vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0], (b, k));
    for (name, cfg) in variants() {
        for sign in [1.0, -1.0] {
            // log pi - log pi_old = +-1000: exp would overflow to inf or 0.
            let lp = Var::from_tensor(&t(vec![-0.5; b * k], (b, k))).unwrap();
            let mut inputs = LossInputs::new(
                lp.as_tensor().clone(),
                mask.clone(),
                Tensor::new(&[1.0, -1.0], &DEV).unwrap(),
            );
            inputs.old_logprobs = Some(t(vec![-0.5 - sign * 1000.0; b * k], (b, k)));
            inputs.ref_logprobs = Some(t(vec![-0.5 + sign * 1000.0; b * k], (b, k)));
            inputs.rollout_logprobs = Some(t(vec![-0.5 - sign * 2000.0; b * k], (b, k)));
            inputs.entropy = Some(t(vec![1.0; b * k], (b, k)));
            inputs.rewards = Some(Tensor::new(&[1.0, 0.0], &DEV).unwrap());
            let norm = Normalizers::for_batch(&mask, 4).unwrap();
            let out = grpo_loss(&cfg, &inputs, &norm, cfg.beta).unwrap();
            let loss = out.loss.to_scalar::<f64>().unwrap();
            assert!(loss.is_finite(), "{name} sign {sign}: loss {loss}");
            let g = out.loss.backward().unwrap();
            assert!(all_finite(g.get(lp.as_tensor()).unwrap()), "{name}");
            let s = out.metrics.summary();
            assert!(
                s.ratio_max.is_finite() && s.ratio_max <= 20f64.exp() * (1.0 + 1e-12),
                "{name}"
            );
            assert!(
                s.ratio_min > 0.0,
                "{name}: the clamp keeps the ratio >= e^-20"
            );
            if let Some(m) = s.importance_sampling_ratio_max {
                assert!(m <= cfg.vllm_importance_sampling_cap, "{name}");
            }
            // In f32 too.
            let f32t = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let mut inputs32 = inputs.clone();
            inputs32.logprobs = f32t(&inputs.logprobs);
            inputs32.old_logprobs = inputs.old_logprobs.as_ref().map(f32t);
            inputs32.ref_logprobs = inputs.ref_logprobs.as_ref().map(f32t);
            inputs32.rollout_logprobs = inputs.rollout_logprobs.as_ref().map(f32t);
            let out = grpo_loss(&cfg, &inputs32, &norm, cfg.beta).unwrap();
            assert!(
                out.loss.to_scalar::<f32>().unwrap().is_finite(),
                "{name} f32"
            );
        }
    }
}

#[test]
fn missing_or_misshapen_inputs_are_errors() {
    let d = data(3);
    let lp = t(d.logp.clone(), (d.b, d.k));
    let norm = Normalizers::for_batch(&d.mask, 6).unwrap();
    let cfg = GrpoConfig {
        beta: 0.1,
        ..GrpoConfig::default()
    };
    let mut inputs = LossInputs::new(lp.clone(), d.mask.clone(), d.adv.clone());
    inputs.rollout_logprobs = Some(d.rollout.clone());
    let err = grpo_loss(&cfg, &inputs, &norm, 0.1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ref_logprobs") && err.contains("beta"),
        "{err}"
    );
    inputs.ref_logprobs = Some(d.refp.clone());
    inputs.rollout_logprobs = None;
    let err = grpo_loss(&cfg, &inputs, &norm, 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vllm_importance_sampling_correction"), "{err}");
    inputs.rollout_logprobs = Some(d.rollout.clone());
    assert!(grpo_loss(&cfg, &inputs, &norm, 0.1).is_ok());
    let no_baseline = GrpoConfig {
        policy_loss: PolicyLoss::NoBaseline,
        ..cfg.clone()
    };
    assert!(grpo_loss(&no_baseline, &inputs, &norm, 0.1).is_err());
    let with_entropy = GrpoConfig {
        entropy_coef: 0.1,
        ..cfg.clone()
    };
    assert!(grpo_loss(&with_entropy, &inputs, &norm, 0.1).is_err());
    let mut bad = inputs.clone();
    bad.advantages = Tensor::new(&[1.0, 2.0], &DEV).unwrap();
    let err = grpo_loss(&cfg, &bad, &norm, 0.1).unwrap_err().to_string();
    assert!(err.contains("advantages"), "{err}");
    let mut bad = inputs.clone();
    bad.old_logprobs = Some(lp.narrow(1, 0, 2).unwrap());
    assert!(grpo_loss(&cfg, &bad, &norm, 0.1).is_err());
    assert!(grpo_loss(&cfg, &inputs, &norm, f64::NAN).is_err());
}
