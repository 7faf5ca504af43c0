//! `launcher report`: a synthetic run folder (hand-written manifest and
//! JSONL logs) in a temporary directory, through the library and through
//! the real binary. The numbers in the summary table are checked against
//! means computed by hand; the SVGs against a small well-formedness check.

use std::path::Path;
use std::process::Command;

use launcher::report::{self, write_report};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_launcher");

const MANIFEST: &str = r#"{
  "tandem_version": "0.1.0",
  "created_at": "2025-01-01T00:00:00Z",
  "command": ["learner", "train", "--config", "configs/demo.yaml"],
  "recipe": {
    "version": 1,
    "model": {"path": null, "preset": "tiny", "dtype": "f32", "device": "cpu"},
    "data": {"train_files": [{"path": "data/arith/train.jsonl", "weight": 1.0}],
             "eval_files": [{"path": "data/arith/test.jsonl", "weight": 1.0}]},
    "rollout": {"num_generations": 8, "max_completion_length": 32, "temperature": 1.0},
    "reward": {"functions": [{"name": "exact_match", "weight": 1.0}, {"name": "format", "weight": 0.1}]},
    "train": {"learning_rate": 0.0003, "max_steps": 8, "beta": 0.04, "loss_type": "dapo"},
    "eval": {"eval_steps": 4, "num_samples": 4},
    "topology": {"nodes": 1, "learner_ranks": 2}
  },
  "datasets": [{"path": "data/arith/train.jsonl", "sha256": "0123456789abcdef0123456789abcdef", "bytes": 1000, "rows": 50, "weight": 1.0}],
  "git": {"commit": "deadbeef", "dirty": true},
  "hardware": {"cpus": 2, "memory_bytes": 8000000000, "os": "linux", "arch": "x86_64", "hostname": "box"},
  "topology": {"rank": 0, "world_size": 2, "endpoints": ["http://127.0.0.1:8000"], "weight_sync_endpoints": []},
  "versions": {"tandem": "0.1.0"}
}"#;

/// Step i (1..=8), in the shape of the learner's train_log lines: reward
/// 0.1 i, KL 0.01 i, entropy 2 - 0.1 i, mean completion length 10 + i,
/// tokens/s 100 + 10 i, a constant
/// step time of 3.5 s, 4 s of wall time per step.
fn train_line(i: u32) -> String {
    let i = f64::from(i);
    format!(
        r#"{{"step":{i},"reward":{r},"reward_std":0.05,"rewards":{{"exact_match":{{"mean":{r},"std":0.3}},"format":{{"mean":1.0,"std":0.0}}}},"advantages":{{"mean":0.0,"std":1.0}},"frac_reward_zero_std":0.25,"grad_norm":1.0,"lr":0.0003,"beta":0.04,"skipped":false,"tokens":{{"prompt":256,"completion":256}},"timings":{{"generate":1.0,"score":0.1,"forward_backward":2.0,"allreduce":0.2,"optimizer":0.05,"weight_sync":0.15,"total":3.5}},"tokens_per_s":{t},"elapsed_s":{w},"loss":{l},"pg_loss":{l},"kl_loss":0.0,"entropy_loss":0.0,"kl":{kl},"entropy":{e},"approx_kl":0.0,"clip_ratio_low":0.0,"clip_ratio_high":0.0,"clip_ratio_region":0.0,"importance_sampling_ratio_mean":null,"num_tokens":256.0,"completions":{{"mean_length":{cl},"clipped_ratio":0.0}}}}"#,
        r = 0.1 * i,
        l = -0.01 * i,
        kl = 0.01 * i,
        e = 2.0 - 0.1 * i,
        t = 100.0 + 10.0 * i,
        w = 4.0 * i,
        cl = 10.0 + i,
    )
}

/// Validations at steps 0, 4, 8, in the shape of the learner's EvalResult.
const EVAL_LOG: &str = r#"{"step":0,"num_samples":4,"num_questions":20,"pass_at_k":{"pass@1":0.1,"pass@2":0.2,"pass@4":0.3},"mean_at_k":0.1,"reward_mean":0.2}
{"step":4,"num_samples":4,"num_questions":20,"pass_at_k":{"pass@1":0.3,"pass@2":0.4,"pass@4":0.5},"mean_at_k":0.3,"reward_mean":0.4}
{"step":8,"num_samples":4,"num_questions":20,"pass_at_k":{"pass@1":0.5,"pass@2":0.6,"pass@4":0.7},"mean_at_k":0.5,"reward_mean":0.6}
"#;

fn train_log() -> String {
    (1..=8).map(|i| train_line(i) + "\n").collect()
}

fn run_folder(eval: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), MANIFEST).unwrap();
    std::fs::write(dir.path().join("train_log.jsonl"), train_log()).unwrap();
    if eval {
        std::fs::write(dir.path().join("eval_log.jsonl"), EVAL_LOG).unwrap();
    }
    dir
}

/// The cells of the summary (or first/last) table row whose label is `label`.
fn row(md: &str, label: &str) -> Vec<String> {
    let prefix = format!("| {label} |");
    let line = md
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row {label:?} in\n{md}"));
    line.trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().to_string())
        .collect()
}

fn num(s: &str) -> f64 {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not a number"))
}

/// `[lo, hi]` -> (lo, hi).
fn interval(s: &str) -> (f64, f64) {
    let inner = s.trim_start_matches('[').trim_end_matches(']');
    let (lo, hi) = inner.split_once(", ").expect("an interval");
    (num(lo), num(hi))
}

/// Checks a summary row: n, mean (all), n and mean of the last window; the
/// intervals are ordered and contain their means.
fn check_row(md: &str, label: &str, n: usize, mean: f64, last_n: usize, last_mean: f64) {
    let c = row(md, label);
    assert_eq!(c.len(), 8, "{c:?}");
    assert_eq!(c[2], n.to_string(), "{label}: n");
    let m = num(&c[3]);
    assert!(
        (m - mean).abs() <= 1e-3 * mean.abs().max(1e-3),
        "{label}: {m} vs {mean}"
    );
    let (lo, hi) = interval(&c[4]);
    assert!(lo <= m && m <= hi, "{label}: {lo} <= {m} <= {hi}");
    assert_eq!(c[5], last_n.to_string(), "{label}: last n");
    let lm = num(&c[6]);
    assert!(
        (lm - last_mean).abs() <= 1e-3 * last_mean.abs().max(1e-3),
        "{label}: last {lm} vs {last_mean}"
    );
    let (lo, hi) = interval(&c[7]);
    assert!(lo <= lm && lm <= hi, "{label}: last {lo} <= {lm} <= {hi}");
}

/// Well-formed enough: one root `svg`, every tag closed in order, quoted
/// attributes, no stray `<` or `&` in text.
fn check_xml(text: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    let mut roots = 0;
    while let Some(open) = rest.find('<') {
        let between = &rest[..open];
        if let Some(amp) = between.find('&') {
            let entity = &between[amp..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| entity.starts_with(e)),
                "bad entity in {between:?}"
            );
        }
        let close = rest[open..].find('>').expect("an unclosed tag") + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        assert!(!tag.contains('<'), "< inside a tag: {tag}");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
        if tag.starts_with('?') {
            assert!(tag.ends_with('?'), "{tag}");
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().expect("a closing tag without an opening one");
            assert_eq!(top, name.trim(), "mismatched closing tag");
            continue;
        }
        let name: String = tag
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '/')
            .collect();
        assert!(!name.is_empty(), "empty tag name: {tag}");
        if stack.is_empty() {
            roots += 1;
            assert_eq!(name, "svg", "the root is svg");
        }
        if !tag.ends_with('/') {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1);
    assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
}

#[test]
fn the_summary_has_the_hand_computed_means() {
    let dir = run_folder(true);
    let paths = write_report(dir.path()).unwrap();
    assert_eq!(paths.report, dir.path().join("report.md"));
    let md = std::fs::read_to_string(&paths.report).unwrap();

    // window(8) = 5: steps 4..=8.
    assert_eq!(report::window(8), 5);
    check_row(&md, "reward (mean)", 8, 0.45, 5, 0.6);
    check_row(&md, "reward: exact_match", 8, 0.45, 5, 0.6);
    check_row(&md, "reward: format", 8, 1.0, 5, 1.0);
    check_row(&md, "KL", 8, 0.045, 5, 0.06);
    check_row(&md, "entropy", 8, 1.55, 5, 1.4);
    check_row(&md, "completion length (tokens)", 8, 14.5, 5, 16.0);
    check_row(&md, "loss", 8, -0.045, 5, -0.06);
    check_row(&md, "step time (s)", 8, 3.5, 5, 3.5);
    check_row(&md, "&nbsp;&nbsp;generate (s)", 8, 1.0, 5, 1.0);
    check_row(&md, "&nbsp;&nbsp;weight_sync (s)", 8, 0.15, 5, 0.15);
    check_row(&md, "tokens/s", 8, 145.0, 5, 160.0);
    // Eval rows: one point per validation (3: all of them are the window).
    check_row(&md, "pass@1", 3, 0.3, 3, 0.3);
    check_row(&md, "pass@4", 3, 0.5, 3, 0.5);
    check_row(&md, "mean@4", 3, 0.3, 3, 0.3);
    check_row(&md, "eval reward (mean)", 3, 0.4, 3, 0.4);
    // A constant series has a zero-width interval.
    assert_eq!(row(&md, "step time (s)")[4], "[3.500, 3.500]");
    // The timing parts come in the order of a step.
    let order: Vec<usize> = [
        "generate",
        "score",
        "forward_backward",
        "allreduce",
        "optimizer",
        "weight_sync",
    ]
    .iter()
    .map(|p| md.find(&format!("&nbsp;&nbsp;{p} (s)")).unwrap())
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");

    // First and last.
    let reward_fl = md
        .lines()
        .filter(|l| l.starts_with("| reward (mean) |"))
        .nth(1)
        .expect("a first/last row for the reward");
    assert_eq!(
        reward_fl,
        "| reward (mean) | 0.1000 | 1 | 0.8000 | 8 | +0.7000 |"
    );
    let pass1 = md
        .lines()
        .filter(|l| l.starts_with("| pass@1 |"))
        .nth(1)
        .expect("a first/last row for pass@1");
    assert_eq!(pass1, "| pass@1 | 0.1000 | 0 | 0.5000 | 8 | +0.4000 |");

    // Recipe, run and links.
    assert!(md.contains("| `train.learning_rate` | 0.0003 |"), "{md}");
    assert!(md.contains("| `reward.functions` | exact_match, format (weight 0.1) |"));
    assert!(md.contains("| `data.train_files` | data/arith/train.jsonl |"));
    assert!(md.contains("<details>") && md.contains("</details>"));
    assert!(md.contains("\"learning_rate\": 0.0003"));
    assert!(md.contains("`deadbeef` (with uncommitted changes)"));
    assert!(md.contains("`0123456789abcdef...`"));
    assert!(md.contains("- **Steps logged**: 8 (step 1 to 8)"));
    assert!(md.contains("- **Training time**: 28.00 s"));
    assert!(
        md.contains("- **Wall time**: 32.00 s (at step 8, since the first step of this start)")
    );
    for svg in ["reward.svg", "eval.svg", "kl.svg", "step_time.svg"] {
        assert!(md.contains(&format!("]({svg})")), "no link to {svg}");
        assert!(dir.path().join(svg).is_file(), "{svg}");
    }
    assert_eq!(paths.svgs.len(), 4);
    assert!(md.contains("Nothing was missing or malformed."), "{md}");
    assert!(paths.notes.is_empty(), "{:?}", paths.notes);
}

#[test]
fn the_svgs_are_well_formed_and_show_the_series() {
    let dir = run_folder(true);
    let paths = write_report(dir.path()).unwrap();
    for svg in &paths.svgs {
        let text = std::fs::read_to_string(svg).unwrap();
        check_xml(&text);
        assert!(text.contains("<polyline"), "{}", svg.display());
        assert!(text.contains(">step</text>"), "an x-axis label");
    }
    let eval = std::fs::read_to_string(dir.path().join("eval.svg")).unwrap();
    for name in ["pass@1", "pass@2", "pass@4", "mean@4"] {
        assert!(eval.contains(&format!(">{name}</text>")), "legend {name}");
    }
    // 3 validations x 4 series, each with markers.
    assert_eq!(eval.matches("<circle").count(), 12);
    let time = std::fs::read_to_string(dir.path().join("step_time.svg")).unwrap();
    for part in ["total", "generate", "forward_backward", "weight_sync"] {
        assert!(time.contains(&format!(">{part}</text>")), "legend {part}");
    }
    let reward = std::fs::read_to_string(dir.path().join("reward.svg")).unwrap();
    assert!(reward.contains(">moving average (1)</text>"));
}

#[test]
fn the_same_run_gives_the_same_bytes() {
    let dir = run_folder(true);
    let read_all = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    write_report(dir.path()).unwrap();
    let first = read_all(dir.path());
    write_report(dir.path()).unwrap();
    assert_eq!(first, read_all(dir.path()));
    // And the same content in another folder of the same name renders the same.
    let other = tempfile::tempdir().unwrap();
    let copy = other.path().join(dir.path().file_name().unwrap());
    std::fs::create_dir(&copy).unwrap();
    for f in ["manifest.json", "train_log.jsonl", "eval_log.jsonl"] {
        std::fs::copy(dir.path().join(f), copy.join(f)).unwrap();
    }
    write_report(&copy).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("report.md")).unwrap(),
        std::fs::read(copy.join("report.md")).unwrap()
    );
}

#[test]
fn a_missing_eval_log_is_a_note_and_a_stale_curve_goes() {
    let dir = run_folder(false);
    std::fs::write(dir.path().join("eval.svg"), "<svg/>").unwrap();
    let paths = write_report(dir.path()).unwrap();
    let md = std::fs::read_to_string(&paths.report).unwrap();
    assert!(
        md.contains("- `eval_log.jsonl` is missing"),
        "the note is in the report:\n{md}"
    );
    assert!(paths.notes.iter().any(|n| n.contains("eval_log.jsonl")));
    assert!(!dir.path().join("eval.svg").exists());
    assert!(!md.contains("](eval.svg)"));
    assert!(!md.contains("| pass@1 |"));
    check_row(&md, "reward (mean)", 8, 0.45, 5, 0.6);
    assert_eq!(paths.svgs.len(), 3);
}

#[test]
fn malformed_lines_are_reported_with_their_line_numbers() {
    let dir = run_folder(true);
    let mut lines: Vec<String> = (1..=8).map(train_line).collect();
    lines.insert(2, "{\"step\": 3, \"reward\": ".into()); // line 3: cut short
    lines.insert(4, "[1, 2, 3]".into()); // line 5: not an object
    lines.insert(6, "{\"reward\": 0.9}".into()); // line 7: no step
    lines.insert(7, String::new()); // line 8: blank, ignored
    std::fs::write(dir.path().join("train_log.jsonl"), lines.join("\n") + "\n").unwrap();
    let paths = write_report(dir.path()).unwrap();
    let md = std::fs::read_to_string(&paths.report).unwrap();
    assert!(
        md.contains("`train_log.jsonl` line 3: not valid JSON"),
        "{md}"
    );
    assert!(
        md.contains("`train_log.jsonl` line 5: not a JSON object"),
        "{md}"
    );
    assert!(md.contains("lines without a step"), "{md}");
    assert!(md.contains("`): 7: skipped."), "{md}");
    assert_eq!(paths.notes.len(), 3, "{:?}", paths.notes);
    // The good lines are all there.
    check_row(&md, "reward (mean)", 8, 0.45, 5, 0.6);
}

#[test]
fn missing_keys_and_other_spellings() {
    let dir = tempfile::tempdir().unwrap();
    // TRL-style flat keys with slashes; no KL, no entropy, no timings total.
    let log: String = (1..=4)
        .map(|i| {
            format!(
                "{{\"global_step\": {i}, \"reward\": {r}, \"reward_std\": 0.1, \
                 \"rewards/accuracy/mean\": {r}, \"timing/generate\": 2.0, \
                 \"timing/optimizer\": 1.0}}\n",
                r = f64::from(i) * 0.25
            )
        })
        .collect();
    std::fs::write(dir.path().join("train_log.jsonl"), log).unwrap();
    std::fs::write(
        dir.path().join("eval_log.jsonl"),
        "{\"step\": 2, \"pass@k\": 0.5, \"k\": 8}\n",
    )
    .unwrap();
    let paths = write_report(dir.path()).unwrap();
    let md = std::fs::read_to_string(&paths.report).unwrap();
    check_row(&md, "reward (mean)", 4, 0.625, 4, 0.625);
    check_row(&md, "reward: accuracy", 4, 0.625, 4, 0.625);
    check_row(&md, "&nbsp;&nbsp;generate (s)", 4, 2.0, 4, 2.0);
    check_row(&md, "pass@8", 1, 0.5, 1, 0.5);
    for missing in [
        "`manifest.json` is missing",
        "has no KL",
        "has no entropy",
        "has no step time",
    ] {
        assert!(md.contains(missing), "{missing}:\n{md}");
    }
    assert!(md.contains("No resolved recipe"));
    assert!(!dir.path().join("kl.svg").exists());
    assert!(dir.path().join("step_time.svg").exists());
    assert!(dir.path().join("eval.svg").exists());
}

#[test]
fn a_step_logged_twice_keeps_its_last_line() {
    let dir = run_folder(true);
    // A resumed run that logged step 3 again, with another reward.
    let mut log = train_log();
    log.push_str("{\"step\": 3, \"reward\": {\"mean\": 0.9}}\n");
    std::fs::write(dir.path().join("train_log.jsonl"), &log).unwrap();
    let paths = write_report(dir.path()).unwrap();
    let md = std::fs::read_to_string(&paths.report).unwrap();
    assert!(md.contains("repeat an earlier step"), "{md}");
    // Step 3's reward is now 0.9: (3.6 - 0.3 + 0.9) / 8.
    check_row(&md, "reward (mean)", 8, (3.6 - 0.3 + 0.9) / 8.0, 5, 0.6);
}

#[test]
fn the_cli_writes_the_report() {
    let dir = run_folder(true);
    let out = Command::new(LAUNCHER)
        .arg("report")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("report.md"), "{stdout}");
    assert!(stdout.contains("step_time.svg"), "{stdout}");
    assert!(dir.path().join("report.md").is_file());

    // Notes go to stderr.
    let dir = run_folder(false);
    let out = Command::new(LAUNCHER)
        .arg("report")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("eval_log.jsonl` is missing"));

    // A folder that is not a run, and one that does not exist.
    let empty = tempfile::tempdir().unwrap();
    for (path, message) in [
        (empty.path().to_path_buf(), "is not a run folder"),
        (empty.path().join("nope"), "is not a folder"),
    ] {
        let out = Command::new(LAUNCHER)
            .arg("report")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{stderr}");
    }
    assert!(!empty.path().join("report.md").exists());

    // `report` needs its folder; the run's own flags still parse.
    let out = Command::new(LAUNCHER).arg("report").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RUN_DIR"));
    let out = Command::new(LAUNCHER).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--config") && help.contains("launcher report RUN_DIR"),
        "{help}"
    );
}

/// run_log.jsonl: routine events are counted, the others (resume, warnings,
/// diverged ranks) listed with their details; a malformed line is a note.
#[test]
fn events_out_of_the_ordinary_are_listed() {
    let dir = run_folder(true);
    let run_log = [
        r#"{"time":"t0","event":"start","step":0,"world_size":2}"#,
        r#"{"time":"t1","event":"checkpoint","step":4,"path":"/r/checkpoints/step_000004"}"#,
        r#"{"time":"t2","event":"eval","step":4,"mean_at_k":0.3}"#,
        r#"{"time":"t3","event":"resume","step":4,"world_size":2}"#,
        r#"{"time":"t4","event":"recipe_changed","step":4,"changes":[]}"#,
        r#"{"time":"t5","event":"warn","step":6,"message":"step 6: non-finite loss (NaN); optimizer step skipped","kind":"nonfinite"}"#,
        "not json",
        r#"{"time":"t6","event":"checkpoint","step":8,"path":"/r/checkpoints/step_000008"}"#,
        r#"{"time":"t7","event":"ranks_diverged","step":8,"hashes":["aa","bb"]}"#,
    ];
    std::fs::write(dir.path().join("run_log.jsonl"), run_log.join("\n") + "\n").unwrap();
    let paths = write_report(dir.path()).unwrap();
    let md = std::fs::read_to_string(&paths.report).unwrap();
    assert!(md.contains("## Events"), "{md}");
    assert!(
        md.contains("checkpoint 2, eval 1, ranks_diverged 1, recipe_changed 1, resume 1"),
        "{md}"
    );
    assert!(md.contains("| t3 | resume | 4 | world_size: 2 |"), "{md}");
    assert!(
        md.contains("| t5 | warn | 6 | step 6: non-finite loss (NaN); optimizer step skipped |"),
        "{md}"
    );
    assert!(
        md.contains("| t7 | ranks_diverged | 8 | hashes: [aa, bb] |"),
        "{md}"
    );
    assert!(
        !md.contains("| checkpoint |") && !md.contains("| recipe_changed |"),
        "{md}"
    );
    assert!(md.contains("`run_log.jsonl` line 7: not an event"), "{md}");

    // Only routine events: a line that says so.
    std::fs::write(
        dir.path().join("run_log.jsonl"),
        run_log[..3].join("\n") + "\n",
    )
    .unwrap();
    let md = std::fs::read_to_string(write_report(dir.path()).unwrap().report).unwrap();
    assert!(md.contains("No resumes, warnings or other events"), "{md}");
}

/// A run sized by num_train_epochs (max_steps 0 in the recipe) shows the
/// steps the learner derived, from its start event.
#[test]
fn max_steps_from_epochs_shows_the_derived_count() {
    let dir = run_folder(true);
    let manifest = MANIFEST.replace(
        r#""max_steps": 8,"#,
        r#""max_steps": 0, "num_train_epochs": 1.5,"#,
    );
    assert_ne!(manifest, MANIFEST);
    std::fs::write(dir.path().join("manifest.json"), manifest).unwrap();
    let md = std::fs::read_to_string(write_report(dir.path()).unwrap().report).unwrap();
    assert!(
        md.contains("| `train.max_steps` | from train.num_train_epochs |"),
        "{md}"
    );
    std::fs::write(
        dir.path().join("run_log.jsonl"),
        r#"{"time":"t0","event":"start","step":0,"world_size":2,"max_steps":12}"#.to_string()
            + "\n",
    )
    .unwrap();
    let md = std::fs::read_to_string(write_report(dir.path()).unwrap().report).unwrap();
    assert!(
        md.contains("| `train.max_steps` | 12 (from train.num_train_epochs) |"),
        "{md}"
    );
    assert!(md.contains("| `train.num_train_epochs` | 1.5 |"), "{md}");
}
