//! Tandem's decoder and chat templates against Hugging Face `transformers`.
//!
//! The fixtures under `tests/fixtures/hf/` were made once by
//! `tests/fixtures/make_hf_fixtures.py` (tiny random Qwen2 / Llama / Qwen3
//! models saved with `save_pretrained`, transformers' logits on a few batches,
//! and `apply_chat_template` renders); see `tests/fixtures/hf/README.md`.
//! These tests only read them: no Python is needed.

use std::path::{Path, PathBuf};

use model::decoder::LogitsWanted;
use model::tokenizer::ChatTemplate;
use model::{CausalLM, DType, Device, KvCache, ModelConfig, Tensor, Weights};
use serde_json::Value;

/// Max |tandem - transformers| over the logits of real (unpadded) positions.
/// Both sides compute in f32; the fixtures keep 7 significant digits (~5e-7
/// absolute at these magnitudes), so 1e-4 leaves room only for f32 rounding.
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One case of a `logits.json`.
struct Case {
    name: String,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    position_ids: Vec<Vec<u32>>,
    /// `[B][T]`: `Some(logits over the vocabulary)` where the mask is 1.
    logits: Vec<Vec<Option<Vec<f32>>>>,
}

impl Case {
    fn rows(&self) -> usize {
        self.input_ids.len()
    }

    /// The real tokens of row `b` (padding removed), in order.
    fn real_tokens(&self, b: usize) -> Vec<u32> {
        self.input_ids[b]
            .iter()
            .zip(&self.attention_mask[b])
            .filter(|(_, m)| **m == 1)
            .map(|(id, _)| *id)
            .collect()
    }

    /// transformers' logits for the real tokens of row `b`, in order.
    fn real_logits(&self, b: usize) -> Vec<&Vec<f32>> {
        self.logits[b].iter().flatten().collect()
    }
}

fn u32_matrix(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn load_cases(model_dir: &Path) -> Vec<Case> {
    let json = read_json(&model_dir.join("logits.json"));
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            input_ids: u32_matrix(&c["input_ids"]),
            attention_mask: u32_matrix(&c["attention_mask"]),
            position_ids: u32_matrix(&c["position_ids"]),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|pos| {
                            pos.as_array()
                                .map(|v| v.iter().map(|x| x.as_f64().unwrap() as f32).collect())
                        })
                        .collect()
                })
                .collect(),
        })
        .collect()
}

fn load(dir: &Path) -> (ModelConfig, Weights, CausalLM) {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let weights = Weights::load(dir, &Device::Cpu, DType::F32).unwrap();
    let lm = CausalLM::new(&cfg, &weights).unwrap();
    (cfg, weights, lm)
}

fn matrix_tensor(rows: &[Vec<u32>]) -> Tensor {
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocabulary sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Full-sequence forward on every case; returns the worst difference seen.
fn check_forward(model: &str) -> f32 {
    let dir = fixtures().join(model);
    let (cfg, _weights, lm) = load(&dir);
    let mut worst = 0.0f32;
    for case in load_cases(&dir) {
        // The fixture's positions follow Tandem's convention (cumsum - 1).
        for (b, row) in case.position_ids.iter().enumerate() {
            let mut seen = 0;
            for (t, &p) in row.iter().enumerate() {
                if case.attention_mask[b][t] == 1 {
                    assert_eq!(p, seen, "{model}/{}: fixture positions", case.name);
                    seen += 1;
                }
            }
        }
        let logits = lm
            .forward(
                &matrix_tensor(&case.input_ids),
                &matrix_tensor(&case.attention_mask),
            )
            .unwrap();
        let (b, t, v) = logits.dims3().unwrap();
        assert_eq!(
            (b, t, v),
            (case.rows(), case.input_ids[0].len(), cfg.vocab_size),
            "{model}/{}: logits shape",
            case.name
        );
        let got: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
        for (bi, (got_row, want_row)) in got.iter().zip(&case.logits).enumerate() {
            for (ti, (got_pos, want_pos)) in got_row.iter().zip(want_row).enumerate() {
                let Some(want) = want_pos else {
                    continue;
                };
                let d = max_abs_diff(got_pos, want);
                worst = worst.max(d);
                assert!(
                    d <= TOL,
                    "{model}/{}: row {bi} position {ti}: max |tandem - transformers| = {d:e} > {TOL:e}",
                    case.name
                );
            }
        }
    }
    eprintln!("{model}: max |tandem - transformers| over all cases = {worst:e}");
    worst
}

#[test]
fn qwen2_logits_match_transformers() {
    check_forward("qwen2");
}

#[test]
fn llama3_rope_scaling_logits_match_transformers() {
    check_forward("llama");
}

#[test]
fn qwen3_logits_match_transformers() {
    check_forward("qwen3");
}

#[test]
fn fixture_configs_are_read_as_written() {
    let qwen2 = ModelConfig::from_dir(&fixtures().join("qwen2")).unwrap();
    assert!(qwen2.tie_word_embeddings && qwen2.qkv_bias && !qwen2.o_bias);
    assert_eq!(
        (
            qwen2.num_attention_heads,
            qwen2.num_key_value_heads,
            qwen2.head_dim
        ),
        (4, 2, 12)
    );
    assert_eq!(qwen2.rope_theta, 10000.0);

    let llama = ModelConfig::from_dir(&fixtures().join("llama")).unwrap();
    assert!(!llama.tie_word_embeddings && !llama.qkv_bias && !llama.mlp_bias);
    assert_eq!(llama.rope_theta, 500000.0);
    assert_eq!(llama.rms_norm_eps, 1e-5);
    let scaling = llama.rope_scaling.expect("llama3 rope scaling");
    assert_eq!(
        (
            scaling.factor,
            scaling.low_freq_factor,
            scaling.high_freq_factor,
            scaling.original_max_position_embeddings
        ),
        (8.0, 1.0, 4.0, 40)
    );
    assert_eq!(llama.eos_token_ids, vec![2, 3]);
    assert_eq!(llama.bos_token_id, Some(1));

    let qwen3 = ModelConfig::from_dir(&fixtures().join("qwen3")).unwrap();
    assert!(qwen3.qk_norm && !qwen3.tie_word_embeddings);
    assert_eq!(
        (qwen3.hidden_size, qwen3.num_attention_heads, qwen3.head_dim),
        (32, 4, 16)
    );
    assert_eq!(qwen3.rope_theta, 1_000_000.0);
    assert_eq!(qwen3.bos_token_id, None);
}

#[test]
fn sharded_folder_loads_like_the_single_file() {
    let single_dir = fixtures().join("qwen2");
    let sharded_dir = fixtures().join("qwen2_sharded");
    // The fixture really is sharded.
    let index = read_json(&sharded_dir.join("model.safetensors.index.json"));
    let mut shards: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() >= 2, "expected >= 2 shards, got {shards:?}");
    assert!(!sharded_dir.join("model.safetensors").exists());

    let (cfg_a, w_a, lm_a) = load(&single_dir);
    let (cfg_b, w_b, lm_b) = load(&sharded_dir);
    assert_eq!(cfg_a.num_parameters(), cfg_b.num_parameters());
    let names_a: Vec<&String> = w_a.iter().map(|(n, _)| n).collect();
    let names_b: Vec<&String> = w_b.iter().map(|(n, _)| n).collect();
    assert_eq!(names_a, names_b, "same tensor names");
    for (name, ta) in w_a.iter() {
        let tb = w_b.get(name).unwrap();
        assert_eq!(ta.dims(), tb.dims(), "{name}");
        let a: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{name}: sharded values differ");
    }

    for case in load_cases(&single_dir) {
        let ids = matrix_tensor(&case.input_ids);
        let mask = matrix_tensor(&case.attention_mask);
        let a: Vec<f32> = lm_a
            .forward(&ids, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = lm_b
            .forward(&ids, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            a == b,
            "{}: sharded and single-file logits differ",
            case.name
        );
    }
}

/// KV-cached generation path: the sequences of the batch case join one cache,
/// prefill a prefix of different lengths together, then decode one token at a
/// time (a sequence leaves once its tokens run out). Every step's logits must
/// equal transformers' full-sequence logits at that position.
fn check_cached(model: &str) -> f32 {
    let dir = fixtures().join(model);
    let (cfg, _weights, lm) = load(&dir);
    let cases = load_cases(&dir);
    let mut worst = 0.0f32;
    for case in cases
        .iter()
        .filter(|c| c.name == "batch_right_padded" || c.name == "long")
    {
        let seqs: Vec<Vec<u32>> = (0..case.rows()).map(|b| case.real_tokens(b)).collect();
        let want: Vec<Vec<&Vec<f32>>> = (0..case.rows()).map(|b| case.real_logits(b)).collect();
        let max_len = seqs.iter().map(Vec::len).max().unwrap();
        let mut cache =
            KvCache::new(&cfg, seqs.len() + 1, max_len, &Device::Cpu, DType::F32).unwrap();
        // Take a slot that is then released, so slots are not simply 0..n.
        let spare = cache.allocate().unwrap();
        let slots: Vec<usize> = seqs.iter().map(|_| cache.allocate().unwrap()).collect();
        cache.release(spare);

        // Prefill: about half of each sequence (at least one token).
        let prefill: Vec<usize> = seqs.iter().map(|s| s.len().div_ceil(2)).collect();
        let entries: Vec<(usize, &[u32])> = slots
            .iter()
            .zip(&seqs)
            .zip(&prefill)
            .map(|((&slot, s), &n)| (slot, &s[..n]))
            .collect();
        let logits: Vec<Vec<Vec<f32>>> = lm
            .forward_cached(&mut cache, &entries, LogitsWanted::All)
            .unwrap()
            .to_vec3()
            .unwrap();
        for (b, &n) in prefill.iter().enumerate() {
            for t in 0..n {
                let d = max_abs_diff(&logits[b][t], want[b][t]);
                worst = worst.max(d);
                assert!(
                    d <= TOL,
                    "{model}/{} cached prefill: row {b} token {t}: {d:e} > {TOL:e}",
                    case.name
                );
            }
        }

        // Decode one token at a time; finished sequences leave the batch.
        let mut done = prefill.clone();
        loop {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&b| done[b] < seqs[b].len())
                .collect();
            if active.is_empty() {
                break;
            }
            let entries: Vec<(usize, &[u32])> = active
                .iter()
                .map(|&b| (slots[b], &seqs[b][done[b]..done[b] + 1]))
                .collect();
            let last: Vec<Vec<f32>> = lm
                .forward_cached(&mut cache, &entries, LogitsWanted::Last)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (i, &b) in active.iter().enumerate() {
                let d = max_abs_diff(&last[i], want[b][done[b]]);
                worst = worst.max(d);
                assert!(
                    d <= TOL,
                    "{model}/{} cached decode: row {b} token {}: {d:e} > {TOL:e}",
                    case.name,
                    done[b]
                );
                done[b] += 1;
            }
        }
        for (b, &slot) in slots.iter().enumerate() {
            assert_eq!(cache.len(slot), Some(seqs[b].len()));
        }
    }
    eprintln!("{model}: cached path, max |tandem - transformers| = {worst:e}");
    worst
}

#[test]
fn qwen2_cached_decoding_matches_transformers() {
    check_cached("qwen2");
}

#[test]
fn llama_cached_decoding_matches_transformers() {
    check_cached("llama");
}

#[test]
fn qwen3_cached_decoding_matches_transformers() {
    check_cached("qwen3");
}

/// Renders the cases of `chat_templates.json` selected by `with_tools` and
/// compares them with transformers' `apply_chat_template` output.
fn check_chat_templates(with_tools: bool) {
    let json = read_json(&fixtures().join("chat_templates.json"));
    let mut failures = Vec::new();
    let mut renders = 0;
    for spec in json["templates"].as_array().unwrap() {
        let name = spec["name"].as_str().unwrap();
        let template = ChatTemplate::new(
            spec["template"].as_str().unwrap(),
            spec["bos_token"].as_str().map(str::to_owned),
            spec["eos_token"].as_str().map(str::to_owned),
        )
        .unwrap_or_else(|e| panic!("{name}: template does not compile: {e}"));
        for case in spec["cases"].as_array().unwrap() {
            let case_name = case["name"].as_str().unwrap();
            let mut kwargs = case["extra_kwargs"].as_object().unwrap().clone();
            let tools = kwargs.remove("tools");
            if tools.is_some() != with_tools {
                continue;
            }
            let got = template.render_with(
                &case["messages"],
                case["add_generation_prompt"].as_bool().unwrap(),
                tools.as_ref(),
                Some(&kwargs),
            );
            let want = case["rendered"].as_str().unwrap();
            renders += 1;
            match got {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!(
                    "{name} / {case_name}:\n--- transformers\n{want:?}\n--- tandem\n{got:?}"
                )),
                Err(e) => failures.push(format!("{name} / {case_name}: error {e}")),
            }
        }
    }
    assert!(renders >= 6, "only {renders} renders in the fixture");
    assert!(
        failures.is_empty(),
        "{} of {renders} renders differ from transformers:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Qwen2.5-Instruct's and Llama-3.1-Instruct's real templates and a custom
/// one relying on trim_blocks / lstrip_blocks, on system / user-only /
/// multi-turn conversations, with and without the generation prompt: Tandem
/// renders exactly what transformers renders.
#[test]
fn chat_templates_render_like_transformers() {
    check_chat_templates(false);
}

/// The same with OpenAI-style `tools` (Qwen2.5: `tool | tojson` in the system
/// prompt, an assistant tool call and a tool answer; Llama 3.1:
/// `tojson(indent=4)` in the first user turn). transformers keeps the keys of
/// each tool schema in the order the caller gave them, so the JSON objects
/// must reach the template in that order.
#[test]
fn chat_templates_with_tools_render_like_transformers() {
    check_chat_templates(true);
}
