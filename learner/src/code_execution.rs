//! The `code` reward: runs the program a completion wrote against the
//! dataset's test cases, as open-r1's `code` / `binary_code` rewards do.
//!
//! The answer column holds open-r1's `verification_info`: `{"language":
//! "python", "test_cases": [{"input": ..., "output": ...}, ...]}`. The
//! program is the completion's last ```` ```python ```` block (of the
//! language); each test case feeds it `input` on stdin and passes when its
//! stdout has the expected output's lines (each compared without
//! surrounding blanks). The value is the share of cases passed
//! (`mode: pass_rate`, open-r1's `code_reward`) or 1 only when all pass
//! (`mode: binary`, `binary_code_reward`). No code block: 0.
//!
//! Runners: `piston`, a [Piston](https://github.com/engineer-man/piston)
//! server's `POST /api/v2/execute` (a sandbox; open-r1 runs its code in
//! sandboxes too), or `local`: `python3` on this machine in a temporary
//! folder, with a wall-clock timeout and CPU-time and memory limits, but
//! no isolation from the machine's files or network. Model-written code is
//! untrusted: `local` is for machines and models one trusts.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::rewards::RewardInput;

/// Bytes of a program's stdout kept (more is a failed case).
const MAX_OUTPUT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runner {
    Local,
    Piston,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeMode {
    /// The share of test cases passed.
    #[default]
    PassRate,
    /// 1 when every test case passes, else 0.
    Binary,
}

fn default_language() -> String {
    "python".into()
}
fn default_timeout_s() -> f64 {
    10.0
}
fn default_memory_mb() -> u64 {
    1024
}
fn default_parallel() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeParams {
    /// Required: where model-written code runs is the user's choice.
    runner: Runner,
    /// The Piston server (`runner: piston`).
    #[serde(default)]
    url: Option<String>,
    /// The code block's language (open-r1's `code_language`), when the
    /// test cases do not name one.
    #[serde(default = "default_language")]
    language: String,
    #[serde(default)]
    mode: CodeMode,
    /// Per test case.
    #[serde(default = "default_timeout_s")]
    timeout_s: f64,
    /// Address-space limit of a `local` run.
    #[serde(default = "default_memory_mb")]
    memory_mb: u64,
    /// Test cases run at once.
    #[serde(default = "default_parallel")]
    max_parallel: usize,
}

#[derive(Debug)]
pub struct Code {
    runner: Runner,
    url: Option<String>,
    language: String,
    mode: CodeMode,
    timeout: Duration,
    memory_mb: u64,
    max_parallel: usize,
    client: reqwest::Client,
}

/// open-r1's `verification_info`.
#[derive(Debug, Deserialize)]
struct Verification {
    #[serde(default)]
    language: Option<String>,
    test_cases: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
struct TestCase {
    input: String,
    output: String,
}

/// What running one test case gave.
#[derive(Debug, PartialEq)]
enum Outcome {
    Passed,
    Failed,
}

impl Code {
    pub fn new(p: CodeParams) -> Result<Self, String> {
        if !(p.timeout_s.is_finite() && p.timeout_s > 0.0) {
            return Err(format!("`timeout_s` must be positive, got {}", p.timeout_s));
        }
        if p.max_parallel == 0 {
            return Err("`max_parallel` must be at least 1".into());
        }
        // Less and python3 cannot start: every case would fail, silently.
        if p.memory_mb < 64 {
            return Err(format!(
                "`memory_mb` must be at least 64 (python3 needs that to start), got {}",
                p.memory_mb
            ));
        }
        match (p.runner, &p.url) {
            (Runner::Piston, None) => {
                return Err(
                    "`runner: piston` needs `url`, the Piston server (http://host:2000)".into(),
                );
            }
            (Runner::Piston, Some(url)) => {
                let parsed = reqwest::Url::parse(url).map_err(|e| format!("`url` {url:?}: {e}"))?;
                if parsed.scheme() != "http" {
                    return Err(format!(
                        "`url` {url:?}: only http:// is supported (this build has no TLS)"
                    ));
                }
            }
            (Runner::Local, Some(_)) => {
                return Err("`url` is for `runner: piston`; `local` runs python3 here".into());
            }
            (Runner::Local, None) => {}
        }
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Code {
            runner: p.runner,
            url: p.url.map(|u| u.trim_end_matches('/').to_string()),
            language: p.language,
            mode: p.mode,
            timeout: Duration::from_secs_f64(p.timeout_s),
            memory_mb: p.memory_mb,
            max_parallel: p.max_parallel,
            client,
        })
    }

    /// Scores every completion; a runner that cannot run at all (no
    /// python3, the Piston server down) is an error, a program that fails
    /// a case is a failed case.
    pub async fn score(&self, batch: &[RewardInput]) -> Result<Vec<f64>, String> {
        // Every (completion, case) to run, with its program.
        let mut jobs: Vec<(usize, String, String, TestCase)> = Vec::new();
        let mut cases = vec![0usize; batch.len()];
        for (i, x) in batch.iter().enumerate() {
            let info = x.answer.as_deref().unwrap_or_default();
            let v: Verification = serde_json::from_str(info).map_err(|e| {
                format!(
                    "completion {i}: the answer column is not open-r1's verification_info \
                     ({{\"language\", \"test_cases\": [{{\"input\", \"output\"}}]}}): {e}"
                )
            })?;
            let language = v.language.unwrap_or_else(|| self.language.clone());
            cases[i] = v.test_cases.len();
            let Some(program) = extract_code(&x.completion_text, &language) else {
                continue;
            };
            for case in v.test_cases {
                jobs.push((i, language.clone(), program.clone(), case));
            }
        }
        let outcomes: Vec<(usize, Result<Outcome, String>)> = futures::stream::iter(jobs)
            .map(|(i, language, program, case)| async move {
                (i, self.run(&language, &program, &case).await)
            })
            .buffer_unordered(self.max_parallel)
            .collect()
            .await;
        let mut passed = vec![0usize; batch.len()];
        for (i, outcome) in outcomes {
            if outcome? == Outcome::Passed {
                passed[i] += 1;
            }
        }
        Ok(passed
            .iter()
            .zip(&cases)
            .map(|(&p, &n)| match self.mode {
                _ if n == 0 => 0.0,
                CodeMode::PassRate => p as f64 / n as f64,
                CodeMode::Binary => f64::from(u8::from(p == n)),
            })
            .collect())
    }

    async fn run(&self, language: &str, program: &str, case: &TestCase) -> Result<Outcome, String> {
        let stdout = match self.runner {
            Runner::Local => self.run_local(language, program, &case.input).await?,
            Runner::Piston => self.run_piston(language, program, &case.input).await?,
        };
        Ok(match stdout {
            Some(out) if same_output(&out, &case.output) => Outcome::Passed,
            _ => Outcome::Failed,
        })
    }

    /// `python3` on this machine: the program's stdout when it exits 0 in
    /// time, none when it fails, times out or writes too much.
    async fn run_local(
        &self,
        language: &str,
        program: &str,
        input: &str,
    ) -> Result<Option<String>, String> {
        if language != "python" {
            return Err(format!(
                "`runner: local` runs python only, the test cases are {language}: use `runner: \
                 piston`"
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| format!("a temporary folder: {e}"))?;
        let file: PathBuf = dir.path().join("main.py");
        std::fs::write(&file, program).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut command = tokio::process::Command::new("python3");
        command
            .arg(&file)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let (memory, cpu) = (
            self.memory_mb.saturating_mul(1 << 20),
            self.timeout.as_secs().max(1) + 1,
        );
        // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = |resource, value: u64| {
                    let l = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                limit(libc::RLIMIT_AS, memory)?;
                limit(libc::RLIMIT_CPU, cpu)
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting python3 (runner: local): {e}"))?;
        let mut stdin = child.stdin.take();
        let input = input.as_bytes().to_vec();
        let run = async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            if let Some(mut s) = stdin.take() {
                // A program that does not read its input is not an error.
                let _ = s.write_all(&input).await;
            }
            let mut out = Vec::new();
            if let Some(stdout) = child.stdout.take() {
                let mut limited = stdout.take(MAX_OUTPUT_BYTES as u64 + 1);
                let _ = limited.read_to_end(&mut out).await;
            }
            let status = child.wait().await;
            (status, out)
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok((Ok(status), out)) if status.success() && out.len() <= MAX_OUTPUT_BYTES => {
                Ok(Some(String::from_utf8_lossy(&out).into_owned()))
            }
            Ok((Err(e), _)) => Err(format!("waiting for python3: {e}")),
            // A failed run, too much output, or no end in time (the child
            // is killed as the future drops).
            _ => Ok(None),
        }
    }

    /// Piston's `POST /api/v2/execute`: the run's stdout when it exits 0,
    /// none otherwise.
    async fn run_piston(
        &self,
        language: &str,
        program: &str,
        input: &str,
    ) -> Result<Option<String>, String> {
        let url = format!("{}/api/v2/execute", self.url.as_deref().unwrap_or_default());
        let ms = self.timeout.as_millis() as u64;
        let body = json!({
            "language": language,
            "version": "*",
            "files": [{"content": program}],
            "stdin": input,
            "run_timeout": ms,
            "compile_timeout": ms,
        });
        let response = self
            .client
            .post(&url)
            .timeout(self.timeout + Duration::from_secs(30))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
            return Err(format!("POST {url}: HTTP {status}: {text}"));
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("POST {url}: the response is not JSON: {e}"))?;
        let run = v
            .get("run")
            .ok_or_else(|| format!("POST {url}: the response has no `run`: {v}"))?;
        let compiled = v
            .get("compile")
            .is_none_or(|c| c.get("code").and_then(Value::as_i64).unwrap_or(0) == 0);
        let exited = run.get("code").and_then(Value::as_i64) == Some(0)
            && run.get("signal").is_none_or(Value::is_null);
        Ok((compiled && exited).then(|| {
            run.get("stdout")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        }))
    }
}

/// The last whole ```` ```language ```` block of `completion` (open-r1's
/// `extract_code`: the last of its pattern's matches, left to right); none
/// when it has none.
fn extract_code(completion: &str, language: &str) -> Option<String> {
    let fence = format!("```{language}\n");
    let mut last = None;
    let mut rest = completion;
    while let Some(open) = rest.find(&fence) {
        let body = &rest[open + fence.len()..];
        let Some(close) = body.find("```") else { break };
        last = Some(body[..close].to_string());
        rest = &body[close + 3..];
    }
    last
}

/// Whether `output` has `expected`'s lines, each compared without the
/// blanks around it (and the blank lines around the whole).
fn same_output(output: &str, expected: &str) -> bool {
    fn lines(t: &str) -> Vec<&str> {
        t.trim().lines().map(str::trim).collect()
    }
    lines(output) == lines(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_block_of_the_language_is_the_program() {
        let c = "First:\n```python\nprint(1)\n```\nBetter:\n```python\nprint(2)\n```\nDone.";
        assert_eq!(extract_code(c, "python").as_deref(), Some("print(2)\n"));
        assert_eq!(extract_code(c, "cpp"), None);
        assert_eq!(extract_code("```python\nprint(1)", "python"), None);
        // An unclosed last block leaves the one before, as open-r1's findall.
        let cut = "```python\nprint(1)\n```\n```python\nprint(2)";
        assert_eq!(extract_code(cut, "python").as_deref(), Some("print(1)\n"));
        assert_eq!(extract_code("no code", "python"), None);
    }

    #[test]
    fn outputs_compare_line_by_line_without_blanks() {
        assert!(same_output("3\n4  \n\n", "3\n4"));
        assert!(same_output("  a b\n", "a b"));
        assert!(!same_output("3\n4\n5", "3\n4"));
        assert!(!same_output("a  b", "a b"));
    }
}
