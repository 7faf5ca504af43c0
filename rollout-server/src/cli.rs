//! The command line (vLLM's flag names where vLLM has one) and [`run`], which
//! loads the model, starts the engine, and serves HTTP and gRPC until
//! SIGINT/SIGTERM.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use model::device::{DTypeSpec, DeviceSpec};
use model::sampling::LogprobsMode;
use model::tokenizer::Tokenizer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::engine::{self, EngineConfig};
use crate::metrics::Metrics;
use crate::server::{AppState, router, unix_now};
use crate::validation::Validator;
use crate::{kv_budget, weight_sync};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "rollout-server",
    version,
    about = "OpenAI/vLLM-compatible generation server with continuous batching and gRPC weight sync"
)]
pub struct Args {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, required_unless_present = "model_tag")]
    pub model: Option<PathBuf>,
    /// The model folder as `vllm serve MODEL` takes it.
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_tag: Option<PathBuf>,
    /// Name clients use in `model` (default: the `--model` argument as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port; 0 picks a free one (the bound ports are printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// gRPC weight-sync port; 0 picks a free one.
    #[arg(long, default_value_t = 50051)]
    pub grpc_port: u16,
    /// Clients of `/v1/*` must send `Authorization: Bearer KEY`.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Weight pushes must send `authorization: Bearer TOKEN`.
    #[arg(long, env = "TANDEM_WEIGHT_SYNC_TOKEN", hide_env_values = true)]
    pub weight_sync_token: Option<String>,
    /// `auto` (the first GPU if this build has CUDA and one answers, else
    /// the CPU), `cpu`, `cuda` or `cuda:N` (needs a `--features cuda` build).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Weights and activations: `auto` (bfloat16 on CUDA, float32 on the
    /// CPU), `bfloat16`, `float16` or `float32`. Log-probs are computed in f32.
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeSpec,
    /// Fraction of the GPU's memory this server may use (vLLM's flag): the
    /// weights and one step's activations first, the KV cache the rest,
    /// preallocated at start. Lower it when a learner shares the GPU. CUDA only.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Longest prompt + completion (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Sequences decoded together at most (KV-cache slots).
    #[arg(long, default_value_t = 128)]
    pub max_num_seqs: usize,
    /// Prompts waiting for admission at most; more get 429 at once.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Seeds the sampling of requests that bring no seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Which log-probs responses report: of the raw logits, or after
    /// penalties, temperature and top-k/top-p/min-p.
    #[arg(long, default_value = "raw_logprobs")]
    pub logprobs_mode: LogprobsMode,
    /// Most top log-probs a request may ask for (`logprobs`,
    /// `top_logprobs`, `prompt_logprobs`); -1: the whole vocabulary (vLLM's
    /// flag and default).
    #[arg(long, default_value_t = crate::validation::MAX_LOGPROBS as i64, allow_negative_numbers = true)]
    pub max_logprobs: i64,
    /// The chat template for `/v1/chat/completions` in place of the model
    /// folder's: a file's path, or the template itself (text with `{` or a
    /// line break), as vLLM's flag.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Serve `tool_choice: "auto"`: the calls the model writes come back as
    /// `tool_calls` (needs `--tool-call-parser`).
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// How the model writes tool calls: `hermes` (`<tool_call>{...}</tool_call>`:
    /// Qwen2.5, Qwen3, Hermes) or `llama3_json` (`{"name": ..., "parameters":
    /// ...}` as the whole output: Llama 3.1 / 3.2), as vLLM's flag.
    #[arg(long)]
    pub tool_call_parser: Option<String>,
    /// Send a reasoning model's thinking as `reasoning_content`, apart from
    /// `content`: `deepseek_r1` or `qwen3` (`<think>...</think>`), as
    /// vLLM's flag.
    #[arg(long)]
    pub reasoning_parser: Option<String>,
    /// Where the defaults of the sampling fields a request leaves out come
    /// from, as vLLM's flag: `auto` (the model folder's
    /// generation_config.json, when it has one: temperature, top_p, top_k,
    /// min_p, repetition_penalty, max_new_tokens), `vllm` (vLLM's own), or
    /// a folder holding a generation_config.json.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
}

/// `--generation-config`: the sampling defaults it names, said in the log
/// when they are not vLLM's own (as vLLM says it).
fn default_sampling(
    spec: &str,
    model_dir: &std::path::Path,
) -> anyhow::Result<crate::validation::DefaultSampling> {
    use crate::validation::DefaultSampling;
    let file = match spec {
        "vllm" => return Ok(DefaultSampling::default()),
        "auto" => {
            let f = model_dir.join("generation_config.json");
            if !f.exists() {
                return Ok(DefaultSampling::default());
            }
            f
        }
        dir => std::path::Path::new(dir).join("generation_config.json"),
    };
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "--generation-config {spec}: reading {} (give `auto`, `vllm`, or a folder holding              a generation_config.json)",
            file.display()
        )
    })?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--generation-config: {} is not JSON", file.display()))?;
    let (defaults, set) = DefaultSampling::from_generation_config(&config);
    if !set.is_empty() {
        tracing::warn!(
            "default sampling parameters are those of {}: {}; a request's own fields still win              (--generation-config vllm keeps vLLM's defaults)",
            file.display(),
            set.join(", ")
        );
    }
    Ok(defaults)
}

/// Resolves once SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Loads the model, starts the engine, serves until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = bind(args).await?;
    // One parseable line on stdout for scripts and tests.
    println!(
        "listening http={} grpc={}",
        server.http_addr, server.grpc_addr
    );
    server.serve(shutdown_signal()).await
}

/// A server with its model loaded, its engine running and its ports bound,
/// not yet serving.
pub struct BoundServer {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub engine: engine::EngineHandle,
    http: TcpListener,
    grpc: TcpListener,
    state: Arc<AppState>,
    weight_sync_token: Option<String>,
}

impl Args {
    /// The model folder, given by `--model` or positionally.
    pub fn model_dir(&self) -> anyhow::Result<&std::path::Path> {
        self.model
            .as_deref()
            .or(self.model_tag.as_deref())
            .ok_or_else(|| anyhow::anyhow!("no model: give --model DIR (or DIR alone)"))
    }
}

/// Loads the model, starts the engine and binds both ports.
pub async fn bind(args: Args) -> anyhow::Result<BoundServer> {
    let model_dir = args.model_dir()?.to_path_buf();
    kv_budget::check_utilization(args.gpu_memory_utilization)?;
    anyhow::ensure!(
        args.max_logprobs >= -1,
        "--max-logprobs must be >= 0, or -1 for the whole vocabulary; got {}",
        args.max_logprobs
    );
    let tool_parser = match &args.tool_call_parser {
        None => None,
        Some(p) => Some(crate::tools::ToolParser::from_name(p).ok_or_else(|| {
            anyhow::anyhow!(
                "--tool-call-parser {p} is not one this server has; it has {}",
                crate::tools::PARSERS.join(", ")
            )
        })?),
    };
    anyhow::ensure!(
        !args.enable_auto_tool_choice || tool_parser.is_some(),
        "--enable-auto-tool-choice needs --tool-call-parser ({})",
        crate::tools::PARSERS.join(" or ")
    );
    let auto_tools = tool_parser.filter(|_| args.enable_auto_tool_choice);
    let reasoning_parser = match &args.reasoning_parser {
        None => None,
        Some(name) => Some(
            crate::reasoning::ReasoningParser::from_name(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "--reasoning-parser {name} is not one this server has; it has {}",
                    crate::reasoning::PARSERS.join(", ")
                )
            })?,
        ),
    };
    let device = args.device.open()?;
    let dtype = args.dtype.resolve(&device)?;
    let cfg = model::ModelConfig::from_dir(&model_dir)
        .with_context(|| format!("loading the model config from {}", model_dir.display()))?;
    let max_model_len = args.max_model_len.unwrap_or(cfg.max_position_embeddings);
    let mut tokenizer = Tokenizer::from_dir(&model_dir)
        .with_context(|| format!("loading the tokenizer from {}", model_dir.display()))?;
    if let Some(spec) = &args.chat_template {
        tokenizer = model::tokenizer::chat_template_text(spec)
            .and_then(|text| tokenizer.with_chat_template(&text))
            .context("--chat-template")?;
    }
    let tokenizer = Arc::new(tokenizer);
    let defaults = default_sampling(&args.generation_config, &model_dir)?;
    // As vLLM: the `--model` argument as given, unless a name is set.
    let served_model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| model_dir.display().to_string());
    let metrics = Arc::new(Metrics::new());
    let mut config = EngineConfig {
        max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_queue: args.max_queue,
        seed: args.seed,
        logprobs_mode: args.logprobs_mode,
        ..EngineConfig::default()
    };
    tracing::info!(
        model = %model_dir.display(),
        served_model_name,
        device = model::device::device_name(&device),
        dtype = ?dtype,
        "loading"
    );
    let memory_before = model::device::gpu_memory(&device)?;
    let weights = model::Weights::load(&model_dir, &device, dtype)
        .with_context(|| format!("loading the weights from {}", model_dir.display()))?;
    let bytes_per_slot = model::KvCache::bytes_per_slot(&cfg, max_model_len, dtype);
    if let (Some((free_before, total)), Some((free_after, _))) =
        (memory_before, model::device::gpu_memory(&device)?)
    {
        let budget = kv_budget::kv_cache_slots(kv_budget::KvBudgetInput {
            total,
            free_after_load: free_after,
            weights: free_before.saturating_sub(free_after),
            activations: kv_budget::activation_reserve(
                &cfg,
                config.max_prefill_tokens,
                args.max_num_seqs,
                max_model_len,
                dtype,
            ),
            utilization: args.gpu_memory_utilization,
            bytes_per_slot,
            max_num_seqs: args.max_num_seqs,
            max_model_len,
        })?;
        if budget.slots < args.max_num_seqs {
            tracing::warn!(
                "--gpu-memory-utilization {} leaves room for {} sequences of {} tokens, not --max-num-seqs {}: at most {} are decoded together",
                args.gpu_memory_utilization,
                budget.slots,
                max_model_len,
                args.max_num_seqs,
                budget.slots
            );
        }
        config.max_num_seqs = budget.slots;
    }
    tracing::info!(
        max_model_len,
        max_num_seqs = config.max_num_seqs,
        kv_cache_mib = (bytes_per_slot * config.max_num_seqs) >> 20,
        "KV cache"
    );
    let engine = engine::start(cfg.clone(), weights, config.clone(), metrics.clone())
        .with_context(|| format!("starting the engine on {}", model_dir.display()))?;
    let state = Arc::new(AppState {
        engine: engine.clone(),
        tokenizer: tokenizer.clone(),
        validator: Validator {
            token_bytes: Arc::new(
                model::guided::TokenBytes::from_tokenizer(&tokenizer)
                    .context("reading the tokenizer's token bytes (guided decoding)")?,
            ),
            eos_token_ids: cfg.eos_token_ids.clone(),
            guides: Default::default(),
            auto_tools,
            reasoning_parser,
            defaults,
            tokenizer,
            served_model_name: served_model_name.clone(),
            max_model_len,
            vocab_size: cfg.vocab_size,
            max_logprobs: match usize::try_from(args.max_logprobs) {
                Ok(k) => k,
                Err(_) => cfg.vocab_size,
            },
        },
        metrics,
        served_model_name,
        max_model_len,
        api_key: args.api_key.clone(),
        started: unix_now(),
    });
    let http = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding HTTP on {}:{}", args.host, args.port))?;
    let grpc = TcpListener::bind((args.host.as_str(), args.grpc_port))
        .await
        .with_context(|| format!("binding gRPC on {}:{}", args.host, args.grpc_port))?;
    let http_addr = http.local_addr()?;
    let grpc_addr = grpc.local_addr()?;
    tracing::info!(%http_addr, %grpc_addr, "listening");
    Ok(BoundServer {
        http_addr,
        grpc_addr,
        engine,
        http,
        grpc,
        state,
        weight_sync_token: args.weight_sync_token,
    })
}

impl BoundServer {
    /// Serves HTTP and gRPC until `shutdown` resolves, then closes both
    /// (open streams get a few seconds).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let model_name = self.state.served_model_name.clone();
        let wait_stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let http_task = tokio::spawn(
            axum::serve(self.http, router(self.state))
                .with_graceful_shutdown(wait_stop(stop_rx.clone()))
                .into_future(),
        );
        let sink: Arc<dyn weight_sync::WeightSink> = Arc::new(self.engine.clone());
        let grpc_config = weight_sync::WeightSyncConfig {
            token: self.weight_sync_token,
            model_name,
            ..Default::default()
        };
        let grpc_task = tokio::spawn(weight_sync::serve_with(
            self.grpc,
            sink,
            grpc_config,
            wait_stop(stop_rx.clone()),
        ));

        shutdown.await;
        let _ = stop_tx.send(true);
        // Open SSE streams would hold a graceful shutdown forever: give them a moment.
        let grace = std::time::Duration::from_secs(5);
        match tokio::time::timeout(grace, http_task).await {
            Ok(Ok(Err(e))) => tracing::warn!("HTTP server: {e}"),
            Err(_) => tracing::warn!("HTTP connections still open after {grace:?}; closing"),
            _ => {}
        }
        match tokio::time::timeout(grace, grpc_task).await {
            Ok(Ok(Err(e))) => tracing::warn!("gRPC server: {e}"),
            Err(_) => tracing::warn!("gRPC connections still open after {grace:?}; closing"),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_model_comes_by_flag_or_as_vllm_serve_takes_it() {
        let parse = |args: &[&str]| Args::try_parse_from([&["rollout-server"], args].concat());
        let a = parse(&["/m/qwen"]).unwrap();
        assert_eq!(a.model_dir().unwrap(), std::path::Path::new("/m/qwen"));
        let a = parse(&["--model", "/m/qwen", "--max-logprobs", "-1"]).unwrap();
        assert_eq!(a.model_dir().unwrap(), std::path::Path::new("/m/qwen"));
        assert_eq!(a.max_logprobs, -1);
        let e = parse(&[]).unwrap_err().to_string();
        assert!(e.contains("--model"), "{e}");
        assert!(parse(&["--model", "/a", "/b"]).is_err(), "one model");
    }
}
