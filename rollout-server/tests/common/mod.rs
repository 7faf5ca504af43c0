//! Shared by the integration tests: the tiny preset model on disk, and the
//! real `rollout-server` binary on free loopback ports, killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use model::presets::{Preset, init_model};
use serde_json::Value;

/// The tiny preset (seed 0) in a folder shared by every test binary; written
/// once, atomically.
pub fn tiny_model() -> PathBuf {
    preset_model(Preset::Tiny, "tiny")
}

pub fn preset_model(preset: Preset, name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rollout-server-models");
    let dir = root.join(format!("{name}-seed0"));
    if dir.join("config.json").exists() {
        return dir;
    }
    std::fs::create_dir_all(&root).unwrap();
    let tmp = root.join(format!("{name}-seed0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    init_model(preset, &tmp, 0).unwrap();
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test binary won the race.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.join("config.json").exists());
    dir
}

/// The real binary, running; killed (by PID) when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub grpc: String,
    pub model: String,
    pub client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server on the tiny model with small test sizes plus `extra`
    /// flags, and waits until `/health` answers.
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_with(&tiny_model(), extra, &[]).await
    }

    pub async fn start_with(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rollout-server"));
        cmd.arg("--model")
            .arg(model)
            .args([
                "--port",
                "0",
                "--grpc-port",
                "0",
                "--served-model-name",
                "tiny",
            ])
            .args(extra)
            .env_remove("TANDEM_API_KEY")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (flag, default) in [("--max-model-len", "256"), ("--max-num-seqs", "16")] {
            if !extra.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start rollout-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("rollout-server exited or printed no `listening` line within 60 s");
            }
        };
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap()
                .to_string()
        };
        let server = Server {
            child,
            base: format!("http://{}", field("http=")),
            grpc: format!("http://{}", field("grpc=")),
            model: "tiny".into(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = server.client.get(server.url("/health")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "server never became healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Sends SIGTERM and waits (up to `secs`) for the process to exit.
    pub fn terminate(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().ok()?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
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
