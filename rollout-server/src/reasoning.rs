//! vLLM's `--reasoning-parser`: a reasoning model's thinking
//! (`<think>...</think>`) comes back apart from its answer, as the chat
//! message's `reasoning_content` beside `content`, whole or streamed.
//! `deepseek_r1`: the output starts inside the thinking (R1's chat template
//! opens `<think>` in the prompt; a `<think>` written anyway is dropped),
//! which ends at `</think>`. `qwen3`: the thinking is there only when the
//! output starts with `<think>` (Qwen3 with `enable_thinking: false` writes
//! none). A thinking block never closed is all reasoning, streamed or not.

const START: &str = "<think>";
/// Where the thinking ends (and a guided answer begins).
pub const END: &str = "</think>";

/// Whether `prompt` ends past a closed thinking block (its last `</think>`
/// after its last `<think>`): the answer starts at the output's first token.
pub fn thinking_closed(prompt: &str) -> bool {
    match (prompt.rfind(START), prompt.rfind(END)) {
        (Some(open), Some(close)) => close > open,
        (None, Some(_)) => true,
        _ => false,
    }
}

/// The parsers this server has.
pub const PARSERS: &[&str] = &["deepseek_r1", "qwen3"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    DeepSeekR1,
    Qwen3,
}

impl ReasoningParser {
    /// `--reasoning-parser NAME`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "deepseek_r1" => Some(ReasoningParser::DeepSeekR1),
            "qwen3" => Some(ReasoningParser::Qwen3),
            _ => None,
        }
    }

    /// A whole output as (reasoning, content); an empty part is none.
    pub fn split(self, text: &str) -> (Option<String>, Option<String>) {
        let mut s = ReasoningStream::default();
        let (mut reasoning, mut content) = s.push(self, text);
        let (r, c) = s.finish(self);
        reasoning.push_str(&r);
        content.push_str(&c);
        let some = |t: String| (!t.is_empty()).then_some(t);
        (some(reasoning), some(content))
    }
}

/// Where a streamed output is: before its first characters are known,
/// thinking, or answering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Start,
    Thinking,
    Answering,
}

/// One streamed choice's split so far.
#[derive(Debug, Clone, Default)]
pub struct ReasoningStream {
    phase: Phase,
    /// Text not placed yet: a possible `<think>` at the start or a
    /// possible `</think>` at the end.
    held: String,
}

/// The length of the longest end of `text` that starts `tag` (a tag that
/// may be cut between two pieces).
fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&k| text.ends_with(&tag[..k]))
        .unwrap_or(0)
}

impl ReasoningStream {
    /// The next piece of output as (reasoning, content) to send now.
    pub fn push(&mut self, parser: ReasoningParser, piece: &str) -> (String, String) {
        self.held.push_str(piece);
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            match self.phase {
                Phase::Start => {
                    if self.held.len() < START.len() && START.starts_with(self.held.as_str()) {
                        return (reasoning, content);
                    }
                    if let Some(rest) = self.held.strip_prefix(START) {
                        self.held = rest.to_string();
                        self.phase = Phase::Thinking;
                    } else {
                        self.phase = match parser {
                            ReasoningParser::DeepSeekR1 => Phase::Thinking,
                            ReasoningParser::Qwen3 => Phase::Answering,
                        };
                    }
                }
                Phase::Thinking => {
                    if let Some(i) = self.held.find(END) {
                        reasoning.push_str(&self.held[..i]);
                        self.held = self.held[i + END.len()..].to_string();
                        self.phase = Phase::Answering;
                    } else {
                        let keep = partial_tag(&self.held, END);
                        let cut = self.held.len() - keep;
                        reasoning.push_str(&self.held[..cut]);
                        self.held = self.held[cut..].to_string();
                        return (reasoning, content);
                    }
                }
                Phase::Answering => {
                    content.push_str(&self.held);
                    self.held.clear();
                    return (reasoning, content);
                }
            }
        }
    }

    /// What is still held when the output ends.
    pub fn finish(&mut self, parser: ReasoningParser) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        match (self.phase, parser) {
            (Phase::Thinking, _) | (Phase::Start, ReasoningParser::DeepSeekR1) => {
                (held, String::new())
            }
            _ => (String::new(), held),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(parser: ReasoningParser, text: &str, size: usize) -> (String, String) {
        let mut s = ReasoningStream::default();
        let (mut r, mut c) = (String::new(), String::new());
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(size) {
            let (a, b) = s.push(parser, &piece.iter().collect::<String>());
            r.push_str(&a);
            c.push_str(&b);
        }
        let (a, b) = s.finish(parser);
        (r + &a, c + &b)
    }

    #[test]
    fn whole_and_streamed_in_any_pieces_agree() {
        use ReasoningParser::*;
        let cases = [
            (
                DeepSeekR1,
                "2+2 is 4.\n</think>\n\nThe answer is 4.",
                "2+2 is 4.\n",
                "\n\nThe answer is 4.",
            ),
            (DeepSeekR1, "<think>hmm</think>4", "hmm", "4"),
            (DeepSeekR1, "still thinking", "still thinking", ""),
            (Qwen3, "<think>\nhmm\n</think>\n\n4", "\nhmm\n", "\n\n4"),
            (Qwen3, "4, no thinking", "", "4, no thinking"),
            (Qwen3, "<thi", "", "<thi"),
            (Qwen3, "<think>cut off", "cut off", ""),
            (DeepSeekR1, "a </thin", "a </thin", ""),
        ];
        for (parser, text, reasoning, content) in cases {
            let some = |t: &str| (!t.is_empty()).then(|| t.to_string());
            assert_eq!(
                parser.split(text),
                (some(reasoning), some(content)),
                "{text:?}"
            );
            for size in [1, 2, 3, 7] {
                let (r, c) = pieces(parser, text, size);
                assert_eq!(
                    (r.as_str(), c.as_str()),
                    (reasoning, content),
                    "{text:?} by {size}"
                );
            }
        }
        assert_eq!(ReasoningParser::from_name("qwen3"), Some(Qwen3));
        assert!(thinking_closed(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!thinking_closed("<｜Assistant｜><think>\n"));
        assert!(!thinking_closed("<|im_start|>assistant\n"));
        assert!(!thinking_closed("<think>a</think> then <think>"));
        assert_eq!(ReasoningParser::from_name("granite"), None);
    }
}
