//! The OpenAI/vLLM HTTP API of the real binary on the tiny model: shapes,
//! RL extensions, determinism, stop conditions and error statuses.

mod common;

use common::{Server, assert_error, merged};
use serde_json::{Value, json};

/// `field: value` added to a completions `body` is a 400 whose `param`
/// names the field.
async fn assert_refused(s: &Server, mut body: Value, field: &str, value: Value) {
    body[field] = value;
    let (st, b) = s.post("/v1/completions", &body).await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], field, "{b}");
}

/// The stderr of a server started with `flags` on `model`, which must stop
/// with an error at start.
fn refused_at_start(flags: &[&str], model: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollout-server"))
        .args(["--port", "0", "--grpc-port", "0"])
        .args(flags)
        .arg(model)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{flags:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn text(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn completion_basic_shape_and_usage() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "1+1=", "max_tokens": 5, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["model"], "tiny");
    let c = &r["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["stop_reason"].is_null());
    assert!(c["logprobs"].is_null());
    assert_eq!(r["usage"]["completion_tokens"], 5);
    assert_eq!(r["usage"]["prompt_tokens"], 4);
    assert_eq!(r["usage"]["total_tokens"], 9);
    assert_eq!(r["metadata"]["weight_version"], 0);
    assert_eq!(c["metadata"]["weight_version"], 0);
    // Default max_tokens is 16; no model field is fine.
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "ab", "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 16);
}

#[tokio::test]
async fn n_samples_and_prompt_batches_index_as_prompt_times_n_plus_j() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": ["ab", "cde"], "n": 3, "max_tokens": 4, "seed": 7,
                    "return_token_ids": true, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let plen = c["prompt_token_ids"].as_array().unwrap().len();
        assert_eq!(plen, if i < 3 { 2 } else { 3 });
        assert_eq!(c["token_ids"].as_array().unwrap().len(), 4);
    }
    assert_eq!(r["usage"]["prompt_tokens"], 5);
    assert_eq!(r["usage"]["completion_tokens"], 24);
    // The n samples of one prompt differ (seed + j), token-id prompts work too.
    let ids: Vec<&Value> = choices[..3].iter().map(|c| &c["token_ids"]).collect();
    assert!(ids[0] != ids[1] || ids[1] != ids[2], "{ids:?}");
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": [[5, 6, 7], [8]], "n": 2, "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn logprobs_shapes_completions_and_chat() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "hello", "max_tokens": 6, "logprobs": 3, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 6);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), 6);
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!((3..=4).contains(&top.len()), "{top:?}");
        let tok = tokens[i].as_str().unwrap();
        let own = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(own <= 0.0);
        assert_eq!(
            top[tok].as_f64().unwrap(),
            own,
            "sampled token is in top_logprobs"
        );
    }
    // logprobs = 0: the sampled token's only.
    let (_, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 2, "logprobs": 0}),
        )
        .await;
    assert!(r["choices"][0]["logprobs"]["token_logprobs"][0].is_number());

    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                    "logprobs": true, "top_logprobs": 2, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for e in content {
        assert!(e["token"].is_string());
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            e["token"].as_str().unwrap()
        );
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
    }
}

#[tokio::test]
async fn chat_completion_shape() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
                    "max_completion_tokens": 4, "n": 2, "return_token_ids": true,
                    "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    let c = &r["choices"][1];
    assert_eq!(c["index"], 1);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(c["token_ids"].as_array().unwrap().len(), 4);
    let prompt_ids = r["prompt_token_ids"].as_array().unwrap();
    assert_eq!(
        prompt_ids.len() as u64,
        r["usage"]["prompt_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn streaming_completions_end_with_usage_and_done_and_match_non_streaming() {
    let s = Server::start(&[]).await;
    let body = json!({"prompt": "abc", "max_tokens": 8, "n": 2, "seed": 3, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true},
                      "client_tag": "rank-1", "return_token_ids": true});
    let events = s.post_stream("/v1/completions", &body, &[]).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 16);
    let mut texts = [String::new(), String::new()];
    let mut ids: [Vec<Value>; 2] = [vec![], vec![]];
    let mut finished = 0;
    for c in &chunks {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["metadata"]["client_tag"], "rank-1");
        for ch in c["choices"].as_array().unwrap() {
            assert_eq!(ch["metadata"]["client_tag"], "rank-1");
            let i = ch["index"].as_u64().unwrap() as usize;
            texts[i].push_str(ch["text"].as_str().unwrap());
            ids[i].extend(ch["token_ids"].as_array().unwrap().iter().cloned());
            if !ch["finish_reason"].is_null() {
                finished += 1;
            }
        }
    }
    assert_eq!(finished, 2);
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain.as_object_mut().unwrap().remove("stream_options");
    let (st, r) = s.post("/v1/completions", &plain).await;
    assert_eq!(st, 200, "{r}");
    for i in 0..2 {
        assert_eq!(texts[i], text(&r, i));
        assert_eq!(Value::Array(ids[i].clone()), r["choices"][i]["token_ids"]);
    }
}

/// vLLM's `stream_options.continuous_usage_stats`: every chunk carries the
/// usage so far; without it only the last one does.
#[tokio::test]
async fn continuous_usage_stats_put_usage_on_every_chunk() {
    let s = Server::start(&[]).await;
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "abc", "max_tokens": 5, "n": 2, "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                   "n": 2, "ignore_eos": true}),
        ),
    ] {
        for continuous in [false, true] {
            let mut body = body.clone();
            body["stream"] = json!(true);
            body["stream_options"] =
                json!({"include_usage": true, "continuous_usage_stats": continuous});
            let events = s.post_stream(path, &body, &[]).await;
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let (last, rest) = chunks.split_last().unwrap();
            assert_eq!(last["usage"]["completion_tokens"], 10, "{path}: {last}");
            let prompt_tokens = last["usage"]["prompt_tokens"].clone();
            let mut seen = 0;
            for c in rest {
                if !continuous {
                    assert!(c["usage"].is_null(), "{path}: {c}");
                    continue;
                }
                let u = &c["usage"];
                assert_eq!(u["prompt_tokens"], prompt_tokens, "{path}: {c}");
                let done = u["completion_tokens"].as_u64().unwrap();
                assert!(done >= seen, "{path}: {c}");
                assert_eq!(
                    u["total_tokens"].as_u64(),
                    Some(done + prompt_tokens.as_u64().unwrap())
                );
                seen = done;
            }
            if continuous {
                assert_eq!(seen, 10, "{path}");
            }
        }
    }
}

#[tokio::test]
async fn streaming_chat_with_header_client_tag() {
    let s = Server::start(&[]).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                      "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true});
    let events = s
        .post_stream(
            "/v1/chat/completions",
            &body,
            &[("X-VLLM-Client-Tag", "rank-7")],
        )
        .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["metadata"]["client_tag"], "rank-7", "{c}");
        for ch in c["choices"].as_array().unwrap() {
            assert_eq!(ch["metadata"]["client_tag"], "rank-7");
            content.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain["seed"] = json!(1);
    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let (_, r) = s.post("/v1/chat/completions", &plain).await;
    let events = s.post_stream("/v1/chat/completions", &streamed, &[]).await;
    let mut again = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            again.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(
        again,
        r["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn client_tag_from_field_and_header_on_response_and_choices() {
    let s = Server::start(&[]).await;
    let (_, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "n": 2, "max_tokens": 2, "client_tag": "rank-0"}),
        )
        .await;
    assert_eq!(r["metadata"]["client_tag"], "rank-0");
    for c in r["choices"].as_array().unwrap() {
        assert_eq!(c["metadata"]["client_tag"], "rank-0");
    }
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("X-VLLM-Client-Tag", "rank-3")
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["metadata"]["client_tag"], "rank-3");
    assert_eq!(r["choices"][0]["metadata"]["client_tag"], "rank-3");
    // No tag: no client_tag key, but the weight version is there.
    let (_, r) = s
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert!(r["metadata"].get("client_tag").is_none());
    assert_eq!(r["metadata"]["weight_versions"], json!([0]));
}

#[tokio::test]
async fn same_seed_same_completion_and_greedy_is_deterministic() {
    let s = Server::start(&[]).await;
    let body = json!({"prompt": "abc", "max_tokens": 12, "seed": 1234, "temperature": 1.0,
                      "ignore_eos": true});
    let (_, a) = s.post("/v1/completions", &body).await;
    let (_, b) = s.post("/v1/completions", &body).await;
    assert_eq!(text(&a, 0), text(&b, 0));
    let mut other = body.clone();
    other["seed"] = json!(99);
    let (_, c) = s.post("/v1/completions", &other).await;
    assert_ne!(
        text(&a, 0),
        text(&c, 0),
        "different seeds, same 12 random tokens"
    );
    // Seeded results do not depend on what else is in the batch.
    let mut handles = Vec::new();
    let s = std::sync::Arc::new(s);
    for i in 0..6 {
        let s = s.clone();
        let body = if i == 0 {
            body.clone()
        } else {
            json!({"prompt": "zzz", "max_tokens": 12, "ignore_eos": true})
        };
        handles.push(tokio::spawn(async move {
            s.post("/v1/completions", &body).await
        }));
    }
    let (_, d) = handles.remove(0).await.unwrap();
    assert_eq!(text(&a, 0), text(&d, 0));
    for h in handles {
        h.await.unwrap();
    }

    let greedy = json!({"prompt": "abc", "max_tokens": 12, "temperature": 0, "n": 3,
                        "ignore_eos": true});
    let (_, g1) = s.post("/v1/completions", &greedy).await;
    let (_, g2) = s.post("/v1/completions", &greedy).await;
    for i in 0..3 {
        assert_eq!(text(&g1, i), text(&g1, 0));
        assert_eq!(text(&g2, i), text(&g1, 0));
    }
}

#[tokio::test]
async fn echo_prepends_prompt_and_its_logprobs() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "abcd", "max_tokens": 3, "echo": true, "logprobs": 1,
                    "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let t = text(&r, 0);
    assert!(t.starts_with("abcd"), "{t}");
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4 + 3);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].is_number());
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["text_offset"][4], 4);
    let (_, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "abcd", "max_tokens": 3, "echo": true}),
        )
        .await;
    assert!(text(&r, 0).starts_with("abcd"));
}

/// vLLM's `prompt_logprobs` (per choice on /v1/completions, top-level on
/// /v1/chat/completions) and OpenAI's scoring form, `echo` with
/// `max_tokens: 0`.
#[tokio::test]
async fn prompt_logprobs_and_echo_scoring() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "abcd", "max_tokens": 2, "n": 2, "prompt_logprobs": 2,
                    "return_token_ids": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let ids: Vec<u64> = r["choices"][0]["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let plp = r["choices"][0]["prompt_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(plp.len(), ids.len());
    assert!(plp[0].is_null(), "nothing precedes the first token");
    for (i, entry) in plp.iter().enumerate().skip(1) {
        let m = entry.as_object().unwrap();
        // The prompt token's own entry, and the 2 most likely (ranks 1, 2).
        let own = &m[&ids[i].to_string()];
        let own_rank = own["rank"].as_u64().unwrap();
        assert!(
            own_rank >= 1 && own["logprob"].as_f64().unwrap() <= 0.0,
            "{own}"
        );
        assert!(own["decoded_token"].is_string());
        let mut ranks: Vec<u64> = m.values().map(|e| e["rank"].as_u64().unwrap()).collect();
        ranks.sort();
        assert!(ranks == [1, 2] || ranks == [1, 2, own_rank], "{entry}");
        assert_eq!(m.len(), if own_rank <= 2 { 2 } else { 3 }, "{entry}");
        let best = m.values().find(|e| e["rank"] == 1).unwrap();
        assert!(
            m.values()
                .all(|e| e["logprob"].as_f64() <= best["logprob"].as_f64())
        );
    }
    // Each choice carries its prompt's.
    assert_eq!(
        r["choices"][1]["prompt_logprobs"],
        r["choices"][0]["prompt_logprobs"]
    );

    // Scoring: echo with max_tokens 0 is the prompt alone, with its
    // log-probs, which are prompt_logprobs' own entries.
    let (st, e) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "abcd", "max_tokens": 0, "echo": true, "logprobs": 0,
                    "return_token_ids": true}),
        )
        .await;
    assert_eq!(st, 200, "{e}");
    let c = &e["choices"][0];
    assert_eq!(c["text"], "abcd");
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(c["token_ids"], json!([]));
    assert_eq!(e["usage"]["completion_tokens"], 0);
    assert!(c.get("prompt_logprobs").is_none(), "not asked for");
    let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len());
    assert!(lps[0].is_null());
    for i in 1..ids.len() {
        assert_eq!(lps[i], plp[i][ids[i].to_string()]["logprob"], "token {i}");
    }
    // The same streamed: the prompt, then the end.
    let chunks: Vec<Value> = s
        .post_stream(
            "/v1/completions",
            &json!({"prompt": "abcd", "max_tokens": 0, "echo": true, "stream": true}),
            &[],
        )
        .await
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, "abcd");
    let last = chunks
        .iter()
        .rev()
        .find(|c| !c["choices"][0]["finish_reason"].is_null());
    assert_eq!(last.unwrap()["choices"][0]["finish_reason"], "length");

    // Chat: one top-level list, as long as the rendered prompt.
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                    "prompt_logprobs": 0, "return_token_ids": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let plp = r["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plp.len(), r["prompt_token_ids"].as_array().unwrap().len());
    assert_eq!(
        plp[1].as_object().unwrap().len(),
        1,
        "only the prompt token's"
    );

    // vLLM's refusals.
    for (body, param) in [
        (
            json!({"prompt": "ab", "prompt_logprobs": 1, "stream": true}),
            "prompt_logprobs",
        ),
        (
            json!({"prompt": "ab", "prompt_logprobs": 21}),
            "prompt_logprobs",
        ),
        (
            json!({"prompt": "ab", "prompt_logprobs": -1}),
            "prompt_logprobs",
        ),
        (json!({"prompt": "ab", "max_tokens": 0}), "max_tokens"),
    ] {
        let (st, b) = s.post("/v1/completions", &body).await;
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
    }
}

#[tokio::test]
async fn stop_strings_and_stop_token_ids_end_a_choice() {
    let s = Server::start(&[]).await;
    // Seeded sampling (the random tiny model repeats one token greedily).
    let base = json!({"prompt": "hello", "max_tokens": 24, "seed": 42, "ignore_eos": true,
                      "return_token_ids": true});
    let (_, r) = s.post("/v1/completions", &base).await;
    let full = text(&r, 0);
    let ids = r["choices"][0]["token_ids"].as_array().unwrap().clone();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    // A stop string taken from the output itself.
    let stop: String = chars[3..5].iter().collect();
    let cut = full.find(&stop).unwrap();
    let mut body = base.clone();
    body["stop"] = json!([stop.clone(), "never-appears"]);
    let (_, r) = s.post("/v1/completions", &body).await;
    assert_eq!(text(&r, 0), full[..cut]);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["choices"][0]["stop_reason"], json!(stop));
    // Streaming gives the same cut text.
    body["stream"] = json!(true);
    let events = s.post_stream("/v1/completions", &body, &[]).await;
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, full[..cut]);
    // include_stop_str_in_output keeps it.
    let mut body = base.clone();
    body["stop"] = json!(stop.clone());
    body["include_stop_str_in_output"] = json!(true);
    let (_, r) = s.post("/v1/completions", &body).await;
    assert_eq!(text(&r, 0), full[..cut + stop.len()]);

    // A stop token id: the completion ends with (and includes) it.
    let stop_id = ids[4].as_u64().unwrap();
    let first = ids
        .iter()
        .position(|x| x.as_u64() == Some(stop_id))
        .unwrap();
    let mut body = base.clone();
    body["stop_token_ids"] = json!([stop_id]);
    let (_, r) = s.post("/v1/completions", &body).await;
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], json!(stop_id));
    assert_eq!(c["token_ids"].as_array().unwrap().len(), first + 1);
}

/// The first token id of the first choice of a completion (`body` asks for
/// `return_token_ids`).
async fn first_token(s: &Server, body: &Value) -> u64 {
    let (st, r) = s.post("/v1/completions", body).await;
    assert_eq!(st, 200, "{r}");
    r["choices"][0]["token_ids"][0].as_u64().unwrap()
}

/// vLLM's `min_tokens`: the tiny random model repeats one token greedily;
/// made a stop token, it ends the completion at once, unless `min_tokens`
/// keeps it from being sampled until that many tokens are out.
#[tokio::test]
async fn min_tokens_holds_off_stop_tokens() {
    let s = Server::start(&[]).await;
    let base = json!({"prompt": "hello", "max_tokens": 12, "temperature": 0.0,
                      "ignore_eos": true, "return_token_ids": true});
    let greedy = first_token(&s, &base).await;
    let mut body = base.clone();
    body["stop_token_ids"] = json!([greedy]);
    let (_, r) = s.post("/v1/completions", &body).await;
    assert_eq!(r["choices"][0]["token_ids"], json!([greedy]), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    body["min_tokens"] = json!(5);
    let (st, r) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    let c = &r["choices"][0];
    let ids: Vec<u64> = c["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(ids.len() > 5, "{r}");
    assert!(!ids[..5].contains(&greedy), "{ids:?}");
    match c["finish_reason"].as_str() {
        Some("stop") => assert_eq!(ids.last(), Some(&greedy)),
        _ => assert_eq!(ids.len(), 12),
    }

    // More than max_tokens, or negative: vLLM's 400s.
    for (min, max) in [(13, 12), (-1, 12)] {
        let mut bad = body.clone();
        bad["min_tokens"] = json!(min);
        bad["max_tokens"] = json!(max);
        let (st, b) = s.post("/v1/completions", &bad).await;
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], "min_tokens", "{b}");
    }
    let (st, b) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}],
                    "max_completion_tokens": 3, "min_tokens": 4}),
        )
        .await;
    assert_error(st, &b, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens=3"),
        "{b}"
    );
}

/// OpenAI's `logit_bias`: +100 makes a token the greedy choice, in
/// completions and chat; keys that are not token ids of the vocabulary are
/// 400s naming the field, and so is best_of above 1.
#[tokio::test]
async fn logit_bias_steers_sampling_bad_keys_and_best_of_are_400s() {
    let s = Server::start(&[]).await;
    let base = json!({"prompt": "hello", "max_tokens": 4, "temperature": 0.0,
                      "ignore_eos": true, "return_token_ids": true});
    let greedy = first_token(&s, &base).await;
    let other = if greedy == 7 { 8 } else { 7 };
    let mut body = base.clone();
    body["logit_bias"] = json!({other.to_string(): 100});
    let (st, r) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["token_ids"], json!(vec![other; 4]), "{r}");
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "temperature": 0.0, "ignore_eos": true, "return_token_ids": true,
                    "logit_bias": {other.to_string(): 100}}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["token_ids"], json!(vec![other; 2]), "{r}");

    // best_of, which vLLM V1 dropped, is refused rather than ignored.
    let mut best = base.clone();
    best["best_of"] = json!(3);
    let (st, b) = s.post("/v1/completions", &best).await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "best_of", "{b}");
    best["best_of"] = json!(1);
    assert_eq!(s.post("/v1/completions", &best).await.0, 200);
    for bias in [json!({"abc": 1}), json!({"100000": 1})] {
        let mut bad = base.clone();
        bad["logit_bias"] = bias;
        let (st, b) = s.post("/v1/completions", &bad).await;
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], "logit_bias", "{b}");
    }
}

/// vLLM's /tokenize and /detokenize: the ids generation sees, for a text
/// prompt and for chat messages, and back.
#[tokio::test]
async fn tokenize_and_detokenize_match_what_generation_sees() {
    let s = Server::start(&[]).await;
    let generate = |body: Value| {
        let mut body = body;
        body["max_tokens"] = json!(1);
        body["return_token_ids"] = json!(true);
        body
    };
    let (_, r) = s
        .post("/v1/completions", &generate(json!({"prompt": "12+34="})))
        .await;
    let prompt_ids = r["choices"][0]["prompt_token_ids"].clone();
    let (st, t) = s
        .post(
            "/tokenize",
            &json!({"model": "tiny", "prompt": "12+34=", "return_token_strs": true}),
        )
        .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["tokens"], prompt_ids);
    assert_eq!(t["count"], prompt_ids.as_array().unwrap().len());
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    let strs: Vec<&str> = t["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(strs.concat(), "12+34=");

    let messages = json!([{"role": "user", "content": "hi"}]);
    let (_, r) = s
        .post(
            "/v1/chat/completions",
            &generate(json!({"messages": messages})),
        )
        .await;
    let (st, t) = s.post("/tokenize", &json!({"messages": messages})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["tokens"], r["prompt_token_ids"], "{r}");
    assert!(t["token_strs"].is_null());

    let (st, d) = s.post("/detokenize", &json!({"tokens": prompt_ids})).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["prompt"], "12+34=");

    // Bad input: an id past the vocabulary, another model, no prompt.
    let (st, b) = s
        .post("/detokenize", &json!({"tokens": [0, 1_000_000]}))
        .await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "tokens");
    let (st, b) = s
        .post("/tokenize", &json!({"model": "other", "prompt": "x"}))
        .await;
    assert_error(st, &b, 404);
    let (st, b) = s.post("/tokenize", &json!({"text": "x"})).await;
    assert_error(st, &b, 400);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("prompt"),
        "{b}"
    );
}

#[tokio::test]
async fn error_statuses_are_vllm_error_objects() {
    let s = Server::start(&[]).await;
    let (st, b) = s.post_raw("/v1/completions", "{\"prompt\": \"x\",").await;
    assert_error(st, &b, 400);
    let (st, b) = s.post_raw("/v1/chat/completions", "not json").await;
    assert_error(st, &b, 400);
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": "many"}),
        )
        .await;
    assert_error(st, &b, 400);
    assert_eq!(
        b["error"]["param"], "max_tokens",
        "a wrong type names its field"
    );
    let (st, b) = s.post("/v1/completions", &json!({"prompt": 12})).await;
    assert_error(st, &b, 400);
    let (st, b) = s.post("/v1/completions", &json!({"max_tokens": 3})).await;
    assert_error(st, &b, 400);
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "temperature": -1}),
        )
        .await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "temperature");
    for (field, value) in [
        ("top_p", json!(1.5)),
        ("n", json!(0)),
        ("n", json!(5000)),
        ("max_tokens", json!(0)),
        ("logprobs", json!(50)),
        ("presence_penalty", json!(3)),
        ("top_k", json!(-5)),
    ] {
        assert_refused(&s, json!({"prompt": "x"}), field, value).await;
    }
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": [100000], "max_tokens": 1}),
        )
        .await;
    assert_error(st, &b, 400);
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "abc", "max_tokens": 1000}),
        )
        .await;
    assert_error(st, &b, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context length"),
        "{b}"
    );
    let (st, b) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}),
        )
        .await;
    assert_error(st, &b, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context length")
    );
    let (st, b) = s
        .post("/v1/completions", &json!({"model": "gpt-9", "prompt": "x"}))
        .await;
    assert_error(st, &b, 404);
    assert_eq!(b["error"]["message"], "The model `gpt-9` does not exist.");
    let (st, b) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_error(st, &b, 404);
    let (st, b) = s
        .post("/v1/chat/completions", &json!({"messages": []}))
        .await;
    assert_error(st, &b, 400);
    // The server is fine after all that.
    let (st, _) = s
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let s = Server::start(&["--api-key", "sekret"]).await;
    let (st, b) = s
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_error(st, &b, 401);
    let r = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekret")
        .json(&json!({"prompt": "x", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for open in ["/health", "/metrics", "/version"] {
        let r = s.client.get(s.url(open)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{open}");
    }
}

#[tokio::test]
async fn models_version_health_and_metrics() {
    let s = Server::start(&[]).await;
    let m: Value = s
        .client
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["max_model_len"], 256);
    let v: Value = s
        .client
        .get(s.url("/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["version"].is_string());
    assert_eq!(v["weight_version"], 0);
    let (st, _) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "abc", "max_tokens": 3, "n": 2, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200);
    let text = s.metrics_with("tandem:kv_cache_usage_perc 0.0").await;
    for name in [
        "tandem:num_requests_running",
        "tandem:num_requests_waiting",
        "tandem:prompt_tokens_total 3",
        "tandem:generation_tokens_total 6",
        "tandem:request_success_total{finished_reason=\"length\"} 2",
        "tandem:time_to_first_token_seconds_bucket",
        "tandem:inter_token_latency_seconds_count 4",
        "tandem:e2e_request_latency_seconds_count 2",
        "tandem:weight_version 0",
        "tandem:kv_cache_usage_perc 0.0",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
}

#[tokio::test]
async fn client_disconnect_cancels_and_frees_the_batch() {
    let s = Server::start(&["--max-num-seqs", "4"]).await;
    // A long streaming request, dropped after its first chunk.
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": "a", "n": 4, "max_tokens": 250, "ignore_eos": true,
                      "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    use futures::StreamExt;
    let _ = stream.next().await;
    // All 4 slots of the KV cache are taken (vLLM's kv_cache_usage_perc;
    // the gauge is set at the end of the engine step that sent the chunk).
    let full = "tandem:kv_cache_usage_perc 1.0";
    let usage = s.metrics_with(full).await;
    assert!(usage.contains(full), "{usage}");
    drop(stream);
    // Its 4 slots come back: a new request with n=4 (the whole batch) runs.
    let started = std::time::Instant::now();
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "b", "n": 4, "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(started.elapsed().as_secs() < 60);
    let metrics = s.metrics().await;
    assert!(metrics.contains("finished_reason=\"abort\""), "{metrics}");
    // More samples than --max-num-seqs run in turns, as in vLLM.
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "c", "n": 9, "max_tokens": 3, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 9);
    let mut indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    indices.sort();
    assert_eq!(indices, (0..9).collect::<Vec<u64>>());
    // Nothing runs: the cache is free again.
    let free = "tandem:kv_cache_usage_perc 0.0";
    let usage = s.metrics_with(free).await;
    assert!(usage.contains(free), "{usage}");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut s = Server::start(&[]).await;
    let (st, _) = s
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}))
        .await;
    assert_eq!(st, 200);
    let status = s
        .terminate(20)
        .expect("server still running 20 s after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

/// An engine thread that dies (a panic, injected in debug builds at its 3rd
/// step) fails the request it was running with a 500 error object, never a
/// hang; then /health says 503 and new requests are refused with 503.
#[tokio::test]
async fn a_dead_engine_fails_requests_and_health_says_503() {
    let s = Server::start_with_env(
        &e2e::tiny_model(),
        &[],
        &[
            ("TANDEM_FAULT_ENGINE_PANIC_AT_STEP", "3"),
            ("RUST_BACKTRACE", "0"),
        ],
    )
    .await;
    let request = json!({"model": "tiny", "prompt": "1+1=", "max_tokens": 20, "ignore_eos": true});
    let (status, body) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.post("/v1/completions", &request),
    )
    .await
    .expect("the request must end, not hang");
    assert_error(status, &body, 500);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("engine stopped"),
        "{body}"
    );
    let health = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let (status, body) = s.post("/v1/completions", &request).await;
    assert_error(status, &body, 503);
}

/// vLLM's `--max-logprobs`: the cap on top log-probs a request may ask for
/// (default 20); -1 allows the whole vocabulary.
#[tokio::test]
async fn max_logprobs_caps_what_a_request_may_ask() {
    let s = Server::start(&["--max-logprobs", "2"]).await;
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "ab", "max_tokens": 1, "logprobs": 3}),
        )
        .await;
    assert_error(st, &b, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-logprobs"),
        "{b}"
    );
    let (st, _) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "ab", "max_tokens": 1, "logprobs": 2}),
        )
        .await;
    assert_eq!(st, 200);
    let all = Server::start(&["--max-logprobs", "-1"]).await;
    let (st, r) = all
        .post(
            "/v1/completions",
            &json!({"prompt": "ab", "max_tokens": 1, "logprobs": 50, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let top = r["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap();
    assert!(top.len() >= 40, "{} entries", top.len());
}

/// vLLM's `truncate_prompt_tokens` keeps a prompt's last tokens; fields
/// vLLM reads that this server does not implement are refused by name,
/// not ignored.
#[tokio::test]
async fn truncated_prompts_and_refused_fields() {
    let s = Server::start(&[]).await;
    let ids = |r: &Value| -> Vec<u64> {
        r["choices"][0]["prompt_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let body = json!({"prompt": "abcdefgh", "max_tokens": 1, "return_token_ids": true,
                      "echo": true});
    let (_, full) = s.post("/v1/completions", &body).await;
    let mut cut = body.clone();
    cut["truncate_prompt_tokens"] = json!(3);
    let (st, r) = s.post("/v1/completions", &cut).await;
    assert_eq!(st, 200, "{r}");
    let all = ids(&full);
    assert_eq!(ids(&r), all[all.len() - 3..].to_vec());
    assert!(text(&r, 0).starts_with("fgh"), "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 1,
                    "truncate_prompt_tokens": 4, "return_token_ids": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["prompt_token_ids"].as_array().unwrap().len(), 4);
    for (field, value) in [
        ("truncate_prompt_tokens", json!(0)),
        ("truncate_prompt_tokens", json!(100000)),
        ("suffix", json!("!")),
        (
            "response_format",
            json!({"type": "structural_tag", "structures": [], "triggers": []}),
        ),
        ("guided_grammar", json!("root ::= \"a\"")),
        ("use_beam_search", json!(true)),
    ] {
        assert_refused(&s, json!({"prompt": "ab", "max_tokens": 1}), field, value).await;
    }
    // The harmless values of those fields pass.
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "ab", "max_tokens": 1, "response_format": {"type": "text"},
                    "tool_choice": "auto", "use_beam_search": false}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
}

/// vLLM's guided decoding: `guided_regex`, `guided_choice` and their
/// `structured_outputs` forms. Every sample matches the whole pattern and
/// ends with EOS once it does (finish_reason `stop`); a pattern that does
/// not compile, another kind of structured output, two at once, or
/// `ignore_eos` (no way to end) are 400s naming the field.
#[tokio::test]
async fn guided_decoding_keeps_every_sample_in_the_pattern() {
    let s = Server::start(&[]).await;
    let cases = [
        (json!({"guided_regex": "[0-9]{2}"}), "^[0-9]{2}$"),
        (
            json!({"guided_choice": ["yes", "no", "1+1"]}),
            "^(yes|no|1\\+1)$",
        ),
        (
            json!({"structured_outputs": {"regex": "(ab|ba)c?"}}),
            "^(ab|ba)c?$",
        ),
        (
            json!({"structured_outputs": {"choice": ["x.y"]}}),
            "^x\\.y$",
        ),
    ];
    for (guided, expect) in cases {
        let body = merged(
            json!({"prompt": "12+7=", "n": 16, "max_tokens": 6,
                              "temperature": 1.5, "seed": 3}),
            &guided,
        );
        let (st, r) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{guided}: {r}");
        let re = regex::Regex::new(expect).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..16 {
            let t = text(&r, i);
            assert!(re.is_match(&t), "{guided}: {t:?}");
            assert_eq!(r["choices"][i]["finish_reason"], "stop", "{guided}: {r}");
            seen.insert(t);
        }
        // Sampled, not forced to one string.
        assert!(seen.len() > 1 || expect == "^x\\.y$", "{guided}: {seen:?}");
    }
    // Chat completions take it too.
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "2+2"}], "max_tokens": 4,
                    "guided_regex": "[0-9]"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let content = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.len() == 1 && content.as_bytes()[0].is_ascii_digit(),
        "{r}"
    );
    for (extra, param) in [
        (json!({"guided_regex": "("}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"structured_outputs": {"grammar": "root ::= \"a\""}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": 3}}),
            "structured_outputs.regex",
        ),
        (
            json!({"guided_regex": "a", "guided_choice": ["b"]}),
            "guided_choice",
        ),
        (
            json!({"guided_regex": "a", "ignore_eos": true}),
            "ignore_eos",
        ),
    ] {
        let body = merged(json!({"prompt": "ab", "max_tokens": 2}), &extra);
        let (st, b) = s.post("/v1/completions", &body).await;
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], param, "{extra}: {b}");
    }
}

/// vLLM's `allowed_token_ids`: only those ids are sampled; an empty list or
/// an id outside the vocabulary is a 400 naming the field.
#[tokio::test]
async fn allowed_token_ids_restrict_sampling() {
    let s = Server::start(&[]).await;
    let (st, r) = s
        .post(
            "/tokenize",
            &json!({"prompt": "78", "add_special_tokens": false}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let allowed: Vec<u64> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(allowed.len(), 2);
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "12+7=", "n": 4, "max_tokens": 6, "ignore_eos": true,
                    "temperature": 1.5, "seed": 1, "return_token_ids": true,
                    "allowed_token_ids": allowed}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let mut seen = std::collections::BTreeSet::new();
    for c in r["choices"].as_array().unwrap() {
        let ids = c["token_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 6, "{c}");
        for id in ids {
            assert!(allowed.contains(&id.as_u64().unwrap()), "{c}");
            seen.insert(id.as_u64().unwrap());
        }
    }
    assert_eq!(seen.len(), 2, "{r}");
    for value in [json!([]), json!([1_000_000])] {
        assert_refused(
            &s,
            json!({"prompt": "ab", "max_tokens": 1}),
            "allowed_token_ids",
            value,
        )
        .await;
    }
}

/// vLLM's `bad_words`: a banned sequence's last token cannot follow the
/// rest of it. Sampling only `1` and `2` with `12` banned: once a `1` is
/// out, only `1`s follow; `2` alone stays free.
#[tokio::test]
async fn bad_words_never_appear() {
    let s = Server::start(&[]).await;
    let (_, r) = s
        .post(
            "/tokenize",
            &json!({"prompt": "12", "add_special_tokens": false}),
        )
        .await;
    let ids = r["tokens"].clone();
    let body = |bad: Value| {
        json!({"prompt": "12+7=", "n": 8, "max_tokens": 8, "ignore_eos": true,
               "temperature": 2.0, "seed": 5, "allowed_token_ids": ids, "bad_words": bad})
    };
    let (st, r) = s.post("/v1/completions", &body(json!(["12"]))).await;
    assert_eq!(st, 200, "{r}");
    let texts: Vec<String> = (0..8).map(|i| text(&r, i)).collect();
    assert!(texts.iter().all(|t| !t.contains("12")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains('2')), "{texts:?}");
    // Without the ban the same samples say it.
    let (st, r) = s.post("/v1/completions", &body(json!([]))).await;
    assert_eq!(st, 200, "{r}");
    assert!((0..8).any(|i| text(&r, i).contains("12")), "{r}");
    // A one-token word is never sampled.
    let (st, r) = s.post("/v1/completions", &body(json!(["2"]))).await;
    assert_eq!(st, 200, "{r}");
    assert!((0..8).all(|i| text(&r, i) == "11111111"), "{r}");
    assert_refused(
        &s,
        json!({"prompt": "ab", "max_tokens": 1}),
        "bad_words",
        json!([""]),
    )
    .await;
}

/// JSON-schema guided decoding (vLLM's `guided_json`, OpenAI's
/// `response_format: json_schema`, `structured_outputs.json`): every
/// finished sample is JSON the schema accepts; a keyword the server would
/// have to ignore is a 400 naming the field.
#[tokio::test]
async fn json_schema_guided_decoding_gives_valid_json() {
    let s = Server::start(&[]).await;
    let schema = json!({
        "type": "object",
        "properties": {
            "answer": {"type": "integer", "minimum": 0, "exclusiveMaximum": 100},
            "unit": {"enum": ["m", "s"]},
            "ok": {"type": "boolean"},
            "day": {"type": "string", "format": "date"}
        },
        "required": ["answer", "ok", "day"]
    });
    for guided in [
        json!({"guided_json": schema}),
        json!({"guided_json": schema.to_string()}),
        json!({"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "a", "schema": schema}}}),
        json!({"structured_outputs": {"json": schema}}),
    ] {
        let body = merged(
            json!({"prompt": "12+7=", "n": 8, "max_tokens": 120, "seed": 9}),
            &guided,
        );
        let (st, r) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{guided}: {r}");
        for i in 0..8 {
            let t = text(&r, i);
            assert_eq!(r["choices"][i]["finish_reason"], "stop", "{t:?}");
            let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
            assert!(v["answer"].is_i64() && v["ok"].is_boolean(), "{t}");
            assert!((0..100).contains(&v["answer"].as_i64().unwrap()), "{t}");
            assert!(v.get("unit").is_none_or(|u| u == "m" || u == "s"), "{t}");
            let day: Vec<u32> = v["day"]
                .as_str()
                .unwrap()
                .split('-')
                .map(|p| p.parse().unwrap())
                .collect();
            assert!(day[0] >= 1 && (1..=12).contains(&day[1]) && (1..=31).contains(&day[2]));
        }
    }
    for (extra, param) in [
        (
            json!({"guided_json": {"type": "integer", "multipleOf": 2}}),
            "guided_json",
        ),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"structured_outputs": {"json": {"type": "string", "format": "uri"}}}),
            "structured_outputs.json",
        ),
    ] {
        let body = merged(json!({"prompt": "ab", "max_tokens": 2}), &extra);
        let (st, b) = s.post("/v1/completions", &body).await;
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], param, "{extra}: {b}");
    }
}

/// `response_format: json_object` (and vLLM's `structured_outputs.json_object`)
/// gives JSON objects; `disable_any_whitespace` gives JSON without blanks; a
/// pattern no token can begin is a 400 up front; a guide whose only way on
/// another rule bans fails the request with both named.
#[tokio::test]
async fn json_object_compact_json_and_guides_that_cannot_go_on() {
    let s = Server::start(&[]).await;
    for guided in [
        json!({"response_format": {"type": "json_object"}}),
        json!({"structured_outputs": {"json_object": true}}),
    ] {
        let body = merged(
            json!({"messages": [{"role": "user", "content": "JSON please"}],
                              "n": 8, "max_tokens": 220, "seed": 3}),
            &guided,
        );
        let (st, r) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200, "{guided}: {r}");
        let mut objects = 0;
        for c in r["choices"].as_array().unwrap() {
            let t = c["message"]["content"].as_str().unwrap();
            assert!(t.starts_with('{'), "{t:?}");
            if c["finish_reason"] == "stop" {
                let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
                assert!(v.is_object(), "{t}");
                objects += 1;
            }
        }
        assert!(objects > 0, "{guided}: no choice finished: {r}");
    }

    let schema = json!({"type": "object",
                        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"},
                                       "xs": {"type": "array", "items": {"type": "integer"}}},
                        "required": ["n", "ok", "xs"]});
    let body = json!({"prompt": "12+7=", "n": 8, "max_tokens": 120, "seed": 9,
                      "structured_outputs": {"json": schema, "disable_any_whitespace": true}});
    let (st, r) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    for i in 0..8 {
        let t = text(&r, i);
        assert_eq!(r["choices"][i]["finish_reason"], "stop", "{t:?}");
        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        assert!(v["xs"].is_array(), "{t}");
        // No string in the schema: a blank could only be whitespace.
        assert!(!t.contains(char::is_whitespace), "{t:?}");
    }

    // `[a&&b]` is a character class with nothing in it.
    let body = json!({"prompt": "ab", "max_tokens": 4, "guided_regex": "x[a&&b]"});
    let (st, b) = s.post("/v1/completions", &body).await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "guided_regex", "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("no token"),
        "{b}"
    );

    // "yes" is 3 bytes, so 3 tokens at most: min_tokens 6 can never be
    // met, which is said up front (chat too: "false" is 5).
    let body = json!({"prompt": "ab", "max_tokens": 8, "min_tokens": 6,
                      "guided_choice": ["yes"]});
    let (st, b) = s.post("/v1/completions", &body).await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "min_tokens", "{b}");
    let m = b["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("3 bytes"), "{b}");
    let chat = json!({"messages": [{"role": "user", "content": "ab"}], "max_tokens": 8,
                      "min_tokens": 6, "response_format": {"type": "json_schema",
                      "json_schema": {"name": "b", "schema": {"type": "boolean"}}}});
    let (st, b) = s.post("/v1/chat/completions", &chat).await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "min_tokens", "{b}");
    // Within reach, it holds: the guide's end waits for min_tokens.
    let body = json!({"prompt": "ab", "max_tokens": 8, "min_tokens": 3,
                      "guided_choice": ["yes"], "n": 2});
    let (st, r) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(text(&r, 0), "yes");
    // Where only some ways are long enough, the short ones are never taken
    // (they would end before min_tokens lets them).
    let body = json!({"prompt": "ab", "max_tokens": 12, "min_tokens": 5, "n": 8,
                      "temperature": 1.5, "seed": 3,
                      "guided_choice": ["yes", "no", "nooooooo"]});
    let (st, r) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    for i in 0..8 {
        assert_eq!(text(&r, i), "nooooooo", "{r}");
    }
}

/// vLLM's `--chat-template` (the template's text, or a file) renders chat
/// requests in place of the model folder's; a template that does not load
/// stops the server at start, naming the flag.
#[tokio::test]
async fn chat_template_flag_replaces_the_folders_template() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.jinja");
    let template = "{% for m in messages %}[{{ m.content }}]{% endfor %}=>";
    std::fs::write(&file, template).unwrap();
    let path = file.display().to_string();
    for spec in [template, path.as_str()] {
        let s = Server::start(&["--chat-template", spec]).await;
        let messages = json!([{"role": "user", "content": "12+34"}]);
        let (st, chat) = s.post("/tokenize", &json!({"messages": messages})).await;
        assert_eq!(st, 200, "{chat}");
        let (_, text) = s
            .post(
                "/tokenize",
                &json!({"prompt": "[12+34]=>", "add_special_tokens": false}),
            )
            .await;
        assert_eq!(chat["tokens"], text["tokens"], "{spec}");
    }

    let err = refused_at_start(&["--chat-template", "no/such.jinja"], &e2e::tiny_model());
    assert!(
        err.contains("--chat-template") && err.contains("no/such.jinja"),
        "{err}"
    );
}

/// A streamed chat folded into one message per choice: content joined,
/// tool calls merged by their index (arguments joined), the last
/// finish_reason.
fn fold_chat_stream(events: &[String]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            while out.len() <= i {
                out.push(json!({"content": null, "tool_calls": [], "finish_reason": null}));
            }
            let m = &mut out[i];
            if let Some(t) = ch["delta"]["content"].as_str() {
                let joined = format!("{}{t}", m["content"].as_str().unwrap_or(""));
                m["content"] = json!(joined);
            }
            for call in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let j = call["index"].as_u64().unwrap() as usize;
                let calls = m["tool_calls"].as_array_mut().unwrap();
                if calls.len() <= j {
                    calls.push(json!({"id": call["id"], "name": call["function"]["name"],
                                      "arguments": ""}));
                }
                let args = call["function"]["arguments"].as_str().unwrap_or("");
                let joined = format!("{}{args}", calls[j]["arguments"].as_str().unwrap());
                calls[j]["arguments"] = json!(joined);
            }
            if !ch["finish_reason"].is_null() {
                m["finish_reason"] = ch["finish_reason"].clone();
            }
        }
    }
    out
}

/// vLLM's tool calling. `tool_choice: "auto"` (the default with tools)
/// needs `--enable-auto-tool-choice --tool-call-parser hermes`, as in vLLM;
/// then the calls the model writes come back as `tool_calls` (the model is
/// made to write one here by a guided regex), streamed or whole. A named
/// function or `"required"` guides the output to a call, no parser needed.
#[tokio::test]
async fn tool_calls_auto_named_and_required() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time",
                                          "parameters": {"type": "object", "properties": {}}}}
    ]);
    let messages = json!([{"role": "user", "content": "weather?"}]);
    let chat = |extra: Value| {
        merged(
            json!({"messages": messages, "tools": tools, "max_tokens": 150, "n": 3, "seed": 5}),
            &extra,
        )
    };
    let args_of = |arguments: &Value| -> Value {
        serde_json::from_str(arguments.as_str().unwrap())
            .unwrap_or_else(|e| panic!("{arguments}: {e}"))
    };

    let plain = Server::start(&[]).await;
    let (st, b) = plain.post("/v1/chat/completions", &chat(json!({}))).await;
    assert_error(st, &b, 400);
    assert_eq!(b["error"]["param"], "tool_choice", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--enable-auto-tool-choice")
    );
    let (st, r) = plain
        .post(
            "/v1/chat/completions",
            &chat(json!({"tool_choice": "none", "max_tokens": 4})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    assert_eq!(r["choices"][0]["message"]["tool_calls"], json!([]));

    // A named function: the output is its arguments.
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (st, r) = plain
        .post("/v1/chat/completions", &chat(named.clone()))
        .await;
    assert_eq!(st, 200, "{r}");
    let mut streamed = chat(named.clone());
    streamed["stream"] = json!(true);
    let folded = fold_chat_stream(
        &plain
            .post_stream("/v1/chat/completions", &streamed, &[])
            .await,
    );
    for (i, folded) in folded.iter().enumerate() {
        let c = &r["choices"][i];
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(
            call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"),
            "{call}"
        );
        assert_eq!(call["function"]["name"], "get_weather");
        let args = args_of(&call["function"]["arguments"]);
        assert!(
            args["city"].as_str().unwrap().chars().count() <= 8,
            "{args}"
        );
        assert_eq!(folded["tool_calls"][0]["name"], "get_weather", "{folded}");
        assert_eq!(
            folded["tool_calls"][0]["arguments"],
            call["function"]["arguments"]
        );
        // The first chunk's role comes with an empty content, as vLLM's.
        assert_eq!(folded["content"], "", "{folded}");
    }

    // "required": one or more calls, each of a defined function.
    let (st, r) = plain
        .post(
            "/v1/chat/completions",
            &chat(json!({"tool_choice": "required"})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let streamed = chat(json!({"tool_choice": "required", "stream": true}));
    let folded = fold_chat_stream(
        &plain
            .post_stream("/v1/chat/completions", &streamed, &[])
            .await,
    );
    let finished: Vec<(&Value, &Value)> = r["choices"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&folded)
        .filter(|(c, _)| c["finish_reason"] == "stop")
        .collect();
    assert!(!finished.is_empty(), "{r}");
    for (c, folded) in finished {
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{c}");
        // Streamed, the same calls (the same seed), piece by piece.
        let streamed: Vec<(&Value, &Value)> = folded["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (&f["name"], &f["arguments"]))
            .collect();
        let whole: Vec<(&Value, &Value)> = calls
            .iter()
            .map(|f| (&f["function"]["name"], &f["function"]["arguments"]))
            .collect();
        assert_eq!(streamed, whole, "{folded}");
        for call in calls {
            let name = call["function"]["name"].as_str().unwrap();
            let args = args_of(&call["function"]["arguments"]);
            match name {
                "get_weather" => assert!(args["city"].is_string(), "{args}"),
                "get_time" => assert_eq!(args, json!({})),
                other => panic!("{other}"),
            }
        }
    }

    for (body, param) in [
        (
            chat(json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            "tool_choice",
        ),
        (
            json!({"messages": messages, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            chat(json!({"tool_choice": "required", "guided_regex": "a"})),
            "tool_choice",
        ),
        (
            json!({"messages": messages, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}}}]}),
            "tools",
        ),
    ] {
        let (st, b) = plain.post("/v1/chat/completions", &body).await;
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
    }

    // "auto" with the hermes parser.
    let s = Server::start(&["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]).await;
    let call = r#"Sure\. <tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}"\}\}\n</tool_call>"#;
    let body = chat(json!({"guided_regex": call}));
    let (st, r) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = s.post_stream("/v1/chat/completions", &streamed, &[]).await;
    let folded = fold_chat_stream(&events);
    // The call opens once its name is whole and its arguments follow as
    // they are written, not in one piece at the end.
    let call_deltas = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| c["choices"][0]["index"] == 0)
        .filter(|c| c["choices"][0]["delta"]["tool_calls"].is_array())
        .count();
    assert!(call_deltas > 2, "{events:?}");
    for (i, folded) in folded.iter().enumerate() {
        let c = &r["choices"][i];
        assert_eq!(c["finish_reason"], "tool_calls", "{c}");
        assert_eq!(c["message"]["content"], "Sure. ", "{c}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        let city = args_of(&call["function"]["arguments"])["city"].clone();
        assert!(
            city.as_str()
                .unwrap()
                .chars()
                .all(|ch| ch.is_ascii_lowercase()),
            "{city}"
        );
        assert_eq!(folded["content"], "Sure. ", "{folded}");
        assert_eq!(folded["finish_reason"], "tool_calls");
        assert_eq!(folded["tool_calls"][0]["name"], "get_weather");
        assert_eq!(
            folded["tool_calls"][0]["arguments"],
            call["function"]["arguments"]
        );
    }
    // Text that holds no call stays text.
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &chat(json!({"guided_regex": "[a-z]{3} <tool"})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["message"]["tool_calls"], json!([]));
    assert!(
        c["message"]["content"]
            .as_str()
            .unwrap()
            .ends_with(" <tool"),
        "{c}"
    );

    // "auto" with Llama 3's JSON calls: the whole output is the call.
    let s = Server::start(&[
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "llama3_json",
    ])
    .await;
    let call = r#"\{"name": "get_weather", "parameters": \{"city": "[a-z]{1,6}"\}\}"#;
    let body = chat(json!({"guided_regex": call}));
    let (st, r) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let folded = fold_chat_stream(&s.post_stream("/v1/chat/completions", &streamed, &[]).await);
    for (i, folded) in folded.iter().enumerate() {
        let c = &r["choices"][i];
        assert_eq!(c["finish_reason"], "tool_calls", "{c}");
        assert!(c["message"]["content"].is_null(), "{c}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert!(args_of(&call["function"]["arguments"])["city"].is_string());
        assert_eq!(folded["finish_reason"], "tool_calls");
        assert_eq!(folded["tool_calls"][0]["name"], "get_weather");
        assert_eq!(
            folded["tool_calls"][0]["arguments"],
            call["function"]["arguments"]
        );
        assert_eq!(folded["content"], "", "{folded}");
    }
    // An answer that does not open with a call is content, whole and streamed.
    let body = chat(json!({"guided_regex": "[a-z]{3} \\{"}));
    let (st, r) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let folded = fold_chat_stream(&s.post_stream("/v1/chat/completions", &streamed, &[]).await);
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{c}");
    assert_eq!(c["message"]["tool_calls"], json!([]));
    assert_eq!(folded[0]["content"], c["message"]["content"], "{folded:?}");

    for (flags, says) in [
        (&["--enable-auto-tool-choice"][..], "--tool-call-parser"),
        (&["--tool-call-parser", "mistral"][..], "hermes"),
    ] {
        let err = refused_at_start(flags, &e2e::tiny_model());
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}

/// vLLM's `--reasoning-parser` (the split itself is checked piece by piece
/// in reasoning.rs, a guide waiting for `</think>` in sampling.rs): with
/// `deepseek_r1` an output with no `</think>` yet is all thinking, whole or
/// streamed (the streamed pieces join to the whole); `include_reasoning:
/// false` leaves it out; a guide waits for the thinking to end unless the
/// prompt closed it; `qwen3` leaves text that does not open with `<think>`
/// as content.
#[tokio::test]
async fn reasoning_parser_puts_the_thinking_apart() {
    let body = json!({"messages": [{"role": "user", "content": "think"}], "max_tokens": 12,
                      "ignore_eos": true, "seed": 4});
    let r1 = Server::start(&["--reasoning-parser", "deepseek_r1"]).await;
    let (st, r) = r1.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    let m = &r["choices"][0]["message"];
    let thinking = m["reasoning_content"].as_str().unwrap().to_string();
    assert!(!thinking.is_empty() && m["content"].is_null(), "{m}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = r1.post_stream("/v1/chat/completions", &streamed, &[]).await;
    let mut joined = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            joined.push_str(ch["delta"]["reasoning_content"].as_str().unwrap_or(""));
            assert!(
                ch["delta"]["content"].as_str().unwrap_or("").is_empty(),
                "{c}"
            );
        }
    }
    assert_eq!(joined, thinking);
    let mut without = body.clone();
    without["include_reasoning"] = json!(false);
    let (_, r) = r1.post("/v1/chat/completions", &without).await;
    assert!(
        r["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{r}"
    );
    // A guide waits for the thinking's end, as vLLM's: this model never
    // writes `</think>`, so nothing here is held to the digits.
    let mut guided = body.clone();
    guided["guided_regex"] = json!("[0-9]{3}");
    guided["ignore_eos"] = json!(false);
    let (_, r) = r1.post("/v1/chat/completions", &guided).await;
    let m = &r["choices"][0]["message"];
    let thought = m["reasoning_content"].as_str().unwrap();
    assert!(thought.chars().any(|c| !c.is_ascii_digit()), "{m}");

    let qwen3 = Server::start(&["--reasoning-parser", "qwen3"]).await;
    let (_, r) = qwen3.post("/v1/chat/completions", &body).await;
    let m = &r["choices"][0]["message"];
    let content = m["content"].as_str().unwrap();
    assert!(
        !content.starts_with("<think>") && !content.is_empty(),
        "{m}"
    );
    assert!(m.get("reasoning_content").is_none(), "{m}");

    // A prompt whose thinking is closed already (Qwen3's template with
    // enable_thinking: false): the guide holds from the first token.
    let closed = "{% for m in messages %}{{ m.content }}{% endfor %}<think>\n\n</think>\n\n";
    let no_thinking =
        Server::start(&["--reasoning-parser", "qwen3", "--chat-template", closed]).await;
    let (_, r) = no_thinking.post("/v1/chat/completions", &guided).await;
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{c}");
    let digits = c["message"]["content"].as_str().unwrap();
    assert!(
        digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()),
        "{c}"
    );
    assert!(c["message"].get("reasoning_content").is_none(), "{c}");

    let err = refused_at_start(&["--reasoning-parser", "granite"], &e2e::tiny_model());
    assert!(err.contains("deepseek_r1, qwen3"), "{err}");
}

/// vLLM's `--generation-config` (default `auto`): the model folder's
/// generation_config.json gives the sampling of the fields a request leaves
/// out (here top_k 1, greedy, and max_new_tokens 3); a request's own field
/// wins; `vllm` keeps vLLM's defaults; a folder without the file is an
/// error at start.
#[tokio::test]
async fn generation_config_gives_the_defaults_a_request_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(e2e::tiny_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let file = model.join("generation_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    config["top_k"] = json!(1);
    config["max_new_tokens"] = json!(3);
    std::fs::write(&file, config.to_string()).unwrap();
    let body = json!({"prompt": "12+3", "n": 4, "max_tokens": 8, "ignore_eos": true, "seed": 1});
    let distinct = |r: &Value| -> usize {
        let texts: std::collections::BTreeSet<String> = (0..4).map(|i| text(r, i)).collect();
        texts.len()
    };

    let auto = Server::start_on(&model, &[]).await;
    let (st, r) = auto.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(distinct(&r), 1, "top_k 1 from generation_config.json: {r}");
    let mut own = body.clone();
    own["top_k"] = json!(-1);
    let (_, r) = auto.post("/v1/completions", &own).await;
    assert!(distinct(&r) > 1, "the request's top_k wins: {r}");
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": true});
    let (_, r) = auto.post("/v1/chat/completions", &chat).await;
    assert_eq!(r["usage"]["completion_tokens"], 3, "max_new_tokens: {r}");

    let vllm = Server::start_on(&model, &["--generation-config", "vllm"]).await;
    let (_, r) = vllm.post("/v1/completions", &body).await;
    assert!(distinct(&r) > 1, "vLLM's defaults sample: {r}");

    let err = refused_at_start(&["--generation-config", "/no/such"], &model);
    assert!(
        err.contains("--generation-config") && err.contains("/no/such"),
        "{err}"
    );
}
