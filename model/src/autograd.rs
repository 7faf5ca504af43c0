//! Differentiable ops whose backward makes only the gradients training
//! needs. candle's own ops back-propagate into every operand, and keep the
//! gradient of a constant (a frozen weight, the attention mask, the rotary
//! tables, a detached max) to the end of the backward pass, since no later
//! node consumes it: as large as the activation it meets, per use. These
//! ops run candle's kernels forward (on a copy of their input: a custom op
//! gets storage, not tensors) and return only the gradient of the input
//! that needs one.

use candle_core::Tensor;

/// `x W^T` for a weight that does not train (LoRA's base weights, a frozen
/// output head). candle's matmul back-propagates into both operands; for a
/// frozen weight that is a product as large as the input's gradient, and a
/// weight-sized gradient kept per layer, both thrown away. This op's
/// backward makes only the input's gradient, `dy W`.
pub(crate) struct FrozenLinear {
    /// `[out, in]`
    pub(crate) weight: Tensor,
    /// `[in, out]`, contiguous, where kept (see `decoder::Linear`).
    pub(crate) weight_t: Option<Tensor>,
}

/// [`FrozenLinear`] plus LoRA's low-rank update: `x W^T + s (x A^T) B^T`,
/// applied to `(x, A, B)`. One op, so that the graph keeps only `x`, `A` and
/// `B` (as a full fine-tuning keeps `x` and `W`), not the base product, the
/// low-rank product and the `[rows, out]` update besides the sum; the
/// backward recomputes `x A^T` (`[rows, r]`, cheap).
pub(crate) struct FrozenLinearWithLora {
    pub(crate) frozen: FrozenLinear,
    pub(crate) scaling: f64,
    /// LoRA dropout's mask on the adapter's input (`[rows, in]`: 0, or
    /// `1 / (1 - p)`; PEFT's `lora_B(lora_A(dropout(x)))`); none: no dropout.
    pub(crate) dropout_mask: Option<Tensor>,
}

impl FrozenLinear {
    pub(crate) fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight_t {
            Some(wt) => x.matmul(wt),
            None => x.matmul(&self.weight.t()?),
        }
    }
}

impl FrozenLinearWithLora {
    /// The adapter's input: `x`, dropped out where there is a mask.
    fn adapter_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.dropout_mask {
            Some(m) => x.mul(m),
            None => Ok(x.clone()),
        }
    }

    /// `s x' A^T`, `[rows, r]`, for the adapter's input `x'`.
    fn low_rank(&self, x_in: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
        x_in.matmul(&a.t()?)? * self.scaling
    }

    fn product(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let low = self.low_rank(&self.adapter_input(x)?, a)?;
        self.frozen.product(x)? + low.matmul(&b.t()?)?
    }
}

/// Inverted dropout's mask `[rows, cols]`: each element 0 with probability
/// `p`, else `1 / (1 - p)`, a function of `seed` alone, so that a layer run
/// again (gradient checkpointing) draws the same mask. On the CPU from a
/// counter-based hash of (seed, element); on a GPU from cuRAND seeded with
/// `seed`.
pub(crate) fn dropout_mask(
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let keep = (1.0 / (1.0 - p)) as f32;
    if device.is_cpu() {
        let mut values = vec![0f32; rows * cols];
        values
            .par_chunks_mut(4096)
            .enumerate()
            .for_each(|(chunk, out)| {
                for (j, v) in out.iter_mut().enumerate() {
                    let i = (chunk * 4096 + j) as u64;
                    let bits = splitmix64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let u = (bits >> 11) as f64 / (1u64 << 53) as f64;
                    *v = if u < p { 0.0 } else { keep };
                }
            });
        return Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype);
    }
    device.set_seed(seed)?;
    let u = Tensor::rand(0f32, 1f32, (rows, cols), device)?;
    (u.ge(p)?.to_dtype(candle_core::DType::F32)? * keep as f64)?.to_dtype(dtype)
}

/// SplitMix64's output function: a well-mixed 64-bit hash of `x`.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An input of a custom op's forward as a tensor of its own (a copy of its
/// storage, viewed through its layout), for candle's ops to run on.
fn op_input(
    storage: candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a custom op of the learner's graph takes contiguous inputs")
    };
    let flat = Tensor::from_storage(storage, end, candle_core::op::BackpropOp::none(), false);
    flat.narrow(0, start, end - start)?.reshape(layout.shape())
}

/// `y` laid out from the start of its storage, as a custom op's result is
/// read (a fresh product is; a view is copied).
fn from_start(y: Tensor) -> candle_core::Result<Tensor> {
    match y.layout().contiguous_offsets() {
        Some((0, _)) => Ok(y),
        _ => y.force_contiguous(),
    }
}

/// A custom op's result on the CPU: the storage of `y`.
pub(crate) fn cpu_output(
    y: Tensor,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let y = from_start(y)?;
    let (out, _) = y.storage_and_layout();
    match &*out {
        candle_core::Storage::Cpu(s) => Ok((s.clone(), y.shape().clone())),
        _ => candle_core::bail!("a custom op's CPU inputs gave a result off the CPU"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_input(
    s: &candle_core::CudaStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<Tensor> {
    use candle_core::backend::BackendStorage;
    op_input(candle_core::Storage::Cuda(s.try_clone(l)?), l)
}

#[cfg(feature = "cuda")]
fn cuda_output(y: Tensor) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
    use candle_core::backend::BackendStorage;
    let y = from_start(y)?;
    let (out, layout) = y.storage_and_layout();
    match &*out {
        candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
        _ => candle_core::bail!("a custom op's CUDA inputs gave a result off the GPU"),
    }
}

pub(crate) fn cpu_input(
    s: &candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<Tensor> {
    op_input(candle_core::Storage::Cpu(s.clone()), l)
}

/// A one-input op of the learner's graph: a forward made of candle's ops
/// and the gradient of its input. [`apply`] runs it as a candle custom op.
pub(crate) trait InputOp: Send + Sync + 'static {
    const NAME: &'static str;
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// `x`'s gradient given `dy`'s (`None`: `x` needs none).
    fn input_grad(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>>;
}

/// `op` applied to `x`, with `op`'s gradient in the backward pass.
pub(crate) fn apply<T: InputOp>(x: &Tensor, op: T) -> candle_core::Result<Tensor> {
    x.apply_op1(Custom(op))
}

/// [`InputOp`] as candle's custom op.
struct Custom<T>(T);

impl<T: InputOp> candle_core::CustomOp1 for Custom<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        cpu_output(self.0.forward(&cpu_input(s, l)?)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda_output(self.0.forward(&cuda_input(s, l)?)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.0.input_grad(x, dy)
    }
}

impl InputOp for FrozenLinear {
    const NAME: &'static str = "frozen-linear";

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.product(x)
    }

    fn input_grad(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(if x.track_op() {
            Some(dy.matmul(&self.weight)?)
        } else {
            None
        })
    }
}

impl candle_core::CustomOp3 for FrozenLinearWithLora {
    fn name(&self) -> &'static str {
        "frozen-linear-with-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, a, b) = (cpu_input(s1, l1)?, cpu_input(s2, l2)?, cpu_input(s3, l3)?);
        cpu_output(self.product(&x, &a, &b)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (x, a, b) = (
            cuda_input(s1, l1)?,
            cuda_input(s2, l2)?,
            cuda_input(s3, l3)?,
        );
        cuda_output(self.product(&x, &a, &b)?)
    }

    /// With `x'` the adapter's input (`x` times the dropout mask `M`, or
    /// `x`), `u = s x' A^T` and `g = s dy B` (`[rows, r]`): `dB = dy^T u`,
    /// `dA = g^T x'`, `dx = dy W + (g A) M` (where `x` needs one).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x_in = self.adapter_input(x)?;
        let u = self.low_rank(&x_in, a)?;
        let g = (dy.matmul(b)? * self.scaling)?;
        let db = dy.t()?.matmul(&u)?;
        let da = g.t()?.matmul(&x_in)?;
        let dx = match self.frozen.input_grad(x, dy)? {
            Some(base) => Some((base + self.adapter_input(&g.matmul(a)?)?)?),
            None => None,
        };
        Ok((dx, Some(da), Some(db)))
    }
}

/// The rotary embedding as a differentiable op: a rotation of each pair
/// `(x_i, x_{i + d/2})` by the position's angle, whose gradient is the
/// rotation back (the same kernel with `-sin`).
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl InputOp for Rope {
    const NAME: &'static str = "rope";

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)
    }

    fn input_grad(&self, _x: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = candle_nn::rotary_emb::rope(&dy.contiguous()?, &self.cos, &self.sin.neg()?)?;
        Ok(Some(back))
    }
}

/// `x + c` or `x * c` for a `c` that takes no gradient (the attention mask,
/// a frozen norm weight or bias), broadcast to `x`. candle back-propagates
/// into both operands of its binary ops and keeps the gradient of a
/// constant's broadcast, `x`'s size, to the end of the backward pass; this
/// op makes only `x`'s.
pub(crate) struct ConstOperand {
    c: Tensor,
    multiply: bool,
}

impl ConstOperand {
    pub(crate) fn add(c: &Tensor) -> Self {
        ConstOperand {
            c: c.clone(),
            multiply: false,
        }
    }

    pub(crate) fn mul(c: &Tensor) -> Self {
        ConstOperand {
            c: c.clone(),
            multiply: true,
        }
    }
}

impl InputOp for ConstOperand {
    const NAME: &'static str = "const-operand";

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.multiply {
            x.broadcast_mul(&self.c)
        } else {
            x.broadcast_add(&self.c)
        }
    }

    fn input_grad(&self, _x: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(if self.multiply {
            dy.broadcast_mul(&self.c)?
        } else {
            dy.clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU mask of 300 x 400, as a vector.
    fn mask(p: f64, seed: u64) -> Vec<f32> {
        let cpu = candle_core::Device::Cpu;
        dropout_mask(300, 400, p, seed, &cpu, candle_core::DType::F32)
            .and_then(|m| m.flatten_all())
            .and_then(|m| m.to_vec1())
            .unwrap()
    }

    #[test]
    fn dropout_masks_drop_p_and_scale_the_rest_by_one_over_one_minus_p() {
        let p = 0.25;
        let v = mask(p, 42);
        let zeros = v.iter().filter(|x| **x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - p).abs() < 0.01, "{zeros}");
        let keep = (1.0 / (1.0 - p)) as f32;
        assert!(v.iter().all(|x| *x == 0.0 || *x == keep));
        // E[mask] = 1: the adapter's input keeps its expected value.
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        assert_eq!(mask(p, 42), v);
        assert_ne!(mask(p, 43), v);
    }
}
