//! CPU kernels, forward and backward, for the full-sequence forward
//! (training and scoring) and for decode steps:
//! - [`Attention`]: a layer's attention between its projections (rotary
//!   embedding, grouped-query products, [`AttentionSoftmax`]), one node;
//! - [`RmsNorm`], [`SwiGlu`] (`silu(gate) * up`), [`Linear`] (`x W^T` for a
//!   trainable weight);
//! - [`decode_attention`]: a decode step's attention read from the KV cache.
//!
//! candle spells each of these as several ops (RMSNorm: square, mean, add,
//! sqrt, divide, multiply), each writing a new activation-sized tensor, and
//! its backward adds a few more per op (silu's alone makes seven), each
//! summed into a zeroed gradient. These read their inputs once and write
//! their output once, and their backward likewise (README, Benchmarks).
//! CPU f32, the CPU's training dtype ([`applies`]); other devices and dtypes
//! keep candle's ops, which the tests compare these with.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

type Result<T> = candle_core::Result<T>;

/// Elements of one rayon task: large enough that scheduling is noise.
const TASK_ELEMENTS: usize = 16 * 1024;

/// Whether these kernels run for `x`: on the CPU, in f32.
pub(crate) fn applies(x: &Tensor) -> bool {
    applies_to(x.device(), x.dtype())
}

/// [`applies`] for tensors on `device` in `dtype`.
pub(crate) fn applies_to(device: &candle_core::Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// Rows per rayon task for rows of `len` elements.
fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1)
}

/// `sum(a * b)` in eight lanes, so that the compiler vectorizes it (an
/// iterator's `sum` adds in order, one element at a time).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The f32 values a custom op's input holds, in its (contiguous) layout.
fn values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused CPU kernels take f32, got {:?}", s.dtype())
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("fused CPU kernels take contiguous inputs")
    };
    Ok(&v[start..end])
}

/// Runs `f` on the f32 values of each tensor (made contiguous first).
fn with_values<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(s) = &**storage else {
            candle_core::bail!("fused CPU kernels take CPU tensors")
        };
        slices.push(values(s, layout)?);
    }
    f(&slices)
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

/// An operand's gradient from its values, where the operand takes one.
fn gradient(wanted: bool, v: Vec<f32>, shape: &Shape) -> Result<Option<Tensor>> {
    wanted.then(|| tensor(v, shape)).transpose()
}

/// `softmax(scale * scores + mask)` over the last dimension, for scores
/// `[B, H, Tq, Tk]` and an additive mask `[B or 1, 1, Tq, Tk]` that takes no
/// gradient. Backward: `dS = scale * P * (dP - rowsum(dP * P))`.
pub(crate) struct AttentionSoftmax {
    pub(crate) scale: f32,
    pub(crate) mask: Tensor,
}

impl AttentionSoftmax {
    /// The mask row of score row `row` (`[b, h, q]` flattened).
    fn mask_row(mask: &[f32], dims: (usize, usize, usize, usize), row: usize) -> &[f32] {
        let (b, h, tq, tk) = dims;
        let (batch, q) = (row / (h * tq), row % tq);
        let batch = if mask.len() == b * tq * tk { batch } else { 0 };
        &mask[(batch * tq + q) * tk..][..tk]
    }
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "attention-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(s, l)?;
        let dims = l.shape().dims4()?;
        let (b, _, tq, tk) = dims;
        let mask_dims = self.mask.dims4()?;
        if !(mask_dims == (b, 1, tq, tk) || mask_dims == (1, 1, tq, tk)) {
            candle_core::bail!(
                "attention mask {mask_dims:?} does not fit scores {:?}",
                l.dims()
            )
        }
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        with_values(&[&self.mask], |m| {
            let mask = m[0];
            let rows = rows_per_task(tk);
            out.par_chunks_mut(rows * tk)
                .zip(x.par_chunks(rows * tk))
                .enumerate()
                .for_each(|(task, (out, x))| {
                    for (i, (o, x)) in out.chunks_mut(tk).zip(x.chunks(tk)).enumerate() {
                        let m = Self::mask_row(mask, dims, task * rows + i);
                        let mut max = f32::NEG_INFINITY;
                        for ((o, &x), &m) in o.iter_mut().zip(x).zip(m) {
                            *o = x * scale + m;
                            max = max.max(*o);
                        }
                        let mut sum = 0f32;
                        for o in o.iter_mut() {
                            *o = (*o - max).exp();
                            sum += *o;
                        }
                        let inv = 1.0 / sum;
                        o.iter_mut().for_each(|o| *o *= inv);
                    }
                });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(p, dp, self.scale)?))
    }
}

/// The gradient of the scores given the probabilities `p` of
/// `softmax(scale * scores + mask)` and their gradient `dp`:
/// `scale * p * (dp - rowsum(dp * p))`.
fn softmax_backward(p: &Tensor, dp: &Tensor, scale: f32) -> Result<Tensor> {
    let tk = p.dim(candle_core::D::Minus1)?;
    let ds = with_values(&[p, dp], |v| {
        let (p, dp) = (v[0], v[1]);
        let mut ds = vec![0f32; p.len()];
        let rows = rows_per_task(tk);
        ds.par_chunks_mut(rows * tk)
            .zip(p.par_chunks(rows * tk).zip(dp.par_chunks(rows * tk)))
            .for_each(|(ds, (p, dp))| {
                for ((ds, p), dp) in ds.chunks_mut(tk).zip(p.chunks(tk)).zip(dp.chunks(tk)) {
                    let pdp = dot(p, dp);
                    for ((ds, &p), &dp) in ds.iter_mut().zip(p).zip(dp) {
                        *ds = scale * p * (dp - pdp);
                    }
                }
            });
        Ok(ds)
    })?;
    tensor(ds, p.shape())
}

/// RMSNorm over the last dimension, `y = w * x / sqrt(mean(x^2) + eps)`, for
/// `(x, w)`. With `r = 1 / sqrt(mean(x^2) + eps)` and `g = dy * w`:
/// `dx = r * g - r^3 * x * mean(g * x)`, `dw = sum over rows of dy * x * r`
/// (made only when `w` takes a gradient: a frozen LoRA base's does not).
pub(crate) struct RmsNorm {
    pub(crate) eps: f32,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = dot(x, x) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (values(s1, l1)?, values(s2, l2)?);
        let h = w.len();
        if l1.dims().last() != Some(&h) {
            candle_core::bail!("rms norm weight [{h}] does not fit input {:?}", l1.dims())
        }
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(h);
        out.par_chunks_mut(rows * h)
            .zip(x.par_chunks(rows * h))
            .for_each(|(out, x)| {
                for (o, x) in out.chunks_mut(h).zip(x.chunks(h)) {
                    let r = inv_rms(x, self.eps);
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let want_dw = w.track_op();
        let eps = self.eps;
        let (dx, dw) = with_values(&[x, w, dy], |v| {
            let (x, w, dy) = (v[0], v[1], v[2]);
            let mut dx = vec![0f32; x.len()];
            let rows = rows_per_task(h);
            let dw = dx
                .par_chunks_mut(rows * h)
                .zip(x.par_chunks(rows * h).zip(dy.par_chunks(rows * h)))
                .map(|(dx, (x, dy))| {
                    let mut dw = if want_dw { vec![0f32; h] } else { Vec::new() };
                    for ((dx, x), dy) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)) {
                        let r = inv_rms(x, eps);
                        let gx: f32 = dy.iter().zip(w).zip(x).map(|((d, w), x)| d * w * x).sum();
                        let c = r * r * r * gx / h as f32;
                        for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                            *dx = r * d * w - c * x;
                        }
                        if want_dw {
                            for ((dw, &x), &d) in dw.iter_mut().zip(x).zip(dy) {
                                *dw += d * x * r;
                            }
                        }
                    }
                    dw
                })
                .reduce(Vec::new, |mut a, b| {
                    if a.is_empty() {
                        return b;
                    }
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                });
            Ok((dx, dw))
        })?;
        Ok((
            Some(tensor(dx, x.shape())?),
            gradient(want_dw, dw, w.shape())?,
        ))
    }
}

/// SwiGLU's gate, `silu(gate) * up`, for `(gate, up)` of one shape. With
/// `s = sigmoid(gate)`: `d_gate = dy * up * s * (1 + gate * (1 - s))`,
/// `d_up = dy * gate * s`.
pub(crate) struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (values(s1, l1)?, values(s2, l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims())
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(TASK_ELEMENTS)
            .zip(g.par_chunks(TASK_ELEMENTS).zip(u.par_chunks(TASK_ELEMENTS)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dg, want_du) = (gate.track_op(), up.track_op());
        let (dg, du) = with_values(&[gate, up, dy], |v| {
            let (g, u, dy) = (v[0], v[1], v[2]);
            let mut dg = vec![0f32; if want_dg { g.len() } else { 0 }];
            let mut du = vec![0f32; if want_du { g.len() } else { 0 }];
            let chunks = g.len().div_ceil(TASK_ELEMENTS);
            // Each task writes its own range of both gradients.
            let mut dg_parts: Vec<&mut [f32]> = dg.chunks_mut(TASK_ELEMENTS).collect();
            let mut du_parts: Vec<&mut [f32]> = du.chunks_mut(TASK_ELEMENTS).collect();
            dg_parts.resize_with(chunks, Default::default);
            du_parts.resize_with(chunks, Default::default);
            dg_parts
                .into_par_iter()
                .zip(du_parts)
                .zip(g.par_chunks(TASK_ELEMENTS))
                .zip(
                    u.par_chunks(TASK_ELEMENTS)
                        .zip(dy.par_chunks(TASK_ELEMENTS)),
                )
                .for_each(|(((dg, du), g), (u, dy))| {
                    for i in 0..g.len() {
                        let s = sigmoid(g[i]);
                        if let Some(dg) = dg.get_mut(i) {
                            *dg = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        }
                        if let Some(du) = du.get_mut(i) {
                            *du = dy[i] * g[i] * s;
                        }
                    }
                });
            Ok((dg, du))
        })?;
        Ok((
            gradient(want_dg, dg, gate.shape())?,
            gradient(want_du, du, up.shape())?,
        ))
    }
}

/// `y = x W^T` for `(x [.., in], W [out, in])`, a trainable weight. One node
/// in the graph: candle's `x.reshape().matmul(W.t()).reshape()` is four,
/// and its backward sums each node's gradient into a zeroed tensor of its
/// own (two of them `x`-sized, one a strided add into `W`'s shape).
/// Backward: `dx = dy W`, `dW = dy^T x`. The product runs on candle's CPU
/// matmul (gemm), on the inputs' storage as it is.
pub(crate) struct Linear;

impl Linear {
    /// `(rows, in, out)` of `(x, W)`.
    fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
        let (out, k) = w.dims2()?;
        let Some((&kx, lead)) = x.dims().split_last() else {
            candle_core::bail!("linear: a scalar input")
        };
        if kx != k {
            candle_core::bail!(
                "linear: input {:?} does not fit weight {:?}",
                x.dims(),
                w.dims()
            )
        }
        Ok((lead.iter().product(), k, out))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, out) = Self::dims(l1.shape(), l2.shape())?;
        let Some((start, _)) = l1.contiguous_offsets() else {
            candle_core::bail!("linear: the input must be contiguous")
        };
        let x2 = Layout::contiguous_with_offset((rows, k), start);
        // W^T as a strided view of W's storage: gemm takes it as it is.
        let wt = l2.transpose(0, 1)?;
        let y = s1.matmul(s2, (1, rows, out, k), &x2, &wt)?;
        let mut shape = l1.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((y, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, k, out) = Self::dims(x.shape(), w.shape())?;
        // Detached operands: the gradients build no graph of their own.
        let dy = dy.detach().contiguous()?.reshape((rows, out))?;
        let dx = if x.track_op() {
            Some(dy.matmul(&w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let x = x.detach().reshape((rows, k))?;
            Some(dy.t()?.matmul(&x)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// The attention of one layer between its projections, for `(q, k, v)` as
/// the projections make them (`[B, T, heads * d]`, `[B, T, kv_heads * d]`):
/// rotary embedding of queries and keys, `softmax(q k^T / sqrt(d) + mask)
/// v` with grouped-query heads, the heads laid back side by side
/// (`[B, T, heads * d]`). One node in the graph instead of some twenty
/// (reshapes, transposes, copies, two products, the softmax), each of
/// whose backward candle sums into a zeroed tensor of its own. The forward
/// keeps what the backward reads (the rotated queries and keys, the values
/// and the probabilities, as candle's graph would); the backward is
/// `dV = P^T dO`, `dP = dO V^T`, `dS` by [`softmax_backward`],
/// `dQ = dS K`, `dK = dS^T Q`, rotated back.
pub(crate) struct Attention {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// `[B, T, d / 2]`
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// `[B, 1, T, T]` f32, additive.
    pub(crate) mask: Tensor,
    saved: std::sync::Mutex<Option<AttentionSaved>>,
}

/// The forward's tensors the backward reads, grouped by kv head: queries
/// `[B, kvh, rep * T, d]`, keys and values `[B, kvh, T, d]`, probabilities
/// `[B, kvh, rep * T, T]`.
struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
}

impl Attention {
    pub(crate) fn new(
        (heads, kv_heads, head_dim): (usize, usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Self> {
        Ok(Attention {
            heads,
            kv_heads,
            head_dim,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            mask: mask.contiguous()?,
            saved: std::sync::Mutex::new(None),
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// `[B, T, n * d]` as `[B, n, T, d]`, contiguous.
    fn heads_first(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `[B, n, T, d]` as `[B, T, n * d]`, contiguous.
    fn heads_last(x: &Tensor) -> Result<Tensor> {
        let (b, n, t, d) = x.dims4()?;
        x.transpose(1, 2)?.contiguous()?.reshape((b, t, n * d))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, AttentionSaved)> {
        let (b, t, _) = q.dims3()?;
        let (kvh, d) = (self.kv_heads, self.head_dim);
        let rep = self.heads / kvh;
        let rope = |x: &Tensor| candle_nn::rotary_emb::rope(x, &self.cos, &self.sin);
        // Head g * rep + r reads kv head g: each group's queries are rows
        // of one product with its kv head.
        let q = rope(&self.heads_first(q, self.heads)?)?.reshape((b, kvh, rep * t, d))?;
        let k = rope(&self.heads_first(k, kvh)?)?;
        let v = self.heads_first(v, kvh)?;
        let softmax = AttentionSoftmax {
            scale: self.scale(),
            mask: self.mask.clone(),
        };
        let p = q
            .matmul(&k.t()?)?
            .reshape((b, self.heads, t, t))?
            .apply_op1_no_bwd(&softmax)?
            .reshape((b, kvh, rep * t, t))?;
        let out = p.matmul(&v)?.reshape((b, self.heads, t, d))?;
        Ok((Self::heads_last(&out)?, AttentionSaved { q, k, v, p }))
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use crate::autograd::{cpu_input, cpu_output};
        let (q, k, v) = (cpu_input(s1, l1)?, cpu_input(s2, l2)?, cpu_input(s3, l3)?);
        let (out, saved) = self.forward(&q, &k, &v)?;
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(saved);
        }
        cpu_output(out)
    }

    fn bwd(
        &self,
        q_in: &Tensor,
        k_in: &Tensor,
        v_in: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let AttentionSaved { q, k, v, p } = match saved {
            Some(s) => s,
            // A second backward through the same graph: run it again.
            None => {
                let detached = |x: &Tensor| x.detach();
                self.forward(&detached(q_in), &detached(k_in), &detached(v_in))?
                    .1
            }
        };
        let (b, kvh, rows, t) = p.dims4()?;
        let d = self.head_dim;
        let d_out = self
            .heads_first(&d_out.detach(), self.heads)?
            .reshape((b, kvh, rows, d))?;
        let dv = p.t()?.matmul(&d_out)?;
        let dp = d_out.matmul(&v.t()?)?;
        let ds = softmax_backward(&p, &dp, self.scale())?;
        let dq = ds.matmul(&k)?.reshape((b, self.heads, t, d))?;
        let dk = ds.t()?.matmul(&q)?;
        let sin_back = self.sin.neg()?;
        let unrope = |x: &Tensor| candle_nn::rotary_emb::rope(x, &self.cos, &sin_back);
        let dq = Self::heads_last(&unrope(&dq.contiguous()?)?)?;
        let dk = Self::heads_last(&unrope(&dk.contiguous()?)?)?;
        let dv = Self::heads_last(&dv)?;
        let keep = |x: &Tensor, g: Tensor| if x.track_op() { Some(g) } else { None };
        Ok((keep(q_in, dq), keep(k_in, dk), keep(v_in, dv)))
    }
}

/// One decode step's attention read straight from the KV cache: each
/// sequence's one new query against its own keys and values, the cache's
/// rows `first..first + len` (`[rows, kv_heads, d]`, the step's own key
/// already written). Replaces gathering every sequence's rows to the
/// batch's longest length, two batched products of a few rows each per
/// sequence and head, and the masked softmax between them: per sequence
/// and head, a dot product per key, a softmax and a weighted sum of values.
/// `q`: `[B, heads, 1, d]` with the rotary embedding applied; returns
/// `[B, 1, heads * d]`. Inference only (no backward).
pub(crate) fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    rows: &[(usize, usize)],
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (cache_rows, kvh, dk) = k_cache.dims3()?;
    if t != 1 || dk != d || rows.len() != b || heads % kvh != 0 {
        candle_core::bail!(
            "decode attention: queries {:?}, cache {:?}, {} sequences",
            q.dims(),
            k_cache.dims(),
            rows.len()
        )
    }
    if let Some((first, len)) = rows
        .iter()
        .find(|(first, len)| *len == 0 || first + len > cache_rows)
    {
        candle_core::bail!(
            "decode attention: rows {first}..{} of {cache_rows}",
            first + len
        )
    }
    let rep = heads / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * heads * d];
    with_values(&[q, k_cache, v_cache], |v| {
        let (q, k, v) = (v[0], v[1], v[2]);
        out.par_chunks_mut(heads * d)
            .zip(q.par_chunks(heads * d))
            .zip(rows)
            .for_each(|((out, q), &(first, len))| {
                let mut p = vec![0f32; len];
                for (h, (out, q)) in out.chunks_mut(d).zip(q.chunks(d)).enumerate() {
                    let g = h / rep;
                    let at = |j: usize| ((first + j) * kvh + g) * d;
                    let mut max = f32::NEG_INFINITY;
                    for (j, p) in p.iter_mut().enumerate() {
                        *p = dot(q, &k[at(j)..at(j) + d]) * scale;
                        max = max.max(*p);
                    }
                    let mut sum = 0f32;
                    for p in p.iter_mut() {
                        *p = (*p - max).exp();
                        sum += *p;
                    }
                    let inv = 1.0 / sum;
                    for (j, &p) in p.iter().enumerate() {
                        let w = p * inv;
                        for (o, &x) in out.iter_mut().zip(&v[at(j)..at(j) + d]) {
                            *o += w * x;
                        }
                    }
                }
            });
        Ok(())
    })?;
    tensor(out, &Shape::from((b, 1, heads * d)))
}

/// `dst += a^T b` in place, for `dst [m, n]`, `a [k, m]`, `b [k, n]` (all
/// contiguous): the output embedding's gradient summed over chunks of
/// logits (`a` the logits' gradient, `b` the hidden states). A sum of
/// products made one by one writes a `[vocab, hidden]` product per chunk,
/// then a zeroed gradient and a sum of it (545 MB each for Qwen2.5's
/// 151,936 x 896): gemm adds into one buffer instead.
pub(crate) struct AddTransposedProduct;

impl candle_core::InplaceOp3 for AddTransposedProduct {
    fn name(&self) -> &'static str {
        "add-transposed-product"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (m, n) = l1.shape().dims2()?;
        let ((k, ma), (kb, nb)) = (l2.shape().dims2()?, l3.shape().dims2()?);
        if (ma, nb, kb) != (m, n, k) {
            candle_core::bail!(
                "dst {:?} += a^T b: a {:?}, b {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let (a, b) = (values(s2, l2)?, values(s3, l3)?);
        let (CpuStorage::F32(dst), Some((start, end))) = (s1, l1.contiguous_offsets()) else {
            candle_core::bail!("add-transposed-product: dst must be contiguous f32")
        };
        let dst = &mut dst[start..end];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: dst holds m x n values (row stride n), a k x m (read as
        // its transpose: element (i, r) at r * m + i), b k x n (row stride
        // n), checked above; gemm reads and writes only within them.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                true,
                a.as_ptr(),
                m as isize,
                1,
                b.as_ptr(),
                1,
                n as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism,
            )
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Each kernel against candle's ops spelled out, forward and gradients
    //! (candle's autograd through its own ops is the reference).
    use super::*;
    use candle_core::{D, Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let bits = crate::autograd::splitmix64(seed ^ i.wrapping_mul(0x9E37_79B9));
                ((bits >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// `sum(y * c)` for a fixed random `c`: a loss whose gradient `dy = c`
    /// exercises every element.
    fn loss(y: &Tensor, seed: u64) -> Tensor {
        (y * randn(y.dims(), seed)).unwrap().sum_all().unwrap()
    }

    #[test]
    fn attention_softmax_matches_candle_forward_and_backward() {
        let (b, h, t) = (2, 3, 5);
        let scale = 0.37f32;
        // Causal mask, and the second sequence's first two keys padded.
        let mut m = vec![0f32; b * t * t];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..t {
                    if k > q || (bi == 1 && k < 2) {
                        m[(bi * t + q) * t + k] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
        let s = Var::from_tensor(&randn(&[b, h, t, t], 1)).unwrap();

        let fused = s
            .apply_op1(AttentionSoftmax {
                scale,
                mask: mask.clone(),
            })
            .unwrap();
        let scaled = ((s.as_tensor() * scale as f64).unwrap())
            .broadcast_add(&mask)
            .unwrap();
        let reference = candle_nn::ops::softmax(&scaled, D::Minus1).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-6);

        let g_fused = loss(&fused, 2).backward().unwrap();
        let g_ref = loss(&reference, 2).backward().unwrap();
        let (a, r) = (g_fused.get(&s).unwrap(), g_ref.get(&s).unwrap());
        assert!(max_diff(a, r) < 1e-5, "{}", max_diff(a, r));
        // The mask takes no gradient.
        assert!(g_fused.get(&mask).is_none());

        // One mask for every sequence ([1, 1, T, T]) reads the same rows.
        let one = mask.narrow(0, 0, 1).unwrap();
        let y = s.apply_op1(AttentionSoftmax { scale, mask: one }).unwrap();
        assert!(max_diff(&y.narrow(0, 0, 1).unwrap(), &fused.narrow(0, 0, 1).unwrap()) == 0.0);
        // A mask that does not fit is an error, not a wrong read.
        let bad = mask.narrow(3, 0, 4).unwrap().contiguous().unwrap();
        assert!(s.apply_op1(AttentionSoftmax { scale, mask: bad }).is_err());
    }

    fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = x
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed.broadcast_mul(w).unwrap()
    }

    #[test]
    fn rms_norm_matches_candle_forward_and_backward() {
        let eps = 1e-6;
        let x = Var::from_tensor(&randn(&[2, 3, 16], 3)).unwrap();
        let w = Var::from_tensor(&(randn(&[16], 4) + 1.0).unwrap()).unwrap();
        let fused = x
            .apply_op2(w.as_tensor(), RmsNorm { eps: eps as f32 })
            .unwrap();
        let reference = rms_norm_reference(&x, &w, eps);
        assert!(max_diff(&fused, &reference) < 1e-5);

        let g_fused = loss(&fused, 5).backward().unwrap();
        let g_ref = loss(&reference, 5).backward().unwrap();
        for v in [&x, &w] {
            let (a, r) = (g_fused.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(max_diff(a, r) < 1e-4, "{}", max_diff(a, r));
        }

        // A frozen weight (LoRA's base) gets no gradient; x's is the same.
        let frozen = w.as_tensor().detach();
        let y = x.apply_op2(&frozen, RmsNorm { eps: eps as f32 }).unwrap();
        let g = loss(&y, 5).backward().unwrap();
        assert!(g.get(&frozen).is_none());
        assert!(max_diff(g.get(&x).unwrap(), g_ref.get(&x).unwrap()) < 1e-4);
    }

    #[test]
    fn swiglu_matches_candle_forward_and_backward() {
        // More elements than one task, so that the split is exercised.
        let shape = [3, 7, 1000];
        let gate = Var::from_tensor(&randn(&shape, 6)).unwrap();
        let up = Var::from_tensor(&randn(&shape, 7)).unwrap();
        let fused = gate.apply_op2(up.as_tensor(), SwiGlu).unwrap();
        let reference = (candle_nn::ops::silu(&gate).unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-5);

        let g_fused = loss(&fused, 8).backward().unwrap();
        let g_ref = loss(&reference, 8).backward().unwrap();
        for v in [&gate, &up] {
            let (a, r) = (g_fused.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(max_diff(a, r) < 1e-4, "{}", max_diff(a, r));
        }

        // Only the operand that takes a gradient gets one.
        let frozen_up = up.as_tensor().detach();
        let y = gate.apply_op2(&frozen_up, SwiGlu).unwrap();
        let g = loss(&y, 8).backward().unwrap();
        assert!(g.get(&frozen_up).is_none());
        assert!(max_diff(g.get(&gate).unwrap(), g_ref.get(&gate).unwrap()) < 1e-4);
    }

    #[test]
    fn linear_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(&randn(&[2, 3, 16], 9)).unwrap();
        let w = Var::from_tensor(&randn(&[8, 16], 10)).unwrap();
        let fused = x.apply_op2(w.as_tensor(), Linear).unwrap();
        let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(fused.dims(), &[2, 3, 8]);
        assert!(max_diff(&fused, &reference) < 1e-5);

        let g_fused = loss(&fused, 11).backward().unwrap();
        let g_ref = loss(&reference, 11).backward().unwrap();
        for v in [&x, &w] {
            let (a, r) = (g_fused.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(max_diff(a, r) < 1e-4, "{}", max_diff(a, r));
        }
        // An input read at an offset of its storage (a narrowed batch).
        let tail = x.narrow(0, 1, 1).unwrap();
        let y = tail.apply_op2(w.as_tensor(), Linear).unwrap();
        assert!(max_diff(&y, &reference.narrow(0, 1, 1).unwrap()) < 1e-5);
        // Shapes that do not fit are an error.
        assert!(x.apply_op2(&randn(&[8, 15], 1), Linear).is_err());
    }

    /// `[B, T, n * d]` to `[B, n, T, d]` through candle's ops.
    fn split_heads(x: &Tensor, n: usize, d: usize) -> Tensor {
        let (b, t, _) = x.dims3().unwrap();
        x.reshape((b, t, n, d)).unwrap().transpose(1, 2).unwrap()
    }

    #[test]
    fn attention_matches_candle_forward_and_backward() {
        // Grouped-query heads (4 query heads on 2 kv heads), a padded row.
        let (b, t, heads, kvh, d) = (2, 5, 4, 2, 8);
        let q = Var::from_tensor(&randn(&[b, t, heads * d], 12)).unwrap();
        let k = Var::from_tensor(&randn(&[b, t, kvh * d], 13)).unwrap();
        let v = Var::from_tensor(&randn(&[b, t, kvh * d], 14)).unwrap();
        let angles = randn(&[b, t, d / 2], 15);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let mut m = vec![0f32; b * t * t];
        for bi in 0..b {
            for qi in 0..t {
                for ki in 0..t {
                    if ki > qi || (bi == 0 && ki == 0) {
                        m[(bi * t + qi) * t + ki] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
        let op = Attention::new((heads, kvh, d), &cos, &sin, &mask).unwrap();
        let fused = q.apply_op3(&k, &v, op).unwrap();

        // candle's ops: the rotary embedding as transformers writes it
        // (x cos + rotate_half(x) sin, per-sequence tables), K and V
        // repeated per query head, softmax spelled out.
        let full = |c: &Tensor| Tensor::cat(&[c, c], 2).unwrap().unsqueeze(1).unwrap();
        let (cos_full, sin_full) = (full(&cos), full(&sin));
        let rope = |x: &Tensor| {
            let (x1, x2) = (
                x.narrow(3, 0, d / 2).unwrap(),
                x.narrow(3, d / 2, d / 2).unwrap(),
            );
            let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
            (x.broadcast_mul(&cos_full).unwrap() + rotated.broadcast_mul(&sin_full).unwrap())
                .unwrap()
        };
        let repeat = |x: Tensor| {
            let x = x.unsqueeze(2).unwrap();
            x.broadcast_as((b, kvh, heads / kvh, t, d))
                .unwrap()
                .reshape((b, heads, t, d))
                .unwrap()
        };
        let qh = rope(&split_heads(&q, heads, d).contiguous().unwrap());
        let kh = repeat(rope(&split_heads(&k, kvh, d).contiguous().unwrap()));
        let vh = repeat(split_heads(&v, kvh, d));
        let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let reference = p
            .matmul(&vh.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * d))
            .unwrap();
        assert!(max_diff(&fused, &reference) < 1e-5);

        let g_fused = loss(&fused, 16).backward().unwrap();
        let g_ref = loss(&reference, 16).backward().unwrap();
        for v in [&q, &k, &v] {
            let (a, r) = (g_fused.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(max_diff(a, r) < 1e-4, "{}", max_diff(a, r));
        }
        // The mask and the rotary tables get none.
        for c in [&mask, &cos, &sin] {
            assert!(g_fused.get(c).is_none());
        }
    }

    #[test]
    fn add_transposed_product_accumulates_in_place() {
        let dst = randn(&[6, 5], 20);
        let before = dst.copy().unwrap();
        let (a, b) = (randn(&[4, 6], 21), randn(&[4, 5], 22));
        dst.inplace_op3(&a, &b, &AddTransposedProduct).unwrap();
        let want = (before + a.t().unwrap().matmul(&b).unwrap()).unwrap();
        assert!(max_diff(&dst, &want) < 1e-5);
        assert!(dst.inplace_op3(&b, &a, &AddTransposedProduct).is_err());
    }
}
