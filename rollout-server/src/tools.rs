//! Tool calling in `/v1/chat/completions`, as vLLM does it: with
//! `--enable-auto-tool-choice --tool-call-parser P`, `tool_choice: "auto"`
//! finds the calls the model wrote and returns them as `tool_calls`:
//! `hermes` reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! anywhere after the content (Qwen2.5, Qwen3, Hermes), `llama3_json` an
//! output that is `{"name": ..., "parameters": {...}}` objects joined by
//! `; ` (Llama 3.1 and 3.2's JSON tool calls, maybe after `<|python_tag|>`).
//! A named function or `"required"` needs no parser: guided decoding makes
//! the output the arguments (or the list of calls) as JSON.

use serde_json::{Value, json};

pub use model::tool_calls::{PARSERS, ToolParser};
use model::tool_calls::{WrittenCalls, scan_call, skip_ws};

use crate::error::ApiError;
use crate::server::response_id;

/// What a request's `tool_choice` asks of its output.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Text, as without tools (`tool_choice: "none"`, or no tools).
    Text,
    /// The model may call tools; the parser finds the calls.
    Auto(ToolParser),
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
/// JSON schema its output is guided by. `auto_tools`: the server's parser,
/// when it runs with `--enable-auto-tool-choice`.
pub fn tool_mode(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    auto_tools: Option<ToolParser>,
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
        "auto" if let Some(parser) = auto_tools => Ok((ToolMode::Auto(parser), None)),
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
/// calls for `Auto` (none found, or one that is not whole JSON: no calls,
/// as vLLM's parser), the guided list for `Required`, the arguments for
/// `Named`. Arguments are the model's own JSON text, as streamed.
pub fn extract(tools: &ToolUse, text: &str) -> Option<(Option<String>, Vec<Value>)> {
    let (content, mut calls) = match &tools.mode {
        ToolMode::Text => return None,
        ToolMode::Named(name) => (None, vec![tool_call(name, text)]),
        mode => {
            let (content, calls) = calls_so_far(mode, text)?.whole(text)?;
            let calls = calls
                .into_iter()
                .map(|(name, args)| tool_call(&name, args))
                .collect();
            (
                (!content.trim().is_empty()).then(|| content.to_string()),
                calls,
            )
        }
    };
    if !tools.parallel {
        calls.truncate(1);
    }
    Some((content, calls))
}

/// The calls in `text` so far: for `Auto`, hermes `<tool_call>` objects
/// or Llama 3's `{...}; {...}` (None before the first, or when the text is
/// not calls), the guided `[{"name", "parameters"}, ...]` list for
/// `Required`. Read without a JSON parser of the whole, so that a stream
/// can send each call's name and arguments as they come.
pub fn calls_so_far<'a>(mode: &ToolMode, text: &'a str) -> Option<WrittenCalls<'a>> {
    let mut written = WrittenCalls {
        start: 0,
        calls: Vec::new(),
        malformed: false,
    };
    match mode {
        ToolMode::Auto(parser) => return parser.calls_so_far(text),
        ToolMode::Required => {
            let b = text.as_bytes();
            let mut i = skip_ws(b, 0);
            match b.get(i) {
                None => return Some(written),
                Some(b'[') => i += 1,
                Some(_) => {
                    written.malformed = true;
                    return Some(written);
                }
            }
            loop {
                i = skip_ws(b, i);
                if matches!(b.get(i), None | Some(b']')) {
                    break;
                }
                let Some((call, end)) = scan_call(&text[i..], &["parameters"]) else {
                    written.malformed = true;
                    break;
                };
                written.calls.push(call);
                let Some(end) = end else { break };
                i = skip_ws(b, i + end);
                match b.get(i) {
                    Some(b',') => i += 1,
                    None | Some(b']') => break,
                    Some(_) => {
                        written.malformed = true;
                        break;
                    }
                }
            }
        }
        ToolMode::Text | ToolMode::Named(_) => return None,
    }
    Some(written)
}

/// What of each call a stream has sent: a call opens (id, type, name) once
/// its name is whole, then its arguments go out as the model writes them,
/// as vLLM streams tool calls.
#[derive(Debug, Default)]
pub struct CallStream {
    /// Per opened call, the bytes of its arguments sent.
    sent: Vec<usize>,
}

impl CallStream {
    /// The deltas that bring the stream up to `text` (the whole answer so
    /// far), with their `index`.
    pub fn advance(&mut self, tools: &ToolUse, text: &str) -> Vec<Value> {
        let Some(written) = calls_so_far(&tools.mode, text) else {
            return Vec::new();
        };
        let most = if tools.parallel { usize::MAX } else { 1 };
        let mut out = Vec::new();
        for (i, call) in written.calls.iter().enumerate().take(most) {
            let arguments = match call.arguments {
                Some(a) => a,
                None if call.closed => "{}",
                None => "",
            };
            if i == self.sent.len() {
                // Calls open in order: one waiting for its name holds back
                // the rest.
                let Some(name) = &call.name else { break };
                let mut opened = tool_call(name, arguments);
                opened["index"] = json!(i);
                out.push(opened);
                self.sent.push(arguments.len());
            } else if let Some(piece) = arguments.get(self.sent[i]..).filter(|p| !p.is_empty()) {
                out.push(json!({"index": i, "function": {"arguments": piece}}));
                self.sent[i] = arguments.len();
            }
        }
        out
    }

    /// Whether a call has gone out.
    pub fn opened(&self) -> bool {
        !self.sent.is_empty()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn call_parts(c: &Value) -> (&str, Value) {
        let f = &c["function"];
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        (f["name"].as_str().unwrap(), args)
    }

    fn auto() -> ToolUse {
        ToolUse {
            mode: ToolMode::Auto(ToolParser::Hermes),
            parallel: true,
        }
    }

    #[test]
    fn hermes_calls_content_and_an_unclosed_last_call() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": \
                    {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \
                    \"arguments\": {}}";
        let (content, calls) = extract(&auto(), text).unwrap();
        assert_eq!(content.as_deref(), Some("Let me check.\n"));
        assert_eq!(calls.len(), 2);
        assert_eq!(call_parts(&calls[0]), ("weather", json!({"city": "Oslo"})));
        // The model's own text of the arguments.
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Oslo\"}");
        assert_eq!(call_parts(&calls[1]), ("time", json!({})));
        assert!(
            calls[0]["id"]
                .as_str()
                .unwrap()
                .starts_with("chatcmpl-tool-")
        );
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        let (content, calls) =
            extract(&auto(), "<tool_call>{\"name\": \"t\"}</tool_call>").unwrap();
        assert_eq!(content, None);
        assert_eq!(call_parts(&calls[0]), ("t", json!({})));
        // No call, or one that is not whole JSON: the text stays content.
        for text in [
            "just text",
            "<tool_call>{\"name\": </tool_call>",
            "<tool_call>{\"name\": \"t\", \"arguments\": {\"a\": }}</tool_call>",
            "<tool_call>{\"name\": \"t\", \"arguments\": {\"a\": 1}",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>[1]</tool_call>",
            "<tool_call>{\"name\": \"t\", \"arguments\": {}, \"x\": tru}</tool_call>",
        ] {
            assert!(extract(&auto(), text).is_none(), "{text}");
        }
    }

    /// Each whole call's (name, arguments text).
    fn names_and_arguments(calls: &[Value]) -> Vec<(String, String)> {
        calls
            .iter()
            .map(|c| {
                let f = &c["function"];
                (
                    f["name"].as_str().unwrap().into(),
                    f["arguments"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    /// `text` streamed `step` bytes at a time (on char boundaries), the
    /// deltas folded as a client does: (name, arguments) per index.
    fn stream(tools: &ToolUse, text: &str, step: usize) -> Vec<(String, String)> {
        let mut s = CallStream::default();
        let mut folded: Vec<(String, String)> = Vec::new();
        let mut end = 0;
        while end < text.len() {
            end = (end + step).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            for d in s.advance(tools, &text[..end]) {
                let i = d["index"].as_u64().unwrap() as usize;
                if i == folded.len() {
                    assert!(d["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
                    assert_eq!(d["type"], "function");
                    folded.push((
                        d["function"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                } else {
                    assert!(d.get("id").is_none(), "{d}");
                }
                folded[i].1 += d["function"]["arguments"].as_str().unwrap();
            }
        }
        folded
    }

    #[test]
    fn streamed_calls_open_by_name_and_join_to_the_whole_calls() {
        let text = "Sure.<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \
                    \"Tromsø \\\"N\\\"\", \"days\": [1, 2], \"x\": -1.5e3}}\n</tool_call>\n\
                    <tool_call>{\"arguments\": {\"tz\": null}, \"name\": \"time\"}</tool_call>\
                    <tool_call>{\"name\": \"noargs\"}</tool_call>";
        let whole = names_and_arguments(&extract(&auto(), text).unwrap().1);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[2], ("noargs".into(), "{}".into()));
        for step in [1, 2, 3, 7, 1000] {
            assert_eq!(stream(&auto(), text, step), whole, "step {step}");
        }
        // The name opens the call before its arguments are whole (the
        // "time" call above, whose arguments come first, opens with them).
        let mut s = CallStream::default();
        let head = "<tool_call>{\"name\": \"weather\", \"arguments\": {\"ci";
        let d = s.advance(&auto(), head);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0]["function"]["arguments"], "{\"ci");
        let d = s.advance(&auto(), &format!("{head}ty\""));
        assert_eq!(
            d,
            vec![json!({"index": 0, "function": {"arguments": "ty\""}})]
        );
        // parallel_tool_calls: false streams the first call only.
        let one = ToolUse {
            mode: ToolMode::Auto(ToolParser::Hermes),
            parallel: false,
        };
        assert_eq!(stream(&one, text, 1), whole[..1]);
    }

    /// vLLM's llama3_json: the output is calls joined by `; `, each
    /// `{"name", "parameters"}` (or `"arguments"`), maybe after
    /// `<|python_tag|>`; anything else is content.
    #[test]
    fn llama3_json_calls_whole_and_streamed() {
        let llama = ToolUse {
            mode: ToolMode::Auto(ToolParser::Llama3Json),
            parallel: true,
        };
        let text = r#"{"name": "weather", "parameters": {"city": "Oslo"}}; {"name": "time", "arguments": {"tz": "CET"}}"#;
        let (content, calls) = extract(&llama, text).unwrap();
        assert_eq!(content, None);
        assert_eq!(call_parts(&calls[0]), ("weather", json!({"city": "Oslo"})));
        assert_eq!(call_parts(&calls[1]), ("time", json!({"tz": "CET"})));
        let whole = names_and_arguments(&calls);
        for step in [1, 4, 1000] {
            assert_eq!(stream(&llama, text, step), whole, "step {step}");
        }
        let tagged = format!("<|python_tag|>{text};");
        assert_eq!(extract(&llama, &tagged).unwrap().1.len(), 2);
        let both = r#"{"name": "f", "parameters": {"a": 1}, "arguments": {"b": 2}}"#;
        assert_eq!(
            call_parts(&extract(&llama, both).unwrap().1[0]).1,
            json!({"b": 2})
        );
        for not_calls in [
            "The weather is fine.",
            r#" {"name": "f", "parameters": {}}"#,
            r#"{"name": "f", "parameters": {}} and more"#,
            r#"{"name": "f", "parameters": {"#,
        ] {
            assert!(extract(&llama, not_calls).is_none(), "{not_calls}");
        }
    }

    #[test]
    fn a_malformed_call_ends_the_stream_of_calls() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\
                    <tool_call>{\"name\": 5}</tool_call><tool_call>{\"name\": \"c\"}";
        let got = stream(&auto(), text, 1);
        assert_eq!(got, vec![("a".to_string(), "{}".to_string())]);
        let written = calls_so_far(&ToolMode::Auto(ToolParser::Hermes), text).unwrap();
        assert!(written.malformed);
        assert!(extract(&auto(), text).is_none());
        assert!(calls_so_far(&ToolMode::Auto(ToolParser::Hermes), "no calls").is_none());
    }

    #[test]
    fn required_calls_stream_from_the_guided_list() {
        let required = ToolUse {
            mode: ToolMode::Required,
            parallel: true,
        };
        let text = r#"[{"name": "weather", "parameters": {"city": "Oslo"}}, {"name": "time", "parameters": {}}]"#;
        let (content, whole) = extract(&required, text).unwrap();
        assert_eq!(content, None);
        assert_eq!(call_parts(&whole[0]), ("weather", json!({"city": "Oslo"})));
        assert_eq!(call_parts(&whole[1]), ("time", json!({})));
        for step in [1, 5] {
            assert_eq!(
                stream(&required, text, step),
                vec![
                    ("weather".to_string(), r#"{"city": "Oslo"}"#.to_string()),
                    ("time".to_string(), "{}".to_string())
                ]
            );
        }
        assert!(extract(&required, "[").is_none());
        assert!(extract(&required, "{}").is_none());
    }

    #[test]
    fn modes_from_tool_choice() {
        let tools = json!([
            {"type": "function", "function": {"name": "weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "time"}}
        ]);
        let t = Some(&tools);
        assert_eq!(tool_mode(None, None, None).unwrap().0, ToolMode::Text);
        assert_eq!(
            tool_mode(t, Some(&json!("none")), None).unwrap().0,
            ToolMode::Text
        );
        assert_eq!(
            tool_mode(t, None, Some(ToolParser::Llama3Json)).unwrap().0,
            ToolMode::Auto(ToolParser::Llama3Json)
        );
        let e = tool_mode(t, None, None).unwrap_err().to_string();
        assert!(e.contains("--enable-auto-tool-choice"), "{e}");
        let named = json!({"type": "function", "function": {"name": "weather"}});
        let (mode, schema) = tool_mode(t, Some(&named), None).unwrap();
        assert_eq!(mode, ToolMode::Named("weather".into()));
        assert_eq!(schema.unwrap()["properties"]["city"]["type"], "string");
        let missing = json!({"type": "function", "function": {"name": "nope"}});
        assert!(tool_mode(t, Some(&missing), None).is_err());
        assert!(tool_mode(None, Some(&json!("required")), None).is_err());
        let (mode, schema) = tool_mode(t, Some(&json!("required")), None).unwrap();
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
        let hermes = ToolParser::Hermes;
        assert_eq!(hermes.streamable_prefix("hello", true), 5);
        assert_eq!(hermes.streamable_prefix("hello <tool", true), 6);
        assert_eq!(hermes.streamable_prefix("hello <tool_call>{", false), 6);
        assert_eq!(hermes.streamable_prefix("a < b", true), 5);
        // Llama 3: a call opens the answer or never comes.
        let llama = ToolParser::Llama3Json;
        for held in ["", "{\"na", "<|pyth", "<|python_tag|>{"] {
            assert_eq!(llama.streamable_prefix(held, true), 0, "{held}");
        }
        assert_eq!(llama.streamable_prefix("Sure {", true), 6);
        assert_eq!(llama.streamable_prefix("{", false), 1);
        assert!(llama.starts_call("<|python_tag|>") && !llama.starts_call(" {"));
    }
}
