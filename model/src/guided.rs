//! Guided decoding by a regular expression, as vLLM's `guided_regex` /
//! `structured_outputs: {"regex": ...}` (and `guided_choice`, a regex of the
//! choices): a completion must match the whole pattern. The pattern becomes
//! a DFA over bytes; at each step a token is allowed when its bytes keep
//! the DFA alive, and the end of the sequence (EOS) when the text so far
//! matches. The tokens allowed from a DFA state are found once per state,
//! by walking the vocabulary sorted by bytes (a prefix shared by many
//! tokens is walked once), and shared by every sequence of the request.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use regex_automata::dfa::{Automaton, dense};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, util::syntax};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// The largest DFA a pattern may make (vLLM bounds its grammars too): a
/// request past it gets an error, not a server out of memory.
const DFA_SIZE_LIMIT: usize = 16 << 20;

/// Bytes of allowed-token sets a guide keeps (a bitset over the vocabulary
/// per DFA state: 19 KiB for Qwen's); past them it starts over rather than
/// grow without bound.
const MAX_CACHED_BYTES: usize = 16 << 20;

/// Tokens of the sorted vocabulary one rayon task walks.
const WALK_PIECE: usize = 4096;

/// The token ids that may come next from one DFA state, as a bitset over
/// the vocabulary: inside a JSON string nearly every token is allowed, and a
/// list of ids would take 4 bytes for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedTokens {
    bits: Vec<u64>,
    count: usize,
}

impl AllowedTokens {
    #[cfg(test)]
    fn with_capacity(ids: usize) -> Self {
        AllowedTokens {
            bits: vec![0; ids.div_ceil(64)],
            count: 0,
        }
    }

    fn insert(&mut self, id: u32) {
        let (word, bit) = (id as usize / 64, id % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) == 0 {
            self.bits[word] |= 1 << bit;
            self.count += 1;
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        self.bits
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The ids, ascending.
    pub fn ids(&self) -> Vec<u32> {
        (0..self.bits.len() as u32 * 64)
            .filter(|&id| self.contains(id))
            .collect()
    }

    fn bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

/// The bytes each token id stands for in generated text (none for special
/// tokens, which a guided completion never contains, and for empty ones).
#[derive(Debug)]
pub struct TokenBytes {
    /// Each id's place in `sorted` (`NO_BYTES`: none).
    place: Vec<u32>,
    /// The ids of the tokens with text, in the order of their bytes, and
    /// how many leading bytes each shares with the one before (capped at
    /// u16::MAX): a trie laid flat, so that a walk of the vocabulary takes
    /// each shared prefix through the DFA once, and a prefix that dies
    /// skips every token that starts with it.
    sorted: Vec<u32>,
    shared: Vec<u16>,
    /// The sorted tokens' bytes end to end (`starts[i]..starts[i + 1]`):
    /// read in order by a walk, not from one allocation per token.
    sorted_bytes: Vec<u8>,
    starts: Vec<u32>,
}

/// `TokenBytes::place` of an id without bytes.
const NO_BYTES: u32 = u32::MAX;

/// How a tokenizer's vocabulary spells bytes (its tokenizer.json decoder).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spelling {
    /// GPT-2's byte-level alphabet (Qwen, Llama 3): each char one byte.
    ByteLevel,
    /// SentencePiece (Llama 2): `▁` is a space, `<0xNN>` one byte.
    Metaspace,
    /// The token's text as it is.
    Plain,
}

fn spelling(decoder: &Value) -> Spelling {
    let kind = decoder.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "ByteLevel" => Spelling::ByteLevel,
        "Metaspace" | "ByteFallback" => Spelling::Metaspace,
        "Sequence" => {
            let parts: Vec<Spelling> = decoder
                .get("decoders")
                .and_then(Value::as_array)
                .map(|d| d.iter().map(spelling).collect())
                .unwrap_or_default();
            if parts.contains(&Spelling::ByteLevel) {
                Spelling::ByteLevel
            } else if parts.contains(&Spelling::Metaspace)
                || decoder.to_string().contains('\u{2581}')
            {
                Spelling::Metaspace
            } else {
                Spelling::Plain
            }
        }
        _ => Spelling::Plain,
    }
}

/// GPT-2's `bytes_to_unicode`, inverted: the byte a byte-level char stands for.
fn byte_level_table() -> HashMap<char, u8> {
    let mut table = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        table.insert(c, b);
    }
    table
}

impl TokenBytes {
    /// The table of `tokenizer`'s vocabulary, added tokens included.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let json: Value = serde_json::from_str(tokenizer.tokenizer_json())
            .map_err(|e| ModelError::Invalid(format!("tokenizer.json: {e}")))?;
        let how = json.get("decoder").map_or(Spelling::Plain, spelling);
        let inner = tokenizer.inner();
        let size = inner.get_vocab_size(true);
        let mut bytes: Vec<Option<Box<[u8]>>> = vec![None; size];
        let table = byte_level_table();
        for (token, id) in inner.get_vocab(false) {
            let spelt: Option<Vec<u8>> = match how {
                Spelling::ByteLevel => token.chars().map(|c| table.get(&c).copied()).collect(),
                Spelling::Metaspace => Some(metaspace_bytes(&token)),
                Spelling::Plain => Some(token.into_bytes()),
            };
            if let (Some(slot), Some(b)) = (bytes.get_mut(id as usize), spelt) {
                *slot = Some(b.into_boxed_slice());
            }
        }
        // Added tokens are their content as written; special ones are no text.
        for (id, added) in inner.get_added_tokens_decoder() {
            if let Some(slot) = bytes.get_mut(id as usize) {
                *slot = (!added.special).then(|| added.content.clone().into_bytes().into());
            }
        }
        Ok(TokenBytes::new(bytes))
    }

    fn new(bytes: Vec<Option<Box<[u8]>>>) -> Self {
        let mut sorted: Vec<u32> = (0..bytes.len() as u32)
            .filter(|&id| bytes[id as usize].as_deref().is_some_and(|b| !b.is_empty()))
            .collect();
        let of = |id: u32| bytes[id as usize].as_deref().unwrap_or_default();
        sorted.par_sort_unstable_by(|&a, &b| of(a).cmp(of(b)).then(a.cmp(&b)));
        let shared = std::iter::once(0)
            .chain(sorted.windows(2).map(|w| {
                let n = of(w[0])
                    .iter()
                    .zip(of(w[1]))
                    .take_while(|(a, b)| a == b)
                    .count();
                n.min(u16::MAX as usize) as u16
            }))
            .collect();
        let mut sorted_bytes = Vec::new();
        let mut starts = Vec::with_capacity(sorted.len() + 1);
        for &id in &sorted {
            starts.push(sorted_bytes.len() as u32);
            sorted_bytes.extend_from_slice(of(id));
        }
        starts.push(sorted_bytes.len() as u32);
        let mut place = vec![NO_BYTES; bytes.len()];
        for (i, &id) in sorted.iter().enumerate() {
            place[id as usize] = i as u32;
        }
        TokenBytes {
            place,
            sorted,
            shared,
            sorted_bytes,
            starts,
        }
    }

    /// The bytes of the `i`-th token in sorted order.
    fn sorted_token(&self, i: usize) -> &[u8] {
        &self.sorted_bytes[self.starts[i] as usize..self.starts[i + 1] as usize]
    }

    /// The bytes of `id` (none: a special or empty token, or an id outside
    /// the table).
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        match self.place.get(id as usize) {
            Some(&i) if i != NO_BYTES => Some(self.sorted_token(i as usize)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.place.len()
    }

    pub fn is_empty(&self) -> bool {
        self.place.is_empty()
    }
}

/// A SentencePiece piece's bytes: `<0xNN>` is byte NN, `▁` a space.
fn metaspace_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token
        .strip_prefix("<0x")
        .and_then(|t| t.strip_suffix('>'))
        .filter(|h| h.len() == 2)
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// A compiled pattern over one vocabulary, shared by the sequences of a
/// request (and by requests with the same pattern).
pub struct RegexGuide {
    pattern: String,
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    tokens: Arc<TokenBytes>,
    /// The ids that end a sequence (EOS and the request's stop token ids):
    /// allowed where the text so far matches the whole pattern.
    end_ids: Vec<u32>,
    allowed: Mutex<AllowedCache>,
    /// [`MAX_CACHED_BYTES`] (smaller in tests).
    cache_limit: usize,
    /// The states from which some text still reaches a match: a token that
    /// leads anywhere else is a dead end, never allowed.
    /// By state index (`id >> stride2`): a lookup per allowed token.
    live: Vec<bool>,
    /// By state index, the most bytes from a state to a match
    /// (`UNBOUNDED` past a loop, or for a state not reached from the
    /// start): a lookup per token while `min_tokens` is not reached.
    remaining: Vec<u32>,
}

/// `RegexGuide::remaining` of a state with no bound.
const UNBOUNDED: u32 = u32::MAX;

impl std::fmt::Debug for RegexGuide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegexGuide")
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

/// A guide's allowed-token sets by DFA state, and their size.
#[derive(Default)]
struct AllowedCache {
    sets: HashMap<StateID, Arc<AllowedTokens>>,
    bytes: usize,
}

/// vLLM's `guided_choice` as a pattern: one of the strings, literally.
pub fn choice_pattern<S: AsRef<str>>(choices: &[S]) -> String {
    let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c.as_ref())).collect();
    format!("(?:{})", alternatives.join("|"))
}

impl RegexGuide {
    /// Compiles `pattern` (Rust `regex` syntax, matched against the whole
    /// completion) for `tokens`; `end_ids` end a sequence.
    pub fn new(pattern: &str, tokens: Arc<TokenBytes>, end_ids: Vec<u32>) -> Result<Self> {
        let invalid = |e: String| ModelError::Invalid(format!("regex {pattern:?}: {e}"));
        let dfa = dense::Builder::new()
            .configure(
                dense::DFA::config()
                    .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                    .determinize_size_limit(Some(DFA_SIZE_LIMIT))
                    .start_kind(regex_automata::dfa::StartKind::Anchored),
            )
            .syntax(syntax::Config::new().utf8(true))
            // The whole completion matches: past a match the DFA would go
            // on (its matches are reported a byte late), so the pattern
            // ends at the end of the text.
            .build(&format!("(?:{pattern})\\z"))
            .map_err(|e| invalid(e.to_string()))?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| invalid(e.to_string()))?;
        let live = live_states(&dfa, start);
        let index = |s: StateID| s.as_usize() >> dfa.stride2();
        let lengths = remaining_lengths(&dfa, start, &live);
        let mut remaining =
            vec![UNBOUNDED; lengths.keys().map(|s| index(*s) + 1).max().unwrap_or(0)];
        for (s, most) in lengths {
            remaining[index(s)] = most.map_or(UNBOUNDED, |m| m.min(UNBOUNDED as usize - 1) as u32);
        }
        Ok(RegexGuide {
            pattern: pattern.to_string(),
            dfa,
            start,
            tokens,
            end_ids,
            allowed: Mutex::new(AllowedCache::default()),
            cache_limit: MAX_CACHED_BYTES,
            live,
            remaining,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The state before any output.
    pub fn start(&self) -> StateID {
        self.start
    }

    /// The state after `bytes` from `state`; none when no text that starts
    /// so can match.
    fn walk(&self, mut state: StateID, bytes: &[u8]) -> Option<StateID> {
        for &b in bytes {
            state = self.dfa.next_state(state, b);
            if self.dfa.is_dead_state(state) || self.dfa.is_quit_state(state) {
                return None;
            }
        }
        // Liveness goes backwards: a live end means every state on the
        // way was live too.
        self.is_live(state).then_some(state)
    }

    fn is_live(&self, state: StateID) -> bool {
        self.live
            .get(state.as_usize() >> self.dfa.stride2())
            .copied()
            .unwrap_or(false)
    }

    /// The most bytes a text that matches the pattern has (none: no bound).
    /// Every token a guide allows writes a byte or more, so a guided output
    /// has at most this many tokens before its end.
    pub fn longest_match(&self) -> Option<usize> {
        self.remaining_from(self.start)
    }

    /// The most bytes from `state` to a match (none: no bound, or a state
    /// not reached from the start).
    fn remaining_from(&self, state: StateID) -> Option<usize> {
        let i = state.as_usize() >> self.dfa.stride2();
        self.remaining
            .get(i)
            .filter(|&&m| m != UNBOUNDED)
            .map(|&m| m as usize)
    }

    /// Whether `token` from `state` keeps room for `tokens_after` more
    /// tokens before a match can end (each writes a byte or more): the
    /// text after it still matches with that many bytes or more, or
    /// without bound. What `min_tokens` asks of a guided output.
    pub fn leaves_room(&self, state: StateID, token: u32, tokens_after: usize) -> bool {
        let Some(next) = self.tokens.get(token).and_then(|b| self.walk(state, b)) else {
            return false;
        };
        self.remaining_from(next)
            .is_none_or(|bytes| bytes >= tokens_after)
    }

    /// Whether the text that led to `state` matches the whole pattern.
    pub fn is_complete(&self, state: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(state))
    }

    /// The ids that may come next from `state`: the tokens whose bytes
    /// keep the pattern reachable, and the end ids once it matches.
    pub fn allowed(&self, state: StateID) -> Arc<AllowedTokens> {
        if let Some(ids) = self
            .allowed
            .lock()
            .ok()
            .and_then(|c| c.sets.get(&state).cloned())
        {
            return ids;
        }
        // The sorted vocabulary in parallel pieces: a new state's walk is
        // the one cost a guide has that grows with the vocabulary.
        let tokens = &self.tokens;
        let pieces = tokens.sorted.len().div_ceil(WALK_PIECE);
        let found: Vec<Vec<u32>> = (0..pieces)
            .into_par_iter()
            .map(|p| {
                let end = ((p + 1) * WALK_PIECE).min(tokens.sorted.len());
                self.walk_sorted(state, p * WALK_PIECE..end)
            })
            .collect();
        let mut bits = vec![0u64; tokens.len().div_ceil(64)];
        for id in found.iter().flatten() {
            bits[*id as usize / 64] |= 1 << (id % 64);
        }
        let count = bits.iter().map(|w| w.count_ones() as usize).sum();
        let mut ids = AllowedTokens { bits, count };
        if self.is_complete(state) {
            for &id in &self.end_ids {
                ids.insert(id);
            }
        }
        let ids = Arc::new(ids);
        if let Ok(mut c) = self.allowed.lock() {
            // Full: start over, so that the states requests visit now are
            // the ones kept (not those of the first requests, forever).
            if c.bytes + ids.bytes() > self.cache_limit {
                c.sets.clear();
                c.bytes = 0;
            }
            c.bytes += ids.bytes();
            c.sets.insert(state, ids.clone());
        }
        ids
    }

    /// The ids at `range` of the sorted vocabulary whose bytes keep the
    /// pattern reachable from `state`. `stack[d]` is the state after the
    /// first `d` bytes of the token before: the bytes a token shares with
    /// it are not walked again.
    fn walk_sorted(&self, state: StateID, range: std::ops::Range<usize>) -> Vec<u32> {
        let TokenBytes { sorted, shared, .. } = &*self.tokens;
        let mut allowed = Vec::new();
        let mut stack = vec![state];
        let mut i = range.start;
        while i < range.end {
            let id = sorted[i];
            let bytes = self.tokens.sorted_token(i);
            let keep = if i == range.start {
                0
            } else {
                (shared[i] as usize).min(stack.len() - 1)
            };
            stack.truncate(keep + 1);
            let mut died_at = None;
            for (d, &b) in bytes.iter().enumerate().skip(keep) {
                let next = self.dfa.next_state(stack[d], b);
                if self.dfa.is_dead_state(next) || self.dfa.is_quit_state(next) {
                    died_at = Some(d);
                    break;
                }
                stack.push(next);
            }
            i += 1;
            match died_at {
                // Every token after it that shares the dead prefix dies too.
                Some(d) => {
                    while i < range.end && shared[i] as usize > d {
                        i += 1;
                    }
                }
                None => {
                    if stack.last().is_some_and(|&s| self.is_live(s)) {
                        allowed.push(id);
                    }
                }
            }
        }
        allowed
    }

    /// The state after `bytes` from the start; none when no match begins so.
    pub fn start_with(&self, bytes: &[u8]) -> Option<StateID> {
        self.walk(self.start, bytes)
    }

    /// The bytes `id` stands for in generated text (none: a special token).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens.get(id)
    }

    /// The state after `token` (an end id leaves it where it is).
    pub fn advance(&self, state: StateID, token: u32) -> StateID {
        match self.tokens.get(token) {
            Some(b) if !self.end_ids.contains(&token) => self.walk(state, b).unwrap_or(state),
            _ => state,
        }
    }
}

/// For each live state reachable from `start` (`live` indexed by `id >>
/// stride2`), the most bytes from it to a match: none where a loop makes
/// that unbounded (the state is on one, or reaches one). A depth-first walk
/// that takes each state once: a step back onto the walk's own path is a
/// loop, and unboundedness flows back to every state that reaches it.
fn remaining_lengths(
    dfa: &dense::DFA<Vec<u32>>,
    start: StateID,
    live: &[bool],
) -> HashMap<StateID, Option<usize>> {
    let bytes: Vec<u8> = dfa
        .byte_classes()
        .representatives(0..=255)
        .filter_map(|u| u.as_u8())
        .collect();
    let index = |s: StateID| s.as_usize() >> dfa.stride2();
    let is_live = |s: StateID| live.get(index(s)).copied().unwrap_or(false);
    let own = |s: StateID| dfa.is_match_state(dfa.next_eoi_state(s)).then_some(0usize);
    let mut done: HashMap<StateID, Option<usize>> = HashMap::new();
    if !is_live(start) {
        done.insert(start, own(start));
        return done;
    }
    // Bytes found so far from a state on the path, or unbounded.
    #[derive(Clone, Copy)]
    enum Most {
        Bytes(Option<usize>),
        Unbounded,
    }
    let more = |m: Most, from: Option<usize>| match (m, from) {
        (Most::Unbounded, _) | (_, None) => Most::Unbounded,
        (Most::Bytes(b), Some(d)) => Most::Bytes(b.max(Some(d + 1))),
    };
    let mut on_path: HashSet<StateID> = HashSet::from([start]);
    let mut path: Vec<(StateID, usize, Most)> = vec![(start, 0, Most::Bytes(own(start)))];
    while let Some(top) = path.last_mut() {
        let (state, next, most) = *top;
        if let Some(&b) = bytes.get(next) {
            top.1 += 1;
            let t = dfa.next_state(state, b);
            if dfa.is_dead_state(t) || dfa.is_quit_state(t) || !is_live(t) {
                continue;
            }
            if on_path.contains(&t) {
                top.2 = Most::Unbounded;
            } else if let Some(&d) = done.get(&t) {
                top.2 = more(most, d);
            } else {
                on_path.insert(t);
                path.push((t, 0, Most::Bytes(own(t))));
            }
            continue;
        }
        path.pop();
        on_path.remove(&state);
        // A live state always reaches a match.
        let value = match most {
            Most::Unbounded => None,
            Most::Bytes(b) => Some(b.unwrap_or(0)),
        };
        done.insert(state, value);
        if let Some(parent) = path.last_mut() {
            parent.2 = more(parent.2, value);
        }
    }
    done
}

/// The states reachable from `start` from which some text reaches a match
/// (`x[a&&b]` starts fine but has none): found over the DFA's byte classes,
/// forwards from `start`, then backwards from the states where the text
/// may end.
fn live_states(dfa: &dense::DFA<Vec<u32>>, start: StateID) -> Vec<bool> {
    let bytes: Vec<u8> = dfa
        .byte_classes()
        .representatives(0..=255)
        .filter_map(|u| u.as_u8())
        .collect();
    let mut seen = HashSet::from([start]);
    let mut todo = vec![start];
    let mut into: HashMap<StateID, Vec<StateID>> = HashMap::new();
    let mut ends = Vec::new();
    while let Some(s) = todo.pop() {
        if dfa.is_match_state(dfa.next_eoi_state(s)) {
            ends.push(s);
        }
        for &b in &bytes {
            let t = dfa.next_state(s, b);
            if dfa.is_dead_state(t) || dfa.is_quit_state(t) {
                continue;
            }
            into.entry(t).or_default().push(s);
            if seen.insert(t) {
                todo.push(t);
            }
        }
    }
    let mut live: HashSet<StateID> = ends.iter().copied().collect();
    while let Some(t) = ends.pop() {
        for &s in into.get(&t).into_iter().flatten() {
            if live.insert(s) {
                ends.push(s);
            }
        }
    }
    let index = |s: &StateID| s.as_usize() >> dfa.stride2();
    let mut dense = vec![false; live.iter().map(index).max().map_or(0, |i| i + 1)];
    for s in &live {
        dense[index(s)] = true;
    }
    dense
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guide(pattern: &str) -> (Tokenizer, RegexGuide) {
        let tok = crate::presets::tokenizer().unwrap();
        let bytes = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
        let eos = tok.eos_token_id().unwrap();
        let g = RegexGuide::new(pattern, bytes, vec![eos]).unwrap();
        (tok, g)
    }

    fn text(tok: &Tokenizer, ids: &[u32]) -> String {
        ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect()
    }

    #[test]
    fn byte_level_tokens_are_their_bytes_and_specials_none() {
        let tok = crate::presets::tokenizer().unwrap();
        let bytes = TokenBytes::from_tokenizer(&tok).unwrap();
        let space = tok.encode(" ", false).unwrap();
        assert_eq!(bytes.get(space[0]), Some(&b" "[..]));
        let seven = tok.encode("7", false).unwrap();
        assert_eq!(bytes.get(seven[0]), Some(&b"7"[..]));
        assert_eq!(bytes.get(tok.eos_token_id().unwrap()), None);
        // Every byte of GPT-2's alphabet maps back to one byte.
        assert_eq!(byte_level_table().len(), 256);
        assert_eq!(byte_level_table()[&'\u{120}'], b' ');
        assert_eq!(byte_level_table()[&'\u{10a}'], b'\n');
        assert_eq!(metaspace_bytes("\u{2581}the"), b" the");
        assert_eq!(metaspace_bytes("<0x0A>"), b"\n");
    }

    /// The sorted walk (shared prefixes walked once, dead prefixes
    /// skipped) allows exactly the tokens a walk of each token alone does,
    /// whatever pieces the vocabulary is cut into.
    #[test]
    fn the_sorted_walk_allows_what_token_by_token_walks_do() {
        let words: Vec<&[u8]> = vec![
            b"a",
            b"ab",
            b"abc",
            b"abd",
            b"abcde",
            b"b",
            b"ba",
            b"bab",
            b"1",
            b"12",
            b"123",
            b"1a",
            b"1a2",
            b"{\"",
            b"{\"a",
            b"{\"ab",
            b" ",
            b"  ",
            b" 1",
            b"\"",
            b"\":",
            b"\": 1",
            b"zz",
            b"z",
            b"",
            b"abcdefgh",
            b"ab1",
            b"b1",
            b"b12",
        ];
        let mut bytes: Vec<Option<Box<[u8]>>> = words
            .iter()
            .map(|w| Some(w.to_vec().into_boxed_slice()))
            .collect();
        bytes.push(None);
        let eos = bytes.len() as u32 - 1;
        let tokens = Arc::new(TokenBytes::new(bytes));
        let sorted_bytes: Vec<&[u8]> = tokens
            .sorted
            .iter()
            .map(|&id| tokens.get(id).unwrap())
            .collect();
        assert!(sorted_bytes.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            tokens.sorted.len(),
            words.len() - 1,
            "the empty token is never allowed"
        );
        for pattern in [
            "ab(c|d)*",
            "[ab]+1?",
            r#"\{"a": [0-9]+\}"#,
            "1[a2]*3?",
            "(a|b)*",
            " *1",
        ] {
            let g = RegexGuide::new(pattern, tokens.clone(), vec![eos]).unwrap();
            // Every state a few tokens away from the start.
            let mut states = vec![g.start()];
            for _ in 0..3 {
                let mut next = Vec::new();
                for &s in &states {
                    for id in 0..eos {
                        next.extend(g.walk(s, tokens.get(id).unwrap_or_default()));
                    }
                }
                states.extend(next);
                states.sort();
                states.dedup();
            }
            for &state in &states {
                let one_by_one: Vec<u32> = (0..eos)
                    .filter(|&id| {
                        let b = tokens.get(id).unwrap_or_default();
                        !b.is_empty() && g.walk(state, b).is_some()
                    })
                    .collect();
                let n = tokens.sorted.len();
                for piece in [1, 2, 3, 7, n] {
                    let mut got: Vec<u32> = (0..n.div_ceil(piece))
                        .flat_map(|p| g.walk_sorted(state, p * piece..((p + 1) * piece).min(n)))
                        .collect();
                    got.sort();
                    assert_eq!(got, one_by_one, "{pattern}, pieces of {piece}");
                }
                let mut all = g.allowed(state).ids();
                all.retain(|&id| id != eos);
                assert_eq!(all, one_by_one, "{pattern}");
            }
        }
    }

    #[test]
    fn allowed_tokens_follow_the_pattern_and_eos_waits_for_a_match() {
        let (tok, g) = guide("[0-9]{2}|yes");
        let eos = tok.eos_token_id().unwrap();
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        let start = g.start();
        let first = g.allowed(start).ids();
        let first_text = text(&tok, &first);
        assert_eq!(first.len(), 11, "{first_text}"); // ten digits and `y`
        assert!(!first.contains(&eos));
        let one = g.advance(start, id("4"));
        assert!(!g.is_complete(one));
        assert!(!g.allowed(one).contains(eos));
        let two = g.advance(one, id("2"));
        assert!(g.is_complete(two));
        // After two digits only the end is left.
        assert_eq!(g.allowed(two).ids(), [eos]);
        // The cache answers the same.
        assert_eq!(g.allowed(start).ids(), first);
        let y = g.advance(start, id("y"));
        assert_eq!(text(&tok, &g.allowed(y).ids()), "e");
    }

    /// A SentencePiece vocabulary with byte fallback (Llama 2's shape):
    /// `▁` is a space, `<0xC3>` `<0xA9>` spell `é` over two tokens, and the
    /// DFA follows UTF-8 through them.
    #[test]
    fn sentencepiece_bytes_and_a_character_over_two_tokens() {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 4, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                      "vocab": {"<0xC3>": 0, "<0xA9>": 1, "a": 2, "\u{2581}a": 3, "</s>": 4},
                      "merges": []}
        });
        let tok = Tokenizer::from_json(&json.to_string(), None).unwrap();
        let bytes = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
        assert_eq!(bytes.get(0), Some(&[0xC3u8][..]));
        assert_eq!(bytes.get(3), Some(&b" a"[..]));
        assert_eq!(bytes.get(4), None);
        let g = RegexGuide::new("é a", bytes, vec![4]).unwrap();
        assert_eq!(g.allowed(g.start()).ids(), [0]);
        let s = g.advance(g.start(), 0);
        assert_eq!(g.allowed(s).ids(), [1]);
        let s = g.advance(s, 1);
        assert_eq!(g.allowed(s).ids(), [3]);
        let s = g.advance(s, 3);
        assert_eq!(g.allowed(s).ids(), [4]);
    }

    /// An allowed set is a bitset: a JSON string's state allows nearly the
    /// whole vocabulary in vocabulary / 8 bytes, not 4 bytes an id.
    #[test]
    fn allowed_sets_are_bitsets_over_the_vocabulary() {
        let (tok, g) = guide(&json_string());
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        let inside = g.advance(g.start(), id("\""));
        let set = g.allowed(inside);
        let vocab = TokenBytes::from_tokenizer(&tok).unwrap().len();
        assert!(set.len() > vocab / 2, "{} of {vocab}", set.len());
        assert_eq!(set.bytes(), vocab.div_ceil(64) * 8);
        assert_eq!(set.ids().len(), set.len());
        assert!(set.contains(id("a")) && !set.contains(u32::MAX));
        let mut ids = AllowedTokens::with_capacity(3);
        ids.insert(200);
        ids.insert(200);
        ids.insert(2);
        assert_eq!((ids.len(), ids.ids()), (2, vec![2, 200]));
    }

    /// A full cache starts over: it never holds more than its bytes, and
    /// the sets it gives are the same either way.
    #[test]
    fn a_full_allowed_cache_starts_over() {
        let (tok, mut g) = guide("[0-9]{3}");
        let one = g.allowed(g.start()).bytes();
        g.cache_limit = 2 * one;
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        let mut state = g.start();
        let mut sets = Vec::new();
        for _ in 0..3 {
            sets.push(g.allowed(state).ids());
            state = g.advance(state, id("7"));
            let c = g.allowed.lock().unwrap();
            assert!(c.bytes <= g.cache_limit && c.sets.len() <= 2, "{}", c.bytes);
        }
        let (_, fresh) = guide("[0-9]{3}");
        let mut state = fresh.start();
        for set in sets {
            assert_eq!(fresh.allowed(state).ids(), set);
            state = fresh.advance(state, id("7"));
        }
    }

    /// A branch that can never match is no way on: `c` would lead into
    /// `[a&&b]`, a class with nothing in it.
    #[test]
    fn the_longest_match_is_counted_in_bytes_or_unbounded() {
        for (pattern, longest) in [
            ("yes|no", Some(3)),
            ("[0-9]{1,3}", Some(3)),
            ("a(b|cd)?e", Some(4)),
            ("é", Some(2)),
            ("", Some(0)),
            ("[0-9]+", None),
            ("a(bc)*d", None),
            ("x[a&&b]|yy", Some(2)),
        ] {
            let (_, g) = guide(pattern);
            assert_eq!(g.longest_match(), longest, "{pattern}");
        }
        let schema = json_schema_pattern(
            &serde_json::json!({"type": "object", "properties": {"a": {"type": "boolean"}},
                                "required": ["a"]}),
            true,
        )
        .unwrap();
        let (_, g) = guide(&schema);
        assert_eq!(g.longest_match(), Some(r#"{"a":false}"#.len()));
    }

    #[test]
    fn dead_ends_are_not_allowed() {
        let (tok, g) = guide("a(?:b|c[a&&b])");
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        let a = g.advance(g.start(), id("a"));
        assert_eq!(text(&tok, &g.allowed(a).ids()), "b");
        let (_, g) = guide("x[a&&b]");
        assert!(g.allowed(g.start()).is_empty());
    }

    #[test]
    fn choices_are_literal_and_bad_patterns_are_errors() {
        let p = choice_pattern(&["1+1", "a.b"]);
        let (tok, g) = guide(&p);
        let id = |s: &str| tok.encode(s, false).unwrap()[0];
        let s = g.advance(g.start(), id("a"));
        // `.` is a literal dot, not any character.
        assert_eq!(text(&tok, &g.allowed(s).ids()), ".");
        let tokens = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
        let e = RegexGuide::new("(", tokens.clone(), vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("regex \"(\""), "{e}");
        let e = RegexGuide::new("[0-9]{1000}{1000}", tokens, vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("regex"), "{e}");
    }
}

// ------------------------------------------------------------ JSON schema

/// Whitespace allowed between JSON tokens: at most one space (a DFA that
/// allowed any run would let a sample wander in blanks); none with vLLM's
/// `disable_any_whitespace`.
const JSON_WS: &str = "[ ]?";
/// A character of a JSON string; `\u` escapes leave out the UTF-16
/// surrogates, which alone are no character (strict parsers refuse them).
const JSON_STRING_CHAR: &str = r#"(?:[^"\\\x00-\x1F]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))"#;
const JSON_INTEGER: &str = "-?(?:0|[1-9][0-9]*)";
/// Exponents have at most two digits: every number is a finite double.
const JSON_NUMBER: &str = "-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]{1,2})?";
/// How deep `$ref`s may nest before a schema counts as recursive.
const MAX_REF_DEPTH: usize = 8;
/// How many containers deep "any JSON" (`response_format: json_object`, a
/// schema's bare `object` / `array` / `{}`) may nest: a regular pattern
/// cannot count brackets without bound, and each level multiplies the DFA.
pub const ANY_JSON_DEPTH: usize = 4;

/// A JSON schema (vLLM's `guided_json`, `response_format: json_schema`,
/// `structured_outputs.json`) as a pattern that the JSON texts it accepts
/// match: `type` (one or a list), `enum`, `const`, `properties` (in their
/// order; those not in `required` may be left out), maps
/// (`additionalProperties` with a schema, no `properties`), `items` and
/// tuples' `prefixItems` with `minItems` / `maxItems`, strings'
/// `minLength` / `maxLength` / `pattern` or `format` (date, time,
/// date-time, uuid, ipv4, email, hostname), numbers' `minimum` / `maximum`
/// / `exclusiveMinimum` / `exclusiveMaximum` (any for integers;
/// whole-number bounds for numbers, which are then written without an
/// exponent), `anyOf` / `oneOf`, and local `$ref`s (`#/$defs/...`). A
/// keyword that would constrain values beyond these (`multipleOf`,
/// `uniqueItems`, `additionalProperties: {schema}` beside `properties`,
/// ...) is an error naming it, never ignored. A schema that leaves a value
/// open (`{}`, `true`, an object without `properties`, an array without
/// `items`) takes any JSON of that kind up to [`ANY_JSON_DEPTH`] containers
/// deep. `compact`: no whitespace between tokens (vLLM's
/// `disable_any_whitespace`).
pub fn json_schema_pattern(schema: &Value, compact: bool) -> Result<String> {
    let ws = if compact { "" } else { JSON_WS };
    JsonSchema { root: schema, ws }.pattern(schema, 0)
}

/// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`,
/// vLLM's `structured_outputs.json_object`), up to [`ANY_JSON_DEPTH`]
/// containers deep.
pub fn json_object_pattern(compact: bool) -> String {
    let ws = if compact { "" } else { JSON_WS };
    any_object(&any_json(ANY_JSON_DEPTH - 1, ws), ws)
}

/// A JSON string.
fn json_string() -> String {
    format!("\"{JSON_STRING_CHAR}*\"")
}

/// `open item, item, ... close`, maybe empty.
fn json_list(open: &str, close: &str, item: &str, ws: &str) -> String {
    format!("{open}{ws}(?:{item}(?:{ws},{ws}{item})*)?{ws}{close}")
}

/// An object whose members' values match `value`.
fn any_object(value: &str, ws: &str) -> String {
    json_list(
        "\\{",
        "\\}",
        &format!("{}{ws}:{ws}{value}", json_string()),
        ws,
    )
}

/// Any JSON value with at most `depth` containers nested.
fn any_json(depth: usize, ws: &str) -> String {
    let scalar = format!("{}|{JSON_NUMBER}|true|false|null", json_string());
    (0..depth).fold(format!("(?:{scalar})"), |inner, _| {
        let array = json_list("\\[", "\\]", &inner, ws);
        format!("(?:{scalar}|{array}|{})", any_object(&inner, ws))
    })
}

/// Schema keywords that say nothing about the values a schema accepts.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$defs",
    "definitions",
    "strict",
];

struct JsonSchema<'a> {
    root: &'a Value,
    ws: &'a str,
}

/// An array's elements as a pattern: the `prefix` patterns in order, then
/// `item`s (none: no more), from `min` to `max` elements in all.
struct ArrayItems<'a> {
    prefix: &'a [String],
    item: Option<&'a str>,
    min: usize,
    max: Option<usize>,
    sep: String,
}

impl ArrayItems<'_> {
    /// Elements `i` and on, each after the first element of the array led
    /// by the separator; those at or past `min` may be left out (with all
    /// after them).
    fn from(&self, i: usize) -> String {
        let sep = if i == 0 { "" } else { self.sep.as_str() };
        if let Some(p) = self.prefix.get(i) {
            let element = format!("{sep}{p}{}", self.from(i + 1));
            return if i >= self.min {
                format!("(?:{element})?")
            } else {
                element
            };
        }
        let Some(item) = self.item.filter(|_| self.max.is_none_or(|m| m > i)) else {
            return String::new();
        };
        // Past the prefix: from `min - i` to `max - i` more items.
        let least = self.min.saturating_sub(i);
        let most = self.max.map(|m| m - i);
        let bounds = |least: usize, most: Option<usize>| match most {
            Some(most) => format!("{{{least},{most}}}"),
            None => format!("{{{least},}}"),
        };
        if i > 0 {
            return format!("(?:{}{item}){}", self.sep, bounds(least, most));
        }
        let more = bounds(least.saturating_sub(1), most.map(|m| m - 1));
        let some = format!("{item}(?:{}{item}){more}", self.sep);
        if least == 0 {
            format!("(?:{some})?")
        } else {
            some
        }
    }
}

/// One end of a numeric range: `minimum` / `maximum` (`strict: false`) or
/// `exclusiveMinimum` / `exclusiveMaximum`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound {
    value: f64,
    strict: bool,
}

impl Bound {
    fn at(value: f64) -> Self {
        Bound {
            value,
            strict: false,
        }
    }
}

/// Of two lower (`lower`) or upper bounds, the one that excludes more.
fn tighter(a: Option<Bound>, b: Option<Bound>, lower: bool) -> Option<Bound> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let key = |x: Bound| if lower { x.value } else { -x.value };
            Some(match key(a).total_cmp(&key(b)) {
                std::cmp::Ordering::Greater => a,
                std::cmp::Ordering::Less => b,
                std::cmp::Ordering::Equal => Bound {
                    value: a.value,
                    strict: a.strict || b.strict,
                },
            })
        }
        (a, b) => a.or(b),
    }
}

/// The lower and upper bounds a numeric schema gives (draft 6 and later:
/// `exclusiveMinimum` is a number; a format's own range aside).
fn numeric_bounds(obj: &serde_json::Map<String, Value>) -> Result<(Option<Bound>, Option<Bound>)> {
    if let Some(f) = obj.get("format").and_then(Value::as_str)
        && !matches!(f, "int32" | "int64" | "float" | "double")
    {
        return Err(ModelError::Invalid(format!(
            "JSON schema: numeric format {f:?} is not supported by guided decoding here"
        )));
    }
    let get = |k: &str, strict: bool| -> Result<Option<Bound>> {
        match obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|value| Some(Bound { value, strict }))
                .ok_or_else(|| {
                    ModelError::Invalid(format!("JSON schema: {k} {v} is not a finite number"))
                }),
        }
    };
    Ok((
        tighter(get("minimum", false)?, get("exclusiveMinimum", true)?, true),
        tighter(
            get("maximum", false)?,
            get("exclusiveMaximum", true)?,
            false,
        ),
    ))
}

/// Past this a bound is no bound a 64-bit integer meets differently.
const LARGEST_BOUND: f64 = 9.0e18;

/// The JSON integers within `lo` and `hi`, without leading zeros (nor `-0`).
fn integer_range(lo: Option<Bound>, hi: Option<Bound>) -> Result<String> {
    // The least and greatest integers the bounds let in.
    let lo = lo.filter(|b| b.value > -LARGEST_BOUND).map(|b| {
        let c = b.value.ceil();
        (if b.strict && c == b.value { c + 1.0 } else { c }) as i128
    });
    let hi = hi.filter(|b| b.value < LARGEST_BOUND).map(|b| {
        let f = b.value.floor();
        (if b.strict && f == b.value { f - 1.0 } else { f }) as i128
    });
    if let (Some(l), Some(h)) = (lo, hi)
        && l > h
    {
        return Err(ModelError::Invalid(format!(
            "JSON schema: no integer lies between the minimum and the maximum ({l} > {h})"
        )));
    }
    let mut alternatives = Vec::new();
    if hi.is_none_or(|h| h >= 0) {
        let from = lo.map_or(0, |l| l.max(0)) as u64;
        alternatives.push(uint_range(from, hi.map(|h| h as u64)));
    }
    if lo.is_none_or(|l| l < 0) {
        let from = hi.map_or(1, |h| (-h).max(1)) as u64;
        alternatives.push(format!("-{}", uint_range(from, lo.map(|l| (-l) as u64))));
    }
    Ok(format!("(?:{})", alternatives.join("|")))
}

/// The decimal numbers within `lo` and `hi` (whole-number bounds only), in
/// plain notation (no exponent), without `-0`.
fn number_range(lo: Option<Bound>, hi: Option<Bound>) -> Result<String> {
    for b in lo.iter().chain(&hi) {
        if b.value.fract() != 0.0 || b.value.abs() >= LARGEST_BOUND {
            return Err(ModelError::Invalid(format!(
                "JSON schema: a number bound of {} is not supported by guided decoding here \
                 (whole-number bounds are)",
                b.value
            )));
        }
    }
    let whole = |b: &Bound| (b.value as i128, b.strict);
    let (lo, hi) = (lo.as_ref().map(whole), hi.as_ref().map(whole));
    let mut alternatives = Vec::new();
    // x >= 0: its magnitude from max(lo, 0) to hi.
    if hi.is_none_or(|(h, strict)| h > 0 || (h == 0 && !strict)) {
        let low = match lo {
            Some((l, strict)) if l >= 0 => (l as u64, strict),
            _ => (0, false),
        };
        alternatives.extend(udecimal_range(low, hi.map(|(h, s)| (h as u64, s))));
    }
    // x < 0: its magnitude m > 0, from -hi to -lo.
    if lo.is_none_or(|(l, _)| l < 0) {
        let low = match hi {
            Some((h, strict)) if h < 0 => ((-h) as u64, strict),
            _ => (0, true),
        };
        let high = lo.map(|(l, s)| ((-l) as u64, s));
        alternatives.extend(udecimal_range(low, high).map(|p| format!("-{p}")));
    }
    if alternatives.is_empty() {
        return Err(ModelError::Invalid(
            "JSON schema: no number lies between the minimum and the maximum".into(),
        ));
    }
    Ok(format!("(?:{})", alternatives.join("|")))
}

/// Decimals `I(.F)?` from `low` to `high` (`(value, strict)`; none: no
/// upper bound), or none when there are none.
fn udecimal_range(low: (u64, bool), high: Option<(u64, bool)>) -> Option<String> {
    const ANY_FRACTION: &str = r"(?:\.[0-9]+)?";
    const NONZERO_FRACTION: &str = r"\.[0-9]*[1-9][0-9]*";
    const ZERO_FRACTION: &str = r"(?:\.0+)?";
    let (l, l_strict) = low;
    let mut alternatives = Vec::new();
    match high {
        Some((u, _)) if u < l => {}
        Some((u, u_strict)) if u == l => {
            if !l_strict && !u_strict {
                alternatives.push(format!("{l}{ZERO_FRACTION}"));
            }
        }
        _ => {
            // The integer part is l: above l when strict.
            let fraction = if l_strict {
                NONZERO_FRACTION
            } else {
                ANY_FRACTION
            };
            alternatives.push(format!("{l}{fraction}"));
            // Integer parts strictly between: any fraction.
            let inner_high = high.map(|(u, _)| u - 1);
            if inner_high.is_none_or(|h| h > l) {
                alternatives.push(format!("{}{ANY_FRACTION}", uint_range(l + 1, inner_high)));
            }
            // The integer part is the upper bound: only its whole value.
            if let Some((u, false)) = high {
                alternatives.push(format!("{u}{ZERO_FRACTION}"));
            }
        }
    }
    (!alternatives.is_empty()).then(|| format!("(?:{})", alternatives.join("|")))
}

/// The integers from `lo` to `hi` (none: no bound) in decimal, without
/// leading zeros: by number of digits, each length split at the first digit
/// where its ends differ (the pattern `to-regex-range` makes).
fn uint_range(lo: u64, hi: Option<u64>) -> String {
    let digits = |n: u64| n.to_string().len();
    let mut alternatives = Vec::new();
    let longest = hi.map_or(digits(lo), digits);
    for len in digits(lo)..=longest {
        let first = if len == 1 {
            0
        } else {
            10u128.pow(len as u32 - 1)
        };
        let last = 10u128.pow(len as u32) - 1;
        let a = first.max(lo.into());
        let b = hi.map_or(last, |h| last.min(h.into()));
        if a <= b {
            alternatives.push(same_length_range(
                a.to_string().as_bytes(),
                b.to_string().as_bytes(),
            ));
        }
    }
    if hi.is_none() {
        // Every number with more digits.
        alternatives.push(format!("[1-9][0-9]{{{},}}", digits(lo)));
    }
    format!("(?:{})", alternatives.join("|"))
}

/// The digit strings from `x` to `y`, both of one length.
fn same_length_range(x: &[u8], y: &[u8]) -> String {
    let Some((&x0, x_rest)) = x.split_first() else {
        return String::new();
    };
    let (&y0, y_rest) = y.split_first().unwrap_or((&x0, &[]));
    let n = x_rest.len();
    let any = if n == 0 {
        String::new()
    } else {
        format!("[0-9]{{{n}}}")
    };
    let class = |a: u8, b: u8| {
        if a == b {
            (a as char).to_string()
        } else {
            format!("[{}-{}]", a as char, b as char)
        }
    };
    if x0 == y0 {
        return format!("{}{}", x0 as char, same_length_range(x_rest, y_rest));
    }
    let mut alternatives = Vec::new();
    let from_zero = x_rest.iter().all(|&d| d == b'0');
    let to_nine = y_rest.iter().all(|&d| d == b'9');
    let low = if from_zero {
        x0
    } else {
        let nines = vec![b'9'; n];
        alternatives.push(format!(
            "{}{}",
            x0 as char,
            same_length_range(x_rest, &nines)
        ));
        x0 + 1
    };
    let high = if to_nine { y0 } else { y0 - 1 };
    if low <= high {
        alternatives.push(format!("{}{any}", class(low, high)));
    }
    if !to_nine {
        let zeros = vec![b'0'; n];
        alternatives.push(format!(
            "{}{}",
            y0 as char,
            same_length_range(&zeros, y_rest)
        ));
    }
    format!("(?:{})", alternatives.join("|"))
}

/// A string `format`'s text as a pattern (inside the quotes; none of these
/// needs a JSON escape), so that strict parsers (Python's `fromisoformat`,
/// `uuid.UUID`, `ipaddress`) read every output.
fn string_format(format: &str) -> Option<String> {
    // 0001-9999, and the leap years among them for February 29.
    let year = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)";
    let leap_year =
        "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)";
    let month_day = "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))";
    let date = format!("(?:{year}-{month_day}|{leap_year}-02-29)");
    let time = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";
    let octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    let label = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
    let hex = |n: usize| format!("[0-9a-fA-F]{{{n}}}");
    Some(match format {
        "date" => date,
        "time" => time.to_string(),
        "date-time" => format!("{date}T{time}"),
        "uuid" => format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12)),
        "ipv4" => format!("{octet}(?:\\.{octet}){{3}}"),
        "hostname" => format!("{label}(?:\\.{label})*"),
        "email" => {
            let atom = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+";
            format!("{atom}(?:\\.{atom})*@(?:{label}\\.)+[A-Za-z]{{2,63}}")
        }
        _ => return None,
    })
}

fn unsupported(keyword: &str) -> ModelError {
    ModelError::Invalid(format!(
        "JSON schema keyword `{keyword}` is not supported by guided decoding here"
    ))
}

/// A JSON value written out, as a literal pattern.
fn literal(v: &Value) -> String {
    regex::escape(&v.to_string())
}

impl JsonSchema<'_> {
    fn pattern(&self, s: &Value, depth: usize) -> Result<String> {
        let obj = match s {
            Value::Bool(true) => return Ok(any_json(ANY_JSON_DEPTH, self.ws)),
            Value::Object(o) => o,
            _ => {
                return Err(ModelError::Invalid(format!(
                    "a JSON schema is an object, got {s}"
                )));
            }
        };
        for k in obj.keys() {
            let known = matches!(
                k.as_str(),
                "type"
                    | "enum"
                    | "const"
                    | "properties"
                    | "required"
                    | "items"
                    | "minItems"
                    | "maxItems"
                    | "minLength"
                    | "maxLength"
                    | "pattern"
                    | "anyOf"
                    | "oneOf"
                    | "$ref"
                    | "additionalProperties"
                    | "minimum"
                    | "maximum"
                    | "exclusiveMinimum"
                    | "exclusiveMaximum"
                    | "format"
                    | "prefixItems"
            ) || ANNOTATIONS.contains(&k.as_str());
            if !known {
                return Err(unsupported(k));
            }
        }
        // A schema for the members past `properties`: a map's values (no
        // properties), which a pattern can take; beside properties, where
        // any member may come between them, it cannot.
        if let Some(extra) = obj.get("additionalProperties")
            && !extra.is_boolean()
            && obj
                .get("properties")
                .and_then(Value::as_object)
                .is_some_and(|p| !p.is_empty())
        {
            return Err(ModelError::Invalid(
                "JSON schema keyword `additionalProperties` with a schema beside `properties` is \
                 not supported by guided decoding here (a map, without properties, is)"
                    .into(),
            ));
        }
        if let Some(r) = obj.get("$ref") {
            if depth >= MAX_REF_DEPTH {
                return Err(ModelError::Invalid(format!(
                    "JSON schema: $ref {r} nests more than {MAX_REF_DEPTH} deep (a recursive \
                     schema has no regular pattern)"
                )));
            }
            let target = r
                .as_str()
                .and_then(|r| r.strip_prefix("#/"))
                .and_then(|path| {
                    path.split('/').try_fold(self.root, |v, key| {
                        v.get(key.replace("~1", "/").replace("~0", "~"))
                    })
                })
                .ok_or_else(|| {
                    ModelError::Invalid(format!("JSON schema: $ref {r} is not a local definition"))
                })?;
            return self.pattern(target, depth + 1);
        }
        if let Some(c) = obj.get("const") {
            return Ok(literal(c));
        }
        if let Some(e) = obj.get("enum") {
            let values = e
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ModelError::Invalid("JSON schema: enum is not a list".into()))?;
            let alternatives: Vec<String> = values.iter().map(literal).collect();
            return Ok(format!("(?:{})", alternatives.join("|")));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = obj.get(key) {
                let options = options
                    .as_array()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ModelError::Invalid(format!("JSON schema: {key} is not a list"))
                    })?;
                let alternatives = options
                    .iter()
                    .map(|o| self.pattern(o, depth))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(format!("(?:{})", alternatives.join("|")));
            }
        }
        let types: Vec<&str> = match obj.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            None if obj.contains_key("properties") => vec!["object"],
            None if obj.contains_key("items") => vec!["array"],
            None if obj.keys().all(|k| ANNOTATIONS.contains(&k.as_str())) => {
                return Ok(any_json(ANY_JSON_DEPTH, self.ws));
            }
            _ => return Err(unsupported("a schema without a type")),
        };
        let alternatives = types
            .iter()
            .map(|t| self.typed(obj, t, depth))
            .collect::<Result<Vec<_>>>()?;
        Ok(format!("(?:{})", alternatives.join("|")))
    }

    fn typed(&self, obj: &serde_json::Map<String, Value>, t: &str, depth: usize) -> Result<String> {
        let count = |k: &str| obj.get(k).and_then(Value::as_u64);
        let ws = self.ws;
        Ok(match t {
            "string" => {
                if let Some(format) = obj.get("format") {
                    let format = format.as_str().unwrap_or_default();
                    let body = string_format(format).ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "JSON schema: string format {format:?} is not supported by guided \
                             decoding here (date, time, date-time, uuid, ipv4, email, hostname \
                             are)"
                        ))
                    })?;
                    if let Some(k) = ["pattern", "minLength", "maxLength"]
                        .into_iter()
                        .find(|k| obj.contains_key(*k))
                    {
                        return Err(ModelError::Invalid(format!(
                            "JSON schema: a string with both format {format:?} and {k} is not \
                             supported by guided decoding here"
                        )));
                    }
                    return Ok(format!("\"{body}\""));
                }
                if let Some(p) = obj.get("pattern").and_then(Value::as_str) {
                    let p = p.strip_prefix('^').unwrap_or(p);
                    let p = p.strip_suffix('$').unwrap_or(p);
                    format!("\"(?:{p})\"")
                } else {
                    let (lo, hi) = (count("minLength").unwrap_or(0), count("maxLength"));
                    match hi {
                        Some(hi) => format!("\"{JSON_STRING_CHAR}{{{lo},{hi}}}\""),
                        None => format!("\"{JSON_STRING_CHAR}{{{lo},}}\""),
                    }
                }
            }
            "integer" => {
                let (lo, hi) = numeric_bounds(obj)?;
                let int32 = obj.get("format").and_then(Value::as_str) == Some("int32");
                let (lo, hi) = if int32 {
                    (
                        tighter(lo, Some(Bound::at(i32::MIN.into())), true),
                        tighter(hi, Some(Bound::at(i32::MAX.into())), false),
                    )
                } else {
                    (lo, hi)
                };
                match (lo, hi) {
                    (None, None) => JSON_INTEGER.to_string(),
                    (lo, hi) => integer_range(lo, hi)?,
                }
            }
            "number" => match numeric_bounds(obj)? {
                (None, None) => JSON_NUMBER.to_string(),
                (lo, hi) => number_range(lo, hi)?,
            },
            "boolean" => "(?:true|false)".to_string(),
            "null" => "null".to_string(),
            "array" => {
                // pydantic's tuples: `prefixItems`, then `items` (false: no
                // more), within minItems / maxItems.
                let prefix: Vec<String> = match obj.get("prefixItems") {
                    None => Vec::new(),
                    Some(Value::Array(p)) => p
                        .iter()
                        .map(|s| self.pattern(s, depth))
                        .collect::<Result<_>>()?,
                    Some(_) => {
                        return Err(ModelError::Invalid(
                            "JSON schema: prefixItems is not a list".into(),
                        ));
                    }
                };
                let item = match obj.get("items") {
                    Some(Value::Bool(false)) => None,
                    Some(items) => Some(self.pattern(items, depth)?),
                    None => Some(any_json(ANY_JSON_DEPTH - 1, self.ws)),
                };
                let lo = count("minItems").unwrap_or(0) as usize;
                let mut hi = count("maxItems").map(|h| h as usize);
                if item.is_none() {
                    hi = Some(hi.map_or(prefix.len(), |h| h.min(prefix.len())));
                }
                if hi.is_some_and(|h| h < lo) {
                    return Err(ModelError::Invalid(
                        "JSON schema: maxItems (or the prefixItems an `items: false` array \
                         holds) is below minItems"
                            .into(),
                    ));
                }
                let list = ArrayItems {
                    prefix: &prefix[..prefix.len().min(hi.unwrap_or(usize::MAX))],
                    item: item.as_deref(),
                    min: lo,
                    max: hi,
                    sep: format!("{ws},{ws}"),
                };
                format!("\\[{ws}{}{ws}\\]", list.from(0))
            }
            "object" => {
                let map_values = obj.get("additionalProperties").filter(|v| !v.is_boolean());
                if let Some(values) = map_values
                    && obj
                        .get("properties")
                        .and_then(Value::as_object)
                        .is_none_or(|p| p.is_empty())
                {
                    // pydantic's `dict[str, X]`: any keys, values of X.
                    if obj
                        .get("required")
                        .and_then(Value::as_array)
                        .is_some_and(|r| !r.is_empty())
                    {
                        return Err(unsupported("required in a map (additionalProperties)"));
                    }
                    let value = self.pattern(values, depth)?;
                    return Ok(any_object(&value, ws));
                }
                let props = match obj.get("properties") {
                    Some(Value::Object(p)) => p,
                    None if obj.get("additionalProperties") != Some(&Value::Bool(false))
                        && obj
                            .get("required")
                            .and_then(Value::as_array)
                            .is_none_or(|r| r.is_empty()) =>
                    {
                        return Ok(any_object(&any_json(ANY_JSON_DEPTH - 1, self.ws), self.ws));
                    }
                    None => &serde_json::Map::new(),
                    Some(_) => {
                        return Err(ModelError::Invalid(
                            "JSON schema: properties is not an object".into(),
                        ));
                    }
                };
                let required: Vec<&str> = obj
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                // Only declared members are written: one the schema
                // requires but does not declare could never be there.
                if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
                    return Err(ModelError::Invalid(format!(
                        "JSON schema: required names {missing:?}, which properties does not \
                         declare; declare it (with its schema) under properties"
                    )));
                }
                let members = props
                    .iter()
                    .map(|(name, schema)| {
                        Ok((
                            format!(
                                "{}{ws}:{ws}{}",
                                literal(&Value::String(name.clone())),
                                self.pattern(schema, depth)?
                            ),
                            required.contains(&name.as_str()),
                        ))
                    })
                    .collect::<Result<Vec<(String, bool)>>>()?;
                let first_required = members
                    .iter()
                    .position(|(_, r)| *r)
                    .unwrap_or(members.len());
                // The first member written is any one up to the first
                // required; each later one is there if required, else may be.
                let mut alternatives: Vec<String> = (0..members.len().min(first_required + 1))
                    .map(|j| {
                        let mut p = members[j].0.clone();
                        for (m, req) in &members[j + 1..] {
                            let one = format!("{ws},{ws}{m}");
                            if *req {
                                p.push_str(&one);
                            } else {
                                p.push_str(&format!("(?:{one})?"));
                            }
                        }
                        p
                    })
                    .collect();
                if first_required == members.len() {
                    alternatives.push(String::new());
                }
                format!("\\{{{ws}(?:{}){ws}\\}}", alternatives.join("|"))
            }
            other => {
                return Err(ModelError::Invalid(format!(
                    "JSON schema: unknown type {other:?}"
                )));
            }
        })
    }
}

#[cfg(test)]
mod json_schema_tests {
    use super::*;
    use serde_json::json;

    fn matcher(schema: Value) -> regex::Regex {
        let p = json_schema_pattern(&schema, false).unwrap();
        regex::Regex::new(&format!("^(?:{p})$")).unwrap()
    }

    #[test]
    fn objects_take_their_properties_in_order_and_may_leave_out_the_optional() {
        let m = matcher(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 5},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "ok": {"type": ["boolean", "null"]}
            },
            "required": ["age"]
        }));
        for good in [
            r#"{"name": "Ann", "age": 7, "tags": ["a", "b"], "ok": true}"#,
            r#"{"age":-12}"#,
            r#"{"name":"","age":0,"ok":null}"#,
            r#"{ "age": 3, "tags": [] }"#,
            r#"{"name": "\u00e9\n", "age": 1}"#,
        ] {
            assert!(m.is_match(good), "{good}");
            serde_json::from_str::<Value>(good).unwrap();
        }
        for bad in [
            r#"{"name": "Ann"}"#,                     // age is required
            r#"{"age": 7, "name": "Ann"}"#,           // out of order
            r#"{"age": 07}"#,                         // not JSON
            r#"{"age": 1.5}"#,                        // not an integer
            r#"{"name": "toolong", "age": 1}"#,       // maxLength 5
            r#"{"age": 1, "tags": ["a", "b", "a"]}"#, // maxItems 2
            r#"{"age": 1, "tags": ["c"]}"#,           // enum
            r#"{"age": 1,}"#,
            r#"{"age": 1, "extra": 2}"#,
        ] {
            assert!(!m.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn refs_any_of_and_numbers() {
        let m = matcher(json!({
            "$defs": {"point": {"type": "object",
                                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                "required": ["x", "y"]}},
            "anyOf": [{"$ref": "#/$defs/point"}, {"const": "none"}]
        }));
        assert!(m.is_match(r#"{"x": 1.5e-3, "y": -2}"#));
        assert!(m.is_match(r#""none""#));
        assert!(!m.is_match(r#"{"x": 1}"#));
        let m = matcher(json!({"type": "array", "items": {"type": "integer"},
                               "minItems": 2, "maxItems": 3}));
        assert!(m.is_match("[1, 2]") && m.is_match("[1,2,3]"));
        assert!(!m.is_match("[1]") && !m.is_match("[1,2,3,4]"));
    }

    #[test]
    fn open_schemas_take_any_json_up_to_the_depth() {
        let whole = |p: &str| regex::Regex::new(&format!("^(?:{p})$")).unwrap();
        let object = whole(&json_object_pattern(false));
        let nested = r#"{"a": [1, {"b": null, "c": [true, -2.5e-3]}], "d": "x\"y", "e": {}}"#;
        for good in [nested, "{}", r#"{"k":"\u00e9"}"#] {
            assert!(object.is_match(good), "{good}");
        }
        let too_deep = r#"{"a": {"b": {"c": {"d": {"e": 1}}}}}"#;
        for bad in [
            "[1]",
            "1",
            r#"{"a": 1,}"#,
            r#"{"a" 1}"#,
            r#"{"k": "\ud800"}"#,
            too_deep,
        ] {
            assert!(!object.is_match(bad), "{bad}");
        }
        let compact = whole(&json_object_pattern(true));
        assert!(compact.is_match(r#"{"a":[1,2],"b":{}}"#));
        assert!(!compact.is_match(r#"{"a": 1}"#));
        for (schema, good, bad) in [
            (json!({}), "[1, \"x\"]", "[1,]"),
            (json!(true), "null", "nul"),
            (json!({"description": "anything"}), "{\"a\": 1}", "{a: 1}"),
            (json!({"type": "object"}), "{\"a\": [1]}", "[]"),
            (
                json!({"type": "object", "additionalProperties": false}),
                "{}",
                "{\"a\": 1}",
            ),
            (
                json!({"type": "array", "maxItems": 2}),
                "[{}, []]",
                "[1, 2, 3]",
            ),
        ] {
            let m = matcher(schema.clone());
            assert!(m.is_match(good), "{schema}: {good}");
            assert!(!m.is_match(bad), "{schema}: {bad}");
        }
    }

    /// pydantic's tuples (`prefixItems`, then `items` or `items: false`)
    /// and lists within minItems / maxItems: every array of up to 5 of
    /// `1`, `"a"`, `true` matches exactly when each element is of its
    /// place's type and the count is within bounds.
    #[test]
    fn arrays_take_their_prefix_items_then_items_within_the_counts() {
        let int = json!({"type": "integer"});
        let string = json!({"type": "string"});
        let cases = [
            json!({"prefixItems": [int, string], "items": false, "minItems": 2, "maxItems": 2}),
            json!({"prefixItems": [int, string], "items": false}),
            json!({"prefixItems": [int, string], "items": {"type": "boolean"}, "minItems": 1}),
            json!({"prefixItems": [int, string, int], "maxItems": 2}),
            json!({"prefixItems": [string], "items": int, "minItems": 3, "maxItems": 4}),
            json!({"items": int, "minItems": 1, "maxItems": 3}),
            json!({"items": string}),
            json!({"items": false}),
        ];
        let values = [json!(1), json!("a"), json!(true)];
        let type_of = |v: &Value| match v {
            Value::Number(_) => "integer",
            Value::String(_) => "string",
            _ => "boolean",
        };
        for case in cases {
            let mut schema = case.clone();
            schema["type"] = json!("array");
            let m = matcher(schema.clone());
            let prefix = case["prefixItems"].as_array().cloned().unwrap_or_default();
            let fits = |i: usize, v: &Value| -> bool {
                let s = prefix.get(i).or(case.get("items"));
                match s {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(s) => s["type"] == type_of(v),
                }
            };
            let lo = case["minItems"].as_u64().unwrap_or(0) as usize;
            let hi = case["maxItems"].as_u64().map_or(usize::MAX, |h| h as usize);
            let mut arrays: Vec<Vec<Value>> = vec![vec![]];
            for _ in 0..5 {
                let longer: Vec<Vec<Value>> = arrays
                    .iter()
                    .filter(|a| a.len() == arrays.last().map_or(0, Vec::len))
                    .flat_map(|a| {
                        values.iter().map(move |v| {
                            let mut b = a.clone();
                            b.push(v.clone());
                            b
                        })
                    })
                    .collect();
                arrays.extend(longer);
            }
            for a in &arrays {
                let valid =
                    (lo..=hi).contains(&a.len()) && a.iter().enumerate().all(|(i, v)| fits(i, v));
                let text = serde_json::to_string(&Value::Array(a.clone())).unwrap();
                let spaced = text.replace(',', ", ");
                assert_eq!(m.is_match(&spaced), valid, "{schema}: {spaced}");
            }
        }
        assert!(
            json_schema_pattern(
                &json!({"type": "array", "prefixItems": [int, int], "items": false,
                        "minItems": 3}),
                false
            )
            .unwrap_err()
            .to_string()
            .contains("minItems")
        );
    }

    /// pydantic's `dict[str, X]`: an object of any keys whose values are X.
    #[test]
    fn maps_take_any_keys_with_values_of_their_schema() {
        let m = matcher(json!({"type": "object", "additionalProperties": {"type": "integer"}}));
        for good in [r#"{}"#, r#"{"a": 1}"#, r#"{"a": 1, "b c": -2}"#] {
            assert!(m.is_match(good), "{good}");
        }
        for bad in [r#"{"a": "x"}"#, r#"{"a": 1,}"#, r#"{a: 1}"#, r#"[1]"#] {
            assert!(!m.is_match(bad), "{bad}");
        }
        let e = json_schema_pattern(
            &json!({"type": "object", "properties": {"a": {"type": "integer"}},
                    "additionalProperties": {"type": "integer"}}),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("beside `properties`"), "{e}");
    }

    /// Integer bounds, inclusive, exclusive, fractional or absent: every
    /// integer from -1,200 to 1,200 matches exactly when it is within
    /// them, and only in JSON's spelling (no leading zeros, no `-0`).
    #[test]
    fn integer_bounds_let_in_exactly_the_integers_within() {
        let bounds: Vec<Value> = vec![
            json!({}),
            json!({"minimum": 0}),
            json!({"minimum": 1, "maximum": 10}),
            json!({"exclusiveMinimum": 0, "exclusiveMaximum": 100}),
            json!({"minimum": -5, "maximum": 5}),
            json!({"minimum": -1000, "maximum": -10}),
            json!({"maximum": 7}),
            json!({"exclusiveMaximum": -7}),
            json!({"minimum": 99, "maximum": 1001}),
            json!({"minimum": 120, "maximum": 999}),
            json!({"minimum": 0.5, "maximum": 20.5}),
            json!({"exclusiveMinimum": -3.5, "exclusiveMaximum": 3.0}),
            json!({"minimum": 37, "maximum": 37}),
            json!({"minimum": 5, "exclusiveMinimum": 5}),
            json!({"minimum": -1e300}),
        ];
        for b in bounds {
            let mut schema = json!({"type": "integer"});
            for (k, v) in b.as_object().unwrap() {
                schema[k] = v.clone();
            }
            let m = matcher(schema.clone());
            let f = |k: &str| b.get(k).and_then(Value::as_f64);
            for n in -1200i64..=1200 {
                let x = n as f64;
                let within = f("minimum").is_none_or(|v| x >= v)
                    && f("maximum").is_none_or(|v| x <= v)
                    && f("exclusiveMinimum").is_none_or(|v| x > v)
                    && f("exclusiveMaximum").is_none_or(|v| x < v);
                assert_eq!(m.is_match(&n.to_string()), within, "{schema}: {n}");
            }
            for odd in ["007", "+5", "1.0", "1e2", ""] {
                assert!(!m.is_match(odd), "{schema}: {odd}");
            }
            // JSON's `-0` is an integer; a bounded range spells zero `0`.
            assert_eq!(m.is_match("-0"), b == json!({}), "{schema}");
        }
        // Far from zero, and int32's own range.
        let m = matcher(json!({"type": "integer", "minimum": 1_000_000_007i64}));
        assert!(m.is_match("1000000007") && m.is_match("99999999999999999999"));
        assert!(!m.is_match("1000000006") && !m.is_match("999999999"));
        let m = matcher(json!({"type": "integer", "format": "int32"}));
        assert!(m.is_match("2147483647") && m.is_match("-2147483648"));
        assert!(!m.is_match("2147483648") && !m.is_match("-2147483649"));
    }

    /// Number bounds (whole numbers): plain decimals within them match,
    /// nothing else (no exponent, no `-0`).
    #[test]
    fn number_bounds_let_in_exactly_the_decimals_within() {
        let mut texts: Vec<String> = Vec::new();
        for i in 0..=30 {
            for fraction in ["", ".0", ".00", ".5", ".25", ".05", ".000001", ".999"] {
                texts.push(format!("{i}{fraction}"));
                texts.push(format!("-{i}{fraction}"));
            }
        }
        let bounds: Vec<Value> = vec![
            json!({"minimum": 0, "maximum": 1}),
            json!({"exclusiveMinimum": 0}),
            json!({"exclusiveMinimum": 0, "exclusiveMaximum": 1}),
            json!({"minimum": -3, "exclusiveMaximum": 2}),
            json!({"minimum": -20, "maximum": -4}),
            json!({"exclusiveMinimum": -20, "exclusiveMaximum": -4}),
            json!({"maximum": 0}),
            json!({"exclusiveMaximum": 0}),
            json!({"minimum": 12}),
            json!({"minimum": 7, "maximum": 7}),
            json!({"minimum": 0, "maximum": 100}),
        ];
        for b in bounds {
            let mut schema = json!({"type": "number"});
            for (k, v) in b.as_object().unwrap() {
                schema[k] = v.clone();
            }
            let m = matcher(schema.clone());
            let f = |k: &str| b.get(k).and_then(Value::as_f64);
            for t in &texts {
                let x: f64 = t.parse().unwrap();
                let negative_zero = t.starts_with('-') && x == 0.0;
                let within = !negative_zero
                    && f("minimum").is_none_or(|v| x >= v)
                    && f("maximum").is_none_or(|v| x <= v)
                    && f("exclusiveMinimum").is_none_or(|v| x > v)
                    && f("exclusiveMaximum").is_none_or(|v| x < v);
                assert_eq!(m.is_match(t), within, "{schema}: {t}");
            }
            for odd in ["1e0", "00.5", ".5", "1.", "+1"] {
                assert!(!m.is_match(odd), "{schema}: {odd}");
            }
        }
    }

    /// String formats: each a date, time, ... that a strict parser reads.
    #[test]
    fn string_formats_take_only_valid_values() {
        let quoted = |t: &str| format!("\"{t}\"");
        let m = matcher(json!({"type": "string", "format": "date"}));
        let leap =
            |y: u32| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
        for year in [1, 4, 100, 400, 1900, 2000, 2023, 2024, 9999] {
            for month in 0..=13u32 {
                for day in 0..=32u32 {
                    let days = match month {
                        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
                        4 | 6 | 9 | 11 => 30,
                        2 if leap(year) => 29,
                        2 => 28,
                        _ => 0,
                    };
                    let valid = day >= 1 && day <= days;
                    let text = quoted(&format!("{year:04}-{month:02}-{day:02}"));
                    assert_eq!(m.is_match(&text), valid, "{text}");
                }
            }
        }
        assert!(!m.is_match(&quoted("0000-01-01")));
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "time",
                &["00:00:00Z", "23:59:59.123456+05:30", "12:30:00-08:00"],
                &[
                    "24:00:00Z",
                    "12:60:00Z",
                    "12:00:00",
                    "1:00:00Z",
                    "12:00:00.Z",
                ],
            ),
            (
                "date-time",
                &["2024-02-29T12:00:00Z", "1999-12-31T23:59:59.5+01:00"],
                &[
                    "2023-02-29T12:00:00Z",
                    "2024-01-01 12:00:00Z",
                    "2024-01-01T12:00Z",
                ],
            ),
            (
                "uuid",
                &[
                    "123e4567-e89b-12d3-a456-426614174000",
                    "00000000-0000-0000-0000-000000000000",
                ],
                &[
                    "123e4567e89b12d3a456426614174000",
                    "123e4567-e89b-12d3-a456-42661417400g",
                ],
            ),
            (
                "ipv4",
                &["0.0.0.0", "255.255.255.255", "10.1.20.199"],
                &["256.0.0.1", "01.2.3.4", "1.2.3", "1.2.3.4.5"],
            ),
            (
                "email",
                &["a@b.co", "first.last+tag@mail.example.org"],
                &[
                    "a@b",
                    ".a@b.co",
                    "a..b@c.de",
                    "a@-b.co",
                    "a b@c.de",
                    "@b.co",
                ],
            ),
            (
                "hostname",
                &["localhost", "a-b.example.com", "x1"],
                &["-a.com", "a-.com", "a..b", "a_b.com", ""],
            ),
        ];
        for (format, good, bad) in cases {
            let m = matcher(json!({"type": "string", "format": format}));
            for t in *good {
                assert!(m.is_match(&quoted(t)), "{format}: {t}");
            }
            for t in *bad {
                assert!(!m.is_match(&quoted(t)), "{format}: {t}");
            }
        }
    }

    #[test]
    fn what_would_be_ignored_is_an_error() {
        for (schema, says) in [
            (json!({"type": "integer", "multipleOf": 3}), "multipleOf"),
            (json!({"type": "string", "format": "uri"}), "\"uri\""),
            (
                json!({"type": "string", "format": "date", "maxLength": 10}),
                "maxLength",
            ),
            (json!({"type": "number", "minimum": 0.5}), "0.5"),
            (json!({"type": "integer", "format": "int8"}), "int8"),
            (
                json!({"type": "integer", "minimum": 3, "exclusiveMaximum": 3.5, "maximum": 2}),
                "no integer",
            ),
            (
                json!({"type": "number", "exclusiveMinimum": 2, "maximum": 2}),
                "no number",
            ),
            (
                json!({"type": "integer", "exclusiveMinimum": true}),
                "finite number",
            ),
            (
                json!({"type": "object", "properties": {"a": true},
                       "additionalProperties": {"type": "string"}}),
                "additionalProperties",
            ),
            (json!({"type": "array", "uniqueItems": true}), "uniqueItems"),
            (json!({"$ref": "#/$defs/missing"}), "not a local definition"),
            (
                json!({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                    "$ref": "#/$defs/n"}),
                "recursive",
            ),
            (json!({"type": "widget"}), "widget"),
            (
                json!({"type": "object", "properties": {"a": {"type": "integer"}},
                       "required": ["a", "b"]}),
                "\"b\"",
            ),
            (json!({"type": "object", "required": ["a"]}), "\"a\""),
        ] {
            let e = json_schema_pattern(&schema, false).unwrap_err().to_string();
            assert!(e.contains(says), "{schema}: {e}");
        }
    }
}
