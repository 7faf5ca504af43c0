//! Generation throughput through the real HTTP server (in this process, on a
//! loopback port): `cargo run --release -p rollout-server --bin
//! bench_generation [tiny|small]...`. Two workloads per preset model:
//! - GRPO-style groups: 32 prompts x n=8 x 16 new tokens, the 32 requests
//!   sent at once;
//! - 64 concurrent clients, each sending requests of n=1 x 16 new tokens one
//!   after another (4 each).
//!
//! Prints Markdown table rows (the README's numbers come from it).

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use model::presets::{Preset, init_model};
use rollout_server::cli::{Args, bind};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const NEW_TOKENS: u64 = 16;

/// Sends `body` and returns the generated-token count it reports.
async fn complete(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<u64> {
    let r = client.post(url).json(body).send().await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if !status.is_success() {
        bail!("status {status}: {v}");
    }
    v["usage"]["completion_tokens"]
        .as_u64()
        .context("response without usage")
}

fn prompt(i: usize) -> String {
    format!(
        "Question {i}: what is {} + {}? Answer: ",
        i * 7 % 100,
        i * 13 % 100
    )
}

/// 32 requests of n=8 at once; returns (tokens, seconds).
async fn groups(client: &reqwest::Client, url: &str) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let client = client.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                let body = json!({"prompt": prompt(i), "n": 8, "max_tokens": NEW_TOKENS,
                                  "ignore_eos": true, "temperature": 1.0});
                complete(&client, &url, &body).await
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await??;
    }
    Ok((tokens, start.elapsed().as_secs_f64()))
}

/// 64 clients x 4 sequential requests of n=1; returns (tokens, seconds).
async fn clients(client: &reqwest::Client, url: &str) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|c| {
            let client = client.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                let mut tokens = 0;
                for r in 0..4 {
                    let body = json!({"prompt": prompt(c * 4 + r), "max_tokens": NEW_TOKENS,
                                      "ignore_eos": true});
                    tokens += complete(&client, &url, &body).await?;
                }
                anyhow::Ok(tokens)
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await??;
    }
    Ok((tokens, start.elapsed().as_secs_f64()))
}

async fn bench(name: &str, preset: Preset) -> anyhow::Result<()> {
    // Written afresh each time: a folder left by an older build could hold
    // another version of the preset.
    let dir = std::env::temp_dir().join(format!("tandem-bench-{name}-seed0"));
    let _ = std::fs::remove_dir_all(&dir);
    init_model(preset, &dir, 0)?;
    let args = Args::parse_from([
        "rollout-server",
        "--model",
        &dir.display().to_string(),
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "256",
    ]);
    let server = bind(args).await?;
    let url = format!("http://{}/v1/completions", server.http_addr);
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()?;
    // Warm-up.
    complete(&client, &url, &json!({"prompt": "warm", "max_tokens": 4})).await?;
    let (t, s) = groups(&client, &url).await?;
    println!(
        "| {name} | 32 prompts x n=8 x {NEW_TOKENS} tokens | {t} | {s:.2} | {:.0} |",
        t as f64 / s
    );
    let (t, s) = clients(&client, &url).await?;
    println!(
        "| {name} | 64 concurrent clients x 4 requests x {NEW_TOKENS} tokens | {t} | {s:.2} | {:.0} |",
        t as f64 / s
    );
    let _ = stop.send(());
    serving.await??;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    model::allocator::keep_freed_buffers();
    let mut which: Vec<String> = std::env::args().skip(1).collect();
    if which.is_empty() {
        which = vec!["tiny".into(), "small".into()];
    }
    println!("| model | workload | generated tokens | seconds | tokens/s |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for name in &which {
        let preset: Preset = name.parse()?;
        bench(name, preset).await?;
    }
    Ok(())
}
