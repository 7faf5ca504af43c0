//! Per-step loss metrics. [`LossMetrics`] holds sums and counts, so that the
//! metrics of gradient-accumulation micro-batches (and of ranks) merge
//! exactly; [`LossMetrics::summary`] turns them into the means users log
//! (TRL's `kl`, `entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`,
//! `clip_ratio/region_mean`, `sampling/importance_sampling_ratio/*`, ...).

use serde::{Deserialize, Serialize};

/// Additive statistics of one or more micro-batches.
///
/// The loss parts are the micro-batch's contributions already divided by the
/// global normalisers, so summing them over the micro-batches of a step (and
/// over ranks) gives the loss of the whole batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossMetrics {
    /// `pg_loss + kl_loss + entropy_loss`.
    pub loss: f64,
    /// Policy-gradient part (after the rollout importance-sampling correction).
    pub pg_loss: f64,
    /// `beta * KL` part.
    pub kl_loss: f64,
    /// `-entropy_coef * entropy` part.
    pub entropy_loss: f64,
    /// Completion tokens (sum of the response mask).
    pub num_tokens: f64,
    /// Sequences (rows), empty ones included.
    pub num_sequences: f64,
    /// Sum over completion tokens of the per-token KL estimate to the
    /// reference (0 when there is no reference).
    pub kl_sum: f64,
    /// Whether `kl_sum` was measured (a reference was given).
    pub has_kl: bool,
    /// Sum over completion tokens of the entropy (0 when none was given).
    pub entropy_sum: f64,
    pub has_entropy: bool,
    /// Sum over completion tokens of `old_logprob - logprob` (verl `ppo_kl`).
    pub approx_kl_sum: f64,
    /// Ratio below `1 - epsilon` with a negative advantage (token level:
    /// tokens; sequence level: sequences).
    pub clip_low_count: f64,
    /// Ratio above `1 + epsilon_high` with a positive advantage.
    pub clip_high_count: f64,
    /// The denominator of the clip fractions and of the ratio mean: tokens
    /// (token level) or sequences (sequence level), as TRL.
    pub ratio_count: f64,
    pub ratio_sum: f64,
    pub ratio_min: Option<f64>,
    pub ratio_max: Option<f64>,
    /// Rollout importance-sampling correction ratio (after cap), when on.
    pub is_ratio_sum: f64,
    pub is_ratio_count: f64,
    pub is_ratio_min: Option<f64>,
    pub is_ratio_max: Option<f64>,
    /// `|old_logprob - rollout_logprob|` over completion tokens.
    pub sampling_logp_diff_sum: f64,
    pub sampling_logp_diff_max: Option<f64>,
    /// `loss_type: vespo`: sum and count (sequences) of the sequence weights.
    #[serde(default)]
    pub phi_seq_sum: f64,
    #[serde(default)]
    pub phi_seq_count: f64,
}

fn merge_min(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn merge_max(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

impl LossMetrics {
    /// Adds the statistics of another micro-batch (or rank).
    pub fn merge(&mut self, o: &LossMetrics) {
        self.loss += o.loss;
        self.pg_loss += o.pg_loss;
        self.kl_loss += o.kl_loss;
        self.entropy_loss += o.entropy_loss;
        self.num_tokens += o.num_tokens;
        self.num_sequences += o.num_sequences;
        self.kl_sum += o.kl_sum;
        self.has_kl |= o.has_kl;
        self.entropy_sum += o.entropy_sum;
        self.has_entropy |= o.has_entropy;
        self.approx_kl_sum += o.approx_kl_sum;
        self.clip_low_count += o.clip_low_count;
        self.clip_high_count += o.clip_high_count;
        self.ratio_count += o.ratio_count;
        self.ratio_sum += o.ratio_sum;
        self.ratio_min = merge_min(self.ratio_min, o.ratio_min);
        self.ratio_max = merge_max(self.ratio_max, o.ratio_max);
        self.is_ratio_sum += o.is_ratio_sum;
        self.is_ratio_count += o.is_ratio_count;
        self.is_ratio_min = merge_min(self.is_ratio_min, o.is_ratio_min);
        self.is_ratio_max = merge_max(self.is_ratio_max, o.is_ratio_max);
        self.sampling_logp_diff_sum += o.sampling_logp_diff_sum;
        self.sampling_logp_diff_max =
            merge_max(self.sampling_logp_diff_max, o.sampling_logp_diff_max);
        self.phi_seq_sum += o.phi_seq_sum;
        self.phi_seq_count += o.phi_seq_count;
    }

    /// The merged metrics of `n` optimizer updates on parts of one batch
    /// (TRL's `steps_per_generation`): the token and sequence statistics are
    /// already the whole batch's; the loss parts, each normalized over its
    /// own update, become their mean over the updates.
    pub fn mean_over_updates(mut self, n: usize) -> Self {
        let n = n.max(1) as f64;
        self.loss /= n;
        self.pg_loss /= n;
        self.kl_loss /= n;
        self.entropy_loss /= n;
        self
    }

    pub(crate) fn add_is_ratio(&mut self, r: f64) {
        self.is_ratio_sum += r;
        self.is_ratio_count += 1.0;
        self.is_ratio_min = merge_min(self.is_ratio_min, Some(r));
        self.is_ratio_max = merge_max(self.is_ratio_max, Some(r));
    }

    /// The means users log. Means over nothing are 0, never NaN.
    pub fn summary(&self) -> StepMetrics {
        StepMetrics {
            loss: self.loss,
            pg_loss: self.pg_loss,
            kl_loss: self.kl_loss,
            entropy_loss: self.entropy_loss,
            kl: self.has_kl.then(|| ratio(self.kl_sum, self.num_tokens)),
            entropy: self
                .has_entropy
                .then(|| ratio(self.entropy_sum, self.num_tokens)),
            approx_kl: ratio(self.approx_kl_sum, self.num_tokens),
            clip_ratio_low: ratio(self.clip_low_count, self.ratio_count),
            clip_ratio_high: ratio(self.clip_high_count, self.ratio_count),
            clip_ratio_region: ratio(self.clip_low_count + self.clip_high_count, self.ratio_count),
            ratio_mean: ratio(self.ratio_sum, self.ratio_count),
            ratio_min: self.ratio_min.unwrap_or(0.0),
            ratio_max: self.ratio_max.unwrap_or(0.0),
            importance_sampling_ratio_mean: (self.is_ratio_count > 0.0)
                .then(|| self.is_ratio_sum / self.is_ratio_count),
            importance_sampling_ratio_min: self.is_ratio_min,
            importance_sampling_ratio_max: self.is_ratio_max,
            sampling_logp_difference_mean: (self.is_ratio_count > 0.0)
                .then(|| ratio(self.sampling_logp_diff_sum, self.num_tokens)),
            sampling_logp_difference_max: self.sampling_logp_diff_max,
            vespo_phi_seq_mean: (self.phi_seq_count > 0.0)
                .then(|| self.phi_seq_sum / self.phi_seq_count),
            num_tokens: self.num_tokens,
            num_sequences: self.num_sequences,
        }
    }
}

/// Metrics of one step, ready to log. `None`: not measured this step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub loss: f64,
    pub pg_loss: f64,
    pub kl_loss: f64,
    pub entropy_loss: f64,
    /// Mean per-token KL estimate to the reference (TRL `kl`).
    pub kl: Option<f64>,
    /// Mean per-token entropy (TRL `entropy`).
    pub entropy: Option<f64>,
    /// Mean of `old_logprob - logprob` (verl `ppo_kl`).
    pub approx_kl: f64,
    /// TRL `clip_ratio/low_mean`.
    pub clip_ratio_low: f64,
    /// TRL `clip_ratio/high_mean`.
    pub clip_ratio_high: f64,
    /// TRL `clip_ratio/region_mean`.
    pub clip_ratio_region: f64,
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// TRL `sampling/importance_sampling_ratio/{mean,min,max}`.
    pub importance_sampling_ratio_mean: Option<f64>,
    pub importance_sampling_ratio_min: Option<f64>,
    pub importance_sampling_ratio_max: Option<f64>,
    /// TRL `sampling/sampling_logp_difference/{mean,max}`.
    pub sampling_logp_difference_mean: Option<f64>,
    pub sampling_logp_difference_max: Option<f64>,
    /// TRL `vespo/phi_seq_mean` (`loss_type: vespo` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vespo_phi_seq_mean: Option<f64>,
    /// Completion tokens in the loss. Logged under another name: TRL's
    /// `num_tokens` is the running count of tokens seen.
    #[serde(rename = "num_loss_tokens")]
    pub num_tokens: f64,
    pub num_sequences: f64,
}

/// Completion lengths of a step, as TRL logs them (`completions/mean_length`,
/// `min_length`, `max_length`, `clipped_ratio`, and the same lengths over
/// the terminated completions, those that did not hit the length limit).
/// Additive per rank ([`Self::to_vec`]), merged over ranks with
/// [`Self::merge`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompletionLengths {
    count: f64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    terminated: f64,
    terminated_sum: f64,
    terminated_min: Option<f64>,
    terminated_max: Option<f64>,
}

impl CompletionLengths {
    pub fn add(&mut self, length: usize, truncated: bool) {
        let l = length as f64;
        self.count += 1.0;
        self.sum += l;
        self.min = merge_min(self.min, Some(l));
        self.max = merge_max(self.max, Some(l));
        if !truncated {
            self.terminated += 1.0;
            self.terminated_sum += l;
            self.terminated_min = merge_min(self.terminated_min, Some(l));
            self.terminated_max = merge_max(self.terminated_max, Some(l));
        }
    }

    /// A fixed-width vector for a gather over ranks (NaN: none).
    pub fn to_vec(&self) -> [f64; 8] {
        let v = |o: Option<f64>| o.unwrap_or(f64::NAN);
        [
            self.count,
            self.sum,
            v(self.min),
            v(self.max),
            self.terminated,
            self.terminated_sum,
            v(self.terminated_min),
            v(self.terminated_max),
        ]
    }

    /// Every rank's [`Self::to_vec`] together.
    pub fn merge(gathered: &[Vec<f64>]) -> CompletionLengths {
        let some = |x: f64| (!x.is_nan()).then_some(x);
        let mut m = CompletionLengths::default();
        for g in gathered.iter().filter(|g| g.len() == 8) {
            m.count += g[0];
            m.sum += g[1];
            m.min = merge_min(m.min, some(g[2]));
            m.max = merge_max(m.max, some(g[3]));
            m.terminated += g[4];
            m.terminated_sum += g[5];
            m.terminated_min = merge_min(m.terminated_min, some(g[6]));
            m.terminated_max = merge_max(m.terminated_max, some(g[7]));
        }
        m
    }

    /// TRL's names under `completions/`; with no terminated completion the
    /// terminated lengths are 0, as TRL logs them.
    pub fn to_json(&self) -> serde_json::Value {
        let mean = |sum: f64, n: f64| if n > 0.0 { sum / n } else { 0.0 };
        serde_json::json!({
            "mean_length": mean(self.sum, self.count),
            "min_length": self.min.unwrap_or(0.0),
            "max_length": self.max.unwrap_or(0.0),
            "clipped_ratio": if self.count > 0.0 { 1.0 - self.terminated / self.count } else { 0.0 },
            "mean_terminated_length": mean(self.terminated_sum, self.terminated),
            "min_terminated_length": self.terminated_min.unwrap_or(0.0),
            "max_terminated_length": self.terminated_max.unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two updates on halves of a batch: token means are the whole batch's,
    /// loss parts the mean of the two updates'.
    #[test]
    fn updates_merge_into_batch_means_and_mean_losses() {
        let update = |loss: f64, tokens: f64, entropy_sum: f64| LossMetrics {
            loss,
            pg_loss: loss,
            num_tokens: tokens,
            entropy_sum,
            has_entropy: true,
            ..LossMetrics::default()
        };
        let mut merged = LossMetrics::default();
        merged.merge(&update(0.5, 10.0, 20.0));
        merged.merge(&update(1.5, 30.0, 30.0));
        let s = merged.mean_over_updates(2).summary();
        assert_eq!((s.loss, s.pg_loss), (1.0, 1.0));
        assert_eq!(s.entropy, Some(50.0 / 40.0));
        assert_eq!(s.num_tokens, 40.0);
    }

    #[test]
    fn completion_lengths_merge_over_ranks_as_trl_reports_them() {
        let mut a = CompletionLengths::default();
        a.add(3, false);
        a.add(8, true);
        let mut b = CompletionLengths::default();
        b.add(8, true);
        b.add(5, false);
        let empty = CompletionLengths::default();
        let m = CompletionLengths::merge(&[
            a.to_vec().to_vec(),
            empty.to_vec().to_vec(),
            b.to_vec().to_vec(),
        ]);
        assert_eq!(
            m.to_json(),
            serde_json::json!({
                "mean_length": 6.0, "min_length": 3.0, "max_length": 8.0,
                "clipped_ratio": 0.5,
                "mean_terminated_length": 4.0, "min_terminated_length": 3.0,
                "max_terminated_length": 5.0,
            })
        );
        // Nothing terminated: TRL logs zeros.
        let mut c = CompletionLengths::default();
        c.add(8, true);
        let j = CompletionLengths::merge(&[c.to_vec().to_vec()]).to_json();
        assert_eq!(j["clipped_ratio"], 1.0);
        assert_eq!(j["mean_terminated_length"], 0.0);
        assert_eq!(j["max_terminated_length"], 0.0);
    }
}
