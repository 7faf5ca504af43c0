//! `learner convert-recipe`: a TRL / open-r1 GRPO recipe (one flat YAML
//! mapping of `GRPOConfig`, `ModelConfig` and open-r1 `GRPOScriptArguments`
//! keys) rewritten as a Tandem recipe. Each key goes to its section, with its
//! TRL name as a comment where the name changes; open-r1's `reward_funcs`,
//! `reward_weights` and reward arguments become `reward.functions`; every
//! key Tandem does not take is listed at the end with what to do instead.
//! The result loads as it is; the lines marked TODO want local paths
//! (nothing is downloaded). A verl configuration (its nested YAML, or the
//! Hydra overrides of a launch script) goes through [`verl`] instead, an
//! OpenRLHF launch script through [`openrlhf`]; [`convert_recipe`] tells
//! them apart.

mod openrlhf;
mod verl;

use serde_json::{Map, Value, json};

use crate::recipe::{Recipe, SECTION_NAMES as SECTIONS, trl_key_hint};

/// TRL names whose Tandem key is named otherwise, or whose name is a key of
/// several sections (`temperature`: generation's, not eval's).
const RENAMES: &[(&str, &str)] = &[
    ("model_name_or_path", "model.path"),
    ("dataset_prompt_column", "data.prompt_column"),
    ("shuffle_dataset", "data.shuffle"),
    ("temperature", "rollout.temperature"),
    (
        "vllm_gpu_memory_utilization",
        "rollout.gpu_memory_utilization",
    ),
    ("vllm_tensor_parallel_size", "topology.tp"),
    ("evaluation_strategy", "eval.eval_strategy"),
    ("num_generations_eval", "eval.num_samples"),
];

/// open-r1's reward arguments: (argument, reward function, its Tandem
/// parameter).
const REWARD_ARGS: &[(&str, &str, &str)] = &[
    ("cosine_min_value_wrong", "cosine", "min_value_wrong"),
    ("cosine_max_value_wrong", "cosine", "max_value_wrong"),
    ("cosine_min_value_correct", "cosine", "min_value_correct"),
    ("cosine_max_value_correct", "cosine", "max_value_correct"),
    ("cosine_max_len", "cosine", "max_len"),
    ("repetition_n_grams", "repetition_penalty", "ngram_size"),
    (
        "repetition_max_penalty",
        "repetition_penalty",
        "max_penalty",
    ),
    (
        "max_completion_len",
        "soft_overlong_punishment",
        "max_length",
    ),
    (
        "soft_punish_cache",
        "soft_overlong_punishment",
        "cache_length",
    ),
];

/// Keys TRL counts in optimizer updates and Tandem in steps.
const COUNTED_IN_UPDATES: &[&str] = &[
    "max_steps",
    "save_steps",
    "eval_steps",
    "logging_steps",
    "warmup_steps",
];

/// open-r1's format reward: its pattern, which it applies with `re.match`
/// (anchored at the start: `\A`) and DOTALL | MULTILINE (`$` also ends a
/// line, so text may follow the answer's line).
const OPEN_R1_FORMAT: &str = r"(?sm)\A<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$";

/// open-r1's `code_format` reward for `language`, as [`OPEN_R1_FORMAT`].
fn open_r1_code_format(language: &str) -> String {
    format!(
        r"(?sm)\A<think>\n.*?\n</think>\n<answer>\n.*?```{}.*?```.*?\n</answer>$",
        regex::escape(language)
    )
}

/// A converted recipe.
pub struct Converted {
    /// The Tandem recipe: YAML, commented.
    pub yaml: String,
    /// The keys left out, each with why and what to do instead.
    pub left_out: Vec<(String, String)>,
}

/// Converts a TRL / open-r1 recipe, a verl configuration or an OpenRLHF
/// launch script, whichever `text` is.
pub fn convert_recipe(text: &str, source_name: &str) -> Result<Converted, String> {
    if let Some(flags) = openrlhf::parse(text) {
        return openrlhf::convert(flags, source_name);
    }
    match verl::parse(text) {
        Some(keys) => verl::convert(keys, source_name),
        None => convert_trl_recipe(text, source_name),
    }
}

/// The keys of a source configuration (verl's dotted names, OpenRLHF's
/// flags), each taken once as it is converted; what is left is listed.
struct Source(Map<String, Value>);

impl Source {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.shift_remove(key).filter(|v| !v.is_null())
    }
    fn num(&mut self, key: &str) -> Option<f64> {
        self.take(key).and_then(|v| v.as_f64())
    }
    fn bool(&mut self, key: &str) -> Option<bool> {
        self.take(key).and_then(|v| v.as_bool())
    }
    /// A flag given without `false`.
    fn set(&mut self, key: &str) -> bool {
        self.take(key).is_some_and(|v| v != Value::Bool(false))
    }
    fn str(&mut self, key: &str) -> Option<String> {
        self.take(key).map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }
    /// verl's / OpenRLHF's LoRA keys `[rank, alpha, target_modules,
    /// dropout]` (rank 0 or unset: LoRA off, the keys stay to be listed) as
    /// `model.use_peft` and the `lora_*` keys. Both default alpha to 16 and
    /// the targets to all-linear, where Tandem (as TRL) has 32 and
    /// `[q_proj, v_proj]`: written out.
    fn lora(&mut self, out: &mut Output, keys: [&str; 4], name: fn(&str) -> String, source: &str) {
        let [rank, alpha, targets, dropout] = keys;
        let Some(r) = self.0.get(rank).and_then(Value::as_u64).filter(|r| *r > 0) else {
            return;
        };
        self.take(rank);
        out.put(
            "model.use_peft",
            json!(true),
            Some(format!("{} {r}", name(rank))),
        );
        out.put("model.lora_r", json!(r), Some(name(rank)));
        let default_note = |key: &str| format!("{source}'s default (for {})", name(key));
        let (a, note) = match self.num(alpha) {
            Some(a) => (a, name(alpha)),
            None => (16.0, default_note(alpha)),
        };
        out.put("model.lora_alpha", json!(a), Some(note));
        let (t, note) = match self.take(targets) {
            // OpenRLHF's flag takes several names; one is still a list.
            Some(Value::String(one)) if one != "all-linear" && !one.contains(['*', '.', '|']) => {
                (json!([one]), name(targets))
            }
            Some(v) => (v, name(targets)),
            None => (json!("all-linear"), default_note(targets)),
        };
        out.put("model.lora_target_modules", t, Some(note));
        if let Some(d) = self.num(dropout).filter(|d| *d > 0.0) {
            out.put("model.lora_dropout", json!(d), Some(name(dropout)));
        }
    }

    /// Each `(from, to)` moved as it is, commented with `note(from)`.
    fn direct(&mut self, out: &mut Output, pairs: &[(&str, &str)], note: fn(&str) -> String) {
        for (from, to) in pairs {
            if let Some(v) = self.take(from) {
                out.put(to, v, Some(note(from)));
            }
        }
    }
}

/// The most learner ranks, leaving at least one of `gpus` to rollouts,
/// that split `units` (what one update divides into: prompts, groups)
/// evenly; the other GPUs serve rollout replicas. `(learners, replicas)`.
fn split_gpus(gpus: u64, units: u64) -> (u64, u64) {
    let most = gpus.saturating_sub(1).max(1);
    let learners = (1..=most)
        .rev()
        .find(|w| units.is_multiple_of(*w))
        .unwrap_or(1);
    (learners, gpus.saturating_sub(learners).max(1))
}

/// A micro-batch of whole groups (a multiple of `n`) that divides the
/// `per_rank` samples a rank takes per update: the largest within the
/// source's `micro` batch (its memory bound), else the smallest; the whole
/// share when the source gives none.
fn whole_group_micro_batch(per_rank: u64, n: u64, micro: Option<u64>) -> u64 {
    let fits: Vec<u64> = (1..=per_rank / n.max(1))
        .map(|k| k * n)
        .filter(|d| per_rank.is_multiple_of(*d))
        .collect();
    match micro {
        Some(m) => fits.iter().rev().find(|&&d| d <= m).or(fits.first()),
        None => fits.last(),
    }
    .copied()
    .unwrap_or(n.max(1))
}

/// The words of a launch script as the shell would pass them, with the
/// script's own variables (`NAME=value`, `export NAME=value`) put in where
/// they are used (`$HOME` and the like stay); comment lines and the
/// assignments themselves are left out, line continuations joined.
fn script_words(text: &str) -> Vec<String> {
    let without_comments: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let joined = without_comments.join("\n").replace("\\\n", " ");
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut out = Vec::new();
    for line in joined.lines() {
        let Ok(words) = shell_words::split(line) else {
            continue;
        };
        for word in words {
            let word = substitute(&word, &vars);
            if let Some((name, value)) = word.split_once('=')
                && !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
            {
                vars.retain(|(k, _)| k != name);
                vars.push((name.to_string(), value.to_string()));
                continue;
            }
            out.push(word);
        }
    }
    out
}

/// `$NAME` and `${NAME}` replaced by the script's earlier assignments.
fn substitute(value: &str, vars: &[(String, String)]) -> String {
    let mut s = value.to_string();
    // Longest names first, so `$train` does not eat `$train_files`.
    let mut vars: Vec<&(String, String)> = vars.iter().collect();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in vars {
        s = s
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    s
}

/// One key of the output.
struct Entry {
    key: String,
    value: Value,
    note: Option<String>,
}

struct Output {
    sections: Vec<(&'static str, Vec<Entry>)>,
    left_out: Vec<(String, String)>,
}

impl Output {
    fn new() -> Self {
        Output {
            sections: SECTIONS.iter().map(|s| (*s, Vec::new())).collect(),
            left_out: Vec::new(),
        }
    }

    fn put(&mut self, path: &str, value: Value, note: Option<String>) {
        let Some((section, key)) = path.split_once('.') else {
            return;
        };
        if let Some((_, entries)) = self.sections.iter_mut().find(|(s, _)| *s == section) {
            entries.retain(|e| e.key != key);
            entries.push(Entry {
                key: key.to_string(),
                value,
                note,
            });
        }
    }

    /// `model.path`, from the source's key `from`: a hub name wants a local
    /// folder (nothing is downloaded), a shell variable a real path.
    fn put_model_path(&mut self, v: Value, from: &str) {
        let text = v.as_str().unwrap_or_default();
        let note = if text.contains('$') || text.contains('~') {
            format!("{from}; TODO: the script's shell variables are not known here")
        } else if text.starts_with('/') || text.starts_with('.') {
            from.to_string()
        } else {
            format!(
                "{from}; TODO: a local Hugging Face folder (download {text} first: nothing is \
                 downloaded)"
            )
        };
        self.put("model.path", v, Some(note));
    }

    /// The result, in `dialect`'s words.
    fn into_converted(self, source_name: &str, dialect: &str) -> Converted {
        Converted {
            yaml: render(&self, source_name, dialect),
            left_out: self.left_out,
        }
    }

    fn has(&self, path: &str) -> bool {
        self.get(path).is_some()
    }

    /// The value written at `path`, if any.
    fn get(&self, path: &str) -> Option<&Value> {
        let (section, key) = path.split_once('.')?;
        self.sections
            .iter()
            .find(|(s, _)| *s == section)
            .and_then(|(_, es)| es.iter().find(|e| e.key == key))
            .map(|e| &e.value)
    }

    fn leave_out(&mut self, key: &str, value: &Value, why: impl Into<String>) {
        self.left_out
            .push((format!("{key}: {}", inline(value)), why.into()));
    }
}

/// A value as one line of YAML (JSON flow style is YAML).
fn inline(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Converts the text of a flat TRL / open-r1 recipe; `source_name` names it
/// in messages and in the output's first comment.
pub fn convert_trl_recipe(text: &str, source_name: &str) -> Result<Converted, String> {
    let raw: Value = serde_saphyr::from_str(text)
        .map_err(|e| format!("{source_name} is not valid YAML: {e}"))?;
    let Value::Object(mut map) = raw else {
        return Err(format!(
            "{source_name}: expected a mapping of TRL / open-r1 keys (GRPOConfig's names)"
        ));
    };
    if map.contains_key("version")
        || SECTIONS
            .iter()
            .any(|s| map.get(*s).is_some_and(Value::is_object))
    {
        return Err(format!(
            "{source_name} is already a Tandem recipe (it has a version or sections); \
             nothing to convert"
        ));
    }
    let mut out = Output::new();

    convert_model(&mut map, &mut out);
    convert_dataset(&mut map, &mut out);
    convert_rewards(&mut map, &mut out);
    // TRL sends its guided-decoding regex to vLLM with every request: so
    // does rollout.generation_kwargs (merged in after the other keys).
    let guided: Vec<(String, Value)> = [
        "vllm_guided_decoding_regex",
        "vllm_structured_outputs_regex",
    ]
    .into_iter()
    .filter_map(|k| map.remove(k).map(|v| (k.to_string(), v)))
    .filter(|(_, v)| !v.is_null())
    .collect();
    if let Some(v) = map.remove("report_to") {
        let all: Vec<Value> = match &v {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        let (kept, gone): (Vec<Value>, Vec<Value>) = all
            .into_iter()
            .partition(|x| matches!(x.as_str(), Some("tensorboard" | "none")));
        if !kept.is_empty() {
            out.put("log.report_to", Value::Array(kept), None);
        }
        if !gone.is_empty() {
            out.leave_out(
                "report_to",
                &Value::Array(gone),
                "nothing is sent off the machine: log.report_to takes tensorboard or none \
                 (every number is also in the run folder's JSONL logs)",
            );
        }
    }

    // TRL counts optimizer updates where Tandem counts steps (a generation
    // and its num_iterations x steps_per_generation / GAS updates).
    let count = |k: &str, default: u64| map.get(k).and_then(Value::as_u64).unwrap_or(default);
    let ga = count("gradient_accumulation_steps", 1).max(1);
    let updates_per_step =
        count("num_iterations", 1).max(1) * (count("steps_per_generation", ga) / ga).max(1);
    // With generation_batch_size the updates a step makes depend on the
    // learner ranks, which the recipe does not know.
    let per_ranks = map.contains_key("generation_batch_size");
    let known = Recipe::known_keys();
    for (key, mut value) in map {
        let mut note = None;
        if per_ranks
            && COUNTED_IN_UPDATES.contains(&key.as_str())
            && value.as_u64().is_some_and(|v| v > 0)
        {
            note = Some(
                "TODO: TRL counts optimizer updates; a Tandem step makes generation_batch_size \
                 / (per_device_train_batch_size x learner ranks x gradient_accumulation_steps) \
                 x num_iterations of them: divide by that"
                    .to_string(),
            );
        } else if updates_per_step > 1
            && COUNTED_IN_UPDATES.contains(&key.as_str())
            && let Some(v) = value.as_u64().filter(|v| *v > 0)
        {
            value = json!(v.div_ceil(updates_per_step));
            note = Some(format!(
                "TRL's {v} optimizer updates; a Tandem step makes {updates_per_step} \
                 (num_iterations x steps_per_generation / gradient_accumulation_steps)"
            ));
        }
        if key == "max_tool_calling_iterations" {
            // TRL's tools are Python functions handed to GRPOTrainer, not
            // recipe keys: the rounds mean nothing until they are declared.
            out.leave_out(
                &key,
                &value,
                format!(
                    "TRL's tools are Python functions given to GRPOTrainer; list each as \
                     rollout.tools [{{python: \"my_tools.py:FUNCTION\"}}] (or an HTTP endpoint: \
                     {{name, description, parameters, url}}), then set \
                     rollout.max_tool_calling_iterations: {value}"
                ),
            );
            continue;
        }
        if let Some((_, path)) = RENAMES.iter().find(|(k, _)| *k == key) {
            let renamed = path.rsplit('.').next() != Some(key.as_str());
            out.put(path, value, renamed.then(|| key.clone()));
            continue;
        }
        // A key of one Tandem section under the same name.
        let homes: Vec<&String> = known
            .iter()
            .filter(|p| !p.contains('[') && p.rsplit('.').next() == Some(key.as_str()))
            .collect();
        match homes.as_slice() {
            [path] => out.put(path, value, note),
            [first, ..] => {
                let others: Vec<&str> = homes[1..].iter().map(|p| p.as_str()).collect();
                let note = format!("also a key of {}", others.join(", "));
                out.put(first, value, Some(note));
            }
            [] => {
                let why = trl_key_hint(&key)
                    .map(str::to_string)
                    .unwrap_or_else(|| "no Tandem counterpart".to_string());
                out.leave_out(&key, &value, why);
            }
        }
    }
    if let Some((key, regex)) = guided.into_iter().last() {
        let mut kwargs = out
            .get("rollout.generation_kwargs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        kwargs.insert("structured_outputs".into(), json!({ "regex": regex }));
        out.put(
            "rollout.generation_kwargs",
            Value::Object(kwargs),
            Some(format!(
                "TRL's {key}: guided decoding on the rollout servers"
            )),
        );
    }
    // TRL samples eval completions as it samples training ones.
    if out
        .get("eval.num_samples")
        .and_then(Value::as_u64)
        .is_some_and(|k| k > 1)
        && !out.has("eval.temperature")
    {
        let t = out
            .get("rollout.temperature")
            .cloned()
            .unwrap_or(json!(1.0));
        out.put(
            "eval.temperature",
            t,
            Some("TRL samples eval completions at the training temperature".into()),
        );
    }
    Ok(out.into_converted(source_name, "TRL / open-r1"))
}

/// `model_name_or_path` (a folder, not a hub id), `torch_dtype` / `bf16` /
/// `fp16`.
fn convert_model(map: &mut Map<String, Value>, out: &mut Output) {
    if let Some(v) = map.remove("model_name_or_path") {
        out.put_model_path(v, "model_name_or_path");
    }
    // TRL's LoRA keys are Tandem's under model; TRL's default dropout
    // (0.05) is not Tandem's (0, as verl's and OpenRLHF's): written out.
    if map.get("use_peft") == Some(&Value::Bool(true)) && !map.contains_key("lora_dropout") {
        out.put(
            "model.lora_dropout",
            json!(0.05),
            Some("TRL's default lora_dropout".into()),
        );
    }
    let dtype = match map.remove("torch_dtype") {
        Some(Value::String(d)) => match d.as_str() {
            "bfloat16" | "bf16" => Some(("bf16", "torch_dtype")),
            "float16" | "fp16" | "half" => Some(("f16", "torch_dtype")),
            "float32" | "fp32" | "float" => Some(("f32", "torch_dtype")),
            "auto" => Some(("auto", "torch_dtype")),
            _ => {
                out.leave_out(
                    "torch_dtype",
                    &json!(d),
                    "model.dtype takes auto, bf16, f16 or f32",
                );
                None
            }
        },
        Some(other) => {
            out.leave_out(
                "torch_dtype",
                &other,
                "model.dtype takes auto, bf16, f16 or f32",
            );
            None
        }
        None => None,
    };
    // transformers' mixed-precision flags: the dtype when torch_dtype is not
    // given; said when it is and they disagree.
    let mut dtype = dtype;
    for (flag, d) in [("bf16", "bf16"), ("fp16", "f16")] {
        if map.remove(flag) != Some(Value::Bool(true)) {
            continue;
        }
        match dtype {
            None => {
                dtype = Some((
                    d,
                    if d == "bf16" {
                        "bf16: true"
                    } else {
                        "fp16: true"
                    },
                ))
            }
            Some((chosen, _)) if chosen != d => out.leave_out(
                flag,
                &json!(true),
                format!("model.dtype is {chosen} (from torch_dtype); Tandem has one dtype"),
            ),
            Some(_) => {}
        }
    }
    if let Some((d, from)) = dtype {
        out.put("model.dtype", json!(d), Some(from.to_string()));
    }
}

/// `dataset_name` (+ config and split) becomes a TODO for local files.
fn convert_dataset(map: &mut Map<String, Value>, out: &mut Output) {
    let config = map.remove("dataset_config");
    let split = map.remove("dataset_train_split");
    let test_split = map.remove("dataset_test_split");
    let name = map.remove("dataset_name");
    // A local file already (TRL's scripts take data files too).
    let local = name
        .as_ref()
        .and_then(Value::as_str)
        .is_some_and(|n| n.ends_with(".jsonl") || n.ends_with(".parquet"));
    match name {
        Some(name) if local => {
            out.put(
                "data.train_files",
                json!([name]),
                Some("dataset_name".into()),
            );
        }
        Some(name) => {
            let repo = name.as_str().unwrap_or("the dataset");
            let mut what = repo.to_string();
            if let Some(c) = config.as_ref().and_then(Value::as_str) {
                what.push_str(&format!(", config {c}"));
            }
            let split_name = split.as_ref().and_then(Value::as_str).unwrap_or("train");
            what.push_str(&format!(", split {split_name}"));
            out.put(
                "data.train_files",
                json!([name]),
                Some(format!(
                    "dataset_name; TODO: the local JSONL or Parquet files of {what}, e.g. \
                     DIR/data/{split_name}-*.parquet after `huggingface-cli download \
                     --repo-type dataset {repo} --local-dir DIR` (nothing is downloaded)"
                )),
            );
        }
        None => {}
    }
    // Said in the TODO above when the data come from the hub; otherwise
    // they have nothing to apply to.
    if local || !out.has("data.train_files") {
        for (key, v) in [("dataset_config", config), ("dataset_train_split", split)] {
            if let Some(v) = v {
                out.leave_out(
                    key,
                    &v,
                    "data.train_files names the local files to train on",
                );
            }
        }
    }
    if let Some(t) = test_split {
        out.leave_out(
            "dataset_test_split",
            &t,
            "name the held-out split's local files in data.eval_files",
        );
    }
    if map.contains_key("dataset_mixture") {
        let v = map.remove("dataset_mixture").unwrap_or(Value::Null);
        out.leave_out(
            "dataset_mixture",
            &v,
            "data.train_files is the mixture: list each dataset's local files with a weight",
        );
    }
}

/// open-r1's `reward_funcs` + `reward_weights` + reward arguments.
fn convert_rewards(map: &mut Map<String, Value>, out: &mut Output) {
    let mut names: Vec<String> = match map.remove("reward_funcs") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s],
        Some(other) => {
            out.leave_out(
                "reward_funcs",
                &other,
                "expected a list of reward function names",
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    // TRL's grpo script puts its reward model first (its weight is the first
    // of reward_weights).
    if let Some(Value::String(path)) = map.remove("reward_model_name_or_path") {
        names.insert(0, path);
    }
    let weights: Vec<f64> = match map.remove("reward_weights") {
        Some(Value::Array(items))
            if items.len() == names.len() && items.iter().all(Value::is_number) =>
        {
            items.iter().filter_map(Value::as_f64).collect()
        }
        Some(other) => {
            out.leave_out(
                "reward_weights",
                &other,
                "expected one number per reward_funcs entry (as TRL checks); every \
                 function got weight 1.0: set reward.functions[].weight",
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    let code_language = map.remove("code_language");
    let code_rewards = ["code_format", "code", "binary_code"];
    if let Some(v) = &code_language
        && !names.iter().any(|n| code_rewards.contains(&n.as_str()))
    {
        out.leave_out(
            "code_language",
            v,
            "read by open-r1's code rewards, which reward_funcs does not name",
        );
    }
    // The arguments, by the function that reads them.
    let mut args: Vec<(&str, &str, Value)> = Vec::new();
    for (arg, function, param) in REWARD_ARGS {
        if let Some(v) = map.remove(*arg) {
            if names.iter().any(|n| n == function) {
                args.push((function, param, v));
            } else {
                out.leave_out(
                    arg,
                    &v,
                    format!(
                        "read by open-r1's {function} reward, which reward_funcs does not name"
                    ),
                );
            }
        }
    }
    // The functions that read the solution column (open-r1's math ones).
    let reads_solution = names.iter().any(|n| {
        matches!(
            n.as_str(),
            "accuracy" | "trl.rewards.accuracy_reward" | "length"
        )
    });
    let mut functions: Vec<(Value, Option<String>)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let weight = weights.get(i).copied().unwrap_or(1.0);
        let mut f = Map::new();
        let note = match name.as_str() {
            "think_format_reward" | "trl.rewards.think_format_reward" => {
                f.insert("name".into(), json!("think_format"));
                Some("TRL's think_format_reward".to_string())
            }
            "accuracy" | "trl.rewards.accuracy_reward" => {
                f.insert("name".into(), json!("exact_match"));
                f.insert("extract".into(), json!("any"));
                Some(
                    "accuracy: open-r1 checks with math_verify; exact_match compares the \
                     <answer> or \\boxed{} answer by value or as the MATH benchmark's \
                     is_equiv does (a `remote` function can run math_verify)"
                        .to_string(),
                )
            }
            "format" => {
                f.insert("name".into(), json!("format"));
                f.insert("pattern".into(), json!(OPEN_R1_FORMAT));
                None
            }
            "tag_count" | "reasoning_steps" | "cosine" | "repetition_penalty" => {
                f.insert("name".into(), json!(name));
                None
            }
            "length" => {
                f.insert("name".into(), json!("length"));
                f.insert("extract".into(), json!("any"));
                Some(
                    "open-r1's len_reward; correct as exact_match says (open-r1: math_verify)"
                        .to_string(),
                )
            }
            "code_format" => {
                let language = code_language
                    .as_ref()
                    .and_then(Value::as_str)
                    .unwrap_or("python");
                f.insert("name".into(), json!("format"));
                f.insert("label".into(), json!("code_format"));
                f.insert("pattern".into(), json!(open_r1_code_format(language)));
                Some(format!("open-r1's code_format ({language})"))
            }
            "code" | "binary_code" if reads_solution => {
                out.leave_out(
                    &format!("reward_funcs[{i}]"),
                    &json!(name),
                    format!(
                        "open-r1's {name} reward reads its test cases from verification_info \
                         and this recipe's accuracy / length read solution, but each row has one \
                         answer (data.answer_column): train the code rewards in a recipe of their \
                         own ({{name: code, runner: piston, url: ...}} on verification_info)"
                    ),
                );
                continue;
            }
            "code" | "binary_code" => {
                let language = code_language
                    .as_ref()
                    .and_then(Value::as_str)
                    .unwrap_or("python");
                f.insert("name".into(), json!("code"));
                f.insert("runner".into(), json!("piston"));
                f.insert("url".into(), json!("http://localhost:2000"));
                f.insert("language".into(), json!(language));
                if name == "binary_code" {
                    f.insert("label".into(), json!("binary_code"));
                    f.insert("mode".into(), json!("binary"));
                }
                Some(format!(
                    "open-r1's {name} reward on the verification_info test cases; TODO: open-r1 \
                     runs the programs in E2B / Morph sandboxes: start a Piston server at url, \
                     or set runner: local to run them with python3 on this machine, unsandboxed"
                ))
            }
            "soft_overlong_punishment" => {
                f.insert("name".into(), json!("length_penalty"));
                f.insert("mode".into(), json!("overlong"));
                // open-r1's defaults.
                f.insert("max_length".into(), json!(16384));
                f.insert("cache_length".into(), json!(4096));
                Some("soft_overlong_punishment (DAPO's overlong penalty)".to_string())
            }
            // A model id or folder (GRPOTrainer loads one as a sequence
            // classifier with one label).
            path if path.contains('/') => {
                f.insert("name".into(), json!("reward_model"));
                f.insert("path".into(), json!(path));
                let local = path.starts_with('/') || path.starts_with('.');
                Some(if local {
                    "a reward model (a *ForSequenceClassification folder)".to_string()
                } else {
                    format!(
                        "TODO: a local folder: download the reward model {path} first (nothing \
                         is downloaded)"
                    )
                })
            }
            _ => {
                out.leave_out(
                    &format!("reward_funcs[{i}]"),
                    &json!(name),
                    "no built-in counterpart: run your Python function as it is, `{name: \
                     python, function: \"my_rewards.py:FUNCTION\"}`, or serve it from a \
                     `remote` reward function (learner/src/rewards.rs documents the built-in \
                     ones)",
                );
                continue;
            }
        };
        for (function, param, v) in &args {
            if function == name {
                f.insert(param.to_string(), v.clone());
            }
        }
        f.insert("weight".into(), json!(weight));
        functions.push((Value::Object(f), note));
    }
    if functions.is_empty() {
        return;
    }
    if names
        .iter()
        .any(|n| n == "accuracy" || n == "trl.rewards.accuracy_reward")
        && !map.contains_key("dataset_solution_column")
    {
        out.put(
            "data.answer_column",
            json!("solution"),
            Some(
                "open-r1's accuracy reads the solution column; exact_match takes its last \
                 \\boxed{} as the answer, as math_verify does"
                    .into(),
            ),
        );
    }
    if !reads_solution
        && names.iter().any(|n| n == "code" || n == "binary_code")
        && !map.contains_key("dataset_solution_column")
    {
        out.put(
            "data.answer_column",
            json!("verification_info"),
            Some("open-r1's code rewards read their test cases from verification_info".into()),
        );
    }
    if let Some(col) = map.remove("dataset_solution_column") {
        out.put(
            "data.answer_column",
            col,
            Some("dataset_solution_column".into()),
        );
    }
    // Kept as one entry: the list is rendered item by item.
    let items: Vec<Value> = functions
        .iter()
        .map(|(f, note)| json!({"function": f, "note": note}))
        .collect();
    let note = (!out.has("reward.functions")).then(|| "reward_funcs + reward_weights".into());
    out.put("reward.functions", Value::Array(items), note);
}

fn render(out: &Output, source_name: &str, dialect: &str) -> String {
    let mut y = format!(
        "# Converted from {source_name} by `learner convert-recipe`: each key in its\n\
         # section, commented with its {dialect} name where that differs. Check\n\
         # the TODO lines, and the keys left out at the end.\n\
         version: 1\n"
    );
    for (section, entries) in &out.sections {
        if entries.is_empty() {
            continue;
        }
        y.push_str(&format!("\n{section}:\n"));
        for e in entries {
            if *section == "reward" && e.key == "functions" {
                y.push_str(&format!("  functions:{}\n", comment(e.note.as_deref())));
                for item in e.value.as_array().into_iter().flatten() {
                    y.push_str(&format!(
                        "    - {}{}\n",
                        inline(&item["function"]),
                        comment(item["note"].as_str())
                    ));
                }
                continue;
            }
            y.push_str(&format!(
                "  {}: {}{}\n",
                e.key,
                inline(&e.value),
                comment(e.note.as_deref())
            ));
        }
    }
    if !out.left_out.is_empty() {
        y.push_str("\n# Left out (not Tandem keys):\n");
        for (kv, why) in &out.left_out {
            y.push_str(&format!("#   {kv}\n#     {why}\n"));
        }
    }
    y
}

fn comment(note: Option<&str>) -> String {
    note.map(|n| format!("  # {}", n.replace('\n', " ")))
        .unwrap_or_default()
}
