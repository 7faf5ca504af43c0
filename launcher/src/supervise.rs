//! Supervision of one node's processes, as TGI's launcher does it: start the
//! rollout servers, wait for their `GET /health`, start the learners, then
//! watch. SIGINT/SIGTERM are passed on; when any process dies the launcher
//! names it and its exit status and stops the rest; when every learner has
//! exited 0 the servers are stopped and the launcher exits 0.
//!
//! Each child runs in its own process group (stopping it stops whatever it
//! started) with a parent-death signal (if the launcher is killed outright,
//! its children get SIGTERM). Stopping is SIGTERM (or the signal received),
//! then SIGKILL after a grace period, until no group member is left.
//!
//! Several nodes: one launcher per node. Each writes
//! `<out>/launcher/<job>/node-<k>.exit` when it finishes ("0", or "1 reason");
//! the rollout node stops its servers once every learner node wrote "0", and
//! any launcher stops when another node reports a failure. srun's
//! `--kill-on-bad-exit` stops the other nodes' launchers faster.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::plan::{Plan, ProcessPlan, Role, shell_words};
use crate::progress::ProgressView;

/// Overrides where the launcher looks for `rollout-server` and `learner`.
pub const BIN_DIR_VAR: &str = "TANDEM_BIN_DIR";

/// Lines of a process's log shown when it fails.
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The node this launcher runs.
    pub node: usize,
    /// Folder of the sibling binaries.
    pub bin_dir: PathBuf,
    /// Deadline for every rollout server's `/health`.
    pub health_timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// PIDs and node exit markers.
    pub job_dir: PathBuf,
    /// How rank 0's progress is shown (`log.progress`).
    pub progress: learner::recipe::Progress,
}

/// `TANDEM_BIN_DIR`, else the folder of the launcher's own executable.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_VAR) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("finding the launcher's own executable")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the launcher's executable has no folder")
}

/// Under `cargo run` (`CARGO` and `CARGO_MANIFEST_DIR` set, no
/// `TANDEM_BIN_DIR`), builds the rollout server and the learner in the
/// launcher's own profile first: `cargo run -p launcher` builds only the
/// launcher, and must not start missing or stale siblings. Cargo makes this a
/// no-op when they are up to date.
pub fn build_siblings_under_cargo(bin_dir: &Path) -> anyhow::Result<()> {
    if std::env::var_os(BIN_DIR_VAR).is_some() {
        return Ok(());
    }
    let (Some(cargo), Some(manifest_dir)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        return Ok(());
    };
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(manifest_dir)
        .args(["build", "-p", "rollout-server", "-p", "learner"]);
    match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
        None => return Ok(()),
    }
    if model::device::CUDA_BUILD {
        cmd.args(["--features", "cuda"]);
    }
    eprintln!("launcher: building the rollout server and the learner (cargo build)");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the rollout server and the learner failed ({status})");
    }
    Ok(())
}

/// How a process ended, in words.
pub fn describe_exit(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
            _ => format!("{s}"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// The last lines of a log file. A Rust backtrace at its end (a process
/// run with RUST_BACKTRACE set) would fill them with frames: the lines
/// before it, which hold the error, are shown instead.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let backtrace = ["\nStack backtrace:", "\nstack backtrace:"]
                .iter()
                .filter_map(|m| text.rfind(m))
                .max();
            let shown = backtrace.map_or(&text[..], |i| text[..i].trim_end());
            let all: Vec<&str> = shown.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut tail = all[start..].join("\n");
            if backtrace.is_some() {
                tail.push_str(&format!("\n(backtrace left out: {})", path.display()));
            }
            tail
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Sends `sig` to the process group `pgid`; false when no member is left.
fn signal_group(pgid: i32, sig: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory
    // is touched.
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// Follows rank 0's log: reads what was appended since the last look and
/// hands each whole line to the [`ProgressView`].
struct ProgressEcho {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

/// The learner's progress lines (learner/src/train.rs prints them).
pub fn is_progress_line(line: &str) -> bool {
    crate::progress::parse(line).is_some()
}

impl ProgressEcho {
    /// From the log's current end: an appended-to log's old runs are not shown.
    fn new(path: &Path) -> ProgressEcho {
        ProgressEcho {
            path: path.to_path_buf(),
            offset: std::fs::metadata(path).map_or(0, |m| m.len()),
            partial: Vec::new(),
        }
    }

    fn poll(&mut self, view: &mut ProgressView) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            view.line(String::from_utf8_lossy(&line).trim_end());
        }
    }
}

struct Proc {
    name: String,
    role: Role,
    pid: i32,
    log: PathBuf,
    status: Option<io::Result<ExitStatus>>,
}

/// Why supervision ends.
enum Outcome {
    /// Every learner exited 0 (on this node, or, on the rollout node, on
    /// every learner node).
    Done,
    /// A process or another node failed: the message says which and how.
    Failed(String),
    /// SIGINT or SIGTERM arrived.
    Signalled(i32),
}

type Exit = (usize, io::Result<ExitStatus>);

struct Supervisor<'a> {
    plan: &'a Plan,
    opts: &'a SupervisorOptions,
    procs: Vec<Proc>,
    tx: mpsc::UnboundedSender<Exit>,
    rx: mpsc::UnboundedReceiver<Exit>,
    progress: Option<ProgressEcho>,
    view: ProgressView,
}

/// Runs this node's part of the plan to the end; the value is the exit code
/// (0 done, 1 a failure, 128 + N after signal N).
pub async fn supervise(plan: &Plan, opts: &SupervisorOptions) -> anyhow::Result<i32> {
    let logs = plan.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    std::fs::create_dir_all(&opts.job_dir)
        .with_context(|| format!("creating {}", opts.job_dir.display()))?;
    let marker = opts.job_dir.join(format!("node-{}.exit", opts.node));
    let _ = std::fs::remove_file(&marker);
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let (tx, rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        plan,
        opts,
        procs: Vec::new(),
        tx,
        rx,
        progress: None,
        view: ProgressView::new(opts.progress),
    };
    let outcome = sup.run(&mut sigint, &mut sigterm).await;
    sup.echo_progress();
    sup.view.finish();
    let (code, stop_signal, line) = match &outcome {
        Outcome::Done => (0, libc::SIGTERM, "0".to_string()),
        Outcome::Failed(why) => {
            eprintln!("launcher: {why}");
            eprintln!("launcher: stopping every process");
            (1, libc::SIGTERM, format!("1 node {}: {why}", opts.node))
        }
        Outcome::Signalled(sig) => {
            eprintln!(
                "launcher: {} received, passing it on and stopping every process",
                signal_name(*sig)
            );
            (
                128 + sig,
                *sig,
                format!("{} node {}: {}", 128 + sig, opts.node, signal_name(*sig)),
            )
        }
    };
    sup.stop_all(stop_signal).await;
    if let Err(e) = std::fs::write(&marker, line + "\n") {
        eprintln!("launcher: cannot write {}: {e}", marker.display());
    }
    Ok(code)
}

impl Supervisor<'_> {
    async fn run(
        &mut self,
        sigint: &mut tokio::signal::unix::Signal,
        sigterm: &mut tokio::signal::unix::Signal,
    ) -> Outcome {
        let node = self.opts.node;
        let plan = self.plan;
        for p in plan
            .processes_on(node)
            .filter(|p| p.role == Role::RolloutServer)
        {
            if let Err(e) = self.spawn(p) {
                return Outcome::Failed(format!("{e:#}"));
            }
        }
        if let Some(outcome) = self.wait_for_health(sigint, sigterm).await {
            return outcome;
        }
        for p in plan.processes_on(node).filter(|p| p.role == Role::Learner) {
            if let Err(e) = self.spawn(p) {
                return Outcome::Failed(format!("{e:#}"));
            }
        }
        let learners_here = self.procs.iter().any(|p| p.role == Role::Learner);
        let learner_nodes = plan.learner_nodes();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                Some((i, status)) = self.rx.recv() => {
                    self.echo_progress();
                    if let Some(outcome) = self.on_exit(i, status) {
                        return outcome;
                    }
                    if learners_here
                        && self
                            .procs
                            .iter()
                            .filter(|p| p.role == Role::Learner)
                            .all(|p| matches!(&p.status, Some(Ok(s)) if s.success()))
                    {
                        self.view.say("launcher: every learner on this node exited 0");
                        return Outcome::Done;
                    }
                }
                _ = sigint.recv() => return Outcome::Signalled(libc::SIGINT),
                _ = sigterm.recv() => return Outcome::Signalled(libc::SIGTERM),
                _ = tick.tick() => {
                    self.echo_progress();
                    if let Some(outcome) = self.other_nodes(&learner_nodes, !learners_here) {
                        return outcome;
                    }
                }
            }
        }
    }

    fn echo_progress(&mut self) {
        if let Some(echo) = &mut self.progress {
            echo.poll(&mut self.view);
        }
    }

    /// A child exited: a failure unless it is a learner that exited 0.
    fn on_exit(&mut self, i: usize, status: io::Result<ExitStatus>) -> Option<Outcome> {
        let p = &mut self.procs[i];
        let ok = matches!(&status, Ok(s) if s.success());
        let what = describe_exit(&status);
        p.status = Some(status);
        if p.role == Role::Learner && ok {
            let message = format!("launcher: {} (pid {}) finished", p.name, p.pid);
            self.view.say(&message);
            return None;
        }
        let when = if p.role == Role::RolloutServer && ok {
            " while the learners still needed it"
        } else {
            ""
        };
        Some(Outcome::Failed(format!(
            "{} (pid {}) exited: {what}{when}; last lines of {}:\n{}",
            p.name,
            p.pid,
            p.log.display(),
            log_tail(&p.log, LOG_TAIL_LINES)
        )))
    }

    /// Reads the other nodes' exit markers: a failure anywhere stops this
    /// node; on the rollout node, every learner node done means done.
    fn other_nodes(&self, learner_nodes: &[usize], wait_for_learners: bool) -> Option<Outcome> {
        if self.plan.nodes.len() < 2 {
            return None;
        }
        let mut done = 0;
        for k in (0..self.plan.nodes.len()).filter(|&k| k != self.opts.node) {
            let path = self.opts.job_dir.join(format!("node-{k}.exit"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let text = text.trim();
            if text == "0" {
                done += usize::from(learner_nodes.contains(&k));
            } else if !text.is_empty() {
                return Some(Outcome::Failed(format!(
                    "node {k} ({}) stopped: {text}",
                    self.plan.nodes[k].name
                )));
            }
        }
        if wait_for_learners && done == learner_nodes.len() {
            self.view.say("launcher: every learner node finished");
            return Some(Outcome::Done);
        }
        None
    }

    fn spawn(&mut self, p: &ProcessPlan) -> anyhow::Result<()> {
        let program = self.opts.bin_dir.join(&p.program);
        if !program.is_file() {
            bail!(
                "cannot start {}: {} does not exist; build it (`cargo build --release -p {}`) \
                 or point {BIN_DIR_VAR} at the folder that holds it",
                p.name,
                program.display(),
                p.program
            );
        }
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&p.log)
            .with_context(|| format!("opening {}", p.log.display()))?;
        if p.role == Role::Learner && p.env.get("RANK").map(String::as_str) == Some("0") {
            self.progress = Some(ProgressEcho::new(&p.log));
        }
        let mut words: Vec<String> = p.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        words.push(program.display().to_string());
        words.extend(p.args.iter().cloned());
        writeln!(log, "=== launcher: {} ===", shell_words(&words))
            .with_context(|| format!("writing {}", p.log.display()))?;
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&p.args)
            .envs(&p.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log handle")?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        #[cfg(target_os = "linux")]
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (prctl, getppid).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // The launcher died before prctl: do not outlive it.
                if libc::getppid() == 1 {
                    return Err(io::Error::other("the launcher is gone"));
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", p.name, program.display()))?;
        let pid = child.id().context("the child has no pid")? as i32;
        let index = self.procs.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((index, status));
        });
        eprintln!(
            "launcher: started {} (pid {pid}) on node {}, log {}",
            p.name,
            p.node,
            p.log.display()
        );
        self.procs.push(Proc {
            name: p.name.clone(),
            role: p.role,
            pid,
            log: p.log.clone(),
            status: None,
        });
        self.write_pids();
        Ok(())
    }

    /// `<job dir>/node-<k>.pids.json`: {name: pid}, for operators and tests.
    fn write_pids(&self) {
        let pids: BTreeMap<&str, i32> = self
            .procs
            .iter()
            .map(|p| (p.name.as_str(), p.pid))
            .collect();
        let path = self
            .opts
            .job_dir
            .join(format!("node-{}.pids.json", self.opts.node));
        if let Ok(json) = serde_json::to_string(&pids) {
            let _ = std::fs::write(path, json + "\n");
        }
    }

    /// Waits until every rollout server of the plan (local or on the rollout
    /// node) answers `GET /health` with 200. `Some` when supervision must end.
    async fn wait_for_health(
        &mut self,
        sigint: &mut tokio::signal::unix::Signal,
        sigterm: &mut tokio::signal::unix::Signal,
    ) -> Option<Outcome> {
        let servers: Vec<&ProcessPlan> = self
            .plan
            .processes
            .iter()
            .filter(|p| p.role == Role::RolloutServer)
            .collect();
        if servers.is_empty() {
            return None;
        }
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
        {
            Ok(c) => c,
            Err(e) => return Some(Outcome::Failed(format!("building the HTTP client: {e}"))),
        };
        let learner_nodes = self.plan.learner_nodes();
        let deadline = Instant::now() + self.opts.health_timeout;
        let mut healthy = vec![false; servers.len()];
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                Some((i, status)) = self.rx.recv() => {
                    if let Some(outcome) = self.on_exit(i, status) {
                        return Some(outcome);
                    }
                }
                _ = sigint.recv() => return Some(Outcome::Signalled(libc::SIGINT)),
                _ = sigterm.recv() => return Some(Outcome::Signalled(libc::SIGTERM)),
                _ = tick.tick() => {
                    for (s, ok) in servers.iter().zip(healthy.iter_mut()).filter(|(_, ok)| !**ok) {
                        let Some(url) = &s.health_url else {
                            *ok = true;
                            continue;
                        };
                        if let Ok(resp) = client.get(url).send().await
                            && resp.status() == reqwest::StatusCode::OK
                        {
                            eprintln!("launcher: {} is up ({url})", s.name);
                            *ok = true;
                        }
                    }
                    if healthy.iter().all(|ok| *ok) {
                        return None;
                    }
                    if let Some(outcome) = self.other_nodes(&learner_nodes, false) {
                        return Some(outcome);
                    }
                    if Instant::now() >= deadline {
                        let (s, _) = servers
                            .iter()
                            .zip(&healthy)
                            .find(|(_, ok)| !**ok)?;
                        let here = if s.node == self.opts.node {
                            String::new()
                        } else {
                            format!(" (it runs on node {})", self.plan.nodes[s.node].name)
                        };
                        return Some(Outcome::Failed(format!(
                            "{} did not answer GET {} with 200 within {} s{here}; raise \
                             --health-timeout if the model loads slowly; last lines of {}:\n{}",
                            s.name,
                            s.health_url.as_deref().unwrap_or("/health"),
                            self.opts.health_timeout.as_secs(),
                            s.log.display(),
                            log_tail(&s.log, LOG_TAIL_LINES)
                        )));
                    }
                }
            }
        }
    }

    /// True while some child has not been reaped or its group has members.
    fn anything_left(&self) -> bool {
        self.procs
            .iter()
            .any(|p| p.status.is_none() || signal_group(p.pid, 0))
    }

    /// Collects exits until nothing is left or the deadline passes.
    async fn reap_until(&mut self, deadline: Instant) {
        while self.anything_left() && Instant::now() < deadline {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if let Ok(Some((i, status))) = tokio::time::timeout(wait, self.rx.recv()).await {
                let p = &mut self.procs[i];
                if p.status.is_none() {
                    eprintln!(
                        "launcher: {} (pid {}) stopped: {}",
                        p.name,
                        p.pid,
                        describe_exit(&status)
                    );
                }
                p.status = Some(status);
            }
        }
    }

    /// Sends `sig` to every process group, then SIGKILL after the grace
    /// period, until nothing is left.
    async fn stop_all(&mut self, sig: i32) {
        for p in &self.procs {
            signal_group(p.pid, sig);
        }
        self.reap_until(Instant::now() + self.opts.grace).await;
        if self.anything_left() {
            for p in self
                .procs
                .iter()
                .filter(|p| p.status.is_none() || signal_group(p.pid, 0))
            {
                eprintln!(
                    "launcher: {} (pid {}) still running after {} s, sending SIGKILL",
                    p.name,
                    p.pid,
                    self.opts.grace.as_secs()
                );
                signal_group(p.pid, libc::SIGKILL);
            }
            self.reap_until(Instant::now() + Duration::from_secs(10))
                .await;
        }
        if self.anything_left() {
            eprintln!("launcher: some processes could not be stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(&Ok(ExitStatus::from_raw(3 << 8))),
            "exit status 3"
        );
        assert_eq!(
            describe_exit(&Ok(ExitStatus::from_raw(libc::SIGKILL))),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn progress_lines() {
        assert!(is_progress_line("step 3/40 reward 0.5000 loss 0.1"));
        assert!(is_progress_line("sft 10/300 loss 1.2"));
        assert!(is_progress_line("eval step 0: pass@1 0.120"));
        assert!(!is_progress_line(
            "2025-01-01T00:00:00Z  INFO learner: eval step=0"
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.log");
        let old = "step 1/2 old run\n";
        std::fs::write(&path, old).unwrap();
        let mut echo = ProgressEcho::new(&path);
        assert_eq!(echo.offset, old.len() as u64);
        let mut f = File::options().append(true).open(&path).unwrap();
        let mut view = ProgressView::bar_to(indicatif::ProgressDrawTarget::hidden);
        write!(f, "step 1/2 x\nstep 2/").unwrap();
        echo.poll(&mut view);
        assert_eq!(echo.partial, b"step 2/");
        assert_eq!(
            view.bar_state(),
            Some(("step".into(), 1, Some(2), "x".into()))
        );
        writeln!(f, "2 y").unwrap();
        echo.poll(&mut view);
        assert!(echo.partial.is_empty());
        assert_eq!(
            view.bar_state(),
            Some(("step".into(), 2, Some(2), "y".into()))
        );
    }

    #[test]
    fn tail_of_a_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&path, 2), "b\nc");
        assert!(log_tail(&dir.path().join("missing"), 2).contains("cannot read"));
        // With RUST_BACKTRACE set the error comes before the frames.
        std::fs::write(
            &path,
            "loading\nError: dtype bfloat16 on the CPU\n\nStack backtrace:\n   0: main\n   1: start\n",
        )
        .unwrap();
        assert_eq!(
            log_tail(&path, 2),
            format!(
                "loading\nError: dtype bfloat16 on the CPU\n(backtrace left out: {})",
                path.display()
            )
        );
    }
}
