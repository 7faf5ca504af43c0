//! End-to-end tests: they start Tandem's real binaries (rollout server,
//! learners, launcher) on free loopback ports, talk to them over HTTP and gRPC,
//! and stop them by PID. The helpers for that live here, shared by the
//! crates' integration tests (a dev-dependency of each):
//!
//! - [`repo_root`], [`bin_dir`] and [`workspace_bin`]: where things are, and
//!   the workspace's binaries, built once when missing;
//! - [`tiny_model`]: the tiny preset on disk, written once per target folder;
//! - [`free_port`]: a loopback port nothing listens on;
//! - [`RolloutServer`]: the real `rollout-server` binary, killed on drop;
//! - [`read_jsonl`]: the run folder's logs.
//!
//! Only std, `model` and `serde_json`: health checks and `/version` are plain
//! HTTP/1.1 over a `TcpStream`, so the helpers are the same from synchronous
//! tests and from `#[tokio::test]`s.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use model::presets::{Preset, init_model};
use serde_json::Value;

/// The workspace's root folder (this crate is its `tests/` folder).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The profile folder of the running test binary (`target/debug` for
/// `target/debug/deps/foo-HASH`): where cargo puts the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("the test binary has a folder");
    match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// The workspace binary `name` (whose package has the same name) next to the
/// running test binary. `cargo test -p X` builds only X's binaries, so under
/// cargo (`CARGO` set) each one is built once per test process with `cargo
/// build -p NAME` in the same profile and features: a no-op when it is up
/// to date, and never a stale binary from an older tree. Without cargo (test
/// executables carried to another machine) the binary must be there.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let dir = bin_dir();
    let bin = dir.join(name);
    // One build at a time in this process; cargo's own lock covers the rest.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cargo) = std::env::var_os("CARGO")
        && built.insert(name.to_string())
    {
        let profile = dir
            .file_name()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut args = vec!["build", "--quiet", "-p", name];
        match profile.as_str() {
            "debug" => {}
            "release" => args.push("--release"),
            other => args.extend(["--profile", other]),
        }
        if model::device::CUDA_BUILD {
            args.extend(["--features", "cuda"]);
        }
        let status = Command::new(cargo)
            .args(&args)
            .current_dir(repo_root())
            .status()
            .unwrap_or_else(|e| panic!("cargo {}: {e}", args.join(" ")));
        assert!(
            status.success(),
            "cargo {} failed: {status}",
            args.join(" ")
        );
    }
    assert!(
        bin.exists(),
        "no {name} at {}: build it first",
        bin.display()
    );
    bin
}

/// The tiny preset (seed 0), written once per target folder and shared by
/// every test binary.
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| preset_model(Preset::Tiny, "tiny"))
        .clone()
}

/// A preset's model folder (seed 0) under
/// `target/tmp/e2e-models/NAME-seed0-<fingerprint of its files>`. The preset
/// is generated each time (into a temporary folder) and its fingerprint
/// names the folder, so a changed preset never reuses a stale one; the
/// first writer renames its folder into place, so a concurrent writer never
/// exposes a half-written model.
pub fn preset_model(preset: Preset, name: &str) -> PathBuf {
    let target = bin_dir();
    let root = target.parent().unwrap_or(&target).join("tmp/e2e-models");
    std::fs::create_dir_all(&root).unwrap();
    let tmp = root.join(format!("{name}-seed0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    init_model(preset, &tmp, 0).unwrap();
    let dir = root.join(format!("{name}-seed0-{:016x}", folder_fingerprint(&tmp)));
    if dir.join("config.json").exists() || std::fs::rename(&tmp, &dir).is_err() {
        // Written before, or another test binary won the race.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.join("config.json").exists(), "{}", dir.display());
    dir
}

/// A hash of the names and bytes of a folder's files (not recursive).
fn folder_fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut h = std::hash::DefaultHasher::new();
    for f in files {
        f.file_name().hash(&mut h);
        std::fs::read(&f).unwrap().hash(&mut h);
    }
    h.finish()
}

/// A free loopback port (bound, then released), drawn below the kernel's
/// ephemeral range as the launcher draws its ports: the test's process binds
/// it a moment later, and a parallel test asking the kernel for any port
/// (port 0) in between is never handed this one.
pub fn free_port() -> u16 {
    use rand::Rng;
    let high: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut rng = rand::rng();
    let drawn = (high > 11000)
        .then(|| {
            (0..200).find_map(|_| {
                let port = rng.random_range(10000..high);
                TcpListener::bind(("127.0.0.1", port)).ok()
            })
        })
        .flatten();
    drawn
        .map_or_else(|| TcpListener::bind("127.0.0.1:0"), Ok)
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// The lines of a JSON-lines file (blank lines skipped); panics naming the
/// file when it is missing or a line is not JSON.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// `GET path` over plain HTTP/1.1 (`Connection: close`): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, response.clone());
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let (_, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

/// The real `rollout-server` binary on free loopback ports; killed (by PID)
/// when dropped.
pub struct RolloutServer {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl Drop for RolloutServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RolloutServer {
    /// Starts the server on `model` with `extra_args`, on ports it picks
    /// itself (`--port 0 --grpc-port 0`, read back from its `listening
    /// http=ADDR grpc=ADDR` line), with small test sizes (`--max-model-len
    /// 256 --max-num-seqs 16 --device cpu`) unless `extra_args` sets them, no API key or
    /// weight-sync token from the environment, and waits until `/health`
    /// answers.
    pub fn start(model: &Path, extra_args: &[&str]) -> RolloutServer {
        RolloutServer::start_with_env(model, extra_args, &[])
    }

    /// [`RolloutServer::start`] with more environment variables.
    pub fn start_with_env(
        model: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> RolloutServer {
        let mut cmd = Command::new(workspace_bin("rollout-server"));
        cmd.envs(env.iter().copied());
        cmd.arg("--model")
            .arg(model)
            .args(["--port", "0", "--grpc-port", "0"])
            .args(extra_args)
            .env_remove("TANDEM_API_KEY")
            .env_remove("TANDEM_WEIGHT_SYNC_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The CPU unless the test asks: a CUDA build on a GPU machine would
        // otherwise pick the GPU (`--device auto`) and bf16.
        for (flag, default) in [
            ("--max-model-len", "256"),
            ("--max-num-seqs", "16"),
            ("--device", "cpu"),
        ] {
            let given = extra_args
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
            if !given {
                cmd.args([flag, default]);
            }
        }
        let mut child = cmd.spawn().expect("start rollout-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Keeps reading so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening ") {
                    let _ = tx.send(line);
                }
            }
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            panic!("rollout-server printed no `listening` line within 60 s ({status})");
        };
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key}ADDR in {line:?}"))
        };
        let (http, grpc) = (field("http="), field("grpc="));
        let mut server = RolloutServer { child, http, grpc };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(http, "/health").is_ok_and(|(status, _)| status == 200) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("rollout-server exited before it was healthy: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "rollout-server never became healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `http://ADDR{path}` on the HTTP port; `url("")` is the base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The gRPC (weight sync) address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The gRPC endpoint as clients and recipes take it: `http://ADDR`.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The weight version the server reports (`GET /version`, the engine's
    /// counter that gRPC `GetVersion` reports too).
    pub fn weight_version(&self) -> u64 {
        let (status, body) = http_get(self.http, "/version").expect("GET /version");
        assert_eq!(status, 200, "GET /version: {body}");
        let json: Value = serde_json::from_str(&body).expect("/version is JSON");
        json["weight_version"]
            .as_u64()
            .unwrap_or_else(|| panic!("no weight_version in {json}"))
    }

    /// Sends SIGTERM and waits (up to `secs`) for the process to exit.
    pub fn terminate(&mut self, secs: u64) -> Option<ExitStatus> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollout_server_starts_answers_and_stops() {
        let model = tiny_model();
        assert_eq!(tiny_model(), model, "cached");
        let mut server = RolloutServer::start(&model, &["--max-num-seqs", "4"]);
        assert_eq!(server.weight_version(), 0);
        assert!(server.url("/health").starts_with("http://127.0.0.1:"));
        assert_eq!(server.grpc_url(), format!("http://{}", server.grpc_addr()));
        let (status, _) = http_get(server.http_addr(), "/nope").unwrap();
        assert_eq!(status, 404);
        let status = server.terminate(20).expect("exits after SIGTERM");
        assert!(status.success(), "{status}");
    }

    #[test]
    fn jsonl_is_read_skipping_blank_lines() {
        // (Whether a port from free_port() is still free when bound cannot be
        // asserted: a test running beside this one may take it meanwhile.)
        let dir = std::env::temp_dir().join(format!("e2e-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.jsonl");
        std::fs::write(&path, "{\"step\": 1}\n\n{\"step\": 2}\n").unwrap();
        let lines = read_jsonl(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            lines,
            [
                serde_json::json!({"step": 1}),
                serde_json::json!({"step": 2})
            ]
        );
    }
}
