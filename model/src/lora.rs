//! LoRA adapters (Hu et al. 2021) as PEFT defines and stores them: a linear
//! layer `y = W x` becomes `y = W x + s B A x` with `A` `[r, in]`, `B`
//! `[out, r]` and `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA). Only `A`
//! and `B` train; `W` stays frozen, so gradients, optimizer state and the
//! all-reduce shrink to the adapters' size.
//!
//! DoRA (Liu et al. 2024, PEFT's `use_dora`) also trains a magnitude `m`
//! per output row: `y = m / ||W + s B A|| * (W + s B A) x`, the row norms
//! taken as constants in the backward pass (the paper's section 4.3, as
//! PEFT does), `m` starting at the base's row norms.
//!
//! PEFT's `modules_to_save` (`lm_head`, `embed_tokens`, norms...) train
//! whole beside the adapters: the adapters hold a trainable copy of each
//! such weight under its model name (`lm_head.weight`), used in place of
//! the base's, and a merge hands it out as it is.
//!
//! Names: an adapter of the linear `model.layers.0.self_attn.q_proj` is
//! `model.layers.0.self_attn.q_proj.lora_A.weight` / `.lora_B.weight`
//! (and `.lora_magnitude_vector` with DoRA); PEFT's
//! `adapter_model.safetensors` prefixes them with `base_model.model.`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// The linear layers of a decoder layer, by the names PEFT's
/// `target_modules` use. (`lm_head` and the embeddings take no adapter here.)
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// PEFT's `adapter_config.json` and `adapter_model.safetensors`.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of the adapter names in `adapter_model.safetensors`.
const PEFT_PREFIX: &str = "base_model.model.";

/// Which linears get an adapter, as PEFT's `target_modules` says it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// PEFT's `"all-linear"`: every linear but the output head.
    AllLinear,
    /// Module names, each matching a linear whose full name is it or ends
    /// with `.` and it (`q_proj`, `self_attn.q_proj`, `layers.0.mlp.up_proj`).
    Names(Vec<String>),
    /// A regular expression matched against the whole module name (PEFT's
    /// `target_modules` given as one string).
    Regex(String),
}

/// The adapter's shape: rank, scale and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub target_modules: TargetModules,
    /// rsLoRA (Kalajdzievski 2023): scale `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// PEFT's `lora_dropout`: the probability that an element of the
    /// adapter's input is zeroed (the rest scaled by `1 / (1 - p)`) in a
    /// training forward ([`crate::CausalLM::with_dropout`]); never when
    /// generating, scoring or merging.
    pub dropout: f64,
    /// DoRA: a trained magnitude per output row (see the module's doc).
    pub use_dora: bool,
    /// PEFT's `modules_to_save`: modules trained whole, each matching the
    /// modules whose name ends with it, as PEFT matches them (`lm_head`,
    /// `embed_tokens`, `norm`).
    pub modules_to_save: Vec<String>,
}

/// One adapted linear: its full name and `[out, in]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptedLinear {
    pub module: String,
    pub out_features: usize,
    pub in_features: usize,
}

impl AdaptedLinear {
    pub fn lora_a(&self) -> String {
        format!("{}.lora_A.weight", self.module)
    }
    pub fn lora_b(&self) -> String {
        format!("{}.lora_B.weight", self.module)
    }
    pub fn weight(&self) -> String {
        format!("{}.weight", self.module)
    }
    /// DoRA's magnitude `m`, `[out]` (PEFT's name on disk).
    pub fn magnitude(&self) -> String {
        format!("{}.lora_magnitude_vector", self.module)
    }
}

/// DoRA's row norms `||W + s B A||` (`[out]`, over the input dimension),
/// computed in f32 or wider and returned in `w`'s dtype, detached: the
/// backward pass takes them as constants.
pub fn dora_weight_norm(w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let wide = if w.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let delta = b
        .detach()
        .to_dtype(wide)?
        .matmul(&a.detach().to_dtype(wide)?)?;
    let adapted = (w.detach().to_dtype(wide)? + (delta * scaling)?)?;
    Ok(adapted.sqr()?.sum(1)?.sqrt()?.to_dtype(w.dtype())?)
}

impl LoraConfig {
    /// The factor `s` of `s B A`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Every linear of `cfg` that gets an adapter, in layer order. A target
    /// that matches nothing is an error naming it and the names there are.
    pub fn adapted(&self, cfg: &ModelConfig) -> Result<Vec<AdaptedLinear>> {
        if self.r == 0 {
            return Err(ModelError::Invalid(
                "LoRA rank r must be at least 1".to_string(),
            ));
        }
        let all = linears(cfg);
        let out: Vec<AdaptedLinear> = match &self.target_modules {
            TargetModules::AllLinear => all,
            TargetModules::Names(names) => {
                if names.is_empty() {
                    return Err(ModelError::Invalid(
                        "LoRA target_modules is empty: name modules (q_proj, v_proj, ...) or \
                         all-linear"
                            .to_string(),
                    ));
                }
                for n in names {
                    if !all.iter().any(|l| module_matches(&l.module, n)) {
                        return Err(ModelError::Invalid(format!(
                            "LoRA target module `{n}` matches no linear layer of this model: \
                             adapters go on {} (or all-linear); lm_head and the embeddings \
                             take none",
                            LINEAR_MODULES.join(", ")
                        )));
                    }
                }
                all.into_iter()
                    .filter(|l| names.iter().any(|n| module_matches(&l.module, n)))
                    .collect()
            }
            TargetModules::Regex(pattern) => {
                let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    ModelError::Invalid(format!("LoRA target_modules `{pattern}`: {e}"))
                })?;
                let out: Vec<_> = all.into_iter().filter(|l| re.is_match(&l.module)).collect();
                if out.is_empty() {
                    return Err(ModelError::Invalid(format!(
                        "LoRA target_modules `{pattern}` (a regular expression over whole \
                         module names such as model.layers.0.self_attn.q_proj) matches no \
                         linear layer"
                    )));
                }
                out
            }
        };
        Ok(out)
    }

    /// Whether `other` puts the same adapters on `cfg`: rank, scale, the
    /// linears adapted and the weights trained whole, however the targets
    /// are spelt (PEFT saves `all-linear` as the module names it found, in no
    /// fixed order).
    pub fn same_adapters(&self, other: &LoraConfig, cfg: &ModelConfig) -> Result<bool> {
        Ok(self.r == other.r
            && self.alpha == other.alpha
            && self.use_rslora == other.use_rslora
            && self.use_dora == other.use_dora
            && self.adapted(cfg)? == other.adapted(cfg)?
            && self.saved_weights(cfg)? == other.saved_weights(cfg)?)
    }

    /// The weights `modules_to_save` trains whole, with their shapes, in
    /// the model's order. A name that matches no module, a module that also
    /// takes an adapter, or tied embeddings (a trained copy of one would
    /// untie them) is an error saying so.
    pub fn saved_weights(&self, cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
        if self.modules_to_save.is_empty() {
            return Ok(Vec::new());
        }
        let module = |weight: &str| {
            weight
                .strip_suffix(".weight")
                .or_else(|| weight.strip_suffix(".bias"))
                .unwrap_or(weight)
                .to_string()
        };
        let mut shapes = cfg.tensor_shapes();
        if cfg.tie_word_embeddings {
            shapes.push((
                "lm_head.weight".into(),
                vec![cfg.vocab_size, cfg.hidden_size],
            ));
        }
        let adapted = self.adapted(cfg)?;
        let mut out = Vec::new();
        for name in &self.modules_to_save {
            let hits: Vec<&(String, Vec<usize>)> = shapes
                .iter()
                .filter(|(w, _)| module(w).ends_with(name.as_str()))
                .collect();
            if hits.is_empty() {
                return Err(ModelError::Invalid(format!(
                    "modules_to_save `{name}` matches no module of this model (a module \
                     matches when its name ends with it: lm_head, embed_tokens, norm, \
                     input_layernorm, ...)"
                )));
            }
            for (w, shape) in hits {
                let m = module(w);
                if cfg.tie_word_embeddings && (m == "lm_head" || m == "model.embed_tokens") {
                    return Err(ModelError::Invalid(format!(
                        "modules_to_save `{name}`: this model ties lm_head to embed_tokens \
                         (tie_word_embeddings), and a trained copy of one would untie them; \
                         leave them out (the adapters train without them)"
                    )));
                }
                if adapted.iter().any(|l| l.module == m) {
                    return Err(ModelError::Invalid(format!(
                        "modules_to_save `{name}` names {m}, which target_modules also gives an \
                         adapter: a module is one or the other"
                    )));
                }
                if !out.iter().any(|(o, _): &(String, Vec<usize>)| o == w) {
                    out.push((w.clone(), shape.clone()));
                }
            }
        }
        let order: Vec<&String> = shapes.iter().map(|(w, _)| w).collect();
        out.sort_by_key(|(w, _)| order.iter().position(|o| *o == w));
        Ok(out)
    }

    /// Fresh adapters as PEFT initialises them: `A` Kaiming-uniform
    /// (`a = sqrt(5)`: uniform in `±1/sqrt(in)`), `B` zero, so the adapted
    /// model starts as the base model; DoRA's magnitudes are the row norms
    /// of `base`'s weights. The same seed gives the same bytes.
    pub fn init(
        &self,
        cfg: &ModelConfig,
        base: &Weights,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Weights> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for l in self.adapted(cfg)? {
            let bound = 1.0 / (l.in_features as f32).sqrt();
            let uniform = Uniform::new_inclusive(-bound, bound)
                .map_err(|e| ModelError::Invalid(format!("LoRA init of {}: {e}", l.module)))?;
            let a: Vec<f32> = (0..self.r * l.in_features)
                .map(|_| uniform.sample(&mut rng))
                .collect();
            let a = Tensor::from_vec(a, (self.r, l.in_features), device)?.to_dtype(dtype)?;
            let b = Tensor::zeros((l.out_features, self.r), dtype, device)?;
            if self.use_dora {
                let w = base.require(&l.weight(), &[l.out_features, l.in_features])?;
                let m = dora_weight_norm(w, &a, &b, self.scaling())?;
                tensors.insert(l.magnitude(), m.to_device(device)?.to_dtype(dtype)?);
            }
            tensors.insert(l.lora_a(), a);
            tensors.insert(l.lora_b(), b);
        }
        // Trained whole: a copy of the base's, not the base's own storage.
        for (name, shape) in self.saved_weights(cfg)? {
            let w = base.require(&name, &shape)?;
            tensors.insert(name, w.to_device(device)?.to_dtype(dtype)?.copy()?);
        }
        Ok(Weights::new(tensors))
    }

    /// The adapted weights merged, `W + s B A` (with DoRA scaled to
    /// `m / ||W + s B A||` per row; computed in f32 or wider, returned in
    /// `W`'s dtype), and the weights trained whole as they are, by the base
    /// weight's name. Other weights are unchanged and not returned.
    pub fn merge(
        &self,
        cfg: &ModelConfig,
        base: &Weights,
        adapters: &Weights,
    ) -> Result<BTreeMap<String, Tensor>> {
        let s = self.scaling();
        let mut out = BTreeMap::new();
        for l in self.adapted(cfg)? {
            let w = base.require(&l.weight(), &[l.out_features, l.in_features])?;
            let a = adapters.require(&l.lora_a(), &[self.r, l.in_features])?;
            let b = adapters.require(&l.lora_b(), &[l.out_features, self.r])?;
            // In f32 at least (bf16 products lose the small update).
            let wide = if w.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let delta = b.to_dtype(wide)?.matmul(&a.to_dtype(wide)?)?;
            let mut merged = (w.to_dtype(wide)? + (delta * s)?)?;
            if self.use_dora {
                let m = adapters.require(&l.magnitude(), &[l.out_features])?;
                let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                let factor = m.to_dtype(wide)?.unsqueeze(1)?.div(&norm)?;
                merged = merged.broadcast_mul(&factor)?;
            }
            out.insert(l.weight(), merged.to_dtype(w.dtype())?);
        }
        for (name, shape) in self.saved_weights(cfg)? {
            let dtype = base.get(&name).map_or(DType::F32, Tensor::dtype);
            let saved = adapters.require(&name, &shape)?.to_dtype(dtype)?;
            out.insert(name, saved);
        }
        Ok(out)
    }

    /// PEFT's `adapter_config.json` for these adapters on `base_model`.
    pub fn peft_config(&self, base_model: &str) -> Value {
        let targets = match &self.target_modules {
            TargetModules::AllLinear => json!("all-linear"),
            TargetModules::Names(n) => json!(n),
            TargetModules::Regex(r) => json!(r),
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": (!self.modules_to_save.is_empty()).then_some(&self.modules_to_save),
            "use_dora": self.use_dora,
        })
    }

    /// Reads PEFT's `adapter_config.json` (LoRA or DoRA, no bias: what
    /// Tandem trains).
    pub fn from_peft_config(v: &Value, path: &Path) -> Result<Self> {
        let bad = |what: String| ModelError::Invalid(format!("{}: {what}", path.display()));
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            return Err(bad(format!("peft_type is `{peft_type}`, not LORA")));
        }
        let use_dora = match v.get("use_dora") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(d)) => *d,
            Some(other) => return Err(bad(format!("use_dora {other} is not true or false"))),
        };
        for (key, ok) in [
            ("bias", v.get("bias").is_none_or(|b| b == "none")),
            // Per-module ranks and scales, adapters on some layers only.
            ("rank_pattern", empty_or_absent(v, "rank_pattern")),
            ("alpha_pattern", empty_or_absent(v, "alpha_pattern")),
            (
                "layers_to_transform",
                empty_or_absent(v, "layers_to_transform"),
            ),
            ("exclude_modules", empty_or_absent(v, "exclude_modules")),
            ("layer_replication", empty_or_absent(v, "layer_replication")),
            ("target_parameters", empty_or_absent(v, "target_parameters")),
            (
                "trainable_token_indices",
                empty_or_absent(v, "trainable_token_indices"),
            ),
            (
                "lora_bias",
                v.get("lora_bias").is_none_or(|b| b == &json!(false)),
            ),
            (
                "fan_in_fan_out",
                v.get("fan_in_fan_out").is_none_or(|b| b == &json!(false)),
            ),
        ] {
            if !ok {
                return Err(bad(format!("{key} is not supported by Tandem's LoRA")));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`r` is missing or not an integer".into()))?
            as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("`lora_alpha` is missing or not a number".into()))?;
        let target_modules = match v.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => TargetModules::Names(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad("target_modules holds a non-string".into()))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => return Err(bad("target_modules is missing".into())),
        };
        let dropout = match v.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(d) => d
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| bad(format!("lora_dropout {d} is not a number in [0, 1)")))?,
        };
        let modules_to_save = match v.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("modules_to_save holds a non-string".into()))
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(bad(format!("modules_to_save {other} is not a list"))),
        };
        Ok(LoraConfig {
            r,
            alpha,
            target_modules,
            dropout,
            modules_to_save,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            use_dora,
        })
    }
}

/// Whether `key` is absent, null, or an empty object or list.
fn empty_or_absent(v: &Value, key: &str) -> bool {
    match v.get(key) {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    }
}

/// Whether the module `full` (`model.layers.0.self_attn.q_proj`) is what the
/// target `name` names, as PEFT matches a list entry: the whole name or a
/// dotted suffix of it.
fn module_matches(full: &str, name: &str) -> bool {
    full == name || full.ends_with(&format!(".{name}"))
}

/// Every linear of a decoder layer stack, in layer order.
fn linears(cfg: &ModelConfig) -> Vec<AdaptedLinear> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for (module, o, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            out.push(AdaptedLinear {
                module: format!("model.layers.{l}.{module}"),
                out_features: o,
                in_features: inp,
            });
        }
    }
    out
}

/// Adapters and their config, as the decoder takes them.
#[derive(Debug, Clone)]
pub struct Lora {
    pub config: LoraConfig,
    /// `A` and `B` of every adapted linear, by Tandem's names.
    pub adapters: Weights,
}

impl Lora {
    /// Every adapter of the config (and weight it trains whole) is there,
    /// with nothing else: the linears it adapts in `cfg`.
    pub fn check(&self, cfg: &ModelConfig) -> Result<Vec<AdaptedLinear>> {
        let adapted = self.config.adapted(cfg)?;
        let saved = self.config.saved_weights(cfg)?;
        let expected: std::collections::BTreeSet<String> = adapted
            .iter()
            .flat_map(|l| {
                let magnitude = self.config.use_dora.then(|| l.magnitude());
                [l.lora_a(), l.lora_b()].into_iter().chain(magnitude)
            })
            .chain(saved.iter().map(|(name, _)| name.clone()))
            .collect();
        if let Some(extra) = self.adapters.names().find(|n| !expected.contains(*n)) {
            return Err(ModelError::Invalid(format!(
                "adapter tensor `{extra}` belongs to no linear the LoRA config targets"
            )));
        }
        for name in expected {
            if self.adapters.get(&name).is_none() {
                return Err(ModelError::MissingTensor {
                    name,
                    location: self.adapters.location().to_string(),
                });
            }
        }
        for (name, shape) in &saved {
            self.adapters.require(name, shape)?;
        }
        Ok(adapted)
    }

    /// `base` with the weights trained whole (`modules_to_save`) in place of
    /// its own: the weights the adapted model runs on.
    pub fn overlay(&self, cfg: &ModelConfig, base: &Weights) -> Result<Weights> {
        let mut weights = base.clone();
        for (name, shape) in self.config.saved_weights(cfg)? {
            let saved = self.adapters.require(&name, &shape)?.clone();
            weights.insert(name, saved);
        }
        Ok(weights)
    }

    /// PEFT's `merge_and_unload` on folders: the model folder `base` with the
    /// PEFT adapter folder `adapter` merged in, written to `out` as a model
    /// folder (config and tokenizer from `base`, weights in the dtype its
    /// config.json names), for vLLM or Tandem's rollout server to serve.
    pub fn merge_folders(base: &Path, adapter: &Path, out: &Path) -> Result<ModelConfig> {
        let cfg = ModelConfig::from_dir(base)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(base)?;
        let dtype = crate::pretrained::config_dtype(&cfg).unwrap_or(DType::F32);
        let mut weights = Weights::load(base, &Device::Cpu, DType::F32)?;
        let lora = Lora::load_peft(adapter, &Device::Cpu, DType::F32)?;
        lora.check(&cfg)?;
        for (name, merged) in lora.config.merge(&cfg, &weights, &lora.adapters)? {
            weights.insert(name, merged);
        }
        crate::pretrained::save_pretrained(out, &cfg, &weights.to_dtype(dtype)?, &tokenizer)?;
        Ok(cfg)
    }

    /// Writes PEFT's adapter folder: `adapter_config.json` and
    /// `adapter_model.safetensors` (names prefixed `base_model.model.`), which
    /// `PeftModel.from_pretrained(base, dir)` loads.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors: BTreeMap<String, Tensor> = self
            .adapters
            .iter()
            .map(|(k, t)| (format!("{PEFT_PREFIX}{k}"), t.clone()))
            .collect();
        Weights::new(tensors).save(&dir.join(ADAPTER_WEIGHTS_FILE))?;
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.config.peft_config(base_model))
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    }

    /// Reads a PEFT adapter folder written by [`Lora::save_peft`] (or by PEFT
    /// for one of the supported shapes), converted to `dtype` on `device`.
    pub fn load_peft(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        let config = LoraConfig::from_peft_config(&v, &path)?;
        let file = dir.join(ADAPTER_WEIGHTS_FILE);
        let loaded = Weights::load_files(std::slice::from_ref(&file), dir, device, dtype)?;
        let tensors = loaded
            .iter()
            .map(|(k, t)| {
                // PEFT names an adapter with its adapter name inside
                // (`lora_A.default.weight`, DoRA's
                // `lora_magnitude_vector.default.weight`) in memory, without
                // it (and without the magnitude's `.weight`) on disk.
                let k = k.strip_prefix(PEFT_PREFIX).unwrap_or(k);
                let k = k
                    .replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B.")
                    .replace(".modules_to_save.default.", ".");
                let k = match k.strip_suffix(".lora_magnitude_vector.default.weight") {
                    Some(module) => format!("{module}.lora_magnitude_vector"),
                    None => k,
                };
                (k, t.clone())
            })
            .collect();
        Ok(Lora {
            config,
            adapters: Weights::new(tensors),
        })
    }
}
