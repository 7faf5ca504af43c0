//! All-reduce throughput of the TCP ring over loopback (ranks are threads of
//! this process, each with its own sockets), next to a plain memory copy of
//! the same bytes. Prints Markdown rows.
//!
//! `cargo run --release -p learner --bin bench_allreduce -- [--ranks 2] [--sizes-mb 1,16,85]`
//!
//! "MB/s" is the buffer size divided by the time of one all-reduce (NCCL's
//! "algorithm bandwidth"); each rank sends and receives `2 (W-1)/W` times
//! that ("bus bandwidth", the same for W = 2).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use learner::collective::{Collective, TcpRing, TcpRingConfig};

#[derive(Parser)]
#[command(about = "All-reduce throughput of the TCP ring over loopback")]
struct Args {
    /// Number of ranks (threads).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Buffer sizes in MB (10^6 bytes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,85")]
    sizes_mb: Vec<f64>,
    /// Minimum measuring time per size, in seconds (at least 3 repetitions).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.ranks >= 1, "--ranks must be at least 1");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let budget = Duration::from_secs_f64(args.seconds);
    let sizes: Vec<usize> = args
        .sizes_mb
        .iter()
        .map(|mb| (mb * 1e6 / 4.0) as usize)
        .collect();

    // Every rank runs the same schedule; rank 0 reports its times (the
    // all-reduce ends at about the same moment on every rank).
    let handles: Vec<_> = (0..args.ranks)
        .map(|rank| {
            let sizes = sizes.clone();
            let w = args.ranks;
            std::thread::spawn(move || -> Result<Vec<(usize, Duration)>> {
                let ring = TcpRing::connect(&TcpRingConfig::new("127.0.0.1", port, rank, w))?;
                let mut out = Vec::new();
                for &n in &sizes {
                    let mut buf = vec![1.0f32; n];
                    ring.all_reduce_sum(&mut buf)?; // warm-up
                    // Rank 0 decides the repetition count so all ranks agree.
                    let mut reps = vec![0u8; 8];
                    if rank == 0 {
                        let t = Instant::now();
                        ring.all_reduce_sum(&mut buf)?;
                        let once = t.elapsed().as_secs_f64().max(1e-6);
                        let r = ((budget.as_secs_f64() / once).ceil() as u64).clamp(3, 1000);
                        reps = r.to_le_bytes().to_vec();
                    } else {
                        ring.all_reduce_sum(&mut buf)?;
                    }
                    ring.broadcast(&mut reps, 0)?;
                    let reps = u64::from_le_bytes(
                        reps.try_into()
                            .map_err(|_| anyhow::anyhow!("bad broadcast"))?,
                    );
                    ring.barrier()?;
                    let t = Instant::now();
                    for _ in 0..reps {
                        ring.all_reduce_sum(&mut buf)?;
                    }
                    out.push((n, t.elapsed() / reps as u32));
                }
                Ok(out)
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
    }
    let rank0 = results.into_iter().next().context("no ranks")?;

    println!("| ranks | buffer | all-reduce | all-reduce MB/s | bus MB/s | memcpy | memcpy MB/s |");
    println!("|---|---|---|---|---|---|---|");
    let w = args.ranks as f64;
    for (n, t) in rank0 {
        let bytes = (n * 4) as f64;
        let copy = time_memcpy(n, budget);
        let mbps = |d: Duration| bytes / 1e6 / d.as_secs_f64();
        println!(
            "| {} | {:.0} MB | {:.2} ms | {:.0} | {:.0} | {:.2} ms | {:.0} |",
            args.ranks,
            bytes / 1e6,
            t.as_secs_f64() * 1e3,
            mbps(t),
            mbps(t) * 2.0 * (w - 1.0) / w,
            copy.as_secs_f64() * 1e3,
            mbps(copy),
        );
    }
    Ok(())
}

/// Time of one `copy_from_slice` of `n` f32s between two allocated buffers.
fn time_memcpy(n: usize, budget: Duration) -> Duration {
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    dst.copy_from_slice(&src); // fault the pages in
    let start = Instant::now();
    let mut reps = 0u32;
    while reps < 3 || start.elapsed() < budget {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        reps += 1;
    }
    start.elapsed() / reps
}
