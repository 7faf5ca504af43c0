//! The run folder (DESIGN.md, "Run folder"):
//!
//! ```text
//! <out>/manifest.json           resolved recipe, dataset fingerprints, git, hardware,
//!                               topology, versions
//! <out>/run_log.jsonl           events: start, eval, checkpoint, warn...
//! <out>/train_log.jsonl         one line per step
//! <out>/eval_log.jsonl          one line per validation
//! <out>/completions.jsonl       one line per completion (log.log_completions)
//! <out>/checkpoints/step_000100 complete checkpoints only
//! ```
//!
//! Every log line is written with one `write` on a file opened in append
//! mode, so a crash loses at most the line being written. A checkpoint is
//! written under a temporary name and renamed when complete, so an
//! interrupted one never looks complete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::FileFingerprint;
use crate::recipe::Recipe;

pub const MANIFEST: &str = "manifest.json";
pub const RUN_LOG: &str = "run_log.jsonl";
pub const TRAIN_LOG: &str = "train_log.jsonl";
pub const EVAL_LOG: &str = "eval_log.jsonl";
pub const COMPLETIONS_LOG: &str = "completions.jsonl";
pub const CHECKPOINTS: &str = "checkpoints";
/// TensorBoard event files (`log.report_to: [tensorboard]`), as transformers'
/// default `logging_dir` names them.
pub const TENSORBOARD_DIR: &str = "runs";

const TMP_PREFIX: &str = ".tmp_";
const OLD_PREFIX: &str = ".old_";

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} already holds a run (manifest.json exists): resume it with --resume-from, \
         or choose another checkpoint.output_dir"
    )]
    Exists { path: PathBuf },
    #[error("{path} is not a run folder (no manifest.json)")]
    NotARun { path: PathBuf },
    #[error(
        "{path} is neither a checkpoint folder (step_XXXXXX) nor a run folder with a \
         complete checkpoint under checkpoints/"
    )]
    NoCheckpoint { path: PathBuf },
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = RunDirError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Manifest.
// ---------------------------------------------------------------------------

/// What a run was: written once, at the start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub tandem_version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The command line.
    pub command: Vec<String>,
    /// The resolved recipe, secrets redacted.
    pub recipe: Value,
    /// Every data file: path, SHA-256, size, rows, weight.
    pub datasets: Vec<FileFingerprint>,
    pub git: GitInfo,
    pub hardware: Hardware,
    pub topology: RunTopology,
    /// Versions of the key crates this binary was built with.
    pub versions: BTreeMap<String, String>,
}

impl Manifest {
    /// Gathers everything but the data fingerprints and the topology, which
    /// the caller knows.
    pub fn collect(recipe: &Recipe, datasets: Vec<FileFingerprint>, topology: RunTopology) -> Self {
        Manifest {
            tandem_version: env!("CARGO_PKG_VERSION").to_string(),
            created_at: rfc3339_now(),
            command: redact_args(std::env::args()),
            recipe: recipe.to_json_redacted(),
            datasets,
            git: GitInfo::of_source_tree(),
            hardware: Hardware::detect(),
            topology,
            versions: crate_versions(),
        }
    }
}

/// The command line with the values of secret-looking options
/// (`rollout.api_key=...`, `--api-key KEY`, `--token=...`) replaced.
pub fn redact_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let secret = |name: &str| {
        let n = name
            .trim_start_matches('-')
            .to_ascii_lowercase()
            .replace('-', "_");
        ["key", "token", "secret", "password"]
            .iter()
            .any(|s| n.ends_with(s))
    };
    let mut out: Vec<String> = Vec::new();
    let mut hide_next = false;
    for arg in args {
        if hide_next {
            out.push("<redacted>".into());
            hide_next = false;
        } else if let Some((name, _)) = arg.split_once('=')
            && secret(name)
        {
            out.push(format!("{name}=<redacted>"));
        } else {
            hide_next = arg.starts_with("--") && secret(&arg);
            out.push(arg);
        }
    }
    out
}

/// The source tree's commit and whether it had uncommitted changes; null
/// when git or the tree is not there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitInfo {
    pub commit: Option<String>,
    pub dirty: Option<bool>,
}

impl GitInfo {
    /// Of the tree this crate was built from, else of the working directory.
    pub fn of_source_tree() -> Self {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = if source.is_dir() {
            source
        } else {
            PathBuf::from(".")
        };
        GitInfo::of(&dir)
    }

    pub fn of(dir: &Path) -> Self {
        let git = |args: &[&str]| -> Option<String> {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let commit = git(&["rev-parse", "HEAD"]).map(|s| s.trim().to_string());
        let dirty = commit
            .as_ref()
            .and_then(|_| git(&["status", "--porcelain"]))
            .map(|s| !s.trim().is_empty());
        GitInfo { commit, dirty }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpus: usize,
    pub memory_bytes: Option<u64>,
    pub os: String,
    pub arch: String,
    pub hostname: Option<String>,
}

impl Hardware {
    pub fn detect() -> Self {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|s| !s.is_empty());
        Hardware {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            hostname,
        }
    }
}

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunTopology {
    pub rank: usize,
    pub world_size: usize,
    pub endpoints: Vec<String>,
    pub weight_sync_endpoints: Vec<String>,
}

/// Crates whose version the manifest records.
const KEY_CRATES: &[&str] = &[
    "candle-core",
    "candle-nn",
    "tokenizers",
    "safetensors",
    "minijinja",
    "tonic",
    "prost",
    "reqwest",
    "axum",
    "tokio",
    "parquet",
    "serde-saphyr",
];

/// Versions of [`KEY_CRATES`], read from the workspace's Cargo.lock at
/// build time.
pub fn crate_versions() -> BTreeMap<String, String> {
    const LOCK: &str = include_str!("../../Cargo.lock");
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    out.insert("tandem".into(), env!("CARGO_PKG_VERSION").into());
    let mut name: Option<&str> = None;
    for line in LOCK.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(v) = line.strip_prefix("name = ") {
            name = Some(v.trim_matches('"'));
        } else if let (Some(n), Some(v)) = (name, line.strip_prefix("version = "))
            && KEY_CRATES.contains(&n)
        {
            let v = v.trim_matches('"');
            out.entry(n.to_string())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(v)
                })
                .or_insert_with(|| v.to_string());
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The folder and its logs.
// ---------------------------------------------------------------------------

/// An open run folder.
#[derive(Debug)]
pub struct RunDir {
    root: PathBuf,
    run_log: File,
    train_log: File,
    eval_log: File,
    /// `log.report_to: [tensorboard]`: the log lines' numbers, also as
    /// TensorBoard scalars under `runs/`.
    tensorboard: Option<std::sync::Mutex<TensorBoard>>,
}

/// The event files of a run: GRPO steps and evals in `runs/`, the
/// supervised warm-up's steps (a step count of their own) in
/// `runs/sft_warmup/`, which TensorBoard shows as a run of its own.
#[derive(Debug)]
struct TensorBoard {
    main: crate::tensorboard::EventWriter,
    sft: Option<crate::tensorboard::EventWriter>,
}

impl RunDir {
    /// Starts a new run in `out` (created if missing): writes manifest.json
    /// and opens the logs. Refuses a folder that already holds a run.
    pub fn create(out: &Path, manifest: &Manifest) -> Result<RunDir> {
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        let manifest_path = out.join(MANIFEST);
        if manifest_path.exists() {
            return Err(RunDirError::Exists {
                path: out.to_path_buf(),
            });
        }
        write_atomic(&manifest_path, &serde_json::to_vec_pretty(manifest)?)?;
        RunDir::open_logs(out)
    }

    /// Reopens a run to resume it from the checkpoint of `step`: the lines of
    /// train_log.jsonl and eval_log.jsonl after `step` (and a line cut short
    /// by a crash) are dropped, so the resumed run writes them again.
    pub fn resume(out: &Path, step: u64) -> Result<RunDir> {
        if !out.join(MANIFEST).exists() {
            return Err(RunDirError::NotARun {
                path: out.to_path_buf(),
            });
        }
        for name in [TRAIN_LOG, EVAL_LOG, COMPLETIONS_LOG] {
            truncate_after_step(&out.join(name), step)?;
        }
        RunDir::open_logs(out)
    }

    fn open_logs(out: &Path) -> Result<RunDir> {
        let open = |name: &str| {
            let p = out.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(io_err(&p))
        };
        Ok(RunDir {
            root: out.to_path_buf(),
            run_log: open(RUN_LOG)?,
            train_log: open(TRAIN_LOG)?,
            eval_log: open(EVAL_LOG)?,
            tensorboard: None,
        })
    }

    /// Also writes every train_log and eval_log line's numbers to a new
    /// TensorBoard event file in `runs/` (TRL's `report_to: tensorboard`).
    /// `resumed_at`: the first step a resumed run logs, from which on
    /// TensorBoard drops what earlier files logged.
    pub fn with_tensorboard(mut self, resumed_at: Option<u64>) -> Result<RunDir> {
        let dir = self.root.join(TENSORBOARD_DIR);
        let main =
            crate::tensorboard::EventWriter::create(&dir, resumed_at).map_err(io_err(&dir))?;
        self.tensorboard = Some(std::sync::Mutex::new(TensorBoard { main, sft: None }));
        Ok(self)
    }

    /// The numbers of a log line as scalars `prefix/...` at the line's step
    /// (`sft_step` for warm-up lines, under `sft/`).
    fn report<T: Serialize + ?Sized>(&self, prefix: &str, line: &T) -> Result<()> {
        let Some(tb) = &self.tensorboard else {
            return Ok(());
        };
        let Value::Object(mut m) = serde_json::to_value(line)? else {
            return Ok(());
        };
        let sft = m.get("phase").and_then(Value::as_str) == Some("sft");
        let (prefix, step_key) = if sft {
            ("sft", "sft_step")
        } else {
            (prefix, "step")
        };
        let step = m.get(step_key).and_then(Value::as_u64).unwrap_or(0);
        m.remove("step");
        m.remove("sft_step");
        let values = crate::tensorboard::scalars(prefix, &Value::Object(m));
        let mut tb = tb.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let TensorBoard {
            main,
            sft: sft_writer,
        } = &mut *tb;
        let writer = if sft {
            match sft_writer {
                Some(w) => w,
                None => {
                    let dir = self.root.join(TENSORBOARD_DIR).join("sft_warmup");
                    let w = crate::tensorboard::EventWriter::create(&dir, None)
                        .map_err(io_err(&dir))?;
                    sft_writer.insert(w)
                }
            }
        } else {
            main
        };
        let path = writer.path().to_path_buf();
        writer.add_scalars(step, &values).map_err(io_err(&path))
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn manifest(&self) -> Result<Manifest> {
        let p = self.root.join(MANIFEST);
        let bytes = std::fs::read(&p).map_err(io_err(&p))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Appends an event to run_log.jsonl: `{"time", "event", ...fields}`
    /// (`fields` an object; anything else goes under `"data"`).
    pub fn event(&self, event: &str, fields: Value) -> Result<()> {
        let mut line = Map::new();
        line.insert("time".into(), Value::String(rfc3339_now()));
        line.insert("event".into(), Value::String(event.into()));
        match fields {
            Value::Object(m) => line.extend(m),
            Value::Null => {}
            other => {
                line.insert("data".into(), other);
            }
        }
        append_line(
            &self.run_log,
            &self.root.join(RUN_LOG),
            &Value::Object(line),
        )
    }

    /// A `warn` event with a message.
    pub fn warn(&self, message: &str) -> Result<()> {
        self.event("warn", serde_json::json!({ "message": message }))
    }

    /// A `warn` event of a step, with a `kind` to find it by.
    pub fn warn_at(&self, step: u64, kind: &str, message: &str) -> Result<()> {
        self.event(
            "warn",
            serde_json::json!({"step": step, "message": message, "kind": kind}),
        )
    }

    /// Appends one step's line to train_log.jsonl, as given.
    pub fn log_train<T: Serialize + ?Sized>(&self, line: &T) -> Result<()> {
        append_line(&self.train_log, &self.root.join(TRAIN_LOG), line)?;
        self.report("train", line)
    }

    /// Appends one step's completions to completions.jsonl, one line each,
    /// in one `write` (the file is made on first use).
    pub fn log_completions<T: Serialize>(&self, lines: &[T]) -> Result<()> {
        let path = self.root.join(COMPLETIONS_LOG);
        let mut bytes = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut bytes, line)?;
            bytes.push(b'\n');
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(&bytes).map_err(io_err(&path))?;
        file.flush().map_err(io_err(&path))
    }

    /// Appends one validation's line to eval_log.jsonl, as given.
    pub fn log_eval<T: Serialize + ?Sized>(&self, line: &T) -> Result<()> {
        append_line(&self.eval_log, &self.root.join(EVAL_LOG), line)?;
        self.report("eval", line)
    }

    pub fn checkpoints(&self) -> CheckpointDir {
        CheckpointDir::new(&self.root)
    }
}

/// One JSON line, one `write` call on an append-mode file (no user-space
/// buffer to lose).
fn append_line<T: Serialize + ?Sized>(mut file: &File, path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec(value)?;
    bytes.push(b'\n');
    file.write_all(&bytes).map_err(io_err(path))?;
    file.flush().map_err(io_err(path))
}

/// Writes `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!("{TMP_PREFIX}{name}"));
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Keeps the lines of a JSONL log whose `"step"` is at most `step` (lines
/// without a step are kept); drops a last line cut short.
fn truncate_after_step(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut kept = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break; // cut short by a crash
        }
        let keep = match serde_json::from_str::<Value>(line) {
            Ok(v) => v
                .get("step")
                .and_then(Value::as_u64)
                .is_none_or(|s| s <= step),
            Err(_) => false,
        };
        if keep {
            kept.push_str(line);
        }
    }
    if kept.len() != text.len() {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Checkpoints.
// ---------------------------------------------------------------------------

/// `step_000100`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step_{step:06}")
}

/// The step of a complete checkpoint's folder name (`step_` and at least 6
/// digits); `None` for anything else, temporary folders included.
pub fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step_")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `<run>/checkpoints`.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    /// The checkpoints of the run folder `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        CheckpointDir {
            root: run_dir.join(CHECKPOINTS),
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Starts the checkpoint of `step` in an empty temporary folder; write
    /// into [`PendingCheckpoint::path`], then [`PendingCheckpoint::commit`].
    pub fn begin(&self, step: u64) -> Result<PendingCheckpoint> {
        std::fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let name = checkpoint_name(step);
        let tmp = self.root.join(format!("{TMP_PREFIX}{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(PendingCheckpoint {
            step,
            tmp,
            target: self.root.join(name),
        })
    }

    /// Complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name();
            if let Some(step) = name.to_str().and_then(parse_checkpoint_name)
                && entry.path().is_dir()
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.list()?.pop())
    }

    /// Deletes all but the newest `keep_last` complete checkpoints, and any
    /// temporary folder left by an interrupted one; returns what it deleted.
    pub fn prune(&self, keep_last: usize) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let all = self.list()?;
        let drop = all.len().saturating_sub(keep_last);
        for (_, path) in all.into_iter().take(drop) {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(TMP_PREFIX) || name.starts_with(OLD_PREFIX) {
                    let path = entry.path();
                    std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
                    removed.push(path);
                }
            }
        }
        Ok(removed)
    }
}

/// A checkpoint being written; invisible to [`CheckpointDir::latest`] until
/// committed. Dropping it without commit leaves a temporary folder that the
/// next `begin` of the same step or `prune` removes.
#[derive(Debug)]
pub struct PendingCheckpoint {
    step: u64,
    tmp: PathBuf,
    target: PathBuf,
}

impl PendingCheckpoint {
    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Flushes every file to disk and renames the folder to
    /// `step_XXXXXX`, replacing an older checkpoint of the same step.
    pub fn commit(self) -> Result<PathBuf> {
        sync_tree(&self.tmp)?;
        let parent = self.target.parent().unwrap_or(Path::new("."));
        let old = parent.join(format!("{OLD_PREFIX}{}", checkpoint_name(self.step)));
        let replaced = self.target.exists();
        if replaced {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            std::fs::rename(&self.target, &old).map_err(io_err(&self.target))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(io_err(&self.target))?;
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
        if replaced {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        Ok(self.target)
    }
}

fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// The newest complete checkpoint of a run folder.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(CheckpointDir::new(run_dir).latest()?.map(|(_, p)| p))
}

/// What `--resume-from` names: a checkpoint folder (`step_XXXXXX`) as it
/// is, or a run folder's newest complete checkpoint. Returns the step and
/// the folder.
pub fn resolve_resume(path: &Path) -> Result<(u64, PathBuf)> {
    let name = path.file_name().and_then(|n| n.to_str());
    if let Some(step) = name.and_then(parse_checkpoint_name)
        && path.is_dir()
    {
        return Ok((step, path.to_path_buf()));
    }
    // A run folder, or its checkpoints/ folder.
    let run = match (name, path.parent()) {
        (Some(CHECKPOINTS), Some(parent)) => parent,
        _ => path,
    };
    if let Some(found) = CheckpointDir::new(run).latest()? {
        return Ok(found);
    }
    Err(RunDirError::NoCheckpoint {
        path: path.to_path_buf(),
    })
}

// ---------------------------------------------------------------------------
// Time.
// ---------------------------------------------------------------------------

/// Now as RFC 3339 in UTC with milliseconds: `2025-01-31T12:00:00.000Z`.
pub fn rfc3339_now() -> String {
    rfc3339(chrono::Utc::now())
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        let at = |secs: i64, millis: u32| {
            rfc3339(chrono::DateTime::from_timestamp(secs, millis * 1_000_000).unwrap())
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_700_000_000, 123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn checkpoint_names() {
        assert_eq!(checkpoint_name(100), "step_000100");
        assert_eq!(checkpoint_name(1_234_567), "step_1234567");
        assert_eq!(parse_checkpoint_name("step_000100"), Some(100));
        assert_eq!(parse_checkpoint_name("step_1234567"), Some(1_234_567));
        assert_eq!(parse_checkpoint_name("step_100"), None);
        assert_eq!(parse_checkpoint_name(".tmp_step_000100"), None);
        assert_eq!(parse_checkpoint_name("step_00010x"), None);
    }

    #[test]
    fn secrets_are_redacted_from_the_command_line() {
        let args = [
            "learner",
            "train",
            "rollout.api_key=sk-1",
            "--api-key",
            "sk-2",
            "--weight-sync-token=t",
            "train.seed=3",
            "--config",
            "x.yaml",
        ]
        .map(String::from);
        let out = redact_args(args).join(" ");
        assert_eq!(
            out,
            "learner train rollout.api_key=<redacted> --api-key <redacted> \
             --weight-sync-token=<redacted> train.seed=3 --config x.yaml"
        );
    }

    #[test]
    fn crate_versions_come_from_the_lock_file() {
        let v = crate_versions();
        assert!(v.contains_key("candle-core"), "{v:?}");
        assert_eq!(v["tandem"], env!("CARGO_PKG_VERSION"));
    }
}
