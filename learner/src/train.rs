//! The GRPO loop: `learner train`. One process per rank; rank and world from
//! torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! One step on rank r of W (DESIGN.md, "One GRPO step"):
//! 1. the next prompts of its shard ([`PromptSource`], strided: W ranks x B
//!    prompts are the same prompts as 1 rank x W·B); each request is seeded
//!    by a hash of (train.seed, step, file, row), so a prompt gets the same
//!    completions whichever rank asks for it;
//! 2. generate (or take the batch prefetched during the previous step with
//!    `async_lag: 1`); groups with a foreign echoed tag are dropped, counted
//!    and logged;
//! 3. score; the rewards are all-gathered (a zero-padded global vector
//!    summed over ranks, in the global strided order) so the advantages are
//!    computed on the global batch, bit-identically on every rank; with
//!    `train.dynamic_sampling`, groups without a learning signal are left
//!    out and further rounds of prompts generated (steps 1-3 again) until the
//!    step's groups are found ([`crate::dynamic_sampling`]);
//! 4. pad; policy log-probs (with the sampling temperature), old log-probs
//!    when the policy will move before the batch is used up
//!    (`num_iterations > 1`, or more than one update per generation),
//!    reference log-probs when `beta > 0`, the server's log-probs for the
//!    importance-sampling correction;
//! 5. `num_iterations` passes over the batch, each of
//!    `steps_per_generation / gradient_accumulation_steps` optimizer updates
//!    on consecutive parts of it: micro-batches with gradient accumulation,
//!    global normalisers (per update), gradient all-reduce (sum), NaN/inf
//!    guard, clip, AdamW;
//! 6. rank 0 pushes the weights to every WeightSync endpoint, then a barrier;
//! 7. logs (train_log.jsonl on rank 0; every rank > 0 writes its weights'
//!    fingerprint to `ranks/rank_R.jsonl`); checkpoint as `save_strategy`
//!    says (every `save_steps`, or each epoch's end) and at the end; eval
//!    likewise, and at the start and end (rank 0).
//!
//! The loop is synchronous; a tokio runtime runs the HTTP/gRPC calls (and,
//! with `async_lag: 1`, the next step's generation in the background while
//! this step trains). The prefetched batch is awaited before the weight push,
//! so it is generated entirely by the previous weights (exactly one step
//! off-policy, and reproducible), and scored then, while its environments
//! hold their completions' state (a checkpoint holds its rewards).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use model::decoder::CheckpointedLogProbs;
use model::logprobs::TokenLogProbs;
use model::tokenizer::Tokenizer;
use model::{CausalLM, ModelConfig, Weights};
use proto::weight_sync::{Bytes, Client as WeightSyncClient, TensorBytes, WireDType};
use serde_json::{Value, json};

use crate::accumulation::{MicroBatchForward, accumulate_gradients};
use crate::advantages::{compute_advantages, compute_gdpo_advantages};
use crate::batch::{SequenceTokens, pad_batch, plan_micro_batches};
use crate::checkpoint::{Checkpoint, LoopState, PrefetchedBatch, TrainerState, save_checkpoint};
use crate::collective::{Collective, TcpRingConfig};
use crate::data::{Example, PromptSource, load_eval_examples};
use crate::dynamic_sampling::{
    GroupFilter, GroupSelection, decode_round, encode_slots, max_rounds, round_prompts_per_rank,
};
use crate::eval::evaluate;
use crate::grpo_config::MultiObjectiveAggregation;
use crate::grpo_error::GrpoError;
use crate::kl::KlController;
use crate::loss::{LossInputs, Normalizers, entropy_quantile, high_entropy_mask};
use crate::metrics::{CompletionLengths, LossMetrics};
use crate::optim::{AdamW, LrSchedule, OptimizerConfig, clip_grad_norm};
use crate::parameters::PolicyParameters;
use crate::recipe::{IntervalStrategy, LrSchedulerType, Recipe, SFT_TARGET_LOSS_WINDOW};
use crate::rewards::{RewardLogs, RewardRegistry};
use crate::rollout::{GroupOutcome, RolloutClient, RolloutSettings};
use crate::run_dir::{Manifest, RunDir, RunTopology, resolve_resume};
use crate::tools::ToolRunner;

/// First 8 bytes (little-endian) of SHA-256.
pub fn hash_u64(bytes: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// The sampling seed of `example` at `step`: the same on every rank.
pub fn request_seed(seed: u64, step: u64, example: &Example) -> u64 {
    let key = format!(
        "train|{seed}|{step}|{}|{}",
        example.source_file.display(),
        example.row
    );
    hash_u64(key.as_bytes())
}

/// The seed of a prompt's request in generation round `round` of a step:
/// round 0's is [`request_seed`]; dynamic sampling's later rounds may draw
/// the same prompt again (a small dataset wraps around) and must not repeat
/// its completions.
pub fn request_seed_in_round(seed: u64, step: u64, round: usize, example: &Example) -> u64 {
    if round == 0 {
        return request_seed(seed, step, example);
    }
    let key = format!(
        "train|{seed}|{step}|round {round}|{}|{}",
        example.source_file.display(),
        example.row
    );
    hash_u64(key.as_bytes())
}

/// xxh3-64 over every parameter's name, shape and bytes, in name order:
/// the run's final weights (compared across ranks and logged at the last
/// step). Not cryptographic, and need not be: it must be cheap (SHA-256
/// cost ~0.2 s on the small model).
pub fn weights_hash(vars: &[(String, Var)]) -> anyhow::Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, var) in vars {
        h.update(name.as_bytes());
        h.update(format!("{:?}", var.dims()).as_bytes());
        h.update(tensor_bytes(var.as_tensor())?.1.as_ref());
    }
    Ok(format!("{:016x}", h.digest()))
}

/// Values sampled from each parameter by [`WeightsFingerprint`].
pub const FINGERPRINT_SAMPLES: usize = 4096;

/// The per-step check that the ranks hold identical weights, without copying
/// every weight to the host each step (1 GB a step for a 0.5B model in bf16,
/// on every rank): xxh3 over each parameter's name, shape and
/// [`FINGERPRINT_SAMPLES`] evenly spaced values (all of a smaller one),
/// gathered on the parameter's device. Ranks apart because their updates
/// differ (a faulty device, mixed hardware) differ in nearly every value, so
/// in the sample; the last step compares [`weights_hash`] over every value.
pub struct WeightsFingerprint {
    /// Per parameter: the flat positions sampled; none: all of them.
    positions: Vec<Option<Tensor>>,
}

impl WeightsFingerprint {
    pub fn new(vars: &[(String, Var)]) -> anyhow::Result<Self> {
        let positions = vars
            .iter()
            .map(|(_, var)| {
                let n = var.elem_count();
                if n <= FINGERPRINT_SAMPLES {
                    return Ok(None);
                }
                let at: Vec<u32> = (0..FINGERPRINT_SAMPLES)
                    .map(|i| (i as u64 * n as u64 / FINGERPRINT_SAMPLES as u64) as u32)
                    .collect();
                Ok(Some(Tensor::from_vec(
                    at,
                    FINGERPRINT_SAMPLES,
                    var.device(),
                )?))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(WeightsFingerprint { positions })
    }

    pub fn digest(&self, vars: &[(String, Var)]) -> anyhow::Result<String> {
        if vars.len() != self.positions.len() {
            bail!(
                "fingerprint of {} parameters asked for {}",
                self.positions.len(),
                vars.len()
            );
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for ((name, var), at) in vars.iter().zip(&self.positions) {
            let flat = var.as_tensor().flatten_all()?;
            let sample = match at {
                Some(at) => flat.index_select(at, 0)?,
                None => flat,
            };
            h.update(name.as_bytes());
            h.update(format!("{:?}", var.dims()).as_bytes());
            h.update(tensor_bytes(&sample)?.1.as_ref());
        }
        Ok(format!("{:016x}", h.digest()))
    }
}

/// The wire dtype and raw values of a tensor (F32, BF16 or F16), read as
/// little-endian bytes.
fn tensor_bytes(t: &Tensor) -> anyhow::Result<(WireDType, model::weights::HostValues)> {
    let wire = WireDType::try_from(t.dtype()).map_err(anyhow::Error::msg)?;
    Ok((wire, model::weights::host_values(t)?))
}

/// The policy's trainable parameters: every weight of the model folder (a
/// checkpoint's when resuming), or, with `model.use_peft`, LoRA adapters
/// (fresh, seeded by `train.seed`, or the checkpoint's) on the starting
/// model's weights.
fn policy_parameters(
    recipe: &Recipe,
    cfg: &ModelConfig,
    initial_dir: &Path,
    resume_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<PolicyParameters> {
    let saved_adapter = resume_dir.map(|d| d.join(crate::checkpoint::ADAPTER_DIR));
    let Some(config) = recipe.model.lora() else {
        if let Some(folder) = saved_adapter.as_ref().filter(|f| f.exists()) {
            bail!(
                "{} holds a LoRA adapter: the checkpoint was trained with model.use_peft; \
                 resume with it on (or start a full fine-tuning run from the merged model: \
                 model.path={})",
                folder.display(),
                resume_dir
                    .map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            );
        }
        let dir = resume_dir.unwrap_or(initial_dir);
        return PolicyParameters::full(&Weights::load(dir, device, dtype)?);
    };
    config.adapted(cfg).context("model.lora_target_modules")?;
    config
        .saved_weights(cfg)
        .context("model.lora_modules_to_save")?;
    let base = Weights::load(initial_dir, device, dtype)?;
    let adapters = match (resume_dir, saved_adapter) {
        (Some(dir), Some(folder)) => {
            if !folder.exists() {
                bail!(
                    "{} has no LoRA adapter ({}/): it was trained without model.use_peft; \
                     resume without it, or start a LoRA run on its weights with model.path={}",
                    dir.display(),
                    crate::checkpoint::ADAPTER_DIR,
                    dir.display()
                );
            }
            let saved = model::lora::Lora::load_peft(&folder, device, dtype)?;
            if !saved.config.same_adapters(&config, cfg)? {
                bail!(
                    "the checkpoint's adapter ({}) is {:?}; the recipe's model.lora_* keys ask \
                     for {config:?}: resume with the checkpoint's",
                    folder.display(),
                    saved.config
                );
            }
            saved.adapters
        }
        _ => match &recipe.model.lora_adapter_path {
            Some(path) => {
                let start = model::lora::Lora::load_peft(path, device, dtype)
                    .context("model.lora_adapter_path")?;
                // A config that matches none of cfg's linears is the
                // recipe's to report: it is checked first.
                if !start.config.same_adapters(&config, cfg).unwrap_or(false) {
                    let c = &start.config;
                    bail!(
                        "model.lora_adapter_path: {} is r {}, alpha {}, targets {:?}, rsLoRA {}, \
                         DoRA {}, modules_to_save {:?}; set model.lora_r, lora_alpha, \
                         lora_target_modules, use_rslora, use_dora and lora_modules_to_save to \
                         match (the recipe asks for {config:?})",
                        path.display(),
                        c.r,
                        c.alpha,
                        c.target_modules,
                        c.use_rslora,
                        c.use_dora,
                        c.modules_to_save
                    );
                }
                start.check(cfg).with_context(|| {
                    format!(
                        "model.lora_adapter_path: {} does not fit {}",
                        path.display(),
                        initial_dir.display()
                    )
                })?;
                start.adapters
            }
            None => config.init(cfg, &base, recipe.train.seed, device, dtype)?,
        },
    };
    PolicyParameters::lora(base, config, &adapters)
}

/// The starting model folder: `model.path`, or `model.preset` written (once,
/// atomically) to `<output_dir>/initial_model` — a rollout server started on
/// that folder serves the same weights.
pub fn initial_model_dir(recipe: &Recipe) -> anyhow::Result<PathBuf> {
    if let Some(p) = &recipe.model.path {
        return Ok(p.clone());
    }
    let Some(preset) = recipe.model.preset else {
        bail!("set model.path or model.preset");
    };
    let dir = recipe.checkpoint.output_dir.join("initial_model");
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&recipe.checkpoint.output_dir)?;
    let tmp = recipe
        .checkpoint
        .output_dir
        .join(format!(".tmp-initial_model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    model::presets::init_model(preset.into(), &tmp, recipe.model.init_seed)
        .with_context(|| format!("writing the {preset:?} preset to {}", tmp.display()))?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another rank wrote the same bytes first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

/// The HTTP settings of the recipe's rollouts for this rank.
pub fn rollout_settings(recipe: &Recipe, rank: usize) -> RolloutSettings {
    let r = &recipe.rollout;
    RolloutSettings {
        endpoints: r.endpoints.clone(),
        api_key: r.api_key.clone(),
        model: r.model.clone(),
        num_generations: r.num_generations,
        max_completion_length: r.max_completion_length,
        temperature: r.temperature as f32,
        top_p: r.top_p as f32,
        top_k: r.top_k.map(i64::from),
        min_p: r.min_p.map(|p| p as f32),
        repetition_penalty: r.repetition_penalty as f32,
        client_tag: r
            .client_tag
            .clone()
            .unwrap_or_else(|| format!("rank-{rank}")),
        client_tag_echo: r.client_tag_echo,
        request_timeout: Duration::from_secs_f64(r.request_timeout_s),
        max_retries: r.max_retries,
        generation_kwargs: r.generation_kwargs.clone(),
    }
}

fn optimizer_config(recipe: &Recipe) -> OptimizerConfig {
    let t = &recipe.train;
    OptimizerConfig {
        learning_rate: t.learning_rate,
        adam_beta1: t.adam_beta1,
        adam_beta2: t.adam_beta2,
        adam_epsilon: t.adam_epsilon,
        weight_decay: t.weight_decay,
        lr_scheduler_type: schedule_kind(t.lr_scheduler_type),
        min_lr_rate: t.min_lr_rate(),
        warmup_steps: t.warmup_steps as usize,
        warmup_ratio: t.warmup_ratio,
        max_grad_norm: t.max_grad_norm,
    }
}

/// The recipe's scheduler name as the optimizer's schedule kind.
fn schedule_kind(kind: LrSchedulerType) -> crate::optim::LrSchedulerType {
    match kind {
        LrSchedulerType::Constant => crate::optim::LrSchedulerType::Constant,
        LrSchedulerType::ConstantWithWarmup => crate::optim::LrSchedulerType::ConstantWithWarmup,
        LrSchedulerType::Linear => crate::optim::LrSchedulerType::Linear,
        LrSchedulerType::Cosine => crate::optim::LrSchedulerType::Cosine,
        LrSchedulerType::CosineWithMinLr => crate::optim::LrSchedulerType::CosineWithMinLr,
    }
}

/// Sums `values` over ranks (f64).
fn all_sum(c: &dyn Collective, values: &mut [f64]) -> anyhow::Result<()> {
    c.all_reduce_sum_f64(values)?;
    Ok(())
}

/// Every rank's `values` (same length everywhere), indexed by rank: a
/// zero-padded buffer summed over ranks. `x + 0.0 == x`, so exact.
fn all_gather_f64(c: &dyn Collective, values: &[f64]) -> anyhow::Result<Vec<Vec<f64>>> {
    let (w, n) = (c.world_size(), values.len());
    let mut buf = vec![0.0; w * n];
    buf[c.rank() * n..(c.rank() + 1) * n].copy_from_slice(values);
    all_sum(c, &mut buf)?;
    Ok(buf.chunks(n.max(1)).map(<[f64]>::to_vec).take(w).collect())
}

/// Every rank's bytes, indexed by rank (one broadcast per rank).
fn all_gather_bytes(c: &dyn Collective, mine: Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(c.world_size());
    for root in 0..c.world_size() {
        let mut data = if root == c.rank() {
            mine.clone()
        } else {
            Vec::new()
        };
        c.broadcast(&mut data, root)?;
        out.push(data);
    }
    Ok(out)
}

/// Fault injection for the tests, in debug builds only:
/// `TANDEM_FAULT_PERTURB_WEIGHTS=RANK:STEP` nudges one weight of that rank
/// after that step's update, as a faulty device would, so that the
/// divergence check is tested on real processes.
#[cfg(debug_assertions)]
fn perturb_weights_for_tests(vars: &[(String, Var)], rank: usize, step: u64) -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("TANDEM_FAULT_PERTURB_WEIGHTS") else {
        return Ok(());
    };
    let target = spec
        .split_once(':')
        .and_then(|(r, s)| Some((r.parse::<usize>().ok()?, s.parse::<u64>().ok()?)));
    if target == Some((rank, step))
        && let Some((_, var)) = vars.first()
    {
        let t = var.as_tensor();
        var.set(&t.affine(1.0, 1e-3)?)?;
    }
    Ok(())
}

/// A text as one printable line (quoted and escaped), cut to 160
/// characters: the full text is in completions.jsonl.
fn shortened(text: &str) -> String {
    const MAX: usize = 160;
    let quoted = format!("{text:?}");
    match quoted.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &quoted[..cut]),
        None => quoted,
    }
}

/// The entropy above which a completion token carries the policy gradient
/// (`top_entropy_quantile`), over the same micro-batch of every rank, as TRL
/// gathers it: the `1 - top_entropy_quantile` quantile of every rank's
/// non-padding entropies. `None` for a rank without this micro-batch (it
/// still takes part); the result is `None` when no rank has a token.
fn entropy_threshold(
    c: &dyn Collective,
    local: Option<(&Tensor, &Tensor)>,
    top_entropy_quantile: f64,
) -> anyhow::Result<Option<f64>> {
    let mut mine = Vec::new();
    if let Some((entropy, response_mask)) = local {
        let e: Vec<Vec<f32>> = entropy.to_dtype(DType::F32)?.to_vec2()?;
        let m: Vec<Vec<f32>> = response_mask.to_dtype(DType::F32)?.to_vec2()?;
        for (e_row, m_row) in e.iter().zip(&m) {
            for (x, keep) in e_row.iter().zip(m_row) {
                if *keep != 0.0 {
                    mine.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    let values: Vec<f32> = all_gather_bytes(c, mine)?
        .iter()
        .flat_map(|b| b.chunks_exact(4))
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(entropy_quantile(&values, 1.0 - top_entropy_quantile))
}

/// The loss metrics of the whole global batch: sums summed over ranks,
/// minima and maxima over ranks.
fn reduce_metrics(c: &dyn Collective, m: &LossMetrics) -> anyhow::Result<LossMetrics> {
    if c.world_size() == 1 {
        return Ok(m.clone());
    }
    let mut sums = [
        m.loss,
        m.pg_loss,
        m.kl_loss,
        m.entropy_loss,
        m.num_tokens,
        m.num_sequences,
        m.kl_sum,
        f64::from(u8::from(m.has_kl)),
        m.entropy_sum,
        f64::from(u8::from(m.has_entropy)),
        m.approx_kl_sum,
        m.clip_low_count,
        m.clip_high_count,
        m.ratio_count,
        m.ratio_sum,
        m.is_ratio_sum,
        m.is_ratio_count,
        m.sampling_logp_diff_sum,
        m.phi_seq_sum,
        m.phi_seq_count,
    ];
    all_sum(c, &mut sums)?;
    let opt = |x: Option<f64>| x.unwrap_or(f64::NAN);
    let extremes = all_gather_f64(
        c,
        &[
            opt(m.ratio_min),
            opt(m.ratio_max),
            opt(m.is_ratio_min),
            opt(m.is_ratio_max),
            opt(m.sampling_logp_diff_max),
        ],
    )?;
    let pick = |i: usize, min: bool| -> Option<f64> {
        extremes
            .iter()
            .map(|r| r[i])
            .filter(|v| !v.is_nan())
            .reduce(|a, b| if min { a.min(b) } else { a.max(b) })
    };
    Ok(LossMetrics {
        loss: sums[0],
        pg_loss: sums[1],
        kl_loss: sums[2],
        entropy_loss: sums[3],
        num_tokens: sums[4],
        num_sequences: sums[5],
        kl_sum: sums[6],
        has_kl: sums[7] > 0.0,
        entropy_sum: sums[8],
        has_entropy: sums[9] > 0.0,
        approx_kl_sum: sums[10],
        clip_low_count: sums[11],
        clip_high_count: sums[12],
        ratio_count: sums[13],
        ratio_sum: sums[14],
        ratio_min: pick(0, true),
        ratio_max: pick(1, false),
        is_ratio_sum: sums[15],
        is_ratio_count: sums[16],
        is_ratio_min: pick(2, true),
        is_ratio_max: pick(3, false),
        sampling_logp_diff_sum: sums[17],
        sampling_logp_diff_max: pick(4, false),
        phi_seq_sum: sums[18],
        phi_seq_count: sums[19],
    })
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    // A reward function's NaN is a Python function's None: left out.
    crate::rewards::nan_mean_std(x)
}

/// One micro-batch, ready for the loss.
struct MicroBatch {
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    logits_to_keep: usize,
    advantages: Tensor,
    rollout_logprobs: Option<Tensor>,
    old_logprobs: Option<Tensor>,
    ref_logprobs: Option<Tensor>,
}

impl MicroBatch {
    /// The completion log-probs (and entropies) under `lm`, either in the
    /// autograd graph or with the logits recomputed in the backward
    /// (`checkpointed`, which also returns what that backward needs).
    fn logprobs<'m>(
        &self,
        lm: &'m CausalLM,
        temperature: f64,
        with_entropy: bool,
        checkpointed: bool,
    ) -> model::Result<(TokenLogProbs, Option<CheckpointedLogProbs<'m>>)> {
        let (ids, mask, k) = (&self.input_ids, &self.attention_mask, self.logits_to_keep);
        if checkpointed {
            let ck = lm.checkpointed_logprobs(ids, mask, k, temperature, with_entropy)?;
            Ok((ck.token_logprobs(), Some(ck)))
        } else {
            let lp = lm.completion_logprobs(ids, mask, k, temperature, with_entropy)?;
            Ok((lp, None))
        }
    }
}

/// A row of the local batch: one completion of a kept group.
#[derive(Clone, Copy)]
struct Row<'a> {
    prompt_ids: &'a [u32],
    completion_ids: &'a [u32],
    logprobs: &'a [f32],
    /// False on the tool turns' tokens (left out of the loss); empty: none.
    tool_mask: &'a [bool],
    advantage: f64,
    /// Left out of the loss (`train.mask_truncated_completions` and the
    /// completion was cut at `max_completion_length`).
    masked: bool,
}

/// Whether generation stopped at the length limit rather than at EOS or a
/// stop string: vLLM's `finish_reason: "length"`, or, from a server that
/// gives no reason, a completion as long as the limit.
fn is_truncated(comp: &crate::rollout::Completion, max_completion_length: usize) -> bool {
    match comp.finish_reason.as_deref() {
        Some(reason) => reason == "length",
        None => comp.completion_ids.len() >= max_completion_length,
    }
}

fn build_micro_batch(rows: &[Row<'_>], pad_id: u32, device: &Device) -> anyhow::Result<MicroBatch> {
    let seqs: Vec<SequenceTokens> = rows
        .iter()
        .map(|r| SequenceTokens {
            prompt_ids: r.prompt_ids.to_vec(),
            completion_ids: r.completion_ids.to_vec(),
        })
        .collect();
    let padded = pad_batch(&seqs, pad_id, None, device)?;
    let k = padded.logits_to_keep;
    let mut response_mask = if rows.iter().any(|r| r.masked) {
        let keep: Vec<f32> = rows.iter().map(|r| f32::from(!r.masked)).collect();
        let keep = Tensor::from_vec(keep, (rows.len(), 1), device)?;
        padded.response_mask.broadcast_mul(&keep)?
    } else {
        padded.response_mask
    };
    // Tool turns: read by the model, written by no policy.
    if rows.iter().any(|r| r.tool_mask.contains(&false)) {
        let mut keep = vec![1f32; rows.len() * k];
        for (i, r) in rows.iter().enumerate() {
            for (j, &policy) in r.tool_mask.iter().enumerate() {
                keep[i * k + j] = f32::from(policy);
            }
        }
        response_mask = (response_mask * Tensor::from_vec(keep, (rows.len(), k), device)?)?;
    }
    let has_lp = rows
        .iter()
        .all(|r| r.logprobs.len() == r.completion_ids.len());
    let rollout_logprobs = if has_lp {
        let mut lp = vec![0f32; rows.len() * k];
        for (i, r) in rows.iter().enumerate() {
            lp[i * k..i * k + r.logprobs.len()].copy_from_slice(r.logprobs);
        }
        Some(Tensor::from_vec(lp, (rows.len(), k), device)?)
    } else {
        None
    };
    let adv: Vec<f32> = rows.iter().map(|r| r.advantage as f32).collect();
    Ok(MicroBatch {
        input_ids: padded.input_ids,
        attention_mask: padded.attention_mask,
        response_mask,
        logits_to_keep: k,
        advantages: Tensor::from_vec(adv, rows.len(), device)?,
        rollout_logprobs,
        old_logprobs: None,
        ref_logprobs: None,
    })
}

/// Compares the resuming recipe with the one that wrote the checkpoint
/// `dir`: a change that makes training differ is refused, naming each key,
/// unless `allow`. Returns those changes (empty when nothing that matters
/// changed).
fn check_resumed_recipe(
    dir: &Path,
    state: &TrainerState,
    recipe: &Recipe,
    python_functions: &[Value],
    allow: bool,
) -> anyhow::Result<Vec<crate::checkpoint::RecipeChange>> {
    let Some(saved) = &state.recipe else {
        tracing::warn!(
            checkpoint = %dir.display(),
            "the checkpoint does not record its recipe; changes to it cannot be checked"
        );
        return Ok(Vec::new());
    };
    let mut changes: Vec<_> = crate::checkpoint::recipe_changes(saved, recipe)
        .into_iter()
        .filter(|c| c.changes_training)
        .collect();
    if !changes.iter().any(|c| c.key == "data.chat_template") {
        changes.extend(chat_template_file_change(dir, recipe)?);
    }
    let named = changes.clone();
    changes.extend(
        python_function_changes(state, python_functions)
            .into_iter()
            .filter(|c| !named.iter().any(|n| c.key.starts_with(n.key.as_str()))),
    );
    if !changes.is_empty() && !allow {
        let list: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
        bail!(
            "the recipe differs from the one that wrote {} in keys that change training, \
             so the run would not continue as if it had never stopped:\n{}\n\
             Resume with the checkpoint's values (its recipe is under \"recipe\" in {}), \
             or pass --allow-recipe-change to continue with the new ones.",
            dir.display(),
            list.join("\n"),
            dir.join(crate::checkpoint::TRAINER_STATE_FILE).display()
        );
    }
    Ok(changes)
}

/// `data.chat_template` as a file path: the recipe records the path, so a
/// file edited between the runs goes unseen by [`recipe_changes`]. Its
/// text is compared with the template the checkpoint saved (and that the
/// run trained with) instead, by digest.
///
/// [`recipe_changes`]: crate::checkpoint::recipe_changes
fn chat_template_file_change(
    dir: &Path,
    recipe: &Recipe,
) -> anyhow::Result<Option<crate::checkpoint::RecipeChange>> {
    let Some(spec) = &recipe.data.chat_template else {
        return Ok(None);
    };
    let now = model::tokenizer::chat_template_text(spec)
        .map_err(|e| anyhow::anyhow!("data.chat_template: {e}"))?;
    let saved = Tokenizer::from_dir(dir)
        .with_context(|| format!("reading the tokenizer of {}", dir.display()))?;
    let saved = saved.chat_template().unwrap_or_default();
    if saved == now {
        return Ok(None);
    }
    let digest = |t: &str| {
        Value::from(format!(
            "sha256:{}",
            &crate::data::sha256_hex(t.as_bytes())[..16]
        ))
    };
    Ok(Some(crate::checkpoint::RecipeChange {
        key: format!("data.chat_template (the text of {spec})"),
        before: digest(saved),
        after: digest(&now),
        changes_training: true,
    }))
}

/// The Python functions (`rollout.tools`' and `reward.functions`'): the
/// recipe names them by path, so a function edited between the runs goes
/// unseen by [`recipe_changes`]; what `now` reads of them (their source
/// files, a tool's definition) is compared with what the checkpoint
/// recorded instead, by recipe key (nothing to compare where it recorded
/// none).
///
/// [`recipe_changes`]: crate::checkpoint::recipe_changes
fn python_function_changes(
    state: &TrainerState,
    now: &[Value],
) -> Vec<crate::checkpoint::RecipeChange> {
    let digest = |v: &Value| {
        Value::from(format!(
            "sha256:{}",
            &crate::data::sha256_hex(v.to_string().as_bytes())[..16]
        ))
    };
    now.iter()
        .filter_map(|function| {
            // One that was not a Python function: the recipe's keys say so.
            let before = state
                .python_functions
                .iter()
                .find(|s| s["key"] == function["key"])?;
            (before != function).then(|| crate::checkpoint::RecipeChange {
                key: format!(
                    "{} (the source file or definition of {})",
                    function["key"].as_str().unwrap_or_default(),
                    function["function"].as_str().unwrap_or_default()
                ),
                before: digest(before),
                after: digest(function),
                changes_training: true,
            })
        })
        .collect()
}

/// The parsed `learner train` request.
pub struct TrainArgs {
    pub recipe: Recipe,
    pub resume_from: Option<PathBuf>,
    /// Resume even where the recipe changes training (see
    /// [`crate::checkpoint::changes_training`]).
    pub allow_recipe_change: bool,
}

/// Pushes weights to every WeightSync endpoint.
struct WeightPusher {
    clients: Vec<(String, WeightSyncClient)>,
    deadline: Duration,
    /// Whether a push of this run has sent every weight: LoRA pushes after
    /// that send only the adapted (merged) weights.
    whole_pushed: std::sync::atomic::AtomicBool,
}

impl WeightPusher {
    async fn connect(recipe: &Recipe) -> anyhow::Result<WeightPusher> {
        let r = &recipe.rollout;
        let deadline = Duration::from_secs_f64(r.weight_sync_timeout_s);
        let mut clients = Vec::new();
        for e in &r.weight_sync_endpoints {
            let c = WeightSyncClient::connect(e, r.weight_sync_token.as_deref(), deadline)
                .await
                .with_context(|| format!("connecting to the WeightSync service at {e}"))?;
            clients.push((e.clone(), c));
        }
        Ok(WeightPusher {
            clients,
            deadline,
            whole_pushed: false.into(),
        })
    }

    /// The largest version the servers report.
    async fn server_version(&self) -> anyhow::Result<u64> {
        let mut v = 0;
        for (e, c) in &self.clients {
            let info = c
                .version(self.deadline)
                .await
                .with_context(|| format!("GetVersion at {e}"))?;
            v = v.max(info.version);
        }
        Ok(v)
    }

    /// Pushes the policy's weights as `version`: every weight the first
    /// time (the servers may hold another run's), then what changes.
    async fn push_policy(
        &self,
        params: &PolicyParameters,
        cfg: &ModelConfig,
        version: u64,
    ) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        let whole = !self.whole_pushed.load(Ordering::Relaxed);
        let tensors = push_tensors(&params.push_weights(cfg, whole)?)?;
        self.push(&tensors, version).await?;
        self.whole_pushed.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn push(&self, tensors: &[TensorBytes], version: u64) -> anyhow::Result<()> {
        let pushes = self.clients.iter().map(|(e, c)| async move {
            c.push(tensors.iter().cloned(), version, self.deadline)
                .await
                .with_context(|| format!("pushing weights version {version} to {e}"))
        });
        futures::future::try_join_all(pushes).await?;
        Ok(())
    }
}

fn push_tensors(weights: &[(String, Tensor)]) -> anyhow::Result<Vec<TensorBytes>> {
    weights
        .iter()
        .map(|(name, t)| {
            let (dtype, values) = tensor_bytes(t)?;
            // The chunks sent are slices of these values: no copy to bytes.
            Ok(TensorBytes::new(
                name.clone(),
                dtype,
                t.dims().to_vec(),
                Bytes::from_owner(values),
            ))
        })
        .collect()
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

/// `train.sft_warmup_steps` cross-entropy steps on `prompt + answer + EOS`
/// pairs from `source` (`train.sft_batch_size` per rank, each rank its
/// shard, gradients all-reduced, clipped, on an AdamW of its own at
/// `train.sft_learning_rate` along `train.sft_lr_scheduler_type`), then
/// rank 0 pushes the weights.
/// Returns the weight version the servers now hold.
#[allow(clippy::too_many_arguments)]
fn sft_warmup(
    recipe: &Recipe,
    c: &dyn Collective,
    policy: &CausalLM,
    (params, cfg): (&PolicyParameters, &ModelConfig),
    tokenizer: &Tokenizer,
    source: &mut PromptSource,
    (pad_id, eos): (u32, Option<u32>),
    device: &Device,
    run: Option<&RunDir>,
    pusher: Option<&WeightPusher>,
    rt: &tokio::runtime::Runtime,
    mut weight_version: u64,
) -> anyhow::Result<u64> {
    let t = &recipe.train;
    let Some(eos) = eos else {
        bail!("train.sft_warmup_steps needs an EOS token (eos_token_id in config.json)");
    };
    let mut ocfg = optimizer_config(recipe);
    ocfg.learning_rate = t.sft_learning_rate.unwrap_or(t.learning_rate);
    ocfg.lr_scheduler_type = schedule_kind(t.sft_lr_scheduler_type);
    (ocfg.warmup_steps, ocfg.warmup_ratio, ocfg.min_lr_rate) = (0, 0.0, 0.0);
    let schedule = LrSchedule::new(&ocfg, t.sft_warmup_steps as usize)?;
    let batch_size = t.sft_batch_size.unwrap_or(t.per_device_train_batch_size);
    let vars = &params.vars;
    let mut optimizer = AdamW::new(vars.to_vec(), ocfg.adamw())?;
    let started = Instant::now();
    // The last SFT_TARGET_LOSS_WINDOW losses, all-reduced: every rank sees
    // the same values and so stops at the same step.
    let mut recent_losses = std::collections::VecDeque::new();
    let (mut steps_run, mut stopped_at_target) = (0, false);
    for s in 1..=t.sft_warmup_steps {
        let step_started = Instant::now();
        let examples = source.next_batch(batch_size);
        let mut seqs = Vec::with_capacity(examples.len());
        for e in &examples {
            let mut completion_ids = tokenizer.encode(&e.answer, false)?;
            completion_ids.push(eos);
            seqs.push(SequenceTokens {
                prompt_ids: tokenizer.encode(&e.prompt_text, false)?,
                completion_ids,
            });
        }
        let batch = pad_batch(&seqs, pad_id, None, device)?;
        // Mean token cross-entropy over the global batch.
        let mut sums = [batch.num_completion_tokens() as f64, 0.0];
        all_sum(c, &mut sums[..1])?;
        let (loss, store) = if t.gradient_checkpointing {
            // The memory the GRPO steps save, saved here too: the loss is
            // linear in the log-probs, so its gradient seeds the
            // checkpointed backward directly.
            let ck = policy.checkpointed_logprobs(
                &batch.input_ids,
                &batch.attention_mask,
                batch.logits_to_keep,
                1.0,
                false,
            )?;
            let scale = -1.0 / sums[0].max(1.0);
            let mask = batch.response_mask.to_dtype(ck.logprobs().dtype())?;
            let loss = (ck.logprobs() * &mask)?.sum_all()?.affine(scale, 0.0)?;
            let store = ck.backward(Some(&mask.affine(scale, 0.0)?), None)?;
            (loss, store)
        } else {
            let lp = batch.completion_logprobs(policy, 1.0, false)?;
            let mask = batch.response_mask.to_dtype(lp.logprobs.dtype())?;
            let nll = (lp.logprobs * mask)?.sum_all()?.neg()?;
            let loss = nll.affine(1.0 / sums[0].max(1.0), 0.0)?;
            let store = loss.backward()?;
            (loss, store)
        };
        let mut grads = Vec::with_capacity(vars.len());
        for (g, (_, v)) in optimizer.gradients(&store).into_iter().zip(vars) {
            grads.push(match g {
                Some(g) => g,
                None => v.as_tensor().zeros_like()?,
            });
        }
        let mut grads = crate::collective::all_reduce_tensors(c, &grads)?;
        sums[1] = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        all_sum(c, &mut sums[1..])?;
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        if !grad_norm.is_finite() {
            bail!("supervised warm-up step {s}: non-finite gradient norm ({grad_norm})");
        }
        let lr = schedule.lr_at(s as usize - 1);
        optimizer.step(&grads, lr)?;
        steps_run = s;
        if recent_losses.len() == SFT_TARGET_LOSS_WINDOW as usize {
            recent_losses.pop_front();
        }
        recent_losses.push_back(sums[1]);
        let window_mean = recent_losses.iter().sum::<f64>() / recent_losses.len() as f64;
        let reached_target = t.sft_target_loss.is_some_and(|target| {
            recent_losses.len() == SFT_TARGET_LOSS_WINDOW as usize && window_mean <= target
        });
        if let Some(run) = run
            && (s % recipe.log.logging_steps.steps(t.sft_warmup_steps).max(1) == 0
                || s == t.sft_warmup_steps
                || reached_target)
        {
            let total_s = step_started.elapsed();
            run.log_train(&json!({
                "phase": "sft",
                "sft_step": s,
                "loss": sums[1],
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": {"completion": sums[0]},
                "timings": {"total": secs(total_s)},
                "elapsed_s": secs(started.elapsed()),
            }))?;
            eprintln!(
                "sft {s}/{} loss {:.4} grad_norm {grad_norm:.4} lr {lr:.3e} {:.2}s",
                t.sft_warmup_steps,
                sums[1],
                total_s.as_secs_f64()
            );
        }
        if reached_target {
            stopped_at_target = true;
            eprintln!(
                "sft: mean loss of the last {SFT_TARGET_LOSS_WINDOW} steps {window_mean:.4} <= \
                 train.sft_target_loss {}: the warm-up ends at step {s} of {}",
                t.sft_target_loss.unwrap_or_default(),
                t.sft_warmup_steps
            );
            break;
        }
    }
    if let Some(target) = t.sft_target_loss
        && !stopped_at_target
    {
        let window_mean = recent_losses.iter().sum::<f64>() / recent_losses.len().max(1) as f64;
        let msg = format!(
            "the supervised warm-up ran all its {steps_run} steps (train.sft_warmup_steps) \
             without reaching train.sft_target_loss {target}: the mean loss of its last \
             {SFT_TARGET_LOSS_WINDOW} steps is {window_mean:.4}; GRPO starts from there"
        );
        eprintln!("note: {msg}");
        if let Some(run) = run {
            run.warn(&msg)?;
        }
    }
    c.barrier()?;
    if let Some(pusher) = pusher
        && !pusher.clients.is_empty()
    {
        weight_version += 1;
        rt.block_on(pusher.push_policy(params, cfg, weight_version))?;
    }
    let mut wv = [if c.rank() == 0 {
        weight_version as f64
    } else {
        0.0
    }];
    all_sum(c, &mut wv)?; // rank 0's version; also the barrier after the push
    if let Some(run) = run {
        run.event(
            "sft_warmup",
            json!({"steps": steps_run, "max_steps": t.sft_warmup_steps,
                   "target_loss": t.sft_target_loss, "stopped_at_target_loss": stopped_at_target,
                   "learning_rate": schedule.base_lr,
                   "lr_scheduler_type": t.sft_lr_scheduler_type,
                   "weight_version": wv[0] as u64, "elapsed_s": secs(started.elapsed())}),
        )?;
    }
    Ok(wv[0] as u64)
}

/// Runs `learner train`.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    // As written (checkpoints keep it, resumes compare with it), and as
    // this many ranks run it (generation_batch_size resolved).
    let given = args.recipe;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The device first: a CUDA learner all-reduces over NCCL, a CPU one over TCP.
    let device: model::device::DeviceSpec = given.model.device.parse()?;
    let device = device.open()?;
    let ring = TcpRingConfig::from_env()?;
    let collective = crate::collective::connect(&ring, &device)?;
    let c: &dyn Collective = collective.as_ref();
    let (rank, world) = (c.rank(), c.world_size());
    let recipe = given.for_world_size(world)?;
    let t = &recipe.train;
    let out = recipe.checkpoint.output_dir.clone();
    if recipe.rollout.endpoints.is_empty() {
        bail!("rollout.endpoints is empty: name the rollout servers (the launcher fills it in)");
    }

    // ---- resume state
    let resume = match &args.resume_from {
        Some(p) => {
            let (step, dir) = resolve_resume(p)?;
            let state = TrainerState::load(&dir)?;
            Some((step, dir, state))
        }
        None => None,
    };
    // The tools (one runner for training and evaluation: they share the
    // Python tools' processes) and the rewards, read before a resume is
    // checked: the checkpoint records what their Python functions were.
    let mut tools = ToolRunner::from_recipe(&recipe)?;
    let mut rewards = RewardRegistry::from_section(&recipe.reward)?.with_data_columns(&recipe.data);
    if let Some(t) = &mut tools {
        t.attach_rewards(&mut rewards)?;
    }
    rewards.prepare()?;
    let python_functions: Vec<Value> = tools
        .iter()
        .flat_map(|t| t.python_functions().iter().cloned())
        .chain(rewards.python_functions())
        .collect();
    let recipe_changes = match &resume {
        Some((_, dir, state)) => check_resumed_recipe(
            dir,
            state,
            &given,
            &python_functions,
            args.allow_recipe_change,
        )?,
        None => Vec::new(),
    };

    // ---- model
    let dtype = model::device::DTypeSpec::from(recipe.model.dtype).resolve(&device)?;
    tracing::info!(
        device = model::device::device_name(&device),
        dtype = ?dtype,
        collective = c.backend(),
        "learner model"
    );
    let initial_dir = initial_model_dir(&recipe)?;
    let model_dir = resume
        .as_ref()
        .map_or(initial_dir.clone(), |(_, d, _)| d.clone());
    let cfg = ModelConfig::from_dir(&model_dir)?;
    let tokenizer = crate::data::policy_tokenizer(&model_dir, &recipe.data)?;
    let pad_id = cfg
        .raw
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .map(|v| v as u32)
        .or(tokenizer.pad_token_id())
        .or(tokenizer.eos_token_id())
        .unwrap_or(0);
    let params = policy_parameters(
        &recipe,
        &cfg,
        &initial_dir,
        resume.as_ref().map(|r| r.1.as_path()),
        &device,
        dtype,
    )?;
    let vars = params.vars.clone();
    // What a LoRA checkpoint's adapter_config.json names as its base.
    let base_model = initial_dir.display().to_string();
    let trainable_parameters: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut policy = params.policy(&cfg)?;
    policy.set_gradient_checkpointing(t.gradient_checkpointing);
    let var_list: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let loss_cfg = t.loss.clone();
    loss_cfg.validate()?;
    // The KL reference: the starting model, or, when the run syncs it, the
    // reference its checkpoint recorded.
    let mut reference: Option<(Weights, CausalLM)> =
        if let (true, Some(base)) = (loss_cfg.beta > 0.0, params.frozen_base()) {
            // LoRA: the policy with its adapters off (the base, shared), as
            // TRL's PEFT runs take the reference; with modules_to_save, the
            // base's own modules in place of their trained copies.
            let reference = match policy.without_lora() {
                Some(m) => m,
                None => CausalLM::new(&cfg, base)?,
            };
            Some((base.clone(), reference))
        } else if loss_cfg.beta > 0.0 {
            let synced = resume
                .as_ref()
                .map(|(_, dir, _)| dir.join(crate::checkpoint::REF_MODEL_FILE))
                .filter(|f| t.sync_ref_model && f.exists());
            let w = match &synced {
                Some(file) => {
                    Weights::load_files(std::slice::from_ref(file), &model_dir, &device, dtype)?
                }
                None => Weights::load(&initial_dir, &device, dtype)?,
            };
            let lm = CausalLM::new(&ModelConfig::from_dir(&initial_dir)?, &w)?;
            Some((w, lm))
        } else {
            None
        };

    // ---- data, rewards, rollouts, optimizer
    let tool_definitions = tools.as_ref().map(|t| t.prompt_tools());
    let mut source = PromptSource::from_recipe(
        &recipe,
        rank,
        world,
        Some(&tokenizer),
        tool_definitions.clone(),
    )?;
    let reward_weights = rewards.weights();
    let labels: Vec<String> = rewards.labels().iter().map(|s| s.to_string()).collect();
    let group_filter = GroupFilter::from_recipe(t, &labels)?;
    // Prompts per rank per generation round: the step's, or dynamic
    // sampling's own round size.
    let round_prompts = round_prompts_per_rank(t, world, recipe.prompts_per_rank_per_step());
    let max_gen_rounds = if group_filter.is_some() {
        max_rounds(
            t.max_num_gen_batches,
            source.epoch_prompts(),
            round_prompts * world,
        )
    } else {
        1
    };
    let tokenizer = Arc::new(tokenizer);
    let client = RolloutClient::new(rollout_settings(&recipe, rank), Some(tokenizer.clone()))?
        .with_max_prompt_length(recipe.rollout.max_prompt_length)
        .with_tools(tools.clone());
    // Every rank loads every file, so every rank counts the same steps.
    let max_steps = recipe.total_steps(source.epoch_prompts(), world)?;
    let epoch_prompts = source.epoch_prompts().max(1) as f64;
    // Intervals given as a fraction of the run, in steps now that it is known.
    let logging_steps = recipe.log.logging_steps.steps(max_steps).max(1);
    let save_steps = recipe.checkpoint.save_steps.steps(max_steps);
    let eval_steps = recipe.eval.eval_steps.steps(max_steps);
    let epoch_strategy = [
        ("checkpoint.save_strategy", recipe.checkpoint.save_strategy),
        ("eval.eval_strategy", recipe.eval.eval_strategy),
    ]
    .into_iter()
    .find(|(_, s)| *s == IntervalStrategy::Epoch);
    let steps_per_epoch = match epoch_strategy {
        Some((key, _)) => Some(recipe.steps_per_epoch(source.epoch_prompts(), world, key)?),
        None => None,
    };
    let ocfg = optimizer_config(&recipe);
    let mut optimizer = AdamW::new(vars.clone(), ocfg.adamw())?;
    // The learning rate moves with every optimizer update, as TRL's
    // scheduler does: a step of `updates_per_step` updates spans that many
    // points of a schedule over all the run's updates (warmup_steps, in
    // steps, scaled to match).
    let updates_per_step = t.num_iterations.max(1) * t.updates_per_generation();
    let schedule = LrSchedule::new(
        &OptimizerConfig {
            warmup_steps: ocfg.warmup_steps * updates_per_step,
            ..ocfg.clone()
        },
        max_steps as usize * updates_per_step,
    )?;
    let mut kl = KlController::from_config(&loss_cfg);
    let mut streak = 0u32;
    let mut start_step = 0u64;
    let mut tokens_seen = 0.0f64;
    let mut weight_version = 0u64;
    let mut prefetched: Option<PrefetchedBatch> = None;
    if let Some((step, dir, state)) = &resume {
        optimizer.load(dir)?;
        source.restore(&state.counters.data_cursor)?;
        kl = state.counters.kl_controller.clone();
        streak = state.counters.nonfinite_streak;
        start_step = *step;
        tokens_seen = state.counters.num_input_tokens_seen;
        weight_version = state.counters.weight_version;
        if recipe.rollout.async_lag == 1 {
            prefetched = state.counters.prefetched.get(rank).cloned().flatten();
            if state.world_size != world {
                bail!(
                    "the checkpoint was written by {} ranks with async_lag 1; resume with the same number",
                    state.world_size
                );
            }
        }
    }

    // ---- run folder (rank 0), pusher
    let run = if rank == 0 {
        let manifest_exists = out.join("manifest.json").exists();
        Some(if manifest_exists && resume.is_some() {
            RunDir::resume(&out, start_step)?
        } else {
            let topology = RunTopology {
                rank,
                world_size: world,
                endpoints: recipe.rollout.endpoints.clone(),
                weight_sync_endpoints: recipe.rollout.weight_sync_endpoints.clone(),
            };
            RunDir::create(
                &out,
                &Manifest::collect(&recipe, source.fingerprints(), topology),
            )?
        })
        .map(|run| {
            if recipe.log.tensorboard() {
                run.with_tensorboard(resume.is_some().then_some(start_step + 1))
            } else {
                Ok(run)
            }
        })
        .transpose()?
    } else {
        None
    };
    if let (Some(run), Some(tools)) = (&run, &tools)
        && let Some(warning) = tools.unlisted_tools_warning(&tokenizer)?
    {
        eprintln!("warning: {warning}");
        run.warn(&warning)?;
    }
    let rank_log = if rank > 0 {
        let dir = out.join("ranks");
        std::fs::create_dir_all(&dir)?;
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("rank_{rank}.jsonl")))?,
        )
    } else {
        None
    };
    let pusher = if rank == 0 {
        Some(rt.block_on(WeightPusher::connect(&recipe))?)
    } else {
        None
    };
    if let Some(run) = &run {
        run.event(
            if resume.is_some() { "resume" } else { "start" },
            json!({
                "step": start_step,
                "world_size": world,
                "backend": c.backend(),
                "model": model_dir,
                "parameters": cfg.num_parameters(),
                "trainable_parameters": trainable_parameters,
                "resume_from": resume.as_ref().map(|(_, d, _)| d.clone()),
                "max_steps": max_steps,
            }),
        )?;
        if let Some(lora) = params.adapter() {
            // PEFT's print_trainable_parameters, in words.
            let total = cfg.num_parameters();
            eprintln!(
                "note: LoRA r {} alpha {} on {} linears: {trainable_parameters} trainable \
                 parameters of {total} ({:.3}%); the base stays frozen",
                lora.config.r,
                lora.config.alpha,
                lora.config.adapted(&cfg)?.len(),
                100.0 * trainable_parameters as f64 / total.max(1) as f64
            );
        }
        if let Some(epochs) = t.num_train_epochs {
            let prompts = source.epoch_prompts();
            let note = if t.max_steps == 0 {
                format!(
                    "num_train_epochs {epochs} over {prompts} training prompts, {} a step: \
                     {max_steps} steps",
                    recipe.prompts_per_rank_per_step() * world
                )
            } else {
                format!("max_steps {max_steps} overrides num_train_epochs {epochs}, as in TRL")
            };
            eprintln!("note: {note}");
            if t.dynamic_sampling && t.max_steps == 0 {
                let msg = "train.dynamic_sampling draws more prompts per step than the step \
                           trains on, so these steps take more than num_train_epochs passes \
                           over the training prompts (verl would stop at the passes' end)";
                eprintln!("note: {msg}");
                run.warn(msg)?;
            }
        }
        for advice in t.loss.advisories() {
            eprintln!("note: {advice}");
            run.warn(&advice)?;
        }
        for f in source.fingerprints() {
            if f.overlong_prompts > 0 {
                let msg = format!(
                    "data.filter_overlong_prompts: {} of the {} prompts of {} are longer than \
                     rollout.max_prompt_length ({} tokens) and left out",
                    f.overlong_prompts,
                    f.rows + f.overlong_prompts,
                    f.path.display(),
                    recipe.overlong_prompt_limit().unwrap_or(0)
                );
                eprintln!("note: {msg}");
                run.warn(&msg)?;
            }
        }
        // TRL counts optimizer updates in max_steps; Tandem counts steps
        // (a generation and its updates). Said once, where it differs.
        if updates_per_step > 1 {
            let total_updates = updates_per_step as u64 * max_steps;
            run.event(
                "optimizer_updates",
                json!({"per_step": updates_per_step, "total": total_updates}),
            )?;
            eprintln!(
                "note: each step makes {updates_per_step} optimizer updates (num_iterations {} x \
                 steps_per_generation / gradient_accumulation_steps {}), {total_updates} in all, \
                 the learning rate moving with each; TRL would count each update as a step \
                 (README, the TRL table)",
                t.num_iterations.max(1),
                t.updates_per_generation(),
            );
        }
        // A run sized in epochs counts its steps from the global batch, which
        // the number of ranks sets: another number moves the end.
        if let Some((_, _, state)) = &resume
            && state.world_size != world
            && t.max_steps == 0
        {
            let msg = format!(
                "resumed with {world} learner ranks, the checkpoint had {}: the run is sized by \
                 num_train_epochs, so it now ends at step {max_steps} (each step takes {} \
                 prompts instead of {})",
                state.world_size,
                recipe.prompts_per_rank_per_step() * world,
                recipe.prompts_per_rank_per_step() * state.world_size
            );
            eprintln!("note: {msg}");
            run.warn(&msg)?;
        }
        if !recipe_changes.is_empty() {
            let list: Vec<String> = recipe_changes.iter().map(|c| c.to_string()).collect();
            run.event(
                "recipe_changed",
                json!({"step": start_step, "changes": recipe_changes}),
            )?;
            run.warn(&format!(
                "resumed with a recipe that changes training (--allow-recipe-change): {}",
                list.join(", ")
            ))?;
        }
        if recipe.rollout.weight_sync_endpoints.is_empty() {
            let msg = "rollout.weight_sync_endpoints is empty: new weights are not pushed, \
                       generation stays on the starting weights (external endpoint mode)";
            tracing::warn!("{msg}");
            run.warn(msg)?;
        }
    }

    // ---- resume: the servers get the checkpoint's weights first
    if let (Some(pusher), Some((step, _, _))) = (&pusher, &resume)
        && !pusher.clients.is_empty()
    {
        let server = rt.block_on(pusher.server_version())?;
        let version = if server >= weight_version {
            let v = server + 1;
            if let Some(run) = &run {
                run.event(
                    "weight_version_bumped",
                    json!({"step": step, "checkpoint_version": weight_version,
                           "server_version": server, "pushed_version": v}),
                )?;
            }
            v
        } else {
            weight_version
        };
        rt.block_on(pusher.push_policy(&params, &cfg, version))?;
        weight_version = version;
    } else if let Some(pusher) = pusher.as_ref().filter(|p| !p.clients.is_empty()) {
        // A fresh run: a server past version 0 holds other weights (an earlier
        // run's), and one at version 0 the base, where a run starting from a
        // LoRA adapter is already off it; so it gets ours first; pushes then
        // count on from its version.
        let server = rt.block_on(pusher.server_version())?;
        if server > 0 || recipe.model.lora_adapter_path.is_some() {
            let version = server + 1;
            rt.block_on(pusher.push_policy(&params, &cfg, version))?;
            if let Some(run) = &run {
                run.event(
                    "initial_weights_pushed",
                    json!({"server_version": server, "pushed_version": version}),
                )?;
            }
            weight_version = version;
        }
    }
    c.barrier()?;

    // ---- supervised warm-up (fresh runs only; a checkpoint holds its result)
    if resume.is_none() && t.sft_warmup_steps > 0 {
        weight_version = sft_warmup(
            &recipe,
            c,
            &policy,
            (&params, &cfg),
            &tokenizer,
            &mut source,
            (
                pad_id,
                cfg.eos_token_ids
                    .first()
                    .copied()
                    .or(tokenizer.eos_token_id()),
            ),
            &device,
            run.as_ref(),
            pusher.as_ref(),
            &rt,
            weight_version,
        )?;
    }

    // ---- eval setup
    let eval_examples = if rank == 0 && recipe.eval.enabled() && !recipe.data.eval_files.is_empty()
    {
        Some(
            load_eval_examples(
                &recipe,
                recipe.eval.max_examples,
                Some(&tokenizer),
                tool_definitions,
            )?
            .0,
        )
    } else {
        None
    };
    let eval_client = if eval_examples.is_some() {
        let mut s = rollout_settings(&recipe, rank);
        s.num_generations = recipe.eval.num_samples.max(1);
        s.temperature = recipe.eval.temperature as f32;
        Some(
            RolloutClient::new(s, Some(tokenizer.clone()))?
                .with_max_prompt_length(recipe.rollout.max_prompt_length)
                .with_tools(tools),
        )
    } else {
        None
    };
    let run_eval = |step: u64, weight_version: u64| -> anyhow::Result<()> {
        let (Some(examples), Some(ec), Some(run)) = (&eval_examples, &eval_client, &run) else {
            return Ok(());
        };
        let result = rt.block_on(evaluate(ec, &rewards, examples, t.seed))?;
        let mut line = serde_json::to_value(&result)?;
        if let Value::Object(m) = &mut line {
            m.insert("step".into(), json!(step));
            m.insert("weight_version".into(), json!(weight_version));
        }
        run.log_eval(&line)?;
        run.event("eval", json!({"step": step, "mean_at_k": result.mean_at_k}))?;
        tracing::info!(step, pass = ?result.pass_at_k, "eval");
        let per_file: Vec<String> = result
            .per_file
            .iter()
            .map(|(name, f)| {
                let p1 = f.pass_at_k.get("pass@1").copied().unwrap_or(f64::NAN);
                format!("{name} {p1:.3}")
            })
            .collect();
        eprintln!(
            "eval step {step}: pass@1 {:.3} ({} questions x {} samples, {:.1}s){}",
            result.pass_at_k.get("pass@1").copied().unwrap_or(f64::NAN),
            result.num_questions,
            result.num_samples,
            result.seconds,
            if per_file.is_empty() {
                String::new()
            } else {
                format!("; {}", per_file.join(", "))
            }
        );
        Ok(())
    };
    // TRL's trainer_state for python reward functions: the optimizer
    // updates of the steps done, and the passes over the prompts.
    let set_trainer_state = |steps_done: u64| {
        let prompts_per_step = (recipe.prompts_per_rank_per_step() * world) as u64;
        rewards.set_trainer_state(
            steps_done * updates_per_step as u64,
            max_steps * updates_per_step as u64,
            (steps_done * prompts_per_step) as f64 / epoch_prompts,
        )
    };
    set_trainer_state(start_step);
    if resume.is_none() {
        run_eval(0, weight_version)?;
    }

    // ---- the loop
    let prompts_per_rank = recipe.prompts_per_rank_per_step();
    let g = recipe.rollout.num_generations;
    let temperature = if recipe.rollout.temperature > 0.0 {
        recipe.rollout.temperature
    } else {
        1.0
    };
    let ga = t.gradient_accumulation_steps.max(1);
    let num_updates = t.updates_per_generation();
    let max_completion = recipe.rollout.max_completion_length;
    let num_functions = labels.len();
    let fingerprint = if world > 1 {
        Some(WeightsFingerprint::new(&vars)?)
    } else {
        None
    };
    // One generation round of this rank: its next prompts, each request
    // seeded by the step, the round and the prompt.
    // (The same draw, spawned, prefetches the next step with async_lag 1.)
    let draw_round = |source: &mut PromptSource, step: u64, round: usize| {
        let examples = source.next_batch(round_prompts);
        let seeds: Vec<u64> = examples
            .iter()
            .map(|e| request_seed_in_round(t.seed, step, round, e))
            .collect();
        (examples, seeds)
    };
    let generate_round = |source: &mut PromptSource,
                          step: u64,
                          round: usize|
     -> anyhow::Result<(Vec<Example>, Vec<GroupOutcome>)> {
        let (examples, seeds) = draw_round(source, step, round);
        let outcomes = rt.block_on(client.generate(&examples, &seeds))?;
        Ok((examples, outcomes))
    };
    // A round's rewards as this rank's share of the gather, and what the
    // reward functions logged (extra columns by prompt slot x completion).
    let score_round = |examples: &[Example],
                       outcomes: &[GroupOutcome]|
     -> anyhow::Result<(Vec<f64>, RewardLogs)> {
        let mut inputs = Vec::new();
        let mut kept = Vec::new();
        for (i, (ex, o)) in examples.iter().zip(outcomes).enumerate() {
            if let GroupOutcome::Kept(group) = o {
                if group.completions.len() != g {
                    bail!(
                        "a group has {} completions, expected {g}",
                        group.completions.len()
                    );
                }
                kept.push(i);
                inputs.extend(group.reward_inputs(ex, i));
            }
        }
        let mut slots = vec![None; examples.len()];
        let mut logged = RewardLogs::default();
        if !inputs.is_empty() {
            let scores = rt.block_on(rewards.score(&inputs))?;
            for (n, &i) in kept.iter().enumerate() {
                let part = n * g..(n + 1) * g;
                slots[i] = Some((
                    scores.total[part.clone()].to_vec(),
                    scores
                        .per_function
                        .iter()
                        .map(|f| f.values[part.clone()].to_vec())
                        .collect::<Vec<_>>(),
                ));
            }
            logged.metrics = scores.logged.metrics;
            for (column, values) in scores.logged.extra {
                let mut by_slot = vec![Value::Null; examples.len() * g];
                for (n, &i) in kept.iter().enumerate() {
                    by_slot[i * g..(i + 1) * g].clone_from_slice(&values[n * g..(n + 1) * g]);
                }
                logged.extra.insert(column, by_slot);
            }
        }
        Ok((encode_slots(&slots, g, num_functions), logged))
    };
    let run_started = Instant::now();
    for step in start_step + 1..=max_steps {
        let step_started = Instant::now();
        set_trainer_state(step - 1);
        // 1-2. prompts and completions: the first round (prefetched, or
        // generated now); dynamic sampling asks for more below.
        let t_gen = Instant::now();
        let (first_round, mut first_rewards, prefetched_score_s) = match prefetched.take() {
            Some(b) if b.step == step => (
                (b.examples, b.outcomes),
                b.rewards.map(|r| (r, b.logged)),
                b.score_s,
            ),
            _ => (generate_round(&mut source, step, 0)?, None, 0.0),
        };
        let mut generate_s = t_gen.elapsed();
        // Also after the last step: the final checkpoint then holds the next
        // batch, and a run extended with --resume-from stays exact.
        let pending = if recipe.rollout.async_lag == 1 {
            let (next, seeds) = draw_round(&mut source, step + 1, 0);
            let cl = client.clone();
            let examples = next.clone();
            let handle = rt.spawn(async move { cl.generate(&examples, &seeds).await });
            Some((next, handle))
        } else {
            None
        };

        // 3. rewards, gathered over ranks in the global order; with dynamic
        // sampling, round after round until enough groups carry a signal.
        let t_score = Instant::now();
        let mut more_rounds_s = Duration::ZERO;
        let mut rounds = vec![first_round];
        let mut round_logs: Vec<RewardLogs> = Vec::new();
        let mut selection = GroupSelection::new(group_filter.clone(), prompts_per_rank * world);
        loop {
            let round = rounds.len() - 1;
            let (examples, outcomes) = &rounds[round];
            let (local, logged) = match first_rewards.take() {
                Some(scored) if round == 0 => scored,
                _ => score_round(examples, outcomes)?,
            };
            round_logs.push(logged);
            let gathered = all_gather_f64(c, &local)?;
            selection.add_round(decode_round(
                &gathered,
                round,
                round_prompts,
                g,
                num_functions,
            )?);
            if !selection.wants_more() || rounds.len() >= max_gen_rounds {
                break;
            }
            let t_more = Instant::now();
            rounds.push(generate_round(&mut source, step, rounds.len())?);
            more_rounds_s += t_more.elapsed();
        }
        let dropped_global = world * round_prompts * selection.rounds - selection.received;
        let kept_global = selection.chosen.len();
        if kept_global == 0 && selection.received > 0 {
            bail!(
                "step {step}: none of the {} groups generated in {} rounds has a learning signal \
                 by train.dynamic_sampling (every group's {} ties{}); raise \
                 train.max_num_gen_batches ({}), train on prompts the policy solves sometimes \
                 but not always, or turn train.dynamic_sampling off",
                selection.received,
                selection.rounds,
                t.dynamic_sampling_metric.as_deref().unwrap_or("reward"),
                t.dynamic_sampling_reward_range
                    .map(|[lo, hi]| format!(" or has a mean outside ({lo}, {hi})"))
                    .unwrap_or_default(),
                t.max_num_gen_batches,
            );
        }
        if kept_global == 0 {
            bail!(
                "step {step}: every group was dropped ({dropped_global} groups; foreign client tags?)"
            );
        }
        if selection.wants_more() {
            let msg = format!(
                "step {step}: dynamic sampling found {kept_global} of {} groups with a learning \
                 signal in {} generation rounds (train.max_num_gen_batches {}); the step trains \
                 on those",
                prompts_per_rank * world,
                selection.rounds,
                t.max_num_gen_batches
            );
            tracing::warn!("{msg}");
            if let Some(run) = &run {
                run.warn_at(step, "dynamic_sampling_short", &msg)?;
            }
        }
        // The chosen groups' rewards in the global order; this rank's groups
        // as (round, prompt slot, offset in `totals`).
        let mut totals = Vec::new();
        let mut per_fn: Vec<Vec<f64>> = vec![Vec::new(); num_functions];
        let mut my_offsets = Vec::new();
        for group in &selection.chosen {
            if group.rank == rank {
                my_offsets.push((group.round, group.slot, totals.len()));
            }
            totals.extend_from_slice(&group.totals);
            for (v, values) in per_fn.iter_mut().zip(&group.per_function) {
                v.extend_from_slice(values);
            }
        }
        let adv = match loss_cfg.multi_objective_aggregation {
            MultiObjectiveAggregation::SumThenNormalize => {
                compute_advantages(&totals, g, &loss_cfg)?
            }
            MultiObjectiveAggregation::NormalizeThenSum => {
                compute_gdpo_advantages(&totals, &per_fn, &reward_weights, g, &loss_cfg)?
            }
        };
        let score_s = t_score.elapsed().saturating_sub(more_rounds_s)
            + Duration::from_secs_f64(prefetched_score_s);
        generate_s += more_rounds_s;
        let log_step = step % logging_steps == 0
            || step == max_steps
            || (step == 1 && recipe.log.logging_first_step);
        let completion_records: Vec<Value> = if recipe.log.log_completions && log_step {
            let mut records = Vec::new();
            for &(round, i, off) in &my_offsets {
                let (examples, outcomes) = &rounds[round];
                let GroupOutcome::Kept(group) = &outcomes[i] else {
                    continue;
                };
                for (j, comp) in group.completions.iter().enumerate() {
                    let k = off + j;
                    let fns: serde_json::Map<String, Value> = labels
                        .iter()
                        .zip(&per_fn)
                        .map(|(label, v)| (label.clone(), json!(v[k])))
                        .collect();
                    let extra = round_logs
                        .get(round)
                        .map(|l| l.extra_of(i * g + j))
                        .unwrap_or_default();
                    let mut record = json!({
                        "step": step,
                        "index": k,
                        "rank": rank,
                        "prompt": comp.prompt.as_ref().map_or(&examples[i].prompt_text, |p| &p.text),
                        "answer": examples[i].answer,
                        "completion": comp.text,
                        "reward": totals[k],
                        "rewards": fns,
                        "advantage": adv.advantages[k],
                        "finish_reason": comp.finish_reason,
                        "completion_tokens": comp.completion_ids.len(),
                        "weight_version": comp.weight_version,
                        "tool_calls": comp.tool_calls,
                    });
                    // TRL's log_extra columns.
                    if !extra.is_empty() {
                        record["extra"] = Value::Object(extra);
                    }
                    records.push(record);
                }
            }
            records
        } else {
            Vec::new()
        };

        // 4. local rows and micro-batches
        let t_fb = Instant::now();
        let mut rows = Vec::new();
        let mut lengths = CompletionLengths::default();
        // Completions, tool calls, failed calls (with rollout.tools).
        let mut local_tools = [0.0; 3];
        for &(round, i, off) in &my_offsets {
            let GroupOutcome::Kept(group) = &rounds[round].1[i] else {
                continue;
            };
            for (j, comp) in group.completions.iter().enumerate() {
                let truncated = is_truncated(comp, max_completion);
                lengths.add(comp.completion_ids.len(), truncated);
                local_tools[0] += 1.0;
                local_tools[1] += comp.tool_calls as f64;
                local_tools[2] += comp.tool_failures as f64;
                rows.push(Row {
                    prompt_ids: comp.prompt_ids(group),
                    completion_ids: &comp.completion_ids,
                    logprobs: &comp.logprobs,
                    tool_mask: &comp.tool_mask,
                    advantage: adv.advantages[off + j],
                    masked: truncated && t.mask_truncated_completions,
                });
            }
        }
        // Prompt tokens, completion tokens.
        let mut local_tokens = [0.0, 0.0];
        for r in &rows {
            local_tokens[0] += r.prompt_ids.len() as f64;
            local_tokens[1] += r.completion_ids.len() as f64;
        }
        // The updates' micro-batches (batch::plan_micro_batches), their
        // rows ordered by length, except where top_entropy_quantile computes
        // a threshold per micro-batch (TRL's micro-batches hold consecutive
        // rows); cut by count, or by train.max_tokens_per_micro_batch.
        let row_lengths: Vec<(usize, usize)> = rows
            .iter()
            .map(|r| (r.prompt_ids.len(), r.completion_ids.len()))
            .collect();
        let plan = plan_micro_batches(
            &row_lengths,
            num_updates,
            ga,
            t.per_device_train_batch_size,
            loss_cfg.top_entropy_quantile >= 1.0,
            t.max_tokens_per_micro_batch,
        );
        let micro_batch_count: usize = plan.iter().map(Vec::len).sum();
        let mut updates: Vec<Vec<MicroBatch>> = Vec::with_capacity(plan.len());
        for micro_batches in &plan {
            let mut mbs = Vec::with_capacity(micro_batches.len());
            for indices in micro_batches {
                let rows: Vec<Row> = indices.iter().map(|&i| rows[i]).collect();
                mbs.push(build_micro_batch(&rows, pad_id, &device)?);
            }
            updates.push(mbs);
        }
        if loss_cfg.vllm_importance_sampling_correction
            && updates
                .iter()
                .flatten()
                .any(|m| m.rollout_logprobs.is_none())
        {
            bail!(
                "the rollout server returned no log-probs, which the importance-sampling \
                 correction needs (train.vllm_importance_sampling_correction)"
            );
        }
        // Every rank takes part in as many entropy-threshold gathers per
        // update as the rank with the most micro-batches makes.
        let threshold_gathers: Vec<usize> = if loss_cfg.top_entropy_quantile < 1.0 {
            let counts: Vec<f64> = updates.iter().map(|m| m.len() as f64).collect();
            let gathered = all_gather_f64(c, &counts)?;
            (0..updates.len())
                .map(|u| gathered.iter().map(|r| r[u] as usize).fold(ga, usize::max))
                .collect()
        } else {
            vec![0; updates.len()]
        };
        let beta = kl.value();
        for mb in updates.iter_mut().flatten() {
            // Values only: the checkpointed path drops each chunk's logits
            // as it goes. Every update after the first trains a policy that
            // has moved since the batch was generated.
            if t.num_iterations > 1 || num_updates > 1 {
                let (lp, _) = mb.logprobs(&policy, temperature, false, true)?;
                mb.old_logprobs = Some(lp.logprobs.detach());
            }
            if let Some((_, reference)) = &reference
                && beta > 0.0
            {
                let (lp, _) = mb.logprobs(reference, temperature, false, true)?;
                mb.ref_logprobs = Some(lp.logprobs.detach());
            }
        }
        // Each update's loss is normalized over its own micro-batches, on
        // every rank.
        let mut norms = Vec::with_capacity(updates.len());
        for mbs in &updates {
            let masks: Vec<&Tensor> = mbs.iter().map(|m| &m.response_mask).collect();
            norms.push(Normalizers::for_micro_batches(
                &masks,
                max_completion,
                world,
                |x| {
                    let mut b = x;
                    c.all_reduce_sum_f64(&mut b)
                        .map_err(|e| GrpoError::Invalid(e.to_string()))?;
                    Ok(b)
                },
            )?);
        }
        // Padding, old and reference log-probs, then every pass's loss.
        let mut forward_backward = t_fb.elapsed();
        let mut allreduce = Duration::ZERO;
        let mut optimizer_s = Duration::ZERO;
        let mut metrics = LossMetrics::default();
        let mut grad_norm = 0.0;
        let mut skipped = false;
        let first_update = (step - 1) as usize * updates_per_step;
        let mut lr = schedule.lr_at(first_update);
        // num_iterations passes, each of `num_updates` optimizer updates. The
        // logged metrics are the last pass's (its updates merged), the
        // gradient norm and learning rate the last update's.
        let mu = t.num_iterations.max(1);
        let passes = (0..mu).flat_map(|pass| {
            updates
                .iter()
                .zip(&norms)
                .zip(&threshold_gathers)
                .map(move |((mbs, norm), gathers)| (pass + 1 == mu, mbs, norm, *gathers))
        });
        let mut last_pass = LossMetrics::default();
        for (k, (in_last_pass, mbs, norm, gathers)) in passes.enumerate() {
            lr = schedule.lr_at(first_update + k);
            let t0 = Instant::now();
            let (store, m) = if mbs.is_empty() {
                (
                    candle_core::backprop::GradStore::default(),
                    LossMetrics::default(),
                )
            } else {
                // PEFT's lora_dropout, in the forwards that make gradients
                // (the model in train mode): masks seeded by the step, the
                // update, the micro-batch and the rank, the same in a
                // resumed run.
                let dropped: Vec<CausalLM> =
                    if recipe.model.use_peft && recipe.model.lora_dropout > 0.0 {
                        (0..mbs.len())
                            .map(|i| {
                                let key = format!("lora-dropout|{}|{step}|{k}|{i}|{rank}", t.seed);
                                policy.with_dropout(hash_u64(key.as_bytes()))
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                accumulate_gradients(&loss_cfg, beta, norm, &var_list, mbs.len(), |i| {
                    let mb = &mbs[i];
                    let lm = dropped.get(i).unwrap_or(&policy);
                    let (lp, checkpointed) =
                        mb.logprobs(lm, temperature, true, t.recompute_logits)?;
                    let mut inputs = LossInputs::new(
                        lp.logprobs,
                        mb.response_mask.clone(),
                        mb.advantages.clone(),
                    );
                    if loss_cfg.top_entropy_quantile < 1.0
                        && let Some(entropy) = &lp.entropy
                    {
                        let threshold = entropy_threshold(
                            c,
                            Some((entropy, &mb.response_mask)),
                            loss_cfg.top_entropy_quantile,
                        )
                        .map_err(|e| GrpoError::Invalid(e.to_string()))?;
                        inputs.entropy_mask =
                            Some(high_entropy_mask(entropy, &mb.response_mask, threshold)?);
                    }
                    inputs.entropy = lp.entropy;
                    inputs.old_logprobs = mb.old_logprobs.clone();
                    inputs.ref_logprobs = mb.ref_logprobs.clone();
                    inputs.rollout_logprobs = mb.rollout_logprobs.clone();
                    Ok(MicroBatchForward {
                        inputs,
                        checkpointed,
                    })
                })?
            };
            // Every rank takes part in the same number of threshold gathers
            // per update, also when dropped groups left it fewer
            // micro-batches.
            if loss_cfg.top_entropy_quantile < 1.0 {
                for _ in mbs.len()..gathers {
                    entropy_threshold(c, None, loss_cfg.top_entropy_quantile)?;
                }
            }
            let mut grads = Vec::with_capacity(vars.len());
            for (g, (_, v)) in optimizer.gradients(&store).into_iter().zip(&vars) {
                grads.push(match g {
                    Some(g) => g,
                    None => v.as_tensor().zeros_like()?,
                });
            }
            forward_backward += t0.elapsed();
            let t1 = Instant::now();
            let mut grads = crate::collective::all_reduce_tensors(c, &grads)?;
            metrics = reduce_metrics(c, &m)?;
            if in_last_pass {
                last_pass.merge(&metrics);
            }
            allreduce += t1.elapsed();
            let t2 = Instant::now();
            grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
            if !metrics.loss.is_finite() || !grad_norm.is_finite() {
                skipped = true;
                streak += 1;
                let msg = format!(
                    "step {step}: non-finite loss ({}) or gradient norm ({grad_norm}); \
                     optimizer step skipped ({streak} in a row, limit {})",
                    metrics.loss, t.max_nonfinite_steps
                );
                tracing::warn!("{msg}");
                if let Some(run) = &run {
                    run.warn_at(step, "nonfinite", &msg)?;
                }
                if streak >= t.max_nonfinite_steps.max(1) {
                    bail!(
                        "{} non-finite steps in a row (train.max_nonfinite_steps): stopping at step {step}",
                        streak
                    );
                }
                break;
            }
            streak = 0;
            optimizer.step(&grads, lr)?;
            optimizer_s += t2.elapsed();
        }
        // A skipped step logs the update that was not finite.
        if !skipped {
            metrics = last_pass.mean_over_updates(num_updates);
        }
        let summary = metrics.summary();
        if let Some(k) = summary.kl
            && !skipped
        {
            kl.update(k, kept_global * g)?;
        }

        // 5a. TRL's sync_ref_model: the reference moves towards the policy.
        if t.sync_ref_model
            && step % t.ref_model_sync_steps == 0
            && let Some((ref_weights, ref_model)) = &mut reference
        {
            let alpha = t.ref_model_mixup_alpha;
            let mut mixed = BTreeMap::new();
            for (name, var) in &vars {
                let old = ref_weights
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("the reference model has no tensor `{name}`"))?;
                let policy_part = var.as_tensor().to_dtype(DType::F32)?.affine(alpha, 0.0)?;
                let ref_part = old.to_dtype(DType::F32)?.affine(1.0 - alpha, 0.0)?;
                let new = (policy_part + ref_part)?.to_dtype(old.dtype())?;
                mixed.insert(name.clone(), new);
            }
            *ref_weights = Weights::new(mixed);
            *ref_model = CausalLM::new(&cfg, ref_weights)?;
            if let Some(run) = &run {
                run.event("ref_model_sync", json!({"step": step, "alpha": alpha}))?;
            }
        }

        // 5b. the prefetched batch is complete before the weights change
        // and scored now, as the next step would score it (its trainer
        // state), while its environments still hold their completions'
        // state: a checkpoint holds the rewards, not the environments.
        if let Some((next, handle)) = pending {
            let mut outcomes = rt.block_on(handle)??;
            let t_prefetch_score = Instant::now();
            set_trainer_state(step);
            let (rewards, logged) = score_round(&next, &outcomes)?;
            set_trainer_state(step - 1);
            for o in &mut outcomes {
                if let GroupOutcome::Kept(group) = o {
                    for c in &mut group.completions {
                        c.environment = None;
                    }
                }
            }
            prefetched = Some(PrefetchedBatch {
                step: step + 1,
                examples: next,
                outcomes,
                rewards: Some(rewards),
                score_s: t_prefetch_score.elapsed().as_secs_f64(),
                logged,
            });
        }

        // 6. weight push
        let t_push = Instant::now();
        c.barrier()?;
        if let Some(pusher) = &pusher
            && !skipped
            && !pusher.clients.is_empty()
        {
            let version = step.max(weight_version + 1);
            rt.block_on(pusher.push_policy(&params, &cfg, version))?;
            weight_version = version;
        }
        // Rank 0's version reaches every rank: the others add nothing.
        let mut wv = [if rank == 0 {
            weight_version as f64
        } else {
            0.0
        }];
        all_sum(c, &mut wv)?; // also the barrier after the push
        if rank > 0 {
            weight_version = wv[0] as u64;
        }
        let weight_sync_s = t_push.elapsed();

        // 7. logs
        #[cfg(debug_assertions)]
        perturb_weights_for_tests(&vars, rank, step)?;
        // Logged under its own name: a fingerprint only tells ranks apart.
        let digest = if step == max_steps {
            Some(("weights_hash", weights_hash(&vars)?))
        } else if let Some(f) = &fingerprint {
            Some(("weights_fingerprint", f.digest(&vars)?))
        } else {
            None
        };
        // Every rank applies the same all-reduced update, so the ranks hold
        // the same weights bit for bit. Ranks that do not (a faulty device,
        // mixed hardware) would train on silently apart: stop instead; a
        // resume gives every rank the checkpoint's weights.
        if world > 1 {
            let mine = digest
                .as_ref()
                .map_or(Vec::new(), |(_, d)| d.clone().into_bytes());
            let hashes: Vec<String> = all_gather_bytes(c, mine)?
                .into_iter()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            if hashes.iter().any(|h| *h != hashes[0]) {
                let listed: Vec<String> = hashes
                    .iter()
                    .enumerate()
                    .map(|(r, h)| format!("rank {r} {h}"))
                    .collect();
                let msg = format!(
                    "step {step}: the learner ranks hold different weights ({}); their updates \
                     diverged, so the run stops here. Resume from the last checkpoint \
                     (--resume-from or --auto-resume), which gives every rank the same weights",
                    listed.join(", ")
                );
                if let Some(run) = &run {
                    let kind = digest.as_ref().map(|(k, _)| *k);
                    run.event(
                        "ranks_diverged",
                        json!({"step": step, "hashes": hashes, "kind": kind}),
                    )?;
                }
                bail!("{msg}");
            }
        }
        let mut tokens = local_tokens;
        all_sum(c, &mut tokens)?;
        let tool_use = if client.uses_tools() {
            let mut t = local_tools;
            all_sum(c, &mut t)?;
            let [completions, calls, failed] = t.map(|n| n as usize);
            Some(crate::tools::call_metrics(completions, calls, failed))
        } else {
            None
        };
        tokens_seen += tokens[0] + tokens[1];
        // Every rank takes part on the same (logged) steps.
        let completions = if log_step {
            let gathered = all_gather_f64(c, &lengths.to_vec())?;
            Some(CompletionLengths::merge(&gathered).to_json())
        } else {
            None
        };
        if let Some(f) = &rank_log {
            use std::io::Write;
            let mut line = json!({"step": step, "rank": rank, "weight_version": weight_version});
            if let Some((key, d)) = &digest {
                line[*key] = json!(d);
            }
            let mut f = f;
            writeln!(f, "{line}")?;
        }
        let total_s = step_started.elapsed();
        let versions: Vec<u64> = rounds
            .iter()
            .flat_map(|(_, outcomes)| outcomes)
            .filter_map(|o| match o {
                GroupOutcome::Kept(g) => Some(g.completions.iter().map(|c| c.weight_version)),
                GroupOutcome::Dropped { .. } => None,
            })
            .flatten()
            .collect();
        if recipe.log.log_completions && log_step {
            // Every rank's completions, in the global order of their groups.
            let mut all: Vec<Value> = Vec::new();
            for bytes in all_gather_bytes(c, serde_json::to_vec(&completion_records)?)? {
                all.extend(serde_json::from_slice::<Vec<Value>>(&bytes)?);
            }
            all.sort_by_key(|r| r["index"].as_u64());
            if let Some(run) = &run {
                run.log_completions(&all)?;
                let shown = recipe.log.num_completions_to_print.unwrap_or(all.len());
                for r in all.iter().take(shown) {
                    eprintln!(
                        "completion step {step}: reward {:.3} advantage {:+.3} | {} -> {}",
                        r["reward"].as_f64().unwrap_or(f64::NAN),
                        r["advantage"].as_f64().unwrap_or(f64::NAN),
                        shortened(r["prompt"].as_str().unwrap_or_default()),
                        shortened(r["completion"].as_str().unwrap_or_default()),
                    );
                }
            }
        }
        if let Some(run) = &run
            && log_step
        {
            let (rm, rs) = mean_std(&totals);
            let mut fns = serde_json::Map::new();
            for (label, v) in labels.iter().zip(&per_fn) {
                let (m, s) = mean_std(v);
                fns.insert(label.clone(), json!({"mean": m, "std": s}));
            }
            let mut line = json!({
                "step": step,
                "reward": rm,
                "reward_std": rs,
                "rewards": fns,
                "advantages": adv.stats,
                "frac_reward_zero_std": adv.stats.frac_reward_zero_std,
                "grad_norm": grad_norm,
                "lr": lr,
                "beta": beta,
                "skipped": skipped,
                "nonfinite_streak": streak,
                "tokens": {"prompt": tokens[0], "completion": tokens[1]},
                // TRL's num_tokens: prompt and completion tokens so far.
                "num_tokens": tokens_seen,
                // TRL's epoch: passes over the training prompts so far.
                "epoch": (step * (prompts_per_rank * world) as u64) as f64 / epoch_prompts,
                // TRL's completions/*: lengths, and the share cut at the limit.
                "completions": completions,
                "kept_groups": kept_global,
                "dropped_groups": dropped_global,
                // This rank's (rank 0's) micro-batches over the step's updates.
                "micro_batches": micro_batch_count,
                "retries": client.counters.retries.load(std::sync::atomic::Ordering::Relaxed),
                "generated_by_version": {
                    "min": versions.iter().min(), "max": versions.iter().max()
                },
                "weight_version": weight_version,
                "timings": {
                    "generate": secs(generate_s),
                    "score": secs(score_s),
                    "forward_backward": secs(forward_backward),
                    "allreduce": secs(allreduce),
                    "optimizer": secs(optimizer_s),
                    "weight_sync": secs(weight_sync_s),
                    "total": secs(total_s),
                },
                "tokens_per_s": (tokens[0] + tokens[1]) / total_s.as_secs_f64().max(1e-9),
                "elapsed_s": secs(run_started.elapsed()),
            });
            if let (Value::Object(m), Value::Object(s)) =
                (&mut line, serde_json::to_value(&summary)?)
            {
                for (k, v) in s {
                    m.entry(k).or_insert(v);
                }
            }
            if let Some((key, d)) = &digest {
                line[*key] = json!(d);
            }
            if let Some(tools) = &tool_use {
                line["tools"] = tools.clone();
            }
            // TRL's log_metric values (this rank's, as TRL logs its main
            // process's), each one's mean over the step.
            let mut metrics = RewardLogs::default();
            for logged in &round_logs {
                for (name, values) in &logged.metrics {
                    metrics
                        .metrics
                        .entry(name.clone())
                        .or_default()
                        .extend(values);
                }
            }
            if !metrics.metrics.is_empty() {
                line["reward_metrics"] = json!(metrics.metric_means());
            }
            if group_filter.is_some() {
                // verl's num_gen_batches; the reward above is the trained
                // groups', this one every generated completion's.
                line["dynamic_sampling"] = json!({
                    "gen_batches": selection.rounds,
                    "groups_received": selection.received,
                    "groups_filtered": selection.filtered,
                    "groups_surplus": selection.surplus,
                    "reward_received": selection.received_reward_mean(),
                });
            }
            run.log_train(&line)?;
            let rounds_note = if group_filter.is_some() {
                format!(
                    " gen_batches {} (filtered {})",
                    selection.rounds, selection.filtered
                )
            } else {
                String::new()
            };
            eprintln!(
                "step {step}/{} reward {rm:.4} loss {:.5} grad_norm {grad_norm:.4} lr {lr:.3e} \
                 dropped {dropped_global}{rounds_note} {:.2}s",
                max_steps,
                summary.loss,
                total_s.as_secs_f64()
            );
        }

        // 8. checkpoint (rank 0 writes; every rank's prefetched batch goes in)
        let ck = &recipe.checkpoint;
        let save = ck.save_strategy.due(step, save_steps, steps_per_epoch) || step == max_steps;
        if save {
            let prefetched_all: Vec<Option<PrefetchedBatch>> = if recipe.rollout.async_lag == 1 {
                let mine = serde_json::to_vec(&prefetched)?;
                all_gather_bytes(c, mine)?
                    .iter()
                    .map(|b| serde_json::from_slice(b))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            if let Some(run) = &run {
                let state = TrainerState::new(
                    LoopState {
                        step,
                        weight_version,
                        data_cursor: source.cursor(),
                        kl_controller: kl.clone(),
                        nonfinite_streak: streak,
                        prefetched: prefetched_all,
                        num_input_tokens_seen: tokens_seen,
                    },
                    &given,
                    world,
                )
                .with_python_functions(python_functions.clone());
                let dir = save_checkpoint(
                    run.path(),
                    &Checkpoint {
                        cfg: &cfg,
                        weights: &params.model_weights(&cfg)?,
                        adapter: params.adapter().map(|a| (a, base_model.as_str())),
                        tokenizer: &tokenizer,
                        optimizer: &optimizer,
                        state: &state,
                        reference: reference
                            .as_ref()
                            .filter(|_| t.sync_ref_model)
                            .map(|(w, _)| w),
                    },
                    recipe.checkpoint.save_total_limit,
                )?;
                run.event("checkpoint", json!({"step": step, "path": dir}))?;
            }
        }

        // 9. eval
        let ev = &recipe.eval;
        if ev.enabled()
            && (ev.eval_strategy.due(step, eval_steps, steps_per_epoch) || step == max_steps)
        {
            run_eval(step, weight_version)?;
        }
    }
    c.barrier()?;
    if let Some(run) = &run {
        run.event(
            "end",
            json!({"step": max_steps, "elapsed_s": secs(run_started.elapsed())}),
        )?;
    }
    Ok(())
}

/// Where `learner train` without `--config` writes: the recipe's
/// `checkpoint.output_dir`. Exposed for the CLI's messages.
pub fn output_dir(recipe: &Recipe) -> &Path {
    &recipe.checkpoint.output_dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Completion;

    fn completion(len: usize, finish_reason: Option<&str>) -> Completion {
        Completion {
            completion_ids: vec![5; len],
            text: String::new(),
            logprobs: vec![-0.5; len],
            finish_reason: finish_reason.map(str::to_string),
            weight_version: 0,
            tool_mask: Vec::new(),
            tool_calls: 0,
            tool_failures: 0,
            messages: Vec::new(),
            prompt: None,
            environment: None,
        }
    }

    #[test]
    fn truncation_is_finish_reason_length_or_a_full_length_without_reason() {
        assert!(is_truncated(&completion(3, Some("length")), 8));
        assert!(!is_truncated(&completion(8, Some("stop")), 8));
        assert!(is_truncated(&completion(8, None), 8));
        assert!(!is_truncated(&completion(7, None), 8));
    }

    #[test]
    fn masked_rows_leave_the_response_mask() -> anyhow::Result<()> {
        fn row<'a>(prompt: &'a [u32], completion: &'a [u32], masked: bool) -> Row<'a> {
            Row {
                prompt_ids: prompt,
                completion_ids: completion,
                logprobs: &[],
                tool_mask: &[],
                advantage: 1.0,
                masked,
            }
        }
        let (prompt, short, long) = ([1u32, 2, 3], [4u32, 5], [6u32, 7, 8]);
        for (masked, want) in [(false, [1.0, 1.0, 1.0]), (true, [0.0, 0.0, 0.0])] {
            let rows = [row(&prompt, &short, false), row(&prompt, &long, masked)];
            let mb = build_micro_batch(&rows, 0, &Device::Cpu)?;
            let mask: Vec<Vec<f32>> = mb.response_mask.to_vec2()?;
            assert_eq!(mask, vec![vec![1.0, 1.0, 0.0], want.to_vec()]);
        }
        // Tool turns' tokens leave it too; padding stays out.
        let tool_mask = [true, false, true];
        let rows = [
            row(&prompt, &short, false),
            Row {
                tool_mask: &tool_mask,
                ..row(&prompt, &long, false)
            },
        ];
        let mask: Vec<Vec<f32>> = build_micro_batch(&rows, 0, &Device::Cpu)?
            .response_mask
            .to_vec2()?;
        assert_eq!(mask, vec![vec![1.0, 1.0, 0.0], vec![1.0, 0.0, 1.0]]);
        Ok(())
    }

    #[test]
    fn the_fingerprint_samples_large_parameters_and_reads_small_ones_whole() -> anyhow::Result<()> {
        let vars = |large: &[f32], small: &[f32]| -> anyhow::Result<Vec<(String, Var)>> {
            Ok(vec![
                (
                    "a".to_string(),
                    Var::from_vec(large.to_vec(), (100, 100), &Device::Cpu)?,
                ),
                (
                    "b".to_string(),
                    Var::from_vec(small.to_vec(), 10, &Device::Cpu)?,
                ),
            ])
        };
        let large: Vec<f32> = (0..10_000).map(|i| i as f32 * 1e-3).collect();
        let small = [0.5f32; 10];
        let base = vars(&large, &small)?;
        let f = WeightsFingerprint::new(&base)?;
        let d = f.digest(&base)?;
        assert_eq!(
            d,
            f.digest(&vars(&large, &small)?)?,
            "same values, same digest"
        );
        let changed = |at: usize| -> anyhow::Result<Vec<(String, Var)>> {
            let mut v = large.clone();
            v[at] += 1e-3;
            vars(&v, &small)
        };
        // 4096 of 10000 values: positions i * 10000 / 4096, so 0, 2, 4, 7...
        assert_ne!(d, f.digest(&changed(2)?)?);
        assert_ne!(d, f.digest(&changed(9_997)?)?);
        // A value between two samples goes unseen; the full hash sees it.
        assert_eq!(d, f.digest(&changed(1)?)?);
        assert_ne!(weights_hash(&base)?, weights_hash(&changed(1)?)?);
        // Any value of a small parameter counts.
        let mut s = small;
        s[7] = 0.25;
        assert_ne!(d, f.digest(&vars(&large, &s)?)?);
        Ok(())
    }
}
