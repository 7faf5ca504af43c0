//! Continuous batching. Each [`Scheduler::step`]:
//! 1. drops what nobody waits for any more (a closed event channel: the
//!    client went away; a cancelled sample: the text layer saw a stop string)
//!    and frees its cache slots;
//! 2. admits waiting prompts in arrival order while cache slots,
//!    `max_num_seqs` and the prefill token budget allow, and prefills them in
//!    one batched forward; the `n` samples of a prompt share that prefill
//!    (the prompt's cache rows are copied to each sample's slot) and draw
//!    their first tokens from its logits. A prompt waits until all its
//!    samples fit, unless `n` exceeds `max_num_seqs`: then its samples start
//!    as slots free up, as vLLM's do, copying the prompt's cache rows from a
//!    running sample (or prefilling again when none runs), and samples
//!    started earlier go first;
//! 3. runs one decode step for every running sequence in one batched
//!    forward, samples, sends the tokens, retires finished sequences and
//!    frees their slots at once.

use std::collections::VecDeque;
use std::time::Instant;

use candle_core::{DType, Tensor};
use model::ModelConfig;
use model::decoder::{CausalLM, LogitsWanted};
use model::sampling::{SampledToken, Sampler};
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{
    CancelFlags, EngineConfig, EngineEvent, EngineState, Finish, GenerateRequest, PromptLogprob,
    Submission,
};
use crate::metrics::Metrics;

struct Sequence {
    sample: usize,
    slot: usize,
    sampler: Sampler,
    output: Vec<u32>,
    /// The last sampled token, not yet in the cache.
    pending: u32,
    last_token_at: Instant,
}

/// The running samples of one prompt.
struct Group {
    request: GenerateRequest,
    events: UnboundedSender<EngineEvent>,
    cancel: CancelFlags,
    arrived: Instant,
    seqs: Vec<Sequence>,
    /// Sample `j` is seeded with `seed + j`.
    seed: u64,
    /// Samples started so far (`request.n` once all have).
    started: usize,
    /// The prefill's logits at the last prompt position, kept while samples
    /// wait to start: they draw their first token from it.
    first_row: Vec<f32>,
}

impl Group {
    fn pending(&self) -> usize {
        self.request.n - self.started
    }

    /// Running samples, or samples still to start.
    fn is_live(&self) -> bool {
        !self.seqs.is_empty() || self.pending() > 0
    }
}

pub(crate) struct Scheduler {
    config: EngineConfig,
    eos: Vec<u32>,
    waiting: VecDeque<Submission>,
    waiting_seqs: usize,
    running: Vec<Group>,
    running_seqs: usize,
    /// Requests without a seed get `derive_seed(config.seed, counter)`.
    seed_counter: u64,
}

/// splitmix64: well-spread seeds from a base seed and a counter.
fn derive_seed(base: u64, counter: u64) -> u64 {
    let mut z = base ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// log-softmax of `row` at `token`, its rank, and the `k` best entries
/// (highest first, lower id first on ties).
pub(crate) fn logprob_and_top(row: &[f32], token: u32, k: usize) -> PromptLogprob {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + row
        .iter()
        .map(|&x| ((x - m) as f64).exp())
        .sum::<f64>()
        .ln() as f32;
    let own = row.get(token as usize).copied();
    let logprob = own.map_or(f32::NEG_INFINITY, |x| x - lse);
    let rank = match own {
        Some(x) => 1 + row.iter().filter(|&&y| y > x).count(),
        None => row.len() + 1,
    };
    let mut top_logprobs = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let by_value = |a: &u32, b: &u32| {
            row[*b as usize]
                .total_cmp(&row[*a as usize])
                .then_with(|| a.cmp(b))
        };
        let k = k.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_value);
        }
        idx.truncate(k);
        idx.sort_unstable_by(by_value);
        top_logprobs = idx
            .into_iter()
            .map(|i| (i, row[i as usize] - lse))
            .collect();
    }
    PromptLogprob {
        logprob,
        rank,
        top_logprobs,
    }
}

/// The log-probs of a prompt's tokens (`None` for the first) and the logits
/// row of its last position, from its hidden states `[T, H]`. The logits are
/// made a few rows at a time, so that a long prompt never holds `[T, V]`
/// (gigabytes with a 150k vocabulary) at once.
fn prompt_logprobs(
    lm: &CausalLM,
    hidden: &Tensor,
    prompt: &[u32],
    k: usize,
) -> Result<(Vec<Option<PromptLogprob>>, Vec<f32>), String> {
    // 8M logits (32 MiB in f32) a chunk.
    prompt_logprobs_in_chunks(lm, hidden, prompt, k, 1 << 23)
}

fn prompt_logprobs_in_chunks(
    lm: &CausalLM,
    hidden: &Tensor,
    prompt: &[u32],
    k: usize,
    logits_per_chunk: usize,
) -> Result<(Vec<Option<PromptLogprob>>, Vec<f32>), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let n = prompt.len();
    let vocab = lm.config().vocab_size.max(1);
    let chunk = (logits_per_chunk / vocab).clamp(1, n.max(1));
    let mut lps = Vec::with_capacity(n);
    lps.push(None);
    let mut last = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = lm
            .logits(&hidden.narrow(0, start, len).map_err(|e| err(&e))?)
            .map_err(|e| err(&e))?;
        let block = rows(&logits).map_err(|e| err(&e))?;
        for (j, row) in block.into_iter().enumerate() {
            let i = start + j;
            if i + 1 < n {
                lps.push(Some(logprob_and_top(&row, prompt[i + 1], k)));
            } else {
                last = row;
            }
        }
        start += len;
    }
    Ok((lps, last))
}

fn rows(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    logits.to_dtype(DType::F32)?.to_vec2::<f32>()
}

impl Scheduler {
    pub fn new(config: EngineConfig, cfg: &ModelConfig) -> Self {
        Scheduler {
            config,
            eos: cfg.eos_token_ids.clone(),
            waiting: VecDeque::new(),
            waiting_seqs: 0,
            running: Vec::new(),
            running_seqs: 0,
            seed_counter: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn enqueue(&mut self, sub: Submission, metrics: &Metrics) {
        self.waiting_seqs += sub.request.n;
        self.waiting.push_back(sub);
        metrics.num_requests_waiting.set(self.waiting_seqs as i64);
    }

    pub fn step(&mut self, state: &mut EngineState) {
        self.reap(state);
        self.admit(state);
        self.decode(state);
        state
            .metrics
            .num_requests_running
            .set(self.running_seqs as i64);
        state
            .metrics
            .num_requests_waiting
            .set(self.waiting_seqs as i64);
        let slots = state.cache.num_slots().max(1);
        let used = slots.saturating_sub(state.cache.num_free());
        state.metrics.kv_cache_usage.set(used as f64 / slots as f64);
    }

    /// Frees the slots of sequences nobody waits for.
    fn reap(&mut self, state: &mut EngineState) {
        let mut freed = 0;
        for g in &mut self.running {
            let gone = g.events.is_closed();
            if gone && g.pending() > 0 {
                self.waiting_seqs -= g.pending();
                g.started = g.request.n;
            }
            g.seqs.retain(|s| {
                let keep = !gone && !g.cancel.is_cancelled(s.sample);
                if !keep {
                    state.cache.release(s.slot);
                    // A cancelled sample saw its stop string; a closed
                    // channel is a client that went away.
                    let reason = if gone { "abort" } else { "stop" };
                    state.metrics.record_finish(reason, g.arrived);
                    freed += 1;
                }
                keep
            });
        }
        self.running_seqs -= freed;
        self.running.retain(Group::is_live);
        let before = self.waiting.len();
        let mut dropped_seqs = 0;
        self.waiting.retain(|s| {
            let keep = !s.events.is_closed();
            if !keep {
                dropped_seqs += s.request.n;
            }
            keep
        });
        if self.waiting.len() != before {
            self.waiting_seqs -= dropped_seqs;
        }
    }

    /// Takes waiting prompts that fit, prefills them, samples their first
    /// tokens.
    fn admit(&mut self, state: &mut EngineState) {
        self.start_pending(state);
        let mut batch: Vec<(Submission, Vec<usize>)> = Vec::new();
        let mut seqs = 0;
        let mut longest = 0;
        while let Some(front) = self.waiting.front() {
            let free = self
                .config
                .max_num_seqs
                .saturating_sub(self.running_seqs + seqs)
                .min(state.cache.num_free());
            // A prompt whose samples can never run together starts with
            // what is free now; the rest follow (`start_pending`).
            let n = if front.request.n > self.config.max_num_seqs {
                front.request.n.min(free.max(1))
            } else {
                front.request.n
            };
            let len = front.request.prompt.len();
            let fits_batch = n <= free;
            let fits_budget = batch.is_empty()
                || longest.max(len) * (batch.len() + 1) <= self.config.max_prefill_tokens;
            if !fits_batch || !fits_budget {
                break;
            }
            let Some(sub) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_seqs -= n;
            let slots: Vec<usize> = (0..n).filter_map(|_| state.cache.allocate()).collect();
            if slots.len() < n {
                // Cannot happen (num_free was checked); fail the request, not the engine.
                for s in slots {
                    state.cache.release(s);
                }
                let _ = sub
                    .events
                    .send(EngineEvent::Error("no free KV-cache slot".into()));
                continue;
            }
            seqs += n;
            longest = longest.max(len);
            state.metrics.prompt_tokens.inc_by(len as u64);
            batch.push((sub, slots));
        }
        if batch.is_empty() {
            return;
        }

        // Prompts whose token log-probs are wanted need every position's
        // logits; the rest share one batched forward that keeps the last.
        let (with_prompt_lp, plain): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(s, _)| s.request.prompt_logprobs.is_some());
        if !plain.is_empty() {
            let entries: Vec<(usize, &[u32])> = plain
                .iter()
                .map(|(s, slots)| (slots[0], s.request.prompt.as_slice()))
                .collect();
            let result = state
                .lm
                .forward_cached(&mut state.cache, &entries, LogitsWanted::Last)
                .map_err(|e| e.to_string())
                .and_then(|t| rows(&t).map_err(|e| e.to_string()));
            match result {
                Ok(rows) => {
                    for ((sub, slots), row) in plain.into_iter().zip(rows) {
                        self.start_group(state, sub, slots, &row, None);
                    }
                }
                Err(e) => {
                    for (sub, slots) in plain {
                        self.fail_admission(state, sub, slots, &e);
                    }
                }
            }
        }
        for (sub, slots) in with_prompt_lp {
            let prompt = sub.request.prompt.clone();
            let k = sub.request.prompt_logprobs.unwrap_or(0);
            let result = state
                .lm
                .forward_cached(
                    &mut state.cache,
                    &[(slots[0], &prompt)],
                    LogitsWanted::Hidden,
                )
                .and_then(|h| Ok(h.squeeze(0)?))
                .map_err(|e| e.to_string())
                .and_then(|hidden| prompt_logprobs(&state.lm, &hidden, &prompt, k));
            match result {
                Ok((lps, last)) => self.start_group(state, sub, slots, &last, Some(lps)),
                Err(e) => self.fail_admission(state, sub, slots, &e),
            }
        }
    }

    fn fail_admission(
        &mut self,
        state: &mut EngineState,
        sub: Submission,
        slots: Vec<usize>,
        error: &str,
    ) {
        tracing::error!("prefill failed: {error}");
        for s in slots {
            state.cache.release(s);
        }
        let _ = sub
            .events
            .send(EngineEvent::Error(format!("prefill failed: {error}")));
    }

    /// Shares the prefill with the other samples, draws every sample's first
    /// token from `row`, and puts the group in the running batch.
    fn start_group(
        &mut self,
        state: &mut EngineState,
        sub: Submission,
        slots: Vec<usize>,
        row: &[f32],
        prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    ) {
        let Submission {
            request,
            events,
            cancel,
            arrived,
            permit,
        } = sub;
        drop(permit);
        let len = request.prompt.len();
        for &slot in &slots[1..] {
            if let Err(e) = state.cache.copy_prefix(slots[0], slot, len) {
                for &s in &slots {
                    state.cache.release(s);
                }
                let _ = events.send(EngineEvent::Error(format!("prefill failed: {e}")));
                return;
            }
        }
        if let Some(lps) = prompt_logprobs {
            let _ = events.send(EngineEvent::PromptLogprobs(lps));
        }
        let seed = request.seed.unwrap_or_else(|| {
            self.seed_counter += 1;
            derive_seed(self.config.seed, self.seed_counter)
        });
        let now = Instant::now();
        let started = slots.len();
        let mut group = Group {
            request,
            events,
            cancel,
            arrived,
            seqs: Vec::with_capacity(slots.len()),
            seed,
            started,
            first_row: Vec::new(),
        };
        if group.pending() > 0 {
            group.first_row = row.to_vec();
        }
        let version = state.version.load(std::sync::atomic::Ordering::SeqCst);
        for (j, slot) in slots.into_iter().enumerate() {
            group.seqs.push(self.sequence(&group, j, slot));
        }
        self.running_seqs += group.seqs.len();
        let mut finished = Vec::new();
        for i in 0..group.seqs.len() {
            match self.sample_and_send(&mut group, i, row, version, now, state) {
                Ok(true) => finished.push(i),
                Ok(false) => {}
                Err(e) => {
                    self.fail_group(state, &mut group, &e);
                    return;
                }
            }
        }
        self.retire(state, &mut group, &finished);
        if group.is_live() {
            self.running.push(group);
        }
    }

    /// The tokens that end a sequence of `request`: EOS (unless
    /// `ignore_eos`) and its stop token ids. Empty without `min_tokens`,
    /// the one reader.
    fn stop_ids(&self, request: &GenerateRequest) -> Vec<u32> {
        if request.min_tokens == 0 {
            return Vec::new();
        }
        let eos = self.eos.iter().filter(|_| !request.ignore_eos);
        eos.chain(&request.stop_token_ids).copied().collect()
    }

    /// Sample `j` of `g` in `slot`, seeded with `g.seed + j`.
    fn sequence(&self, g: &Group, j: usize, slot: usize) -> Sequence {
        let mut sampler = Sampler::new(
            g.request.params.clone(),
            g.seed.wrapping_add(j as u64),
            self.config.logprobs_mode,
        )
        .with_min_tokens(g.request.min_tokens, self.stop_ids(&g.request));
        if let Some(guide) = &g.request.guide {
            sampler = match &g.request.guide_after {
                Some(marker) => sampler.with_guide_after(guide.clone(), marker),
                None => sampler.with_guide(guide.clone()),
            };
        }
        Sequence {
            sample: j,
            slot,
            sampler,
            output: Vec::new(),
            pending: 0,
            // Time to first token counts from the request's arrival.
            last_token_at: g.arrived,
        }
    }

    /// Starts samples of running groups that did not all fit when their
    /// prompt was admitted, as far as slots allow, oldest group first.
    fn start_pending(&mut self, state: &mut EngineState) {
        if self.running.iter().all(|g| g.pending() == 0) {
            return;
        }
        let version = state.version.load(std::sync::atomic::Ordering::SeqCst);
        let mut groups = std::mem::take(&mut self.running);
        for g in groups.iter_mut().filter(|g| g.pending() > 0) {
            let free = self
                .config
                .max_num_seqs
                .saturating_sub(self.running_seqs)
                .min(state.cache.num_free());
            let k = g.pending().min(free);
            if k == 0 {
                break;
            }
            let len = g.request.prompt.len();
            let mut first = None;
            for _ in 0..k {
                let Some(slot) = state.cache.allocate() else {
                    break;
                };
                // The prompt's rows: from a running sample, else a new prefill.
                let copied = match g.seqs.first().map(|s| s.slot) {
                    Some(src) => state
                        .cache
                        .copy_prefix(src, slot, len)
                        .map_err(|e| e.to_string()),
                    None => state
                        .lm
                        .forward_cached(
                            &mut state.cache,
                            &[(slot, &g.request.prompt)],
                            LogitsWanted::Last,
                        )
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = copied {
                    state.cache.release(slot);
                    self.fail_group(state, g, &format!("prefill failed: {e}"));
                    break;
                }
                let seq = self.sequence(g, g.started, slot);
                g.seqs.push(seq);
                g.started += 1;
                self.waiting_seqs -= 1;
                self.running_seqs += 1;
                first.get_or_insert(g.seqs.len() - 1);
            }
            let Some(first) = first else { continue };
            let row = std::mem::take(&mut g.first_row);
            let mut finished = Vec::new();
            let mut failed = None;
            for i in first..g.seqs.len() {
                match self.sample_and_send(g, i, &row, version, Instant::now(), state) {
                    Ok(true) => finished.push(i),
                    Ok(false) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if g.pending() > 0 {
                g.first_row = row;
            }
            match failed {
                Some(e) => self.fail_group(state, g, &e),
                None => self.retire(state, g, &finished),
            }
        }
        groups.retain(Group::is_live);
        self.running = groups;
    }

    /// One batched forward over every running sequence's pending token.
    fn decode(&mut self, state: &mut EngineState) {
        if self.running.is_empty() {
            return;
        }
        let result = {
            let entries: Vec<(usize, &[u32])> = self
                .running
                .iter()
                .flat_map(|g| g.seqs.iter())
                .map(|s| (s.slot, std::slice::from_ref(&s.pending)))
                .collect();
            state
                .lm
                .forward_cached(&mut state.cache, &entries, LogitsWanted::Last)
                .map_err(|e| e.to_string())
                .and_then(|t| rows(&t).map_err(|e| e.to_string()))
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("decode step failed: {e}");
                let mut groups = std::mem::take(&mut self.running);
                for g in &mut groups {
                    self.fail_group(state, g, &format!("decode step failed: {e}"));
                }
                return;
            }
        };
        let version = state.version.load(std::sync::atomic::Ordering::SeqCst);
        let now = Instant::now();
        let mut rows = rows.into_iter();
        let mut groups = std::mem::take(&mut self.running);
        for g in &mut groups {
            let group_rows: Vec<Vec<f32>> = rows.by_ref().take(g.seqs.len()).collect();
            let mut finished = Vec::new();
            let mut failed = None;
            for (i, row) in group_rows.iter().enumerate() {
                match self.sample_and_send(g, i, row, version, now, state) {
                    Ok(true) => finished.push(i),
                    Ok(false) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => self.fail_group(state, g, &e),
                None => self.retire(state, g, &finished),
            }
        }
        groups.retain(Group::is_live);
        self.running = groups;
    }

    /// Samples sequence `i` of `g` from `row`, sends the token; true when the
    /// sequence has finished.
    fn sample_and_send(
        &self,
        g: &mut Group,
        i: usize,
        row: &[f32],
        version: u64,
        now: Instant,
        state: &EngineState,
    ) -> Result<bool, String> {
        let prompt = &g.request.prompt;
        let seq = &mut g.seqs[i];
        let token: SampledToken = seq
            .sampler
            .sample(row, prompt, &seq.output)
            .map_err(|e| e.to_string())?;
        let id = token.token;
        seq.output.push(id);
        let m = &state.metrics;
        m.generation_tokens.inc();
        let since = now.duration_since(seq.last_token_at).as_secs_f64();
        if seq.output.len() == 1 {
            m.time_to_first_token.observe(since);
        } else {
            m.inter_token_latency.observe(since);
        }
        seq.last_token_at = now;
        let finish = if !g.request.ignore_eos && self.eos.contains(&id) {
            Some(Finish::Eos)
        } else if g.request.stop_token_ids.contains(&id) {
            Some(Finish::StopToken(id))
        } else if seq.output.len() >= g.request.max_tokens
            || prompt.len() + seq.output.len() >= self.config.max_model_len
        {
            Some(Finish::Length)
        } else {
            None
        };
        seq.pending = id;
        // Counted before the client hears of it: a /metrics read after the
        // response already shows the finished request.
        if let Some(f) = finish {
            let reason = match f {
                Finish::Length => "length",
                Finish::Eos | Finish::StopToken(_) => "stop",
            };
            m.record_finish(reason, g.arrived);
        }
        let _ = g.events.send(EngineEvent::Token {
            sample: seq.sample,
            token,
            weight_version: version,
            finish,
        });
        Ok(finish.is_some())
    }

    /// Removes the finished sequences (indexes into `g.seqs`) and frees their slots.
    fn retire(&mut self, state: &mut EngineState, g: &mut Group, finished: &[usize]) {
        for &i in finished.iter().rev() {
            let seq = g.seqs.remove(i);
            state.cache.release(seq.slot);
            self.running_seqs -= 1;
        }
    }

    fn fail_group(&mut self, state: &mut EngineState, g: &mut Group, error: &str) {
        for seq in g.seqs.drain(..) {
            state.cache.release(seq.slot);
            self.running_seqs -= 1;
        }
        self.waiting_seqs -= g.pending();
        g.started = g.request.n;
        let _ = g.events.send(EngineEvent::Error(error.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_entries_are_sorted_and_normalised() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprob_and_top(&row, 2, 3);
        let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln() as f32;
        assert!((lp.logprob - (2.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top_logprobs.iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        // vLLM's rank: 1 + the tokens strictly more likely (ties share).
        assert_eq!(lp.rank, 3);
        assert_eq!(logprob_and_top(&row, 1, 0).rank, 1);
        assert_eq!(logprob_and_top(&row, 3, 0).rank, 1);
        assert_eq!(logprob_and_top(&row, 0, 0).rank, 4);
    }

    /// The chunked prompt log-probs equal those of the whole `[T, V]` at
    /// once, whatever the chunk.
    #[test]
    fn prompt_logprobs_do_not_depend_on_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        model::presets::init_model(model::presets::Preset::Tiny, dir.path(), 0).unwrap();
        let lm = CausalLM::from_dir(dir.path(), &candle_core::Device::Cpu, DType::F32).unwrap();
        let prompt: Vec<u32> = vec![5, 9, 17, 3, 11, 8, 20];
        let mut cache =
            model::kv_cache::KvCache::new(lm.config(), 1, 64, lm.device(), DType::F32).unwrap();
        let slot = cache.allocate().unwrap();
        let hidden = lm
            .forward_cached(&mut cache, &[(slot, &prompt)], LogitsWanted::Hidden)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let all = rows(&lm.logits(&hidden).unwrap()).unwrap();
        let vocab = lm.config().vocab_size;
        for rows_per_chunk in [1, 2, 3, 7, 100] {
            let (lps, last) =
                prompt_logprobs_in_chunks(&lm, &hidden, &prompt, 3, rows_per_chunk * vocab)
                    .unwrap();
            assert_eq!(lps.len(), prompt.len());
            assert!(lps[0].is_none());
            for i in 1..prompt.len() {
                assert_eq!(
                    lps[i].as_ref().unwrap(),
                    &logprob_and_top(&all[i - 1], prompt[i], 3),
                    "chunk {rows_per_chunk}, token {i}"
                );
            }
            assert_eq!(last, all[prompt.len() - 1]);
        }
    }

    #[test]
    fn derived_seeds_differ() {
        assert_ne!(derive_seed(0, 1), derive_seed(0, 2));
        assert_eq!(derive_seed(5, 1), derive_seed(5, 1));
    }
}
