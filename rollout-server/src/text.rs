//! The text layer: turns the engine's token events of one HTTP request (one
//! [`GenerationStream`] per prompt) into per-choice updates with text.
//! Incremental detokenization, stop strings (with the text that could still
//! become a stop string held back while streaming), choice indexes
//! `prompt_index * n + j`, and cancellation of a sample once its stop string
//! is seen. Streaming and non-streaming responses are both built from these
//! updates.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use model::tokenizer::{DecodeStream, Tokenizer};
use serde_json::Value;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{CancelFlags, EngineEvent, Finish, GenerationStream, PromptLogprob};
use crate::error::ApiError;

/// A generated token with its log-prob and top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FinishInfo {
    /// "stop" or "length".
    pub reason: &'static str,
    /// The stop string or stop token id, `None` for EOS and length.
    pub stop_reason: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Update {
    /// Log-probs of prompt `prompt_index`'s tokens (`echo` with `logprobs`),
    /// before any of its choices' tokens.
    PromptLogprobs {
        prompt_index: usize,
        logprobs: Vec<Option<PromptLogprob>>,
    },
    Choice(ChoiceUpdate),
}

/// New text and tokens of one choice.
#[derive(Debug, Clone)]
pub struct ChoiceUpdate {
    pub index: usize,
    pub prompt_index: usize,
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub finish: Option<FinishInfo>,
    pub weight_version: u64,
}

#[derive(Debug, Clone)]
pub struct TextOptions {
    pub stop: Vec<String>,
    /// Stop strings count only once a choice has more tokens than this
    /// (vLLM's `min_tokens`).
    pub min_tokens: usize,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
}

/// Detokenizer and stop-string matcher of one choice.
struct ChoiceText {
    decoder: DecodeStream,
    /// Text generated so far (cut at the stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    /// Tokens pushed so far.
    tokens: usize,
    done: bool,
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl ChoiceText {
    fn new(skip_special_tokens: bool) -> Self {
        ChoiceText {
            decoder: DecodeStream::new(skip_special_tokens),
            text: String::new(),
            sent: 0,
            tokens: 0,
            done: false,
        }
    }

    /// Appends a token; returns the text now safe to hand out and the stop
    /// string if one completed. `last` flushes everything.
    fn push(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
        opts: &TextOptions,
        last: bool,
    ) -> Result<(String, Option<String>), ApiError> {
        let piece = self
            .decoder
            .step(tokenizer, id)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let old_len = self.text.len();
        self.text.push_str(&piece);
        self.tokens += 1;
        let mut stopped = None;
        if !opts.stop.is_empty() && !piece.is_empty() && self.tokens > opts.min_tokens {
            let longest = opts.stop.iter().map(String::len).max().unwrap_or(0);
            let from = floor_char_boundary(&self.text, old_len.saturating_sub(longest - 1));
            let hit = opts
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| (from + p, s)))
                .min_by_key(|(p, s)| (*p, std::cmp::Reverse(s.len())));
            if let Some((pos, s)) = hit {
                let end = if opts.include_stop_str_in_output {
                    pos + s.len()
                } else {
                    pos
                };
                self.text.truncate(end.max(self.sent));
                stopped = Some(s.clone());
            }
        }
        let finished = last || stopped.is_some();
        let upto = if finished || opts.stop.is_empty() {
            self.text.len()
        } else {
            let hold = opts.stop.iter().map(String::len).max().unwrap_or(1) - 1;
            floor_char_boundary(&self.text, self.text.len().saturating_sub(hold)).max(self.sent)
        };
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        if finished {
            self.done = true;
        }
        Ok((out, stopped))
    }
}

/// Merges the events of every prompt of a request into choice updates. Ends
/// when every choice has finished; an engine error (or the engine going
/// away) ends it with an `Err`.
pub fn updates(
    streams: Vec<GenerationStream>,
    n: usize,
    tokenizer: Arc<Tokenizer>,
    opts: TextOptions,
) -> impl Stream<Item = Result<Update, ApiError>> + Send + 'static {
    let cancels: Vec<CancelFlags> = streams.iter().map(|s| s.cancel.clone()).collect();
    let total = streams.len() * n;
    let merged = futures::stream::select_all(streams.into_iter().enumerate().map(|(pi, s)| {
        UnboundedReceiverStream::new(s.events)
            .map(move |e| (pi, Some(e)))
            .chain(futures::stream::once(async move { (pi, None) }))
            .boxed()
    }));
    async_stream::stream! {
        let mut choices: Vec<ChoiceText> =
            (0..total).map(|_| ChoiceText::new(opts.skip_special_tokens)).collect();
        let mut remaining = total;
        let mut merged = std::pin::pin!(merged);
        while remaining > 0 {
            let Some((pi, event)) = merged.next().await else {
                yield Err(ApiError::Internal("the engine stopped mid-request".into()));
                return;
            };
            match event {
                None => {
                    // This prompt's channel closed: fine only if its choices are done.
                    if choices[pi * n..(pi + 1) * n].iter().any(|c| !c.done) {
                        yield Err(ApiError::Internal("the engine stopped mid-request".into()));
                        return;
                    }
                }
                Some(EngineEvent::Error(e)) => {
                    yield Err(ApiError::Internal(e));
                    return;
                }
                Some(EngineEvent::PromptLogprobs(logprobs)) => {
                    yield Ok(Update::PromptLogprobs { prompt_index: pi, logprobs });
                }
                Some(EngineEvent::Token { sample, token, weight_version, finish }) => {
                    let index = pi * n + sample;
                    let Some(choice) = choices.get_mut(index) else { continue };
                    if choice.done {
                        continue;
                    }
                    let (text, stopped) =
                        match choice.push(&tokenizer, token.token, &opts, finish.is_some()) {
                            Ok(x) => x,
                            Err(e) => {
                                yield Err(e);
                                return;
                            }
                        };
                    let finish = match (stopped, finish) {
                        (Some(s), _) => {
                            cancels[pi].cancel(sample);
                            Some(FinishInfo { reason: "stop", stop_reason: Some(Value::from(s)) })
                        }
                        (None, Some(Finish::Length)) => {
                            Some(FinishInfo { reason: "length", stop_reason: None })
                        }
                        (None, Some(Finish::Eos)) => {
                            Some(FinishInfo { reason: "stop", stop_reason: None })
                        }
                        (None, Some(Finish::StopToken(id))) => Some(FinishInfo {
                            reason: "stop",
                            stop_reason: Some(Value::from(id)),
                        }),
                        (None, None) => None,
                    };
                    if finish.is_some() {
                        remaining -= 1;
                    }
                    yield Ok(Update::Choice(ChoiceUpdate {
                        index,
                        prompt_index: pi,
                        text,
                        tokens: vec![TokenOut {
                            id: token.token,
                            logprob: token.logprob,
                            top: token.top_logprobs,
                        }],
                        finish,
                        weight_version,
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(stop: &[&str]) -> TextOptions {
        TextOptions {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            min_tokens: 0,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
        }
    }

    /// The text of a choice fed `chars` one token each, up to its stop
    /// string, and that stop string.
    fn push_chars(tok: &Tokenizer, o: &TextOptions, chars: &str) -> (String, Option<String>) {
        let mut c = ChoiceText::new(true);
        let mut out = String::new();
        for ch in chars.chars() {
            let id = tok.token_to_id(&ch.to_string()).unwrap();
            let (t, stop) = c.push(tok, id, o, false).unwrap();
            out.push_str(&t);
            if stop.is_some() {
                return (out, stop);
            }
        }
        (out, None)
    }

    #[test]
    fn stop_string_cuts_and_holds_back() {
        let tok = model::tokenizer::char_level("abcxyz", &["<eos>"]).unwrap();
        let (out, stop) = push_chars(&tok, &opts(&["xy"]), "abxyc");
        assert_eq!(out, "ab");
        assert_eq!(stop.as_deref(), Some("xy"));
    }

    /// vLLM's `min_tokens`: a stop string inside the first `min_tokens`
    /// tokens does not end the choice; one after them does.
    #[test]
    fn stop_strings_wait_for_min_tokens() {
        let tok = model::tokenizer::char_level("abcxyz", &["<eos>"]).unwrap();
        let mut o = opts(&["x"]);
        o.min_tokens = 3;
        let (out, stop) = push_chars(&tok, &o, "axbcxz");
        assert_eq!(out, "axbc");
        assert_eq!(stop.as_deref(), Some("x"));
    }
}
