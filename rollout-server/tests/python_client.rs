//! The official `openai` Python package against the real server:
//! completions with n > 1 and logprobs, chat streaming, tool calls and
//! JSON-schema replies, error cases (tests/python/test_openai_client.py). The virtualenv comes from
//! tests/python/setup.sh (at $TANDEM_PYENV or <repo>/target/pyenv). Without
//! it the test is skipped loudly, unless CI is set: then it fails.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;

#[tokio::test]
async fn openai_python_client_talks_to_the_server() {
    let root = e2e::repo_root();
    let venv = std::env::var_os("TANDEM_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyenv"));
    let python = venv.join("bin/python");
    if !python.exists() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "CI is set but the Python venv {} is missing: run tests/python/setup.sh",
            venv.display()
        );
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             SKIPPED openai_python_client_talks_to_the_server: no venv at {}.\n\
             Run tests/python/setup.sh (ops/test.sh does) to install the openai client.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
            venv.display()
        );
        return;
    }
    let s = Server::start(&[
        "--api-key",
        "py-key",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ])
    .await;
    let script = root.join("tests/python/test_openai_client.py");
    let out = tokio::task::spawn_blocking({
        let base = s.url("/v1");
        let model = s.model.clone();
        move || {
            Command::new(python)
                .arg(script)
                .env("TANDEM_BASE_URL", base)
                .env("TANDEM_API_KEY", "py-key")
                .env("TANDEM_MODEL", model)
                .env_remove("OPENAI_API_KEY")
                .env_remove("OPENAI_BASE_URL")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "python client test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"));
}
