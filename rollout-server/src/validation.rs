//! Turns a loose OpenAI/vLLM request into a [`ValidRequest`] once: prompts
//! tokenized (chat messages rendered with the model's chat template first),
//! every sampling field range-checked, defaults filled in. Everything after
//! this module trusts its input. Errors name the field (`param`).

use std::sync::Arc;

use model::guided::{RegexGuide, TokenBytes, json_object_pattern};
use model::sampling::SamplingParams;
use model::tokenizer::Tokenizer;
use proto::openai::{
    ChatCompletionRequest, ChatTemplateFields, CompletionRequest, DetokenizeRequest, Prompt,
    SamplingFields, TokenizeChatRequest, TokenizeCompletionRequest, Usage,
};
use serde_json::Value;

use crate::engine::GenerateRequest;
use crate::error::ApiError;
use crate::reasoning::ReasoningParser;
use crate::tools::{ToolMode, ToolUse};

/// vLLM's default `--max-logprobs`.
/// Most top log-probs a request may ask for by default (vLLM's
/// `--max-logprobs` default).
pub const MAX_LOGPROBS: usize = 20;
/// `max_tokens` of a completions request that gives none (OpenAI's default).
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// The sampling a request gets for the fields it leaves out: vLLM's
/// defaults, or (vLLM's `--generation-config auto`, its default) those the
/// model's `generation_config.json` recommends.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// `max_new_tokens`: caps a request's default `max_tokens`.
    pub max_tokens: Option<usize>,
}

impl Default for DefaultSampling {
    fn default() -> Self {
        let d = SamplingParams::default();
        DefaultSampling {
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
            min_p: d.min_p,
            repetition_penalty: d.repetition_penalty,
            max_tokens: None,
        }
    }
}

impl DefaultSampling {
    /// vLLM's defaults overridden by a `generation_config.json`'s sampling
    /// fields (as vLLM reads them: `temperature`, `top_p`, `top_k`, `min_p`,
    /// `repetition_penalty`, `max_new_tokens`), and what each became.
    pub fn from_generation_config(config: &Value) -> (Self, Vec<String>) {
        let mut d = DefaultSampling::default();
        let mut set = Vec::new();
        for (key, field) in [
            ("temperature", &mut d.temperature),
            ("top_p", &mut d.top_p),
            ("min_p", &mut d.min_p),
            ("repetition_penalty", &mut d.repetition_penalty),
        ] {
            if let Some(v) = config.get(key).and_then(Value::as_f64) {
                *field = v as f32;
                set.push(format!("{key}={v}"));
            }
        }
        if let Some(k) = config.get("top_k").and_then(Value::as_i64) {
            d.top_k = i32::try_from(k).unwrap_or(0);
            set.push(format!("top_k={k}"));
        }
        if let Some(m) = config.get("max_new_tokens").and_then(Value::as_u64) {
            d.max_tokens = Some(m as usize);
            set.push(format!("max_tokens={m}"));
        }
        (d, set)
    }
}

/// Most samples per prompt (`n`).
pub const MAX_N: i64 = 4096;

/// What validation needs to know about the served model.
pub struct Validator {
    pub tokenizer: Arc<Tokenizer>,
    pub served_model_name: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Most top log-probs a request may ask for (vLLM's `--max-logprobs`).
    pub max_logprobs: usize,
    /// The model's end-of-sequence ids: where a guided completion may end.
    pub eos_token_ids: Vec<u32>,
    /// Each token's bytes, for guided decoding.
    pub token_bytes: Arc<TokenBytes>,
    /// Compiled guides by pattern and end ids: a learner sends the same
    /// pattern with every request, and a guide keeps the tokens it found
    /// allowed from each state.
    pub guides: GuideCache,
    /// `--enable-auto-tool-choice` with a `--tool-call-parser`: `tool_choice:
    /// "auto"` is served, with this parser.
    pub auto_tools: Option<crate::tools::ToolParser>,
    /// `--reasoning-parser`.
    pub reasoning_parser: Option<ReasoningParser>,
    /// Sampling for the fields a request leaves out (`--generation-config`).
    pub defaults: DefaultSampling,
}

/// Compiled guides by pattern and end ids.
pub type GuideCache =
    std::sync::Mutex<std::collections::HashMap<(String, Vec<u32>), Arc<RegexGuide>>>;

/// Compiled guides kept at most (the cache starts over past it). Each holds
/// up to 16 MiB of DFA and 16 MiB of allowed-token sets, so at most 512 MiB
/// in all; a learner sends one pattern, an eval a few schemas.
const MAX_CACHED_GUIDES: usize = 16;

#[derive(Debug, Clone)]
pub struct ValidPrompt {
    pub ids: Vec<u32>,
    /// The prompt's text (decoded when it came as ids), for `echo`.
    pub text: String,
}

/// A request every later layer can trust.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompts: Vec<ValidPrompt>,
    pub n: usize,
    /// Per prompt (chat's default depends on the prompt's length).
    pub max_tokens: Vec<usize>,
    pub params: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// vLLM's `min_tokens`: at most every prompt's `max_tokens`.
    pub min_tokens: usize,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// Top log-probs per token (`Some(0)`: only the sampled token's).
    pub logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: top entries per prompt token in the
    /// response's `prompt_logprobs`.
    pub prompt_logprobs: Option<usize>,
    pub echo: bool,
    /// `echo` with `max_tokens: 0` (scoring a text, as OpenAI's legacy API
    /// and vLLM allow): one token is generated and dropped, the choice is
    /// the prompt alone.
    pub echo_without_generation: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `stream_options.continuous_usage_stats`: every chunk carries
    /// the usage so far (with `include_usage`).
    pub continuous_usage: bool,
    pub return_tokens_as_token_ids: bool,
    pub return_token_ids: bool,
    pub client_tag: Option<String>,
    /// Guided decoding (`guided_regex`, `guided_choice`, `structured_outputs`).
    pub guide: Option<Arc<RegexGuide>>,
    /// With a reasoning parser: the guide waits for this (`</think>`).
    pub guide_after: Option<String>,
    /// What the chat request's `tool_choice` and `parallel_tool_calls` make
    /// of the output.
    pub tools: ToolUse,
    /// `--reasoning-parser` for this chat request, and whether the
    /// reasoning is sent (`include_reasoning`).
    pub reasoning: Option<(ReasoningParser, bool)>,
}

impl ValidRequest {
    /// `min_tokens` that a guide cannot reach is a 400 up front, not a
    /// failure mid-generation: each token a guide allows writes a byte or
    /// more, so its longest match bounds the tokens before the end. (Under
    /// a reasoning parser the thinking counts too: not checked.)
    fn check_min_tokens_fit_the_guide(&self) -> Result<(), ApiError> {
        let longest = self
            .guide
            .as_ref()
            .filter(|_| self.guide_after.is_none())
            .and_then(|g| g.longest_match());
        match longest {
            Some(most) if self.min_tokens > most => Err(bad(
                format!(
                    "min_tokens {} cannot be met: the guided decoding's longest output is {most} \
                     bytes, so at most {most} tokens; lower min_tokens or widen the guide",
                    self.min_tokens
                ),
                "min_tokens",
            )),
            _ => Ok(()),
        }
    }

    /// `usage` of a response whose choices hold `completion_tokens` in all.
    pub fn usage(&self, completion_tokens: usize) -> Usage {
        let prompt_tokens: usize = self.prompts.iter().map(|p| p.ids.len()).sum();
        Usage {
            prompt_tokens: prompt_tokens as u64,
            completion_tokens: completion_tokens as u64,
            total_tokens: (prompt_tokens + completion_tokens) as u64,
        }
    }

    /// One engine request per prompt.
    pub fn engine_requests(&self) -> Vec<GenerateRequest> {
        self.prompts
            .iter()
            .zip(&self.max_tokens)
            .map(|(p, &max_tokens)| GenerateRequest {
                prompt: p.ids.clone(),
                n: self.n,
                params: self.params.clone(),
                seed: self.seed,
                max_tokens,
                stop_token_ids: self.stop_token_ids.clone(),
                ignore_eos: self.ignore_eos,
                min_tokens: self.min_tokens,
                guide: self.guide.clone(),
                guide_after: self.guide_after.clone(),
                // One prefill serves both: the larger count, each response
                // part cut to its own.
                prompt_logprobs: self.prompt_logprobs.max(if self.echo {
                    self.logprobs
                } else {
                    None
                }),
            })
            .collect()
    }
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// A request type whose top-level field names are known, so that fields it
/// does not read can be named (vLLM logs them and goes on; so does Tandem).
pub trait RequestFields: serde::de::DeserializeOwned {
    /// Every field the type reads.
    fn field_names() -> &'static [String];
}

/// The field names of `template` serialized: every field of a request type
/// with its `Option`s as nulls.
fn names_of<T: serde::Serialize>(template: &T) -> Vec<String> {
    match serde_json::to_value(template) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

impl RequestFields for CompletionRequest {
    fn field_names() -> &'static [String] {
        static NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
            names_of(&CompletionRequest {
                model: None,
                prompt: Prompt::Text(String::new()),
                logprobs: None,
                echo: None,
                add_special_tokens: None,
                sampling: SamplingFields::default(),
            })
        });
        &NAMES
    }
}

/// [`RequestFields`] of a type whose `Default` serializes every field.
macro_rules! fields_of_default {
    ($($t:ty),*) => {$(
        impl RequestFields for $t {
            fn field_names() -> &'static [String] {
                static NAMES: std::sync::LazyLock<Vec<String>> =
                    std::sync::LazyLock::new(|| names_of(&<$t>::default()));
                &NAMES
            }
        }
    )*};
}

fields_of_default!(
    ChatCompletionRequest,
    TokenizeCompletionRequest,
    TokenizeChatRequest,
    DetokenizeRequest
);

/// The top-level fields of a JSON object that `T` does not read, sorted.
pub fn ignored_fields<T: RequestFields>(body: &Value) -> Vec<String> {
    let Value::Object(map) = body else {
        return Vec::new();
    };
    let known = T::field_names();
    let mut ignored: Vec<String> = map.keys().filter(|k| !known.contains(k)).cloned().collect();
    ignored.sort();
    ignored
}

fn refuse_unsupported(body: &Value) -> Result<(), ApiError> {
    let Value::Object(map) = body else {
        return Ok(());
    };
    // vLLM reads them and they change the output: a 400, never an ignore.
    for (field, value) in map {
        if let Some(what) = proto::openai::unsupported_field(field, value) {
            return Err(bad(
                format!("{field} ({what}) is not supported by this server; remove it"),
                field,
            ));
        }
    }
    Ok(())
}

/// Parses a JSON body once; malformed JSON is a 400 that says where, a
/// value of the wrong type a 400 naming the field (`param`, as vLLM's
/// validation errors do). Fields the request type does not read are
/// logged, as vLLM logs them.
pub fn parse_json<T: RequestFields>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}"), None))?;
    refuse_unsupported(&value)?;
    let ignored = ignored_fields::<T>(&value);
    let located = |path: String, inner: &serde_json::Error| {
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("invalid request: `{p}`: {inner}"),
            None => format!("invalid request: {inner}"),
        };
        ApiError::BadRequest { message, param }
    };
    let parsed = serde_path_to_error::deserialize(&value).map_err(|e| {
        // The request types flatten the shared field groups, where the
        // path is lost: those groups alone find it.
        let inner = serde_path_to_error::deserialize::<_, SamplingFields>(&value)
            .err()
            .or_else(|| serde_path_to_error::deserialize::<_, ChatTemplateFields>(&value).err())
            .filter(|inner| inner.path().to_string() != ".");
        match inner {
            Some(inner) => located(inner.path().to_string(), inner.inner()),
            None => located(e.path().to_string(), e.inner()),
        }
    })?;
    if !ignored.is_empty() {
        tracing::warn!("The following fields were present in the request but ignored: {ignored:?}");
    }
    Ok(parsed)
}

impl Validator {
    /// 404 unless `model` is absent or the served name.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.served_model_name => Err(ApiError::ModelNotFound(m.to_string())),
            _ => Ok(()),
        }
    }

    pub fn completion(
        &self,
        req: CompletionRequest,
        header_tag: Option<String>,
    ) -> Result<ValidRequest, ApiError> {
        self.check_model(req.model.as_deref())?;
        let add_special = req.add_special_tokens.unwrap_or(true);
        let prompts = match req.prompt {
            Prompt::Text(t) => vec![self.encode(t, add_special)?],
            Prompt::Texts(ts) => ts
                .into_iter()
                .map(|t| self.encode(t, add_special))
                .collect::<Result<_, _>>()?,
            Prompt::Tokens(ids) => vec![self.token_prompt(ids)?],
            Prompt::TokenBatches(b) => b
                .into_iter()
                .map(|ids| self.token_prompt(ids))
                .collect::<Result<_, _>>()?,
        };
        if prompts.is_empty() {
            return Err(bad("prompt must not be empty", "prompt"));
        }
        let logprobs = match req.logprobs {
            None => None,
            Some(k) if (0..=self.max_logprobs as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(bad(
                    format!(
                        "logprobs must be between 0 and {} (--max-logprobs), got {k}",
                        self.max_logprobs
                    ),
                    "logprobs",
                ));
            }
        };
        let echo = req.echo.unwrap_or(false);
        let mut sampling = req.sampling;
        let echo_without_generation = echo && sampling.max_tokens == Some(0);
        if echo_without_generation {
            sampling.max_tokens = Some(1);
        }
        let mut v = self.sampling(sampling, logprobs, header_tag, None)?;
        let prompts: Vec<ValidPrompt> = prompts
            .into_iter()
            .map(|p| v.truncate(p, &self.tokenizer))
            .collect();
        let max_tokens = v
            .max_tokens_requested
            .unwrap_or(DEFAULT_MAX_TOKENS.min(self.defaults.max_tokens.unwrap_or(usize::MAX)));
        v.valid.max_tokens = prompts
            .iter()
            .map(|p| self.check_context(p.ids.len(), max_tokens, v.valid.min_tokens, "prompt"))
            .collect::<Result<_, _>>()?;
        v.valid.prompts = prompts;
        v.valid.echo = echo;
        v.valid.echo_without_generation = echo_without_generation;
        v.valid.check_min_tokens_fit_the_guide()?;
        Ok(v.valid)
    }

    pub fn chat(
        &self,
        req: ChatCompletionRequest,
        header_tag: Option<String>,
    ) -> Result<ValidRequest, ApiError> {
        self.check_model(req.model.as_deref())?;
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(bad(
                    "top_logprobs requires logprobs to be true",
                    "top_logprobs",
                ));
            }
            (true, None) => Some(0),
            (true, Some(k)) if (0..=self.max_logprobs as i64).contains(&k) => Some(k as usize),
            (true, Some(k)) => {
                return Err(bad(
                    format!(
                        "top_logprobs must be between 0 and {} (--max-logprobs), got {k}",
                        self.max_logprobs
                    ),
                    "top_logprobs",
                ));
            }
        };
        let prompt = self.render_chat(&req.messages, &req.template)?;
        let mut sampling = req.sampling;
        let (tool_mode, tool_schema) = crate::tools::tool_mode(
            req.template.tools.as_ref(),
            req.tool_choice.as_ref(),
            self.auto_tools,
        )?;
        if req.max_completion_tokens.is_some() {
            sampling.max_tokens = req.max_completion_tokens;
        }
        // A named function or "required" is guided decoding by a schema.
        let mut v = self.sampling(sampling, logprobs, header_tag, tool_schema.as_ref())?;
        let prompt = v.truncate(prompt, &self.tokenizer);
        let len = prompt.ids.len();
        let max_tokens = match v.max_tokens_requested {
            Some(m) => m,
            None if len < self.max_model_len => (self.max_model_len - len)
                .min(self.defaults.max_tokens.unwrap_or(usize::MAX))
                .max(1),
            None => 1,
        };
        v.valid.max_tokens =
            vec![self.check_context(len, max_tokens, v.valid.min_tokens, "messages")?];
        let prompt_text = prompt.text.clone();
        v.valid.prompts = vec![prompt];
        v.valid.tools = ToolUse {
            mode: tool_mode,
            parallel: req.parallel_tool_calls.unwrap_or(true),
        };
        if let Some(parser) = self.reasoning_parser {
            v.valid.reasoning = Some((parser, req.include_reasoning.unwrap_or(true)));
            // As vLLM: a guide shapes the answer, from after the thinking
            // (unless the prompt already closed it, as Qwen3's template
            // does with enable_thinking: false).
            if v.valid.guide.is_some() && !crate::reasoning::thinking_closed(&prompt_text) {
                v.valid.guide_after = Some(crate::reasoning::END.to_string());
            }
        }
        v.valid.check_min_tokens_fit_the_guide()?;
        Ok(v.valid)
    }

    fn render_chat(
        &self,
        messages: &[Value],
        t: &ChatTemplateFields,
    ) -> Result<ValidPrompt, ApiError> {
        if messages.is_empty() {
            return Err(bad("messages must not be empty", "messages"));
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(normalize_message)
            .collect::<Result<_, _>>()?;
        let continue_final = t.continue_final_message.unwrap_or(false);
        let add_generation_prompt = t.add_generation_prompt.unwrap_or(!continue_final);
        if continue_final && add_generation_prompt {
            return Err(bad(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            ));
        }
        let mut text = self
            .tokenizer
            .apply_chat_template_json(
                &Value::Array(messages.clone()),
                add_generation_prompt,
                t.tools.as_ref(),
                t.chat_template_kwargs.as_ref(),
            )
            .map_err(|e| bad(e.to_string(), "messages"))?;
        if continue_final {
            // Cut what the template adds after the final message's content.
            let last = messages
                .last()
                .and_then(|m| m.get("content"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if let Some(pos) = text.rfind(last) {
                text.truncate(pos + last.len());
            }
        }
        let add_special = t.add_special_tokens.unwrap_or(false);
        let ids = self
            .tokenizer
            .encode(&text, add_special)
            .map_err(|e| bad(e.to_string(), "messages"))?;
        if ids.is_empty() {
            return Err(bad("the rendered chat prompt is empty", "messages"));
        }
        Ok(ValidPrompt { ids, text })
    }

    /// `POST /tokenize` with a text prompt: its ids (special tokens added
    /// unless `add_special_tokens: false`); an empty prompt has none.
    pub fn tokenize_text(&self, req: &TokenizeCompletionRequest) -> Result<Vec<u32>, ApiError> {
        self.check_model(req.model.as_deref())?;
        self.tokenizer
            .encode(&req.prompt, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| bad(e.to_string(), "prompt"))
    }

    /// `POST /tokenize` with messages: the ids `/v1/chat/completions` would
    /// generate from.
    pub fn tokenize_chat(&self, req: &TokenizeChatRequest) -> Result<Vec<u32>, ApiError> {
        self.check_model(req.model.as_deref())?;
        Ok(self.render_chat(&req.messages, &req.template)?.ids)
    }

    /// `POST /detokenize`: the text of `tokens`, special tokens included
    /// (as vLLM decodes them).
    pub fn detokenize(&self, req: &DetokenizeRequest) -> Result<String, ApiError> {
        self.check_model(req.model.as_deref())?;
        self.check_vocabulary(&req.tokens, "tokens")?;
        self.tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| bad(e.to_string(), "tokens"))
    }

    fn check_vocabulary(&self, ids: &[u32], param: &str) -> Result<(), ApiError> {
        match ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            Some(bad_id) => Err(bad(
                format!(
                    "token id {bad_id} is out of vocabulary (vocab_size {})",
                    self.vocab_size
                ),
                param,
            )),
            None => Ok(()),
        }
    }

    fn encode(&self, text: String, add_special: bool) -> Result<ValidPrompt, ApiError> {
        let ids = self
            .tokenizer
            .encode(&text, add_special)
            .map_err(|e| bad(e.to_string(), "prompt"))?;
        if ids.is_empty() {
            return Err(bad("prompt must not be empty", "prompt"));
        }
        Ok(ValidPrompt { ids, text })
    }

    fn token_prompt(&self, ids: Vec<u32>) -> Result<ValidPrompt, ApiError> {
        if ids.is_empty() {
            return Err(bad("prompt must not be empty", "prompt"));
        }
        self.check_vocabulary(&ids, "prompt")?;
        let text = self.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok(ValidPrompt { ids, text })
    }

    /// `max_tokens` if prompt + max_tokens fits the context and `min_tokens`
    /// is at most `max_tokens`, else vLLM's error.
    fn check_context(
        &self,
        prompt_len: usize,
        max_tokens: usize,
        min_tokens: usize,
        what: &str,
    ) -> Result<usize, ApiError> {
        if min_tokens > max_tokens {
            return Err(bad(
                format!(
                    "min_tokens must be less than or equal to max_tokens={max_tokens}, got \
                     {min_tokens}"
                ),
                "min_tokens",
            ));
        }
        if prompt_len + max_tokens > self.max_model_len {
            return Err(bad(
                format!(
                    "This model's maximum context length is {} tokens. However, you requested \
                     {} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). \
                     Please reduce the length of the {what} or completion.",
                    self.max_model_len,
                    prompt_len + max_tokens
                ),
                "max_tokens",
            ));
        }
        Ok(max_tokens)
    }

    /// OpenAI's `logit_bias` as vLLM reads it: integer token ids of the
    /// vocabulary, biases clamped to [-100, 100].
    fn logit_bias(
        &self,
        bias: Option<&std::collections::BTreeMap<String, f64>>,
    ) -> Result<Vec<(u32, f32)>, ApiError> {
        let mut out = Vec::new();
        for (key, &b) in bias.into_iter().flatten() {
            let id: u32 = key.trim().parse().map_err(|_| {
                bad(
                    format!("logit_bias keys must be token ids (integers as strings), got {key:?}"),
                    "logit_bias",
                )
            })?;
            if id as usize >= self.vocab_size {
                return Err(bad(
                    format!(
                        "logit_bias names token id {id}, out of vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                    "logit_bias",
                ));
            }
            if !b.is_finite() {
                return Err(bad(
                    format!("logit_bias values must be numbers, got {b} for token {id}"),
                    "logit_bias",
                ));
            }
            out.push((id, b.clamp(-100.0, 100.0) as f32));
        }
        Ok(out)
    }

    fn sampling(
        &self,
        f: SamplingFields,
        logprobs: Option<usize>,
        header_tag: Option<String>,
        tool_call: Option<&Value>,
    ) -> Result<PartialValid, ApiError> {
        // More samples than --max-num-seqs run in turns, as in vLLM; the
        // bound only keeps one request from holding the engine for ever.
        let n = match f.n {
            None => 1,
            Some(n) if (1..=MAX_N).contains(&n) => n as usize,
            Some(n) => {
                return Err(bad(
                    format!("n must be between 1 and {MAX_N}, got {n}"),
                    "n",
                ));
            }
        };
        let max_tokens_requested = match f.max_tokens {
            None => None,
            Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            Some(m) => {
                return Err(bad(
                    format!(
                        "max_tokens must be at least 1, got {m} (0 only with echo: true, to \
                         score the prompt)"
                    ),
                    "max_tokens",
                ));
            }
        };
        let stream = f.stream.unwrap_or(false);
        let prompt_logprobs = match f.prompt_logprobs {
            None => None,
            Some(_) if stream => {
                return Err(bad(
                    "prompt_logprobs is not available when stream is true (as in vLLM)",
                    "prompt_logprobs",
                ));
            }
            Some(k) if (0..=self.max_logprobs as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(bad(
                    format!(
                        "prompt_logprobs must be between 0 and {} (--max-logprobs), got {k}",
                        self.max_logprobs
                    ),
                    "prompt_logprobs",
                ));
            }
        };
        let d = &self.defaults;
        let top_k = match f.top_k {
            None => d.top_k,
            Some(k) => {
                i32::try_from(k).map_err(|_| bad(format!("top_k is out of range: {k}"), "top_k"))?
            }
        };
        let logit_bias = self.logit_bias(f.logit_bias.as_ref())?;
        let allowed_token_ids = match &f.allowed_token_ids {
            None => Vec::new(),
            Some(ids) if ids.is_empty() => {
                return Err(bad(
                    "allowed_token_ids must not be empty",
                    "allowed_token_ids",
                ));
            }
            Some(ids) => {
                if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                    return Err(bad(
                        format!(
                            "allowed_token_ids names token id {id}, out of vocabulary \
                             (vocab_size {})",
                            self.vocab_size
                        ),
                        "allowed_token_ids",
                    ));
                }
                let mut ids = ids.clone();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        let bad_words_token_ids = self.bad_words(f.bad_words.as_deref().unwrap_or_default())?;
        let vllm = SamplingParams::default();
        let params = SamplingParams {
            temperature: f.temperature.unwrap_or(d.temperature),
            top_p: f.top_p.unwrap_or(d.top_p),
            top_k,
            min_p: f.min_p.unwrap_or(d.min_p),
            repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: f.presence_penalty.unwrap_or(vllm.presence_penalty),
            frequency_penalty: f.frequency_penalty.unwrap_or(vllm.frequency_penalty),
            seed: f.seed.map(|s| s as u64),
            logprobs,
            logit_bias,
            allowed_token_ids,
            bad_words_token_ids,
        };
        params.validate().map_err(|e| {
            let msg = e.to_string();
            let param = msg.split_whitespace().next().unwrap_or("").to_string();
            ApiError::BadRequest {
                message: msg,
                param: Some(param),
            }
        })?;
        let stop = f.stop.map(|s| s.into_vec()).unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(bad("stop strings must not be empty", "stop"));
        }
        let stop_token_ids = f.stop_token_ids.unwrap_or_default();
        let min_tokens = match f.min_tokens {
            None => 0,
            Some(m) if m >= 0 => usize::try_from(m).unwrap_or(usize::MAX),
            Some(m) => {
                return Err(bad(
                    format!("min_tokens must be greater than or equal to 0, got {m}"),
                    "min_tokens",
                ));
            }
        };
        if f.best_of.is_some_and(|b| b > 1) {
            return Err(bad(
                "best_of is not supported (vLLM V1 dropped it too): ask for n samples and \
                 pick among them",
                "best_of",
            ));
        }
        let include_usage = stream
            && f.stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        let continuous_usage = include_usage
            && f.stream_options
                .as_ref()
                .and_then(|o| o.continuous_usage_stats)
                .unwrap_or(false);
        let ignore_eos = f.ignore_eos.unwrap_or(false);
        let guided = GuidedFields {
            regex: &f.guided_regex,
            choice: &f.guided_choice,
            json: &f.guided_json,
            response_format: &f.response_format,
            structured_outputs: &f.structured_outputs,
            tool_call,
        };
        let guide = self.guide(guided, ignore_eos, &stop_token_ids)?;
        let client_tag = f.client_tag.or(header_tag);
        let truncate_prompt_tokens = match f.truncate_prompt_tokens {
            None => None,
            Some(-1) => Some(self.max_model_len),
            Some(k) if k >= 1 && k as usize <= self.max_model_len => Some(k as usize),
            Some(k) => {
                return Err(bad(
                    format!(
                        "truncate_prompt_tokens must be -1 (the model's length) or between 1 \
                         and the model's length {}, got {k}",
                        self.max_model_len
                    ),
                    "truncate_prompt_tokens",
                ));
            }
        };
        Ok(PartialValid {
            max_tokens_requested,
            truncate_prompt_tokens,
            valid: ValidRequest {
                prompts: Vec::new(),
                n,
                max_tokens: Vec::new(),
                seed: params.seed,
                params,
                stop,
                stop_token_ids,
                ignore_eos,
                min_tokens,
                include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
                skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
                logprobs,
                prompt_logprobs,
                echo: false,
                echo_without_generation: false,
                stream,
                include_usage,
                continuous_usage,
                return_tokens_as_token_ids: f.return_tokens_as_token_ids.unwrap_or(false),
                return_token_ids: f.return_token_ids.unwrap_or(false),
                client_tag,
                guide,
                guide_after: None,
                tools: ToolUse {
                    mode: ToolMode::Text,
                    parallel: true,
                },
                reasoning: None,
            },
        })
    }

    /// vLLM's `bad_words` as token sequences: each word as it tokenizes at
    /// the start of a text, and after a space where that makes other
    /// tokens of the same count (vLLM's `update_from_tokenizer`).
    fn bad_words(&self, words: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
        let mut out: Vec<Vec<u32>> = Vec::new();
        for word in words {
            let word = word.trim_start();
            let ids = self
                .tokenizer
                .encode(word, false)
                .map_err(|e| bad(format!("bad_words {word:?}: {e}"), "bad_words"))?;
            if ids.is_empty() {
                return Err(bad(
                    format!("bad_words {word:?} is no token (empty after tokenizing)"),
                    "bad_words",
                ));
            }
            let spaced = self
                .tokenizer
                .encode(&format!(" {word}"), false)
                .map_err(|e| bad(format!("bad_words {word:?}: {e}"), "bad_words"))?;
            let other_word = spaced.len() == ids.len() && spaced.first() != ids.first();
            out.push(ids);
            if other_word {
                out.push(spaced);
            }
        }
        Ok(out)
    }

    /// The request's guided decoding, compiled (or from the cache): one of
    /// `guided_regex`, `guided_choice`, `guided_json`, `response_format`
    /// (`json_schema` / `json_object`) and `structured_outputs` (`regex`,
    /// `choice`, `json`, `json_object`).
    fn guide(
        &self,
        fields: GuidedFields,
        ignore_eos: bool,
        stop_token_ids: &[u32],
    ) -> Result<Option<Arc<RegexGuide>>, ApiError> {
        let mut asked: Vec<(String, &str)> = Vec::new();
        // vLLM's `disable_any_whitespace`: JSON without blanks.
        let compact = fields
            .structured_outputs
            .as_ref()
            .and_then(|so| so.get("disable_any_whitespace"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(p) = fields.regex {
            asked.push((p.clone(), "guided_regex"));
        }
        if let Some(c) = fields.choice {
            asked.push((choices(c, "guided_choice")?, "guided_choice"));
        }
        if let Some(schema) = fields.json.as_ref().filter(|v| !v.is_null()) {
            asked.push((
                schema_pattern(schema, compact, "guided_json")?,
                "guided_json",
            ));
        }
        let response_format = fields.response_format.as_ref().filter(|v| !v.is_null());
        match response_format
            .and_then(|rf| rf.get("type"))
            .and_then(Value::as_str)
        {
            Some("json_schema") => {
                let param = "response_format.json_schema.schema";
                let schema = response_format
                    .and_then(|rf| rf.get("json_schema"))
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| {
                        bad(
                            "response_format json_schema needs json_schema.schema",
                            param,
                        )
                    })?;
                asked.push((schema_pattern(schema, compact, param)?, "response_format"));
            }
            Some("json_object") => {
                asked.push((json_object_pattern(compact), "response_format"));
            }
            _ => {}
        }
        match fields.structured_outputs {
            None | Some(Value::Null) => {}
            Some(Value::Object(so)) => {
                for (key, value) in so {
                    let param = format!("structured_outputs.{key}");
                    match (key.as_str(), value) {
                        (_, Value::Null) | ("disable_fallback" | "disable_any_whitespace", _) => {}
                        ("regex", Value::String(p)) => {
                            asked.push((p.clone(), "structured_outputs.regex"))
                        }
                        ("json", schema) => asked.push((
                            schema_pattern(schema, compact, &param)?,
                            "structured_outputs.json",
                        )),
                        ("json_object", Value::Bool(false)) => {}
                        ("json_object", Value::Bool(true)) => asked.push((
                            json_object_pattern(compact),
                            "structured_outputs.json_object",
                        )),
                        ("choice", Value::Array(items)) => {
                            let c: Vec<String> = items
                                .iter()
                                .map(|v| v.as_str().map(str::to_string))
                                .collect::<Option<_>>()
                                .ok_or_else(|| bad("choices must be strings", &param))?;
                            asked.push((choices(&c, &param)?, "structured_outputs.choice"));
                        }
                        ("regex" | "choice" | "json_object", _) => {
                            return Err(bad(
                                format!(
                                    "{param} must be a string (regex), a list of strings \
                                     (choice) or a boolean (json_object)"
                                ),
                                &param,
                            ));
                        }
                        _ => {
                            return Err(bad(
                                format!(
                                    "{param} is not supported by this server: guided decoding \
                                     takes a regex, a choice, a JSON schema or json_object"
                                ),
                                &param,
                            ));
                        }
                    }
                }
            }
            Some(_) => {
                return Err(bad(
                    "structured_outputs must be an object",
                    "structured_outputs",
                ));
            }
        }
        // Last: beside another kind, the error's param names tool_choice.
        if let Some(schema) = fields.tool_call {
            asked.push((schema_pattern(schema, compact, "tools")?, "tool_choice"));
        }
        let (pattern, param) = match asked.len() {
            0 => return Ok(None),
            1 => asked.remove(0),
            _ => {
                let names: Vec<&str> = asked.iter().map(|(_, p)| *p).collect();
                return Err(bad(
                    format!(
                        "one guided decoding at a time; the request has {}",
                        names.join(", ")
                    ),
                    names[1],
                ));
            }
        };
        let mut end_ids: Vec<u32> = if ignore_eos {
            Vec::new()
        } else {
            self.eos_token_ids.clone()
        };
        end_ids.extend(stop_token_ids);
        if end_ids.is_empty() {
            return Err(bad(
                format!(
                    "{param}: a guided completion ends with EOS once it matches, which \
                     ignore_eos takes away; drop ignore_eos or give stop_token_ids"
                ),
                "ignore_eos",
            ));
        }
        let key = (pattern, end_ids);
        if let Some(g) = self.guides.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(Some(g));
        }
        let guide = RegexGuide::new(&key.0, self.token_bytes.clone(), key.1.clone())
            .map(Arc::new)
            .map_err(|e| bad(format!("{param}: {e}"), param))?;
        // Caught here with a 400, not at the first sampled token.
        if guide.allowed(guide.start()).is_empty() {
            return Err(bad(
                format!(
                    "{param}: no token of this model's vocabulary begins a text that matches \
                     {:?}",
                    key.0
                ),
                param,
            ));
        }
        if let Ok(mut m) = self.guides.lock() {
            if m.len() >= MAX_CACHED_GUIDES {
                m.clear();
            }
            m.insert(key, guide.clone());
        }
        Ok(Some(guide))
    }
}

/// The guided-decoding fields of a request.
struct GuidedFields<'a> {
    regex: &'a Option<String>,
    choice: &'a Option<Vec<String>>,
    json: &'a Option<Value>,
    response_format: &'a Option<Value>,
    structured_outputs: &'a Option<Value>,
    /// The schema of the call a chat request's `tool_choice` asks for (a
    /// named function, or `"required"`).
    tool_call: Option<&'a Value>,
}

/// A JSON schema (or its text, as vLLM also takes it) as a pattern.
fn schema_pattern(schema: &Value, compact: bool, param: &str) -> Result<String, ApiError> {
    let parsed;
    let schema = match schema {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| bad(format!("{param}: not a JSON schema: {e}"), param))?;
            &parsed
        }
        other => other,
    };
    model::guided::json_schema_pattern(schema, compact)
        .map_err(|e| bad(format!("{param}: {e}"), param))
}

/// vLLM's `guided_choice` as a pattern; at least one choice.
fn choices(c: &[String], param: &str) -> Result<String, ApiError> {
    if c.is_empty() {
        return Err(bad("needs at least one choice", param));
    }
    Ok(model::guided::choice_pattern(c))
}

struct PartialValid {
    max_tokens_requested: Option<usize>,
    /// vLLM's `truncate_prompt_tokens`, resolved.
    truncate_prompt_tokens: Option<usize>,
    valid: ValidRequest,
}

impl PartialValid {
    /// The prompt cut to its last `truncate_prompt_tokens` tokens, as vLLM
    /// cuts it (the text follows the ids, for `echo`).
    fn truncate(&self, prompt: ValidPrompt, tokenizer: &Tokenizer) -> ValidPrompt {
        match self.truncate_prompt_tokens {
            Some(k) if prompt.ids.len() > k => {
                let ids = prompt.ids[prompt.ids.len() - k..].to_vec();
                let text = tokenizer.decode(&ids, false).unwrap_or_default();
                ValidPrompt { ids, text }
            }
            _ => prompt,
        }
    }
}

/// A message for the chat template: an object with a string `role`, and
/// `content` as a string (a list of text parts is joined, as vLLM does).
fn normalize_message(m: &Value) -> Result<Value, ApiError> {
    let Value::Object(obj) = m else {
        return Err(bad("each message must be an object", "messages"));
    };
    if !obj.get("role").is_some_and(Value::is_string) {
        return Err(bad("each message needs a string `role`", "messages"));
    }
    let mut obj = obj.clone();
    match obj.get("content") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.clone()),
                    _ => {
                        return Err(bad("only text content parts are supported", "messages"));
                    }
                }
            }
            obj.insert("content".into(), Value::String(texts.join("\n")));
        }
        Some(_) => {
            return Err(bad(
                "message content must be a string or a list of text parts",
                "messages",
            ));
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_the_request_does_not_read_are_named() {
        let ignored = |body: &[u8]| -> Value { serde_json::from_slice(body).unwrap() };
        let body = ignored(
            br#"{"prompt": "hi", "n": 2, "stop": ["x"], "client_tag": "t",
                 "stop_token_id": [3], "min_tokens": 4, "length_penalty": 1.0}"#,
        );
        assert_eq!(
            ignored_fields::<CompletionRequest>(&body),
            ["length_penalty", "stop_token_id"]
        );
        let chat = ignored(br#"{"messages": [], "temperature": 0.5, "top_logprobs": 2, "foo": 1}"#);
        assert_eq!(ignored_fields::<ChatCompletionRequest>(&chat), ["foo"]);
        // Fields only the other endpoint reads are ignored here.
        let body = ignored(br#"{"prompt": "hi", "messages": []}"#);
        assert_eq!(ignored_fields::<CompletionRequest>(&body), ["messages"]);
        assert!(
            ignored_fields::<CompletionRequest>(&serde_json::json!("not an object")).is_empty()
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        let err = |body: &str| match parse_json::<CompletionRequest>(body.as_bytes()) {
            Err(ApiError::BadRequest { message, param }) => (message, param),
            other => panic!("{other:?}"),
        };
        let (message, param) = err(r#"{"prompt": "x", "max_tokens": "many"}"#);
        assert_eq!(param.as_deref(), Some("max_tokens"), "{message}");
        assert!(
            message.contains("max_tokens") && message.contains("many"),
            "{message}"
        );
        let (message, param) = err(r#"{"prompt": "x", "stream_options": {"include_usage": 3}}"#);
        assert_eq!(
            param.as_deref(),
            Some("stream_options.include_usage"),
            "{message}"
        );
        let (message, param) = err(r#"{"prompt": "x","#);
        assert!(
            message.starts_with("malformed JSON") && param.is_none(),
            "{message}"
        );
    }
}
