//! Tool calling in `/v1/chat/completions`, as vLLM does it: with
//! `--enable-auto-tool-choice --tool-call-parser hermes`, `tool_choice:
//! "auto"` finds the calls the model wrote (`<tool_call>{"name": ...,
//! "arguments": {...}}</tool_call>`, the format of Qwen2.5, Qwen3 and Hermes
//! models) and returns them as `tool_calls`; a named function or
//! `"required"` needs no parser: guided decoding makes the output the
//! arguments (or the list of calls) as JSON.

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::server::response_id;

/// The tool-call parsers this server has (vLLM's `--tool-call-parser`).
pub const PARSERS: &[&str] = &["hermes"];

const CALL_START: &str = "<tool_call>";
const CALL_END: &str = "</tool_call>";

/// What a request's `tool_choice` asks of its output.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Text, as without tools (`tool_choice: "none"`, or no tools).
    Text,
    /// The model may call tools; the parser finds the calls.
    Auto,
    /// One call of this function: the output is its arguments.
    Named(String),
    /// One or more calls: the output is `[{"name", "parameters"}, ...]`.
    Required,
}

/// What a request asks of tool calls: the mode, and whether more than one
/// call is kept (OpenAI's `parallel_tool_calls`, true by default).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub mode: ToolMode,
    pub parallel: bool,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message, Some("tool_choice"))
}

/// The function definitions of `tools` (`[{"type": "function", "function":
/// {"name", "parameters"}}]`), by name.
fn functions(tools: Option<&Value>) -> Result<Vec<(String, Value)>, ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else {
        return Ok(Vec::new());
    };
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::bad_request("tools must be a list", Some("tools")))?;
    list.iter()
        .map(|t| {
            let f = t.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            match name {
                Some(name) => Ok((
                    name.to_string(),
                    f.and_then(|f| f.get("parameters"))
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                )),
                None => Err(ApiError::bad_request(
                    format!("each tool is {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got {t}"),
                    Some("tools"),
                )),
            }
        })
        .collect()
}

/// The request's tool mode and, for a named function or `"required"`, the
/// JSON schema its output is guided by. `auto_tools`: the server runs with
/// `--enable-auto-tool-choice` and a parser.
pub fn tool_mode(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    auto_tools: bool,
) -> Result<(ToolMode, Option<Value>), ApiError> {
    let functions = functions(tools)?;
    let choice = match tool_choice {
        None | Some(Value::Null) if functions.is_empty() => return Ok((ToolMode::Text, None)),
        // OpenAI's default with tools.
        None | Some(Value::Null) => "auto",
        Some(Value::String(s)) => s.as_str(),
        Some(named) => {
            let name = named
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad(format!(
                        "tool_choice is \"none\", \"auto\", \"required\" or {{\"type\": \
                         \"function\", \"function\": {{\"name\": ...}}}}; got {named}"
                    ))
                })?;
            let (_, parameters) = functions.iter().find(|(n, _)| n == name).ok_or_else(|| {
                bad(format!(
                    "tool_choice names {name:?}, which tools do not define"
                ))
            })?;
            return Ok((ToolMode::Named(name.to_string()), Some(parameters.clone())));
        }
    };
    match choice {
        "none" => Ok((ToolMode::Text, None)),
        _ if functions.is_empty() => Err(bad(format!(
            "tool_choice {choice:?} needs tools; give tools or drop tool_choice"
        ))),
        "auto" if auto_tools => Ok((ToolMode::Auto, None)),
        "auto" => Err(bad(
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to \
             be set on the server (or use tool_choice \"none\", \"required\" or a named function)",
        )),
        "required" => {
            // vLLM's schema: a non-empty list of calls, each one of the tools.
            let calls: Vec<Value> = functions
                .iter()
                .map(|(name, parameters)| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"enum": [name]}, "parameters": parameters},
                        "required": ["name", "parameters"]
                    })
                })
                .collect();
            let schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
            Ok((ToolMode::Required, Some(schema)))
        }
        other => Err(bad(format!(
            "tool_choice {other:?} is not one of \"none\", \"auto\", \"required\" or a named function"
        ))),
    }
}

/// One call as OpenAI returns it (`arguments` is JSON text).
pub fn tool_call(name: &str, arguments: &str) -> Value {
    json!({
        "id": response_id("chatcmpl-tool"),
        "type": "function",
        "function": {"name": name, "arguments": arguments}
    })
}

/// The calls in a completed output and the content before them: hermes
/// calls for `Auto` (none found, or one that is not JSON: no calls, as
/// vLLM's parser), the guided list for `Required`, the arguments for
/// `Named`.
pub fn extract(tools: &ToolUse, text: &str) -> Option<(Option<String>, Vec<Value>)> {
    let (content, mut calls) = extract_all(&tools.mode, text)?;
    if !tools.parallel {
        calls.truncate(1);
    }
    Some((content, calls))
}

fn extract_all(mode: &ToolMode, text: &str) -> Option<(Option<String>, Vec<Value>)> {
    match mode {
        ToolMode::Text => None,
        ToolMode::Named(name) => Some((None, vec![tool_call(name, text)])),
        ToolMode::Required => {
            let list: Vec<Value> = serde_json::from_str(text).ok()?;
            let calls = list
                .iter()
                .map(|c| {
                    let name = c.get("name")?.as_str()?;
                    Some(tool_call(name, &c.get("parameters")?.to_string()))
                })
                .collect::<Option<Vec<_>>>()?;
            Some((None, calls))
        }
        ToolMode::Auto => {
            let (content, calls) = parse_hermes(text)?;
            Some((content, calls))
        }
    }
}

/// vLLM's hermes parser: each `<tool_call>...</tool_call>` (the last may be
/// left open) holds `{"name": ..., "arguments": {...}}`; the content is the
/// text before the first call (none when blank).
pub fn parse_hermes(text: &str) -> Option<(Option<String>, Vec<Value>)> {
    let first = text.find(CALL_START)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(CALL_START) {
        let body = &rest[start + CALL_START.len()..];
        let (inner, after) = match body.find(CALL_END) {
            Some(end) => (&body[..end], &body[end + CALL_END.len()..]),
            None => (body, ""),
        };
        let call: Value = serde_json::from_str(inner.trim()).ok()?;
        let name = call.get("name")?.as_str()?;
        let arguments = call.get("arguments").cloned().unwrap_or(json!({}));
        calls.push(tool_call(name, &arguments.to_string()));
        rest = after;
    }
    let content = &text[..first];
    let content = (!content.trim().is_empty()).then(|| content.to_string());
    Some((content, calls))
}

/// Whether `text` starts with a hermes call.
pub fn starts_call(text: &str) -> bool {
    text.starts_with(CALL_START)
}

/// `calls` as stream deltas: each with its `index`.
pub fn indexed(calls: Vec<Value>) -> Vec<Value> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c["index"] = json!(i);
            c
        })
        .collect()
}

/// How much of `pending` can be streamed as content now: all of it, but a
/// tail that might start `<tool_call>` waits for the next text.
pub fn streamable_prefix(pending: &str) -> usize {
    if let Some(i) = pending.find(CALL_START) {
        return i;
    }
    (1..CALL_START.len())
        .rev()
        .find(|&k| pending.ends_with(&CALL_START[..k]))
        .map_or(pending.len(), |k| pending.len() - k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_parts(c: &Value) -> (&str, Value) {
        let f = &c["function"];
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        (f["name"].as_str().unwrap(), args)
    }

    #[test]
    fn hermes_calls_content_and_an_unclosed_last_call() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": \
                    {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \
                    \"arguments\": {}}";
        let (content, calls) = parse_hermes(text).unwrap();
        assert_eq!(content.as_deref(), Some("Let me check.\n"));
        assert_eq!(calls.len(), 2);
        assert_eq!(call_parts(&calls[0]), ("weather", json!({"city": "Oslo"})));
        assert_eq!(call_parts(&calls[1]), ("time", json!({})));
        assert!(
            calls[0]["id"]
                .as_str()
                .unwrap()
                .starts_with("chatcmpl-tool-")
        );
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        let (content, _) = parse_hermes("<tool_call>{\"name\": \"t\"}</tool_call>").unwrap();
        assert_eq!(content, None);
        // No call, or one that is not JSON: the text stays content.
        assert!(parse_hermes("just text").is_none());
        assert!(parse_hermes("<tool_call>{\"name\": </tool_call>").is_none());
    }

    #[test]
    fn modes_from_tool_choice() {
        let tools = json!([
            {"type": "function", "function": {"name": "weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "time"}}
        ]);
        let t = Some(&tools);
        assert_eq!(tool_mode(None, None, false).unwrap().0, ToolMode::Text);
        assert_eq!(
            tool_mode(t, Some(&json!("none")), false).unwrap().0,
            ToolMode::Text
        );
        assert_eq!(tool_mode(t, None, true).unwrap().0, ToolMode::Auto);
        let e = tool_mode(t, None, false).unwrap_err().to_string();
        assert!(e.contains("--enable-auto-tool-choice"), "{e}");
        let named = json!({"type": "function", "function": {"name": "weather"}});
        let (mode, schema) = tool_mode(t, Some(&named), false).unwrap();
        assert_eq!(mode, ToolMode::Named("weather".into()));
        assert_eq!(schema.unwrap()["properties"]["city"]["type"], "string");
        let missing = json!({"type": "function", "function": {"name": "nope"}});
        assert!(tool_mode(t, Some(&missing), false).is_err());
        assert!(tool_mode(None, Some(&json!("required")), false).is_err());
        let (mode, schema) = tool_mode(t, Some(&json!("required")), false).unwrap();
        assert_eq!(mode, ToolMode::Required);
        let pattern = model::guided::json_schema_pattern(&schema.unwrap(), false).unwrap();
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        assert!(re.is_match(r#"[{"name": "time", "parameters": {}}]"#));
        assert!(!re.is_match(r#"[{"name": "other", "parameters": {}}]"#));
        assert!(!re.is_match("[]"));
        let two = r#"[{"name": "weather", "parameters": {"city": "Oslo"}},
                      {"name": "time", "parameters": {}}]"#;
        let mut tools = ToolUse {
            mode: ToolMode::Required,
            parallel: true,
        };
        let (_, calls) = extract(&tools, two).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(call_parts(&calls[0]), ("weather", json!({"city": "Oslo"})));
        // parallel_tool_calls: false keeps the first.
        tools.parallel = false;
        let (_, calls) = extract(&tools, two).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(call_parts(&calls[0]).0, "weather");
    }

    #[test]
    fn a_possible_call_start_waits() {
        assert_eq!(streamable_prefix("hello"), 5);
        assert_eq!(streamable_prefix("hello <tool"), 6);
        assert_eq!(streamable_prefix("hello <tool_call>{"), 6);
        assert_eq!(streamable_prefix("a < b"), 5);
    }
}
