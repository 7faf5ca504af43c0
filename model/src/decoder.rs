//! The causal decoder LM (Qwen2, Llama, Qwen3) with Hugging Face tensor names.
//!
//! Two forward paths share every weight and every formula:
//! - [`CausalLM::forward`] / [`CausalLM::completion_logprobs`]: full sequences,
//!   differentiable with respect to every parameter (built from candle ops
//!   that have a backward and from the ops of the `autograd` module, whose
//!   backward makes only the gradients that are needed), for the learner;
//!   [`CausalLM::checkpointed_logprobs`] is the same with the logits (and,
//!   with gradient checkpointing, the decoder layers) recomputed in the
//!   backward pass;
//! - [`CausalLM::forward_cached`]: appends tokens of many sequences to a
//!   [`KvCache`] in one batched forward (prefill and decode alike), for the
//!   rollout server. It may use candle's fused rms_norm and softmax, which
//!   have no backward but agree with the differentiable ops to ~1e-6 (the
//!   rotary embedding is the same fused kernel in both).
//!
//! Positions count only real tokens (`cumsum(attention_mask) - 1`), so a
//! left-padded sequence gets the same log-probs as the sequence alone.

use candle_core::{D, DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::autograd::{
    ConstOperand, FrozenLinear, FrozenLinearWithLora, Rope, apply, dropout_mask, splitmix64,
};
use crate::config::{Llama3RopeScaling, ModelConfig, ModelHead};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::logprobs::{self, TokenLogProbs};
use crate::lora::Lora;
use crate::weights::Weights;

/// Added to the attention scores of masked keys. Large and finite: `-inf`
/// turns a fully masked row (a padding query) into NaN.
const MASKED: f32 = -1e9;

/// Upper bound on elements of one chunk of logits in the log-prob path
/// (16M f32 = 64 MiB): real vocabularies are 150k wide.
const LOGITS_CHUNK_ELEMENTS: usize = 1 << 24;

#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        if crate::fused::applies(x) {
            let op = crate::fused::RmsNorm {
                eps: self.eps as f32,
            };
            return Ok(x.contiguous()?.apply_op2(&self.weight, op)?);
        }
        // As transformers: the variance in (at least) f32, then back to the
        // input dtype.
        let dtype = x.dtype();
        let xf = logprobs::upcast(x)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        let normed = normed.to_dtype(dtype)?;
        if normed.track_op() && !self.weight.is_variable() {
            // A frozen weight (LoRA): no gradient for it is made or kept.
            return Ok(apply(&normed, ConstOperand::mul(&self.weight))?);
        }
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// cos / sin of every position, `[max_position_embeddings, head_dim / 2]`, f32.
#[derive(Clone)]
struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
                match &cfg.rope_scaling {
                    Some(s) => llama3_scale(f, s),
                    None => f,
                }
            })
            .map(|f| f as f32)
            .collect();
        let n = cfg.max_position_embeddings;
        let positions: Vec<f32> = (0..n).map(|p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (n, 1), device)?;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        // f32 products, as transformers computes them.
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(RotaryTables {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// cos and sin at `positions` (u32 `[B, T]`), as `[B, T, head_dim / 2]` in `dtype`.
    fn at(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let pick = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .index_select(&flat, 0)?
                .reshape((b, t, half))?
                .to_dtype(dtype)?)
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// Llama 3.x: long wavelengths are slowed by `factor`, short ones kept, and the
/// band between interpolated (transformers' `_compute_llama3_parameters`).
fn llama3_scale(inv_freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_len = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_len / s.low_freq_factor;
    let high_freq_wavelen = old_len / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

/// Rotary embedding, transformers' `rotate_half` convention.
/// `x`: `[B, heads, T, d]`; `cos`, `sin`: `[B, T, d/2]`.
///
/// candle's fused kernel in both paths; where `x` needs a gradient it runs
/// as [`Rope`], whose backward is the inverse rotation, so the graph keeps
/// `x` alone (spelt out in candle's ops, the rotation kept its halves, four
/// products and a cat per call, plus a gradient of the tables' size that
/// candle makes for every broadcast of them and never frees).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        return Ok(apply(
            &x,
            Rope {
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
            },
        )?);
    }
    Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?)
}

/// `y = x W^T + b`, the weight in Hugging Face's `[out, in]` layout.
///
/// A model for inference on the CPU also keeps `W^T` contiguous (its weights
/// are plain tensors, not training variables): gemm multiplies by a
/// transposed, strided right-hand side several times slower at decode's
/// row counts (a `[8, 512] x [512, 1536]` product: 3x). Training keeps the
/// one weight, so gradients reach the variable, and at its row counts the
/// per-step transpose would cost what it saves. On CUDA cuBLAS takes the
/// transpose as it is.
#[derive(Clone)]
struct Linear {
    weight: Tensor,
    weight_t: Option<Tensor>,
    bias: Option<Tensor>,
    /// A LoRA adapter: `+ s B A x` (see [`crate::lora`]).
    lora: Option<LoraPair>,
    /// A hash of the linear's name: its dropout masks differ from the other
    /// linears' under one seed.
    site: u64,
}

#[derive(Clone)]
struct LoraPair {
    /// `[r, in]`
    a: Tensor,
    /// `[out, r]`
    b: Tensor,
    scaling: f64,
    /// PEFT's `lora_dropout` on the adapter's input, in training forwards.
    dropout: f64,
    /// DoRA's magnitude `m`, `[out]` (see [`crate::lora`]).
    magnitude: Option<Tensor>,
}

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight_t = if weight.device().is_cpu() && !weight.is_variable() {
            Some(weight.t()?.contiguous()?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            weight_t,
            bias,
            lora: None,
            site: 0,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_dropped(x, None)
    }

    /// The linear; with a `dropout` seed (a training forward,
    /// [`CausalLM::with_dropout`]) its LoRA adapter's input is dropped out
    /// with the mask that seed and this linear's name give.
    fn forward_dropped(&self, x: &Tensor, dropout: Option<u64>) -> Result<Tensor> {
        if self.lora.is_none() && self.weight.is_variable() && crate::fused::applies(x) {
            // A trainable weight on the CPU: one graph node (see fused::Linear).
            let y = x
                .contiguous()?
                .apply_op2(&self.weight, crate::fused::Linear)?;
            return self.add_bias(y);
        }
        // One 2-D product over all leading dimensions.
        let dims = x.dims();
        let (lead, k) = dims.split_at(dims.len().saturating_sub(1));
        let rows: usize = lead.iter().product();
        let x2 = x
            .contiguous()?
            .reshape((rows, k.first().copied().unwrap_or(1)))?;
        let frozen = self.frozen();
        let y = match &self.lora {
            Some(l) if l.magnitude.is_some() => self.dora(&x2, l, dropout)?,
            Some(l) => {
                let dropout_mask = self.adapter_dropout_mask(&x2, l, dropout)?;
                x2.apply_op3(
                    &l.a,
                    &l.b,
                    FrozenLinearWithLora {
                        frozen,
                        scaling: l.scaling,
                        dropout_mask,
                    },
                )?
            }
            None if x2.track_op() && !self.weight.is_variable() => apply(&x2, frozen)?,
            None => frozen.product(&x2)?,
        };
        let mut shape = lead.to_vec();
        shape.push(y.dim(1)?);
        self.add_bias(y.reshape(shape)?)
    }

    /// The frozen weight as the op that back-propagates only into its input.
    fn frozen(&self) -> FrozenLinear {
        FrozenLinear {
            weight: self.weight.clone(),
            weight_t: self.weight_t.clone(),
        }
    }

    /// LoRA dropout's mask on the adapter's `[rows, in]` input in a training
    /// forward (a `dropout` seed): drawn from the seed and this linear's
    /// name; none otherwise or at `lora_dropout` 0.
    fn adapter_dropout_mask(
        &self,
        x2: &Tensor,
        l: &LoraPair,
        dropout: Option<u64>,
    ) -> Result<Option<Tensor>> {
        Ok(match dropout {
            Some(seed) if l.dropout > 0.0 => Some(dropout_mask(
                x2.dim(0)?,
                x2.dim(1)?,
                l.dropout,
                splitmix64(seed ^ self.site),
                x2.device(),
                x2.dtype(),
            )?),
            _ => None,
        })
    }

    /// DoRA as PEFT computes it, on `[rows, in]` inputs: `W x + (k - 1) W
    /// x' + k s B A x'`, with `k = m / ||W + s B A||` per output row (the
    /// norms constant in the backward pass) and `x'` the adapter's input
    /// (`x` dropped out in a training forward, else `x`, where the whole
    /// is `k (W + s B A) x`, what the merged weight computes).
    fn dora(&self, x2: &Tensor, l: &LoraPair, dropout: Option<u64>) -> Result<Tensor> {
        let Some(m) = &l.magnitude else {
            return Err(ModelError::Invalid(
                "DoRA forward of a linear without a magnitude".into(),
            ));
        };
        // The norms as a constant operand: candle would keep a gradient
        // for them to the end of the backward pass.
        let norm = crate::lora::dora_weight_norm(&self.weight, &l.a, &l.b, l.scaling)?;
        let k = apply(m, ConstOperand::mul(&norm.to_dtype(m.dtype())?.recip()?))?.unsqueeze(0)?;
        let mask = self.adapter_dropout_mask(x2, l, dropout)?;
        let base = |x: &Tensor| -> Result<Tensor> {
            Ok(if x.track_op() {
                apply(x, self.frozen())?
            } else {
                self.frozen().product(x)?
            })
        };
        let with_lora = x2.apply_op3(
            &l.a,
            &l.b,
            FrozenLinearWithLora {
                frozen: self.frozen(),
                scaling: l.scaling,
                dropout_mask: mask.clone(),
            },
        )?;
        Ok(match mask {
            // k (W x + s B A x)
            None => with_lora.broadcast_mul(&k)?,
            // k (W x' + s B A x') + (W x - W x'); a constant term (the
            // first layer's input takes no gradient) as a constant operand.
            Some(mask) => {
                let dropped = base(&apply(x2, ConstOperand::mul(&mask))?)?;
                let plus = |y: Tensor, c: Tensor| -> Result<Tensor> {
                    Ok(if c.track_op() {
                        (y + c)?
                    } else {
                        apply(&y, ConstOperand::add(&c))?
                    })
                };
                let y = plus(with_lora, dropped.neg()?)?.broadcast_mul(&k)?;
                plus(y, (base(x2)? - dropped)?)?
            }
        })
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) if y.track_op() && !b.is_variable() => apply(&y, ConstOperand::add(b))?,
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

fn linear(
    weights: &Weights,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
    lora: Option<&Lora>,
) -> Result<Linear> {
    let w = weights
        .require(&format!("{prefix}.weight"), &[out, inp])?
        .clone();
    let b = if bias {
        Some(weights.require(&format!("{prefix}.bias"), &[out])?.clone())
    } else {
        None
    };
    let mut linear = Linear::new(w, b)?;
    // FNV-1a of the name.
    linear.site = prefix.bytes().fold(0xcbf2_9ce4_8422_2325, |h, c| {
        (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
    });
    if let Some(lora) = lora {
        let (a, b) = (
            lora.adapters.get(&format!("{prefix}.lora_A.weight")),
            lora.adapters.get(&format!("{prefix}.lora_B.weight")),
        );
        if a.is_some() || b.is_some() {
            let r = lora.config.r;
            linear.lora = Some(LoraPair {
                a: lora
                    .adapters
                    .require(&format!("{prefix}.lora_A.weight"), &[r, inp])?
                    .clone(),
                b: lora
                    .adapters
                    .require(&format!("{prefix}.lora_B.weight"), &[out, r])?
                    .clone(),
                scaling: lora.config.scaling(),
                dropout: lora.config.dropout,
                magnitude: if lora.config.use_dora {
                    Some(
                        lora.adapters
                            .require(&format!("{prefix}.lora_magnitude_vector"), &[out])?
                            .clone(),
                    )
                } else {
                    None
                },
            });
        }
    }
    Ok(linear)
}

fn norm(weights: &Weights, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: weights.require(name, &[size])?.clone(),
        eps,
    })
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Queries `[B, heads, T, d]`, keys and values `[B, kv_heads, T, d]`, with
    /// q/k norms and rotary embedding applied.
    fn qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        fused: bool,
        dropout: Option<u64>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let shape = |heads| (b, t, heads, self.head_dim);
        let mut q = self
            .q_proj
            .forward_dropped(x, dropout)?
            .reshape(shape(self.num_heads))?;
        let mut k = self
            .k_proj
            .forward_dropped(x, dropout)?
            .reshape(shape(self.num_kv_heads))?;
        let v = self
            .v_proj
            .forward_dropped(x, dropout)?
            .reshape(shape(self.num_kv_heads))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q, fused)?;
            k = kn.forward(&k, fused)?;
        }
        let q = apply_rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let k = apply_rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// The projections, [`crate::fused::Attention`] and the output
    /// projection, over whole sequences on the CPU (no q/k norms).
    fn attend_fused(
        &self,
        x: &Tensor,
        ctx: &SequenceContext,
        dropout: Option<u64>,
    ) -> Result<Tensor> {
        let q = self.q_proj.forward_dropped(x, dropout)?;
        let k = self.k_proj.forward_dropped(x, dropout)?;
        let v = self.v_proj.forward_dropped(x, dropout)?;
        let op = crate::fused::Attention::new(
            (self.num_heads, self.num_kv_heads, self.head_dim),
            &ctx.cos,
            &ctx.sin,
            &ctx.attn_mask,
        )?;
        let out = q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
        self.o_proj.forward_dropped(&out, dropout)
    }

    /// Scaled dot-product attention with an additive mask `[B, 1, Tq, Tk]` (f32),
    /// then the output projection. Returns `[B, Tq, hidden]`.
    fn attend(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        mask: &Tensor,
        fused: bool,
        dropout: Option<u64>,
    ) -> Result<Tensor> {
        let (b, heads, tq, d) = q.dims4()?;
        let (kvh, tk) = (self.num_kv_heads, k.dim(2)?);
        let n_rep = heads / kvh;
        // Grouped-query attention without repeating K and V: head
        // g * n_rep + r reads kv head g, so each group's queries are stacked
        // as rows of one product with that kv head ([B, kvh, n_rep * Tq, d]),
        // n_rep times fewer (and larger) products and no copies of K and V.
        let q = q.contiguous()?.reshape((b, kvh, n_rep * tq, d))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = q.matmul(&k.t()?)?.reshape((b, heads, tq, tk))?;
        let probs = if !fused && crate::fused::applies(&scores) {
            let op = crate::fused::AttentionSoftmax {
                scale: scale as f32,
                mask: mask.to_dtype(DType::F32)?.contiguous()?,
            };
            scores.contiguous()?.apply_op1(op)?
        } else {
            let scores = logprobs::upcast(&(scores * scale)?)?;
            let mask = mask.to_dtype(scores.dtype())?;
            let scores = if scores.track_op() {
                apply(&scores.contiguous()?, ConstOperand::add(&mask))?
            } else {
                scores.broadcast_add(&mask)?
            };
            if fused {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            }
        };
        let out = probs
            .to_dtype(q.dtype())?
            .reshape((b, kvh, n_rep * tq, tk))?
            .matmul(&v)?
            .reshape((b, heads, tq, d))?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, tq, self.num_heads * self.head_dim))?;
        self.o_proj.forward_dropped(&out, dropout)
    }
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, dropout: Option<u64>) -> Result<Tensor> {
        let gate = self.gate_proj.forward_dropped(x, dropout)?;
        let up = self.up_proj.forward_dropped(x, dropout)?;
        let act = if crate::fused::applies(&gate) {
            gate.contiguous()?
                .apply_op2(&up.contiguous()?, crate::fused::SwiGlu)?
        } else {
            (candle_nn::ops::silu(&gate)? * up)?
        };
        self.down_proj.forward_dropped(&act, dropout)
    }
}

#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(cfg: &ModelConfig, w: &Weights, l: usize, lora: Option<&Lora>) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q = cfg.num_attention_heads * d;
        let kv = cfg.num_key_value_heads * d;
        let eps = cfg.rms_norm_eps;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(norm(w, &format!("{p}.self_attn.q_norm.weight"), d, eps)?),
                Some(norm(w, &format!("{p}.self_attn.k_norm.weight"), d, eps)?),
            )
        } else {
            (None, None)
        };
        let i = cfg.intermediate_size;
        Ok(DecoderLayer {
            input_layernorm: norm(w, &format!("{p}.input_layernorm.weight"), h, eps)?,
            self_attn: Attention {
                q_proj: linear(
                    w,
                    &format!("{p}.self_attn.q_proj"),
                    q,
                    h,
                    cfg.qkv_bias,
                    lora,
                )?,
                k_proj: linear(
                    w,
                    &format!("{p}.self_attn.k_proj"),
                    kv,
                    h,
                    cfg.qkv_bias,
                    lora,
                )?,
                v_proj: linear(
                    w,
                    &format!("{p}.self_attn.v_proj"),
                    kv,
                    h,
                    cfg.qkv_bias,
                    lora,
                )?,
                o_proj: linear(w, &format!("{p}.self_attn.o_proj"), h, q, cfg.o_bias, lora)?,
                q_norm,
                k_norm,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: d,
            },
            post_attention_layernorm: norm(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
            )?,
            mlp: Mlp {
                gate_proj: linear(w, &format!("{p}.mlp.gate_proj"), i, h, cfg.mlp_bias, lora)?,
                up_proj: linear(w, &format!("{p}.mlp.up_proj"), i, h, cfg.mlp_bias, lora)?,
                down_proj: linear(w, &format!("{p}.mlp.down_proj"), h, i, cfg.mlp_bias, lora)?,
            },
        })
    }

    /// The layer over whole sequences (training and scoring: the
    /// differentiable ops only).
    fn forward_sequence(&self, x: &Tensor, ctx: &SequenceContext) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x, false)?;
        // Each linear's name (its `site`) tells its masks apart.
        let dropout = ctx.dropout;
        let a = &self.self_attn;
        let attn = if crate::fused::applies(&h) && a.q_norm.is_none() {
            a.attend_fused(&h, ctx, dropout)?
        } else {
            let (q, k, v) = a.qkv(&h, &ctx.cos, &ctx.sin, false, dropout)?;
            a.attend(&q, k, v, &ctx.attn_mask, false, dropout)?
        };
        self.finish(x, attn, false, dropout)
    }

    /// Every parameter tensor of the layer.
    fn parameters(&self) -> Vec<&Tensor> {
        let a = &self.self_attn;
        let m = &self.mlp;
        let mut out = vec![
            &self.input_layernorm.weight,
            &self.post_attention_layernorm.weight,
        ];
        out.extend(a.q_norm.iter().chain(&a.k_norm).map(|n| &n.weight));
        for l in [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ] {
            out.push(&l.weight);
            out.extend(&l.bias);
            if let Some(lora) = &l.lora {
                out.push(&lora.a);
                out.push(&lora.b);
                out.extend(&lora.magnitude);
            }
        }
        out
    }

    /// The feed-forward half, after attention produced `attn_out`.
    fn finish(
        &self,
        residual: &Tensor,
        attn_out: Tensor,
        fused: bool,
        dropout: Option<u64>,
    ) -> Result<Tensor> {
        // The first layer's residual (the embeddings) of a LoRA model takes
        // no gradient: none is made for it.
        let x = if attn_out.track_op() && !residual.track_op() {
            apply(&attn_out.contiguous()?, ConstOperand::add(residual))?
        } else {
            (residual + attn_out)?
        };
        let h = self.post_attention_layernorm.forward(&x, fused)?;
        Ok((x + self.mlp.forward(&h, dropout)?)?)
    }
}

/// Where a cached step's attention reads its keys and values.
enum StepKeys {
    /// Each sequence's own rows of the cache, `(first row, length)`: a
    /// decode step on the CPU in f32 (`fused::decode_attention`).
    CacheRows(Vec<(usize, usize)>),
    /// The cache rows of every sequence gathered to the longest length (the
    /// index of [`KvCache::gather`]).
    Gathered(Tensor),
}

/// Which logits [`CausalLM::forward_cached`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// The last appended token of each sequence: `[N, V]`.
    Last,
    /// Every appended token: `[N, T, V]`, right-padded to the longest.
    All,
    /// The final-norm hidden states of every appended token, `[N, T, H]`,
    /// for the caller to turn into logits ([`CausalLM::logits`]) a few rows
    /// at a time (prompt log-probs: `[T, V]` at once is gigabytes for a long
    /// prompt and a large vocabulary).
    Hidden,
}

/// A causal decoder LM. Cloning shares the weights.
#[derive(Clone)]
pub struct CausalLM {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryTables,
    device: Device,
    dtype: DType,
    /// Upper bound on the elements of one chunk of logits in the log-prob
    /// paths.
    logits_chunk_elements: usize,
    /// [`Self::checkpointed_logprobs`] recomputes the decoder layers too.
    gradient_checkpointing: bool,
    /// LoRA dropout's seed of the full-sequence forwards ([`Self::with_dropout`]).
    dropout_seed: Option<u64>,
    /// Some weights are LoRA's `modules_to_save`, trained copies in place
    /// of the base's (which this model does not hold).
    saves_modules: bool,
}

impl CausalLM {
    /// Builds the model from `weights` (shapes checked against `cfg`; a missing
    /// or misshapen tensor is an error naming it). Device and dtype are those of
    /// the weights; extra tensors (e.g. a redundant `lm_head.weight` next to
    /// tied embeddings) are ignored.
    pub fn new(cfg: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::require_lm_head(cfg)?;
        Self::build(cfg, weights, None)
    }

    /// A classifier's folder (a reward model) is not a language model: said,
    /// instead of generating from its score head.
    fn require_lm_head(cfg: &ModelConfig) -> Result<()> {
        match cfg.head {
            ModelHead::CausalLm => Ok(()),
            ModelHead::SequenceClassification { .. } => Err(ModelError::Invalid(format!(
                "config.json names {}ForSequenceClassification, a classifier (a reward model), \
                 not a language model: give a *ForCausalLM folder here, and use this one as a \
                 `reward_model` reward function",
                cfg.architecture.hf_name().trim_end_matches("ForCausalLM")
            ))),
        }
    }

    /// The model with LoRA adapters on the linears `lora` names (its tensors
    /// are what trains: `weights` are the frozen base, but for the weights
    /// `modules_to_save` trains whole, whose copies in `lora` take their
    /// place). Every adapter of `lora.config` must be there, and nothing else.
    pub fn with_lora(cfg: &ModelConfig, weights: &Weights, lora: &Lora) -> Result<Self> {
        Self::require_lm_head(cfg)?;
        lora.check(cfg)?;
        if lora.config.modules_to_save.is_empty() {
            return Self::build(cfg, weights, Some(lora));
        }
        let mut lm = Self::build(cfg, &lora.overlay(cfg, weights)?, Some(lora))?;
        lm.saves_modules = true;
        Ok(lm)
    }

    /// The decoder and its head; a classifier's head is its `score`
    /// projection `[num_labels, hidden]` in place of the vocabulary's, so
    /// that [`Self::logits`] gives its scores.
    pub(crate) fn build(cfg: &ModelConfig, weights: &Weights, lora: Option<&Lora>) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = weights
            .require("model.embed_tokens.weight", &[v, h])?
            .clone();
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        // In parallel: on the CPU each layer transposes its weights (see
        // Linear), which a weight push pays for. Every layer's result is kept
        // so that the error reported is the lowest layer's, whichever thread
        // finished first.
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| DecoderLayer::load(cfg, weights, l, lora))
            .collect::<Vec<Result<_>>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match cfg.head {
            ModelHead::SequenceClassification { num_labels } => {
                weights.require("score.weight", &[num_labels, h])?.clone()
            }
            ModelHead::CausalLm if cfg.tie_word_embeddings => embed_tokens.clone(),
            ModelHead::CausalLm => weights.require("lm_head.weight", &[v, h])?.clone(),
        };
        let adapters = lora.into_iter().flat_map(|l| l.adapters.iter());
        for (name, t) in weights.iter().chain(adapters) {
            if t.dtype() != dtype || !t.device().same_device(&device) {
                return Err(ModelError::Invalid(format!(
                    "tensor `{name}` is {:?} on {:?}, the embeddings are {dtype:?} on {device:?}",
                    t.dtype(),
                    t.device()
                )));
            }
        }
        Ok(CausalLM {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: norm(weights, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head: Linear::new(lm_head, None)?,
            rope: RotaryTables::new(cfg, &device)?,
            device,
            dtype,
            logits_chunk_elements: LOGITS_CHUNK_ELEMENTS,
            gradient_checkpointing: false,
            dropout_seed: None,
            saves_modules: false,
        })
    }

    /// The model without its LoRA adapters: the frozen base, sharing its
    /// tensors (PEFT's `disable_adapter`). None where the adapters train
    /// `modules_to_save`, whose base weights this model does not hold:
    /// build the base from its weights then.
    pub fn without_lora(&self) -> Option<CausalLM> {
        if self.saves_modules {
            return None;
        }
        let mut base = self.clone();
        for layer in &mut base.layers {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            for l in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                l.lora = None;
            }
        }
        Some(base)
    }

    /// Loads a Hugging Face model folder.
    pub fn from_dir(dir: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let weights = Weights::load(dir, device, dtype)?;
        Self::new(&cfg, &weights)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sets the upper bound on the elements (`B x positions x V`) of one
    /// chunk of logits in the log-prob paths (default 16M); at least one
    /// position per chunk.
    pub fn set_logits_chunk_elements(&mut self, elements: usize) {
        self.logits_chunk_elements = elements;
    }

    /// Gradient checkpointing of the decoder layers (transformers'
    /// `gradient_checkpointing_enable`), for [`Self::checkpointed_logprobs`]:
    /// its forward then keeps each layer's input `[B, T, hidden]` and
    /// nothing of what happens inside the layers (attention scores, the MLP's
    /// `[B, T, intermediate]` products...), and its backward runs each layer
    /// again before back-propagating through it. About one more forward pass
    /// of compute, for activation memory that no longer grows with the
    /// depth times the width of the layers. The other paths ignore it.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// The model for one training forward with LoRA dropout (PEFT's
    /// `lora_dropout`, the model in train mode): its full-sequence forwards
    /// drop out each adapter's input with masks drawn from `seed` and the
    /// linear's name, the same masks each time (gradient checkpointing runs
    /// a layer again). Shares the weights; without adapters or with
    /// `lora_dropout` 0 it computes what `self` does. Generation never
    /// drops out.
    pub fn with_dropout(&self, seed: u64) -> CausalLM {
        let mut lm = self.clone();
        lm.dropout_seed = Some(seed);
        lm
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    fn check_ids(&self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        let v = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.into_iter().find(|&id| id >= v) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is out of range for a vocabulary of {v}"
            )));
        }
        Ok(())
    }

    /// What every layer of a full-sequence forward needs besides the hidden
    /// states: checked ids, rotary tables at each token's position and the
    /// additive attention mask.
    fn sequence_context(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<SequenceContext> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims2()? != (b, t) {
            return Err(ModelError::Invalid(format!(
                "attention_mask has shape {:?}, input_ids {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        self.check_ids(ids.flatten_all()?.to_vec1::<u32>()?)?;
        let mask: Vec<Vec<f32>> = attention_mask.to_dtype(DType::F32)?.to_vec2()?;

        // Positions count real tokens only (cumsum(mask) - 1); padding gets 0.
        let mut positions = Vec::with_capacity(b * t);
        for row in &mask {
            let mut seen = 0u32;
            for &m in row {
                if m > 0.0 {
                    positions.push(seen);
                    seen += 1;
                } else {
                    positions.push(0);
                }
            }
        }
        let max_pos = self.cfg.max_position_embeddings as u32;
        if let Some(&p) = positions.iter().find(|&&p| p >= max_pos) {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds max_position_embeddings ({max_pos})",
                p + 1
            )));
        }
        let positions = Tensor::from_vec(positions, (b, t), &self.device)?;
        let (cos, sin) = self.rope.at(&positions, self.dtype)?;

        // Causal mask plus key padding, [B, 1, T, T].
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { MASKED }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), &self.device)?;
        let pad: Vec<f32> = mask
            .iter()
            .flat_map(|row| row.iter().map(|&m| if m > 0.0 { 0.0 } else { MASKED }))
            .collect();
        let pad = Tensor::from_vec(pad, (b, 1, 1, t), &self.device)?;
        Ok(SequenceContext {
            ids,
            cos,
            sin,
            attn_mask: causal.broadcast_add(&pad)?,
            dropout: self.dropout_seed,
        })
    }

    /// Final hidden states (after the last norm), `[B, T, hidden]`, differentiable.
    /// `input_ids`: u32 `[B, T]`; `attention_mask`: `[B, T]` of 0/1 (any dtype),
    /// left or right padding.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let ctx = self.sequence_context(input_ids, attention_mask)?;
        let mut x = self.embed(&ctx.ids)?;
        for layer in &self.layers {
            x = layer.forward_sequence(&x, &ctx)?;
        }
        self.norm.forward(&x, false)
    }

    /// [`Self::forward_hidden`] with every decoder layer checkpointed: each
    /// layer's output leaves the autograd graph as soon as the next layer
    /// has its input, so the graph holds only the final norm. What the
    /// backward needs to recompute the layers one at a time is returned
    /// beside the hidden states.
    fn forward_hidden_checkpointed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, LayerCheckpoints)> {
        let ctx = self.sequence_context(input_ids, attention_mask)?;
        let mut x = self.embed(&ctx.ids)?.detach();
        let mut inputs = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let next = layer.forward_sequence(&x, &ctx)?.detach();
            inputs.push(std::mem::replace(&mut x, next));
        }
        let last = Var::from_tensor(&x)?;
        let hidden = self.norm.forward(last.as_tensor(), false)?;
        Ok((hidden, LayerCheckpoints { ctx, inputs, last }))
    }

    /// Logits `[.., V]` of hidden states `[.., hidden]`, in f32 (f64 for an
    /// f64 model).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        logprobs::upcast(&self.lm_head.forward(hidden)?)
    }

    /// Full-sequence logits `[B, T, V]` (f32), differentiable.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.logits(&self.forward_hidden(input_ids, attention_mask)?)
    }

    /// Log-probs (and optionally entropies) of the last `logits_to_keep` tokens
    /// of each row given everything before them: `[B, K]`, differentiable.
    /// Logits are divided by `temperature` first, as TRL does. The `[B, K, V]`
    /// logits are computed in chunks of positions, each reduced to `[B, chunk]`
    /// before the next; but every chunk's logits stay in the autograd graph
    /// until the backward pass. [`Self::checkpointed_logprobs`] gives the same
    /// values and gradients without keeping them.
    pub fn completion_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        logits_to_keep: usize,
        temperature: f64,
        with_entropy: bool,
    ) -> Result<TokenLogProbs> {
        let head = self.completion_head(
            input_ids,
            attention_mask,
            logits_to_keep,
            temperature,
            false,
        )?;
        head.logprobs_by_chunk(&head.hidden, with_entropy, false)
    }

    /// [`Self::completion_logprobs`] with the vocabulary projection
    /// checkpointed (recomputed in the backward pass): the forward keeps only
    /// the final hidden states `[B, K, hidden]` in the graph, not the
    /// `[B, K, V]` logits and their softmax, which for a 150k vocabulary are
    /// several MB per token. The price is one more `hidden x V` product per
    /// token in the backward. With [`Self::set_gradient_checkpointing`] the
    /// decoder layers are recomputed in the backward as well.
    ///
    /// The returned log-probs and entropies are leaf variables: compute the
    /// loss on them, back-propagate it, and hand their gradients to
    /// [`CheckpointedLogProbs::backward`], which returns the gradients of the
    /// model's parameters. For values only (old or reference log-probs),
    /// read [`CheckpointedLogProbs::logprobs`] and drop it.
    pub fn checkpointed_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        logits_to_keep: usize,
        temperature: f64,
        with_entropy: bool,
    ) -> Result<CheckpointedLogProbs<'_>> {
        let head = self.completion_head(
            input_ids,
            attention_mask,
            logits_to_keep,
            temperature,
            self.gradient_checkpointing,
        )?;
        // Each chunk's graph (logits, softmax) is dropped with its detached
        // result before the next chunk is computed.
        let lp = head.logprobs_by_chunk(&head.hidden.detach(), with_entropy, true)?;
        let logprobs = Var::from_tensor(&lp.logprobs)?;
        let entropy = lp.entropy.as_ref().map(Var::from_tensor).transpose()?;
        Ok(CheckpointedLogProbs {
            head,
            logprobs,
            entropy,
        })
    }

    /// The final hidden states that predict the last `logits_to_keep` tokens
    /// (position p predicts token p + 1), with those tokens as targets.
    fn completion_head(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        logits_to_keep: usize,
        temperature: f64,
        recompute_layers: bool,
    ) -> Result<CompletionHead<'_>> {
        let (b, t) = input_ids.dims2()?;
        if logits_to_keep == 0 || logits_to_keep >= t {
            return Err(ModelError::Invalid(format!(
                "logits_to_keep must be in 1..{t} for sequences of {t} tokens, got {logits_to_keep}"
            )));
        }
        let (hidden, layers) = if recompute_layers {
            let (hidden, layers) = self.forward_hidden_checkpointed(input_ids, attention_mask)?;
            (hidden, Some(layers))
        } else {
            (self.forward_hidden(input_ids, attention_mask)?, None)
        };
        let hidden = hidden.narrow(1, t - logits_to_keep - 1, logits_to_keep)?;
        let targets =
            input_ids
                .to_dtype(DType::U32)?
                .narrow(1, t - logits_to_keep, logits_to_keep)?;
        Ok(CompletionHead {
            model: self,
            hidden,
            layers,
            targets,
            temperature,
            chunk: (self.logits_chunk_elements / (b * self.cfg.vocab_size).max(1)).max(1),
        })
    }

    /// Appends `entries[i].1` to the sequence in cache slot `entries[i].0` and
    /// returns logits (f32) for the appended tokens, all sequences in one
    /// batched forward. Prefill (many tokens) and decode (one token) alike; a
    /// sequence can join or leave the batch between calls.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        entries: &[(usize, &[u32])],
        wanted: LogitsWanted,
    ) -> Result<Tensor> {
        if entries.is_empty() {
            return Err(ModelError::Invalid(
                "forward_cached with no sequences".into(),
            ));
        }
        let b = entries.len();
        let t = entries
            .iter()
            .map(|(_, toks)| toks.len())
            .max()
            .unwrap_or(0);
        if t == 0 || entries.iter().any(|(_, toks)| toks.is_empty()) {
            return Err(ModelError::Invalid(
                "forward_cached with an empty token list".into(),
            ));
        }
        self.check_ids(entries.iter().flat_map(|(_, toks)| toks.iter().copied()))?;
        let starts: Vec<usize> = entries
            .iter()
            .map(|&(slot, toks)| cache.reserve(slot, toks.len()))
            .collect::<Result<_>>()?;
        let max_pos = self.cfg.max_position_embeddings;
        if let Some(((_, toks), s)) = entries
            .iter()
            .zip(&starts)
            .find(|((_, toks), s)| *s + toks.len() > max_pos)
        {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds max_position_embeddings ({max_pos})",
                s + toks.len()
            )));
        }
        // Keys: each slot's positions 0..start+len, gathered to a common length.
        let tk = entries
            .iter()
            .zip(&starts)
            .map(|((_, toks), s)| s + toks.len())
            .max()
            .unwrap_or(0);

        // Right-padded ids and positions [B, T]; padding repeats a valid id.
        let mut ids = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t * tk);
        for ((_, toks), &s) in entries.iter().zip(&starts) {
            for i in 0..t {
                let real = i < toks.len();
                ids.push(if real { toks[i] } else { toks[0] });
                positions.push((s + i.min(toks.len() - 1)) as u32);
                for j in 0..tk {
                    let allowed = if real { j <= s + i } else { j == 0 };
                    mask.push(if allowed { 0.0 } else { MASKED });
                }
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let positions = Tensor::from_vec(positions, (b, t), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, 1, t, tk), &self.device)?;
        let (cos, sin) = self.rope.at(&positions, self.dtype)?;
        // A decode step (one new token each) on the CPU in f32 reads each
        // sequence's own cache rows (fused::decode_attention); otherwise the
        // rows are gathered to the longest sequence's length.
        let keys = if t == 1 && crate::fused::applies_to(&self.device, self.dtype) {
            StepKeys::CacheRows(
                entries
                    .iter()
                    .zip(&starts)
                    .map(|(&(slot, _), &s)| (cache.first_row(slot), s + 1))
                    .collect(),
            )
        } else {
            StepKeys::Gathered(cache.gather_index(entries.iter().map(|(slot, _)| *slot), tk)?)
        };
        let write = cache.write_index(
            entries
                .iter()
                .zip(&starts)
                .map(|(&(slot, toks), &s)| (slot, s, toks.len())),
            t,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        )?;

        let mut x = self.embed(&ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x, true)?;
            let (q, k, v) = layer.self_attn.qkv(&h, &cos, &sin, true, None)?;
            cache.write(l, &write, &k, &v)?;
            let attn = match &keys {
                StepKeys::CacheRows(rows) => {
                    let (k_cache, v_cache) = cache.layer(l)?;
                    let out = crate::fused::decode_attention(&q, k_cache, v_cache, rows)?;
                    layer.self_attn.o_proj.forward(&out)?
                }
                StepKeys::Gathered(index) => {
                    let (k_all, v_all) = cache.gather(l, index, b, tk)?;
                    layer
                        .self_attn
                        .attend(&q, k_all, v_all, &mask, true, None)?
                }
            };
            x = layer.finish(&x, attn, true, None)?;
        }
        for ((slot, toks), &s) in entries.iter().zip(&starts) {
            cache.commit(*slot, s + toks.len());
        }
        match wanted {
            LogitsWanted::Last => {
                let last: Vec<u32> = entries
                    .iter()
                    .enumerate()
                    .map(|(bi, (_, toks))| (bi * t + toks.len() - 1) as u32)
                    .collect();
                let last = Tensor::from_vec(last, b, &self.device)?;
                let h = x
                    .reshape((b * t, self.cfg.hidden_size))?
                    .index_select(&last, 0)?;
                self.logits(&self.norm.forward(&h, true)?)
            }
            LogitsWanted::All => self.logits(&self.norm.forward(&x, true)?),
            LogitsWanted::Hidden => self.norm.forward(&x, true),
        }
    }
}

/// See [`CausalLM::sequence_context`].
struct SequenceContext {
    /// u32 `[B, T]`, each below the vocabulary size.
    ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// `[B, 1, T, T]` f32: 0 or [`MASKED`].
    attn_mask: Tensor,
    /// LoRA dropout's seed of this forward ([`CausalLM::with_dropout`]);
    /// kept here so that a layer run again draws the same masks.
    dropout: Option<u64>,
}

/// What the backward pass of a layer-checkpointed forward needs to run the
/// layers again, one at a time.
struct LayerCheckpoints {
    ctx: SequenceContext,
    /// The input of each decoder layer `[B, T, hidden]`, out of the graph.
    inputs: Vec<Tensor>,
    /// The last layer's output, a leaf variable under the final norm.
    last: Var,
}

/// The last hidden states of a completion batch and the tokens they predict.
struct CompletionHead<'a> {
    model: &'a CausalLM,
    /// `[B, K, hidden]`, in the graph of the transformer (or, with the layers
    /// checkpointed, of the final norm only).
    hidden: Tensor,
    /// Set when the decoder layers were checkpointed.
    layers: Option<LayerCheckpoints>,
    /// `[B, K]` u32.
    targets: Tensor,
    temperature: f64,
    /// Positions per chunk of logits.
    chunk: usize,
}

impl CompletionHead<'_> {
    fn chunks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let (k, chunk) = (self.targets.dims()[1], self.chunk);
        (0..k.div_ceil(chunk)).map(move |i| i * chunk..((i + 1) * chunk).min(k))
    }

    /// Log-probs (and entropies) of every position, `[B, K]`, from `hidden`
    /// (the head's hidden states or a detached copy of them), chunk by
    /// chunk; with `detach`, each chunk's result leaves the graph before the
    /// next chunk is computed.
    fn logprobs_by_chunk(
        &self,
        hidden: &Tensor,
        with_entropy: bool,
        detach: bool,
    ) -> Result<TokenLogProbs> {
        let mut lps = Vec::new();
        let mut ents = Vec::new();
        for range in self.chunks() {
            let h = hidden.narrow(1, range.start, range.len())?;
            let (lp, ent) = self.chunk_logprobs(&h, range, with_entropy)?;
            let keep = |t: Tensor| if detach { t.detach() } else { t };
            lps.push(keep(lp));
            ents.extend(ent.map(keep));
        }
        Ok(TokenLogProbs {
            logprobs: Tensor::cat(&lps, 1)?,
            entropy: if with_entropy {
                Some(Tensor::cat(&ents, 1)?)
            } else {
                None
            },
        })
    }

    /// Log-probs (and entropies) of positions `range`, from `hidden` (those
    /// positions of the head's hidden states or of a copy of them).
    fn chunk_logprobs(
        &self,
        hidden: &Tensor,
        range: std::ops::Range<usize>,
        with_entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.logprobs_of_logits(&self.model.logits(hidden)?, range, with_entropy)
    }

    /// [`Self::chunk_logprobs`] from the chunk's logits.
    fn logprobs_of_logits(
        &self,
        logits: &Tensor,
        range: std::ops::Range<usize>,
        with_entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let targets = self.targets.narrow(1, range.start, range.len())?;
        let lp = logprobs::selective_log_softmax(logits, &targets, self.temperature)?;
        let ent = if with_entropy {
            Some(logprobs::entropy(logits, self.temperature)?)
        } else {
            None
        };
        Ok((lp, ent))
    }
}

/// Completion log-probs whose logits are recomputed in the backward pass; see
/// [`CausalLM::checkpointed_logprobs`].
pub struct CheckpointedLogProbs<'a> {
    head: CompletionHead<'a>,
    logprobs: Var,
    entropy: Option<Var>,
}

impl CheckpointedLogProbs<'_> {
    /// `[B, K]` log-probs, a leaf variable.
    pub fn logprobs(&self) -> &Tensor {
        self.logprobs.as_tensor()
    }

    /// `[B, K]` entropies when asked for, a leaf variable.
    pub fn entropy(&self) -> Option<&Tensor> {
        self.entropy.as_ref().map(Var::as_tensor)
    }

    /// Both as [`TokenLogProbs`] (the leaf variables).
    pub fn token_logprobs(&self) -> TokenLogProbs {
        TokenLogProbs {
            logprobs: self.logprobs().clone(),
            entropy: self.entropy().cloned(),
        }
    }

    /// The gradients of the model's parameters for a loss whose gradients
    /// with respect to [`Self::logprobs`] and [`Self::entropy`] are
    /// `d_logprobs` and `d_entropy` (`[B, K]`; `None`: the loss does not
    /// depend on it). Chunk by chunk, the logits are recomputed from a copy of
    /// the hidden states and back-propagated to it and to the output
    /// embedding; then the hidden states' gradient goes through the
    /// transformer in one backward pass.
    pub fn backward(
        self,
        d_logprobs: Option<&Tensor>,
        d_entropy: Option<&Tensor>,
    ) -> Result<candle_core::backprop::GradStore> {
        if d_logprobs.is_none() && d_entropy.is_none() {
            return Ok(candle_core::backprop::GradStore::default());
        }
        let head = &self.head;
        let lm = &head.model.lm_head;
        let lm_head = &lm.weight;
        let detached = head.hidden.detach();
        // On the CPU in f32 each chunk's logits are a leaf: their gradient
        // gives the hidden states' (`d_logits W`) and adds into one output
        // embedding gradient in place (fused::AddTransposedProduct), instead
        // of a `[vocab, hidden]` gradient made, zeroed and summed per chunk.
        let in_place = crate::fused::applies(&detached) && lm.bias.is_none() && lm.lora.is_none();
        let head_sum = if in_place && lm_head.is_variable() {
            Some(lm_head.zeros_like()?)
        } else {
            None
        };
        let mut d_hidden = Vec::new();
        let mut d_lm_head: Option<Tensor> = None;
        for range in head.chunks() {
            let chunk = detached.narrow(1, range.start, range.len())?;
            // The loss's gradients of this chunk's log-probs and entropies,
            // as a surrogate whose backward starts from them.
            let surrogate = |lp: Tensor, ent: Option<Tensor>| -> Result<Tensor> {
                let weighted = |x: &Tensor, d: &Tensor| -> Result<Tensor> {
                    let d = d.narrow(1, range.start, range.len())?.to_dtype(x.dtype())?;
                    Ok((x * d.detach())?.sum_all()?)
                };
                let mut surrogate = match d_logprobs {
                    Some(d) => weighted(&lp, d)?,
                    None => lp.zeros_like()?.sum_all()?,
                };
                if let (Some(ent), Some(d)) = (&ent, d_entropy) {
                    surrogate = (surrogate + weighted(ent, d)?)?;
                }
                Ok(surrogate)
            };
            if in_place {
                let logits = Var::from_tensor(&head.model.logits(&chunk)?.detach())?;
                let (lp, ent) = head.logprobs_of_logits(
                    logits.as_tensor(),
                    range.clone(),
                    d_entropy.is_some(),
                )?;
                let mut grads = surrogate(lp, ent)?.backward()?;
                let Some(d_logits) = grads.remove(logits.as_tensor()) else {
                    d_hidden.push(chunk.zeros_like()?);
                    continue;
                };
                let (b, len, h) = chunk.dims3()?;
                let d_logits = d_logits.contiguous()?.reshape((b * len, ()))?;
                let d_chunk = d_logits.matmul(&lm_head.detach())?;
                d_hidden.push(d_chunk.reshape((b, len, h))?);
                if let Some(sum) = &head_sum {
                    let x = chunk.contiguous()?.reshape((b * len, h))?;
                    sum.inplace_op3(&d_logits, &x, &crate::fused::AddTransposedProduct)?;
                }
                continue;
            }
            let hidden = Var::from_tensor(&chunk)?;
            let (lp, ent) =
                head.chunk_logprobs(hidden.as_tensor(), range.clone(), d_entropy.is_some())?;
            let mut grads = surrogate(lp, ent)?.backward()?;
            d_hidden.push(match grads.remove(hidden.as_tensor()) {
                Some(g) => g.detach(),
                None => hidden.as_tensor().zeros_like()?,
            });
            if let Some(g) = grads.remove(lm_head) {
                d_lm_head = Some(match d_lm_head {
                    Some(sum) => (sum + g)?.detach(),
                    None => g.detach(),
                });
            }
        }
        if let Some(sum) = head_sum {
            d_lm_head = Some(sum);
        }
        let d_hidden = Tensor::cat(&d_hidden, 1)?;
        let mut grads = (&head.hidden * d_hidden)?.sum_all()?.backward()?;
        if let Some(layers) = &head.layers {
            head.model.layers_backward(layers, &mut grads)?;
        }
        // With tied embeddings this adds to the input embedding's gradient.
        if let Some(g) = d_lm_head {
            add_grad(&mut grads, lm_head, g)?;
        }
        Ok(grads)
    }
}

/// Adds `g` to the gradient of `t` in `grads`.
fn add_grad(grads: &mut candle_core::backprop::GradStore, t: &Tensor, g: Tensor) -> Result<()> {
    let total = match grads.remove(t) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert(t, total.detach());
    Ok(())
}

impl CausalLM {
    /// The backward pass through checkpointed decoder layers: `grads` holds
    /// the gradient of the last layer's output (from the backward through the
    /// final norm); from the last layer to the first, each layer runs again
    /// on its saved input and back-propagates its output's gradient, which
    /// gives its parameters' gradients and its input's, the previous
    /// layer's output's. The last one goes into the embedding table.
    fn layers_backward(
        &self,
        ck: &LayerCheckpoints,
        grads: &mut candle_core::backprop::GradStore,
    ) -> Result<()> {
        let Some(mut d_x) = grads.remove(ck.last.as_tensor()) else {
            return Ok(());
        };
        for (layer, input) in self.layers.iter().zip(&ck.inputs).rev() {
            let x = Var::from_tensor(input)?;
            let out = layer.forward_sequence(x.as_tensor(), &ck.ctx)?;
            let mut layer_grads = (out * d_x.detach())?.sum_all()?.backward()?;
            for p in layer.parameters() {
                if let Some(g) = layer_grads.remove(p) {
                    grads.insert(p, g.detach());
                }
            }
            d_x = match layer_grads.remove(x.as_tensor()) {
                Some(g) => g.detach(),
                None => input.zeros_like()?,
            };
        }
        let embedded = self.embed(&ck.ctx.ids)?;
        let mut embed_grads = (embedded * d_x)?.sum_all()?.backward()?;
        if let Some(g) = embed_grads.remove(&self.embed_tokens) {
            add_grad(grads, &self.embed_tokens, g)?;
        }
        Ok(())
    }
}

/// Trainable parameters: one candle [`Var`] per tensor, and the [`Weights`]
/// view of them from which a differentiable [`CausalLM`] is built. Updating a
/// `Var` in place (`Var::set`, as optimizers do) updates the model.
pub fn trainable(weights: &Weights) -> Result<(Vec<(String, Var)>, Weights)> {
    let mut vars = Vec::with_capacity(weights.len());
    let mut view = std::collections::BTreeMap::new();
    for (name, t) in weights.iter() {
        let var = Var::from_tensor(t)?;
        view.insert(name.clone(), var.as_tensor().clone());
        vars.push((name.clone(), var));
    }
    Ok((vars, Weights::new(view)))
}
