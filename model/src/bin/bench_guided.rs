//! Guided decoding's costs on a Qwen2.5-sized byte-level vocabulary.
//!
//! `cargo run --release -p model --bin bench_guided [--vocab N | --tokenizer
//! tokenizer.json] [--steps N]`
//!
//! `--tokenizer` takes a real vocabulary (a tokenizer.json whose last id is
//! its end-of-text token, as GPT-2's). Otherwise, as no hub tokenizer is
//! reachable here, the vocabulary is made: N tokens
//! (151,643 by default, Qwen2.5's) of GPT-2's byte-level alphabet, the 256
//! single bytes and then random words of 2 to 12 bytes drawn from English
//! letter, digit, space and punctuation frequencies, so that a token's bytes
//! walk the DFA as real tokens do. For a regex, a JSON schema and
//! `json_object` it times: compiling (the DFA and its liveness pass), the
//! first `allowed` of a state (a walk of the whole vocabulary), a cached one,
//! and a guided decode of `--steps` tokens drawn uniformly from the allowed
//! set (every state new to the guide pays its walk once): the mean walk of a
//! new state, and the guide's time per token (its allowed sets and
//! advances, not the bench's draw). Prints Markdown.

use std::sync::Arc;
use std::time::Instant;

use model::guided::{RegexGuide, TokenBytes, json_object_pattern, json_schema_pattern};
use model::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// GPT-2's `bytes_to_unicode`: the char a byte is written as.
fn byte_char(b: u8) -> char {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        return char::from(b);
    }
    let shifted = (0..=b)
        .filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
        .count() as u32;
    char::from_u32(255 + shifted).unwrap_or('?')
}

/// A byte-level BPE tokenizer.json of `n` tokens (no merges: only its
/// vocabulary is read here) and an `<|endoftext|>` special token.
fn tokenizer(n: usize, rng: &mut StdRng) -> model::Result<Tokenizer> {
    let alphabet: Vec<(u8, u32)> = b"etaoinshrdlucmfwypvbgkqjxz"
        .iter()
        .zip([
            127, 91, 82, 75, 70, 67, 63, 61, 60, 43, 40, 28, 28, 24, 22, 24, 20, 20, 10, 15, 20, 8,
            1, 2, 2, 1,
        ])
        .map(|(&b, w)| (b, w))
        .chain([
            (b' ', 180),
            (b'0', 8),
            (b'1', 8),
            (b'"', 4),
            (b',', 6),
            (b'.', 6),
        ])
        .chain([
            (b'{', 2),
            (b'}', 2),
            (b':', 3),
            (b'\n', 4),
            (b'E', 5),
            (b'T', 5),
        ])
        .collect();
    let total: u32 = alphabet.iter().map(|a| a.1).sum();
    let mut vocab = serde_json::Map::new();
    let mut seen = std::collections::HashSet::new();
    for b in 0..=255u8 {
        let t = byte_char(b).to_string();
        seen.insert(t.clone());
        vocab.insert(t, json!(vocab.len()));
    }
    while vocab.len() < n - 1 {
        let len = rng.random_range(2..=12);
        let word: String = (0..len)
            .map(|_| {
                let mut x = rng.random_range(0..total);
                let b = alphabet
                    .iter()
                    .find(|(_, w)| {
                        let hit = x < *w;
                        x = x.saturating_sub(*w);
                        hit
                    })
                    .map_or(b'e', |a| a.0);
                byte_char(b)
            })
            .collect();
        if seen.insert(word.clone()) {
            vocab.insert(word, json!(vocab.len()));
        }
    }
    let eos = vocab.len();
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false,
                          "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    Tokenizer::from_json(&doc.to_string(), None)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> model::Result<()> {
    let mut vocab = 151_643usize;
    let mut steps = 200usize;
    let mut file: Option<String> = None;
    let mut args = std::env::args().skip(1);
    let usage = || {
        model::ModelError::Invalid(
            "usage: bench_guided [--vocab N | --tokenizer tokenizer.json] [--steps N]".into(),
        )
    };
    while let Some(a) = args.next() {
        let value = args.next().ok_or_else(usage)?;
        let number = || value.parse().map_err(|_| usage());
        match a.as_str() {
            "--vocab" => vocab = number()?,
            "--steps" => steps = number()?,
            "--tokenizer" => file = Some(value),
            _ => return Err(usage()),
        }
    }
    let mut rng = StdRng::seed_from_u64(7);
    let t = Instant::now();
    let tok = match &file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| model::ModelError::Invalid(format!("{path}: {e}")))?;
            Tokenizer::from_json(&text, None)?
        }
        None => tokenizer(vocab, &mut rng)?,
    };
    let bytes = Arc::new(TokenBytes::from_tokenizer(&tok)?);
    let eos = (bytes.len() - 1) as u32;
    eprintln!(
        "vocabulary of {} tokens made in {:.0} ms",
        bytes.len(),
        ms(t)
    );

    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "integer"}, "unit": {"enum": ["m", "s", "kg"]},
        "reasoning": {"type": "string", "maxLength": 200},
        "steps": {"type": "array", "items": {"type": "string"}, "maxItems": 8}},
        "required": ["answer", "reasoning"]});
    let cases = [
        ("regex `[0-9]{1,3}`", "[0-9]{1,3}".to_string()),
        (
            "JSON schema (4 members)",
            json_schema_pattern(&schema, false)?,
        ),
        ("json_object", json_object_pattern(false)),
    ];
    // The walk runs on rayon's pool: started here, not in the first timing.
    let warm = RegexGuide::new("a", bytes.clone(), vec![eos])?;
    warm.allowed(warm.start());
    println!(
        "| pattern | compile (ms) | first allowed (ms) | cached allowed (µs) | decode: \
         tokens | new states | ms per new state | guide ms/token |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, pattern) in cases {
        let t = Instant::now();
        let guide = RegexGuide::new(&pattern, bytes.clone(), vec![eos])?;
        let compile = ms(t);
        let t = Instant::now();
        let first = guide.allowed(guide.start());
        let first_ms = ms(t);
        let t = Instant::now();
        let again = guide.allowed(guide.start());
        let cached_us = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(first.len(), again.len());
        // A guided decode: each step asks for the allowed set and draws
        // from it, as the sampler does. Timed: the guide's part (the
        // allowed set, the walks of new states, the advance), not the
        // bench's draw.
        let mut state = guide.start();
        let mut states = std::collections::HashSet::new();
        let (mut guide_s, mut walk_s) = (0.0, 0.0);
        let mut n = 0;
        for _ in 0..steps {
            let new = states.insert(state);
            let t = Instant::now();
            let allowed = guide.allowed(state);
            let took = t.elapsed().as_secs_f64();
            guide_s += took;
            if new {
                walk_s += took;
            }
            let ids = allowed.ids();
            let pick = ids[rng.random_range(0..ids.len())];
            n += 1;
            if pick == eos {
                state = guide.start();
                continue;
            }
            let t = Instant::now();
            state = guide.advance(state, pick);
            guide_s += t.elapsed().as_secs_f64();
        }
        println!(
            "| {name} | {compile:.1} | {first_ms:.2} | {cached_us:.1} | {n} | {} | {:.2} | {:.3} |",
            states.len(),
            walk_s * 1e3 / states.len() as f64,
            guide_s * 1e3 / n as f64
        );
    }
    Ok(())
}
