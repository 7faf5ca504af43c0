//! The GRPO loss on per-token log-prob tensors, following TRL
//! `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py):
//!
//! ```text
//! log_ratio = logp - old_logp                          (old = logp.detach() when absent)
//! w         = log_ratio                                importance_sampling_level = token
//!           = sum_t(log_ratio * m) / max(sum_t m, 1)   importance_sampling_level = sequence (GSPO)
//! coef_1    = exp(clamp(w, -max_log_ratio, max_log_ratio))      (the clamp is verl's)
//! coef_2    = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
//! coef_1    = min(coef_1, delta)                       when delta is set (two-sided clipping)
//! pg_t      = -min(coef_1 A, coef_2 A)                 policy_loss = grpo_clip
//!           = -sg(min(coef_1, epsilon_high)) A logp_t  loss_type = cispo
//!           = -4/tau sigmoid(tau (coef_1 - 1)) A       loss_type = sapo
//!           = -sg(phi(w_seq)) A logp_t                 loss_type = vespo ([`vespo_weights`])
//!           = -A logp_t                                policy_loss = reinforce_with_baseline
//!           = -R logp_t                                policy_loss = no_baseline (R: raw reward)
//! pg_t     *= 1[A >= 0 or mean_t(lp_roll - lp) <= d]   off_policy_mask_threshold d (OPSM)
//! pg_t     *= 1[H_t >= q_{1-rho}(H)]                   top_entropy_quantile rho < 1
//! pg_t     *= is_ratio_t                               vllm_importance_sampling_correction
//!                                                      (vespo: inside phi instead)
//! loss_t    = pg_t + beta kl_t - entropy_coef H_t
//! ```
//!
//! `q_{1-rho}(H)` is the `1 - rho` quantile of the entropies of every
//! completion token of the micro-batch on every rank (TRL
//! `get_high_entropy_mask`).
//!
//! The rollout correction (TRL `_generate_and_score_completions`) is
//! `is_ratio = exp((old_logp - rollout_logp) m)` per token, or `exp(sum_t ...)`
//! per sequence, then truncated (`min(ratio, cap)`) or masked (`0 where ratio >
//! cap`); it is a constant (no gradient).
//!
//! Aggregation ([`LossType`]) divides by *global* normalisers
//! ([`Normalizers`]) so that the losses of all micro-batches on all ranks sum
//! to the loss of the whole batch, and so do their gradients: accumulate the
//! gradients of the micro-batches and all-reduce them with a **sum**.
//!
//! ```text
//! grpo    sum_i [ sum_t loss_it m_it / max(sum_t m_it, 1) ] / num_sequences   (sapo too)
//! bnpo    sum_it loss_it m_it / (rank_num_tokens * world_size)
//! dr_grpo sum_it loss_it m_it / (num_sequences * max_completion_length)
//! dapo    sum_it loss_it m_it / num_tokens            (cispo, vespo too)
//! luspo   sum_it loss_it m_it / num_sequences
//! ```
//!
//! TRL's per-micro-batch form (`/ gradient_accumulation_steps`, DDP mean over
//! ranks) gives the same gradient when micro-batches are equal in size; `bnpo`
//! keeps TRL's meaning of a per-rank token mean, averaged over ranks.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::grpo_config::{
    GrpoConfig, ImportanceSamplingLevel, LossType, PolicyLoss, VllmImportanceSamplingMode,
};
use crate::grpo_error::{GrpoError, Result};
use crate::kl::kl_estimate;
use crate::metrics::LossMetrics;

/// The tensors of one (micro-)batch. `[B, K]` tensors are aligned with the
/// padded completion block (see [`crate::batch`]); every one of them is cast to
/// the dtype of `logprobs`.
#[derive(Debug, Clone)]
pub struct LossInputs {
    /// `[B, K]` log-probs of the completion tokens under the policy being
    /// trained, with the sampling temperature applied; differentiable.
    pub logprobs: Tensor,
    /// `[B, K]` 1 on completion tokens, 0 on padding.
    pub response_mask: Tensor,
    /// `[B]` advantages.
    pub advantages: Tensor,
    /// `[B, K]` log-probs under the policy that generated the batch, computed
    /// by the learner (TRL `old_per_token_logps`); `None` means on-policy:
    /// `logprobs.detach()`.
    pub old_logprobs: Option<Tensor>,
    /// `[B, K]` log-probs under the reference model; needed when `beta != 0`.
    pub ref_logprobs: Option<Tensor>,
    /// `[B, K]` log-probs reported by the rollout server (TRL
    /// `sampling_per_token_logps`); needed when the correction is on.
    pub rollout_logprobs: Option<Tensor>,
    /// `[B, K]` per-token entropy of the policy; needed when `entropy_coef !=
    /// 0`, used for metrics when given.
    pub entropy: Option<Tensor>,
    /// `[B]` raw rewards; needed by `policy_loss = no_baseline`.
    pub rewards: Option<Tensor>,
    /// `[B, K]` 1 on the tokens that carry the policy-gradient term, 0
    /// elsewhere ([`high_entropy_mask`]); needed when `top_entropy_quantile <
    /// 1`.
    pub entropy_mask: Option<Tensor>,
}

impl LossInputs {
    pub fn new(logprobs: Tensor, response_mask: Tensor, advantages: Tensor) -> Self {
        LossInputs {
            logprobs,
            response_mask,
            advantages,
            old_logprobs: None,
            ref_logprobs: None,
            rollout_logprobs: None,
            entropy: None,
            rewards: None,
            entropy_mask: None,
        }
    }

    /// Rows `rows` of every tensor (one micro-batch of a larger batch).
    pub fn narrow_rows(&self, rows: Range<usize>) -> Result<LossInputs> {
        let n = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        let o = |t: &Option<Tensor>| t.as_ref().map(n).transpose();
        Ok(LossInputs {
            logprobs: n(&self.logprobs)?,
            response_mask: n(&self.response_mask)?,
            advantages: n(&self.advantages)?,
            old_logprobs: o(&self.old_logprobs)?,
            ref_logprobs: o(&self.ref_logprobs)?,
            rollout_logprobs: o(&self.rollout_logprobs)?,
            entropy: o(&self.entropy)?,
            rewards: o(&self.rewards)?,
            entropy_mask: o(&self.entropy_mask)?,
        })
    }
}

/// The entropy at quantile `q` of `values` (the entropies of every completion
/// token, padding excluded), interpolated linearly between the two nearest
/// ranks as `torch.quantile` does; `None` when there are none.
pub fn entropy_quantile(values: &[f32], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// TRL's `get_high_entropy_mask`: 1 on the completion tokens whose entropy
/// is at least `threshold`, 0 elsewhere and on padding (`[B, K]`, f32). A
/// `None` threshold (no tokens anywhere) masks everything.
pub fn high_entropy_mask(
    entropy: &Tensor,
    response_mask: &Tensor,
    threshold: Option<f64>,
) -> Result<Tensor> {
    let keep = response_mask.ne(0.0)?.to_dtype(DType::F32)?;
    Ok(match threshold {
        Some(t) => (entropy.to_dtype(DType::F64)?.ge(t)?.to_dtype(DType::F32)? * keep)?,
        None => keep.zeros_like()?,
    })
}

/// Splits `num_rows` rows into `num_micro_batches` contiguous ranges, as even
/// as possible (the first ones one row longer).
pub fn micro_batch_ranges(num_rows: usize, num_micro_batches: usize) -> Vec<Range<usize>> {
    let n = num_micro_batches.max(1);
    let (base, extra) = (num_rows / n, num_rows % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The global counts that the aggregations divide by. "Global" means: over
/// every gradient-accumulation micro-batch of the step, on every rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizers {
    /// Sequences in the global batch (empty ones included).
    pub num_sequences: f64,
    /// Completion tokens in the global batch (`dapo`).
    pub num_tokens: f64,
    /// Completion tokens in this rank's batch, all its micro-batches (`bnpo`).
    pub rank_num_tokens: f64,
    /// Number of ranks whose gradients are summed (`bnpo`).
    pub world_size: usize,
    /// The recipe's `max_completion_length` (`dr_grpo`).
    pub max_completion_length: usize,
}

fn mask_count(mask: &Tensor) -> Result<(f64, f64)> {
    let (rows, _) = mask.dims2()?;
    let tokens = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok((rows as f64, tokens))
}

impl Normalizers {
    /// Normalisers of a single batch on a single rank (no accumulation).
    pub fn for_batch(response_mask: &Tensor, max_completion_length: usize) -> Result<Self> {
        let (num_sequences, num_tokens) = mask_count(response_mask)?;
        Ok(Normalizers {
            num_sequences,
            num_tokens,
            rank_num_tokens: num_tokens,
            world_size: 1,
            max_completion_length,
        })
    }

    /// Normalisers of a step made of this rank's micro-batches (their response
    /// masks) on `world_size` ranks. `all_reduce_sum` must sum `[sequences,
    /// tokens]` across ranks (identity on one rank).
    pub fn for_micro_batches<F>(
        masks: &[&Tensor],
        max_completion_length: usize,
        world_size: usize,
        all_reduce_sum: F,
    ) -> Result<Self>
    where
        F: FnOnce([f64; 2]) -> Result<[f64; 2]>,
    {
        let mut local = [0.0, 0.0];
        for m in masks {
            let (s, t) = mask_count(m)?;
            local[0] += s;
            local[1] += t;
        }
        let [num_sequences, num_tokens] = all_reduce_sum(local)?;
        Ok(Normalizers {
            num_sequences,
            num_tokens,
            rank_num_tokens: local[1],
            world_size: world_size.max(1),
            max_completion_length,
        })
    }
}

/// Mean of `x` over the positions where `mask` is 1, over all elements
/// (`dim = None`) or along `dim`. A mask with no 1 gives 0, not NaN.
pub fn masked_mean(x: &Tensor, mask: &Tensor, dim: Option<usize>) -> Result<Tensor> {
    let mask = mask.to_dtype(x.dtype())?;
    let xm = (x * &mask)?;
    Ok(match dim {
        None => (xm.sum_all()? / mask.sum_all()?.clamp(1.0, f64::INFINITY)?)?,
        Some(d) => (xm.sum(d)? / mask.sum(d)?.clamp(1.0, f64::INFINITY)?)?,
    })
}

/// Sum of `x` over the positions where `mask` is 1, divided by a constant
/// (CS336 `masked_normalize`; Dr. GRPO divides by `max_completion_length`).
pub fn masked_normalize(
    x: &Tensor,
    mask: &Tensor,
    normalize_constant: f64,
    dim: Option<usize>,
) -> Result<Tensor> {
    if !(normalize_constant.is_finite() && normalize_constant != 0.0) {
        return Err(GrpoError::Invalid(format!(
            "masked_normalize: the constant must be finite and non-zero, got {normalize_constant}"
        )));
    }
    let xm = (x * mask.to_dtype(x.dtype())?)?;
    let s = match dim {
        None => xm.sum_all()?,
        Some(d) => xm.sum(d)?,
    };
    Ok((s / normalize_constant)?)
}

/// Reduces per-token losses `[B, K]` (already zero where the mask is 0) to the
/// micro-batch's share of the global loss.
pub fn aggregate(
    per_token: &Tensor,
    mask: &Tensor,
    loss_type: LossType,
    norm: &Normalizers,
) -> Result<Tensor> {
    let mask = mask.to_dtype(per_token.dtype())?;
    let masked = (per_token * &mask)?;
    Ok(match loss_type {
        LossType::Grpo | LossType::Sapo => {
            let per_seq = (masked.sum(1)? / mask.sum(1)?.clamp(1.0, f64::INFINITY)?)?;
            (per_seq.sum_all()? / norm.num_sequences.max(1.0))?
        }
        LossType::Bnpo => {
            (masked.sum_all()? / (norm.rank_num_tokens.max(1.0) * norm.world_size.max(1) as f64))?
        }
        LossType::DrGrpo => {
            let denom = norm.num_sequences.max(1.0) * norm.max_completion_length.max(1) as f64;
            (masked.sum_all()? / denom)?
        }
        LossType::Dapo | LossType::Cispo | LossType::Vespo => {
            (masked.sum_all()? / norm.num_tokens.max(1.0))?
        }
        LossType::Luspo => (masked.sum_all()? / norm.num_sequences.max(1.0))?,
    })
}

/// The loss of one micro-batch and its metrics.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar, differentiable w.r.t. `logprobs` (and `entropy`).
    pub loss: Tensor,
    pub metrics: LossMetrics,
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(GrpoError::Shape {
            name: name.to_string(),
            expected: format!("{expected:?}"),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

fn missing(what: &str, when: &str) -> GrpoError {
    GrpoError::Missing {
        what: what.to_string(),
        when: when.to_string(),
    }
}

/// Importance weights `coef_1` before clipping: `[B, K]` (token level) or
/// `[B, 1]` (sequence level). `log_ratio` and `mask` are `[B, K]`.
pub fn importance_weights(
    log_ratio: &Tensor,
    mask: &Tensor,
    level: ImportanceSamplingLevel,
    max_log_ratio: f64,
) -> Result<Tensor> {
    let w = match level {
        ImportanceSamplingLevel::Token => log_ratio.clone(),
        ImportanceSamplingLevel::Sequence => {
            let num = (log_ratio * mask)?.sum_keepdim(1)?;
            let den = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
            (num / den)?
        }
    };
    Ok(w.clamp(-max_log_ratio, max_log_ratio)?.exp()?)
}

/// The rollout importance-sampling correction (TRL
/// `vllm_importance_sampling_*`), detached: `[B, K]` for token modes, `[B, 1]`
/// for sequence modes.
pub fn rollout_correction(
    old_logprobs: &Tensor,
    rollout_logprobs: &Tensor,
    mask: &Tensor,
    mode: VllmImportanceSamplingMode,
    cap: f64,
) -> Result<Tensor> {
    let diff = ((old_logprobs.detach() - rollout_logprobs.detach())? * mask)?;
    let diff = if mode.is_sequence_level() {
        diff.sum_keepdim(1)?
    } else {
        diff
    };
    // exp may overflow to +inf on a long sequence: min(inf, cap) = cap and
    // inf > cap is masked, so the result stays finite.
    let ratio = diff.exp()?;
    Ok(match mode {
        VllmImportanceSamplingMode::TokenTruncate
        | VllmImportanceSamplingMode::SequenceTruncate => ratio.minimum(cap)?,
        VllmImportanceSamplingMode::TokenMask | VllmImportanceSamplingMode::SequenceMask => {
            let keep = ratio.le(cap)?;
            keep.where_cond(&ratio, &ratio.zeros_like()?)?
        }
    })
}

/// VESPO's sequence weights (TRL `GRPOTrainer.get_gamma_weights`), `[B, 1]`,
/// detached: `phi(w) = exp(lambda + k log w - lambda w)` with `log w` the
/// sum over the sequence's tokens of the clamped log-ratio (plus the log of
/// the rollout correction's token ratios, when given), clamped to
/// `[ln 1e-8, 20]`; `k`, `lambda` by the sign of the advantage (`A >= 0`:
/// the `_pos` ones). A weight that is not finite is 0, as in TRL.
pub fn vespo_weights(
    cfg: &GrpoConfig,
    log_ratio: &Tensor,
    mask: &Tensor,
    is_ratio: Option<&Tensor>,
    advantages: &Tensor,
) -> Result<Tensor> {
    const LOG_W_MAX: f64 = 20.0;
    let log_w_min = 1e-8f64.ln();
    let lr = log_ratio
        .detach()
        .clamp(-cfg.max_log_ratio, cfg.max_log_ratio)?;
    let mut seq = (lr * mask)?.sum(1)?;
    if let Some(r) = is_ratio {
        // A masked token's ratio is 0: its log is clamped, not -inf.
        let log_r = r
            .detach()
            .clamp(log_w_min.exp(), f64::INFINITY)?
            .log()?
            .clamp(log_w_min, LOG_W_MAX)?;
        seq = (seq + (log_r * mask)?.sum(1)?)?;
    }
    let seq = seq.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let adv = advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let phi: Vec<f64> = seq
        .iter()
        .zip(&adv)
        .map(|(&s, &a)| {
            let (k, lambda) = if a >= 0.0 {
                (cfg.vespo_k_pos, cfg.vespo_lambda_pos)
            } else {
                (cfg.vespo_k_neg, cfg.vespo_lambda_neg)
            };
            let lambda = lambda.max(1e-4);
            let log_w = s.clamp(log_w_min, LOG_W_MAX);
            let phi = (lambda + k * log_w - lambda * log_w.exp()).exp();
            if phi.is_finite() { phi } else { 0.0 }
        })
        .collect();
    Ok(Tensor::from_vec(phi, (seq.len(), 1), log_ratio.device())?.to_dtype(log_ratio.dtype())?)
}

/// TRL's `get_off_policy_mask` (DeepSeek-V3.2's off-policy sequence
/// masking), `[B, 1]`, detached: 1 where the advantage is `>= 0` or the
/// sequence's mean of `sampling_logp - logp` over its tokens is at most
/// `threshold`, else 0.
pub fn off_policy_mask(
    sampling_logprobs: &Tensor,
    logprobs: &Tensor,
    mask: &Tensor,
    advantages: &Tensor,
    threshold: f64,
) -> Result<Tensor> {
    let kl = masked_mean(
        &(sampling_logprobs.detach() - logprobs.detach())?,
        mask,
        Some(1),
    )?
    .to_dtype(DType::F64)?
    .to_vec1::<f64>()?;
    let adv = advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let keep: Vec<f64> = kl
        .iter()
        .zip(&adv)
        .map(|(&kl, &a)| f64::from(u8::from(a >= 0.0 || kl <= threshold)))
        .collect();
    Ok(Tensor::from_vec(keep, (adv.len(), 1), logprobs.device())?.to_dtype(logprobs.dtype())?)
}

/// Zeroes `t` where the mask is 0, so that whatever the padding holds (even
/// inf or NaN) never reaches a sum; the gradient there is 0.
fn zero_padding(t: &Tensor, keep: &Tensor) -> Result<Tensor> {
    Ok(keep.where_cond(t, &t.zeros_like()?)?)
}

fn host2(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// The GRPO loss of one micro-batch, divided by the global normalisers `norm`
/// (see the module docs), with KL coefficient `beta` (the controller's value;
/// `cfg.beta` when fixed). Returns the scalar loss and the micro-batch's
/// metrics.
pub fn grpo_loss(
    cfg: &GrpoConfig,
    inputs: &LossInputs,
    norm: &Normalizers,
    beta: f64,
) -> Result<LossOutput> {
    let logp = &inputs.logprobs;
    // The loss is reduced in f32 (f64 when given f64) whatever the model's
    // dtype: bf16 sums over thousands of tokens lose the advantages' signal.
    let dtype = match logp.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let (b, k) = logp.dims2().map_err(|_| GrpoError::Shape {
        name: "logprobs".into(),
        expected: "[B, K]".into(),
        got: logp.dims().to_vec(),
    })?;
    let bk = [b, k];
    check_shape("response_mask", &inputs.response_mask, &bk)?;
    check_shape("advantages", &inputs.advantages, &[b])?;
    for (name, t) in [
        ("old_logprobs", &inputs.old_logprobs),
        ("ref_logprobs", &inputs.ref_logprobs),
        ("rollout_logprobs", &inputs.rollout_logprobs),
        ("entropy", &inputs.entropy),
        ("entropy_mask", &inputs.entropy_mask),
    ] {
        if let Some(t) = t {
            check_shape(name, t, &bk)?;
        }
    }
    if let Some(r) = &inputs.rewards {
        check_shape("rewards", r, &[b])?;
    }
    if !beta.is_finite() || beta < 0.0 {
        return Err(GrpoError::Invalid(format!("beta must be >= 0, got {beta}")));
    }

    let keep = inputs.response_mask.ne(0.0)?;
    let mask = keep.to_dtype(dtype)?;
    let cast = |t: &Tensor| -> Result<Tensor> { zero_padding(&t.to_dtype(dtype)?, &keep) };
    let logp = cast(logp)?;
    let old = match &inputs.old_logprobs {
        Some(o) => cast(o)?.detach(),
        None => logp.detach(),
    };
    let adv = inputs.advantages.to_dtype(dtype)?.unsqueeze(1)?; // [B, 1]

    // Importance ratio (token or sequence level).
    let log_ratio = (&logp - &old)?;
    let coef_1 = importance_weights(
        &log_ratio,
        &mask,
        cfg.importance_sampling_level,
        cfg.max_log_ratio,
    )?;
    let eps_low = cfg.epsilon;
    let eps_high = cfg.epsilon_high();

    // Rollout (vLLM) importance-sampling correction (TRL `sampling/*` metrics).
    let mut metrics = LossMetrics::default();
    let is_ratio = if cfg.vllm_importance_sampling_correction {
        let rollout = inputs.rollout_logprobs.as_ref().ok_or_else(|| {
            missing(
                "`rollout_logprobs` (the rollout server's log-probs)",
                "vllm_importance_sampling_correction is on (set it to false to train without the correction)",
            )
        })?;
        let rollout = cast(rollout)?;
        let is_ratio = rollout_correction(
            &old,
            &rollout,
            &mask,
            cfg.vllm_importance_sampling_mode,
            cfg.vllm_importance_sampling_cap,
        )?;
        let diff = host2(&(&old - &rollout)?.abs()?)?;
        let m = host2(&mask)?;
        let ratio_h = host2(&is_ratio)?;
        let seq = cfg.vllm_importance_sampling_mode.is_sequence_level();
        for i in 0..b {
            if seq {
                metrics.add_is_ratio(ratio_h[i][0]);
            }
            for j in 0..k {
                if m[i][j] > 0.0 {
                    metrics.sampling_logp_diff_sum += diff[i][j];
                    metrics.sampling_logp_diff_max = Some(
                        metrics
                            .sampling_logp_diff_max
                            .map_or(diff[i][j], |x| x.max(diff[i][j])),
                    );
                    if !seq {
                        metrics.add_is_ratio(ratio_h[i][j]);
                    }
                }
            }
        }
        Some(is_ratio)
    } else {
        None
    };

    // Policy-gradient term per token.
    let pg = match (cfg.policy_loss, cfg.loss_type) {
        (PolicyLoss::GrpoClip, LossType::Cispo) => {
            // The weight is a constant: the gradient flows through log pi.
            let w = coef_1.minimum(eps_high)?.detach();
            w.broadcast_mul(&adv)?
                .broadcast_mul(&logp)?
                .neg()?
                .contiguous()?
        }
        (PolicyLoss::GrpoClip, LossType::Sapo) => {
            let tau: Vec<f64> = inputs
                .advantages
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .iter()
                .map(|&a| {
                    if a > 0.0 {
                        cfg.sapo_temperature_pos
                    } else {
                        cfg.sapo_temperature_neg
                    }
                })
                .collect();
            let tau = Tensor::from_vec(tau, (b, 1), logp.device())?.to_dtype(dtype)?;
            // sigmoid(x) = 1 / (1 + e^-x); x >= -tau since r >= 0, so e^-x
            // stays finite.
            let x = (coef_1.affine(1.0, -1.0)?.broadcast_mul(&tau))?;
            let gate = (x.neg()?.exp()? + 1.0)?.recip()?;
            let soft = (gate * 4.0)?.broadcast_div(&tau)?;
            soft.broadcast_mul(&adv)?
                .neg()?
                .broadcast_as((b, k))?
                .contiguous()?
        }
        (PolicyLoss::GrpoClip, LossType::Vespo) => {
            let phi = vespo_weights(
                cfg,
                &log_ratio,
                &mask,
                is_ratio.as_ref(),
                &inputs.advantages,
            )?;
            metrics.phi_seq_sum = phi.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            metrics.phi_seq_count = b as f64;
            // The weight is a constant: the gradient flows through log pi.
            phi.broadcast_mul(&adv)?
                .broadcast_mul(&logp)?
                .neg()?
                .contiguous()?
        }
        (PolicyLoss::GrpoClip, _) => {
            let coef_2 = coef_1.clamp(1.0 - eps_low, 1.0 + eps_high)?;
            let coef_1 = match cfg.delta {
                Some(d) => coef_1.minimum(d)?,
                None => coef_1.clone(),
            };
            let l1 = coef_1.broadcast_mul(&adv)?;
            let l2 = coef_2.broadcast_mul(&adv)?;
            l1.minimum(&l2)?.neg()?.broadcast_as((b, k))?.contiguous()?
        }
        (PolicyLoss::ReinforceWithBaseline, _) => logp.broadcast_mul(&adv)?.neg()?,
        (PolicyLoss::NoBaseline, _) => {
            let r = inputs
                .rewards
                .as_ref()
                .ok_or_else(|| missing("`rewards` (raw rewards)", "policy_loss = no_baseline"))?;
            logp.broadcast_mul(&r.to_dtype(dtype)?.unsqueeze(1)?)?
                .neg()?
        }
    };

    // Off-policy sequence masking (TRL's off_policy_mask_threshold): the
    // sampling policy's log-probs (the rollout server's, else the old ones)
    // against the current ones, held constant.
    let pg = match cfg.off_policy_mask_threshold {
        Some(threshold) => {
            let sampling = match &inputs.rollout_logprobs {
                Some(r) => cast(r)?,
                None => old.clone(),
            };
            let keep = off_policy_mask(&sampling, &logp, &mask, &inputs.advantages, threshold)?;
            pg.broadcast_mul(&keep)?
        }
        None => pg,
    };

    // Only the high-entropy tokens carry the policy gradient (TRL applies
    // the mask before the rollout correction and the KL term).
    let pg = if cfg.top_entropy_quantile < 1.0 {
        let m = inputs.entropy_mask.as_ref().ok_or_else(|| {
            missing(
                "`entropy_mask` (the high-entropy tokens)",
                "top_entropy_quantile < 1",
            )
        })?;
        (pg * m.to_dtype(dtype)?)?
    } else {
        pg
    };

    // The rollout correction multiplies the policy-gradient term, except
    // VESPO's, which folds it into its sequence weight.
    let pg = match &is_ratio {
        Some(r) if cfg.loss_type != LossType::Vespo => pg.broadcast_mul(r)?,
        _ => pg,
    };

    // KL to the reference.
    let kl = if beta != 0.0 || inputs.ref_logprobs.is_some() {
        match &inputs.ref_logprobs {
            Some(r) => {
                let kl = kl_estimate(&logp, &cast(r)?, cfg.kl_estimator, cfg.max_log_ratio)?;
                Some(if cfg.use_bias_correction_kl {
                    kl.broadcast_mul(&coef_1)?
                } else {
                    kl
                })
            }
            None => return Err(missing("`ref_logprobs` (reference log-probs)", "beta != 0")),
        }
    } else {
        None
    };

    // Entropy bonus.
    let entropy = match &inputs.entropy {
        Some(h) => Some(cast(h)?),
        None if cfg.entropy_coef != 0.0 => {
            return Err(missing("`entropy`", "entropy_coef != 0"));
        }
        None => None,
    };

    let pg_loss = aggregate(&pg, &mask, cfg.loss_type, norm)?;
    let mut loss = pg_loss.clone();
    let mut kl_loss_v = 0.0;
    if let (Some(kl), true) = (&kl, beta != 0.0) {
        let kl_loss = (aggregate(kl, &mask, cfg.loss_type, norm)? * beta)?;
        kl_loss_v = kl_loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        loss = (loss + kl_loss)?;
    }
    let mut entropy_loss_v = 0.0;
    if let (Some(h), true) = (&entropy, cfg.entropy_coef != 0.0) {
        let ent_loss = (aggregate(h, &mask, cfg.loss_type, norm)? * (-cfg.entropy_coef))?;
        entropy_loss_v = ent_loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        loss = (loss + ent_loss)?;
    }

    // Metrics.
    let f = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    metrics.pg_loss = f(&pg_loss)?;
    metrics.kl_loss = kl_loss_v;
    metrics.entropy_loss = entropy_loss_v;
    metrics.loss = f(&loss)?;
    metrics.num_sequences = b as f64;
    metrics.num_tokens = f(&mask.sum_all()?)?;
    if let Some(kl) = &kl {
        metrics.has_kl = true;
        metrics.kl_sum = f(&(kl * &mask)?.sum_all()?)?;
    }
    if let Some(h) = &entropy {
        metrics.has_entropy = true;
        metrics.entropy_sum = f(&(h * &mask)?.sum_all()?)?;
    }
    metrics.approx_kl_sum = f(&((&old - &logp)? * &mask)?.sum_all()?)?;
    let coef_h = host2(&coef_1)?;
    let adv_h = inputs.advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let m = host2(&mask)?;
    let seq_level = cfg.importance_sampling_level == ImportanceSamplingLevel::Sequence;
    for i in 0..b {
        let cols: Vec<usize> = if seq_level {
            vec![0]
        } else {
            (0..k).filter(|&j| m[i][j] > 0.0).collect()
        };
        for j in cols {
            let r = coef_h[i][j];
            metrics.ratio_count += 1.0;
            metrics.ratio_sum += r;
            metrics.ratio_min = Some(metrics.ratio_min.map_or(r, |x| x.min(r)));
            metrics.ratio_max = Some(metrics.ratio_max.map_or(r, |x| x.max(r)));
            // What each loss clips (TRL's clip_ratio/*; CISPO's
            // cispo_clip_ratio is the high one here; SAPO and VESPO clip
            // nothing).
            let (low, high) = match cfg.loss_type {
                LossType::Cispo => (false, r > eps_high && adv_h[i] > 0.0),
                LossType::Sapo | LossType::Vespo => (false, false),
                _ => (
                    r < 1.0 - eps_low && adv_h[i] < 0.0,
                    r > 1.0 + eps_high && adv_h[i] > 0.0,
                ),
            };
            metrics.clip_low_count += f64::from(u8::from(low));
            metrics.clip_high_count += f64::from(u8::from(high));
        }
    }
    Ok(LossOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn micro_batch_ranges_cover_every_row_once() {
        assert_eq!(micro_batch_ranges(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(micro_batch_ranges(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(micro_batch_ranges(3, 0), vec![0..3]);
        let r = micro_batch_ranges(2, 3);
        assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), 2);
    }

    #[test]
    fn normalizers_count_sequences_and_tokens() {
        let m = Tensor::new(&[[1f32, 1., 0.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let n = Normalizers::for_batch(&m, 16).unwrap();
        assert_eq!(
            (n.num_sequences, n.num_tokens, n.rank_num_tokens),
            (2.0, 2.0, 2.0)
        );
        let n = Normalizers::for_micro_batches(&[&m, &m], 16, 2, |[s, t]| Ok([2.0 * s, 2.0 * t]))
            .unwrap();
        assert_eq!(
            (n.num_sequences, n.num_tokens, n.rank_num_tokens),
            (8.0, 8.0, 4.0)
        );
        assert_eq!(n.world_size, 2);
    }

    #[test]
    fn entropy_quantile_interpolates_as_torch_quantile() {
        let v = [3.0f32, 1.0, 4.0, 2.0];
        // torch.quantile(torch.tensor([3., 1., 4., 2.]), q): 1.75, 3.4, 1, 4.
        for (q, want) in [(0.25, 1.75), (0.8, 3.4), (0.0, 1.0), (1.0, 4.0)] {
            let got = entropy_quantile(&v, q).unwrap();
            assert!((got - want).abs() < 1e-12, "q {q}: {got} vs {want}");
        }
        assert_eq!(entropy_quantile(&[0.5], 0.8), Some(0.5));
        assert_eq!(entropy_quantile(&[], 0.8), None);
    }

    #[test]
    fn only_high_entropy_tokens_carry_the_policy_gradient() {
        let dev = Device::Cpu;
        let entropy = Tensor::new(&[[0.1f32, 0.5, 0.9], [0.7, 0.2, 0.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &dev).unwrap();
        let hm = high_entropy_mask(&entropy, &mask, Some(0.5)).unwrap();
        let got: Vec<Vec<f32>> = hm.to_vec2().unwrap();
        assert_eq!(got, vec![vec![0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]);
        let none: Vec<Vec<f32>> = high_entropy_mask(&entropy, &mask, None)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(none, vec![vec![0.0; 3]; 2]);

        // On-policy (ratio 1), dapo: loss = sum_t -A_i m_t h_t / num_tokens,
        // A = [1, -2], high-entropy tokens (0, 1), (0, 2), (1, 0), 5 tokens:
        // (-1 - 1 + 2) / 5 = 0.
        let logp = Tensor::new(&[[-0.5f64, -1.5, -1.0], [-0.2, -0.3, -0.4]], &dev).unwrap();
        let mask = mask.to_dtype(DType::F64).unwrap();
        let mut inputs =
            LossInputs::new(logp, mask.clone(), Tensor::new(&[1f64, -2.], &dev).unwrap());
        let cfg = GrpoConfig {
            vllm_importance_sampling_correction: false,
            top_entropy_quantile: 0.5,
            ..GrpoConfig::default()
        };
        let norm = Normalizers::for_batch(&mask, 3).unwrap();
        let err = grpo_loss(&cfg, &inputs, &norm, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_entropy_quantile"), "{err}");
        inputs.entropy_mask = Some(Tensor::new(&[[0f64, 1., 1.], [1., 0., 0.]], &dev).unwrap());
        let got = grpo_loss(&cfg, &inputs, &norm, 0.0)
            .unwrap()
            .loss
            .to_scalar::<f64>()
            .unwrap();
        assert!(got.abs() < 1e-12, "{got}");
        // Dropping token (1, 0) leaves -2 / 5.
        inputs.entropy_mask = Some(Tensor::new(&[[0f64, 1., 1.], [0., 0., 0.]], &dev).unwrap());
        let got = grpo_loss(&cfg, &inputs, &norm, 0.0)
            .unwrap()
            .loss
            .to_scalar::<f64>()
            .unwrap();
        assert!((got + 0.4).abs() < 1e-12, "{got}");
    }

    /// TRL's `cispo` and `sapo`: values and gradients with respect to the
    /// log-probs, by hand. Two sequences of two tokens, A = 1 and A = -1,
    /// ratios e^0.5 and e^-0.5.
    #[test]
    fn hand_computed_cispo_and_sapo() {
        let dev = Device::Cpu;
        let logp = Var::new(&[[-0.5f64, -1.5], [-0.5, -1.5]], &dev).unwrap();
        let old = Tensor::new(&[[-1.0f64, -1.0], [-1.0, -1.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f64, 1.], [1., 1.]], &dev).unwrap();
        let adv = [1.0f64, -1.0];
        let mut inputs = LossInputs::new(
            logp.as_tensor().clone(),
            mask.clone(),
            Tensor::new(&adv, &dev).unwrap(),
        );
        inputs.old_logprobs = Some(old);
        let norm = Normalizers::for_batch(&mask, 10).unwrap();
        let lp = [-0.5f64, -1.5];
        let r = [0.5f64.exp(), (-0.5f64).exp()];
        let base = GrpoConfig {
            vllm_importance_sampling_correction: false,
            ..GrpoConfig::default()
        };
        let check = |cfg: &GrpoConfig, loss: f64, grad: [[f64; 2]; 2], clip_high: f64| {
            let out = grpo_loss(cfg, &inputs, &norm, 0.0).unwrap();
            let got = out.loss.to_scalar::<f64>().unwrap();
            assert!((got - loss).abs() < 1e-12, "{cfg:?}: {got} vs {loss}");
            let g = out.loss.backward().unwrap();
            let g: Vec<Vec<f64>> = g.get(logp.as_tensor()).unwrap().to_vec2().unwrap();
            for i in 0..2 {
                for t in 0..2 {
                    assert!((g[i][t] - grad[i][t]).abs() < 1e-12, "{g:?} vs {grad:?}");
                }
            }
            let s = out.metrics.summary();
            assert_eq!((s.clip_ratio_high, s.clip_ratio_low), (clip_high, 0.0));
        };

        // CISPO, epsilon_high 1.5: weights min(r, 1.5) = [1.5, e^-0.5], held
        // constant; loss -w A log pi over the 4 tokens (dapo).
        let cispo = GrpoConfig {
            loss_type: LossType::Cispo,
            epsilon_high: Some(1.5),
            ..base.clone()
        };
        let w = [1.5, r[1]];
        let mut loss = 0.0;
        let mut grad = [[0.0; 2]; 2];
        for (i, a) in adv.iter().enumerate() {
            for t in 0..2 {
                loss += -w[t] * a * lp[t] / 4.0;
                grad[i][t] = -w[t] * a / 4.0;
            }
        }
        // Clipped: the first token of the A > 0 sequence, 1 of 4.
        check(&cispo, loss, grad, 0.25);

        // SAPO: -4/tau sigmoid(tau (r - 1)) A, mean per sequence, then over
        // sequences; tau 1 for A > 0, 1.05 for A < 0. d/d log pi:
        // -4 sigmoid' r A.
        let sapo = GrpoConfig {
            loss_type: LossType::Sapo,
            ..base.clone()
        };
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let mut loss = 0.0;
        let mut grad = [[0.0; 2]; 2];
        for (i, a) in adv.iter().enumerate() {
            let tau = if *a > 0.0 { 1.0 } else { 1.05 };
            for t in 0..2 {
                let s = sig(tau * (r[t] - 1.0));
                loss += -4.0 / tau * s * a / 2.0 / 2.0;
                grad[i][t] = -4.0 * s * (1.0 - s) * r[t] * a / 2.0 / 2.0;
            }
        }
        check(&sapo, loss, grad, 0.0);

        // Their own policy-gradient term: another policy_loss is refused.
        let bad = GrpoConfig {
            policy_loss: PolicyLoss::ReinforceWithBaseline,
            ..cispo
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("policy_loss")
        );
    }

    /// TRL's off_policy_mask_threshold: a negative-advantage sequence whose
    /// sampling policy is ahead of the current one by more than the threshold
    /// (mean per token) is masked; the sampling log-probs are the rollout
    /// server's when given, else the old ones.
    #[test]
    fn off_policy_sequences_with_negative_advantages_are_masked() {
        let dev = Device::Cpu;
        let logp = Tensor::new(&[[-1.0f64, -1.0], [-1.0, -1.0], [-1.0, -1.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f64, 1.], [1., 1.], [1., 1.]], &dev).unwrap();
        // Old log-probs: row 0 is 0.5 ahead (masked at threshold 0.1 with
        // A < 0), row 1 0.5 behind, row 2 ahead but with A > 0.
        let old = Tensor::new(&[[-0.5f64, -0.5], [-1.5, -1.5], [-0.5, -0.5]], &dev).unwrap();
        let mut inputs = LossInputs::new(
            logp.clone(),
            mask.clone(),
            Tensor::new(&[-1.0f64, -2.0, 1.0], &dev).unwrap(),
        );
        inputs.old_logprobs = Some(old);
        let cfg = GrpoConfig {
            policy_loss: PolicyLoss::ReinforceWithBaseline,
            vllm_importance_sampling_correction: false,
            off_policy_mask_threshold: Some(0.1),
            ..GrpoConfig::default()
        };
        let norm = Normalizers::for_batch(&mask, 10).unwrap();
        let loss = |inputs: &LossInputs| {
            grpo_loss(&cfg, inputs, &norm, 0.0)
                .unwrap()
                .loss
                .to_scalar::<f64>()
                .unwrap()
        };
        // pg_t = -A logp_t: row 0 masked, row 1 gives 2 x -2, row 2 2 x 1;
        // dapo over 6 tokens.
        assert!((loss(&inputs) - (-4.0 + 2.0) / 6.0).abs() < 1e-12);
        // The rollout server's log-probs take the old ones' place: now row 1
        // is ahead and masked, row 0 kept (2 x -1).
        inputs.rollout_logprobs =
            Some(Tensor::new(&[[-1.5f64, -1.5], [-0.5, -0.5], [-1.0, -1.0]], &dev).unwrap());
        assert!((loss(&inputs) - (-2.0 + 2.0) / 6.0).abs() < 1e-12);
        let masked = off_policy_mask(
            inputs.rollout_logprobs.as_ref().unwrap(),
            &logp,
            &mask,
            &inputs.advantages,
            0.1,
        )
        .unwrap();
        let got: Vec<Vec<f64>> = masked.to_vec2().unwrap();
        assert_eq!(got, vec![vec![1.0], vec![0.0], vec![1.0]]);
    }

    /// TRL's use_bias_correction_kl: the k3 estimate times the ratio.
    #[test]
    fn bias_corrected_kl_is_weighted_by_the_ratio() {
        let dev = Device::Cpu;
        let logp = Tensor::new(&[[-0.5f64, -1.5]], &dev).unwrap();
        let mask = Tensor::new(&[[1f64, 1.]], &dev).unwrap();
        let mut inputs = LossInputs::new(logp, mask.clone(), Tensor::new(&[1f64], &dev).unwrap());
        inputs.old_logprobs = Some(Tensor::new(&[[-1.0f64, -1.0]], &dev).unwrap());
        inputs.ref_logprobs = Some(Tensor::new(&[[-0.7f64, -1.2]], &dev).unwrap());
        let norm = Normalizers::for_batch(&mask, 10).unwrap();
        let k3 = |lp: f64, rf: f64| (rf - lp).exp() - (rf - lp) - 1.0;
        let (lp, old, rf) = ([-0.5f64, -1.5], [-1.0f64, -1.0], [-0.7f64, -1.2]);
        for corrected in [false, true] {
            let cfg = GrpoConfig {
                vllm_importance_sampling_correction: false,
                use_bias_correction_kl: corrected,
                ..GrpoConfig::default()
            };
            let out = grpo_loss(&cfg, &inputs, &norm, 0.1).unwrap();
            let want: f64 = (0..2)
                .map(|t| {
                    let r = if corrected {
                        (lp[t] - old[t]).exp()
                    } else {
                        1.0
                    };
                    k3(lp[t], rf[t]) * r
                })
                .sum();
            let got = out.metrics.kl_sum;
            assert!((got - want).abs() < 1e-12, "{corrected}: {got} vs {want}");
            assert!((out.metrics.kl_loss - 0.1 * want / 2.0).abs() < 1e-12);
        }
    }

    #[test]
    fn hand_computed_grpo_clip_and_aggregations() {
        // One sequence of two tokens, A = 1, ratios e^0.5 (clipped at 1.2)
        // and e^-0.5 (unclipped for A > 0): loss_t = -min(r, clip(r)).
        let dev = Device::Cpu;
        let logp = Tensor::new(&[[-0.5f64, -1.5]], &dev).unwrap();
        let old = Tensor::new(&[[-1.0f64, -1.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f64, 1.]], &dev).unwrap();
        let mut inputs = LossInputs::new(logp, mask.clone(), Tensor::new(&[1f64], &dev).unwrap());
        inputs.old_logprobs = Some(old);
        let cfg = GrpoConfig {
            vllm_importance_sampling_correction: false,
            ..GrpoConfig::default()
        };
        let want_tokens = [-1.2, -(-0.5f64).exp()];
        for (lt, denom) in [
            (LossType::Grpo, 2.0),
            (LossType::Bnpo, 2.0),
            (LossType::Dapo, 2.0),
            (LossType::DrGrpo, 10.0),
        ] {
            let cfg = GrpoConfig {
                loss_type: lt,
                ..cfg.clone()
            };
            let norm = Normalizers::for_batch(&mask, 10).unwrap();
            let out = grpo_loss(&cfg, &inputs, &norm, 0.0).unwrap();
            let got = out.loss.to_scalar::<f64>().unwrap();
            let want = (want_tokens[0] + want_tokens[1]) / denom;
            assert!((got - want).abs() < 1e-12, "{lt:?}: {got} vs {want}");
            let s = out.metrics.summary();
            assert_eq!(s.clip_ratio_high, 0.5);
            assert_eq!(s.clip_ratio_low, 0.0);
        }
    }
}
