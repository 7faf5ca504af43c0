//! KL to the reference model: per-token estimators and the `beta` controller.
//!
//! Estimators (J. Schulman, "Approximating KL divergence", 2020; verl
//! `core_algos.kl_penalty`), with `d = log pi_ref - log pi`:
//!
//! ```text
//! k1 = -d = log pi - log pi_ref
//! k2 = 0.5 d^2
//! k3 = exp(d) - d - 1        (TRL's GRPO term; verl "low_var_kl")
//! ```
//!
//! As verl does for k3, `d` is clamped to `[-max_log_ratio, max_log_ratio]`
//! before `exp` and the estimate to `[-10, 10]` after, so that a reference
//! model far from the policy gives a large but finite penalty, never inf/NaN.
//!
//! The adaptive controller is Ziegler et al. 2019 (verl
//! `AdaptiveKLController`, TRL's old PPO trainer):
//!
//! ```text
//! e    = clip(current_kl / target_kl - 1, -0.2, 0.2)
//! beta = beta * (1 + e * n_steps / horizon)
//! ```

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::grpo_config::{GrpoConfig, KlCtrlType, KlEstimator};
use crate::grpo_error::{GrpoError, Result};

/// verl clamps the k3 estimate to `[-K3_CLAMP, K3_CLAMP]`.
pub const K3_CLAMP: f64 = 10.0;

/// Per-token KL estimate of `KL(pi || pi_ref)` from the two log-probs
/// (same shape, e.g. `[B, K]`). Differentiable w.r.t. `logprobs`.
pub fn kl_estimate(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    estimator: KlEstimator,
    max_log_ratio: f64,
) -> Result<Tensor> {
    let d = (ref_logprobs - logprobs)?;
    Ok(match estimator {
        KlEstimator::K1 => d.neg()?,
        KlEstimator::K2 => (d.sqr()? * 0.5)?,
        KlEstimator::K3 => {
            let d = d.clamp(-max_log_ratio, max_log_ratio)?;
            let kld = ((d.exp()? - &d)? - 1.0)?;
            kld.clamp(-K3_CLAMP, K3_CLAMP)?
        }
    })
}

/// The KL coefficient `beta` over training: fixed, or adapted towards a
/// target KL. The whole struct is its state: serialize it into a checkpoint
/// and deserialize it to resume. (The learner builds serde_json with
/// `float_roundtrip`, so `value` comes back bit-identical.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlController {
    pub kind: KlCtrlType,
    /// The current `beta`.
    pub value: f64,
    pub target_kl: f64,
    pub horizon: f64,
    /// Number of updates applied so far.
    pub num_updates: u64,
}

impl KlController {
    /// A controller starting at `cfg.beta`.
    pub fn from_config(cfg: &GrpoConfig) -> Self {
        KlController {
            kind: cfg.kl_ctrl_type,
            value: cfg.beta,
            target_kl: cfg.target_kl,
            horizon: cfg.kl_horizon,
            num_updates: 0,
        }
    }

    /// The `beta` to use for the next step.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Updates `beta` from the KL measured over the last step and the number
    /// of samples (`n_steps`, verl passes the batch size) it was measured on.
    /// A no-op for a fixed controller. A non-finite KL is an error and leaves
    /// the state untouched.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) -> Result<()> {
        if !current_kl.is_finite() {
            return Err(GrpoError::Invalid(format!(
                "KL controller: the measured KL is {current_kl}"
            )));
        }
        if self.kind == KlCtrlType::Adaptive {
            if !(self.target_kl > 0.0 && self.horizon > 0.0) {
                return Err(GrpoError::Invalid(format!(
                    "KL controller: target_kl ({}) and horizon ({}) must be > 0",
                    self.target_kl, self.horizon
                )));
            }
            let error = (current_kl / self.target_kl - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + error * n_steps as f64 / self.horizon;
        }
        self.num_updates += 1;
        Ok(())
    }

    /// The state as JSON (for checkpoints).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| GrpoError::Invalid(format!("KL controller: cannot serialize: {e}")))
    }

    /// Restores a state written by [`KlController::to_json`].
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| GrpoError::Invalid(format!("KL controller: invalid saved state: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fixed_controller_never_moves_and_bad_kl_is_rejected() {
        let cfg = GrpoConfig {
            beta: 0.04,
            ..GrpoConfig::default()
        };
        let mut c = KlController::from_config(&cfg);
        c.update(10.0, 1000).unwrap();
        assert_eq!(c.value(), 0.04);
        assert!(c.update(f64::NAN, 1).is_err());
        assert_eq!(c.num_updates, 1);
    }

    #[test]
    fn adaptive_controller_moves_towards_the_target_and_saturates() {
        let cfg = GrpoConfig {
            beta: 0.1,
            kl_ctrl_type: KlCtrlType::Adaptive,
            target_kl: 0.01,
            kl_horizon: 100.0,
            ..GrpoConfig::default()
        };
        let mut c = KlController::from_config(&cfg);
        c.update(1.0, 10).unwrap(); // far above target: error clipped to +0.2
        assert!((c.value() - 0.1 * 1.02).abs() < 1e-15);
        let mut d = KlController::from_config(&cfg);
        d.update(0.0, 10).unwrap(); // below: clipped to -0.2
        assert!((d.value() - 0.1 * 0.98).abs() < 1e-15);
        let restored = KlController::from_json(&c.to_json().unwrap()).unwrap();
        assert_eq!(restored, c);
        assert!(KlController::from_json(r#"{"kind":"adaptive"}"#).is_err());
    }

    #[test]
    fn k3_is_zero_at_equal_logprobs_and_nonnegative() {
        let a = Tensor::new(&[-1.0f64, -2.0, -0.1], &Device::Cpu).unwrap();
        let b = Tensor::new(&[-1.0f64, -1.0, -3.0], &Device::Cpu).unwrap();
        let k = kl_estimate(&a, &b, KlEstimator::K3, 20.0)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(k[0], 0.0);
        assert!(k.iter().all(|x| *x >= 0.0));
    }
}
