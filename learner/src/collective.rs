//! Collectives between learner ranks: the [`Collective`] trait (`all_reduce_sum`,
//! `broadcast`, `barrier`) and its CPU backend, [`TcpRing`]. [`connect`] picks
//! the backend for a rank's device.
//!
//! Rendezvous follows torchrun: `MASTER_ADDR`/`MASTER_PORT`, `RANK`,
//! `WORLD_SIZE`. Rank 0 listens at the master port; every other rank connects
//! to it and reports the address of its own ring listener (bound to port 0);
//! rank 0 sends everyone the table; each rank then connects to its successor
//! and accepts its predecessor. The NCCL backend (`crate::nccl`, feature
//! `cuda`) implements the same trait on GPUs: it uses this rendezvous only to
//! hand out the NCCL unique id, and overrides
//! [`Collective::all_reduce_tensors`] to reduce buckets of device buffers.
//!
//! [`TcpRing`] uses blocking `std::net` sockets with timeouts: the training
//! loop calls it from a blocking thread (`tokio::task::spawn_blocking`) or
//! from plain threads. Nothing waits forever: every read, write, connect and
//! accept has a deadline, and the error names the rank that was waited for
//! and the operation. After an error the ring shuts its sockets down, so the
//! failure travels around the ring at once instead of leaving the other
//! ranks waiting for their timeout, and every later call fails.
//!
//! All-reduce is the ring algorithm (reduce-scatter, then all-gather): each
//! rank sends and receives about `2 (W-1)/W` times the buffer, whatever `W`.
//! Each chunk is summed along the ring on one path and then copied, so every
//! rank ends with bit-identical results, and the same topology gives the same
//! bits run after run.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

/// Default per-wait timeout of a collective operation (gloo's default is 30
/// minutes, NCCL's in torch 10): a slow rank (long generation) is normal.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time for all ranks to join the rendezvous.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);
/// Bucket size of [`all_reduce_tensors`] (torch DDP's `bucket_cap_mb` = 25).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// torchrun's default master port.
const DEFAULT_MASTER_PORT: u16 = 29500;
const MAGIC: &[u8; 4] = b"TNDM";
const PROTOCOL_VERSION: u32 = 1;
/// Bytes moved per `read`/`write` call and per decode/add pass.
const PIECE_BYTES: usize = 1 << 20;
/// Poll interval of non-blocking accepts and connect retries.
const POLL: Duration = Duration::from_millis(20);

/// What went wrong in a collective. Every message names this rank and, when
/// one is involved, the peer rank that failed or was waited for.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective config: {0}")]
    Config(String),
    #[error("rank {rank}: rendezvous: {message}")]
    Rendezvous { rank: usize, message: String },
    #[error("rank {rank}: {op}: rank {peer}: {message}")]
    Peer {
        rank: usize,
        peer: usize,
        op: String,
        message: String,
    },
    #[error("rank {rank}: the ring is broken by an earlier error ({first}); restart the ranks")]
    Broken { rank: usize, first: String },
    /// A failed NCCL operation; the communicator is aborted, and later
    /// calls return [`CollectiveError::Broken`].
    #[error("rank {rank}: {message}; the NCCL communicator is aborted: restart the ranks")]
    Nccl { rank: usize, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Collective operations across the learner ranks. All ranks must call the
/// same operations in the same order with buffers of the same length.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Short backend name for logs and the manifest (`tcp`, `nccl`, `single`).
    fn backend(&self) -> &'static str;
    /// Element-wise sum over all ranks, in place; every rank ends with the
    /// same bits.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_sum`] for `f64` (metrics, token counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `data` on every rank by `root`'s `data` (any length).
    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;

    /// Sums a list of tensors over all ranks, `bucket_bytes` at a time, and
    /// returns the sums (same shapes and dtypes). The default goes through
    /// host `f32` buffers; a device backend (NCCL) reduces on the device.
    fn all_reduce_tensors(&self, tensors: &[Tensor], bucket_bytes: usize) -> Result<Vec<Tensor>> {
        host_all_reduce_tensors(self, tensors, bucket_bytes)
    }
}

/// The collective of this rank on `device`: NCCL on a CUDA device (feature
/// `cuda`), the TCP ring otherwise, and [`SingleRank`] for a run of one rank
/// (one process needs no communicator).
pub fn connect(
    config: &TcpRingConfig,
    device: &candle_core::Device,
) -> Result<Box<dyn Collective>> {
    if config.world_size == 1 && config.rank == 0 {
        return Ok(Box::new(SingleRank));
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Ok(Box::new(crate::nccl::Nccl::connect(config, device)?));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(Box::new(TcpRing::connect(config)?))
}

/// Sums gradient tensors over all ranks in buckets of [`DEFAULT_BUCKET_BYTES`]:
/// each bucket is flattened into one buffer, all-reduced, and written back.
pub fn all_reduce_tensors(collective: &dyn Collective, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    collective.all_reduce_tensors(tensors, DEFAULT_BUCKET_BYTES)
}

fn host_all_reduce_tensors<C: Collective + ?Sized>(
    collective: &C,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<Vec<Tensor>> {
    if collective.world_size() == 1 {
        return Ok(tensors.to_vec());
    }
    let bucket_elems = (bucket_bytes / 4).max(1);
    let mut out = Vec::with_capacity(tensors.len());
    let mut start = 0;
    while start < tensors.len() {
        // A bucket: consecutive tensors up to `bucket_elems` (at least one).
        let mut end = start;
        let mut elems = 0;
        while end < tensors.len()
            && (end == start || elems + tensors[end].elem_count() <= bucket_elems)
        {
            elems += tensors[end].elem_count();
            end += 1;
        }
        let mut buf = Vec::with_capacity(elems);
        for t in &tensors[start..end] {
            buf.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        collective.all_reduce_sum(&mut buf)?;
        let mut offset = 0;
        for t in &tensors[start..end] {
            let n = t.elem_count();
            let reduced = Tensor::from_slice(&buf[offset..offset + n], t.shape(), t.device())?;
            out.push(reduced.to_dtype(t.dtype())?);
            offset += n;
        }
        start = end;
    }
    Ok(out)
}

/// The collective of a run with one rank: every operation is a no-op.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _data: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(0, 1, root)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

fn check_root(rank: usize, world_size: usize, root: usize) -> Result<()> {
    if root >= world_size {
        return Err(CollectiveError::Config(format!(
            "rank {rank}: broadcast root {root} is not a rank (world size {world_size})"
        )));
    }
    Ok(())
}

/// Where and how a [`TcpRing`] meets its peers.
#[derive(Debug, Clone)]
pub struct TcpRingConfig {
    /// Host of rank 0 (name or IP).
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// Longest wait for any single read, write, or connection of an
    /// operation: a peer silent for this long is reported as failed.
    pub timeout: Duration,
    /// Time for all ranks to join and form the ring.
    pub rendezvous_timeout: Duration,
}

impl TcpRingConfig {
    pub fn new(
        master_addr: impl Into<String>,
        master_port: u16,
        rank: usize,
        world_size: usize,
    ) -> Self {
        TcpRingConfig {
            master_addr: master_addr.into(),
            master_port,
            rank,
            world_size,
            timeout: DEFAULT_TIMEOUT,
            rendezvous_timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
        }
    }

    /// torchrun's variables: `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default
    /// `127.0.0.1`), `MASTER_PORT` (default 29500). Without `RANK` and
    /// `WORLD_SIZE` the run has one rank.
    pub fn from_env() -> Result<Self> {
        fn var(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty())
        }
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
            value.trim().parse().map_err(|_| {
                CollectiveError::Config(format!("{name}={value:?} is not a valid number"))
            })
        }
        let (rank, world_size) = match (var("RANK"), var("WORLD_SIZE")) {
            (None, None) => (0, 1),
            (Some(r), Some(w)) => (parse("RANK", &r)?, parse("WORLD_SIZE", &w)?),
            (Some(_), None) => {
                return Err(CollectiveError::Config(
                    "RANK is set but WORLD_SIZE is not".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(CollectiveError::Config(
                    "WORLD_SIZE is set but RANK is not".into(),
                ));
            }
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            Some(p) => parse("MASTER_PORT", &p)?,
            None => DEFAULT_MASTER_PORT,
        };
        Ok(TcpRingConfig::new(
            master_addr,
            master_port,
            rank,
            world_size,
        ))
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_rendezvous_timeout(mut self, timeout: Duration) -> Self {
        self.rendezvous_timeout = timeout;
        self
    }
}

/// Ring collectives over TCP (CPU training and tests).
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// `None` with one rank.
    state: Mutex<Option<RingState>>,
}

struct RingState {
    /// Connection to the successor `(rank + 1) % W`: this rank writes.
    next: TcpStream,
    /// Connection from the predecessor `(rank + W - 1) % W`: this rank reads.
    prev: TcpStream,
    /// Sequence number of the next operation (both ends check it).
    seq: u64,
    /// The first error, once the ring is broken.
    broken: Option<String>,
    /// Reused receive buffer.
    scratch: Vec<u8>,
}

/// Operation codes carried in every message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceF32 = 1,
    AllReduceF64 = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceF32 => "all_reduce_sum(f32)",
            Op::AllReduceF64 => "all_reduce_sum(f64)",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
    fn from_u8(v: u8) -> Option<Op> {
        match v {
            1 => Some(Op::AllReduceF32),
            2 => Some(Op::AllReduceF64),
            3 => Some(Op::Broadcast),
            4 => Some(Op::Barrier),
            _ => None,
        }
    }
}

/// op (1) + seq (8) + payload length (8).
const HEADER_BYTES: usize = 17;

impl TcpRing {
    /// Joins the ring described by `RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT`, with the default timeouts.
    pub fn from_env() -> Result<Self> {
        TcpRing::connect(&TcpRingConfig::from_env()?)
    }

    /// Rendezvous and ring formation; returns once this rank is connected to
    /// both neighbours (or with an error naming the rank that did not come).
    pub fn connect(config: &TcpRingConfig) -> Result<Self> {
        let (rank, world_size) = (config.rank, config.world_size);
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
        if config.timeout.is_zero() || config.rendezvous_timeout.is_zero() {
            return Err(CollectiveError::Config("timeouts must be positive".into()));
        }
        let state = if world_size == 1 {
            None
        } else {
            Some(rendezvous(config)?)
        };
        Ok(TcpRing {
            rank,
            world_size,
            timeout: config.timeout,
            state: Mutex::new(state),
        })
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world_size
    }

    /// Runs `f` on the ring state; on error, breaks the ring (shuts the
    /// sockets down so that the neighbours fail fast too).
    fn with_ring<T>(
        &self,
        op: Op,
        f: impl FnOnce(&Ring, &mut RingState, u64) -> Result<T>,
    ) -> Result<T> {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(state) = guard.as_mut() else {
            return Err(CollectiveError::Config(format!(
                "rank {}: {} on a ring without peers",
                self.rank,
                op.name()
            )));
        };
        if let Some(first) = &state.broken {
            return Err(CollectiveError::Broken {
                rank: self.rank,
                first: first.clone(),
            });
        }
        let seq = state.seq;
        state.seq += 1;
        let ring = Ring {
            rank: self.rank,
            world_size: self.world_size,
            prev: self.prev_rank(),
            next: self.next_rank(),
            timeout: self.timeout,
            op,
            seq,
        };
        let result = f(&ring, state, seq);
        if let Err(e) = &result {
            state.broken = Some(e.to_string());
            let _ = state.next.shutdown(std::net::Shutdown::Both);
            let _ = state.prev.shutdown(std::net::Shutdown::Both);
        }
        result
    }

    fn all_reduce<T: Element>(&self, op: Op, buf: &mut [T]) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        self.with_ring(op, |ring, state, _| ring_all_reduce(ring, state, buf))
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(Op::AllReduceF32, buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(Op::AllReduceF64, buf)
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(self.rank, self.world_size, root)?;
        if self.world_size == 1 {
            return Ok(());
        }
        self.with_ring(Op::Broadcast, |ring, state, _| {
            ring_broadcast(ring, state, data, root)
        })
    }

    fn barrier(&self) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        // A one-element all-reduce: nobody can finish it before every rank
        // has contributed. The count doubles as a consistency check.
        let mut one = [1.0f64];
        let w = self.world_size;
        self.with_ring(Op::Barrier, |ring, state, _| {
            ring_all_reduce(ring, state, &mut one)?;
            if one[0] != w as f64 {
                return Err(ring.err(
                    ring.prev,
                    format!("barrier counted {} ranks, expected {w}", one[0]),
                ));
            }
            Ok(())
        })
    }
}

/// The fixed facts of one operation, for messages and headers.
struct Ring {
    rank: usize,
    world_size: usize,
    prev: usize,
    next: usize,
    timeout: Duration,
    op: Op,
    seq: u64,
}

impl Ring {
    fn err(&self, peer: usize, message: String) -> CollectiveError {
        CollectiveError::Peer {
            rank: self.rank,
            peer,
            op: format!("{} #{}", self.op.name(), self.seq),
            message,
        }
    }

    fn read_err(&self, e: io::Error, what: &str) -> CollectiveError {
        let message = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "waiting for {what} from rank {} (predecessor): nothing arrived within {:?}",
                self.prev, self.timeout
            ),
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => {
                format!(
                    "waiting for {what}: rank {} closed the connection (it failed or stopped; see its log)",
                    self.prev
                )
            }
            _ => format!("reading {what} from rank {}: {e}", self.prev),
        };
        self.err(self.prev, message)
    }

    fn write_err(&self, e: io::Error) -> CollectiveError {
        let message = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "sending to rank {} (successor): it read nothing within {:?}",
                self.next, self.timeout
            ),
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => {
                format!(
                    "sending: rank {} closed the connection (it failed or stopped; see its log)",
                    self.next
                )
            }
            _ => format!("sending to rank {}: {e}", self.next),
        };
        self.err(self.next, message)
    }

    fn header(&self, len: usize) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0] = self.op as u8;
        h[1..9].copy_from_slice(&self.seq.to_le_bytes());
        h[9..17].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    /// Reads a header from the predecessor and checks that it belongs to
    /// this operation; returns the payload length.
    fn read_header(&self, prev: &mut TcpStream) -> Result<usize> {
        let mut h = [0u8; HEADER_BYTES];
        prev.read_exact(&mut h)
            .map_err(|e| self.read_err(e, "a message header"))?;
        let seq = u64::from_le_bytes(h[1..9].try_into().unwrap_or([0; 8]));
        let len = u64::from_le_bytes(h[9..17].try_into().unwrap_or([0; 8]));
        match Op::from_u8(h[0]) {
            Some(op) if op == self.op && seq == self.seq => {}
            Some(op) => {
                return Err(self.err(
                    self.prev,
                    format!(
                        "sent {} #{seq} while this rank runs {} #{}: the ranks call collectives in different orders",
                        op.name(),
                        self.op.name(),
                        self.seq
                    ),
                ));
            }
            None => {
                return Err(self.err(
                    self.prev,
                    format!("sent an unknown operation code {}", h[0]),
                ));
            }
        }
        usize::try_from(len).map_err(|_| self.err(self.prev, format!("announced {len} bytes")))
    }
}

/// A number the ring can sum and move as little-endian bytes.
trait Element: Copy + Send + Sync + 'static {
    const BYTES: usize;
    /// Writes `self` into `dst` (`BYTES` long).
    fn put(self, dst: &mut [u8]);
    /// Reads a value from `src` (`BYTES` long).
    fn get(src: &[u8]) -> Self;
    fn add(self, other: Self) -> Self;
}

impl Element for f32 {
    const BYTES: usize = 4;
    fn put(self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.to_le_bytes());
    }
    fn get(src: &[u8]) -> Self {
        let mut b = [0u8; 4];
        b.copy_from_slice(src);
        f32::from_le_bytes(b)
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Element for f64 {
    const BYTES: usize = 8;
    fn put(self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.to_le_bytes());
    }
    fn get(src: &[u8]) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(src);
        f64::from_le_bytes(b)
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

/// Chunk `i` of `W` balanced chunks of `0..n` (the same on every rank).
fn chunk(n: usize, w: usize, i: usize) -> Range<usize> {
    (i * n / w)..((i + 1) * n / w)
}

/// Splits `buf` into a shared view of `send` and a mutable view of `recv`
/// (disjoint ranges; empty ones may share a start).
fn split_send_recv<T>(buf: &mut [T], send: Range<usize>, recv: Range<usize>) -> (&[T], &mut [T]) {
    if send.end <= recv.start {
        let (a, b) = buf.split_at_mut(recv.start);
        (&a[send], &mut b[..recv.end - recv.start])
    } else {
        let (a, b) = buf.split_at_mut(send.start);
        (&b[..send.end - send.start], &mut a[recv])
    }
}

/// Sends `values` (header + little-endian payload) to the successor.
fn send_values<T: Element>(ring: &Ring, mut next: &TcpStream, values: &[T]) -> Result<()> {
    let per_piece = (PIECE_BYTES / T::BYTES).max(1);
    let mut bytes = Vec::with_capacity(HEADER_BYTES + per_piece.min(values.len()) * T::BYTES);
    bytes.extend_from_slice(&ring.header(values.len() * T::BYTES));
    if values.is_empty() {
        return next.write_all(&bytes).map_err(|e| ring.write_err(e));
    }
    for piece in values.chunks(per_piece) {
        let start = bytes.len();
        bytes.resize(start + piece.len() * T::BYTES, 0);
        for (dst, &v) in bytes[start..].chunks_exact_mut(T::BYTES).zip(piece) {
            v.put(dst);
        }
        next.write_all(&bytes).map_err(|e| ring.write_err(e))?;
        bytes.clear();
    }
    Ok(())
}

/// Receives one message of exactly `target.len()` values from the
/// predecessor, adding it into `target` (`add`) or overwriting it.
fn recv_values<T: Element>(
    ring: &Ring,
    prev: &mut TcpStream,
    scratch: &mut Vec<u8>,
    target: &mut [T],
    add: bool,
) -> Result<()> {
    let len = ring.read_header(prev)?;
    let expected = target.len() * T::BYTES;
    if len != expected {
        return Err(ring.err(
            ring.prev,
            format!(
                "sent {len} bytes for a chunk of {expected}: the ranks' buffers have different lengths"
            ),
        ));
    }
    let per_piece = (PIECE_BYTES / T::BYTES).max(1);
    for piece in target.chunks_mut(per_piece) {
        scratch.resize(piece.len() * T::BYTES, 0);
        prev.read_exact(scratch)
            .map_err(|e| ring.read_err(e, "chunk data"))?;
        let values = scratch.chunks_exact(T::BYTES).map(T::get);
        if add {
            // `local + received`: IEEE addition is commutative, and each
            // chunk's partial sums follow the ring from one fixed start.
            for (dst, v) in piece.iter_mut().zip(values) {
                *dst = dst.add(v);
            }
        } else {
            for (dst, v) in piece.iter_mut().zip(values) {
                *dst = v;
            }
        }
    }
    Ok(())
}

/// One ring step: send `buf[send]` to the successor while receiving into
/// `buf[recv]` from the predecessor (concurrently, so that neither side
/// blocks on a full socket buffer).
fn ring_step<T: Element>(
    ring: &Ring,
    state: &mut RingState,
    buf: &mut [T],
    send: Range<usize>,
    recv: Range<usize>,
    add: bool,
) -> Result<()> {
    let (send_slice, recv_slice) = split_send_recv(buf, send, recv);
    let RingState {
        next,
        prev,
        scratch,
        ..
    } = state;
    let next: &TcpStream = next;
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_values(ring, next, send_slice));
        let received = recv_values(ring, prev, scratch, recv_slice, add);
        if received.is_err() {
            // Unblock a sender stuck on a successor that does not read.
            let _ = next.shutdown(std::net::Shutdown::Both);
        }
        let sent = match sender.join() {
            Ok(r) => r,
            Err(_) => Err(ring.err(ring.next, "the sending thread panicked".into())),
        };
        received.and(sent)
    })
}

fn ring_all_reduce<T: Element>(ring: &Ring, state: &mut RingState, buf: &mut [T]) -> Result<()> {
    let (w, r, n) = (ring.world_size, ring.rank, buf.len());
    // Reduce-scatter: after W-1 steps rank r holds the full sum of chunk r+1.
    for s in 0..w - 1 {
        let send = chunk(n, w, (r + w - s) % w);
        let recv = chunk(n, w, (r + 2 * w - s - 1) % w);
        ring_step(ring, state, buf, send, recv, true)?;
    }
    // All-gather: pass the finished chunks around the ring.
    for s in 0..w - 1 {
        let send = chunk(n, w, (r + 1 + w - s) % w);
        let recv = chunk(n, w, (r + w - s) % w);
        ring_step(ring, state, buf, send, recv, false)?;
    }
    Ok(())
}

/// Broadcast along the ring from `root`, forwarded piece by piece.
fn ring_broadcast(
    ring: &Ring,
    state: &mut RingState,
    data: &mut Vec<u8>,
    root: usize,
) -> Result<()> {
    let forward = ring.next != root;
    if ring.rank == root {
        let mut next = &state.next;
        next.write_all(&ring.header(data.len()))
            .map_err(|e| ring.write_err(e))?;
        for piece in data.chunks(PIECE_BYTES) {
            next.write_all(piece).map_err(|e| ring.write_err(e))?;
        }
        return Ok(());
    }
    let len = ring.read_header(&mut state.prev)?;
    if forward {
        let mut next = &state.next;
        next.write_all(&ring.header(len))
            .map_err(|e| ring.write_err(e))?;
    }
    data.clear();
    let mut remaining = len;
    while remaining > 0 {
        let take = remaining.min(PIECE_BYTES);
        let start = data.len();
        data.resize(start + take, 0);
        state
            .prev
            .read_exact(&mut data[start..])
            .map_err(|e| ring.read_err(e, "broadcast data"))?;
        if forward {
            let mut next = &state.next;
            next.write_all(&data[start..])
                .map_err(|e| ring.write_err(e))?;
        }
        remaining -= take;
    }
    Ok(())
}

// ---------------------------------------------------------------- rendezvous

fn rendezvous_err(rank: usize, message: String) -> CollectiveError {
    CollectiveError::Rendezvous { rank, message }
}

fn resolve(config: &TcpRingConfig) -> Result<SocketAddr> {
    let rank = config.rank;
    (config.master_addr.as_str(), config.master_port)
        .to_socket_addrs()
        .map_err(|e| {
            rendezvous_err(
                rank,
                format!("cannot resolve MASTER_ADDR {:?}: {e}", config.master_addr),
            )
        })?
        .next()
        .ok_or_else(|| {
            rendezvous_err(
                rank,
                format!("MASTER_ADDR {:?} has no address", config.master_addr),
            )
        })
}

fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn read_u32(stream: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(stream: &mut TcpStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_str(stream: &mut TcpStream) -> io::Result<String> {
    let len = read_u32(stream)? as usize;
    if len > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("string of {len} bytes"),
        ));
    }
    let mut b = vec![0u8; len];
    stream.read_exact(&mut b)?;
    String::from_utf8(b)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "string is not UTF-8"))
}

/// Hello: magic, protocol version, rank, world size, listener address.
fn hello(rank: usize, world_size: usize, addr: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&(rank as u64).to_le_bytes());
    out.extend_from_slice(&(world_size as u64).to_le_bytes());
    write_str(&mut out, addr);
    out
}

struct Hello {
    rank: usize,
    world_size: usize,
    addr: String,
}

fn read_hello(stream: &mut TcpStream) -> io::Result<Hello> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a Tandem learner (wrong magic bytes)",
        ));
    }
    let version = read_u32(stream)?;
    if version != PROTOCOL_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("protocol version {version}, this build speaks {PROTOCOL_VERSION}"),
        ));
    }
    Ok(Hello {
        rank: read_u64(stream)? as usize,
        world_size: read_u64(stream)? as usize,
        addr: read_str(stream)?,
    })
}

/// Accepts one connection before `deadline` (non-blocking polling: std has
/// no accept timeout).
fn accept_before(listener: &TcpListener, deadline: Instant) -> io::Result<Option<TcpStream>> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(Some(stream));
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr`, retrying refused connections (the peer may not be
/// listening yet) until `deadline`.
fn connect_before(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + POLL < deadline => {
                tracing::trace!("connect to {addr}: {e}; retrying");
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Table message from rank 0: status 0 + W addresses, or status 1 + error.
const TABLE_OK: u8 = 0;
const TABLE_ERR: u8 = 1;

fn rendezvous(config: &TcpRingConfig) -> Result<RingState> {
    let (rank, w) = (config.rank, config.world_size);
    let deadline = Instant::now() + config.rendezvous_timeout;
    let master = resolve(config)?;
    let rz = |m: String| rendezvous_err(rank, m);

    // The table of ring listener addresses, and this rank's ring listener.
    let (table, ring_listener) = if rank == 0 {
        let listener = TcpListener::bind(SocketAddr::new(
            unspecified_like(master.ip()),
            master.port(),
        ))
        .map_err(|e| {
            rz(format!(
                "cannot listen at MASTER_PORT {}: {e}",
                master.port()
            ))
        })?;
        let ring_listener = TcpListener::bind(SocketAddr::new(unspecified_like(master.ip()), 0))
            .map_err(|e| rz(format!("cannot open the ring listener: {e}")))?;
        let ring_port = ring_listener
            .local_addr()
            .map_err(|e| rz(e.to_string()))?
            .port();
        listener
            .set_nonblocking(true)
            .map_err(|e| rz(e.to_string()))?;
        let mut peers: Vec<Option<(TcpStream, String)>> = (0..w).map(|_| None).collect();
        let mut joined = 1;
        let mut failure: Option<String> = None;
        while joined < w {
            let Some(mut stream) =
                accept_before(&listener, deadline).map_err(|e| rz(format!("accepting: {e}")))?
            else {
                let missing: Vec<usize> = (1..w).filter(|&r| peers[r].is_none()).collect();
                failure = Some(format!(
                    "rank(s) {missing:?} did not join within {:?} (rendezvous at port {})",
                    config.rendezvous_timeout,
                    master.port()
                ));
                break;
            };
            if configure(&stream, config.timeout.min(config.rendezvous_timeout)).is_err() {
                continue;
            }
            let hello = match read_hello(&mut stream) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(
                        "rank 0: rendezvous: ignoring a connection that sent no valid hello: {e}"
                    );
                    continue;
                }
            };
            if hello.world_size != w
                || hello.rank == 0
                || hello.rank >= w
                || peers[hello.rank].is_some()
            {
                failure = Some(format!(
                    "a peer says it is rank {} of WORLD_SIZE {} (this is rank 0 of {w}; \
                     duplicate RANK or mismatched WORLD_SIZE?)",
                    hello.rank, hello.world_size
                ));
                let mut msg = vec![TABLE_ERR];
                write_str(&mut msg, failure.as_deref().unwrap_or(""));
                let _ = stream.write_all(&msg);
                break;
            }
            peers[hello.rank] = Some((stream, hello.addr));
            joined += 1;
        }
        let mut table: Vec<String> = vec![SocketAddr::new(master.ip(), ring_port).to_string()];
        for p in peers.iter().skip(1) {
            table.push(p.as_ref().map(|(_, a)| a.clone()).unwrap_or_default());
        }
        let mut msg = Vec::new();
        match &failure {
            Some(f) => {
                msg.push(TABLE_ERR);
                write_str(&mut msg, &format!("rank 0 reports: {f}"));
            }
            None => {
                msg.push(TABLE_OK);
                for a in &table {
                    write_str(&mut msg, a);
                }
            }
        }
        for (r, p) in peers.iter_mut().enumerate() {
            if let Some((stream, _)) = p
                && let Err(e) = stream.write_all(&msg)
                && failure.is_none()
            {
                failure = Some(format!("sending the peer table to rank {r}: {e}"));
            }
        }
        if let Some(f) = failure {
            return Err(rz(f));
        }
        (table, ring_listener)
    } else {
        let mut stream = connect_before(master, deadline).map_err(|e| {
            rz(format!(
                "rank 0 (MASTER_ADDR {}:{}) not reachable within {:?}: {e}",
                config.master_addr, config.master_port, config.rendezvous_timeout
            ))
        })?;
        // Rank 0 was listening before this rank connected, so it answers
        // (table or the name of a missing rank) within its own rendezvous
        // timeout from now; wait that long, plus a margin, for its answer.
        configure(&stream, config.rendezvous_timeout + Duration::from_secs(1))
            .map_err(|e| rz(e.to_string()))?;
        // Bind the ring listener on the interface that reaches rank 0.
        let local_ip = stream.local_addr().map_err(|e| rz(e.to_string()))?.ip();
        let ring_listener = TcpListener::bind(SocketAddr::new(local_ip, 0))
            .map_err(|e| rz(format!("cannot open the ring listener on {local_ip}: {e}")))?;
        let ring_addr = ring_listener.local_addr().map_err(|e| rz(e.to_string()))?;
        stream
            .write_all(&hello(rank, w, &ring_addr.to_string()))
            .map_err(|e| rz(format!("sending hello to rank 0: {e}")))?;
        let table_err = |e: io::Error| {
            rz(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                    "waiting for the peer table from rank 0: nothing within {:?}",
                    config.rendezvous_timeout
                ),
                _ => format!("waiting for the peer table from rank 0: {e} (see rank 0's log)"),
            })
        };
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).map_err(table_err)?;
        if status[0] != TABLE_OK {
            let message = read_str(&mut stream).map_err(table_err)?;
            return Err(rz(message));
        }
        let mut table = Vec::with_capacity(w);
        for _ in 0..w {
            table.push(read_str(&mut stream).map_err(table_err)?);
        }
        // Rank 0 cannot know which of its addresses the others reach it by
        // (its own host name may resolve to 127.0.1.1): use the one this
        // rank just reached it at.
        if let (Ok(peer), Ok(zero)) = (stream.peer_addr(), table[0].parse::<SocketAddr>()) {
            table[0] = SocketAddr::new(peer.ip(), zero.port()).to_string();
        }
        (table, ring_listener)
    };

    // Ring: connect to the successor, accept the predecessor. Every rank has
    // the table at about the same moment: a fresh deadline from here.
    let deadline = Instant::now() + config.rendezvous_timeout;
    let next_rank = (rank + 1) % w;
    let prev_rank = (rank + w - 1) % w;
    let next_addr: SocketAddr = table[next_rank].parse().map_err(|_| {
        rz(format!(
            "rank {next_rank}'s ring address {:?} is not an address",
            table[next_rank]
        ))
    })?;
    ring_listener
        .set_nonblocking(true)
        .map_err(|e| rz(e.to_string()))?;
    let (next, prev) = std::thread::scope(|s| {
        let connector = s.spawn(|| -> Result<TcpStream> {
            let mut next = connect_before(next_addr, deadline).map_err(|e| {
                rz(format!(
                    "connecting to rank {next_rank} at {next_addr}: {e}"
                ))
            })?;
            configure(&next, config.timeout).map_err(|e| rz(e.to_string()))?;
            next.write_all(&hello(rank, w, ""))
                .map_err(|e| rz(format!("sending hello to rank {next_rank}: {e}")))?;
            Ok(next)
        });
        let prev = (|| -> Result<TcpStream> {
            let mut prev = accept_before(&ring_listener, deadline)
                .map_err(|e| rz(format!("accepting rank {prev_rank}: {e}")))?
                .ok_or_else(|| {
                    rz(format!(
                        "rank {prev_rank} (predecessor) did not connect within {:?}",
                        config.rendezvous_timeout
                    ))
                })?;
            configure(&prev, config.timeout).map_err(|e| rz(e.to_string()))?;
            let h = read_hello(&mut prev)
                .map_err(|e| rz(format!("hello from rank {prev_rank}: {e}")))?;
            if h.rank != prev_rank || h.world_size != w {
                return Err(rz(format!(
                    "expected rank {prev_rank} of {w} as predecessor, got rank {} of {}",
                    h.rank, h.world_size
                )));
            }
            Ok(prev)
        })();
        let next = connector
            .join()
            .unwrap_or_else(|_| Err(rz("the connecting thread panicked".into())));
        (next, prev)
    });
    let (next, prev) = (next?, prev?);
    Ok(RingState {
        next,
        prev,
        seq: 0,
        broken: None,
        scratch: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer() {
        for n in 0..20 {
            for w in 1..6 {
                let mut covered = 0;
                for i in 0..w {
                    let c = chunk(n, w, i);
                    assert_eq!(c.start, covered);
                    covered = c.end;
                }
                assert_eq!(covered, n);
            }
        }
    }

    #[test]
    fn connect_one_rank_on_cpu_is_single() {
        let config = TcpRingConfig::new("127.0.0.1", 0, 0, 1);
        let c = connect(&config, &candle_core::Device::Cpu).expect("connect");
        assert_eq!((c.backend(), c.rank(), c.world_size()), ("single", 0, 1));
        let bad = TcpRingConfig::new("127.0.0.1", 0, 1, 1);
        assert!(matches!(
            connect(&bad, &candle_core::Device::Cpu),
            Err(CollectiveError::Config(_))
        ));
    }

    #[test]
    fn split_gives_disjoint_views() {
        let mut buf = [0, 1, 2, 3, 4, 5];
        let (s, r) = split_send_recv(&mut buf, 4..6, 1..3);
        assert_eq!(s, &[4, 5]);
        assert_eq!(r, &mut [1, 2]);
        let (s, r) = split_send_recv(&mut buf, 0..2, 2..5);
        assert_eq!(s, &[0, 1]);
        assert_eq!(r, &mut [2, 3, 4]);
        let (s, r) = split_send_recv(&mut buf, 0..0, 0..1);
        assert_eq!((s.len(), r.len()), (0, 1));
        let (s, r) = split_send_recv(&mut buf, 0..1, 0..0);
        assert_eq!((s.len(), r.len()), (1, 0));
    }
}
