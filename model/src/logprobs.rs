//! Log-probabilities of given tokens and entropies from logits, numerically
//! stable and differentiable. The sampling temperature divides the logits
//! first, as TRL does, so that the learner scores tokens under the same
//! distribution the rollout server sampled them from.

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};

/// Per-token log-probs `[B, K]` and, when asked, entropies `[B, K]`.
#[derive(Debug, Clone)]
pub struct TokenLogProbs {
    pub logprobs: Tensor,
    pub entropy: Option<Tensor>,
}

fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(ModelError::Invalid(format!(
            "temperature for log-probs must be positive and finite, got {temperature}"
        )));
    }
    Ok(())
}

/// bf16/f16 logits are reduced in f32; f32 and f64 stay as they are.
pub fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F32 | DType::F64 => t.clone(),
        _ => t.to_dtype(DType::F32)?,
    })
}

/// `log_softmax(logits / temperature)` over the last dimension, in f32 (f64
/// for f64 logits).
pub fn log_softmax(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    check_temperature(temperature)?;
    let scaled = upcast(logits)?.affine(1.0 / temperature, 0.0)?;
    // The max only shifts for stability: it carries no gradient (and none
    // of the logits' size is made for it).
    let max = scaled.max_keepdim(D::Minus1)?.detach();
    let shifted = if scaled.track_op() {
        crate::autograd::apply(&scaled, crate::autograd::ConstOperand::add(&max.neg()?))?
    } else {
        scaled.broadcast_sub(&max)?
    };
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum_exp)?)
}

/// Log-prob of each target token: `logits` `[.., V]`, `targets` `[..]` (u32)
/// -> `[..]` f32.
pub fn selective_log_softmax(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let logp = log_softmax(logits, temperature)?;
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?;
    Ok(logp
        .gather(&targets.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Entropy of `softmax(logits / temperature)` over the last dimension, `[..]` f32.
pub fn entropy(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    let logp = log_softmax(logits, temperature)?;
    Ok((logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn lse(row: &[f64]) -> f64 {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn matches_hand_computed_values_with_temperature() -> Result<()> {
        let rows = [[1.0f64, 2.0, 3.0, -1.0], [1000.0, 1001.0, 999.0, 1000.5]];
        let temperature = 0.7;
        let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
        let logits = Tensor::from_vec(flat, (2, 4), &Device::Cpu)?;
        let targets = Tensor::new(&[2u32, 0], &Device::Cpu)?;
        let got: Vec<f32> = selective_log_softmax(&logits, &targets, temperature)?.to_vec1()?;
        let ent: Vec<f32> = entropy(&logits, temperature)?.to_vec1()?;
        for (r, row) in rows.iter().enumerate() {
            let scaled: Vec<f64> = row.iter().map(|x| x / temperature).collect();
            let z = lse(&scaled);
            // f32 resolves logits of ~1400 (1000 / 0.7) to ~1e-4 only: the
            // row is there to show there is no overflow, not more digits.
            let tol = 1e-6 * (1.0 + scaled.iter().fold(0.0f64, |m, s| m.max(s.abs())));
            let want = scaled[[2, 0][r]] - z;
            assert!((got[r] as f64 - want).abs() < tol, "{} vs {want}", got[r]);
            let h: f64 = -scaled.iter().map(|s| (s - z).exp() * (s - z)).sum::<f64>();
            assert!((ent[r] as f64 - h).abs() < tol, "{} vs {h}", ent[r]);
        }
        Ok(())
    }

    #[test]
    fn rejects_non_positive_temperature() {
        let logits = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(log_softmax(&logits, 0.0).is_err());
    }
}
