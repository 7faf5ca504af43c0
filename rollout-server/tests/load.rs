//! Backpressure: 256 concurrent requests against a small queue all end in
//! 200 or 429/503 with an error object, none hangs, and the server still
//! answers afterwards.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Server;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_256_requests_with_small_queue_never_hangs() {
    let s = Arc::new(Server::start(&["--max-queue", "8", "--max-num-seqs", "8"]).await);
    let mut tasks = Vec::new();
    for i in 0..256 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let stream = i % 4 == 3;
            let body = json!({"prompt": format!("request {i}"), "max_tokens": 8, "n": 1 + i % 2,
                              "ignore_eos": true, "stream": stream});
            let r = s
                .client
                .post(s.url("/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, stream, text)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(tasks))
        .await
        .expect("some request hung");
    let (mut ok, mut refused) = (0, 0);
    for t in all {
        let (status, stream, text) = t.unwrap();
        match status {
            200 => {
                ok += 1;
                if stream {
                    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                } else {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() % 8, 0);
                }
            }
            429 | 503 => {
                refused += 1;
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], status, "{v}");
                assert!(v["error"]["message"].is_string());
            }
            other => panic!("status {other}: {text}"),
        }
    }
    assert_eq!(ok + refused, 256);
    assert!(ok >= 8, "only {ok} requests were served");
    eprintln!("load: {ok} served, {refused} refused");
    let (st, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "still there?", "max_tokens": 3}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let health = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}
