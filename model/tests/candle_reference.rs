//! Tandem's decoder against candle-transformers' own Qwen2, Llama and Qwen3
//! implementations, on the same random weights (the fixture folders under
//! `tests/fixtures/hf/`, read by candle's own `VarBuilder`, with configs built
//! from `config.json` by this file, not by Tandem's config reader).
//!
//! candle-transformers' attention masks are not right for padded batches, and
//! some of its forwards return only the last position, so the comparison is on
//! single unpadded sequences: all positions where candle gives hidden states
//! (Qwen2, Qwen3: final hidden states times the LM head here), the last
//! position of every prefix where it gives only that (Llama), plus candle's
//! own KV-cached token-by-token decoding.

use std::path::{Path, PathBuf};

use candle_core::Module;
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::{llama, qwen2, qwen3};
use model::{CausalLM, DType, Device, ModelConfig, Tensor, Weights};
use serde_json::Value;

/// Max |tandem - candle| over logits: both compute in f32 on the same weights.
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The safetensors files of a fixture folder (single file or shards).
fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no safetensors in {}", dir.display());
    files
}

fn var_builder(dir: &Path) -> VarBuilder<'static> {
    // SAFETY: the fixture files are only read while mapped.
    unsafe {
        VarBuilder::from_mmaped_safetensors(&safetensors_files(dir), DType::F32, &Device::Cpu)
            .unwrap()
    }
}

/// Unpadded token sequences of a fixture's cases: the single one, the three of
/// the batch, and the long one.
fn sequences(dir: &Path) -> Vec<Vec<u32>> {
    let json = read_json(&dir.join("logits.json"));
    let mut out = Vec::new();
    for case in json["cases"].as_array().unwrap() {
        if case["name"] == "batch_left_padded" {
            continue; // the same sequences as batch_right_padded
        }
        let ids = case["input_ids"].as_array().unwrap();
        let mask = case["attention_mask"].as_array().unwrap();
        for (row, m) in ids.iter().zip(mask) {
            let seq: Vec<u32> = row
                .as_array()
                .unwrap()
                .iter()
                .zip(m.as_array().unwrap())
                .filter(|(_, m)| m.as_u64() == Some(1))
                .map(|(id, _)| id.as_u64().unwrap() as u32)
                .collect();
            out.push(seq);
        }
    }
    assert!(out.len() >= 5);
    out
}

fn ids_tensor(seq: &[u32]) -> Tensor {
    Tensor::from_vec(seq.to_vec(), (1, seq.len()), &Device::Cpu).unwrap()
}

/// Tandem's logits `[T][V]` for one unpadded sequence.
fn tandem_logits(lm: &CausalLM, seq: &[u32]) -> Vec<Vec<f32>> {
    let mask = Tensor::ones((1, seq.len()), DType::U32, &Device::Cpu).unwrap();
    lm.forward(&ids_tensor(seq), &mask)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn tandem(dir: &Path) -> CausalLM {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let weights = Weights::load(dir, &Device::Cpu, DType::F32).unwrap();
    CausalLM::new(&cfg, &weights).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocabulary sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Tracks the worst difference and fails with a precise message.
struct Checker {
    model: &'static str,
    worst: f32,
}

impl Checker {
    fn new(model: &'static str) -> Self {
        Checker { model, worst: 0.0 }
    }

    fn check(&mut self, what: &str, seq: usize, pos: usize, got: &[f32], want: &[f32]) {
        let d = max_abs_diff(got, want);
        self.worst = self.worst.max(d);
        assert!(
            d <= TOL,
            "{}: {what}: sequence {seq} position {pos}: max |tandem - candle| = {d:e} > {TOL:e}",
            self.model
        );
    }

    fn report(&self) {
        eprintln!(
            "{}: max |tandem - candle-transformers| = {:e}",
            self.model, self.worst
        );
    }
}

fn usize_field(cfg: &Value, key: &str) -> usize {
    cfg[key]
        .as_u64()
        .unwrap_or_else(|| panic!("config.json: {key}")) as usize
}

fn f64_field(cfg: &Value, key: &str) -> f64 {
    cfg[key]
        .as_f64()
        .unwrap_or_else(|| panic!("config.json: {key}"))
}

fn rope_theta(cfg: &Value) -> f64 {
    cfg["rope_parameters"]["rope_theta"]
        .as_f64()
        .or_else(|| cfg["rope_theta"].as_f64())
        .expect("config.json: rope_theta")
}

fn qwen2_config(cfg: &Value) -> qwen2::Config {
    qwen2::Config {
        vocab_size: usize_field(cfg, "vocab_size"),
        hidden_size: usize_field(cfg, "hidden_size"),
        intermediate_size: usize_field(cfg, "intermediate_size"),
        num_hidden_layers: usize_field(cfg, "num_hidden_layers"),
        num_attention_heads: usize_field(cfg, "num_attention_heads"),
        num_key_value_heads: usize_field(cfg, "num_key_value_heads"),
        max_position_embeddings: usize_field(cfg, "max_position_embeddings"),
        // No sliding window: candle applies it when j + window < i.
        sliding_window: usize::MAX / 2,
        max_window_layers: usize_field(cfg, "max_window_layers"),
        tie_word_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap(),
        rope_theta: rope_theta(cfg),
        rms_norm_eps: f64_field(cfg, "rms_norm_eps"),
        use_sliding_window: false,
        hidden_act: Activation::Silu,
    }
}

fn check_qwen2(folder: &str) -> f32 {
    let dir = fixtures().join(folder);
    let json = read_json(&dir.join("config.json"));
    let cfg = qwen2_config(&json);
    assert!(
        cfg.tie_word_embeddings,
        "the qwen2 fixture ties its embeddings"
    );
    let vb = var_builder(&dir);
    assert!(!vb.contains_tensor("lm_head.weight"));
    let embed = vb
        .get(
            (cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens.weight",
        )
        .unwrap();
    let lm_head = candle_nn::Linear::new(embed, None);
    let mut base = qwen2::Model::new(&cfg, vb.clone()).unwrap();
    let mut causal = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    let lm = tandem(&dir);

    let mut checker = Checker::new("qwen2");
    // The sharded folder holds the same model; its sequences are qwen2's.
    for (s, seq) in sequences(&fixtures().join("qwen2")).iter().enumerate() {
        let ours = tandem_logits(&lm, seq);

        // Every position: candle's final hidden states times the tied head.
        base.clear_kv_cache();
        let hidden = base.forward(&ids_tensor(seq), 0, None).unwrap();
        let theirs: Vec<Vec<f32>> = lm_head
            .forward(&hidden.squeeze(0).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (t, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            checker.check("Model::forward + tied lm_head", s, t, a, b);
        }

        // candle's own LM head, last position.
        causal.clear_kv_cache();
        let last: Vec<f32> = causal
            .forward(&ids_tensor(seq), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        checker.check(
            "ModelForCausalLM::forward",
            s,
            seq.len() - 1,
            &ours[seq.len() - 1],
            &last,
        );

        // candle's KV cache: prefill half, then one token at a time.
        causal.clear_kv_cache();
        let half = seq.len().div_ceil(2);
        let first: Vec<f32> = causal
            .forward(&ids_tensor(&seq[..half]), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        checker.check(
            "ModelForCausalLM prefill",
            s,
            half - 1,
            &ours[half - 1],
            &first,
        );
        for t in half..seq.len() {
            let step: Vec<f32> = causal
                .forward(&ids_tensor(&seq[t..t + 1]), t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            checker.check("ModelForCausalLM decode", s, t, &ours[t], &step);
        }
    }
    checker.report();
    checker.worst
}

#[test]
fn qwen2_matches_candle_transformers() {
    check_qwen2("qwen2");
}

#[test]
fn qwen2_sharded_matches_candle_transformers() {
    check_qwen2("qwen2_sharded");
}

fn llama_config(cfg: &Value) -> llama::Config {
    let rope = &cfg["rope_parameters"];
    assert_eq!(
        rope["rope_type"], "llama3",
        "the llama fixture uses llama3 rope"
    );
    let f32_of = |key: &str| rope[key].as_f64().unwrap() as f32;
    let eos = match &cfg["eos_token_id"] {
        Value::Array(ids) => Some(llama::LlamaEosToks::Multiple(
            ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
        )),
        Value::Number(n) => Some(llama::LlamaEosToks::Single(n.as_u64().unwrap() as u32)),
        _ => None,
    };
    let num_attention_heads = usize_field(cfg, "num_attention_heads");
    let hidden_size = usize_field(cfg, "hidden_size");
    // candle's llama derives head_dim from hidden_size / heads.
    assert_eq!(
        usize_field(cfg, "head_dim"),
        hidden_size / num_attention_heads
    );
    llama::LlamaConfig {
        hidden_size,
        intermediate_size: usize_field(cfg, "intermediate_size"),
        vocab_size: usize_field(cfg, "vocab_size"),
        num_hidden_layers: usize_field(cfg, "num_hidden_layers"),
        num_attention_heads,
        num_key_value_heads: Some(usize_field(cfg, "num_key_value_heads")),
        rms_norm_eps: f64_field(cfg, "rms_norm_eps"),
        rope_theta: rope_theta(cfg) as f32,
        bos_token_id: cfg["bos_token_id"].as_u64().map(|v| v as u32),
        eos_token_id: eos,
        rope_scaling: Some(llama::Llama3RopeConfig {
            factor: f32_of("factor"),
            low_freq_factor: f32_of("low_freq_factor"),
            high_freq_factor: f32_of("high_freq_factor"),
            original_max_position_embeddings: rope["original_max_position_embeddings"]
                .as_u64()
                .unwrap() as usize,
            rope_type: llama::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: usize_field(cfg, "max_position_embeddings"),
        tie_word_embeddings: cfg["tie_word_embeddings"].as_bool(),
    }
    .into_config(false)
}

#[test]
fn llama_matches_candle_transformers() {
    let dir = fixtures().join("llama");
    let cfg = llama_config(&read_json(&dir.join("config.json")));
    let model = llama::Llama::load(var_builder(&dir), &cfg).unwrap();
    let lm = tandem(&dir);
    let dev = Device::Cpu;

    let mut checker = Checker::new("llama");
    for (s, seq) in sequences(&dir).iter().enumerate() {
        let ours = tandem_logits(&lm, seq);

        // candle's Llama returns the last position only: every prefix.
        let mut cache = llama::Cache::new(false, DType::F32, &cfg, &dev).unwrap();
        for n in 1..=seq.len() {
            let last: Vec<f32> = model
                .forward(&ids_tensor(&seq[..n]), 0, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            checker.check("Llama::forward on a prefix", s, n - 1, &ours[n - 1], &last);
        }

        // candle's KV cache: prefill half, then one token at a time.
        let mut cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
        let half = seq.len().div_ceil(2);
        let first: Vec<f32> = model
            .forward(&ids_tensor(&seq[..half]), 0, &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        checker.check("Llama prefill", s, half - 1, &ours[half - 1], &first);
        for t in half..seq.len() {
            let step: Vec<f32> = model
                .forward(&ids_tensor(&seq[t..t + 1]), t, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            checker.check("Llama decode", s, t, &ours[t], &step);
        }
    }
    checker.report();
}

fn qwen3_config(cfg: &Value) -> qwen3::Config {
    qwen3::Config {
        vocab_size: usize_field(cfg, "vocab_size"),
        hidden_size: usize_field(cfg, "hidden_size"),
        intermediate_size: usize_field(cfg, "intermediate_size"),
        num_hidden_layers: usize_field(cfg, "num_hidden_layers"),
        num_attention_heads: usize_field(cfg, "num_attention_heads"),
        head_dim: usize_field(cfg, "head_dim"),
        attention_bias: cfg["attention_bias"].as_bool().unwrap(),
        num_key_value_heads: usize_field(cfg, "num_key_value_heads"),
        max_position_embeddings: usize_field(cfg, "max_position_embeddings"),
        sliding_window: None,
        max_window_layers: usize_field(cfg, "max_window_layers"),
        tie_word_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap(),
        rope_theta: rope_theta(cfg),
        rms_norm_eps: f64_field(cfg, "rms_norm_eps"),
        use_sliding_window: false,
        hidden_act: Activation::Silu,
    }
}

#[test]
fn qwen3_matches_candle_transformers() {
    let dir = fixtures().join("qwen3");
    let cfg = qwen3_config(&read_json(&dir.join("config.json")));
    assert!(
        !cfg.tie_word_embeddings,
        "the qwen3 fixture has its own lm_head"
    );
    assert_ne!(cfg.head_dim * cfg.num_attention_heads, cfg.hidden_size);
    let vb = var_builder(&dir);
    let lm_head = candle_nn::Linear::new(
        vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")
            .unwrap(),
        None,
    );
    let lm = tandem(&dir);

    let mut checker = Checker::new("qwen3");
    for (s, seq) in sequences(&dir).iter().enumerate() {
        let ours = tandem_logits(&lm, seq);

        // Every position (qwen3::Model keeps a KV cache it cannot clear from
        // outside, so a fresh one per sequence).
        let mut base = qwen3::Model::new(&cfg, vb.clone()).unwrap();
        let hidden = base.forward(&ids_tensor(seq), 0).unwrap();
        let theirs: Vec<Vec<f32>> = lm_head
            .forward(&hidden.squeeze(0).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (t, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            checker.check("Model::forward + lm_head", s, t, a, b);
        }

        // candle's LM head and KV cache: prefill half, then one token at a time.
        let mut causal = qwen3::ModelForCausalLM::new(&cfg, vb.clone()).unwrap();
        let half = seq.len().div_ceil(2);
        let first: Vec<f32> = causal
            .forward(&ids_tensor(&seq[..half]), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        checker.check(
            "ModelForCausalLM prefill",
            s,
            half - 1,
            &ours[half - 1],
            &first,
        );
        for t in half..seq.len() {
            let step: Vec<f32> = causal
                .forward(&ids_tensor(&seq[t..t + 1]), t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            checker.check("ModelForCausalLM decode", s, t, &ours[t], &step);
        }
    }
    checker.report();
}
