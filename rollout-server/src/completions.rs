//! `POST /v1/completions`: validated request -> engine -> text updates ->
//! either SSE chunks or, collected, one response. One code path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use model::tokenizer::Tokenizer;
use proto::openai::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Logprob, Metadata,
    PromptLogprobs, Usage,
};

use crate::engine::PromptLogprob;
use crate::error::ApiError;
use crate::server::{SharedState, blocking, header_client_tag, response_id, sse, unix_now};
use crate::text::{self, ChoiceUpdate, FinishInfo, TextOptions, Update};
use crate::validation::{ValidRequest, parse_json};

pub async fn handle(State(state): State<SharedState>, headers: HeaderMap, body: Bytes) -> Response {
    match run(state, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(state: SharedState, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let tag = header_client_tag(&headers);
    let valid = blocking(&state, move |state| {
        let req: CompletionRequest = parse_json(&body)?;
        state.validator.completion(req, tag)
    })
    .await?;
    let streams = state.engine.submit(valid.engine_requests())?;
    let updates = text::updates(
        streams,
        valid.n,
        state.tokenizer.clone(),
        text_options(&valid),
    );
    let fmt = Formatter {
        state: state.clone(),
        id: response_id("cmpl"),
        created: unix_now(),
        valid: Arc::new(valid),
    };
    if fmt.valid.stream {
        Ok(sse(stream_chunks(fmt, updates)))
    } else {
        Ok(Json(collect(fmt, updates).await?).into_response())
    }
}

pub fn text_options(v: &ValidRequest) -> TextOptions {
    TextOptions {
        stop: v.stop.clone(),
        min_tokens: v.min_tokens,
        include_stop_str_in_output: v.include_stop_str_in_output,
        skip_special_tokens: v.skip_special_tokens,
    }
}

/// JSON cannot carry `-inf` (a token filtered out in processed mode); vLLM
/// reports -9999.0.
pub fn finite(x: f32) -> f32 {
    if x.is_finite() { x } else { -9999.0 }
}

/// A token as the response shows it: its text, or `token_id:<id>` with
/// vLLM's `return_tokens_as_token_ids`.
pub fn token_text(tokenizer: &Tokenizer, id: u32, as_token_ids: bool) -> String {
    if as_token_ids {
        format!("token_id:{id}")
    } else {
        tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

/// vLLM's `prompt_logprobs` of one prompt: per token after the first, the
/// prompt token's entry (its log-prob and rank) and the `k` most likely
/// tokens' (ranks 1..=k).
pub fn prompt_logprobs(
    v: &ValidRequest,
    tokenizer: &Tokenizer,
    ids: &[u32],
    lps: &[Option<PromptLogprob>],
    k: usize,
) -> PromptLogprobs {
    let entry = |id: u32, logprob: f32, rank: usize| Logprob {
        logprob: finite(logprob),
        rank: Some(rank as u64),
        decoded_token: Some(token_text(tokenizer, id, v.return_tokens_as_token_ids)),
    };
    ids.iter()
        .zip(lps)
        .map(|(&id, lp)| {
            lp.as_ref().map(|lp| {
                let mut m = BTreeMap::from([(id, entry(id, lp.logprob, lp.rank))]);
                for (r, &(t, l)) in lp.top_logprobs.iter().take(k).enumerate() {
                    m.insert(t, entry(t, l, r + 1));
                }
                m
            })
        })
        .collect()
}

pub fn metadata(tag: &Option<String>, versions: &BTreeSet<u64>, current: u64) -> Metadata {
    Metadata {
        client_tag: tag.clone(),
        weight_version: versions.first().copied().unwrap_or(current),
        weight_versions: versions.iter().copied().collect(),
    }
}

struct Formatter {
    state: SharedState,
    id: String,
    created: u64,
    valid: Arc<ValidRequest>,
}

/// A choice as it is being built.
#[derive(Default)]
struct Acc {
    started: bool,
    text: String,
    token_ids: Vec<u32>,
    logprobs: Option<CompletionLogprobs>,
    /// Characters of text covered by `logprobs` so far (`text_offset`).
    offset: usize,
    finish: Option<FinishInfo>,
    versions: BTreeSet<u64>,
}

impl Formatter {
    fn token_str(&self, id: u32) -> String {
        token_text(
            &self.state.tokenizer,
            id,
            self.valid.return_tokens_as_token_ids,
        )
    }

    fn push_logprob(
        &self,
        lp: &mut CompletionLogprobs,
        offset: &mut usize,
        id: u32,
        logprob: Option<f32>,
        top: Option<&[(u32, f32)]>,
    ) {
        let s = self.token_str(id);
        let k = self.valid.logprobs.unwrap_or(0);
        lp.top_logprobs.push(match (top, logprob) {
            (Some(top), Some(own)) if k > 0 => {
                // The prompt's entries may hold more (prompt_logprobs > logprobs).
                let mut m: BTreeMap<String, f32> = top
                    .iter()
                    .take(k)
                    .map(|&(t, l)| (self.token_str(t), finite(l)))
                    .collect();
                m.insert(s.clone(), finite(own));
                Some(m)
            }
            _ => None,
        });
        lp.text_offset.push(*offset);
        lp.token_logprobs.push(logprob.map(finite));
        *offset += s.chars().count();
        lp.tokens.push(s);
    }

    /// The echo prefix (text, and prompt log-probs) of a choice's first update.
    fn start_choice(
        &self,
        acc: &mut Acc,
        prompt_index: usize,
        prompt_lps: Option<&[Option<PromptLogprob>]>,
    ) -> String {
        acc.started = true;
        if self.valid.logprobs.is_some() {
            acc.logprobs = Some(CompletionLogprobs::default());
        }
        if !self.valid.echo {
            return String::new();
        }
        let prompt = &self.valid.prompts[prompt_index];
        if let (Some(lp), Some(plps)) = (acc.logprobs.as_mut(), prompt_lps) {
            let mut lp_taken = std::mem::take(lp);
            let mut offset = acc.offset;
            for (&id, p) in prompt.ids.iter().zip(plps) {
                self.push_logprob(
                    &mut lp_taken,
                    &mut offset,
                    id,
                    p.as_ref().map(|p| p.logprob),
                    p.as_ref().map(|p| p.top_logprobs.as_slice()),
                );
            }
            acc.offset = offset;
            acc.logprobs = Some(lp_taken);
        }
        prompt.text.clone()
    }

    /// Applies an update to `acc`; returns the update's text (with the echo
    /// prefix on a choice's first update), its log-probs alone and its
    /// token ids.
    fn apply(
        &self,
        acc: &mut Acc,
        u: &ChoiceUpdate,
        prompt_lps: Option<&[Option<PromptLogprob>]>,
    ) -> (String, Option<CompletionLogprobs>, Vec<u32>) {
        let before = acc.logprobs.as_ref().map_or(0, |l| l.tokens.len());
        let mut text = String::new();
        if !acc.started {
            text = self.start_choice(acc, u.prompt_index, prompt_lps);
        }
        // With echo and max_tokens 0 the one token generated is not part of
        // the answer: the choice is the prompt, scored, ended by `length`.
        let generated = !self.valid.echo_without_generation;
        let mut token_ids = Vec::new();
        if generated {
            text.push_str(&u.text);
            if let Some(mut lp) = acc.logprobs.take() {
                let mut offset = acc.offset;
                for t in &u.tokens {
                    self.push_logprob(&mut lp, &mut offset, t.id, Some(t.logprob), Some(&t.top));
                }
                acc.offset = offset;
                acc.logprobs = Some(lp);
            }
            token_ids = u.tokens.iter().map(|t| t.id).collect();
        }
        acc.text.push_str(&text);
        acc.token_ids.extend(&token_ids);
        acc.versions.insert(u.weight_version);
        if u.finish.is_some() {
            acc.finish = if generated {
                u.finish.clone()
            } else {
                Some(FinishInfo {
                    reason: "length",
                    stop_reason: None,
                })
            };
        }
        let delta_lp = acc.logprobs.as_ref().map(|l| CompletionLogprobs {
            text_offset: l.text_offset[before..].to_vec(),
            token_logprobs: l.token_logprobs[before..].to_vec(),
            tokens: l.tokens[before..].to_vec(),
            top_logprobs: l.top_logprobs[before..].to_vec(),
        });
        (text, delta_lp, token_ids)
    }

    /// The `prompt_logprobs` of choice `index`, when asked for.
    fn prompt_logprobs_of(
        &self,
        index: usize,
        prompt_lps: &[Option<Vec<Option<PromptLogprob>>>],
    ) -> Option<PromptLogprobs> {
        let k = self.valid.prompt_logprobs?;
        let p = index / self.valid.n;
        let lps = prompt_lps.get(p)?.as_deref()?;
        Some(prompt_logprobs(
            &self.valid,
            &self.state.tokenizer,
            &self.valid.prompts[p].ids,
            lps,
            k,
        ))
    }

    fn usage(&self, accs: &[Acc]) -> Usage {
        self.valid
            .usage(accs.iter().map(|a| a.token_ids.len()).sum())
    }

    fn response(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
        md: Metadata,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.state.served_model_name.clone(),
            choices,
            usage,
            metadata: Some(md),
        }
    }

    fn new_accs(&self) -> Vec<Acc> {
        (0..self.valid.prompts.len() * self.valid.n)
            .map(|_| Acc::default())
            .collect()
    }
}

async fn collect(
    fmt: Formatter,
    updates: impl Stream<Item = Result<Update, ApiError>>,
) -> Result<CompletionResponse, ApiError> {
    let mut accs = fmt.new_accs();
    let mut prompt_lps: Vec<Option<Vec<Option<PromptLogprob>>>> =
        vec![None; fmt.valid.prompts.len()];
    let mut updates = std::pin::pin!(updates);
    while let Some(u) = updates.next().await {
        match u? {
            Update::PromptLogprobs {
                prompt_index,
                logprobs,
            } => prompt_lps[prompt_index] = Some(logprobs),
            Update::Choice(u) => {
                let plp = prompt_lps[u.prompt_index].as_deref();
                fmt.apply(&mut accs[u.index], &u, plp);
            }
        }
    }
    let current = fmt.state.engine.weight_version();
    let tag = &fmt.valid.client_tag;
    let all_versions: BTreeSet<u64> = accs
        .iter()
        .flat_map(|a| a.versions.iter().copied())
        .collect();
    let usage = fmt.usage(&accs);
    let n = fmt.valid.n;
    let choices = accs
        .into_iter()
        .enumerate()
        .map(|(index, a)| CompletionChoice {
            index,
            text: a.text,
            logprobs: a.logprobs,
            finish_reason: a.finish.as_ref().map(|f| f.reason.to_string()),
            stop_reason: a.finish.and_then(|f| f.stop_reason),
            prompt_logprobs: fmt.prompt_logprobs_of(index, &prompt_lps),
            prompt_token_ids: fmt
                .valid
                .return_token_ids
                .then(|| fmt.valid.prompts[index / n].ids.clone()),
            token_ids: fmt.valid.return_token_ids.then_some(a.token_ids),
            metadata: Some(metadata(tag, &a.versions, current)),
        })
        .collect();
    Ok(fmt.response(choices, Some(usage), metadata(tag, &all_versions, current)))
}

fn stream_chunks(
    fmt: Formatter,
    updates: impl Stream<Item = Result<Update, ApiError>> + Send + 'static,
) -> impl Stream<Item = Result<CompletionResponse, ApiError>> + Send + 'static {
    async_stream::stream! {
        let mut accs = fmt.new_accs();
        let mut prompt_lps: Vec<Option<Vec<Option<PromptLogprob>>>> =
            vec![None; fmt.valid.prompts.len()];
        let mut updates = std::pin::pin!(updates);
        let tag = fmt.valid.client_tag.clone();
        let n = fmt.valid.n;
        while let Some(u) = updates.next().await {
            let u = match u {
                Ok(Update::PromptLogprobs { prompt_index, logprobs }) => {
                    prompt_lps[prompt_index] = Some(logprobs);
                    continue;
                }
                Ok(Update::Choice(u)) => u,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let first = !accs[u.index].started;
            let plp = prompt_lps[u.prompt_index].as_deref();
            let (text, logprobs, token_ids) = fmt.apply(&mut accs[u.index], &u, plp);
            let versions = BTreeSet::from([u.weight_version]);
            let md = metadata(&tag, &versions, u.weight_version);
            let finish = u.finish.is_some().then(|| accs[u.index].finish.clone()).flatten();
            let choice = CompletionChoice {
                index: u.index,
                text,
                logprobs,
                finish_reason: finish.as_ref().map(|f| f.reason.to_string()),
                stop_reason: finish.and_then(|f| f.stop_reason),
                // Refused with stream (as vLLM): prompt_logprobs stay whole.
                prompt_logprobs: None,
                prompt_token_ids: (fmt.valid.return_token_ids && first)
                    .then(|| fmt.valid.prompts[u.index / n].ids.clone()),
                token_ids: fmt.valid.return_token_ids.then_some(token_ids),
                metadata: Some(md.clone()),
            };
            let usage = fmt.valid.continuous_usage.then(|| fmt.usage(&accs));
            yield Ok(fmt.response(vec![choice], usage, md));
        }
        if fmt.valid.include_usage {
            let current = fmt.state.engine.weight_version();
            let all: BTreeSet<u64> = accs.iter().flat_map(|a| a.versions.iter().copied()).collect();
            let usage = fmt.usage(&accs);
            yield Ok(fmt.response(Vec::new(), Some(usage), metadata(&tag, &all, current)));
        }
    }
}
