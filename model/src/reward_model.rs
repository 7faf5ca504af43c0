//! transformers' `*ForSequenceClassification`: the decoder, then a `score`
//! projection `[num_labels, hidden]` read at each sequence's last token. A
//! reward model, as TRL's `reward_funcs`, OpenRLHF's `--reward_pretrain` and
//! verl's `reward_model.model.path` take one (`num_labels` 1).

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, ModelHead};
use crate::decoder::CausalLM;
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// A sequence classifier. Cloning shares the weights.
#[derive(Clone)]
pub struct SequenceClassifier {
    /// The decoder; its head is the `score` projection.
    lm: CausalLM,
    num_labels: usize,
    /// transformers reads the score at the last token that is not this one
    /// (config.json's `pad_token_id`); none: at the last token.
    pad_token_id: Option<u32>,
}

impl SequenceClassifier {
    /// Builds the classifier from `weights` (shapes checked against `cfg`,
    /// which must name a `*ForSequenceClassification`).
    pub fn new(cfg: &ModelConfig, weights: &Weights) -> Result<Self> {
        let ModelHead::SequenceClassification { num_labels } = cfg.head else {
            return Err(ModelError::Invalid(format!(
                "config.json names {}, a language model, not a classifier: a reward model's \
                 folder names a *ForSequenceClassification (transformers' \
                 AutoModelForSequenceClassification saves one)",
                cfg.architecture.hf_name()
            )));
        };
        let pad_token_id = match cfg.raw.get("pad_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|id| id as u32),
            _ => None,
        };
        Ok(SequenceClassifier {
            lm: CausalLM::build(cfg, weights, None)?,
            num_labels,
            pad_token_id,
        })
    }

    /// Loads a Hugging Face model folder.
    pub fn from_dir(dir: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let weights = Weights::load(dir, device, dtype)?;
        Self::new(&cfg, &weights)
    }

    pub fn config(&self) -> &ModelConfig {
        self.lm.config()
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Where transformers reads a sequence's score: at its last token that
    /// is not the pad token (the first token when every one is), or at its
    /// last token when the config has no pad token.
    pub fn score_position(&self, ids: &[u32]) -> usize {
        match self.pad_token_id {
            None => ids.len().saturating_sub(1),
            Some(pad) => ids.iter().rposition(|&id| id != pad).unwrap_or(0),
        }
    }

    /// The `num_labels` scores (f32) of each sequence, computed as one
    /// right-padded batch (padding never reaches a real token: the
    /// attention is causal).
    pub fn scores(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(i) = sequences.iter().position(Vec::is_empty) {
            return Err(ModelError::Invalid(format!(
                "sequence {i} has no tokens to score"
            )));
        }
        let t = sequences.iter().map(Vec::len).max().unwrap_or(1);
        let pad = self.pad_token_id.unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * t);
        let mut mask = Vec::with_capacity(sequences.len() * t);
        for s in sequences {
            ids.extend(
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, t - s.len())),
            );
            mask.extend((0..t).map(|j| u32::from(j < s.len())));
        }
        let device = self.lm.device();
        let shape = (sequences.len(), t);
        let ids = Tensor::from_vec(ids, shape, device)?;
        let mask = Tensor::from_vec(mask, shape, device)?;
        let hidden = self.lm.forward_hidden(&ids, &mask)?;
        // Row i's hidden state at its score position: flat index i * t + p.
        let rows: Vec<u32> = sequences
            .iter()
            .enumerate()
            .map(|(i, s)| (i * t + self.score_position(s)) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, sequences.len(), device)?;
        let h = self.config().hidden_size;
        let last = hidden
            .reshape((sequences.len() * t, h))?
            .index_select(&rows, 0)?;
        Ok(self.lm.logits(&last)?.to_dtype(DType::F32)?.to_vec2()?)
    }
}
