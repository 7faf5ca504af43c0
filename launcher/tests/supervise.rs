//! Supervision with real child processes: the launcher binary starts a
//! rollout server (the real `rollout-server` with a tiny model when it has
//! been built next to the launcher, otherwise a stand-in process whose
//! `/health` this test answers) and two learner ranks (shell scripts that
//! stand in for `learner train`), and the tests kill, signal or let them
//! finish, then check what the launcher says, its exit code, and that no
//! process is left.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_launcher");

/// The real rollout server, when a workspace build put it next to the launcher
/// (TANDEM_TEST_STAND_IN_SERVER=1 forces the stand-in).
fn real_rollout_server() -> Option<PathBuf> {
    if std::env::var_os("TANDEM_TEST_STAND_IN_SERVER").is_some() {
        return None;
    }
    let path = e2e::bin_dir().join("rollout-server");
    path.is_file().then_some(path)
}

/// A process is gone when /proc has no entry or only a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Answers every HTTP request with 200 (the stand-in server's /health).
fn health_responder() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

struct Setup {
    dir: tempfile::TempDir,
    bin: PathBuf,
    out: PathBuf,
    args: Vec<String>,
    real_server: bool,
}

/// A bin folder with the rollout server and a stand-in learner whose
/// behaviour `FAKE_LEARNER` picks: `sleep` (runs until stopped, rank 0 with a
/// grandchild in its process group) or `exit0` (records its command line and
/// environment, exits 0).
fn setup(rollout_server_script: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let out = dir.path().join("run");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let mut args = vec![
        "--config".to_string(),
        e2e::repo_root()
            .join("configs/demo.yaml")
            .display()
            .to_string(),
        "--device".into(),
        "cpu".into(),
        "--out".into(),
        out.display().to_string(),
        "--grace-period".into(),
        "5".into(),
        "--health-timeout".into(),
        "120".into(),
    ];
    let (real, model) = match (rollout_server_script, real_rollout_server()) {
        (None, Some(server)) => {
            std::os::unix::fs::symlink(&server, bin.join("rollout-server")).unwrap();
            (true, e2e::tiny_model())
        }
        (script, _) => {
            if script.is_none() {
                eprintln!(
                    "NOTE: no rollout-server binary next to {LAUNCHER}; a stand-in process \
                     plays the rollout server (`cargo build -p rollout-server` for the real one)"
                );
            }
            let body = script
                .unwrap_or("#!/bin/sh\necho stand-in rollout server \"$@\"\nexec sleep 600\n");
            write_script(&bin.join("rollout-server"), body);
            let model = dir.path().join("model");
            std::fs::create_dir_all(&model).unwrap();
            // Only its heads are read (for the --tp checks).
            std::fs::write(
                model.join("config.json"),
                r#"{"num_attention_heads": 4, "num_key_value_heads": 2}"#,
            )
            .unwrap();
            // A server that is meant to die never answers /health.
            let port = if script.is_some_and(|s| s.contains("exit 3")) {
                e2e::free_port()
            } else {
                health_responder()
            };
            args.extend(["--port".into(), port.to_string()]);
            (false, model)
        }
    };
    write_script(
        &bin.join("learner"),
        r#"#!/bin/sh
echo "rank $RANK of $WORLD_SIZE at $MASTER_ADDR:$MASTER_PORT local $LOCAL_RANK: $*" > "$FAKE_RECORD_DIR/rank$RANK.txt"
if [ "$FAKE_LEARNER" = exit0 ]; then sleep 1; exit 0; fi
if [ "$RANK" = 0 ]; then
  sleep 600 &
  echo $! > "$FAKE_RECORD_DIR/grandchild.pid"
  wait
fi
exec sleep 600
"#,
    );
    args.push(format!("model.path={}", model.display()));
    args.push("model.preset=null".into());
    Setup {
        dir,
        bin,
        out,
        args,
        real_server: real,
    }
}

impl Setup {
    fn start(&self, learner_mode: &str) -> (Child, PathBuf) {
        let stderr_path = self.dir.path().join("launcher.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = Command::new(LAUNCHER)
            .args(&self.args)
            .env("TANDEM_BIN_DIR", &self.bin)
            .env("FAKE_LEARNER", learner_mode)
            .env("FAKE_RECORD_DIR", self.dir.path())
            .env_remove("SLURM_JOB_NODELIST")
            .env_remove("SLURM_NODELIST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        (child, stderr_path)
    }

    /// The launcher's {name: pid} once `n` processes have started.
    fn pids(&self, n: usize, launcher: &mut Child, stderr: &Path) -> Vec<(String, i32)> {
        let path = self.out.join("launcher/local/node-0.pids.json");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(map) =
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                && map.len() == n
            {
                return map
                    .into_iter()
                    .map(|(k, v)| (k, v.as_i64().unwrap_or(0) as i32))
                    .collect();
            }
            if let Ok(Some(status)) = launcher.try_wait() {
                panic!(
                    "the launcher exited early ({status}):\n{}",
                    std::fs::read_to_string(stderr).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {n} processes after 180 s:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn grandchild(&self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(self.dir.path().join("grandchild.pid"))
                && let Ok(pid) = text.trim().parse()
            {
                return Some(pid);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the launcher did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn assert_all_gone(pids: &[i32]) {
    // The launcher has exited: everything it started must be gone already
    // (a short wait covers the kernel finishing the last exits).
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    for &p in &left {
        // Do not leave them behind for the next test either.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "still running after the launcher exited: {left:?}"
    );
}

#[test]
fn killing_a_learner_stops_everything() {
    let s = setup(None);
    let (mut launcher, stderr) = s.start("sleep");
    let procs = s.pids(3, &mut launcher, &stderr);
    let grandchild = s.grandchild().expect("rank 0 started its grandchild");
    let victim = procs
        .iter()
        .find(|(n, _)| n == "learner-rank1")
        .map(|(_, p)| *p)
        .expect("learner-rank1 started");
    thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let status = wait_exit(&mut launcher, Duration::from_secs(60));
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "launcher: {status}\n{log}");
    assert!(
        log.contains(&format!(
            "learner-rank1 (pid {victim}) exited: killed by signal 9 (SIGKILL)"
        )),
        "the launcher must name the dead process and its status:\n{log}"
    );
    assert!(log.contains("stopping every process"), "{log}");
    let mut all: Vec<i32> = procs.iter().map(|(_, p)| *p).collect();
    all.push(grandchild);
    assert_all_gone(&all);
    // Logs per process.
    for name in ["rollout-0", "learner-rank0", "learner-rank1"] {
        assert!(
            s.out.join(format!("logs/{name}.log")).is_file(),
            "{name}.log"
        );
    }
    if s.real_server {
        let server_log = std::fs::read_to_string(s.out.join("logs/rollout-0.log")).unwrap();
        assert!(server_log.contains("listening http="), "{server_log}");
    }
}

#[test]
fn learners_that_finish_stop_the_servers_and_exit_0() {
    let s = setup(None);
    let (mut launcher, stderr) = s.start("exit0");
    let procs = s.pids(3, &mut launcher, &stderr);
    let status = wait_exit(&mut launcher, Duration::from_secs(60));
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "launcher: {status}\n{log}");
    assert!(log.contains("every learner on this node exited 0"), "{log}");
    assert_all_gone(&procs.iter().map(|(_, p)| *p).collect::<Vec<_>>());
    let rank1 = std::fs::read_to_string(s.dir.path().join("rank1.txt")).unwrap();
    assert!(rank1.starts_with("rank 1 of 2 at 127.0.0.1:"), "{rank1}");
    assert!(rank1.contains("local 1: train --config"), "{rank1}");
    assert!(rank1.contains("rollout.client_tag=rank-1"), "{rank1}");
    assert!(
        rank1.contains("rollout.endpoints=[\"http://127.0.0.1:"),
        "{rank1}"
    );
    assert!(
        rank1.contains("rollout.weight_sync_endpoints=[\"http://127.0.0.1:"),
        "{rank1}"
    );
}

#[test]
fn sigterm_is_passed_on_and_everything_stops() {
    let s = setup(None);
    let (mut launcher, stderr) = s.start("sleep");
    let procs = s.pids(3, &mut launcher, &stderr);
    let grandchild = s.grandchild().expect("rank 0 started its grandchild");
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut launcher, Duration::from_secs(60));
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    let mut all: Vec<i32> = procs.iter().map(|(_, p)| *p).collect();
    all.push(grandchild);
    assert_all_gone(&all);
}

#[test]
fn a_server_that_dies_at_start_is_named_with_its_log() {
    let s = setup(Some(
        "#!/bin/sh\necho 'loading the model: boom, config.json is broken' >&2\nexit 3\n",
    ));
    let (mut launcher, stderr) = s.start("sleep");
    let status = wait_exit(&mut launcher, Duration::from_secs(60));
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("rollout-0 (pid"), "{log}");
    assert!(log.contains("exited: exit status 3"), "{log}");
    assert!(
        log.contains("boom, config.json is broken"),
        "the log tail: {log}"
    );
    // No learner was started.
    assert!(!log.contains("started learner"), "{log}");
}

#[test]
fn dry_run_starts_nothing_and_prints_table_and_json() {
    let s = setup(Some("#!/bin/sh\nexit 1\n"));
    let out = Command::new(LAUNCHER)
        .args(&s.args)
        .arg("--dry-run")
        .env_remove("SLURM_JOB_NODELIST")
        .env("TANDEM_BIN_DIR", &s.bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ROLE"), "{stdout}");
    let json_start = stdout.find("plan (JSON):\n").expect("JSON part") + "plan (JSON):\n".len();
    let plan: serde_json::Value = serde_json::from_str(stdout[json_start..].trim()).unwrap();
    assert_eq!(plan["learner_ranks"], 2);
    assert_eq!(plan["processes"].as_array().map(Vec::len), Some(3));
    assert!(!s.out.join("logs").exists(), "a dry run starts nothing");
    // A tp > 1 plan is shown, and refused at start.
    let mut args: Vec<String> = s
        .args
        .iter()
        .map(|a| {
            if a == "cpu" {
                "cuda".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    args.extend(["--gpus-per-node", "4", "--tp", "2"].map(String::from));
    let out = Command::new(LAUNCHER)
        .args(&args)
        .arg("--dry-run")
        .env_remove("SLURM_JOB_NODELIST")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env("SLURM_GPUS_ON_NODE", "4")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("would refuse to start"), "{stdout}");
    assert!(stdout.contains("\"tp\": 2"), "{stdout}");
    {
        let start = Command::new(LAUNCHER)
            .args(&args)
            .env_remove("SLURM_JOB_NODELIST")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env("SLURM_GPUS_ON_NODE", "4")
            .env("TANDEM_BIN_DIR", &s.bin)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&start.stderr);
        assert_eq!(start.status.code(), Some(2), "{err}");
        assert!(err.contains("not implemented yet"), "{err}");
    }
}
