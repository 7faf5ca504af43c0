//! Gradient accumulation over micro-batches.
//!
//! Each micro-batch's loss is divided by the *global* normalisers
//! ([`Normalizers`]), so the sum of the micro-batch gradients is the gradient
//! of the whole batch's loss for every aggregation (`grpo`, `bnpo`,
//! `dr_grpo`, `dapo`). Across ranks the accumulated gradients must then be
//! all-reduced with a sum.

use candle_core::{Tensor, Var, backprop::GradStore};
use model::decoder::CheckpointedLogProbs;

use crate::grpo_config::GrpoConfig;
use crate::grpo_error::{GrpoError, Result};
use crate::loss::{LossInputs, Normalizers, grpo_loss};
use crate::metrics::LossMetrics;

/// Sums the gradients of a fixed set of variables over several `backward()`
/// calls, keeping only those (not the gradients of every intermediate tensor).
pub struct GradAccumulator {
    vars: Vec<Var>,
    grads: GradStore,
    num_backward: usize,
}

impl GradAccumulator {
    pub fn new(vars: &[Var]) -> Self {
        GradAccumulator {
            vars: vars.to_vec(),
            grads: GradStore::default(),
            num_backward: 0,
        }
    }

    /// Back-propagates `loss` (a scalar) and adds the gradients of the
    /// variables to the running sums.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        self.add(loss.backward()?)
    }

    /// Back-propagates `loss`, computed on the leaf log-probs (and entropies)
    /// of `checkpointed`, through the recomputed logits into the model.
    pub fn backward_checkpointed(
        &mut self,
        loss: &Tensor,
        checkpointed: CheckpointedLogProbs<'_>,
    ) -> Result<()> {
        let leaf = loss.backward()?;
        let d_logprobs = leaf.get(checkpointed.logprobs()).cloned();
        let d_entropy = checkpointed.entropy().and_then(|e| leaf.get(e)).cloned();
        drop(leaf);
        self.add(checkpointed.backward(d_logprobs.as_ref(), d_entropy.as_ref())?)
    }

    fn add(&mut self, mut grads: GradStore) -> Result<()> {
        for var in &self.vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let sum = match self.grads.remove(var.as_tensor()) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                self.grads.insert(var.as_tensor(), sum.detach());
            }
        }
        self.num_backward += 1;
        Ok(())
    }

    /// The accumulated gradient of `var`, if any micro-batch reached it.
    pub fn grad(&self, var: &Var) -> Option<&Tensor> {
        self.grads.get(var.as_tensor())
    }

    /// Number of `backward` calls so far.
    pub fn num_backward(&self) -> usize {
        self.num_backward
    }

    /// The summed gradients, for an optimizer's `step(&grads)`.
    pub fn into_grads(self) -> GradStore {
        self.grads
    }
}

/// A micro-batch's loss inputs, as built by running the model.
pub struct MicroBatchForward<'a> {
    pub inputs: LossInputs,
    /// Set when `inputs.logprobs` (and `inputs.entropy`) are the leaf
    /// variables of checkpointed logits
    /// ([`model::CausalLM::checkpointed_logprobs`]) rather than tensors in
    /// the model's autograd graph.
    pub checkpointed: Option<CheckpointedLogProbs<'a>>,
}

impl From<LossInputs> for MicroBatchForward<'_> {
    fn from(inputs: LossInputs) -> Self {
        MicroBatchForward {
            inputs,
            checkpointed: None,
        }
    }
}

/// One accumulation step: for each of `num_micro_batches`, `forward(i)` builds
/// the micro-batch's inputs (running the model), its loss is divided by the
/// global normalisers `norm` and back-propagated, and the gradients of `vars`
/// are summed. Returns the summed gradients and the merged metrics (whose
/// loss parts are then the whole batch's).
pub fn accumulate_gradients<'a, F>(
    cfg: &GrpoConfig,
    beta: f64,
    norm: &Normalizers,
    vars: &[Var],
    num_micro_batches: usize,
    mut forward: F,
) -> Result<(GradStore, LossMetrics)>
where
    F: FnMut(usize) -> Result<MicroBatchForward<'a>>,
{
    if num_micro_batches == 0 {
        return Err(GrpoError::Invalid(
            "accumulate_gradients: zero micro-batches".into(),
        ));
    }
    let mut acc = GradAccumulator::new(vars);
    let mut metrics = LossMetrics::default();
    for i in 0..num_micro_batches {
        let MicroBatchForward {
            inputs,
            checkpointed,
        } = forward(i)?;
        let out = grpo_loss(cfg, &inputs, norm, beta)?;
        drop(inputs);
        match checkpointed {
            Some(ck) => acc.backward_checkpointed(&out.loss, ck)?,
            None => acc.backward(&out.loss)?,
        }
        metrics.merge(&out.metrics);
    }
    Ok((acc.into_grads(), metrics))
}
