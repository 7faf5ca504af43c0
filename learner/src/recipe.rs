//! Recipes: the YAML file that says what a run does. Strict: an unknown key is
//! an error naming its full path and the closest valid one, a value of the
//! wrong type is an error naming the key, the expected type and the value.
//! Every default is written once, in the one `impl Default` of its section,
//! and [`Recipe::resolved_yaml`] shows them all.
//!
//! Names follow TRL's `GRPOConfig` where TRL has the knob (`learning_rate`,
//! `num_generations`, `max_completion_length`, `beta`, `epsilon`...). The GRPO
//! numerics ([`GrpoConfig`]) sit flat in `train`, as they do in TRL.
//!
//! Loading: YAML -> JSON value -> `section.key=value` overrides (each value
//! read as a YAML scalar or flow list) -> every key path checked against the
//! schema, which is `Recipe::default()` serialized -> deserialized ->
//! [`Recipe::validate`] checks the rules between fields.
//!
//! Relative paths (model folder, data files, output folder) are relative to
//! the working directory, as in TRL and open-r1.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::grpo_config::GrpoConfig;

/// The recipe format this learner reads.
pub const RECIPE_VERSION: u32 = 1;

/// The embedded default recipe (`configs/demo.yaml`).
pub const DEMO_YAML: &str = include_str!("../../configs/demo.yaml");

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source_name} is not valid YAML: {message}")]
    Yaml {
        source_name: String,
        message: String,
    },
    #[error(
        "{source_name} is a recipe of version {found}; this learner reads version \
         {RECIPE_VERSION} recipes (set `version: {RECIPE_VERSION}` and check the keys)"
    )]
    Version { source_name: String, found: String },
    #[error("unknown key {key} in {source_name}; {hint}")]
    UnknownKey {
        key: String,
        source_name: String,
        hint: String,
    },
    /// Every unknown key of a recipe at once (a recipe brought over from
    /// TRL or open-r1 has several), each with its hint.
    #[error("{} unknown keys in {source_name}:{}{note}", .keys.len(), list_unknown(.keys))]
    UnknownKeys {
        source_name: String,
        /// (key, hint)
        keys: Vec<(String, String)>,
        /// A closing remark (empty, or starting with a line break).
        note: String,
    },
    #[error("wrong type for {key} in {source_name}: {message}")]
    WrongType {
        key: String,
        source_name: String,
        message: String,
    },
    #[error("bad override {text:?}: {message} (expected section.key=value)")]
    BadOverride { text: String, message: String },
    #[error("invalid recipe: {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("cannot write the resolved recipe: {0}")]
    Serialize(String),
}

pub type Result<T, E = RecipeError> = std::result::Result<T, E>;

/// A recipe's sections, in the order a recipe lists them.
pub const SECTION_NAMES: &[&str] = &[
    "model",
    "data",
    "rollout",
    "reward",
    "train",
    "eval",
    "checkpoint",
    "log",
    "topology",
];

fn list_unknown(keys: &[(String, String)]) -> String {
    keys.iter().map(|(k, h)| format!("\n  {k}: {h}")).collect()
}

// ---------------------------------------------------------------------------
// The schema: one struct per section, one `impl Default` each.
// ---------------------------------------------------------------------------

/// A whole recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Format version; only [`RECIPE_VERSION`] is read.
    pub version: u32,
    pub model: ModelSection,
    pub data: DataSection,
    pub rollout: RolloutSection,
    pub reward: RewardSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    pub log: LogSection,
    pub topology: TopologySection,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            version: RECIPE_VERSION,
            model: ModelSection::default(),
            data: DataSection::default(),
            rollout: RolloutSection::default(),
            reward: RewardSection::default(),
            train: TrainSection::default(),
            eval: EvalSection::default(),
            checkpoint: CheckpointSection::default(),
            log: LogSection::default(),
            topology: TopologySection::default(),
        }
    }
}

/// The embedded models of the `model` crate, made on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelPreset {
    Tiny,
    Small,
    /// Qwen2.5-0.5B's shape, random weights (GPU runs and benchmarks).
    #[serde(rename = "qwen2.5-0.5b")]
    Qwen25_0_5B,
}

impl From<ModelPreset> for model::presets::Preset {
    fn from(p: ModelPreset) -> Self {
        match p {
            ModelPreset::Tiny => model::presets::Preset::Tiny,
            ModelPreset::Small => model::presets::Preset::Small,
            ModelPreset::Qwen25_0_5B => model::presets::Preset::Qwen25_0_5B,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// bf16 on CUDA, f32 on the CPU.
    Auto,
    #[serde(alias = "float32")]
    F32,
    #[serde(alias = "bfloat16")]
    Bf16,
    #[serde(alias = "float16")]
    F16,
}

impl From<Dtype> for model::device::DTypeSpec {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::Auto => model::device::DTypeSpec::Auto,
            Dtype::F32 => model::device::DTypeSpec::F32,
            Dtype::Bf16 => model::device::DTypeSpec::BF16,
            Dtype::F16 => model::device::DTypeSpec::F16,
        }
    }
}

/// The policy model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    pub path: Option<PathBuf>,
    /// Or an embedded model (`tiny`, `small`) made on first use.
    pub preset: Option<ModelPreset>,
    /// Seed of a preset's random initial weights.
    pub init_seed: u64,
    /// Weights and activations: `auto` (bf16 on CUDA, f32 on the CPU),
    /// `f32`, `bf16` or `f16`. Log-probs and the loss are reduced in f32.
    pub dtype: Dtype,
    /// `auto` (the first GPU when this build has CUDA and one answers),
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// TRL's `use_peft`: train LoRA adapters on a frozen base model (the
    /// `lora_*` keys below, as TRL's ModelConfig names them). Only the
    /// adapters have gradients, optimizer state and an all-reduce; the
    /// rollout servers get the merged weights; checkpoints hold the merged
    /// model and the adapter in PEFT's format (`adapter/`).
    pub use_peft: bool,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA scale numerator: the update is `lora_alpha / lora_r * B A`.
    pub lora_alpha: f64,
    /// PEFT's `lora_dropout`: each adapter's input is dropped out with this
    /// probability in the forwards that make the loss's gradients (PEFT's
    /// train mode), with masks seeded by the step, update, micro-batch and
    /// rank (a resumed run draws the same ones); never in generation, in the
    /// old and reference log-probs, or in the supervised warm-up. TRL's
    /// default is 0.05; Tandem's, as verl's and OpenRLHF's, 0.
    pub lora_dropout: f64,
    /// PEFT's `target_modules`: a list of module names (`q_proj`,
    /// `mlp.down_proj`, ...), `all-linear`, or one string taken as a regular
    /// expression over whole module names. Unset: PEFT's default for these
    /// architectures, `[q_proj, v_proj]`.
    pub lora_target_modules: Option<StringOrList>,
    /// rsLoRA: scale by `lora_alpha / sqrt(lora_r)`.
    pub use_rslora: bool,
    /// DoRA (TRL's and PEFT's `use_dora`): each adapted linear also trains
    /// a magnitude per output row, `m / ||W + s B A|| * (W + s B A)`, the
    /// norms constant in the backward pass, as PEFT computes it. Each
    /// forward pays for the `B A` product and its row norms; the rollout
    /// servers get the merged weights as with LoRA.
    pub use_dora: bool,
    /// PEFT's `modules_to_save` (TRL's `lora_modules_to_save`): modules
    /// trained whole beside the adapters, each matching the modules whose
    /// name ends with it (`lm_head`, `embed_tokens`: e.g. for tokens a chat
    /// template adds to a base model). Not with tied embeddings.
    pub lora_modules_to_save: Option<Vec<String>>,
    /// PEFT's task type: only `CAUSAL_LM`.
    pub lora_task_type: String,
    /// A PEFT LoRA adapter folder to start from instead of fresh adapters
    /// (verl's `lora_adapter_path`; an adapter trained with TRL's SFT, a
    /// checkpoint's `adapter/`), on `model.path` as its base. Its r, alpha,
    /// targets, rsLoRA and DoRA must be the `lora_*` keys'. A resume takes the
    /// checkpoint's adapters instead.
    pub lora_adapter_path: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: None,
            preset: None,
            init_seed: 0,
            dtype: Dtype::Auto,
            device: "auto".into(),
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            lora_target_modules: None,
            use_rslora: false,
            use_dora: false,
            lora_modules_to_save: None,
            lora_task_type: "CAUSAL_LM".into(),
            lora_adapter_path: None,
        }
    }
}

/// One string or a list of them (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl ModelSection {
    /// The LoRA adapters' shape when `use_peft` is on.
    pub fn lora(&self) -> Option<model::lora::LoraConfig> {
        use model::lora::TargetModules;
        if !self.use_peft {
            return None;
        }
        let target_modules = match &self.lora_target_modules {
            None => TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            Some(StringOrList::One(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(StringOrList::One(s)) => TargetModules::Regex(s.clone()),
            Some(StringOrList::Many(v)) => TargetModules::Names(v.clone()),
        };
        Some(model::lora::LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            target_modules,
            use_rslora: self.use_rslora,
            dropout: self.lora_dropout,
            use_dora: self.use_dora,
            modules_to_save: self.lora_modules_to_save.clone().unwrap_or_default(),
        })
    }
}

/// One data file of a mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataFile {
    /// A `.jsonl` or `.parquet` file, or a pattern (`*`, `?`, `[...]`)
    /// standing for the files it matches, read in name order as one dataset
    /// (a Hugging Face dataset's shards: `data/train-*.parquet`).
    pub path: PathBuf,
    /// Relative sampling weight within the mixture.
    pub weight: f64,
    /// SHA-256 (hex) the file must have (a pattern: of its files' hashes,
    /// one a line); the run stops when it has drifted.
    pub expected_hash: Option<String>,
}

impl Default for DataFile {
    fn default() -> Self {
        DataFile {
            path: PathBuf::new(),
            weight: 1.0,
            expected_hash: None,
        }
    }
}

impl DataFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataFile {
            path: path.into(),
            ..Default::default()
        }
    }
}

/// What to do with a question longer than `max_prompt_chars`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLongPrompt {
    /// Keep its first `max_prompt_chars` characters.
    Truncate,
    /// Stop with an error naming the file and the row.
    Reject,
}

/// Prompts and answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training mixture. In YAML a file is `{path, weight, expected_hash}` or
    /// just its path. May be empty with a `rollout.environment_factory`
    /// class, whose `reset()` writes the prompts.
    pub train_files: Vec<DataFile>,
    /// Held-out files for evaluation.
    pub eval_files: Vec<DataFile>,
    /// Column holding the question: text, or a conversation (TRL's format, a
    /// list of `{"role", "content"}` messages), which goes through the
    /// model's chat template whatever `prompt_template` says.
    pub prompt_column: String,
    /// Column holding the reference answer. A dotted name reads inside a
    /// struct (Parquet) or object (JSONL) column when no column has the
    /// name itself: verl's datasets use `reward_model.ground_truth`.
    pub answer_column: String,
    /// The column naming each row's source (verl's `data_source`), for
    /// `exact_match` with `extract: data_source` (verl's default scorer,
    /// chosen by it); none: not read.
    pub data_source_column: Option<String>,
    /// A system message (chat template), or text put before the prompt
    /// (plain template: at `{system_prompt}`, else on its own line first).
    pub system_prompt: Option<String>,
    /// `chat` (the model's chat template), a template containing
    /// `{question}`, or the path of a file holding such a template.
    pub prompt_template: String,
    /// More variables for the chat template, wherever it renders a prompt
    /// (`prompt_template: chat`, conversational rows), as TRL's and vLLM's
    /// `chat_template_kwargs`: e.g. `{enable_thinking: false}` for Qwen3.
    pub chat_template_kwargs: Map<String, Value>,
    /// A chat template in place of the model folder's (TRL's and open-r1's
    /// `chat_template`): the Jinja text, or the path of a file holding it
    /// (vLLM's `--chat-template` rule: text with `{` or a line break is the
    /// template). Checkpoints save it as their `chat_template.jinja`.
    pub chat_template: Option<String>,
    /// Longest question of a text column, in characters (before the
    /// template); `rollout.max_prompt_length` limits tokens of any prompt.
    pub max_prompt_chars: Option<usize>,
    pub on_long_prompt: OnLongPrompt,
    /// verl's `filter_overlong_prompts`: rows whose prompt (templated) is
    /// longer than `rollout.max_prompt_length` tokens are left out of the
    /// training and eval files when they load (each file's count is printed
    /// and in the manifest); off: such prompts keep their last tokens, as
    /// TRL cuts them.
    pub filter_overlong_prompts: bool,
    /// Reshuffle each file every epoch (from `train.seed`); file order otherwise.
    pub shuffle: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train_files: Vec::new(),
            eval_files: Vec::new(),
            prompt_column: "prompt".into(),
            answer_column: "answer".into(),
            data_source_column: None,
            system_prompt: None,
            prompt_template: "chat".into(),
            chat_template_kwargs: Map::new(),
            chat_template: None,
            max_prompt_chars: None,
            on_long_prompt: OnLongPrompt::Reject,
            filter_overlong_prompts: false,
            shuffle: true,
        }
    }
}

/// Whether a group's echoed `client_tag` must be the rank's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientTagEcho {
    /// Drop (and count) groups whose echoed tag is missing or foreign.
    Require,
    /// Stock vLLM echoes nothing: accept every group.
    Ignore,
}

/// Generation: the endpoints and the sampling knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSection {
    /// Base URLs of OpenAI-compatible servers (`http://host:8000`); empty:
    /// the launcher starts and names them.
    pub endpoints: Vec<String>,
    /// Bearer key of the endpoints (vLLM `--api-key`).
    pub api_key: Option<String>,
    /// `model` field of requests; none: the first of `/v1/models`.
    pub model: Option<String>,
    /// `/v1/chat/completions` instead of `/v1/completions`.
    pub use_chat: bool,
    /// Completions per prompt (the group size G).
    pub num_generations: usize,
    /// Longest prompt in tokens (left-truncated, as TRL); none: no limit.
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<u32>,
    pub min_p: Option<f64>,
    pub repetition_penalty: f64,
    /// Tag sent with each request; none: `rank-R`.
    pub client_tag: Option<String>,
    pub client_tag_echo: ClientTagEcho,
    /// 0: on-policy; 1: the next step's completions are generated while this
    /// step trains.
    pub async_lag: u32,
    /// Deadline of one generation request.
    pub request_timeout_s: f64,
    /// Retries (with backoff) on connection errors and 5xx.
    pub max_retries: u32,
    /// gRPC WeightSync addresses (`http://host:50051`); empty: the launcher's.
    pub weight_sync_endpoints: Vec<String>,
    /// Bearer token of the WeightSync service.
    pub weight_sync_token: Option<String>,
    /// Deadline of one weight push.
    pub weight_sync_timeout_s: f64,
    /// `--gpu-memory-utilization` of the rollout servers the launcher starts
    /// (TRL's `vllm_gpu_memory_utilization`); none: 0.9 alone on a GPU, 0.3
    /// when sharing one with a learner.
    pub gpu_memory_utilization: Option<f64>,
    /// TRL's `generation_kwargs`: more vLLM sampling parameters, sent as
    /// they are with every generation request (training and eval):
    /// `stop`, `stop_token_ids`, `include_stop_str_in_output`,
    /// `presence_penalty`, `frequency_penalty`, `ignore_eos`,
    /// `min_tokens`... Those the rollout keys set (`temperature`, `n`,
    /// `max_tokens`...) are refused here: the learner scores tokens with the
    /// recipe's values.
    pub generation_kwargs: Map<String, Value>,
    /// Tools the policy may call during a rollout (TRL's `tools`), each an
    /// HTTP endpoint or a Python function. The chat template lists them in
    /// the prompt; a completion that calls them gets their results as tool
    /// messages and goes on generating, and the tool messages' tokens are
    /// left out of the loss. Needs chat prompts.
    pub tools: Vec<Tool>,
    /// How the model writes its calls (vLLM's `--tool-call-parser`):
    /// `hermes` (`<tool_call>` blocks: Qwen2.5, Qwen3, Hermes) or
    /// `llama3_json`.
    pub tool_call_parser: String,
    /// Tool rounds per completion at most (TRL's); none: until the
    /// completion stops calling or reaches `max_completion_length`.
    pub max_tool_calling_iterations: Option<usize>,
    /// Deadline of one tool call; a call past it returns an error to the
    /// model.
    pub tool_timeout_s: f64,
    /// Python processes that run the `python` tools' calls, one call each
    /// at a time but `async def` ones, which run at once (each imports the
    /// tools: module state is per process). 1, TRL's one process, keeps one
    /// state for all calls.
    pub python_tool_processes: usize,
    /// TRL's `environment_factory` (`FILE.py:CLASS` or `MODULE:CLASS`, a
    /// class or function of no arguments; or a map of names to such, each
    /// row choosing by its `environment` column): one instance per
    /// completion, `reset(**row)` with the row's columns (and its `prompt`
    /// messages) before it is generated, a string it returns appended to
    /// the prompt's last message; the instance's public methods (but
    /// `reset` and `get_reward`) are tools of that completion, beside
    /// `tools`; `get_reward()`, where the class has it, is a reward;
    /// `python` reward functions get the instances as `environments`.
    /// Instances live in the tools' Python process, with the reward
    /// functions, and are reset again for later completions. Needs chat
    /// prompts.
    pub environment_factory: Option<EnvironmentFactory>,
}

/// `rollout.environment_factory`: one class for every row, or, as TRL's
/// dict, one per name, each row naming its own in its `environment`
/// column (its tools are the standalone ones and that class's methods).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a FILE.py:CLASS (or MODULE:CLASS) spec, or a map of environment names to such \
                 specs"
)]
pub enum EnvironmentFactory {
    One(String),
    Named(std::collections::BTreeMap<String, String>),
}

impl EnvironmentFactory {
    /// Each factory: its name (none for the one of every row) and spec.
    pub fn entries(&self) -> Vec<(Option<&str>, &str)> {
        match self {
            EnvironmentFactory::One(spec) => vec![(None, spec.as_str())],
            EnvironmentFactory::Named(named) => named
                .iter()
                .map(|(name, spec)| (Some(name.as_str()), spec.as_str()))
                .collect(),
        }
    }

    /// The recipe key of a factory of [`Self::entries`].
    pub fn key(name: Option<&str>) -> String {
        match name {
            None => "rollout.environment_factory".into(),
            Some(name) => format!("rollout.environment_factory.{name}"),
        }
    }
}

/// One tool of `rollout.tools`: its function definition as the chat
/// template shows it (OpenAI's `{"type": "function", "function": {name,
/// description, parameters}}`), and where it runs: `POST url` with the
/// call's arguments (a JSON object) as the body; the response body is the
/// result the model reads (a JSON string is unquoted). Or `python`, a
/// Python function (`FILE.py:NAME` or `MODULE:NAME`) run by the learner, its
/// definition read from its signature and docstring as TRL reads its tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments.
    pub parameters: Value,
    pub url: String,
    /// A Python function instead of an endpoint: `path/to/tools.py:add`
    /// (relative to the working directory) or `package.module:add`.
    pub python: Option<String>,
}

impl Default for Tool {
    fn default() -> Self {
        Tool {
            name: String::new(),
            description: String::new(),
            parameters: Tool::no_parameters(),
            url: String::new(),
            python: None,
        }
    }
}

impl Tool {
    fn no_parameters() -> Value {
        serde_json::json!({"type": "object", "properties": {}})
    }

    /// The definition the chat template renders (of an HTTP tool: a Python
    /// function's comes from the function, [`crate::tools::ToolRunner`]).
    pub fn definition(&self) -> Value {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        })
    }
}

impl Default for RolloutSection {
    fn default() -> Self {
        RolloutSection {
            endpoints: Vec::new(),
            api_key: None,
            model: None,
            use_chat: false,
            num_generations: 8,
            max_prompt_length: Some(512),
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: None,
            repetition_penalty: 1.0,
            client_tag: None,
            client_tag_echo: ClientTagEcho::Require,
            async_lag: 0,
            request_timeout_s: 600.0,
            max_retries: 3,
            weight_sync_endpoints: Vec::new(),
            weight_sync_token: None,
            weight_sync_timeout_s: 120.0,
            gpu_memory_utilization: None,
            generation_kwargs: Map::new(),
            tools: Vec::new(),
            tool_call_parser: "hermes".into(),
            max_tool_calling_iterations: None,
            tool_timeout_s: 30.0,
            python_tool_processes: 1,
            environment_factory: None,
        }
    }
}

/// One reward function: a registry name, a weight, and its own parameters
/// (checked by the reward registry, not here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RewardFunction {
    pub name: String,
    pub weight: f64,
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

impl Default for RewardFunction {
    fn default() -> Self {
        RewardFunction {
            name: String::new(),
            weight: 1.0,
            params: Map::new(),
        }
    }
}

/// (Its one default, no function, is derived.)
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSection {
    /// The total reward is the weighted sum; each is logged on its own.
    pub functions: Vec<RewardFunction>,
}

impl RewardSection {
    /// Whether rows keep their other columns: `python` reward functions
    /// take them, as TRL passes every column to its reward functions.
    pub fn takes_row_columns(&self) -> bool {
        self.functions.iter().any(|f| f.name == "python")
    }
}

/// TRL / transformers `lr_scheduler_type`; warmup applies to each
/// (`constant` is transformers' `constant_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    /// Cosine down to `lr_scheduler_kwargs.min_lr_rate x learning_rate`
    /// (or `min_lr`), as open-r1's recipes use it.
    CosineWithMinLr,
}

impl LrSchedulerType {
    /// Whether the rate at a step depends on `max_steps` after warmup.
    pub fn decays(self) -> bool {
        matches!(
            self,
            LrSchedulerType::Linear | LrSchedulerType::Cosine | LrSchedulerType::CosineWithMinLr
        )
    }
}

/// Warm-up steps whose mean loss `train.sft_target_loss` compares: long
/// enough to average out one batch's luck, short enough to follow the curve.
pub const SFT_TARGET_LOSS_WINDOW: u64 = 50;

/// Optimization. The GRPO numerics ([`GrpoConfig`]: `loss_type`, `beta`,
/// `epsilon`...) sit flat here, as in TRL's `GRPOConfig`.
///
/// serde cannot combine `flatten` with `deny_unknown_fields`, so this struct
/// has no `deny_unknown_fields`: the recipe loader checks every key against
/// the schema before deserializing, which rejects unknown keys here too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSection {
    pub learning_rate: f64,
    pub lr_scheduler_type: LrSchedulerType,
    /// transformers' `lr_scheduler_kwargs`: for `cosine_with_min_lr`, one of
    /// `min_lr_rate` (the floor as a fraction of `learning_rate`) or `min_lr`;
    /// no other schedule takes any.
    pub lr_scheduler_kwargs: Map<String, Value>,
    /// Warmup as a fraction of `max_steps` (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    pub warmup_steps: u64,
    /// Steps of the run: each generates a batch and makes `num_iterations
    /// x steps_per_generation / gradient_accumulation_steps` optimizer
    /// updates on it (TRL counts the updates). 0 or -1 (TRL's "not set"):
    /// `num_train_epochs` decides; a recipe that sets `num_train_epochs`
    /// and not this key gets 0.
    #[serde(deserialize_with = "max_steps_or_unset")]
    pub max_steps: u64,
    /// Passes over the training prompts (TRL's `num_train_epochs`; may be
    /// fractional), used when `max_steps` is 0 or -1: whole steps per pass
    /// (a last partial step is dropped, as TRL's sampler does) times the
    /// passes, rounded up, as transformers counts. Each prompt is used once
    /// per pass; in a weighted mixture a pass is as many draws as the
    /// files hold rows.
    pub num_train_epochs: Option<f64>,
    /// Completions per rank per micro-batch, as TRL; a multiple of
    /// `rollout.num_generations` so that groups are never split.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer update.
    pub gradient_accumulation_steps: usize,
    /// Micro-batches cut by size instead of by count (verl's
    /// `use_dynamic_bsz` + `ppo_max_token_len_per_gpu`, OpenRLHF's
    /// `--use_dynamic_batch` + `--train_max_tokens_per_gpu`): each takes an
    /// update's rows, ordered by length, while `rows x (longest prompt +
    /// longest completion)` stays within this many tokens (a longer row goes
    /// alone). Short completions then share a forward pass, and a
    /// micro-batch's memory is bounded whatever the lengths. The updates and
    /// their rows are unchanged (per_device_train_batch_size and
    /// gradient_accumulation_steps still size them), and so are the
    /// gradients. None: `gradient_accumulation_steps` micro-batches of
    /// `per_device_train_batch_size` rows.
    pub max_tokens_per_micro_batch: Option<usize>,
    /// TRL's `steps_per_generation`: micro-batches generated at once, a
    /// multiple of `gradient_accumulation_steps`; none: equal to it. Each
    /// step generates this many micro-batches and makes
    /// `steps_per_generation / gradient_accumulation_steps` optimizer
    /// updates on them, one after the other (the later ones off-policy, the
    /// importance ratio against the generating policy correcting for it).
    pub steps_per_generation: Option<usize>,
    /// TRL's `generation_batch_size`: completions generated at once over
    /// all ranks, the other way to set `steps_per_generation` (=
    /// `generation_batch_size / (per_device_train_batch_size x learner
    /// ranks)`), resolved when the ranks are known; not both.
    pub generation_batch_size: Option<usize>,
    /// Passes over each generated batch (TRL's mu), each making
    /// `steps_per_generation / gradient_accumulation_steps` optimizer
    /// updates, all within one step; the learning rate moves with each
    /// update, as TRL's scheduler (over all the run's updates).
    pub num_iterations: usize,
    /// Global gradient-norm clip; 0: none.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Seeds data order, sampling seeds and initialization.
    pub seed: u64,
    /// NaN guard: the run stops after this many non-finite steps in a row.
    pub max_nonfinite_steps: u32,
    /// Supervised warm-up on the task's format before GRPO: this many
    /// cross-entropy steps on `prompt + answer + EOS` pairs of the training
    /// data (gradients all-reduced), at the start of a fresh run, before the
    /// first eval. Logged to train_log with `phase: "sft"` (and `sft_step`,
    /// no `step`). 0: none.
    pub sft_warmup_steps: u64,
    /// Peak learning rate of the warm-up (its own AdamW, dropped after it);
    /// none: `learning_rate`.
    pub sft_learning_rate: Option<f64>,
    /// How the warm-up's rate moves over its `sft_warmup_steps` (no warmup
    /// of its own): `constant`, or `linear` / `cosine` down to 0 at its last
    /// step, as `lr_scheduler_type` does over the GRPO steps. A decaying
    /// rate ends the warm-up in a minimum rather than wherever its last
    /// noisy step left it.
    pub sft_lr_scheduler_type: LrSchedulerType,
    /// Early stop of the warm-up: it ends at the first step where its
    /// loss, averaged over the last [`SFT_TARGET_LOSS_WINDOW`] steps, is at
    /// or below this; `sft_warmup_steps` stays the most it runs. The loss
    /// says how far the warm-up got, which a fixed number of steps does not:
    /// the same steps end far apart with another seed or other
    /// floating-point kernels. None: all `sft_warmup_steps`.
    pub sft_target_loss: Option<f64>,
    /// Pairs per rank per warm-up step; none: `per_device_train_batch_size`.
    pub sft_batch_size: Option<usize>,
    /// Recompute the vocabulary logits in the backward pass instead of
    /// keeping them from the forward: a micro-batch's memory then no longer
    /// grows with the vocabulary (several MB per token at 150k), for one more
    /// `hidden x vocab` product per token. The same gradients, to rounding.
    pub recompute_logits: bool,
    /// TRL's / transformers' `gradient_checkpointing`: the forward keeps
    /// only each decoder layer's input, and the backward runs every layer
    /// again before back-propagating through it. Activation memory no
    /// longer grows with the layers' insides (attention scores, the MLP's
    /// intermediate products), for about one more forward pass of compute.
    /// The same gradients, to rounding. Needs `recompute_logits`. The
    /// supervised warm-up (`sft_warmup_steps`) uses it too.
    pub gradient_checkpointing: bool,
    /// TRL's `mask_truncated_completions` (DAPO's overlong filtering):
    /// completions cut at `rollout.max_completion_length` are left out of
    /// the loss. They still count in their group's advantages.
    pub mask_truncated_completions: bool,
    /// DAPO's dynamic sampling (verl's `algorithm.filter_groups.enable`,
    /// OpenRLHF's `--dynamic_filtering`): a group without a learning signal
    /// (its `dynamic_sampling_metric` values all equal, or their mean
    /// outside `dynamic_sampling_reward_range`) is left out, and more
    /// prompts are generated, round after round, until the step holds as
    /// many groups as it would without the filter (the first that pass, in
    /// order; any beyond are dropped, as verl trims its batch). A run sized
    /// by `num_train_epochs` keeps its number of steps and so draws more
    /// prompts than that many passes hold.
    pub dynamic_sampling: bool,
    /// The values that decide: `reward` (none: the same; the weighted
    /// total, verl's `score` / `seq_reward`) or one reward function's
    /// label (verl's `acc`: the correctness function).
    pub dynamic_sampling_metric: Option<String>,
    /// OpenRLHF's `dynamic_filtering_reward_range` `[low, high]`: a group is
    /// kept when its mean metric lies strictly between them; none: when its
    /// metric values are not all equal (verl: std > 0).
    pub dynamic_sampling_reward_range: Option<[f64; 2]>,
    /// Prompts per generation round over all learner ranks (verl's
    /// `data.gen_batch_size`, DAPO's 3x the step's prompts: fewer, larger
    /// rounds); none: the step's prompts. A multiple of the learner ranks.
    pub dynamic_sampling_batch_prompts: Option<usize>,
    /// verl's `max_num_gen_batches`: generation rounds a step may make; 0:
    /// as many as one pass over the training prompts takes. A step that
    /// found fewer groups than it holds trains on those (a `warn` event
    /// says so); one that found none stops the run with an error.
    pub max_num_gen_batches: u32,
    /// TRL's `sync_ref_model` (TR-DPO's reference updates): every
    /// `ref_model_sync_steps` steps the KL reference becomes `alpha x policy
    /// + (1 - alpha) x reference`, `alpha` = `ref_model_mixup_alpha`.
    /// Needs `beta > 0` (otherwise there is no reference).
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f64,
    pub ref_model_sync_steps: u64,
    #[serde(flatten)]
    pub loss: GrpoConfig,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            learning_rate: 1e-6,
            lr_scheduler_type: LrSchedulerType::Linear,
            lr_scheduler_kwargs: Map::new(),
            warmup_ratio: 0.0,
            warmup_steps: 0,
            max_steps: 1000,
            num_train_epochs: None,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_tokens_per_micro_batch: None,
            steps_per_generation: None,
            generation_batch_size: None,
            num_iterations: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            max_nonfinite_steps: 3,
            sft_warmup_steps: 0,
            sft_learning_rate: None,
            sft_lr_scheduler_type: LrSchedulerType::Constant,
            sft_target_loss: None,
            sft_batch_size: None,
            recompute_logits: true,
            gradient_checkpointing: false,
            mask_truncated_completions: false,
            dynamic_sampling: false,
            dynamic_sampling_metric: None,
            dynamic_sampling_reward_range: None,
            dynamic_sampling_batch_prompts: None,
            max_num_gen_batches: 10,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            loss: GrpoConfig::default(),
        }
    }
}

impl TrainSection {
    /// The floor of `cosine_with_min_lr` as a fraction of `learning_rate`
    /// (`min_lr_rate`, or `min_lr / learning_rate`); 0 for the others.
    pub fn min_lr_rate(&self) -> f64 {
        let kw = &self.lr_scheduler_kwargs;
        if self.lr_scheduler_type != LrSchedulerType::CosineWithMinLr {
            return 0.0;
        }
        match (kw.get("min_lr_rate"), kw.get("min_lr")) {
            (Some(rate), _) => rate.as_f64().unwrap_or(0.0),
            (None, Some(min)) if self.learning_rate > 0.0 => {
                min.as_f64().unwrap_or(0.0) / self.learning_rate
            }
            _ => 0.0,
        }
    }

    /// Micro-batches generated per step: `steps_per_generation`, or
    /// `gradient_accumulation_steps`.
    pub fn steps_per_generation(&self) -> usize {
        self.steps_per_generation
            .unwrap_or(self.gradient_accumulation_steps)
            .max(1)
    }

    /// Optimizer updates per pass over a step's batch.
    pub fn updates_per_generation(&self) -> usize {
        (self.steps_per_generation() / self.gradient_accumulation_steps.max(1)).max(1)
    }
}

/// `train.max_steps`: a count of steps, or a negative number (TRL's -1,
/// "not set"), read as 0: `num_train_epochs` decides.
fn max_steps_or_unset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = i64::deserialize(d)?;
    Ok(v.max(0) as u64)
}

/// transformers' `logging_steps` / `eval_steps` / `save_steps`: a whole
/// number of steps, or a fraction in (0, 1) of the run's steps (rounded
/// up), resolved once the run's length is known.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StepInterval {
    Steps(u64),
    Fraction(f64),
}

impl StepInterval {
    /// The interval in steps, in a run of `max_steps`.
    pub fn steps(self, max_steps: u64) -> u64 {
        match self {
            StepInterval::Steps(n) => n,
            StepInterval::Fraction(f) => (f * max_steps as f64).ceil() as u64,
        }
    }

    /// Whether it is 0 (never).
    pub fn is_never(self) -> bool {
        self == StepInterval::Steps(0)
    }

    /// A fraction outside (0, 1): what is wrong with it.
    fn problem(self) -> Option<String> {
        match self {
            StepInterval::Fraction(f) if !(f > 0.0 && f < 1.0) => Some(format!(
                "must be a whole number of steps or a fraction in (0, 1) of the run, got {f}"
            )),
            _ => None,
        }
    }
}

/// A whole number (`100`, or `100.0`) is steps, any other number a
/// fraction (checked by [`Recipe::validate`]).
impl<'de> Deserialize<'de> for StepInterval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if let Some(n) = v.as_u64() {
            return Ok(StepInterval::Steps(n));
        }
        match v.as_f64() {
            Some(f) if f >= 1.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                Ok(StepInterval::Steps(f as u64))
            }
            Some(f) => Ok(StepInterval::Fraction(f)),
            None => Err(serde::de::Error::custom(format!(
                "expected a whole number of steps or a fraction in (0, 1) of the run, got {v}"
            ))),
        }
    }
}

/// When checkpoints or evals happen: transformers' `save_strategy` /
/// `eval_strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalStrategy {
    /// Never during the run.
    No,
    /// Every `save_steps` / `eval_steps` steps.
    Steps,
    /// At the end of each pass over the training prompts (see
    /// `train.num_train_epochs`).
    Epoch,
}

impl IntervalStrategy {
    /// Whether `step` is on the schedule: a multiple of `every` (0: none)
    /// for `steps`, the last step of a pass of `steps_per_epoch` for `epoch`.
    pub fn due(self, step: u64, every: u64, steps_per_epoch: Option<u64>) -> bool {
        match self {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => every > 0 && step.is_multiple_of(every),
            IntervalStrategy::Epoch => {
                steps_per_epoch.is_some_and(|n| n > 0 && step.is_multiple_of(n))
            }
        }
    }
}

/// `no`, `steps` or `epoch`; also YAML 1.1's unquoted `no` (false), which
/// transformers recipes write quoted for that reason.
impl<'de> Deserialize<'de> for IntervalStrategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(false) => Ok(IntervalStrategy::No),
            Value::String(s) if s == "no" => Ok(IntervalStrategy::No),
            Value::String(s) if s == "steps" => Ok(IntervalStrategy::Steps),
            Value::String(s) if s == "epoch" => Ok(IntervalStrategy::Epoch),
            other => Err(serde::de::Error::custom(format!(
                "expected one of `no`, `steps`, `epoch`, got {other}"
            ))),
        }
    }
}

/// Validation on the held-out files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// transformers' `eval_strategy`: `steps` (every `eval_steps`),
    /// `epoch` (each pass's end) or `no`. Any but `no` also evaluates
    /// before the first step and after the last.
    pub eval_strategy: IntervalStrategy,
    /// Validate every N steps (see `train.max_steps`), or that fraction of
    /// the run; 0: never.
    pub eval_steps: StepInterval,
    /// Samples per question (the k of pass@k and mean@k).
    pub num_samples: usize,
    /// Evaluate on the first N questions of each eval file only (each
    /// benchmark keeps its share); none: all. With several eval files,
    /// eval_log.jsonl also reports each on its own (`per_file`).
    pub max_examples: Option<usize>,
    /// 0: greedy.
    pub temperature: f64,
}

impl EvalSection {
    /// Whether the run evaluates at all (before the first step, on the
    /// schedule, after the last).
    pub fn enabled(&self) -> bool {
        match self.eval_strategy {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => !self.eval_steps.is_never(),
            IntervalStrategy::Epoch => true,
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: StepInterval::Steps(0),
            num_samples: 1,
            max_examples: None,
            temperature: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// transformers' `save_strategy`: `steps` (every `save_steps`), `epoch`
    /// (each pass's end) or `no`. The last step is saved whatever it says:
    /// that checkpoint is the trained model.
    pub save_strategy: IntervalStrategy,
    /// Checkpoint every N steps (see `train.max_steps`), or that fraction
    /// of the run; 0: never.
    pub save_steps: StepInterval,
    /// Keep the newest N checkpoints; none: all.
    pub save_total_limit: Option<usize>,
    /// The run folder.
    pub output_dir: PathBuf,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            save_strategy: IntervalStrategy::Steps,
            save_steps: StepInterval::Steps(100),
            save_total_limit: None,
            output_dir: PathBuf::from("runs/tandem"),
        }
    }
}

/// How the launcher shows rank 0's progress on its stderr (`learner train`
/// itself always prints lines, which the launcher reads from its log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// A bar when stderr is a terminal, lines otherwise.
    Auto,
    /// A bar even when stderr does not look like a terminal.
    Bar,
    /// One `launcher: rank 0: step ...` line per logged step.
    Plain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Write a train_log line (and a progress line) every N steps, or that
    /// fraction of the run.
    pub logging_steps: StepInterval,
    /// Also log step 1 (transformers' `logging_first_step`).
    pub logging_first_step: bool,
    pub progress: Progress,
    /// TRL's `log_completions`: at each logged step, every rank's prompts,
    /// completions, rewards and advantages go to completions.jsonl.
    pub log_completions: bool,
    /// TRL's `num_completions_to_print`: how many of them rank 0 also
    /// prints (the launcher shows them); none: all.
    pub num_completions_to_print: Option<usize>,
    /// TRL's `report_to`: `[tensorboard]` also writes the train and eval
    /// logs' numbers as TensorBoard scalars to `<output_dir>/runs`; `[]` or
    /// `none`: only the run folder's JSONL logs. Nothing leaves the machine,
    /// so `wandb` and the other online trackers are refused. A single
    /// string is accepted as a list of one.
    #[serde(deserialize_with = "one_or_many")]
    pub report_to: Vec<String>,
}

/// A YAML string or a list of strings, as TRL takes `report_to`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl LogSection {
    /// Whether `report_to` asks for TensorBoard event files.
    pub fn tensorboard(&self) -> bool {
        self.report_to
            .iter()
            .any(|r| r == "tensorboard" || r == "all")
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            logging_steps: StepInterval::Steps(1),
            logging_first_step: false,
            progress: Progress::Auto,
            log_completions: false,
            num_completions_to_print: None,
            report_to: Vec::new(),
        }
    }
}

/// How the launcher places processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologySection {
    pub nodes: usize,
    /// 0: CPU only.
    pub gpus_per_node: usize,
    /// Data-parallel replicas inside each rollout server (vLLM's name).
    pub dp: usize,
    /// Tensor-parallel degree of each rollout replica (vLLM's name).
    pub tp: usize,
    /// Learner processes (the world size of the gradient all-reduce).
    pub learner_ranks: usize,
    /// Rollout servers the launcher starts; 0: only `rollout.endpoints`.
    pub rollout_servers: usize,
}

impl Default for TopologySection {
    fn default() -> Self {
        TopologySection {
            nodes: 1,
            gpus_per_node: 0,
            dp: 1,
            tp: 1,
            learner_ranks: 1,
            rollout_servers: 1,
        }
    }
}

// ---------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------

impl Recipe {
    /// Reads a recipe file and applies `section.key=value` overrides.
    pub fn load<S: AsRef<str>>(path: &Path, overrides: &[S]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Recipe::from_yaml_str(&text, &path.display().to_string(), overrides)
    }

    /// The embedded default recipe (`configs/demo.yaml`) with overrides.
    pub fn demo<S: AsRef<str>>(overrides: &[S]) -> Result<Recipe> {
        Recipe::from_yaml_str(DEMO_YAML, "demo.yaml", overrides)
    }

    /// Parses recipe text; `source_name` is how errors name it.
    pub fn from_yaml_str<S: AsRef<str>>(
        text: &str,
        source_name: &str,
        overrides: &[S],
    ) -> Result<Recipe> {
        let raw: Value = serde_saphyr::from_str(text).map_err(|e| RecipeError::Yaml {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        Recipe::from_value(raw, source_name, overrides)
    }

    /// Builds a recipe from an already parsed document (YAML or JSON).
    pub fn from_value<S: AsRef<str>>(
        mut raw: Value,
        source_name: &str,
        overrides: &[S],
    ) -> Result<Recipe> {
        if raw.is_null() {
            raw = Value::Object(Map::new());
        }
        if !raw.is_object() {
            return Err(RecipeError::WrongType {
                key: "(top level)".into(),
                source_name: source_name.into(),
                message: format!(
                    "expected a mapping of sections (model, data, rollout, ...), got {}",
                    short(&raw)
                ),
            });
        }
        let schema = Schema::recipe();
        check_version(&raw, source_name)?;
        normalize(&mut raw);
        unknown_keys(&raw, &schema, source_name)?;

        let mut overridden: Vec<(Vec<Seg>, String)> = Vec::new();
        for text in overrides {
            let text = text.as_ref();
            let (path, value) = parse_override(text)?;
            let source = format!("override {text}");
            check_path(&path, &schema, &source)?;
            set_path(&mut raw, &path, value).map_err(|message| RecipeError::BadOverride {
                text: text.to_string(),
                message,
            })?;
            overridden.push((path, source));
        }
        check_version(&raw, overridden_source(&overridden, "version", source_name))?;
        normalize(&mut raw);
        // An override may set a whole object or list: check below it too.
        unknown_keys(&raw, &schema, source_name).map_err(|e| match e {
            RecipeError::UnknownKey { key, hint, .. } => RecipeError::UnknownKey {
                source_name: overridden
                    .iter()
                    .rev()
                    .find(|(p, _)| key.starts_with(&path_string(p)))
                    .map_or(source_name, |(_, s)| s.as_str())
                    .to_string(),
                key,
                hint,
            },
            other => other,
        })?;

        epochs_without_max_steps(&mut raw);
        let recipe = deserialize(&raw, &schema, source_name, &overridden)?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Rules between fields, and ranges serde cannot express. Errors name
    /// the key.
    pub fn validate(&self) -> Result<()> {
        /// `Err(Invalid)` naming `key` unless `ok`.
        fn ensure(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(RecipeError::Invalid {
                    key: key.to_string(),
                    message: message(),
                })
            }
        }
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;

        ensure(self.version == RECIPE_VERSION, "version", || {
            format!(
                "only version {RECIPE_VERSION} is read, got {}",
                self.version
            )
        })?;

        let m = &self.model;
        ensure(m.path.is_some() || m.preset.is_some(), "model", || {
            "set model.path (a Hugging Face folder) or model.preset (tiny | small)".into()
        })?;
        ensure(m.path.is_none() || m.preset.is_none(), "model", || {
            "model.path and model.preset are both set; keep one".into()
        })?;
        ensure(valid_device(&m.device), "model.device", || {
            format!("expected auto, cpu, cuda or cuda:N, got {:?}", m.device)
        })?;
        ensure(
            m.use_peft || m.lora_adapter_path.is_none(),
            "model.lora_adapter_path",
            || "needs model.use_peft: true".into(),
        )?;
        ensure(m.use_peft || !m.use_dora, "model.use_dora", || {
            "DoRA trains adapters: it needs model.use_peft: true".into()
        })?;
        if m.use_peft {
            ensure(m.lora_r >= 1, "model.lora_r", || "must be >= 1".into())?;
            ensure(pos(m.lora_alpha), "model.lora_alpha", || {
                format!("must be > 0, got {}", m.lora_alpha)
            })?;
            ensure(
                (0.0..1.0).contains(&m.lora_dropout),
                "model.lora_dropout",
                || format!("must be in [0, 1), got {}", m.lora_dropout),
            )?;
            ensure(
                m.lora_task_type.eq_ignore_ascii_case("CAUSAL_LM"),
                "model.lora_task_type",
                || format!("only CAUSAL_LM, got {:?}", m.lora_task_type),
            )?;
            if let Some(StringOrList::Many(v)) = &m.lora_target_modules {
                ensure(!v.is_empty(), "model.lora_target_modules", || {
                    "is empty: name modules (q_proj, v_proj, ...) or all-linear".into()
                })?;
            }
            if let Some(StringOrList::One(s)) = &m.lora_target_modules
                && s != "all-linear"
            {
                ensure(
                    regex::Regex::new(s).is_ok(),
                    "model.lora_target_modules",
                    || {
                        format!(
                            "{s:?} is neither all-linear nor a valid regular expression (a \
                             list names modules: [q_proj, v_proj])"
                        )
                    },
                )?;
            }
        }

        let d = &self.data;
        // An environment may write the prompts (TRL's environment-owned
        // data: its `reset()` returns them), with no files at all.
        let environment = &self.rollout.environment_factory;
        ensure(
            !d.train_files.is_empty() || matches!(environment, Some(EnvironmentFactory::One(_))),
            "data.train_files",
            || match environment {
                Some(EnvironmentFactory::Named(_)) => "no training data: with \
                    rollout.environment_factory a map, each row names its environment (an \
                    `environment` column): list the files"
                    .into(),
                _ => "no training data: list at least one .jsonl or .parquet file (or give \
                      rollout.environment_factory a class whose reset() writes the prompts)"
                    .into(),
            },
        )?;
        for (list, files) in [
            ("train_files", &d.train_files),
            ("eval_files", &d.eval_files),
        ] {
            for (i, f) in files.iter().enumerate() {
                let key = |field: &str| format!("data.{list}[{i}].{field}");
                ensure(!f.path.as_os_str().is_empty(), &key("path"), || {
                    "is empty".into()
                })?;
                ensure(pos(f.weight), &key("weight"), || {
                    format!("must be > 0, got {}", f.weight)
                })?;
                let hex64 = |h: &String| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit());
                ensure(
                    f.expected_hash.as_ref().is_none_or(hex64),
                    &key("expected_hash"),
                    || {
                        format!(
                            "must be a SHA-256 in hex (64 characters), got {:?}",
                            f.expected_hash
                        )
                    },
                )?;
            }
        }
        ensure(!d.prompt_column.is_empty(), "data.prompt_column", || {
            "is empty".into()
        })?;
        ensure(!d.answer_column.is_empty(), "data.answer_column", || {
            "is empty".into()
        })?;
        ensure(
            !d.prompt_template.is_empty(),
            "data.prompt_template",
            || "is empty: use `chat`, a template containing {question}, or a file".into(),
        )?;
        ensure(
            d.max_prompt_chars != Some(0),
            "data.max_prompt_chars",
            || "must be > 0 (or null)".into(),
        )?;

        let r = &self.rollout;
        for (key, urls) in [
            ("rollout.endpoints", &r.endpoints),
            ("rollout.weight_sync_endpoints", &r.weight_sync_endpoints),
        ] {
            for u in urls {
                ensure(
                    u.starts_with("http://") || u.starts_with("https://"),
                    key,
                    || format!("expected http://host:port URLs, got {u:?}"),
                )?;
            }
        }
        ensure(r.num_generations >= 2, "rollout.num_generations", || {
            format!(
                "GRPO compares completions within a group: must be >= 2, got {}",
                r.num_generations
            )
        })?;
        ensure(
            r.max_completion_length >= 1,
            "rollout.max_completion_length",
            || "must be >= 1".into(),
        )?;
        ensure(
            r.max_prompt_length != Some(0),
            "rollout.max_prompt_length",
            || "must be >= 1 (or null)".into(),
        )?;
        ensure(
            r.gpu_memory_utilization.is_none_or(|u| u > 0.0 && u <= 1.0),
            "rollout.gpu_memory_utilization",
            || "must be in (0, 1] (or null)".into(),
        )?;
        // Not silently ignored: the learner renders the chat template itself.
        ensure(!r.use_chat, "rollout.use_chat", || {
            "requests to /v1/chat/completions are not implemented yet; set \
             data.prompt_template: chat instead (the learner renders the model's chat \
             template and sends the result to /v1/completions, which is equivalent for \
             Tandem's rollout server)"
                .into()
        })?;
        ensure(nonneg(r.temperature), "rollout.temperature", || {
            format!("must be >= 0, got {}", r.temperature)
        })?;
        ensure(r.top_p > 0.0 && r.top_p <= 1.0, "rollout.top_p", || {
            format!("must be in (0, 1], got {}", r.top_p)
        })?;
        ensure(
            r.min_p.is_none_or(|p| (0.0..=1.0).contains(&p)),
            "rollout.min_p",
            || format!("must be in [0, 1], got {:?}", r.min_p),
        )?;
        ensure(
            pos(r.repetition_penalty),
            "rollout.repetition_penalty",
            || format!("must be > 0, got {}", r.repetition_penalty),
        )?;
        ensure(r.async_lag <= 1, "rollout.async_lag", || {
            format!("must be 0 or 1, got {}", r.async_lag)
        })?;
        ensure(
            pos(r.request_timeout_s),
            "rollout.request_timeout_s",
            || format!("must be > 0, got {}", r.request_timeout_s),
        )?;
        ensure(
            pos(r.weight_sync_timeout_s),
            "rollout.weight_sync_timeout_s",
            || format!("must be > 0, got {}", r.weight_sync_timeout_s),
        )?;
        ensure(
            r.client_tag.as_deref() != Some(""),
            "rollout.client_tag",
            || "is empty (use null for rank-R)".into(),
        )?;
        self.validate_tools()?;

        // An environment may own the reward (TRL's `get_reward()`); whether
        // its class has one is read when the learner starts.
        ensure(
            !self.reward.functions.is_empty() || r.environment_factory.is_some(),
            "reward.functions",
            || "no reward function: list at least one, e.g. [{name: exact_match}]".into(),
        )?;
        for (i, f) in self.reward.functions.iter().enumerate() {
            ensure(
                !f.name.is_empty(),
                &format!("reward.functions[{i}].name"),
                || "is missing".into(),
            )?;
            ensure(
                f.weight.is_finite(),
                &format!("reward.functions[{i}].weight"),
                || format!("must be finite, got {}", f.weight),
            )?;
        }

        let t = &self.train;
        ensure(nonneg(t.learning_rate), "train.learning_rate", || {
            format!("must be >= 0, got {}", t.learning_rate)
        })?;
        ensure(
            (0.0..=1.0).contains(&t.ref_model_mixup_alpha),
            "train.ref_model_mixup_alpha",
            || format!("must be in [0, 1], got {}", t.ref_model_mixup_alpha),
        )?;
        ensure(
            t.ref_model_sync_steps >= 1,
            "train.ref_model_sync_steps",
            || "must be >= 1".into(),
        )?;
        for (key, set) in [
            (
                "train.dynamic_sampling_metric",
                t.dynamic_sampling_metric.is_some(),
            ),
            (
                "train.dynamic_sampling_reward_range",
                t.dynamic_sampling_reward_range.is_some(),
            ),
            (
                "train.dynamic_sampling_batch_prompts",
                t.dynamic_sampling_batch_prompts.is_some(),
            ),
        ] {
            ensure(!set || t.dynamic_sampling, key, || {
                "acts only with train.dynamic_sampling: true (remove it, or turn dynamic \
                 sampling on)"
                    .into()
            })?;
        }
        ensure(
            t.dynamic_sampling_metric
                .as_deref()
                .is_none_or(|m| !m.trim().is_empty()),
            "train.dynamic_sampling_metric",
            || "must name a reward function's label or `reward`".into(),
        )?;
        if let Some([lo, hi]) = t.dynamic_sampling_reward_range {
            ensure(
                lo.is_finite() && hi.is_finite() && lo < hi,
                "train.dynamic_sampling_reward_range",
                || format!("must be [low, high] with low < high, both finite, got [{lo}, {hi}]"),
            )?;
        }
        ensure(
            !self.data.filter_overlong_prompts || self.rollout.max_prompt_length.is_some(),
            "data.filter_overlong_prompts",
            || "needs rollout.max_prompt_length (the limit in tokens)".into(),
        )?;
        ensure(
            t.max_tokens_per_micro_batch != Some(0),
            "train.max_tokens_per_micro_batch",
            || "must be >= 1 (padded tokens per micro-batch)".into(),
        )?;
        ensure(
            t.dynamic_sampling_batch_prompts != Some(0),
            "train.dynamic_sampling_batch_prompts",
            || "must be >= 1 (prompts per generation round, over all learner ranks)".into(),
        )?;
        ensure(
            !t.sync_ref_model || t.loss.beta > 0.0,
            "train.sync_ref_model",
            || "needs train.beta > 0: with beta 0 there is no reference model to sync".into(),
        )?;
        ensure(
            !(t.sync_ref_model && m.use_peft),
            "train.sync_ref_model",
            || {
                "does not go with model.use_peft (as in TRL): the reference of a LoRA run is \
                 the frozen base model"
                    .into()
            },
        )?;
        for (key, value) in &self.rollout.generation_kwargs {
            if let Some(instead) = generation_kwarg_owner(key) {
                return Err(RecipeError::Invalid {
                    key: format!("rollout.generation_kwargs.{key}"),
                    message: format!("is set by the learner itself; {instead}"),
                });
            }
            // The launcher's own rollout servers would refuse every request.
            if self.rollout.endpoints.is_empty()
                && let Some(what) = proto::openai::unsupported_field(key, value)
            {
                return Err(RecipeError::Invalid {
                    key: format!("rollout.generation_kwargs.{key}"),
                    message: format!(
                        "asks for {what}, which Tandem's rollout server does not do (an \
                         external vLLM in rollout.endpoints may); remove it, or reward the \
                         format instead"
                    ),
                });
            }
        }
        for key in ["messages", "add_generation_prompt"] {
            ensure(
                !self.data.chat_template_kwargs.contains_key(key),
                &format!("data.chat_template_kwargs.{key}"),
                || {
                    "is set by the learner itself (the prompt's messages, and the \
                     generation prompt that starts the completion); remove it"
                        .into()
                },
            )?;
        }
        if let Some(spec) = &self.data.chat_template {
            // Checked here, before servers start, with no tokenizer at hand:
            // a syntax error is the template's whatever its tokens.
            model::tokenizer::chat_template_text(spec)
                .and_then(|text| model::tokenizer::ChatTemplate::new(&text, None, None))
                .map_err(|e| RecipeError::Invalid {
                    key: "data.chat_template".into(),
                    message: e.to_string(),
                })?;
        }
        self.validate_lr_scheduler_kwargs()?;
        ensure(t.sft_batch_size != Some(0), "train.sft_batch_size", || {
            "must be >= 1 (or null: train.per_device_train_batch_size)".into()
        })?;
        ensure(
            t.sft_lr_scheduler_type != LrSchedulerType::CosineWithMinLr,
            "train.sft_lr_scheduler_type",
            || {
                "cosine_with_min_lr takes its floor from train.lr_scheduler_kwargs, which \
                 belong to the GRPO steps; use constant, linear or cosine"
                    .into()
            },
        )?;
        if let Some(target) = t.sft_target_loss {
            ensure(
                target.is_finite() && target > 0.0,
                "train.sft_target_loss",
                || format!("must be > 0 (or null: no early stop), got {target}"),
            )?;
            ensure(
                t.sft_warmup_steps == 0 || t.sft_warmup_steps >= SFT_TARGET_LOSS_WINDOW,
                "train.sft_target_loss",
                || {
                    format!(
                        "stops the warm-up on the mean loss of its last \
                         {SFT_TARGET_LOSS_WINDOW} steps, but train.sft_warmup_steps is {}: \
                         raise train.sft_warmup_steps to at least {SFT_TARGET_LOSS_WINDOW}, \
                         or remove train.sft_target_loss",
                        t.sft_warmup_steps
                    )
                },
            )?;
        }
        if let Some(lr) = t.sft_learning_rate {
            ensure(
                lr.is_finite() && lr > 0.0,
                "train.sft_learning_rate",
                || format!("must be > 0 (or null: train.learning_rate), got {lr}"),
            )?;
        }
        ensure(
            (0.0..=1.0).contains(&t.warmup_ratio),
            "train.warmup_ratio",
            || format!("must be in [0, 1], got {}", t.warmup_ratio),
        )?;
        ensure(
            t.max_steps >= 1 || t.num_train_epochs.is_some(),
            "train.max_steps",
            || {
                "is not set (0 or -1) and neither is train.num_train_epochs: set one of them \
                 (steps, or passes over the training prompts)"
                    .into()
            },
        )?;
        if let Some(e) = t.num_train_epochs {
            ensure(e.is_finite() && e > 0.0, "train.num_train_epochs", || {
                format!("must be > 0, got {e}")
            })?;
            ensure(
                t.max_steps >= 1 || !self.data.train_files.is_empty(),
                "train.num_train_epochs",
                || {
                    "counts passes over data.train_files, and there are none (the \
                     environment writes the prompts): set train.max_steps"
                        .into()
                },
            )?;
        }
        ensure(
            t.per_device_train_batch_size > 0
                && t.per_device_train_batch_size
                    .is_multiple_of(r.num_generations),
            "train.per_device_train_batch_size",
            || {
                format!(
                    "must be a positive multiple of rollout.num_generations ({}) so that no \
                     group is split, got {}",
                    r.num_generations, t.per_device_train_batch_size
                )
            },
        )?;
        ensure(
            t.gradient_accumulation_steps >= 1,
            "train.gradient_accumulation_steps",
            || "must be >= 1".into(),
        )?;
        if let Some(spg) = t.steps_per_generation {
            let ga = t.gradient_accumulation_steps.max(1);
            ensure(
                spg >= ga && spg % ga == 0,
                "train.steps_per_generation",
                || {
                    format!(
                        "must be a multiple of train.gradient_accumulation_steps ({ga}): \
                         each optimizer update takes that many of the generated \
                         micro-batches; got {spg}"
                    )
                },
            )?;
        }
        if let Some(gbs) = t.generation_batch_size {
            ensure(
                t.steps_per_generation.is_none(),
                "train.generation_batch_size",
                || "and train.steps_per_generation cannot both be set (as in TRL)".into(),
            )?;
            let g = r.num_generations.max(1);
            ensure(
                gbs > 0 && gbs % g == 0,
                "train.generation_batch_size",
                || format!("must be a multiple of rollout.num_generations ({g}), got {gbs}"),
            )?;
        }
        ensure(t.num_iterations >= 1, "train.num_iterations", || {
            "must be >= 1".into()
        })?;
        ensure(
            t.recompute_logits || !t.gradient_checkpointing,
            "train.gradient_checkpointing",
            || {
                "recomputes the logits along with the layers: set train.recompute_logits: \
                 true (or gradient_checkpointing: false)"
                    .into()
            },
        )?;
        ensure(nonneg(t.max_grad_norm), "train.max_grad_norm", || {
            format!("must be >= 0 (0: no clipping), got {}", t.max_grad_norm)
        })?;
        ensure(nonneg(t.weight_decay), "train.weight_decay", || {
            format!("must be >= 0, got {}", t.weight_decay)
        })?;
        for (key, b) in [
            ("train.adam_beta1", t.adam_beta1),
            ("train.adam_beta2", t.adam_beta2),
        ] {
            ensure((0.0..1.0).contains(&b), key, || {
                format!("must be in [0, 1), got {b}")
            })?;
        }
        ensure(pos(t.adam_epsilon), "train.adam_epsilon", || {
            format!("must be > 0, got {}", t.adam_epsilon)
        })?;
        ensure(
            t.max_nonfinite_steps >= 1,
            "train.max_nonfinite_steps",
            || "must be >= 1".into(),
        )?;
        t.loss.validate().map_err(|e| match e {
            crate::grpo_error::GrpoError::Config { field, message } => RecipeError::Invalid {
                key: format!("train.{field}"),
                message,
            },
            other => RecipeError::Invalid {
                key: "train".into(),
                message: other.to_string(),
            },
        })?;
        // GDPO normalizes each function's values; a gate multiplies the sum.
        let gate = self.reward.functions.iter().any(|f| {
            f.name == "blocklist" && f.params.get("mode").and_then(Value::as_str) != Some("penalty")
        });
        ensure(
            !(gate
                && t.loss.multi_objective_aggregation
                    == crate::grpo_config::MultiObjectiveAggregation::NormalizeThenSum),
            "train.multi_objective_aggregation",
            || {
                "normalize_then_sum (GDPO) normalizes each reward function on its own, which \
                 a blocklist in gate mode (it multiplies the total) cannot be: give the \
                 blocklist mode: penalty"
                    .into()
            },
        )?;

        let e = &self.eval;
        ensure(
            !e.enabled() || !d.eval_files.is_empty(),
            if e.eval_strategy == IntervalStrategy::Epoch {
                "eval.eval_strategy"
            } else {
                "eval.eval_steps"
            },
            || "validation is on but data.eval_files is empty".into(),
        )?;
        ensure(e.num_samples >= 1, "eval.num_samples", || {
            "must be >= 1".into()
        })?;
        ensure(nonneg(e.temperature), "eval.temperature", || {
            format!("must be >= 0, got {}", e.temperature)
        })?;
        ensure(
            e.num_samples == 1 || e.temperature > 0.0,
            "eval.temperature",
            || {
                format!(
                    "is 0 (greedy) with eval.num_samples = {}: the samples would all be the \
                 same; set a temperature > 0",
                    e.num_samples
                )
            },
        )?;

        let c = &self.checkpoint;
        ensure(
            c.save_total_limit != Some(0),
            "checkpoint.save_total_limit",
            || "must be >= 1 (or null to keep all)".into(),
        )?;
        ensure(
            !c.output_dir.as_os_str().is_empty(),
            "checkpoint.output_dir",
            || "is empty".into(),
        )?;
        for r in &self.log.report_to {
            ensure(
                ["tensorboard", "all", "none"].contains(&r.as_str()),
                "log.report_to",
                || {
                    format!(
                        "{r:?} is not supported: nothing is sent off this machine; use \
                         [tensorboard] (event files in <output_dir>/runs) or [] (the run \
                         folder's JSONL logs, always written)"
                    )
                },
            )?;
        }
        ensure(
            !self.log.logging_steps.is_never(),
            "log.logging_steps",
            || "must be >= 1".into(),
        )?;
        for (key, every) in [
            ("log.logging_steps", self.log.logging_steps),
            ("eval.eval_steps", self.eval.eval_steps),
            ("checkpoint.save_steps", self.checkpoint.save_steps),
        ] {
            if let Some(problem) = every.problem() {
                return Err(RecipeError::Invalid {
                    key: key.into(),
                    message: problem,
                });
            }
        }

        let tp = &self.topology;
        for (key, v) in [
            ("topology.nodes", tp.nodes),
            ("topology.dp", tp.dp),
            ("topology.tp", tp.tp),
            ("topology.learner_ranks", tp.learner_ranks),
        ] {
            ensure(v >= 1, key, || "must be >= 1".into())?;
        }
        ensure(
            tp.rollout_servers > 0 || !r.endpoints.is_empty(),
            "topology.rollout_servers",
            || "is 0 and rollout.endpoints is empty: nothing would generate completions".into(),
        )
    }

    /// `rollout.tools` and the keys that go with them.
    fn validate_tools(&self) -> Result<()> {
        let r = &self.rollout;
        let invalid = |key: String, message: String| RecipeError::Invalid { key, message };
        if model::tool_calls::ToolParser::from_name(&r.tool_call_parser).is_none() {
            return Err(invalid(
                "rollout.tool_call_parser".into(),
                format!(
                    "unknown parser {:?}: expected one of {}",
                    r.tool_call_parser,
                    model::tool_calls::PARSERS.join(", ")
                ),
            ));
        }
        if !(r.tool_timeout_s.is_finite() && r.tool_timeout_s > 0.0) {
            return Err(invalid(
                "rollout.tool_timeout_s".into(),
                format!("must be > 0, got {}", r.tool_timeout_s),
            ));
        }
        if r.python_tool_processes == 0 {
            return Err(invalid(
                "rollout.python_tool_processes".into(),
                "must be >= 1".into(),
            ));
        }
        if let Some(factory) = &r.environment_factory {
            let key = "rollout.environment_factory".to_string();
            if factory.entries().is_empty() {
                return Err(invalid(
                    key,
                    "names no environment: give a FILE.py:CLASS, or map names to them".into(),
                ));
            }
            for (name, spec) in factory.entries() {
                let key = EnvironmentFactory::key(name);
                if name == Some("") {
                    return Err(invalid(key, "an empty environment name".into()));
                }
                crate::python::function_name(spec).map_err(|m| invalid(key, m))?;
            }
            if r.python_tool_processes > 1 {
                return Err(invalid(
                    key,
                    "runs with rollout.python_tool_processes: 1 only: the environments live in \
                     the one process the reward functions read them in"
                        .into(),
                ));
            }
        }
        if r.tools.is_empty() && r.environment_factory.is_none() {
            if r.max_tool_calling_iterations.is_some() {
                return Err(invalid(
                    "rollout.max_tool_calling_iterations".into(),
                    "acts only with rollout.tools or rollout.environment_factory: list the \
                     tools, or remove the key"
                        .into(),
                ));
            }
            return Ok(());
        }
        if self.data.prompt_template != "chat" {
            return Err(invalid(
                "data.prompt_template".into(),
                "rollout.tools and rollout.environment_factory need chat prompts, whose \
                 template renders the tool turns: set data.prompt_template: chat"
                    .into(),
            ));
        }
        if r.max_tool_calling_iterations == Some(0) {
            return Err(invalid(
                "rollout.max_tool_calling_iterations".into(),
                "must be >= 1 (or null: until max_completion_length); remove rollout.tools \
                 for no tool calls"
                    .into(),
            ));
        }
        for (i, tool) in r.tools.iter().enumerate() {
            let key = |field: &str| format!("rollout.tools[{i}].{field}");
            if let Some(spec) = &tool.python {
                // Name, description and schema come from the function.
                let given = [
                    ("name", !tool.name.is_empty()),
                    ("description", !tool.description.is_empty()),
                    ("parameters", tool.parameters != Tool::no_parameters()),
                    ("url", !tool.url.is_empty()),
                ];
                if let Some((field, _)) = given.iter().find(|(_, set)| *set) {
                    return Err(invalid(
                        key(field),
                        "a `python` tool's definition is its function's (its name, the \
                         docstring's description and Args:, the type hints), as TRL reads \
                         its tools, and it runs in the learner: remove the key, or the \
                         `python` key for an HTTP tool"
                            .into(),
                    ));
                }
                if let Err(message) = crate::python::function_name(spec) {
                    return Err(invalid(key("python"), message));
                }
                continue;
            }
            // OpenAI's rule for function names.
            let name_ok = !tool.name.is_empty()
                && tool.name.len() <= 64
                && tool
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} is not a function name: 1 to 64 letters, digits, _ or -",
                        tool.name
                    ),
                ));
            }
            if r.tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} names two tools: a call could not tell them apart",
                        tool.name
                    ),
                ));
            }
            if !(tool.url.starts_with("http://") || tool.url.starts_with("https://")) {
                return Err(invalid(
                    key("url"),
                    format!(
                        "expected the http(s) URL the call's arguments are POSTed to, got {:?}",
                        tool.url
                    ),
                ));
            }
            if tool.parameters.get("type").and_then(Value::as_str) != Some("object") {
                return Err(invalid(
                    key("parameters"),
                    "must be a JSON schema of an object (`{type: object, properties: {...}}`): \
                     a call's arguments are an object"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// transformers' rules for `lr_scheduler_kwargs`, for the schedules
    /// Tandem has.
    fn validate_lr_scheduler_kwargs(&self) -> Result<()> {
        let t = &self.train;
        let kw = &t.lr_scheduler_kwargs;
        let invalid = |key: &str, message: String| RecipeError::Invalid {
            key: format!("train.lr_scheduler_kwargs{key}"),
            message,
        };
        if t.lr_scheduler_type != LrSchedulerType::CosineWithMinLr {
            return match kw.keys().next() {
                Some(k) => Err(invalid(
                    &format!(".{k}"),
                    format!(
                        "lr_scheduler_type {} takes no kwargs here (cosine_with_min_lr takes \
                         min_lr_rate or min_lr)",
                        serde_json::to_value(t.lr_scheduler_type)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    ),
                )),
                None => Ok(()),
            };
        }
        if let Some(k) = kw.keys().find(|k| *k != "min_lr_rate" && *k != "min_lr") {
            return Err(invalid(
                &format!(".{k}"),
                "cosine_with_min_lr takes min_lr_rate or min_lr only".into(),
            ));
        }
        match (kw.get("min_lr_rate"), kw.get("min_lr")) {
            (Some(_), Some(_)) => Err(invalid(
                "",
                "set one of min_lr_rate and min_lr, not both (as transformers)".into(),
            )),
            (None, None) => Err(invalid(
                "",
                "cosine_with_min_lr needs min_lr_rate (a fraction of learning_rate) or \
                 min_lr (as transformers)"
                    .into(),
            )),
            (Some(r), None) => match r.as_f64() {
                Some(r) if (0.0..=1.0).contains(&r) => Ok(()),
                _ => Err(invalid(
                    ".min_lr_rate",
                    format!("must be a number in [0, 1], got {r}"),
                )),
            },
            (None, Some(m)) => match m.as_f64() {
                Some(m) if m >= 0.0 && m <= t.learning_rate => Ok(()),
                _ => Err(invalid(
                    ".min_lr",
                    format!(
                        "must be a number in [0, learning_rate {}], got {m}",
                        t.learning_rate
                    ),
                )),
            },
        }
    }

    /// The prompt length in tokens over which loading leaves a row out
    /// (`data.filter_overlong_prompts` with `rollout.max_prompt_length`).
    pub fn overlong_prompt_limit(&self) -> Option<usize> {
        self.rollout
            .max_prompt_length
            .filter(|_| self.data.filter_overlong_prompts)
    }

    /// Prompts per rank per optimizer step.
    pub fn prompts_per_rank_per_step(&self) -> usize {
        self.completions_per_rank_per_step() / self.rollout.num_generations.max(1)
    }

    /// The run's length in steps: `train.max_steps`, or, when that is not
    /// set, `train.num_train_epochs` passes over `prompts` training prompts
    /// shared by `world_size` ranks (see [`TrainSection::num_train_epochs`]).
    pub fn total_steps(&self, prompts: u64, world_size: usize) -> Result<u64> {
        let t = &self.train;
        let epochs = match t.num_train_epochs {
            Some(e) if t.max_steps == 0 => e,
            _ => return Ok(t.max_steps),
        };
        let steps_per_epoch =
            self.steps_per_epoch(prompts, world_size, "train.num_train_epochs")?;
        Ok((epochs * steps_per_epoch as f64).ceil().max(1.0) as u64)
    }

    /// Whole steps in one pass over `prompts` training prompts shared by
    /// `world_size` ranks (a last partial step is dropped, as TRL's sampler
    /// does); an error naming `key`, the setting that needs it, when the
    /// prompts do not fill one step.
    pub fn steps_per_epoch(&self, prompts: u64, world_size: usize, key: &str) -> Result<u64> {
        let per_step = (self.prompts_per_rank_per_step() * world_size.max(1)) as u64;
        let steps = prompts / per_step.max(1);
        if steps == 0 {
            return Err(RecipeError::Invalid {
                key: key.into(),
                message: format!(
                    "the training files hold {prompts} prompts, fewer than one step takes \
                     ({per_step}: per_device_train_batch_size x steps_per_generation / \
                     num_generations x {} ranks); add data, take fewer prompts per step, \
                     or count in steps",
                    world_size.max(1)
                ),
            });
        }
        Ok(steps)
    }

    /// The recipe as `world_size` learner ranks run it:
    /// `train.generation_batch_size` turned into `steps_per_generation`
    /// (an error naming the key when it does not split into whole
    /// micro-batches per rank and whole updates); also an error naming
    /// `train.dynamic_sampling_batch_prompts` when its prompts do not split
    /// over the ranks.
    pub fn for_world_size(&self, world_size: usize) -> Result<Recipe> {
        let t = &self.train;
        if let Some(n) = t.dynamic_sampling_batch_prompts
            && !n.is_multiple_of(world_size.max(1))
        {
            return Err(RecipeError::Invalid {
                key: "train.dynamic_sampling_batch_prompts".into(),
                message: format!(
                    "{n} prompts do not split over {} learner ranks (every rank generates the \
                     same number per round); use a multiple of {}",
                    world_size.max(1),
                    world_size.max(1)
                ),
            });
        }
        let Some(gbs) = t.generation_batch_size else {
            return Ok(self.clone());
        };
        let (w, b, ga) = (
            world_size.max(1),
            t.per_device_train_batch_size.max(1),
            t.gradient_accumulation_steps.max(1),
        );
        let per_update = w * b * ga;
        if gbs % per_update != 0 {
            return Err(RecipeError::Invalid {
                key: "train.generation_batch_size".into(),
                message: format!(
                    "{gbs} completions do not split into whole optimizer updates of {per_update} \
                     ({w} learner ranks x per_device_train_batch_size {b} x \
                     gradient_accumulation_steps {ga}); use a multiple of {per_update}"
                ),
            });
        }
        let mut resolved = self.clone();
        resolved.train.steps_per_generation = Some(gbs / (w * b));
        Ok(resolved)
    }

    /// Completions per rank per step: every micro-batch generated at once
    /// (`steps_per_generation` of them).
    pub fn completions_per_rank_per_step(&self) -> usize {
        self.train.per_device_train_batch_size * self.train.steps_per_generation()
    }

    /// The fully resolved recipe, every default included, as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| {
            // Only non-string map keys fail, and a Recipe has none.
            unreachable!("a Recipe always serializes to JSON: {e}")
        })
    }

    /// [`Self::to_json`] with secrets (API keys, tokens, passwords) replaced
    /// by `"<redacted>"`: what goes into manifests and logs.
    pub fn to_json_redacted(&self) -> Value {
        let mut v = self.to_json();
        redact(&mut v);
        v
    }

    /// The fully resolved recipe as YAML (for `--dry-run`); loads back to
    /// the same recipe.
    pub fn resolved_yaml(&self) -> Result<String> {
        let header = "# Resolved Tandem recipe: every key, defaults included.\n".to_string();
        let body =
            serde_saphyr::to_string(self).map_err(|e| RecipeError::Serialize(e.to_string()))?;
        Ok(header + &body)
    }

    /// Every valid key path (`train.learning_rate`, `data.train_files[].path`...).
    pub fn known_keys() -> Vec<String> {
        let mut out = Vec::new();
        Schema::recipe().collect_paths(String::new(), &mut out);
        out
    }
}

fn valid_device(d: &str) -> bool {
    d.parse::<model::device::DeviceSpec>().is_ok()
}

fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = ["key", "token", "secret", "password"]
                    .iter()
                    .any(|s| k.ends_with(s));
                if secret && !val.is_null() {
                    *val = Value::String("<redacted>".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    } else {
        s
    }
}

// ---------------------------------------------------------------------------
// Key paths and the schema.
// ---------------------------------------------------------------------------

/// One step of a key path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

struct PathDisplay<'a>(&'a [Seg]);

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

fn path_string(p: &[Seg]) -> String {
    PathDisplay(p).to_string()
}

/// The shape of the recipe, derived from `Recipe::default()` serialized.
#[derive(Debug, Clone)]
enum Schema {
    /// A scalar, an optional value or a list of scalars: serde checks its type.
    Leaf,
    /// Known keys; `open` also accepts any other key (reward parameters).
    Object {
        fields: Vec<(String, Schema)>,
        open: bool,
    },
    /// A list of objects.
    List(Box<Schema>),
}

impl Schema {
    fn from_default(v: &Value) -> Schema {
        match v {
            Value::Object(m) => Schema::Object {
                fields: m
                    .iter()
                    .map(|(k, v)| (k.clone(), Schema::from_default(v)))
                    .collect(),
                open: false,
            },
            _ => Schema::Leaf,
        }
    }

    fn recipe() -> Schema {
        let mut s = Schema::from_default(&Recipe::default().to_json());
        // Lists of objects are empty by default: give them their item's shape.
        let file = Schema::from_default(&default_json::<DataFile>());
        s.replace(
            &["data", "train_files"],
            Schema::List(Box::new(file.clone())),
        );
        s.replace(&["data", "eval_files"], Schema::List(Box::new(file)));
        let mut reward = Schema::from_default(&default_json::<RewardFunction>());
        if let Schema::Object { open, .. } = &mut reward {
            *open = true;
        }
        s.replace(&["reward", "functions"], Schema::List(Box::new(reward)));
        let mut tool = Schema::from_default(&default_json::<Tool>());
        tool.replace(
            &["parameters"],
            Schema::Object {
                fields: Vec::new(),
                open: true,
            },
        );
        s.replace(&["rollout", "tools"], Schema::List(Box::new(tool)));
        for free in [
            ["rollout", "generation_kwargs"],
            ["data", "chat_template_kwargs"],
            ["train", "lr_scheduler_kwargs"],
        ] {
            s.replace(
                &free,
                Schema::Object {
                    fields: Vec::new(),
                    open: true,
                },
            );
        }
        s
    }

    fn replace(&mut self, path: &[&str], new: Schema) {
        let Some((first, rest)) = path.split_first() else {
            *self = new;
            return;
        };
        if let Schema::Object { fields, .. } = self
            && let Some((_, child)) = fields.iter_mut().find(|(k, _)| k == first)
        {
            child.replace(rest, new);
        }
    }

    fn field(&self, key: &str) -> Option<&Schema> {
        match self {
            Schema::Object { fields, .. } => fields.iter().find(|(k, _)| k == key).map(|(_, s)| s),
            _ => None,
        }
    }

    fn collect_paths(&self, prefix: String, out: &mut Vec<String>) {
        match self {
            Schema::Leaf => out.push(prefix),
            // A free-form map (generation_kwargs...) is a key itself.
            Schema::Object { fields, open: true } if fields.is_empty() => out.push(prefix),
            Schema::Object { fields, .. } => {
                for (k, s) in fields {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    s.collect_paths(p, out);
                }
            }
            Schema::List(item) => item.collect_paths(format!("{prefix}[]"), out),
        }
    }
}

fn default_json<T: Default + Serialize>() -> Value {
    serde_json::to_value(T::default()).unwrap_or(Value::Null)
}

fn unknown_key(
    root: &Schema,
    siblings: &[(String, Schema)],
    path: &[Seg],
    source_name: &str,
) -> RecipeError {
    let key = path_string(path);
    let (parent, name) = match path.split_last() {
        Some((Seg::Key(k), parent)) => (parent, k.as_str()),
        _ => (path, ""),
    };
    let parent_str = path_string(parent);
    let join = |k: &str| {
        if parent_str.is_empty() {
            k.to_string()
        } else {
            format!("{parent_str}.{k}")
        }
    };
    // 1. The same key in another section (`train.temperature`, or
    //    `learning_rate` at the top level).
    let mut all = Vec::new();
    root.collect_paths(String::new(), &mut all);
    let elsewhere = all.iter().find(|p| {
        p.rsplit(['.', ']']).next() == Some(name) && !p.starts_with(&format!("{parent_str}."))
    });
    // 2. A close sibling (`train.learning_rat`).
    let sibling = siblings
        .iter()
        .map(|(k, _)| (strsim::jaro_winkler(name, k), k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| join(k));
    // 3. A close key anywhere.
    let anywhere = || {
        all.iter()
            .map(|p| {
                let last = p.rsplit(['.', ']']).next().unwrap_or(p);
                (strsim::jaro_winkler(name, last), p)
            })
            .filter(|(score, _)| *score >= 0.9)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, p)| p.replace("[]", "[0]"))
    };
    let suggestion = elsewhere
        .map(|p| p.replace("[]", "[0]"))
        .or(sibling)
        .or_else(anywhere);
    let hint = match (trl_key_hint(name), suggestion) {
        (Some(h), _) => h.to_string(),
        (None, Some(s)) => format!("did you mean {s}?"),
        (None, None) => {
            let names: Vec<&str> = siblings.iter().map(|(k, _)| k.as_str()).collect();
            let scope = if parent_str.is_empty() {
                "top-level keys".to_string()
            } else {
                format!("keys of {parent_str}")
            };
            format!("valid {scope}: {}", names.join(", "))
        }
    };
    RecipeError::UnknownKey {
        key,
        source_name: source_name.to_string(),
        hint,
    }
}

/// What a TRL / open-r1 / verl recipe key with no Tandem key of its name
/// is in Tandem (keys that exist under another section are found without
/// this).
pub(crate) fn trl_key_hint(name: &str) -> Option<&'static str> {
    Some(match name {
        "model_name_or_path" => "TRL's model_name_or_path is model.path (a local folder)",
        "torch_dtype" | "bf16" | "fp16" => "the dtype is model.dtype (auto: bf16 on CUDA)",
        "use_vllm"
        | "vllm_mode"
        | "vllm_server_host"
        | "vllm_server_port"
        | "vllm_server_base_url" => {
            "generation always goes to rollout servers: rollout.endpoints \
             (empty: the launcher starts them)"
        }
        "vllm_gpu_memory_utilization" => "it is rollout.gpu_memory_utilization",
        "num_generations_eval" => "it is eval.num_samples (samples per eval prompt)",
        "vllm_tensor_parallel_size" => "it is topology.tp",
        "use_liger_loss" => {
            "train.recompute_logits (on by default) keeps the logits out of memory \
             as Liger's fused loss does; remove the key"
        }
        "use_liger_kernel" => {
            "transformers' switch to Liger's kernels has none here: train.recompute_logits \
             (on by default) keeps the logits out of memory as Liger's fused linear \
             cross-entropy does; remove the key"
        }
        "code_provider"
        | "e2b_router_url"
        | "morph_router_url"
        | "parallel_code_exec_per_proc"
        | "code_eval_test_batch_size"
        | "code_eval_scoring_mode"
        | "enforce_same_language" => {
            "the `code` reward function runs the programs: runner piston (a Piston server's \
             url, as sandboxed as E2B / Morph) or runner local (python3 here), max_parallel \
             cases at once; remove the key"
        }
        "load_in_4bit" | "load_in_8bit" => {
            "LoRA is model.use_peft (LoRA or DoRA on a base in model.dtype: no quantized \
             base); remove the key"
        }
        "reward_funcs" => "reward functions are reward.functions (name, weight, parameters)",
        "reward_weights" => "each reward.functions entry has its own weight",
        "dataset_name" => {
            "nothing is downloaded: data.train_files names local JSONL or Parquet files \
             (a pattern such as DIR/data/train-*.parquet takes a downloaded dataset's shards)"
        }
        "dataset_config" | "dataset_train_split" | "dataset_test_split" => {
            "nothing is downloaded: name the split's local files in data.train_files \
             (and the held-out split's in data.eval_files)"
        }
        "dataset_mixture" => "data.train_files is the mixture: a weight per file",
        "vllm_device" => "the launcher places the rollout servers (topology, --dp / --tp)",
        // verl's actor / algorithm keys.
        "loss_agg_mode" => {
            "set train.loss_type: verl's token-mean corresponds to dapo, \
             seq-mean-token-mean to grpo, seq-mean-token-sum-norm to dr_grpo"
        }
        "kl_loss_coef" | "kl_coef" => "it is train.beta (the KL term is on when beta > 0)",
        "kl_loss_type" => "it is train.kl_estimator: verl's kl is k1, mse is k2, low_var_kl is k3",
        "use_kl_loss" | "use_kl_in_reward" => {
            "the KL term is a loss term, on when train.beta > 0; remove the key"
        }
        "clip_ratio_low" | "clip_ratio" => "it is train.epsilon (the lower clip, 1 - epsilon)",
        "clip_ratio_high" => "it is train.epsilon_high",
        "ppo_epochs" => "it is train.num_iterations (passes over each generated batch)",
        "ppo_mini_batch_size" | "ppo_micro_batch_size_per_gpu" | "train_batch_size" => {
            "a step generates train.per_device_train_batch_size x steps_per_generation \
             completions per rank (rollout.num_generations per prompt), in \
             steps_per_generation / gradient_accumulation_steps updates"
        }
        "n" => "it is rollout.num_generations (completions per prompt)",
        "push_to_hub" | "hub_model_id" => {
            "not supported: everything is logged to the run folder (checkpoint.output_dir)"
        }
        "disable_dropout" => "Tandem's models have no dropout; remove the key",
        "gradient_checkpointing_kwargs" => {
            "not needed: train.gradient_checkpointing recomputes each decoder layer \
             (transformers' use_reentrant has no equivalent); remove the key"
        }
        "shuffle_dataset" => "it is data.shuffle",
        "dataset_prompt_column" => "it is data.prompt_column",
        "do_eval" => "eval runs as eval.eval_strategy and eval.eval_steps say",
        "logging_strategy" => "logs are taken every log.logging_steps steps",
        "evaluation_strategy" => "it is eval.eval_strategy (transformers' newer name)",
        "per_device_eval_batch_size" => {
            "eval prompts go to the rollout servers all at once; remove the key \
             (eval.max_examples and eval.num_samples size an eval)"
        }
        "overwrite_output_dir" => {
            "a run folder that already holds a run is never overwritten: resume it \
             (--resume-from / --auto-resume) or choose another checkpoint.output_dir"
        }
        "log_level" | "log_level_replica" => {
            "the RUST_LOG environment variable sets it (e.g. RUST_LOG=debug); remove the key"
        }
        "attn_implementation" => {
            "Tandem's decoder has one attention implementation (no flash_attention_2 / sdpa \
             choice); remove the key"
        }
        "model_revision" | "trust_remote_code" => {
            "model.path is a local Hugging Face folder of a supported architecture; remove the key"
        }
        "hub_strategy" | "hub_private_repo" => {
            "not supported: checkpoints stay in the run folder (checkpoint.output_dir)"
        }
        "optim" => {
            "the optimizer is AdamW (transformers' adamw_torch) with f32 moments; remove the key"
        }
        "cast_lm_head_to_fp32" => {
            "not supported: the lm_head runs in model.dtype and its logits are upcast to f32 \
             before the log-probs (model.dtype: f32 runs everything in f32)"
        }
        "vllm_server_timeout" => {
            "the launcher waits --health-timeout seconds for the rollout servers; \
             rollout.request_timeout_s bounds each request"
        }
        "wandb_log_unique_prompts" => {
            "nothing is sent to wandb (log.report_to: tensorboard or none)"
        }
        "vllm_guided_decoding_regex" | "vllm_structured_outputs_regex" => {
            "it is rollout.generation_kwargs: {structured_outputs: {regex: ...}} (sent with \
             every request; Tandem's rollout server and vLLM both read it)"
        }
        "resume_from_checkpoint" => {
            "resuming is the launcher's choice, not the recipe's: `launcher --resume-from DIR` \
             (a checkpoint or run folder) or `--auto-resume` (the run folder's newest \
             checkpoint); remove the key"
        }
        "deepspeed" | "fsdp" | "fsdp_config" => {
            "the learners are data-parallel ranks that each hold the whole model and all-reduce \
             their gradients (no ZeRO / FSDP sharding: the model, its gradients and the AdamW \
             moments must fit one device; LoRA, model.use_peft, shrinks the last two); remove \
             the key"
        }
        "data_seed" => "the data order follows train.seed (with data.shuffle); remove the key",
        "logging_dir" => {
            "the logs go to the run folder, checkpoint.output_dir (TensorBoard scalars under \
             <output_dir>/runs); remove the key"
        }
        "run_name" => "the run is named by its folder, checkpoint.output_dir; remove the key",
        "bf16_full_eval" | "fp16_full_eval" => {
            "eval generates on the rollout servers in their dtype; remove the key"
        }
        "model_init_kwargs"
        | "remove_unused_columns"
        | "ddp_find_unused_parameters"
        | "ddp_timeout"
        | "ddp_backend"
        | "dataloader_pin_memory"
        | "dataloader_persistent_workers"
        | "dataloader_prefetch_factor"
        | "torch_compile"
        | "torch_compile_backend"
        | "tf32"
        | "disable_tqdm"
        | "dataloader_num_workers"
        | "ds3_gather_for_generation"
        | "vllm_enable_sleep_mode"
        | "vllm_model_impl"
        | "use_transformers_paged"
        | "cache_implementation" => {
            "a transformers / PyTorch / vLLM setting with no Tandem counterpart; remove the key"
        }
        "vllm_max_model_length" => {
            "the rollout server's context is the model's max_position_embeddings, or the \
             rollout-server flag --max-model-len; prompts are cut to rollout.max_prompt_length"
        }
        "rollout_func" | "environment_factory" => {
            "Python rollout functions and environments have no Tandem counterpart; tools the \
             policy calls are rollout.tools (HTTP endpoints) with \
             rollout.max_tool_calling_iterations"
        }
        "log_unique_prompts" => {
            "completions.jsonl (log.log_completions) holds every prompt with its completions"
        }
        "log_completions_hub_repo" => {
            "nothing is uploaded: the run folder holds the checkpoints and completions"
        }
        "vllm_group_port" => {
            "weights go to the rollout servers over gRPC (the launcher picks the port; \
             rollout.weight_sync_endpoints otherwise)"
        }
        "save_safetensors" => "checkpoints are always safetensors; remove the key",
        "save_only_model" => {
            "checkpoints always hold the optimizer and data state too (an exact resume \
             needs them); remove the key"
        }
        _ => return None,
    })
}

/// What to do instead of a `rollout.generation_kwargs` entry that would
/// override a request field the recipe or the learner sets.
fn generation_kwarg_owner(field: &str) -> Option<&'static str> {
    Some(match field {
        "n" => "use rollout.num_generations instead",
        "max_tokens" | "max_completion_tokens" => "use rollout.max_completion_length instead",
        "temperature" => "use rollout.temperature (eval.temperature for eval) instead",
        "top_p" => "use rollout.top_p instead",
        "top_k" => "use rollout.top_k instead",
        "min_p" => "use rollout.min_p instead",
        "repetition_penalty" => "use rollout.repetition_penalty instead",
        "seed" => "each request's seed comes from train.seed",
        "model" => "use rollout.model instead",
        "client_tag" => "use rollout.client_tag instead",
        "prompt" | "logprobs" | "echo" | "stream" | "stream_options" | "return_token_ids"
        | "add_special_tokens" => "remove it: the learner needs its own value",
        _ => return None,
    })
}

/// Every key of `v` must exist in `schema`; recurses into objects and lists
/// of objects. Type mismatches are left to [`deserialize`].
/// Every key of `raw` must be in `schema`: one error for one unknown key,
/// one listing them all for several.
fn unknown_keys(raw: &Value, schema: &Schema, source_name: &str) -> Result<()> {
    let mut found = Vec::new();
    check_keys(
        raw,
        schema,
        &mut Vec::new(),
        schema,
        source_name,
        &mut found,
    );
    if found.len() <= 1 {
        return found.pop().map_or(Ok(()), Err);
    }
    let keys: Vec<(String, String)> = found
        .into_iter()
        .filter_map(|e| match e {
            RecipeError::UnknownKey { key, hint, .. } => Some((key, hint)),
            _ => None,
        })
        .collect();
    // Several top-level keys and no sections: a TRL / open-r1 recipe as is.
    let flat = keys.iter().all(|(k, _)| !k.contains('.'))
        && raw
            .as_object()
            .is_some_and(|m| !m.keys().any(|k| SECTION_NAMES.contains(&k.as_str())));
    // verl's own groups at the top: a verl configuration.
    let verl = keys
        .iter()
        .any(|(k, _)| matches!(k.as_str(), "actor_rollout_ref" | "algorithm" | "trainer"));
    let note = if verl {
        format!(
            "\nThis looks like a verl configuration: `learner convert-recipe {source_name}` \
             rewrites it as a Tandem recipe (a launch script's overrides too)."
        )
    } else if flat {
        format!(
            "\nThis looks like a TRL / open-r1 recipe (flat GRPOConfig keys): \
             `learner convert-recipe {source_name}` rewrites it in Tandem's sections."
        )
    } else {
        String::new()
    };
    Err(RecipeError::UnknownKeys {
        source_name: source_name.to_string(),
        keys,
        note,
    })
}

fn check_keys(
    v: &Value,
    schema: &Schema,
    path: &mut Vec<Seg>,
    root: &Schema,
    source_name: &str,
    found: &mut Vec<RecipeError>,
) {
    match (schema, v) {
        (Schema::Object { fields, open }, Value::Object(map)) => {
            for (k, child) in map {
                path.push(Seg::Key(k.clone()));
                match fields.iter().find(|(name, _)| name == k) {
                    Some((_, s)) => check_keys(child, s, path, root, source_name, found),
                    None if *open => {}
                    None => found.push(unknown_key(root, fields, path, source_name)),
                }
                path.pop();
            }
        }
        (Schema::List(item), Value::Array(items)) => {
            for (i, child) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                check_keys(child, item, path, root, source_name, found);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The key path of an override must exist in the schema.
fn check_path(path: &[Seg], root: &Schema, source_name: &str) -> Result<()> {
    let mut schema = root;
    for (i, seg) in path.iter().enumerate() {
        match (seg, schema) {
            (Seg::Key(k), Schema::Object { fields, open }) => match schema.field(k) {
                Some(s) => schema = s,
                None if *open => return Ok(()),
                None => return Err(unknown_key(root, fields, &path[..=i], source_name)),
            },
            (Seg::Index(_), Schema::List(item)) => schema = item,
            _ => {
                return Err(RecipeError::UnknownKey {
                    key: path_string(&path[..=i]),
                    source_name: source_name.to_string(),
                    hint: format!("{} has no sub-keys", path_string(&path[..i])),
                });
            }
        }
    }
    Ok(())
}

fn check_version(raw: &Value, source_name: &str) -> Result<()> {
    match raw.get("version") {
        None => Ok(()),
        Some(v) if v.as_u64() == Some(RECIPE_VERSION as u64) => Ok(()),
        Some(v) => Err(RecipeError::Version {
            source_name: source_name.to_string(),
            found: short(v),
        }),
    }
}

/// Shorthands: a file given as a plain path (or a single file instead of a
/// list), and an empty section (`eval:` with nothing under it).
fn normalize(raw: &mut Value) {
    let Value::Object(top) = raw else { return };
    top.retain(|_, v| !v.is_null());
    if let Some(Value::Object(data)) = top.get_mut("data") {
        for key in ["train_files", "eval_files"] {
            let Some(files) = data.get_mut(key) else {
                continue;
            };
            if files.is_string() || files.is_object() {
                *files = Value::Array(vec![files.take()]);
            }
            if let Value::Array(items) = files {
                for item in items {
                    if let Value::String(p) = item {
                        *item = serde_json::json!({ "path": p });
                    }
                }
            }
        }
    }
}

/// A recipe that gives `train.num_train_epochs` and not `train.max_steps`
/// counts in epochs (as in TRL, where `max_steps` defaults to -1), not in
/// Tandem's default number of steps.
fn epochs_without_max_steps(raw: &mut Value) {
    if let Some(Value::Object(train)) = raw.get_mut("train")
        && train.get("num_train_epochs").is_some_and(|v| !v.is_null())
        && !train.contains_key("max_steps")
    {
        train.insert("max_steps".into(), Value::from(0));
    }
}

/// Parses `section.key=value`; the value is read as YAML (`3`, `1e-3`,
/// `true`, `null`, `[a, b]`), and as a plain string when it is not YAML.
fn parse_override(text: &str) -> Result<(Vec<Seg>, Value)> {
    let bad = |message: &str| RecipeError::BadOverride {
        text: text.to_string(),
        message: message.to_string(),
    };
    let (key, value) = text.split_once('=').ok_or_else(|| bad("no `=`"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    let mut path = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() {
            return Err(bad("empty key segment"));
        }
        path.push(Seg::Key(name.to_string()));
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| bad("unclosed `[` in the key"))?;
            let index: usize = rest[1..close].parse().map_err(|_| {
                bad("a list index must be a number, as in data.train_files[0].weight")
            })?;
            path.push(Seg::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(bad("unexpected text after `]`"));
            }
        }
    }
    let value = if value.trim().is_empty() {
        Value::String(String::new())
    } else {
        // Lists and mappings only in flow style (`[a, b]`, `{k: v}`): text
        // such as `Answer: {question}` or `- x` stays a string.
        let flow = value.trim_start().starts_with(['[', '{']);
        match serde_saphyr::from_str::<Value>(value) {
            Ok(v) if flow || !(v.is_array() || v.is_object()) => v,
            _ => Value::String(value.to_string()),
        }
    };
    Ok((path, value))
}

/// Sets `value` at `path`, creating mappings and list items (as `{}`) on the
/// way; a list index may be at most the list's length (append).
fn set_path(root: &mut Value, path: &[Seg], value: Value) -> std::result::Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        *root = value;
        return Ok(());
    };
    let mut cur = root;
    for (i, seg) in parents.iter().enumerate() {
        let next_is_index = matches!(path[i + 1], Seg::Index(_));
        let empty = || {
            if next_is_index {
                Value::Array(Vec::new())
            } else {
                Value::Object(Map::new())
            }
        };
        cur = match seg {
            Seg::Key(k) => {
                if !cur.is_object() {
                    *cur = Value::Object(Map::new());
                }
                let Value::Object(map) = cur else {
                    unreachable!()
                };
                let slot = map.entry(k.clone()).or_insert_with(empty);
                if slot.is_null() || (next_is_index && !slot.is_array()) {
                    *slot = empty();
                }
                slot
            }
            Seg::Index(n) => {
                let Value::Array(items) = cur else {
                    return Err(format!("{} is not a list", path_string(&path[..i])));
                };
                if *n > items.len() {
                    return Err(format!(
                        "{} has {} items: index {n} would leave a gap",
                        path_string(&path[..i]),
                        items.len()
                    ));
                }
                if *n == items.len() {
                    items.push(Value::Object(Map::new()));
                }
                &mut items[*n]
            }
        };
    }
    match last {
        Seg::Key(k) => {
            if !cur.is_object() {
                *cur = Value::Object(Map::new());
            }
            if let Value::Object(map) = cur {
                map.insert(k.clone(), value);
            }
        }
        Seg::Index(n) => {
            let Value::Array(items) = cur else {
                return Err(format!("{} is not a list", path_string(parents)));
            };
            if *n > items.len() {
                return Err(format!(
                    "{} has {} items: index {n} would leave a gap",
                    path_string(parents),
                    items.len()
                ));
            }
            if *n == items.len() {
                items.push(value);
            } else {
                items[*n] = value;
            }
        }
    }
    Ok(())
}

fn overridden_source<'a>(
    overridden: &'a [(Vec<Seg>, String)],
    key: &str,
    file: &'a str,
) -> &'a str {
    overridden
        .iter()
        .rev()
        .find(|(p, _)| p.first() == Some(&Seg::Key(key.to_string())) && p.len() == 1)
        .map(|(_, s)| s.as_str())
        .unwrap_or(file)
}

/// The leaves of `v` under `schema`: the values serde converts on its own.
fn leaves<'v>(
    v: &'v Value,
    schema: &Schema,
    path: &mut Vec<Seg>,
    out: &mut Vec<(Vec<Seg>, &'v Value)>,
) {
    match (schema, v) {
        (Schema::Object { fields, .. }, Value::Object(map)) => {
            for (k, child) in map {
                path.push(Seg::Key(k.clone()));
                // An open object's extra keys are opaque parameters.
                if let Some((_, s)) = fields.iter().find(|(name, _)| name == k) {
                    leaves(child, s, path, out);
                }
                path.pop();
            }
        }
        (Schema::List(item), Value::Array(items)) => {
            for (i, child) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                leaves(child, item, path, out);
                path.pop();
            }
        }
        _ => out.push((path.clone(), v)),
    }
}

/// Deserializes the checked document; on failure, finds the key at fault by
/// trying each leaf alone on top of the defaults.
fn deserialize(
    raw: &Value,
    schema: &Schema,
    source_name: &str,
    overridden: &[(Vec<Seg>, String)],
) -> Result<Recipe> {
    let whole = match serde_json::from_value::<Recipe>(raw.clone()) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    let base = Recipe::default().to_json();
    let mut all = Vec::new();
    leaves(raw, schema, &mut Vec::new(), &mut all);
    for (path, value) in all {
        let mut probe = base.clone();
        if set_path(&mut probe, &path, value.clone()).is_err() {
            continue;
        }
        if let Err(e) = serde_json::from_value::<Recipe>(probe) {
            let source = overridden
                .iter()
                .rev()
                .find(|(p, _)| path.starts_with(p))
                .map(|(_, s)| s.as_str())
                .unwrap_or(source_name);
            return Err(RecipeError::WrongType {
                key: path_string(&path),
                source_name: source.to_string(),
                message: describe(&e.to_string(), value),
            });
        }
    }
    Err(RecipeError::WrongType {
        key: "(recipe)".into(),
        source_name: source_name.to_string(),
        message: clean_serde_message(&whole.to_string()),
    })
}

/// A serde error as "expected T, got V".
fn describe(serde_message: &str, value: &Value) -> String {
    let m = clean_serde_message(serde_message);
    let got = short(value);
    let expected = if let Some(rest) = m.strip_prefix("invalid type: ") {
        rest.split_once(", expected ").map(|(_, e)| e.to_string())
    } else if let Some(rest) = m.strip_prefix("unknown variant ") {
        rest.split_once(", expected ").map(|(_, e)| e.to_string())
    } else {
        None
    };
    match expected {
        Some(e) => {
            let e = match e.as_str() {
                "f64" | "f32" => "a number".to_string(),
                "u64" | "u32" | "u16" | "u8" | "usize" => "a whole number >= 0".to_string(),
                "a sequence" => "a list".to_string(),
                s if s.starts_with("struct ") => "a mapping".to_string(),
                s => s.to_string(),
            };
            format!("expected {e}, got {got}")
        }
        None => format!("{m} (got {got})"),
    }
}

/// serde_json appends " at line 0 column 0" to errors from a `Value`.
fn clean_serde_message(m: &str) -> String {
    m.trim_end_matches(" at line 0 column 0").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_lists_flattened_grpo_keys_and_list_items() {
        let keys = Recipe::known_keys();
        for k in [
            "version",
            "train.learning_rate",
            "train.beta",
            "train.epsilon_high",
            "train.loss_type",
            "data.train_files[].expected_hash",
            "reward.functions[].weight",
            "rollout.top_k",
            "topology.rollout_servers",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn override_parsing() {
        let (p, v) = parse_override("data.train_files[1].weight=2.5").unwrap();
        assert_eq!(
            p,
            vec![
                Seg::Key("data".into()),
                Seg::Key("train_files".into()),
                Seg::Index(1),
                Seg::Key("weight".into())
            ]
        );
        assert_eq!(v, serde_json::json!(2.5));
        assert_eq!(
            parse_override("a.b=1e-3").unwrap().1,
            serde_json::json!(1e-3)
        );
        assert_eq!(
            parse_override("a.b=true").unwrap().1,
            serde_json::json!(true)
        );
        assert_eq!(
            parse_override("a.b=[http://x:1, http://y:2]").unwrap().1,
            serde_json::json!(["http://x:1", "http://y:2"])
        );
        assert_eq!(
            parse_override("a.b=Answer: {question}").unwrap().1,
            serde_json::json!("Answer: {question}")
        );
        assert!(parse_override("nokey").is_err());
        assert!(parse_override("a[x]=1").is_err());
    }
}
