//! verl's GRPO configuration as a Tandem recipe: its nested YAML
//! (`ppo_trainer.yaml` shape) or the Hydra overrides of a launch script
//! (`python3 -m verl.trainer.main_ppo algorithm.adv_estimator=grpo ...`).
//!
//! verl counts what Tandem counts: a training step is one generation of
//! `data.train_batch_size` prompts x `rollout.n` samples, then
//! `train_batch_size / ppo_mini_batch_size x ppo_epochs` optimizer updates,
//! the learning rate moving once a step. The batch sizes become TRL's
//! `generation_batch_size`, `per_device_train_batch_size` (verl's micro
//! batch) and `gradient_accumulation_steps` for the learner ranks of the
//! topology (every GPU not serving rollouts), so a step makes the same
//! updates on the same samples. Where verl's default differs from Tandem's
//! and changes training (weight decay, the dual-clip cap, the advantage's
//! epsilon, no rollout correction), the default is written out.

use serde_json::{Map, Value, json};

use super::{Converted, Output, Source, inline, script_words, split_gpus, whole_group_micro_batch};

/// The groups of a verl configuration that a Tandem recipe has not.
const VERL_GROUPS: &[&str] = &["actor_rollout_ref", "algorithm", "trainer"];
/// Every group a verl override may name.
const ALL_GROUPS: &[&str] = &[
    "actor_rollout_ref",
    "algorithm",
    "trainer",
    "data",
    "critic",
    "reward_model",
    "custom_reward_function",
    "ray_init",
    "ray_kwargs",
    "global_profiler",
];

const ACTOR: &str = "actor_rollout_ref.actor.";
const ROLLOUT: &str = "actor_rollout_ref.rollout.";

/// verl's keys, flattened to dotted names, in the order given; `None`
/// when `text` is not a verl configuration.
pub(super) fn parse(text: &str) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(map)) = serde_saphyr::from_str::<Value>(text)
        && VERL_GROUPS
            .iter()
            .any(|g| map.get(*g).is_some_and(Value::is_object))
    {
        let mut flat = Map::new();
        flatten("", &Value::Object(map), &mut flat);
        resolve_interpolations(&mut flat);
        return Some(flat);
    }
    let flat = overrides(text);
    flat.keys()
        .any(|k| VERL_GROUPS.iter().any(|g| k.starts_with(&format!("{g}."))))
        .then_some(flat)
}

/// Hydra's `${group.key}` references to other keys of the configuration
/// (verl's YAML is full of them: `response_length:
/// ${data.max_response_length}`), put in: a value that is one reference
/// takes the referenced value, a reference inside text its text. Others
/// (`${oc.env:HOME}`) stay.
fn resolve_interpolations(flat: &mut Map<String, Value>) {
    // A few rounds resolve references to references.
    for _ in 0..4 {
        let snapshot = flat.clone();
        let mut changed = false;
        for v in flat.values_mut() {
            let Value::String(text) = v else { continue };
            if let Some(key) = text.strip_prefix("${").and_then(|t| t.strip_suffix('}'))
                && let Some(target) = snapshot.get(key)
            {
                *v = target.clone();
                changed = true;
                continue;
            }
            let mut out = text.clone();
            for (key, target) in &snapshot {
                let pattern = format!("${{{key}}}");
                if out.contains(&pattern) {
                    let with = match target {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out = out.replace(&pattern, &with);
                }
            }
            if out != *text {
                *v = Value::String(out);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The Hydra overrides (`group.key=value`, `+key=value`) of a launch
/// script.
fn overrides(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for word in script_words(text) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let key = key.trim_start_matches('+');
        if ALL_GROUPS.iter().any(|g| key.starts_with(&format!("{g}."))) {
            out.insert(key.to_string(), hydra_value(value));
        }
    }
    out
}

/// A Hydra value: YAML's scalars and flow lists (`True`, `1e-6`,
/// `['console','wandb']`), else the text.
fn hydra_value(s: &str) -> Value {
    if s.is_empty() {
        return Value::Null;
    }
    match serde_saphyr::from_str::<Value>(s) {
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Null)) => v,
        _ => Value::String(s.to_string()),
    }
}

/// The short name of a verl key for comments (`actor.optim.lr`).
fn short(key: &str) -> String {
    key.trim_start_matches("actor_rollout_ref.").to_string()
}

/// One verl key moved to one Tandem key under the same value.
fn direct(keys: &mut Source, out: &mut Output, pairs: &[(&str, &str)]) {
    keys.direct(out, pairs, short);
}

/// A path that still names a shell variable or `~` wants a real one.
fn path_note(key: &str, v: &Value) -> String {
    let text = inline(v);
    if text.contains('$') || text.contains('~') {
        format!(
            "{}; TODO: the script's shell variables are not known here",
            short(key)
        )
    } else {
        short(key)
    }
}

pub(super) fn convert(flat: Map<String, Value>, source_name: &str) -> Result<Converted, String> {
    let mut keys = Source(flat);
    let mut out = Output::new();
    convert_model_and_data(&mut keys, &mut out);
    keys.lora(
        &mut out,
        [
            "actor_rollout_ref.model.lora_rank",
            "actor_rollout_ref.model.lora_alpha",
            "actor_rollout_ref.model.target_modules",
            "actor_rollout_ref.model.lora_dropout",
        ],
        short,
        "verl",
    );
    if out.has("model.use_peft") {
        direct(
            &mut keys,
            &mut out,
            &[(
                "actor_rollout_ref.model.lora_adapter_path",
                "model.lora_adapter_path",
            )],
        );
    }
    let n = convert_rollout(&mut keys, &mut out);
    let learner_ranks = convert_topology(&mut keys, &mut out);
    convert_batches(&mut keys, &mut out, n, learner_ranks);
    convert_optimizer(&mut keys, &mut out);
    convert_loss(&mut keys, &mut out)?;
    convert_trainer(&mut keys, &mut out);
    convert_reward(&mut keys, &mut out);
    convert_filter_groups(&mut keys, &mut out, learner_ranks);
    for (key, value) in std::mem::take(&mut keys.0) {
        let why = left_out_reason(&key);
        out.leave_out(&key, &value, why);
    }
    Ok(out.into_converted(source_name, "verl"))
}

fn convert_model_and_data(keys: &mut Source, out: &mut Output) {
    if let Some(v) = keys.take("actor_rollout_ref.model.path") {
        out.put_model_path(v, "model.path");
    }
    direct(
        keys,
        out,
        &[
            (
                "actor_rollout_ref.model.enable_gradient_checkpointing",
                "train.gradient_checkpointing",
            ),
            ("data.prompt_key", "data.prompt_column"),
            ("data.shuffle", "data.shuffle"),
            ("data.max_prompt_length", "rollout.max_prompt_length"),
            ("data.max_response_length", "rollout.max_completion_length"),
        ],
    );
    for (from, to) in [
        ("data.train_files", "data.train_files"),
        ("data.val_files", "data.eval_files"),
    ] {
        if let Some(v) = keys.take(from) {
            let files = match v {
                Value::Array(items) => Value::Array(items),
                one => json!([one]),
            };
            let note = path_note(from, &files);
            out.put(to, files, Some(note));
        }
    }
    // verl's preprocessed datasets keep the reference in the reward_model
    // struct, where its rule-based scorers read it.
    out.put(
        "data.answer_column",
        json!("reward_model.ground_truth"),
        Some("where verl's preprocessing puts the reference answer".into()),
    );
    if let Some(v) = keys.take("data.filter_overlong_prompts") {
        out.put(
            "data.filter_overlong_prompts",
            v,
            Some("data.filter_overlong_prompts (over rollout.max_prompt_length)".into()),
        );
    }
}

/// The sampling keys; returns `rollout.n`.
fn convert_rollout(keys: &mut Source, out: &mut Output) -> u64 {
    let n = keys.num(&format!("{ROLLOUT}n")).map(|n| n as u64);
    match n {
        Some(n) => out.put(
            "rollout.num_generations",
            json!(n),
            Some("rollout.n".into()),
        ),
        None => out.put(
            "rollout.num_generations",
            json!(1),
            Some("TODO: verl's default rollout.n is 1, which gives GRPO no group".into()),
        ),
    }
    direct(
        keys,
        out,
        &[
            (&format!("{ROLLOUT}temperature"), "rollout.temperature"),
            (&format!("{ROLLOUT}top_p"), "rollout.top_p"),
            (
                &format!("{ROLLOUT}gpu_memory_utilization"),
                "rollout.gpu_memory_utilization",
            ),
        ],
    );
    if let Some(k) = keys.num(&format!("{ROLLOUT}top_k"))
        && k > 0.0
    {
        out.put(
            "rollout.top_k",
            json!(k as i64),
            Some("rollout.top_k".into()),
        );
    }
    if !out.has("rollout.max_completion_length")
        && let Some(v) = keys.take(&format!("{ROLLOUT}response_length"))
    {
        out.put(
            "rollout.max_completion_length",
            v,
            Some("rollout.response_length".into()),
        );
    }
    // Validation sampling: verl's is greedy unless val_kwargs.do_sample,
    // one sample unless val_kwargs.n.
    let val = format!("{ROLLOUT}val_kwargs.");
    let sampled = keys.bool(&format!("{val}do_sample")).unwrap_or(false);
    let temperature = keys.num(&format!("{val}temperature"));
    let (t, note) = match (sampled, temperature) {
        (true, Some(t)) => (t, "rollout.val_kwargs.temperature"),
        (true, None) => (0.0, "verl's default rollout.val_kwargs.temperature"),
        (false, _) => (
            0.0,
            "verl validates greedily unless rollout.val_kwargs.do_sample",
        ),
    };
    out.put("eval.temperature", json!(t), Some(note.into()));
    let samples = keys.num(&format!("{val}n"));
    out.put(
        "eval.num_samples",
        json!(samples.map_or(1, |k| k as u64)),
        Some(
            if samples.is_some() {
                "rollout.val_kwargs.n"
            } else {
                "verl's default rollout.val_kwargs.n"
            }
            .into(),
        ),
    );
    n.unwrap_or(1)
}

/// `trainer.nnodes` x `trainer.n_gpus_per_node` GPUs between one rollout
/// server and the learners: as many learner ranks as leave a GPU for
/// rollouts and split an update's prompts (`ppo_mini_batch_size`) evenly,
/// the other GPUs to rollout replicas of one GPU each (Tandem's rollout
/// server does not split a model across GPUs yet). Returns the learner
/// ranks.
fn convert_topology(keys: &mut Source, out: &mut Output) -> u64 {
    let nodes = keys.num("trainer.nnodes").map_or(1, |n| n.max(1.0) as u64);
    let per_node = keys.num("trainer.n_gpus_per_node").map_or(8, |n| n as u64);
    let tp_key = format!("{ROLLOUT}tensor_model_parallel_size");
    if let Some(tp) = keys.take(&tp_key)
        && tp.as_u64() != Some(1)
    {
        out.leave_out(
            &tp_key,
            &tp,
            "Tandem's rollout server runs a model on one GPU (no tensor parallelism yet): \
             the GPUs serve replicas of one GPU each (topology.dp)",
        );
    }
    let mini = keys
        .0
        .get(&format!("{ACTOR}ppo_mini_batch_size"))
        .and_then(Value::as_u64)
        .unwrap_or(256)
        .max(1);
    let total = nodes * per_node;
    let (learners, dp) = split_gpus(total, mini);
    out.put(
        "topology.nodes",
        json!(nodes),
        Some("trainer.nnodes".into()),
    );
    out.put(
        "topology.gpus_per_node",
        json!(per_node),
        Some("trainer.n_gpus_per_node".into()),
    );
    out.put("topology.rollout_servers", json!(1), None);
    out.put(
        "topology.dp",
        json!(dp),
        Some("rollout replicas, one GPU each".into()),
    );
    out.put("topology.tp", json!(1), None);
    out.put(
        "topology.learner_ranks",
        json!(learners),
        Some(format!(
            "verl colocates; here {dp} of the {total} GPUs serve rollouts and {learners} train \
             (a divisor of ppo_mini_batch_size {mini})"
        )),
    );
    learners
}

/// verl's batch sizes as TRL's, for `ranks` learner ranks (see the module
/// docs).
fn convert_batches(keys: &mut Source, out: &mut Output, n: u64, ranks: u64) {
    let prompts = keys.num("data.train_batch_size").map_or(1024, |v| v as u64);
    let mini = keys
        .num(&format!("{ACTOR}ppo_mini_batch_size"))
        .map_or(256, |v| v as u64)
        .max(1);
    let micro = keys
        .num(&format!("{ACTOR}ppo_micro_batch_size_per_gpu"))
        .map(|v| v as u64)
        .or_else(|| {
            keys.num(&format!("{ACTOR}ppo_micro_batch_size"))
                .map(|v| (v as u64 / ranks).max(1))
        });
    out.put(
        "train.generation_batch_size",
        json!(prompts * n),
        Some(format!(
            "data.train_batch_size {prompts} prompts x rollout.n {n} (all ranks)"
        )),
    );
    let n = n.max(1);
    let per_rank_update = mini * n / ranks;
    let even = (mini * n).is_multiple_of(ranks)
        && per_rank_update.is_multiple_of(n)
        && prompts.is_multiple_of(mini);
    let batch = whole_group_micro_batch(per_rank_update, n, micro);
    let accumulation = (per_rank_update / batch).max(1);
    let micro_note = match micro {
        Some(m) if m == batch => "actor.ppo_micro_batch_size_per_gpu".to_string(),
        Some(m) => format!(
            "actor.ppo_micro_batch_size_per_gpu is {m}; a micro-batch holds whole groups of \
             {n} and divides the {per_rank_update} samples a rank takes per update"
        ),
        None => "the rank's whole share of an update".to_string(),
    };
    out.put(
        "train.per_device_train_batch_size",
        json!(batch),
        Some(micro_note),
    );
    let mut note = format!(
        "actor.ppo_mini_batch_size {mini} prompts x {n} samples = {} per update, over {ranks} \
         learner ranks",
        mini * n
    );
    if !even {
        note.push_str(
            "; TODO: the sizes do not divide evenly: make data.train_batch_size a multiple of \
             ppo_mini_batch_size, and ppo_mini_batch_size a multiple of the learner ranks",
        );
    }
    out.put(
        "train.gradient_accumulation_steps",
        json!(accumulation),
        Some(note),
    );
    // verl's dynamic batch size: micro-batches by tokens (verl's default
    // budget 16384).
    let dynamic = keys.take(&format!("{ACTOR}use_dynamic_bsz"));
    let budget = keys.take(&format!("{ACTOR}ppo_max_token_len_per_gpu"));
    match (dynamic.as_ref().and_then(Value::as_bool), budget) {
        (Some(true), budget) => {
            let tokens = budget.as_ref().and_then(Value::as_u64).unwrap_or(16384);
            out.put(
                "train.max_tokens_per_micro_batch",
                json!(tokens),
                Some(format!(
                    "actor.use_dynamic_bsz with ppo_max_token_len_per_gpu {tokens} (verl packs \
                     rows without padding; Tandem counts the padded tokens of rows ordered by \
                     length)"
                )),
            );
        }
        (_, Some(v)) => out.leave_out(
            &format!("{ACTOR}ppo_max_token_len_per_gpu"),
            &v,
            "only read with actor.use_dynamic_bsz",
        ),
        (_, None) => {}
    }
    if let Some(v) = dynamic.filter(|v| v.as_bool() != Some(true)) {
        out.leave_out(
            &format!("{ACTOR}use_dynamic_bsz"),
            &v,
            "micro-batches of per_device_train_batch_size rows",
        );
    }
    if let Some(v) = keys.take(&format!("{ACTOR}ppo_micro_batch_size")) {
        out.leave_out(
            &format!("{ACTOR}ppo_micro_batch_size"),
            &v,
            "Tandem's micro-batches count samples per rank \
             (train.per_device_train_batch_size, from ppo_micro_batch_size_per_gpu)",
        );
    }
}

fn convert_optimizer(keys: &mut Source, out: &mut Output) {
    let optim = format!("{ACTOR}optim.");
    if let Some(lr) = keys.take(&format!("{optim}lr")) {
        out.put("train.learning_rate", lr, Some("actor.optim.lr".into()));
    } else {
        out.put(
            "train.learning_rate",
            json!(1e-6),
            Some("verl's default actor.optim.lr".into()),
        );
    }
    let warmup_steps = keys.num(&format!("{optim}lr_warmup_steps"));
    match warmup_steps {
        Some(s) if s > 0.0 => out.put(
            "train.warmup_steps",
            json!(s as u64),
            Some("actor.optim.lr_warmup_steps".into()),
        ),
        _ => {
            if let Some(r) = keys.take(&format!("{optim}lr_warmup_steps_ratio")) {
                out.put(
                    "train.warmup_ratio",
                    r,
                    Some("actor.optim.lr_warmup_steps_ratio".into()),
                );
            }
        }
    }
    keys.take(&format!("{optim}lr_warmup_steps_ratio"));
    let style = keys
        .str(&format!("{optim}lr_scheduler_type"))
        .or_else(|| keys.str(&format!("{optim}warmup_style")))
        .unwrap_or_else(|| "constant".into());
    let min_lr_ratio = keys.num(&format!("{optim}min_lr_ratio")).unwrap_or(0.0);
    let warms = out.has("train.warmup_steps") || out.has("train.warmup_ratio");
    match style.as_str() {
        "cosine" if min_lr_ratio > 0.0 => {
            out.put(
                "train.lr_scheduler_type",
                json!("cosine_with_min_lr"),
                Some("actor.optim.lr_scheduler_type: cosine".into()),
            );
            out.put(
                "train.lr_scheduler_kwargs",
                json!({"min_lr_rate": min_lr_ratio}),
                Some("actor.optim.min_lr_ratio".into()),
            );
        }
        "cosine" => out.put(
            "train.lr_scheduler_type",
            json!("cosine"),
            Some("actor.optim.lr_scheduler_type".into()),
        ),
        other => {
            if other != "constant" {
                out.leave_out(
                    &format!("{optim}lr_scheduler_type"),
                    &json!(other),
                    "train.lr_scheduler_type takes constant, constant_with_warmup, linear, \
                     cosine or cosine_with_min_lr; constant is used",
                );
            }
            out.put(
                "train.lr_scheduler_type",
                json!(if warms {
                    "constant_with_warmup"
                } else {
                    "constant"
                }),
                Some("verl's constant schedule (after its warm-up)".into()),
            );
        }
    }
    let wd = keys.take(&format!("{optim}weight_decay"));
    let note = if wd.is_some() {
        "actor.optim.weight_decay"
    } else {
        "verl's default (Tandem's, as TRL's, is 0)"
    };
    out.put(
        "train.weight_decay",
        wd.unwrap_or(json!(0.01)),
        Some(note.into()),
    );
    if let Some(Value::Array(b)) = keys.take(&format!("{optim}betas"))
        && let [b1, b2] = b.as_slice()
    {
        out.put(
            "train.adam_beta1",
            b1.clone(),
            Some("actor.optim.betas".into()),
        );
        out.put(
            "train.adam_beta2",
            b2.clone(),
            Some("actor.optim.betas".into()),
        );
    }
    direct(
        keys,
        out,
        &[
            (&format!("{ACTOR}grad_clip"), "train.max_grad_norm"),
            (&format!("{ACTOR}ppo_epochs"), "train.num_iterations"),
            (&format!("{ACTOR}entropy_coeff"), "train.entropy_coef"),
        ],
    );
}

fn convert_loss(keys: &mut Source, out: &mut Output) -> Result<(), String> {
    // The clip range: clip_ratio, or its low / high halves.
    let clip = keys.take(&format!("{ACTOR}clip_ratio"));
    let low = keys
        .take(&format!("{ACTOR}clip_ratio_low"))
        .or(clip.clone());
    let high = keys.take(&format!("{ACTOR}clip_ratio_high")).or(clip);
    if let Some(v) = low {
        out.put("train.epsilon", v, Some("actor.clip_ratio_low".into()));
    }
    if let Some(v) = high {
        out.put(
            "train.epsilon_high",
            v,
            Some("actor.clip_ratio_high".into()),
        );
    }
    // verl's dual clip caps the ratio of a negative-advantage token at
    // clip_ratio_c, as TRL's delta does.
    let c = keys.take(&format!("{ACTOR}clip_ratio_c"));
    let note = if c.is_some() {
        "actor.clip_ratio_c (dual-clip: TRL's delta caps the ratio the same way)"
    } else {
        "verl's default dual-clip actor.clip_ratio_c (TRL's delta caps the ratio the same way)"
    };
    out.put("train.delta", c.unwrap_or(json!(3.0)), Some(note.into()));

    if let Some(mode) = keys.str(&format!("{ACTOR}loss_agg_mode")) {
        let loss_type = match mode.as_str() {
            "token-mean" => Some("dapo"),
            "seq-mean-token-mean" => Some("grpo"),
            "seq-mean-token-sum-norm" => Some("dr_grpo"),
            "seq-mean-token-sum" => Some("luspo"),
            _ => None,
        };
        match loss_type {
            Some(t) => out.put(
                "train.loss_type",
                json!(t),
                Some(format!("actor.loss_agg_mode: {mode}")),
            ),
            None => out.leave_out(
                &format!("{ACTOR}loss_agg_mode"),
                &json!(mode),
                "no Tandem loss_type aggregates so; token-mean (dapo) is used",
            ),
        }
    }
    let policy = keys
        .str(&format!("{ACTOR}policy_loss.loss_mode"))
        .unwrap_or_else(|| "vanilla".into());
    match policy.as_str() {
        "vanilla" => {}
        "gspo" => out.put(
            "train.importance_sampling_level",
            json!("sequence"),
            Some("actor.policy_loss.loss_mode: gspo".into()),
        ),
        other => out.leave_out(
            &format!("{ACTOR}policy_loss.loss_mode"),
            &json!(other),
            "Tandem's policy losses are train.loss_type (grpo, dapo, cispo, sapo, luspo, \
             vespo...) and importance_sampling_level (sequence: GSPO); the clipped one is used",
        ),
    }
    // The KL loss (verl's use_kl_loss); KL in the reward is not a loss.
    let use_kl = keys.bool(&format!("{ACTOR}use_kl_loss")).unwrap_or(false);
    let coef = keys.take(&format!("{ACTOR}kl_loss_coef"));
    let kind = keys.str(&format!("{ACTOR}kl_loss_type"));
    if use_kl {
        out.put(
            "train.beta",
            coef.unwrap_or(json!(0.001)),
            Some("actor.kl_loss_coef (use_kl_loss: true)".into()),
        );
        let kind = kind.unwrap_or_else(|| "low_var_kl".into());
        let estimator = match kind.trim_end_matches('+') {
            "kl" | "k1" => Some("k1"),
            "mse" | "k2" => Some("k2"),
            "low_var_kl" | "k3" => Some("k3"),
            _ => None,
        };
        match estimator {
            Some(e) => out.put(
                "train.kl_estimator",
                json!(e),
                Some(format!("actor.kl_loss_type: {kind}")),
            ),
            None => out.leave_out(
                &format!("{ACTOR}kl_loss_type"),
                &json!(kind),
                "train.kl_estimator takes k1 (verl's kl), k2 (mse) or k3 (low_var_kl)",
            ),
        }
    } else {
        out.put(
            "train.beta",
            json!(0.0),
            Some("actor.use_kl_loss is off".into()),
        );
    }
    if keys.bool("algorithm.use_kl_in_reward") == Some(true) {
        out.leave_out(
            "algorithm.use_kl_in_reward",
            &json!(true),
            "the KL term is a loss term in Tandem (train.beta, as verl's use_kl_loss)",
        );
    }
    for key in ["algorithm.kl_penalty", "algorithm.gamma", "algorithm.lam"] {
        keys.take(key);
    }
    for key in ["type", "kl_coef", "target_kl", "horizon"] {
        keys.take(&format!("algorithm.kl_ctrl.{key}"));
    }

    let estimator = keys
        .str("algorithm.adv_estimator")
        .unwrap_or_else(|| "gae".into());
    match estimator.as_str() {
        "grpo" | "rloo" => out.put(
            "train.adv_estimator",
            json!(estimator),
            Some("algorithm.adv_estimator".into()),
        ),
        other => {
            return Err(format!(
                "algorithm.adv_estimator is {other}: Tandem trains GRPO and RLOO (group \
                 baselines, no critic); set algorithm.adv_estimator=grpo in the source and \
                 convert again"
            ));
        }
    }
    // verl divides by the group's std for GRPO only (RLOO: never).
    let by_std = keys
        .bool("algorithm.norm_adv_by_std_in_grpo")
        .unwrap_or(true);
    let (scale, note) = match (estimator.as_str(), by_std) {
        ("rloo", _) => ("none", "verl's RLOO does not divide by the std"),
        (_, true) => ("group", "algorithm.norm_adv_by_std_in_grpo"),
        (_, false) => ("none", "algorithm.norm_adv_by_std_in_grpo: false"),
    };
    out.put("train.scale_rewards", json!(scale), Some(note.into()));
    out.put(
        "train.scale_rewards_epsilon",
        json!(1e-6),
        Some("verl's epsilon in (r - mean) / (std + eps); TRL's is 1e-4".into()),
    );
    out.put(
        "train.vllm_importance_sampling_correction",
        json!(false),
        Some(
            "verl applies no rollout correction by default; true corrects for the rollout \
             server's log-probs as TRL does"
                .into(),
        ),
    );
    Ok(())
}

fn convert_trainer(keys: &mut Source, out: &mut Output) {
    let steps = keys.num("trainer.total_training_steps");
    let epochs = keys.num("trainer.total_epochs");
    match (steps, epochs) {
        (Some(s), _) => out.put(
            "train.max_steps",
            json!(s as u64),
            Some("trainer.total_training_steps".into()),
        ),
        (None, e) => {
            out.put(
                "train.max_steps",
                json!(-1),
                Some("sized by num_train_epochs".into()),
            );
            out.put(
                "train.num_train_epochs",
                json!(e.unwrap_or(30.0)),
                Some(
                    if e.is_some() {
                        "trainer.total_epochs"
                    } else {
                        "verl's default trainer.total_epochs"
                    }
                    .into(),
                ),
            );
        }
    }
    if let Some(f) = keys.num("trainer.save_freq") {
        if f > 0.0 {
            out.put(
                "checkpoint.save_steps",
                json!(f as u64),
                Some("trainer.save_freq".into()),
            );
        } else {
            out.put(
                "checkpoint.save_strategy",
                json!("no"),
                Some("trainer.save_freq: -1 (the last step is still saved)".into()),
            );
        }
    }
    if let Some(f) = keys.num("trainer.test_freq") {
        if f > 0.0 {
            out.put(
                "eval.eval_steps",
                json!(f as u64),
                Some("trainer.test_freq".into()),
            );
        } else {
            out.put(
                "eval.eval_strategy",
                json!("no"),
                Some("trainer.test_freq: -1".into()),
            );
        }
    }
    if let Some(v) = keys.take("trainer.default_local_dir") {
        let note = path_note("trainer.default_local_dir", &v);
        out.put("checkpoint.output_dir", v, Some(note));
    }
    if let Some(v) = keys.take("trainer.max_actor_ckpt_to_keep") {
        out.put(
            "checkpoint.save_total_limit",
            v,
            Some("trainer.max_actor_ckpt_to_keep".into()),
        );
    }
    if let Some(v) = keys.take("trainer.logger") {
        let all: Vec<Value> = match &v {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        let (kept, gone): (Vec<Value>, Vec<Value>) = all
            .into_iter()
            .filter(|x| x.as_str() != Some("console"))
            .partition(|x| x.as_str() == Some("tensorboard"));
        if !kept.is_empty() {
            out.put(
                "log.report_to",
                Value::Array(kept),
                Some("trainer.logger".into()),
            );
        }
        if !gone.is_empty() {
            out.leave_out(
                "trainer.logger",
                &Value::Array(gone),
                "nothing is sent off the machine: log.report_to takes tensorboard (every \
                 number is also in the run folder's JSONL logs; the console shows progress)",
            );
        }
    }
    if let Some(seed) = keys.take("data.seed") {
        out.put("train.seed", seed, Some("data.seed".into()));
    }
}

fn convert_reward(keys: &mut Source, out: &mut Output) {
    let custom = keys.take("custom_reward_function.path");
    let custom_name = keys.take("custom_reward_function.name");
    // With a reward model on, verl's reward is its score alone (the reward
    // manager returns rm_scores when they are there).
    let enable = keys.take("reward_model.enable");
    if enable.as_ref().and_then(Value::as_bool) == Some(true)
        && let Some(path) = keys.take("reward_model.model.path")
    {
        let mut function = json!({"name": "reward_model", "path": path, "weight": 1.0});
        if let Some(b) = keys.num("reward_model.micro_batch_size_per_gpu") {
            function["batch_size"] = json!(b as u64);
        }
        if let Some(t) = keys.take("reward_model.model.input_tokenizer") {
            out.leave_out(
                "reward_model.model.input_tokenizer",
                &t,
                "the reward model reads the conversation through its own tokenizer and chat \
                 template, as verl does when the tokenizers differ",
            );
        }
        out.put(
            "reward.functions",
            json!([{"function": function, "note": Value::Null}]),
            Some(
                "reward_model.model.path (verl's reward is its score when it is on); TODO: a \
                 local *ForSequenceClassification folder (nothing is downloaded)"
                    .into(),
            ),
        );
        for (key, value) in [("path", &custom), ("name", &custom_name)] {
            if let Some(v) = value {
                out.leave_out(
                    &format!("custom_reward_function.{key}"),
                    v,
                    "verl uses the reward model's score when it is on",
                );
            }
        }
        return;
    }
    if let Some(v) = enable {
        out.leave_out(
            "reward_model.enable",
            &v,
            "no reward model (reward_model.model.path) is on: the rule-based scorer below",
        );
    }
    // verl's default scorer goes by each row's data_source (its
    // preprocessed datasets carry the column): so does exact_match's
    // `data_source` extract.
    let (extract, note) = match &custom {
        Some(p) => (
            "any",
            format!(
                "TODO: verl scored with {}{}; serve it as a `remote` reward function",
                inline(p),
                custom_name
                    .as_ref()
                    .map(|n| format!(" ({})", inline(n)))
                    .unwrap_or_default()
            ),
        ),
        None => {
            out.put(
                "data.data_source_column",
                json!("data_source"),
                Some("where verl's preprocessing names each row's source".into()),
            );
            (
                "data_source",
                "verl's default scorer, chosen by each row's data_source (openai/gsm8k: the \
                 number after `#### `; MATH: the last \\boxed{}; math_dapo, aime*: the \
                 `Answer:` line), 1 if it is the answer"
                    .to_string(),
            )
        }
    };
    let item = json!({"function": {"name": "exact_match", "extract": extract, "weight": 1.0},
                      "note": Value::Null});
    let mut functions = vec![item];
    // DAPO's soft overlong punishment, which verl's dapo reward manager adds
    // to the score.
    let overlong = "reward_model.overlong_buffer.";
    if keys.bool(&format!("{overlong}enable")) == Some(true) {
        let buffer = keys.num(&format!("{overlong}len")).unwrap_or(0.0) as u64;
        let factor = keys
            .num(&format!("{overlong}penalty_factor"))
            .unwrap_or(0.0);
        let max = out
            .get("rollout.max_completion_length")
            .and_then(Value::as_u64)
            .unwrap_or(512);
        if (1..=max).contains(&buffer) {
            functions.push(json!({
                "function": {"name": "length_penalty", "mode": "overlong", "max_length": max,
                             "cache_length": buffer, "weight": factor},
                "note": "reward_model.overlong_buffer (len, penalty_factor)",
            }));
        } else {
            out.leave_out(
                &format!("{overlong}len"),
                &json!(buffer),
                format!("the overlong buffer must be 1 to max_response_length ({max}) tokens"),
            );
        }
    }
    keys.take(&format!("{overlong}log"));
    if let Some(manager) = keys.take("reward_model.reward_manager") {
        out.leave_out(
            "reward_model.reward_manager",
            &manager,
            "the reward is the recipe's functions, summed with their weights; exact_match \
             with extract: data_source scores as the managers' default scorer does \
             (math_dapo: 1 / -1), length_penalty adds the dapo manager's overlong penalty",
        );
    }
    out.put("reward.functions", Value::Array(functions), Some(note));
}

/// Whether the converted reward functions include one named `name`.
fn has_function(out: &Output, name: &str) -> bool {
    out.get("reward.functions")
        .and_then(Value::as_array)
        .is_some_and(|items| items.iter().any(|i| i["function"]["name"] == name))
}

/// DAPO's dynamic sampling: `algorithm.filter_groups` and the generation
/// batch of `data.gen_batch_size` prompts.
fn convert_filter_groups(keys: &mut Source, out: &mut Output, learner_ranks: u64) {
    let group = "algorithm.filter_groups.";
    keys.take(&format!("{group}_target_"));
    let enable = keys.bool(&format!("{group}enable")) == Some(true);
    let metric = keys.str(&format!("{group}metric"));
    let max = keys.num(&format!("{group}max_num_gen_batches"));
    let gen_batch = keys.num("data.gen_batch_size");
    if !enable {
        let off = "dynamic sampling is off (algorithm.filter_groups.enable)";
        for (key, value) in [
            (format!("{group}metric"), metric.map(Value::from)),
            (format!("{group}max_num_gen_batches"), max.map(Value::from)),
            (
                "data.gen_batch_size".to_string(),
                gen_batch.map(Value::from),
            ),
        ] {
            if let Some(v) = value {
                out.leave_out(&key, &v, off);
            }
        }
        return;
    }
    out.put(
        "train.dynamic_sampling",
        json!(true),
        Some("algorithm.filter_groups.enable".into()),
    );
    let (value, note) = match metric.as_deref() {
        None => (
            "reward",
            "verl's metric must be set; the weighted total".to_string(),
        ),
        Some(m @ ("score" | "seq_reward" | "seq_final_reward")) => (
            "reward",
            format!("algorithm.filter_groups.metric {m}: the weighted total"),
        ),
        Some("acc") if has_function(out, "exact_match") => (
            "exact_match",
            "algorithm.filter_groups.metric acc: the correctness function".to_string(),
        ),
        Some("acc") => (
            "reward",
            "algorithm.filter_groups.metric acc, with no correctness function here: the \
             weighted total"
                .to_string(),
        ),
        Some(other) => (
            other,
            format!("TODO: verl's metric {other}; the label of the reward function that gives it"),
        ),
    };
    out.put("train.dynamic_sampling_metric", json!(value), Some(note));
    let (max, note) = match max {
        Some(m) if m > 0.0 => (m as u64, "algorithm.filter_groups.max_num_gen_batches"),
        _ => (
            0,
            "verl's 0: no limit (Tandem stops a step after one pass over the prompts)",
        ),
    };
    out.put("train.max_num_gen_batches", json!(max), Some(note.into()));
    if let Some(n) = gen_batch {
        let n = n as u64;
        let note = if n.is_multiple_of(learner_ranks.max(1)) {
            "data.gen_batch_size".to_string()
        } else {
            format!("data.gen_batch_size; TODO: a multiple of the {learner_ranks} learner ranks")
        };
        out.put("train.dynamic_sampling_batch_prompts", json!(n), Some(note));
    }
}

/// Why a verl key has no Tandem key.
fn left_out_reason(key: &str) -> &'static str {
    let last = key.rsplit('.').next().unwrap_or(key);
    if key.contains("fsdp_config")
        || key.contains("megatron")
        || key.starts_with("ray_")
        || key.starts_with("global_profiler")
        || key.contains("checkpoint.")
        || matches!(
            last,
            "use_remove_padding"
                | "log_prob_micro_batch_size_per_gpu"
                | "log_prob_micro_batch_size"
                | "log_prob_use_dynamic_bsz"
                | "log_prob_max_token_len_per_gpu"
                | "ulysses_sequence_parallel_size"
                | "enforce_eager"
                | "free_cache_engine"
                | "enable_chunked_prefill"
                | "max_num_batched_tokens"
                | "max_num_seqs"
                | "load_format"
                | "name"
                | "mode"
                | "use_fused_kernels"
                | "use_torch_compile"
                | "strategy"
                | "param_offload"
                | "optimizer_offload"
                | "dtype"
                | "trust_remote_code"
                | "layered_summon"
                | "calculate_log_probs"
        )
    {
        "an engine or memory setting of verl's (FSDP, vLLM, Ray); Tandem's learners and \
         rollout servers manage their own"
    } else if key.contains(".multi_turn.") {
        "verl's multi-turn tools (tool_config_path's BaseTool classes, interactions) are not \
         read: list each tool in rollout.tools (a Python function, {python: file.py:fn}, or an \
         HTTP endpoint) or give a TRL environment class as rollout.environment_factory; \
         rollout.max_tool_calling_iterations bounds the tool rounds, rollout.tool_call_parser \
         reads the calls (hermes by default)"
    } else if last == "exclude_modules" {
        "PEFT's exclude_modules is not read: list the adapted modules in \
         model.lora_target_modules"
    } else if matches!(last, "lora_rank" | "lora_alpha" | "target_modules") {
        "LoRA is off (lora_rank 0): every weight trains"
    } else if key.starts_with("critic.") || key == "trainer.critic_warmup" {
        "GRPO and RLOO have no critic"
    } else if matches!(
        key,
        "trainer.project_name"
            | "trainer.experiment_name"
            | "trainer.resume_mode"
            | "trainer.resume_from_path"
            | "trainer.balance_batch"
            | "trainer.log_val_generations"
            | "trainer.device"
    ) {
        "the run folder names the run; a run resumes with `learner train --resume-from` (the \
         launcher and Slurm wrapper resume by themselves)"
    } else if key == "trainer.val_before_train" {
        "evaluation runs every eval.eval_steps steps and after the last one"
    } else if key == "data.truncation" {
        "a prompt longer than rollout.max_prompt_length keeps its last tokens (verl's `left`); \
         data.filter_overlong_prompts leaves such prompts out when the files load (verl's \
         `error` would stop at the first)"
    } else if key.starts_with("data.") {
        "Tandem reads the files as they are (data.prompt_column / answer_column name the \
         columns)"
    } else {
        "no Tandem counterpart"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_interpolations_are_put_in() {
        let yaml = "data:\n  max_response_length: 1024\n  train_files: ~/data/train.parquet\n\
                    actor_rollout_ref:\n  rollout:\n    response_length: ${data.max_response_length}\n\
                    trainer:\n  project_name: p\n  experiment_name: e\n\
                    \x20 default_local_dir: checkpoints/${trainer.project_name}/${trainer.experiment_name}\n\
                    \x20 home: ${oc.env:HOME}\n";
        let keys = parse(yaml).unwrap();
        assert_eq!(
            keys["actor_rollout_ref.rollout.response_length"],
            json!(1024)
        );
        assert_eq!(keys["trainer.default_local_dir"], json!("checkpoints/p/e"));
        assert_eq!(keys["trainer.home"], json!("${oc.env:HOME}"));
    }

    #[test]
    fn hydra_values_parse_as_hydra_does() {
        assert_eq!(hydra_value("True"), json!(true));
        assert_eq!(hydra_value("1e-6"), json!(1e-6));
        assert_eq!(hydra_value("256"), json!(256));
        assert_eq!(
            hydra_value("['console','wandb']"),
            json!(["console", "wandb"])
        );
        assert_eq!(hydra_value("Qwen/Qwen2-7B"), json!("Qwen/Qwen2-7B"));
        assert_eq!(hydra_value("low_var_kl"), json!("low_var_kl"));
        assert_eq!(hydra_value(""), Value::Null);
    }

    #[test]
    fn script_overrides_with_variables_comments_and_continuations() {
        let script = "#!/bin/bash\nset -x\n# a comment with key=value.x=1\n\
                      train=$HOME/data/gsm8k/train.parquet\n\
                      export VLLM_ATTENTION_BACKEND=XFORMERS\n\
                      python3 -m verl.trainer.main_ppo \\\n    algorithm.adv_estimator=grpo \\\n\
                      \x20   data.train_files=\"$train\" \\\n    \
                      +actor_rollout_ref.actor.optim.lr=1e-6 \\\n    \
                      trainer.logger='[\"console\",\"tensorboard\"]' $@\n";
        let keys = parse(script).unwrap();
        assert_eq!(keys["algorithm.adv_estimator"], json!("grpo"));
        assert_eq!(
            keys["data.train_files"],
            json!("$HOME/data/gsm8k/train.parquet")
        );
        assert_eq!(keys["actor_rollout_ref.actor.optim.lr"], json!(1e-6));
        assert_eq!(keys["trainer.logger"], json!(["console", "tensorboard"]));
        assert_eq!(keys.len(), 4, "{keys:?}");
        // Neither a TRL recipe nor a Tandem one is taken for verl.
        assert!(parse("learning_rate: 1e-6\nbeta: 0.0\n").is_none());
        assert!(parse("version: 1\ndata:\n  train_files: [a.jsonl]\n").is_none());
    }
}
