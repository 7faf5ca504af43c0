//! Reward functions on hand-made completions; `remote` against a real HTTP
//! server (axum) on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use learner::rewards::{
    Extract, RewardError, RewardInput, RewardRegistry, answers_match, extract_answer,
};
use serde_json::{Value, json};

fn input(completion: &str, answer: Option<&str>) -> RewardInput {
    RewardInput::new("Q", completion, answer.map(str::to_string))
}

fn registry(configs: Value) -> RewardRegistry {
    match configs {
        Value::Array(v) => RewardRegistry::from_configs(&v).unwrap(),
        other => RewardRegistry::from_configs(&[other]).unwrap(),
    }
}

fn config_error(config: Value) -> String {
    RewardRegistry::from_configs(&[config])
        .unwrap_err()
        .to_string()
}

async fn values(config: Value, batch: &[RewardInput]) -> Vec<f64> {
    let scores = registry(config).score(batch).await.unwrap();
    scores.per_function[0].values.clone()
}

#[tokio::test]
async fn exact_match_extracts_and_normalises() {
    let cases: &[(&str, &str, f64)] = &[
        ("<think>2+2</think><answer>4</answer>", "4", 1.0),
        ("<answer>3</answer> then <answer> 4 </answer>", "4", 1.0), // last tag
        ("<answer>5</answer>", "4", 0.0),
        ("so \\boxed{1,234} done", "1234", 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0), // balanced braces
        ("\\boxed{+7.0}", "7", 1.0),
        ("\\boxed{7.50}", "7.5", 1.0),
        ("\\boxed{1/2}", "0.5", 1.0),
        ("\\boxed{-0}", "0", 1.0),
        ("\\boxed{1 000}", "1000", 1.0),
        ("\\boxed{12", "12", 0.0),     // truncated: no answer
        ("the answer is 4", "4", 0.0), // `any` does not take bare numbers
        ("<answer>$42$</answer>", "42", 1.0),
        ("<answer>New  York</answer>", "New York", 1.0),
        ("<answer>72</answer>", "She pays 8 * 9 = 72.\n#### 72", 1.0), // GSM8K reference
        // A worked solution (MATH, open-r1's `solution` column): its last \boxed{}.
        (
            "\\boxed{\\frac{1}{2}}",
            "Halve it: $x = \\boxed{\\frac{1}{2}}$.",
            1.0,
        ),
        (
            "<answer>3</answer>",
            "First \\boxed{2}, then \\boxed{3}",
            1.0,
        ),
        (
            "<answer>2</answer>",
            "First \\boxed{2}, then \\boxed{3}",
            0.0,
        ),
    ];
    let batch: Vec<_> = cases.iter().map(|(c, a, _)| input(c, Some(a))).collect();
    let got = values(json!({"name": "exact_match"}), &batch).await;
    for ((c, a, want), got) in cases.iter().zip(got) {
        assert_eq!(got, *want, "completion {c:?} vs answer {a:?}");
    }

    let bare = [
        input("3 + 4 = 7", Some("7")),
        input("-12.", Some("-12")),
        input("none", Some("1")),
    ];
    let got = values(
        json!({"name": "exact_match", "extract": "last_number"}),
        &bare,
    )
    .await;
    assert_eq!(got, vec![1.0, 1.0, 0.0]);

    // verl's gsm8k scorer (strict): the number after the last `#### `.
    let gsm8k = [
        input("4 + 8 = 12 bolts.\n#### 12", Some("#### 12")),
        input("#### 3\nno, #### 1,200", Some("1200")),
        input("the answer is 12", Some("12")),
        input("####12", Some("12")),
    ];
    let got = values(json!({"name": "exact_match", "extract": "gsm8k"}), &gsm8k).await;
    assert_eq!(got, vec![1.0, 1.0, 0.0, 0.0]);

    let tagged = [input("<answer>1</answer> \\boxed{2}", Some("2"))];
    assert_eq!(
        values(json!({"name": "exact_match", "extract": "boxed"}), &tagged).await,
        vec![1.0]
    );
    assert_eq!(
        values(
            json!({"name": "exact_match", "extract": "answer_tag"}),
            &tagged
        )
        .await,
        vec![0.0]
    );
}

#[test]
fn answer_helpers() {
    assert_eq!(
        extract_answer("a \\boxed{x{y}z} b", Extract::Boxed),
        Some("x{y}z")
    );
    assert_eq!(
        extract_answer("1, then 2,500.5 apples", Extract::LastNumber),
        Some("2,500.5")
    );
    assert!(answers_match("1,000,000", "1000000"));
    assert!(answers_match("0.25", "1/4"));
    assert!(!answers_match("1/3", "0.33"));
    assert!(!answers_match("12", "1.2"));
    assert!(answers_match(
        "123456789012345678901",
        "123456789012345678901.0"
    ));
    assert!(!answers_match(
        "123456789012345678901",
        "123456789012345678902"
    ));
}

#[tokio::test]
async fn exact_match_without_a_reference_is_an_error() {
    let err = registry(json!({"name": "exact_match"}))
        .score(&[input("<answer>1</answer>", None)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RewardError::Score { function, .. } if function == "exact_match"),
        "{err}"
    );
    assert!(err.to_string().contains("completion 0"), "{err}");
}

#[tokio::test]
async fn format_regex() {
    let batch = [
        input("<think>a\nb</think><answer>1</answer>", None),
        input("<answer>1</answer>", None),
        input("x <think>a</think><answer>1</answer>", None),
    ];
    let pattern = r"(?s)<think>.*?</think>\s*<answer>.*?</answer>";
    let search = values(json!({"name": "format", "pattern": pattern}), &batch).await;
    assert_eq!(search, vec![1.0, 0.0, 1.0]);
    let full = values(
        json!({"name": "format", "pattern": pattern, "full_match": true}),
        &batch,
    )
    .await;
    assert_eq!(full, vec![1.0, 0.0, 0.0]);

    let err = config_error(json!({"name": "format", "pattern": "(<think>"}));
    assert!(
        err.contains("`format`") && err.contains("(<think>") && err.contains("regex"),
        "{err}"
    );
}

/// open-r1's tag_count and reasoning_steps, values worked out by hand from
/// open-r1's definitions.
#[tokio::test]
async fn open_r1_tag_count_and_reasoning_steps() {
    let batch = [
        input("<think>\nx\n</think>\n<answer>\n4\n</answer>", None),
        input("<think>\nx\n</think>\n<answer>4</answer>", None), // 2 of 4 lines
        input("<think>\n<think>\nx\n</think>\n", None),          // think twice
        input("no tags", None),
    ];
    let tags = values(json!({"name": "tag_count"}), &batch).await;
    assert_eq!(tags, vec![1.0, 0.5, 0.25, 0.0]);

    let batch = [
        input("Step 1: a Step 2: b Step 3: c Step 4: d", None),
        input("First, a. Next, b.", None),
        input("1. a\n2. b\n- c", None), // `^\d+\.` at the start only: 1 + `\n-`: 2
        input("nothing", None),
    ];
    let steps = values(json!({"name": "reasoning_steps"}), &batch).await;
    assert_eq!(steps, vec![1.0, 2.0 / 3.0, 2.0 / 3.0, 0.0]);

    let err = config_error(json!({"name": "tag_count", "x": 1}));
    assert!(err.contains("`tag_count`") && err.contains('x'), "{err}");
}

#[tokio::test]
async fn open_r1_repetition_penalty() {
    let batch = [
        // Lower-cased: a b c a b c -> trigrams abc, bca, cab, abc: 3
        // distinct of 4, so -1 x (1 - 3/4).
        input("a b c A B C", None),
        input("one two three four", None), // all distinct
        input("x y", None),                // shorter than a trigram
        input("", None),
    ];
    let got = values(
        json!({"name": "repetition_penalty", "ngram_size": 3, "max_penalty": -1.0}),
        &batch,
    )
    .await;
    assert_eq!(got, vec![-0.25, 0.0, 0.0, 0.0]);
    let err = config_error(json!({"name": "repetition_penalty", "max_penalty": 0.5}));
    assert!(err.contains("max_penalty"), "{err}");
}

#[tokio::test]
async fn open_r1_cosine_scaled_reward() {
    // max_len 8; lengths 0, 4 (half way), 8 and beyond; right and wrong.
    let right = |len: usize| {
        let text = format!("<answer>7</answer>{}", "x".repeat(len));
        input(&text, Some("7"))
    };
    let wrong = |len: usize| input(&format!("<answer>5</answer>{}", "x".repeat(len)), Some("7"));
    let base = "<answer>7</answer>".len();
    let cfg = json!({"name": "cosine", "max_len": base + 8});
    let batch = [
        right(0),
        right(4),
        right(8),
        right(20),
        wrong(0),
        wrong(4),
        wrong(8),
    ];
    let got = values(cfg, &batch).await;
    // p = len / max_len; correct: 0.5 + 0.25 (1 + cos(pi p)); wrong: -0.5 - 0.25 (1 + cos(pi p)).
    let max_len = (base + 8) as f64;
    let c = |len: usize| (std::f64::consts::PI * ((base + len) as f64 / max_len).min(1.0)).cos();
    let want = [
        0.5 + 0.25 * (1.0 + c(0)),
        0.5 + 0.25 * (1.0 + c(4)),
        0.5,
        0.5,
        -0.5 - 0.25 * (1.0 + c(0)),
        -0.5 - 0.25 * (1.0 + c(4)),
        -0.5,
    ];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
    // Shorter is better when right, and worse when wrong.
    assert!(got[0] > got[1] && got[1] > got[2]);
    assert!(got[4] < got[5] && got[5] < got[6]);
    let err = config_error(json!({"name": "cosine", "max_len": 0}));
    assert!(err.contains("max_len"), "{err}");
}

#[tokio::test]
async fn length_penalty_overlong_and_linear() {
    // DAPO: max 10, cache 4 -> free up to 6, then (6 - L)/4, -1 beyond 10.
    let batch: Vec<_> = [0, 6, 7, 8, 10, 11]
        .iter()
        .map(|&n| input("", None).with_completion_tokens(n))
        .collect();
    let cfg = json!({"name": "length_penalty", "max_length": 10, "cache_length": 4});
    assert_eq!(
        values(cfg, &batch).await,
        vec![0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    );

    let chars = [input("abcde", None), input("abcdefghijklmnop", None)];
    let cfg =
        json!({"name": "length_penalty", "mode": "linear", "max_length": 10, "unit": "chars"});
    assert_eq!(values(cfg, &chars).await, vec![-0.5, -1.0]);

    let err = registry(json!({"name": "length_penalty", "max_length": 10, "cache_length": 4}))
        .score(&[input("abc", None)])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("length_penalty") && err.contains("token count"),
        "{err}"
    );
    let err = config_error(json!({"name": "length_penalty", "max_length": 10, "cache_length": 11}));
    assert!(err.contains("cache_length"), "{err}");
}

#[tokio::test]
async fn blocklist_gate_and_penalty_compose_with_the_total() {
    let batch = [
        input("<answer>4</answer>", Some("4")),
        input("<answer>4</answer> As an AI", Some("4")),
        input("<answer>5</answer> as an ai", Some("4")),
    ];
    // Gate (default): blocked completions get a total of 0.
    let reg = registry(json!([
        {"name": "exact_match", "weight": 2.0},
        {"name": "format", "pattern": "<answer>", "weight": 0.5},
        {"name": "blocklist", "substrings": ["As an AI"]},
    ]));
    let s = reg.score(&batch).await.unwrap();
    assert_eq!(s.per_function[2].values, vec![1.0, 0.0, 1.0]);
    assert_eq!(s.total, vec![2.5, 0.0, 0.5]);
    assert_eq!(reg.labels(), vec!["exact_match", "format", "blocklist"]);

    // Penalty, case-insensitive: adds weight x penalty.
    let reg = registry(json!([
        {"name": "exact_match"},
        {"name": "blocklist", "substrings": ["AS AN AI"], "case_sensitive": false,
         "mode": "penalty", "penalty": -2.0, "weight": 0.5},
    ]));
    let s = reg.score(&batch).await.unwrap();
    assert_eq!(s.per_function[1].values, vec![0.0, -2.0, -2.0]);
    assert_eq!(s.total, vec![1.0, 0.0, -1.0]);
    let summary = s.summary();
    assert_eq!(summary[0].0, "exact_match");
    assert!((summary[0].1 - 2.0 / 3.0).abs() < 1e-12);

    let err = config_error(json!({"name": "blocklist", "substrings": ["x"], "weight": 3.0}));
    assert!(err.contains("gate"), "{err}");
}

#[test]
fn configs_are_strict() {
    let err = config_error(json!({"name": "exact_match", "extrac": "boxed"}));
    assert!(
        err.contains("exact_match") && err.contains("extrac"),
        "{err}"
    );
    let err = config_error(json!({"name": "exact_match", "extract": "tag"}));
    assert!(err.contains("exact_match") && err.contains("tag"), "{err}");
    let err = config_error(json!({"name": "blocklist", "substrings": "x"}));
    assert!(
        err.contains("blocklist") && err.contains("invalid type"),
        "{err}"
    );
    let err = config_error(json!({"name": "remote", "url": "http://x", "retries": 3}));
    assert!(err.contains("remote") && err.contains("retries"), "{err}");
    let err = config_error(json!({"name": "exact", "weight": 1}));
    assert!(err.contains("unknown reward function `exact`"), "{err}");
    let err = config_error(json!({"name": "format", "pattern": "x", "weight": "1"}));
    assert!(err.contains("weight"), "{err}");
    let err = RewardRegistry::from_configs(&[
        json!({"name": "format", "pattern": "a"}),
        json!({"name": "format", "pattern": "b"}),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("label"), "{err}");
    let ok = RewardRegistry::from_configs(&[
        json!({"name": "format", "pattern": "a"}),
        json!({"name": "format", "pattern": "b", "label": "format_b"}),
    ])
    .unwrap();
    assert_eq!(ok.labels(), vec!["format", "format_b"]);
}

// ---------------------------------------------------------------- remote

#[derive(Clone, Default)]
struct Server {
    flaky_calls: Arc<AtomicUsize>,
    slow_calls: Arc<AtomicUsize>,
}

/// Reward = number of characters of the completion, +100 when it equals the answer.
fn rewards_for(body: &Value) -> Vec<Value> {
    let completions = body["completions"].as_array().cloned().unwrap_or_default();
    let answers = body["answers"].as_array().cloned().unwrap_or_default();
    completions
        .iter()
        .zip(&answers)
        .map(|(c, a)| {
            let c = c.as_str().unwrap_or("");
            let bonus = if a.as_str() == Some(c) { 100.0 } else { 0.0 };
            json!(c.chars().count() as f64 + bonus)
        })
        .collect()
}

async fn ok(Json(body): Json<Value>) -> Json<Value> {
    assert_eq!(
        body["prompts"].as_array().map(Vec::len),
        body["completions"].as_array().map(Vec::len)
    );
    Json(json!({"rewards": rewards_for(&body)}))
}

/// OpenRLHF's reward server: reads `query` (prompt + completion), `prompts`
/// and `labels`, answers `rewards` with `scores` and `extra_logs` beside.
async fn openrlhf(Json(body): Json<Value>) -> Json<Value> {
    let queries = body["query"].as_array().unwrap();
    let prompts = body["prompts"].as_array().unwrap();
    let labels = body["labels"].as_array().unwrap();
    assert!(body.get("completions").is_none(), "{body}");
    let rewards: Vec<f64> = queries
        .iter()
        .zip(prompts)
        .zip(labels)
        .map(|((q, p), l)| {
            let (q, p) = (q.as_str().unwrap(), p.as_str().unwrap());
            let response = q.strip_prefix(p).expect("the query starts with the prompt");
            if l.as_str() == Some(response) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Json(json!({"rewards": rewards, "scores": rewards, "extra_logs": {"n": queries.len()}}))
}

async fn flaky(State(s): State<Server>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if s.flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "warming up"})),
        );
    }
    (StatusCode::OK, Json(json!({"rewards": rewards_for(&body)})))
}

async fn slow(State(s): State<Server>) -> Json<Value> {
    s.slow_calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    Json(json!({"rewards": [1.0]}))
}

async fn wrong_length(Json(body): Json<Value>) -> Json<Value> {
    let mut r = rewards_for(&body);
    r.pop();
    Json(json!({"rewards": r}))
}

async fn not_numbers() -> Json<Value> {
    Json(json!({"rewards": [1.0, null]}))
}

async fn bad_request() -> (StatusCode, &'static str) {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing field `solutions`",
    )
}

async fn start_server() -> (String, Server) {
    let state = Server::default();
    let app = Router::new()
        .route("/ok", post(ok))
        .route("/openrlhf", post(openrlhf))
        .route("/flaky", post(flaky))
        .route("/slow", post(slow))
        .route("/wrong_length", post(wrong_length))
        .route("/not_numbers", post(not_numbers))
        .route("/bad_request", post(bad_request))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), state)
}

fn remote(url: String, extra: Value) -> Value {
    let mut cfg = json!({"name": "remote", "url": url, "timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.05});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    cfg
}

fn two() -> Vec<RewardInput> {
    vec![input("abc", Some("abc")), input("hello", None)]
}

#[tokio::test]
async fn remote_scores_a_batch() {
    let (base, _) = start_server().await;
    let reg = registry(json!([
        remote(format!("{base}/ok"), json!({"weight": 0.5, "label": "python"})),
        {"name": "format", "pattern": "^h"},
    ]));
    let s = reg.score(&two()).await.unwrap();
    assert_eq!(s.per_function[0].label, "python");
    assert_eq!(s.per_function[0].values, vec![103.0, 5.0]);
    assert_eq!(s.total, vec![51.5, 3.5]);
}

#[tokio::test]
async fn remote_speaks_openrlhf_to_an_openrlhf_reward_server() {
    let (base, _) = start_server().await;
    let v = values(
        remote(format!("{base}/openrlhf"), json!({"protocol": "openrlhf"})),
        &two(),
    )
    .await;
    assert_eq!(v, vec![1.0, 0.0]);
    let err = config_error(remote(
        format!("{base}/openrlhf"),
        json!({"protocol": "trl"}),
    ));
    assert!(
        err.contains("protocol") && err.contains("openrlhf"),
        "{err}"
    );
}

#[tokio::test]
async fn remote_retries_a_500_then_succeeds() {
    let (base, server) = start_server().await;
    let v = values(remote(format!("{base}/flaky"), json!({})), &two()).await;
    assert_eq!(v, vec![103.0, 5.0]);
    assert_eq!(server.flaky_calls.load(Ordering::SeqCst), 2);
}

async fn remote_error(url: String, extra: Value) -> String {
    let err = registry(remote(url, extra))
        .score(&two())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RewardError::Score { function, .. } if function == "remote"),
        "{err}"
    );
    err.to_string()
}

#[tokio::test]
async fn remote_timeout_after_retries_is_an_error() {
    let (base, server) = start_server().await;
    let started = Instant::now();
    let err = remote_error(
        format!("{base}/slow"),
        json!({"timeout_s": 0.3, "max_retries": 1}),
    )
    .await;
    assert!(
        err.contains("no response within") && err.contains("2 attempt"),
        "{err}"
    );
    assert_eq!(server.slow_calls.load(Ordering::SeqCst), 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn remote_wrong_answers_are_errors() {
    let (base, _) = start_server().await;
    let err = remote_error(format!("{base}/wrong_length"), json!({})).await;
    assert!(
        err.contains("returned 1 rewards for 2 completions"),
        "{err}"
    );
    let err = remote_error(format!("{base}/not_numbers"), json!({})).await;
    assert!(err.contains("reward 1 is null"), "{err}");
    let err = remote_error(format!("{base}/bad_request"), json!({})).await;
    assert!(
        err.contains("422") && err.contains("solutions") && !err.contains("attempt"),
        "{err}"
    );
    let err = remote_error(format!("{base}/missing_route"), json!({})).await;
    assert!(err.contains("404"), "{err}");
}

#[tokio::test]
async fn remote_unreachable_server_is_an_error_after_retries() {
    let port = e2e::free_port();
    let err = remote_error(
        format!("http://127.0.0.1:{port}/score"),
        json!({"max_retries": 1}),
    )
    .await;
    assert!(
        err.contains("connection failed") && err.contains("2 attempt"),
        "{err}"
    );
}

/// open-r1's len_reward (Kimi k1.5), by hand: lengths 18, 20 and 22 over
/// the batch give lambda 0.5, 0 and -0.5; a wrong answer keeps only a
/// penalty; equal lengths give 0; a row without a reference counts as
/// correct.
#[tokio::test]
async fn length_reward_is_open_r1s_len_reward() {
    let f = json!({"name": "length"});
    let batch = [
        input("<answer>4</answer>", Some("4")),
        input("<answer>5</answer>xx", Some("4")),
        input("<answer>4</answer>xxxx", Some("4")),
    ];
    assert_eq!(values(f.clone(), &batch).await, vec![0.5, 0.0, -0.5]);
    let batch = [
        input("<answer>5</answer>", Some("4")),
        input("<answer>4</answer>xx", None),
        input("<answer>4</answer>xxxx", Some("4")),
    ];
    assert_eq!(values(f.clone(), &batch).await, vec![0.0, 0.0, -0.5]);
    let same = [input("ab", Some("4")), input("cd", Some("5"))];
    assert_eq!(values(f.clone(), &same).await, vec![0.0, 0.0]);
    // Kimi's own scope: each prompt's completions on their own. Group 0
    // (lengths 18, 22) and group 1 (20, 24): each shortest 0.5, longest -0.5.
    let grouped = [
        input("<answer>4</answer>", Some("4")).in_group(0),
        input("<answer>4</answer>xxxx", Some("4")).in_group(0),
        input("<answer>4</answer>xx", Some("4")).in_group(1),
        input("<answer>4</answer>xxxxxx", Some("4")).in_group(1),
    ];
    let by_group = json!({"name": "length", "scope": "group"});
    assert_eq!(
        values(by_group.clone(), &grouped).await,
        vec![0.5, -0.5, 0.5, -0.5]
    );
    // Over the batch (open-r1's): 18..24.
    assert_eq!(
        values(f.clone(), &grouped).await,
        vec![0.5, 0.5 - 4.0 / 6.0, 0.5 - 2.0 / 6.0, -0.5]
    );
    let err = registry(by_group)
        .score(&[input("a", Some("1")), input("bb", Some("1"))])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("scope: group"), "{err}");
    assert!(config_error(json!({"name": "length", "max_len": 3})).contains("max_len"));
}

/// The MATH benchmark's `is_equiv` (Hendrycks et al.; verl's MATH scorer),
/// case by case as its strip_string treats them.
#[tokio::test]
async fn math_answers_compare_as_the_math_benchmark_compares_them() {
    use learner::rewards::math_equiv;
    for (a, b) in [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("5 \\text{ cm}", "5"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("90^\\circ", "90"),
        ("\\$18.90", "18.90"),
        ("\\frac1{72}", "\\tfrac{1}{72}"),
    ] {
        assert!(math_equiv(a, b), "{a} == {b}");
    }
    for (a, b) in [
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("abc = 5", "5"), // a long left side stays
        // strip_string raises on two `\text{ ` units: the texts as given.
        ("1 \\text{ a} \\text{ b}", "1"),
    ] {
        assert!(!math_equiv(a, b), "{a} != {b}");
    }
    assert!(math_equiv(
        "1 \\text{ a} \\text{ b}",
        "1 \\text{ a} \\text{ b}"
    ));
    // Through exact_match: a boxed \dfrac against a MATH reference.
    let batch = [input("so \\boxed{\\dfrac{3}{4}}", Some("\\frac34"))];
    assert_eq!(
        values(json!({"name": "exact_match", "extract": "boxed"}), &batch).await,
        vec![1.0]
    );
}

/// The reward-model fixtures transformers made (model/tests/fixtures/
/// make_reward_model_fixture.py): random classifiers with the tiny preset's
/// tokenizer, and transformers' scores of a few texts and a conversation.
fn reward_model_fixture(name: &str) -> (std::path::PathBuf, Value) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures");
    let dir = root.join("reward_model");
    let scores: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scores.json")).unwrap()).unwrap();
    (dir.join(name), scores)
}

/// As TRL scores with a reward model: a text prompt and its completion
/// joined, a chat prompt's messages with the completion as the assistant's
/// through the reward model's chat template; the first label's logit, the
/// same in batches of any size.
#[tokio::test]
async fn reward_model_scores_prompt_and_completion_as_trl_does() {
    for name in ["qwen2", "llama"] {
        let (dir, record) = reward_model_fixture(name);
        let logits = &record["models"][name]["logits"];
        let want = |i: usize| logits[i][0].as_f64().unwrap();
        // "12+7=19", "What is 3*4? 12", then the conversation (index 4).
        let batch = vec![
            RewardInput::new("12+7=", "19", None),
            RewardInput::new("What is 3*4?", " 12", None),
            // The prompt text (the policy's rendering) is not what it reads.
            RewardInput::new("(rendered)", "4", None).with_messages(Some(vec![
                model::tokenizer::ChatMessage::system("Answer with a number."),
                model::tokenizer::ChatMessage::user("2+2="),
            ])),
        ];
        for batch_size in [1, 2, 16] {
            let got = values(
                json!({"name": "reward_model", "path": dir, "batch_size": batch_size}),
                &batch,
            )
            .await;
            for (g, w) in got.iter().zip([want(0), want(1), want(4)]) {
                assert!((g - w).abs() <= 1e-4, "{name} batch {batch_size}: {got:?}");
            }
        }
    }
}

#[test]
fn reward_model_configs_name_what_is_wrong() {
    let (dir, _) = reward_model_fixture("qwen2");
    // A language model's folder.
    let lm = dir.join("../../hf/qwen2");
    let e = config_error(json!({"name": "reward_model", "path": lm}));
    assert!(
        e.contains("reward_model") && e.contains("a language model"),
        "{e}"
    );
    // No such folder: nothing is downloaded.
    let e = config_error(json!({"name": "reward_model", "path": "Skywork/Skywork-Reward"}));
    assert!(e.contains("nothing is downloaded"), "{e}");
    let e = config_error(json!({"name": "reward_model", "path": dir, "device": "gpu"}));
    assert!(e.contains("`device`"), "{e}");
    let e = config_error(json!({"name": "reward_model", "path": dir, "batch_size": 0}));
    assert!(e.contains("batch_size"), "{e}");
    let e = config_error(json!({"name": "reward_model", "path": dir, "label_index": 1}));
    assert!(e.contains("label_index"), "{e}");
}

/// TRL's think_format_reward, on the examples of its docstring and the
/// edges of its pattern `^<think>(?!.*<think>)(.*?)</think>.*$`.
#[tokio::test]
async fn think_format_is_trls_think_format_reward() {
    let cases = [
        (
            "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
            1.0,
        ),
        ("<think>\nThis is my reasoning.\nThis is my answer.", 0.0),
        ("<think></think>", 1.0),
        (" <think>x</think>", 0.0),
        ("<think>a<think>b</think>", 0.0),
        ("<think>a</think> then <think>", 0.0),
        ("<think>a</think>\n</think>", 1.0),
    ];
    let batch: Vec<RewardInput> = cases.iter().map(|(c, _)| input(c, None)).collect();
    let got = values(json!({"name": "think_format"}), &batch).await;
    let want: Vec<f64> = cases.iter().map(|(_, v)| *v).collect();
    assert_eq!(got, want);
    let e = config_error(json!({"name": "think_format", "pattern": "x"}));
    assert!(e.contains("pattern"), "{e}");
}

/// verl's default scorer, by each row's data_source: GSM8K's `#### n`,
/// MATH's last `\boxed{}`, DAPO-Math's `Answer:` line; a source it does not
/// know, or a row without one, is an error naming what to set.
#[tokio::test]
async fn exact_match_by_data_source_scores_as_verl_chooses() {
    let row = |source: Option<&str>, completion: &str, answer: &str| {
        input(completion, Some(answer)).with_data_source(source.map(str::to_string))
    };
    let batch = vec![
        row(Some("openai/gsm8k"), "so 3 + 4 = 7\n#### 7", "7"),
        row(Some("openai/gsm8k"), "the answer is \\boxed{7}", "7"),
        row(
            Some("lighteval/MATH"),
            "so \\boxed{\\frac{1}{2}}",
            "\\frac12",
        ),
        row(Some("HuggingFaceH4/MATH-500"), "#### 7", "7"),
        row(Some("math_dapo"), "work...\nAnswer: 42", "42"),
        row(Some("aime2024"), "answer: 41", "42"),
        row(Some("numina_olympiads"), "so \\boxed{5}", "5"),
    ];
    let got = values(
        json!({"name": "exact_match", "extract": "data_source"}),
        &batch,
    )
    .await;
    // math_dapo's wrong answers score -1, as verl's math_dapo scores them.
    assert_eq!(got, vec![1.0, 0.0, 1.0, 0.0, 1.0, -1.0, 1.0]);
    let registry = registry(json!({"name": "exact_match", "extract": "data_source"}));
    let e = registry
        .score(&[row(Some("my_task"), "#### 1", "1")])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"my_task\"") && e.contains("openai/gsm8k"),
        "{e}"
    );
    let e = registry
        .score(&[row(None, "#### 1", "1")])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.data_source_column"), "{e}");
    // The Answer: line is read in the last 300 characters, as verl reads it.
    let long = format!("Answer: 42\n{}", "x".repeat(400));
    let got = values(
        json!({"name": "exact_match", "extract": "answer_line"}),
        &[input(&long, Some("42")), input("Answer: 42", Some("42"))],
    )
    .await;
    assert_eq!(got, vec![0.0, 1.0]);
}

/// A reward model's weights load on first use, or up front with `prepare`
/// (what `learner train` and `learner eval` do): a folder without them
/// builds, and `prepare` names the function and the folder.
#[test]
fn a_reward_model_without_weights_fails_up_front() {
    let (dir, _) = reward_model_fixture("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let weightless = registry(json!({"name": "reward_model", "path": tmp.path()}));
    let e = weightless.prepare().unwrap_err().to_string();
    assert!(
        e.contains("reward_model") && e.contains(&tmp.path().display().to_string()),
        "{e}"
    );
    registry(json!({"name": "reward_model", "path": dir}))
        .prepare()
        .unwrap();
}

// ---- code

/// open-r1's verification_info: a + b, two test cases.
const SUM_CASES: &str = r#"{"language": "python", "test_cases": [
    {"input": "2 3\n", "output": "5\n", "type": "stdin_stdout"},
    {"input": "10 -4\n", "output": "6", "type": "stdin_stdout"}]}"#;

/// Programs and the share of SUM_CASES each passes.
fn programs() -> Vec<(RewardInput, f64)> {
    let program =
        |body: &str| format!("Here:\n```python\na, b = map(int, input().split())\n{body}\n```\n");
    [
        (program("print(a + b)"), 1.0),
        (program("print(a + b if a < 5 else 0)"), 0.5),
        (program("print(a * b)"), 0.0),
        ("No program here.".to_string(), 0.0),
        (program("while True:\n    pass"), 0.0),
        (program("raise SystemExit(3)"), 0.0),
        // An earlier block is not the program: the last one is.
        (
            format!("```python\nprint(0)\n```\n{}", program("print(a + b)")),
            1.0,
        ),
    ]
    .into_iter()
    .map(|(c, v)| (input(&c, Some(SUM_CASES)), v))
    .collect()
}

async fn code_values(config: Value) -> (Vec<f64>, Vec<f64>) {
    let cases = programs();
    let batch: Vec<RewardInput> = cases.iter().map(|(x, _)| x.clone()).collect();
    let expected = cases.iter().map(|(_, v)| *v).collect();
    (values(config, &batch).await, expected)
}

#[tokio::test]
async fn code_runs_each_program_against_the_test_cases_here() {
    let (got, expected) =
        code_values(json!({"name": "code", "runner": "local", "timeout_s": 2})).await;
    assert_eq!(got, expected);
    let (got, expected) =
        code_values(json!({"name": "code", "runner": "local", "timeout_s": 2, "mode": "binary"}))
            .await;
    let binary: Vec<f64> = expected
        .iter()
        .map(|v| if *v == 1.0 { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(got, binary);
}

/// A Piston-compatible `POST /api/v2/execute`, run by python3 here.
async fn piston_execute(Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if body["language"] != "python" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": "unknown language"})),
        );
    }
    let program = body["files"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let stdin = body["stdin"].as_str().unwrap_or_default().to_string();
    let timeout = Duration::from_millis(body["run_timeout"].as_u64().unwrap_or(3000));
    let run = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("python3")
            .args(["-c", &program])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                return json!({"stdout": String::from_utf8_lossy(&out.stdout),
                              "stderr": String::from_utf8_lossy(&out.stderr),
                              "code": status.code(), "signal": null});
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return json!({"stdout": "", "stderr": "", "code": null, "signal": "SIGKILL"});
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap();
    (
        StatusCode::OK,
        Json(json!({"language": "python", "version": "3", "run": run})),
    )
}

#[tokio::test]
async fn code_runs_each_program_on_a_piston_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().route("/api/v2/execute", post(piston_execute));
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let (got, expected) = code_values(
        json!({"name": "code", "runner": "piston", "url": format!("{url}/"), "timeout_s": 2}),
    )
    .await;
    assert_eq!(got, expected);

    // A language the server does not have, and no server at all, stop the
    // scoring with the function named.
    let cpp = input(
        "```cpp\nint main(){}\n```",
        Some(r#"{"language": "cpp", "test_cases": [{"input": "", "output": ""}]}"#),
    );
    let e = registry(json!({"name": "code", "runner": "piston", "url": url}))
        .score(&[cpp])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("`code`") && e.contains("400"), "{e}");
    let down = format!("http://127.0.0.1:{}", e2e::free_port());
    let e = registry(json!({"name": "code", "runner": "piston", "url": down}))
        .score(&[programs().remove(0).0])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("/api/v2/execute"), "{e}");
}

#[tokio::test]
async fn code_says_what_is_wrong_with_its_configuration_and_answers() {
    for (config, says) in [
        (json!({"name": "code"}), "runner"),
        (json!({"name": "code", "runner": "piston"}), "needs `url`"),
        (
            json!({"name": "code", "runner": "local", "url": "http://x:1"}),
            "`url` is for `runner: piston`",
        ),
        (
            json!({"name": "code", "runner": "local", "timeout_s": 0}),
            "timeout_s",
        ),
        (json!({"name": "code", "runner": "sandbox"}), "runner"),
        (
            json!({"name": "code", "runner": "local", "memory_mb": 8}),
            "memory_mb",
        ),
    ] {
        let e = config_error(config.clone());
        assert!(e.contains(says) && e.contains("code"), "{config}: {e}");
    }
    let not_info = input("```python\nprint(1)\n```", Some("42"));
    let e = registry(json!({"name": "code", "runner": "local"}))
        .score(&[not_info])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("verification_info"), "{e}");
}

/// Reward functions as TRL users write them.
const TRL_REWARDS: &str = r#"
calls = 0


def accuracy_reward(completions, solution, **kwargs):
    """open-r1's shape: the completion's content against the solution column."""
    contents = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if c.strip() == s else 0.0 for c, s in zip(contents, solution)]


def conversational(prompts, completions, **kwargs):
    return [
        float(isinstance(p, list) and p[-1]["role"] == "user" and c[0]["role"] == "assistant")
        for p, c in zip(prompts, completions)
    ]


def calls_so_far(completions, **kwargs):
    global calls
    calls += 1
    return [calls] * len(completions)


def calls_seen(completions, **kwargs):
    """Another function of the same module reads the same state."""
    return [calls] * len(completions)


class Half:
    def __float__(self):
        return 0.5


def halves(completions, **kwargs):
    return [Half() for _ in completions]


def longer_than_two(completions, **kwargs):
    return [len(c) > 2 for c in completions]


def chat_only(prompts, completions, **kwargs):
    """TRL's multi-task rule: None where the function does not apply."""
    return [1.0 if isinstance(p, list) else None for p in prompts]


def one_value(completions, **kwargs):
    return [1.0]


def verifier_down(completions, **kwargs):
    raise RuntimeError("verifier down")


def progress(completions, trainer_state, **kwargs):
    """A curriculum reads TRL's trainer_state by attribute."""
    return [trainer_state.global_step / trainer_state.max_steps + trainer_state.epoch] * len(completions)


def shapes(completions, completion_ids, **kwargs):
    """Token ids, and a tool conversation's messages."""
    return [len(ids) + 10 * len(c) for c, ids in zip(completions, completion_ids)]


def cases_and_level(completions, verification_info, level, solution, **kwargs):
    """open-r1's code rows: a dict column, an int column, the answer."""
    return [len(v["test_cases"]) + l + len(s) for v, l, s in zip(verification_info, level, solution)]
"#;

/// TRL's reward functions run as they are (`name: python`): called once per
/// batch with TRL's keyword arguments, the answer under the recipe's
/// answer column, logged under their own names; each function's module
/// state lives on from call to call.
#[tokio::test]
async fn python_reward_functions_are_called_as_trl_calls_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my_rewards.py");
    std::fs::write(&file, TRL_REWARDS).unwrap();
    let f =
        |name: &str| json!({"name": "python", "function": format!("{}:{name}", file.display())});
    let data: learner::recipe::DataSection =
        serde_json::from_value(json!({"answer_column": "solution"})).unwrap();
    let rewards = RewardRegistry::from_configs(&[
        f("accuracy_reward"),
        f("conversational"),
        f("halves"),
        f("longer_than_two"),
        f("calls_so_far"),
        f("chat_only"),
        f("calls_seen"),
    ])
    .unwrap()
    .with_data_columns(&data);
    rewards.prepare().unwrap();
    assert_eq!(
        rewards.labels(),
        [
            "accuracy_reward",
            "conversational",
            "halves",
            "longer_than_two",
            "calls_so_far",
            "chat_only",
            "calls_seen"
        ]
    );
    let chat = |completion: &str| {
        input(completion, Some("4")).with_messages(Some(vec![
            model::tokenizer::ChatMessage::system("Answer."),
            model::tokenizer::ChatMessage::user("2+2?"),
        ]))
    };
    let batch = [input(" 4 ", Some("4")), input("5", Some("4")), chat("4")];
    let scores = rewards.score(&batch).await.unwrap();
    let values: Vec<&[f64]> = scores
        .per_function
        .iter()
        .map(|f| f.values.as_slice())
        .collect();
    assert_eq!(values[0], [1.0, 0.0, 1.0]);
    assert_eq!(values[1], [0.0, 0.0, 1.0]);
    assert_eq!(values[2], [0.5, 0.5, 0.5]);
    assert_eq!(values[3], [1.0, 0.0, 0.0]);
    assert_eq!(values[4], [1.0, 1.0, 1.0]);
    // None: left out of the total and of the function's mean.
    assert!(values[5][0].is_nan() && values[5][1].is_nan());
    assert_eq!(values[5][2], 1.0);
    // accuracy, conversational, halves, longer_than_two, calls_so_far,
    // chat_only (None on the text prompts), calls_seen.
    assert_eq!(
        scores.total,
        [
            1.0 + 0.0 + 0.5 + 1.0 + 1.0 + 1.0,
            0.0 + 0.0 + 0.5 + 0.0 + 1.0 + 1.0,
            1.0 + 1.0 + 0.5 + 0.0 + 1.0 + 1.0 + 1.0
        ]
    );
    let summary = scores.summary();
    assert_eq!((summary[5].1, summary[5].2), (1.0, 0.0));
    let again = rewards.score(&batch).await.unwrap();
    assert_eq!(again.per_function[4].values, [2.0, 2.0, 2.0]);
    // The functions share one process, as in TRL: calls_seen reads the
    // count calls_so_far keeps.
    assert_eq!(again.per_function[6].values, [2.0, 2.0, 2.0]);
}

/// What a Python reward function cannot give is an error naming it, never
/// a silent zero; a function that is not there stops the start.
#[tokio::test]
async fn python_reward_functions_that_fail_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my_rewards.py");
    std::fs::write(&file, TRL_REWARDS).unwrap();
    let f =
        |name: &str| json!({"name": "python", "function": format!("{}:{name}", file.display())});
    for (name, says) in [
        ("one_value", "returned 1 values for 2 completions"),
        ("verifier_down", "RuntimeError: verifier down"),
    ] {
        let e = registry(f(name))
            .score(&[input("a", None), input("b", None)])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("`{name}`")) && e.contains(says), "{e}");
    }
    let e = registry(f("nothing")).prepare().unwrap_err().to_string();
    assert!(e.contains("has no function 'nothing'"), "{e}");
    let e = config_error(json!({"name": "python", "function": "my_rewards.py"}));
    assert!(e.contains("path/to/file.py:FUNCTION"), "{e}");
    let e = config_error(json!({"name": "python", "function": "a.py:f", "timeout_s": 0}));
    assert!(e.contains("timeout_s"), "{e}");
}

/// `async def` reward functions run together, as TRL gathers them (an LLM
/// judge's requests overlap): two that each wait for the other to be in
/// flight both return, beside a plain one that runs first; a callable
/// instance whose `__call__` is async counts too (TRL's is_async_callable),
/// and its class's file is what a resume compares.
#[tokio::test]
async fn async_python_reward_functions_run_together() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("judges.py");
    std::fs::write(
        &file,
        r#"
import asyncio

in_flight = 0
order = []


async def meet():
    global in_flight
    in_flight += 1
    for _ in range(1000):
        if in_flight >= 2:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the other judge never came")


async def first_judge(completions, **kwargs):
    await meet()
    order.append("first")
    return [1.0] * len(completions)


class SecondJudge:
    async def __call__(self, completions, log_metric, **kwargs):
        await meet()
        log_metric("seen_before_me", len(order))
        return [2.0] * len(completions)


second_judge = SecondJudge()


def plain(completions, **kwargs):
    order.append("plain")
    return [0.5] * len(completions)
"#,
    )
    .unwrap();
    let f =
        |name: &str| json!({"name": "python", "function": format!("{}:{name}", file.display())});
    let rewards = registry(json!([f("first_judge"), f("plain"), f("second_judge")]));
    rewards.prepare().unwrap();
    let functions = rewards.python_functions();
    assert!(
        functions[2]["source_sha256"]
            .as_str()
            .is_some_and(|h| h.len() == 64),
        "{functions:?}"
    );
    let scores = rewards
        .score(&[input("a", None), input("b", None)])
        .await
        .unwrap();
    assert_eq!(scores.total, [3.5, 3.5]);
    // The plain function ran before the judges.
    let seen = scores.logged.metrics["seen_before_me"][0];
    assert!((1.0..=2.0).contains(&seen), "{seen}");
}

/// TRL's `log_extra(column, values)` and `log_metric(name, value)` reach a
/// Python function as keywords (here required ones): the columns come back
/// one value per completion (what JSON cannot hold as its text), the
/// metrics each value logged (a NaN left out); a column of the wrong length
/// is an error naming it.
#[tokio::test]
async fn python_reward_functions_log_extra_columns_and_metrics_as_in_trl() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("logging_rewards.py");
    std::fs::write(
        &file,
        r#"
def graded(completions, log_extra, log_metric, **kwargs):
    lengths = [len(c) for c in completions]
    log_extra("length", lengths)
    log_extra("parsed", [{1, 2} for _ in completions])
    log_metric("mean_length", sum(lengths) / len(lengths))
    log_metric("mean_length", 0.0)
    log_metric("nothing", float("nan"))
    return [float(n) for n in lengths]


def short_column(completions, log_extra, **kwargs):
    log_extra("first", [1])
    return [0.0] * len(completions)
"#,
    )
    .unwrap();
    let spec =
        |name: &str| json!({"name": "python", "function": format!("{}:{name}", file.display())});
    let rewards = registry(spec("graded"));
    rewards.prepare().unwrap();
    let scores = rewards
        .score(&[input("abc", None), input("a", None)])
        .await
        .unwrap();
    assert_eq!(scores.total, [3.0, 1.0]);
    assert_eq!(scores.logged.extra["length"], [json!(3), json!(1)]);
    assert_eq!(scores.logged.extra["parsed"][0], json!("{1, 2}"));
    assert_eq!(scores.logged.metrics["mean_length"], [2.0, 0.0]);
    assert_eq!(scores.logged.metric_means()["mean_length"], 1.0);
    assert!(!scores.logged.metric_means().contains_key("nothing"));
    assert_eq!(
        scores.logged.extra_of(1),
        json!({"length": 1, "parsed": "{1, 2}"})
            .as_object()
            .unwrap()
            .clone()
    );
    let e = registry(spec("short_column"))
        .score(&[input("a", None), input("b", None)])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("log_extra(\"first\", ...) logged 1 values for 2 completions"),
        "{e}"
    );
}

/// The rows' other columns reach a Python function as TRL passes them: one
/// keyword each, the values as read (a dict stays a dict, a number a
/// number); the answer column is one of them.
#[tokio::test]
async fn python_reward_functions_take_every_column_of_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my_rewards.py");
    std::fs::write(&file, TRL_REWARDS).unwrap();
    let rewards = registry(json!({
        "name": "python",
        "function": format!("{}:cases_and_level", file.display()),
    }));
    let row = |cases: usize, level: u32| {
        let cases: Vec<Value> = (0..cases)
            .map(|i| json!({"input": i.to_string(), "output": i.to_string()}))
            .collect();
        input("```python\nprint(1)\n```", Some("ignored")).with_columns(Some(
            json!({"solution": "abc", "level": level, "verification_info": {"test_cases": cases}})
                .to_string(),
        ))
    };
    let scores = rewards.score(&[row(2, 1), row(0, 5)]).await.unwrap();
    assert_eq!(scores.per_function[0].values, [2.0 + 1.0 + 3.0, 5.0 + 3.0]);

    // TRL's trainer_state, as the training loop sets it.
    let rewards = registry(json!({
        "name": "python",
        "function": format!("{}:progress", file.display()),
    }));
    rewards.set_trainer_state(6, 10, 2.0);
    let scores = rewards.score(&[input("x", None)]).await.unwrap();
    assert_eq!(scores.per_function[0].values, [0.6 + 2.0]);

    // TRL's completion_ids; a completion that called tools is its turns.
    let rewards = registry(json!({
        "name": "python",
        "function": format!("{}:shapes", file.display()),
    }));
    let chat = |ids: Vec<u32>, turns: Vec<Value>| {
        input("x", None)
            .with_messages(Some(vec![model::tokenizer::ChatMessage::user("?")]))
            .with_completion(ids, turns)
    };
    let turns = vec![
        json!({"role": "assistant", "content": "<tool_call>..</tool_call>",
               "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}),
        json!({"role": "tool", "name": "f", "content": "1"}),
        json!({"role": "assistant", "content": "1"}),
    ];
    let scores = rewards
        .score(&[chat(vec![1, 2, 3], Vec::new()), chat(vec![4; 7], turns)])
        .await
        .unwrap();
    assert_eq!(scores.per_function[0].values, [3.0 + 10.0, 7.0 + 30.0]);
}
