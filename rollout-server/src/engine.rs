//! The engine: tokens in, tokens out. It runs on its own OS thread, owns the
//! model and the KV cache, and is reached only through [`EngineHandle`] over
//! one channel: generation requests (each with the sender of its events) and
//! weight swaps arrive there, so a swap can only happen between two steps of
//! the scheduler. Async code never waits on model work except by awaiting
//! those events.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use model::sampling::{LogprobsMode, SampledToken, SamplingParams};
use model::{CausalLM, KvCache, ModelConfig, Weights};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};

use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::weight_sync::{TensorSpec, WeightSink};

/// How the engine is sized and seeded.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Longest sequence (prompt + completion) a request may reach.
    pub max_model_len: usize,
    /// Sequences decoded together at most (and KV-cache slots).
    pub max_num_seqs: usize,
    /// Requests (prompts) waiting for admission at most.
    pub max_queue: usize,
    /// Padded prompt tokens prefilled in one step at most (one prompt always
    /// fits, whatever its length).
    pub max_prefill_tokens: usize,
    /// Seeds the per-request seeds of requests that bring none.
    pub seed: u64,
    pub logprobs_mode: LogprobsMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_model_len: 1024,
            max_num_seqs: 128,
            max_queue: 1024,
            max_prefill_tokens: 8192,
            seed: 0,
            logprobs_mode: LogprobsMode::RawLogprobs,
        }
    }
}

/// One prompt and how to sample its `n` completions, already validated:
/// the engine trusts every field.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub n: usize,
    /// `params.logprobs` is the number of top log-probs per token.
    pub params: SamplingParams,
    /// Sample `j` is seeded with `seed + j` (the server picks one when `None`).
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// EOS and `stop_token_ids` cannot be sampled before this many tokens.
    pub min_tokens: usize,
    /// Guided decoding: only tokens on the way to a match are sampled.
    pub guide: Option<std::sync::Arc<model::guided::RegexGuide>>,
    /// The guide applies from the token after the output writes this (a
    /// reasoning model's `</think>`); none: from the first token.
    pub guide_after: Option<String>,
    /// Log-probs of the prompt tokens with this many top entries (vLLM's
    /// `prompt_logprobs`, or `echo` with `logprobs`).
    pub prompt_logprobs: Option<usize>,
}

/// Why a sequence ended, as the engine sees it (stop strings are the text
/// layer's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` or the context length.
    Length,
    /// An end-of-sequence token.
    Eos,
    /// One of the request's `stop_token_ids`.
    StopToken(u32),
}

/// Log-prob of one prompt token with its top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub logprob: f32,
    /// 1 + the number of tokens strictly more likely (vLLM's rank).
    pub rank: usize,
    /// The most likely tokens, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What a [`GenerationStream`] yields.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Once, before any token, when `prompt_logprobs` was asked: one entry
    /// per prompt token, `None` for the first.
    PromptLogprobs(Vec<Option<PromptLogprob>>),
    /// A sampled token of sample `sample`; `finish` is set on its last one.
    Token {
        sample: usize,
        token: SampledToken,
        weight_version: u64,
        finish: Option<Finish>,
    },
    /// The request failed inside the engine; no more events follow.
    Error(String),
}

/// Per-sample cancellation, shared by the engine and the stream's owner.
#[derive(Debug, Clone)]
pub struct CancelFlags(Arc<[AtomicBool]>);

impl CancelFlags {
    fn new(n: usize) -> Self {
        CancelFlags((0..n).map(|_| AtomicBool::new(false)).collect())
    }

    /// Asks the engine to stop sample `j` (e.g. a stop string was seen).
    pub fn cancel(&self, j: usize) {
        if let Some(f) = self.0.get(j) {
            f.store(true, Ordering::Relaxed);
        }
    }

    pub fn is_cancelled(&self, j: usize) -> bool {
        self.0.get(j).is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// The events of one submitted prompt. Dropping it cancels its samples.
pub struct GenerationStream {
    pub events: mpsc::UnboundedReceiver<EngineEvent>,
    pub cancel: CancelFlags,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the server is overloaded: {max_queue} requests are already waiting (--max-queue); retry later"
    )]
    QueueFull { max_queue: usize },
    #[error("the engine has stopped; restart the server")]
    Dead,
    #[error("{0}")]
    Model(#[from] model::ModelError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// One prompt as the scheduler receives it.
pub(crate) struct Submission {
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub cancel: CancelFlags,
    pub arrived: Instant,
    /// Held while the prompt waits; dropped when it is admitted.
    pub permit: OwnedSemaphorePermit,
}

pub(crate) struct WeightSwap {
    pub tensors: Vec<(String, Tensor)>,
    pub version: u64,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub(crate) enum Command {
    Generate(Box<Submission>),
    Swap(WeightSwap),
}

/// The async side's handle on the engine thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    queue: Arc<Semaphore>,
    max_queue: usize,
    alive: Arc<AtomicBool>,
    version: Arc<AtomicU64>,
    spec: Arc<BTreeMap<String, TensorSpec>>,
    config: ModelConfig,
    device: Device,
}

impl EngineHandle {
    /// Queues prompts as one unit: all are accepted, or none and
    /// [`EngineError::QueueFull`] at once (never waits for room).
    pub fn submit(
        &self,
        requests: Vec<GenerateRequest>,
    ) -> Result<Vec<GenerationStream>, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Dead);
        }
        let k = u32::try_from(requests.len()).map_err(|_| EngineError::QueueFull {
            max_queue: self.max_queue,
        })?;
        let mut permits = match self.queue.clone().try_acquire_many_owned(k) {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                return Err(EngineError::QueueFull {
                    max_queue: self.max_queue,
                });
            }
            Err(TryAcquireError::Closed) => return Err(EngineError::Dead),
        };
        let now = Instant::now();
        let mut streams = Vec::with_capacity(requests.len());
        for request in requests {
            // One permit per prompt, released when the prompt is admitted.
            let permit = permits.split(1).ok_or(EngineError::Dead)?;
            let (events, rx) = mpsc::unbounded_channel();
            let cancel = CancelFlags::new(request.n);
            let submission = Submission {
                request,
                events,
                cancel: cancel.clone(),
                arrived: now,
                permit,
            };
            self.tx
                .send(Command::Generate(Box::new(submission)))
                .map_err(|_| EngineError::Dead)?;
            streams.push(GenerationStream { events: rx, cancel });
        }
        Ok(streams)
    }

    /// Swaps in new values for some or all tensors (Hugging Face names) and
    /// sets the weight version, between two decode steps. On error the old
    /// weights and version stay.
    pub async fn swap_weights(
        &self,
        tensors: Vec<(String, Tensor)>,
        version: u64,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Swap(WeightSwap {
                tensors,
                version,
                reply,
            }))
            .map_err(|_| EngineError::Dead.to_string())?;
        rx.await.map_err(|_| EngineError::Dead.to_string())?
    }

    /// The weight version being served.
    pub fn weight_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Every served tensor by Hugging Face name.
    pub fn weight_spec(&self) -> &BTreeMap<String, TensorSpec> {
        &self.spec
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    /// False once the engine thread has stopped (panicked or shut down).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.tx.is_closed()
    }
}

/// The weight-sync service pushes into the engine through its handle.
#[tonic::async_trait]
impl WeightSink for EngineHandle {
    fn spec(&self) -> &BTreeMap<String, TensorSpec> {
        &self.spec
    }

    fn version(&self) -> u64 {
        self.weight_version()
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    async fn apply(&self, tensors: Vec<(String, Tensor)>, version: u64) -> Result<(), String> {
        self.swap_weights(tensors, version).await
    }
}

/// Sets `alive` to false when the engine thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What the engine thread owns.
pub(crate) struct EngineState {
    pub cfg: ModelConfig,
    pub lm: CausalLM,
    pub weights: Weights,
    pub cache: KvCache,
    pub version: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
}

/// Loads a Hugging Face model folder onto `device` in `dtype` and starts the
/// engine thread on it.
pub fn start_from_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle, EngineError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let weights = Weights::load(dir, device, dtype)?;
    start(cfg, weights, config, metrics)
}

/// Starts the engine thread on `weights`.
pub fn start(
    cfg: ModelConfig,
    weights: Weights,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle, EngineError> {
    if config.max_num_seqs == 0 || config.max_queue == 0 || config.max_model_len == 0 {
        return Err(EngineError::Invalid(
            "max_num_seqs, max_queue and max_model_len must be at least 1".into(),
        ));
    }
    if config.max_model_len > cfg.max_position_embeddings {
        return Err(EngineError::Invalid(format!(
            "max_model_len {} exceeds the model's max_position_embeddings ({})",
            config.max_model_len, cfg.max_position_embeddings
        )));
    }
    let lm = CausalLM::new(&cfg, &weights)?;
    let cache = KvCache::new(
        &cfg,
        config.max_num_seqs,
        config.max_model_len,
        lm.device(),
        lm.dtype(),
    )?;
    let spec: BTreeMap<String, TensorSpec> = weights
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                TensorSpec {
                    dtype: t.dtype(),
                    shape: t.dims().to_vec(),
                },
            )
        })
        .collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let alive = Arc::new(AtomicBool::new(true));
    let version = Arc::new(AtomicU64::new(0));
    let handle = EngineHandle {
        tx,
        queue: Arc::new(Semaphore::new(config.max_queue)),
        max_queue: config.max_queue,
        alive: alive.clone(),
        version: version.clone(),
        spec: Arc::new(spec),
        config: cfg.clone(),
        device: lm.device().clone(),
    };
    let state = EngineState {
        cfg,
        lm,
        weights,
        cache,
        version,
        metrics,
    };
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(state, config, rx, alive))
        .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
    Ok(handle)
}

/// The engine loop: take commands (blocking only when there is nothing to
/// run), apply weight swaps, run one scheduler step. Ends when every handle
/// is gone.
fn run(
    mut state: EngineState,
    config: EngineConfig,
    mut rx: mpsc::UnboundedReceiver<Command>,
    alive: Arc<AtomicBool>,
) {
    let mut scheduler = Scheduler::new(config, &state.cfg);
    // Declared after the scheduler, so dropped before it: `alive` is false
    // before the requests' streams close, and a client that sees its
    // request fail then finds /health at 503.
    let _alive = AliveGuard(alive);
    // Fault injection for the tests, in debug builds only: the engine thread
    // panics at its Nth scheduler step, as a bug would, so that what the
    // server then does (in-flight requests fail, /health says 503, new
    // requests get 503) is tested on the real binary.
    #[cfg(debug_assertions)]
    let panic_at_step = std::env::var("TANDEM_FAULT_ENGINE_PANIC_AT_STEP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    #[cfg(debug_assertions)]
    let mut steps = 0u64;
    loop {
        if scheduler.is_idle() {
            match rx.blocking_recv() {
                Some(cmd) => handle_command(&mut state, &mut scheduler, cmd),
                None => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => handle_command(&mut state, &mut scheduler, cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if scheduler.is_idle() {
                        return;
                    }
                    break;
                }
            }
        }
        scheduler.step(&mut state);
        #[cfg(debug_assertions)]
        {
            steps += 1;
            if panic_at_step == Some(steps) {
                panic!("TANDEM_FAULT_ENGINE_PANIC_AT_STEP: engine panics at step {steps}");
            }
        }
    }
    tracing::info!("engine stopped");
}

fn handle_command(state: &mut EngineState, scheduler: &mut Scheduler, cmd: Command) {
    match cmd {
        Command::Generate(sub) => scheduler.enqueue(*sub, &state.metrics),
        Command::Swap(swap) => {
            let result = apply_swap(state, swap.tensors, swap.version);
            match &result {
                Ok(()) => tracing::info!(version = swap.version, "weights swapped in"),
                Err(e) => tracing::warn!(version = swap.version, "weight swap refused: {e}"),
            }
            let _ = swap.reply.send(result);
        }
    }
}

/// Builds the new weights (current ones with `tensors` replaced) and the
/// model on them; only when both succeed are they swapped in.
fn apply_swap(
    state: &mut EngineState,
    tensors: Vec<(String, Tensor)>,
    version: u64,
) -> Result<(), String> {
    let mut weights = state.weights.clone();
    let device = state.lm.device().clone();
    let dtype = state.lm.dtype();
    for (name, t) in tensors {
        let old = weights
            .get(&name)
            .ok_or_else(|| format!("unknown tensor `{name}`"))?;
        if old.dims() != t.dims() {
            return Err(format!(
                "tensor `{name}` has shape {:?}, the served model has {:?}",
                t.dims(),
                old.dims()
            ));
        }
        let t = t
            .to_device(&device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        weights.insert(name, t);
    }
    let lm = CausalLM::new(&state.cfg, &weights).map_err(|e| e.to_string())?;
    state.lm = lm;
    state.weights = weights;
    state.version.store(version, Ordering::SeqCst);
    state.metrics.weight_version.set(version as i64);
    Ok(())
}
