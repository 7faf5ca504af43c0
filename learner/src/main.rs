//! `learner`: the GRPO learner's command line. Thin: parse flags, call the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use learner::recipe::{ClientTagEcho, Recipe};
use learner::rollout::{RolloutClient, RolloutSettings};
use model::presets::{self, Preset};

#[derive(Parser)]
#[command(name = "learner", version, about = "Tandem's GRPO learner")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train with GRPO. Rank and world size from RANK / WORLD_SIZE /
    /// MASTER_ADDR / MASTER_PORT (torchrun's names); one rank without them.
    Train {
        /// Recipe (YAML); without it, the embedded configs/demo.yaml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A checkpoint folder (step_XXXXXX) or a run folder (its newest
        /// checkpoint).
        #[arg(long)]
        resume_from: Option<PathBuf>,
        /// Print the resolved recipe and exit.
        #[arg(long)]
        dry_run: bool,
        /// `section.key=value` overrides.
        overrides: Vec<String>,
    },
    /// pass@k and mean@k of a model served by any OpenAI-compatible endpoint.
    Eval {
        /// Base URL (`http://host:8000`).
        #[arg(long)]
        endpoint: String,
        /// Questions: JSONL or Parquet with the recipe's column mapping
        /// (default `prompt` and `answer`).
        #[arg(long)]
        tasks: PathBuf,
        /// Samples per question (the k of pass@k).
        #[arg(long, default_value_t = 1)]
        samples: usize,
        /// Folder to append eval_log.jsonl to (printed to stdout either way).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Recipe for the reward functions, prompt template, sampling and
        /// tokenizer (model.path); default: exact_match, template `{question}`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// `model` field of the requests (vLLM's --served-model-name).
        #[arg(long)]
        model: Option<String>,
        /// Evaluate the first N questions only.
        #[arg(long)]
        max_examples: Option<usize>,
        /// Sampling temperature (default: the recipe's eval.temperature).
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Accept responses without an echoed client tag (stock vLLM).
        #[arg(long)]
        ignore_client_tag: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a randomly initialised Qwen2-architecture model folder (Hugging
    /// Face format, character-level tokenizer, ChatML chat template).
    InitModel {
        /// `tiny` (~0.4M parameters) or `small` (~21M).
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        /// Folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights: the same seed gives the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train {
            config,
            resume_from,
            dry_run,
            overrides,
        } => {
            let recipe = match &config {
                Some(path) => Recipe::load(path, &overrides)?,
                None => Recipe::demo(&overrides)?,
            };
            if dry_run {
                print!("{}", recipe.resolved_yaml()?);
                return Ok(());
            }
            learner::train::train(learner::train::TrainArgs {
                recipe,
                resume_from,
            })?;
        }
        Command::Eval {
            endpoint,
            tasks,
            samples,
            out,
            api_key,
            config,
            model,
            max_examples,
            temperature,
            max_tokens,
            ignore_client_tag,
            seed,
        } => {
            let mut recipe = match &config {
                Some(path) => Recipe::load(path, &[] as &[&str])?,
                None => Recipe::from_yaml_str(
                    "model: {preset: tiny}\n\
                     data: {train_files: [unused.jsonl], prompt_template: \"{question}\"}\n\
                     rollout: {endpoints: [http://127.0.0.1:8000]}\n\
                     reward: {functions: [{name: exact_match}]}\n",
                    "(eval defaults)",
                    &[] as &[&str],
                )?,
            };
            recipe.data.eval_files = vec![learner::recipe::DataFile::new(tasks)];
            let tokenizer = match &recipe.model.path {
                Some(p) => Some(Arc::new(model::tokenizer::Tokenizer::from_dir(p)?)),
                None => None,
            };
            let (examples, _) = learner::data::load_eval_examples(
                &recipe.data,
                max_examples,
                tokenizer.as_deref(),
            )?;
            let settings = RolloutSettings {
                endpoints: vec![endpoint],
                api_key,
                model: model.or(recipe.rollout.model.clone()),
                num_generations: samples.max(1),
                max_completion_length: max_tokens,
                temperature: temperature.unwrap_or(recipe.eval.temperature) as f32,
                top_p: recipe.rollout.top_p as f32,
                top_k: recipe.rollout.top_k.map(i64::from),
                min_p: recipe.rollout.min_p.map(|p| p as f32),
                repetition_penalty: recipe.rollout.repetition_penalty as f32,
                client_tag: recipe
                    .rollout
                    .client_tag
                    .clone()
                    .unwrap_or_else(|| "eval".into()),
                client_tag_echo: if ignore_client_tag {
                    ClientTagEcho::Ignore
                } else {
                    recipe.rollout.client_tag_echo
                },
                request_timeout: Duration::from_secs_f64(recipe.rollout.request_timeout_s),
                max_retries: recipe.rollout.max_retries,
            };
            let client = RolloutClient::new(settings, tokenizer)?;
            let functions: Vec<serde_json::Value> = recipe
                .reward
                .functions
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            let rewards = learner::rewards::RewardRegistry::from_configs(&functions)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let result =
                rt.block_on(learner::eval::evaluate(&client, &rewards, &examples, seed))?;
            let line = serde_json::to_string(&result)?;
            println!("{line}");
            if let Some(out) = out {
                use std::io::Write;
                std::fs::create_dir_all(&out)?;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out.join("eval_log.jsonl"))?;
                writeln!(f, "{line}")?;
            }
        }
        Command::InitModel { preset, out, seed } => {
            let cfg = presets::init_model(preset, &out, seed)
                .with_context(|| format!("writing the {preset:?} model to {}", out.display()))?;
            println!(
                "wrote {} ({} parameters, vocabulary {}) to {}",
                cfg.architecture.hf_name(),
                cfg.num_parameters(),
                cfg.vocab_size,
                out.display()
            );
        }
    }
    Ok(())
}
