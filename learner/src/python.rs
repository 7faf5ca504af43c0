//! Python functions the learner runs, as TRL runs its callables:
//! `rollout.tools`' `python` tools, `rollout.environment_factory`'s
//! environments (an instance per completion, leased: [`EnvironmentLease`])
//! and `python` reward functions. A small
//! runner ([`RUNNER`], `python_functions.py`) imports them in `python3`
//! processes of the learner's own: once to check them (and read the tools'
//! definitions), then to serve calls, a JSON line in and one out.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

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
/// JSON line in, one out, matched by request ID): up to `processes` of
/// them (`rollout.python_tool_processes` for the tools). A process runs one
/// call at a time but its `async def` ones ([`PythonCall::concurrent`]),
/// which run at once as tasks of its event loop; a call that is not async
/// takes a process no other such call has, starting one when none is idle.
/// A process is replaced after a call that passed its deadline (an async
/// one is cancelled instead, unless its event loop does not answer) or
/// ended it.
#[derive(Debug)]
pub struct PythonProcesses {
    specs: Vec<String>,
    /// How many may run at once.
    processes: usize,
    /// The next environment's ID ([`Self::reset_environments`]).
    next_environment: AtomicU64,
    /// Environments whose leases ended, given back with the next call.
    released: Arc<Mutex<Vec<u64>>>,
    /// The next call's request ID.
    next_request: AtomicU64,
    /// One slot per process allowed. A call that is not async holds a
    /// permit of `free` while it has a slot (`busy`).
    slots: Mutex<Vec<Slot>>,
    free: tokio::sync::Semaphore,
    /// Spreads async calls over the processes running.
    next_async: AtomicUsize,
}

#[derive(Debug, Default)]
struct Slot {
    /// None: not started, or replaced.
    worker: Option<Arc<PythonWorker>>,
    /// A call that is not async has it.
    busy: bool,
}

#[derive(Debug)]
struct PythonWorker {
    /// Killed when dropped.
    child: Mutex<tokio::process::Child>,
    stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
    /// The calls waiting for their answers (read once, as JSON), by
    /// request ID; dropped (which wakes them) when the process's output
    /// ends.
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    /// Its output ended: the process is gone, or going.
    ended: Arc<AtomicBool>,
}

impl PythonWorker {
    fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Ends the process (a call found it stuck); its calls in flight fail.
    fn kill(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let _ = lock(&self.child).start_kill();
    }

    /// Writes one request line (whole: one writer at a time).
    async fn send(&self, request: &Value) -> std::io::Result<()> {
        let mut stdin = self.stdin.lock().await;
        stdin.write_all(format!("{request}\n").as_bytes()).await?;
        stdin.flush().await
    }

    /// How the process ended, for messages.
    fn status(&self) -> String {
        lock(&self.child)
            .try_wait()
            .ok()
            .flatten()
            .map_or("still running".to_string(), |s| s.to_string())
    }
}

/// How long a cancelled `async def` call has to answer before its process
/// is taken for stuck (a task that blocks the event loop) and replaced.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

impl PythonProcesses {
    pub fn new(specs: Vec<String>, processes: usize) -> PythonProcesses {
        let processes = processes.max(1);
        PythonProcesses {
            specs,
            processes,
            next_environment: AtomicU64::new(0),
            released: Arc::new(Mutex::new(Vec::new())),
            next_request: AtomicU64::new(0),
            slots: Mutex::new((0..processes).map(|_| Slot::default()).collect()),
            free: tokio::sync::Semaphore::new(processes),
            next_async: AtomicUsize::new(0),
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

    /// Starts a process, and the task that hands its answers to their
    /// calls.
    fn start(&self) -> Result<Arc<PythonWorker>, String> {
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
        let worker = Arc::new(PythonWorker {
            child: Mutex::new(child),
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Arc::new(Mutex::new(HashMap::new())),
            ended: Arc::new(AtomicBool::new(false)),
        });
        let (pending, ended) = (worker.pending.clone(), worker.ended.clone());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // (What is not an answer with an ID reaches no call: the
                // runner writes nothing else here.)
                let Ok(answer) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                // A late answer (its call gave up) has nobody waiting.
                let id = answer["id"].as_u64();
                if let Some(waiting) = id.and_then(|id| lock(&pending).remove(&id)) {
                    let _ = waiting.send(answer);
                }
            }
            ended.store(true, Ordering::SeqCst);
            lock(&pending).clear();
        });
        Ok(worker)
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        lock(&self.slots)
    }

    /// A slot for a call that is not async (the caller holds a permit, so
    /// one is free): one whose process runs, else a new process.
    fn take_slot(&self) -> Result<(usize, Arc<PythonWorker>), String> {
        let mut slots = self.slots();
        let running = |s: &Slot| s.worker.as_ref().is_some_and(|w| !w.ended());
        let index = slots
            .iter()
            .position(|s| !s.busy && running(s))
            .or_else(|| slots.iter().position(|s| !s.busy))
            .ok_or("no free Python process (a permit without a slot)")?;
        let slot = &mut slots[index];
        let worker = match slot.worker.as_ref().filter(|w| !w.ended()) {
            Some(w) => w.clone(),
            None => self.start()?,
        };
        slot.worker = Some(worker.clone());
        slot.busy = true;
        Ok((index, worker))
    }

    /// A process for an async call: one that runs (in turn), else a new one.
    fn async_worker(&self) -> Result<Arc<PythonWorker>, String> {
        let mut slots = self.slots();
        let running: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].worker.as_ref().is_some_and(|w| !w.ended()))
            .collect();
        if !running.is_empty() {
            let k = self.next_async.fetch_add(1, Ordering::Relaxed) % running.len();
            if let Some(w) = &slots[running[k]].worker {
                return Ok(w.clone());
            }
        }
        // None runs: a busy slot's process has ended, its call about to
        // give it up; a free slot takes the new one.
        let index = slots.iter().position(|s| !s.busy).unwrap_or(0);
        let worker = self.start()?;
        slots[index].worker = Some(worker.clone());
        Ok(worker)
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
            concurrent: false,
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
        if call.concurrent {
            let worker = self.async_worker()?;
            return self.exchange(&worker, call, timeout, timeout_key).await;
        }
        let _permit = self
            .free
            .acquire()
            .await
            .map_err(|e| format!("the Python functions' processes are closed: {e}"))?;
        let (index, worker) = self.take_slot()?;
        let result = self.exchange(&worker, call, timeout, timeout_key).await;
        let mut slots = self.slots();
        let slot = &mut slots[index];
        slot.busy = false;
        // (Unless an async call has started another there meanwhile.)
        if worker.ended()
            && slot
                .worker
                .as_ref()
                .is_some_and(|w| Arc::ptr_eq(w, &worker))
        {
            slot.worker = None;
        }
        result
    }

    /// One call on `worker`, which is killed when the call passed its
    /// deadline (an async call is cancelled instead, if its process still
    /// answers) and is found ended when the call ended it.
    async fn exchange(
        &self,
        worker: &PythonWorker,
        call: PythonCall,
        timeout: Duration,
        timeout_key: &str,
    ) -> Result<Value, String> {
        let PythonCall {
            mut request,
            shown: name,
            text,
            concurrent,
        } = call;
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        request["id"] = json!(id);
        let released = std::mem::take(&mut *lock(&self.released));
        if !released.is_empty() {
            request["release"] = json!(released);
        }
        let (answered, mut reply) = oneshot::channel();
        lock(&worker.pending).insert(id, answered);
        let ended = || {
            format!(
                "{name}'s Python process ended ({}; its error is in the learner's log)",
                worker.status()
            )
        };
        // Its output ended before the call was listed: nobody would answer.
        if worker.ended() {
            lock(&worker.pending).remove(&id);
            return Err(ended());
        }
        let exchange = async {
            worker.send(&request).await?;
            Ok::<_, std::io::Error>((&mut reply).await.ok())
        };
        let mut answer = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(_) => {
                lock(&worker.pending).remove(&id);
                worker.kill();
                return Err(ended());
            }
            Err(_) => {
                if !(concurrent && cancelled(worker, id, &mut reply).await) {
                    worker.kill();
                }
                lock(&worker.pending).remove(&id);
                return Err(format!(
                    "{name} took more than {timeout_key} ({} s)",
                    timeout.as_secs_f64()
                ));
            }
        };
        match (
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
        }
    }
}

/// Cancels async call `id` on `worker`, whose answer comes to `reply`:
/// whether its process answered (the task was cancelled, or had just
/// finished) within [`CANCEL_GRACE`]; not, when a task blocks its event
/// loop.
async fn cancelled(worker: &PythonWorker, id: u64, reply: &mut oneshot::Receiver<Value>) -> bool {
    let cancel = async {
        worker.send(&json!({"cancel": id})).await?;
        Ok::<_, std::io::Error>(reply.await.is_ok())
    };
    matches!(
        tokio::time::timeout(CANCEL_GRACE, cancel).await,
        Ok(Ok(true))
    )
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
    /// An `async def` function's: it runs beside the process's other calls.
    concurrent: bool,
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
            concurrent: false,
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
            concurrent: false,
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
            concurrent: false,
        }
    }

    /// A reward function's call with TRL's `log_extra` and `log_metric`:
    /// its result is `{"rewards", "extra": {column: values}, "metrics":
    /// {name: [values]}}`.
    pub fn with_logs(mut self) -> PythonCall {
        self.request["logs"] = json!(true);
        self
    }

    /// Marks an `async def` function's call (`async_def`): it runs beside
    /// its process's other calls, as a task of its event loop.
    pub fn concurrent(mut self, async_def: bool) -> PythonCall {
        self.concurrent = async_def;
        self
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
