//! Python functions the learner runs, as TRL runs its callables:
//! `rollout.tools`' `python` tools, `rollout.environment_factory`'s
//! environments (an instance per completion, leased: [`EnvironmentLease`])
//! and `python` reward functions. A small
//! runner ([`RUNNER`], `python_functions.py`) imports them in `python3`
//! processes of the learner's own: once to check them (and read the tools'
//! definitions), then to serve calls, a JSON line in and one out.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The Python side: checks, describes and calls the functions.
pub const RUNNER: &str = include_str!("python_functions.py");

/// How long importing the functions may take (transformers, for
/// `get_json_schema`, can take a while).
const INSPECT_TIMEOUT: Duration = Duration::from_secs(300);

/// The function name of a spec (`path/to/file.py:NAME` or
/// `package.module:NAME`), or why it is not one.
pub fn function_name(spec: &str) -> Result<&str, String> {
    let name = spec
        .rsplit_once(':')
        .filter(|(target, _)| !target.trim().is_empty())
        .map(|(_, f)| f)
        .filter(|f| {
            f.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && f.chars().all(|c| c.is_alphanumeric() || c == '_')
        });
    name.ok_or_else(|| {
        format!("expected path/to/file.py:FUNCTION or package.module:FUNCTION, got {spec:?}")
    })
}

/// Runs the runner's `mode` (`describe`: tool definitions, `load`: an
/// import check) over `specs`: one JSON value per spec, in order, each
/// `{"error": ...}` where that spec failed. An error when python3 cannot
/// run, or takes more than [`INSPECT_TIMEOUT`].
pub fn inspect(mode: &str, specs: &[String]) -> anyhow::Result<Vec<Value>> {
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(RUNNER)
        .arg(mode)
        .args(specs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context(
            "starting python3 for the Python functions (python3 on PATH, in the environment \
             they import from)",
        )?;
    // Drained while it runs, so that a full pipe cannot stall it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > INSPECT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "python3 took more than {} s to import {} (a module that does not finish \
                 importing?)",
                INSPECT_TIMEOUT.as_secs(),
                specs.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    if !status.success() {
        anyhow::bail!(
            "python3 could not import {} ({status}): {}",
            specs.join(", "),
            stderr.trim()
        );
    }
    let answers: Vec<Value> =
        serde_json::from_slice(&stdout).context("python3 answered no JSON list")?;
    anyhow::ensure!(
        answers.len() == specs.len(),
        "python3 answered {} values for {} functions",
        answers.len(),
        specs.len()
    );
    Ok(answers)
}

/// `python3` processes that import Python functions and run their calls (a
/// JSON line in, one out), each one call at a time: up to `processes` at
/// once (`rollout.python_tool_processes` for the tools). A process starts
/// when a call finds none idle, and is replaced after a call that passed its
/// deadline or ended it.
#[derive(Debug)]
pub struct PythonProcesses {
    specs: Vec<String>,
    /// How many may run at once.
    processes: usize,
    /// The next environment's ID ([`Self::reset_environments`]).
    next_environment: AtomicU64,
    /// Environments whose leases ended, given back with the next call.
    released: Arc<Mutex<Vec<u64>>>,
    /// One slot per process allowed: an idle process, or none (not started,
    /// or ended). A call holds a permit of `free` while it has a slot's
    /// process out.
    idle: std::sync::Mutex<Vec<Option<PythonWorker>>>,
    free: tokio::sync::Semaphore,
}

#[derive(Debug)]
struct PythonWorker {
    /// Killed when dropped.
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl PythonProcesses {
    pub fn new(specs: Vec<String>, processes: usize) -> PythonProcesses {
        let processes = processes.max(1);
        PythonProcesses {
            specs,
            processes,
            next_environment: AtomicU64::new(0),
            released: Arc::new(Mutex::new(Vec::new())),
            idle: std::sync::Mutex::new((0..processes).map(|_| None).collect()),
            free: tokio::sync::Semaphore::new(processes),
        }
    }

    /// One process for the functions of both, as TRL calls its tools and
    /// its reward functions in its one process (a tool can leave state that
    /// a reward function reads); none unless each runs one process (with
    /// more, which one would a reward function see?). Neither has started
    /// its process yet when this is built.
    pub fn shared_with(&self, other: &PythonProcesses) -> Option<PythonProcesses> {
        if self.processes != 1 || other.processes != 1 {
            return None;
        }
        let mut specs = self.specs.clone();
        specs.extend(
            other
                .specs
                .iter()
                .filter(|s| !self.specs.contains(s))
                .cloned(),
        );
        Some(PythonProcesses::new(specs, 1))
    }

    fn start(&self) -> Result<PythonWorker, String> {
        let mut child = tokio::process::Command::new("python3")
            .arg("-c")
            .arg(RUNNER)
            .arg("serve")
            .args(&self.specs)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting python3 for the Python functions: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("python3 started without pipes".into());
        };
        Ok(PythonWorker {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Option<PythonWorker>>> {
        lock(&self.idle)
    }

    /// Resets one environment of `factory` (TRL's `environment_factory`,
    /// one of the specs given to [`Self::new`]) per row (`reset(**row)`):
    /// an instance reset before and given back, or a new one. Each comes
    /// with its lease (its instance goes back to the idle ones when the last
    /// clone of it is dropped) and the observation `reset` returned.
    pub async fn reset_environments(
        &self,
        factory: &str,
        rows: Vec<Value>,
        timeout: Duration,
        timeout_key: &str,
    ) -> Result<Vec<(EnvironmentLease, Option<String>)>, String> {
        let leases: Vec<EnvironmentLease> = rows
            .iter()
            .map(|_| EnvironmentLease::new(&self.next_environment, &self.released, factory))
            .collect();
        let items: Vec<Value> = leases
            .iter()
            .zip(rows)
            .map(|(lease, row)| json!({"environment": lease.id(), "row": row}))
            .collect();
        let call = PythonCall {
            request: json!({"reset": items, "factory": factory, "text": false}),
            shown: format!("{}.reset", function_name(factory).unwrap_or(factory)),
            text: false,
        };
        let observations = match self.call(call, timeout, timeout_key).await? {
            Value::Array(observations) if observations.len() == leases.len() => observations,
            other => return Err(format!("reset answered {other}, not one observation each")),
        };
        Ok(leases
            .into_iter()
            .zip(observations)
            .map(|(lease, o)| (lease, o.as_str().map(str::to_string)))
            .collect())
    }

    /// Makes `call`: its result as `str(result)` for a tool's
    /// ([`PythonCall::function`] with `text`, [`PythonCall::method`]), else
    /// as JSON (a reward function's list). A Python exception is
    /// `Err("Type: message")` without `text`, `Err("message")` with it (as
    /// TRL shows a tool's). A call past `timeout` fails naming
    /// `timeout_key`, the recipe key that sets it. Messages name the
    /// function, not its file.
    pub async fn call(
        &self,
        call: PythonCall,
        timeout: Duration,
        timeout_key: &str,
    ) -> Result<Value, String> {
        let _permit = self
            .free
            .acquire()
            .await
            .map_err(|e| format!("the Python functions' processes are closed: {e}"))?;
        // A permit guarantees a slot.
        let slot = self.slots().pop().flatten();
        let worker = match slot {
            Some(w) => Ok(w),
            None => self.start(),
        };
        let (result, worker) = match worker {
            Ok(w) => self.exchange(w, call, timeout, timeout_key).await,
            Err(e) => (Err(e), None),
        };
        self.slots().push(worker);
        result
    }

    /// One call on `worker`; gives it back unless it passed the deadline
    /// (then it is killed) or ended.
    async fn exchange(
        &self,
        mut worker: PythonWorker,
        call: PythonCall,
        timeout: Duration,
        timeout_key: &str,
    ) -> (Result<Value, String>, Option<PythonWorker>) {
        let PythonCall {
            mut request,
            shown: name,
            text,
        } = call;
        let released = std::mem::take(&mut *lock(&self.released));
        if !released.is_empty() {
            request["release"] = json!(released);
        }
        let request = format!("{request}\n");
        let exchange = async {
            worker.stdin.write_all(request.as_bytes()).await?;
            worker.stdin.flush().await?;
            let mut answer = String::new();
            worker.stdout.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answer)) if !answer.is_empty() => answer,
            Err(_) => {
                let e = format!(
                    "{name} took more than {timeout_key} ({} s)",
                    timeout.as_secs_f64()
                );
                return (Err(e), None);
            }
            Ok(_) => {
                let status = worker
                    .child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map_or("still running".to_string(), |s| s.to_string());
                let e = format!(
                    "{name}'s Python process ended ({status}; its error is in the learner's \
                     log)"
                );
                return (Err(e), None);
            }
        };
        let result = match serde_json::from_str::<Value>(&answer) {
            Err(e) => Err(format!("{name} answered no JSON line: {e}")),
            Ok(mut answer) => match (
                answer.get_mut("result").map(Value::take),
                answer.get("error"),
            ) {
                (Some(result), _) => Ok(result),
                (_, Some(e)) => {
                    let message = e.as_str().map_or_else(|| e.to_string(), str::to_string);
                    Err(match answer["type"].as_str() {
                        Some(kind) if !text => format!("{kind}: {message}"),
                        _ => message,
                    })
                }
                _ => Err(format!("{name} answered neither a result nor an error")),
            },
        };
        (result, Some(worker))
    }
}

/// A lock that a panic elsewhere cannot leave poisoned: these lists are
/// never left half-changed.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One call to make in a [`PythonProcesses`] process.
#[derive(Debug, Clone)]
pub struct PythonCall {
    request: Value,
    /// What messages call it.
    shown: String,
    text: bool,
}

impl PythonCall {
    /// The function of `spec` (one of those given to
    /// [`PythonProcesses::new`]) with `args` (an object) as keywords; its
    /// result as text when `text` (a tool's), else JSON.
    pub fn function(spec: &str, args: &Value, text: bool) -> PythonCall {
        PythonCall {
            request: json!({"function": spec, "arguments": args, "text": text}),
            shown: function_name(spec).unwrap_or(spec).to_string(),
            text,
        }
    }

    /// Method `name` of an environment's instance, as a tool: its result as
    /// text.
    pub fn method(environment: &EnvironmentLease, name: &str, args: &Value) -> PythonCall {
        PythonCall {
            request: json!({"method": name, "environment": environment.id(),
                            "arguments": args, "text": true}),
            shown: name.to_string(),
            text: true,
        }
    }

    /// Each instance's `get_reward()` (TRL's environment-owned reward), as
    /// JSON, for the instances of class `class` (none for the others, and
    /// for `None`).
    pub fn environment_rewards(class: &str, environments: &[Option<u64>]) -> PythonCall {
        PythonCall {
            request: json!({"environment_rewards": environments, "class": class, "text": false}),
            shown: format!("{class}.get_reward"),
            text: false,
        }
    }

    /// The instances of `environments` (none: `None`) as the call's
    /// `environments` argument, as TRL hands them to reward functions.
    pub fn with_environments(mut self, environments: &[Option<u64>]) -> PythonCall {
        self.request["environments"] = json!(environments);
        self
    }
}

/// An environment instance in use by a completion, from
/// [`PythonProcesses::reset_environments`]; clones share it, and the last
/// one dropped gives the instance back (with the process's next call).
#[derive(Debug, Clone)]
pub struct EnvironmentLease(Arc<Lease>);

#[derive(Debug)]
struct Lease {
    id: u64,
    released: Arc<Mutex<Vec<u64>>>,
    factory: String,
}

impl EnvironmentLease {
    fn new(next: &AtomicU64, released: &Arc<Mutex<Vec<u64>>>, factory: &str) -> EnvironmentLease {
        EnvironmentLease(Arc::new(Lease {
            id: next.fetch_add(1, Ordering::Relaxed),
            released: released.clone(),
            factory: factory.to_string(),
        }))
    }

    /// The instance's ID in its process.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The spec of the factory that made it.
    pub fn factory(&self) -> &str {
        &self.0.factory
    }
}

impl PartialEq for EnvironmentLease {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.released).push(self.id);
    }
}
