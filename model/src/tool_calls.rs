//! Tool calls in a model's output, as vLLM's tool-call parsers read them:
//! `hermes` finds `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks after the content (Qwen2.5, Qwen3, Hermes), `llama3_json` an
//! output that is `{"name": ..., "parameters": {...}}` objects joined by
//! `; ` (Llama 3.1 and 3.2, maybe after `<|python_tag|>`). The rollout
//! server turns them into `tool_calls` (whole or streamed); the learner
//! runs them in multi-turn rollouts. Read without a JSON parser of the
//! whole, so that a stream can send each call's name and arguments as they
//! come; a closed call is checked as whole JSON.

/// The parsers there are (vLLM's `--tool-call-parser` names).
pub const PARSERS: &[&str] = &["hermes", "llama3_json"];

const CALL_START: &str = "<tool_call>";
/// What Llama 3 may write before its calls.
const PYTHON_TAG: &str = "<|python_tag|>";

/// How the model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    /// `<tool_call>{...}</tool_call>` blocks after the content.
    Hermes,
    /// The whole output is calls: `{...}; {...}`, maybe after `<|python_tag|>`.
    Llama3Json,
}

impl ToolParser {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(ToolParser::Hermes),
            "llama3_json" => Some(ToolParser::Llama3Json),
            _ => None,
        }
    }

    /// How much of `held` (text not streamed yet) can be streamed as
    /// content now; `at_start`: nothing of the answer has gone out yet.
    /// Hermes: all but a tail that might start `<tool_call>`. Llama 3:
    /// nothing while the answer might open with a call, then all.
    pub fn streamable_prefix(self, held: &str, at_start: bool) -> usize {
        match self {
            ToolParser::Hermes => {
                if let Some(i) = held.find(CALL_START) {
                    return i;
                }
                (1..CALL_START.len())
                    .rev()
                    .find(|&k| held.ends_with(&CALL_START[..k]))
                    .map_or(held.len(), |k| held.len() - k)
            }
            ToolParser::Llama3Json => {
                let may_open = self.starts_call(held) || PYTHON_TAG.starts_with(held);
                if at_start && may_open { 0 } else { held.len() }
            }
        }
    }

    /// Whether `held` (the text from the first not streamed) opens a call.
    pub fn starts_call(self, held: &str) -> bool {
        match self {
            ToolParser::Hermes => held.starts_with(CALL_START),
            ToolParser::Llama3Json => held.starts_with('{') || held.starts_with(PYTHON_TAG),
        }
    }

    /// The calls in `text` so far: none before the first (or when the text
    /// is not calls).
    pub fn calls_so_far(self, text: &str) -> Option<WrittenCalls<'_>> {
        let mut written = WrittenCalls {
            start: 0,
            calls: Vec::new(),
            malformed: false,
        };
        match self {
            ToolParser::Llama3Json => {
                // vLLM's: the output opens with a call, or is no calls.
                let mut rest = match text.strip_prefix(PYTHON_TAG) {
                    Some(after) => after,
                    None if text.starts_with('{') => text,
                    None => return None,
                };
                loop {
                    let Some((call, end)) = scan_call(rest, &["arguments", "parameters"]) else {
                        written.malformed = true;
                        break;
                    };
                    written.calls.push(call);
                    let Some(end) = end else { break };
                    // `; ` between calls; blanks (or a last `;`) may end them.
                    let after = rest[end..].trim_start();
                    match after.strip_prefix(';') {
                        Some(next) if !next.trim().is_empty() => rest = next,
                        Some(_) => break,
                        None if after.is_empty() => break,
                        None => {
                            written.malformed = true;
                            break;
                        }
                    }
                }
            }
            ToolParser::Hermes => {
                written.start = text.find(CALL_START)?;
                let mut rest = &text[written.start..];
                while let Some(s) = rest.find(CALL_START) {
                    let body = &rest[s + CALL_START.len()..];
                    let Some((call, end)) = scan_call(body, &["arguments"]) else {
                        written.malformed = true;
                        break;
                    };
                    written.calls.push(call);
                    // The rest of this call's block (`</tool_call>`) is skipped.
                    let Some(end) = end else { break };
                    rest = &body[end..];
                }
            }
        }
        Some(written)
    }

    /// The calls of a finished output: the content before them and each
    /// call's name and arguments; see [`WrittenCalls::whole`].
    pub fn whole_calls(self, text: &str) -> Option<(&str, Vec<(String, &str)>)> {
        self.calls_so_far(text)?.whole(text)
    }
}

/// One call's JSON object (`{"name": ..., "arguments": {...}}`) as far as
/// the model has written it.
#[derive(Debug, Default, PartialEq)]
pub struct PartialCall<'a> {
    /// Once its string is whole.
    pub name: Option<String>,
    /// The raw text of the arguments value so far.
    pub arguments: Option<&'a str>,
    /// The object's closing brace has come.
    pub closed: bool,
    /// The object's text so far, from its opening brace.
    pub text: &'a str,
    /// Which of the parser's argument keys `arguments` came from (Llama 3
    /// writes `parameters` or `arguments`; the latter wins, as in vLLM).
    arguments_rank: Option<usize>,
}

/// The calls an output has written so far.
#[derive(Debug, PartialEq)]
pub struct WrittenCalls<'a> {
    /// Where the calls begin (the content is the text before).
    pub start: usize,
    pub calls: Vec<PartialCall<'a>>,
    /// The text stopped being calls (not JSON of a call): the calls before
    /// are kept, nothing after.
    pub malformed: bool,
}

impl<'a> WrittenCalls<'a> {
    /// The calls of a finished output `text`: the content before them and
    /// each call's name and arguments (the model's JSON text, `{}` when it
    /// gave none). None when it wrote no calls, or calls that are not all
    /// whole JSON objects with a name (vLLM's parsers then return the text
    /// as content).
    pub fn whole(self, text: &'a str) -> Option<(&'a str, Vec<(String, &'a str)>)> {
        if self.malformed || self.calls.is_empty() {
            return None;
        }
        let calls = self
            .calls
            .into_iter()
            .map(|c| {
                let whole = c.closed && serde_json::from_str::<serde_json::Value>(c.text).is_ok();
                Some((c.name.filter(|_| whole)?, c.arguments.unwrap_or("{}")))
            })
            .collect::<Option<Vec<_>>>()?;
        Some((&text[..self.start], calls))
    }
}

/// How far a JSON value reaches: to `Done(end)`, to the end of the text
/// (`Partial`), or not a value at all (`Bad`).
enum Scan {
    Done(usize),
    Partial,
    Bad,
}

pub fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// `b[i]` is a string's opening quote.
fn scan_string(b: &[u8], i: usize) -> Scan {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Scan::Done(j + 1),
            _ => j += 1,
        }
    }
    Scan::Partial
}

/// The extent of the value at `b[i]`. Containers are matched by depth
/// only; a whole value is checked by a JSON parser where it matters.
fn scan_value(b: &[u8], i: usize) -> Scan {
    match b.get(i) {
        None => Scan::Partial,
        Some(b'"') => scan_string(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => match scan_string(b, j) {
                        Scan::Done(end) => {
                            j = end;
                            continue;
                        }
                        other => return other,
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Scan::Done(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Scan::Partial
        }
        Some(c) if c.is_ascii_alphanumeric() || *c == b'-' => {
            // A number or literal ends where a delimiter comes; at the end
            // of the text it may go on.
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']') && !b[j].is_ascii_whitespace()
            {
                j += 1;
            }
            if j == b.len() {
                Scan::Partial
            } else {
                Scan::Done(j)
            }
        }
        Some(_) => Scan::Bad,
    }
}

/// The call object at the start of `text` (after blanks) so far, and its
/// end once closed; None when the text is not a call object. Its arguments
/// are under the first of `arguments_keys` it has.
pub fn scan_call<'a>(
    text: &'a str,
    arguments_keys: &[&str],
) -> Option<(PartialCall<'a>, Option<usize>)> {
    let b = text.as_bytes();
    let mut call = PartialCall::default();
    let mut i = skip_ws(b, 0);
    let open = i;
    call.text = &text[open..];
    match b.get(i) {
        None => return Some((call, None)),
        Some(b'{') => i += 1,
        Some(_) => return None,
    }
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            None => return Some((call, None)),
            Some(b'}') => {
                call.closed = true;
                call.text = &text[open..i + 1];
                return Some((call, Some(i + 1)));
            }
            Some(b'"') => {}
            Some(_) => return None,
        }
        let key_end = match scan_string(b, i) {
            Scan::Done(e) => e,
            _ => return Some((call, None)),
        };
        let key: String = serde_json::from_str(&text[i..key_end]).ok()?;
        i = skip_ws(b, key_end);
        match b.get(i) {
            None => return Some((call, None)),
            Some(b':') => i = skip_ws(b, i + 1),
            Some(_) => return None,
        }
        let value_end = match scan_value(b, i) {
            Scan::Done(e) => Some(e),
            Scan::Partial => None,
            Scan::Bad => return None,
        };
        if key == "name" {
            if let Some(e) = value_end {
                call.name = Some(serde_json::from_str(&text[i..e]).ok()?);
            }
        } else if let Some(rank) = arguments_keys.iter().position(|k| *k == key)
            && i < b.len()
            && call.arguments_rank.is_none_or(|r| rank <= r)
        {
            call.arguments = Some(&text[i..value_end.unwrap_or(b.len())]);
            call.arguments_rank = Some(rank);
        }
        let Some(e) = value_end else {
            return Some((call, None));
        };
        i = skip_ws(b, e);
        match b.get(i) {
            None => return Some((call, None)),
            Some(b',') => i += 1,
            Some(b'}') => {
                call.closed = true;
                call.text = &text[open..i + 1];
                return Some((call, Some(i + 1)));
            }
            Some(_) => return None,
        }
    }
}
