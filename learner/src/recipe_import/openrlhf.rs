//! OpenRLHF's GRPO launch script (`python3 -m openrlhf.cli.train_ppo_ray
//! --advantage_estimator group_norm ...`, often behind `ray job submit
//! ... --`) as a Tandem recipe.
//!
//! OpenRLHF's step is Tandem's: `rollout_batch_size` prompts x
//! `n_samples_per_prompt` samples are generated, then `max_epochs` passes
//! over them in updates of `train_batch_size` samples, each made of
//! `micro_train_batch_size` samples per GPU. They become
//! `generation_batch_size`, `num_iterations`, `per_device_train_batch_size`
//! (rounded to whole groups: a Tandem micro-batch never splits a group) and
//! `gradient_accumulation_steps` for the actor's GPUs as learner ranks; the
//! vLLM engines become the rollout server's replicas. Where OpenRLHF's
//! default differs from Tandem's and changes training (warm-up 3%, cosine to
//! 10%, Adam's beta2 0.95, evaluation of 4 samples at temperature 0.6), it
//! is written out.

use serde_json::{Map, Value, json};

use super::{Converted, Output, Source, script_words, split_gpus, whole_group_micro_batch};

/// Flags that take two values.
const PAIRS: &[&str] = &[
    "eps_clip_low_high",
    "adam_betas",
    "reward_clip_range",
    "dynamic_filtering_reward_range",
];

/// Flags that take any number of values (argparse's `nargs="*"`).
const LISTS: &[&str] = &["target_modules"];

/// OpenRLHF's flags, by name without the dashes (`true` for a bare flag);
/// `None` when `text` does not run `openrlhf.cli.train_ppo(_ray)`.
pub(super) fn parse(text: &str) -> Option<Map<String, Value>> {
    let words = script_words(text);
    let start = words
        .iter()
        .position(|w| w.contains("openrlhf.cli.train_ppo"))?;
    let mut flags = Map::new();
    let mut i = start + 1;
    while i < words.len() {
        let Some(flag) = words[i].strip_prefix("--") else {
            i += 1;
            continue;
        };
        i += 1;
        if let Some((name, value)) = flag.split_once('=') {
            flags.insert(name.to_string(), scalar(value));
            continue;
        }
        let takes = if PAIRS.contains(&flag) {
            2
        } else if LISTS.contains(&flag) {
            usize::MAX
        } else {
            1
        };
        let values: Vec<Value> = words[i..]
            .iter()
            .take(takes)
            .take_while(|w| !w.starts_with("--"))
            .map(|w| scalar(w))
            .collect();
        i += values.len();
        let value = match values.len() {
            0 => Value::Bool(true),
            1 if takes == 1 => values.into_iter().next().unwrap_or(Value::Null),
            // One name of a list flag is a list of one.
            _ => Value::Array(values),
        };
        flags.insert(flag.to_string(), value);
    }
    Some(flags)
}

/// A command-line value: a number where it reads as one, else the text.
fn scalar(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        return json!(i);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() => json!(f),
        _ => json!(s),
    }
}

fn flag(name: &str) -> String {
    format!("--{name}")
}

/// `--from` moved to `to` as it is.
fn direct(f: &mut Source, out: &mut Output, pairs: &[(&str, &str)]) {
    f.direct(out, pairs, flag);
}

pub(super) fn convert(flags: Map<String, Value>, source_name: &str) -> Result<Converted, String> {
    let mut f = Source(flags);
    let mut out = Output::new();
    convert_model_and_data(&mut f, &mut out);
    f.lora(
        &mut out,
        ["lora_rank", "lora_alpha", "target_modules", "lora_dropout"],
        flag,
        "OpenRLHF",
    );
    let n = convert_generation(&mut f, &mut out);
    convert_batches(&mut f, &mut out, n);
    convert_dynamic_batch(&mut f, &mut out);
    convert_optimizer(&mut f, &mut out);
    convert_loss(&mut f, &mut out)?;
    convert_run(&mut f, &mut out);
    convert_reward(&mut f, &mut out);
    convert_dynamic_filtering(&mut f, &mut out);
    for (key, value) in std::mem::take(&mut f.0) {
        let why = left_out_reason(&key);
        // A wandb key is a secret: not copied into the recipe.
        let value = if key == "use_wandb" {
            json!("(a key, not copied)")
        } else {
            value
        };
        out.leave_out(&flag(&key), &value, why);
    }
    Ok(out.into_converted(source_name, "OpenRLHF"))
}

fn convert_model_and_data(f: &mut Source, out: &mut Output) {
    if let Some(v) = f.take("pretrain") {
        out.put_model_path(v, "--pretrain");
    }
    if f.set("bf16") {
        out.put("model.dtype", json!("bf16"), Some("--bf16".into()));
    }
    // Datasets: comma-separated, with sampling probabilities.
    for (from, to) in [
        ("prompt_data", "data.train_files"),
        ("eval_dataset", "data.eval_files"),
    ] {
        let Some(list) = f.str(from) else { continue };
        let probs: Vec<f64> = if from == "prompt_data" {
            f.str("prompt_data_probs")
                .map(|p| p.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let names: Vec<&str> = list.split(',').map(str::trim).collect();
        let files: Vec<Value> = names
            .iter()
            .enumerate()
            .map(|(i, name)| match probs.get(i) {
                Some(p) if probs.len() == names.len() => json!({"path": name, "weight": p}),
                _ => json!(name),
            })
            .collect();
        let local = names
            .iter()
            .all(|n| n.ends_with(".jsonl") || n.ends_with(".parquet"));
        let note = if local {
            flag(from)
        } else {
            format!(
                "{}; TODO: local JSONL or Parquet files (nothing is downloaded)",
                flag(from)
            )
        };
        out.put(to, Value::Array(files), Some(note));
    }
    direct(
        f,
        out,
        &[
            ("input_key", "data.prompt_column"),
            ("label_key", "data.answer_column"),
            ("gradient_checkpointing", "train.gradient_checkpointing"),
            ("seed", "train.seed"),
        ],
    );
    // OpenRLHF sends the prompt column as it is unless --apply_chat_template
    // (or fills --input_template's `{}`).
    let template = f.str("input_template");
    if f.set("apply_chat_template") {
        out.put(
            "data.prompt_template",
            json!("chat"),
            Some("--apply_chat_template".into()),
        );
    } else if let Some(t) = template {
        out.put(
            "data.prompt_template",
            json!(t.replace("{}", "{question}")),
            Some("--input_template".into()),
        );
    } else {
        out.put(
            "data.prompt_template",
            json!("{question}"),
            Some("the prompt as it is (no --apply_chat_template)".into()),
        );
    }
}

/// Sampling and lengths; returns `n_samples_per_prompt`.
fn convert_generation(f: &mut Source, out: &mut Output) -> u64 {
    let n = f
        .num("n_samples_per_prompt")
        .map_or(1, |n| n.max(1.0) as u64);
    out.put(
        "rollout.num_generations",
        json!(n),
        Some("--n_samples_per_prompt".into()),
    );
    direct(
        f,
        out,
        &[
            ("prompt_max_len", "rollout.max_prompt_length"),
            ("generate_max_len", "rollout.max_completion_length"),
            ("temperature", "rollout.temperature"),
            ("top_p", "rollout.top_p"),
            (
                "vllm_gpu_memory_utilization",
                "rollout.gpu_memory_utilization",
            ),
        ],
    );
    // Evaluation: OpenRLHF samples 4 at temperature 0.6 unless told.
    let t = f.take("eval_temperature");
    let note = if t.is_some() {
        "--eval_temperature"
    } else {
        "OpenRLHF's default --eval_temperature"
    };
    out.put(
        "eval.temperature",
        t.unwrap_or(json!(0.6)),
        Some(note.into()),
    );
    let k = f.take("eval_n_samples_per_prompt");
    let note = if k.is_some() {
        "--eval_n_samples_per_prompt"
    } else {
        "OpenRLHF's default --eval_n_samples_per_prompt"
    };
    out.put("eval.num_samples", k.unwrap_or(json!(4)), Some(note.into()));
    n
}

/// OpenRLHF's dynamic batch: micro-batches by tokens (its default budget
/// 16192).
fn convert_dynamic_batch(f: &mut Source, out: &mut Output) {
    let budget = f.take("train_max_tokens_per_gpu");
    if f.set("use_dynamic_batch") {
        let tokens = budget.as_ref().and_then(Value::as_u64).unwrap_or(16192);
        out.put(
            "train.max_tokens_per_micro_batch",
            json!(tokens),
            Some(format!(
                "--use_dynamic_batch --train_max_tokens_per_gpu {tokens} (OpenRLHF packs rows \
                 without padding; Tandem counts the padded tokens of rows ordered by length)"
            )),
        );
    } else if let Some(v) = budget {
        out.leave_out(
            &flag("train_max_tokens_per_gpu"),
            &v,
            "only read with --use_dynamic_batch",
        );
    }
}

/// The GPUs and the batch sizes (see the module docs).
fn convert_batches(f: &mut Source, out: &mut Output, n: u64) {
    let nodes = f.num("actor_num_nodes").map_or(1, |v| v.max(1.0) as u64);
    let per_node = f
        .num("actor_num_gpus_per_node")
        .map_or(8, |v| v.max(1.0) as u64);
    let engines = f.num("vllm_num_engines").map_or(0, |v| v as u64);
    if let Some(tp) = f.take("vllm_tensor_parallel_size")
        && tp.as_u64() != Some(1)
    {
        out.leave_out(
            &flag("vllm_tensor_parallel_size"),
            &tp,
            "Tandem's rollout server runs a model on one GPU (no tensor parallelism yet): \
             each vLLM engine is a replica of one GPU (topology.dp)",
        );
    }
    let colocated = f.set("colocate_all_models") || f.set("colocate_actor_ref");
    let actor_gpus = nodes * per_node;
    let prompts = f
        .num("rollout_batch_size")
        .map_or(1024, |v| v.max(1.0) as u64);
    let update = f.num("train_batch_size").map_or(128, |v| v.max(1.0) as u64);
    let micro = f
        .num("micro_train_batch_size")
        .map_or(4, |v| v.max(1.0) as u64);
    // Learner ranks split an update into whole groups.
    let groups = (update / n).max(1);
    let (learners, dp, gpus_note) = if colocated || engines == 0 {
        let (w, dp) = split_gpus(actor_gpus, groups);
        (
            w,
            dp,
            format!(
                "OpenRLHF colocates; here {dp} of the {actor_gpus} GPUs serve rollouts and {w} train"
            ),
        )
    } else {
        (
            actor_gpus,
            engines,
            "--actor_num_nodes x --actor_num_gpus_per_node".to_string(),
        )
    };
    let gpus_per_node = if colocated || engines == 0 {
        per_node
    } else {
        per_node + engines.div_ceil(nodes)
    };
    out.put(
        "topology.nodes",
        json!(nodes),
        Some("--actor_num_nodes".into()),
    );
    out.put("topology.gpus_per_node", json!(gpus_per_node), None);
    out.put("topology.rollout_servers", json!(1), None);
    let dp_note = if colocated || engines == 0 {
        "rollout replicas, one GPU each"
    } else {
        "--vllm_num_engines: replicas of one GPU each"
    };
    out.put("topology.dp", json!(dp), Some(dp_note.into()));
    out.put("topology.tp", json!(1), None);
    out.put("topology.learner_ranks", json!(learners), Some(gpus_note));

    out.put(
        "train.generation_batch_size",
        json!(prompts * n),
        Some(format!(
            "--rollout_batch_size {prompts} prompts x --n_samples_per_prompt {n}"
        )),
    );
    let per_rank = update / learners;
    let even = update.is_multiple_of(learners)
        && per_rank.is_multiple_of(n)
        && (prompts * n).is_multiple_of(update);
    let batch = whole_group_micro_batch(per_rank, n, Some(micro));
    let note = if batch == micro {
        "--micro_train_batch_size".to_string()
    } else {
        format!(
            "--micro_train_batch_size is {micro}; a micro-batch holds whole groups of {n} and \
             divides the {per_rank} samples a rank takes per update"
        )
    };
    out.put(
        "train.per_device_train_batch_size",
        json!(batch),
        Some(note),
    );
    let mut note =
        format!("--train_batch_size {update} samples per update over {learners} learner ranks");
    if !even {
        note.push_str(
            "; TODO: the sizes do not divide evenly: make rollout_batch_size x n a multiple of \
             train_batch_size, and train_batch_size / n a multiple of the learner ranks",
        );
    }
    out.put(
        "train.gradient_accumulation_steps",
        json!((per_rank / batch).max(1)),
        Some(note),
    );
    direct(f, out, &[("max_epochs", "train.num_iterations")]);
}

fn convert_optimizer(f: &mut Source, out: &mut Output) {
    let lr = f.take("actor_learning_rate");
    let note = if lr.is_some() {
        "--actor_learning_rate"
    } else {
        "OpenRLHF's default --actor_learning_rate"
    };
    out.put(
        "train.learning_rate",
        lr.unwrap_or(json!(1e-6)),
        Some(note.into()),
    );
    let warmup = f.take("lr_warmup_ratio");
    let note = if warmup.is_some() {
        "--lr_warmup_ratio"
    } else {
        "OpenRLHF's default --lr_warmup_ratio"
    };
    out.put(
        "train.warmup_ratio",
        warmup.unwrap_or(json!(0.03)),
        Some(note.into()),
    );
    let scheduler = f
        .str("lr_scheduler")
        .unwrap_or_else(|| "cosine_with_min_lr".into());
    match scheduler.as_str() {
        // OpenRLHF's cosine ends at a tenth of the peak.
        "cosine_with_min_lr" => {
            out.put(
                "train.lr_scheduler_type",
                json!("cosine_with_min_lr"),
                Some("--lr_scheduler".into()),
            );
            out.put(
                "train.lr_scheduler_kwargs",
                json!({"min_lr_rate": 0.1}),
                Some("OpenRLHF's min_lr: 0.1 x the learning rate".into()),
            );
        }
        "constant_with_warmup" | "linear" | "cosine" | "constant" => out.put(
            "train.lr_scheduler_type",
            json!(scheduler),
            Some("--lr_scheduler".into()),
        ),
        other => out.leave_out(
            &flag("lr_scheduler"),
            &json!(other),
            "train.lr_scheduler_type takes constant, constant_with_warmup, linear, cosine or \
             cosine_with_min_lr",
        ),
    }
    let betas = f.take("adam_betas");
    let (b1, b2) = match betas.as_ref().and_then(Value::as_array).map(Vec::as_slice) {
        Some([b1, b2]) => (b1.clone(), b2.clone()),
        _ => (json!(0.9), json!(0.95)),
    };
    let note = if betas.is_some() {
        "--adam_betas"
    } else {
        "OpenRLHF's default --adam_betas (Tandem's, as TRL's, is 0.999)"
    };
    out.put("train.adam_beta1", b1, Some(note.into()));
    out.put("train.adam_beta2", b2, Some(note.into()));
    direct(
        f,
        out,
        &[
            ("l2", "train.weight_decay"),
            ("max_norm", "train.max_grad_norm"),
            ("entropy_loss_coef", "train.entropy_coef"),
        ],
    );
}

fn convert_loss(f: &mut Source, out: &mut Output) -> Result<(), String> {
    let estimator = f.str("advantage_estimator").unwrap_or_else(|| "gae".into());
    let no_std = f.set("no_advantage_std_norm");
    let (adv, scale) = match estimator.as_str() {
        "group_norm" => ("grpo", if no_std { "none" } else { "group" }),
        "dr_grpo" => ("grpo", "none"),
        "rloo" => ("rloo", "none"),
        // REINFORCE++-baseline: the group mean off, then the batch's std.
        "reinforce_baseline" => ("grpo", if no_std { "none" } else { "batch" }),
        other => {
            return Err(format!(
                "--advantage_estimator {other}: Tandem trains with group baselines \
                 (group_norm, dr_grpo, rloo, reinforce_baseline), no critic or global \
                 baseline; set one of those in the source and convert again"
            ));
        }
    };
    out.put(
        "train.adv_estimator",
        json!(adv),
        Some(format!("--advantage_estimator {estimator}")),
    );
    out.put(
        "train.scale_rewards",
        json!(scale),
        Some(format!("--advantage_estimator {estimator}")),
    );
    out.put(
        "train.scale_rewards_epsilon",
        json!(1e-9),
        Some("OpenRLHF's epsilon in (r - mean) / (std + eps)".into()),
    );
    // The clip range, and the dual clip (TRL's delta caps the ratio the same
    // way).
    match f.take("eps_clip_low_high") {
        Some(Value::Array(pair)) if pair.len() == 2 => {
            out.put(
                "train.epsilon",
                pair[0].clone(),
                Some("--eps_clip_low_high".into()),
            );
            out.put(
                "train.epsilon_high",
                pair[1].clone(),
                Some("--eps_clip_low_high".into()),
            );
        }
        _ => direct(f, out, &[("eps_clip", "train.epsilon")]),
    }
    f.take("eps_clip");
    if let Some(c) = f.take("dual_clip") {
        out.put(
            "train.delta",
            c,
            Some("--dual_clip (TRL's delta caps the ratio the same way)".into()),
        );
    }
    if f.str("policy_loss_type").as_deref() == Some("gspo") {
        out.put(
            "train.importance_sampling_level",
            json!("sequence"),
            Some("--policy_loss_type gspo".into()),
        );
    }
    // KL: a loss term with --use_kl_loss; else OpenRLHF subtracts it from
    // the reward, which Tandem does not.
    let coef = f.take("init_kl_coef").unwrap_or(json!(0.01));
    if f.set("use_kl_loss") {
        out.put(
            "train.beta",
            coef,
            Some("--init_kl_coef (--use_kl_loss)".into()),
        );
        let estimator = f.str("kl_estimator").unwrap_or_else(|| "k1".into());
        out.put(
            "train.kl_estimator",
            json!(estimator),
            Some("--kl_estimator".into()),
        );
    } else {
        if coef.as_f64().is_some_and(|c| c != 0.0) {
            out.leave_out(
                &flag("init_kl_coef"),
                &coef,
                "without --use_kl_loss OpenRLHF puts the KL in the reward; Tandem's KL is a \
                 loss term (train.beta), so none is used",
            );
        }
        f.take("kl_estimator");
        out.put("train.beta", json!(0.0), Some("no --use_kl_loss".into()));
    }
    if f.set("enable_vllm_is_correction") {
        out.put(
            "train.vllm_importance_sampling_correction",
            json!(true),
            Some("--enable_vllm_is_correction".into()),
        );
        out.put(
            "train.vllm_importance_sampling_mode",
            json!("token_truncate"),
            Some("OpenRLHF truncates per token".into()),
        );
        let cap = f.take("vllm_is_truncated_threshold").unwrap_or(json!(2.0));
        out.put(
            "train.vllm_importance_sampling_cap",
            cap,
            Some("--vllm_is_truncated_threshold".into()),
        );
    } else {
        out.put(
            "train.vllm_importance_sampling_correction",
            json!(false),
            Some("no --enable_vllm_is_correction".into()),
        );
        f.take("vllm_is_truncated_threshold");
    }
    Ok(())
}

fn convert_run(f: &mut Source, out: &mut Output) {
    let episodes = f.take("num_episodes");
    let note = if episodes.is_some() {
        "--num_episodes (passes over the prompts)"
    } else {
        "OpenRLHF's default --num_episodes"
    };
    out.put(
        "train.max_steps",
        json!(-1),
        Some("sized by num_train_epochs".into()),
    );
    out.put(
        "train.num_train_epochs",
        episodes.unwrap_or(json!(1)),
        Some(note.into()),
    );
    for (from, key, strategy) in [
        (
            "save_steps",
            "checkpoint.save_steps",
            "checkpoint.save_strategy",
        ),
        ("eval_steps", "eval.eval_steps", "eval.eval_strategy"),
    ] {
        match f.num(from) {
            Some(s) if s > 0.0 => out.put(key, json!(s as u64), Some(flag(from))),
            // OpenRLHF's default -1: never.
            _ => out.put(strategy, json!("no"), Some(format!("{} -1", flag(from)))),
        }
    }
    direct(
        f,
        out,
        &[
            ("logging_steps", "log.logging_steps"),
            ("max_ckpt_num", "checkpoint.save_total_limit"),
        ],
    );
    if let Some(p) = f.take("ckpt_path").or_else(|| f.take("save_path")) {
        out.put("checkpoint.output_dir", p, Some("--ckpt_path".into()));
    }
    f.take("save_path");
    if f.take("use_tensorboard").is_some() {
        out.put(
            "log.report_to",
            json!(["tensorboard"]),
            Some("--use_tensorboard (under the run folder's runs/)".into()),
        );
    }
}

fn convert_reward(f: &mut Source, out: &mut Output) {
    let mut functions = Vec::new();
    let mut note = None;
    if let Some(urls) = f.str("remote_rm_url") {
        let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
        for url in &urls {
            functions.push(json!({
                "function": {"name": "remote", "url": url, "protocol": "openrlhf", "weight": 1.0},
                "note": "--remote_rm_url: the same server, spoken to as OpenRLHF does",
            }));
        }
        if urls.len() > 1 {
            let labels: Vec<String> = (0..urls.len()).map(|i| format!("remote_{i}")).collect();
            for (item, label) in functions.iter_mut().zip(&labels) {
                item["function"]["label"] = json!(label);
            }
            note = Some("OpenRLHF sums the servers' rewards".to_string());
        }
    } else if let Some(models) = f.str("reward_pretrain") {
        let models: Vec<&str> = models.split(',').map(str::trim).collect();
        for (i, path) in models.iter().enumerate() {
            let mut function = json!({"name": "reward_model", "path": path, "weight": 1.0});
            if models.len() > 1 {
                function["label"] = json!(format!("reward_model_{i}"));
            }
            functions.push(json!({"function": function, "note": Value::Null}));
        }
        note = Some(
            "--reward_pretrain; TODO: local *ForSequenceClassification folders (nothing is \
             downloaded; a model OpenRLHF trained keeps its score head as `score` and reads it \
             at the appended EOS token: check its config.json names \
             ...ForSequenceClassification)"
                .to_string(),
        );
    } else {
        note = Some(
            "TODO: no --remote_rm_url or --reward_pretrain; pick the reward functions".to_string(),
        );
        functions.push(json!({
            "function": {"name": "exact_match", "extract": "any", "weight": 1.0},
            "note": Value::Null,
        }));
    }
    // DAPO's overlong penalty, which OpenRLHF adds to the reward.
    if let Some(buffer) = f.num("overlong_buffer_len") {
        let factor = f.num("overlong_penalty_factor").unwrap_or(1.0);
        let max = out
            .sections
            .iter()
            .find(|(s, _)| *s == "rollout")
            .and_then(|(_, es)| es.iter().find(|e| e.key == "max_completion_length"))
            .and_then(|e| e.value.as_u64())
            .unwrap_or(1024);
        functions.push(json!({
            "function": {"name": "length_penalty", "mode": "overlong", "max_length": max,
                         "cache_length": buffer as u64, "weight": factor},
            "note": "--overlong_buffer_len / --overlong_penalty_factor",
        }));
    }
    f.take("overlong_penalty_factor");
    out.put("reward.functions", Value::Array(functions), note);
}

/// DAPO's dynamic sampling: `--dynamic_filtering` keeps a group whose mean
/// reward lies strictly inside `--dynamic_filtering_reward_range` (default
/// 0 1) and generates replacements until the rollout batch is full.
fn convert_dynamic_filtering(f: &mut Source, out: &mut Output) {
    let range = f.take("dynamic_filtering_reward_range");
    if !f.set("dynamic_filtering") {
        if let Some(r) = range {
            out.leave_out(
                &flag("dynamic_filtering_reward_range"),
                &r,
                "dynamic sampling is off (no --dynamic_filtering)",
            );
        }
        return;
    }
    out.put(
        "train.dynamic_sampling",
        json!(true),
        Some("--dynamic_filtering".into()),
    );
    let bounds: Option<Vec<f64>> = range
        .as_ref()
        .and_then(Value::as_array)
        .map(|v| v.iter().filter_map(Value::as_f64).collect());
    let (value, note) = match bounds {
        Some(b) if b.len() == 2 => (json!(b), "--dynamic_filtering_reward_range"),
        _ => (json!([0.0, 1.0]), "OpenRLHF's default range"),
    };
    out.put(
        "train.dynamic_sampling_reward_range",
        value,
        Some(note.into()),
    );
    out.put(
        "train.max_num_gen_batches",
        json!(0),
        Some("OpenRLHF sets no limit (Tandem stops a step after one pass over the prompts)".into()),
    );
}

/// Why an OpenRLHF flag has no Tandem key.
fn left_out_reason(key: &str) -> &'static str {
    match key {
        "zero_stage"
        | "adam_offload"
        | "flash_attn"
        | "attn_implementation"
        | "packing_samples"
        | "enable_prefix_caching"
        | "enforce_eager"
        | "vllm_sync_backend"
        | "vllm_sync_with_ray"
        | "vllm_enable_sleep"
        | "deepspeed_enable_sleep"
        | "micro_rollout_batch_size"
        | "ref_reward_offload"
        | "colocate_critic_reward"
        | "ring_attn_size"
        | "ring_head_stride"
        | "rollout_max_tokens_per_gpu"
        | "overlap_comm"
        | "gradient_checkpointing_use_reentrant"
        | "use_liger_kernel"
        | "max_len"
        | "reward_num_nodes"
        | "reward_num_gpus_per_node"
        | "vllm_generate_batch_size"
        | "rollout_tasks_per_gpu"
        | "disable_fast_tokenizer"
        | "deepcompile"
        | "zpg"
        | "grad_accum_dtype"
        | "actor_init_on_gpu"
        | "ds_tensor_parallel_size"
        | "full_determinism"
        | "perf" => {
            "an engine or memory setting of OpenRLHF's (DeepSpeed, vLLM, Ray); Tandem's \
             learners and rollout servers manage their own"
        }
        "use_wandb" | "wandb_org" | "wandb_group" | "wandb_project" | "wandb_run_name"
        | "use_ms" => {
            "nothing is sent off the machine: log.report_to takes tensorboard (every number \
             is also in the run folder's JSONL logs)"
        }
        "critic_pretrain"
        | "critic_learning_rate"
        | "critic_num_nodes"
        | "critic_num_gpus_per_node"
        | "value_clip"
        | "lambd"
        | "gamma"
        | "save_value_network"
        | "freezing_actor_steps"
        | "value_head_prefix" => "GRPO and RLOO have no critic",
        "reward_pretrain" => "--remote_rm_url scores instead (OpenRLHF uses it when given)",
        "ref_num_nodes" | "ref_num_gpus_per_node" => {
            "each learner rank holds the reference model itself when train.beta > 0"
        }
        "save_hf_ckpt" | "disable_ds_ckpt" | "use_ds_universal_ckpt" | "max_ckpt_mem" => {
            "every Tandem checkpoint is a Hugging Face model folder with the optimizer state \
             beside it"
        }
        "load_checkpoint" => {
            "a run resumes with `--resume-from` (the launcher and Slurm wrapper resume by \
             themselves)"
        }
        "max_samples" | "prompt_split" | "eval_split" => {
            "Tandem reads the whole files given (cut them to size beforehand)"
        }
        "normalize_reward" | "reward_clip_range" => {
            "rewards are used as the functions give them (their weights scale them)"
        }
        "lora_rank" | "lora_alpha" | "target_modules" | "lora_dropout" => {
            "LoRA is off (--lora_rank 0): every weight trains"
        }
        "load_in_4bit" => {
            "no quantized base: LoRA (model.use_peft) trains on a base in model.dtype"
        }
        "agent_func_path" => {
            "OpenRLHF's agent functions are not run: give the environment as a TRL environment \
             class (rollout.environment_factory: its methods are the tools, reward functions \
             read its state) or its tools as rollout.tools; rollout.max_tool_calling_iterations \
             bounds the turns"
        }
        "async_train" | "async_queue_size" => {
            "rollout.async_lag: 1 overlaps the next step's generation with training"
        }
        _ => "no Tandem counterpart",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_as_argparse_reads_them() {
        let script = "ray job submit --address=\"http://127.0.0.1:8265\" \\\n   -- python3 -m \
                      openrlhf.cli.train_ppo_ray \\\n   --pretrain Qwen/Qwen2.5-7B \\\n   \
                      --eps_clip_low_high 0.2 0.28 \\\n   --save_steps -1 \\\n   --bf16 \\\n   \
                      --actor_learning_rate=5e-7 \\\n   --use_kl_loss\n";
        let f = parse(script).unwrap();
        assert_eq!(f["pretrain"], json!("Qwen/Qwen2.5-7B"));
        assert_eq!(f["eps_clip_low_high"], json!([0.2, 0.28]));
        assert_eq!(f["save_steps"], json!(-1));
        assert_eq!(f["bf16"], json!(true));
        assert_eq!(f["actor_learning_rate"], json!(5e-7));
        assert_eq!(f["use_kl_loss"], json!(true));
        assert!(
            !f.contains_key("address"),
            "ray's own flags are not OpenRLHF's"
        );
        assert!(parse("python3 train.py --lr 1").is_none());
    }
}
