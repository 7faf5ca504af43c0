//! Weight-sync throughput over loopback, next to a plain in-memory copy of
//! the same bytes.
//!
//! `bench_weight_sync [--preset small|tiny|qwen2.5-0.5b] [--iters N]
//! [--chunk-bytes N] [--device cpu|cuda:N] [--dtype auto|bfloat16|float32]`
//!
//! Starts the real `WeightSync` service on 127.0.0.1 in front of a sink that
//! holds the preset's weights on `--device`, and times full pushes through
//! the real client, from the learner's tensors on the device to the server's
//! tensors on the device: the device-to-host copy of the raw values, chunking,
//! HTTP/2 streaming, checksum, verification, the host-to-device copy and the
//! swap. Prints Markdown rows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use model::Weights;
use model::device::{DTypeSpec, DeviceSpec};
use model::presets::{self, Preset};
use proto::weight_sync::{Bytes, Client, DEFAULT_CHUNK_BYTES, TensorBytes, WireDType};
use rollout_server::weight_sync::{TensorSpec, WeightSink, serve};

struct Sink {
    device: Device,
    spec: BTreeMap<String, TensorSpec>,
    state: Mutex<(Weights, u64)>,
}

#[tonic::async_trait]
impl WeightSink for Sink {
    fn spec(&self) -> &BTreeMap<String, TensorSpec> {
        &self.spec
    }
    fn version(&self) -> u64 {
        self.state.lock().map(|s| s.1).unwrap_or(0)
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    async fn apply(&self, tensors: Vec<(String, Tensor)>, version: u64) -> Result<(), String> {
        let mut state = self.state.lock().map_err(|e| e.to_string())?;
        for (name, tensor) in tensors {
            state.0.insert(name, tensor);
        }
        state.1 = version;
        Ok(())
    }
}

/// The learner's conversion: raw little-endian values, one device-to-host copy.
fn tensor_bytes(name: &str, t: &Tensor) -> anyhow::Result<TensorBytes> {
    let wire = WireDType::try_from(t.dtype()).map_err(anyhow::Error::msg)?;
    let data = Bytes::from_owner(model::weights::host_values(t)?);
    Ok(TensorBytes::new(name, wire, t.dims().to_vec(), data))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    model::allocator::keep_freed_buffers();
    // RUST_LOG=info shows the server's receive / apply split per push.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut preset = Preset::Small;
    let mut iters = 5usize;
    let mut chunk_bytes = DEFAULT_CHUNK_BYTES;
    let mut device = DeviceSpec::Cpu;
    let mut dtype = DTypeSpec::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--preset" => preset = value.parse()?,
            "--iters" => iters = value.parse::<usize>()?.max(1),
            "--chunk-bytes" => chunk_bytes = value.parse()?,
            "--device" => device = value.parse()?,
            "--dtype" => dtype = value.parse()?,
            other => bail!(
                "unknown flag {other}: expected --preset, --iters, --chunk-bytes, --device or --dtype"
            ),
        }
    }

    let tok = presets::tokenizer()?;
    let id = |t: &str| tok.token_to_id(t).context("preset tokenizer");
    let cfg = presets::config(
        preset,
        tok.vocab_size(),
        id(presets::IM_END)?,
        id(presets::PAD_TOKEN)?,
    )?;
    let device = device.open()?;
    let dtype = dtype.resolve(&device)?;
    let weights = Weights::random(&cfg, 0, &device, dtype)?;
    let spec = weights
        .iter()
        .map(|(n, t)| {
            let spec = TensorSpec {
                shape: t.dims().to_vec(),
                dtype: t.dtype(),
            };
            (n.clone(), spec)
        })
        .collect();
    let params: usize = weights.iter().map(|(_, t)| t.elem_count()).sum();
    // The learner's side: its tensors on the device.
    let learner = Weights::random(&cfg, 1, &device, dtype)?;
    let to_bytes = || -> anyhow::Result<Vec<TensorBytes>> {
        learner.iter().map(|(n, t)| tensor_bytes(n, t)).collect()
    };
    let pushed = to_bytes()?;
    let bytes: usize = pushed.iter().map(|t| t.data.len()).sum();

    let sink = Arc::new(Sink {
        device: device.clone(),
        spec,
        state: Mutex::new((weights, 0)),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, sink.clone(), None, async {
        let _ = stopped.await;
    }));
    let client = Client::connect(&addr.to_string(), None, Duration::from_secs(10))
        .await?
        .with_chunk_bytes(chunk_bytes);

    // Warm-up push (connection windows, allocator), then the timed ones.
    client
        .push(pushed.iter().cloned(), 1, Duration::from_secs(120))
        .await?;
    let mut push_s = Vec::new();
    for i in 0..iters {
        let start = Instant::now();
        let result = client
            .push(to_bytes()?, 2 + i as u64, Duration::from_secs(120))
            .await?;
        device.synchronize()?;
        push_s.push(start.elapsed().as_secs_f64());
        anyhow::ensure!(result.bytes == bytes as u64, "short push");
    }
    let _ = stop.send(());
    let _ = server.await;

    // The same bytes copied in memory, tensor by tensor, into fresh buffers.
    let mut copy_s = Vec::new();
    for _ in 0..iters {
        let start = Instant::now();
        let copies: Vec<Vec<u8>> = pushed.iter().map(|t| t.data.to_vec()).collect();
        copy_s.push(start.elapsed().as_secs_f64());
        std::hint::black_box(copies);
    }

    let mb = bytes as f64 / 1e6;
    let (push, copy) = (median(push_s), median(copy_s));
    println!(
        "| preset | device | params | bytes | chunk | weight sync, loopback | in-memory copy | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {preset:?} | {} {dtype:?} | {:.1}M | {mb:.1} MB | {} KiB | {:.0} MB/s ({:.0} ms) | {:.0} MB/s ({:.1} ms) | {:.1}x |",
        model::device::device_name(&device),
        params as f64 / 1e6,
        chunk_bytes / 1024,
        mb / push,
        push * 1e3,
        mb / copy,
        copy * 1e3,
        push / copy,
    );
    Ok(())
}
