//! The gRPC `WeightSync` service: receives a learner's push of new weights,
//! verifies it whole, and hands it to the engine, which swaps it in between
//! decode steps.
//!
//! A push (`proto/weight_sync.proto`) is refused, with nothing applied and the
//! old version kept, when:
//! - a tensor name is not in the model: INVALID_ARGUMENT naming it;
//! - a shape differs from the model's, a dtype is not one of `F32`, `BF16`,
//!   `F16`, or a tensor's chunks disagree on them: INVALID_ARGUMENT naming the
//!   tensor, what was expected and what came;
//! - chunks overlap, run past a tensor's end, or leave a gap; the commit's
//!   tensor or byte count is off: INVALID_ARGUMENT;
//! - the push would hold more than `max_push_bytes`: RESOURCE_EXHAUSTED;
//! - the checksum (xxh3-64 of every chunk payload in stream order) differs:
//!   DATA_LOSS;
//! - the commit's version is not greater than the current one:
//!   FAILED_PRECONDITION;
//! - the stream ends, breaks or stalls (no message for `idle_timeout`) before
//!   its commit: ABORTED;
//! - another push is in progress: UNAVAILABLE at once (pushes are serialized;
//!   a second one does not queue, so a stuck push cannot pile others up behind
//!   it: the caller retries);
//! - with a token, a call without `authorization: Bearer TOKEN`:
//!   UNAUTHENTICATED (GetVersion too).
//!
//! Dtypes: a tensor may arrive in any of `F32`, `BF16`, `F16` whatever the
//! model holds; the service converts it explicitly to the model's dtype
//! (`BF16`/`F16` -> `F32` is exact; `F32` -> `BF16`/`F16` rounds to nearest).
//! Pushing in the model's dtype (`GetVersion` says which) skips the conversion.
//!
//! The seam to the engine is [`WeightSink`]; [`serve`] runs the service on a
//! bound listener until a shutdown future resolves.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use proto::weight_sync::{
    CONNECTION_WINDOW_BYTES, Checksum, Commit, GetVersionRequest, MAX_MESSAGE_BYTES, PushResult,
    STREAM_WINDOW_BYTES, TensorChunk, VersionInfo, WeightChunk, WeightSync, WeightSyncServer,
    WireDType, tensor_byte_len, weight_chunk,
};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// One tensor the model holds: its shape and dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// What the weight-sync service needs from the engine.
#[tonic::async_trait]
pub trait WeightSink: Send + Sync + 'static {
    /// Every tensor the model has, by Hugging Face name.
    fn spec(&self) -> &BTreeMap<String, TensorSpec>;
    /// The weight version generating now.
    fn version(&self) -> u64;
    /// The device the model lives on: pushed tensors are built there.
    fn device(&self) -> Device {
        Device::Cpu
    }
    /// Swap in these tensors (a subset is allowed; the rest keep their values)
    /// atomically between decode steps and set the version. Called only with
    /// verified, complete tensors of the spec's shapes and dtypes, on
    /// [`WeightSink::device`], one push at a time.
    async fn apply(&self, tensors: Vec<(String, Tensor)>, version: u64) -> Result<(), String>;
}

/// How the service runs; `Default` is no token, no model name, a push limit
/// of 1.1 x the model in `F32`, and a 60 s idle timeout.
#[derive(Clone)]
pub struct WeightSyncConfig {
    /// With a token, every call must carry `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Reported by `GetVersion`.
    pub model_name: String,
    /// Most payload bytes one push may hold in memory. `None`: 1.1 x the
    /// model's size in `F32`, the widest wire dtype.
    pub max_push_bytes: Option<u64>,
    /// Longest wait for the next message of a push before it is aborted.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for WeightSyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSyncConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("model_name", &self.model_name)
            .field("max_push_bytes", &self.max_push_bytes)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl Default for WeightSyncConfig {
    fn default() -> Self {
        Self {
            token: None,
            model_name: String::new(),
            max_push_bytes: None,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Runs the `WeightSync` service on `listener` until `shutdown` resolves,
/// with a bearer `token` if given and the other settings at their defaults.
pub async fn serve(
    listener: TcpListener,
    sink: Arc<dyn WeightSink>,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let config = WeightSyncConfig {
        token,
        ..WeightSyncConfig::default()
    };
    serve_with(listener, sink, config, shutdown).await
}

/// [`serve`] with every setting.
pub async fn serve_with(
    listener: TcpListener,
    sink: Arc<dyn WeightSink>,
    config: WeightSyncConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, auth = config.token.is_some(), "weight sync listening (gRPC)");
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(WeightSyncService::new(sink, config).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The service itself, for callers that mount it on their own tonic server.
pub struct WeightSyncService {
    sink: Arc<dyn WeightSink>,
    config: WeightSyncConfig,
    max_push_bytes: u64,
    push_lock: Arc<Mutex<()>>,
}

impl WeightSyncService {
    pub fn new(sink: Arc<dyn WeightSink>, config: WeightSyncConfig) -> Self {
        let f32_bytes: u64 = sink
            .spec()
            .values()
            .map(|s| s.shape.iter().product::<usize>() as u64 * 4)
            .sum();
        let max_push_bytes = config
            .max_push_bytes
            .unwrap_or_else(|| f32_bytes + f32_bytes / 10);
        Self {
            sink,
            config,
            max_push_bytes,
            push_lock: Arc::new(Mutex::new(())),
        }
    }

    /// The tonic server: 64 MiB messages and the bearer-token check.
    pub fn into_server(self) -> InterceptedService<WeightSyncServer<Self>, BearerAuth> {
        let auth = BearerAuth {
            token: self.config.token.clone().map(Arc::from),
        };
        let server = WeightSyncServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, auth)
    }

    /// Reads a push to its commit and verifies it.
    async fn receive(&self, mut stream: Streaming<WeightChunk>) -> Result<VerifiedPush, Status> {
        let mut push = Push::new(self.sink.spec(), self.max_push_bytes);
        loop {
            let message =
                match tokio::time::timeout(self.config.idle_timeout, stream.message()).await {
                    Err(_) => {
                        return Err(Status::aborted(format!(
                            "push stalled: no message for {:?}; nothing applied",
                            self.config.idle_timeout
                        )));
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                        return Err(status);
                    }
                    Ok(Err(status)) => {
                        return Err(Status::aborted(format!(
                            "push stream broken before its commit ({}); nothing applied",
                            status.message()
                        )));
                    }
                    Ok(Ok(None)) => {
                        return Err(Status::aborted(
                            "push stream ended without a commit; nothing applied",
                        ));
                    }
                    Ok(Ok(Some(message))) => message,
                };
            match message.kind {
                Some(weight_chunk::Kind::Tensor(chunk)) => push.add(chunk)?,
                Some(weight_chunk::Kind::Commit(commit)) => {
                    return push.finish(&commit, self.sink.version());
                }
                None => {
                    return Err(Status::invalid_argument(
                        "a WeightChunk with neither a tensor chunk nor a commit",
                    ));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl WeightSync for WeightSyncService {
    async fn push_weights(
        &self,
        request: Request<Streaming<WeightChunk>>,
    ) -> Result<Response<PushResult>, Status> {
        let guard: OwnedMutexGuard<()> = self.push_lock.clone().try_lock_owned().map_err(|_| {
            Status::unavailable("another weight push is in progress; retry when it has finished")
        })?;
        let start = Instant::now();
        let push = match self.receive(request.into_inner()).await {
            Ok(push) => push,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "weight push refused");
                return Err(status);
            }
        };
        let received = start.elapsed();
        let (version, count, bytes) = (push.version, push.tensors.len() as u64, push.bytes);
        // Converting and applying run to the end in their own task (holding the
        // push lock), even if the caller goes away meanwhile: the engine never
        // sees half a push.
        let sink = self.sink.clone();
        let task = tokio::spawn(async move {
            let _guard = guard;
            let device = sink.device();
            let tensors = tokio::task::spawn_blocking(move || push.into_tensors(&device))
                .await
                .map_err(|e| Status::internal(format!("building the pushed tensors: {e}")))??;
            sink.apply(tensors, version)
                .await
                .map_err(|e| Status::internal(format!("the engine could not apply the push: {e}")))
        });
        task.await
            .map_err(|e| Status::internal(format!("applying the push: {e}")))??;
        let secs = start.elapsed().as_secs_f64();
        tracing::info!(
            version,
            tensors = count,
            bytes,
            receive_s = received.as_secs_f64(),
            total_s = secs,
            mb_per_s = bytes as f64 / 1e6 / secs.max(1e-9),
            "weights updated"
        );
        Ok(Response::new(PushResult {
            version,
            tensors_updated: count,
            bytes,
        }))
    }

    async fn get_version(
        &self,
        _request: Request<GetVersionRequest>,
    ) -> Result<Response<VersionInfo>, Status> {
        let spec = self.sink.spec();
        let model_bytes = spec
            .values()
            .map(|s| (s.shape.iter().product::<usize>() * s.dtype.size_in_bytes()) as u64)
            .sum();
        let mut dtypes = spec.values().map(|s| s.dtype);
        let first = dtypes.next();
        let dtype = match first {
            Some(d) if dtypes.all(|o| o == d) => {
                WireDType::try_from(d).map_or("other", WireDType::as_str)
            }
            Some(_) => "mixed",
            None => "",
        };
        Ok(Response::new(VersionInfo {
            version: self.sink.version(),
            model: self.config.model_name.clone(),
            num_tensors: spec.len() as u64,
            model_bytes,
            dtype: dtype.to_string(),
        }))
    }
}

/// Checks `authorization: Bearer TOKEN` on every call when a token is set.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let Some(value) = request.metadata().get(proto::weight_sync::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer TOKEN`: this server requires the --weight-sync-token",
            ));
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid weight-sync token"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Disjoint received byte ranges one tensor may have before it is refused
/// (chunks sent in order always make one range).
const MAX_RANGES_PER_TENSOR: usize = 1 << 16;

/// One tensor of a push being received.
struct Incoming {
    wire: WireDType,
    shape: Vec<u64>,
    model_dtype: DType,
    bytes: Vec<u8>,
    received: u64,
    /// Received byte ranges, start -> end, adjacent ones merged.
    ranges: BTreeMap<u64, u64>,
}

impl Incoming {
    /// The first byte not yet received, if any.
    fn first_gap(&self) -> Option<u64> {
        let mut at = 0;
        for (&start, &end) in &self.ranges {
            if start > at {
                return Some(at);
            }
            at = end;
        }
        (at < self.bytes.len() as u64).then_some(at)
    }
}

/// A push being received: chunks checked one by one against the model.
struct Push<'a> {
    spec: &'a BTreeMap<String, TensorSpec>,
    tensors: BTreeMap<String, Incoming>,
    checksum: Checksum,
    bytes: u64,
    allocated: u64,
    max_bytes: u64,
}

/// A push that arrived whole and verified.
struct VerifiedPush {
    version: u64,
    bytes: u64,
    tensors: BTreeMap<String, Incoming>,
}

impl<'a> Push<'a> {
    fn new(spec: &'a BTreeMap<String, TensorSpec>, max_bytes: u64) -> Self {
        Self {
            spec,
            tensors: BTreeMap::new(),
            checksum: Checksum::new(),
            bytes: 0,
            allocated: 0,
            max_bytes,
        }
    }

    fn add(&mut self, chunk: TensorChunk) -> Result<(), Status> {
        let TensorChunk {
            name,
            dtype,
            shape,
            offset,
            data,
        } = chunk;
        if !self.tensors.contains_key(&name) {
            let incoming = self.start_tensor(&name, &dtype, &shape)?;
            self.tensors.insert(name.clone(), incoming);
        }
        let Some(tensor) = self.tensors.get_mut(&name) else {
            return Err(Status::internal(format!("tensor {name}: lost its buffer")));
        };
        if tensor.wire.as_str() != dtype || tensor.shape != shape {
            return Err(Status::invalid_argument(format!(
                "tensor {name}: a chunk says dtype {dtype} shape {shape:?}, an earlier one {} {:?}",
                tensor.wire, tensor.shape
            )));
        }
        let len = data.len() as u64;
        let size = tensor.bytes.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "tensor {name}: chunk at byte offset {offset} with {len} bytes runs past the \
                 tensor's end ({size} bytes)"
                ))
            })?;
        if len > 0 {
            let overlap = || {
                Status::invalid_argument(format!(
                    "tensor {name}: chunk at bytes {offset}..{end} overlaps bytes already received"
                ))
            };
            let (mut start, mut stop) = (offset, end);
            if let Some((&s, &e)) = tensor.ranges.range(..=offset).next_back() {
                if e > offset {
                    return Err(overlap());
                }
                if e == offset {
                    start = s;
                    tensor.ranges.remove(&s);
                }
            }
            if let Some((&s, &e)) = tensor.ranges.range(offset..).next() {
                if s < end {
                    return Err(overlap());
                }
                if s == end {
                    stop = e;
                    tensor.ranges.remove(&s);
                }
            }
            tensor.ranges.insert(start, stop);
            if tensor.ranges.len() > MAX_RANGES_PER_TENSOR {
                return Err(Status::invalid_argument(format!(
                    "tensor {name}: more than {MAX_RANGES_PER_TENSOR} disjoint chunks pending; \
                     send a tensor's chunks in order"
                )));
            }
            // In range: `end <= size` was checked above.
            tensor.bytes[offset as usize..end as usize].copy_from_slice(&data);
            tensor.received += len;
        }
        self.checksum.update(&data);
        self.bytes += len;
        Ok(())
    }

    /// Checks a tensor's first chunk header against the model and allocates
    /// its buffer.
    fn start_tensor(&mut self, name: &str, dtype: &str, shape: &[u64]) -> Result<Incoming, Status> {
        let Some(spec) = self.spec.get(name) else {
            return Err(Status::invalid_argument(format!(
                "unknown tensor {name:?}: the model has no tensor of that name ({} tensors, \
                 Hugging Face names such as {:?})",
                self.spec.len(),
                self.spec.keys().next().map_or("", String::as_str)
            )));
        };
        let Ok(model_wire) = WireDType::try_from(spec.dtype) else {
            return Err(Status::failed_precondition(format!(
                "tensor {name}: the model holds it in {:?}, which weight sync cannot write",
                spec.dtype
            )));
        };
        let wire: WireDType = dtype.parse().map_err(|e: String| {
            Status::invalid_argument(format!(
                "tensor {name}: dtype mismatch: expected {model_wire} (or F32, BF16, F16, \
                 converted), got {dtype:?} ({e})"
            ))
        })?;
        let expected: Vec<u64> = spec.shape.iter().map(|&d| d as u64).collect();
        if shape != expected.as_slice() {
            return Err(Status::invalid_argument(format!(
                "tensor {name}: shape mismatch: expected {expected:?}, got {shape:?}"
            )));
        }
        let size = tensor_byte_len(shape, wire)
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("tensor {name}: shape {shape:?} is too large"))
            })?;
        if self.allocated.saturating_add(size) > self.max_bytes {
            return Err(Status::resource_exhausted(format!(
                "tensor {name}: the push would hold more than its limit of {} bytes",
                self.max_bytes
            )));
        }
        self.allocated += size;
        Ok(Incoming {
            wire,
            shape: shape.to_vec(),
            model_dtype: spec.dtype,
            bytes: vec![0; size as usize],
            received: 0,
            ranges: BTreeMap::new(),
        })
    }

    /// Verifies the push against its commit.
    fn finish(self, commit: &Commit, current_version: u64) -> Result<VerifiedPush, Status> {
        for (name, tensor) in &self.tensors {
            if tensor.received != tensor.bytes.len() as u64 {
                return Err(Status::invalid_argument(format!(
                    "tensor {name} is incomplete: received {} of {} bytes (first missing byte at \
                     offset {})",
                    tensor.received,
                    tensor.bytes.len(),
                    tensor.first_gap().unwrap_or(tensor.received)
                )));
            }
        }
        if commit.num_tensors != self.tensors.len() as u64 || commit.total_bytes != self.bytes {
            return Err(Status::invalid_argument(format!(
                "the commit announces {} tensors and {} bytes, but {} tensors and {} bytes came",
                commit.num_tensors,
                commit.total_bytes,
                self.tensors.len(),
                self.bytes
            )));
        }
        let digest = self.checksum.digest();
        if digest != commit.checksum {
            return Err(Status::data_loss(format!(
                "checksum mismatch: the commit says {:016x}, the received bytes hash to {digest:016x} \
                 (xxh3-64 of all chunk payloads in stream order); nothing applied",
                commit.checksum
            )));
        }
        if commit.version <= current_version {
            return Err(Status::failed_precondition(format!(
                "version {} is not newer than the current version {current_version}; nothing applied",
                commit.version
            )));
        }
        Ok(VerifiedPush {
            version: commit.version,
            bytes: self.bytes,
            tensors: self.tensors,
        })
    }
}

impl VerifiedPush {
    /// The received bytes as tensors of the model's dtype on `device`, each
    /// buffer freed as soon as its tensor is built.
    fn into_tensors(self, device: &Device) -> Result<Vec<(String, Tensor)>, Status> {
        let mut out = Vec::with_capacity(self.tensors.len());
        for (name, incoming) in self.tensors {
            let build = || -> candle_core::Result<Tensor> {
                let shape: Vec<usize> = incoming.shape.iter().map(|&d| d as usize).collect();
                let wire = DType::from(incoming.wire);
                // Straight from the received bytes into the device's memory
                // (one host-to-device copy on CUDA); a dtype change, if the
                // learner's differs, happens there too.
                let t = Tensor::from_raw_buffer(&incoming.bytes, wire, &shape, device)?;
                if wire != incoming.model_dtype {
                    t.to_dtype(incoming.model_dtype)
                } else {
                    Ok(t)
                }
            };
            let tensor = build()
                .map_err(|e| Status::internal(format!("tensor {name}: building it failed: {e}")))?;
            out.push((name, tensor));
        }
        Ok(out)
    }
}
