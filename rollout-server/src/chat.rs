//! `POST /v1/chat/completions`: messages rendered with the model's chat
//! template, then the same path as completions (engine -> text updates ->
//! SSE chunks or one collected response), in chat shapes.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use proto::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobToken, ChatLogprobs, ChatMessageOut, TopLogprob,
    Usage,
};
use serde_json::{Value, json};

use crate::completions::{finite, metadata, prompt_logprobs, text_options};
use crate::error::ApiError;
use crate::reasoning::ReasoningStream;
use crate::server::{SharedState, blocking, header_client_tag, response_id, sse, unix_now};
use crate::text::{self, ChoiceUpdate, FinishInfo, TokenOut, Update};
use crate::tools::{self, ToolMode};
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
        let req: ChatCompletionRequest = parse_json(&body)?;
        state.validator.chat(req, tag)
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
        id: response_id("chatcmpl"),
        created: unix_now(),
        valid: Arc::new(valid),
    };
    if fmt.valid.stream {
        Ok(sse(stream_chunks(fmt, updates)))
    } else {
        Ok(Json(collect(fmt, updates).await?).into_response())
    }
}

struct Formatter {
    state: SharedState,
    id: String,
    created: u64,
    valid: Arc<ValidRequest>,
}

#[derive(Default)]
struct Acc {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<ChatLogprobToken>,
    finish: Option<FinishInfo>,
    versions: BTreeSet<u64>,
    /// Streaming with tools: text not sent yet (a possible call's start,
    /// or the calls themselves).
    held: String,
    /// The text so far reached a tool call: the rest is not content.
    in_calls: bool,
    /// Some of the answer went out as content (a Llama 3 call can only
    /// open the answer).
    content_sent: bool,
    /// A named call's first delta (id, name) has gone out.
    call_started: bool,
    /// What of the calls (`auto`, `required`) has gone out.
    calls: tools::CallStream,
    /// Streaming with a reasoning parser: the split so far, and the answer
    /// (the text after the thinking) so far.
    reasoning: ReasoningStream,
    answer: String,
}

/// One streamed choice's delta under its request's reasoning parser and
/// tool mode.
struct DeltaOut {
    reasoning_content: Option<String>,
    content: Option<String>,
    tool_calls: Option<Vec<Value>>,
    finish_reason: Option<String>,
}

impl Formatter {
    fn token_str(&self, id: u32) -> String {
        if self.valid.return_tokens_as_token_ids {
            format!("token_id:{id}")
        } else {
            self.state
                .tokenizer
                .decode(&[id], false)
                .unwrap_or_default()
        }
    }

    fn logprob_entry(&self, t: &TokenOut) -> ChatLogprobToken {
        let token = self.token_str(t.id);
        ChatLogprobToken {
            bytes: Some(token.as_bytes().to_vec()),
            logprob: finite(t.logprob),
            top_logprobs: t
                .top
                .iter()
                .map(|&(id, lp)| {
                    let token = self.token_str(id);
                    TopLogprob {
                        bytes: Some(token.as_bytes().to_vec()),
                        token,
                        logprob: finite(lp),
                    }
                })
                .collect(),
            token,
        }
    }

    /// Applies an update; returns its log-prob entries.
    fn apply(&self, acc: &mut Acc, u: &ChoiceUpdate) -> Vec<ChatLogprobToken> {
        acc.text.push_str(&u.text);
        acc.token_ids.extend(u.tokens.iter().map(|t| t.id));
        acc.versions.insert(u.weight_version);
        if u.finish.is_some() {
            acc.finish = u.finish.clone();
        }
        if self.valid.logprobs.is_none() {
            return Vec::new();
        }
        let entries: Vec<ChatLogprobToken> =
            u.tokens.iter().map(|t| self.logprob_entry(t)).collect();
        acc.logprobs.extend(entries.iter().cloned());
        entries
    }

    /// What update `u` (already applied to `acc`) streams: its text as
    /// content (the thinking apart, with a reasoning parser), or, with
    /// tools, content up to a call and then the calls: each opens once its
    /// name is whole, and its arguments follow as they come.
    fn delta(&self, acc: &mut Acc, u: &ChoiceUpdate) -> DeltaOut {
        let mut finish_reason = u.finish.as_ref().map(|f| f.reason.to_string());
        let (reasoning_content, piece) = match self.valid.reasoning {
            None => (None, u.text.clone()),
            Some((parser, include)) => {
                let (mut r, mut c) = acc.reasoning.push(parser, &u.text);
                if u.finish.is_some() {
                    let (r2, c2) = acc.reasoning.finish(parser);
                    r.push_str(&r2);
                    c.push_str(&c2);
                }
                ((include && !r.is_empty()).then_some(r), c)
            }
        };
        acc.answer.push_str(&piece);
        let mode = &self.valid.tools.mode;
        let (mut content, mut tool_calls) = (None, None);
        match mode {
            ToolMode::Text if self.valid.reasoning.is_some() => {
                content = (!piece.is_empty()).then_some(piece);
            }
            ToolMode::Text => content = Some(piece),
            ToolMode::Named(name) => {
                // The first piece opens the call (id, name); the rest add
                // to its arguments.
                if !acc.call_started {
                    acc.call_started = true;
                    tool_calls = Some(tools::indexed(vec![tools::tool_call(name, &piece)]));
                } else if !piece.is_empty() {
                    tool_calls = Some(vec![json!({"index": 0, "function": {"arguments": piece}})]);
                }
            }
            ToolMode::Auto(_) | ToolMode::Required => {
                acc.held.push_str(&piece);
                match mode {
                    ToolMode::Auto(parser) if !acc.in_calls => {
                        let k = parser.streamable_prefix(&acc.held, !acc.content_sent);
                        let out: String = acc.held.drain(..k).collect();
                        acc.in_calls = parser.starts_call(&acc.held);
                        acc.content_sent |= !out.is_empty();
                        content = (!out.is_empty()).then_some(out);
                    }
                    ToolMode::Required => acc.in_calls = true,
                    _ => {}
                }
                if acc.in_calls {
                    let deltas = acc.calls.advance(&self.valid.tools, &acc.answer);
                    tool_calls = (!deltas.is_empty()).then_some(deltas);
                }
                if finish_reason.is_some() {
                    if acc.calls.opened() {
                        if matches!(mode, ToolMode::Auto(_)) {
                            finish_reason = Some("tool_calls".into());
                        }
                    } else {
                        // Not calls after all: the held text is content.
                        let mut text = content.take().unwrap_or_default();
                        text.push_str(&acc.held);
                        content = Some(text);
                    }
                    acc.held.clear();
                }
            }
        }
        DeltaOut {
            reasoning_content,
            content,
            tool_calls,
            finish_reason,
        }
    }

    fn usage(&self, accs: &[Acc]) -> Usage {
        self.valid
            .usage(accs.iter().map(|a| a.token_ids.len()).sum())
    }

    fn prompt_ids(&self) -> Option<Vec<u32>> {
        self.valid
            .return_token_ids
            .then(|| self.valid.prompts[0].ids.clone())
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.state.served_model_name.clone(),
            choices,
            usage,
            prompt_token_ids: None,
            metadata: None,
        }
    }
}

async fn collect(
    fmt: Formatter,
    updates: impl Stream<Item = Result<Update, ApiError>>,
) -> Result<ChatCompletionResponse, ApiError> {
    let mut accs: Vec<Acc> = (0..fmt.valid.n).map(|_| Acc::default()).collect();
    let mut prompt_lps = None;
    let mut updates = std::pin::pin!(updates);
    while let Some(u) = updates.next().await {
        match u? {
            Update::Choice(u) => {
                fmt.apply(&mut accs[u.index], &u);
            }
            Update::PromptLogprobs { logprobs, .. } => prompt_lps = Some(logprobs),
        }
    }
    let prompt_logprobs = fmt.valid.prompt_logprobs.zip(prompt_lps).map(|(k, lps)| {
        prompt_logprobs(
            &fmt.valid,
            &fmt.state.tokenizer,
            &fmt.valid.prompts[0].ids,
            &lps,
            k,
        )
    });
    let current = fmt.state.engine.weight_version();
    let tag = &fmt.valid.client_tag;
    let all: BTreeSet<u64> = accs
        .iter()
        .flat_map(|a| a.versions.iter().copied())
        .collect();
    let usage = fmt.usage(&accs);
    let with_logprobs = fmt.valid.logprobs.is_some();
    let choices = accs
        .into_iter()
        .enumerate()
        .map(|(index, a)| {
            let mut finish_reason = a.finish.as_ref().map(|f| f.reason.to_string());
            let (reasoning_content, answer) = match fmt.valid.reasoning {
                None => (None, Some(a.text)),
                Some((parser, include)) => {
                    let (r, c) = parser.split(&a.text);
                    (r.filter(|_| include), c)
                }
            };
            let mode = &fmt.valid.tools.mode;
            let found = answer
                .as_deref()
                .and_then(|t| tools::extract(&fmt.valid.tools, t));
            let (content, tool_calls) = match found {
                Some((content, calls)) => {
                    if matches!(mode, ToolMode::Auto(_)) {
                        finish_reason = Some("tool_calls".into());
                    }
                    (content, calls)
                }
                None => (answer, Vec::new()),
            };
            ChatChoice {
                index,
                message: ChatMessageOut {
                    role: "assistant".into(),
                    reasoning_content,
                    content,
                    tool_calls,
                },
                logprobs: with_logprobs.then_some(ChatLogprobs {
                    content: Some(a.logprobs),
                }),
                finish_reason,
                stop_reason: a.finish.and_then(|f| f.stop_reason),
                token_ids: fmt.valid.return_token_ids.then_some(a.token_ids),
                metadata: Some(metadata(tag, &a.versions, current)),
            }
        })
        .collect();
    Ok(ChatCompletionResponse {
        id: fmt.id.clone(),
        object: "chat.completion".into(),
        created: fmt.created,
        model: fmt.state.served_model_name.clone(),
        choices,
        usage: Some(usage),
        prompt_logprobs,
        prompt_token_ids: fmt.prompt_ids(),
        metadata: Some(metadata(tag, &all, current)),
    })
}

fn stream_chunks(
    fmt: Formatter,
    updates: impl Stream<Item = Result<Update, ApiError>> + Send + 'static,
) -> impl Stream<Item = Result<ChatCompletionChunk, ApiError>> + Send + 'static {
    async_stream::stream! {
        let n = fmt.valid.n;
        let tag = fmt.valid.client_tag.clone();
        let current = fmt.state.engine.weight_version();
        // First chunk of every choice: the role, as OpenAI and vLLM send it.
        let first_md = metadata(&tag, &BTreeSet::new(), current);
        let mut first = fmt.chunk(
            (0..n)
                .map(|index| ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant".into()),
                        reasoning_content: None,
                        content: Some(String::new()),
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                    stop_reason: None,
                    token_ids: None,
                    metadata: Some(first_md.clone()),
                })
                .collect(),
            fmt.valid.continuous_usage.then(|| fmt.usage(&[])),
        );
        first.prompt_token_ids = fmt.prompt_ids();
        first.metadata = Some(first_md);
        yield Ok(first);

        let mut accs: Vec<Acc> = (0..n).map(|_| Acc::default()).collect();
        let mut updates = std::pin::pin!(updates);
        while let Some(u) = updates.next().await {
            let u = match u {
                Ok(Update::Choice(u)) => u,
                Ok(Update::PromptLogprobs { .. }) => continue,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let entries = fmt.apply(&mut accs[u.index], &u);
            let delta = fmt.delta(&mut accs[u.index], &u);
            let with_tokens = fmt.valid.logprobs.is_some() || fmt.valid.return_token_ids;
            if delta.content.is_none()
                && delta.reasoning_content.is_none()
                && delta.tool_calls.is_none()
                && delta.finish_reason.is_none()
                && !with_tokens
            {
                // Text held back for a tool call: nothing to say yet.
                continue;
            }
            let md = metadata(&tag, &BTreeSet::from([u.weight_version]), u.weight_version);
            let choice = ChatChunkChoice {
                index: u.index,
                delta: ChatDelta {
                    role: None,
                    reasoning_content: delta.reasoning_content,
                    content: delta.content,
                    tool_calls: delta.tool_calls,
                },
                logprobs: fmt.valid.logprobs.is_some().then_some(ChatLogprobs {
                    content: Some(entries),
                }),
                finish_reason: delta.finish_reason,
                stop_reason: u.finish.as_ref().and_then(|f| f.stop_reason.clone()),
                token_ids: fmt
                    .valid
                    .return_token_ids
                    .then(|| u.tokens.iter().map(|t| t.id).collect()),
                metadata: Some(md.clone()),
            };
            let usage = fmt.valid.continuous_usage.then(|| fmt.usage(&accs));
            let mut chunk = fmt.chunk(vec![choice], usage);
            chunk.metadata = Some(md);
            yield Ok(chunk);
        }
        if fmt.valid.include_usage {
            let all: BTreeSet<u64> = accs.iter().flat_map(|a| a.versions.iter().copied()).collect();
            let mut chunk = fmt.chunk(Vec::new(), Some(fmt.usage(&accs)));
            chunk.metadata = Some(metadata(&tag, &all, fmt.state.engine.weight_version()));
            yield Ok(chunk);
        }
    }
}
