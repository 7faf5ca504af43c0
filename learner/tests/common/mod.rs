//! End-to-end helpers: the tiny preset model on disk, the real
//! `rollout-server` binary on free loopback ports, `learner train`
//! processes, all killed by PID when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tiny preset (seed 0), written once per test binary run and shared.
pub fn tiny_model() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("learner-e2e-models");
    let dir = root.join("tiny-seed0");
    if dir.join("config.json").exists() {
        return dir;
    }
    std::fs::create_dir_all(&root).unwrap();
    let tmp = root.join(format!("tiny-seed0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    model::presets::init_model(model::presets::Preset::Tiny, &tmp, 0).unwrap();
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

pub fn learner_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_learner"))
}

/// `rollout-server` next to the learner binary; built once if missing.
pub fn rollout_server_bin() -> PathBuf {
    let bin = learner_bin().with_file_name("rollout-server");
    if !bin.exists() {
        eprintln!("rollout-server is not built: running `cargo build -p rollout-server` once");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "rollout-server"])
            .current_dir(repo_root())
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p rollout-server failed");
    }
    assert!(bin.exists(), "no rollout-server at {}", bin.display());
    bin
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A running rollout server; killed (by PID) when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub grpc: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(model: &Path) -> Server {
        let mut child = Command::new(rollout_server_bin())
            .arg("--model")
            .arg(model)
            .args([
                "--port",
                "0",
                "--grpc-port",
                "0",
                "--logprobs-mode",
                "processed_logprobs",
                "--max-model-len",
                "256",
                "--max-num-seqs",
                "32",
            ])
            .env_remove("TANDEM_API_KEY")
            .env_remove("TANDEM_WEIGHT_SYNC_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start rollout-server");
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
                panic!("rollout-server printed no `listening` line within 60 s");
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
        };
        let client = reqwest::Client::new();
        let health = format!("{}/health", server.base);
        rt().block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if client
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                assert!(Instant::now() < deadline, "server never became healthy");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        server
    }

    /// The server's weight version (gRPC GetVersion).
    pub fn weight_version(&self) -> u64 {
        rt().block_on(proto::weight_sync::get_version(
            &self.grpc,
            None,
            Duration::from_secs(10),
        ))
        .unwrap()
        .version
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The test recipe: tiny model, the shipped arithmetic task, small sizes.
/// `extra` is appended YAML-free as `section.key=value` overrides.
pub fn recipe(dir: &Path, model: &Path, server: &Server, out: &Path) -> PathBuf {
    let root = repo_root();
    let text = format!(
        r#"version: 1
model: {{path: "{model}"}}
data:
  train_files: ["{train}"]
  eval_files: ["{eval}"]
  prompt_template: "{{question}}="
rollout:
  endpoints: ["{base}"]
  weight_sync_endpoints: ["{grpc}"]
  num_generations: 4
  max_completion_length: 8
  temperature: 1.0
  request_timeout_s: 60
reward:
  functions:
    - {{name: exact_match, weight: 1.0}}
    - {{name: format, weight: 0.5, pattern: "^[0-9]"}}
train:
  learning_rate: 3.0e-3
  lr_scheduler_type: constant
  max_steps: 3
  per_device_train_batch_size: 16
  gradient_accumulation_steps: 1
  max_grad_norm: 1.0
  seed: 7
  loss_type: dapo
  beta: 0.0
eval:
  eval_steps: 0
  num_samples: 2
  max_examples: 4
  temperature: 1.0
checkpoint:
  save_steps: 2
  save_total_limit: 3
  output_dir: "{out}"
"#,
        model = model.display(),
        train = root.join("configs/data/arith_train.jsonl").display(),
        eval = root.join("configs/data/arith_eval.jsonl").display(),
        base = server.base,
        grpc = server.grpc,
        out = out.display(),
    );
    let path = dir.join(format!(
        "recipe-{}.yaml",
        out.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// A learner process; killed (by PID) when dropped.
pub struct Learner {
    child: Option<Child>,
}

impl Drop for Learner {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Learner {
    /// Starts `learner train --config RECIPE OVERRIDES...` with `env`.
    pub fn spawn(recipe: &Path, overrides: &[String], env: &[(&str, String)]) -> Learner {
        let mut cmd = Command::new(learner_bin());
        cmd.arg("train")
            .arg("--config")
            .arg(recipe)
            .args(overrides)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Learner {
            child: Some(cmd.spawn().expect("start learner")),
        }
    }

    /// Waits (at most `secs`) and returns the output.
    pub fn wait(mut self, secs: u64) -> Output {
        let child = self.child.take().unwrap();
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        // Kill after the deadline so a hang fails the test instead of blocking it.
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(secs)).is_err() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        let _ = watchdog.join();
        out
    }
}

/// Runs one learner to completion; panics with its stderr on failure.
pub fn train(recipe: &Path, overrides: &[String]) -> Output {
    let out = Learner::spawn(recipe, overrides, &[]).wait(120);
    assert!(
        out.status.success(),
        "learner failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every tensor of a model.safetensors as f32 values, by name.
pub fn load_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let w = model::Weights::load(dir, &model::Device::Cpu, model::DType::F32).unwrap();
    w.iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect()
}

pub fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}
