//! The OpenAI/vLLM-compatible JSON of the rollout server's HTTP API, with the
//! RL extensions (`client_tag`, `return_token_ids`, `metadata`).
//!
//! Requests are *loose*: every sampling field is optional and ranges are not
//! checked here (the server's validation turns a request into a trusted one,
//! and names the field that was wrong). Unknown fields are ignored, as vLLM
//! does; the server logs their names, as vLLM does. Responses follow vLLM's shapes field for field; the RL extensions
//! are left out of the JSON when they were not asked for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Header that carries a client tag when the body does not.
pub const CLIENT_TAG_HEADER: &str = "x-vllm-client-tag";

// ---------------------------------------------------------------------------
// Requests

/// `prompt` of `/v1/completions`: text, a batch of texts, token ids, or a
/// batch of token-id lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// Request fields that vLLM reads, that change what is generated, and that
/// Tandem's rollout server does not implement, with what each is: the server
/// refuses them (a 400 naming the field) rather than ignoring them, and a
/// recipe that would send them to Tandem's servers is refused up front.
/// `response_format: {"type": "text"}` and a `false` are harmless.
pub const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    ("suffix", "text after the insertion point"),
    ("use_beam_search", "beam search"),
    (
        "response_format",
        "structured output by a structural tag (text, json_object and json_schema are supported)",
    ),
    ("guided_grammar", "structured output by a grammar"),
    (
        "structured_outputs",
        "structured output by a grammar or a structural tag (regex, choice, json and json_object \
         are supported)",
    ),
    ("prompt_embeds", "embedding prompts"),
];

/// Whether `value` of request field `field` asks for something in
/// [`UNSUPPORTED_FIELDS`] (what it is, when it does).
pub fn unsupported_field(field: &str, value: &Value) -> Option<&'static str> {
    let (_, what) = UNSUPPORTED_FIELDS.iter().find(|(f, _)| *f == field)?;
    let asks = match value {
        Value::Null | Value::Bool(false) => false,
        // Plain text is what every response is anyway; JSON is guided
        // decoding.
        v if field == "response_format" => !matches!(
            v.get("type").and_then(Value::as_str),
            Some("text" | "json_schema" | "json_object")
        ),
        // Guided decoding by a regex, a choice or JSON is done; the rest is
        // not.
        Value::Object(kinds) if field == "structured_outputs" => kinds.iter().any(|(k, v)| {
            !v.is_null()
                && !matches!(
                    k.as_str(),
                    "regex"
                        | "choice"
                        | "json"
                        | "json_object"
                        | "disable_fallback"
                        | "disable_any_whitespace"
                )
        }),
        _ => true,
    };
    asks.then_some(*what)
}

/// Fields that `/v1/completions` and `/v1/chat/completions` share.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingFields {
    pub n: Option<i64>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM: no EOS or stop token id (and no stop string) ends a sample
    /// before it has this many tokens.
    pub min_tokens: Option<i64>,
    /// OpenAI's `logit_bias`: token id (as a string) to a bias added to its
    /// logit, clamped to [-100, 100] as vLLM does.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    pub ignore_eos: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub return_token_ids: Option<bool>,
    /// RL extension: echoed as `metadata.client_tag` (the header
    /// `X-VLLM-Client-Tag` is the other way to send it).
    pub client_tag: Option<String>,
    pub user: Option<String>,
    /// Read only to refuse values above 1: vLLM V1 dropped `best_of`.
    pub best_of: Option<i64>,
    /// vLLM extension: log-probs of the prompt's tokens, each with this many
    /// top alternatives (0: only the prompt token's), in the response's
    /// `prompt_logprobs`. Not with `stream`.
    pub prompt_logprobs: Option<i64>,
    /// vLLM extension: keep only the prompt's last this many tokens (-1:
    /// the model's length).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM: only these token ids can be sampled.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM: words never generated (as they tokenize at the start of the
    /// text and after a space).
    pub bad_words: Option<Vec<String>>,
    /// vLLM's guided decoding: the completion matches this regular
    /// expression as a whole.
    pub guided_regex: Option<String>,
    /// vLLM's guided decoding: the completion is one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's guided decoding: the completion is JSON that this schema
    /// accepts (the schema, or its text).
    pub guided_json: Option<Value>,
    /// OpenAI's `{"type": "json_schema", "json_schema": {"schema": ...}}`,
    /// `{"type": "json_object"}` (any JSON object) or `text`.
    pub response_format: Option<Value>,
    /// vLLM's newer form of these: `{"regex": ...}`, `{"choice": [...]}`,
    /// `{"json": schema}`, `{"json_object": true}`, with
    /// `disable_any_whitespace` (its `grammar` / `structural_tag` are
    /// refused).
    pub structured_outputs: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Number of top log-probs per token (0 = only the sampled token's).
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// Messages as sent (`content` a string or a list of parts), handed to
    /// the chat template.
    pub messages: Vec<Value>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// `"none"`, `"auto"` (the default with `tools`), `"required"` or
    /// `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// OpenAI's: false keeps only the first of the calls the model wrote.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// vLLM: with a reasoning parser, false leaves `reasoning_content` out.
    #[serde(default)]
    pub include_reasoning: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub template: ChatTemplateFields,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// How `messages` become a prompt (the chat template's inputs), as
/// `/v1/chat/completions` and `/tokenize` both take them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatTemplateFields {
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub add_special_tokens: Option<bool>,
    pub tools: Option<Value>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// vLLM's `POST /tokenize` with a text prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: String,
    /// Default true, as for `/v1/completions`.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub return_token_strs: Option<bool>,
}

/// vLLM's `POST /tokenize` with chat messages (rendered as
/// `/v1/chat/completions` renders them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Value>,
    #[serde(flatten)]
    pub template: ChatTemplateFields,
    #[serde(default)]
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

/// vLLM's `POST /detokenize`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

// ---------------------------------------------------------------------------
// Responses

/// RL extension on responses, choices and stream chunks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The request's `client_tag`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tag: Option<String>,
    /// The oldest weight version that produced any of the tokens (the
    /// server's version at the time when nothing was generated yet).
    pub weight_version: u64,
    /// Every weight version that produced tokens, ascending (more than one
    /// when new weights were swapped in mid-generation).
    #[serde(default)]
    pub weight_versions: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
    pub completion_tokens: u64,
}

/// `logprobs` of a completions choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    /// `None` for the first prompt token when `echo` is on.
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    /// The top-k tokens plus the sampled one, per position.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
}

/// vLLM's `Logprob`: one token's entry in `prompt_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprob {
    pub logprob: f32,
    /// 1 for the most likely token; the prompt token's own rank is 1 plus the
    /// number of tokens strictly more likely.
    pub rank: Option<u64>,
    pub decoded_token: Option<String>,
}

/// vLLM's `prompt_logprobs`: per prompt token, its entry and the top
/// alternatives', keyed by token id (`None` for the first token, which
/// nothing precedes).
pub type PromptLogprobs = Vec<Option<BTreeMap<u32, Logprob>>>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// "stop", "length" or "abort"; `None` on stream chunks before the end.
    pub finish_reason: Option<String>,
    /// The stop string or stop token id that ended the choice (`None` for
    /// EOS or length).
    pub stop_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// A non-streaming completions response, and (with `object:
/// "text_completion"` too, as vLLM) each stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobToken {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Option<Vec<ChatLogprobToken>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessageOut {
    pub role: String,
    /// vLLM's `--reasoning-parser`: the thinking, apart from `content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// `delta` of a chat stream chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls, each with its `index` (a call's `arguments` may come in
    /// pieces over several chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

// ---------------------------------------------------------------------------
// Models, version, errors

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    /// The weight version currently served.
    pub weight_version: u64,
}

/// The body of every error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub message: String,
    /// vLLM's error class name, e.g. "BadRequestError".
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    /// The HTTP status.
    pub code: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms_parse() {
        let p = |s: &str| serde_json::from_str::<Prompt>(s).unwrap();
        assert_eq!(p(r#""hi""#), Prompt::Text("hi".into()));
        assert_eq!(
            p(r#"["a","b"]"#),
            Prompt::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(p("[1,2]"), Prompt::Tokens(vec![1, 2]));
        assert_eq!(
            p("[[1],[2,3]]"),
            Prompt::TokenBatches(vec![vec![1], vec![2, 3]])
        );
        assert!(serde_json::from_str::<Prompt>("3").is_err());
    }

    #[test]
    fn completion_request_takes_flattened_sampling_fields_and_ignores_unknown() {
        let r: CompletionRequest = serde_json::from_str(
            r#"{"model":"m","prompt":"x","n":2,"stop":"\n","logprobs":3,"whatever":1}"#,
        )
        .unwrap();
        assert_eq!(r.sampling.n, Some(2));
        assert_eq!(r.logprobs, Some(3));
        assert_eq!(r.sampling.stop, Some(Stop::One("\n".into())));
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt":"x","n":"two"}"#).is_err());
    }

    #[test]
    fn error_serializes_as_vllm() {
        let e = ErrorResponse {
            error: ErrorInfo {
                message: "m".into(),
                kind: "BadRequestError".into(),
                param: None,
                code: 400,
            },
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"message":"m","type":"BadRequestError","param":null,"code":400}}"#
        );
    }
}
