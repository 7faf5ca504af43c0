//! Training checkpoints: `checkpoints/step_XXXXXX/` holds a Hugging Face
//! model folder (config.json, model.safetensors, tokenizer files: loadable by
//! transformers and vLLM as it is), the optimizer state
//! (`optimizer.safetensors` + `optimizer.json`) and `trainer_state.json`
//! (step, weight version, data cursor, KL controller, NaN-guard streak, the
//! prefetched rollout batch of each rank when `async_lag` is 1, and the
//! recipe that wrote it). Written into a temporary folder and renamed
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
use serde_json::Value;

use crate::data::{DataCursor, Example};
use crate::kl::KlController;
use crate::optim::AdamW;
use crate::recipe::Recipe;
use crate::rewards::RewardLogs;
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
    /// This rank's share of the batch's rewards, scored as soon as it was
    /// generated (while its environments held their completions' state);
    /// none in checkpoints written before this field, scored at its step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<Vec<f64>>,
    /// How long scoring it took, added to its step's score time.
    #[serde(default)]
    pub score_s: f64,
    /// What its reward functions logged (TRL's `log_extra`, `log_metric`).
    #[serde(default, skip_serializing_if = "RewardLogs::is_empty")]
    pub logged: RewardLogs,
}

/// Everything beyond weights and optimizer that a resumed run needs to
/// continue as if it had never stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    pub format_version: u32,
    /// The loop's counters, at the top level of trainer_state.json.
    #[serde(flatten)]
    pub counters: LoopState,
    pub world_size: usize,
    /// The resolved recipe (secrets redacted) that wrote it, so that a
    /// resume can name what changed ([`recipe_changes`]). Absent in
    /// checkpoints written before it was recorded (they held only a
    /// `recipe_fingerprint`, now ignored).
    #[serde(default)]
    pub recipe: Option<Value>,
    /// The run's Python functions (`rollout.tools`' and `reward.functions`')
    /// as it read them, each `{key, function, source_sha256, ...}`
    /// ([`crate::tools::ToolRunner::python_functions`],
    /// [`crate::rewards::RewardRegistry::python_functions`]); absent
    /// without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub python_functions: Vec<Value>,
}

/// The training loop's counters at a checkpoint: what [`TrainerState`]
/// holds besides its format, the recipe and the world size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
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
    /// Prompt and completion tokens of every step so far, all ranks (TRL's
    /// `num_input_tokens_seen`, logged as `num_tokens`); 0 in checkpoints
    /// written before it was kept.
    #[serde(default)]
    pub num_input_tokens_seen: f64,
}

impl TrainerState {
    /// The state of `world_size` ranks running `recipe` (as written).
    pub fn new(counters: LoopState, recipe: &Recipe, world_size: usize) -> Self {
        TrainerState {
            format: STATE_FORMAT.into(),
            format_version: STATE_VERSION,
            counters,
            world_size,
            recipe: Some(recipe.to_json_redacted()),
            python_functions: Vec::new(),
        }
    }

    /// With the run's Python functions recorded.
    pub fn with_python_functions(mut self, functions: Vec<Value>) -> Self {
        self.python_functions = functions;
        self
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

/// The KL reference's weights in a checkpoint whose run syncs it
/// (`train.sync_ref_model`); the index keeps vLLM from loading them.
pub const REF_MODEL_FILE: &str = "ref_model.safetensors";

/// A LoRA run's adapter in a checkpoint, in PEFT's format (a folder of its
/// own: transformers would take an `adapter_config.json` beside the model
/// for an adapter to load on a base).
pub const ADAPTER_DIR: &str = "adapter";

/// What one checkpoint holds: a Hugging Face model folder (config,
/// weights, tokenizer), the optimizer, the trainer state and, when the run
/// syncs it, the KL reference's weights; a LoRA run's adapter.
pub struct Checkpoint<'a> {
    pub cfg: &'a ModelConfig,
    /// The whole model (a LoRA run's merged).
    pub weights: &'a Weights,
    /// A LoRA run's adapter and the base model it goes on.
    pub adapter: Option<(&'a model::lora::Lora, &'a str)>,
    pub tokenizer: &'a Tokenizer,
    pub optimizer: &'a AdamW,
    pub state: &'a TrainerState,
    pub reference: Option<&'a Weights>,
}

/// Writes checkpoint `state.counters.step` of the run at `run_dir` and prunes old
/// ones to `keep_last`. Returns the committed folder.
pub fn save_checkpoint(
    run_dir: &Path,
    checkpoint: &Checkpoint,
    keep_last: Option<usize>,
) -> anyhow::Result<PathBuf> {
    let Checkpoint {
        cfg,
        weights,
        adapter,
        tokenizer,
        optimizer,
        state,
        reference,
    } = *checkpoint;
    let checkpoints = CheckpointDir::new(run_dir);
    let pending = checkpoints.begin(state.counters.step)?;
    model::pretrained::save_pretrained(pending.path(), cfg, weights, tokenizer)?;
    // optimizer.safetensors sits beside the model: the index keeps vLLM from
    // loading it as weights.
    model::pretrained::write_single_file_index(pending.path(), weights)?;
    optimizer.save(pending.path())?;
    if let Some((lora, base_model)) = adapter {
        lora.save_peft(&pending.path().join(ADAPTER_DIR), base_model)?;
    }
    if let Some(reference) = reference {
        reference.save(&pending.path().join(REF_MODEL_FILE))?;
    }
    let bytes = serde_json::to_vec_pretty(state)?;
    std::fs::write(pending.path().join(TRAINER_STATE_FILE), bytes)?;
    let dir = pending.commit()?;
    if let Some(keep) = keep_last {
        checkpoints.prune(keep.max(1))?;
    }
    Ok(dir)
}

/// One recipe key whose value differs between the checkpoint's recipe and
/// the resuming one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecipeChange {
    /// Dotted path, as in overrides: `train.learning_rate`,
    /// `reward.functions[0].weight`.
    pub key: String,
    /// `null` where the key is absent.
    pub before: Value,
    pub after: Value,
    /// Whether the resumed run would then train differently from the run
    /// the checkpoint came from (see [`changes_training`]).
    pub changes_training: bool,
}

impl std::fmt::Display for RecipeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.before, self.after)
    }
}

/// Every key whose value differs between `saved` (the checkpoint's recipe)
/// and `recipe` (the resuming one), both as [`Recipe::to_json_redacted`]
/// writes them, in key order. A key the checkpoint's recipe lacks (written
/// by a Tandem that did not have it) counts as its default: a key is added
/// with the default that keeps the old behaviour.
pub fn recipe_changes(saved: &Value, recipe: &Recipe) -> Vec<RecipeChange> {
    let mut out = Vec::new();
    let defaults = Recipe::default().to_json_redacted();
    diff_values(
        String::new(),
        saved,
        &recipe.to_json_redacted(),
        Some(&defaults),
        &mut out,
    );
    for c in &mut out {
        c.changes_training = changes_training(&c.key, recipe);
    }
    out
}

fn diff_values(
    key: String,
    a: &Value,
    b: &Value,
    defaults: Option<&Value>,
    out: &mut Vec<RecipeChange>,
) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                let null = Value::Null;
                let default = defaults.and_then(|d| d.get(k));
                let before = x.get(k).or(default).unwrap_or(&null);
                diff_values(sub, before, y.get(k).unwrap_or(&null), default, out);
            }
        }
        // Same length: element by element, so that one changed reward
        // weight is named as such; otherwise the list as a whole.
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff_values(format!("{key}[{i}]"), p, q, None, out);
            }
        }
        _ if a != b => out.push(RecipeChange {
            key,
            before: a.clone(),
            after: b.clone(),
            changes_training: true,
        }),
        _ => {}
    }
}

/// Keys that say where the run's processes are and how it is observed, not
/// what it learns: the launcher rewrites the endpoints on every start, and a
/// resumed run may be checkpointed, evaluated and logged differently, or on
/// another machine, and still continue as if it had never stopped. The
/// warm-up keys act only before step 0, which a resumed run never repeats;
/// `recompute_logits` and `gradient_checkpointing` trade memory for time,
/// with the same gradients (to rounding).
const NO_TRAINING_EFFECT: &[&str] = &[
    "model.device",
    "rollout.endpoints",
    "rollout.api_key",
    "rollout.model",
    "rollout.client_tag",
    "rollout.client_tag_echo",
    "rollout.request_timeout_s",
    "rollout.max_retries",
    "rollout.tool_timeout_s",
    "rollout.weight_sync_endpoints",
    "rollout.weight_sync_token",
    "rollout.weight_sync_timeout_s",
    "rollout.gpu_memory_utilization",
    "train.sft_warmup_steps",
    "train.sft_learning_rate",
    "train.sft_lr_scheduler_type",
    "train.sft_target_loss",
    "train.sft_batch_size",
    "train.recompute_logits",
    "train.gradient_checkpointing",
    "train.max_nonfinite_steps",
    "eval",
    "checkpoint",
    "log",
    "topology.nodes",
    "topology.gpus_per_node",
    "topology.tp",
    "topology.rollout_servers",
];

/// Whether a different value of `key` makes a resumed run (with `recipe`)
/// train differently from the run its checkpoint came from.
pub fn changes_training(key: &str, recipe: &Recipe) -> bool {
    let under = |p: &str| {
        key == p
            || key
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    if NO_TRAINING_EFFECT.iter().any(|p| under(p)) {
        return false;
    }
    let t = &recipe.train;
    match key {
        // Extending a run is the usual reason to resume with another
        // max_steps (or num_train_epochs); it changes the steps already
        // planned only through a learning-rate schedule that is a function
        // of it.
        "train.max_steps" | "train.num_train_epochs" => {
            t.lr_scheduler_type.decays() || (t.warmup_steps == 0 && t.warmup_ratio > 0.0)
        }
        // The starting weights come from the checkpoint; the model keys
        // only build the KL reference, but for LoRA, where they are the
        // frozen base the adapters train on.
        "model.path" | "model.preset" | "model.init_seed" => {
            t.loss.beta > 0.0 || recipe.model.use_peft
        }
        // A resume takes the checkpoint's adapters, whatever it names.
        "model.lora_adapter_path" => false,
        // How many processes run the Python tools is a matter of speed, but
        // for one thing: with one, the reward functions run in it too and
        // read what the tools (or environments) left in their modules.
        "rollout.python_tool_processes" => {
            recipe.reward.takes_row_columns()
                && recipe.rollout.tools.iter().any(|t| t.python.is_some())
        }
        // Where a tool runs (a restarted tool server's new port), as the
        // endpoints; what it is (name, description, schema) is shown to
        // the policy.
        _ if key.starts_with("rollout.tools[") && key.ends_with("].url") => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo(overrides: &[&str]) -> Recipe {
        Recipe::demo(overrides).expect("demo recipe")
    }

    fn changes(before: &[&str], after: &[&str]) -> Vec<(String, bool)> {
        let saved = demo(before).to_json_redacted();
        recipe_changes(&saved, &demo(after))
            .into_iter()
            .map(|c| (c.key, c.changes_training))
            .collect()
    }

    #[test]
    fn the_same_recipe_has_no_changes() {
        assert!(changes(&[], &[]).is_empty());
    }

    #[test]
    fn a_changed_learning_rate_is_named_with_both_values() {
        let saved = demo(&[]).to_json_redacted();
        let c = recipe_changes(&saved, &demo(&["train.learning_rate=0.001"]));
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].key, "train.learning_rate");
        assert!(c[0].changes_training);
        assert_eq!(c[0].after, serde_json::json!(0.001));
        assert_eq!(
            c[0].to_string(),
            format!("train.learning_rate: {} -> 0.001", c[0].before)
        );
    }

    #[test]
    fn where_a_tool_runs_does_not_change_training_what_it_is_does() {
        let r = demo(&[]);
        assert!(!changes_training("rollout.tools[0].url", &r));
        assert!(!changes_training("rollout.tool_timeout_s", &r));
        assert!(changes_training("rollout.tools[0].description", &r));
        assert!(changes_training("rollout.tools", &r));
        assert!(changes_training("rollout.max_tool_calling_iterations", &r));
    }

    #[test]
    fn python_tool_processes_change_training_where_the_rewards_could_share_the_tools_process() {
        let mut r = demo(&[]);
        assert!(!changes_training("rollout.python_tool_processes", &r));
        r.rollout.tools.push(crate::recipe::Tool {
            name: "add".into(),
            python: Some("tools.py:add".into()),
            ..Default::default()
        });
        assert!(!changes_training("rollout.python_tool_processes", &r));
        r.reward.functions.push(crate::recipe::RewardFunction {
            name: "python".into(),
            ..Default::default()
        });
        assert!(changes_training("rollout.python_tool_processes", &r));
    }

    #[test]
    fn where_and_how_the_run_is_observed_does_not_change_training() {
        let c = changes(
            &[],
            &[
                "rollout.endpoints=[\"http://10.0.0.9:8001\"]",
                "checkpoint.save_steps=7",
                "eval.eval_steps=3",
                "log.logging_steps=5",
                "model.device=cpu",
                "train.sft_warmup_steps=3",
                "train.sft_target_loss=null",
                "train.sft_lr_scheduler_type=linear",
            ],
        );
        assert!(!c.is_empty());
        assert!(c.iter().all(|(_, t)| !t), "{c:?}");
    }

    #[test]
    fn the_model_changes_training_where_it_is_the_kl_reference_or_the_lora_base() {
        let c = changes(&[], &["model.init_seed=3"]);
        assert_eq!(c, [("model.init_seed".to_string(), false)]);
        let c = changes(
            &["train.beta=0.04"],
            &["train.beta=0.04", "model.init_seed=3"],
        );
        assert_eq!(c, [("model.init_seed".to_string(), true)]);
        let lora = ["model.use_peft=true"];
        let c = changes(&lora, &["model.use_peft=true", "model.init_seed=3"]);
        assert_eq!(c, [("model.init_seed".to_string(), true)]);
        // And the adapters' shape always does.
        let c = changes(&lora, &["model.use_peft=true", "model.lora_r=8"]);
        assert_eq!(c, [("model.lora_r".to_string(), true)]);
    }

    #[test]
    fn list_elements_are_named_by_index() {
        let c = changes(&[], &["reward.functions[0].weight=2.0"]);
        assert_eq!(c, [("reward.functions[0].weight".to_string(), true)]);
    }

    #[test]
    fn max_steps_changes_training_only_through_a_decaying_schedule() {
        // The demo decays (cosine): the remaining steps' rates would move.
        let c = changes(&[], &["train.max_steps=5000"]);
        assert_eq!(c, [("train.max_steps".to_string(), true)]);
        let constant = ["train.lr_scheduler_type=constant", "train.warmup_ratio=0"];
        let mut longer = constant.to_vec();
        longer.push("train.max_steps=5000");
        assert_eq!(
            changes(&constant, &longer),
            [("train.max_steps".to_string(), false)]
        );
        // A warmup given as a ratio of max_steps moves with it.
        let ratio = [
            "train.lr_scheduler_type=constant",
            "train.warmup_steps=0",
            "train.warmup_ratio=0.1",
        ];
        let mut longer = ratio.to_vec();
        longer.push("train.max_steps=5000");
        assert_eq!(
            changes(&ratio, &longer),
            [("train.max_steps".to_string(), true)]
        );
    }

    #[test]
    fn the_model_keys_matter_only_for_the_kl_reference() {
        let c = changes(&[], &["model.init_seed=9"]);
        assert_eq!(c, [("model.init_seed".to_string(), false)]);
        let c = changes(
            &["train.beta=0.04"],
            &["train.beta=0.04", "model.init_seed=9"],
        );
        assert_eq!(c, [("model.init_seed".to_string(), true)]);
    }

    #[test]
    fn trainer_state_without_a_recipe_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let state = TrainerState::new(
            LoopState {
                step: 3,
                weight_version: 3,
                data_cursor: DataCursor {
                    seed: 0,
                    shuffle: true,
                    position: 48,
                    file_draws: vec![48],
                    files: vec!["ab".into()],
                    weights: vec![1.0],
                },
                kl_controller: KlController::from_config(&demo(&[]).train.loss),
                nonfinite_streak: 0,
                prefetched: Vec::new(),
                num_input_tokens_seen: 0.0,
            },
            &demo(&[]),
            1,
        );
        let mut v = serde_json::to_value(&state).unwrap();
        // As written before the recipe was recorded: a fingerprint instead.
        let obj = v.as_object_mut().unwrap();
        obj.remove("recipe");
        obj.insert("recipe_fingerprint".into(), serde_json::json!("ab12"));
        std::fs::write(dir.path().join(TRAINER_STATE_FILE), v.to_string()).unwrap();
        let loaded = TrainerState::load(dir.path()).unwrap();
        assert_eq!(loaded.recipe, None);
        assert_eq!(loaded.counters.step, 3);
    }

    /// A checkpoint written before a key existed resumes as if it had held
    /// the key's default; a non-default value is still a change.
    #[test]
    fn keys_a_checkpoint_predates_count_as_their_defaults() {
        let mut saved = demo(&[]).to_json_redacted();
        let train = saved["train"].as_object_mut().unwrap();
        train.remove("lr_scheduler_kwargs");
        train.remove("sapo_temperature_pos");
        saved["data"]
            .as_object_mut()
            .unwrap()
            .remove("chat_template_kwargs");
        assert_eq!(recipe_changes(&saved, &demo(&[])), Vec::new());
        let c = recipe_changes(&saved, &demo(&["train.sapo_temperature_pos=2.0"]));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key, "train.sapo_temperature_pos");
        assert_eq!(c[0].before, serde_json::json!(1.0));
        assert!(c[0].changes_training);
    }
}
