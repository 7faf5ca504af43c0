//! A slot-based KV cache for continuous batching.
//!
//! The cache holds `num_slots` sequences of up to `max_len` tokens each,
//! preallocated once. A sequence takes a free slot when it joins the batch
//! and gives it back when it leaves; nothing else moves. Per layer, keys and
//! values are stored as `[num_slots * max_len, kv_heads, head_dim]`, so that
//! the positions of one sequence are consecutive rows: a batched step writes
//! its new rows in place (one scatter per layer) and gathers the rows of its
//! sequences.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// The rows one step writes: see [`KvCache::write_index`].
pub(crate) struct WriteIndex {
    /// Rows of the step's flattened `[B * T]` positions that are real
    /// tokens; `None` when all are.
    src: Option<Tensor>,
    /// The cache row of each, repeated over `[kv_heads, head_dim]`.
    dst: Tensor,
}

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Tokens held by each slot; `None` when the slot is free.
    lens: Vec<Option<usize>>,
    max_len: usize,
    device: Device,
}

impl KvCache {
    pub fn new(
        cfg: &ModelConfig,
        num_slots: usize,
        max_len: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if num_slots == 0 || max_len == 0 {
            return Err(ModelError::Invalid(
                "a KV cache needs at least one slot of at least one token".into(),
            ));
        }
        let shape = (num_slots * max_len, cfg.num_key_value_heads, cfg.head_dim);
        let layer = || Tensor::zeros(shape, dtype, device);
        let k = (0..cfg.num_hidden_layers)
            .map(|_| layer())
            .collect::<candle_core::Result<_>>()?;
        let v = (0..cfg.num_hidden_layers)
            .map(|_| layer())
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache {
            k,
            v,
            lens: vec![None; num_slots],
            max_len,
            device: device.clone(),
        })
    }

    /// Bytes one slot holds at full length (for sizing the cache to a budget).
    pub fn bytes_per_slot(cfg: &ModelConfig, max_len: usize, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers
            * max_len
            * cfg.num_key_value_heads
            * cfg.head_dim
            * dtype.size_in_bytes()
    }

    pub fn num_slots(&self) -> usize {
        self.lens.len()
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn num_free(&self) -> usize {
        self.lens.iter().filter(|l| l.is_none()).count()
    }

    /// Takes a free slot (empty), or `None` when all are in use.
    pub fn allocate(&mut self) -> Option<usize> {
        let slot = self.lens.iter().position(Option::is_none)?;
        self.lens[slot] = Some(0);
        Some(slot)
    }

    /// Gives a slot back; its contents are forgotten.
    pub fn release(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = None;
        }
    }

    /// Tokens held by `slot` (`None` when free or out of range).
    pub fn len(&self, slot: usize) -> Option<usize> {
        self.lens.get(slot).copied().flatten()
    }

    /// Copies the first `len` positions of `from` into the allocated slot `to`
    /// and sets its length: the `n` samples of one prompt share its prefill.
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) -> Result<()> {
        let held = self.len(from).ok_or_else(|| self.free_slot_error(from))?;
        self.len(to).ok_or_else(|| self.free_slot_error(to))?;
        if len > held || from == to {
            return Err(ModelError::Invalid(format!(
                "cannot copy {len} positions of slot {from} (holds {held}) into slot {to}"
            )));
        }
        for cache in self.k.iter().chain(self.v.iter()) {
            // A narrow along dim 0 shares storage with the cache: copy it out
            // first, only its rows (`copy` would clone the whole cache).
            let src = cache
                .narrow(0, from * self.max_len, len)?
                .force_contiguous()?;
            cache.slice_set(&src, 0, to * self.max_len)?;
        }
        self.lens[to] = Some(len);
        Ok(())
    }

    fn free_slot_error(&self, slot: usize) -> ModelError {
        ModelError::Invalid(format!("KV cache slot {slot} is not allocated"))
    }

    /// Checks that `slot` can take `n` more tokens; returns where they start.
    pub(crate) fn reserve(&self, slot: usize, n: usize) -> Result<usize> {
        let start = self.len(slot).ok_or_else(|| self.free_slot_error(slot))?;
        if start + n > self.max_len {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds the KV cache's {} positions per sequence",
                start + n,
                self.max_len
            )));
        }
        Ok(start)
    }

    /// Where a batched step's new keys and values go, for [`Self::write`]:
    /// computed once per step (every layer writes the same rows). `entries`
    /// are (slot, start position, tokens) in batch order; the step's tensors
    /// hold `t` positions per sequence, right-padded.
    pub(crate) fn write_index(
        &self,
        entries: impl Iterator<Item = (usize, usize, usize)>,
        t: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<WriteIndex> {
        let mut src = Vec::new();
        let mut dst = Vec::new();
        let mut padded = false;
        for (bi, (slot, start, len)) in entries.enumerate() {
            padded |= len < t;
            for i in 0..len {
                src.push((bi * t + i) as u32);
                dst.push((slot * self.max_len + start + i) as u32);
            }
        }
        let rows = dst.len();
        // scatter_set wants one index per element, laid out contiguously.
        let dst = Tensor::from_vec(dst, (rows, 1, 1), &self.device)?
            .broadcast_as((rows, kv_heads, head_dim))?
            .contiguous()?;
        // Padding positions are left out, so that they never land in a slot.
        let src = if padded {
            Some(Tensor::from_vec(src, rows, &self.device)?)
        } else {
            None
        };
        Ok(WriteIndex { src, dst })
    }

    /// Writes the step's keys and values (`[B, kv_heads, T, d]`) of layer
    /// `layer` into their slots: one scatter for the whole batch (a copy
    /// per sequence costs more than the attention at large batches).
    pub(crate) fn write(
        &self,
        layer: usize,
        index: &WriteIndex,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        for (cache, new) in [(&self.k[layer], k), (&self.v[layer], v)] {
            let (b, kvh, t, d) = new.dims4()?;
            let rows = new
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, kvh, d))?;
            let rows = match &index.src {
                Some(src) => rows.index_select(src, 0)?,
                None => rows,
            };
            cache.scatter_set(&index.dst, &rows, 0)?;
        }
        Ok(())
    }

    /// Row indices of positions `0..tk` of each slot, for [`Self::gather`].
    pub(crate) fn gather_index(
        &self,
        slots: impl Iterator<Item = usize>,
        tk: usize,
    ) -> Result<Tensor> {
        let idx: Vec<u32> = slots
            .flat_map(|s| (0..tk).map(move |j| (s * self.max_len + j) as u32))
            .collect();
        let n = idx.len();
        Ok(Tensor::from_vec(idx, n, &self.device)?)
    }

    /// Keys and values of `b` sequences, `[b, kv_heads, tk, d]` each.
    pub(crate) fn gather(
        &self,
        layer: usize,
        index: &Tensor,
        b: usize,
        tk: usize,
    ) -> Result<(Tensor, Tensor)> {
        let pick = |cache: &Tensor| -> Result<Tensor> {
            let (_, kvh, d) = cache.dims3()?;
            Ok(cache
                .index_select(index, 0)?
                .reshape((b, tk, kvh, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        Ok((pick(&self.k[layer])?, pick(&self.v[layer])?))
    }

    /// The cache row of `slot`'s first position.
    pub(crate) fn first_row(&self, slot: usize) -> usize {
        slot * self.max_len
    }

    /// Layer `layer`'s keys and values, `[num_slots * max_len, kv_heads, d]`.
    pub(crate) fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(ModelError::Invalid(format!(
                "the KV cache has no layer {layer}"
            ))),
        }
    }

    pub(crate) fn commit(&mut self, slot: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = Some(len);
        }
    }

    /// Forgets the last positions of `slot`, keeping `len` (e.g. to re-run a
    /// step after a failed one).
    pub fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        let held = self.len(slot).ok_or_else(|| self.free_slot_error(slot))?;
        self.lens[slot] = Some(held.min(len));
        Ok(())
    }
}
