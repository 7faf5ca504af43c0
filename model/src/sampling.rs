//! Next-token sampling with vLLM's semantics, one [`Sampler`] per sequence.
//!
//! Order of operations (vLLM v1 `Sampler.forward` / `sample`):
//! 1. raw log-probs are taken from the logits as the model produced them;
//! 2. penalties: repetition (prompt + output tokens), then frequency and
//!    presence (output tokens only);
//! 3. greedy (`temperature < 1e-5`): argmax, processed log-probs are the
//!    log-softmax of the penalized logits;
//! 4. otherwise temperature, then min-p, then top-k, then top-p (computed on
//!    the distribution left by top-k), then a draw from the renormalized
//!    distribution; processed log-probs are the log-softmax of those logits
//!    (filtered tokens get `-inf`).
//!
//! The RNG is per sequence (`ChaCha8Rng` seeded by the caller), so a seeded
//! request yields the same tokens whatever else is in the batch.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::guided::RegexGuide;
use regex_automata::util::primitives::StateID;

/// Below this temperature sampling is greedy (vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

/// The sampling fields of an OpenAI/vLLM request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// `< 1e-5` means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 or -1 disables.
    pub top_k: i32,
    /// 0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Number of top log-probs to return besides the sampled token's.
    pub logprobs: Option<usize>,
    /// OpenAI's `logit_bias`: added to these tokens' logits before the
    /// penalties (vLLM's order), so processed log-probs include it.
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `allowed_token_ids`, ascending: only these can be sampled
    /// (empty: any).
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words` as token sequences: a sequence's last token
    /// cannot follow an output that ends with the rest of it (a one-token
    /// word is never sampled).
    pub bad_words_token_ids: Vec<Vec<u32>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Rejects what vLLM's `SamplingParams._verify_args` rejects. NaN fails
    /// every range check (the comparisons are written so that it does).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::Invalid(msg));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be non-negative, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < -1 {
            return bad(format!(
                "top_k must be -1 or 0 (disable), or at least 1, got {}",
                self.top_k
            ));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be greater than zero, got {}",
                self.repetition_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return bad(format!(
                "logit_bias must be finite numbers, got {b} for token {id}"
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }
}

/// vLLM's `--logprobs-mode` (the two modes that return log-probs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogprobsMode {
    /// log_softmax of the model's logits before any processing (vLLM default).
    #[default]
    RawLogprobs,
    /// log_softmax after penalties, temperature and min-p/top-k/top-p
    /// (after penalties only for greedy requests).
    ProcessedLogprobs,
}

impl std::str::FromStr for LogprobsMode {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw_logprobs" => Ok(LogprobsMode::RawLogprobs),
            "processed_logprobs" => Ok(LogprobsMode::ProcessedLogprobs),
            other => Err(ModelError::Invalid(format!(
                "logprobs_mode must be raw_logprobs or processed_logprobs, got {other:?}"
            ))),
        }
    }
}

impl std::fmt::Display for LogprobsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogprobsMode::RawLogprobs => "raw_logprobs",
            LogprobsMode::ProcessedLogprobs => "processed_logprobs",
        })
    }
}

/// One sampled token with its log-prob and the top log-probs (in the
/// sampler's [`LogprobsMode`]). Filtered tokens have `-inf` in processed mode.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    pub logprob: f32,
    /// `params.logprobs` entries, highest first (ties: lower id first).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Vocabulary-sized scratch space. Thread-local rather than per sampler: a
/// server holds hundreds of samplers and a 150k vocabulary would cost
/// megabytes each. It also makes sampling rows on several threads safe.
#[derive(Default)]
struct Scratch {
    /// Logits after penalties and filters (`-inf` = filtered).
    work: Vec<f32>,
    /// `exp(work - max)`, 0 for filtered tokens.
    probs: Vec<f32>,
    idx: Vec<u32>,
    vals: Vec<f32>,
    hist: Vec<f64>,
    keys: Vec<u64>,
    heap: BinaryHeap<Reverse<u64>>,
    counts: Vec<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Samples the tokens of one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    mode: LogprobsMode,
    rng: ChaCha8Rng,
    /// vLLM's `min_tokens`: while the output is shorter, these tokens (EOS
    /// and the stop token ids) cannot be sampled.
    min_tokens: usize,
    stop_ids: Vec<u32>,
    /// Guided decoding: the pattern and where the output has taken it.
    guide: Option<(Arc<RegexGuide>, StateID)>,
    /// Guided decoding that starts once the output has written a marker (a
    /// reasoning model's `</think>`): the marker, and the output's last
    /// bytes so far.
    guide_after: Option<(Vec<u8>, Vec<u8>)>,
}

impl Sampler {
    /// `seed` is the request's seed, or one the caller derives for unseeded
    /// requests. `params` should have passed [`SamplingParams::validate`].
    pub fn new(params: SamplingParams, seed: u64, mode: LogprobsMode) -> Self {
        Sampler {
            params,
            mode,
            rng: ChaCha8Rng::seed_from_u64(seed),
            min_tokens: 0,
            stop_ids: Vec::new(),
            guide: None,
            guide_after: None,
        }
    }

    /// Guided decoding (vLLM's `guided_regex`): only tokens that keep the
    /// output on the way to matching `guide` have a probability, and the
    /// end of the sequence only once it matches. Raw log-probs are the
    /// model's all the same.
    pub fn with_guide(mut self, guide: Arc<RegexGuide>) -> Self {
        let start = guide.start();
        self.guide = Some((guide, start));
        self
    }

    /// [`Self::with_guide`] from the token after the output writes
    /// `marker` on: vLLM with a reasoning parser guides the answer, not the
    /// thinking before its `</think>`. Text the marker's token writes past
    /// it counts toward the pattern.
    pub fn with_guide_after(mut self, guide: Arc<RegexGuide>, marker: &str) -> Self {
        self = self.with_guide(guide);
        // An empty marker is already written: the guide holds at once.
        self.guide_after = (!marker.is_empty()).then(|| (marker.as_bytes().to_vec(), Vec::new()));
        self
    }

    /// vLLM's `min_tokens`: the tokens that would end the sequence
    /// (`stop_ids`: its EOS and stop token ids) get probability zero until
    /// the output has `min_tokens` tokens, as vLLM's min-tokens logits
    /// processor does. Raw log-probs are those of the model all the same.
    pub fn with_min_tokens(mut self, min_tokens: usize, stop_ids: Vec<u32>) -> Self {
        self.min_tokens = min_tokens;
        self.stop_ids = stop_ids;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn logprobs_mode(&self) -> LogprobsMode {
        self.mode
    }

    /// Moves the guide on by `token`, or, while it waits for its marker,
    /// looks for the marker in the output's last bytes.
    fn follow_guide(&mut self, token: u32) {
        let Some((guide, state)) = &mut self.guide else {
            return;
        };
        let Some((marker, tail)) = &mut self.guide_after else {
            *state = guide.advance(*state, token);
            return;
        };
        tail.extend_from_slice(guide.token_bytes(token).unwrap_or_default());
        if let Some(at) = tail
            .windows(marker.len())
            .position(|w| w == marker.as_slice())
        {
            let after = &tail[at + marker.len()..];
            *state = guide.start_with(after).unwrap_or(guide.start());
            self.guide_after = None;
        } else {
            // Keep only what a marker cut between tokens may start with.
            let keep = marker.len().saturating_sub(1).min(tail.len());
            tail.drain(..tail.len() - keep);
        }
    }

    /// Samples the next token from one row of logits. `prompt_tokens` and
    /// `output_tokens` feed the penalties; ids outside the vocabulary are
    /// ignored there (vLLM drops them the same way).
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt_tokens: &[u32],
        output_tokens: &[u32],
    ) -> Result<SampledToken> {
        let raw_max = check_logits(logits)?;
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            self.sample_with(&mut guard, logits, raw_max, prompt_tokens, output_tokens)
        })
    }

    fn sample_with(
        &mut self,
        s: &mut Scratch,
        raw: &[f32],
        raw_max: f32,
        prompt_tokens: &[u32],
        output_tokens: &[u32],
    ) -> Result<SampledToken> {
        let p = &self.params;
        s.work.clear();
        s.work.extend_from_slice(raw);
        for &(id, bias) in &p.logit_bias {
            if let Some(x) = s.work.get_mut(id as usize) {
                *x += bias;
            }
        }
        let mut penalized = !p.logit_bias.is_empty();
        penalized |= apply_penalties(
            &mut s.work,
            &mut s.counts,
            prompt_tokens,
            output_tokens,
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        );
        if output_tokens.len() < self.min_tokens {
            for &id in &self.stop_ids {
                if let Some(x) = s.work.get_mut(id as usize) {
                    *x = f32::NEG_INFINITY;
                    penalized = true;
                }
            }
        }
        // The guide, unless it waits for its marker.
        let active = self.guide.as_ref().filter(|_| self.guide_after.is_none());
        if let Some((guide, state)) = active {
            let allowed = guide.allowed(*state);
            if allowed.is_empty() {
                return Err(ModelError::Invalid(format!(
                    "guided decoding: no token continues the output toward a match of {:?}",
                    guide.pattern()
                )));
            }
            for (id, x) in s.work.iter_mut().enumerate() {
                if !allowed.contains(id as u32) {
                    *x = f32::NEG_INFINITY;
                }
            }
            // Short of min_tokens: no token into a part of the pattern too
            // short to hold the tokens still owed (`["yes", "nooooo"]` with
            // min_tokens 5 goes the long way), so that its end is not
            // reached while min_tokens bans it.
            if let Some(owed) = self.min_tokens.checked_sub(output_tokens.len() + 1) {
                for (id, x) in s.work.iter_mut().enumerate() {
                    if *x != f32::NEG_INFINITY && !guide.leaves_room(*state, id as u32, owed) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            penalized = true;
        }
        if !p.allowed_token_ids.is_empty() {
            keep_only(&mut s.work, &p.allowed_token_ids);
            penalized = true;
        }
        for word in &p.bad_words_token_ids {
            if let Some((&last, rest)) = word.split_last()
                && output_tokens.ends_with(rest)
                && let Some(x) = s.work.get_mut(last as usize)
            {
                *x = f32::NEG_INFINITY;
                penalized = true;
            }
        }
        let none_left = || match active {
            // The guide's tokens are all banned by the other rules: say
            // which, since neither alone is wrong.
            Some((guide, state)) => ModelError::Invalid(format!(
                "guided decoding: every token that continues {:?} here{} is banned by \
                 min_tokens, bad_words, allowed_token_ids or logit_bias",
                guide.pattern(),
                if guide.is_complete(*state) {
                    " (the text so far matches, so its end is among them)"
                } else {
                    ""
                }
            )),
            None => ModelError::Invalid(
                "logits: every token has probability zero after penalties".into(),
            ),
        };

        // Log-softmax normalizers (max + ln(sum exp(x - max))) found on the way.
        let (token, processed_lse, raw_lse) = if p.is_greedy() {
            (argmax(&s.work).ok_or_else(none_left)?, None, None)
        } else {
            let mut modified = penalized;
            if p.temperature != 1.0 {
                let t = p.temperature;
                s.work.iter_mut().for_each(|x| *x /= t);
                modified = true;
            }
            // top-k in logit space; it commutes with min-p (both keep every
            // token above a threshold that the other does not move).
            if p.top_k > 0 && (p.top_k as usize) < s.work.len() {
                let threshold = kth_largest(&s.work, p.top_k as usize, &mut s.heap, &mut s.keys);
                for x in s.work.iter_mut() {
                    if *x < threshold {
                        *x = f32::NEG_INFINITY;
                    }
                }
                modified = true;
            }
            let m = if modified { max_f32(&s.work) } else { raw_max };
            if m == f32::NEG_INFINITY {
                return Err(none_left());
            }
            let full_total = exp_into(&s.work, m, &mut s.probs);
            let mut total = full_total;
            if p.min_p > 0.0 {
                // vLLM: p < min_p * p_max; p_max is exp(0) = 1 here.
                total = mask_below(&mut s.work, &mut s.probs, p.min_p);
            }
            let mut kept: &[u32] = &[];
            if p.top_p < 1.0 {
                let (n, kept_total) = apply_top_p(
                    &mut s.work,
                    &mut s.probs,
                    &mut TopPScratch {
                        idx: &mut s.idx,
                        vals: &mut s.vals,
                        hist: &mut s.hist,
                    },
                    total,
                    p.top_p,
                );
                kept = &s.idx[..n];
                total = kept_total;
            }
            let u = self.rng.random::<f64>() * total;
            let token = if kept.is_empty() {
                draw(&s.probs, 0..s.probs.len(), u)
            } else {
                draw(&s.probs, kept.iter().map(|&i| i as usize), u)
            }
            .ok_or_else(none_left)?;
            // The raw normalizer comes for free when nothing changed the logits.
            let raw_lse = (!modified).then(|| m + full_total.ln() as f32);
            (token, Some(m + total.ln() as f32), raw_lse)
        };

        let lse = match self.mode {
            LogprobsMode::RawLogprobs => match raw_lse {
                Some(l) => l,
                None => log_sum_exp(raw, raw_max, &mut s.probs),
            },
            LogprobsMode::ProcessedLogprobs => match processed_lse {
                Some(l) => l,
                None => log_sum_exp(&s.work, max_f32(&s.work), &mut s.probs),
            },
        };
        let source: &[f32] = match self.mode {
            LogprobsMode::RawLogprobs => raw,
            LogprobsMode::ProcessedLogprobs => &s.work,
        };
        let logprob = source[token] - lse;
        let k = self.params.logprobs.unwrap_or(0).min(source.len());
        let top_logprobs = top_k_sorted(source, k, &mut s.heap, &mut s.keys)
            .map(|i| (i, source[i as usize] - lse))
            .collect();
        self.follow_guide(token as u32);
        Ok(SampledToken {
            token: token as u32,
            logprob,
            top_logprobs,
        })
    }
}

/// Masks every logit but those of `allowed` (ascending ids).
fn keep_only(work: &mut [f32], allowed: &[u32]) {
    let mut next = allowed.iter().copied().peekable();
    for (id, x) in work.iter_mut().enumerate() {
        if next.peek() == Some(&(id as u32)) {
            next.next();
        } else {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Returns the largest logit. `-inf` is a legitimate mask; NaN or `+inf`
/// means the forward pass broke.
fn check_logits(logits: &[f32]) -> Result<f32> {
    if logits.is_empty() {
        return Err(ModelError::Invalid("logits: empty row".into()));
    }
    // Lanes keep this vectorized.
    let mut lanes = [false; LANES];
    let chunks = logits.chunks_exact(LANES);
    let mut bad = chunks
        .remainder()
        .iter()
        .any(|x| x.is_nan() | (*x == f32::INFINITY));
    for c in chunks {
        for j in 0..LANES {
            lanes[j] |= c[j].is_nan() | (c[j] == f32::INFINITY);
        }
    }
    bad |= lanes.iter().any(|b| *b);
    if bad {
        let (i, x) = logits
            .iter()
            .enumerate()
            .find(|(_, x)| x.is_nan() || **x == f32::INFINITY)
            .unwrap_or((0, &f32::NAN));
        return Err(ModelError::Invalid(format!(
            "logits[{i}] is {x}: the model produced non-finite logits"
        )));
    }
    let m = max_f32(logits);
    if m == f32::NEG_INFINITY {
        return Err(ModelError::Invalid("logits: every entry is -inf".into()));
    }
    Ok(m)
}

/// vLLM `apply_penalties`: repetition over prompt+output tokens (positive
/// logits divided, others multiplied), then
/// `logit -= frequency * count + presence * (count > 0)` over output tokens.
/// `counts` is zero outside this function and only the touched ids are
/// visited, so the cost is O(tokens), not O(vocabulary). Returns whether any
/// penalty is active.
fn apply_penalties(
    logits: &mut [f32],
    counts: &mut Vec<u32>,
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    repetition: f32,
    frequency: f32,
    presence: f32,
) -> bool {
    let v = logits.len();
    let active_rep = repetition != 1.0;
    let active_freq = frequency != 0.0 || presence != 0.0;
    if !active_rep && !active_freq {
        return false;
    }
    if counts.len() < v {
        counts.resize(v, 0);
    }
    let in_vocab = |t: &&u32| (**t as usize) < v;
    if active_rep {
        for &t in prompt_tokens.iter().chain(output_tokens).filter(in_vocab) {
            let t = t as usize;
            if counts[t] == 0 {
                counts[t] = 1;
                let x = &mut logits[t];
                if *x > 0.0 {
                    *x /= repetition;
                } else {
                    *x *= repetition;
                }
            }
        }
        for &t in prompt_tokens.iter().chain(output_tokens).filter(in_vocab) {
            counts[t as usize] = 0;
        }
    }
    if active_freq {
        for &t in output_tokens.iter().filter(in_vocab) {
            counts[t as usize] += 1;
        }
        for &t in output_tokens.iter().filter(in_vocab) {
            let t = t as usize;
            let c = counts[t];
            if c > 0 {
                logits[t] -= frequency * c as f32 + presence;
                counts[t] = 0;
            }
        }
    }
    true
}

/// Independent accumulators so that the compiler can vectorize reductions
/// (float sums are not reassociated otherwise).
const LANES: usize = 8;

fn max_f32(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            lanes[j] = lanes[j].max(c[j]);
        }
    }
    rest.iter()
        .chain(lanes.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

fn argmax(xs: &[f32]) -> Option<usize> {
    let m = max_f32(xs);
    if m == f32::NEG_INFINITY {
        return None;
    }
    // First maximum wins, like torch.argmax.
    xs.iter().position(|&x| x == m)
}

/// `exp(x)` for `x <= 0` (Cephes `expf`, about 1 ulp), written without calls
/// or branches so that loops over it vectorize; `-inf` and anything below
/// -87 give exactly 0.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the low bits of `shifted` (which hold n + 2^22): integer
    // ops only, unlike a float-to-int cast, so the loop stays vectorized.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { y * scale }
}

/// `out[i] = exp(xs[i] - m)`; returns their sum. Two simple loops
/// vectorize where a fused one does not.
fn exp_into(xs: &[f32], m: f32, out: &mut Vec<f32>) -> f64 {
    out.clear();
    out.extend(xs.iter().map(|&x| exp_nonpos(x - m)));
    sum_f64(out)
}

fn sum_f64(xs: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for j in 0..LANES {
            lanes[j] += c[j] as f64;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

fn log_sum_exp(xs: &[f32], m: f32, scratch: &mut Vec<f32>) -> f32 {
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + exp_into(xs, m, scratch).ln() as f32
}

/// Filters tokens with `prob < threshold` (probs relative to the max);
/// returns the mass left.
fn mask_below(work: &mut [f32], probs: &mut [f32], threshold: f32) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut w = work.chunks_exact_mut(LANES);
    let mut pr = probs.chunks_exact_mut(LANES);
    for (wc, pc) in (&mut w).zip(&mut pr) {
        for j in 0..LANES {
            let drop = pc[j] < threshold;
            wc[j] = if drop { f32::NEG_INFINITY } else { wc[j] };
            pc[j] = if drop { 0.0 } else { pc[j] };
            lanes[j] += pc[j] as f64;
        }
    }
    let mut total: f64 = lanes.iter().sum();
    for (wx, px) in w.into_remainder().iter_mut().zip(pr.into_remainder()) {
        if *px < threshold {
            *wx = f32::NEG_INFINITY;
            *px = 0.0;
        }
        total += *px as f64;
    }
    total
}

/// Total order on f32 as u32 (larger float, larger key).
#[inline(always)]
fn ord_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// Orders by value, then lower id first: larger key = better.
#[inline(always)]
fn rank_key(x: f32, i: usize) -> u64 {
    ((ord_key(x) as u64) << 32) | (!(i as u32)) as u64
}

/// Keys of the `k` best entries, unordered. Small k: a bounded min-heap that
/// most entries fail to enter with one float compare. Large k: selection.
fn top_k_keys<'a>(
    xs: &[f32],
    k: usize,
    heap: &'a mut BinaryHeap<Reverse<u64>>,
    keys: &'a mut Vec<u64>,
) -> &'a [u64] {
    keys.clear();
    let k = k.min(xs.len());
    if k == 0 {
        return keys;
    }
    if k <= 1024 {
        heap.clear();
        let mut floor = f32::NEG_INFINITY;
        // `floor`: the heap's smallest value once it holds k entries.
        let offer = |i: usize, x: f32, heap: &mut BinaryHeap<Reverse<u64>>, floor: &mut f32| {
            if heap.len() < k {
                heap.push(Reverse(rank_key(x, i)));
                if heap.len() == k {
                    *floor = heap.peek().map_or(*floor, |r| key_value(r.0));
                }
            } else if x >= *floor {
                let key = rank_key(x, i);
                if let Some(mut top) = heap.peek_mut()
                    && key > top.0
                {
                    *top = Reverse(key);
                }
                *floor = heap.peek().map_or(*floor, |r| key_value(r.0));
            }
        };
        // Once the heap is full, most chunks are skipped on their max alone.
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.len() * LANES;
        for (c, chunk) in chunks.enumerate() {
            let mut cm = f32::NEG_INFINITY;
            for &x in chunk {
                cm = cm.max(x);
            }
            if heap.len() == k && cm < floor {
                continue;
            }
            for (j, &x) in chunk.iter().enumerate() {
                offer(c * LANES + j, x, heap, &mut floor);
            }
        }
        for (j, &x) in xs[tail..].iter().enumerate() {
            offer(tail + j, x, heap, &mut floor);
        }
        keys.extend(heap.drain().map(|r| r.0));
    } else {
        keys.extend(xs.iter().enumerate().map(|(i, &x)| rank_key(x, i)));
        keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        keys.truncate(k);
    }
    keys
}

fn key_value(key: u64) -> f32 {
    let b = (key >> 32) as u32;
    f32::from_bits(if b >> 31 == 1 { b & 0x7fff_ffff } else { !b })
}

fn key_index(key: u64) -> u32 {
    !(key as u32)
}

/// The k-th largest value (vLLM's top-k keeps every token >= it, ties included).
fn kth_largest(
    xs: &[f32],
    k: usize,
    heap: &mut BinaryHeap<Reverse<u64>>,
    keys: &mut Vec<u64>,
) -> f32 {
    top_k_keys(xs, k, heap, keys)
        .iter()
        .min()
        .map_or(f32::NEG_INFINITY, |&key| key_value(key))
}

/// Ids of the k highest entries, highest first (ties: lower id first).
fn top_k_sorted<'a>(
    xs: &[f32],
    k: usize,
    heap: &'a mut BinaryHeap<Reverse<u64>>,
    keys: &'a mut Vec<u64>,
) -> impl Iterator<Item = u32> + 'a {
    top_k_keys(xs, k, heap, keys);
    keys.sort_unstable_by(|a, b| b.cmp(a));
    keys.iter().map(|&k| key_index(k))
}

/// vLLM's top-p (`apply_top_k_top_p`): sorted by probability, a token is kept
/// when the mass before it is < p, so the most likely token always is. Here
/// "before" means strictly more likely, so tied tokens are kept or dropped
/// together (vLLM's order among ties is arbitrary).
///
/// Rather than sorting the vocabulary, finds the probability threshold of
/// the nucleus (see the two helpers) and keeps the tokens at or above it.
/// Returns (kept count, kept mass) with the kept ids in `idx[..count]`.
fn apply_top_p(
    work: &mut [f32],
    probs: &mut [f32],
    s: &mut TopPScratch<'_>,
    total: f64,
    top_p: f32,
) -> (usize, f64) {
    let target = top_p as f64 * total;
    let threshold = match top_p_threshold_peaked(probs, s, target) {
        Some(t) => t,
        None => top_p_threshold_histogram(probs, s, target),
    };
    // A vectorized masking pass, then the (usually few) kept ids.
    for (w, p) in work.iter_mut().zip(probs.iter_mut()) {
        let drop = *p < threshold;
        *w = if drop { f32::NEG_INFINITY } else { *w };
        *p = if drop { 0.0 } else { *p };
    }
    s.idx.clear();
    s.idx
        .extend((0..probs.len() as u32).filter(|&i| probs[i as usize] > 0.0));
    let kept = s.idx.len();
    let mass = s.idx.iter().map(|&i| probs[i as usize] as f64).sum();
    (kept, mass)
}

/// Sorts the group of probabilities (>= `above` mass already before them)
/// and returns the smallest kept one: a value is kept when the mass of
/// strictly greater values is < `target`.
fn cut_sorted(vals: &mut [f32], above: f64, target: f64) -> f32 {
    vals.sort_unstable_by(|a, b| b.total_cmp(a));
    let (mut cum, mut before, mut prev) = (above, above, f32::NAN);
    // If rounding left no cut, every positive probability is kept.
    let mut threshold = f32::MIN_POSITIVE;
    for &q in vals.iter() {
        if q != prev {
            before = cum;
            prev = q;
        }
        if before >= target {
            break;
        }
        threshold = q;
        cum += q as f64;
    }
    threshold
}

/// Fast path for the usual peaked distribution (or one already cut by
/// top-k/min-p): if the tokens with probability >= 1e-3 of the top one are
/// few and hold the nucleus, sort just them.
fn top_p_threshold_peaked(probs: &[f32], s: &mut TopPScratch<'_>, target: f64) -> Option<f32> {
    const FLOOR: f32 = 1e-3;
    let mut lanes = [0.0f64; LANES];
    let mut counts = [0u32; LANES];
    let chunks = probs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let keep = c[j] >= FLOOR;
            lanes[j] += if keep { c[j] as f64 } else { 0.0 };
            counts[j] += keep as u32;
        }
    }
    let mass = lanes.iter().sum::<f64>()
        + rest
            .iter()
            .filter(|&&p| p >= FLOOR)
            .map(|&p| p as f64)
            .sum::<f64>();
    let count = counts.iter().sum::<u32>() as usize + rest.iter().filter(|&&p| p >= FLOOR).count();
    if mass < target || count > 4096 {
        return None;
    }
    s.vals.clear();
    s.vals.extend(probs.iter().copied().filter(|&p| p >= FLOOR));
    Some(cut_sorted(s.vals, 0.0, target))
}

/// General path: a histogram of the mass by the top bits of each
/// probability (positive floats order like their bits) finds the bucket
/// holding the cut; only that bucket is sorted.
fn top_p_threshold_histogram(probs: &[f32], s: &mut TopPScratch<'_>, target: f64) -> f32 {
    const SHIFT: u32 = 19;
    let bucket = |p: f32| ((p.to_bits() & 0x7fff_ffff) >> SHIFT) as usize;
    s.hist.clear();
    s.hist.resize(1 << (31 - SHIFT), 0.0);
    for &p in probs.iter() {
        // Filtered tokens (0) would all hit one bucket in a serial chain.
        if p > 0.0 {
            s.hist[bucket(p)] += p as f64;
        }
    }
    // Walk buckets from the most likely down; `above` is the mass before the
    // bucket that holds the cut.
    let mut above = 0.0f64;
    let mut cut_bucket = 0;
    for b in (0..s.hist.len()).rev() {
        if above + s.hist[b] >= target {
            cut_bucket = b;
            break;
        }
        above += s.hist[b];
    }
    s.vals.clear();
    s.vals.extend(
        probs
            .iter()
            .copied()
            .filter(|&p| p > 0.0 && bucket(p) == cut_bucket),
    );
    cut_sorted(s.vals, above, target)
}

/// Buffers of [`apply_top_p`].
struct TopPScratch<'a> {
    idx: &'a mut Vec<u32>,
    vals: &'a mut Vec<f32>,
    hist: &'a mut Vec<f64>,
}

/// Inverse-CDF draw: the first token in `order` at which the cumulative
/// probability exceeds `u` (`u` uniform in [0, total)).
fn draw(probs: &[f32], order: impl Iterator<Item = usize>, u: f64) -> Option<usize> {
    let mut cum = 0.0f64;
    let mut last = None;
    for i in order {
        let p = probs[i];
        if p > 0.0 {
            cum += p as f64;
            last = Some(i);
            if cum > u {
                return Some(i);
            }
        }
    }
    // Rounding can leave `u` a hair above the final sum.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn desc(xs: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + '_ {
        move |a, b| {
            xs[*b as usize]
                .total_cmp(&xs[*a as usize])
                .then_with(|| a.cmp(b))
        }
    }

    fn lse_ref(xs: &[f32]) -> f32 {
        let m = max_f32(xs) as f64;
        (m + xs.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()) as f32
    }

    fn softmax(xs: &[f32]) -> Vec<f64> {
        let m = max_f32(xs);
        let e: Vec<f64> = xs.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn draws(p: SamplingParams, seed: u64, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p, seed, LogprobsMode::RawLogprobs);
        (0..n)
            .map(|_| s.sample(logits, &[], &[]).unwrap().token)
            .collect()
    }

    fn random_logits(v: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..v).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
    }

    #[test]
    fn seeded_determinism() {
        let logits = random_logits(1000, 1);
        let a = draws(params(), 42, &logits, 200);
        let b = draws(params(), 42, &logits, 200);
        let c = draws(params(), 43, &logits, 200);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Other samplers drawing in between do not change a sequence.
        let mut s1 = Sampler::new(params(), 42, LogprobsMode::RawLogprobs);
        let mut s2 = Sampler::new(params(), 7, LogprobsMode::RawLogprobs);
        let mut interleaved = Vec::new();
        for _ in 0..200 {
            interleaved.push(s1.sample(&logits, &[], &[]).unwrap().token);
            s2.sample(&logits, &[], &[]).unwrap();
        }
        assert_eq!(a, interleaved);
    }

    #[test]
    fn top_k_1_and_temperature_0_equal_greedy() {
        for seed in 0..20 {
            let logits = random_logits(500, seed);
            let best = argmax(&logits).unwrap() as u32;
            let greedy = SamplingParams {
                temperature: 0.0,
                ..params()
            };
            let top1 = SamplingParams {
                top_k: 1,
                ..params()
            };
            assert!(draws(greedy, seed, &logits, 5).iter().all(|&t| t == best));
            assert!(draws(top1, seed, &logits, 20).iter().all(|&t| t == best));
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // probs 0.4, 0.3, 0.2, 0.1 (ids shuffled): top_p=0.65 keeps 0.4 and
        // 0.3 (mass before 0.2 is 0.7 >= 0.65); top_p=0.7 keeps the same
        // (0.7 is not < 0.7); top_p=0.71 adds 0.2.
        let probs = [0.2f32, 0.4, 0.1, 0.3];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        for (top_p, allowed) in [
            (0.65, vec![1u32, 3]),
            (0.69, vec![1, 3]),
            (0.75, vec![0, 1, 3]),
            (0.3, vec![1]),
        ] {
            let p = SamplingParams { top_p, ..params() };
            let got = draws(p, 5, &logits, 2000);
            assert!(got.iter().all(|t| allowed.contains(t)), "top_p={top_p}");
            for a in &allowed {
                assert!(got.contains(a), "top_p={top_p} never drew {a}");
            }
        }
    }

    #[test]
    fn top_p_keeps_ties_together() {
        // All tokens tie: none is strictly more likely than another, so all
        // stay (vLLM keeps an arbitrary half).
        let p = SamplingParams {
            top_p: 0.5,
            ..params()
        };
        let got = draws(p, 2, &[0.5; 10], 2000);
        for t in 0..10 {
            assert!(got.contains(&t));
        }
    }

    #[test]
    fn top_p_on_large_vocab_matches_full_sort() {
        // Exercises the growing-prefix path (nucleus larger than 128).
        let logits = random_logits(5000, 9);
        let mut work = logits.clone();
        let (mut idx, mut probs, mut vals, mut hist) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let total = exp_into(&work, max_f32(&work), &mut probs);
        let mut scratch = TopPScratch {
            idx: &mut idx,
            vals: &mut vals,
            hist: &mut hist,
        };
        let (n, _) = apply_top_p(&mut work, &mut probs, &mut scratch, total, 0.9);
        assert!(n > 128);
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(desc(&logits));
        let probs = softmax(&logits);
        let mut cum = 0.0;
        let mut expected = vec![false; logits.len()];
        for &i in &order {
            if cum >= 0.9 {
                break;
            }
            expected[i as usize] = true;
            cum += probs[i as usize];
        }
        let kept: Vec<bool> = work.iter().map(|x| *x > f32::NEG_INFINITY).collect();
        assert!(kept.iter().filter(|k| **k).count() > 128);
        assert_eq!(kept, expected);
    }

    #[test]
    fn min_p_keeps_tokens_above_threshold() {
        // p = 0.5, 0.3, 0.15, 0.05; min_p = 0.25 -> threshold 0.125.
        let probs = [0.05f32, 0.5, 0.15, 0.3];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let p = SamplingParams {
            min_p: 0.25,
            ..params()
        };
        let got = draws(p.clone(), 3, &logits, 3000);
        assert!(got.iter().all(|t| [1, 2, 3].contains(t)));
        assert!(got.contains(&2));
        // min_p is applied to the temperature-scaled distribution: at T=0.5
        // probs are ∝ p², 0.15² / 0.5² = 0.09 < 0.25, so id 2 goes too.
        let p = SamplingParams {
            temperature: 0.5,
            ..p
        };
        let got = draws(p, 3, &logits, 3000);
        assert!(got.iter().all(|t| [1, 3].contains(t)));
    }

    #[test]
    fn top_k_keeps_k_best() {
        let logits = random_logits(300, 4);
        let mut order: Vec<u32> = (0..300).collect();
        order.sort_by(desc(&logits));
        let p = SamplingParams {
            top_k: 5,
            ..params()
        };
        let got = draws(p, 1, &logits, 2000);
        assert!(got.iter().all(|t| order[..5].contains(t)));
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, -1.0, 2.0, 0.5];
        let n = 200_000;
        for temperature in [1.0f32, 0.7] {
            let p = SamplingParams {
                temperature,
                ..params()
            };
            let got = draws(p, 11, &logits, n);
            let scaled: Vec<f32> = logits.iter().map(|x| x / temperature).collect();
            let probs = softmax(&scaled);
            for (i, p) in probs.iter().enumerate() {
                let f = got.iter().filter(|t| **t == i as u32).count() as f64 / n as f64;
                assert!((f - p).abs() < 0.005, "token {i}: {f} vs {p}");
            }
        }
    }

    #[test]
    fn penalties_follow_vllm_formula() {
        let logits = [2.0f32, -1.0, 0.5, -3.0, 1.0, 0.0];
        let mut work = logits.to_vec();
        let mut counts = Vec::new();
        // prompt has 0 and 1; output has 2 twice, 3 once, 1 once.
        apply_penalties(
            &mut work,
            &mut counts,
            &[0, 1, 99],
            &[2, 3, 2, 1],
            2.0,
            0.5,
            0.25,
        );
        let expected = [
            2.0 / 2.0,                    // prompt, positive: divided
            -2.0 - 0.5 - 0.25,            // -1 in prompt+output, negative: multiplied by 2; count 1
            0.5 / 2.0 - 0.5 * 2.0 - 0.25, // output twice
            -3.0 * 2.0 - 0.5 - 0.25,      // output once
            1.0,                          // untouched
            0.0,                          // untouched
        ];
        assert_eq!(work, expected);
        assert!(counts.iter().all(|c| *c == 0));
        // Zero logits stay zero under repetition penalty (0 * p).
        let mut work = vec![0.0f32, 1.0];
        apply_penalties(&mut work, &mut counts, &[0], &[], 1.5, 0.0, 0.0);
        assert_eq!(work, [0.0, 1.0]);
    }

    #[test]
    fn penalties_change_greedy_choice() {
        let logits = [1.0f32, 0.9, 0.0];
        let greedy = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.2,
            ..params()
        };
        let mut s = Sampler::new(greedy, 0, LogprobsMode::ProcessedLogprobs);
        let out = s.sample(&logits, &[], &[0]).unwrap();
        assert_eq!(out.token, 1);
        // Processed log-probs of a greedy request: log_softmax after penalties.
        let penalized = [0.8f32, 0.9, 0.0];
        let expected = penalized[1] - lse_ref(&penalized);
        assert!((out.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn raw_and_processed_logprobs() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let p = SamplingParams {
            temperature: 0.5,
            top_k: 2,
            logprobs: Some(3),
            ..params()
        };
        let lse = |xs: &[f64]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
        let raw_lse = lse(&[2.0, 1.0, 0.0, -1.0]);
        // Processed: logits / 0.5 = 4, 2, 0, -2; top-2 keeps 4 and 2.
        let proc_lse = lse(&[4.0, 2.0]);

        let mut raw = Sampler::new(p.clone(), 3, LogprobsMode::RawLogprobs);
        let mut processed = Sampler::new(p, 3, LogprobsMode::ProcessedLogprobs);
        for _ in 0..50 {
            let r = raw.sample(&logits, &[], &[]).unwrap();
            let q = processed.sample(&logits, &[], &[]).unwrap();
            assert_eq!(r.token, q.token);
            assert!(r.token < 2);
            let t = r.token as usize;
            assert!((r.logprob as f64 - (logits[t] as f64 - raw_lse)).abs() < 1e-5);
            let scaled = [4.0f64, 2.0][t];
            assert!((q.logprob as f64 - (scaled - proc_lse)).abs() < 1e-5);

            let ids: Vec<u32> = r.top_logprobs.iter().map(|x| x.0).collect();
            assert_eq!(ids, [0, 1, 2]);
            for (i, lp) in &r.top_logprobs {
                assert!((*lp as f64 - (logits[*i as usize] as f64 - raw_lse)).abs() < 1e-5);
            }
            let ids: Vec<u32> = q.top_logprobs.iter().map(|x| x.0).collect();
            assert_eq!(ids, [0, 1, 2]);
            assert!((q.top_logprobs[0].1 as f64 - (4.0 - proc_lse)).abs() < 1e-5);
            assert!((q.top_logprobs[1].1 as f64 - (2.0 - proc_lse)).abs() < 1e-5);
            assert_eq!(q.top_logprobs[2].1, f32::NEG_INFINITY);
        }
    }

    #[test]
    fn nan_logits_error() {
        let mut s = Sampler::new(params(), 0, LogprobsMode::RawLogprobs);
        let err = s.sample(&[0.0, f32::NAN], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("logits[1]"), "{err}");
        assert!(s.sample(&[], &[], &[]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3], &[], &[]).is_err());
        assert!(s.sample(&[0.0, f32::INFINITY], &[], &[]).is_err());
        // Out-of-vocabulary ids in the history do not panic.
        assert!(s.sample(&[0.0, 1.0], &[7], &[9]).is_ok());
    }

    #[test]
    fn validate_names_the_field() {
        assert!(params().validate().is_ok());
        let cases = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..params()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..params()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..params()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..params()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: -2,
                    ..params()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..params()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..params()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..params()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..params()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.5,
                    ..params()
                },
                "frequency_penalty",
            ),
        ];
        for (p, field) in cases {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
        for top_k in [-1, 0, 1, 100] {
            assert!(SamplingParams { top_k, ..params() }.validate().is_ok());
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let (got, want) = (exp_nonpos(x), (x as f64).exp());
            if x >= -87.0 {
                assert!(
                    ((got as f64 - want) / want).abs() < 3e-7,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert_eq!(got, 0.0);
            }
            x -= 0.0137;
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn top_k_selection_matches_sort() {
        for (v, k) in [
            (10, 3),
            (5000, 1),
            (5000, 50),
            (5000, 2000),
            (7, 7),
            (7, 20),
        ] {
            // Few distinct values: many ties, broken by lower id.
            let logits: Vec<f32> = random_logits(v, k as u64)
                .iter()
                .map(|x| x.round())
                .collect();
            let mut order: Vec<u32> = (0..v as u32).collect();
            order.sort_by(desc(&logits));
            let (mut heap, mut keys) = (BinaryHeap::new(), Vec::new());
            let got: Vec<u32> = top_k_sorted(&logits, k, &mut heap, &mut keys).collect();
            assert_eq!(got, order[..k.min(v)], "v={v} k={k}");
            let kth = kth_largest(&logits, k, &mut heap, &mut keys);
            assert_eq!(kth, logits[order[k.min(v) - 1] as usize]);
        }
        let with_inf = [f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, -0.0, 0.0];
        let (mut heap, mut keys) = (BinaryHeap::new(), Vec::new());
        let got: Vec<u32> = top_k_sorted(&with_inf, 4, &mut heap, &mut keys).collect();
        assert_eq!(got, [1, 4, 3, 0]);
    }

    /// A guide that waits for `</think>`: the thinking before it is free,
    /// the text after it (the marker's own token's rest included) follows
    /// the pattern.
    #[test]
    fn a_guide_after_a_marker_leaves_the_thinking_free() {
        let tok = crate::presets::tokenizer().unwrap();
        let bytes = Arc::new(crate::guided::TokenBytes::from_tokenizer(&tok).unwrap());
        let eos = tok.eos_token_id().unwrap();
        let guide = Arc::new(RegexGuide::new("[0-9]{2}", bytes, vec![eos]).unwrap());
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        let vocab = tok.vocab_size();
        // The model wants `z` at every step unless a row says otherwise.
        let z = tok.encode("z", false).unwrap()[0];
        let row = |want: u32| {
            let mut r = vec![0.0f32; vocab];
            r[z as usize] = 5.0;
            r[want as usize] = 10.0;
            r
        };
        let mut s =
            Sampler::new(greedy, 1, LogprobsMode::RawLogprobs).with_guide_after(guide, "</think>");
        assert!(s.guide_after.is_some());
        let mut output = Vec::new();
        let thinking = tok.encode("hmm</think>", false).unwrap();
        for &want in &thinking {
            let t = s.sample(&row(want), &[], &output).unwrap();
            assert_eq!(t.token, want, "the thinking is not guided");
            output.push(t.token);
        }
        assert!(s.guide_after.is_none());
        // Now `z` (the model's favourite) cannot be drawn: digits only.
        let mut r = vec![0.0f32; vocab];
        r[z as usize] = 10.0;
        let seven = tok.encode("7", false).unwrap()[0];
        r[seven as usize] = 1.0;
        for _ in 0..2 {
            let t = s.sample(&r, &[], &output).unwrap();
            assert_eq!(t.token, seven);
            output.push(t.token);
        }
        // Two digits: only the end is left.
        assert_eq!(s.sample(&r, &[], &output).unwrap().token, eos);
    }

    /// vLLM's `min_tokens`: the stop tokens cannot be drawn (greedy or
    /// sampled) while the output is shorter; raw log-probs stay the
    /// model's, processed ones see the ban.
    #[test]
    fn min_tokens_bans_the_stop_tokens_until_reached() {
        // Tokens 0 and 3 are the stop tokens and by far the likeliest.
        let logits = [9.0f32, 0.5, 0.0, 8.0, -1.0];
        for temperature in [0.0, 1.0] {
            let p = SamplingParams {
                temperature,
                ..params()
            };
            for mode in [LogprobsMode::RawLogprobs, LogprobsMode::ProcessedLogprobs] {
                let mut s = Sampler::new(p.clone(), 7, mode).with_min_tokens(3, vec![0, 3]);
                let mut output = Vec::new();
                for _ in 0..3 {
                    let t = s.sample(&logits, &[], &output).unwrap();
                    assert!(![0, 3].contains(&t.token), "{t:?} at {}", output.len());
                    let expected = match mode {
                        LogprobsMode::RawLogprobs => logits[t.token as usize] - lse_ref(&logits),
                        LogprobsMode::ProcessedLogprobs => {
                            // (Temperature 1 or greedy: no scaling.)
                            let mut banned = logits;
                            banned[0] = f32::NEG_INFINITY;
                            banned[3] = f32::NEG_INFINITY;
                            banned[t.token as usize] - lse_ref(&banned)
                        }
                    };
                    assert!((t.logprob - expected).abs() < 1e-5, "{mode}: {t:?}");
                    output.push(t.token);
                }
                // From the fourth token on they are allowed again.
                if temperature == 0.0 {
                    assert_eq!(s.sample(&logits, &[], &output).unwrap().token, 0);
                }
            }
        }
        // The default bans nothing.
        let mut s = Sampler::new(params(), 7, LogprobsMode::RawLogprobs);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        let mut g = Sampler::new(greedy, 7, LogprobsMode::RawLogprobs);
        assert_eq!(g.sample(&logits, &[], &[]).unwrap().token, 0);
        assert!(s.sample(&logits, &[], &[]).is_ok());
    }

    /// OpenAI's `logit_bias` moves the chosen token (greedy and sampled);
    /// processed log-probs include it, raw ones are the model's.
    #[test]
    fn logit_bias_is_added_before_sampling() {
        let logits = [3.0f32, 1.0, 0.0, -1.0];
        let biased = [3.0f32, 1.0, 5.0, -1.0]; // token 2 + 5.0
        let p = SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(2, 5.0), (99, 7.0)], // 99: past the row, ignored
            ..params()
        };
        for mode in [LogprobsMode::RawLogprobs, LogprobsMode::ProcessedLogprobs] {
            let t = Sampler::new(p.clone(), 1, mode)
                .sample(&logits, &[], &[])
                .unwrap();
            assert_eq!(t.token, 2);
            let expected = match mode {
                LogprobsMode::RawLogprobs => logits[2] - lse_ref(&logits),
                LogprobsMode::ProcessedLogprobs => biased[2] - lse_ref(&biased),
            };
            assert!((t.logprob - expected).abs() < 1e-5, "{mode}: {t:?}");
        }
        // -100 takes a token out of sampling in practice.
        let p = SamplingParams {
            logit_bias: vec![(0, -100.0)],
            ..params()
        };
        let mut s = Sampler::new(p, 3, LogprobsMode::RawLogprobs);
        for _ in 0..200 {
            assert_ne!(s.sample(&logits, &[], &[]).unwrap().token, 0);
        }
        let bad = SamplingParams {
            logit_bias: vec![(1, f32::NAN)],
            ..params()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("logit_bias")
        );
    }

    #[test]
    fn logprobs_mode_parses() {
        for m in [LogprobsMode::RawLogprobs, LogprobsMode::ProcessedLogprobs] {
            assert_eq!(m.to_string().parse::<LogprobsMode>().unwrap(), m);
        }
        assert!("raw_logits".parse::<LogprobsMode>().is_err());
    }
}
