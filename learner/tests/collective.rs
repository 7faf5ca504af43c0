//! The TCP ring on loopback: ranks are threads of this process with real
//! sockets; rendezvous on a free port. Also one test with real processes
//! (this test binary re-executed as ranks).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use e2e::free_port;
use learner::collective::{
    Collective, CollectiveError, SingleRank, TcpRing, TcpRingConfig, all_reduce_tensors,
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn config(port: u16, rank: usize, w: usize, timeout: Duration) -> TcpRingConfig {
    TcpRingConfig::new("127.0.0.1", port, rank, w)
        .with_timeout(timeout)
        .with_rendezvous_timeout(timeout)
}

/// Runs `f(ring)` on `w` ranks (threads) and returns their results by rank.
fn on_ranks<T: Send + 'static>(
    w: usize,
    f: impl Fn(TcpRing) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let port = free_port();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..w)
        .map(|rank| {
            let f = f.clone();
            thread::spawn(move || {
                let ring = TcpRing::connect(&config(port, rank, w, TIMEOUT)).unwrap();
                f(ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const SIZES: &[usize] = &[0, 1, 2, 3, 5, 7, 64, 1000, 4099, 300_001];

#[test]
fn all_reduce_sums_and_is_bit_identical_on_2_3_4_ranks() {
    for w in [2usize, 3, 4] {
        let results = on_ranks(w, move |ring| {
            let rank = ring.rank();
            SIZES
                .iter()
                .map(|&n| {
                    let mut buf = values(rank as u64 * 1000 + n as u64, n);
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for (i, &n) in SIZES.iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..w)
                .map(|r| values(r as u64 * 1000 + n as u64, n))
                .collect();
            for r in 1..w {
                let a: Vec<u32> = results[0][i].iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = results[r][i].iter().map(|v| v.to_bits()).collect();
                assert!(a == b, "w={w} n={n}: rank {r} differs from rank 0");
            }
            for j in 0..n {
                let direct: f64 = inputs.iter().map(|v| v[j] as f64).sum();
                let got = results[0][i][j] as f64;
                assert!(
                    (got - direct).abs() <= 1e-5,
                    "w={w} n={n} [{j}]: {got} vs direct {direct}"
                );
            }
        }
    }
}

#[test]
fn all_reduce_f64_broadcast_and_barrier() {
    let results = on_ranks(3, |ring| {
        let rank = ring.rank();
        let mut v = vec![rank as f64 + 0.5, 1e10, -(rank as f64)];
        ring.all_reduce_sum_f64(&mut v).unwrap();

        ring.barrier().unwrap();

        // Broadcast from every root, including empty and multi-piece payloads.
        let mut got = Vec::new();
        for root in 0..3 {
            for len in [0usize, 3, 2_500_000] {
                let mut data = if rank == root {
                    (0..len).map(|i| (i * 7 + root) as u8).collect()
                } else {
                    vec![9u8; 5]
                };
                ring.broadcast(&mut data, root).unwrap();
                got.push(data);
            }
        }
        ring.barrier().unwrap();
        (v, got)
    });
    for (v, got) in &results {
        assert_eq!(v, &vec![0.5 + 1.5 + 2.5, 3e10, -3.0]);
        let mut k = 0;
        for root in 0..3 {
            for len in [0usize, 3, 2_500_000] {
                let expected: Vec<u8> = (0..len).map(|i| (i * 7 + root) as u8).collect();
                assert!(got[k] == expected, "broadcast root {root} len {len}");
                k += 1;
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    let started = Instant::now();
    let times = on_ranks(3, move |ring| {
        if ring.rank() == 2 {
            thread::sleep(Duration::from_millis(300));
        }
        ring.barrier().unwrap();
        started.elapsed()
    });
    for t in times {
        assert!(
            t >= Duration::from_millis(300),
            "left the barrier after {t:?}"
        );
    }
}

#[test]
fn world_size_one_and_single_rank_are_no_ops() {
    let ring = TcpRing::connect(&TcpRingConfig::new("127.0.0.1", 1, 0, 1)).unwrap();
    let mut buf = vec![1.0f32, 2.0];
    ring.all_reduce_sum(&mut buf).unwrap();
    ring.barrier().unwrap();
    let mut data = vec![1u8];
    ring.broadcast(&mut data, 0).unwrap();
    assert_eq!((buf, data), (vec![1.0, 2.0], vec![1u8]));
    assert!(ring.broadcast(&mut vec![], 1).is_err());
    let single = SingleRank;
    let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let out = all_reduce_tensors(&single, &[t]).unwrap();
    assert_eq!(out[0].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn all_reduce_tensors_buckets_and_restores_shapes_and_dtypes() {
    let results = on_ranks(2, |ring| {
        let r = ring.rank() as f32 + 1.0;
        let dev = Device::Cpu;
        let a = (Tensor::ones((3, 4), candle_core::DType::F32, &dev).unwrap() * r as f64).unwrap();
        let b = Tensor::new(&[r, 2.0 * r, 3.0 * r], &dev).unwrap();
        let c = Tensor::new(&[[r as f64; 2]; 2], &dev).unwrap();
        // 16-byte buckets: every tensor spans or fills its own bucket.
        let out = ring
            .all_reduce_tensors(&[a.clone(), b.clone(), c.clone()], 16)
            .unwrap();
        let out2 = all_reduce_tensors(&ring, &[a, b, c]).unwrap();
        (out, out2)
    });
    for (out, out2) in results {
        for o in [&out, &out2] {
            assert_eq!(o[0].dims(), &[3, 4]);
            assert_eq!(
                o[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                vec![3.0; 12]
            );
            assert_eq!(o[1].to_vec1::<f32>().unwrap(), vec![3.0, 6.0, 9.0]);
            assert_eq!(o[2].dtype(), candle_core::DType::F64);
            assert_eq!(o[2].to_vec2::<f64>().unwrap(), vec![vec![3.0; 2]; 2]);
        }
    }
}

#[test]
fn a_rank_that_never_comes_fails_every_other_rank_within_the_timeout() {
    let port = free_port();
    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    // World size 3; rank 2 never starts.
    let handles: Vec<_> = (0..2)
        .map(|rank| thread::spawn(move || TcpRing::connect(&config(port, rank, 3, timeout)).err()))
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let err = h.join().unwrap().expect("rendezvous should fail");
        let msg = err.to_string();
        assert!(matches!(err, CollectiveError::Rendezvous { .. }), "{msg}");
        assert!(
            msg.contains(&format!("rank {rank}")) && msg.contains("[2]"),
            "{msg}"
        );
    }
    assert!(
        started.elapsed() < timeout + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_missing_rank_zero_is_named() {
    let port = free_port();
    let err = TcpRing::connect(&config(port, 1, 2, Duration::from_millis(500)))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("rank 1") && msg.contains("rank 0"), "{msg}");
}

#[test]
fn a_peer_that_closes_mid_way_is_an_error_not_a_hang() {
    let started = Instant::now();
    let results = on_ranks(3, |ring| {
        let mut buf = vec![1.0f32; 1000];
        ring.all_reduce_sum(&mut buf).unwrap();
        if ring.rank() == 1 {
            drop(ring); // rank 1 dies after the first all-reduce
            return None;
        }
        let mut big = vec![1.0f32; 1_000_000];
        let first = ring.all_reduce_sum(&mut big).err();
        // Every later call fails at once, naming the first error.
        let later = ring.barrier().err();
        Some((first, later))
    });
    for (rank, r) in results.into_iter().enumerate() {
        let Some((first, later)) = r else { continue };
        let first = first.unwrap_or_else(|| panic!("rank {rank}: all-reduce succeeded"));
        let msg = first.to_string();
        assert!(msg.contains(&format!("rank {rank}:")), "{msg}");
        assert!(
            msg.contains("closed the connection") || msg.contains("rank 1"),
            "{msg}"
        );
        assert!(
            matches!(later, Some(CollectiveError::Broken { .. })),
            "{later:?}"
        );
    }
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
}

#[test]
fn a_silent_peer_times_out_naming_it() {
    let timeout = Duration::from_millis(700);
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            thread::spawn(move || {
                let ring = TcpRing::connect(&config(port, rank, 2, timeout)).unwrap();
                if rank == 1 {
                    // Alive but never joins the all-reduce.
                    thread::sleep(Duration::from_secs(3));
                    return None;
                }
                let started = Instant::now();
                let err = ring.all_reduce_sum(&mut [1.0f32; 10]).err();
                Some((err, started.elapsed()))
            })
        })
        .collect();
    let (err, took) = handles.into_iter().next().unwrap().join().unwrap().unwrap();
    let msg = err.expect("should time out").to_string();
    assert!(
        msg.contains("rank 0") && msg.contains("rank 1") && msg.contains("within"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn mismatched_lengths_are_an_error() {
    let results = on_ranks(2, |ring| {
        let mut buf = vec![1.0f32; 10 + ring.rank()];
        ring.all_reduce_sum(&mut buf).err().map(|e| e.to_string())
    });
    assert!(
        results.iter().any(|e| e
            .as_deref()
            .is_some_and(|m| m.contains("different lengths"))),
        "{results:?}"
    );
}

/// Real processes: this binary re-executed as ranks 1..W with torchrun's
/// environment variables; this process is rank 0.
#[test]
fn ranks_as_processes() {
    if let Ok(rank) = std::env::var("TANDEM_TEST_RING_CHILD") {
        // Child: join, all-reduce, print the bits. (Only when re-executed.)
        let _ = rank;
        let ring = TcpRing::from_env().unwrap();
        let mut buf = values(ring.rank() as u64, 1001);
        ring.all_reduce_sum(&mut buf).unwrap();
        let sum: u64 = buf.iter().map(|v| v.to_bits() as u64).sum();
        println!("CHILD_RESULT {sum}");
        return;
    }
    let w = 3;
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (1..w)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "ranks_as_processes",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TANDEM_TEST_RING_CHILD", "1")
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", w.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ring = TcpRing::connect(&config(port, 0, w, TIMEOUT)).unwrap();
    let mut buf = values(0, 1001);
    ring.all_reduce_sum(&mut buf).unwrap();
    let sum: u64 = buf.iter().map(|v| v.to_bits() as u64).sum();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("CHILD_RESULT {sum}")), "{stdout}");
    }
}
