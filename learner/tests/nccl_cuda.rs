//! The NCCL backend on real GPUs (feature `cuda`). Most tests use one rank on
//! `cuda:0`, which runs the real NCCL path (NCCL works with one rank); the
//! two-rank tests run only where two GPUs are visible, with ranks as threads.
#![cfg(feature = "cuda")]

use std::thread;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use candle_core::{DType, Device, IndexOp, Tensor};
use e2e::free_port;
use learner::collective::{self, Collective, CollectiveError, TcpRingConfig};
use learner::nccl::Nccl;

const TIMEOUT: Duration = Duration::from_secs(60);

fn config(port: u16, rank: usize, w: usize, timeout: Duration) -> TcpRingConfig {
    TcpRingConfig::new("127.0.0.1", port, rank, w)
        .with_timeout(timeout)
        .with_rendezvous_timeout(timeout)
}

fn one_rank() -> (Nccl, Device) {
    let device = Device::new_cuda(0).unwrap();
    let nccl = Nccl::connect(&config(free_port(), 0, 1, TIMEOUT), &device).unwrap();
    (nccl, device)
}

fn gpus() -> usize {
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

#[test]
fn connect_on_cpu_is_a_config_error() {
    let err = Nccl::connect(&config(free_port(), 0, 1, TIMEOUT), &Device::Cpu)
        .err()
        .expect("NCCL on a CPU device");
    let msg = err.to_string();
    assert!(matches!(err, CollectiveError::Config(_)), "{msg}");
    assert!(msg.contains("CUDA device"), "{msg}");
}

#[test]
fn one_rank_host_buffers_are_unchanged() {
    let (nccl, _device) = one_rank();
    assert_eq!(
        (nccl.backend(), nccl.rank(), nccl.world_size()),
        ("nccl", 0, 1)
    );
    let mut f32s: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
    let want = f32s.clone();
    nccl.all_reduce_sum(&mut f32s).unwrap();
    assert_eq!(f32s, want);
    let mut f64s = vec![1e300, -2.5, 0.0, 3.0];
    nccl.all_reduce_sum_f64(&mut f64s).unwrap();
    assert_eq!(f64s, vec![1e300, -2.5, 0.0, 3.0]);
    let mut empty: Vec<f32> = Vec::new();
    nccl.all_reduce_sum(&mut empty).unwrap();
    nccl.barrier().unwrap();
    nccl.barrier().unwrap();
}

#[test]
fn one_rank_broadcast_keeps_the_bytes() {
    let (nccl, _device) = one_rank();
    for len in [0usize, 1, 7, 10 << 20] {
        let mut data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let want = data.clone();
        nccl.broadcast(&mut data, 0).unwrap();
        assert_eq!(data.len(), len);
        assert!(data == want, "broadcast of {len} bytes changed them");
    }
    let err = nccl.broadcast(&mut vec![1, 2, 3], 1).unwrap_err();
    assert!(matches!(err, CollectiveError::Config(_)), "{err}");
    // A bad root is refused before NCCL: the communicator still works.
    nccl.barrier().unwrap();
}

#[test]
fn one_rank_tensors_come_back_identical_in_several_buckets() {
    let (nccl, device) = one_rank();
    let a = Tensor::randn(0f32, 1.0, (3, 4), &device).unwrap();
    let b = Tensor::randn(0f32, 1.0, 5, &device)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let strided = Tensor::randn(0f32, 1.0, (4, 3), &device)
        .unwrap()
        .t()
        .unwrap();
    let big = Tensor::randn(0f32, 1.0, (8, 16), &device).unwrap();
    let narrowed = big.i((2..5, 3..9)).unwrap();
    let c = Tensor::randn(0f32, 1.0, (2, 2, 2), &device)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let empty = Tensor::zeros((0, 3), DType::F32, &device).unwrap();
    let d = Tensor::randn(0f64, 1.0, 3, &device).unwrap();
    let tensors = vec![a, b, strided, narrowed, c, empty, d.clone(), d];
    // 32 bytes: most tensors get a bucket of their own, a few share one.
    for bucket_bytes in [32, 1 << 20] {
        let out = nccl.all_reduce_tensors(&tensors, bucket_bytes).unwrap();
        assert_eq!(out.len(), tensors.len());
        for (i, (got, want)) in out.iter().zip(&tensors).enumerate() {
            assert_eq!(got.dtype(), want.dtype(), "tensor {i}");
            assert_eq!(got.dims(), want.dims(), "tensor {i}");
            assert!(got.device().same_device(&device), "tensor {i}");
            let got = got.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            let want = want.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            assert_eq!(
                got.to_vec1::<f64>().unwrap(),
                want.to_vec1::<f64>().unwrap(),
                "tensor {i} with buckets of {bucket_bytes} bytes"
            );
        }
    }
    assert!(nccl.all_reduce_tensors(&[], 32).unwrap().is_empty());
    let cpu = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let err = nccl.all_reduce_tensors(&[cpu], 32).unwrap_err();
    assert!(matches!(err, CollectiveError::Config(_)), "{err}");
}

#[test]
fn one_rank_collective_connect_is_single() {
    let device = Device::new_cuda(0).unwrap();
    let c = collective::connect(&config(free_port(), 0, 1, TIMEOUT), &device).unwrap();
    assert_eq!(c.backend(), "single");
}

#[test]
fn missing_rank_is_a_rendezvous_error_not_a_hang() {
    let device = Device::new_cuda(0).unwrap();
    let started = Instant::now();
    let err = Nccl::connect(&config(free_port(), 0, 2, Duration::from_secs(2)), &device)
        .err()
        .expect("rank 1 never comes");
    assert!(matches!(err, CollectiveError::Rendezvous { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
}

/// Runs `f(rank, nccl, device)` on two ranks (threads, one GPU each).
fn on_two_gpus<T: Send + 'static>(
    timeout: Duration,
    f: impl Fn(usize, Nccl, Device) -> T + Send + Sync + Copy + 'static,
) -> Option<Vec<T>> {
    if gpus() < 2 {
        eprintln!("skipped: needs two GPUs");
        return None;
    }
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            thread::spawn(move || {
                let device = Device::new_cuda(rank).unwrap();
                let nccl = Nccl::connect(&config(port, rank, 2, timeout), &device).unwrap();
                f(rank, nccl, device)
            })
        })
        .collect();
    Some(handles.into_iter().map(|h| h.join().unwrap()).collect())
}

#[test]
fn two_ranks_sum_and_broadcast() {
    let Some(results) = on_two_gpus(TIMEOUT, |rank, nccl, device| {
        let mut buf = vec![rank as f32 + 1.0; 1001];
        nccl.all_reduce_sum(&mut buf).unwrap();
        assert!(buf.iter().all(|&v| v == 3.0));
        let mut data = if rank == 1 {
            vec![9u8; 12345]
        } else {
            vec![1, 2]
        };
        nccl.broadcast(&mut data, 1).unwrap();
        assert_eq!(data, vec![9u8; 12345]);
        let x = Tensor::full(rank as f32 + 1.0, (64, 33), &device).unwrap();
        let y = Tensor::full(10.0 * (rank as f32 + 1.0), 7, &device)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let out = nccl.all_reduce_tensors(&[x, y], 1024).unwrap();
        nccl.barrier().unwrap();
        (
            out[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            out[1]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        )
    }) else {
        return;
    };
    for (x, y) in results {
        assert!(x.iter().all(|&v| v == 3.0));
        assert_eq!(y, vec![30.0; 7]);
    }
}

#[test]
fn two_ranks_a_silent_peer_times_out_and_breaks_the_communicator() {
    let Some(results) = on_two_gpus(Duration::from_secs(3), |rank, nccl, _device| {
        if rank == 1 {
            // Never joins the all-reduce; stays alive past rank 0's timeout.
            thread::sleep(Duration::from_secs(8));
            return None;
        }
        let started = Instant::now();
        let err = nccl.all_reduce_sum(&mut [1.0f32; 16]).unwrap_err();
        let elapsed = started.elapsed();
        let later = nccl.barrier().unwrap_err();
        Some((err.to_string(), elapsed, later))
    }) else {
        return;
    };
    let Some((msg, elapsed, later)) = results.into_iter().flatten().next() else {
        panic!("rank 0 returned nothing");
    };
    assert!(msg.contains("no progress"), "{msg}");
    assert!(msg.contains("rank 0"), "{msg}");
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    assert!(matches!(later, CollectiveError::Broken { .. }), "{later}");
}
