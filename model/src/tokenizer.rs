//! Tokenizers of Hugging Face model folders, their chat templates, and the
//! character-level tokenizer of Tandem's embedded tiny models.
//!
//! A folder holds `tokenizer.json` (the `tokenizers` format), optionally
//! `tokenizer_config.json` (special tokens, `chat_template`) and
//! `chat_template.jinja` (where transformers >= 4.43 saves the template; it
//! wins over the config's, as in transformers). Files are kept as read so that
//! [`Tokenizer::save`] writes them back unchanged.
//!
//! Chat templates are rendered with minijinja configured like transformers'
//! jinja2 environment: `trim_blocks`, `lstrip_blocks`, no trailing newline,
//! `raise_exception`, `strftime_now`, a `tojson` that behaves like Python's
//! `json.dumps(ensure_ascii=False)`, Python string/dict methods, and Python
//! spelling of `None`/`True`/`False` in output.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};

use crate::error::{ModelError, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// Older processors save `{"chat_template": "..."}` here.
pub const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";

/// The ChatML template of Tandem's character-level tokenizers (Qwen2.5's
/// layout without its default system prompt).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\n\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n\
{%- endfor %}\n\
{%- if add_generation_prompt %}\n\
{{- '<|im_start|>assistant\\n' }}\n\
{%- endif %}\n";

fn tok_err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{context}: {e}"))
}

/// One chat message with string content. Use
/// [`Tokenizer::apply_chat_template_json`] for tool calls or content parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Where the chat template came from, kept so `save` writes it back there.
#[derive(Debug, Clone)]
enum TemplateFile {
    /// Inside tokenizer_config.json (nothing extra to write).
    Config,
    /// A separate file, written back verbatim.
    File { name: &'static str, raw: String },
}

/// A tokenizer loaded from a Hugging Face folder (or built in memory).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// tokenizer.json exactly as read or built.
    json: String,
    /// tokenizer_config.json as a JSON map (empty when the folder had none).
    config: Map<String, Json>,
    template_file: Option<TemplateFile>,
    chat_template: Option<ChatTemplate>,
    template_source: Option<String>,
    /// Compile error of the folder's template, reported when it is used.
    template_error: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    add_bos_token: Option<bool>,
    post_processor_adds_bos: bool,
}

/// `bos_token` etc. are strings or AddedToken objects `{"content": ...}`.
fn special_token(config: &Map<String, Json>, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which
/// transformers uses "default".
fn config_template(config: &Map<String, Json>) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// A chat template given by its text or by the path of a file holding it,
/// as vLLM's `--chat-template` takes it: text with `{` or a line break is
/// the template itself; anything else names a file (transformers' saved
/// `chat_template.jinja`, or a `.json` with a `chat_template` key).
pub fn chat_template_text(spec: &str) -> Result<String> {
    if spec.contains(['{', '\n']) {
        return Ok(spec.to_string());
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path).map_err(|e| {
        ModelError::ChatTemplate(format!(
            "{spec:?} is neither a template (no `{{`) nor a readable file: {e}"
        ))
    })?;
    if path.extension().is_some_and(|x| x == "json") {
        let json: Json = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        return json.as_object().and_then(config_template).ok_or_else(|| {
            ModelError::ChatTemplate(format!("{spec} has no `chat_template` string"))
        });
    }
    Ok(text)
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| ModelError::io(path, e))
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` /
    /// `chat_template.jinja` / `chat_template.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let json = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = match read_optional(&config_path)? {
            None => Map::new(),
            Some(text) => match serde_json::from_str::<Json>(&text) {
                Ok(Json::Object(map)) => map,
                Ok(_) => {
                    return Err(ModelError::Json {
                        path: config_path,
                        message: "expected a JSON object".into(),
                    });
                }
                Err(e) => {
                    return Err(ModelError::Json {
                        path: config_path,
                        message: e.to_string(),
                    });
                }
            },
        };
        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let template_json_path = dir.join(CHAT_TEMPLATE_JSON_FILE);
        let template_file = if let Some(raw) = read_optional(&jinja_path)? {
            Some((
                raw.clone(),
                TemplateFile::File {
                    name: CHAT_TEMPLATE_FILE,
                    raw,
                },
            ))
        } else if config_template(&config).is_some() {
            None
        } else if let Some(raw) = read_optional(&template_json_path)? {
            let parsed: Json = serde_json::from_str(&raw).map_err(|e| ModelError::Json {
                path: template_json_path.clone(),
                message: e.to_string(),
            })?;
            let template = config_template(parsed.as_object().unwrap_or(&Map::new()));
            template.map(|t| {
                (
                    t,
                    TemplateFile::File {
                        name: CHAT_TEMPLATE_JSON_FILE,
                        raw,
                    },
                )
            })
        } else {
            None
        };
        Self::build(json, config, template_file).map_err(|e| match e {
            ModelError::Tokenizer(m) => ModelError::Tokenizer(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Builds a tokenizer from the text of a `tokenizer.json` and, optionally,
    /// the JSON object of a `tokenizer_config.json`.
    pub fn from_json(tokenizer_json: &str, tokenizer_config: Option<Json>) -> Result<Self> {
        let config = match tokenizer_config {
            None => Map::new(),
            Some(Json::Object(m)) => m,
            Some(_) => {
                return Err(ModelError::Tokenizer(
                    "tokenizer_config must be a JSON object".into(),
                ));
            }
        };
        Self::build(tokenizer_json.to_owned(), config, None)
    }

    fn build(
        json: String,
        config: Map<String, Json>,
        template_file: Option<(String, TemplateFile)>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_str(&json)
            .map_err(|e| tok_err("cannot parse tokenizer.json", e))?;
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");
        let pad_token = special_token(&config, "pad_token");
        let unk_token = special_token(&config, "unk_token");
        let add_bos_token = config.get("add_bos_token").and_then(Json::as_bool);
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let post_processor_adds_bos = match bos_id {
            Some(bos) => inner
                .encode("", true)
                .map(|e| e.get_ids().first() == Some(&bos))
                .unwrap_or(false),
            None => false,
        };
        let (source, template_file) = match template_file {
            Some((source, file)) => (Some(source), Some(file)),
            None => {
                let s = config_template(&config);
                let file = s.as_ref().map(|_| TemplateFile::Config);
                (s, file)
            }
        };
        let mut tokenizer = Tokenizer {
            inner,
            json,
            config,
            template_file,
            chat_template: None,
            template_source: source.clone(),
            template_error: None,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            add_bos_token,
            post_processor_adds_bos,
        };
        if let Some(source) = source {
            // A broken template must not stop the model from serving
            // completions, so its error waits until the template is used.
            match tokenizer.compile_template(&source) {
                Ok(t) => tokenizer.chat_template = Some(t),
                Err(e) => {
                    tracing::warn!("chat template does not compile: {e}");
                    tokenizer.template_error = Some(e.to_string());
                }
            }
        }
        Ok(tokenizer)
    }

    /// `source` as this tokenizer's template, with its special tokens.
    fn compile_template(&self, source: &str) -> Result<ChatTemplate> {
        let t = ChatTemplate::new(source, self.bos_token.clone(), self.eos_token.clone())?;
        let t = match &self.pad_token {
            Some(p) => t.with_token("pad_token", p),
            None => t,
        };
        Ok(match &self.unk_token {
            Some(u) => t.with_token("unk_token", u),
            None => t,
        })
    }

    /// This tokenizer with `source` as its chat template instead of the
    /// folder's, as transformers' `tokenizer.chat_template = ...` (TRL's and
    /// open-r1's `chat_template` argument, vLLM's `--chat-template`). A
    /// template that does not compile is an error here, not at first use.
    /// [`Self::save`] writes it to `chat_template.jinja`, as transformers
    /// saves a template, so a saved model renders prompts as it was trained.
    pub fn with_chat_template(mut self, source: &str) -> Result<Self> {
        let template = self.compile_template(source)?;
        self.chat_template = Some(template);
        self.template_error = None;
        self.template_source = Some(source.to_string());
        // The saved tokenizer_config.json must not carry the old one.
        self.config.remove("chat_template");
        self.template_file = Some(TemplateFile::File {
            name: CHAT_TEMPLATE_FILE,
            raw: source.to_string(),
        });
        Ok(self)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (and the chat
    /// template file it was loaded from, if any) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        write_file(&dir.join(TOKENIZER_FILE), &self.json)?;
        // transformers writes indent=2, sorted keys, trailing newline.
        let mut config = serde_json::to_string_pretty(&self.config)
            .map_err(|e| tok_err("cannot serialize tokenizer_config.json", e))?;
        config.push('\n');
        write_file(&dir.join(TOKENIZER_CONFIG_FILE), &config)?;
        if let Some(TemplateFile::File { name, raw }) = &self.template_file {
            write_file(&dir.join(name), raw)?;
        }
        Ok(())
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// tokenizer.json as read or built.
    pub fn tokenizer_json(&self) -> &str {
        &self.json
    }

    /// tokenizer_config.json's fields (empty when the folder had none).
    pub fn config(&self) -> &Map<String, Json> {
        &self.config
    }

    /// Token ids of `text`. With `add_special_tokens`, the post-processor's
    /// tokens, and BOS according to `add_bos_token` as Llama tokenizers do.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("cannot encode", e))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens && let Some(bos) = self.bos_token_id() {
            match self.add_bos_token {
                Some(true) if !self.post_processor_adds_bos => ids.insert(0, bos),
                Some(false) if self.post_processor_adds_bos && ids.first() == Some(&bos) => {
                    ids.remove(0);
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; unknown ids are skipped (as `tokenizers` does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("cannot decode", e))
    }

    /// A streaming detokenizer for one sequence (see [`DecodeStream`]).
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream::new(skip_special_tokens)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The chat template's source, if the folder (or
    /// [`Self::with_chat_template`]) gives one.
    pub fn chat_template(&self) -> Option<&str> {
        self.template_source.as_deref()
    }

    fn template(&self) -> Result<&ChatTemplate> {
        if let Some(t) = &self.chat_template {
            return Ok(t);
        }
        Err(ModelError::ChatTemplate(match &self.template_error {
            Some(e) => e.clone(),
            None => format!(
                "the model folder has no chat template (neither {CHAT_TEMPLATE_FILE} nor \
                 `chat_template` in {TOKENIZER_CONFIG_FILE}); send a prompt instead of messages"
            ),
        }))
    }

    /// transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages = serde_json::to_value(messages)
            .map_err(|e| ModelError::ChatTemplate(format!("cannot serialize messages: {e}")))?;
        self.template()?.render(&messages, add_generation_prompt)
    }

    /// Like [`Self::apply_chat_template`] with messages as JSON (tool calls,
    /// content parts...), `tools`, and extra template variables such as
    /// vLLM's `chat_template_kwargs` (e.g. `enable_thinking`).
    pub fn apply_chat_template_json(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        tools: Option<&Json>,
        kwargs: Option<&Map<String, Json>>,
    ) -> Result<String> {
        self.template()?
            .render_with(messages, add_generation_prompt, tools, kwargs)
    }
}

/// Incremental detokenization for streaming: fed one id at a time, returns
/// the new text (empty while a multi-byte character is incomplete). Owns its
/// state, so it can live next to a sequence while the tokenizer is shared.
#[derive(Debug, Clone, Default)]
pub struct DecodeStream {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl DecodeStream {
    pub fn new(skip_special_tokens: bool) -> Self {
        DecodeStream {
            skip_special_tokens,
            ..Default::default()
        }
    }

    /// The text that `id` adds to the sequence decoded so far.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        tokenizers::step_decode_stream(
            &tokenizer.inner,
            vec![id],
            self.skip_special_tokens,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map(Option::unwrap_or_default)
        .map_err(|e| tok_err("cannot decode stream", e))
    }
}

// ---------------------------------------------------------------------------
// Chat templates

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with the special-token strings transformers
/// passes to it.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `template`; `bos`/`eos` become `bos_token`/`eos_token`.
    pub fn new(template: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false);
        env.set_syntax(
            syntax
                .build()
                .map_err(|e| ModelError::ChatTemplate(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(template))
            .map_err(|e| ModelError::ChatTemplate(describe(&e)))?;
        let mut tokens = BTreeMap::new();
        if let Some(b) = bos {
            tokens.insert("bos_token".to_owned(), b);
        }
        if let Some(e) = eos {
            tokens.insert("eos_token".to_owned(), e);
        }
        Ok(ChatTemplate {
            env,
            source: template.to_owned(),
            tokens,
        })
    }

    /// Adds another special-token variable (`pad_token`, `unk_token`...).
    pub fn with_token(mut self, name: &str, value: impl Into<String>) -> Self {
        self.tokens.insert(name.to_owned(), value.into());
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON list of message objects).
    pub fn render(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, None, None)
    }

    /// Renders with `tools` and extra variables; `kwargs` override the
    /// defaults (transformers: `render(messages=..., tools=..., documents=...,
    /// add_generation_prompt=..., **special_tokens_map, **kwargs)`).
    pub fn render_with(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        tools: Option<&Json>,
        kwargs: Option<&Map<String, Json>>,
    ) -> Result<String> {
        if !messages.is_array() {
            return Err(ModelError::ChatTemplate(
                "messages must be a list of message objects".into(),
            ));
        }
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), json_to_value(messages)),
            (
                "tools".into(),
                tools.map(json_to_value).unwrap_or(Value::from(())),
            ),
            ("documents".into(), Value::from(())),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ];
        for (k, v) in &self.tokens {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        for (k, v) in kwargs.into_iter().flatten() {
            ctx.retain(|(name, _)| name != k);
            ctx.push((k.clone(), json_to_value(v)));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatTemplate(describe(&e)))?;
        template
            .render(Value::from_pairs(ctx))
            .map_err(|e| ModelError::ChatTemplate(describe(&e)))
    }
}

/// `raise_exception(msg)` errors carry exactly the template's message; other
/// errors say what and where.
fn describe(e: &minijinja::Error) -> String {
    if e.kind() == ErrorKind::InvalidOperation
        && let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISED))
    {
        return msg.to_owned();
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

/// Marks errors raised by the template itself.
const RAISED: &str = "\u{0}raised:";

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// The `{% generation %}` tag of transformers' AssistantTracker only marks
/// assistant tokens; rendering ignores it, so it becomes a no-op block with
/// the same whitespace control.
fn strip_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &inner[1..]),
            _ => (None, inner),
        };
        let (body, trail) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], Some(c)),
            _ => (body, None),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.extend(lead);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.extend(trail);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => a.iter().map(json_to_value).collect(),
        Json::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v)))),
    }
}

/// jinja2 prints Python values: `None`, `True`, `['a', 1]`.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(value, &mut s);
            out.write_str(&s)
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn python_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(iter) = value.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = value.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&key, out);
                    out.push_str(": ");
                    python_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` (no HTML escaping, Python separators).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_owned(),
                b.as_str().unwrap_or(":").to_owned(),
            )
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.dump(value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn dump(
        &self,
        value: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::None | ValueKind::Undefined => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if value.is_integer() {
                    out.push_str(&value.to_string());
                } else {
                    let f = f64::try_from(value.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.dump(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map | ValueKind::Plain => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        None => {
                            // json.dumps turns non-string keys into strings.
                            let mut k = String::new();
                            self.dump(key, level + 1, &mut k)?;
                            self.string(k.trim_matches('"'), out);
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.dump(&value.get_item(key)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            _ => self.string(&value.to_string(), out),
        }
        Ok(())
    }
}

/// Python's `repr(float)` for the common cases (shortest round-trip digits).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let exp = if f == 0.0 {
        0
    } else {
        f.abs().log10().floor() as i32
    };
    if (-4..16).contains(&exp) {
        let s = format!("{f:?}");
        if s.contains('.') || s.contains('e') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Python: 1e-05, 1.5e+20.
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((m, e)) => {
                let (sign, digits) = match e.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', e),
                };
                format!("{m}e{sign}{digits:0>2}")
            }
            None => s,
        }
    }
}

/// `strftime_now(fmt)`: the current UTC time formatted like Python's strftime
/// (the directives chat templates use).
fn strftime_now(format: String) -> String {
    strftime(&format, chrono::Utc::now())
}

/// `format` with chrono's strftime, which takes Python's directives (and
/// glibc's `%-d`). A format with a directive chrono does not know comes back
/// as written rather than failing the template.
fn strftime(format: &str, t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.contains(&Item::Error) {
        return format.to_string();
    }
    t.format_with_items(items.into_iter()).to_string()
}

// ---------------------------------------------------------------------------
// Character-level tokenizer

/// Qwen2's pre-tokenizer regex (`PRETOKENIZE_REGEX` of transformers'
/// `tokenization_qwen2.py`). The Rust `tokenizers` (fancy-regex) and the
/// Python one (Oniguruma) both parse it; with no merges its split points do
/// not change any id, only the pieces the byte-level model sees.
const QWEN2_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's byte-to-unicode map (`bytes_to_unicode`) for ASCII bytes: the
/// printable ones `!`..=`~` are themselves, the others (`\0`..=` ` and DEL)
/// are shifted to U+0100.. in byte order (`' '` -> `Ġ`, `'\n'` -> `Ċ`).
fn byte_level_ascii(b: u8) -> char {
    debug_assert!(b.is_ascii());
    let code = match b {
        b'!'..=b'~' => u32::from(b),
        0..=b' ' => 0x100 + u32::from(b),
        _ => 0x100 + 33, // DEL, the 34th non-printable byte
    };
    char::from_u32(code).expect("U+0021..=U+0121 are chars")
}

/// Builds the character-level tokenizer of Tandem's embedded models: ids
/// `0..` are `special_tokens` in order, then one id per character of `chars`
/// in order, plus a `tokenizer_config.json` with a ChatML template.
/// `eos_token` is `<|im_end|>` and `pad_token` `<|endoftext|>` when present
/// (Qwen2.5-Instruct's choice), `unk_token` `<unk>` when present. Same inputs,
/// same bytes.
///
/// `chars` must be ASCII. The `tokenizer.json` is written in the shape that
/// transformers' `Qwen2Tokenizer` rebuilds, because transformers 5's
/// `AutoTokenizer` ignores tokenizer.json for `model_type: qwen2` (it is in
/// `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`) and re-creates a byte-level
/// BPE from its vocabulary alone: an NFC normalizer, Qwen's Split regex then
/// a ByteLevel pre-tokenizer (no prefix space, no regex), a BPE model with no
/// merges and no unk token, a ByteLevel decoder. Vocabulary keys are therefore
/// spelled byte-level (`' '` is `Ġ`, `'\n'` is `Ċ`; printable ASCII is
/// unchanged) and every character is one byte, so one id, the same ids as the
/// earlier WordLevel form of this tokenizer (the embedded weights keep their
/// meaning). Tandem, tokenizer.json in transformers and `AutoTokenizer` then
/// encode every text alike.
///
/// Characters outside the vocabulary are DROPPED, as `Qwen2Tokenizer` drops
/// them (its BPE has `unk_token=None`), rather than mapped to `<unk>` (which
/// the WordLevel form did): a model folder must give the same ids in Tandem as
/// in transformers and vLLM, or training and serving would see different
/// prompts for the same text. `<unk>`, when listed, stays a special token (its
/// id is unchanged) but encoding never produces it.
pub fn char_level(chars: &str, special_tokens: &[&str]) -> Result<Tokenizer> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut vocab = Map::new();
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (id, &tok) in special_tokens.iter().enumerate() {
        if tok.is_empty() || !seen.insert(tok) {
            return Err(ModelError::Tokenizer(format!(
                "char_level: special token {tok:?} is empty or repeated"
            )));
        }
        vocab.insert(tok.to_owned(), json!(id));
        added.push(json!({
            "id": id,
            "content": tok,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": true,
        }));
        added_decoder.insert(
            id.to_string(),
            json!({
                "content": tok,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }),
        );
    }
    for (next, c) in (special_tokens.len()..).zip(chars.chars()) {
        if !c.is_ascii() {
            return Err(ModelError::Tokenizer(format!(
                "char_level: character {c:?} is not ASCII (a byte-level vocabulary without \
                 merges holds single bytes only)"
            )));
        }
        let key = byte_level_ascii(c as u8).to_string();
        if vocab.contains_key(&key) {
            return Err(ModelError::Tokenizer(format!(
                "char_level: character {c:?} is repeated or is a special token"
            )));
        }
        vocab.insert(key, json!(next));
    }
    let has = |t: &str| special_tokens.contains(&t);
    let eos = ["<|im_end|>", "<|endoftext|>"].into_iter().find(|t| has(t));
    let pad = if has("<|endoftext|>") {
        Some("<|endoftext|>")
    } else {
        eos
    };
    let unk = has("<unk>").then_some("<unk>");
    // Field for field what `Qwen2Tokenizer(vocab=..., merges=[])` serializes
    // (`backend_tokenizer.to_str()`), except its no-op TemplateProcessing
    // post-processor.
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": false,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": false,
                    "trim_offsets": true,
                    "use_regex": false,
                },
            ],
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            // Unknown characters are dropped, as in Qwen2Tokenizer (see above).
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": [],
        },
    });
    let additional: Vec<&str> = special_tokens
        .iter()
        .copied()
        .filter(|t| Some(*t) != eos && Some(*t) != pad && Some(*t) != unk)
        .collect();
    let config = json!({
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": additional,
        "bos_token": null,
        "chat_template": CHATML_TEMPLATE,
        // Decoding must not touch spaces around punctuation.
        "clean_up_tokenization_spaces": false,
        "eos_token": eos,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "pad_token": pad,
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
    });
    let text = serde_json::to_string_pretty(&tokenizer_json)
        .map_err(|e| tok_err("char_level: cannot serialize tokenizer.json", e))?;
    Tokenizer::from_json(&text, Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHARS: &str =
        "0123456789+-*/=() \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!<>_'\"";
    const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"];

    fn char_tok() -> Tokenizer {
        char_level(CHARS, &SPECIALS).unwrap()
    }

    #[test]
    fn char_level_ids_and_round_trip() {
        let t = char_tok();
        assert_eq!(t.vocab_size(), SPECIALS.len() + CHARS.chars().count());
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
        assert_eq!(t.token_to_id("0"), Some(4));
        assert_eq!(t.eos_token_id(), Some(2));
        assert_eq!(t.pad_token_id(), Some(0));
        assert_eq!(t.unk_token_id(), Some(3));
        assert_eq!(t.bos_token_id(), None);

        // Character i of CHARS is id SPECIALS.len() + i, whatever its
        // byte-level spelling (the ids of the earlier WordLevel form).
        for (i, c) in CHARS.chars().enumerate() {
            let want = u32::try_from(SPECIALS.len() + i).unwrap();
            assert_eq!(t.encode(&c.to_string(), true).unwrap(), [want], "{c:?}");
            assert_eq!(t.decode(&[want], false).unwrap(), c.to_string());
        }
        assert_eq!(
            t.token_to_id("\u{120}"),
            t.encode(" ", false).unwrap().first().copied()
        );
        assert_eq!(
            t.token_to_id("\u{10a}"),
            t.encode("\n", false).unwrap().first().copied()
        );
        assert_eq!(t.token_to_id(" "), None);
        let ids = t.encode(CHARS, false).unwrap();
        assert_eq!(ids.len(), CHARS.len());
        assert_eq!(t.decode(&ids, false).unwrap(), CHARS);

        let text = "<|im_start|>user\n12 + 3 = 15, isn't it?<|im_end|>\n";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(ids[1], t.token_to_id("u").unwrap());
        assert_eq!(ids.len(), 1 + "user\n12 + 3 = 15, isn't it?".len() + 1 + 1);
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert_eq!(
            t.decode(&ids, true).unwrap(),
            "user\n12 + 3 = 15, isn't it?\n"
        );
        // Spaces are tokens of their own, newlines too (`\n\n` is two ids),
        // whatever pieces Qwen's regex cuts.
        assert_eq!(t.encode("a  b\n\n", false).unwrap().len(), 6);
        assert_eq!(t.encode("  \n \n\n  x", false).unwrap().len(), 9);
        // Unknown characters are dropped, as transformers' Qwen2Tokenizer
        // drops them; <unk> is never produced.
        let a = t.token_to_id("a").unwrap();
        assert_eq!(t.encode("a€", false).unwrap(), vec![a]);
        assert_eq!(t.encode("é☃\u{301}", false).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn char_level_is_deterministic_and_validates() {
        let a = char_tok();
        let b = char_tok();
        assert_eq!(a.tokenizer_json(), b.tokenizer_json());
        assert_eq!(a.config(), b.config());
        assert!(char_level("aa", &[]).is_err());
        assert!(char_level("a", &["x", "x"]).is_err());
        assert!(char_level("a", &["a"]).is_err());
        // One byte per character: no multi-byte characters.
        let err = char_level("aé", &[]).unwrap_err().to_string();
        assert!(err.contains("not ASCII"), "{err}");
        // Without <unk> too, an unknown character is dropped, not an error.
        let t = char_level("ab", &["<|endoftext|>"]).unwrap();
        assert_eq!(t.encode("abc", false).unwrap(), vec![1, 2]);
    }

    #[test]
    fn char_level_has_qwen2_tokenizer_shape() {
        // The fields transformers' Qwen2Tokenizer rebuilds (see char_level).
        let json: Json = serde_json::from_str(char_tok().tokenizer_json()).unwrap();
        assert_eq!(json["normalizer"], json!({"type": "NFC"}));
        let pre = &json["pre_tokenizer"]["pretokenizers"];
        assert_eq!(pre[0]["type"], "Split");
        assert_eq!(pre[0]["pattern"]["Regex"], QWEN2_PRETOKENIZE_REGEX);
        assert_eq!(pre[0]["behavior"], "Isolated");
        assert_eq!(pre[1]["type"], "ByteLevel");
        assert_eq!(pre[1]["add_prefix_space"], false);
        assert_eq!(pre[1]["use_regex"], false);
        assert_eq!(json["decoder"]["type"], "ByteLevel");
        let model = &json["model"];
        assert_eq!(model["type"], "BPE");
        assert_eq!(model["merges"], json!([]));
        assert_eq!(model["unk_token"], Json::Null);
        assert_eq!(model["vocab"]["\u{120}"], json!(SPECIALS.len() + 17));
        assert_eq!(model["vocab"]["\u{10a}"], json!(SPECIALS.len() + 18));
        // Every ASCII byte has its GPT-2 byte-level character.
        assert_eq!(byte_level_ascii(b'!'), '!');
        assert_eq!(byte_level_ascii(b'~'), '~');
        assert_eq!(byte_level_ascii(0), '\u{100}');
        assert_eq!(byte_level_ascii(b'\t'), '\u{109}');
        assert_eq!(byte_level_ascii(b'\r'), '\u{10d}');
        assert_eq!(byte_level_ascii(0x7f), '\u{121}');
        let all: String = (0u8..128).map(char::from).collect();
        let t = char_level(&all, &[]).unwrap();
        let ids = t.encode(&all, false).unwrap();
        assert_eq!(ids, (0..128).collect::<Vec<u32>>());
        assert_eq!(t.decode(&ids, false).unwrap(), all);
    }

    #[test]
    fn decode_stream_yields_deltas() {
        let t = char_tok();
        let text = "<|im_start|>ab c\n\nd<|im_end|>";
        let ids = t.encode(text, false).unwrap();
        let mut stream = t.decode_stream(false);
        let deltas: Vec<String> = ids.iter().map(|&id| stream.step(&t, id).unwrap()).collect();
        assert_eq!(deltas.concat(), text);
        assert_eq!(deltas[1], "a");
        assert_eq!(deltas[3], " ");
        assert_eq!(deltas[5], "\n");
        let mut stream = t.decode_stream(true);
        let text: String = ids.iter().map(|&id| stream.step(&t, id).unwrap()).collect();
        assert_eq!(text, "ab c\n\nd");
    }

    #[test]
    fn decode_stream_waits_for_complete_characters() {
        // Byte-fallback BPE: "é" is two byte tokens.
        let json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                      "vocab": {"<0xC3>": 0, "<0xA9>": 1, "a": 2}, "merges": []}
        });
        let t = Tokenizer::from_json(&json.to_string(), None).unwrap();
        let mut stream = t.decode_stream(false);
        assert_eq!(stream.step(&t, 2).unwrap(), "a");
        assert_eq!(stream.step(&t, 0).unwrap(), "");
        assert_eq!(stream.step(&t, 1).unwrap(), "é");
        assert_eq!(stream.step(&t, 2).unwrap(), "a");
    }

    #[test]
    fn save_and_reload_give_identical_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let t = char_tok();
        t.save(&a).unwrap();
        let reloaded = Tokenizer::from_dir(&a).unwrap();
        reloaded.save(&b).unwrap();
        for f in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] {
            let x = std::fs::read(a.join(f)).unwrap();
            let y = std::fs::read(b.join(f)).unwrap();
            assert_eq!(x, y, "{f}");
        }
        assert_eq!(
            std::fs::read_to_string(a.join(TOKENIZER_FILE)).unwrap(),
            t.tokenizer_json()
        );
        assert_eq!(reloaded.eos_token_id(), Some(2));
        assert_eq!(reloaded.chat_template(), Some(CHATML_TEMPLATE));
        let ids = reloaded.encode("ab", false).unwrap();
        assert_eq!(ids, t.encode("ab", false).unwrap());
    }

    #[test]
    fn chat_template_jinja_wins_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        char_tok().save(&a).unwrap();
        std::fs::write(a.join(CHAT_TEMPLATE_FILE), "{{ messages[0].content }}!\n").unwrap();
        let t = Tokenizer::from_dir(&a).unwrap();
        assert_eq!(t.chat_template(), Some("{{ messages[0].content }}!\n"));
        let out = t
            .apply_chat_template(&[ChatMessage::user("hi")], false)
            .unwrap();
        // keep_trailing_newline=False drops the template's final newline.
        assert_eq!(out, "hi!");
        let b = dir.path().join("b");
        t.save(&b).unwrap();
        assert_eq!(
            std::fs::read(a.join(CHAT_TEMPLATE_FILE)).unwrap(),
            std::fs::read(b.join(CHAT_TEMPLATE_FILE)).unwrap()
        );
    }

    /// A template given in place of the folder's renders with the
    /// tokenizer's special tokens, is saved as chat_template.jinja (and no
    /// longer in tokenizer_config.json), and comes back on reload.
    #[test]
    fn a_given_chat_template_replaces_the_folders_and_is_saved() {
        let template = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}\
                        {% if add_generation_prompt %}{{ eos_token }}{% endif %}";
        let t = char_tok().with_chat_template(template).unwrap();
        let out = t
            .apply_chat_template(&[ChatMessage::user("hi")], true)
            .unwrap();
        let (bos, eos) = (t.bos_token().unwrap_or(""), t.eos_token().unwrap());
        assert_eq!(out, format!("{bos}[hi]{eos}"));
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CHAT_TEMPLATE_FILE)).unwrap(),
            template
        );
        let config = std::fs::read_to_string(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap();
        assert!(!config.contains("chat_template"), "{config}");
        let reloaded = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(reloaded.chat_template(), Some(template));
        assert_eq!(
            reloaded
                .apply_chat_template(&[ChatMessage::user("hi")], true)
                .unwrap(),
            out
        );
        let err = char_tok()
            .with_chat_template("{% for m in messages %}")
            .unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    }

    #[test]
    fn a_chat_template_is_its_text_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let jinja = dir.path().join("t.jinja");
        std::fs::write(&jinja, "{{ messages[0].content }}").unwrap();
        let json = dir.path().join("tokenizer_config.json");
        std::fs::write(&json, r#"{"chat_template": "{{ 1 }}"}"#).unwrap();
        assert_eq!(chat_template_text("{{ x }}").unwrap(), "{{ x }}");
        let path = |p: &Path| p.to_str().unwrap().to_string();
        assert_eq!(
            chat_template_text(&path(&jinja)).unwrap(),
            "{{ messages[0].content }}"
        );
        assert_eq!(chat_template_text(&path(&json)).unwrap(), "{{ 1 }}");
        let err = chat_template_text("no/such/file.jinja")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no/such/file.jinja"), "{err}");
    }

    #[test]
    fn missing_tokenizer_json_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn no_template_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_FILE), char_tok().tokenizer_json()).unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        assert!(t.chat_template().is_none());
        assert!(t.eos_token_id().is_none());
        let err = t
            .apply_chat_template(&[ChatMessage::user("hi")], true)
            .unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)));
        assert!(err.to_string().contains("no chat template"), "{err}");
    }

    #[test]
    fn chatml_renders_exactly() {
        let t = char_tok();
        let msgs = [ChatMessage::system("Be brief."), ChatMessage::user("1+1?")];
        assert_eq!(
            t.apply_chat_template(&msgs, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        );
        assert_eq!(
            t.apply_chat_template(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn special_tokens_as_added_token_objects() {
        let config = json!({
            "bos_token": {"content": "<|im_start|>", "lstrip": false},
            "eos_token": "<|im_end|>",
            "add_bos_token": true,
        });
        let t = Tokenizer::from_json(char_tok().tokenizer_json(), Some(config)).unwrap();
        assert_eq!(t.bos_token(), Some("<|im_start|>"));
        assert_eq!(t.bos_token_id(), Some(1));
        // add_bos_token prepends BOS when the post-processor does not.
        assert_eq!(
            t.encode("a", true).unwrap(),
            vec![1, t.token_to_id("a").unwrap()]
        );
        assert_eq!(
            t.encode("a", false).unwrap(),
            vec![t.token_to_id("a").unwrap()]
        );
    }

    fn render(template: &str, messages: Json, add_generation_prompt: bool) -> Result<String> {
        ChatTemplate::new(template, Some("<s>".into()), Some("</s>".into()))?
            .render(&messages, add_generation_prompt)
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let tpl = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok";
        let err = render(tpl, json!([{"role": "system", "content": "x"}]), false).unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)));
        assert_eq!(
            err.to_string(),
            "chat template: Conversation roles must alternate user/assistant"
        );
        assert_eq!(
            render(tpl, json!([{"role": "user", "content": "x"}]), false).unwrap(),
            "ok"
        );
        // Syntax errors are errors too.
        assert!(ChatTemplate::new("{% if %}", None, None).is_err());
    }

    #[test]
    fn python_compat_helpers() {
        // Keys sorted in the input so the test holds with or without
        // serde_json's preserve_order.
        let msgs = json!([{"role": "user", "content": "  Hi there  ", "n": 1.5,
                           "args": {"city": "Zürich", "n": null, "tags": ["<a>", "b"]}}]);
        let cases = [
            ("{{ messages[0].content.strip() }}", "Hi there"),
            ("{{ messages[0].content.startswith('  H') }}", "True"),
            ("{{ messages[0].content.split()|join(',') }}", "Hi,there"),
            (
                "{{ messages[0].args|tojson }}",
                "{\"city\": \"Zürich\", \"n\": null, \"tags\": [\"<a>\", \"b\"]}",
            ),
            (
                "{{ messages[0].args.tags|tojson(indent=2) }}",
                "[\n  \"<a>\",\n  \"b\"\n]",
            ),
            (
                "{{ messages[0].args|tojson(separators=(',', ':')) }}",
                "{\"city\":\"Zürich\",\"n\":null,\"tags\":[\"<a>\",\"b\"]}",
            ),
            ("{{ 'é'|tojson(ensure_ascii=true) }}", "\"\\u00e9\""),
            ("{{ none }}|{{ true }}|{{ [1, 'a'] }}", "None|True|[1, 'a']"),
            ("{{ bos_token }}{{ eos_token }}|{{ pad_token }}", "<s></s>|"),
            ("{{ tools is none }}", "True"),
            ("{{ messages[0].n|tojson }}", "1.5"),
            ("{{ 'a' + 'b' }}", "ab"),
            (
                "{% for k, v in messages[0].args.items() %}{{ k }};{% endfor %}",
                "city;n;tags;",
            ),
            (
                "{% for m in messages %}{% if m.role == 'user' %}{% break %}{% endif %}{% endfor %}x",
                "x",
            ),
            (
                "{% set ns = namespace(found=false) %}{% set ns.found = true %}{{ ns.found }}",
                "True",
            ),
        ];
        for (tpl, expected) in cases {
            assert_eq!(render(tpl, msgs.clone(), false).unwrap(), expected, "{tpl}");
        }
    }

    #[test]
    fn generation_tags_are_ignored() {
        let tpl = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let out = render(
            tpl,
            json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            false,
        )
        .unwrap();
        assert_eq!(out, "ab");
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let at = |secs| chrono::DateTime::from_timestamp(secs, 0).unwrap();
        let t = at(1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9);
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %j %%", t),
            "2024-07-26 13:05:09 Friday 208 %"
        );
        assert_eq!(strftime("%B %-d, %y %I%p", t), "July 26, 24 01PM");
        assert_eq!(strftime("%d", at(0)), "01");
        assert_eq!(strftime("%Q %Y", t), "%Q %Y");
        let out = render("{{ strftime_now('%Y') }}", json!([]), false).unwrap();
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.5), "1.5");
        assert_eq!(python_float(2.0), "2.0");
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(1.5e20), "1.5e+20");
        assert_eq!(python_float(0.0001), "0.0001");
    }
}
