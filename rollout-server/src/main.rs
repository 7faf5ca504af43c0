//! `rollout-server --model DIR [...]` (or `rollout-server DIR`, as `vllm serve`): see
//! `rollout_server::cli::Args`.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Before any tensor exists: see model::allocator.
    model::allocator::keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    rollout_server::cli::run(rollout_server::cli::Args::parse()).await
}
