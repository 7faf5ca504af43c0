//! Python tool calls through the learner's tool runner, as a rollout makes
//! them: what one call costs on top of the function (a JSON line each way
//! to the tools' `python3` process), and how many calls of an I/O-bound
//! tool (a sleep standing in for a sandbox or a search API) finish per
//! second when every completion of a batch calls at once: a plain `def`
//! (one call at a time per process, `rollout.python_tool_processes` of
//! them) or an `async def` (its calls run at once in one process).
//!
//! `cargo run --release -p learner --bin bench_tool_calls -- [--calls 128]
//! [--io-ms 50]`; prints a Markdown table.

use std::time::Instant;

use anyhow::{Context, bail};
use learner::recipe::{Recipe, Tool};
use learner::tools::ToolRunner;

const TOOLS: &str = r#"
import asyncio
import time


def noop() -> int:
    """Does nothing."""
    return 0


def fetch(ms: int) -> str:
    """Waits as a blocking request would.

    Args:
        ms: How long, in milliseconds.
    """
    time.sleep(ms / 1000)
    return "done"


async def fetch_async(ms: int) -> str:
    """Waits as an awaited request would.

    Args:
        ms: How long, in milliseconds.
    """
    await asyncio.sleep(ms / 1000)
    return "done"
"#;

fn runner(file: &std::path::Path, processes: usize) -> anyhow::Result<ToolRunner> {
    let mut recipe = Recipe::default();
    recipe.rollout.python_tool_processes = processes;
    recipe.rollout.tool_timeout_s = 600.0;
    recipe.rollout.tools = ["noop", "fetch", "fetch_async"]
        .iter()
        .map(|f| Tool {
            python: Some(format!("{}:{f}", file.display())),
            ..Tool::default()
        })
        .collect();
    ToolRunner::from_recipe(&recipe)?.context("no tools")
}

/// `calls` calls of `tool` at once; the seconds until the last returns.
async fn at_once(r: &ToolRunner, tool: &str, arguments: &str, calls: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let results =
        futures::future::join_all((0..calls).map(|_| r.call(tool, arguments, None))).await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        bail!("{tool}: {e}");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let (mut calls, mut io_ms) = (128usize, 50u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a number"))?;
        match arg.as_str() {
            "--calls" => calls = value.parse().context("--calls needs a number")?,
            "--io-ms" => io_ms = value.parse().context("--io-ms needs a number")?,
            other => bail!("unknown argument {other:?}: expected --calls N, --io-ms N"),
        }
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bench_tools.py");
    std::fs::write(&file, TOOLS)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("| tool | processes | {calls} calls at once | calls/s |");
        println!("|---|---|---|---|");
        let one = runner(&file, 1)?;
        // The process starts (and imports) on the first call.
        one.call("noop", "{}", None)
            .await
            .map_err(anyhow::Error::msg)?;
        let n = 2000;
        let started = Instant::now();
        for _ in 0..n {
            one.call("noop", "{}", None)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let each = started.elapsed().as_secs_f64() / n as f64;
        println!(
            "| `def noop()`, one after the other | 1 | {:.1} µs a call | {:.0} |",
            each * 1e6,
            1.0 / each
        );
        let sleep = format!("{{\"ms\": {io_ms}}}");
        for processes in [1, 8] {
            let r = runner(&file, processes)?;
            // Start the processes before timing.
            at_once(&r, "noop", "{}", processes).await?;
            let s = at_once(&r, "fetch", &sleep, calls).await?;
            println!(
                "| `def fetch()`, {io_ms} ms of blocking I/O | {processes} | {s:.2} s | {:.0} |",
                calls as f64 / s
            );
        }
        let s = at_once(&one, "fetch_async", &sleep, calls).await?;
        println!(
            "| `async def fetch_async()`, {io_ms} ms awaited | 1 | {s:.2} s | {:.0} |",
            calls as f64 / s
        );
        Ok(())
    })
}
