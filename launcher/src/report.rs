//! `launcher report RUN_DIR`: the run folder's `report.md` and its SVG
//! curves, from what the learner wrote (DESIGN.md, "Run folder"):
//! `manifest.json`, `train_log.jsonl` (one line per step) and
//! `eval_log.jsonl` (one line per validation).
//!
//! Written:
//!
//! - `report.md`: the run (version, git, hardware, topology, data), a summary
//!   table (reward, eval pass@k / mean@k, KL, entropy, completion length,
//!   loss, grad norm, step time and each of its parts, tokens/s) with 95%
//!   bootstrap confidence intervals, first and last values of the reward
//!   and of pass@k, links to the curves, the events of `run_log.jsonl` that
//!   are not routine (resumes, warnings, diverged ranks), the key settings
//!   of the resolved recipe and the whole recipe in a collapsed block, and
//!   notes on anything missing or malformed;
//! - `reward.svg`, `eval.svg`, `kl.svg`, `step_time.svg` (only those with
//!   data; a stale one of these names is removed).
//!
//! The reader is lenient: a missing file, a missing key or a malformed line
//! is a note in the report, never an error. Log lines are flattened before
//! lookup: nested objects become dotted keys and `/` (TRL's
//! `rewards/accuracy/mean`) becomes `.`; each metric is then looked up under
//! a few usual names ([`REWARD_KEYS`], ...).
//!
//! Statistics: the mean and a 95% percentile bootstrap interval of the mean
//! ([`bootstrap_mean`]: [`RESAMPLES`] resamples with replacement, a fixed
//! seed), over every logged step and over the last quarter of the steps (at
//! least [`MIN_WINDOW`]); an eval series is treated the same way, one point
//! per validation. Consecutive steps are correlated, so these intervals are
//! narrower than independent samples would give: they describe the logged
//! values, they do not test a hypothesis.
//!
//! Same input, same bytes: no clock, sorted keys, a fixed seed, fixed number
//! formats.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

pub const REPORT_FILE: &str = "report.md";
pub const REWARD_SVG: &str = "reward.svg";
pub const EVAL_SVG: &str = "eval.svg";
pub const KL_SVG: &str = "kl.svg";
pub const STEP_TIME_SVG: &str = "step_time.svg";
const ALL_SVGS: [&str; 4] = [REWARD_SVG, EVAL_SVG, KL_SVG, STEP_TIME_SVG];

const MANIFEST: &str = "manifest.json";
const TRAIN_LOG: &str = "train_log.jsonl";
const EVAL_LOG: &str = "eval_log.jsonl";
const RUN_LOG: &str = "run_log.jsonl";

/// run_log.jsonl events that every run has: counted, not listed.
const ROUTINE_EVENTS: &[&str] = &[
    "start",
    "sft_warmup",
    "eval",
    "checkpoint",
    "ref_model_sync",
    "end",
    // Its `warn` event, listed, says the same.
    "recipe_changed",
];

/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 1000;
/// Seed of the bootstrap's generator (SplitMix64), the same for every metric.
pub const SEED: u64 = 0x7A4D_E15E_ED5E_ED01;
/// The "last steps" window is the last quarter of the points, at least this
/// many (or all of them when there are fewer).
pub const MIN_WINDOW: usize = 5;

/// Keys tried, in order, for each step-wise metric (after flattening).
pub const STEP_KEYS: &[&str] = &["step", "global_step", "iteration"];
pub const REWARD_KEYS: &[&str] = &[
    "reward.mean",
    "reward",
    "reward_mean",
    "rewards.mean",
    "reward.total.mean",
    "rewards.total.mean",
    "reward.total",
    "rewards.total",
];
pub const REWARD_STD_KEYS: &[&str] = &[
    "reward.std",
    "reward_std",
    "rewards.std",
    "reward.total.std",
    "rewards.total.std",
];
/// Prefixes under which each reward function's mean is looked for
/// (`rewards.NAME` or `rewards.NAME.mean`).
pub const REWARD_FUNCTION_PREFIXES: &[&str] = &[
    "rewards",
    "reward",
    "reward_per_function",
    "rewards_per_function",
];
pub const KL_KEYS: &[&str] = &["kl", "kl.mean", "metrics.kl"];
pub const ENTROPY_KEYS: &[&str] = &["entropy", "entropy.mean", "metrics.entropy"];
/// Mean completion length in tokens (TRL's `completions/mean_length`).
pub const COMPLETION_LENGTH_KEYS: &[&str] = &[
    "completions.mean_length",
    "completions/mean_length",
    "completion_length",
];
pub const LOSS_KEYS: &[&str] = &["loss", "loss.total", "loss.loss", "metrics.loss"];
pub const GRAD_NORM_KEYS: &[&str] = &["grad_norm", "grad_norm.total", "metrics.grad_norm"];
pub const TOKENS_PER_S_KEYS: &[&str] = &[
    "tokens_per_s",
    "tokens_per_sec",
    "tokens_per_second",
    "throughput.tokens_per_s",
    "tokens_per_s.total",
];
/// Objects holding the step's timings in seconds: `total` and the parts.
pub const TIMING_PREFIXES: &[&str] = &["timings", "timing", "timings_s", "time", "times"];
/// Step time when the timings object has no `total`.
pub const STEP_TIME_KEYS: &[&str] = &["step_time", "step_time_s", "seconds"];
/// The parts of a step, in the order they happen (others follow, sorted).
pub const TIMING_PARTS: &[&str] = &[
    "generate",
    "score",
    "forward_backward",
    "allreduce",
    "optimizer",
    "weight_sync",
];
/// Seconds since the run started, at each step.
pub const ELAPSED_KEYS: &[&str] = &["elapsed_s", "elapsed"];
/// Mean eval reward.
pub const EVAL_REWARD_KEYS: &[&str] = &["reward_mean", "reward.mean", "reward"];

/// Recipe settings shown in the key-settings table, when present.
const KEY_SETTINGS: &[&str] = &[
    "model.path",
    "model.preset",
    "model.dtype",
    "model.device",
    "data.train_files",
    "data.eval_files",
    "rollout.num_generations",
    "rollout.max_completion_length",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.async_lag",
    "reward.functions",
    "train.max_steps",
    "train.num_train_epochs",
    "train.learning_rate",
    "train.lr_scheduler_type",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.num_iterations",
    "train.max_grad_norm",
    "train.loss_type",
    "train.beta",
    "train.epsilon",
    "train.epsilon_high",
    "train.scale_rewards",
    "train.seed",
    "eval.eval_steps",
    "eval.num_samples",
    "eval.temperature",
    "topology.nodes",
    "topology.gpus_per_node",
    "topology.dp",
    "topology.tp",
    "topology.learner_ranks",
];

/// What [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportPaths {
    /// `RUN_DIR/report.md`.
    pub report: PathBuf,
    /// The curves drawn (those with data), in the report's order.
    pub svgs: Vec<PathBuf>,
    /// What was missing or malformed (also in the report's "Notes").
    pub notes: Vec<String>,
}

/// The report, rendered but not written.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub markdown: String,
    /// `(file name, SVG text)`.
    pub svgs: Vec<(&'static str, String)>,
    pub notes: Vec<String>,
}

/// Writes `run_dir/report.md` and the curves. Fails only when `run_dir` is
/// not a run folder (none of manifest.json, train_log.jsonl, eval_log.jsonl)
/// or a file cannot be written; anything missing or malformed inside is a
/// note.
pub fn write_report(run_dir: &Path) -> anyhow::Result<ReportPaths> {
    if !run_dir.is_dir() {
        bail!("{} is not a folder", run_dir.display());
    }
    if ![MANIFEST, TRAIN_LOG, EVAL_LOG]
        .iter()
        .any(|f| run_dir.join(f).exists())
    {
        bail!(
            "{} is not a run folder: it has none of {MANIFEST}, {TRAIN_LOG}, {EVAL_LOG}",
            run_dir.display()
        );
    }
    let report = build_report(run_dir);
    let mut svgs = Vec::new();
    for (name, text) in &report.svgs {
        let path = run_dir.join(name);
        write_file(&path, text.as_bytes())?;
        svgs.push(path);
    }
    for name in ALL_SVGS {
        let path = run_dir.join(name);
        if !svgs.contains(&path) && path.is_file() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
    }
    let path = run_dir.join(REPORT_FILE);
    write_file(&path, report.markdown.as_bytes())?;
    Ok(ReportPaths {
        report: path,
        svgs,
        notes: report.notes,
    })
}

/// Writes under a temporary name, then renames: a reader never sees half a file.
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".tmp_{name}"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Reads the run folder and renders the report; never fails.
pub fn build_report(run_dir: &Path) -> Report {
    let mut notes = Vec::new();
    let manifest = read_manifest(run_dir, &mut notes);
    let train = read_log(run_dir, TRAIN_LOG, &mut notes);
    let mut eval = read_log(run_dir, EVAL_LOG, &mut notes);
    if let Some(rows) = &mut eval {
        name_k_keys(rows);
    }
    let train_rows = train.as_deref().unwrap_or(&[]);
    let eval_rows = eval.as_deref().unwrap_or(&[]);
    if train.as_ref().is_some_and(|r| r.is_empty()) {
        notes.push(format!("`{TRAIN_LOG}` has no usable line."));
    }
    if eval.as_ref().is_some_and(|r| r.is_empty()) {
        notes.push(format!("`{EVAL_LOG}` has no usable line."));
    }
    let m = Metrics::gather(train_rows, eval_rows, &mut notes);
    let svgs = draw_curves(&m, &mut notes);
    let events = read_events(run_dir, &mut notes);
    let markdown = render_markdown(&Read {
        run_dir,
        manifest: manifest.as_ref(),
        metrics: &m,
        train_rows: train_rows.len(),
        eval_rows: eval_rows.len(),
        svgs: &svgs,
        events: events.as_deref(),
        notes: &notes,
    });
    Report {
        markdown,
        svgs,
        notes,
    }
}

// ---------------------------------------------------------------------------
// Reading.
// ---------------------------------------------------------------------------

/// One log line: its step and every finite number in it, by flattened key.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    step: f64,
    values: BTreeMap<String, f64>,
}

fn read_manifest(dir: &Path, notes: &mut Vec<String>) -> Option<Value> {
    let path = dir.join(MANIFEST);
    let text = read_text(&path, MANIFEST, notes)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => Some(v),
        Ok(_) => {
            notes.push(format!("`{MANIFEST}` is not a JSON object: ignored."));
            None
        }
        Err(e) => {
            notes.push(format!(
                "`{MANIFEST}` is not valid JSON ({}): ignored.",
                json_error(&e, true)
            ));
            None
        }
    }
}

fn read_text(path: &Path, name: &str, notes: &mut Vec<String>) -> Option<String> {
    match std::fs::read(path) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            notes.push(format!(
                "`{name}` is missing: its part of the report is left out."
            ));
            None
        }
        Err(e) => {
            notes.push(format!("`{name}` cannot be read ({e}): left out."));
            None
        }
    }
}

/// serde_json's message without its "at line 1 column N" (a log line is one
/// line; the column is given apart).
fn json_error(e: &serde_json::Error, with_line: bool) -> String {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    if with_line {
        format!("{msg}, line {} column {}", e.line(), e.column())
    } else {
        format!("{msg}, column {}", e.column())
    }
}

/// The lines of a JSONL log, sorted by step, one per step (the last line of
/// a step logged twice wins); `None` when the file is missing.
/// The events of run_log.jsonl, as written (malformed lines are a note);
/// `None` without the file (a folder that another trainer wrote).
fn read_events(dir: &Path, notes: &mut Vec<String>) -> Option<Vec<serde_json::Map<String, Value>>> {
    let path = dir.join(RUN_LOG);
    if !path.exists() {
        return None;
    }
    let text = read_text(&path, RUN_LOG, notes)?;
    let mut events = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(Value::Object(e)) if e.get("event").is_some_and(Value::is_string) => events.push(e),
            _ if line.trim().is_empty() => {}
            _ => bad.push(format!("line {}", i + 1)),
        }
    }
    if !bad.is_empty() {
        notes.push(format!(
            "`{RUN_LOG}` {}: not an event: skipped.",
            list_capped(&bad).join(", ")
        ));
    }
    Some(events)
}

fn read_log(dir: &Path, name: &str, notes: &mut Vec<String>) -> Option<Vec<Row>> {
    let text = read_text(&dir.join(name), name, notes)?;
    let mut rows = Vec::new();
    let mut bad: Vec<String> = Vec::new();
    let mut no_step: Vec<usize> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => object,
            Ok(_) => {
                bad.push(format!("line {number}: not a JSON object"));
                continue;
            }
            Err(e) => {
                bad.push(format!(
                    "line {number}: not valid JSON ({})",
                    json_error(&e, false)
                ));
                continue;
            }
        };
        let mut values = BTreeMap::new();
        flatten("", &Value::Object(object), &mut values);
        match STEP_KEYS.iter().find_map(|k| values.get(*k)) {
            Some(step) => rows.push(Row {
                step: *step,
                values,
            }),
            None => no_step.push(number),
        }
    }
    for b in list_capped(&bad) {
        notes.push(format!("`{name}` {b}: skipped."));
    }
    if !no_step.is_empty() {
        let lines: Vec<String> = no_step.iter().map(|n| n.to_string()).collect();
        notes.push(format!(
            "`{name}` lines without a step (`{}`): {}: skipped.",
            STEP_KEYS.join("`, `"),
            list_capped(&lines).join(", ")
        ));
    }
    // Stable: lines of one step keep their file order, and the last wins.
    rows.sort_by(|a, b| a.step.total_cmp(&b.step));
    let before = rows.len();
    let mut deduped: Vec<Row> = Vec::with_capacity(rows.len());
    for row in rows {
        match deduped.last_mut() {
            Some(last) if last.step == row.step => *last = row,
            _ => deduped.push(row),
        }
    }
    if deduped.len() < before {
        notes.push(format!(
            "`{name}`: {} line(s) repeat an earlier step (a resumed run?): the last line of \
             each step is used.",
            before - deduped.len()
        ));
    }
    Some(deduped)
}

/// At most 10 items, then "... and N more".
fn list_capped(items: &[String]) -> Vec<String> {
    const CAP: usize = 10;
    let mut out: Vec<String> = items.iter().take(CAP).cloned().collect();
    if items.len() > CAP {
        out.push(format!("... and {} more", items.len() - CAP));
    }
    out
}

/// Every finite number under `v`, by dotted key (`/` in keys becomes `.`).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                out.insert(prefix.to_string(), x);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let k = k.replace('/', ".");
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => {}
    }
}

/// `pass@k` / `mean@k` / `pass_at_k` / `mean_at_k` with the k in a `k` or
/// `num_samples` field become `pass@4`, `mean@4`.
fn name_k_keys(rows: &mut [Row]) {
    for row in rows {
        let Some(k) = ["k", "num_samples"]
            .iter()
            .find_map(|key| row.values.get(*key))
            .copied()
        else {
            continue;
        };
        let renames: Vec<(String, String)> = row
            .values
            .keys()
            .filter_map(|key| {
                let (head, last) = split_last(key);
                let kind = match last {
                    "pass@k" | "pass_at_k" => "pass",
                    "mean@k" | "mean_at_k" => "mean",
                    _ => return None,
                };
                let name = format!("{kind}@{}", fmt_plain(k));
                let new = if head.is_empty() {
                    name
                } else {
                    format!("{head}.{name}")
                };
                Some((key.clone(), new))
            })
            .collect();
        for (old, new) in renames {
            if let Some(v) = row.values.remove(&old) {
                row.values.entry(new).or_insert(v);
            }
        }
    }
}

fn split_last(key: &str) -> (&str, &str) {
    key.rsplit_once('.').unwrap_or(("", key))
}

/// `pass@4` -> `("pass", 4)`; also `pass_at_4`.
fn at_k(segment: &str) -> Option<(&'static str, u64)> {
    for (kind, prefixes) in [
        ("pass", ["pass@", "pass_at_"]),
        ("mean", ["mean@", "mean_at_"]),
    ] {
        for p in prefixes {
            if let Some(k) = segment.strip_prefix(p).and_then(|k| k.parse::<u64>().ok()) {
                return Some((kind, k));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Series.
// ---------------------------------------------------------------------------

/// One metric over the run: `(step, value)` in step order.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    label: String,
    /// The flattened key it was read from.
    key: String,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn values(&self) -> Vec<f64> {
        self.points.iter().map(|p| p.1).collect()
    }
}

fn series_of(rows: &[Row], label: &str, key: &str) -> Series {
    Series {
        label: label.to_string(),
        key: key.to_string(),
        points: rows
            .iter()
            .filter_map(|r| r.values.get(key).map(|v| (r.step, *v)))
            .collect(),
    }
}

/// Of each row, the first of `keys` it has (so lines that spell a metric
/// differently still make one series); `None` when no row has any. The
/// series' `key` names every key used, in the order of `keys`.
fn find_series(rows: &[Row], label: &str, keys: &[&str]) -> Option<Series> {
    let mut used = BTreeSet::new();
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            let (i, v) = keys
                .iter()
                .enumerate()
                .find_map(|(i, k)| r.values.get(*k).map(|v| (i, *v)))?;
            used.insert(i);
            Some((r.step, v))
        })
        .collect();
    if points.is_empty() {
        return None;
    }
    let key: Vec<&str> = used.into_iter().map(|i| keys[i]).collect();
    Some(Series {
        label: label.to_string(),
        key: key.join("`, `"),
        points,
    })
}

fn all_keys(rows: &[Row]) -> BTreeSet<&str> {
    rows.iter()
        .flat_map(|r| r.values.keys().map(String::as_str))
        .collect()
}

/// Everything the report shows, read from the logs.
#[derive(Debug, Default)]
struct Metrics {
    reward: Option<Series>,
    reward_std: Option<Series>,
    reward_functions: Vec<Series>,
    /// pass@k then mean@k, by k.
    eval: Vec<Series>,
    eval_reward: Option<Series>,
    kl: Option<Series>,
    entropy: Option<Series>,
    completion_length: Option<Series>,
    loss: Option<Series>,
    grad_norm: Option<Series>,
    step_time: Option<Series>,
    timing_parts: Vec<Series>,
    tokens_per_s: Option<Series>,
    elapsed: Option<Series>,
}

impl Metrics {
    fn gather(train: &[Row], eval: &[Row], notes: &mut Vec<String>) -> Metrics {
        let mut m = Metrics::default();
        if !train.is_empty() {
            let mut required = |label: &str, keys: &[&str]| {
                let s = find_series(train, label, keys);
                if s.is_none() {
                    notes.push(format!(
                        "`{TRAIN_LOG}` has no {label} (looked for `{}`; null counts as \
                         missing).",
                        keys.join("`, `")
                    ));
                }
                s
            };
            m.reward = required("reward (mean)", REWARD_KEYS);
            m.kl = required("KL", KL_KEYS);
            m.entropy = required("entropy", ENTROPY_KEYS);
            m.tokens_per_s = required("tokens/s", TOKENS_PER_S_KEYS);
            m.reward_std = find_series(train, "reward (std within a step)", REWARD_STD_KEYS);
            m.loss = find_series(train, "loss", LOSS_KEYS);
            m.completion_length =
                find_series(train, "completion length (tokens)", COMPLETION_LENGTH_KEYS);
            m.grad_norm = find_series(train, "grad norm", GRAD_NORM_KEYS);
            m.elapsed = find_series(train, "elapsed", ELAPSED_KEYS);
            m.reward_functions = reward_functions(train);
            let (total, parts) = timings(train);
            if total.is_none() {
                notes.push(format!(
                    "`{TRAIN_LOG}` has no step time (looked for `total` under `{}`, and `{}`).",
                    TIMING_PREFIXES.join("`, `"),
                    STEP_TIME_KEYS.join("`, `")
                ));
            }
            if parts.is_empty() {
                notes.push(format!(
                    "`{TRAIN_LOG}` has no parts of the step time (looked under `{}`).",
                    TIMING_PREFIXES.join("`, `")
                ));
            }
            m.step_time = total;
            m.timing_parts = parts;
        }
        if !eval.is_empty() {
            m.eval = eval_series(eval);
            if m.eval.is_empty() {
                notes.push(format!(
                    "`{EVAL_LOG}` has no pass@k or mean@k (keys like `pass@1`, `mean@4`)."
                ));
            }
            m.eval_reward = find_series(eval, "eval reward (mean)", EVAL_REWARD_KEYS);
        }
        m
    }
}

/// `rewards.NAME` or `rewards.NAME.mean` (and the other prefixes), by name.
fn reward_functions(rows: &[Row]) -> Vec<Series> {
    const NOT_A_FUNCTION: &[&str] = &["mean", "std", "total", "min", "max"];
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for key in all_keys(rows) {
        for prefix in REWARD_FUNCTION_PREFIXES {
            let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            let name = rest.strip_suffix(".mean").unwrap_or(rest);
            if !name.contains('.') && !NOT_A_FUNCTION.contains(&name) {
                found.entry(name.to_string()).or_insert(key.to_string());
            }
        }
    }
    found
        .into_iter()
        .map(|(name, key)| series_of(rows, &format!("reward: {name}"), &key))
        .collect()
}

/// The step time (`PREFIX.total`, else [`STEP_TIME_KEYS`]) and its parts
/// (every other number under the first timing prefix found).
fn timings(rows: &[Row]) -> (Option<Series>, Vec<Series>) {
    let keys = all_keys(rows);
    let prefix = TIMING_PREFIXES.iter().find(|p| {
        keys.iter()
            .any(|k| k.strip_prefix(**p).is_some_and(|r| r.starts_with('.')))
    });
    let Some(prefix) = prefix else {
        return (
            find_series(rows, "step time (s)", STEP_TIME_KEYS),
            Vec::new(),
        );
    };
    let total_keys: Vec<String> = ["total", "total_s", "step", "step_s"]
        .iter()
        .map(|t| format!("{prefix}.{t}"))
        .collect();
    let mut total_try: Vec<&str> = total_keys.iter().map(String::as_str).collect();
    total_try.extend(STEP_TIME_KEYS);
    let total = find_series(rows, "step time (s)", &total_try);
    let mut parts: Vec<(usize, String, &str)> = keys
        .iter()
        .filter_map(|k| {
            let part = k.strip_prefix(*prefix)?.strip_prefix('.')?;
            if total_keys.iter().any(|t| t == k) {
                return None;
            }
            let bare = part.strip_suffix("_s").unwrap_or(part);
            let order = TIMING_PARTS
                .iter()
                .position(|p| *p == bare)
                .unwrap_or(TIMING_PARTS.len());
            Some((order, part.to_string(), *k))
        })
        .collect();
    parts.sort();
    let parts = parts
        .into_iter()
        .map(|(_, part, key)| series_of(rows, &format!("{part} (s)"), key))
        .collect();
    (total, parts)
}

/// Every key whose last segment is `pass@K` / `mean@K`: pass before mean,
/// then by k. Labelled by that segment, or by the whole key where two keys
/// share it.
fn eval_series(rows: &[Row]) -> Vec<Series> {
    let mut found: Vec<((usize, u64, String), String)> = Vec::new();
    for key in all_keys(rows) {
        let (_, last) = split_last(key);
        if let Some((kind, k)) = at_k(last) {
            let kind_order = usize::from(kind == "mean");
            found.push(((kind_order, k, key.to_string()), format!("{kind}@{k}")));
        }
    }
    found.sort();
    let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, short) in &found {
        *uses.entry(short).or_default() += 1;
    }
    found
        .iter()
        .map(|((_, _, key), short)| {
            let label = if uses[short.as_str()] > 1 {
                key.clone()
            } else {
                short.clone()
            };
            series_of(rows, &label, key)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Statistics.
// ---------------------------------------------------------------------------

/// A mean and its 95% percentile bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub n: usize,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// SplitMix64 (Steele, Lea and Flood, 2014): small, fast, and the same
/// sequence on every platform and version, so the report is reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40
    /// for any n a log can have).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// The mean of `xs` and the 2.5% and 97.5% quantiles (linear interpolation
/// between order statistics) of the means of [`RESAMPLES`] resamples with
/// replacement, drawn with [`SEED`]. `None` for no values; one value gives
/// a zero-width interval.
pub fn bootstrap_mean(xs: &[f64]) -> Option<Estimate> {
    let n = xs.len();
    if n == 0 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some(Estimate {
            n,
            mean,
            lo: mean,
            hi: mean,
        });
    }
    let mut rng = SplitMix64(SEED);
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| xs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    Some(Estimate {
        n,
        mean,
        lo: quantile(&means, 0.025),
        hi: quantile(&means, 0.975),
    })
}

/// Of sorted values, with linear interpolation (R's type 7).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let i = h.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    sorted[i] + (h - i as f64) * (sorted[j] - sorted[i])
}

/// The number of last points the "last steps" columns use.
pub fn window(n: usize) -> usize {
    n.div_ceil(4).max(MIN_WINDOW).min(n)
}

/// Trailing moving average over `w = clamp(round(n / 10), 1, 50)` points.
fn smooth(points: &[(f64, f64)]) -> (usize, Vec<(f64, f64)>) {
    let w = ((points.len() as f64 / 10.0).round() as usize).clamp(1, 50);
    let out = points
        .iter()
        .enumerate()
        .map(|(i, (x, _))| {
            let from = (i + 1).saturating_sub(w);
            let slice = &points[from..=i];
            (
                *x,
                slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64,
            )
        })
        .collect();
    (w, out)
}

// ---------------------------------------------------------------------------
// Numbers.
// ---------------------------------------------------------------------------

/// Four significant digits; scientific outside `[1e-3, 1e5)`.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    format!("{x:.decimals$}")
}

/// An integer-valued number without `.0`; others as [`fmt_num`].
fn fmt_plain(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        fmt_num(x)
    }
}

fn fmt_signed(x: f64) -> String {
    if x > 0.0 {
        format!("+{}", fmt_num(x))
    } else {
        fmt_num(x)
    }
}

// ---------------------------------------------------------------------------
// Markdown.
// ---------------------------------------------------------------------------

/// A markdown table cell: no `|`, no line breaks.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// What the report is written from: the run folder as read.
struct Read<'a> {
    run_dir: &'a Path,
    manifest: Option<&'a Value>,
    metrics: &'a Metrics,
    /// Usable lines of the train and eval logs.
    train_rows: usize,
    eval_rows: usize,
    svgs: &'a [(&'static str, String)],
    events: Option<&'a [serde_json::Map<String, Value>]>,
    notes: &'a [String],
}

fn render_markdown(read: &Read) -> String {
    let Read {
        run_dir,
        manifest,
        metrics: m,
        train_rows,
        eval_rows,
        svgs,
        events,
        notes,
    } = *read;
    let mut md = String::new();
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run_dir.display().to_string());
    let _ = writeln!(md, "# Tandem run report: {name}\n");
    render_run(&mut md, manifest, m, (train_rows, eval_rows), events);
    render_summary(&mut md, m);
    render_first_last(&mut md, m);
    render_curves(&mut md, svgs, m);
    if let Some(events) = events {
        render_events(&mut md, events);
    }
    // The steps the learner derived from num_train_epochs, when it did.
    let derived_steps = events.and_then(|evs| {
        evs.iter()
            .rev()
            .filter(|e| {
                matches!(
                    e.get("event").and_then(Value::as_str),
                    Some("start" | "resume")
                )
            })
            .find_map(|e| e.get("max_steps").and_then(Value::as_u64))
    });
    render_recipe(&mut md, manifest, derived_steps);
    md.push_str("## Notes\n\n");
    if notes.is_empty() {
        md.push_str("Nothing was missing or malformed.\n");
    } else {
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md
}

/// The events that are not routine (resumes, warnings, diverged ranks...),
/// one row each, after a count of the routine ones.
fn render_events(md: &mut String, events: &[serde_json::Map<String, Value>]) {
    md.push_str("## Events\n\n");
    let name = |e: &serde_json::Map<String, Value>| {
        e.get("event")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in events {
        *counts.entry(name(e)).or_default() += 1;
    }
    let counted: Vec<String> = counts
        .iter()
        .map(|(event, n)| format!("{event} {n}"))
        .collect();
    let _ = writeln!(md, "Events in `{RUN_LOG}`: {}.\n", counted.join(", "));
    let listed: Vec<&serde_json::Map<String, Value>> = events
        .iter()
        .filter(|e| !ROUTINE_EVENTS.contains(&name(e).as_str()))
        .collect();
    if listed.is_empty() {
        md.push_str("No resumes, warnings or other events out of the ordinary.\n\n");
        return;
    }
    md.push_str("| Time | Event | Step | Details |\n|---|---|---:|---|\n");
    for e in listed {
        let text = |k: &str| e.get(k).map(scalar_text).unwrap_or_default();
        let details = match e.get("message") {
            Some(m) => scalar_text(m),
            None => {
                let rest: serde_json::Map<String, Value> = e
                    .iter()
                    .filter(|(k, _)| !["time", "event", "step"].contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                compact_object(&Value::Object(rest))
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            cell(&text("time")),
            cell(&name(e)),
            cell(&text("step")),
            cell(&truncate(&details, 300))
        );
    }
    md.push('\n');
}

/// The `sft_warmup` event in words: how many steps, and why it ended.
fn warm_up_text(e: &serde_json::Map<String, Value>) -> String {
    let num = |k: &str| e.get(k).and_then(Value::as_f64);
    // Recipe values as the recipe wrote them.
    let written = |k: &str| e.get(k).filter(|v| v.is_number()).map(scalar_text);
    let mut text = match num("steps") {
        Some(steps) => format!("{} steps", fmt_plain(steps)),
        None => "steps not logged".to_string(),
    };
    if let (Some(steps), Some(most), Some(target)) =
        (num("steps"), num("max_steps"), written("target_loss"))
    {
        let stopped = match e.get("stopped_at_target_loss").and_then(Value::as_bool) {
            Some(stopped) => stopped,
            None => steps < most,
        };
        if stopped {
            let _ = write!(
                text,
                " of at most {}, stopped at its target loss {target}",
                fmt_plain(most)
            );
        } else {
            let _ = write!(text, ", its target loss {target} not reached");
        }
    }
    if let Some(lr) = written("learning_rate") {
        let _ = write!(text, "; learning rate {lr}");
        if let Some(kind) = e.get("lr_scheduler_type").and_then(Value::as_str) {
            let _ = write!(text, " ({kind})");
        }
    }
    if let Some(secs) = num("elapsed_s") {
        let _ = write!(text, "; {} s", fmt_num(secs));
    }
    text
}

fn render_run(
    md: &mut String,
    manifest: Option<&Value>,
    m: &Metrics,
    (train_rows, eval_rows): (usize, usize),
    events: Option<&[serde_json::Map<String, Value>]>,
) {
    md.push_str("## Run\n\n");
    let mut items: Vec<(String, String)> = Vec::new();
    if let Some(man) = manifest {
        let s = |key: &str| man.get(key).and_then(Value::as_str).map(str::to_string);
        if let Some(v) = s("tandem_version") {
            items.push(("Tandem".into(), v));
        }
        if let Some(v) = s("created_at") {
            items.push(("Started".into(), v));
        }
        if let Some(git) = man.get("git") {
            let commit = git
                .get("commit")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            let dirty = match git.get("dirty").and_then(Value::as_bool) {
                Some(true) => " (with uncommitted changes)",
                _ => "",
            };
            items.push(("Git".into(), format!("`{commit}`{dirty}")));
        }
        if let Some(cmd) = man.get("command").and_then(Value::as_array) {
            let words: Vec<&str> = cmd.iter().filter_map(Value::as_str).collect();
            items.push(("Command".into(), format!("`{}`", words.join(" "))));
        }
        for (key, label) in [("hardware", "Hardware"), ("topology", "Topology")] {
            if let Some(v) = man.get(key) {
                items.push((label.into(), compact_object(v)));
            }
        }
        if let Some(v) = man.get("versions").filter(|v| v.is_object()) {
            items.push(("Versions".into(), compact_object(v)));
        }
    }
    if let (Some(first), Some(last)) = (m.first_step(), m.last_step()) {
        items.push((
            "Steps logged".into(),
            format!(
                "{train_rows} (step {} to {})",
                fmt_plain(first),
                fmt_plain(last)
            ),
        ));
    } else {
        items.push(("Steps logged".into(), train_rows.to_string()));
    }
    items.push(("Validations logged".into(), eval_rows.to_string()));
    let warm_up = events.and_then(|evs| {
        evs.iter()
            .find(|e| e.get("event").and_then(Value::as_str) == Some("sft_warmup"))
    });
    if let Some(e) = warm_up {
        items.push(("Supervised warm-up".into(), warm_up_text(e)));
    }
    if let Some(t) = &m.step_time {
        let total: f64 = t.values().iter().sum();
        items.push((
            "Training time".into(),
            format!("{} s (sum of the logged step times)", fmt_num(total)),
        ));
    }
    if let Some((step, secs)) = m.elapsed.as_ref().and_then(|s| s.points.last()) {
        items.push((
            "Wall time".into(),
            // The learner counts it from its first step, after the
            // warm-up and the first eval (and again from a resume).
            format!(
                "{} s (at step {}, since the first step of this start)",
                fmt_num(*secs),
                fmt_plain(*step)
            ),
        ));
    }
    for (k, v) in items {
        let _ = writeln!(md, "- **{k}**: {v}");
    }
    md.push('\n');
    if let Some(datasets) = manifest
        .and_then(|m| m.get("datasets"))
        .and_then(Value::as_array)
        .filter(|d| !d.is_empty())
    {
        md.push_str("| Data file | Rows | Bytes | Weight | SHA-256 |\n|---|---:|---:|---:|---|\n");
        for d in datasets {
            let get = |k: &str| d.get(k).map(scalar_text).unwrap_or_default();
            let sha = get("sha256");
            let sha = sha.get(..16).map(|s| format!("`{s}...`")).unwrap_or(sha);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                cell(&get("path")),
                cell(&get("rows")),
                cell(&get("bytes")),
                cell(&get("weight")),
                cell(&sha)
            );
        }
        md.push('\n');
    }
}

impl Metrics {
    fn step_series(&self) -> impl Iterator<Item = &Series> {
        [
            &self.reward,
            &self.kl,
            &self.entropy,
            &self.step_time,
            &self.tokens_per_s,
            &self.loss,
        ]
        .into_iter()
        .flatten()
    }

    fn first_step(&self) -> Option<f64> {
        self.step_series()
            .filter_map(|s| s.points.first().map(|p| p.0))
            .min_by(f64::total_cmp)
    }

    fn last_step(&self) -> Option<f64> {
        self.step_series()
            .filter_map(|s| s.points.last().map(|p| p.0))
            .max_by(f64::total_cmp)
    }

    /// The summary table's rows, in order; `true` marks eval rows.
    fn summary_rows(&self) -> Vec<(&Series, bool)> {
        let mut rows: Vec<(&Series, bool)> = Vec::new();
        rows.extend(self.reward.iter().map(|s| (s, false)));
        rows.extend(self.reward_functions.iter().map(|s| (s, false)));
        rows.extend(self.reward_std.iter().map(|s| (s, false)));
        rows.extend(self.eval.iter().map(|s| (s, true)));
        rows.extend(self.eval_reward.iter().map(|s| (s, true)));
        for s in [
            &self.kl,
            &self.entropy,
            &self.completion_length,
            &self.loss,
            &self.grad_norm,
        ]
        .into_iter()
        .flatten()
        {
            rows.push((s, false));
        }
        rows.extend(self.step_time.iter().map(|s| (s, false)));
        rows.extend(self.timing_parts.iter().map(|s| (s, false)));
        rows.extend(self.tokens_per_s.iter().map(|s| (s, false)));
        rows
    }
}

fn render_summary(md: &mut String, m: &Metrics) {
    md.push_str("## Summary\n\n");
    let rows = m.summary_rows();
    if rows.is_empty() {
        md.push_str("No metric was logged.\n\n");
        return;
    }
    let _ = write!(
        md,
        "Mean and 95% confidence interval (percentile bootstrap of the mean: {RESAMPLES} \
         resamples with replacement, fixed seed) over every logged step (eval rows: every \
         validation), and over the last quarter of them (at least {MIN_WINDOW}, or all when \
         fewer). Consecutive steps are correlated, so the intervals are narrower than \
         independent samples would give. Source: the log (`train`: {TRAIN_LOG}, `eval`: \
         {EVAL_LOG}) and the key read. Times are seconds per step; step-time parts are \
         indented under the step time.\n\n"
    );
    md.push_str(
        "| Metric | Source | n | Mean | 95% CI | Last n | Mean (last n) | 95% CI (last n) |\n\
         |---|---|---:|---:|---|---:|---:|---|\n",
    );
    let is_part = |s: &Series| m.timing_parts.iter().any(|p| std::ptr::eq(p, s));
    for (s, eval) in rows {
        let xs = s.values();
        let Some(all) = bootstrap_mean(&xs) else {
            continue;
        };
        let w = window(xs.len());
        let last = bootstrap_mean(&xs[xs.len() - w..]).unwrap_or(all);
        let label = if is_part(s) {
            format!("&nbsp;&nbsp;{}", s.label)
        } else {
            s.label.clone()
        };
        let _ = writeln!(
            md,
            "| {} | {} `{}` | {} | {} | [{}, {}] | {} | {} | [{}, {}] |",
            cell(&label),
            if eval { "eval" } else { "train" },
            cell(&s.key),
            all.n,
            fmt_num(all.mean),
            fmt_num(all.lo),
            fmt_num(all.hi),
            last.n,
            fmt_num(last.mean),
            fmt_num(last.lo),
            fmt_num(last.hi),
        );
    }
    md.push('\n');
}

fn render_first_last(md: &mut String, m: &Metrics) {
    let rows: Vec<&Series> = m
        .reward
        .iter()
        .chain(&m.reward_functions)
        .chain(&m.eval)
        .filter(|s| !s.points.is_empty())
        .collect();
    if rows.is_empty() {
        return;
    }
    md.push_str("## First and last\n\n");
    md.push_str(
        "| Metric | First | At step | Last | At step | Change |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for s in rows {
        let (fs, fv) = s.points[0];
        let (ls, lv) = s.points[s.points.len() - 1];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            cell(&s.label),
            fmt_num(fv),
            fmt_plain(fs),
            fmt_num(lv),
            fmt_plain(ls),
            fmt_signed(lv - fv)
        );
    }
    md.push('\n');
}

fn render_curves(md: &mut String, svgs: &[(&'static str, String)], m: &Metrics) {
    md.push_str("## Curves\n\n");
    if svgs.is_empty() {
        md.push_str("No curve: the logs have none of their metrics.\n\n");
        return;
    }
    for (name, _) in svgs {
        let title = match *name {
            REWARD_SVG => {
                let w = m.reward.as_ref().map_or(1, |s| smooth(&s.points).0);
                format!("Reward (mean per step; moving average over {w} steps)")
            }
            EVAL_SVG => "Eval pass@k and mean@k".to_string(),
            KL_SVG => {
                let w = m.kl.as_ref().map_or(1, |s| smooth(&s.points).0);
                format!("KL to the reference (per step; moving average over {w} steps)")
            }
            STEP_TIME_SVG => "Step time and its parts (seconds)".to_string(),
            other => other.to_string(),
        };
        let _ = writeln!(md, "[{title}]({name})\n\n![{title}]({name})\n");
    }
}

fn render_recipe(md: &mut String, manifest: Option<&Value>, derived_steps: Option<u64>) {
    md.push_str("## Recipe\n\n");
    let recipe = manifest.and_then(|m| {
        ["recipe", "resolved_recipe", "config"]
            .iter()
            .find_map(|k| m.get(*k))
            .filter(|r| r.is_object())
    });
    let Some(recipe) = recipe else {
        md.push_str("No resolved recipe (`recipe` in `manifest.json`).\n\n");
        return;
    };
    let rows: Vec<(&str, String)> = KEY_SETTINGS
        .iter()
        .filter_map(|path| {
            let v = path.split('.').try_fold(recipe, |v, part| v.get(part))?;
            // max_steps 0 (or TRL's -1): the epochs decided.
            if *path == "train.max_steps" && v.as_u64() == Some(0) {
                let text = derived_steps.map_or("from train.num_train_epochs".into(), |n| {
                    format!("{n} (from train.num_train_epochs)")
                });
                return Some((*path, text));
            }
            (!v.is_null()).then(|| (*path, setting_text(v)))
        })
        .collect();
    if !rows.is_empty() {
        md.push_str("| Setting | Value |\n|---|---|\n");
        for (k, v) in rows {
            let _ = writeln!(md, "| `{k}` | {} |", cell(&v));
        }
        md.push('\n');
    }
    let pretty = serde_json::to_string_pretty(recipe).unwrap_or_default();
    let _ = writeln!(
        md,
        "<details>\n<summary>The whole resolved recipe</summary>\n\n```json\n{pretty}\n```\n\n</details>\n"
    );
}

/// A string without quotes, other scalars as JSON.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}

/// A recipe value on one line: data files by path (and weight when not 1),
/// reward functions as `name (weight)`, other values as JSON; at most 200
/// characters.
fn setting_text(v: &Value) -> String {
    let text = match v {
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .map(|item| {
                    let weight = item
                        .get("weight")
                        .filter(|w| w.as_f64().is_some_and(|w| w != 1.0))
                        .map(|w| format!(" (weight {})", scalar_text(w)));
                    match (item.get("path"), item.get("name")) {
                        (Some(p), _) => scalar_text(p) + &weight.unwrap_or_default(),
                        (None, Some(n)) => scalar_text(n) + &weight.unwrap_or_default(),
                        _ => scalar_text(item),
                    }
                })
                .collect();
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        }
        other => scalar_text(other),
    };
    truncate(&text, 200)
}

/// `key: value` pairs of an object's scalars (arrays by length or items).
fn compact_object(v: &Value) -> String {
    let Some(map) = v.as_object() else {
        return truncate(&scalar_text(v), 200);
    };
    let parts: Vec<String> = map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
                    let items: Vec<String> = a.iter().map(scalar_text).collect();
                    format!("[{}]", items.join(", "))
                }
                Value::Array(a) => format!("{} items", a.len()),
                Value::Object(_) => compact_object(v),
                other => scalar_text(other),
            };
            format!("{k}: {text}")
        })
        .collect();
    truncate(&parts.join("; "), 400)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push_str("...");
        t
    }
}

// ---------------------------------------------------------------------------
// SVG.
// ---------------------------------------------------------------------------

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One line of a chart.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
    color: &'static str,
    width: f64,
    dashed: bool,
    markers: bool,
}

impl Line {
    fn new(name: &str, points: &[(f64, f64)], color: &'static str) -> Line {
        Line {
            name: name.to_string(),
            points: points.to_vec(),
            color,
            width: 1.6,
            dashed: false,
            markers: points.len() == 1,
        }
    }
}

fn draw_curves(m: &Metrics, notes: &mut Vec<String>) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let with_smooth = |s: &Series, raw_color: &'static str, color: &'static str| {
        let (w, smoothed) = smooth(&s.points);
        let mut raw = Line::new(&s.label, &s.points, raw_color);
        raw.width = 1.0;
        let mut avg = Line::new(&format!("moving average ({w})"), &smoothed, color);
        avg.width = 2.4;
        vec![raw, avg]
    };
    match &m.reward {
        Some(s) if !s.points.is_empty() => out.push((
            REWARD_SVG,
            chart(
                "Reward (mean per step)",
                "reward",
                &with_smooth(s, "#9ecae1", "#08519c"),
                Scale::Auto,
            ),
        )),
        _ => notes.push(format!("No reward to draw: `{REWARD_SVG}` not written.")),
    }
    if m.eval.iter().any(|s| !s.points.is_empty()) {
        let lines: Vec<Line> = m
            .eval
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut l = Line::new(&s.label, &s.points, PALETTE[i % PALETTE.len()]);
                l.markers = true;
                l.dashed = s.label.starts_with("mean@");
                l
            })
            .collect();
        out.push((
            EVAL_SVG,
            chart("Eval pass@k and mean@k", "rate", &lines, Scale::Unit),
        ));
    } else {
        notes.push(format!("No eval pass@k to draw: `{EVAL_SVG}` not written."));
    }
    match &m.kl {
        Some(s) if !s.points.is_empty() => out.push((
            KL_SVG,
            chart(
                "KL to the reference (per step)",
                "KL",
                &with_smooth(s, "#fdae6b", "#a63603"),
                Scale::Auto,
            ),
        )),
        _ => notes.push(format!("No KL to draw: `{KL_SVG}` not written.")),
    }
    let mut lines: Vec<Line> = Vec::new();
    if let Some(s) = m.step_time.as_ref().filter(|s| !s.points.is_empty()) {
        let mut total = Line::new("total", &s.points, "#222222");
        total.width = 2.4;
        lines.push(total);
    }
    for (i, s) in m.timing_parts.iter().enumerate() {
        let name = s.label.strip_suffix(" (s)").unwrap_or(&s.label);
        lines.push(Line::new(name, &s.points, PALETTE[i % PALETTE.len()]));
    }
    if lines.iter().any(|l| !l.points.is_empty()) {
        out.push((
            STEP_TIME_SVG,
            chart(
                "Step time and its parts",
                "seconds",
                &lines,
                Scale::FromZero,
            ),
        ));
    } else {
        notes.push(format!(
            "No step time to draw: `{STEP_TIME_SVG}` not written."
        ));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// From the data, padded to round ticks.
    Auto,
    /// 0 to 1 when every value is in it, else as `Auto`.
    Unit,
    /// From 0 when every value is >= 0.
    FromZero,
}

/// Round tick positions covering `lo..=hi` (steps of 1, 2 or 5 x 10^e):
/// `(first, last, step)`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (f64, f64, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    };
    let raw = (hi - lo) / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let step = mag
        * if f <= 1.0 {
            1.0
        } else if f <= 2.0 {
            2.0
        } else if f <= 5.0 {
            5.0
        } else {
            10.0
        };
    let first = (lo / step).floor() * step;
    let last = (hi / step).ceil() * step;
    (first, last, step)
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let v = if v.abs() < step * 1e-6 { 0.0 } else { v };
    if v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    format!("{v:.decimals$}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart: axes with ticks and labels, a light grid, one polyline per
/// line, a legend on the right. Step on the x axis.
fn chart(title: &str, y_label: &str, lines: &[Line], scale: Scale) -> String {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 76.0;
    const RIGHT: f64 = 570.0;
    const TOP: f64 = 44.0;
    const BOTTOM: f64 = 364.0;
    let pts = || lines.iter().flat_map(|l| l.points.iter());
    let min = |it: &mut dyn Iterator<Item = f64>| it.fold(f64::INFINITY, f64::min);
    let max = |it: &mut dyn Iterator<Item = f64>| it.fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = (min(&mut pts().map(|p| p.0)), max(&mut pts().map(|p| p.0)));
    let (mut y_lo, mut y_hi) = (min(&mut pts().map(|p| p.1)), max(&mut pts().map(|p| p.1)));
    match scale {
        Scale::Unit if y_lo >= 0.0 && y_hi <= 1.0 => (y_lo, y_hi) = (0.0, 1.0),
        Scale::FromZero if y_lo >= 0.0 => y_lo = 0.0,
        _ => {}
    }
    let (x0, x1, xs) = nice_ticks(x_lo, x_hi, 8);
    let (y0, y1, ys) = nice_ticks(y_lo, y_hi, 6);
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (RIGHT - LEFT);
    let py = |y: f64| BOTTOM - (y - y0) / (y1 - y0) * (BOTTOM - TOP);

    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, "<title>{}</title>", esc(title));
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="26" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    // Grid and ticks.
    let _ = writeln!(s, r##"<g stroke="#e6e6e6" stroke-width="1">"##);
    let ticks = |a: f64, b: f64, step: f64| {
        let n = ((b - a) / step).round() as usize;
        (0..=n).map(move |i| a + i as f64 * step)
    };
    for x in ticks(x0, x1, xs) {
        let _ = writeln!(
            s,
            r#"<line x1="{:.2}" y1="{TOP}" x2="{:.2}" y2="{BOTTOM}"/>"#,
            px(x),
            px(x)
        );
    }
    for y in ticks(y0, y1, ys) {
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{:.2}" x2="{RIGHT}" y2="{:.2}"/>"#,
            py(y),
            py(y)
        );
    }
    s.push_str("</g>\n");
    let _ = writeln!(
        s,
        r##"<g stroke="#333333" stroke-width="1"><line x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{BOTTOM}"/></g>"##
    );
    let _ = writeln!(s, r##"<g fill="#333333">"##);
    for x in ticks(x0, x1, xs) {
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>"#,
            px(x),
            BOTTOM + 18.0,
            tick_label(x, xs)
        );
    }
    for y in ticks(y0, y1, ys) {
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            py(y) + 4.0,
            tick_label(y, ys)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">step</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 40.0
    );
    let mid = (TOP + BOTTOM) / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="20" y="{mid:.2}" text-anchor="middle" transform="rotate(-90 20 {mid:.2})">{}</text>"#,
        esc(y_label)
    );
    s.push_str("</g>\n");
    // Lines.
    for l in lines.iter().filter(|l| !l.points.is_empty()) {
        let coords: Vec<String> = l
            .points
            .iter()
            .map(|(x, y)| format!("{:.2},{:.2}", px(*x), py(*y)))
            .collect();
        let dash = if l.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="{}" stroke-linejoin="round"{dash} points="{}"/>"#,
            l.color,
            l.width,
            coords.join(" ")
        );
        if l.markers {
            let _ = writeln!(s, r#"<g fill="{}">"#, l.color);
            for (x, y) in &l.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.2}" cy="{:.2}" r="3"/>"#,
                    px(*x),
                    py(*y)
                );
            }
            s.push_str("</g>\n");
        }
    }
    // Legend.
    for (i, l) in lines.iter().filter(|l| !l.points.is_empty()).enumerate() {
        let y = TOP + 8.0 + i as f64 * 20.0;
        let dash = if l.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<line x1="{:.2}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}" stroke="{}" stroke-width="{}"{dash}/>"#,
            RIGHT + 16.0,
            RIGHT + 40.0,
            l.color,
            l.width
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}">{}</text>"#,
            RIGHT + 46.0,
            y + 4.0,
            esc(&truncate(&l.name, 22))
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_is_reproducible_and_brackets_the_mean() {
        let xs: Vec<f64> = (0..50).map(|i| (i % 7) as f64 * 0.1).collect();
        let a = bootstrap_mean(&xs).unwrap();
        let b = bootstrap_mean(&xs).unwrap();
        assert_eq!(a, b);
        assert!(a.lo < a.mean && a.mean < a.hi, "{a:?}");
        let one = bootstrap_mean(&[2.5]).unwrap();
        assert_eq!((one.lo, one.mean, one.hi), (2.5, 2.5, 2.5));
        assert!(bootstrap_mean(&[]).is_none());
    }

    #[test]
    fn the_warm_up_says_how_it_ended() {
        let event = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        };
        let e = event(serde_json::json!({"event": "sft_warmup", "steps": 1266,
            "max_steps": 2000, "target_loss": 0.45, "stopped_at_target_loss": true,
            "learning_rate": 0.001,
            "lr_scheduler_type": "constant", "elapsed_s": 59.37}));
        assert_eq!(
            warm_up_text(&e),
            "1266 steps of at most 2000, stopped at its target loss 0.45; \
             learning rate 0.001 (constant); 59.37 s"
        );
        let e = event(serde_json::json!({"event": "sft_warmup", "steps": 80,
            "max_steps": 80, "target_loss": 0.001, "stopped_at_target_loss": false,
            "learning_rate": 0.003, "lr_scheduler_type": "linear"}));
        assert_eq!(
            warm_up_text(&e),
            "80 steps, its target loss 0.001 not reached; learning rate 0.003 (linear)"
        );
        // Reached at the last step allowed.
        let e = event(serde_json::json!({"event": "sft_warmup", "steps": 80,
            "max_steps": 80, "target_loss": 0.5, "stopped_at_target_loss": true}));
        assert_eq!(
            warm_up_text(&e),
            "80 steps of at most 80, stopped at its target loss 0.5"
        );
        // Without a target (and as older runs logged it).
        let e = event(serde_json::json!({"event": "sft_warmup", "steps": 1000,
            "learning_rate": 0.001, "elapsed_s": 47.0}));
        assert_eq!(warm_up_text(&e), "1000 steps; learning rate 0.001; 47.00 s");
    }

    #[test]
    fn quantile_interpolates() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 0.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert!((quantile(&v, 0.025) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn windows() {
        assert_eq!(window(1), 1);
        assert_eq!(window(5), 5);
        assert_eq!(window(8), 5);
        assert_eq!(window(40), 10);
        assert_eq!(window(41), 11);
    }

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(0.5), "0.5000");
        assert_eq!(fmt_num(12.3456), "12.35");
        assert_eq!(fmt_num(-1234.56), "-1235");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(123456.0), "1.235e5");
        assert_eq!(fmt_num(0.0001234), "1.234e-4");
        assert_eq!(fmt_plain(40.0), "40");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_ticks(0.0, 1.0, 5), (0.0, 1.0, 0.2));
        let (a, b, s) = nice_ticks(3.0, 97.0, 8);
        assert_eq!((a, b, s), (0.0, 100.0, 20.0));
        let (a, b, _) = nice_ticks(5.0, 5.0, 8);
        assert!(a < 5.0 && b > 5.0);
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(-1e-17, 0.1), "0.0");
    }

    #[test]
    fn keys_are_flattened_and_k_named() {
        let v: Value = serde_json::json!({
            "step": 3, "rewards/acc/mean": 0.5, "timings": {"generate": 1.5},
            "flag": true, "name": "x", "none": null,
            "pass@k": 0.25, "k": 4
        });
        let mut values = BTreeMap::new();
        flatten("", &v, &mut values);
        assert_eq!(values.get("rewards.acc.mean"), Some(&0.5));
        assert_eq!(values.get("timings.generate"), Some(&1.5));
        assert!(!values.contains_key("flag") && !values.contains_key("none"));
        let mut rows = vec![Row { step: 3.0, values }];
        name_k_keys(&mut rows);
        assert_eq!(rows[0].values.get("pass@4"), Some(&0.25));
        assert_eq!(at_k("pass_at_8"), Some(("pass", 8)));
        assert_eq!(at_k("mean@16"), Some(("mean", 16)));
        assert_eq!(at_k("passage"), None);
    }

    #[test]
    fn smoothing_window() {
        let pts: Vec<(f64, f64)> = (0..30).map(|i| (i as f64, i as f64)).collect();
        let (w, s) = smooth(&pts);
        assert_eq!(w, 3);
        assert_eq!(s[0], (0.0, 0.0));
        assert_eq!(s[1], (1.0, 0.5));
        assert_eq!(s[29], (29.0, 28.0));
    }
}
