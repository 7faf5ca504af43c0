//! Prompt + completion token ids (as the rollout server returned them, never
//! re-tokenized) padded into the tensors of one training batch.
//!
//! Layout, as TRL's `GRPOTrainer` builds it (`prompt_ids` left-padded,
//! `completion_ids` right-padded, concatenated): with `P` the longest prompt
//! and `K` the completion width, row `i` of `input_ids` is
//!
//! ```text
//! [pad .. pad | prompt_i | completion_i | pad .. pad]
//!  <- P - p_i ->          <---------- K ----------->
//! ```
//!
//! so every completion token sits in the last `K` columns and the model only
//! needs logits for those (TRL's `logits_to_keep = K`): the log-prob of
//! `input_ids[:, T-K+j]` comes from the logits at position `T-K+j-1`.

use candle_core::{Device, Tensor};
use model::CausalLM;
use model::logprobs::TokenLogProbs;

use crate::grpo_error::{GrpoError, Result};

/// The label of a position that is not trained on (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The token ids of one prompt and one of its completions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SequenceTokens {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// One padded batch. `B` rows, `T = P + K` columns.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `[B, T]` u32: left-padded prompt then right-padded completion.
    pub input_ids: Tensor,
    /// `[B, T]` u32: 1 on prompt and completion tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// `[B, T]` u32: position of each token counted from the row's first real
    /// token (0 on left padding), as Hugging Face derives it from the mask.
    pub position_ids: Tensor,
    /// `[B, T]` i64, already shifted for next-token prediction:
    /// `labels[:, t] = input_ids[:, t+1]` where `t+1` is a completion token,
    /// [`IGNORE_INDEX`] elsewhere (prompt, padding, last column).
    pub labels: Tensor,
    /// `[B, K]` u32: the completion tokens (right-padded with `pad_token_id`),
    /// the targets whose log-probs the loss needs.
    pub completion_ids: Tensor,
    /// `[B, K]` f32: 1 on completion tokens, 0 on padding. Aligned with the
    /// `[B, K]` log-prob tensors that the losses take.
    pub response_mask: Tensor,
    /// `K`: the number of trailing columns holding completion tokens.
    pub logits_to_keep: usize,
    /// `P`: the width of the prompt block.
    pub prompt_width: usize,
    pub prompt_lengths: Vec<usize>,
    pub completion_lengths: Vec<usize>,
}

impl PaddedBatch {
    /// Number of rows `B`.
    pub fn batch_size(&self) -> usize {
        self.prompt_lengths.len()
    }

    /// Total columns `T = P + K`.
    pub fn seq_len(&self) -> usize {
        self.prompt_width + self.logits_to_keep
    }

    /// Number of completion tokens in the batch (the sum of the response mask).
    pub fn num_completion_tokens(&self) -> usize {
        self.completion_lengths.iter().sum()
    }

    /// `[B, K]` log-probs (and entropies) of the completion tokens under
    /// `model`, with the sampling `temperature` applied to the logits as TRL
    /// does; only the last `K` positions are projected to the vocabulary.
    /// Differentiable w.r.t. the model's variables.
    pub fn completion_logprobs(
        &self,
        model: &CausalLM,
        temperature: f64,
        with_entropy: bool,
    ) -> Result<TokenLogProbs> {
        Ok(model.completion_logprobs(
            &self.input_ids,
            &self.attention_mask,
            self.logits_to_keep,
            temperature,
            with_entropy,
        )?)
    }
}

/// Pads a batch. `completion_width`: the `K` to pad completions to (e.g. the
/// recipe's `max_completion_length`, to keep shapes fixed); `None` pads to the
/// longest completion of the batch (at least 1 column).
///
/// Errors: an empty batch, an empty prompt (the first completion token needs a
/// token to be predicted from), or a completion longer than `completion_width`.
pub fn pad_batch(
    sequences: &[SequenceTokens],
    pad_token_id: u32,
    completion_width: Option<usize>,
    device: &Device,
) -> Result<PaddedBatch> {
    if sequences.is_empty() {
        return Err(GrpoError::Invalid("pad_batch: the batch is empty".into()));
    }
    if let Some(i) = sequences.iter().position(|s| s.prompt_ids.is_empty()) {
        return Err(GrpoError::Invalid(format!(
            "pad_batch: sequence {i} has an empty prompt; a completion token needs at least one token before it"
        )));
    }
    let longest = sequences
        .iter()
        .map(|s| s.completion_ids.len())
        .max()
        .unwrap_or(0);
    let k = match completion_width {
        Some(w) => {
            if let Some(i) = sequences.iter().position(|s| s.completion_ids.len() > w) {
                return Err(GrpoError::Invalid(format!(
                    "pad_batch: sequence {i} has {} completion tokens, more than the completion width {w}",
                    sequences[i].completion_ids.len()
                )));
            }
            w.max(1)
        }
        None => longest.max(1),
    };
    let p = sequences
        .iter()
        .map(|s| s.prompt_ids.len())
        .max()
        .unwrap_or(0);
    let t = p + k;
    let b = sequences.len();

    let mut input_ids = vec![pad_token_id; b * t];
    let mut attention = vec![0u32; b * t];
    let mut positions = vec![0u32; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    let mut completion_ids = vec![pad_token_id; b * k];
    let mut response_mask = vec![0f32; b * k];
    for (i, s) in sequences.iter().enumerate() {
        let row = i * t;
        let start = p - s.prompt_ids.len();
        for (j, &id) in s.prompt_ids.iter().enumerate() {
            input_ids[row + start + j] = id;
            attention[row + start + j] = 1;
        }
        for (j, &id) in s.completion_ids.iter().enumerate() {
            input_ids[row + p + j] = id;
            attention[row + p + j] = 1;
            completion_ids[i * k + j] = id;
            response_mask[i * k + j] = 1.0;
            // The logits at column p+j-1 predict the token at column p+j.
            labels[row + p + j - 1] = i64::from(id);
        }
        let real = s.prompt_ids.len() + s.completion_ids.len();
        for j in 0..real {
            positions[row + start + j] = j as u32;
        }
    }
    Ok(PaddedBatch {
        input_ids: Tensor::from_vec(input_ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(attention, (b, t), device)?,
        position_ids: Tensor::from_vec(positions, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        completion_ids: Tensor::from_vec(completion_ids, (b, k), device)?,
        response_mask: Tensor::from_vec(response_mask, (b, k), device)?,
        logits_to_keep: k,
        prompt_width: p,
        prompt_lengths: sequences.iter().map(|s| s.prompt_ids.len()).collect(),
        completion_lengths: sequences.iter().map(|s| s.completion_ids.len()).collect(),
    })
}

/// Which rows (indices into a rank's rows, in the batch's order) go into
/// which micro-batch of which optimizer update.
///
/// TRL's `steps_per_generation`: the rows in `num_updates` consecutive
/// parts, one per update, each in `ga` micro-batches; a part holding more
/// than `max_rows x ga` rows (dynamic sampling may give a rank more) makes
/// more micro-batches, not larger ones. With `by_length`, the rows of a part
/// are ordered by length (`(prompt, completion)` tokens) before they are cut
/// into micro-batches, so that each micro-batch pads to rows of about its
/// own length instead of to the part's longest: fewer padded tokens to run
/// through the model, for the same gradients (the loss is normalized over
/// the whole update, whatever the micro-batches hold).
///
/// With `max_tokens` (verl's `use_dynamic_bsz` + `ppo_max_token_len_per_gpu`,
/// OpenRLHF's `--use_dynamic_batch` + `--train_max_tokens_per_gpu`) the
/// micro-batches are cut by size instead of by count: each takes rows, in
/// that order, while `rows x (longest prompt + longest completion)` stays
/// within it (a row longer than that alone); many short rows then share a
/// forward pass, and the memory a micro-batch needs is bounded.
pub fn plan_micro_batches(
    lengths: &[(usize, usize)],
    num_updates: usize,
    ga: usize,
    max_rows: usize,
    by_length: bool,
    max_tokens: Option<usize>,
) -> Vec<Vec<Vec<usize>>> {
    let mut updates = Vec::with_capacity(num_updates.max(1));
    for part in crate::loss::micro_batch_ranges(lengths.len(), num_updates) {
        let mut order: Vec<usize> = part.clone().collect();
        if by_length {
            // Stable: equal lengths keep the batch's order.
            order.sort_by_key(|&i| (lengths[i].1, lengths[i].0));
        }
        let micro_batches = match max_tokens {
            Some(budget) => cut_by_tokens(lengths, &order, budget),
            None => {
                let count = ga.max(part.len().div_ceil(max_rows.max(1)));
                crate::loss::micro_batch_ranges(order.len(), count)
                    .into_iter()
                    .filter(|r| !r.is_empty())
                    .map(|r| order[r].to_vec())
                    .collect()
            }
        };
        updates.push(micro_batches);
    }
    updates
}

/// `order` cut into consecutive micro-batches of at most `budget` padded
/// tokens each (a row over it alone).
fn cut_by_tokens(lengths: &[(usize, usize)], order: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let (mut p, mut k) = (0, 0);
    for &i in order {
        let (pi, ki) = (p.max(lengths[i].0), k.max(lengths[i].1.max(1)));
        if !current.is_empty() && (current.len() + 1) * (pi + ki) > budget {
            out.push(std::mem::take(&mut current));
            (p, k) = (lengths[i].0, lengths[i].1.max(1));
        } else {
            (p, k) = (pi, ki);
        }
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Tokens a plan runs through the model, padding included: each micro-batch
/// is `rows x (longest prompt + longest completion)`.
pub fn padded_tokens(lengths: &[(usize, usize)], plan: &[Vec<Vec<usize>>]) -> usize {
    plan.iter()
        .flatten()
        .map(|mb| {
            let p = mb.iter().map(|&i| lengths[i].0).max().unwrap_or(0);
            let k = mb.iter().map(|&i| lengths[i].1).max().unwrap_or(0).max(1);
            mb.len() * (p + k)
        })
        .sum()
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// `(prompt, completion)` tokens of 8 rows.
    const LENGTHS: [(usize, usize); 8] = [
        (5, 9),
        (5, 1),
        (5, 8),
        (5, 2),
        (3, 7),
        (3, 7),
        (4, 1),
        (3, 3),
    ];

    #[test]
    fn a_token_budget_cuts_micro_batches_by_size() {
        // Ordered by (completion, prompt): 6, 1, 3, 7, 4, 5, 2, 0.
        let lengths = LENGTHS;
        let plan = plan_micro_batches(&lengths, 1, 2, 4, true, Some(30));
        // [6, 1, 3] is 3 x (5 + 2) = 21, with 7 it would be 4 x 8 = 32;
        // [7, 4, 5] is 3 x (3 + 7) = 30; [2, 0] is 2 x (5 + 9) = 28.
        assert_eq!(plan, vec![vec![vec![6, 1, 3], vec![7, 4, 5], vec![2, 0]]]);
        for mb in &plan[0] {
            let one = vec![vec![mb.clone()]];
            assert!(mb.len() == 1 || padded_tokens(&lengths, &one) <= 30);
        }
        // A budget under one row: one row each; every row once.
        let tight = plan_micro_batches(&lengths, 2, 2, 4, false, Some(4));
        assert_eq!(tight.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4]);
        let mut all: Vec<usize> = tight.iter().flatten().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn each_update_keeps_its_rows_and_micro_batches_follow_length() {
        // Two updates of 4 rows, 2 micro-batches each.
        let lengths = LENGTHS;
        let plan = plan_micro_batches(&lengths, 2, 2, 4, true, None);
        assert_eq!(
            plan,
            vec![vec![vec![1, 3], vec![2, 0]], vec![vec![6, 7], vec![4, 5]],]
        );
        // In the batch's order: consecutive rows, as before.
        let plain = plan_micro_batches(&lengths, 2, 2, 4, false, None);
        assert_eq!(
            plain,
            vec![vec![vec![0, 1], vec![2, 3]], vec![vec![4, 5], vec![6, 7]]]
        );
        // The same rows either way, each once; fewer padded tokens sorted.
        let mut all: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(
            padded_tokens(&lengths, &plain),
            2 * 14 + 2 * 13 + 2 * 10 + 2 * 7
        );
        assert_eq!(
            padded_tokens(&lengths, &plan),
            2 * 7 + 2 * 14 + 2 * 7 + 2 * 10
        );
    }

    #[test]
    fn a_rank_with_more_rows_makes_more_micro_batches() {
        let lengths = vec![(2, 2); 10];
        let plan = plan_micro_batches(&lengths, 1, 2, 3, true, None);
        let sizes: Vec<usize> = plan[0].iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 3, 2, 2]);
        // Fewer rows than micro-batches: no empty one.
        let plan = plan_micro_batches(&lengths[..1], 1, 4, 3, true, None);
        assert_eq!(plan, vec![vec![vec![0]]]);
        let empty: Vec<Vec<Vec<usize>>> = vec![vec![], vec![]];
        assert_eq!(plan_micro_batches(&[], 2, 2, 3, true, None), empty);
    }
}
