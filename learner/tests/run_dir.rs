//! The run folder: manifest and logs written, complete checkpoints only,
//! pruning, resume.

use std::path::Path;

use learner::data::FileFingerprint;
use learner::recipe::Recipe;
use learner::run_dir::{
    CheckpointDir, Manifest, RunDir, RunDirError, RunTopology, latest_checkpoint, resolve_resume,
};
use serde::Serialize;
use serde_json::{Value, json};

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn manifest() -> Manifest {
    let recipe = Recipe::demo(&["rollout.api_key=sk-secret"]).unwrap();
    let datasets = vec![FileFingerprint {
        path: "configs/data/arith_train.jsonl".into(),
        sha256: "ab".repeat(32),
        bytes: 10,
        rows: 2,
        weight: 1.0,
        overlong_prompts: 0,
    }];
    let topology = RunTopology {
        rank: 0,
        world_size: 2,
        endpoints: vec!["http://127.0.0.1:8000".into()],
        weight_sync_endpoints: vec!["http://127.0.0.1:50051".into()],
    };
    Manifest::collect(&recipe, datasets, topology)
}

#[derive(Serialize)]
struct StepLine {
    step: u64,
    loss: f64,
}

#[test]
fn manifest_and_logs_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = RunDir::create(&out, &manifest()).unwrap();

    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["recipe"]["train"]["learning_rate"], json!(1.5e-4));
    assert_eq!(m["recipe"]["rollout"]["api_key"], "<redacted>");
    assert!(!m.to_string().contains("sk-secret"));
    assert_eq!(m["datasets"][0]["rows"], 2);
    assert_eq!(m["topology"]["world_size"], 2);
    assert!(m["hardware"]["cpus"].as_u64().unwrap() >= 1);
    assert!(m["hardware"]["os"].is_string());
    assert!(m["versions"]["candle-core"].is_string());
    assert_eq!(m["tandem_version"], env!("CARGO_PKG_VERSION"));
    // Inside this repository git answers; elsewhere both are null.
    match m["git"]["commit"].as_str() {
        Some(c) => {
            assert_eq!(c.len(), 40);
            assert!(m["git"]["dirty"].is_boolean());
        }
        None => assert!(m["git"]["dirty"].is_null()),
    }
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(run.manifest().unwrap(), serde_json::from_value(m).unwrap());

    run.event("start", json!({"rank": 0})).unwrap();
    run.warn("slow endpoint").unwrap();
    run.event(
        "checkpoint",
        json!({"step": 2, "path": "checkpoints/step_000002"}),
    )
    .unwrap();
    for step in 1..=3 {
        run.log_train(&StepLine {
            step,
            loss: 0.5 / step as f64,
        })
        .unwrap();
    }
    run.log_eval(&json!({"step": 3, "pass@1": 0.25})).unwrap();

    let events = lines(&out.join("run_log.jsonl"));
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["rank"], 0);
    assert!(events[0]["time"].as_str().unwrap().contains('T'));
    assert_eq!(events[1]["event"], "warn");
    assert_eq!(events[1]["message"], "slow endpoint");
    let train = lines(&out.join("train_log.jsonl"));
    assert_eq!(train.len(), 3);
    assert_eq!(train[2], json!({"step": 3, "loss": 0.5 / 3.0}));
    assert_eq!(lines(&out.join("eval_log.jsonl"))[0]["pass@1"], 0.25);

    // A folder that holds a run is not overwritten.
    let e = RunDir::create(&out, &manifest()).unwrap_err();
    assert!(matches!(e, RunDirError::Exists { .. }), "{e}");
}

#[test]
fn resume_drops_the_lines_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    {
        let run = RunDir::create(out, &manifest()).unwrap();
        for step in 1..=5 {
            run.log_train(&json!({"step": step})).unwrap();
        }
        run.log_eval(&json!({"step": 2})).unwrap();
        run.log_eval(&json!({"step": 4})).unwrap();
        for step in [2, 4] {
            let two = [
                json!({"step": step, "index": 0}),
                json!({"step": step, "index": 1}),
            ];
            run.log_completions(&two).unwrap();
        }
    }
    // A line cut short by a crash.
    let mut text = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    text.push_str("{\"step\": 6, \"lo");
    std::fs::write(out.join("train_log.jsonl"), text).unwrap();

    let run = RunDir::resume(out, 3).unwrap();
    let steps = |name: &str| -> Vec<u64> {
        lines(&out.join(name))
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps("train_log.jsonl"), [1, 2, 3]);
    assert_eq!(steps("eval_log.jsonl"), [2]);
    assert_eq!(steps("completions.jsonl"), [2, 2]);
    run.log_train(&json!({"step": 4})).unwrap();
    assert_eq!(steps("train_log.jsonl"), [1, 2, 3, 4]);

    let e = RunDir::resume(&out.join("nothing"), 1).unwrap_err();
    assert!(matches!(e, RunDirError::NotARun { .. }), "{e}");
}

fn write_checkpoint(ckpts: &CheckpointDir, step: u64) -> std::path::PathBuf {
    let pending = ckpts.begin(step).unwrap();
    std::fs::write(pending.path().join("model.safetensors"), b"weights").unwrap();
    std::fs::create_dir(pending.path().join("optimizer")).unwrap();
    std::fs::write(pending.path().join("optimizer/state.bin"), b"adam").unwrap();
    pending.commit().unwrap()
}

#[test]
fn latest_checkpoint_ignores_an_interrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    assert_eq!(latest_checkpoint(run).unwrap(), None);
    let ckpts = CheckpointDir::new(run);
    let p100 = write_checkpoint(&ckpts, 100);
    assert_eq!(p100, run.join("checkpoints/step_000100"));
    assert!(p100.join("optimizer/state.bin").is_file());
    write_checkpoint(&ckpts, 50);

    // Step 200 was being written when the run died.
    let pending = ckpts.begin(200).unwrap();
    std::fs::write(pending.path().join("model.safetensors"), b"half").unwrap();
    drop(pending);
    // A stray file with a checkpoint name is not a checkpoint folder.
    std::fs::write(run.join("checkpoints/step_000300"), b"").unwrap();

    assert_eq!(latest_checkpoint(run).unwrap(), Some(p100.clone()));
    assert_eq!(ckpts.latest().unwrap().unwrap().0, 100);
    assert_eq!(
        ckpts
            .list()
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [50, 100]
    );

    // --resume-from: a run folder, its checkpoints/ folder, or a checkpoint.
    assert_eq!(resolve_resume(run).unwrap(), (100, p100.clone()));
    assert_eq!(
        resolve_resume(&run.join("checkpoints")).unwrap(),
        (100, p100.clone())
    );
    let p50 = run.join("checkpoints/step_000050");
    assert_eq!(resolve_resume(&p50).unwrap(), (50, p50.clone()));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        resolve_resume(empty.path()),
        Err(RunDirError::NoCheckpoint { .. })
    ));

    // Writing the same step again replaces it whole.
    let pending = ckpts.begin(100).unwrap();
    std::fs::write(pending.path().join("model.safetensors"), b"new").unwrap();
    let again = pending.commit().unwrap();
    assert_eq!(
        std::fs::read(again.join("model.safetensors")).unwrap(),
        b"new"
    );
    assert!(!again.join("optimizer").exists());
}

#[test]
fn prune_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = CheckpointDir::new(dir.path());
    for step in [10, 20, 30, 40] {
        write_checkpoint(&ckpts, step);
    }
    let pending = ckpts.begin(50).unwrap();
    drop(pending);
    let removed = ckpts.prune(2).unwrap();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert_eq!(
        ckpts
            .list()
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        [30, 40]
    );
    let names: Vec<String> = std::fs::read_dir(ckpts.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(ckpts.prune(5).unwrap().is_empty());
}
