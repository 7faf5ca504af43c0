//! The embedded models: small randomly initialised Qwen2-architecture models
//! with a character-level tokenizer and a ChatML chat template, made on first
//! use so that the demo and the tests need no download. The same preset and
//! seed give the same bytes.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::{Map, Value, json};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::pretrained::save_pretrained;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// Characters of the embedded tokenizer: enough for arithmetic tasks, short
/// English instructions and the `<answer>` / `<think>` tags of r1-style prompts.
pub const CHARACTERS: &str = "0123456789+-*/=()., :;?!'\"<>[]{}_#%&|\\^~`@$\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
pub const PAD_TOKEN: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const UNK_TOKEN: &str = "<unk>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// ~0.4M parameters: the demo's model, trains in minutes on 2 cores.
    Tiny,
    /// ~21M parameters: benchmarks and a step closer to real shapes.
    Small,
    /// The shape of Qwen2.5-0.5B (494M parameters, 151,936-row embedding),
    /// randomly initialised: GPU benchmarks and runs at a real model's size
    /// without a download. Written in bf16.
    Qwen25_0_5B,
}

impl Preset {
    /// The name `FromStr` takes (the recipe's `model.preset`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Qwen25_0_5B => "qwen2.5-0.5b",
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "qwen2.5-0.5b" => Ok(Preset::Qwen25_0_5B),
            other => Err(ModelError::Invalid(format!(
                "unknown preset {other:?}: expected \"tiny\", \"small\" or \"qwen2.5-0.5b\""
            ))),
        }
    }
}

/// The character tokenizer every preset uses.
pub fn tokenizer() -> Result<Tokenizer> {
    crate::tokenizer::char_level(CHARACTERS, &[PAD_TOKEN, IM_START, IM_END, UNK_TOKEN])
}

/// The preset's config.json, for a tokenizer of `vocab_size` tokens whose
/// end-of-turn token is `eos`.
pub fn config(preset: Preset, vocab_size: usize, eos: u32, pad: u32) -> Result<ModelConfig> {
    let (hidden, layers, heads, kv_heads, intermediate, max_pos) = match preset {
        Preset::Tiny => (96, 4, 4, 2, 256, 1024),
        Preset::Small => (512, 7, 8, 2, 1536, 2048),
        Preset::Qwen25_0_5B => (896, 24, 14, 2, 4864, 32768),
    };
    // Qwen2.5's embedding has 151,936 rows whatever the tokenizer uses: the
    // lm_head is a quarter of the model's bytes, so benchmarks keep it.
    let (vocab_size, rope_theta, torch_dtype) = match preset {
        Preset::Qwen25_0_5B => (vocab_size.max(151_936), 1_000_000.0, "bfloat16"),
        _ => (vocab_size, 10_000.0, "float32"),
    };
    let raw = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "use_cache": true,
        "bos_token_id": pad,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": torch_dtype,
    });
    let Value::Object(raw): Value = raw else {
        return Err(ModelError::Invalid("preset config is not an object".into()));
    };
    ModelConfig::from_map(raw as Map<String, Value>, Path::new("<preset>"))
}

/// Writes the preset's model folder into `dir`.
pub fn init_model(preset: Preset, dir: &Path, seed: u64) -> Result<ModelConfig> {
    let tok = tokenizer()?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| ModelError::Tokenizer(format!("preset tokenizer lacks {t}")))
    };
    let cfg = config(preset, tok.vocab_size(), id(IM_END)?, id(PAD_TOKEN)?)?;
    let dtype = match preset {
        Preset::Qwen25_0_5B => DType::BF16,
        _ => DType::F32,
    };
    let weights = Weights::random(&cfg, seed, &Device::Cpu, dtype)?;
    save_pretrained(dir, &cfg, &weights, &tok)?;
    Ok(cfg)
}
