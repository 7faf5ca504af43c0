//! Shared by the integration tests: the real `rollout-server` binary on the
//! tiny preset ([`e2e::RolloutServer`]) with an HTTP client and the
//! request helpers these tests use.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use e2e::RolloutServer;
use serde_json::Value;

/// The real binary on the tiny model, served as `tiny`; killed when dropped.
/// Derefs to [`RolloutServer`] (`url`, `grpc_url`, `terminate`, ...).
pub struct Server {
    process: RolloutServer,
    pub model: String,
    pub client: reqwest::Client,
}

impl Deref for Server {
    type Target = RolloutServer;
    fn deref(&self) -> &RolloutServer {
        &self.process
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut RolloutServer {
        &mut self.process
    }
}

impl Server {
    /// Starts the server on the tiny model with small test sizes plus `extra`
    /// flags, and waits until `/health` answers.
    pub async fn start(extra: &[&str]) -> Server {
        Server::start_on(&e2e::tiny_model(), extra).await
    }

    /// [`Server::start`] on another model folder (still served as `tiny`).
    pub async fn start_on(model: &std::path::Path, extra: &[&str]) -> Server {
        Server::start_with_env(model, extra, &[]).await
    }

    /// [`Server::start_on`] with more environment variables.
    pub async fn start_with_env(
        model: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let args = [&["--served-model-name", "tiny"][..], extra].concat();
        Server {
            process: RolloutServer::start_with_env(model, &args, env),
            model: "tiny".into(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /metrics` until it contains `line` (the engine sets its gauges
    /// at the end of a step, after it may have answered), 2 s at most;
    /// the last text either way.
    pub async fn metrics_with(&self, line: &str) -> String {
        let mut text = String::new();
        for _ in 0..100 {
            text = self.metrics().await;
            if text.contains(line) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        text
    }

    /// POSTs JSON; returns status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("non-JSON body ({e}) with status {status}: {text}"));
        (status, json)
    }

    /// POSTs raw bytes as JSON content.
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POSTs a streaming request; returns the `data:` payloads in order.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Vec<String> {
        let mut req = self.client.post(self.url(path)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(|s| s.trim().to_string())
            .collect()
    }
}

/// Asserts vLLM's error object with `status` as its code.
pub fn assert_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    assert_eq!(e["code"], want, "{body}");
}

/// A request body: `base` with each of `extra`'s members set on it.
pub fn merged(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().into_iter().flatten() {
        base[k] = v.clone();
    }
    base
}
