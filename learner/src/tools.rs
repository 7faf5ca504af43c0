//! Tools the policy calls during a rollout (TRL's `tools` with
//! `max_tool_calling_iterations`): each `rollout.tools` entry is an HTTP
//! endpoint. After a completion stops, the calls it wrote (read by vLLM's
//! tool-call parser, [`model::tool_calls`]) are POSTed to their tools; the
//! results become tool messages, the chat template renders them as the next
//! turns, and the completion goes on from there. Those rendered turns are
//! part of the completion's tokens (the model reads them) but not of its
//! loss: they carry no log-probs of the policy (TRL's `tool_mask`).

use std::time::Duration;

use model::tokenizer::Tokenizer;
use model::tool_calls::ToolParser;
use serde_json::{Map, Value, json};

use crate::recipe::{Recipe, Tool};

/// Stands for an assistant turn's content when the template's end of turn
/// is found.
const PROBE: &str = "TANDEM-TOOL-TURN-PROBE";

/// TRL's `tools/*` metrics of `completions` that made `calls` tool calls,
/// `failed` of which failed: calls per completion, and the share failed.
pub fn call_metrics(completions: usize, calls: usize, failed: usize) -> Value {
    json!({
        "call_frequency": calls as f64 / completions.max(1) as f64,
        "failure_frequency": if calls > 0 { failed as f64 / calls as f64 } else { 0.0 },
    })
}

/// The recipe's tools, how calls are read, and how they run.
#[derive(Debug, Clone)]
pub struct ToolRunner {
    tools: Vec<Tool>,
    /// The definitions the chat template shows (`tools=`).
    definitions: Value,
    parser: ToolParser,
    /// Tool rounds per completion at most; none: no limit but the length.
    pub max_iterations: Option<usize>,
    chat_template_kwargs: Map<String, Value>,
    http: reqwest::Client,
}

/// The outcome of one call: the result text, or why it failed (sent to the
/// model as `{"error": ...}`, as TRL does).
pub type CallResult = Result<String, String>;

impl ToolRunner {
    /// None when the recipe lists no tools.
    pub fn from_recipe(recipe: &Recipe) -> anyhow::Result<Option<ToolRunner>> {
        let r = &recipe.rollout;
        if r.tools.is_empty() {
            return Ok(None);
        }
        let parser = ToolParser::from_name(&r.tool_call_parser).ok_or_else(|| {
            anyhow::anyhow!(
                "rollout.tool_call_parser: unknown parser {:?}",
                r.tool_call_parser
            )
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(r.tool_timeout_s))
            .build()?;
        Ok(Some(ToolRunner {
            definitions: r.tool_definitions().unwrap_or_default(),
            tools: r.tools.clone(),
            parser,
            max_iterations: r.max_tool_calling_iterations,
            chat_template_kwargs: recipe.data.chat_template_kwargs.clone(),
            http,
        }))
    }

    /// The definitions the chat template lists in the prompt.
    pub fn definitions(&self) -> &Value {
        &self.definitions
    }

    /// The calls an assistant turn wrote, as (name, arguments text); none
    /// when it wrote none (or calls that are not whole JSON: they stay text,
    /// as vLLM's parsers leave them).
    pub fn calls(&self, turn: &str) -> Vec<(String, String)> {
        self.parser
            .whole_calls(turn)
            .map(|(_, calls)| {
                calls
                    .into_iter()
                    .map(|(name, args)| (name, args.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs one call: `POST url` with the arguments object as the body.
    pub async fn call(&self, name: &str, arguments: &str) -> CallResult {
        let Some(tool) = self.tools.iter().find(|t| t.name == name) else {
            let names: Vec<&str> = self.tools.iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "unknown tool {name:?}; the tools are {}",
                names.join(", ")
            ));
        };
        let args: Value = serde_json::from_str(arguments)
            .map_err(|e| format!("the arguments are not JSON: {e}"))?;
        if !args.is_object() {
            return Err("the arguments must be a JSON object".into());
        }
        let resp = self
            .http
            .post(&tool.url)
            .json(&args)
            .send()
            .await
            .map_err(|e| format!("tool {name} did not answer: {e}"))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("tool {name}'s answer broke off: {e}"))?;
        if !status.is_success() {
            // An error page can be long; the model reads the start.
            let body: String = body.chars().take(300).collect();
            return Err(format!("tool {name} failed ({status}): {body}"));
        }
        // A JSON string is the text it holds; anything else is read as is.
        Ok(match serde_json::from_str::<Value>(&body) {
            Ok(Value::String(s)) => s,
            _ => body,
        })
    }

    /// The tool messages of a round's results, in call order.
    pub fn tool_messages(results: &[(String, CallResult)]) -> Vec<Value> {
        results
            .iter()
            .map(|(name, result)| {
                let content = match result {
                    Ok(text) => text.clone(),
                    Err(e) => json!({ "error": e }).to_string(),
                };
                json!({"role": "tool", "name": name, "content": content})
            })
            .collect()
    }

    /// The text that follows an assistant turn whose calls were answered:
    /// the end of that turn as the template writes it (less what the model
    /// wrote itself: `last_token`, its end-of-turn token, when it wrote
    /// one), the tool messages, and the next assistant turn's opening.
    /// `conversation` ends with the assistant turn. Rendered by the chat
    /// template, as the model will read the conversation at inference.
    pub fn tool_turns(
        &self,
        tokenizer: &Tokenizer,
        conversation: &[Value],
        tool_messages: &[Value],
        last_token: Option<&str>,
    ) -> anyhow::Result<String> {
        let render = |messages: &[Value], generation_prompt: bool| {
            tokenizer.apply_chat_template_json(
                &Value::Array(messages.to_vec()),
                generation_prompt,
                Some(&self.definitions),
                Some(&self.chat_template_kwargs),
            )
        };
        let before = render(conversation, false)?;
        let mut all = conversation.to_vec();
        all.extend_from_slice(tool_messages);
        let after = render(&all, true)?;
        let Some(tool_part) = after.strip_prefix(&before) else {
            anyhow::bail!(
                "the chat template renders the conversation differently once tool messages \
                 follow, so the tool turns cannot be appended to the completion's tokens; \
                 rollout.tools needs a template that renders earlier turns alike \
                 (data.chat_template)"
            );
        };
        // The template's end of an assistant turn (`<|im_end|>\n`).
        let probe = render(
            &[
                json!({"role": "user", "content": "?"}),
                json!({"role": "assistant", "content": PROBE}),
            ],
            false,
        )?;
        let turn_end = probe
            .rfind(PROBE)
            .map_or("", |at| &probe[at + PROBE.len()..]);
        let owed = match last_token {
            Some(t) if !t.is_empty() && turn_end.starts_with(t) => &turn_end[t.len()..],
            _ => turn_end,
        };
        Ok(format!("{owed}{tool_part}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(tools: Vec<Tool>) -> ToolRunner {
        let mut recipe = Recipe::default();
        recipe.rollout.tools = tools;
        ToolRunner::from_recipe(&recipe).unwrap().unwrap()
    }

    fn add_tool(url: &str) -> Tool {
        Tool {
            name: "add".into(),
            description: "Adds two numbers.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            }),
            url: url.into(),
        }
    }

    /// Qwen2.5's template, as transformers renders it: the tool turn is a
    /// user turn of `<tool_response>` blocks, and the newline after the
    /// model's own `<|im_end|>` is the template's.
    #[test]
    fn tool_turns_follow_the_qwen25_template() {
        let template =
            include_str!("../../model/tests/fixtures/tokenizer/qwen2.5_chat_template.jinja");
        let tok = model::presets::tokenizer()
            .unwrap()
            .with_chat_template(template)
            .unwrap();
        let r = runner(vec![add_tool("http://127.0.0.1:1/add")]);
        let turn =
            "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
        assert_eq!(
            r.calls(turn),
            vec![("add".to_string(), "{\"a\": 1, \"b\": 2}".to_string())]
        );
        let conversation = [
            json!({"role": "user", "content": "1+2?"}),
            json!({"role": "assistant", "content": turn}),
        ];
        let results = ToolRunner::tool_messages(&[("add".to_string(), Ok("3".to_string()))]);
        let text = r
            .tool_turns(&tok, &conversation, &results, Some("<|im_end|>"))
            .unwrap();
        assert_eq!(
            text,
            "\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // A turn cut by a stop string owes the template's whole end of turn;
        // a failed call reads as an error object.
        let failed = ToolRunner::tool_messages(&[("add".to_string(), Err("no".to_string()))]);
        let text = r.tool_turns(&tok, &conversation, &failed, None).unwrap();
        assert!(
            text.starts_with("<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"error\":\"no\"}"),
            "{text}"
        );
        // The prompt lists the tools.
        let prompt = tok
            .apply_chat_template_json(
                &json!([{"role": "user", "content": "1+2?"}]),
                true,
                Some(r.definitions()),
                None,
            )
            .unwrap();
        assert!(prompt.contains("\"name\": \"add\""), "{prompt}");
        assert!(prompt.contains("<tools>"), "{prompt}");
    }

    #[test]
    fn calls_that_are_not_whole_are_text() {
        let r = runner(vec![add_tool("http://127.0.0.1:1/add")]);
        assert!(r.calls("no calls here").is_empty());
        assert!(
            r.calls("<tool_call>{\"name\": \"add\", \"arguments\": {")
                .is_empty()
        );
        assert_eq!(
            r.calls("<tool_call>{\"name\": \"add\"}</tool_call>"),
            vec![("add".to_string(), "{}".to_string())]
        );
    }

    /// Calls go to a real HTTP server on loopback; what cannot run comes
    /// back as an error for the model, never as a failed rollout.
    #[test]
    fn calls_run_over_http_and_failures_are_results() {
        use axum::{Json, Router, http::StatusCode, routing::post};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let app = Router::new()
                .route(
                    "/add",
                    post(|Json(v): Json<Value>| async move {
                        let sum = v["a"].as_f64().unwrap_or(0.0) + v["b"].as_f64().unwrap_or(0.0);
                        Json(json!(sum.to_string()))
                    }),
                )
                .route(
                    "/broken",
                    post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
                );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            let mut broken = add_tool(&format!("http://{addr}/broken"));
            broken.name = "broken".into();
            let r = runner(vec![add_tool(&format!("http://{addr}/add")), broken]);
            assert_eq!(r.call("add", "{\"a\": 1, \"b\": 2}").await, Ok("3".into()));
            let err = r.call("broken", "{}").await.unwrap_err();
            assert!(err.contains("500") && err.contains("boom"), "{err}");
            let err = r.call("mul", "{}").await.unwrap_err();
            assert!(
                err.contains("unknown tool \"mul\"") && err.contains("add, broken"),
                "{err}"
            );
            let err = r.call("add", "[1]").await.unwrap_err();
            assert!(err.contains("JSON object"), "{err}");
            let err = r.call("add", "{\"a\": ").await.unwrap_err();
            assert!(err.contains("not JSON"), "{err}");
        });
    }
}
