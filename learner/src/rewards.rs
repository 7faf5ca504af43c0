//! Reward functions: a registry built from the recipe's `reward.functions`
//! list, each entry `{name, weight, label?, ...params}`, that scores a batch
//! of completions. Every function's values are returned (and logged) on
//! their own, next to the weighted total.
//!
//! | name             | value per completion                                            |
//! |------------------|-----------------------------------------------------------------|
//! | `exact_match`    | 1 if the extracted answer equals the reference (by value, or as MATH's `is_equiv`), else 0 |
//! | `format`         | 1 if the regex matches, else 0                                   |
//! | `length_penalty` | DAPO's soft overlong penalty in [-1, 0], or linear in [-1, 0]     |
//! | `blocklist`      | `gate`: 1 clean / 0 blocked, and a blocked completion's total is 0; `penalty`: 0 clean / `penalty` blocked |
//! | `remote`         | whatever the user's HTTP server returns (`protocol: openrlhf`: an OpenRLHF `--remote_rm_url` server) |
//! | `think_format`   | TRL's `think_format_reward`: 1 if the completion opens with `<think>`, opens no other, and closes it |
//! | `tag_count`      | open-r1's: 0.25 per think/answer tag line that appears exactly once |
//! | `reasoning_steps`| open-r1's: `min(1, step markers / 3)`                             |
//! | `repetition_penalty` | open-r1's: `max_penalty x` the share of repeated word n-grams |
//! | `cosine`         | open-r1's cosine-scaled reward: correct answers gain, wrong ones lose less, the shorter they are |
//! | `length`         | open-r1's `len_reward` (Kimi k1.5): in [-0.5, 0.5] by length among the batch; a wrong answer never gains |
//! | `reward_model`   | a `*ForSequenceClassification` folder's score of prompt + completion (TRL's reward model in `reward_funcs`, OpenRLHF's `--reward_pretrain`) |
//! | `code`           | open-r1's `code` / `binary_code`: the share of the answer's test cases the completion's program passes (or 1 if all), run by a Piston server or `python3` here ([`crate::code_execution`]) |
//! | `python`         | a TRL reward function (a Python callable, `function: my_rewards.py:accuracy_reward`), called as TRL calls it ([`crate::python`]) |
//!
//! `total = gate x sum(weight_i x value_i)` over the non-gate functions, where
//! `gate` is the product of the `blocklist` gates (1 when there are none). A
//! `python` function may return None for a completion it does not apply to
//! (TRL's rule): its value is NaN, left out of the sum and of its logged
//! mean and std.
//!
//! Beside the recipe's entries, an environment (`rollout.environment_factory`)
//! whose class has TRL's `get_reward()` scores its completion too, weight 1,
//! logged under the class's name ([`RewardRegistry::add_environment_reward`]).
//!
//! Parameters are checked strictly: an unknown or mistyped parameter is an
//! error naming the function and the parameter. A function that fails while
//! scoring is an error naming it, never a silent zero.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use model::tokenizer::ChatMessage;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What went wrong while building or running a reward function.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward function #{index} (`{function}`): {message}")]
    Config {
        index: usize,
        function: String,
        message: String,
    },
    #[error("reward function `{function}` failed: {message}")]
    Score { function: String, message: String },
}

pub type Result<T, E = RewardError> = std::result::Result<T, E>;

/// One completion to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardInput {
    pub prompt: String,
    pub completion_text: String,
    /// The dataset's reference answer, when it has one.
    pub answer: Option<String>,
    /// Number of completion tokens (for `length_penalty` in tokens).
    pub completion_tokens: Option<usize>,
    /// Which prompt's group the completion belongs to, within the batch
    /// scored together (for `length` with `scope: group`).
    #[serde(default)]
    pub group: Option<usize>,
    /// The prompt as chat messages, when the chat template made it (for
    /// `reward_model`, which renders them with its own template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// The row's source (`data.data_source_column`), for `exact_match` with
    /// `extract: data_source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source: Option<String>,
    /// The row's other columns (a JSON object's text), for `python`
    /// functions ([`crate::data::Example::columns`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<String>,
    /// The completion's token ids, for `python` functions (TRL's
    /// `completion_ids`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completion_ids: Vec<u32>,
    /// With tool calls, the completion as chat messages
    /// ([`crate::rollout::Completion::messages`]), for `python` functions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completion_messages: Vec<Value>,
    /// With `rollout.environment_factory`: the ID of the completion's
    /// environment, for `python` functions' `environments`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<u64>,
}

impl RewardInput {
    pub fn new(
        prompt: impl Into<String>,
        completion_text: impl Into<String>,
        answer: Option<String>,
    ) -> Self {
        RewardInput {
            prompt: prompt.into(),
            completion_text: completion_text.into(),
            answer,
            completion_tokens: None,
            group: None,
            messages: None,
            data_source: None,
            columns: None,
            completion_ids: Vec::new(),
            completion_messages: Vec::new(),
            environment: None,
        }
    }

    /// The completion's token ids and, with tool calls, its messages.
    pub fn with_completion(mut self, ids: Vec<u32>, messages: Vec<Value>) -> Self {
        self.completion_ids = ids;
        self.completion_messages = messages;
        self
    }

    pub fn with_columns(mut self, columns: Option<String>) -> Self {
        self.columns = columns;
        self
    }

    pub fn with_data_source(mut self, data_source: Option<String>) -> Self {
        self.data_source = data_source;
        self
    }

    pub fn with_messages(mut self, messages: Option<Vec<ChatMessage>>) -> Self {
        self.messages = messages;
        self
    }

    pub fn with_completion_tokens(mut self, n: usize) -> Self {
        self.completion_tokens = Some(n);
        self
    }

    pub fn in_group(mut self, group: usize) -> Self {
        self.group = Some(group);
        self
    }
}

/// The values of one function over a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionScores {
    /// The logged name: the entry's `label`, or its `name`.
    pub label: String,
    pub weight: f64,
    pub values: Vec<f64>,
}

/// The scores of a batch: per function (in recipe order) and the total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardScores {
    pub per_function: Vec<FunctionScores>,
    pub total: Vec<f64>,
    /// What the `python` functions logged while scoring it.
    pub logged: RewardLogs,
}

/// What `python` reward functions log through TRL's `log_extra(column,
/// values)` and `log_metric(name, value)` while they score a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardLogs {
    /// Columns for the completions' log: one value per completion.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<Value>>,
    /// Each metric's finite values, in the order logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, Vec<f64>>,
}

impl RewardLogs {
    /// The metrics as logged: each one's mean.
    pub fn metric_means(&self) -> BTreeMap<String, f64> {
        self.metrics
            .iter()
            .filter(|(_, values)| !values.is_empty())
            .map(|(name, values)| {
                (
                    name.clone(),
                    values.iter().sum::<f64>() / values.len() as f64,
                )
            })
            .collect()
    }

    /// Whether nothing was logged.
    pub fn is_empty(&self) -> bool {
        self.extra.is_empty() && self.metrics.is_empty()
    }

    /// Completion `k`'s extra columns.
    pub fn extra_of(&self, k: usize) -> serde_json::Map<String, Value> {
        self.extra
            .iter()
            .filter_map(|(column, values)| Some((column.clone(), values.get(k)?.clone())))
            .collect()
    }
}

impl RewardScores {
    /// `(label, mean, population std)` per function, for the train log;
    /// over the completions a function applies to (NaN where it applies to
    /// none).
    pub fn summary(&self) -> Vec<(String, f64, f64)> {
        self.per_function
            .iter()
            .map(|f| {
                let (mean, std) = nan_mean_std(&f.values);
                (f.label.clone(), mean, std)
            })
            .collect()
    }
}

/// Mean and population std of the values that are not NaN (a Python
/// function's None), as TRL's `nanmean` / `nanstd` log them: 0 for none
/// at all, NaN when every value is NaN.
pub fn nan_mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let kept: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if kept.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = kept.len() as f64;
    let mean = kept.iter().sum::<f64>() / n;
    let var = kept.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The recipe's reward functions, ready to score.
#[derive(Debug)]
pub struct RewardRegistry {
    functions: Vec<RewardFunction>,
    /// TRL's `trainer_state` for `python` functions
    /// ([`Self::set_trainer_state`]).
    trainer_state: std::sync::Mutex<Value>,
}

#[derive(Debug)]
struct RewardFunction {
    label: String,
    weight: f64,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    ExactMatch(ExactMatch),
    Format(Format),
    LengthPenalty(LengthPenalty),
    Blocklist(Blocklist),
    Remote(Remote),
    ThinkFormat,
    TagCount,
    ReasoningSteps,
    RepetitionPenalty(RepetitionPenalty),
    Cosine(Cosine),
    Length(Length),
    RewardModel(Box<RewardModel>),
    Code(Box<crate::code_execution::Code>),
    Python(Box<PythonReward>),
    /// TRL's environment-owned reward: each completion's environment's
    /// `get_reward()` (not a recipe entry: added for an environment class
    /// that has it, [`RewardRegistry::add_environment_reward`]).
    Environment(EnvironmentReward),
}

/// Names of the built-in functions.
pub const FUNCTION_NAMES: &[&str] = &[
    "exact_match",
    "format",
    "length_penalty",
    "blocklist",
    "remote",
    "think_format",
    "tag_count",
    "reasoning_steps",
    "repetition_penalty",
    "cosine",
    "length",
    "reward_model",
    "code",
    "python",
];

impl RewardRegistry {
    /// Builds the registry from the recipe's entries (JSON objects with
    /// `name`, optional `weight` (default 1.0), optional `label` (the logged
    /// name, default `name`; needed when one function is used twice), and
    /// the function's parameters).
    pub fn from_configs(configs: &[Value]) -> Result<Self> {
        RewardRegistry::build(configs, false)
    }

    /// `from_configs`, or an empty registry where `may_be_empty` (the recipe
    /// allows no entry beside an environment, whose own reward comes
    /// later: [`Self::add_environment_reward`]).
    fn build(configs: &[Value], may_be_empty: bool) -> Result<Self> {
        if configs.is_empty() && !may_be_empty {
            return Err(RewardError::Config {
                index: 0,
                function: String::new(),
                message: "no reward functions configured".into(),
            });
        }
        let mut functions = Vec::with_capacity(configs.len());
        let mut labels = HashSet::new();
        for (index, config) in configs.iter().enumerate() {
            let f = RewardFunction::from_config(index, config)?;
            if !labels.insert(f.label.clone()) {
                return Err(RewardError::Config {
                    index,
                    function: f.label.clone(),
                    message: format!(
                        "another function is already logged as `{}`; give one of them a distinct `label`",
                        f.label
                    ),
                });
            }
            functions.push(f);
        }
        // The Python functions share one process, as TRL's reward
        // functions share its: module state is common to them.
        let specs: Vec<String> = functions
            .iter()
            .filter_map(|f| match &f.kind {
                Kind::Python(p) => Some(p.spec.clone()),
                _ => None,
            })
            .collect();
        let mut registry = RewardRegistry {
            functions,
            trainer_state: std::sync::Mutex::new(serde_json::json!({
                "global_step": 0, "max_steps": 0, "epoch": 0.0
            })),
        };
        if !specs.is_empty() {
            registry.set_python_processes(Arc::new(crate::python::PythonProcesses::new(specs, 1)));
        }
        Ok(registry)
    }

    /// The registry of a recipe's `reward` section; an empty section (which
    /// the recipe allows only with `rollout.environment_factory`) gives an
    /// empty registry, for the environment's own reward.
    pub fn from_section(section: &crate::recipe::RewardSection) -> Result<Self> {
        let configs = section
            .functions
            .iter()
            .enumerate()
            .map(|(index, f)| {
                serde_json::to_value(f).map_err(|e| RewardError::Config {
                    index,
                    function: f.name.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<Value>>>()?;
        RewardRegistry::build(&configs, true)
    }

    /// Adds TRL's environment-owned reward: `get_reward()` of each
    /// completion's environment (`rollout.environment_factory`), weight 1,
    /// logged under `class`, its class's name, as TRL logs it; its instances
    /// live in `processes`. Each call has `per_call` (a batch: that times
    /// its completions), named by `timeout_key`.
    pub fn add_environment_reward(
        &mut self,
        class: &str,
        processes: Arc<crate::python::PythonProcesses>,
        per_call: Duration,
        timeout_key: &str,
    ) -> Result<()> {
        if let Some(index) = self.functions.iter().position(|f| f.label == class) {
            return Err(RewardError::Config {
                index,
                function: class.to_string(),
                message: format!(
                    "is logged as `{class}`, the name of rollout.environment_factory's class, \
                     whose get_reward() is a reward too (logged under its class's name, as TRL \
                     logs it); give reward.functions[{index}] another `label`"
                ),
            });
        }
        self.functions.push(RewardFunction {
            label: class.to_string(),
            weight: 1.0,
            kind: Kind::Environment(EnvironmentReward {
                class: class.to_string(),
                processes,
                per_call,
                timeout_key: timeout_key.to_string(),
            }),
        });
        Ok(())
    }

    /// Whether there is nothing to score with.
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }

    /// The weights, in recipe order (a gate's is 1).
    pub fn weights(&self) -> Vec<f64> {
        self.functions.iter().map(|f| f.weight).collect()
    }

    /// Loads what the functions load on first use (reward models' weights),
    /// so that a broken one stops the run before its first generation.
    pub fn prepare(&self) -> Result<()> {
        for f in &self.functions {
            if let Kind::RewardModel(rm) = &f.kind {
                rm.classifier().map_err(|m| f.fail(m))?;
            }
        }
        // One import of every Python function.
        let python: Vec<(&RewardFunction, &PythonReward)> = self
            .functions
            .iter()
            .filter_map(|f| match &f.kind {
                Kind::Python(p) => Some((f, p.as_ref())),
                _ => None,
            })
            .collect();
        if let Some((first, _)) = python.first() {
            let specs: Vec<String> = python.iter().map(|(_, p)| p.spec.clone()).collect();
            let checked =
                crate::python::inspect("load", &specs).map_err(|e| first.fail(format!("{e:#}")))?;
            for ((f, p), checked) in python.iter().zip(checked) {
                p.imported(&checked).map_err(|m| f.fail(m))?;
            }
        }
        Ok(())
    }

    /// The process the Python functions share, if any.
    pub fn python_processes(&self) -> Option<Arc<crate::python::PythonProcesses>> {
        self.functions.iter().find_map(|f| match &f.kind {
            Kind::Python(p) => p.processes.clone(),
            _ => None,
        })
    }

    /// Runs the Python functions in `processes` (which serves them all:
    /// [`crate::tools::ToolRunner::attach_rewards`]).
    pub fn set_python_processes(&mut self, processes: Arc<crate::python::PythonProcesses>) {
        for f in &mut self.functions {
            match &mut f.kind {
                Kind::Python(p) => p.processes = Some(processes.clone()),
                Kind::Environment(e) => e.processes = processes.clone(),
                _ => {}
            }
        }
    }

    /// What the `python` functions are (recipe key, spec, source file's
    /// SHA-256, read by [`Self::prepare`]), for the checkpoint: the recipe
    /// names them by path only, so a resume compares this to see an edited
    /// function.
    pub fn python_functions(&self) -> Vec<Value> {
        self.functions
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match &f.kind {
                Kind::Python(p) => Some(serde_json::json!({
                    "key": format!("reward.functions[{i}].function"),
                    "function": p.spec,
                    "source_sha256": p.source_sha256.get(),
                })),
                _ => None,
            })
            .collect()
    }

    /// Names the columns the `python` functions receive the answers and
    /// sources under (`data.answer_column`, `data.data_source_column`)
    /// where the rows come without their columns
    /// ([`crate::data::Example::columns`]; a dotted answer column).
    pub fn with_data_columns(mut self, data: &crate::recipe::DataSection) -> Self {
        for f in &mut self.functions {
            if let Kind::Python(p) = &mut f.kind {
                p.answer_column = data.answer_column.clone();
                p.data_source_column = data.data_source_column.clone();
            }
        }
        self
    }

    /// Where training stands, for the `python` functions' `trainer_state`
    /// (TRL's: `global_step`, the optimizer updates done, `max_steps`, all
    /// the run's updates, and `epoch`, the passes over the prompts done).
    pub fn set_trainer_state(&self, global_step: u64, max_steps: u64, epoch: f64) {
        let state = serde_json::json!({
            "global_step": global_step, "max_steps": max_steps, "epoch": epoch
        });
        *self.trainer_state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// The logged names, in recipe order.
    pub fn labels(&self) -> Vec<&str> {
        self.functions.iter().map(|f| f.label.as_str()).collect()
    }

    /// Scores a batch with every function (in recipe order, each awaited
    /// before the next starts, but the `async def` Python functions, which
    /// run together after the others, as TRL gathers them).
    pub async fn score(&self, batch: &[RewardInput]) -> Result<RewardScores> {
        let trainer_state = self
            .trainer_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut per_function = Vec::with_capacity(self.functions.len());
        let mut weighted = vec![0.0; batch.len()];
        let mut gate = vec![1.0; batch.len()];
        // In recipe order, but the `async def` Python functions, which run
        // together once the others are done, as TRL gathers them.
        let mut scored: Vec<Option<(Vec<f64>, RewardLogs)>> = vec![None; self.functions.len()];
        for (i, f) in self.functions.iter().enumerate() {
            if !f.is_async() {
                let mut logs = RewardLogs::default();
                scored[i] = Some((f.score(batch, &trainer_state, &mut logs).await?, logs));
            }
        }
        let gathered = self
            .functions
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_async())
            .map(|(i, f)| {
                let trainer_state = &trainer_state;
                async move {
                    let mut logs = RewardLogs::default();
                    let values = f.score(batch, trainer_state, &mut logs).await;
                    (i, values.map(|v| (v, logs)))
                }
            });
        for (i, result) in futures::future::join_all(gathered).await {
            scored[i] = Some(result?);
        }
        let mut logged = RewardLogs::default();
        for (f, scored) in self.functions.iter().zip(scored) {
            let Some((values, logs)) = scored else {
                return Err(f.fail("not scored".into()));
            };
            logged.extra.extend(logs.extra);
            for (name, values) in logs.metrics {
                logged.metrics.entry(name).or_default().extend(values);
            }
            // NaN: a Python function's None (it does not apply).
            let none_allowed = matches!(f.kind, Kind::Python(_) | Kind::Environment(_));
            if let Some(i) = values
                .iter()
                .position(|v| v.is_infinite() || (v.is_nan() && !none_allowed))
            {
                return Err(f.fail(format!(
                    "value {} for completion {i} is not finite",
                    values[i]
                )));
            }
            if f.is_gate() {
                for (g, v) in gate.iter_mut().zip(&values) {
                    *g *= v;
                }
            } else {
                for (t, v) in weighted.iter_mut().zip(&values) {
                    if !v.is_nan() {
                        *t += f.weight * v;
                    }
                }
            }
            per_function.push(FunctionScores {
                label: f.label.clone(),
                weight: f.weight,
                values,
            });
        }
        let total = weighted.iter().zip(&gate).map(|(w, g)| w * g).collect();
        let unscored = (0..batch.len())
            .filter(|&i| {
                let mut summed = per_function
                    .iter()
                    .zip(&self.functions)
                    .filter(|(_, f)| !f.is_gate())
                    .map(|(s, _)| s.values[i]);
                // None from every function that would count.
                summed.next().is_some_and(f64::is_nan) && summed.all(f64::is_nan)
            })
            .count();
        if unscored > 0 {
            // As TRL warns: such a completion's reward is 0.
            tracing::warn!(
                "{unscored} completion(s) got None from every reward function; their reward \
                 is 0: check that the functions cover every kind of row"
            );
        }
        Ok(RewardScores {
            per_function,
            total,
            logged,
        })
    }
}

/// Deserializes `params` into `T` (which denies unknown fields), naming the
/// function in the error.
fn params<T: DeserializeOwned>(
    index: usize,
    label: &str,
    params: serde_json::Map<String, Value>,
) -> Result<T> {
    serde_path_to_error::deserialize(Value::Object(params)).map_err(|e| {
        let path = e.path().to_string();
        let message = if path == "." {
            format!("parameters: {}", e.inner())
        } else {
            format!("parameter `{path}`: {}", e.inner())
        };
        RewardError::Config {
            index,
            function: label.to_string(),
            message,
        }
    })
}

impl RewardFunction {
    fn from_config(index: usize, config: &Value) -> Result<Self> {
        let cfg_err = |function: &str, message: String| RewardError::Config {
            index,
            function: function.to_string(),
            message,
        };
        let Some(object) = config.as_object() else {
            return Err(cfg_err(
                "?",
                format!("expected an object with `name`, got {config}"),
            ));
        };
        let mut rest = object.clone();
        let name = match rest.remove("name") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(cfg_err(
                    "?",
                    format!("`name` must be a string, got {other}"),
                ));
            }
            None => {
                return Err(cfg_err(
                    "?",
                    format!("missing `name` (one of {FUNCTION_NAMES:?})"),
                ));
            }
        };
        let weight = match rest.remove("weight") {
            None => 1.0,
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(other) => {
                return Err(cfg_err(
                    &name,
                    format!("`weight` must be a number, got {other}"),
                ));
            }
        };
        if !weight.is_finite() {
            return Err(cfg_err(&name, "`weight` must be finite".into()));
        }
        let label = match rest.remove("label") {
            // A Python function is logged by its name, as TRL logs it.
            None if name == "python" => rest
                .get("function")
                .and_then(Value::as_str)
                .and_then(|spec| crate::python::function_name(spec).ok())
                .unwrap_or("python")
                .to_string(),
            None => name.clone(),
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(other) => {
                return Err(cfg_err(
                    &name,
                    format!("`label` must be a non-empty string, got {other}"),
                ));
            }
        };
        let kind = match name.as_str() {
            "exact_match" => Kind::ExactMatch(params(index, &label, rest)?),
            "format" => Kind::Format(
                Format::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            ),
            "length_penalty" => Kind::LengthPenalty(
                LengthPenalty::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            ),
            "blocklist" => Kind::Blocklist(
                Blocklist::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            ),
            "remote" => Kind::Remote(
                Remote::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            ),
            "think_format" => {
                params::<NoParams>(index, &label, rest)?;
                Kind::ThinkFormat
            }
            "tag_count" => {
                params::<NoParams>(index, &label, rest)?;
                Kind::TagCount
            }
            "reasoning_steps" => {
                params::<NoParams>(index, &label, rest)?;
                Kind::ReasoningSteps
            }
            "repetition_penalty" => Kind::RepetitionPenalty(
                RepetitionPenalty::new(params(index, &label, rest)?)
                    .map_err(|m| cfg_err(&label, m))?,
            ),
            "cosine" => Kind::Cosine(
                Cosine::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            ),
            "length" => Kind::Length(params(index, &label, rest)?),
            "reward_model" => Kind::RewardModel(Box::new(
                RewardModel::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            )),
            "code" => Kind::Code(Box::new(
                crate::code_execution::Code::new(params(index, &label, rest)?)
                    .map_err(|m| cfg_err(&label, m))?,
            )),
            "python" => Kind::Python(Box::new(
                PythonReward::new(params(index, &label, rest)?).map_err(|m| cfg_err(&label, m))?,
            )),
            other => {
                return Err(cfg_err(
                    other,
                    format!("unknown reward function `{other}`; known: {FUNCTION_NAMES:?}"),
                ));
            }
        };
        if matches!(&kind, Kind::Blocklist(b) if b.mode == BlocklistMode::Gate) && weight != 1.0 {
            return Err(cfg_err(
                &label,
                "a `blocklist` in `gate` mode multiplies the total and takes no `weight`; \
                 use `mode: penalty` for a weighted penalty"
                    .into(),
            ));
        }
        Ok(RewardFunction {
            label,
            weight,
            kind,
        })
    }

    /// An `async def` Python function: it runs beside the others.
    fn is_async(&self) -> bool {
        matches!(&self.kind, Kind::Python(p) if p.async_def.get() == Some(&true))
    }

    fn is_gate(&self) -> bool {
        matches!(&self.kind, Kind::Blocklist(b) if b.mode == BlocklistMode::Gate)
    }

    fn fail(&self, message: String) -> RewardError {
        RewardError::Score {
            function: self.label.clone(),
            message,
        }
    }

    /// `score` of every completion; a failure names the completion.
    fn each(
        &self,
        batch: &[RewardInput],
        score: impl Fn(&RewardInput) -> Result<f64, String>,
    ) -> Result<Vec<f64>> {
        batch
            .iter()
            .enumerate()
            .map(|(i, x)| score(x).map_err(|m| self.fail(format!("completion {i}: {m}"))))
            .collect()
    }

    /// `trainer_state`: where training stands, for `python` functions,
    /// which log into `logged`.
    async fn score(
        &self,
        batch: &[RewardInput],
        trainer_state: &Value,
        logged: &mut RewardLogs,
    ) -> Result<Vec<f64>> {
        match &self.kind {
            Kind::ExactMatch(f) => self.each(batch, |x| f.score(x)),
            Kind::Format(f) => Ok(batch.iter().map(|x| f.score(&x.completion_text)).collect()),
            Kind::LengthPenalty(f) => self.each(batch, |x| f.score(x)),
            Kind::Blocklist(f) => Ok(batch.iter().map(|x| f.score(&x.completion_text)).collect()),
            Kind::Remote(f) => f.score(batch).await.map_err(|m| self.fail(m)),
            Kind::Code(f) => f.score(batch).await.map_err(|m| self.fail(m)),
            Kind::Python(f) => f
                .score(batch, trainer_state, logged)
                .await
                .map_err(|m| self.fail(m)),
            Kind::Environment(f) => f.score(batch).await.map_err(|m| self.fail(m)),
            Kind::ThinkFormat => Ok(batch
                .iter()
                .map(|x| think_format(&x.completion_text))
                .collect()),
            Kind::TagCount => Ok(batch
                .iter()
                .map(|x| tag_count(&x.completion_text))
                .collect()),
            Kind::ReasoningSteps => Ok(batch
                .iter()
                .map(|x| reasoning_steps(&x.completion_text))
                .collect()),
            Kind::RepetitionPenalty(f) => {
                Ok(batch.iter().map(|x| f.score(&x.completion_text)).collect())
            }
            Kind::Cosine(f) => self.each(batch, |x| f.score(x)),
            Kind::Length(f) => f.score(batch).map_err(|m| self.fail(m)),
            Kind::RewardModel(f) => f.score(batch).map_err(|m| self.fail(m)),
        }
    }
}

// ---------------------------------------------------------------- exact_match

/// Where `exact_match` looks for the completion's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extract {
    /// The last `<answer>...</answer>`.
    AnswerTag,
    /// The last `\boxed{...}` (balanced braces).
    Boxed,
    /// The last number in the text (`-1,234.5`, `3/4`): for models that answer
    /// bare arithmetic without tags, like the demo's tiny model.
    LastNumber,
    /// `<answer>` tag, else `\boxed{}`.
    #[default]
    Any,
    /// The number after the last `#### ` (GSM8K's answer line; verl's
    /// gsm8k scorer, strict: no such line, no answer).
    Gsm8k,
    /// The text after the last `Answer:` on its line, in the last 300
    /// characters (case-insensitive; verl's math_dapo scorer, DAPO-Math's
    /// format).
    AnswerLine,
    /// Chosen per row by its `data_source` (`data.data_source_column`), as
    /// verl's default scorer chooses: `openai/gsm8k` as `gsm8k`; MATH's
    /// sources (`lighteval/MATH`, `DigitalLearningGmbH/MATH-lighteval`,
    /// `HuggingFaceH4/MATH-500`), NuminaMath's `numina_*` and
    /// `hiyouga/geometry3k` as `boxed` (MATH's `is_equiv` standing in for
    /// the latter two's checks); `math_dapo` and `aime*` as `answer_line`, a
    /// wrong answer scoring -1 as verl's math_dapo scores it. Another source
    /// is an error naming it.
    DataSource,
}

impl Extract {
    /// The extract for a row from `data_source`, as verl's
    /// `default_compute_score` picks its scorer, and the value of a wrong
    /// answer there (its math_dapo scorer gives -1).
    pub fn for_data_source(data_source: &str) -> Option<(Extract, f64)> {
        match data_source {
            "openai/gsm8k" => Some((Extract::Gsm8k, 0.0)),
            "lighteval/MATH" | "DigitalLearningGmbH/MATH-lighteval" | "HuggingFaceH4/MATH-500" => {
                Some((Extract::Boxed, 0.0))
            }
            // verl's prime_math (NuminaMath) and geo3k scorers also read the
            // last \boxed{}; their equivalence checks are MATH's is_equiv here.
            s if s.starts_with("numina_") || s == "hiyouga/geometry3k" => {
                Some((Extract::Boxed, 0.0))
            }
            s if s == "math_dapo" || s.starts_with("aime") => Some((Extract::AnswerLine, -1.0)),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExactMatch {
    #[serde(default)]
    extract: Extract,
}

impl ExactMatch {
    fn score(&self, x: &RewardInput) -> Result<f64, String> {
        let Some(reference) = &x.answer else {
            return Err("no reference answer (map the dataset's answer column)".into());
        };
        let (extract, wrong) = match self.extract {
            Extract::DataSource => {
                let Some(source) = &x.data_source else {
                    return Err("`extract: data_source` needs each row's source: set \
                         data.data_source_column (verl's datasets: data_source)"
                        .into());
                };
                Extract::for_data_source(source).ok_or_else(|| {
                    format!(
                        "data_source {source:?} has no scorer here (openai/gsm8k; \
                         lighteval/MATH, DigitalLearningGmbH/MATH-lighteval, \
                         HuggingFaceH4/MATH-500, numina_*, hiyouga/geometry3k; math_dapo, \
                         aime*): choose an `extract` for it, or score it with a `remote` \
                         function"
                    )
                })?
            }
            e => (e, 0.0),
        };
        let Some(predicted) = extract_answer(&x.completion_text, extract) else {
            return Ok(wrong);
        };
        Ok(if answers_match(predicted, reference_answer(reference)) {
            1.0
        } else {
            wrong
        })
    }
}

/// The answer inside a reference: the text after the last `####` when there
/// is one (GSM8K's solutions), else the last balanced `\boxed{...}` (a
/// worked solution, as MATH's and open-r1's `solution` columns hold, where
/// open-r1's math_verify takes that too), else the whole reference.
pub fn reference_answer(reference: &str) -> &str {
    if let Some(i) = reference.rfind("####") {
        return &reference[i + 4..];
    }
    last_boxed(reference).unwrap_or(reference)
}

/// The completion's final answer, per `extract` (`data_source`, which a
/// row resolves, reads as `any` here).
pub fn extract_answer(text: &str, extract: Extract) -> Option<&str> {
    match extract {
        Extract::AnswerTag => last_answer_tag(text),
        Extract::Boxed => last_boxed(text),
        Extract::LastNumber => last_number(text),
        Extract::Any | Extract::DataSource => last_answer_tag(text).or_else(|| last_boxed(text)),
        Extract::AnswerLine => {
            // verl's math_dapo reads the last 300 characters.
            let start = text.char_indices().rev().nth(299).map_or(0, |(i, _)| i);
            ANSWER_LINE
                .captures_iter(&text[start..])
                .last()
                .and_then(|c| c.get(1))
                .map(|m| m.as_str().trim())
        }
        Extract::Gsm8k => GSM8K_ANSWER
            .captures_iter(text)
            .last()
            .and_then(|c| c.get(1))
            .map(|m| m.as_str()),
    }
}

static ANSWER_LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)Answer\s*:\s*([^\n]+)").unwrap_or_else(|e| unreachable!("{e}"))
});

static GSM8K_ANSWER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"#### (-?[0-9.,]+)").unwrap_or_else(|e| unreachable!("{e}")));

fn last_answer_tag(text: &str) -> Option<&str> {
    let close = text.rfind("</answer>")?;
    let open = text[..close].rfind("<answer>")?;
    Some(&text[open + "<answer>".len()..close])
}

fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None // unbalanced: a truncated completion has no answer
}

static LAST_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
        .unwrap_or_else(|e| unreachable!("{e}"))
});

fn last_number(text: &str) -> Option<&str> {
    LAST_NUMBER.find_iter(text).last().map(|m| m.as_str())
}

static PLAIN_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$").unwrap_or_else(|e| unreachable!("{e}"))
});
static THOUSANDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d*)?$").unwrap_or_else(|e| unreachable!("{e}"))
});
static FRACTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(-?\d+)/(\d+)$").unwrap_or_else(|e| unreachable!("{e}")));

/// A normalised answer: a number in canonical decimal form, a fraction, or
/// text with whitespace collapsed.
#[derive(Debug, PartialEq)]
enum Normalized {
    Decimal(String),
    Fraction(f64),
    Text(String),
}

/// Normalises an answer: trims, drops a wrapping `$...$` and a trailing
/// period; for numbers removes spaces, a leading `+`, thousands commas,
/// trailing zeros of the fraction and a trailing `.` (`+1,000.50` ->
/// `1000.5`, `2.0` -> `2`, `-0` -> `0`).
fn normalize(answer: &str) -> Normalized {
    let mut s = answer.trim();
    if let Some(inner) = s.strip_prefix('$').and_then(|t| t.strip_suffix('$')) {
        s = inner.trim();
    }
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let mut n = compact.strip_prefix('+').unwrap_or(&compact).to_string();
    if n.ends_with('.') && n.len() > 1 {
        n.pop();
    }
    if THOUSANDS.is_match(&n) {
        n.retain(|c| c != ',');
    }
    if PLAIN_NUMBER.is_match(&n) {
        return Normalized::Decimal(canonical_decimal(&n));
    }
    if let Some(c) = FRACTION.captures(&n)
        && let (Ok(a), Ok(b)) = (c[1].parse::<f64>(), c[2].parse::<f64>())
        && b != 0.0
    {
        return Normalized::Fraction(a / b);
    }
    Normalized::Text(s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `-007.500` -> `-7.5`; `.5` -> `0.5`; `-0.0` -> `0`.
fn canonical_decimal(n: &str) -> String {
    let (neg, digits) = match n.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, n),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let body = if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    };
    if neg && body != "0" {
        format!("-{body}")
    } else {
        body
    }
}

/// Whether a predicted answer equals the reference after [`normalize`]-ing
/// both: decimals compare as canonical strings (exact, any length); a
/// fraction compares by value with a decimal or another fraction (`1/2` ==
/// `0.5`); text compares exactly, or else as the MATH benchmark's
/// `is_equiv` compares answers ([`math_equiv`]).
pub fn answers_match(predicted: &str, reference: &str) -> bool {
    numeric_or_text_match(predicted, reference) || math_equiv(predicted, reference)
}

/// Hendrycks et al.'s MATH `is_equiv`, as verl's MATH scorer and
/// lm-evaluation-harness apply it: both answers through `strip_string`
/// (`\dfrac` -> `\frac`, no `\left` / `\right`, degrees, `\$`, units after
/// `\text{ `, `\%` or spaces, `x = ` before a short left side, `\sqrt2` ->
/// `\sqrt{2}`, `\frac12` -> `\frac{1}{2}`, `0.5` and `1/2` ->
/// `\frac{1}{2}`), then compared; where `strip_string` would raise, the
/// answers as given are compared.
pub fn math_equiv(a: &str, b: &str) -> bool {
    match (math_strip(a), math_strip(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// `strip_string` of the MATH benchmark; `None` where the original raises.
fn math_strip(answer: &str) -> Option<String> {
    let mut s = answer
        .replace('\n', "")
        .replace("\\!", "")
        .replace("\\\\", "\\")
        .replace("tfrac", "frac")
        .replace("dfrac", "frac")
        .replace("\\left", "")
        .replace("\\right", "")
        .replace("^{\\circ}", "")
        .replace("^\\circ", "")
        .replace("\\$", "");
    // Units: `\text{ ` only ever introduces them (on the right).
    if s.contains("\\text{ ") {
        let parts: Vec<&str> = s.split("\\text{ ").collect();
        if parts.len() != 2 {
            return None;
        }
        s = parts[0].to_string();
    }
    s = s
        .replace("\\%", "")
        .replace(" .", " 0.")
        .replace("{.", "{0.");
    if s.is_empty() {
        return Some(s);
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    // `k = 5` -> `5` when the left side is short.
    let sides: Vec<&str> = s.split('=').collect();
    if sides.len() == 2 && sides[0].chars().count() <= 2 {
        s = sides[1].to_string();
    }
    s = math_fix_sqrt(&s)?;
    s.retain(|c| c != ' ');
    s = math_fix_fracs(&s)?;
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    math_fix_a_slash_b(&s)
}

/// `\sqrt3` -> `\sqrt{3}`.
fn math_fix_sqrt(s: &str) -> Option<String> {
    let mut parts = s.split("\\sqrt");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let mut chars = part.chars();
        let first = chars.next()?;
        if first == '{' {
            out.push_str("\\sqrt");
            out.push_str(part);
        } else {
            out.push_str(&format!("\\sqrt{{{first}}}{}", chars.as_str()));
        }
    }
    Some(out)
}

/// `\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`.
fn math_fix_fracs(s: &str) -> Option<String> {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out.push_str("\\frac");
        let mut chars = part.chars();
        let a = chars.next()?;
        if a == '{' {
            out.push_str(part);
            continue;
        }
        let Some(b) = chars.next() else {
            return Some(s.to_string());
        };
        let rest = chars.as_str();
        if b == '{' {
            out.push_str(&format!("{{{a}}}{{{rest}"));
        } else {
            out.push_str(&format!("{{{a}}}{{{b}}}{rest}"));
        }
    }
    Some(out)
}

/// `3/4` -> `\frac{3}{4}` (integers only; `None` where Python's `int()`
/// raises, as the original lets it).
fn math_fix_a_slash_b(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() != 2 {
        return Some(s.to_string());
    }
    let a: i128 = python_int(parts[0])?;
    let b: i128 = python_int(parts[1])?;
    Some(if s == format!("{a}/{b}") {
        format!("\\frac{{{a}}}{{{b}}}")
    } else {
        s.to_string()
    })
}

/// Python's `int(text)` for what `strip_string` leaves (no spaces).
fn python_int(text: &str) -> Option<i128> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return None;
    }
    text.replace('_', "").parse().ok()
}

fn numeric_or_text_match(predicted: &str, reference: &str) -> bool {
    let value = |n: &Normalized| match n {
        Normalized::Decimal(d) => d.parse::<f64>().ok(),
        Normalized::Fraction(f) => Some(*f),
        Normalized::Text(_) => None,
    };
    let (p, r) = (normalize(predicted), normalize(reference));
    match (&p, &r) {
        (Normalized::Decimal(a), Normalized::Decimal(b)) => a == b,
        (Normalized::Text(a), Normalized::Text(b)) => a == b,
        _ => match (value(&p), value(&r)) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0),
            _ => false,
        },
    }
}

// ---------------------------------------------------------------- format

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FormatParams {
    /// Rust `regex` syntax; `(?s)` lets `.` match newlines (Python's re.DOTALL).
    pattern: String,
    /// The whole completion must match (`^(?:pattern)$`), not just a part.
    #[serde(default)]
    full_match: bool,
}

#[derive(Debug)]
struct Format {
    regex: Regex,
}

impl Format {
    fn new(p: FormatParams) -> Result<Self, String> {
        let source = if p.full_match {
            format!("^(?:{})$", p.pattern)
        } else {
            p.pattern.clone()
        };
        let regex = Regex::new(&source)
            .map_err(|e| format!("`pattern` {:?} is not a valid regex: {e}", p.pattern))?;
        Ok(Format { regex })
    }

    fn score(&self, completion: &str) -> f64 {
        if self.regex.is_match(completion) {
            1.0
        } else {
            0.0
        }
    }
}

// ---------------------------------------------------------------- length_penalty

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LengthMode {
    /// DAPO's soft overlong punishment: with `L` the length, `M` =
    /// `max_length` and `C` = `cache_length`: 0 when `L <= M - C`,
    /// `(M - C - L) / C` when `M - C < L <= M`, -1 when `L > M`.
    #[default]
    Overlong,
    /// `-min(L, M) / M`.
    Linear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LengthUnit {
    /// `RewardInput::completion_tokens` (required).
    #[default]
    Tokens,
    /// Unicode scalar values of the completion text.
    Chars,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LengthPenaltyParams {
    #[serde(default)]
    mode: LengthMode,
    max_length: usize,
    #[serde(default)]
    cache_length: Option<usize>,
    #[serde(default)]
    unit: LengthUnit,
}

#[derive(Debug)]
struct LengthPenalty {
    mode: LengthMode,
    max_length: f64,
    cache_length: f64,
    unit: LengthUnit,
}

impl LengthPenalty {
    fn new(p: LengthPenaltyParams) -> Result<Self, String> {
        if p.max_length == 0 {
            return Err("`max_length` must be positive".into());
        }
        let cache_length = match (p.mode, p.cache_length) {
            (LengthMode::Overlong, None) => {
                return Err("`overlong` mode needs `cache_length`".into());
            }
            (LengthMode::Overlong, Some(c)) if c == 0 || c > p.max_length => {
                return Err(format!(
                    "`cache_length` must be in 1..=max_length ({}), got {c}",
                    p.max_length
                ));
            }
            (LengthMode::Overlong, Some(c)) => c as f64,
            (LengthMode::Linear, Some(_)) => {
                return Err("`cache_length` only applies to `overlong` mode".into());
            }
            (LengthMode::Linear, None) => 0.0,
        };
        Ok(LengthPenalty {
            mode: p.mode,
            max_length: p.max_length as f64,
            cache_length,
            unit: p.unit,
        })
    }

    fn score(&self, x: &RewardInput) -> Result<f64, String> {
        let len = match self.unit {
            LengthUnit::Tokens => x
                .completion_tokens
                .ok_or("no completion token count (set `unit: chars` to measure characters)")?
                as f64,
            LengthUnit::Chars => x.completion_text.chars().count() as f64,
        };
        let (m, c) = (self.max_length, self.cache_length);
        Ok(match self.mode {
            LengthMode::Overlong if len <= m - c => 0.0,
            LengthMode::Overlong if len <= m => (m - c - len) / c,
            LengthMode::Overlong => -1.0,
            LengthMode::Linear => -len.min(m) / m,
        })
    }
}

// ---------------------------------------------------------------- open-r1's

/// For the functions that take no parameters: any parameter is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// TRL's `think_format_reward` (`^<think>(?!.*<think>)(.*?)</think>.*$`,
/// DOTALL, matched at the start): the completion opens with `<think>`,
/// opens no other after it, and closes it.
fn think_format(completion: &str) -> f64 {
    match completion.strip_prefix("<think>") {
        Some(rest) if !rest.contains("<think>") && rest.contains("</think>") => 1.0,
        _ => 0.0,
    }
}

/// open-r1's `tag_count_reward`: 0.25 for each of `<think>\n`,
/// `\n</think>\n`, `\n<answer>\n` and `\n</answer>` that appears exactly
/// once.
fn tag_count(completion: &str) -> f64 {
    ["<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>"]
        .iter()
        .filter(|tag| completion.matches(*tag).count() == 1)
        .count() as f64
        * 0.25
}

/// open-r1's `reasoning_steps_reward`: step markers (`Step N:`, a numbered
/// list item at the very start, `\n-`, `\n*`, `First,` `Second,` `Next,`
/// `Finally,`), three or more for the full reward. Python's `re.findall`
/// without MULTILINE: `^` is the start of the text only.
fn reasoning_steps(completion: &str) -> f64 {
    static STEP: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"Step \d+:|\A\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,")
            .expect("a valid regex")
    });
    (STEP.find_iter(completion).count() as f64 / 3.0).min(1.0)
}

fn default_ngram_size() -> usize {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepetitionPenaltyParams {
    /// open-r1's `repetition_n_grams`.
    #[serde(default = "default_ngram_size")]
    ngram_size: usize,
    /// open-r1's `repetition_max_penalty`: the value of a completion made of
    /// one n-gram repeated; negative.
    #[serde(default = "default_penalty")]
    max_penalty: f64,
}

/// open-r1's `get_repetition_penalty_reward` (Yeo et al., "Demystifying
/// Long Chain-of-Thought Reasoning"): over the lower-cased
/// whitespace-separated words, `max_penalty x (1 - distinct n-grams / n-grams)`;
/// 0 for a completion shorter than one n-gram.
#[derive(Debug)]
struct RepetitionPenalty {
    ngram_size: usize,
    max_penalty: f64,
}

impl RepetitionPenalty {
    fn new(p: RepetitionPenaltyParams) -> Result<Self, String> {
        if p.ngram_size == 0 {
            return Err("`ngram_size` must be >= 1".into());
        }
        if !(p.max_penalty.is_finite() && p.max_penalty <= 0.0) {
            return Err(format!(
                "`max_penalty` must be <= 0 (a penalty), got {}",
                p.max_penalty
            ));
        }
        Ok(RepetitionPenalty {
            ngram_size: p.ngram_size,
            max_penalty: p.max_penalty,
        })
    }

    fn score(&self, completion: &str) -> f64 {
        let lower = completion.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.len() < self.ngram_size {
            return 0.0;
        }
        let ngrams: Vec<&[&str]> = words.windows(self.ngram_size).collect();
        let distinct: HashSet<&[&str]> = ngrams.iter().copied().collect();
        (1.0 - distinct.len() as f64 / ngrams.len() as f64) * self.max_penalty
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CosineParams {
    #[serde(default = "default_min_value_wrong")]
    min_value_wrong: f64,
    #[serde(default = "default_max_value_wrong")]
    max_value_wrong: f64,
    #[serde(default = "default_min_value_correct")]
    min_value_correct: f64,
    #[serde(default = "default_max_value_correct")]
    max_value_correct: f64,
    /// open-r1's `cosine_max_len`, in characters as open-r1 counts them.
    #[serde(default = "default_cosine_max_len")]
    max_len: usize,
    /// Where the answer is read, as for `exact_match`.
    #[serde(default)]
    extract: Extract,
}

fn default_min_value_wrong() -> f64 {
    -1.0
}
fn default_max_value_wrong() -> f64 {
    -0.5
}
fn default_min_value_correct() -> f64 {
    0.5
}
fn default_max_value_correct() -> f64 {
    1.0
}
fn default_cosine_max_len() -> usize {
    1000
}

/// open-r1's `get_cosine_scaled_reward` (Yeo et al.): with `p = len /
/// max_len` (characters), a correct answer gets `min_c + (max_c - min_c)
/// (1 + cos(pi p)) / 2` (shorter is better), a wrong one `max_w + (min_w -
/// max_w) (1 + cos(pi p)) / 2` (longer is penalised less). Two differences
/// from open-r1: correct means what `exact_match` says (open-r1 uses
/// math_verify, which also accepts equal values written differently), and
/// `p` stops at 1 (open-r1's cosine rises again past `max_len`).
#[derive(Debug)]
struct Cosine {
    p: CosineParams,
}

impl Cosine {
    fn new(p: CosineParams) -> Result<Self, String> {
        if p.max_len == 0 {
            return Err("`max_len` must be positive".into());
        }
        for (name, v) in [
            ("min_value_wrong", p.min_value_wrong),
            ("max_value_wrong", p.max_value_wrong),
            ("min_value_correct", p.min_value_correct),
            ("max_value_correct", p.max_value_correct),
        ] {
            if !v.is_finite() {
                return Err(format!("`{name}` must be finite"));
            }
        }
        Ok(Cosine { p })
    }

    fn score(&self, x: &RewardInput) -> Result<f64, String> {
        let correct = ExactMatch {
            extract: self.p.extract,
        }
        .score(x)?
            == 1.0;
        let progress = (x.completion_text.chars().count() as f64 / self.p.max_len as f64).min(1.0);
        let cosine = (progress * std::f64::consts::PI).cos();
        let (lo, hi) = if correct {
            (self.p.min_value_correct, self.p.max_value_correct)
        } else {
            // Swapped, so that a longer wrong answer is penalised less.
            (self.p.max_value_wrong, self.p.min_value_wrong)
        };
        Ok(lo + 0.5 * (hi - lo) * (1.0 + cosine))
    }
}

/// Over which completions `length` takes its shortest and longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LengthScope {
    /// The completions scored together: the rank's batch of the step, as
    /// open-r1 scores a process's batch.
    #[default]
    Batch,
    /// The completions of one prompt, as the Kimi k1.5 report defines it.
    Group,
}

/// open-r1's `len_reward` (Kimi k1.5's length reward): with lengths in
/// characters and `min` / `max` over `scope`, `lambda = 0.5 - (len - min) /
/// (max - min)`; a correct answer gets `lambda`, a wrong one `min(0,
/// lambda)`; every value is 0 where the lengths are all equal. Correct means
/// what `exact_match` says; a row with no reference counts as correct, as
/// open-r1 counts a reference it cannot parse.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Length {
    /// Where the answer is read, as for `exact_match`.
    #[serde(default)]
    extract: Extract,
    #[serde(default)]
    scope: LengthScope,
}

impl Length {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<f64>, String> {
        let judge = ExactMatch {
            extract: self.extract,
        };
        let lengths: Vec<usize> = batch
            .iter()
            .map(|x| x.completion_text.chars().count())
            .collect();
        // The key of the completions a completion is measured against.
        let scope_of = |x: &RewardInput| -> Result<Option<usize>, String> {
            match self.scope {
                LengthScope::Batch => Ok(None),
                LengthScope::Group => x
                    .group
                    .map(Some)
                    .ok_or_else(|| "`scope: group` needs the completions' groups".to_string()),
            }
        };
        let scopes: Vec<Option<usize>> = batch.iter().map(scope_of).collect::<Result<_, _>>()?;
        batch
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let peers = lengths
                    .iter()
                    .zip(&scopes)
                    .filter(|(_, s)| **s == scopes[i])
                    .map(|(l, _)| *l);
                let (min, max) = peers.fold((usize::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
                if min >= max {
                    return Ok(0.0);
                }
                let lambda = 0.5 - (lengths[i] - min) as f64 / (max - min) as f64;
                let correct = x.answer.is_none() || judge.score(x)? == 1.0;
                Ok(if correct { lambda } else { lambda.min(0.0) })
            })
            .collect()
    }
}

// ---------------------------------------------------------------- blocklist

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BlocklistMode {
    /// Value 1 when clean, 0 when blocked; multiplies the total, so a blocked
    /// completion's total reward is 0 (note: 0 can still beat a clean
    /// completion whose total is negative; use `penalty` then).
    #[default]
    Gate,
    /// Value 0 when clean, `penalty` when blocked; added with `weight`.
    Penalty,
}

fn default_penalty() -> f64 {
    -1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlocklistParams {
    substrings: Vec<String>,
    #[serde(default)]
    case_sensitive: Option<bool>,
    #[serde(default)]
    mode: BlocklistMode,
    #[serde(default)]
    penalty: Option<f64>,
}

#[derive(Debug)]
struct Blocklist {
    /// Lower-cased when not case-sensitive.
    substrings: Vec<String>,
    case_sensitive: bool,
    mode: BlocklistMode,
    penalty: f64,
}

impl Blocklist {
    fn new(p: BlocklistParams) -> Result<Self, String> {
        if p.substrings.is_empty() || p.substrings.iter().any(String::is_empty) {
            return Err("`substrings` must be a non-empty list of non-empty strings".into());
        }
        if p.mode == BlocklistMode::Gate && p.penalty.is_some() {
            return Err("`penalty` only applies to `mode: penalty`".into());
        }
        let penalty = p.penalty.unwrap_or_else(default_penalty);
        if !penalty.is_finite() {
            return Err("`penalty` must be finite".into());
        }
        let case_sensitive = p.case_sensitive.unwrap_or(true);
        let substrings = if case_sensitive {
            p.substrings
        } else {
            p.substrings.iter().map(|s| s.to_lowercase()).collect()
        };
        Ok(Blocklist {
            substrings,
            case_sensitive,
            mode: p.mode,
            penalty,
        })
    }

    fn blocked(&self, completion: &str) -> bool {
        if self.case_sensitive {
            self.substrings
                .iter()
                .any(|s| completion.contains(s.as_str()))
        } else {
            let lower = completion.to_lowercase();
            self.substrings.iter().any(|s| lower.contains(s.as_str()))
        }
    }

    fn score(&self, completion: &str) -> f64 {
        match (self.mode, self.blocked(completion)) {
            (BlocklistMode::Gate, blocked) => {
                if blocked {
                    0.0
                } else {
                    1.0
                }
            }
            (BlocklistMode::Penalty, true) => self.penalty,
            (BlocklistMode::Penalty, false) => 0.0,
        }
    }
}

// ---------------------------------------------------------------- reward_model

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardModelParams {
    /// A Hugging Face folder of a `*ForSequenceClassification` (config.json,
    /// safetensors, tokenizer.json, its chat template).
    path: std::path::PathBuf,
    /// `auto` (the first GPU of the learner's, else the CPU), `cpu`,
    /// `cuda`, `cuda:N`.
    #[serde(default = "default_auto")]
    device: String,
    /// `auto` (bf16 on a GPU, f32 on the CPU), `bfloat16`, `float16`,
    /// `float32`.
    #[serde(default = "default_auto")]
    dtype: String,
    /// Sequences per forward pass.
    #[serde(default = "default_reward_batch")]
    batch_size: usize,
}

fn default_auto() -> String {
    "auto".into()
}

fn default_reward_batch() -> usize {
    16
}

/// A sequence classifier scoring prompt + completion, as TRL scores with a
/// reward model in `reward_funcs`: the prompt's chat messages and the
/// completion as the assistant's message through the reward model's own
/// chat template (or, for a text prompt, the prompt and completion texts
/// joined), tokenized without special tokens, the first label's logit.
struct RewardModel {
    path: std::path::PathBuf,
    tokenizer: model::tokenizer::Tokenizer,
    device: model::device::DeviceSpec,
    dtype: model::device::DTypeSpec,
    batch_size: usize,
    /// Loaded on first use: building the registry (recipe checks,
    /// convert-recipe) reads only config.json and the tokenizer.
    classifier: std::sync::OnceLock<model::SequenceClassifier>,
}

impl std::fmt::Debug for RewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardModel")
            .field("path", &self.path)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl RewardModel {
    fn new(p: RewardModelParams) -> Result<Self, String> {
        let shown = p.path.display();
        let cfg = model::ModelConfig::from_dir(&p.path).map_err(|e| {
            format!("`path` {shown}: {e} (a local Hugging Face folder: nothing is downloaded)")
        })?;
        if let model::ModelHead::CausalLm = cfg.head {
            return Err(format!(
                "`path` {shown} holds a {}, a language model; a reward model is a \
                 *ForSequenceClassification (transformers' AutoModelForSequenceClassification \
                 saves one)",
                cfg.architecture.hf_name()
            ));
        }
        let tokenizer = model::tokenizer::Tokenizer::from_dir(&p.path)
            .map_err(|e| format!("`path` {shown}: {e}"))?;
        let device = p.device.parse().map_err(|e| format!("`device`: {e}"))?;
        let dtype = p.dtype.parse().map_err(|e| format!("`dtype`: {e}"))?;
        if p.batch_size == 0 {
            return Err("`batch_size` must be >= 1".into());
        }
        Ok(RewardModel {
            path: p.path,
            tokenizer,
            device,
            dtype,
            batch_size: p.batch_size,
            classifier: std::sync::OnceLock::new(),
        })
    }

    fn classifier(&self) -> Result<&model::SequenceClassifier, String> {
        if let Some(c) = self.classifier.get() {
            return Ok(c);
        }
        let device = self.device.open().map_err(|e| e.to_string())?;
        let dtype = self.dtype.resolve(&device).map_err(|e| e.to_string())?;
        let c = model::SequenceClassifier::from_dir(&self.path, &device, dtype)
            .map_err(|e| format!("loading {}: {e}", self.path.display()))?;
        Ok(self.classifier.get_or_init(|| c))
    }

    /// The text the reward model reads for one completion.
    fn text(&self, x: &RewardInput) -> Result<String, String> {
        match &x.messages {
            Some(messages) => {
                let mut all = messages.clone();
                all.push(ChatMessage::assistant(x.completion_text.clone()));
                self.tokenizer
                    .apply_chat_template(&all, false)
                    .map_err(|e| format!("the reward model's chat template: {e}"))
            }
            None => Ok(format!("{}{}", x.prompt, x.completion_text)),
        }
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<f64>, String> {
        let classifier = self.classifier()?;
        let mut ids = Vec::with_capacity(batch.len());
        for (i, x) in batch.iter().enumerate() {
            let text = self.text(x).map_err(|m| format!("completion {i}: {m}"))?;
            let tokens = self
                .tokenizer
                .encode(&text, false)
                .map_err(|e| format!("completion {i}: {e}"))?;
            ids.push(tokens);
        }
        // Batches of similar lengths pad less; a sequence's score does not
        // depend on its batch (causal attention, right padding).
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![f64::NAN; batch.len()];
        for chunk in order.chunks(self.batch_size) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let scores = classifier
                .scores(&seqs)
                .map_err(|e| format!("completions {chunk:?}: {e}"))?;
            for (&i, s) in chunk.iter().zip(&scores) {
                out[i] = s.first().copied().map_or(f64::NAN, f64::from);
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- python

fn default_python_timeout_s() -> f64 {
    300.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PythonParams {
    /// `path/to/rewards.py:accuracy_reward` (relative to the working
    /// directory) or `package.module:accuracy_reward`.
    function: String,
    /// Deadline of one batch's call.
    #[serde(default = "default_python_timeout_s")]
    timeout_s: f64,
}

/// A TRL reward function, called as GRPOTrainer calls it: once per scored
/// batch, with keyword arguments `prompts` and `completions` (each prompt's
/// messages and `[{"role": "assistant", "content": ...}]` when the chat
/// template made the prompt, TRL's conversational format; the texts
/// otherwise; with tool calls, the turns as messages), `completion_ids`,
/// `trainer_state` (its `global_step`, `max_steps` and `epoch`) and every
/// other column of the rows, each a list of the rows' values as read
/// (JSON: a Parquet struct is a dict), returning one number per completion
/// (or None where it does not apply). The registry's Python functions run
/// in one `python3` process of the learner's
/// ([`crate::python::PythonProcesses`], the `python` tools' too when they
/// run in one), which keeps their module state from call to call, as TRL's
/// process does.
#[derive(Debug)]
pub struct PythonReward {
    spec: String,
    /// The SHA-256 of the function's source file, once
    /// [`RewardRegistry::prepare`] imported it.
    source_sha256: std::sync::OnceLock<String>,
    /// Whether it is `async def` (its calls run beside others), once
    /// imported.
    async_def: std::sync::OnceLock<bool>,
    timeout: Duration,
    /// The registry's process, shared by its Python functions.
    processes: Option<Arc<crate::python::PythonProcesses>>,
    answer_column: String,
    data_source_column: Option<String>,
}

impl PythonReward {
    fn new(p: PythonParams) -> Result<Self, String> {
        crate::python::function_name(&p.function).map_err(|m| format!("`function`: {m}"))?;
        if !(p.timeout_s.is_finite() && p.timeout_s > 0.0) {
            return Err(format!("`timeout_s` must be positive, got {}", p.timeout_s));
        }
        Ok(PythonReward {
            timeout: Duration::from_secs_f64(p.timeout_s),
            processes: None,
            spec: p.function,
            source_sha256: std::sync::OnceLock::new(),
            async_def: std::sync::OnceLock::new(),
            answer_column: "answer".into(),
            data_source_column: None,
        })
    }

    /// Takes what importing the function gave (`load`'s answer), so that a
    /// broken one stops the run before its first generation.
    fn imported(&self, checked: &Value) -> Result<(), String> {
        if let Some(e) = checked.get("error") {
            return Err(format!("{}: {}", self.spec, e.as_str().unwrap_or_default()));
        }
        let digest = checked["source_sha256"].as_str().unwrap_or_default();
        let _ = self.source_sha256.set(digest.to_string());
        let _ = self
            .async_def
            .set(checked["async"].as_bool().unwrap_or(false));
        Ok(())
    }

    async fn score(
        &self,
        batch: &[RewardInput],
        trainer_state: &Value,
        logged: &mut RewardLogs,
    ) -> Result<Vec<f64>, String> {
        let mut prompts = Vec::with_capacity(batch.len());
        let mut completions = Vec::with_capacity(batch.len());
        for x in batch {
            match &x.messages {
                Some(messages) => {
                    prompts.push(serde_json::to_value(messages).map_err(|e| e.to_string())?);
                    completions.push(if x.completion_messages.is_empty() {
                        serde_json::json!([{"role": "assistant", "content": x.completion_text}])
                    } else {
                        Value::Array(x.completion_messages.clone())
                    });
                }
                None => {
                    prompts.push(Value::from(x.prompt.as_str()));
                    completions.push(Value::from(x.completion_text.as_str()));
                }
            }
        }
        let mut kwargs = serde_json::Map::new();
        // Every column of the rows (but the prompt's), as read, one list
        // each (None where a row lacks it), as TRL passes them.
        let rows: Vec<serde_json::Map<String, Value>> = batch
            .iter()
            .map(|x| match x.columns.as_deref().map(serde_json::from_str) {
                Some(Ok(Value::Object(columns))) => columns,
                _ => serde_json::Map::new(),
            })
            .collect();
        for row in &rows {
            for name in row.keys() {
                if !kwargs.contains_key(name) {
                    let column = rows
                        .iter()
                        .map(|r| r.get(name).cloned().unwrap_or_default());
                    kwargs.insert(name.clone(), column.collect());
                }
            }
        }
        // Rows read without their columns (or a dotted answer column): the
        // answers and sources as text.
        if !kwargs.contains_key(&self.answer_column) {
            kwargs.insert(
                self.answer_column.clone(),
                batch.iter().map(|x| x.answer.clone()).collect(),
            );
        }
        if let Some(column) = &self.data_source_column
            && !kwargs.contains_key(column)
        {
            kwargs.insert(
                column.clone(),
                batch.iter().map(|x| x.data_source.clone()).collect(),
            );
        }
        kwargs.insert("prompts".into(), Value::Array(prompts));
        kwargs.insert("completions".into(), Value::Array(completions));
        kwargs.insert(
            "completion_ids".into(),
            batch.iter().map(|x| x.completion_ids.clone()).collect(),
        );
        kwargs.insert("trainer_state".into(), trainer_state.clone());
        let Some(processes) = &self.processes else {
            return Err("no Python process (the function was built outside a registry)".into());
        };
        let mut call =
            crate::python::PythonCall::function(&self.spec, &Value::Object(kwargs), false)
                .with_logs()
                .concurrent(self.async_def.get() == Some(&true));
        // TRL's `environments`: each completion's instance.
        if batch.iter().any(|x| x.environment.is_some()) {
            let ids: Vec<Option<u64>> = batch.iter().map(|x| x.environment).collect();
            call = call.with_environments(&ids);
        }
        let mut answer = processes.call(call, self.timeout, "its timeout_s").await?;
        let values = python_values(
            answer
                .get_mut("rewards")
                .map(Value::take)
                .unwrap_or_default(),
            batch.len(),
        )?;
        if let Value::Object(extra) = answer.get_mut("extra").map(Value::take).unwrap_or_default() {
            for (column, values) in extra {
                match values {
                    Value::Array(values) if values.len() == batch.len() => {
                        logged.extra.insert(column, values);
                    }
                    other => {
                        let n = other.as_array().map_or(0, Vec::len);
                        return Err(format!(
                            "log_extra({column:?}, ...) logged {n} values for {} completions",
                            batch.len()
                        ));
                    }
                }
            }
        }
        if let Value::Object(metrics) = answer
            .get_mut("metrics")
            .map(Value::take)
            .unwrap_or_default()
        {
            for (name, values) in metrics {
                let values = values.as_array().map(Vec::as_slice).unwrap_or_default();
                // (null: a value that was not finite, left out.)
                logged
                    .metrics
                    .entry(name)
                    .or_default()
                    .extend(values.iter().filter_map(Value::as_f64));
            }
        }
        Ok(values)
    }
}

/// A Python function's list of rewards, one per completion of `n`, as
/// numbers (a bool as 0 or 1, TRL's None as NaN: it does not apply).
fn python_values(result: Value, n: usize) -> Result<Vec<f64>, String> {
    let Value::Array(values) = result else {
        let shown: String = result.to_string().chars().take(200).collect();
        return Err(format!("returned {shown}, not a list of numbers"));
    };
    if values.len() != n {
        return Err(format!(
            "returned {} values for {n} completions",
            values.len()
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| format!("completion {i}: {n} is not a number")),
            Value::Bool(b) => Ok(f64::from(u8::from(*b))),
            // TRL's None: the function does not apply to this row.
            Value::Null => Ok(f64::NAN),
            other => Err(format!("completion {i}: {other} is not a number")),
        })
        .collect()
}

/// TRL's environment-owned reward (its PR #6238): each completion's
/// environment instance's `get_reward()`, called once the completion is
/// done, while the instance still holds its state; None (or a completion
/// without an environment) does not apply.
#[derive(Debug)]
pub struct EnvironmentReward {
    class: String,
    processes: Arc<crate::python::PythonProcesses>,
    per_call: Duration,
    timeout_key: String,
}

impl EnvironmentReward {
    async fn score(&self, batch: &[RewardInput]) -> Result<Vec<f64>, String> {
        let ids: Vec<Option<u64>> = batch.iter().map(|x| x.environment).collect();
        let call = crate::python::PythonCall::environment_rewards(&self.class, &ids);
        let timeout = self.per_call * batch.len().max(1) as u32;
        let key = format!(
            "{} for each of {} completions",
            self.timeout_key,
            batch.len()
        );
        let result = self.processes.call(call, timeout, &key).await?;
        python_values(result, batch.len())
    }
}

// ---------------------------------------------------------------- remote

fn default_timeout_s() -> f64 {
    30.0
}
fn default_max_retries() -> u32 {
    3
}
fn default_backoff_s() -> f64 {
    0.5
}

/// The body a remote reward server expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RemoteProtocol {
    /// `{"prompts", "completions", "answers"}`: a TRL reward function's
    /// arguments ([`RemoteRequest`]).
    #[default]
    Tandem,
    /// OpenRLHF's `--remote_rm_url`: `{"query", "prompts", "labels"}`, the
    /// query being the prompt followed by the completion, the labels the
    /// dataset's answers ([`OpenRlhfRequest`]); so an OpenRLHF reward
    /// server serves Tandem as it is.
    Openrlhf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteParams {
    url: String,
    #[serde(default)]
    protocol: RemoteProtocol,
    #[serde(default = "default_timeout_s")]
    timeout_s: f64,
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    /// First retry delay; doubles per retry, at most 10 s.
    #[serde(default = "default_backoff_s")]
    backoff_s: f64,
}

/// The JSON body POSTed to a remote reward server: one entry per completion,
/// like the arguments of a TRL reward function (`prompts`, `completions`,
/// and the dataset's `answer` column; `null` where a row has none).
#[derive(Debug, Serialize)]
pub struct RemoteRequest<'a> {
    pub prompts: Vec<&'a str>,
    pub completions: Vec<&'a str>,
    pub answers: Vec<Option<&'a str>>,
}

/// OpenRLHF's remote reward request (`openrlhf/utils/remote_rm_utils.py`).
#[derive(Debug, Serialize)]
pub struct OpenRlhfRequest<'a> {
    /// Prompt and completion, one text each.
    pub query: Vec<String>,
    pub prompts: Vec<&'a str>,
    pub labels: Vec<Option<&'a str>>,
}

/// The expected response (both protocols): one finite number per
/// completion, in order; other keys (OpenRLHF's `scores`, `extra_logs`)
/// are ignored.
#[derive(Debug, Deserialize)]
pub struct RemoteResponse {
    pub rewards: Vec<Value>,
}

#[derive(Debug)]
struct Remote {
    url: String,
    protocol: RemoteProtocol,
    timeout: Duration,
    max_retries: u32,
    backoff: Duration,
    client: reqwest::Client,
}

impl Remote {
    fn new(p: RemoteParams) -> Result<Self, String> {
        let url = reqwest::Url::parse(&p.url).map_err(|e| format!("`url` {:?}: {e}", p.url))?;
        if url.scheme() != "http" {
            return Err(format!(
                "`url` {:?}: only http:// is supported (this build has no TLS)",
                p.url
            ));
        }
        if !(p.timeout_s.is_finite() && p.timeout_s > 0.0) {
            return Err(format!("`timeout_s` must be positive, got {}", p.timeout_s));
        }
        if !(p.backoff_s.is_finite() && p.backoff_s >= 0.0) {
            return Err(format!(
                "`backoff_s` must be non-negative, got {}",
                p.backoff_s
            ));
        }
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Remote {
            url: p.url,
            protocol: p.protocol,
            timeout: Duration::from_secs_f64(p.timeout_s),
            max_retries: p.max_retries,
            backoff: Duration::from_secs_f64(p.backoff_s),
            client,
        })
    }

    async fn score(&self, batch: &[RewardInput]) -> Result<Vec<f64>, String> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let prompts = batch.iter().map(|x| x.prompt.as_str()).collect();
        let answers = batch.iter().map(|x| x.answer.as_deref()).collect();
        let body = match self.protocol {
            RemoteProtocol::Tandem => serde_json::to_value(RemoteRequest {
                prompts,
                completions: batch.iter().map(|x| x.completion_text.as_str()).collect(),
                answers,
            }),
            RemoteProtocol::Openrlhf => serde_json::to_value(OpenRlhfRequest {
                query: batch
                    .iter()
                    .map(|x| format!("{}{}", x.prompt, x.completion_text))
                    .collect(),
                prompts,
                labels: answers,
            }),
        }
        .map_err(|e| format!("encoding the request: {e}"))?;
        let mut attempt = 0;
        loop {
            match self.attempt(&body).await {
                Ok(bytes) => return parse_rewards(&bytes, batch.len()),
                Err(Attempt::Fatal(m)) => return Err(format!("POST {}: {m}", self.url)),
                Err(Attempt::Retryable(m)) if attempt >= self.max_retries => {
                    return Err(format!(
                        "POST {}: {m} (gave up after {} attempt(s))",
                        self.url,
                        attempt + 1
                    ));
                }
                Err(Attempt::Retryable(m)) => {
                    let delay = self
                        .backoff
                        .saturating_mul(1 << attempt.min(16))
                        .min(Duration::from_secs(10));
                    tracing::warn!(url = %self.url, attempt, "remote reward: {m}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, body: &Value) -> Result<Vec<u8>, Attempt> {
        let response = self
            .client
            .post(&self.url)
            .timeout(self.timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| classify(&e, self.timeout))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| classify(&e, self.timeout))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let text = String::from_utf8_lossy(&bytes);
        let snippet: String = text.chars().take(300).collect();
        let message = format!("HTTP {status}: {snippet}");
        if status.is_server_error() || status.as_u16() == 429 {
            Err(Attempt::Retryable(message))
        } else {
            Err(Attempt::Fatal(message))
        }
    }
}

enum Attempt {
    Retryable(String),
    Fatal(String),
}

fn classify(e: &reqwest::Error, timeout: Duration) -> Attempt {
    if e.is_timeout() {
        Attempt::Retryable(format!("no response within {timeout:?}"))
    } else if e.is_connect() || e.is_request() || e.is_body() {
        Attempt::Retryable(format!("connection failed: {e}"))
    } else {
        Attempt::Fatal(e.to_string())
    }
}

fn parse_rewards(bytes: &[u8], expected: usize) -> Result<Vec<f64>, String> {
    let response: RemoteResponse = serde_json::from_slice(bytes).map_err(|e| {
        let snippet: String = String::from_utf8_lossy(bytes).chars().take(300).collect();
        format!("the response is not {{\"rewards\": [numbers]}}: {e}; body: {snippet}")
    })?;
    if response.rewards.len() != expected {
        return Err(format!(
            "returned {} rewards for {expected} completions",
            response.rewards.len()
        ));
    }
    response
        .rewards
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(format!("reward {i} is {v}, not a finite number")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_decimals() {
        for (a, b) in [
            ("007.500", "7.5"),
            ("-0.0", "0"),
            (".5", "0.5"),
            ("12", "12"),
            ("-3.", "-3"),
        ] {
            assert_eq!(canonical_decimal(a), b, "{a}");
        }
    }
}
