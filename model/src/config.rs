//! `config.json` of a Hugging Face model folder, read into what the decoder needs.
//!
//! The file is kept as read (`raw`) and written back unchanged on save, so that a
//! folder round-trips through Tandem without losing fields it does not use.
//! Fields that would change the model's function and that Tandem does not
//! implement are refused by name rather than ignored.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// The decoder families Tandem implements, by their `architectures` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen2 / Qwen2.5: q/k/v projections with bias, GQA.
    Qwen2,
    /// Llama 2 / 3.x: optional attention and MLP bias, `llama3` rope scaling.
    Llama,
    /// Qwen3: per-head RMSNorm on queries and keys (q_norm / k_norm).
    Qwen3,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// The family and head of an `architectures` name: `Qwen2ForCausalLM`,
    /// or `Qwen2ForSequenceClassification` (a reward model).
    fn from_hf_name(name: &str) -> Option<(Self, bool)> {
        let (family, classifier) = match name.strip_suffix("ForSequenceClassification") {
            Some(family) => (family, true),
            None => (name.strip_suffix("ForCausalLM")?, false),
        };
        [
            Architecture::Qwen2,
            Architecture::Llama,
            Architecture::Qwen3,
        ]
        .into_iter()
        .find(|a| a.hf_name().strip_suffix("ForCausalLM") == Some(family))
        .map(|a| (a, classifier))
    }
}

/// What sits on top of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelHead {
    /// The vocabulary projection (`lm_head`): a language model.
    CausalLm,
    /// transformers' `*ForSequenceClassification`: a `score` projection to
    /// `num_labels` values, read at each sequence's last token (a reward
    /// model, num_labels 1).
    SequenceClassification { num_labels: usize },
}

/// Llama 3.x frequency-dependent rope scaling (`rope_type: llama3`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub head: ModelHead,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always on for Qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's and Qwen3's `attention_bias` covers it; Qwen2 has none).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm on queries and keys.
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// config.json as read; written back on save.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// Reads `config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let Value::Object(raw) = value else {
            return Err(ModelError::Json {
                path: path.to_path_buf(),
                message: "expected a JSON object".into(),
            });
        };
        Self::from_map(raw, path)
    }

    pub fn from_map(raw: Map<String, Value>, path: &Path) -> Result<Self> {
        let f = Fields { raw: &raw, path };
        let (architecture, head) = f.architecture()?;

        let hidden_act = f.opt_str("hidden_act")?.unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(f.err(
                "hidden_act",
                format!("{hidden_act:?} is not supported; Tandem implements \"silu\""),
            ));
        }
        if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
            return Err(f.err(
                "use_sliding_window",
                "sliding-window attention is not supported; set it to false",
            ));
        }

        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(f.err("num_attention_heads", "must be positive"));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "hidden_size",
                        "does not divide by num_attention_heads and no head_dim is given",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", "must be even for rotary embeddings"));
        }

        let (rope_theta, rope_scaling) = f.rope()?;
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };
        let mlp_bias = match architecture {
            Architecture::Llama => f.opt_bool("mlp_bias")?.unwrap_or(false),
            _ => false,
        };
        let eos_token_ids = match raw.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Number(n)) => vec![f.token_id("eos_token_id", n)?],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Number(n) => f.token_id("eos_token_id", n),
                    _ => Err(f.err("eos_token_id", "expected an integer or a list of integers")),
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(f.err("eos_token_id", "expected an integer or a list of integers"));
            }
        };
        let bos_token_id = match raw.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(f.token_id("bos_token_id", n)?),
            Some(_) => return Err(f.err("bos_token_id", "expected an integer")),
        };

        let cfg = ModelConfig {
            architecture,
            head,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id,
            eos_token_ids,
            raw: raw.clone(),
        };
        Ok(cfg)
    }

    /// The config.json text written on save.
    pub fn to_json_string(&self) -> String {
        // A Map of Values always serializes.
        serde_json::to_string_pretty(&Value::Object(self.raw.clone())).unwrap_or_default()
    }

    /// Every parameter of the model by its Hugging Face name, with its shape,
    /// in a fixed order (the order of random init and of saved files).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v, d) = (
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.head_dim,
        );
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
            push("input_layernorm.weight", vec![h]);
            push("self_attn.q_proj.weight", vec![q, h]);
            push("self_attn.k_proj.weight", vec![kv, h]);
            push("self_attn.v_proj.weight", vec![kv, h]);
            if self.qkv_bias {
                push("self_attn.q_proj.bias", vec![q]);
                push("self_attn.k_proj.bias", vec![kv]);
                push("self_attn.v_proj.bias", vec![kv]);
            }
            push("self_attn.o_proj.weight", vec![h, q]);
            if self.o_bias {
                push("self_attn.o_proj.bias", vec![h]);
            }
            if self.qk_norm {
                push("self_attn.q_norm.weight", vec![d]);
                push("self_attn.k_norm.weight", vec![d]);
            }
            push("post_attention_layernorm.weight", vec![h]);
            push("mlp.gate_proj.weight", vec![i, h]);
            push("mlp.up_proj.weight", vec![i, h]);
            push("mlp.down_proj.weight", vec![h, i]);
            if self.mlp_bias {
                push("mlp.gate_proj.bias", vec![i]);
                push("mlp.up_proj.bias", vec![i]);
                push("mlp.down_proj.bias", vec![h]);
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Field access with errors that name the field and the file.
struct Fields<'a> {
    raw: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::config(PathBuf::from(self.path), field, message)
    }

    fn architecture(&self) -> Result<(Architecture, ModelHead)> {
        let unsupported = |value: String| ModelError::UnsupportedArchitecture {
            path: self.path.to_path_buf(),
            value,
        };
        let (architecture, classifier) = match self.raw.get("architectures") {
            Some(Value::Array(items)) if items.len() == 1 => match items[0].as_str() {
                Some(name) => Architecture::from_hf_name(name).ok_or(unsupported(name.into()))?,
                None => return Err(unsupported(items[0].to_string())),
            },
            Some(other) => return Err(unsupported(other.to_string())),
            None => {
                // Older folders name only `model_type`.
                let family = match self.opt_str("model_type")? {
                    Some("qwen2") => Architecture::Qwen2,
                    Some("llama") => Architecture::Llama,
                    Some("qwen3") => Architecture::Qwen3,
                    other => return Err(unsupported(format!("missing (model_type {other:?})"))),
                };
                (family, false)
            }
        };
        if !classifier {
            return Ok((architecture, ModelHead::CausalLm));
        }
        // transformers keeps no num_labels in config.json: id2label says it
        // (2 labels when absent, transformers' default).
        let num_labels = match self.raw.get("id2label") {
            None | Some(Value::Null) => 2,
            Some(Value::Object(labels)) if !labels.is_empty() => labels.len(),
            Some(other) => {
                return Err(self.err(
                    "id2label",
                    format!("expected a non-empty mapping of labels, got {other}"),
                ));
            }
        };
        Ok((
            architecture,
            ModelHead::SequenceClassification { num_labels },
        ))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.raw.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "is required"))
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.raw.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.raw.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.raw.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    fn token_id(&self, field: &str, n: &serde_json::Number) -> Result<u32> {
        n.as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| self.err(field, format!("{n} is not a token id")))
    }

    /// Rope base and scaling, from transformers >= 5's `rope_parameters` or the
    /// older `rope_theta` + `rope_scaling` pair.
    fn rope(&self) -> Result<(f64, Option<Llama3RopeScaling>)> {
        let (field, params) = match (
            self.raw.get("rope_parameters"),
            self.raw.get("rope_scaling"),
        ) {
            (Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
            (_, Some(Value::Object(p))) => ("rope_scaling", Some(p)),
            (Some(Value::Null) | None, Some(Value::Null) | None) => ("rope_scaling", None),
            (Some(v), _) | (_, Some(v)) => {
                return Err(self.err("rope_scaling", format!("expected an object, got {v}")));
            }
        };
        let theta_in_params = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64);
        let theta = match theta_in_params {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        let Some(p) = params else {
            return Ok((theta, None));
        };
        let rope_type = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match rope_type {
            "default" => Ok((theta, None)),
            "llama3" => {
                let num = |key: &str| {
                    p.get(key).and_then(Value::as_f64).ok_or_else(|| {
                        self.err(
                            &format!("{field}.{key}"),
                            "is required for rope_type llama3",
                        )
                    })
                };
                Ok((
                    theta,
                    Some(Llama3RopeScaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?
                            as usize,
                    }),
                ))
            }
            other => Err(self.err(
                &format!("{field}.rope_type"),
                format!("{other:?} is not supported; Tandem implements \"default\" and \"llama3\""),
            )),
        }
    }
}
