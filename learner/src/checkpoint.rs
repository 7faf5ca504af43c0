//! Training checkpoints: `checkpoints/step_XXXXXX/` holds a Hugging Face
//! model folder (config.json, model.safetensors, tokenizer files: loadable by
//! transformers and vLLM as it is), the optimizer state
//! (`optimizer.safetensors` + `optimizer.json`) and `trainer_state.json`
//! (step, weight version, data cursor, KL controller, NaN-guard streak, the
//! prefetched rollout batch of each rank when `async_lag` is 1, and the
//! recipe's fingerprint). Written into a temporary folder and renamed
//! ([`crate::run_dir::CheckpointDir::begin`] / `commit`), so a crash never
//! leaves a half checkpoint that resume would pick.
//!
//! The sampling itself needs no RNG state: every request carries a seed
//! derived from (train.seed, step, prompt), and the data order is a pure
//! function of the seed and the cursor.

use std::path::{Path, PathBuf};

use model::tokenizer::Tokenizer;
use model::{ModelConfig, Weights};
use serde::{Deserialize, Serialize};

use crate::data::{DataCursor, Example};
use crate::kl::KlController;
use crate::optim::AdamW;
use crate::recipe::Recipe;
use crate::rollout::GroupOutcome;
use crate::run_dir::CheckpointDir;

pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
const STATE_FORMAT: &str = "tandem-trainer-state";
const STATE_VERSION: u32 = 1;

/// A rollout batch generated ahead (`async_lag: 1`): the prompts and what
/// the server returned for them, in prompt order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefetchedBatch {
    /// The step this batch is for.
    pub step: u64,
    pub examples: Vec<Example>,
    pub outcomes: Vec<GroupOutcome>,
}

/// Everything beyond weights and optimizer that a resumed run needs to
/// continue as if it had never stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    pub format_version: u32,
    /// Optimizer steps done (the checkpoint's step).
    pub step: u64,
    /// The weight version last pushed to the rollout servers.
    pub weight_version: u64,
    pub data_cursor: DataCursor,
    pub kl_controller: KlController,
    /// Non-finite steps in a row at the time of the checkpoint.
    pub nonfinite_streak: u32,
    /// `async_lag: 1`: the batch each rank had generated for the next step,
    /// indexed by rank; empty otherwise.
    pub prefetched: Vec<Option<PrefetchedBatch>>,
    /// SHA-256 of the resolved recipe (secrets redacted) that wrote it.
    pub recipe_fingerprint: String,
    pub world_size: usize,
}

impl TrainerState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        step: u64,
        weight_version: u64,
        data_cursor: DataCursor,
        kl_controller: KlController,
        nonfinite_streak: u32,
        prefetched: Vec<Option<PrefetchedBatch>>,
        recipe: &Recipe,
        world_size: usize,
    ) -> Self {
        TrainerState {
            format: STATE_FORMAT.into(),
            format_version: STATE_VERSION,
            step,
            weight_version,
            data_cursor,
            kl_controller,
            nonfinite_streak,
            prefetched,
            recipe_fingerprint: recipe_fingerprint(recipe),
            world_size,
        }
    }

    pub fn load(dir: &Path) -> anyhow::Result<TrainerState> {
        let path = dir.join(TRAINER_STATE_FILE);
        let bytes = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let state: TrainerState = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a trainer state: {e}", path.display()))?;
        if state.format != STATE_FORMAT || state.format_version != STATE_VERSION {
            anyhow::bail!(
                "{}: format {} v{}, expected {STATE_FORMAT} v{STATE_VERSION}",
                path.display(),
                state.format,
                state.format_version
            );
        }
        Ok(state)
    }
}

/// SHA-256 of the resolved recipe, secrets redacted.
pub fn recipe_fingerprint(recipe: &Recipe) -> String {
    let bytes = serde_json::to_vec(&recipe.to_json_redacted()).unwrap_or_default();
    crate::data::sha256_hex(&bytes)
}

/// Writes checkpoint `step` of the run at `run_dir` and prunes old ones to
/// `keep_last`. Returns the committed folder.
pub fn save_checkpoint(
    run_dir: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: &Tokenizer,
    optimizer: &AdamW,
    state: &TrainerState,
    keep_last: Option<usize>,
) -> anyhow::Result<PathBuf> {
    let checkpoints = CheckpointDir::new(run_dir);
    let pending = checkpoints.begin(state.step)?;
    model::pretrained::save_pretrained(pending.path(), cfg, weights, tokenizer)?;
    optimizer.save(pending.path())?;
    let bytes = serde_json::to_vec_pretty(state)?;
    std::fs::write(pending.path().join(TRAINER_STATE_FILE), bytes)?;
    let dir = pending.commit()?;
    if let Some(keep) = keep_last {
        checkpoints.prune(keep.max(1))?;
    }
    Ok(dir)
}
