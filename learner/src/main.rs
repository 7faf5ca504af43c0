//! `learner`: the GRPO learner's command line. Thin: parse flags, call the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use learner::recipe::Recipe;
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
        /// Resume even where the recipe differs from the checkpoint's in
        /// keys that change training (the learning rate, the data, the
        /// rewards...); without it such a resume is refused and the keys
        /// are named. The changes are recorded in run_log.jsonl.
        #[arg(long, requires = "resume_from")]
        allow_recipe_change: bool,
        /// Print the resolved recipe and exit.
        #[arg(long)]
        dry_run: bool,
        /// `auto`, `cpu`, `cuda` or `cuda:N` (sets `model.device`).
        #[arg(long)]
        device: Option<String>,
        /// `auto` (bf16 on CUDA, f32 on the CPU), `bf16`, `f16` or `f32`
        /// (sets `model.dtype`).
        #[arg(long)]
        dtype: Option<String>,
        /// `section.key=value` overrides.
        overrides: Vec<String>,
    },
    /// pass@k and mean@k of a model served by any OpenAI-compatible endpoint.
    Eval(learner::eval::EvalArgs),
    /// Rewrite a TRL / open-r1 GRPO recipe (one flat mapping of GRPOConfig
    /// keys), a verl configuration (its YAML, or a launch script's Hydra
    /// overrides) or an OpenRLHF launch script (train_ppo_ray's flags) as a
    /// Tandem recipe: each key in its section, the reward functions as
    /// reward.functions, the keys Tandem does not take listed at the end with
    /// what to do instead.
    ConvertRecipe {
        /// The TRL / open-r1 YAML file, the verl YAML or launch script, or the
        /// OpenRLHF launch script.
        file: PathBuf,
        /// Write the recipe here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Merge a PEFT LoRA adapter folder (adapter_config.json,
    /// adapter_model.safetensors; a Tandem checkpoint's adapter/ or TRL's)
    /// into its base model and write the merged model folder, as PEFT's
    /// merge_and_unload does: what vLLM and Tandem's rollout server serve.
    MergeAdapter {
        /// The base model folder.
        #[arg(long)]
        base: PathBuf,
        /// The PEFT adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a randomly initialised Qwen2-architecture model folder (Hugging
    /// Face format, character-level tokenizer, ChatML chat template).
    InitModel {
        /// `tiny` (~0.4M parameters), `small` (~21M) or `qwen2.5-0.5b`
        /// (Qwen2.5-0.5B's shape, random weights, bf16).
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
    // Before any tensor exists: see model::allocator.
    model::allocator::keep_freed_buffers();
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
            allow_recipe_change,
            dry_run,
            device,
            dtype,
            mut overrides,
        } => {
            // Flags are overrides like any other: the recipe check names them.
            overrides.extend(device.map(|d| format!("model.device={d}")));
            overrides.extend(dtype.map(|d| format!("model.dtype={d}")));
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
                allow_recipe_change,
            })?;
        }
        Command::Eval(args) => {
            println!("{}", learner::eval::run_command(args)?);
        }
        Command::ConvertRecipe { file, out } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let name = file.display().to_string();
            let converted =
                learner::recipe_import::convert_recipe(&text, &name).map_err(anyhow::Error::msg)?;
            match &out {
                Some(path) => std::fs::write(path, &converted.yaml)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{}", converted.yaml),
            }
            eprintln!(
                "converted {name}: {} key(s) left out (listed at the end of the recipe)",
                converted.left_out.len()
            );
            // What the learner would say about it, before a run does.
            let recipe =
                Recipe::from_yaml_str(&converted.yaml, "the converted recipe", &[] as &[&str])
                    .context(
                        "the converted recipe does not load yet; edit it where the error says",
                    )?;
            learner::rewards::RewardRegistry::from_section(&recipe.reward).context(
                "the converted recipe's reward functions do not load yet; edit them where the \
                 error says",
            )?;
        }
        Command::MergeAdapter { base, adapter, out } => {
            let cfg =
                model::lora::Lora::merge_folders(&base, &adapter, &out).with_context(|| {
                    format!(
                        "merging the adapter {} into {}",
                        adapter.display(),
                        base.display()
                    )
                })?;
            println!(
                "wrote {} with the adapter merged ({} parameters) to {}",
                cfg.architecture.hf_name(),
                cfg.num_parameters(),
                out.display()
            );
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
