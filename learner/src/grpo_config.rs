//! Every knob of the GRPO numerics (advantages, policy loss, aggregation, KL,
//! entropy bonus) in one plain struct, with the names of TRL's `GRPOConfig`
//! where TRL has the knob, and verl's names otherwise. The recipe parser embeds
//! it as it is; [`GrpoConfig::default`] is the one place the defaults live.

use serde::{Deserialize, Serialize};

use crate::grpo_error::{GrpoError, Result};

/// How per-token losses are reduced to the scalar that is differentiated
/// (TRL `GRPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then mean over sequences (the GRPO paper).
    Grpo,
    /// Mean over all completion tokens of the rank's batch.
    Bnpo,
    /// Sum over tokens divided by `num_sequences x max_completion_length` (Dr. GRPO).
    DrGrpo,
    /// Mean over all completion tokens of the global batch: the token count is
    /// summed across gradient-accumulation micro-batches and across ranks (DAPO).
    Dapo,
    /// CISPO (MiniMax-M1, TRL's `cispo`): the policy-gradient term is
    /// `-sg(min(r, epsilon_high)) * A * log pi`, the importance weight itself
    /// clipped (note: at `epsilon_high`, not `1 + epsilon_high`; TRL and the
    /// ScaleRL paper suggest 5.0) so that no token loses its gradient;
    /// aggregated as `dapo`.
    Cispo,
    /// SAPO (TRL's `sapo`): a soft gate instead of the hard clip,
    /// `-sigmoid(tau (r - 1)) * 4 / tau * A`, with `tau` =
    /// `sapo_temperature_pos` where `A > 0` and `sapo_temperature_neg`
    /// elsewhere; aggregated as `grpo`.
    Sapo,
    /// LUSPO (TRL's `luspo`, length-unbiased sequence policy optimization):
    /// the clipped term of `grpo`, but each sequence's token losses are
    /// summed, not averaged, then averaged over sequences, so a sequence
    /// weighs by its length. Meant with `importance_sampling_level:
    /// sequence` (the paper's setup).
    Luspo,
    /// VESPO (TRL's `vespo`): `-sg(phi(w)) * A * log pi` per token, with `w`
    /// the sequence's importance weight (the product of its token ratios,
    /// times the rollout correction's token ratios when that is on) and
    /// `phi(w) = e^lambda w^k e^(-lambda w)` (1 at `w = 1`) a gamma-shaped
    /// weight that fades sequences far off-policy instead of clipping them;
    /// `k`, `lambda` are `vespo_k_pos`, `vespo_lambda_pos` where `A >= 0`
    /// and the `_neg` ones elsewhere; aggregated as `dapo`.
    Vespo,
}

impl LossType {
    /// The recipe's name for it.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Grpo => "grpo",
            LossType::Bnpo => "bnpo",
            LossType::DrGrpo => "dr_grpo",
            LossType::Dapo => "dapo",
            LossType::Cispo => "cispo",
            LossType::Sapo => "sapo",
            LossType::Luspo => "luspo",
            LossType::Vespo => "vespo",
        }
    }

    /// Whether the loss brings its own policy-gradient term in place of
    /// `policy_loss`'s.
    pub fn has_own_policy_term(self) -> bool {
        matches!(self, LossType::Cispo | LossType::Sapo | LossType::Vespo)
    }
}

/// The policy-gradient term (names of Stanford CS336's GRPO assignment, which
/// the issue uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLoss {
    /// `-reward * log pi` (REINFORCE on the raw reward, no baseline).
    NoBaseline,
    /// `-advantage * log pi` (REINFORCE with the group baseline).
    ReinforceWithBaseline,
    /// PPO-style clipped surrogate `-min(r A, clip(r, 1-eps, 1+eps_high) A)`.
    GrpoClip,
}

/// TRL `GRPOConfig.importance_sampling_level`: one ratio per token (GRPO) or
/// one per sequence, the geometric mean of its token ratios (GSPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    Token,
    /// Also TRL's experimental `sequence_token` (GSPO-token,
    /// `sg[w_seq] pi / sg[pi]` per token): with one advantage per sequence,
    /// as here, its value and gradient are GSPO's (the GSPO paper, eq. 18).
    #[serde(alias = "sequence_token")]
    Sequence,
}

/// TRL `GRPOConfig.scale_rewards`: what the centred rewards are divided by.
/// As in TRL, `true` also means `group` and `false` means `none` (older TRL
/// recipes write the boolean).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// The group's (unbiased) standard deviation.
    Group,
    /// The whole batch's (unbiased) standard deviation.
    Batch,
    /// Nothing (Dr. GRPO).
    None,
    /// The group's mean (TRL's experimental `mean`, MaxRL's
    /// `(r - mean) / (mean + eps)`: for 0/1 rewards, the success rate).
    Mean,
}

impl<'de> Deserialize<'de> for ScaleRewards {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ScaleRewards;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "\"group\", \"batch\", \"none\", \"mean\", true (group) or false (none)",
                )
            }
            fn visit_bool<E: serde::de::Error>(
                self,
                v: bool,
            ) -> std::result::Result<Self::Value, E> {
                Ok(if v {
                    ScaleRewards::Group
                } else {
                    ScaleRewards::None
                })
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                match v {
                    "group" => Ok(ScaleRewards::Group),
                    "batch" => Ok(ScaleRewards::Batch),
                    "none" => Ok(ScaleRewards::None),
                    "mean" => Ok(ScaleRewards::Mean),
                    other => Err(E::unknown_variant(
                        other,
                        &["group", "batch", "none", "mean"],
                    )),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// TRL `GRPOConfig.multi_objective_aggregation`: how several reward
/// functions become one advantage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiObjectiveAggregation {
    /// The weighted sum of the functions, then the group baseline and
    /// `scale_rewards` (GRPO).
    SumThenNormalize,
    /// GDPO: each function normalized within its group (mean off, divided by
    /// its std + epsilon), the weighted sum of those, then normalized over
    /// the whole batch.
    NormalizeThenSum,
}

/// The baseline subtracted from each reward (verl `adv_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// Group mean (GRPO).
    Grpo,
    /// Mean of the other `G-1` rewards of the group (RLOO, leave-one-out).
    Rloo,
}

/// Estimator of KL(pi_theta || pi_ref) per token (verl `kl_loss_type`,
/// J. Schulman, "Approximating KL divergence", 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log pi - log pi_ref`.
    K1,
    /// `0.5 (log pi - log pi_ref)^2`.
    K2,
    /// `exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1` (TRL's, the default).
    K3,
}

/// TRL `GRPOConfig.vllm_importance_sampling_mode`: how the ratio between the
/// learner's (old) log-probs and the rollout server's log-probs is capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VllmImportanceSamplingMode {
    /// Per-token ratio, clamped to at most the cap (TIS).
    TokenTruncate,
    /// Per-token ratio, set to 0 where it exceeds the cap (MIS).
    TokenMask,
    /// Per-sequence ratio (product over tokens), clamped to the cap.
    SequenceTruncate,
    /// Per-sequence ratio, set to 0 where it exceeds the cap.
    SequenceMask,
}

impl VllmImportanceSamplingMode {
    pub fn is_sequence_level(self) -> bool {
        matches!(self, Self::SequenceTruncate | Self::SequenceMask)
    }
}

/// How `beta` evolves: fixed, or the adaptive controller of Ziegler et al.
/// 2019 (verl `algorithm.kl_ctrl.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlCtrlType {
    Fixed,
    Adaptive,
}

/// The GRPO numerics configuration. Field names follow TRL's `GRPOConfig`
/// (`loss_type`, `scale_rewards`, `epsilon`, `epsilon_high`, `delta`, `beta`,
/// `importance_sampling_level`, `vllm_importance_sampling_*`,
/// `top_entropy_quantile`), verl
/// (`adv_estimator`, `entropy_coef`, `kl_ctrl_type`, `target_kl`,
/// `kl_horizon`) or CS336 (`policy_loss`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Aggregation of per-token losses.
    pub loss_type: LossType,
    /// Policy-gradient term (`grpo_clip` is the one `loss_type` `cispo`,
    /// `sapo` and `vespo` replace with their own).
    pub policy_loss: PolicyLoss,
    /// Baseline of the advantage.
    pub adv_estimator: AdvantageEstimator,
    /// Divisor of the centred rewards.
    pub scale_rewards: ScaleRewards,
    /// Several reward functions: summed then normalized, or each normalized
    /// then summed (GDPO).
    pub multi_objective_aggregation: MultiObjectiveAggregation,
    /// Added to the standard deviation before dividing (TRL hard-codes 1e-4).
    pub scale_rewards_epsilon: f64,
    /// Lower clip: the ratio is clipped to `[1 - epsilon, 1 + epsilon_high]`.
    pub epsilon: f64,
    /// Upper clip ("clip-higher", DAPO); `None` means `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping (TRL `delta`): the unclipped ratio is capped at `delta`.
    pub delta: Option<f64>,
    /// Token (GRPO) or sequence (GSPO) importance ratio.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// The log-ratio is clamped to `[-max_log_ratio, max_log_ratio]` before
    /// `exp` so that the ratio never overflows (verl clamps at 20).
    pub max_log_ratio: f64,
    /// KL coefficient (the initial one when the controller is adaptive).
    pub beta: f64,
    /// KL estimator.
    pub kl_estimator: KlEstimator,
    /// Fixed or adaptive `beta`.
    pub kl_ctrl_type: KlCtrlType,
    /// Adaptive controller: the KL it steers towards.
    pub target_kl: f64,
    /// Adaptive controller: horizon (in samples) of the multiplicative update.
    pub kl_horizon: f64,
    /// Entropy bonus: `entropy_coef * entropy` is subtracted from the loss.
    pub entropy_coef: f64,
    /// Correct for the mismatch between the rollout server's log-probs and the
    /// learner's (TRL `vllm_importance_sampling_correction`).
    pub vllm_importance_sampling_correction: bool,
    /// Token or sequence, truncate or mask.
    pub vllm_importance_sampling_mode: VllmImportanceSamplingMode,
    /// Cap `C` of the correction ratio.
    pub vllm_importance_sampling_cap: f64,
    /// TRL `top_entropy_quantile` ("Beyond the 80/20 rule", Wang et al.
    /// 2025): only the tokens whose entropy is in this top fraction carry the
    /// policy-gradient term; 1.0 keeps every token.
    pub top_entropy_quantile: f64,
    /// TRL's `use_bias_correction_kl`: the per-token KL estimate is
    /// multiplied by the importance ratio (the policy's over the old one), so
    /// that it estimates the KL of the current policy from samples of the old
    /// one.
    pub use_bias_correction_kl: bool,
    /// `loss_type: sapo`: the gate's temperature where the advantage is > 0.
    pub sapo_temperature_pos: f64,
    /// `loss_type: sapo`: the gate's temperature where the advantage is <= 0.
    pub sapo_temperature_neg: f64,
    /// TRL's `off_policy_mask_threshold` (DeepSeek-V3.2's off-policy
    /// sequence masking): a sequence with a negative advantage whose mean
    /// per-token `log pi_rollout - log pi` is above this carries no policy
    /// gradient; `None` masks nothing.
    pub off_policy_mask_threshold: Option<f64>,
    /// `loss_type: vespo`: the gamma weight's shape `k` where `A >= 0`.
    pub vespo_k_pos: f64,
    /// `loss_type: vespo`: the gamma weight's rate `lambda` where `A >= 0`.
    pub vespo_lambda_pos: f64,
    /// `loss_type: vespo`: the shape `k` where `A < 0`.
    pub vespo_k_neg: f64,
    /// `loss_type: vespo`: the rate `lambda` where `A < 0`.
    pub vespo_lambda_neg: f64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            loss_type: LossType::Dapo,
            policy_loss: PolicyLoss::GrpoClip,
            adv_estimator: AdvantageEstimator::Grpo,
            scale_rewards: ScaleRewards::Group,
            multi_objective_aggregation: MultiObjectiveAggregation::SumThenNormalize,
            scale_rewards_epsilon: 1e-4,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            max_log_ratio: 20.0,
            beta: 0.0,
            kl_estimator: KlEstimator::K3,
            kl_ctrl_type: KlCtrlType::Fixed,
            target_kl: 0.1,
            kl_horizon: 10000.0,
            entropy_coef: 0.0,
            vllm_importance_sampling_correction: true,
            vllm_importance_sampling_mode: VllmImportanceSamplingMode::SequenceMask,
            vllm_importance_sampling_cap: 3.0,
            top_entropy_quantile: 1.0,
            use_bias_correction_kl: false,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            off_policy_mask_threshold: None,
            vespo_k_pos: 2.0,
            vespo_lambda_pos: 3.0,
            vespo_k_neg: 3.0,
            vespo_lambda_neg: 2.0,
        }
    }
}

impl GrpoConfig {
    /// The upper clip width: `epsilon_high`, or `epsilon` when unset.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// Settings that train, but not as the method's authors meant (TRL
    /// warns on the same ones), each as a sentence for the run's log.
    pub fn advisories(&self) -> Vec<String> {
        let mut out = Vec::new();
        match (self.loss_type, self.importance_sampling_level) {
            (LossType::Luspo, ImportanceSamplingLevel::Token) => out.push(
                "loss_type luspo is meant with importance_sampling_level: sequence (the LUSPO \
                 paper's setup); with token, each token keeps its own ratio"
                    .to_string(),
            ),
            (LossType::Vespo, ImportanceSamplingLevel::Sequence) => out.push(
                "loss_type vespo computes its own sequence weight from the token ratios; \
                 importance_sampling_level: sequence only changes the ratio metrics (and a \
                 bias-corrected KL), set it to token"
                    .to_string(),
            ),
            _ => {}
        }
        out
    }

    /// Rejects values that make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(GrpoError::Config {
                field: field.to_string(),
                message,
            })
        };
        let finite_nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if !finite_nonneg(self.epsilon) || self.epsilon >= 1.0 {
            return bad(
                "epsilon",
                format!("must be in [0, 1), got {}", self.epsilon),
            );
        }
        if let Some(e) = self.epsilon_high
            && !finite_nonneg(e)
        {
            return bad("epsilon_high", format!("must be >= 0, got {e}"));
        }
        if let Some(d) = self.delta
            && !(d.is_finite() && d > 1.0 + self.epsilon_high())
        {
            return bad(
                "delta",
                format!(
                    "must be > 1 + epsilon_high ({}), got {d}",
                    1.0 + self.epsilon_high()
                ),
            );
        }
        for (field, tau) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !(tau.is_finite() && tau > 0.0) {
                return bad(field, format!("must be > 0, got {tau}"));
            }
        }
        if self.multi_objective_aggregation == MultiObjectiveAggregation::NormalizeThenSum {
            if self.adv_estimator != AdvantageEstimator::Grpo {
                return bad(
                    "multi_objective_aggregation",
                    "normalize_then_sum (GDPO) normalizes by group means; adv_estimator must be \
                     grpo"
                        .into(),
                );
            }
            if self.scale_rewards != ScaleRewards::Group {
                return bad(
                    "multi_objective_aggregation",
                    "normalize_then_sum (GDPO) scales each function by its group's std and the \
                     sum by the batch's, as TRL does: scale_rewards does not apply, leave it at \
                     group"
                        .into(),
                );
            }
        }
        if let Some(t) = self.off_policy_mask_threshold
            && !t.is_finite()
        {
            return bad(
                "off_policy_mask_threshold",
                format!("must be a number, got {t}"),
            );
        }
        for (field, k) in [
            ("vespo_k_pos", self.vespo_k_pos),
            ("vespo_k_neg", self.vespo_k_neg),
        ] {
            if !finite_nonneg(k) {
                return bad(field, format!("must be >= 0, got {k}"));
            }
        }
        for (field, lambda) in [
            ("vespo_lambda_pos", self.vespo_lambda_pos),
            ("vespo_lambda_neg", self.vespo_lambda_neg),
        ] {
            if !(lambda.is_finite() && lambda > 0.0) {
                return bad(field, format!("must be > 0, got {lambda}"));
            }
        }
        if self.loss_type.has_own_policy_term() && self.policy_loss != PolicyLoss::GrpoClip {
            return bad(
                "policy_loss",
                format!(
                    "loss_type {} brings its own policy-gradient term; policy_loss must be \
                     grpo_clip (the default)",
                    self.loss_type.name()
                ),
            );
        }
        // VESPO folds the rollout correction into its sequence weight token
        // by token (TRL refuses the sequence modes the same way).
        if self.loss_type == LossType::Vespo
            && self.vllm_importance_sampling_correction
            && self.vllm_importance_sampling_mode.is_sequence_level()
        {
            return bad(
                "vllm_importance_sampling_mode",
                "loss_type vespo multiplies the rollout correction's per-token ratios into \
                 its sequence weight, so the mode must be token_truncate or token_mask (or \
                 set vllm_importance_sampling_correction: false)"
                    .into(),
            );
        }
        if !(self.max_log_ratio.is_finite() && self.max_log_ratio > 0.0) {
            return bad(
                "max_log_ratio",
                format!("must be > 0, got {}", self.max_log_ratio),
            );
        }
        if !finite_nonneg(self.scale_rewards_epsilon) {
            return bad(
                "scale_rewards_epsilon",
                format!("must be >= 0, got {}", self.scale_rewards_epsilon),
            );
        }
        if !finite_nonneg(self.beta) {
            return bad("beta", format!("must be >= 0, got {}", self.beta));
        }
        if !self.entropy_coef.is_finite() {
            return bad(
                "entropy_coef",
                format!("must be finite, got {}", self.entropy_coef),
            );
        }
        if self.kl_ctrl_type == KlCtrlType::Adaptive {
            if !(self.target_kl.is_finite() && self.target_kl > 0.0) {
                return bad("target_kl", format!("must be > 0, got {}", self.target_kl));
            }
            if !(self.kl_horizon.is_finite() && self.kl_horizon > 0.0) {
                return bad(
                    "kl_horizon",
                    format!("must be > 0, got {}", self.kl_horizon),
                );
            }
            if self.beta == 0.0 {
                return bad(
                    "beta",
                    "the adaptive KL controller multiplies beta, so it must start > 0".into(),
                );
            }
        }
        if !(self.vllm_importance_sampling_cap.is_finite()
            && self.vllm_importance_sampling_cap > 0.0)
        {
            return bad(
                "vllm_importance_sampling_cap",
                format!("must be > 0, got {}", self.vllm_importance_sampling_cap),
            );
        }
        if !(self.top_entropy_quantile > 0.0 && self.top_entropy_quantile <= 1.0) {
            return bad(
                "top_entropy_quantile",
                format!(
                    "must be in (0, 1] (1.0: every token), got {}",
                    self.top_entropy_quantile
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_validates() {
        let cfg = GrpoConfig::default();
        cfg.validate().unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        let back: GrpoConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        // An empty object is the default: every field has one.
        let empty: GrpoConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, cfg);
        assert_eq!(cfg.epsilon_high(), cfg.epsilon);
    }

    #[test]
    fn trl_names_parse_and_unknown_fields_are_rejected() {
        let cfg: GrpoConfig = serde_json::from_str(
            r#"{"loss_type": "dr_grpo", "scale_rewards": "batch", "importance_sampling_level": "sequence",
                "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0, "kl_estimator": "k1",
                "vllm_importance_sampling_mode": "token_truncate", "policy_loss": "reinforce_with_baseline",
                "adv_estimator": "rloo", "kl_ctrl_type": "fixed"}"#,
        )
        .unwrap();
        assert_eq!(cfg.loss_type, LossType::DrGrpo);
        assert_eq!(
            cfg.importance_sampling_level,
            ImportanceSamplingLevel::Sequence
        );
        let gspo_token: GrpoConfig =
            serde_json::from_str(r#"{"importance_sampling_level": "sequence_token"}"#).unwrap();
        assert_eq!(
            gspo_token.importance_sampling_level,
            ImportanceSamplingLevel::Sequence
        );
        assert_eq!(cfg.epsilon_high(), 4e-4);
        let err = serde_json::from_str::<GrpoConfig>(r#"{"epsilon_hi": 0.3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("epsilon_hi"), "{err}");
        assert!(serde_json::from_str::<GrpoConfig>(r#"{"loss_type": "ppo"}"#).is_err());
        // TRL's boolean scale_rewards.
        for (json, want) in [
            (r#"{"scale_rewards": true}"#, ScaleRewards::Group),
            (r#"{"scale_rewards": false}"#, ScaleRewards::None),
            (r#"{"scale_rewards": "batch"}"#, ScaleRewards::Batch),
            (r#"{"scale_rewards": "mean"}"#, ScaleRewards::Mean),
        ] {
            assert_eq!(
                serde_json::from_str::<GrpoConfig>(json)
                    .unwrap()
                    .scale_rewards,
                want
            );
        }
        let err = serde_json::from_str::<GrpoConfig>(r#"{"scale_rewards": "std"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("std") && err.contains("group"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |cfg: GrpoConfig, field: &str| {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        bad(
            GrpoConfig {
                epsilon: 1.5,
                ..Default::default()
            },
            "epsilon",
        );
        bad(
            GrpoConfig {
                epsilon_high: Some(-0.1),
                ..Default::default()
            },
            "epsilon_high",
        );
        for q in [0.0, 1.5, f64::NAN] {
            bad(
                GrpoConfig {
                    top_entropy_quantile: q,
                    ..Default::default()
                },
                "top_entropy_quantile",
            );
        }
        bad(
            GrpoConfig {
                delta: Some(1.1),
                ..Default::default()
            },
            "delta",
        );
        bad(
            GrpoConfig {
                beta: -1.0,
                ..Default::default()
            },
            "beta",
        );
        bad(
            GrpoConfig {
                max_log_ratio: 0.0,
                ..Default::default()
            },
            "max_log_ratio",
        );
        bad(
            GrpoConfig {
                vllm_importance_sampling_cap: f64::NAN,
                ..Default::default()
            },
            "vllm_importance_sampling_cap",
        );
        let adaptive = GrpoConfig {
            kl_ctrl_type: KlCtrlType::Adaptive,
            beta: 0.1,
            ..Default::default()
        };
        adaptive.validate().unwrap();
        bad(
            GrpoConfig {
                beta: 0.0,
                ..adaptive.clone()
            },
            "beta",
        );
        bad(
            GrpoConfig {
                target_kl: 0.0,
                ..adaptive.clone()
            },
            "target_kl",
        );
        bad(
            GrpoConfig {
                kl_horizon: -1.0,
                ..adaptive
            },
            "kl_horizon",
        );
        bad(
            GrpoConfig {
                vespo_lambda_neg: 0.0,
                ..Default::default()
            },
            "vespo_lambda_neg",
        );
        bad(
            GrpoConfig {
                vespo_k_pos: -1.0,
                ..Default::default()
            },
            "vespo_k_pos",
        );
    }

    /// TRL's rules for its two newest loss types: VESPO refuses a
    /// sequence-level rollout correction (the default mode) and another
    /// policy term; LUSPO at token level and VESPO at sequence level train
    /// but are said.
    #[test]
    fn luspo_and_vespo_rules() {
        let vespo = GrpoConfig {
            loss_type: LossType::Vespo,
            ..Default::default()
        };
        let err = vespo.validate().unwrap_err().to_string();
        assert!(
            err.contains("vllm_importance_sampling_mode") && err.contains("token_truncate"),
            "{err}"
        );
        let vespo = GrpoConfig {
            vllm_importance_sampling_mode: VllmImportanceSamplingMode::TokenMask,
            ..vespo
        };
        vespo.validate().unwrap();
        GrpoConfig {
            vllm_importance_sampling_correction: false,
            vllm_importance_sampling_mode: VllmImportanceSamplingMode::SequenceMask,
            ..vespo.clone()
        }
        .validate()
        .unwrap();
        let err = GrpoConfig {
            policy_loss: PolicyLoss::ReinforceWithBaseline,
            ..vespo.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("policy_loss") && err.contains("vespo"),
            "{err}"
        );
        assert!(vespo.advisories().is_empty());
        let seq = GrpoConfig {
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..vespo
        };
        assert!(seq.advisories()[0].contains("set it to token"));

        let luspo: GrpoConfig = serde_json::from_str(r#"{"loss_type": "luspo"}"#).unwrap();
        luspo.validate().unwrap();
        assert!(luspo.advisories()[0].contains("importance_sampling_level: sequence"));
        let luspo = GrpoConfig {
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..luspo
        };
        assert!(luspo.advisories().is_empty());
        for lt in [LossType::Luspo, LossType::Vespo, LossType::DrGrpo] {
            let json = serde_json::to_value(lt).unwrap();
            assert_eq!(json, lt.name());
        }
    }
}
