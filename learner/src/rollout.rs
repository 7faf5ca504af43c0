//! Completion groups from OpenAI-compatible endpoints: Tandem's rollout
//! server or an external vLLM.
//!
//! One request per prompt asks for `n = num_generations` completions with
//! token ids and log-probs, tagged with the rank's `client_tag` (JSON field and
//! `X-VLLM-Client-Tag` header). Requests go to the endpoint with the fewest
//! outstanding requests, are retried with exponential backoff on connection
//! errors and 5xx/429, and fail after a deadline. A group whose echoed tag is
//! not this rank's is dropped and counted (`client_tag_echo: require`); stock
//! vLLM does not echo tags, hence `ignore`. A server that returns no token ids
//! (an older vLLM) gets its text re-tokenized, with one warning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use model::tokenizer::{ChatMessage, Tokenizer};
use proto::openai::{CompletionRequest, CompletionResponse, Prompt, SamplingFields};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::rewards::RewardInput;
use crate::tools::ToolRunner;

pub use crate::recipe::ClientTagEcho;

#[derive(Debug, Clone)]
pub struct RolloutSettings {
    pub endpoints: Vec<String>,
    pub api_key: Option<String>,
    pub model: Option<String>,
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: f32,
    pub client_tag: String,
    pub client_tag_echo: ClientTagEcho,
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// More request fields, sent as they are (`rollout.generation_kwargs`).
    pub generation_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// One sampled completion, in token ids, with the log-probs the server
/// sampled it with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub completion_ids: Vec<u32>,
    pub text: String,
    /// Log-prob of each completion token under the server's sampling
    /// distribution (empty when the server returned none).
    pub logprobs: Vec<f32>,
    pub finish_reason: Option<String>,
    /// The oldest weights any of its tokens were sampled with.
    pub weight_version: u64,
    /// With `rollout.tools`: per completion token, true where the policy
    /// wrote it and false on the tool turns inserted between its turns
    /// (TRL's `tool_mask`: left out of the loss). Empty: every token is the
    /// policy's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_mask: Vec<bool>,
    /// Tool calls made for it, and how many of them failed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tool_calls: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tool_failures: usize,
    /// With tool calls: the completion as chat messages, as TRL hands a
    /// conversational completion to its reward functions: each assistant
    /// turn (its text, and `tool_calls` as read) and each tool message.
    /// Empty otherwise (one assistant turn: the text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<serde_json::Value>,
    /// With `rollout.environment_factory` when a `reset` returned an
    /// observation: the completion's own prompt (the observation appended
    /// to the last message, as TRL appends it), which the group's
    /// `prompt_ids` are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<OwnPrompt>,
    /// With `rollout.environment_factory`: the environment its tool calls
    /// ran in, which its reward functions read; the instance is reset for
    /// another completion once this one (and every clone) is dropped.
    #[serde(skip)]
    pub environment: Option<crate::python::EnvironmentLease>,
}

/// A completion's prompt of its own ([`Completion::prompt`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnPrompt {
    pub ids: Vec<u32>,
    pub text: String,
    pub messages: Vec<ChatMessage>,
}

impl Completion {
    /// The prompt it was generated from: its own, or its group's.
    pub fn prompt_ids<'a>(&'a self, group: &'a Group) -> &'a [u32] {
        self.prompt.as_ref().map_or(&group.prompt_ids, |p| &p.ids)
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The `n` completions of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub prompt_ids: Vec<u32>,
    pub completions: Vec<Completion>,
}

impl Group {
    /// What the reward functions score: each completion of `example`'s
    /// group, the `index`-th group of the batch.
    pub fn reward_inputs(&self, example: &crate::data::Example, index: usize) -> Vec<RewardInput> {
        self.completions
            .iter()
            .map(|c| {
                let (prompt, messages) = match &c.prompt {
                    Some(p) => (p.text.clone(), Some(p.messages.clone())),
                    None => (example.prompt_text.clone(), example.messages.clone()),
                };
                let mut input =
                    RewardInput::new(prompt, c.text.clone(), Some(example.answer.clone()))
                        .with_completion_tokens(c.completion_ids.len())
                        .with_completion(c.completion_ids.clone(), c.messages.clone())
                        .in_group(index)
                        .with_messages(messages)
                        .with_data_source(example.data_source.clone())
                        .with_columns(example.columns.clone());
                input.environment = c.environment.as_ref().map(|e| e.id());
                input
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("rollout request to {endpoint} failed after {attempts} attempt(s): {message}")]
    Request {
        endpoint: String,
        attempts: u32,
        message: String,
    },
    #[error("rollout endpoint {endpoint} refused the request ({status}): {message}")]
    Refused {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("rollout response from {endpoint} is malformed: {message}")]
    Malformed { endpoint: String, message: String },
    #[error("no rollout endpoints configured: set rollout.endpoints")]
    NoEndpoints,
    #[error("rollout.tools: {0}")]
    Tools(String),
    #[error("rollout.environment_factory: {0}")]
    Environment(String),
}

struct Endpoint {
    base: String,
    outstanding: AtomicUsize,
}

/// Counts a step's rollouts report in the train log.
#[derive(Debug, Default)]
pub struct RolloutCounters {
    pub dropped_groups: AtomicUsize,
    pub retries: AtomicUsize,
    /// Prompts cut to `max_prompt_length` tokens.
    pub truncated_prompts: AtomicUsize,
}

#[derive(Clone)]
pub struct RolloutClient {
    http: reqwest::Client,
    endpoints: Arc<Vec<Endpoint>>,
    settings: Arc<RolloutSettings>,
    tokenizer: Option<Arc<Tokenizer>>,
    /// Prompts longer than this many tokens keep their last ones (TRL's
    /// `max_prompt_length`); needs the tokenizer.
    max_prompt_length: Option<usize>,
    warned_retokenize: Arc<AtomicBool>,
    warned_truncate: Arc<AtomicBool>,
    pub counters: Arc<RolloutCounters>,
    /// `rollout.tools`: completions that call them go on after the results.
    tools: Option<Arc<ToolRunner>>,
}

/// The outcome of one prompt's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GroupOutcome {
    Kept(Group),
    /// The echoed client tag was not ours: the group belongs to another rank.
    Dropped {
        echoed: Option<String>,
    },
}

impl RolloutClient {
    /// `tokenizer` re-tokenizes the text of servers that return no token ids;
    /// without one such completions have empty token ids (fine for eval,
    /// not for training).
    pub fn new(
        settings: RolloutSettings,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Result<Self, RolloutError> {
        if settings.endpoints.is_empty() {
            return Err(RolloutError::NoEndpoints);
        }
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| RolloutError::Request {
                endpoint: settings.endpoints.join(","),
                attempts: 0,
                message: e.to_string(),
            })?;
        let endpoints = settings
            .endpoints
            .iter()
            .map(|e| Endpoint {
                base: e.trim_end_matches('/').trim_end_matches("/v1").to_string(),
                outstanding: AtomicUsize::new(0),
            })
            .collect();
        Ok(RolloutClient {
            http,
            endpoints: Arc::new(endpoints),
            settings: Arc::new(settings),
            tokenizer,
            max_prompt_length: None,
            warned_retokenize: Arc::new(AtomicBool::new(false)),
            warned_truncate: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(RolloutCounters::default()),
            tools: None,
        })
    }

    /// Runs the calls completions write and continues them (multi-turn
    /// rollouts); needs the tokenizer and chat prompts.
    pub fn with_tools(mut self, tools: Option<ToolRunner>) -> Self {
        self.tools = tools.map(Arc::new);
        self
    }

    /// Cuts prompts to their last `max` tokens, as TRL's `max_prompt_length`
    /// does. Without a tokenizer the server sees the text as it is.
    pub fn with_max_prompt_length(mut self, max: Option<usize>) -> Self {
        self.max_prompt_length = max;
        self
    }

    /// The prompt as the request carries it: token ids when the learner has
    /// the tokenizer (so the server scores exactly the ids the learner will
    /// train on, cut to `max_prompt_length`), the text otherwise.
    fn request_prompt(&self, prompt: &str) -> Result<Prompt, RolloutError> {
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(Prompt::Text(prompt.to_string()));
        };
        let mut ids = tokenizer
            .encode(prompt, false)
            .map_err(|e| RolloutError::Malformed {
                endpoint: "tokenizer".into(),
                message: e.to_string(),
            })?;
        if let Some(max) = self.max_prompt_length.filter(|&m| ids.len() > m) {
            self.counters
                .truncated_prompts
                .fetch_add(1, Ordering::Relaxed);
            if !self.warned_truncate.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    tokens = ids.len(),
                    max,
                    "prompt longer than rollout.max_prompt_length: keeping its last tokens \
                     (counted as truncated_prompts)"
                );
            }
            ids.drain(..ids.len() - max);
        }
        Ok(Prompt::Tokens(ids))
    }

    /// The completions request of one group. Every sampling field is
    /// spelled out, the neutral ones too (`top_k: -1`, `min_p: 0`, as TRL
    /// sends them): a vLLM server fills a field left out from the model's
    /// generation_config.json (its default `--generation-config auto`:
    /// top_k 20 for Qwen2.5-Instruct), which would sample another
    /// distribution than the recipe's without a word.
    fn request_body(
        &self,
        prompt: Prompt,
        seed: u64,
        n: usize,
        max_tokens: usize,
    ) -> Result<serde_json::Value, RolloutError> {
        let s = &self.settings;
        let request = CompletionRequest {
            model: s.model.clone(),
            prompt,
            logprobs: Some(0),
            echo: None,
            add_special_tokens: Some(false),
            sampling: SamplingFields {
                n: Some(n as i64),
                max_tokens: Some(max_tokens as i64),
                temperature: Some(s.temperature),
                top_p: Some(s.top_p),
                top_k: Some(s.top_k.unwrap_or(-1)),
                min_p: Some(s.min_p.unwrap_or(0.0)),
                repetition_penalty: Some(s.repetition_penalty),
                seed: Some((seed & (i64::MAX as u64)) as i64),
                return_token_ids: Some(true),
                client_tag: Some(s.client_tag.clone()),
                ..Default::default()
            },
        };
        let mut body = serde_json::to_value(&request).map_err(|e| RolloutError::Malformed {
            endpoint: "request".into(),
            message: e.to_string(),
        })?;
        if let Some(fields) = body.as_object_mut() {
            for (k, v) in &s.generation_kwargs {
                fields.insert(k.clone(), v.clone());
            }
        }
        Ok(body)
    }

    /// Whether completions that call `rollout.tools` go on after the results.
    pub fn uses_tools(&self) -> bool {
        self.tools.is_some()
    }

    pub fn settings(&self) -> &RolloutSettings {
        &self.settings
    }

    /// Generates one group per example's prompt, all requests in flight
    /// at once. Groups come back in order; dropped ones are
    /// `GroupOutcome::Dropped`. `seeds[i]` seeds prompt i's request, so that
    /// the same prompt at the same step gets the same completions whichever
    /// rank asks.
    pub async fn generate(
        &self,
        examples: &[Example],
        seeds: &[u64],
    ) -> Result<Vec<GroupOutcome>, RolloutError> {
        let futures = examples
            .iter()
            .zip(seeds)
            .map(|(e, &seed)| self.generate_group(e, seed));
        futures::future::try_join_all(futures).await
    }

    fn pick_endpoint(&self) -> &Endpoint {
        // Least outstanding requests; ties to the first.
        self.endpoints
            .iter()
            .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))
            .unwrap_or(&self.endpoints[0])
    }

    async fn generate_group(
        &self,
        example: &Example,
        seed: u64,
    ) -> Result<GroupOutcome, RolloutError> {
        let s = &self.settings;
        let needs_chat = || {
            RolloutError::Tools(
                "needs chat prompts (data.prompt_template: chat, or a conversational prompt \
                 column)"
                    .into(),
            )
        };
        // TRL's environments: one per completion, reset before it is
        // generated; an observation joins its prompt.
        let environments = match &self.tools {
            Some(tools) if tools.has_environments() => {
                let messages = example.messages.as_deref().ok_or_else(needs_chat)?;
                Some(reset_environments(tools, example, messages, s.num_generations).await?)
            }
            _ => None,
        };
        let outcome = match &environments {
            Some(environments) if environments.iter().any(|(_, o)| o.is_some()) => {
                let observations: Vec<Option<&str>> =
                    environments.iter().map(|(_, o)| o.as_deref()).collect();
                // A group's environments are of one class, the row's.
                let lease = environments.first().map(|(lease, _)| lease);
                self.generate_observed(example, seed, &observations, lease)
                    .await?
            }
            _ => {
                let prompt = &example.prompt_text;
                let body = self.request_body(
                    self.request_prompt(prompt)?,
                    seed,
                    s.num_generations,
                    s.max_completion_length,
                )?;
                let (endpoint, resp) = self.request(&body).await?;
                self.to_group(&endpoint, prompt, resp, s.num_generations)?
            }
        };
        match (&self.tools, outcome) {
            (Some(tools), GroupOutcome::Kept(mut group)) => {
                for (c, (lease, _)) in group
                    .completions
                    .iter_mut()
                    .zip(environments.into_iter().flatten())
                {
                    c.environment = Some(lease);
                }
                let as_json = |messages: &[ChatMessage]| -> Vec<serde_json::Value> {
                    messages
                        .iter()
                        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                        .collect()
                };
                let messages = as_json(example.messages.as_deref().ok_or_else(needs_chat)?);
                let prompt_ids = group.prompt_ids.clone();
                let turns = group.completions.iter_mut().enumerate().map(|(i, c)| {
                    let (prompt_ids, messages) = match &c.prompt {
                        Some(p) => (p.ids.clone(), as_json(&p.messages)),
                        None => (prompt_ids.clone(), messages.clone()),
                    };
                    async move {
                        self.call_tools(tools, &prompt_ids, &messages, c, seed, i)
                            .await
                    }
                });
                let foreign = futures::future::try_join_all(turns).await?;
                if let Some(echoed) = foreign.into_iter().flatten().next() {
                    self.counters.dropped_groups.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(?echoed, ours = %s.client_tag, "dropping a group whose tool-call turn came back with a foreign client tag");
                    return Ok(GroupOutcome::Dropped { echoed });
                }
                Ok(GroupOutcome::Kept(group))
            }
            (_, outcome) => Ok(outcome),
        }
    }

    /// A group whose environments' observations made its prompts: one
    /// request per distinct prompt, for as many completions as have it,
    /// each completion with its own prompt ([`Completion::prompt`]), in the
    /// order of `observations`; the prompts list `environment`'s tools.
    async fn generate_observed(
        &self,
        example: &Example,
        seed: u64,
        observations: &[Option<&str>],
        environment: Option<&crate::python::EnvironmentLease>,
    ) -> Result<GroupOutcome, RolloutError> {
        let s = &self.settings;
        let (Some(tools), Some(tokenizer), Some(messages)) =
            (&self.tools, &self.tokenizer, &example.messages)
        else {
            return Err(RolloutError::Environment(
                "observations need the tokenizer and chat prompts".into(),
            ));
        };
        let mut distinct: Vec<Option<&str>> = Vec::new();
        for o in observations {
            if !distinct.contains(o) {
                distinct.push(*o);
            }
        }
        let mut slots: Vec<Option<Completion>> = vec![None; observations.len()];
        for (k, observation) in distinct.iter().enumerate() {
            let mut messages = messages.clone();
            if let (Some(last), Some(o)) = (messages.last_mut(), observation) {
                last.content.push_str(o);
            }
            let text = serde_json::to_value(&messages)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    tokenizer
                        .apply_chat_template_json(
                            &m,
                            true,
                            Some(tools.definitions_for(environment)),
                            Some(tools.chat_template_kwargs()),
                        )
                        .map_err(|e| e.to_string())
                })
                .map_err(RolloutError::Environment)?;
            let slots_of_it: Vec<usize> = (0..observations.len())
                .filter(|&i| observations[i] == *observation)
                .collect();
            let n = slots_of_it.len();
            let seed = if distinct.len() == 1 {
                seed
            } else {
                crate::train::hash_u64(format!("{seed}|observation {k}").as_bytes())
            };
            let body = self.request_body(
                self.request_prompt(&text)?,
                seed,
                n,
                s.max_completion_length,
            )?;
            let (endpoint, resp) = self.request(&body).await?;
            let group = match self.to_group(&endpoint, &text, resp, n)? {
                GroupOutcome::Kept(group) => group,
                dropped => return Ok(dropped),
            };
            let prompt = OwnPrompt {
                ids: group.prompt_ids,
                text,
                messages,
            };
            for (slot, mut c) in slots_of_it.into_iter().zip(group.completions) {
                c.prompt = Some(prompt.clone());
                slots[slot] = Some(c);
            }
        }
        let completions: Vec<Completion> = slots.into_iter().flatten().collect();
        let prompt_ids = completions
            .first()
            .and_then(|c| c.prompt.as_ref())
            .map(|p| p.ids.clone())
            .unwrap_or_default();
        Ok(GroupOutcome::Kept(Group {
            prompt_ids,
            completions,
        }))
    }

    /// One request, to the endpoint with the fewest outstanding, retried
    /// with backoff on connection errors and 5xx / 429 until the deadline.
    async fn request(
        &self,
        body: &serde_json::Value,
    ) -> Result<(String, CompletionResponse), RolloutError> {
        let s = &self.settings;
        let started = Instant::now();
        let deadline = s.request_timeout;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let endpoint = self.pick_endpoint();
            endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
            let result = self.post(&endpoint.base, body).await;
            endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(resp) => return Ok((endpoint.base.clone(), resp)),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(message)) => {
                    let backoff = Duration::from_millis(100u64 << attempt.min(6));
                    if attempt > s.max_retries || started.elapsed() + backoff > deadline {
                        return Err(RolloutError::Request {
                            endpoint: endpoint.base.clone(),
                            attempts: attempt,
                            message,
                        });
                    }
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(endpoint = %endpoint.base, attempt, "rollout request failed, retrying: {message}");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// The tool rounds of completion `index` of a group: while its last
    /// turn stopped on its own and wrote calls (and rounds and length are
    /// left), the calls run, the rendered tool turns join its tokens
    /// (masked out of the loss) and one more turn is generated from the
    /// whole conversation. Some(echoed tag) when a continuation came back
    /// with a foreign client tag: the group is dropped.
    async fn call_tools(
        &self,
        tools: &ToolRunner,
        prompt_ids: &[u32],
        messages: &[serde_json::Value],
        c: &mut Completion,
        seed: u64,
        index: usize,
    ) -> Result<Option<Option<String>>, RolloutError> {
        let malformed = RolloutError::Tools;
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| malformed("needs the model's tokenizer".into()))?;
        let max_len = self.settings.max_completion_length;
        let with_logprobs = c.logprobs.len() == c.completion_ids.len();
        let mut conversation = messages.to_vec();
        // The completion as messages, for the reward functions: the
        // conversation's turns after the prompt, the calls read.
        let mut turns = Vec::new();
        // Where the last assistant turn begins, in text and tokens.
        let mut turn_text = 0;
        let mut turn_ids = 0;
        let mut rounds = 0;
        // An assistant message: its text and the calls read from it.
        let assistant = |text: &str, calls: &[(String, String)]| {
            let read: Vec<serde_json::Value> = calls
                .iter()
                .map(|(name, arguments)| {
                    let arguments = serde_json::from_str::<serde_json::Value>(arguments)
                        .unwrap_or_else(|_| serde_json::Value::String(arguments.clone()));
                    serde_json::json!({"type": "function",
                                       "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            let mut message = serde_json::json!({"role": "assistant", "content": text});
            if !read.is_empty() {
                message["tool_calls"] = serde_json::Value::Array(read);
            }
            message
        };
        // Ends the loop with the last turn as the completion's last message
        // (with the calls it wrote past max_tool_calling_iterations, unrun).
        let last_turn = |c: &mut Completion, mut turns: Vec<serde_json::Value>, from: usize| {
            if !turns.is_empty() {
                let text = &c.text[from..];
                turns.push(assistant(text, &tools.calls(text)));
                c.messages = turns;
            }
        };
        loop {
            if c.finish_reason.as_deref() != Some("stop")
                || tools.max_iterations.is_some_and(|m| rounds >= m)
            {
                last_turn(c, turns, turn_text);
                return Ok(None);
            }
            let turn = c.text[turn_text..].to_string();
            let calls = tools.calls(&turn);
            if calls.is_empty() {
                last_turn(c, turns, turn_text);
                return Ok(None);
            }
            rounds += 1;
            let results = tools.run_turn(&calls, c.environment.as_ref()).await;
            for (name, result) in &results {
                c.tool_calls += 1;
                if let Err(e) = result {
                    c.tool_failures += 1;
                    tracing::debug!(tool = %name, "tool call failed: {e}");
                }
            }
            conversation.push(serde_json::json!({"role": "assistant", "content": turn}));
            let last_token = c.completion_ids[turn_ids..]
                .last()
                .map(|&id| tokenizer.decode(&[id], false))
                .transpose()
                .map_err(|e| malformed(e.to_string()))?;
            let answers = ToolRunner::tool_messages(&results);
            let inserted = tools
                .tool_turns(
                    tokenizer,
                    &conversation,
                    &answers,
                    last_token.as_deref(),
                    c.environment.as_ref(),
                )
                .map_err(|e| malformed(e.to_string()))?;
            let with_calls = assistant(&turn, &calls);
            conversation.extend(answers.iter().cloned());
            let ids = tokenizer
                .encode(&inserted, false)
                .map_err(|e| malformed(e.to_string()))?;
            let room = max_len.saturating_sub(c.completion_ids.len());
            if ids.len() >= room {
                // No room for the results and an answer: as TRL does, they
                // are left out and the completion ends with its calls (which
                // ran, and count).
                turns.push(with_calls);
                c.messages = turns;
                return Ok(None);
            }
            turns.push(with_calls);
            turns.extend(answers);
            if c.tool_mask.is_empty() {
                c.tool_mask = vec![true; c.completion_ids.len()];
            }
            c.completion_ids.extend_from_slice(&ids);
            c.tool_mask.resize(c.completion_ids.len(), false);
            if with_logprobs {
                c.logprobs.resize(c.completion_ids.len(), 0.0);
            }
            c.text.push_str(&inserted);
            // The next turn, from the whole conversation's tokens.
            let mut context = prompt_ids.to_vec();
            context.extend_from_slice(&c.completion_ids);
            let turn_seed = crate::train::hash_u64(format!("{seed}|{index}|{rounds}").as_bytes());
            let body =
                self.request_body(Prompt::Tokens(context), turn_seed, 1, room - ids.len())?;
            let (endpoint, resp) = self.request(&body).await?;
            if self.settings.client_tag_echo == ClientTagEcho::Require && !self.ours(&resp) {
                return Ok(Some(resp.metadata.and_then(|m| m.client_tag)));
            }
            let version = resp.metadata.as_ref().map(|m| m.weight_version);
            let [choice] =
                <[_; 1]>::try_from(resp.choices).map_err(|choices| RolloutError::Malformed {
                    endpoint: endpoint.clone(),
                    message: format!("{} choices for n = 1", choices.len()),
                })?;
            let next = self.completion(&endpoint, choice, version.unwrap_or(0))?;
            turn_text = c.text.len();
            turn_ids = c.completion_ids.len();
            c.completion_ids.extend_from_slice(&next.completion_ids);
            c.tool_mask.resize(c.completion_ids.len(), true);
            if with_logprobs {
                if next.logprobs.len() != next.completion_ids.len() {
                    return Err(RolloutError::Malformed {
                        endpoint,
                        message: "a continuation came back without log-probs".into(),
                    });
                }
                c.logprobs.extend_from_slice(&next.logprobs);
            }
            c.text.push_str(&next.text);
            c.finish_reason = next.finish_reason;
            c.weight_version = c.weight_version.min(next.weight_version);
        }
    }

    async fn post(
        &self,
        base: &str,
        request: &serde_json::Value,
    ) -> Result<CompletionResponse, Attempt> {
        let url = format!("{base}/v1/completions");
        let mut req = self
            .http
            .post(&url)
            .header("X-VLLM-Client-Tag", &self.settings.client_tag)
            .json(request);
        if let Some(key) = &self.settings.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Attempt::Retry(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        if !status.is_success() {
            return Err(Attempt::Fatal(RolloutError::Refused {
                endpoint: base.to_string(),
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).into_owned(),
            }));
        }
        serde_json::from_slice(&body).map_err(|e| {
            Attempt::Fatal(RolloutError::Malformed {
                endpoint: base.to_string(),
                message: e.to_string(),
            })
        })
    }

    /// Whether the response and each of its choices echo this rank's tag.
    fn ours(&self, resp: &CompletionResponse) -> bool {
        let tag = self.settings.client_tag.as_str();
        let ours = |m: &Option<proto::openai::Metadata>| {
            m.as_ref().and_then(|m| m.client_tag.as_deref()) == Some(tag)
        };
        ours(&resp.metadata) && resp.choices.iter().all(|c| ours(&c.metadata))
    }

    /// The `n` choices of `resp` as a group.
    fn to_group(
        &self,
        endpoint: &str,
        prompt: &str,
        resp: CompletionResponse,
        n: usize,
    ) -> Result<GroupOutcome, RolloutError> {
        let s = &self.settings;
        if s.client_tag_echo == ClientTagEcho::Require && !self.ours(&resp) {
            self.counters.dropped_groups.fetch_add(1, Ordering::Relaxed);
            let echoed = resp.metadata.as_ref().and_then(|m| m.client_tag.clone());
            tracing::warn!(?echoed, ours = %s.client_tag, "dropping a group with a foreign client tag");
            return Ok(GroupOutcome::Dropped { echoed });
        }
        if resp.choices.len() != n {
            return Err(RolloutError::Malformed {
                endpoint: endpoint.to_string(),
                message: format!("{} choices for n = {n}", resp.choices.len()),
            });
        }
        let mut choices = resp.choices;
        choices.sort_by_key(|c| c.index);
        let prompt_ids = match choices.first().and_then(|c| c.prompt_token_ids.clone()) {
            Some(ids) => ids,
            None => self.retokenize(prompt)?,
        };
        let response_version = resp
            .metadata
            .as_ref()
            .map(|m| m.weight_version)
            .unwrap_or(0);
        let completions = choices
            .into_iter()
            .map(|c| self.completion(endpoint, c, response_version))
            .collect::<Result<_, _>>()?;
        Ok(GroupOutcome::Kept(Group {
            prompt_ids,
            completions,
        }))
    }

    /// One choice as a completion: its token ids (re-tokenized from a
    /// server that gives none) and sampling log-probs.
    fn completion(
        &self,
        endpoint: &str,
        c: proto::openai::CompletionChoice,
        response_version: u64,
    ) -> Result<Completion, RolloutError> {
        let completion_ids = match c.token_ids {
            Some(ids) => ids,
            None => self.retokenize(&c.text)?,
        };
        let logprobs: Vec<f32> = match &c.logprobs {
            Some(lp) => lp.token_logprobs.iter().map(|l| l.unwrap_or(0.0)).collect(),
            None => Vec::new(),
        };
        if !logprobs.is_empty() && logprobs.len() != completion_ids.len() {
            return Err(RolloutError::Malformed {
                endpoint: endpoint.to_string(),
                message: format!(
                    "{} log-probs for {} completion tokens",
                    logprobs.len(),
                    completion_ids.len()
                ),
            });
        }
        Ok(Completion {
            completion_ids,
            text: c.text,
            logprobs,
            finish_reason: c.finish_reason,
            weight_version: c
                .metadata
                .as_ref()
                .map(|m| m.weight_version)
                .unwrap_or(response_version),
            tool_mask: Vec::new(),
            tool_calls: 0,
            tool_failures: 0,
            messages: Vec::new(),
            prompt: None,
            environment: None,
        })
    }

    fn retokenize(&self, text: &str) -> Result<Vec<u32>, RolloutError> {
        if !self.warned_retokenize.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the rollout server returned no token ids (an older vLLM?): re-tokenizing text, \
                 which may not reproduce the sampled tokens exactly"
            );
        }
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(Vec::new());
        };
        tokenizer
            .encode(text, false)
            .map_err(|e| RolloutError::Malformed {
                endpoint: "tokenizer".into(),
                message: e.to_string(),
            })
    }
}

enum Attempt {
    Retry(String),
    Fatal(RolloutError),
}

/// Resets `n` environments for `example`'s completions with its row, as
/// TRL resets each with its input: every column, and `prompt` (the
/// messages).
async fn reset_environments(
    tools: &ToolRunner,
    example: &Example,
    messages: &[ChatMessage],
    n: usize,
) -> Result<Vec<(crate::python::EnvironmentLease, Option<String>)>, RolloutError> {
    let mut row = match example.columns.as_deref().map(serde_json::from_str) {
        Some(Ok(serde_json::Value::Object(columns))) => columns,
        _ => serde_json::Map::new(),
    };
    let messages =
        serde_json::to_value(messages).map_err(|e| RolloutError::Environment(e.to_string()))?;
    row.insert("prompt".into(), messages);
    let rows = vec![serde_json::Value::Object(row); n];
    tools
        .reset_environments(rows)
        .await
        .map_err(RolloutError::Environment)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampling fields a recipe leaves unset go out as their neutral
    /// values, never left for the server to fill from a generation config.
    #[test]
    fn unset_sampling_fields_are_sent_neutral() {
        let settings = RolloutSettings {
            endpoints: vec!["http://127.0.0.1:1".into()],
            api_key: None,
            model: None,
            num_generations: 4,
            max_completion_length: 32,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: None,
            repetition_penalty: 1.0,
            client_tag: "rank-0".into(),
            client_tag_echo: ClientTagEcho::Require,
            request_timeout: Duration::from_secs(1),
            max_retries: 0,
            generation_kwargs: serde_json::Map::new(),
        };
        let client = RolloutClient::new(settings.clone(), None).unwrap();
        let body = client
            .request_body(Prompt::Text("1+1=".into()), 7, 4, 32)
            .unwrap();
        assert_eq!(body["top_k"], -1);
        assert_eq!(body["min_p"], 0.0);
        assert_eq!(body["temperature"], 1.0);
        assert_eq!(body["repetition_penalty"], 1.0);
        let set = RolloutSettings {
            top_k: Some(20),
            min_p: Some(0.05),
            ..settings
        };
        let body = RolloutClient::new(set, None)
            .unwrap()
            .request_body(Prompt::Text("1+1=".into()), 7, 4, 32)
            .unwrap();
        assert_eq!(body["top_k"], 20);
        assert!((body["min_p"].as_f64().unwrap() - 0.05).abs() < 1e-6);
    }
}
