//! Group-normalized advantages from the rewards of `prompts x G` completions.
//!
//! Follows TRL `GRPOTrainer._generate_and_score_completions`:
//!
//! ```text
//! A_i = (r_i - mean(group(i))) / (std + 1e-4)      scale_rewards = group | batch
//! A_i =  r_i - mean(group(i))                      scale_rewards = none
//! A_i = (r_i - mean(group(i))) / (mean(group(i)) + 1e-4)   scale_rewards = mean (MaxRL)
//! ```
//!
//! where `std` is the unbiased (`torch.std`) standard deviation of the group
//! (`group`) or of the whole batch (`batch`), 0 for a single element. `rloo`
//! (verl `compute_rloo_outcome_advantage`) replaces the group mean by the mean of
//! the *other* `G-1` rewards of the group, `r_i - (sum - r_i) / (G - 1)`, and is
//! then scaled the same way. Computed on the host in f64: rewards are small and
//! every rank must get bit-identical advantages.
//!
//! A group whose rewards all tie gets exactly 0 advantage (TRL gets `0/1e-4`,
//! up to the rounding of the mean), and never NaN.
//!
//! With `multi_objective_aggregation: normalize_then_sum` (GDPO, TRL's
//! option) [`compute_gdpo_advantages`] normalizes each reward function within
//! its group first:
//!
//! ```text
//! r'_i = sum_k w_k (v_ik - mean(group_k(i))) / (std(group_k(i)) + eps)
//! A_i  = (r'_i - mean(r')) / (std(r') + eps)          over the whole batch
//! ```

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::grpo_config::{AdvantageEstimator, GrpoConfig, ScaleRewards};
use crate::grpo_error::{GrpoError, Result};

/// Reward and advantage statistics that users watch (TRL's `reward`,
/// `reward_std`, `frac_reward_zero_std`, plus advantage stats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdvantageStats {
    /// Mean of the raw rewards (TRL `reward`).
    pub reward_mean: f64,
    /// Mean over completions of the standard deviation used to scale (TRL
    /// `reward_std`): the group std for `group`/`none`, the batch std for `batch`.
    pub reward_std: f64,
    pub reward_min: f64,
    pub reward_max: f64,
    /// Fraction of groups whose rewards all tie (zero std): they carry no
    /// learning signal (TRL `frac_reward_zero_std`, counted over groups).
    pub frac_reward_zero_std: f64,
    pub advantage_mean: f64,
    /// Unbiased standard deviation of the advantages.
    pub advantage_std: f64,
    pub advantage_min: f64,
    pub advantage_max: f64,
    pub num_groups: usize,
    pub group_size: usize,
}

/// Advantages, one per completion, in the order of the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    pub advantages: Vec<f64>,
    pub stats: AdvantageStats,
}

impl Advantages {
    /// The advantages as a `[B]` tensor.
    pub fn to_tensor(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        Ok(Tensor::new(self.advantages.as_slice(), device)?.to_dtype(dtype)?)
    }

    /// A `[B]` tensor of the advantages of rows `start..start + len` (one micro-batch).
    pub fn slice_tensor(
        &self,
        start: usize,
        len: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.advantages.len())
            .ok_or_else(|| {
                GrpoError::Invalid(format!(
                    "advantages: rows {start}..{start}+{len} out of range (have {})",
                    self.advantages.len()
                ))
            })?;
        Ok(Tensor::new(&self.advantages[start..end], device)?.to_dtype(dtype)?)
    }
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Unbiased standard deviation (`torch.std`, Bessel's correction); 0 for fewer
/// than two values.
pub fn unbiased_std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    let ss: f64 = x.iter().map(|v| (v - m) * (v - m)).sum();
    (ss / (x.len() - 1) as f64).sqrt()
}

fn min_max(x: &[f64]) -> (f64, f64) {
    x.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// GDPO advantages (see the module docs): `values[k]` are function `k`'s
/// values of the batch (laid out as `totals`), `weights[k]` its weight;
/// `totals` (the weighted sums the run logs) give the reward statistics.
pub fn compute_gdpo_advantages(
    totals: &[f64],
    values: &[Vec<f64>],
    weights: &[f64],
    group_size: usize,
    cfg: &GrpoConfig,
) -> Result<Advantages> {
    // The totals' checks and statistics; their advantages are replaced.
    let mut out = compute_advantages(totals, group_size, cfg)?;
    if values.len() != weights.len() || values.iter().any(|v| v.len() != totals.len()) {
        return Err(GrpoError::Invalid(format!(
            "advantages: {} reward functions with {} weights, for {} rewards",
            values.len(),
            weights.len(),
            totals.len()
        )));
    }
    let eps = cfg.scale_rewards_epsilon;
    let mut summed = vec![0.0; totals.len()];
    for (v, w) in values.iter().zip(weights) {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(GrpoError::Invalid(format!(
                "advantages: a reward function's value {i} is {} (rewards must be finite; \
                 multi_objective_aggregation: normalize_then_sum needs every function's value \
                 for every completion, and a python function's None is none)",
                v[i]
            )));
        }
        for (group, out) in v.chunks(group_size).zip(summed.chunks_mut(group_size)) {
            let (m, sd) = (mean(group), unbiased_std(group));
            let tied = min_max(group).0 == min_max(group).1;
            for (x, o) in group.iter().zip(out) {
                if !tied {
                    *o += w * (x - m) / (sd + eps);
                }
            }
        }
    }
    let (m, sd) = (mean(&summed), unbiased_std(&summed));
    let advantages: Vec<f64> = summed.iter().map(|r| (r - m) / (sd + eps)).collect();
    let (advantage_min, advantage_max) = min_max(&advantages);
    out.stats.advantage_mean = mean(&advantages);
    out.stats.advantage_std = unbiased_std(&advantages);
    out.stats.advantage_min = advantage_min;
    out.stats.advantage_max = advantage_max;
    out.advantages = advantages;
    Ok(out)
}

/// Advantages of `rewards`, laid out group after group (`rewards[g * G + j]` is
/// completion `j` of prompt `g`), with `cfg.adv_estimator`, `cfg.scale_rewards`
/// and `cfg.scale_rewards_epsilon`.
///
/// Errors: `group_size == 0`, a length that is not a multiple of it, an empty
/// batch, or a non-finite reward.
pub fn compute_advantages(
    rewards: &[f64],
    group_size: usize,
    cfg: &GrpoConfig,
) -> Result<Advantages> {
    if group_size == 0 {
        return Err(GrpoError::Invalid("advantages: group size is 0".into()));
    }
    if rewards.is_empty() || !rewards.len().is_multiple_of(group_size) {
        return Err(GrpoError::Invalid(format!(
            "advantages: {} rewards is not a positive multiple of the group size {group_size}",
            rewards.len()
        )));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(GrpoError::Invalid(format!(
            "advantages: reward {i} is {} (rewards must be finite)",
            rewards[i]
        )));
    }
    let g = group_size;
    let num_groups = rewards.len() / g;
    let batch_std = unbiased_std(rewards);
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut std_used_sum = 0.0;
    let mut tied_groups = 0usize;
    for group in rewards.chunks(g) {
        let (lo, hi) = min_max(group);
        let tied = lo == hi;
        tied_groups += usize::from(tied);
        let group_mean = mean(group);
        let group_sum: f64 = group.iter().sum();
        let std = match cfg.scale_rewards {
            ScaleRewards::Group | ScaleRewards::None | ScaleRewards::Mean => unbiased_std(group),
            ScaleRewards::Batch => batch_std,
        };
        std_used_sum += std * g as f64;
        for &r in group {
            if tied {
                advantages.push(0.0);
                continue;
            }
            let centred = match cfg.adv_estimator {
                AdvantageEstimator::Grpo => r - group_mean,
                // g >= 2 here: a single-element group always ties.
                AdvantageEstimator::Rloo => r - (group_sum - r) / (g - 1) as f64,
            };
            let a = match cfg.scale_rewards {
                ScaleRewards::None => centred,
                ScaleRewards::Group | ScaleRewards::Batch => {
                    centred / (std + cfg.scale_rewards_epsilon)
                }
                ScaleRewards::Mean => centred / (group_mean + cfg.scale_rewards_epsilon),
            };
            advantages.push(a);
        }
    }
    let (reward_min, reward_max) = min_max(rewards);
    let (advantage_min, advantage_max) = min_max(&advantages);
    let stats = AdvantageStats {
        reward_mean: mean(rewards),
        reward_std: std_used_sum / rewards.len() as f64,
        reward_min,
        reward_max,
        frac_reward_zero_std: tied_groups as f64 / num_groups as f64,
        advantage_mean: mean(&advantages),
        advantage_std: unbiased_std(&advantages),
        advantage_min,
        advantage_max,
        num_groups,
        group_size: g,
    };
    Ok(Advantages { advantages, stats })
}
