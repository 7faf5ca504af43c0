//! Validation: pass@k and mean@k over held-out questions, through any
//! OpenAI-compatible endpoint (Tandem's rollout server or a stock vLLM).
//!
//! Each question gets `k` samples (one request with `n = k`). The reward
//! functions decide what a pass is: when the registry has a function logged
//! as `exact_match`, a sample passes when that function gives 1 (the other
//! functions, e.g. a small format bonus, do not make a wrong answer pass);
//! otherwise a sample passes when its total reward is > 0.
//!
//! - `pass@k` is the unbiased estimator of Chen et al. (2021),
//!   `1 - C(n - c, k) / C(n, k)` averaged over questions, with `n` samples of
//!   which `c` pass, reported for every power of two `k <= n` and for `k = n`;
//! - `mean@k` is the mean pass rate over all `n` samples of all questions
//!   (an estimate of pass@1 with `n` replicates);
//! - `reward_mean` is the mean total reward, and each function's mean.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::data::Example;
use crate::recipe::{ClientTagEcho, Recipe};
use crate::rewards::RewardRegistry;
use crate::rollout::{GroupOutcome, RolloutClient, RolloutSettings};

/// The result of one validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalResult {
    /// Samples per question.
    pub num_samples: usize,
    /// Questions evaluated (dropped groups excluded).
    pub num_questions: usize,
    pub dropped_groups: usize,
    /// `pass@k` for k = 1, 2, 4, ... and k = n.
    pub pass_at_k: BTreeMap<String, f64>,
    /// `mean@n`: the mean pass rate over every sample.
    pub mean_at_k: f64,
    pub reward_mean: f64,
    pub reward_per_function: BTreeMap<String, f64>,
    /// TRL's `log_metric` values of the `python` reward functions, each
    /// one's mean.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reward_metrics: BTreeMap<String, f64>,
    /// How a pass was decided: `exact_match == 1` or `total_reward > 0`.
    pub pass_rule: String,
    /// With several eval files (benchmarks), each one's numbers, by file
    /// name without its extension (the whole path where two names clash).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub per_file: BTreeMap<String, FileScores>,
    /// With `rollout.tools`: TRL's `tools/call_frequency` (calls per
    /// completion) and `tools/failure_frequency` (the share that failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<serde_json::Value>,
    pub seconds: f64,
}

/// One eval file's numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileScores {
    pub num_questions: usize,
    pub pass_at_k: BTreeMap<String, f64>,
    pub mean_at_k: f64,
    pub reward_mean: f64,
}

/// `pass@k` for the reported k of `n` samples, `mean@k` and the mean total
/// reward over questions whose `n` passes and rewards are consecutive.
fn scores_of(passes: &[bool], totals: &[f64], n: usize) -> FileScores {
    let num_questions = passes.len() / n.max(1);
    let mut pass_at = BTreeMap::new();
    for k in reported_ks(n) {
        let mean = passes
            .chunks(n.max(1))
            .map(|g| pass_at_k(n, g.iter().filter(|p| **p).count(), k))
            .sum::<f64>()
            / num_questions.max(1) as f64;
        pass_at.insert(format!("pass@{k}"), mean);
    }
    let total = passes.len().max(1) as f64;
    FileScores {
        num_questions,
        pass_at_k: pass_at,
        mean_at_k: passes.iter().filter(|p| **p).count() as f64 / total,
        reward_mean: totals.iter().sum::<f64>() / total,
    }
}

/// Each source file's [`scores_of`] when the questions (`files[q]` the file
/// of question `q`, in order) come from more than one; empty otherwise.
fn per_file_scores(
    files: &[&std::path::Path],
    passes: &[bool],
    totals: &[f64],
    n: usize,
) -> BTreeMap<String, FileScores> {
    let mut distinct: Vec<&std::path::Path> = Vec::new();
    for f in files {
        if !distinct.contains(f) {
            distinct.push(f);
        }
    }
    if distinct.len() < 2 {
        return BTreeMap::new();
    }
    let stem = |p: &std::path::Path| {
        p.file_stem()
            .map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into())
    };
    let clash = distinct
        .iter()
        .any(|a| distinct.iter().filter(|b| stem(a) == stem(b)).count() > 1);
    distinct
        .iter()
        .map(|file| {
            let (mut p, mut t) = (Vec::new(), Vec::new());
            for (q, f) in files.iter().enumerate() {
                if f == file {
                    p.extend_from_slice(&passes[q * n..(q + 1) * n]);
                    t.extend_from_slice(&totals[q * n..(q + 1) * n]);
                }
            }
            let name = if clash {
                file.display().to_string()
            } else {
                stem(file)
            };
            (name, scores_of(&p, &t, n))
        })
        .collect()
}

/// `1 - C(n - c, k) / C(n, k)`, computed as a product (numerically stable).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    let mut prod = 1.0;
    for i in (n - c + 1)..=n {
        prod *= 1.0 - k as f64 / i as f64;
    }
    1.0 - prod
}

/// The k values reported for `n` samples: powers of two below `n`, and `n`.
pub fn reported_ks(n: usize) -> Vec<usize> {
    let mut ks = Vec::new();
    let mut k = 1;
    while k < n {
        ks.push(k);
        k *= 2;
    }
    if n > 0 {
        ks.push(n);
    }
    ks
}

/// Seeds of the eval requests: a hash of the seed and the question's place,
/// so that two evaluations of the same weights sample the same.
pub fn eval_seed(seed: u64, example: &Example) -> u64 {
    let key = format!(
        "eval|{seed}|{}|{}",
        example.source_file.display(),
        example.row
    );
    crate::train::hash_u64(key.as_bytes())
}

/// Samples `client.settings().num_generations` completions per example and
/// scores them.
pub async fn evaluate(
    client: &RolloutClient,
    rewards: &RewardRegistry,
    examples: &[Example],
    seed: u64,
) -> anyhow::Result<EvalResult> {
    let started = std::time::Instant::now();
    let n = client.settings().num_generations;
    let seeds: Vec<u64> = examples.iter().map(|e| eval_seed(seed, e)).collect();
    let outcomes = client.generate(examples, &seeds).await?;
    let mut inputs = Vec::new();
    let mut dropped = 0;
    // Completions, tool calls, failed calls.
    let mut tool_counts = [0usize; 3];
    // The file (or pattern) of each question that got completions, in order.
    let mut files: Vec<&std::path::Path> = Vec::new();
    for (q, (example, outcome)) in examples.iter().zip(&outcomes).enumerate() {
        match outcome {
            GroupOutcome::Kept(group) => {
                for c in &group.completions {
                    tool_counts[0] += 1;
                    tool_counts[1] += c.tool_calls;
                    tool_counts[2] += c.tool_failures;
                }
                inputs.extend(group.reward_inputs(example, q));
                files.push(example.dataset.as_ref().unwrap_or(&example.source_file));
            }
            GroupOutcome::Dropped { .. } => dropped += 1,
        }
    }
    let num_questions = inputs.len() / n.max(1);
    if num_questions == 0 {
        anyhow::bail!(
            "eval: no question got completions ({} examples, {dropped} groups dropped)",
            examples.len()
        );
    }
    let scores = rewards.score(&inputs).await?;
    let exact = scores
        .per_function
        .iter()
        .find(|f| f.label == "exact_match");
    let (pass_rule, passes): (&str, Vec<bool>) = match exact {
        Some(f) => (
            "exact_match == 1",
            f.values.iter().map(|v| *v >= 1.0).collect(),
        ),
        None => (
            "total_reward > 0",
            scores.total.iter().map(|v| *v > 0.0).collect(),
        ),
    };
    let all = scores_of(&passes, &scores.total, n);
    let per_file = per_file_scores(&files, &passes, &scores.total, n);
    let reward_per_function = scores
        .summary()
        .into_iter()
        .map(|(label, mean, _)| (label, mean))
        .collect();
    Ok(EvalResult {
        num_samples: n,
        num_questions,
        dropped_groups: dropped,
        pass_at_k: all.pass_at_k,
        mean_at_k: all.mean_at_k,
        reward_mean: all.reward_mean,
        reward_per_function,
        reward_metrics: scores.logged.metric_means(),
        pass_rule: pass_rule.into(),
        per_file,
        tools: client.uses_tools().then(|| {
            let [completions, calls, failed] = tool_counts;
            crate::tools::call_metrics(completions, calls, failed)
        }),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_files_are_scored_each_on_its_own_too() {
        use std::path::Path;
        let (a, b) = (
            Path::new("data/aime24.jsonl"),
            Path::new("data/math500.parquet"),
        );
        // Two samples per question: a's two questions pass 1 and 2 of 2, b's
        // one question 0 of 2.
        let files = [a, b, a];
        let passes = [true, false, false, false, true, true];
        let totals = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let per = per_file_scores(&files, &passes, &totals, 2);
        assert_eq!(per.len(), 2);
        let (sa, sb) = (&per["aime24"], &per["math500"]);
        assert_eq!((sa.num_questions, sb.num_questions), (2, 1));
        assert_eq!(sa.mean_at_k, 0.75);
        assert_eq!(sa.pass_at_k["pass@1"], 0.75);
        assert_eq!(sa.pass_at_k["pass@2"], 1.0);
        assert_eq!((sb.mean_at_k, sb.reward_mean), (0.0, 0.0));
        // The whole set weighs the files by their questions.
        let all = scores_of(&passes, &totals, 2);
        assert_eq!(all.mean_at_k, 0.5);
        // One file: no breakdown; two of one name: by path.
        assert!(per_file_scores(&[a, a], &passes[..4], &totals[..4], 2).is_empty());
        let other = Path::new("other/aime24.jsonl");
        let clash = per_file_scores(&[a, other], &passes[..4], &totals[..4], 2);
        assert!(
            clash.contains_key("data/aime24.jsonl") && clash.contains_key("other/aime24.jsonl")
        );
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        // n = 4, c = 1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6.
        assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
        assert!((pass_at_k(4, 1, 2) - 0.5).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        assert_eq!(pass_at_k(4, 4, 1), 1.0);
        assert_eq!(reported_ks(4), vec![1, 2, 4]);
        assert_eq!(reported_ks(6), vec![1, 2, 4, 6]);
        assert_eq!(reported_ks(1), vec![1]);
    }
}

/// `learner eval`'s flags.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Base URL (`http://host:8000`).
    #[arg(long)]
    pub endpoint: String,
    /// Questions: JSONL or Parquet files with the recipe's column mapping
    /// (default `prompt` and `answer`), or a quoted pattern of a dataset's
    /// shards (`'data/test-*.parquet'`: one task); several (a
    /// space-separated list, or the flag repeated) are reported each on its
    /// own too. None: the `--config` recipe's `data.eval_files`.
    #[arg(long, num_args = 1..)]
    pub tasks: Vec<PathBuf>,
    /// Samples per question (the k of pass@k).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Folder to append eval_log.jsonl to (printed to stdout either way).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Recipe for the reward functions, prompt template, sampling and
    /// tokenizer (model.path); default: exact_match, template `{question}`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `model` field of the requests (vLLM's --served-model-name).
    #[arg(long)]
    pub model: Option<String>,
    /// Evaluate the first N questions of each file only.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Sampling temperature (default: the recipe's eval.temperature).
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Accept responses without an echoed client tag (stock vLLM).
    #[arg(long)]
    pub ignore_client_tag: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `learner eval`: pass@k and mean@k of the model behind `endpoint` on
/// `tasks`; returns the JSON line (also appended to `out/eval_log.jsonl`).
pub fn run_command(args: EvalArgs) -> anyhow::Result<String> {
    let EvalArgs {
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
    } = args;
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
    if !tasks.is_empty() {
        recipe.data.eval_files = tasks
            .into_iter()
            .map(crate::recipe::DataFile::new)
            .collect();
    } else if recipe.data.eval_files.is_empty() {
        anyhow::bail!(
            "no questions: give --tasks FILE..., or a --config whose data.eval_files lists them"
        );
    }
    let tokenizer = match &recipe.model.path {
        Some(p) => Some(Arc::new(crate::data::policy_tokenizer(p, &recipe.data)?)),
        None => None,
    };
    let mut tools = crate::tools::ToolRunner::from_recipe(&recipe)?;
    let mut rewards = RewardRegistry::from_section(&recipe.reward)?.with_data_columns(&recipe.data);
    if let Some(t) = &mut tools {
        t.attach_rewards(&mut rewards)?;
    }
    let (examples, _) = crate::data::load_eval_examples(
        &recipe,
        max_examples,
        tokenizer.as_deref(),
        tools.as_ref().map(|t| t.prompt_tools()),
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
        generation_kwargs: recipe.rollout.generation_kwargs.clone(),
    };
    if let (Some(t), Some(tok)) = (&tools, &tokenizer)
        && let Some(warning) = t.unlisted_tools_warning(tok)?
    {
        eprintln!("warning: {warning}");
    }
    let client = RolloutClient::new(settings, tokenizer)?.with_tools(tools);
    // No training here: python functions' trainer_state is the run's start.
    rewards.set_trainer_state(0, recipe.train.max_steps, 0.0);
    rewards.prepare()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(evaluate(&client, &rewards, &examples, seed))?;
    let line = serde_json::to_string(&result)?;
    if let Some(out) = out {
        use std::io::Write;
        std::fs::create_dir_all(&out)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out.join("eval_log.jsonl"))?;
        writeln!(f, "{line}")?;
    }
    Ok(line)
}
