//! The optimizer side of a step: AdamW over named candle `Var`s, the
//! learning-rate schedule, and global-norm gradient clipping, with the names
//! and semantics of PyTorch and transformers' `Trainer` (which TRL uses).
//!
//! This AdamW exists because candle_nn's `AdamW` does not expose its state
//! (step, first and second moments): a checkpoint could not save it, and a
//! resumed run could not continue bit for bit. Here the state is saved to
//! `optimizer.safetensors` + `optimizer.json` and loaded back exactly.
//!
//! The update is `torch.optim.AdamW` (`foreach=False`, `amsgrad=False`), per
//! parameter with gradient `g` at its step `t` (counted from 1):
//! ```text
//! p  <- p * (1 - lr * weight_decay)            (decoupled weight decay)
//! m  <- beta1 * m + (1 - beta1) * g
//! v  <- beta2 * v + (1 - beta2) * g^2
//! p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//! (eps outside the square root). Which parameters decay: as transformers'
//! `Trainer.get_decay_parameter_names`, every parameter except biases and
//! normalisation weights — see [`uses_weight_decay`].
//!
//! bf16/f16 parameters get f32 master weights (mixed precision, as
//! DeepSpeed and torch AMP keep them): the moments and the update are f32,
//! and the parameter is the master rounded to its dtype. Updating bf16
//! directly would round away every step smaller than 2^-8 of a weight,
//! which is most steps at RL learning rates (1e-6). The master is saved with
//! the moments, so a resumed run continues exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// File names of the optimizer state inside a checkpoint folder.
pub const OPTIMIZER_TENSORS_FILE: &str = "optimizer.safetensors";
pub const OPTIMIZER_STATE_FILE: &str = "optimizer.json";
const STATE_FORMAT: &str = "tandem-adamw";
const STATE_VERSION: u32 = 1;

/// What went wrong in the optimizer, its schedule or its state files.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer config: `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("optimizer: parameter `{name}`: {message}")]
    Param { name: String, message: String },
    #[error("optimizer state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = OptimError> = std::result::Result<T, E>;

fn config_err(field: &str, message: impl Into<String>) -> OptimError {
    OptimError::Config {
        field: field.to_string(),
        message: message.into(),
    }
}

/// transformers' `SchedulerType` names. Warmup applies to each: unlike
/// transformers, whose `constant` silently ignores warmup, Tandem's
/// `constant` is transformers' `constant_with_warmup` (the same when there is
/// no warmup), and `constant_with_warmup` is accepted as the same schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Linear warmup from 0, then the learning rate.
    Constant,
    /// The same as `constant`.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to 0 at `max_steps`.
    Linear,
    /// Linear warmup, then half a cosine down to 0 at `max_steps`.
    Cosine,
    /// The same cosine down to `min_lr_rate` times the rate.
    CosineWithMinLr,
}

/// The optimizer knobs of a recipe, with TRL `GRPOConfig` / transformers
/// `TrainingArguments` names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Peak learning rate (TRL GRPOConfig: 1e-6).
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Decoupled weight decay, applied to the parameters of [`uses_weight_decay`].
    pub weight_decay: f64,
    pub lr_scheduler_type: LrSchedulerType,
    /// Warmup steps; when 0, `ceil(warmup_ratio * max_steps)` (as
    /// transformers: `warmup_steps` wins when both are set).
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    /// The floor of `cosine_with_min_lr`, a fraction of `learning_rate`
    /// (transformers' `min_lr_rate`).
    pub min_lr_rate: f64,
    /// Global gradient norm clip; 0 disables clipping (the norm is still logged).
    pub max_grad_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            min_lr_rate: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(config_err(
                    field,
                    format!("must be a finite number >= 0, got {v}"),
                ))
            }
        };
        finite_nonneg("learning_rate", self.learning_rate)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("max_grad_norm", self.max_grad_norm)?;
        for (field, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(config_err(field, format!("must be in [0, 1), got {b}")));
            }
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return Err(config_err(
                "adam_epsilon",
                format!("must be > 0, got {}", self.adam_epsilon),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_rate) {
            return Err(config_err(
                "min_lr_rate",
                format!("must be in [0, 1], got {}", self.min_lr_rate),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(config_err(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
            ));
        }
        Ok(())
    }

    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

// ---------------------------------------------------------------- schedule

/// The learning rate as a pure function of the optimizer step, as
/// transformers' `get_scheduler`: the `k`-th optimizer step (from 0) uses
/// `lr_at(k)`, so with warmup the first step's rate is 0, as in `Trainer`.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub kind: LrSchedulerType,
    pub warmup_steps: usize,
    pub max_steps: usize,
    pub min_lr_rate: f64,
}

impl LrSchedule {
    pub fn new(config: &OptimizerConfig, max_steps: usize) -> Result<Self> {
        config.validate()?;
        let warmup_steps = if config.warmup_steps > 0 {
            config.warmup_steps
        } else {
            (config.warmup_ratio * max_steps as f64).ceil() as usize
        };
        if max_steps == 0 && config.lr_scheduler_type != LrSchedulerType::Constant {
            return Err(config_err(
                "max_steps",
                "must be positive for a decaying or warmup schedule",
            ));
        }
        Ok(LrSchedule {
            base_lr: config.learning_rate,
            kind: config.lr_scheduler_type,
            warmup_steps,
            max_steps,
            min_lr_rate: config.min_lr_rate,
        })
    }

    /// The multiplier of the base rate at `step` (transformers' `lr_lambda`).
    pub fn factor_at(&self, step: usize) -> f64 {
        let (s, w, total) = (step as f64, self.warmup_steps as f64, self.max_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            LrSchedulerType::Constant | LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((total - s) / (total - w).max(1.0)).max(0.0),
            LrSchedulerType::Cosine | LrSchedulerType::CosineWithMinLr => {
                // Progress is clamped at 1: past max_steps the rate stays at
                // its floor (transformers' cosine would rise again).
                let progress = ((s - w) / (total - w).max(1.0)).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                let floor = match self.kind {
                    LrSchedulerType::CosineWithMinLr => self.min_lr_rate,
                    _ => 0.0,
                };
                (cosine * (1.0 - floor) + floor).max(0.0)
            }
        }
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor_at(step)
    }
}

// ---------------------------------------------------------------- clipping

/// Clips gradients by their global L2 norm, as `torch.nn.utils.clip_grad_norm_`:
/// the norm is taken over all tensors together, and when it exceeds
/// `max_norm` every gradient is scaled by `max_norm / (norm + 1e-6)`.
/// Returns the norm before clipping. A non-finite norm is returned as it is
/// and nothing is scaled: the caller skips the step. `max_norm <= 0` (or
/// NaN) only measures.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let total = global_norm(grads)?;
    let clips = max_norm > 0.0;
    if !total.is_finite() || !clips {
        return Ok(total);
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(total)
}

/// The L2 norm of all `grads` together (per-tensor sums of squares in at
/// least f32, combined in f64).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    for g in grads {
        let g = match g.dtype() {
            DType::F64 | DType::F32 => g.clone(),
            _ => g.to_dtype(DType::F32)?,
        };
        sum_sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum_sq.sqrt())
}

// ---------------------------------------------------------------- AdamW

/// Whether a parameter gets weight decay, as transformers' `Trainer`: not
/// biases, not normalisation weights (names containing `bias`, `layernorm`,
/// `rmsnorm`, a `norm` path segment or a `_norm` suffix, case-insensitive),
/// everything else (embeddings included).
pub fn uses_weight_decay(name: &str) -> bool {
    let name = name.to_lowercase();
    let is_norm = name.contains("layernorm")
        || name.contains("rmsnorm")
        || name
            .split('.')
            .any(|segment| segment == "norm" || segment.ends_with("_norm"));
    !(name.contains("bias") || is_norm)
}

/// AdamW hyper-parameters (the learning rate comes with each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        OptimizerConfig::default().adamw()
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// `None` until the parameter's first gradient (as torch's lazy state).
    state: Option<Moments>,
}

struct Moments {
    /// Optimizer steps taken by this parameter (torch's per-parameter `step`).
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The f32 master of a bf16/f16 parameter.
    master: Option<Tensor>,
}

/// The dtype of the moments (and master) of a parameter of dtype `d`.
fn state_dtype(d: DType) -> DType {
    match d {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// AdamW over named `Var`s with saveable state.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u32,
    config: AdamWConfig,
    params: Vec<ParamStateEntry>,
}

#[derive(Serialize, Deserialize)]
struct ParamStateEntry {
    name: String,
    step: u64,
    weight_decay: bool,
}

impl AdamW {
    /// `params` in a fixed order (the order of gradients in [`AdamW::step`]);
    /// names must be unique.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        for (field, b) in [("adam_beta1", config.beta1), ("adam_beta2", config.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(config_err(field, format!("must be in [0, 1), got {b}")));
            }
        }
        if !(config.eps > 0.0 && config.eps.is_finite()) {
            return Err(config_err("adam_epsilon", "must be > 0"));
        }
        if !(config.weight_decay >= 0.0 && config.weight_decay.is_finite()) {
            return Err(config_err("weight_decay", "must be >= 0"));
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::Param {
                    name,
                    message: "appears twice".into(),
                });
            }
            out.push(Param {
                decay: uses_weight_decay(&name),
                name,
                var,
                state: None,
            });
        }
        Ok(AdamW {
            config,
            params: out,
        })
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Parameter names in order.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// The `Var`s in order.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// Whether `name` gets weight decay.
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.params.iter().find(|p| p.name == name).map(|p| p.decay)
    }

    /// Steps taken (the largest per-parameter step).
    pub fn step_count(&self) -> u64 {
        self.params
            .iter()
            .filter_map(|p| p.state.as_ref().map(|s| s.step))
            .max()
            .unwrap_or(0)
    }

    /// The gradients of the parameters in order, `None` where `store` has none.
    pub fn gradients(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|p| store.get(p.var.as_tensor()).cloned())
            .collect()
    }

    /// One update with `grads[i]` the gradient of parameter `i` (after the
    /// all-reduce and clipping).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(config_err(
                "gradients",
                format!(
                    "{} gradients for {} parameters",
                    grads.len(),
                    self.params.len()
                ),
            ));
        }
        self.update(grads.iter().map(Some).collect(), lr)
    }

    /// One update from a `GradStore`; parameters without a gradient are left
    /// alone and their step does not advance (torch skips `grad is None`).
    pub fn step_store(&mut self, store: &GradStore, lr: f64) -> Result<()> {
        let grads = self.gradients(store);
        self.update(grads.iter().map(Option::as_ref).collect(), lr)
    }

    fn update(&mut self, grads: Vec<Option<&Tensor>>, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(config_err(
                "learning_rate",
                format!("must be finite and >= 0, got {lr}"),
            ));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let param = p.var.as_tensor();
            if g.shape() != param.shape() {
                return Err(OptimError::Param {
                    name: p.name.clone(),
                    message: format!(
                        "gradient shape {:?} != parameter shape {:?}",
                        g.dims(),
                        param.dims()
                    ),
                });
            }
            let sd = state_dtype(param.dtype());
            let g = g.to_dtype(sd)?.to_device(param.device())?;
            let state = match p.state.take() {
                Some(s) => s,
                None => Moments {
                    step: 0,
                    exp_avg: param.zeros_like()?.to_dtype(sd)?,
                    exp_avg_sq: param.zeros_like()?.to_dtype(sd)?,
                    master: (sd != param.dtype())
                        .then(|| param.to_dtype(sd))
                        .transpose()?,
                },
            };
            // The weights the update applies to: the master when there is one.
            let weights = state.master.clone().unwrap_or_else(|| param.clone());
            let step = state.step + 1;
            let exp_avg = (state.exp_avg.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            let exp_avg_sq =
                (state.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let bias_correction1 = 1.0 - beta1.powf(step as f64);
            let bias_correction2_sqrt = (1.0 - beta2.powf(step as f64)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = exp_avg_sq
                .sqrt()?
                .affine(1.0 / bias_correction2_sqrt, eps)?;
            let decayed = if p.decay && weight_decay > 0.0 {
                weights.affine(1.0 - lr * weight_decay, 0.0)?
            } else {
                weights
            };
            let new = (decayed - (exp_avg.div(&denom)?.affine(step_size, 0.0))?)?;
            let master = if state.master.is_some() {
                p.var.set(&new.to_dtype(param.dtype())?)?;
                Some(new)
            } else {
                p.var.set(&new)?;
                None
            };
            p.state = Some(Moments {
                step,
                exp_avg,
                exp_avg_sq,
                master,
            });
        }
        Ok(())
    }

    /// Writes [`OPTIMIZER_TENSORS_FILE`] (moments, named `<param>.exp_avg`
    /// and `<param>.exp_avg_sq`, and `<param>.master` for bf16/f16) and [`OPTIMIZER_STATE_FILE`] (steps, config)
    /// into `dir`, each through a temporary file and a rename.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let state_err = |path: &Path, message: String| OptimError::State {
            path: path.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| state_err(dir, format!("creating the folder: {e}")))?;
        let mut tensors = HashMap::new();
        let mut entries = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let step = match &p.state {
                Some(s) => {
                    tensors.insert(format!("{}.exp_avg", p.name), s.exp_avg.clone());
                    tensors.insert(format!("{}.exp_avg_sq", p.name), s.exp_avg_sq.clone());
                    if let Some(m) = &s.master {
                        tensors.insert(format!("{}.master", p.name), m.clone());
                    }
                    s.step
                }
                None => 0,
            };
            entries.push(ParamStateEntry {
                name: p.name.clone(),
                step,
                weight_decay: p.decay,
            });
        }
        let tensors_path = dir.join(OPTIMIZER_TENSORS_FILE);
        let tmp = dir.join(format!("{OPTIMIZER_TENSORS_FILE}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp)
            .map_err(|e| state_err(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, &tensors_path)
            .map_err(|e| state_err(&tensors_path, e.to_string()))?;
        let file = StateFile {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            config: self.config,
            params: entries,
        };
        let json_path = dir.join(OPTIMIZER_STATE_FILE);
        let tmp = dir.join(format!("{OPTIMIZER_STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| state_err(&json_path, e.to_string()))?;
        std::fs::write(&tmp, text).map_err(|e| state_err(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, &json_path).map_err(|e| state_err(&json_path, e.to_string()))?;
        Ok(())
    }

    /// Loads state written by [`AdamW::save`]. The parameter names must be
    /// the same; every moment must have its parameter's shape, and f32 for a
    /// bf16/f16 parameter (its dtype otherwise). The
    /// saved hyper-parameters are informative: this optimizer's own are kept
    /// (a resumed recipe may change them on purpose).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let json_path = dir.join(OPTIMIZER_STATE_FILE);
        let tensors_path = dir.join(OPTIMIZER_TENSORS_FILE);
        let json_err = |message: String| OptimError::State {
            path: json_path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&json_path).map_err(|e| json_err(e.to_string()))?;
        let file: StateFile = serde_json::from_str(&text).map_err(|e| json_err(e.to_string()))?;
        if file.format != STATE_FORMAT || file.version != STATE_VERSION {
            return Err(json_err(format!(
                "format {:?} version {}, expected {STATE_FORMAT:?} version {STATE_VERSION}",
                file.format, file.version
            )));
        }
        let saved: Vec<&str> = file.params.iter().map(|e| e.name.as_str()).collect();
        if saved != self.names() {
            let mine: std::collections::HashSet<&str> = self.names().into_iter().collect();
            let theirs: std::collections::HashSet<&str> = saved.iter().copied().collect();
            let missing: Vec<_> = mine.difference(&theirs).collect();
            let extra: Vec<_> = theirs.difference(&mine).collect();
            return Err(json_err(format!(
                "parameters differ from the model's: missing {missing:?}, unknown {extra:?} (or a different order)"
            )));
        }
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut tensors = candle_core::safetensors::load(&tensors_path, &device).map_err(|e| {
            OptimError::State {
                path: tensors_path.clone(),
                message: e.to_string(),
            }
        })?;
        let mut states = Vec::with_capacity(self.params.len());
        for (p, entry) in self.params.iter().zip(&file.params) {
            if entry.step == 0 {
                states.push(None);
                continue;
            }
            let mut moment = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.remove(&key).ok_or_else(|| OptimError::State {
                    path: tensors_path.clone(),
                    message: format!("`{key}` is missing"),
                })?;
                let param = p.var.as_tensor();
                let sd = state_dtype(param.dtype());
                if t.shape() != param.shape() || t.dtype() != sd {
                    return Err(OptimError::State {
                        path: tensors_path.clone(),
                        message: format!(
                            "`{key}` is {:?} {:?}, expected {sd:?} {:?} for a {:?} parameter",
                            t.dtype(),
                            t.dims(),
                            param.dims(),
                            param.dtype(),
                        ),
                    });
                }
                Ok(t.to_device(param.device())?)
            };
            let low_precision = state_dtype(p.var.dtype()) != p.var.dtype();
            states.push(Some(Moments {
                step: entry.step,
                exp_avg: moment("exp_avg")?,
                exp_avg_sq: moment("exp_avg_sq")?,
                master: low_precision.then(|| moment("master")).transpose()?,
            }));
        }
        for (p, s) in self.params.iter_mut().zip(states) {
            p.state = s;
        }
        Ok(())
    }
}
