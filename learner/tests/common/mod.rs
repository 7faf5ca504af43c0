//! Learner end-to-end helpers: the test recipe, `learner train` processes
//! killed by PID when dropped, and weight comparisons. The rollout server,
//! the tiny model and ports come from [`e2e`].
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use e2e::RolloutServer;

pub fn learner_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_learner"))
}

/// The real rollout server on `model`, as the learner wants it: processed
/// logprobs, room for a whole batch.
pub fn rollout_server(model: &Path) -> RolloutServer {
    RolloutServer::start(
        model,
        &[
            "--logprobs-mode",
            "processed_logprobs",
            "--max-num-seqs",
            "32",
        ],
    )
}

/// The test recipe: tiny model, the shipped arithmetic task, small sizes.
/// `extra` is appended YAML-free as `section.key=value` overrides.
pub fn recipe(dir: &Path, model: &Path, server: &RolloutServer, out: &Path) -> PathBuf {
    let root = e2e::repo_root();
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
        base = server.url(""),
        grpc = server.grpc_url(),
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
