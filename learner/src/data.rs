//! Training and evaluation data: JSONL and Parquet files (the format Hugging
//! Face datasets are stored in), a column mapping, prompt building (the
//! model's chat template or a plain template with `{question}`), mixtures
//! with weights, shards by rank, an order from the seed, and a cursor that a
//! checkpoint saves.
//!
//! The order is one global stream of draws that depends on the seed only:
//! draw `g` picks a file with probability proportional to its weight (a hash
//! of `(seed, g)`), and the `k`-th draw from a file takes row
//! `perm_e[k mod n]` where `perm_e` is that file's shuffle for epoch
//! `e = k / n`. Rank `r` of `W` takes draws `g = r, r + W, r + 2W, ...`, so the
//! ranks share every epoch without overlap, and `W` ranks of batch `B / W` see
//! the same prompts as one rank of batch `B`. The cursor is the number of
//! draws handed out and the count per file: restoring it continues with
//! exactly the same next prompts, even with another world size.

use std::fs::File;
use std::path::{Path, PathBuf};

use model::tokenizer::{ChatMessage, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::recipe::{DataFile, DataSection, OnLongPrompt, Recipe};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unknown data format: expected a .jsonl or .parquet file")]
    Format { path: PathBuf },
    #[error(
        "{pattern}: {message} (a data path with * ? or [ is a pattern standing for the files \
         it matches, e.g. data/train-*.parquet for a Hugging Face dataset's shards)"
    )]
    Pattern { pattern: String, message: String },
    #[error("{path}, {location}: {message}")]
    Parse {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error(
        "{path}, {location}: no column {column:?} (columns: {available}); set \
         data.prompt_column / data.answer_column to the file's names"
    )]
    MissingColumn {
        path: PathBuf,
        location: String,
        column: String,
        available: String,
    },
    #[error(
        "{path} has drifted: expected_hash is {expected} but the file's SHA-256 is {found}; \
         restore the file, or update expected_hash if the change is intended"
    )]
    Drift {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "{path}, {location}: the question has {chars} characters, more than \
         data.max_prompt_chars = {max} (data.on_long_prompt: reject); raise the limit, \
         fix the row, or use on_long_prompt: truncate"
    )]
    TooLong {
        path: PathBuf,
        location: String,
        chars: usize,
        max: usize,
    },
    #[error("{path} has no rows")]
    Empty { path: PathBuf },
    #[error("data.prompt_template: {0}")]
    Template(String),
    #[error("{path}, {location}: cannot build the prompt: {message}")]
    Prompt {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("data: {0}")]
    Invalid(String),
    #[error("cannot restore the data cursor: {0}")]
    Cursor(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------
// Reading rows.
// ---------------------------------------------------------------------------

/// Which columns hold the question and the reference answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    pub prompt_column: String,
    pub answer_column: String,
    /// The column naming each row's source (verl's `data_source`), read
    /// when set.
    pub source_column: Option<String>,
    /// Keep every column but the prompt's ([`RawRow::columns`]).
    pub keep_columns: bool,
    /// Rows an environment completes (`rollout.environment_factory`, TRL's
    /// environment-owned data): a row without a prompt gets an empty user
    /// message, which the environment's `reset()` fills, and one without
    /// an answer an empty one.
    pub environment_rows: bool,
}

impl Default for ColumnMapping {
    fn default() -> Self {
        ColumnMapping::from_data(&DataSection::default())
    }
}

impl ColumnMapping {
    pub fn new(prompt_column: impl Into<String>, answer_column: impl Into<String>) -> Self {
        ColumnMapping {
            prompt_column: prompt_column.into(),
            answer_column: answer_column.into(),
            source_column: None,
            keep_columns: false,
            environment_rows: false,
        }
    }

    /// The data section's columns; the others are not kept.
    pub fn from_data(data: &DataSection) -> Self {
        let mut m = ColumnMapping::new(&data.prompt_column, &data.answer_column);
        m.source_column = data.data_source_column.clone();
        m
    }

    /// The recipe's columns, the others kept when its reward functions
    /// take them ([`crate::recipe::RewardSection::takes_row_columns`]) or
    /// its environments are reset with them.
    pub fn from_recipe(recipe: &Recipe) -> Self {
        let environment = recipe.rollout.environment_factory.is_some();
        ColumnMapping {
            keep_columns: recipe.reward.takes_row_columns() || environment,
            environment_rows: environment,
            ..ColumnMapping::from_data(&recipe.data)
        }
    }
}

/// One row as read: the question and the answer, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    /// The prompt column's text; for a conversational prompt, the content of
    /// its last user message.
    pub question: String,
    pub answer: String,
    /// Where the row is, for messages: `row 3 (line 4)` or `row 3`.
    pub location: String,
    /// A conversational prompt (TRL's format: a list of `{"role",
    /// "content"}` messages), which goes through the chat template as is.
    pub messages: Option<Vec<ChatMessage>>,
    /// The source column's text, when the mapping names one.
    pub data_source: Option<String>,
    /// With [`ColumnMapping::keep_columns`]: the row's other columns (all
    /// but the prompt's), as a JSON object's text, their values as read
    /// (a Parquet struct as an object).
    pub columns: Option<String>,
}

/// A conversational prompt: `[{"role": ..., "content": ...}, ...]`, where
/// `content` is text or a list of `{"type": "text", "text": ...}` parts.
fn parse_messages(column: &str, v: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let bad = |what: String| {
        format!(
            "column {column:?} is a list but not a conversation: {what}; a conversational \
             prompt is a list of {{\"role\": ..., \"content\": ...}} messages (TRL's format)"
        )
    };
    let Value::Array(items) = v else {
        return Err(bad("not a list".into()));
    };
    if items.is_empty() {
        return Err(bad("the list is empty".into()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("message {i} has no text `role`")))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(bad(format!(
                                "message {i} has a content part that is not text"
                            ))),
                        },
                    )
                    .collect::<std::result::Result<Vec<_>, _>>()?
                    .concat(),
                _ => return Err(bad(format!("message {i} has no text `content`"))),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The text a conversational prompt stands for in `Example::question`: its
/// last user message.
fn last_user_text(messages: &[ChatMessage]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .unwrap_or_default()
}

/// Reads every row of a `.jsonl` or `.parquet` file (by extension).
/// Numbers and booleans become text; a missing or null column is an error
/// naming the file, the row and the column.
pub fn read_rows(path: &Path, mapping: &ColumnMapping) -> Result<Vec<RawRow>> {
    match Format::of(path)? {
        Format::Jsonl => {
            let bytes = std::fs::read(path).map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            read_jsonl(path, &bytes, mapping)
        }
        Format::Parquet => read_parquet(path, mapping),
    }
}

/// The files a `train_files` / `eval_files` path stands for: the file
/// itself, or for a pattern (`*`, `?`, `[...]`: `data/train-*.parquet`, a
/// Hugging Face dataset's shards) every file it matches, in name order. A
/// file whose name holds those characters is itself.
pub fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    let text = path.to_string_lossy();
    if !text.contains(['*', '?', '[']) || path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let bad = |message: String| DataError::Pattern {
        pattern: text.to_string(),
        message,
    };
    let mut files = Vec::new();
    for entry in glob::glob(&text).map_err(|e| bad(e.to_string()))? {
        let file = entry.map_err(|e| bad(e.to_string()))?;
        if file.is_file() {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(bad("matches no file".into()));
    }
    files.sort();
    Ok(files)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jsonl,
    Parquet,
}

impl Format {
    fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl" | "ndjson") => Ok(Format::Jsonl),
            Some("parquet") => Ok(Format::Parquet),
            _ => Err(DataError::Format {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// The value of `column` in a row: the key itself, or, for a dotted name
/// whose key is absent, a walk into nested objects (verl's datasets keep the
/// reference answer in `reward_model.ground_truth`).
fn lookup<'a>(obj: &'a serde_json::Map<String, Value>, column: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(column) {
        return Some(v);
    }
    let mut parts = column.split('.');
    let mut v = obj.get(parts.next()?)?;
    for part in parts {
        v = v.as_object()?.get(part)?;
    }
    Some(v)
}

/// The columns a row has, for messages; below a dotted column's outer
/// key, its inner keys too (`reward_model.{ground_truth, style}`).
fn available_columns(obj: &serde_json::Map<String, Value>, wanted: &[&str]) -> String {
    let mut names: Vec<String> = obj.keys().cloned().collect();
    for column in wanted {
        if let Some((head, _)) = column.split_once('.')
            && let Some(Value::Object(inner)) = obj.get(head)
        {
            let keys: Vec<&str> = inner.keys().map(String::as_str).collect();
            names.push(format!("{head}.{{{}}}", keys.join(", ")));
        }
    }
    names.join(", ")
}

fn read_jsonl(path: &Path, bytes: &[u8], mapping: &ColumnMapping) -> Result<Vec<RawRow>> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Parse {
        path: path.to_path_buf(),
        location: format!("byte {}", e.valid_up_to()),
        message: "not UTF-8 text".into(),
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("row {} (line {})", rows.len(), i + 1);
        let parse_err = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            location: location.clone(),
            message,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| parse_err(format!("not JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(parse_err("a JSONL row must be a JSON object".into()));
        };
        let get = |column: &str, is_answer: bool| -> Result<String> {
            let missing = || DataError::MissingColumn {
                path: path.to_path_buf(),
                location: location.clone(),
                column: column.to_string(),
                available: available_columns(&obj, &[column]),
            };
            match lookup(&obj, column) {
                None | Some(Value::Null) => Err(missing()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
                Some(v) if is_answer => Ok(v.to_string()),
                Some(_) => Err(parse_err(format!(
                    "column {column:?} is an object, not text or a list of messages"
                ))),
            }
        };
        let (question, messages) = match lookup(&obj, &mapping.prompt_column) {
            Some(v @ Value::Array(_)) => {
                let messages = parse_messages(&mapping.prompt_column, v).map_err(parse_err)?;
                (last_user_text(&messages), Some(messages))
            }
            None | Some(Value::Null) if mapping.environment_rows => environment_prompt(),
            _ => (get(&mapping.prompt_column, false)?, None),
        };
        let answer = match lookup(&obj, &mapping.answer_column) {
            None | Some(Value::Null) if mapping.environment_rows => String::new(),
            _ => get(&mapping.answer_column, true)?,
        };
        let data_source = match &mapping.source_column {
            Some(column) => Some(get(column, true)?),
            None => None,
        };
        let columns = mapping.keep_columns.then(|| {
            let mut others = obj.clone();
            others.remove(&mapping.prompt_column);
            Value::Object(others).to_string()
        });
        rows.push(RawRow {
            question,
            answer,
            location: location.clone(),
            messages,
            data_source,
            columns,
        });
    }
    Ok(rows)
}

fn read_parquet(path: &Path, mapping: &ColumnMapping) -> Result<Vec<RawRow>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_err = |location: String, message: String| DataError::Parse {
        path: path.to_path_buf(),
        location,
        message,
    };
    let reader = SerializedFileReader::new(file)
        .map_err(|e| parse_err("footer".into(), format!("not a Parquet file: {e}")))?;
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    // A column, or a dotted path into a struct column (`reward_model.ground_truth`):
    // the top-level column and the path below it.
    // (None: an environment row's column that the file lacks.)
    let resolve = |column: &String| -> Result<Option<(String, Option<String>)>> {
        if columns.contains(column) {
            return Ok(Some((column.clone(), None)));
        }
        match column.split_once('.') {
            Some((head, rest)) if columns.iter().any(|c| c == head) => {
                Ok(Some((head.to_string(), Some(rest.to_string()))))
            }
            _ if mapping.environment_rows => Ok(None),
            _ => Err(DataError::MissingColumn {
                path: path.to_path_buf(),
                location: "schema".into(),
                column: column.clone(),
                available: columns.join(", "),
            }),
        }
    };
    let prompt_at = resolve(&mapping.prompt_column)?;
    let answer_at = resolve(&mapping.answer_column)?;
    if let Some(column) = &mapping.source_column
        && !columns.contains(column)
    {
        return Err(DataError::MissingColumn {
            path: path.to_path_buf(),
            location: "schema".into(),
            column: column.clone(),
            available: columns.join(", "),
        });
    }
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| parse_err("schema".into(), e.to_string()))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let location = format!("row {i}");
        let row = row.map_err(|e| parse_err(location.clone(), e.to_string()))?;
        let mut question = None;
        let mut answer = None;
        let mut messages = None;
        let mut data_source = None;
        let mut others = serde_json::Map::new();
        for (name, field) in row.get_column_iter() {
            if mapping.keep_columns && *name != mapping.prompt_column {
                others.insert(name.clone(), field.to_json_value());
            }
            // Inside a struct column: its JSON, walked, read as JSONL reads it.
            for (at, is_answer) in [(&prompt_at, false), (&answer_at, true)] {
                let Some((head, Some(rest))) = at else {
                    continue;
                };
                if name != head {
                    continue;
                }
                let mut v = field.to_json_value();
                for part in rest.split('.') {
                    v = v.get(part).cloned().unwrap_or(Value::Null);
                }
                let column = if is_answer {
                    &mapping.answer_column
                } else {
                    &mapping.prompt_column
                };
                let text = match v {
                    Value::Null => None,
                    Value::String(s) => Some(s),
                    Value::Array(_) if !is_answer => {
                        let conversation = parse_messages(column, &v)
                            .map_err(|m| parse_err(location.clone(), m))?;
                        question = Some(last_user_text(&conversation));
                        messages = Some(conversation);
                        continue;
                    }
                    Value::Object(_) if !is_answer => {
                        return Err(parse_err(
                            location.clone(),
                            format!("column {column:?} holds {v}, not text or a list of messages"),
                        ));
                    }
                    other => Some(other.to_string()),
                };
                if is_answer {
                    answer = text;
                } else {
                    question = text;
                }
            }
            if *name == mapping.prompt_column && matches!(field, Field::ListInternal(_)) {
                let conversation = parse_messages(name, &field.to_json_value())
                    .map_err(|m| parse_err(location.clone(), m))?;
                question = Some(last_user_text(&conversation));
                messages = Some(conversation);
                continue;
            }
            let slot = if *name == mapping.prompt_column {
                &mut question
            } else if *name == mapping.answer_column {
                &mut answer
            } else if mapping.source_column.as_ref() == Some(name) {
                &mut data_source
            } else {
                continue;
            };
            let text = match field {
                Field::Null => None,
                Field::Str(s) => Some(s.clone()),
                Field::Bytes(b) => Some(String::from_utf8(b.data().to_vec()).map_err(|_| {
                    parse_err(location.clone(), format!("column {name:?} is not UTF-8"))
                })?),
                Field::Bool(_)
                | Field::Byte(_)
                | Field::Short(_)
                | Field::Int(_)
                | Field::Long(_)
                | Field::UByte(_)
                | Field::UShort(_)
                | Field::UInt(_)
                | Field::ULong(_)
                | Field::Float(_)
                | Field::Double(_) => Some(field.to_string()),
                other => {
                    return Err(parse_err(
                        location.clone(),
                        format!(
                            "column {name:?} holds {other}, not text, a number or a list of \
                             messages"
                        ),
                    ));
                }
            };
            *slot = text;
        }
        let missing = |column: &str| DataError::MissingColumn {
            path: path.to_path_buf(),
            location: location.clone(),
            column: column.to_string(),
            available: format!("{} (the value is null)", columns.join(", ")),
        };
        let data_source = match &mapping.source_column {
            Some(column) => Some(data_source.ok_or_else(|| missing(column))?),
            None => None,
        };
        if mapping.environment_rows {
            if question.is_none() && messages.is_none() {
                let (empty, prompt) = environment_prompt();
                (question, messages) = (Some(empty), prompt);
            }
            answer.get_or_insert_default();
        }
        rows.push(RawRow {
            question: question.ok_or_else(|| missing(&mapping.prompt_column))?,
            answer: answer.ok_or_else(|| missing(&mapping.answer_column))?,
            location,
            messages,
            data_source,
            columns: mapping
                .keep_columns
                .then(|| Value::Object(others).to_string()),
        });
    }
    Ok(rows)
}

/// The path that names the placeholder rows of
/// [`Dataset::environment_placeholder`] (in the manifest, in messages).
pub const PLACEHOLDER: &str = "(rollout.environment_factory's prompts)";

/// The prompt of a row without one that an environment completes: an
/// empty user message, which its `reset()` fills (TRL's default).
fn environment_prompt() -> (String, Option<Vec<ChatMessage>>) {
    (String::new(), Some(vec![ChatMessage::user("")]))
}

/// SHA-256 of a file, in lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

// ---------------------------------------------------------------------------
// Prompts.
// ---------------------------------------------------------------------------

/// How a question becomes the prompt text sent to the rollout server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptTemplate {
    /// The model's chat template: `[system?, user: question]` with the
    /// generation prompt.
    Chat,
    /// Plain text with `{question}` (and optionally `{system_prompt}`).
    Text(String),
}

impl PromptTemplate {
    /// Reads `data.prompt_template`: `chat`, a template containing
    /// `{question}`, or the path of a file holding one (its final newline is
    /// dropped).
    pub fn from_spec(spec: &str) -> Result<PromptTemplate> {
        if spec == "chat" {
            return Ok(PromptTemplate::Chat);
        }
        if spec.contains("{question}") {
            return Ok(PromptTemplate::Text(spec.to_string()));
        }
        let text = std::fs::read_to_string(spec).map_err(|e| {
            DataError::Template(format!(
                "{spec:?} is neither `chat`, a template containing {{question}}, nor a \
                 readable file ({e})"
            ))
        })?;
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text)
            .to_string();
        if !text.contains("{question}") {
            return Err(DataError::Template(format!(
                "the template file {spec} does not contain {{question}}"
            )));
        }
        Ok(PromptTemplate::Text(text))
    }
}

/// The policy's tokenizer: the model folder's, with `data.chat_template`
/// (when the recipe gives one) in place of the folder's template.
pub fn policy_tokenizer(dir: &Path, data: &DataSection) -> anyhow::Result<Tokenizer> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    match &data.chat_template {
        None => Ok(tokenizer),
        Some(spec) => model::tokenizer::chat_template_text(spec)
            .and_then(|text| tokenizer.with_chat_template(&text))
            .map_err(|e| anyhow::anyhow!("data.chat_template: {e}")),
    }
}

/// The prompt recipe: template, system prompt, length limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptFormat {
    pub template: PromptTemplate,
    pub system_prompt: Option<String>,
    /// Longest question in characters, before the template.
    pub max_prompt_chars: Option<usize>,
    pub on_long_prompt: OnLongPrompt,
    /// More chat-template variables (`data.chat_template_kwargs`).
    pub chat_template_kwargs: serde_json::Map<String, Value>,
    /// The definitions of `rollout.tools` (and the environments' methods),
    /// which the chat template lists (its `tools` variable); none without
    /// tools.
    pub tools: Option<PromptTools>,
}

/// The tool definitions a prompt lists ([`crate::tools::ToolRunner::prompt_tools`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptTools {
    /// The same for every row.
    Same(Value),
    /// Each row's environment's (its `environment` column names one of
    /// `rollout.environment_factory`'s map, as TRL's dict of factories).
    ByEnvironment(std::collections::BTreeMap<String, Value>),
}

impl PromptTools {
    /// The definitions of a row whose other columns are `columns` (a JSON
    /// object's text), or why it has none.
    fn of_row(&self, columns: Option<&str>) -> std::result::Result<&Value, String> {
        match self {
            PromptTools::Same(definitions) => Ok(definitions),
            PromptTools::ByEnvironment(by_name) => {
                let row: Option<Value> = columns.and_then(|c| serde_json::from_str(c).ok());
                let chosen = row.as_ref().and_then(|r| r.get("environment"));
                chosen
                    .and_then(Value::as_str)
                    .and_then(|name| by_name.get(name))
                    .ok_or_else(|| {
                        let names: Vec<&str> = by_name.keys().map(String::as_str).collect();
                        PromptTools::unknown_environment(chosen, &names)
                    })
            }
        }
    }

    /// Why a row's `environment` column (`chosen`) names none of `names`.
    pub fn unknown_environment(chosen: Option<&Value>, names: &[&str]) -> String {
        let what = match chosen {
            None => "has no `environment` column".to_string(),
            Some(v) => format!("has `environment` {v}"),
        };
        format!(
            "{what}, while rollout.environment_factory maps names to classes: each row names \
             its environment, one of {}",
            names.join(", ")
        )
    }
}

impl PromptFormat {
    /// A plain template, no system prompt, no limit.
    pub fn plain(template: &str) -> Self {
        PromptFormat {
            template: PromptTemplate::Text(template.to_string()),
            system_prompt: None,
            max_prompt_chars: None,
            on_long_prompt: OnLongPrompt::Reject,
            chat_template_kwargs: serde_json::Map::new(),
            tools: None,
        }
    }

    pub fn from_recipe(data: &DataSection) -> Result<Self> {
        Ok(PromptFormat {
            template: PromptTemplate::from_spec(&data.prompt_template)?,
            system_prompt: data.system_prompt.clone(),
            max_prompt_chars: data.max_prompt_chars,
            on_long_prompt: data.on_long_prompt,
            chat_template_kwargs: data.chat_template_kwargs.clone(),
            tools: None,
        })
    }

    /// `messages` through the model's chat template with the generation
    /// prompt and the recipe's extra variables.
    fn render_chat(
        &self,
        path: &Path,
        row: &RawRow,
        messages: &[ChatMessage],
        tokenizer: &Tokenizer,
    ) -> Result<String> {
        let prompt_error = |message: String| DataError::Prompt {
            path: path.to_path_buf(),
            location: row.location.clone(),
            message,
        };
        let messages = serde_json::to_value(messages).map_err(|e| prompt_error(e.to_string()))?;
        let tools = match &self.tools {
            Some(tools) => Some(tools.of_row(row.columns.as_deref()).map_err(prompt_error)?),
            None => None,
        };
        tokenizer
            .apply_chat_template_json(&messages, true, tools, Some(&self.chat_template_kwargs))
            .map_err(|e| prompt_error(e.to_string()))
    }

    /// The prompt text of one row: the question limited to
    /// `max_prompt_chars`, then templated. `tokenizer` is needed for `chat`.
    pub fn build(
        &self,
        path: &Path,
        row: &RawRow,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<String> {
        self.build_with_messages(path, row, tokenizer)
            .map(|(text, _)| text)
    }

    /// [`Self::build`], and the messages the chat template rendered (a
    /// conversational row, or the `chat` template); none for a text
    /// template. A reward model renders them with its own template.
    pub fn build_with_messages(
        &self,
        path: &Path,
        row: &RawRow,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(String, Option<Vec<ChatMessage>>)> {
        if let Some(messages) = &row.messages {
            return self.build_conversation(path, row, messages, tokenizer);
        }
        let mut question = row.question.as_str();
        if let Some(max) = self.max_prompt_chars {
            let chars = question.chars().count();
            if chars > max {
                match self.on_long_prompt {
                    OnLongPrompt::Reject => {
                        return Err(DataError::TooLong {
                            path: path.to_path_buf(),
                            location: row.location.clone(),
                            chars,
                            max,
                        });
                    }
                    OnLongPrompt::Truncate => {
                        let end = question
                            .char_indices()
                            .nth(max)
                            .map_or(question.len(), |(i, _)| i);
                        question = &question[..end];
                    }
                }
            }
        }
        match &self.template {
            PromptTemplate::Text(t) => {
                let system = self.system_prompt.as_deref().unwrap_or("");
                let mut text = t.replace("{question}", question);
                if t.contains("{system_prompt}") {
                    text = text.replace("{system_prompt}", system);
                } else if !system.is_empty() {
                    text = format!("{system}\n{text}");
                }
                Ok((text, None))
            }
            PromptTemplate::Chat => {
                let tokenizer = tokenizer.ok_or_else(|| {
                    DataError::Template(
                        "`chat` needs the model's tokenizer (and its chat template)".into(),
                    )
                })?;
                let mut messages = Vec::with_capacity(2);
                if let Some(s) = &self.system_prompt {
                    messages.push(ChatMessage::system(s.clone()));
                }
                messages.push(ChatMessage::user(question.to_string()));
                let text = self.render_chat(path, row, &messages, tokenizer)?;
                Ok((text, Some(messages)))
            }
        }
    }
}

impl PromptFormat {
    /// A conversational row, as TRL does: its messages through the model's
    /// chat template with the generation prompt (the recipe's system prompt
    /// first when the conversation has none). `prompt_template` and
    /// `max_prompt_chars` are for text columns; `rollout.max_prompt_length`
    /// (tokens) limits both.
    fn build_conversation(
        &self,
        path: &Path,
        row: &RawRow,
        messages: &[ChatMessage],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(String, Option<Vec<ChatMessage>>)> {
        let tokenizer = tokenizer.ok_or_else(|| {
            DataError::Template(
                "a conversational prompt needs the model's tokenizer (and its chat template)"
                    .into(),
            )
        })?;
        let mut all = Vec::with_capacity(messages.len() + 1);
        if let Some(s) = &self.system_prompt
            && !messages.iter().any(|m| m.role == "system")
        {
            all.push(ChatMessage::system(s.clone()));
        }
        all.extend(messages.iter().cloned());
        let text = self.render_chat(path, row, &all, tokenizer)?;
        Ok((text, Some(all)))
    }
}

// ---------------------------------------------------------------------------
// Datasets.
// ---------------------------------------------------------------------------

/// One prompt ready for the rollout server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The text sent as the prompt (template applied).
    pub prompt_text: String,
    /// The question as read (after truncation, before the template).
    pub question: String,
    /// The reference answer, for the reward functions.
    pub answer: String,
    pub source_file: PathBuf,
    /// 0-based row in `source_file` (blank JSONL lines not counted).
    pub row: usize,
    /// The recipe's path `source_file` came from, where that is a pattern
    /// (one of its shards): what evaluations report by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    /// The messages the chat template rendered into `prompt_text` (a
    /// conversational row, or the `chat` template); none for a text
    /// template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// The row's source (`data.data_source_column`, verl's `data_source`),
    /// for rewards that score by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source: Option<String>,
    /// The row's other columns, a JSON object's text, when `python` reward
    /// functions take them ([`RawRow::columns`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<String>,
}

/// What the manifest records of each data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileFingerprint {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// Rows used (after `data.filter_overlong_prompts`).
    pub rows: usize,
    pub weight: f64,
    /// Rows left out as longer than `rollout.max_prompt_length` tokens
    /// (`data.filter_overlong_prompts`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overlong_prompts: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A loaded data file: its fingerprint and every example, in file order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub fingerprint: FileFingerprint,
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Reads the file, checks `expected_hash`, and builds every prompt (so a
    /// bad row stops the run before it starts).
    pub fn load(
        file: &DataFile,
        mapping: &ColumnMapping,
        format: &PromptFormat,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Dataset> {
        Dataset::load_within(file, mapping, format, tokenizer, None)
    }

    /// [`Self::load`], leaving out the rows whose prompt is longer than
    /// `max_prompt_tokens` tokens (verl's `filter_overlong_prompts`;
    /// counted in the fingerprint). Row numbers stay those of the file.
    pub fn load_within(
        file: &DataFile,
        mapping: &ColumnMapping,
        format: &PromptFormat,
        tokenizer: Option<&Tokenizer>,
        max_prompt_tokens: Option<usize>,
    ) -> Result<Dataset> {
        // One file, or a pattern's files (shards) as one dataset, in order.
        let path = &file.path;
        let files = files_of(path)?;
        let mut shards: Vec<(PathBuf, Vec<RawRow>)> = Vec::with_capacity(files.len());
        let (mut digests, mut total_bytes) = (Vec::new(), 0u64);
        for shard in files {
            let kind = Format::of(&shard)?;
            let bytes = std::fs::read(&shard).map_err(|source| DataError::Io {
                path: shard.clone(),
                source,
            })?;
            digests.push(sha256_hex(&bytes));
            total_bytes += bytes.len() as u64;
            let rows = match kind {
                Format::Jsonl => read_jsonl(&shard, &bytes, mapping)?,
                Format::Parquet => read_parquet(&shard, mapping)?,
            };
            if rows.is_empty() {
                return Err(DataError::Empty { path: shard });
            }
            shards.push((shard, rows));
        }
        // A pattern's hash: of its files' hashes, one a line, in order.
        let sha256 = match digests.as_slice() {
            [one] if shards[0].0 == *path => one.clone(),
            many => sha256_hex(
                many.iter()
                    .map(|d| format!("{d}\n"))
                    .collect::<String>()
                    .as_bytes(),
            ),
        };
        if let Some(expected) = &file.expected_hash
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(DataError::Drift {
                path: path.clone(),
                expected: expected.to_ascii_lowercase(),
                found: sha256,
            });
        }
        let rows: Vec<(&PathBuf, usize, &RawRow)> = shards
            .iter()
            .flat_map(|(shard, rows)| rows.iter().enumerate().map(move |(i, r)| (shard, i, r)))
            .collect();
        let mut examples = Vec::with_capacity(rows.len());
        let mut overlong_prompts = 0;
        for (shard, i, row) in rows {
            let path = shard;
            let (prompt_text, messages) = format.build_with_messages(path, row, tokenizer)?;
            if let (Some(max), Some(tok)) = (max_prompt_tokens, tokenizer) {
                let n = tok
                    .encode(&prompt_text, false)
                    .map_err(|e| DataError::Prompt {
                        path: path.clone(),
                        location: row.location.clone(),
                        message: e.to_string(),
                    })?;
                if n.len() > max {
                    overlong_prompts += 1;
                    continue;
                }
            }
            let question = match format.max_prompt_chars {
                Some(max) => row.question.chars().take(max).collect(),
                None => row.question.clone(),
            };
            examples.push(Example {
                prompt_text,
                question,
                answer: row.answer.clone(),
                source_file: path.clone(),
                row: i,
                dataset: (path != &file.path).then(|| file.path.clone()),
                messages,
                data_source: row.data_source.clone(),
                columns: row.columns.clone(),
            });
        }
        let path = &file.path;
        if examples.is_empty() {
            return Err(DataError::Invalid(format!(
                "every prompt of {} is longer than rollout.max_prompt_length ({} tokens): \
                 data.filter_overlong_prompts leaves none; raise the limit or turn the \
                 filter off (prompts are then cut to their last tokens)",
                path.display(),
                max_prompt_tokens.unwrap_or(0)
            )));
        }
        Ok(Dataset {
            fingerprint: FileFingerprint {
                path: path.clone(),
                sha256,
                bytes: total_bytes,
                rows: examples.len(),
                weight: file.weight,
                overlong_prompts,
            },
            examples,
        })
    }

    /// What stands for the data when the environment writes the prompts
    /// (`rollout.environment_factory` and no `data.train_files`, TRL's
    /// environment-owned data): `rows` rows of an empty user message, which
    /// each completion's `reset()` fills (one pass over them: one step's
    /// prompts).
    pub fn environment_placeholder(
        rows: usize,
        format: &PromptFormat,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Dataset> {
        let path = PathBuf::from(PLACEHOLDER);
        let (question, messages) = environment_prompt();
        let row = RawRow {
            question,
            answer: String::new(),
            location: "its empty prompt".into(),
            messages,
            data_source: None,
            columns: Some("{}".into()),
        };
        let (prompt_text, messages) = format.build_with_messages(&path, &row, tokenizer)?;
        let examples = (0..rows.max(1))
            .map(|i| Example {
                prompt_text: prompt_text.clone(),
                question: String::new(),
                answer: String::new(),
                source_file: path.clone(),
                row: i,
                dataset: None,
                messages: messages.clone(),
                data_source: None,
                columns: row.columns.clone(),
            })
            .collect::<Vec<_>>();
        Ok(Dataset {
            fingerprint: FileFingerprint {
                path,
                sha256: sha256_hex(b""),
                bytes: 0,
                rows: examples.len(),
                weight: 1.0,
                overlong_prompts: 0,
            },
            examples,
        })
    }

    /// Loads each file of a list ([`Self::load_within`]).
    pub fn load_all(
        files: &[DataFile],
        mapping: &ColumnMapping,
        format: &PromptFormat,
        tokenizer: Option<&Tokenizer>,
        max_prompt_tokens: Option<usize>,
    ) -> Result<Vec<Dataset>> {
        files
            .iter()
            .map(|f| Dataset::load_within(f, mapping, format, tokenizer, max_prompt_tokens))
            .collect()
    }
}

/// The evaluation set of a recipe: `data.eval_files` in file order (no
/// shuffle), the first `max_examples` of each file if set, with their
/// fingerprints. The prompts list `tools`
/// ([`crate::tools::ToolRunner::prompt_tools`]).
pub fn load_eval_examples(
    recipe: &Recipe,
    max_examples: Option<usize>,
    tokenizer: Option<&Tokenizer>,
    tools: Option<PromptTools>,
) -> Result<(Vec<Example>, Vec<FileFingerprint>)> {
    let data = &recipe.data;
    let format = PromptFormat {
        tools,
        ..PromptFormat::from_recipe(data)?
    };
    let sets = Dataset::load_all(
        &data.eval_files,
        &ColumnMapping::from_recipe(recipe),
        &format,
        tokenizer,
        recipe.overlong_prompt_limit(),
    )?;
    let fingerprints = sets.iter().map(|d| d.fingerprint.clone()).collect();
    // The first `max_examples` of each file: each benchmark keeps its share.
    let examples: Vec<Example> = sets
        .into_iter()
        .flat_map(|d| {
            let keep = max_examples.unwrap_or(d.examples.len());
            d.examples.into_iter().take(keep)
        })
        .collect();
    Ok((examples, fingerprints))
}

/// Rank `rank`'s share of a list: items `rank, rank + W, ...`.
pub fn shard<T: Clone>(items: &[T], rank: usize, world_size: usize) -> Vec<T> {
    items
        .iter()
        .skip(rank)
        .step_by(world_size.max(1))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// The order: mixture, epochs, shards, cursor.
// ---------------------------------------------------------------------------

/// Where a [`PromptSource`] is in its stream; saved in checkpoints. The
/// same for every rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataCursor {
    pub seed: u64,
    pub shuffle: bool,
    /// Draws of the global stream handed out to all ranks.
    pub position: u64,
    /// Draws taken from each file so far, in mixture order.
    pub file_draws: Vec<u64>,
    /// SHA-256 of each file, in mixture order.
    pub files: Vec<String>,
    pub weights: Vec<f64>,
}

/// The training prompts of one rank.
#[derive(Debug, Clone)]
pub struct PromptSource {
    datasets: Vec<Dataset>,
    /// Cumulative normalized weights; the last is 1.
    cumulative: Vec<f64>,
    seed: u64,
    shuffle: bool,
    rank: usize,
    world_size: usize,
    position: u64,
    file_draws: Vec<u64>,
    /// Per file: the epoch whose permutation is cached, and the permutation.
    perms: Vec<Option<(u64, Vec<u32>)>>,
}

const STREAM_PICK: u64 = 0x7069_636b; // "pick"
const STREAM_SHUFFLE: u64 = 0x7368_7566; // "shuf"

impl PromptSource {
    /// A mixture of loaded datasets; rank `rank` of `world_size`.
    pub fn new(
        datasets: Vec<Dataset>,
        seed: u64,
        shuffle: bool,
        rank: usize,
        world_size: usize,
    ) -> Result<PromptSource> {
        if datasets.is_empty() {
            return Err(DataError::Invalid("no training files".into()));
        }
        if world_size == 0 || rank >= world_size {
            return Err(DataError::Invalid(format!(
                "rank {rank} is not in a world of {world_size}"
            )));
        }
        let total: f64 = datasets.iter().map(|d| d.fingerprint.weight).sum();
        if datasets
            .iter()
            .any(|d| !(d.fingerprint.weight.is_finite() && d.fingerprint.weight > 0.0))
            || !total.is_finite()
        {
            return Err(DataError::Invalid(
                "every file's weight must be finite and > 0".into(),
            ));
        }
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = datasets
            .iter()
            .map(|d| {
                acc += d.fingerprint.weight / total;
                acc
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        let n = datasets.len();
        Ok(PromptSource {
            datasets,
            cumulative,
            seed,
            shuffle,
            rank,
            world_size,
            position: 0,
            file_draws: vec![0; n],
            perms: vec![None; n],
        })
    }

    /// Loads `data.train_files` and builds the source: order from
    /// `train.seed`. The prompts list `tools`
    /// ([`crate::tools::ToolRunner::prompt_tools`]).
    pub fn from_recipe(
        recipe: &Recipe,
        rank: usize,
        world_size: usize,
        tokenizer: Option<&Tokenizer>,
        tools: Option<PromptTools>,
    ) -> Result<PromptSource> {
        let data = &recipe.data;
        let format = PromptFormat {
            tools,
            ..PromptFormat::from_recipe(data)?
        };
        let sets = if data.train_files.is_empty() {
            // The environment writes the prompts (the recipe allows no files
            // only then).
            let rows = recipe.prompts_per_rank_per_step() * world_size.max(1);
            vec![Dataset::environment_placeholder(rows, &format, tokenizer)?]
        } else {
            Dataset::load_all(
                &data.train_files,
                &ColumnMapping::from_recipe(recipe),
                &format,
                tokenizer,
                recipe.overlong_prompt_limit(),
            )?
        };
        PromptSource::new(sets, recipe.train.seed, data.shuffle, rank, world_size)
    }

    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }

    pub fn fingerprints(&self) -> Vec<FileFingerprint> {
        self.datasets
            .iter()
            .map(|d| d.fingerprint.clone())
            .collect()
    }

    /// Prompts in one pass over the training files: their rows, all files
    /// together (what `train.num_train_epochs` counts in).
    pub fn epoch_prompts(&self) -> u64 {
        self.datasets.iter().map(|d| d.examples.len() as u64).sum()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The next `n` prompts of this rank. Every rank must take the same
    /// number per step (the ranks advance the global stream together).
    pub fn next_batch(&mut self, n: usize) -> Vec<Example> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut mine = None;
            for j in 0..self.world_size {
                let g = self.position + j as u64;
                let f = self.pick(g);
                let k = self.file_draws[f];
                self.file_draws[f] += 1;
                if j == self.rank {
                    mine = Some((f, k));
                }
            }
            self.position += self.world_size as u64;
            if let Some((f, k)) = mine {
                let row = self.row_of(f, k);
                out.push(self.datasets[f].examples[row].clone());
            }
        }
        out
    }

    /// The draws handed out per file so far (global stream), for logs.
    pub fn file_draws(&self) -> &[u64] {
        &self.file_draws
    }

    pub fn cursor(&self) -> DataCursor {
        DataCursor {
            seed: self.seed,
            shuffle: self.shuffle,
            position: self.position,
            file_draws: self.file_draws.clone(),
            files: self
                .datasets
                .iter()
                .map(|d| d.fingerprint.sha256.clone())
                .collect(),
            weights: self.datasets.iter().map(|d| d.fingerprint.weight).collect(),
        }
    }

    /// Continues from a saved cursor: the next prompts are those the saved
    /// source would have given. The files, weights, seed and shuffle must be
    /// those of the checkpoint; the world size may differ.
    pub fn restore(&mut self, cursor: &DataCursor) -> Result<()> {
        let files: Vec<&str> = self
            .datasets
            .iter()
            .map(|d| d.fingerprint.sha256.as_str())
            .collect();
        if cursor.files.len() != files.len() || cursor.files.iter().zip(&files).any(|(a, b)| a != b)
        {
            return Err(DataError::Cursor(format!(
                "the training files changed since the checkpoint (SHA-256 then: [{}], now: [{}])",
                cursor.files.join(", "),
                files.join(", ")
            )));
        }
        let weights: Vec<f64> = self.datasets.iter().map(|d| d.fingerprint.weight).collect();
        if cursor.weights != weights {
            return Err(DataError::Cursor(format!(
                "the mixture weights changed since the checkpoint ({:?} then, {:?} now)",
                cursor.weights, weights
            )));
        }
        if cursor.seed != self.seed || cursor.shuffle != self.shuffle {
            return Err(DataError::Cursor(format!(
                "seed / shuffle changed since the checkpoint ({} / {} then, {} / {} now)",
                cursor.seed, cursor.shuffle, self.seed, self.shuffle
            )));
        }
        if cursor.file_draws.iter().sum::<u64>() != cursor.position {
            return Err(DataError::Cursor(format!(
                "inconsistent cursor: {} draws in all but {:?} per file",
                cursor.position, cursor.file_draws
            )));
        }
        self.position = cursor.position;
        self.file_draws = cursor.file_draws.clone();
        Ok(())
    }

    /// The file of global draw `g`.
    fn pick(&self, g: u64) -> usize {
        if self.cumulative.len() == 1 {
            return 0;
        }
        let u = unit_f64(hash3(self.seed, STREAM_PICK, g));
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cumulative.len() - 1)
    }

    /// The row of the `k`-th draw from file `f`.
    fn row_of(&mut self, f: usize, k: u64) -> usize {
        let n = self.datasets[f].examples.len() as u64;
        let (epoch, i) = (k / n, (k % n) as usize);
        if !self.shuffle {
            return i;
        }
        let cached = matches!(&self.perms[f], Some((e, _)) if *e == epoch);
        if !cached {
            let perm = permutation(
                n as usize,
                hash3(self.seed, STREAM_SHUFFLE ^ f as u64, epoch),
            );
            self.perms[f] = Some((epoch, perm));
        }
        match &self.perms[f] {
            Some((_, perm)) => perm[i] as usize,
            None => i,
        }
    }
}

/// SplitMix64: a fixed, versionless mixing function, so that the data order
/// never changes with a dependency's version.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash3(a: u64, b: u64, c: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(a) ^ b) ^ c)
}

/// Uniform in [0, 1) from the top 53 bits.
fn unit_f64(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Fisher-Yates shuffle of `0..n` from a SplitMix64 stream.
fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let r = splitmix64(state);
        let j = ((r as u128 * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_depends_on_the_seed() {
        let a = permutation(100, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
        assert_ne!(a, permutation(100, 2));
        assert_eq!(a, permutation(100, 1));
        assert!(permutation(0, 1).is_empty());
    }

    #[test]
    fn unit_is_in_range() {
        for i in 0..1000 {
            let u = unit_f64(hash3(7, 8, i));
            assert!((0.0..1.0).contains(&u));
        }
    }
}
