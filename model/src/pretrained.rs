//! Whole Hugging Face model folders out: config.json, model.safetensors,
//! generation_config.json, tokenizer.json and tokenizer_config.json, loadable
//! by `transformers.AutoModelForCausalLM.from_pretrained` and vLLM as they are,
//! and by Tandem bit-for-bit.

use std::path::Path;

use candle_core::DType;
use serde_json::{Map, Value, json};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::{SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, Weights};

/// transformers' name for a dtype in config.json.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The dtype config.json names (`torch_dtype`, or transformers 5's
/// `dtype`), if it is one Tandem computes in.
pub fn config_dtype(cfg: &ModelConfig) -> Option<DType> {
    let name = cfg
        .raw
        .get("torch_dtype")
        .or_else(|| cfg.raw.get("dtype"))
        .and_then(Value::as_str)?;
    [DType::BF16, DType::F16, DType::F32, DType::F64]
        .into_iter()
        .find(|d| torch_dtype_name(*d) == name)
}

/// Writes a model folder into `dir` (created if missing). The config's dtype
/// field is set to the dtype the weights are saved in.
pub fn save_pretrained(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: &Tokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let dtype = weights
        .iter()
        .next()
        .map(|(_, t)| t.dtype())
        .unwrap_or(DType::F32);
    let mut raw = cfg.raw.clone();
    let name = Value::from(torch_dtype_name(dtype));
    if raw.contains_key("dtype") {
        raw.insert("dtype".into(), name);
    } else {
        raw.insert("torch_dtype".into(), name);
    }
    write_json(&dir.join("config.json"), &Value::Object(raw))?;
    // A previous sharded save in the same folder would shadow the new file.
    let index = dir.join(SAFETENSORS_INDEX_FILE);
    if index.exists() {
        std::fs::remove_file(&index).map_err(|e| ModelError::io(&index, e))?;
    }
    weights.save(&dir.join(SAFETENSORS_FILE))?;
    write_json(&dir.join("generation_config.json"), &generation_config(cfg))?;
    tokenizer.save(dir)
}

/// Writes `model.safetensors.index.json` mapping every tensor of `weights`
/// to `model.safetensors`, for a folder that holds other `.safetensors`
/// files too (a checkpoint's optimizer state): vLLM and SGLang load every
/// `*.safetensors` of a folder that has no index, and would take those for
/// model weights. transformers still reads `model.safetensors` directly.
pub fn write_single_file_index(dir: &Path, weights: &Weights) -> Result<()> {
    let mut total_size = 0usize;
    let mut weight_map = Map::new();
    for (name, t) in weights.iter() {
        total_size += t.elem_count() * t.dtype().size_in_bytes();
        weight_map.insert(name.clone(), Value::from(SAFETENSORS_FILE));
    }
    write_json(
        &dir.join(SAFETENSORS_INDEX_FILE),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )
}

fn generation_config(cfg: &ModelConfig) -> Value {
    let mut g = Map::new();
    if let Some(bos) = cfg.bos_token_id {
        g.insert("bos_token_id".into(), json!(bos));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            g.insert("eos_token_id".into(), json!(one));
        }
        many => {
            g.insert("eos_token_id".into(), json!(many));
        }
    }
    Value::Object(g)
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}
