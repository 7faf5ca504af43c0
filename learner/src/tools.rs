//! Tools the policy calls during a rollout (TRL's `tools` with
//! `max_tool_calling_iterations`): each `rollout.tools` entry is an HTTP
//! endpoint or a Python function. After a completion stops, the calls it
//! wrote (read by vLLM's tool-call parser, [`model::tool_calls`]) run: POSTed
//! to their endpoints, or called in a Python process the learner keeps; the
//! results become tool messages, the chat template renders them as the next
//! turns, and the completion goes on from there. Those rendered turns are
//! part of the completion's tokens (the model reads them) but not of its
//! loss: they carry no log-probs of the policy (TRL's `tool_mask`).

use std::sync::Arc;
use std::time::Duration;

use model::tokenizer::Tokenizer;
use model::tool_calls::ToolParser;
use serde_json::{Map, Value, json};

use crate::data::PromptTools;
use crate::python::{EnvironmentLease, PythonCall, PythonProcesses};
use crate::recipe::{EnvironmentFactory, Recipe};
use crate::rewards::RewardRegistry;

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

/// Where a tool runs.
#[derive(Debug, Clone)]
enum Runs {
    /// `POST url` with the arguments object as the body.
    Http(String),
    /// The function of this spec, in the [`PythonProcesses`]; whether it
    /// is `async def` (its calls run at once).
    Python(String, bool),
}

/// One class of `rollout.environment_factory`.
#[derive(Debug, Clone)]
struct EnvironmentClass {
    /// Its name in the recipe's map; none for the one of every row.
    name: Option<String>,
    spec: String,
    /// Its methods: the tools of its completions, beside the recipe's.
    methods: Vec<String>,
    /// Those that are `async def` (their calls run at once).
    async_methods: Vec<String>,
    /// What its completions' prompts list: the recipe's tools, then its
    /// methods, as TRL lists them.
    definitions: Value,
    /// The class's name, where it has TRL's `get_reward()`.
    reward: Option<String>,
}

/// The recipe's tools, how calls are read, and how they run. Clones share
/// the Python process.
#[derive(Debug, Clone)]
pub struct ToolRunner {
    /// Each `rollout.tools` tool's name and where it runs, in order.
    tools: Vec<(String, Runs)>,
    /// The definitions the chat template shows (`tools=`) where every row
    /// has the same (an environment's methods after the tools').
    definitions: Value,
    parser: ToolParser,
    /// Tool rounds per completion at most; none: no limit but the length.
    pub max_iterations: Option<usize>,
    chat_template_kwargs: Map<String, Value>,
    http: reqwest::Client,
    /// A call's deadline (`rollout.tool_timeout_s`).
    timeout: Duration,
    /// Each `python` tool's recipe key, spec, definition and the SHA-256 of
    /// its source file: what a checkpoint records of them.
    python_functions: Vec<Value>,
    python: Option<Arc<PythonProcesses>>,
    /// `rollout.environment_factory`'s classes, served by `python`.
    environments: Vec<EnvironmentClass>,
    /// Whether rows choose their environment (`rollout.environment_factory`
    /// a map).
    named_environments: bool,
}

/// The outcome of one call: the result text, or why it failed (sent to the
/// model as `{"error": ...}`, as TRL does).
pub type CallResult = Result<String, String>;

impl ToolRunner {
    /// None when the recipe lists no tools and no environment. Reads the
    /// `python` tools' and the environment's definitions from their
    /// functions (short `python3` runs).
    pub fn from_recipe(recipe: &Recipe) -> anyhow::Result<Option<ToolRunner>> {
        let r = &recipe.rollout;
        if r.tools.is_empty() && r.environment_factory.is_none() {
            return Ok(None);
        }
        let parser = ToolParser::from_name(&r.tool_call_parser).ok_or_else(|| {
            anyhow::anyhow!(
                "rollout.tool_call_parser: unknown parser {:?}",
                r.tool_call_parser
            )
        })?;
        let timeout = Duration::from_secs_f64(r.tool_timeout_s);
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        let mut specs: Vec<String> = r.tools.iter().filter_map(|t| t.python.clone()).collect();
        let mut described = if specs.is_empty() {
            Vec::new()
        } else {
            crate::python::inspect("describe", &specs)?
        }
        .into_iter();
        let mut tools = Vec::new();
        let mut definitions = Vec::new();
        let mut python_functions = Vec::new();
        for (i, tool) in r.tools.iter().enumerate() {
            let (definition, runs) = match &tool.python {
                Some(spec) => {
                    let d = described.next().unwrap_or(Value::Null);
                    if let Some(e) = d.get("error") {
                        anyhow::bail!(
                            "rollout.tools[{i}].python: {spec}: {}",
                            e.as_str().unwrap_or_default()
                        );
                    }
                    python_functions.push(json!({
                        "key": format!("rollout.tools[{i}].python"),
                        "function": spec,
                        "definition": d["definition"],
                        "source_sha256": d["source_sha256"],
                    }));
                    let async_def = d["async"].as_bool().unwrap_or(false);
                    (
                        d["definition"].clone(),
                        Runs::Python(spec.clone(), async_def),
                    )
                }
                None => (tool.definition(), Runs::Http(tool.url.clone())),
            };
            let Some(name) = definition["function"]["name"].as_str() else {
                anyhow::bail!("rollout.tools[{i}]: a definition without a function name");
            };
            if let Some(j) = tools.iter().position(|(n, _)| n == name) {
                anyhow::bail!(
                    "rollout.tools[{i}]: {name:?} also names rollout.tools[{j}]; a call could \
                     not tell them apart"
                );
            }
            tools.push((name.to_string(), runs));
            definitions.push(definition);
        }
        // Each environment's methods, after the tools, as TRL lists them.
        let factories = r
            .environment_factory
            .as_ref()
            .map(EnvironmentFactory::entries)
            .unwrap_or_default();
        let factory_specs: Vec<String> = factories.iter().map(|(_, s)| s.to_string()).collect();
        let described = if factory_specs.is_empty() {
            Vec::new()
        } else {
            crate::python::inspect("environment", &factory_specs)?
        };
        let mut environments = Vec::new();
        for ((name, spec), d) in factories.into_iter().zip(described) {
            let key = EnvironmentFactory::key(name);
            if let Some(e) = d.get("error") {
                anyhow::bail!("{key}: {spec}: {}", e.as_str().unwrap_or_default());
            }
            let Some(methods) = d["definitions"].as_array() else {
                anyhow::bail!("{key}: {spec}: no definitions came back");
            };
            let mut names = Vec::new();
            for definition in methods {
                let Some(method) = definition["function"]["name"].as_str() else {
                    anyhow::bail!("{key}: {spec}: a method's definition has no name");
                };
                if let Some(j) = tools.iter().position(|(n, _)| n == method) {
                    anyhow::bail!(
                        "{key}: the method {method:?} has the name of rollout.tools[{j}]; a \
                         call could not tell them apart"
                    );
                }
                names.push(method.to_string());
            }
            python_functions.push(json!({
                "key": key,
                "function": spec,
                "definition": d["definitions"],
                "source_sha256": d["source_sha256"],
            }));
            if !specs.iter().any(|s| s == spec) {
                specs.push(spec.to_string());
            }
            environments.push(EnvironmentClass {
                name: name.map(str::to_string),
                spec: spec.to_string(),
                methods: names,
                async_methods: d["async_methods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| Some(m.as_str()?.to_string()))
                    .collect(),
                definitions: Value::Array(definitions.iter().chain(methods).cloned().collect()),
                reward: d["reward"].as_str().map(str::to_string),
            });
        }
        let named_environments =
            matches!(r.environment_factory, Some(EnvironmentFactory::Named(_)));
        let definitions = match environments.as_slice() {
            [one] if !named_environments => one.definitions.clone(),
            _ => Value::Array(definitions),
        };
        Ok(Some(ToolRunner {
            tools,
            definitions,
            parser,
            max_iterations: r.max_tool_calling_iterations,
            chat_template_kwargs: recipe.data.chat_template_kwargs.clone(),
            http,
            timeout,
            python_functions,
            python: (!specs.is_empty())
                .then(|| Arc::new(PythonProcesses::new(specs, r.python_tool_processes))),
            environments,
            named_environments,
        }))
    }

    /// Whether each completion gets an environment
    /// (`rollout.environment_factory`).
    pub fn has_environments(&self) -> bool {
        !self.environments.is_empty()
    }

    /// The class of `row` (its `environment` column names it where the
    /// recipe maps names to classes, as TRL's dict: that column is then not
    /// passed to `reset`), or why it has none.
    fn environment_of(&self, row: &mut Value) -> Result<&EnvironmentClass, String> {
        if !self.named_environments {
            return self
                .environments
                .first()
                .ok_or_else(|| "no rollout.environment_factory".to_string());
        }
        let chosen = row.as_object_mut().and_then(|r| r.remove("environment"));
        let name = chosen.as_ref().and_then(Value::as_str);
        self.environments
            .iter()
            .find(|e| e.name.as_deref() == name && name.is_some())
            .ok_or_else(|| PromptTools::unknown_environment(chosen.as_ref(), &self.names()))
    }

    /// The environments' names in the recipe's map.
    fn names(&self) -> Vec<&str> {
        self.environments
            .iter()
            .filter_map(|e| e.name.as_deref())
            .collect()
    }

    /// Resets one environment per row (`reset(**row)`, TRL's), of the class
    /// the row chooses: each completion's lease, and the observation to
    /// append to its prompt. Each reset has `rollout.tool_timeout_s` (they
    /// run one after the other).
    pub async fn reset_environments(
        &self,
        mut rows: Vec<Value>,
    ) -> Result<Vec<(EnvironmentLease, Option<String>)>, String> {
        let Some(python) = &self.python else {
            return Err("no rollout.environment_factory".into());
        };
        let mut specs = Vec::with_capacity(rows.len());
        for row in &mut rows {
            specs.push(self.environment_of(row)?.spec.clone());
        }
        // One call per class, in the rows' order.
        let mut reset = vec![None; rows.len()];
        for i in 0..rows.len() {
            if reset[i].is_some() {
                continue;
            }
            let same: Vec<usize> = (i..rows.len()).filter(|&j| specs[j] == specs[i]).collect();
            let these: Vec<Value> = same.iter().map(|&j| rows[j].take()).collect();
            let timeout = self.timeout * these.len() as u32;
            let key = format!("rollout.tool_timeout_s for each of {} resets", these.len());
            let answers = python
                .reset_environments(&specs[i], these, timeout, &key)
                .await?;
            for (j, answer) in same.into_iter().zip(answers) {
                reset[j] = Some(answer);
            }
        }
        Ok(reset.into_iter().flatten().collect())
    }

    /// The definitions the chat template lists in the prompts of the
    /// completions in `environment` (the recipe's tools and its class's
    /// methods), or in every prompt where there is none.
    pub fn definitions_for(&self, environment: Option<&EnvironmentLease>) -> &Value {
        self.class_of(environment)
            .map_or(&self.definitions, |e| &e.definitions)
    }

    /// The class of the completion's environment.
    fn class_of(&self, environment: Option<&EnvironmentLease>) -> Option<&EnvironmentClass> {
        let lease = environment?;
        self.environments.iter().find(|e| e.spec == lease.factory())
    }

    /// What the prompts list, for the data: the same definitions for every
    /// row, or each row's environment's.
    pub fn prompt_tools(&self) -> PromptTools {
        if self.named_environments {
            PromptTools::ByEnvironment(
                self.environments
                    .iter()
                    .filter_map(|e| Some((e.name.clone()?, e.definitions.clone())))
                    .collect(),
            )
        } else {
            PromptTools::Same(self.definitions.clone())
        }
    }

    /// The chat-template variables of the recipe
    /// (`data.chat_template_kwargs`).
    pub fn chat_template_kwargs(&self) -> &Map<String, Value> {
        &self.chat_template_kwargs
    }

    /// Joins `rewards` as TRL's trainer joins its tools and reward
    /// functions. The `python` tools and the Python reward functions run in
    /// one process, as TRL runs both in its own: a tool can leave state (a
    /// module's) that a reward function reads; only with one tool process
    /// (`rollout.python_tool_processes: 1`, the default), with more each
    /// keeps its own. An environment class with `get_reward()` adds its
    /// reward (TRL's environment-owned reward); without it, the recipe's
    /// reward functions must not be empty.
    pub fn attach_rewards(&mut self, rewards: &mut RewardRegistry) -> anyhow::Result<()> {
        if let (Some(tools), Some(theirs)) = (&self.python, rewards.python_processes())
            && let Some(shared) = tools.shared_with(&theirs)
        {
            let shared = Arc::new(shared);
            self.python = Some(shared.clone());
            rewards.set_python_processes(shared);
        }
        if let Some(python) = &self.python {
            // One reward per class, however many names it has.
            let mut classes: Vec<&str> = Vec::new();
            for class in self.environments.iter().filter_map(|e| e.reward.as_deref()) {
                if !classes.contains(&class) {
                    classes.push(class);
                    rewards.add_environment_reward(
                        class,
                        python.clone(),
                        self.timeout,
                        "rollout.tool_timeout_s",
                    )?;
                }
            }
        }
        if rewards.is_empty() {
            anyhow::bail!(
                "reward.functions is empty and rollout.environment_factory's class has no \
                 get_reward() method: list a reward function, or give the class a get_reward() \
                 that scores its completion (TRL's environment-owned reward)"
            );
        }
        Ok(())
    }

    /// The definitions the chat template lists in the prompt.
    pub fn definitions(&self) -> &Value {
        &self.definitions
    }

    /// What the `python` tools are (recipe key, spec, definition, source
    /// file's SHA-256), for the checkpoint: the recipe names them by path
    /// only, so a resume compares this to see an edited function.
    pub fn python_functions(&self) -> &[Value] {
        &self.python_functions
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

    /// Whether tool `name` (of the completion's `environment`, for a method)
    /// is an `async def` function: its calls run beside others.
    pub fn is_async(&self, name: &str, environment: Option<&EnvironmentLease>) -> bool {
        match self.tools.iter().find(|(n, _)| n == name) {
            Some((_, Runs::Python(_, async_def))) => *async_def,
            Some(_) => false,
            None => self
                .class_of(environment)
                .is_some_and(|e| e.async_methods.iter().any(|m| m == name)),
        }
    }

    /// Runs the calls of one turn (name, arguments text) for a completion
    /// in `environment`: one after the other, in the order written (a call
    /// may depend on an earlier one's side effects), but the `async def`
    /// ones, which run together once the others are done, as TRL gathers
    /// them. The results are in the order written.
    pub async fn run_turn(
        &self,
        calls: &[(String, String)],
        environment: Option<&EnvironmentLease>,
    ) -> Vec<(String, CallResult)> {
        let mut results: Vec<Option<CallResult>> = vec![None; calls.len()];
        for (i, (name, arguments)) in calls.iter().enumerate() {
            if !self.is_async(name, environment) {
                results[i] = Some(self.call(name, arguments, environment).await);
            }
        }
        let gathered = calls
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_none())
            .map(|(i, (name, arguments))| async move {
                (i, self.call(name, arguments, environment).await)
            });
        for (i, result) in futures::future::join_all(gathered).await {
            results[i] = Some(result);
        }
        calls
            .iter()
            .zip(results)
            .map(|((name, _), result)| {
                (
                    name.clone(),
                    result.unwrap_or_else(|| Err("not run".into())),
                )
            })
            .collect()
    }

    /// Runs one call: `POST url` with the arguments object as the body, or
    /// the Python function (or the method of the completion's
    /// `environment`) with the arguments as keywords.
    pub async fn call(
        &self,
        name: &str,
        arguments: &str,
        environment: Option<&EnvironmentLease>,
    ) -> CallResult {
        let class = self.class_of(environment);
        let runs = self.tools.iter().find(|(n, _)| n == name).map(|(_, r)| r);
        let method =
            environment.filter(|_| class.is_some_and(|c| c.methods.iter().any(|m| m == name)));
        let args = || -> Result<Value, String> {
            let args: Value = serde_json::from_str(arguments)
                .map_err(|e| format!("the arguments are not JSON: {e}"))?;
            if !args.is_object() {
                return Err("the arguments must be a JSON object".into());
            }
            Ok(args)
        };
        match (runs, method) {
            (Some(Runs::Http(url)), _) => self.call_http(name, url, &args()?).await,
            (Some(Runs::Python(spec, async_def)), _) => {
                let call = PythonCall::function(spec, &args()?, true).concurrent(*async_def);
                self.call_python(name, call).await
            }
            (None, Some(environment)) => {
                let call = PythonCall::method(environment, name, &args()?)
                    .concurrent(self.is_async(name, Some(environment)));
                self.call_python(name, call).await
            }
            (None, None) => Err(self.unknown_tool(name, environment.is_some(), class)),
        }
    }

    /// Why a call of `name` has no tool: a method of an environment the
    /// completion does not have, or a name no tool has (the tools listed).
    fn unknown_tool(
        &self,
        name: &str,
        has_environment: bool,
        class: Option<&EnvironmentClass>,
    ) -> String {
        let a_method = self
            .environments
            .iter()
            .any(|e| e.methods.iter().any(|m| m == name));
        if a_method && !has_environment {
            return format!(
                "tool {name} is a method of the environment, and this completion has none"
            );
        }
        let mut names: Vec<&str> = self.tools.iter().map(|(n, _)| n.as_str()).collect();
        names.extend(
            class
                .iter()
                .flat_map(|c| c.methods.iter().map(String::as_str)),
        );
        format!("unknown tool {name:?}; the tools are {}", names.join(", "))
    }

    async fn call_python(&self, name: &str, call: PythonCall) -> CallResult {
        let Some(python) = &self.python else {
            return Err(format!("tool {name} has no Python process"));
        };
        match python
            .call(call, self.timeout, "rollout.tool_timeout_s")
            .await?
        {
            Value::String(result) => Ok(result),
            other => Ok(other.to_string()),
        }
    }

    async fn call_http(&self, name: &str, url: &str, args: &Value) -> CallResult {
        let resp = self
            .http
            .post(url)
            .json(args)
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

    /// A warning when the chat template leaves the tools out of the prompt
    /// (it renders a conversation alike with and without them, as
    /// Tandem's tiny ChatML template does): the model is then never told
    /// what it may call. None when it shows them.
    pub fn unlisted_tools_warning(&self, tokenizer: &Tokenizer) -> anyhow::Result<Option<String>> {
        let conversation = Value::Array(vec![json!({"role": "user", "content": "?"})]);
        let render = |tools: Option<&Value>| {
            tokenizer.apply_chat_template_json(
                &conversation,
                true,
                tools,
                Some(&self.chat_template_kwargs),
            )
        };
        let mut names: Vec<&str> = self.tools.iter().map(|(n, _)| n.as_str()).collect();
        for m in self.environments.iter().flat_map(|e| &e.methods) {
            if !names.contains(&m.as_str()) {
                names.push(m);
            }
        }
        let listed = self
            .environments
            .first()
            .map_or(&self.definitions, |e| &e.definitions);
        Ok((render(Some(listed))? == render(None)?).then(|| {
            format!(
                "the chat template does not render its `tools` variable: the prompts do not \
                 list the tools ({}), so the model is not told it may call them; use a \
                 template that does (data.chat_template), or describe them in \
                 data.system_prompt",
                names.join(", ")
            )
        }))
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
        environment: Option<&EnvironmentLease>,
    ) -> anyhow::Result<String> {
        let definitions = self.definitions_for(environment);
        let render = |messages: &[Value], generation_prompt: bool| {
            tokenizer.apply_chat_template_json(
                &Value::Array(messages.to_vec()),
                generation_prompt,
                Some(definitions),
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
    use crate::recipe::Tool;

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
            python: None,
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
            .tool_turns(&tok, &conversation, &results, Some("<|im_end|>"), None)
            .unwrap();
        assert_eq!(
            text,
            "\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // A turn cut by a stop string owes the template's whole end of turn;
        // a failed call reads as an error object.
        let failed = ToolRunner::tool_messages(&[("add".to_string(), Err("no".to_string()))]);
        let text = r
            .tool_turns(&tok, &conversation, &failed, None, None)
            .unwrap();
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
        assert_eq!(r.unlisted_tools_warning(&tok).unwrap(), None);
        // The tiny models' ChatML template renders no tools: a warning.
        let chatml = model::presets::tokenizer().unwrap();
        let warning = r.unlisted_tools_warning(&chatml).unwrap().unwrap();
        assert!(
            warning.contains("does not render its `tools`") && warning.contains("(add)"),
            "{warning}"
        );
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
            assert_eq!(
                r.call("add", "{\"a\": 1, \"b\": 2}", None).await,
                Ok("3".into())
            );
            let err = r.call("broken", "{}", None).await.unwrap_err();
            assert!(err.contains("500") && err.contains("boom"), "{err}");
            let err = r.call("mul", "{}", None).await.unwrap_err();
            assert!(
                err.contains("unknown tool \"mul\"") && err.contains("add, broken"),
                "{err}"
            );
            let err = r.call("add", "[1]", None).await.unwrap_err();
            assert!(err.contains("JSON object"), "{err}");
            let err = r.call("add", "{\"a\": ", None).await.unwrap_err();
            assert!(err.contains("not JSON"), "{err}");
        });
    }

    /// Tools as TRL users write them: Google-style docstrings, type hints.
    const PYTHON_TOOLS: &str = r#"
import os
from typing import Literal, Optional

print("a print at import goes to the log, not into the answers")

calls = 0


def add(a: int, b: int) -> int:
    """
    Adds two integers.

    Args:
        a: The first number.
        b: The second
            number, on two lines.

    Returns:
        The sum.
    """
    print("this goes to the log, not to the model")
    return a + b


def weather(city: str, unit: str = "celsius", days: Optional[int] = None, mode: Literal["fast", "slow"] = "fast"):
    """Gets the weather of a city.
    Args:
        city: The city's name.
        unit: The unit (choices: ["celsius", "fahrenheit"])
        days: How many days.
        mode: How.
    """
    return {"city": city, "unit": unit}


async def wait(seconds: float):
    """Waits.

    Args:
        seconds: How long.
    """
    import asyncio
    await asyncio.sleep(seconds)
    return "waited"


def pid(seconds: float):
    """The process's id, after a while.

    Args:
        seconds: How long to wait first.
    """
    import time
    time.sleep(seconds)
    return os.getpid()


def count():
    """Counts its calls in this process."""
    global calls
    calls += 1
    return calls


def fail(message: str):
    """Raises.

    Args:
        message: The message.
    """
    raise ValueError(message)


def crash():
    """Ends the process."""
    os._exit(3)


async def stall(seconds: float):
    """Blocks its event loop (a sync sleep in an async function).

    Args:
        seconds: How long.
    """
    import time
    time.sleep(seconds)


meeting = 0


async def meet(n: int) -> int:
    """Waits until n calls of it are in flight at once.

    Args:
        n: How many.
    """
    import asyncio
    global meeting
    meeting += 1
    for _ in range(1000):
        if meeting >= n:
            return n
        await asyncio.sleep(0.01)
    raise TimeoutError(f"only {meeting} calls at once")


def undocumented(x: int):
    return x
"#;

    fn python_runner(dir: &std::path::Path, functions: &[&str], timeout_s: f64) -> ToolRunner {
        python_runner_with(dir, functions, timeout_s, 1)
    }

    fn python_runner_with(
        dir: &std::path::Path,
        functions: &[&str],
        timeout_s: f64,
        processes: usize,
    ) -> ToolRunner {
        let file = dir.join("my_tools.py");
        std::fs::write(&file, PYTHON_TOOLS).unwrap();
        let mut recipe = Recipe::default();
        recipe.rollout.tool_timeout_s = timeout_s;
        recipe.rollout.python_tool_processes = processes;
        recipe.rollout.tools = functions
            .iter()
            .map(|f| Tool {
                python: Some(format!("{}:{f}", file.display())),
                ..Tool::default()
            })
            .collect();
        ToolRunner::from_recipe(&recipe).unwrap().unwrap()
    }

    /// The definitions are those transformers' `get_json_schema` writes
    /// (checked against transformers 5.25 for these functions), which TRL
    /// shows the model.
    #[test]
    fn python_tools_are_defined_by_their_docstrings_and_type_hints() {
        let dir = tempfile::tempdir().unwrap();
        let r = python_runner(dir.path(), &["add", "weather"], 30.0);
        assert_eq!(
            r.definitions()[0],
            json!({"type": "function", "function": {
                "name": "add",
                "description": "Adds two integers.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "a": {"type": "integer", "description": "The first number."},
                        "b": {"type": "integer", "description": "The second number, on two lines."},
                    },
                    "required": ["a", "b"],
                },
                "return": {"type": "integer", "description": "The sum."},
            }})
        );
        assert_eq!(
            r.definitions()[1]["function"]["parameters"],
            json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name."},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The unit"},
                    "days": {"type": "integer", "nullable": true, "description": "How many days."},
                    "mode": {"type": "string", "enum": ["fast", "slow"], "description": "How."},
                },
                "required": ["city"],
            })
        );
    }

    /// A 30 s call of `tool` fails at the runner's 2 s deadline.
    async fn past_the_deadline(r: &ToolRunner, tool: &str) {
        let e = r.call(tool, r#"{"seconds": 30}"#, None).await.unwrap_err();
        assert!(e.contains("rollout.tool_timeout_s (2 s)"), "{tool}: {e}");
    }

    /// Calls run in one Python process the learner keeps (module state
    /// lives on); an exception, a call past the deadline or a process that
    /// dies is an error for the model. An `async def` call past the
    /// deadline is cancelled and the process lives on; after any other (or
    /// one that blocks the event loop) and after a process that dies, the
    /// next call gets a fresh process.
    #[test]
    fn python_tool_calls_run_in_one_process_and_failures_are_results() {
        let dir = tempfile::tempdir().unwrap();
        let r = python_runner(
            dir.path(),
            &[
                "add", "weather", "wait", "count", "fail", "crash", "pid", "stall",
            ],
            2.0,
        );
        let rt = runtime();
        rt.block_on(async {
            // What the function prints stays out of the answer; the result
            // is `str(result)`, as in TRL's tool messages.
            assert_eq!(
                r.call("add", r#"{"a": 1, "b": 2}"#, None).await,
                Ok("3".into())
            );
            assert_eq!(
                r.call("weather", r#"{"city": "Oslo"}"#, None).await,
                Ok("{'city': 'Oslo', 'unit': 'celsius'}".into())
            );
            assert_eq!(
                r.call("wait", r#"{"seconds": 0.01}"#, None).await,
                Ok("waited".into())
            );
            assert_eq!(r.call("count", "{}", None).await, Ok("1".into()));
            assert_eq!(r.call("count", "{}", None).await, Ok("2".into()));
            assert_eq!(
                r.call("fail", r#"{"message": "no"}"#, None).await,
                Err("no".into())
            );
            let e = r.call("add", r#"{"a": 1}"#, None).await.unwrap_err();
            assert!(e.contains("missing 1 required positional argument"), "{e}");
            past_the_deadline(&r, "wait").await;
            // Cancelled: the same process, the count goes on.
            assert_eq!(r.call("count", "{}", None).await, Ok("3".into()));
            past_the_deadline(&r, "pid").await;
            // A fresh process: the count starts again.
            assert_eq!(r.call("count", "{}", None).await, Ok("1".into()));
            past_the_deadline(&r, "stall").await;
            // Its event loop did not answer the cancel: a fresh process.
            assert_eq!(r.call("count", "{}", None).await, Ok("1".into()));
            let e = r.call("crash", "{}", None).await.unwrap_err();
            assert!(e.contains("Python process ended"), "{e}");
            assert_eq!(
                r.call("add", r#"{"a": 2, "b": 2}"#, None).await,
                Ok("4".into())
            );
            // Clones share the process (the third one so far).
            let clone = r.clone();
            assert_eq!(clone.call("count", "{}", None).await, Ok("1".into()));
            assert_eq!(r.call("count", "{}", None).await, Ok("2".into()));
        });
    }

    /// TRL's `environment_factory`, a class with `reset` and its tool
    /// methods, and reward functions that read the instances.
    const ENVIRONMENT: &str = r#"
class Counter:
    """A running total per completion."""

    made = 0

    def __init__(self):
        Counter.made += 1
        self.total = 0

    def reset(self, prompt, answer, **kwargs):
        self.total = 0
        assert prompt[-1]["role"] == "user", prompt
        if answer in ("parts", "image"):
            # TRL's content parts (a VLM's observation).
            second = "text" if answer == "parts" else "image"
            return [{"type": "text", "text": " Reach"}, {"type": second, "text": " 9."}]
        return None if answer == "-" else f" Reach {answer}."

    def add(self, n: int) -> int:
        """Adds to the total.

        Args:
            n: How much to add.
        """
        self.total += n
        return self.total

    def stop(self):
        """Ends the process."""
        import os
        os._exit(3)

    def get_reward(self):
        return None if self.total == 0 else 10.0 * self.total

    def _helper(self):
        pass


def totals(completions, environments, **kwargs):
    return [None if e is None else float(e.total) for e in environments]


def made(completions, **kwargs):
    return [float(Counter.made)] * len(completions)
"#;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// What the reward functions score: a completion in each environment.
    fn scored_in(environments: &[&EnvironmentLease]) -> Vec<crate::rewards::RewardInput> {
        environments
            .iter()
            .map(|lease| {
                let mut x = crate::rewards::RewardInput::new("Count.", "", None);
                x.environment = Some(lease.id());
                x
            })
            .collect()
    }

    fn environment_runner(dir: &std::path::Path) -> (ToolRunner, RewardRegistry) {
        let file = dir.join("counter_env.py");
        std::fs::write(&file, ENVIRONMENT).unwrap();
        let mut recipe = Recipe::default();
        recipe.rollout.environment_factory = Some(EnvironmentFactory::One(format!(
            "{}:Counter",
            file.display()
        )));
        let mut tools = ToolRunner::from_recipe(&recipe).unwrap().unwrap();
        let f = |name: &str| {
            let spec = format!("{}:{name}", file.display());
            json!({"name": "python", "function": spec})
        };
        let mut rewards = RewardRegistry::from_configs(&[f("totals"), f("made")]).unwrap();
        tools.attach_rewards(&mut rewards).unwrap();
        rewards.prepare().unwrap();
        (tools, rewards)
    }

    /// One environment per completion, as TRL makes one per rollout: reset
    /// with the row (an observation for the prompt), its public methods
    /// (but `reset` and `get_reward`) the completion's tools, each instance
    /// its own state, which the reward functions read as `environments`
    /// and `get_reward()` scores (a reward logged as the class); an
    /// instance is reset again, not made anew, once its completion is
    /// dropped.
    #[test]
    fn environments_are_reset_per_completion_and_read_by_the_rewards() {
        let dir = tempfile::tempdir().unwrap();
        let (tools, rewards) = environment_runner(dir.path());
        assert_eq!(tools.definitions().as_array().unwrap().len(), 2);
        assert_eq!(tools.definitions()[1]["function"]["name"], "stop");
        assert_eq!(
            tools.definitions()[0],
            json!({"type": "function", "function": {
                "name": "add",
                "description": "Adds to the total.",
                "parameters": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "description": "How much to add."}},
                    "required": ["n"],
                },
                "return": {"type": "integer"},
            }})
        );
        assert_eq!(
            tools.python_functions()[0]["key"],
            "rollout.environment_factory"
        );
        let row = |answer: &str| {
            let prompt = json!([{"role": "user", "content": "Count."}]);
            json!({"prompt": prompt, "answer": answer})
        };
        let inputs_of = |envs: &[(EnvironmentLease, Option<String>)]| {
            scored_in(&envs.iter().map(|(lease, _)| lease).collect::<Vec<_>>())
        };
        let rt = runtime();
        rt.block_on(async {
            let envs = tools
                .reset_environments(vec![row("7"), row("-")])
                .await
                .unwrap();
            let observations: Vec<Option<&str>> = envs.iter().map(|(_, o)| o.as_deref()).collect();
            assert_eq!(observations, [Some(" Reach 7."), None]);
            // A reset that raises is an error naming it (its instance, a
            // third, is given back).
            let bad = json!({"prompt": [{"role": "system", "content": "x"}], "answer": "1"});
            let e = tools.reset_environments(vec![bad]).await.unwrap_err();
            assert!(e.contains("AssertionError"), "{e}");
            let (a, b) = (&envs[0].0, &envs[1].0);
            assert_eq!(
                tools.call("add", r#"{"n": 2}"#, Some(a)).await,
                Ok("2".into())
            );
            assert_eq!(
                tools.call("add", r#"{"n": 5}"#, Some(b)).await,
                Ok("5".into())
            );
            assert_eq!(
                tools.call("add", r#"{"n": 1}"#, Some(a)).await,
                Ok("3".into())
            );
            let e = tools.call("add", r#"{"n": 1}"#, None).await.unwrap_err();
            assert!(e.contains("this completion has none"), "{e}");
            let inputs = inputs_of(&envs);
            let scores = rewards.score(&inputs).await.unwrap();
            assert_eq!(scores.per_function[0].values, [3.0, 5.0]);
            assert_eq!(scores.per_function[1].values, [3.0, 3.0]);
            assert_eq!(scores.per_function[2].label, "Counter");
            assert_eq!(scores.per_function[2].values, [30.0, 50.0]);
            assert_eq!(scores.total, [36.0, 58.0]);
            // A process that ends takes the instances in use with it: their
            // calls fail, and so does a reward function that reads them.
            let e = tools.call("stop", "{}", Some(a)).await.unwrap_err();
            assert!(e.contains("Python process ended"), "{e}");
            let e = tools.call("add", r#"{"n": 1}"#, Some(b)).await.unwrap_err();
            assert!(
                e.contains(&format!("environment {} is gone", b.id())),
                "{e}"
            );
            let e = rewards.score(&inputs).await.unwrap_err().to_string();
            assert!(e.contains("totals") && e.contains("is gone"), "{e}");
            drop(envs);
            // In the new process: instances are reset for the next
            // completions, and made only when none is idle.
            let envs = tools.reset_environments(vec![row("1"); 2]).await.unwrap();
            drop(envs);
            let envs = tools.reset_environments(vec![row("1"); 3]).await.unwrap();
            let mut inputs = inputs_of(&envs);
            // get_reward's None, and a completion without an environment:
            // the reward does not apply (NaN, out of the total).
            inputs[2].environment = None;
            let scores = rewards.score(&inputs).await.unwrap();
            assert_eq!(scores.per_function[0].values[..2], [0.0, 0.0]);
            assert_eq!(scores.per_function[1].values, [3.0, 3.0, 3.0]);
            assert!(scores.per_function[2].values.iter().all(|v| v.is_nan()));
            assert_eq!(scores.total, [3.0, 3.0, 3.0]);
            // Content parts: their text, joined; an image is refused.
            let parts = tools.reset_environments(vec![row("parts")]).await.unwrap();
            assert_eq!(parts[0].1.as_deref(), Some(" Reach 9."));
            let e = tools
                .reset_environments(vec![row("image")])
                .await
                .unwrap_err();
            assert!(e.contains("content parts of type ['image']"), "{e}");
        });
    }

    /// An environment class TRL would refuse, or whose method names a tool
    /// already listed, stops the start naming the key.
    #[test]
    fn environments_without_reset_or_with_a_tool_of_their_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad_env.py");
        std::fs::write(
            &file,
            format!(
                "{ENVIRONMENT}\n\nclass NoReset:\n    def add(self, n: int):\n        \
                 \"\"\"Adds.\n\n        Args:\n            n: How much.\n        \"\"\"\n        \
                 return n\n\n\nclass ScoredBy(Counter):\n    def get_reward(self, answer):\n        \
                 return 1.0\n"
            ),
        )
        .unwrap();
        let refused = |factory: &str, tools: Vec<Tool>| {
            let mut recipe = Recipe::default();
            recipe.rollout.environment_factory = Some(EnvironmentFactory::One(format!(
                "{}:{factory}",
                file.display()
            )));
            recipe.rollout.tools = tools;
            ToolRunner::from_recipe(&recipe).unwrap_err().to_string()
        };
        let e = refused("NoReset", Vec::new());
        assert!(
            e.contains("rollout.environment_factory") && e.contains("no reset method"),
            "{e}"
        );
        let e = refused("ScoredBy", Vec::new());
        assert!(
            e.contains("rollout.environment_factory")
                && e.contains(
                    "its get_reward takes answer: TRL calls get_reward() with no arguments"
                ),
            "{e}"
        );
        let e = refused("Missing", Vec::new());
        assert!(
            e.contains("rollout.environment_factory") && e.contains("Missing"),
            "{e}"
        );
        let add = Tool {
            name: "add".into(),
            description: "Adds.".into(),
            url: "http://127.0.0.1:1/add".into(),
            ..Tool::default()
        };
        let e = refused("Counter", vec![add]);
        assert!(
            e.contains("rollout.environment_factory")
                && e.contains("the method \"add\" has the name of rollout.tools[0]"),
            "{e}"
        );
    }

    /// An environment whose class has `get_reward()` owns a reward, so the
    /// recipe may list none (TRL's `reward_funcs` is optional then); one
    /// without needs a reward function; a function logged under the class's
    /// name is refused, as the two could not be told apart in the logs.
    #[test]
    fn an_environment_with_get_reward_scores_its_completions_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owned_env.py");
        let no_reward = "\n\nclass Unscored(Counter):\n    get_reward = None\n";
        std::fs::write(&file, format!("{ENVIRONMENT}{no_reward}")).unwrap();
        let attach = |class: &str, functions: &[Value]| {
            let mut recipe = Recipe::default();
            recipe.rollout.environment_factory = Some(EnvironmentFactory::One(format!(
                "{}:{class}",
                file.display()
            )));
            recipe.reward.functions = functions
                .iter()
                .map(|f| serde_json::from_value(f.clone()).unwrap())
                .collect();
            let mut tools = ToolRunner::from_recipe(&recipe).unwrap().unwrap();
            let mut rewards = RewardRegistry::from_section(&recipe.reward).unwrap();
            tools
                .attach_rewards(&mut rewards)
                .map(|()| (tools, rewards))
        };
        let e = attach("Unscored", &[]).unwrap_err().to_string();
        assert!(
            e.contains("reward.functions is empty") && e.contains("get_reward()"),
            "{e}"
        );
        let clash = json!({"name": "think_format", "label": "Counter"});
        let e = attach("Counter", &[clash]).unwrap_err().to_string();
        assert!(
            e.contains("reward.functions[0]") && e.contains("another `label`"),
            "{e}"
        );
        let (tools, rewards) = attach("Counter", &[]).unwrap();
        assert_eq!(rewards.labels(), ["Counter"]);
        assert_eq!(rewards.weights(), [1.0]);
        let rt = runtime();
        rt.block_on(async {
            let prompt = json!([{"role": "user", "content": "Count."}]);
            let envs = tools
                .reset_environments(vec![json!({"prompt": prompt, "answer": "2"}); 2])
                .await
                .unwrap();
            let (a, b) = (&envs[0].0, &envs[1].0);
            tools.call("add", r#"{"n": 2}"#, Some(a)).await.unwrap();
            tools.call("add", r#"{"n": 4}"#, Some(b)).await.unwrap();
            let scores = rewards.score(&scored_in(&[b, a])).await.unwrap();
            assert_eq!(scores.total, [40.0, 20.0]);
        });
    }

    /// TRL's dict of environment factories: each row names its
    /// environment (`environment`, a column not passed to `reset`); its
    /// completions call that class's methods only, its prompt lists them,
    /// and a class with `get_reward()` scores its own completions (once,
    /// however many names it has; None for the others'). (An `async def`
    /// method runs as a task of the process's event loop.)
    #[test]
    fn rows_choose_their_environment_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("named_envs.py");
        let doubler = r#"

class Doubler:
    def reset(self, **kwargs):
        assert "environment" not in kwargs, kwargs
        self.total = 1

    async def double(self) -> int:
        """Doubles the total."""
        self.total *= 2
        return self.total
"#;
        std::fs::write(&file, format!("{ENVIRONMENT}{doubler}")).unwrap();
        let spec = |class: &str| format!("{}:{class}", file.display());
        let mut recipe = Recipe::default();
        recipe.rollout.environment_factory = Some(EnvironmentFactory::Named(
            [
                ("count".to_string(), spec("Counter")),
                ("double".into(), spec("Doubler")),
                ("tally".into(), spec("Counter")),
            ]
            .into(),
        ));
        let mut tools = ToolRunner::from_recipe(&recipe).unwrap().unwrap();
        let mut rewards = RewardRegistry::from_section(&recipe.reward).unwrap();
        tools.attach_rewards(&mut rewards).unwrap();
        assert_eq!(rewards.labels(), ["Counter"]);
        let keys: Vec<&Value> = tools.python_functions().iter().map(|f| &f["key"]).collect();
        assert_eq!(
            keys,
            [
                "rollout.environment_factory.count",
                "rollout.environment_factory.double",
                "rollout.environment_factory.tally"
            ]
        );
        let PromptTools::ByEnvironment(listed) = tools.prompt_tools() else {
            panic!("one list for every row");
        };
        let names = |definitions: &Value| -> Vec<String> {
            definitions
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["function"]["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names(&listed["count"]), ["add", "stop"]);
        assert_eq!(names(&listed["double"]), ["double"]);
        let row = |environment: &str| {
            let prompt = json!([{"role": "user", "content": "Count."}]);
            json!({"prompt": prompt, "answer": "1", "environment": environment})
        };
        let rt = runtime();
        rt.block_on(async {
            let envs = tools
                .reset_environments(vec![row("count"), row("double"), row("tally")])
                .await
                .unwrap();
            let [a, b, c] = [&envs[0].0, &envs[1].0, &envs[2].0];
            assert_eq!(b.factory(), spec("Doubler"));
            assert_eq!(names(tools.definitions_for(Some(b))), ["double"]);
            assert_eq!(tools.call("double", "{}", Some(b)).await, Ok("2".into()));
            let e = tools.call("add", r#"{"n": 1}"#, Some(b)).await.unwrap_err();
            assert!(
                e.contains("unknown tool \"add\"; the tools are double"),
                "{e}"
            );
            assert!(tools.call("double", "{}", Some(a)).await.is_err());
            assert_eq!(
                tools.call("add", r#"{"n": 3}"#, Some(a)).await,
                Ok("3".into())
            );
            assert_eq!(
                tools.call("add", r#"{"n": 4}"#, Some(c)).await,
                Ok("4".into())
            );
            let scores = rewards.score(&scored_in(&[a, b, c])).await.unwrap();
            let values = &scores.per_function[0].values;
            assert_eq!([values[0], values[2]], [30.0, 40.0]);
            assert!(values[1].is_nan(), "{values:?}");
            let e = tools
                .reset_environments(vec![row("chess")])
                .await
                .unwrap_err();
            assert!(
                e.contains("has `environment` \"chess\"") && e.contains("count, double, tally"),
                "{e}"
            );
        });
    }

    /// With one tool process, the tools and the reward functions share it,
    /// as in TRL: a reward function reads what a tool left in its module
    /// (here a reward function of the tool's name in another file, which
    /// stays apart from it). With more, the reward functions keep their own.
    #[test]
    fn python_tools_share_the_reward_functions_process() {
        let dir = tempfile::tempdir().unwrap();
        let rewards_file = dir.path().join("my_rewards.py");
        std::fs::write(
            &rewards_file,
            "import my_tools\n\ndef count(completions, **kwargs):\n    \
             return [my_tools.calls] * len(completions)\n",
        )
        .unwrap();
        let rt = runtime();
        for (processes, seen) in [(1, 2.0), (2, 0.0)] {
            let mut tools = python_runner_with(dir.path(), &["count"], 30.0, processes);
            let mut rewards = RewardRegistry::from_configs(&[json!({
                "name": "python",
                "function": format!("{}:count", rewards_file.display()),
            })])
            .unwrap();
            tools.attach_rewards(&mut rewards).unwrap();
            rewards.prepare().unwrap();
            rt.block_on(async {
                assert_eq!(tools.call("count", "{}", None).await, Ok("1".into()));
                assert_eq!(tools.call("count", "{}", None).await, Ok("2".into()));
                let input = crate::rewards::RewardInput::new("2+2?", "4", None);
                let scores = rewards.score(&[input]).await.unwrap();
                assert_eq!(
                    scores.per_function[0].values,
                    [seen],
                    "{processes} processes"
                );
                assert_eq!(tools.call("count", "{}", None).await, Ok("3".into()));
            });
        }
    }

    /// `async def` calls run at once in one process (as TRL gathers its
    /// async tools), beside one that is not async: four calls that each
    /// wait for the four to be in flight all return.
    #[test]
    fn async_python_tool_calls_run_at_once_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let r = python_runner(dir.path(), &["meet", "count"], 30.0);
        let rt = runtime();
        let (met, counted) = rt.block_on(async {
            let meet = (0..4).map(|_| r.call("meet", r#"{"n": 4}"#, None));
            futures::future::join(futures::future::join_all(meet), r.call("count", "{}", None))
                .await
        });
        assert!(met.iter().all(|m| m.as_deref() == Ok("4")), "{met:?}");
        assert_eq!(counted, Ok("1".into()));
        // One turn's async calls run together (after its other calls), and
        // the results come in the order written: three more meet, the
        // count goes first.
        let (meet, count) = (("meet", r#"{"n": 7}"#), ("count", "{}"));
        let turn: Vec<(String, String)> = [meet, count, meet, count, meet]
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();
        let results = rt.block_on(r.run_turn(&turn, None));
        let shown: Vec<(&str, Result<&str, &str>)> = results
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_deref().map_err(String::as_str)))
            .collect();
        assert_eq!(
            shown,
            [
                ("meet", Ok("7")),
                ("count", Ok("2")),
                ("meet", Ok("7")),
                ("count", Ok("3")),
                ("meet", Ok("7"))
            ]
        );
    }

    /// `python_tool_processes` calls run at once, each in its own process:
    /// a call that comes while the others are busy gets a process of its
    /// own, up to the limit; beyond it, it waits for one.
    #[test]
    fn python_tool_calls_run_in_as_many_processes_as_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for processes in [1, 2] {
            let r = python_runner_with(dir.path(), &["pid"], 30.0, processes);
            let pids = rt.block_on(async {
                let calls = (0..2).map(|_| r.call("pid", r#"{"seconds": 0.5}"#, None));
                futures::future::join_all(calls).await
            });
            let pids: std::collections::BTreeSet<String> =
                pids.into_iter().map(|p| p.unwrap()).collect();
            assert_eq!(pids.len(), processes, "{pids:?}");
        }
    }

    /// A function the definitions cannot be read from stops the start,
    /// naming the tool.
    #[test]
    fn python_tools_that_cannot_be_defined_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("my_tools.py");
        std::fs::write(&file, PYTHON_TOOLS).unwrap();
        let refused = |tools: Vec<Tool>| {
            let mut recipe = Recipe::default();
            recipe.rollout.tools = tools;
            ToolRunner::from_recipe(&recipe).unwrap_err().to_string()
        };
        let python = |spec: String| Tool {
            python: Some(spec),
            ..Tool::default()
        };
        let e = refused(vec![
            python(format!("{}:add", file.display())),
            python(format!("{}:undocumented", file.display())),
        ]);
        assert!(
            e.contains("rollout.tools[1].python") && e.contains("no docstring"),
            "{e}"
        );
        let e = refused(vec![python(format!("{}:nothing", file.display()))]);
        assert!(e.contains("has no function 'nothing'"), "{e}");
        let e = refused(vec![python("no/such/file.py:add".into())]);
        assert!(e.contains("no file 'no/such/file.py'"), "{e}");
        let e = refused(vec![
            add_tool("http://127.0.0.1:1/add"),
            python(format!("{}:add", file.display())),
        ]);
        assert!(
            e.contains("rollout.tools[1]") && e.contains("also names rollout.tools[0]"),
            "{e}"
        );
    }
}
