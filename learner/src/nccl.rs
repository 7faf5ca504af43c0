//! The NCCL backend of [`Collective`] (feature `cuda`): gradients are summed
//! on the GPU, bucket by bucket, with one NCCL all-reduce per bucket.
//!
//! Rendezvous: rank 0 creates the NCCL unique id and hands it to the other
//! ranks over the TCP rendezvous of [`TcpRing`] (torchrun's variables); every
//! rank then joins the communicator with `ncclCommInitRank` and runs one
//! barrier, so that [`Nccl::connect`] returns only once NCCL works between all
//! ranks.
//!
//! NCCL calls go on candle's own stream, so the gradients candle computed are
//! ordered before the all-reduce and later candle ops after it. Candle's
//! default CUDA device uses the per-thread default stream: call the
//! collective from the thread that ran the candle ops (as the training loop
//! does).
//!
//! Nothing waits forever. Each operation is enqueued, then an event is
//! polled (never a blocking synchronize) while a watchdog checks
//! `ncclCommGetAsyncError`; an asynchronous NCCL error, or no progress for
//! the configured timeout, aborts the communicator (`ncclCommAbort`, which
//! also releases kernels stuck on a dead peer) and returns
//! [`CollectiveError::Nccl`], naming this rank, the operation and what
//! happened; every later call fails with [`CollectiveError::Broken`].
//!
//! What is not watched: NCCL connects peers lazily on the first collective
//! that needs them (`NCCL_RUNTIME_CONNECT`, default on), and in NCCL's
//! blocking mode that enqueue call waits for the peers itself. The barrier in
//! [`Nccl::connect`] makes the first connections under the rendezvous
//! timeout; `NCCL_RUNTIME_CONNECT=0` in the ranks' environment makes NCCL
//! connect everything during `ncclCommInitRank`, which is watched: the
//! launcher sets it for every CUDA learner.

use std::ffi::{CStr, c_char, c_void};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::cudarc;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nccl::{NcclType, result as nccl, sys};

use crate::collective::{Collective, CollectiveError, Result, TcpRing, TcpRingConfig};

/// First pause between two polls of a pending operation: small collectives
/// finish in tens of microseconds.
const POLL_MIN: Duration = Duration::from_micros(50);
/// Longest pause between two polls (the pause doubles while nothing completes).
const POLL_MAX: Duration = Duration::from_millis(5);
/// Size of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
const UNIQUE_ID_BYTES: usize = 128;

/// Collectives between learner ranks through NCCL, on one CUDA device per rank.
pub struct Nccl {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// The device the communicator was created for; every tensor must live there.
    device: Device,
    cuda: CudaDevice,
    /// Candle's stream on `cuda`: all NCCL work goes here.
    stream: Arc<CudaStream>,
    state: Mutex<State>,
}

struct State {
    /// `None` once aborted.
    comm: Option<RawComm>,
    /// The first error, once the communicator is broken.
    broken: Option<String>,
    /// Number of the next operation (for messages).
    seq: u64,
}

/// An NCCL communicator, owned: dropping it aborts it.
///
/// The safe `cudarc::nccl::Comm` keeps its handle private (the watchdog needs
/// it for `ncclCommGetAsyncError` and `ncclCommAbort`) and panics in `Drop`
/// when the abort fails.
struct RawComm {
    comm: sys::ncclComm_t,
    ctx: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on
// it do not overlap. It is created on the init thread and then moved (never
// shared) to its `Nccl`, where every use, including the abort in `Drop`, runs
// under `Nccl::state`'s mutex.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // Abort, never destroy: `ncclCommDestroy` finalizes, which may wait on
        // peers that are gone; abort only frees this rank's side. Nothing is
        // in flight here (every operation waits for its completion), except
        // after a watchdog error, where aborting is the point.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` came from a successful `ncclCommInitRank` and is
        // aborted exactly once (here); nothing uses it afterwards.
        let _ = unsafe { nccl::comm_abort(self.comm) };
    }
}

impl Nccl {
    /// Joins the NCCL communicator of `config`'s ranks on `device` (which
    /// must be a CUDA device). With more than one rank, the NCCL unique id
    /// travels over [`TcpRing`]'s rendezvous at `MASTER_ADDR:MASTER_PORT`.
    /// Every wait is bounded by `config.rendezvous_timeout`; the operations
    /// later wait at most `config.timeout` without progress.
    pub fn connect(config: &TcpRingConfig, device: &Device) -> Result<Nccl> {
        let (rank, world_size) = (config.rank, config.world_size);
        let Device::Cuda(cuda) = device else {
            return Err(CollectiveError::Config(format!(
                "rank {rank}: the NCCL backend needs a CUDA device, got {:?} (CPU ranks use the TCP ring)",
                device.location()
            )));
        };
        if world_size == 0 {
            return Err(CollectiveError::Config(
                "WORLD_SIZE must be at least 1".into(),
            ));
        }
        if rank >= world_size {
            return Err(CollectiveError::Config(format!(
                "RANK {rank} is out of range for WORLD_SIZE {world_size}"
            )));
        }
        let (Ok(nranks), Ok(nccl_rank)) = (i32::try_from(world_size), i32::try_from(rank)) else {
            return Err(CollectiveError::Config(format!(
                "WORLD_SIZE {world_size} is too large for NCCL"
            )));
        };
        if config.timeout.is_zero() || config.rendezvous_timeout.is_zero() {
            return Err(CollectiveError::Config("timeouts must be positive".into()));
        }
        let rendezvous = |message: String| CollectiveError::Rendezvous { rank, message };

        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        let id = unique_id(config)?;

        // `ncclCommInitRank` blocks until every rank has called it: run it on
        // a helper thread and give up after the rendezvous timeout. A helper
        // stuck in NCCL is left behind (the error ends the process); if it
        // finishes after we gave up, its communicator is dropped (aborted)
        // with the unsent result.
        let (tx, rx) = mpsc::sync_channel(1);
        let init_ctx = ctx.clone();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let _ = tx.send(init_comm(init_ctx, id, nccl_rank, nranks));
            })
            .map_err(|e| rendezvous(format!("starting the NCCL init thread: {e}")))?;
        let comm = match rx.recv_timeout(config.rendezvous_timeout) {
            Ok(Ok(comm)) => comm,
            Ok(Err(message)) => return Err(rendezvous(message)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(rendezvous(format!(
                    "ncclCommInitRank: the {world_size} ranks did not all join the NCCL communicator within {:?} \
                     (a rank is missing or stuck, or NCCL cannot reach rank 0's bootstrap address: see NCCL_SOCKET_IFNAME)",
                    config.rendezvous_timeout
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(rendezvous(
                    "the NCCL init thread ended without a result".into(),
                ));
            }
        };

        let nccl = Nccl {
            rank,
            world_size,
            timeout: config.timeout,
            device: device.clone(),
            cuda: cuda.clone(),
            stream,
            state: Mutex::new(State {
                comm: Some(comm),
                broken: None,
                seq: 0,
            }),
        };
        // A first collective proves that NCCL moves data between all ranks
        // (and makes its first connections) before training starts.
        match nccl.barrier_within("barrier", config.rendezvous_timeout) {
            Ok(()) => Ok(nccl),
            Err(CollectiveError::Nccl { message, .. }) => Err(rendezvous(format!(
                "the first collective after ncclCommInitRank failed: {message}"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Runs `f` on the communicator, under the lock. An error from `f`
    /// aborts the communicator and breaks it for every later call.
    fn with_comm<T>(
        &self,
        op: &str,
        f: impl FnOnce(&RawComm) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(first) = &state.broken {
            return Err(CollectiveError::Broken {
                rank: self.rank,
                first: first.clone(),
            });
        }
        let seq = state.seq;
        state.seq += 1;
        let result = match state.comm.as_ref() {
            Some(comm) => match self.stream.context().bind_to_thread() {
                Ok(()) => f(comm),
                Err(e) => Err(format!("binding the CUDA context: {e}")),
            },
            None => Err("the communicator was aborted".into()),
        };
        result.map_err(|message| {
            let first = format!("NCCL {op} #{seq}: {message}");
            // Dropping aborts: NCCL kernels waiting on a dead peer exit, and
            // the buffers of the failed operation can be freed.
            state.comm = None;
            state.broken = Some(first.clone());
            CollectiveError::Nccl {
                rank: self.rank,
                message: first,
            }
        })
    }

    /// Enqueues an in-place sum of `buf` over all ranks on candle's stream.
    fn enqueue_all_reduce<T: NcclType>(
        &self,
        comm: &RawComm,
        buf: &mut CudaSlice<T>,
    ) -> std::result::Result<(), String> {
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses the `count` elements of `buf`, which the
        // caller keeps alive until the operation has completed (or the
        // communicator is aborted); send and receive buffers may be the same
        // (in-place all-reduce); `comm` is live (we hold the state lock) and
        // belongs to this stream's device.
        let status = unsafe {
            nccl::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                sys::ncclRedOp_t::ncclSum,
                comm.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        status
            .map(|_| ())
            .map_err(|e| format!("ncclAllReduce: {}", describe(Some(comm), e.0)))
    }

    /// Enqueues an in-place broadcast of `buf` from `root` on candle's stream.
    fn enqueue_broadcast<T: NcclType>(
        &self,
        comm: &RawComm,
        buf: &mut CudaSlice<T>,
        root: i32,
    ) -> std::result::Result<(), String> {
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: as in `enqueue_all_reduce`; NCCL reads `ptr` on the root
        // and writes it on the other ranks (in-place broadcast).
        let status = unsafe {
            nccl::broadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                root,
                comm.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        status
            .map(|_| ())
            .map_err(|e| format!("ncclBroadcast: {}", describe(Some(comm), e.0)))
    }

    /// Marks the work enqueued so far on candle's stream.
    fn record(&self) -> std::result::Result<CudaEvent, String> {
        self.stream
            .record_event(None)
            .map_err(|e| format!("recording a CUDA event: {e}"))
    }

    /// Waits for `events` in order, polling (never blocking in CUDA) and
    /// checking NCCL's asynchronous error on every poll. Fails when NCCL
    /// reports an error or when no event completes for `limit`.
    /// `what(i)` describes the work before event `i`, for messages.
    fn watch(
        &self,
        comm: &RawComm,
        events: &[CudaEvent],
        limit: Duration,
        what: impl Fn(usize) -> String,
    ) -> std::result::Result<(), String> {
        let mut pause = POLL_MIN;
        let mut progress = Instant::now();
        let mut next = 0;
        while next < events.len() {
            let done = events[next]
                .try_is_complete()
                .map_err(|e| format!("{}: CUDA error while waiting for it: {e}", what(next)))?;
            if done {
                next += 1;
                progress = Instant::now();
                pause = POLL_MIN;
                continue;
            }
            if let Some(error) = async_error(comm) {
                return Err(format!("{}: {error}", what(next)));
            }
            if progress.elapsed() >= limit {
                return Err(format!(
                    "{}: no progress for {limit:?}: a rank died or is stuck; see its log",
                    what(next)
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(POLL_MAX);
        }
        match async_error(comm) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Sums a host buffer over all ranks through the device.
    fn all_reduce_host<T>(&self, op: &str, buf: &mut [T]) -> Result<()>
    where
        T: NcclType + DeviceRepr,
    {
        self.with_comm(op, |comm| {
            if buf.is_empty() {
                return Ok(());
            }
            let mut dev = self
                .stream
                .clone_htod(&*buf)
                .map_err(|e| format!("copying {} values to the device: {e}", buf.len()))?;
            self.enqueue_all_reduce(comm, &mut dev)?;
            let reduced = self.record()?;
            self.watch(comm, &[reduced], self.timeout, |_| {
                format!("all-reduce of {} values", buf.len())
            })?;
            self.copy_to_host(comm, &dev, buf)
        })
    }

    /// Copies `src` into `dst` (same length) once the stream reaches it.
    fn copy_to_host<T: DeviceRepr>(
        &self,
        comm: &RawComm,
        src: &CudaSlice<T>,
        dst: &mut [T],
    ) -> std::result::Result<(), String> {
        if src.len() != dst.len() {
            return Err(format!(
                "internal: copying {} device values into {} host values",
                src.len(),
                dst.len()
            ));
        }
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(|e| format!("copying {} values to the host: {e}", dst.len()))?;
        // A copy into pageable memory has completed when the call returns;
        // the event keeps that explicit (and watched) whatever the memory.
        let copied = self.record()?;
        self.watch(comm, &[copied], self.timeout, |_| {
            "copy to the host".to_string()
        })
    }

    /// The barrier: a one-element all-reduce that also counts the ranks.
    fn barrier_within(&self, op: &str, limit: Duration) -> Result<()> {
        let world_size = self.world_size;
        self.with_comm(op, |comm| {
            let mut one = self
                .stream
                .clone_htod(&[1.0f64])
                .map_err(|e| format!("copying to the device: {e}"))?;
            self.enqueue_all_reduce(comm, &mut one)?;
            let reduced = self.record()?;
            self.watch(comm, &[reduced], limit, |_| "barrier".to_string())?;
            let mut count = [0.0f64];
            self.copy_to_host(comm, &one, &mut count)?;
            if count[0] != world_size as f64 {
                return Err(format!(
                    "the barrier counted {} ranks, expected {world_size}: the ranks call collectives in different orders",
                    count[0]
                ));
            }
            Ok(())
        })
    }

    /// Copies a bucket of same-dtype tensors into one fresh flat buffer,
    /// enqueues its all-reduce, and returns it as candle storage.
    fn reduce_bucket<T>(
        &self,
        comm: &RawComm,
        tensors: &[Tensor],
    ) -> std::result::Result<CudaStorage, String>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let total = tensors.iter().map(Tensor::elem_count).sum();
        let mut buf = self
            .stream
            .alloc_zeros::<T>(total)
            .map_err(|e| format!("allocating the bucket ({total} values): {e}"))?;
        let mut offset = 0;
        for t in tensors {
            let n = t.elem_count();
            if n == 0 {
                continue;
            }
            // A fresh copy keeps the caller's tensors untouched (NCCL
            // reduces in place) and packs views and strided tensors.
            let contiguous;
            let t = if t.is_contiguous() {
                t
            } else {
                contiguous = t
                    .contiguous()
                    .map_err(|e| format!("making a tensor contiguous: {e}"))?;
                &contiguous
            };
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err("a tensor is not on the CUDA device".into());
            };
            let slice = storage
                .as_cuda_slice::<T>()
                .map_err(|e| format!("reading a tensor: {e}"))?;
            let src = layout
                .contiguous_offsets()
                .and_then(|(start, end)| slice.try_slice(start..end));
            let dst = buf.try_slice_mut(offset..offset + n);
            let (Some(src), Some(mut dst)) = (src, dst) else {
                return Err(format!(
                    "internal: a tensor of {n} values does not fit its storage or the bucket"
                ));
            };
            if src.len() != n {
                return Err(format!(
                    "internal: a tensor of {n} values has {} in storage",
                    src.len()
                ));
            }
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| format!("copying a tensor into the bucket: {e}"))?;
            offset += n;
        }
        self.enqueue_all_reduce(comm, &mut buf)?;
        Ok(CudaStorage::wrap_cuda_slice(buf, self.cuda.clone()))
    }

    /// [`Nccl::reduce_bucket`] for the bucket's dtype.
    fn reduce_bucket_of(
        &self,
        comm: &RawComm,
        dtype: DType,
        tensors: &[Tensor],
    ) -> std::result::Result<CudaStorage, String> {
        match dtype {
            DType::F32 => self.reduce_bucket::<f32>(comm, tensors),
            DType::F64 => self.reduce_bucket::<f64>(comm, tensors),
            DType::BF16 => self.reduce_bucket::<half::bf16>(comm, tensors),
            DType::F16 => self.reduce_bucket::<half::f16>(comm, tensors),
            DType::U8 => self.reduce_bucket::<u8>(comm, tensors),
            DType::U32 => self.reduce_bucket::<u32>(comm, tensors),
            DType::I32 => self.reduce_bucket::<i32>(comm, tensors),
            DType::I64 => self.reduce_bucket::<i64>(comm, tensors),
            other => Err(format!("internal: no NCCL type for {}", other.as_str())),
        }
    }
}

fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32
            | DType::F64
            | DType::BF16
            | DType::F16
            | DType::U8
            | DType::U32
            | DType::I32
            | DType::I64
    )
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count().saturating_mul(t.dtype().size_in_bytes())
}

/// Splits `tensors` into buckets: runs of consecutive tensors of one dtype,
/// at most `bucket_bytes` each, and at least one tensor each.
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < tensors.len() {
        let dtype = tensors[start].dtype();
        let mut bytes = tensor_bytes(&tensors[start]);
        let mut end = start + 1;
        while end < tensors.len()
            && tensors[end].dtype() == dtype
            && bytes.saturating_add(tensor_bytes(&tensors[end])) <= bucket_bytes
        {
            bytes += tensor_bytes(&tensors[end]);
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Gets the NCCL unique id to every rank: rank 0 creates it and sends it
/// over the TCP rendezvous (not needed with one rank).
fn unique_id(config: &TcpRingConfig) -> Result<sys::ncclUniqueId> {
    let rendezvous = |message: String| CollectiveError::Rendezvous {
        rank: config.rank,
        message,
    };
    // The ring is only the rendezvous: it is formed first, so that a failure
    // on rank 0 closes it and the others learn at once, and it is dropped
    // after the id has gone round, since NCCL carries everything else (an
    // idle ring would only hold sockets open for the whole run).
    let ring = if config.world_size > 1 {
        Some(TcpRing::connect(config)?)
    } else {
        None
    };
    let mut bytes = Vec::new();
    if config.rank == 0 {
        let id = nccl::get_uniqueid()
            .map_err(|e| rendezvous(format!("ncclGetUniqueId: {}", describe(None, e.0))))?;
        // `c_char` is `i8` or `u8` depending on the target.
        #[allow(clippy::unnecessary_cast)]
        bytes.extend(id.internal.iter().map(|&c| c as u8));
    }
    if let Some(ring) = &ring {
        ring.broadcast(&mut bytes, 0)?;
    }
    if bytes.len() != UNIQUE_ID_BYTES {
        return Err(rendezvous(format!(
            "rank 0 sent an NCCL unique id of {} bytes, expected {UNIQUE_ID_BYTES}",
            bytes.len()
        )));
    }
    let mut internal = [0 as c_char; UNIQUE_ID_BYTES];
    for (dst, &src) in internal.iter_mut().zip(&bytes) {
        *dst = src as c_char;
    }
    Ok(sys::ncclUniqueId { internal })
}

/// `ncclCommInitRank` on the calling thread, for `ctx`'s device.
fn init_comm(
    ctx: Arc<CudaContext>,
    id: sys::ncclUniqueId,
    rank: i32,
    nranks: i32,
) -> std::result::Result<RawComm, String> {
    // NCCL takes the device from the calling thread's current context.
    ctx.bind_to_thread()
        .map_err(|e| format!("binding the CUDA context: {e}"))?;
    let mut comm = MaybeUninit::<sys::ncclComm_t>::uninit();
    // SAFETY: `comm` is a valid place for NCCL to write the handle, which is
    // read only if the call succeeded.
    let status = unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), nranks, id, rank) };
    match status {
        Ok(_) => Ok(RawComm {
            // SAFETY: written by the successful call above.
            comm: unsafe { comm.assume_init() },
            ctx,
        }),
        Err(e) => Err(format!("ncclCommInitRank: {}", describe(None, e.0))),
    }
}

/// NCCL's asynchronous error of `comm`, if any (a network failure, a peer
/// that went away, an abort).
fn async_error(comm: &RawComm) -> Option<String> {
    let mut result = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is live (the caller holds the state lock) and `result`
    // is a valid place for NCCL to write.
    let status = unsafe { sys::ncclCommGetAsyncError(comm.comm, &mut result) };
    if status != sys::ncclResult_t::ncclSuccess {
        return Some(format!(
            "ncclCommGetAsyncError failed: {}",
            describe(Some(comm), status)
        ));
    }
    match result {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => None,
        error => Some(format!(
            "NCCL reported an asynchronous error: {}",
            describe(Some(comm), error)
        )),
    }
}

/// NCCL's text for `result`, with the communicator's last error message when
/// there is one.
fn describe(comm: Option<&RawComm>, result: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a pointer to a static string (or null).
    let text = unsafe { c_string(sys::ncclGetErrorString(result)) };
    let mut out = format!("{result:?}");
    if let Some(text) = text {
        out.push_str(&format!(" ({text})"));
    }
    if let Some(comm) = comm {
        // SAFETY: `comm` is live; NCCL returns a pointer to a string it owns
        // (or null), copied out at once.
        if let Some(last) = unsafe { c_string(sys::ncclGetLastError(comm.comm)) } {
            out.push_str(&format!(": {last}"));
        }
    }
    out
}

/// Copies a NUL-terminated C string; `None` for null or empty.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string valid for the call.
unsafe fn c_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated per the contract above.
    let text = unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .trim()
        .to_string();
    (!text.is_empty()).then_some(text)
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host("all_reduce_sum(f32)", buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_host("all_reduce_sum(f64)", buf)
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        let (rank, world_size) = (self.rank, self.world_size);
        let nccl_root = match i32::try_from(root) {
            Ok(r) if root < world_size => r,
            _ => {
                return Err(CollectiveError::Config(format!(
                    "rank {rank}: broadcast root {root} is not a rank (world size {world_size})"
                )));
            }
        };
        self.with_comm("broadcast", |comm| {
            // The length first, so that every rank can size its buffer.
            let mut len = self
                .stream
                .clone_htod(&[data.len() as u64])
                .map_err(|e| format!("copying the length to the device: {e}"))?;
            self.enqueue_broadcast(comm, &mut len, nccl_root)?;
            let sent = self.record()?;
            self.watch(comm, &[sent], self.timeout, |_| {
                format!("broadcast of the length from rank {root}")
            })?;
            let n = if rank == root {
                data.len()
            } else {
                let mut n = [0u64];
                self.copy_to_host(comm, &len, &mut n)?;
                let n = usize::try_from(n[0])
                    .map_err(|_| format!("rank {root} announced {} bytes", n[0]))?;
                data.clear();
                data.try_reserve_exact(n)
                    .map_err(|e| format!("rank {root} announced {n} bytes: {e}"))?;
                data.resize(n, 0);
                n
            };
            if n == 0 {
                return Ok(());
            }
            let mut bytes = if rank == root {
                self.stream.clone_htod(&data[..])
            } else {
                self.stream.alloc_zeros::<u8>(n)
            }
            .map_err(|e| format!("staging {n} bytes on the device: {e}"))?;
            self.enqueue_broadcast(comm, &mut bytes, nccl_root)?;
            let sent = self.record()?;
            self.watch(comm, &[sent], self.timeout, |_| {
                format!("broadcast of {n} bytes from rank {root}")
            })?;
            if rank == root {
                return Ok(());
            }
            self.copy_to_host(comm, &bytes, &mut data[..])
        })
    }

    fn barrier(&self) -> Result<()> {
        self.barrier_within("barrier", self.timeout)
    }

    /// Sums `tensors` over all ranks on the device: consecutive tensors of
    /// one dtype are packed into buckets of at most `bucket_bytes` (at least
    /// one tensor each), one NCCL all-reduce per bucket, all enqueued before
    /// the first wait. The results are views into the reduced buckets, with
    /// the original shapes and dtypes; the inputs are left untouched.
    fn all_reduce_tensors(&self, tensors: &[Tensor], bucket_bytes: usize) -> Result<Vec<Tensor>> {
        for t in tensors {
            if !t.device().same_device(&self.device) {
                return Err(CollectiveError::Config(format!(
                    "rank {}: all_reduce_tensors: a tensor is on {:?}, the communicator on {:?}",
                    self.rank,
                    t.device().location(),
                    self.device.location()
                )));
            }
            if !supported(t.dtype()) {
                return Err(CollectiveError::Config(format!(
                    "rank {}: all_reduce_tensors: NCCL cannot sum {} tensors",
                    self.rank,
                    t.dtype().as_str()
                )));
            }
        }
        let buckets = buckets(tensors, bucket_bytes);
        let count = buckets.len();
        let describe_bucket = |i: usize| {
            let range = buckets[i].clone();
            let bytes: usize = tensors[range.clone()].iter().map(tensor_bytes).sum();
            format!(
                "bucket {} of {count} ({} tensors, {}, {bytes} bytes)",
                i + 1,
                range.len(),
                tensors[range.start].dtype().as_str()
            )
        };
        self.with_comm("all_reduce_tensors", |comm| {
            // Every bucket is enqueued before the first wait, so NCCL runs
            // them back to back; each keeps its buffer alive (the flat
            // tensor) until the end. Progress is counted per bucket.
            let mut flat = Vec::with_capacity(count);
            let mut events = Vec::with_capacity(count);
            for (i, range) in buckets.iter().enumerate() {
                let bucket = &tensors[range.clone()];
                let total: usize = bucket.iter().map(Tensor::elem_count).sum();
                if total == 0 {
                    flat.push(None);
                    continue;
                }
                let storage = self
                    .reduce_bucket_of(comm, bucket[0].dtype(), bucket)
                    .map_err(|e| format!("{}: {e}", describe_bucket(i)))?;
                flat.push(Some(Tensor::from_storage(
                    Storage::Cuda(storage),
                    total,
                    BackpropOp::none(),
                    false,
                )));
                events.push(
                    self.record()
                        .map_err(|e| format!("{}: {e}", describe_bucket(i)))?,
                );
            }
            // Events exist only for non-empty buckets: map back for messages.
            let with_events: Vec<usize> = (0..count).filter(|&i| flat[i].is_some()).collect();
            self.watch(comm, &events, self.timeout, |e| {
                with_events
                    .get(e)
                    .map_or_else(|| "all-reduce".to_string(), |&i| describe_bucket(i))
            })?;
            let mut out = Vec::with_capacity(tensors.len());
            for (range, reduced) in buckets.iter().zip(&flat) {
                let mut offset = 0;
                for t in &tensors[range.clone()] {
                    let n = t.elem_count();
                    let Some(reduced) = reduced else {
                        out.push(t.clone());
                        continue;
                    };
                    let view = reduced
                        .narrow(0, offset, n)
                        .and_then(|v| v.reshape(t.shape()))
                        .map_err(|e| format!("unpacking a bucket: {e}"))?;
                    out.push(view);
                    offset += n;
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize, dtype: DType) -> Tensor {
        Tensor::zeros(n, dtype, &Device::Cpu).expect("zeros")
    }

    #[test]
    fn buckets_split_on_size_and_dtype() {
        let ts = [
            t(10, DType::F32), // 40 bytes
            t(10, DType::F32),
            t(30, DType::F32), // 120 bytes: alone
            t(4, DType::BF16),
            t(4, DType::BF16),
            t(1, DType::F32),
        ];
        assert_eq!(buckets(&ts, 100), vec![0..2, 2..3, 3..5, 5..6]);
        assert_eq!(buckets(&ts, 0), vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(buckets(&ts, usize::MAX), vec![0..3, 3..5, 5..6]);
        assert!(buckets(&[], 100).is_empty());
    }
}
