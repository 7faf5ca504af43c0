//! The data loader: JSONL and Parquet, column mapping, prompts, mixtures,
//! shards, the cursor, fingerprints.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use learner::data::{
    ColumnMapping, DataCursor, DataError, Dataset, Example, PromptFormat, PromptSource,
    PromptTemplate, load_eval_examples, read_rows, sha256_file,
};
use learner::recipe::{DataFile, OnLongPrompt, Recipe};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn write_jsonl(dir: &Path, name: &str, rows: usize, tag: &str) -> PathBuf {
    let path = dir.join(name);
    let text: String = (0..rows)
        .map(|i| format!("{{\"prompt\": \"{tag}{i}\", \"answer\": \"{i}\"}}\n"))
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path, weight: f64) -> Dataset {
    let file = DataFile {
        weight,
        ..DataFile::new(path)
    };
    Dataset::load(
        &file,
        &ColumnMapping::default(),
        &PromptFormat::plain("{question}="),
        None,
    )
    .unwrap()
}

fn keys(examples: &[Example]) -> Vec<(PathBuf, usize)> {
    examples
        .iter()
        .map(|e| (e.source_file.clone(), e.row))
        .collect()
}

#[test]
fn jsonl_with_a_column_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qa.jsonl");
    std::fs::write(
        &path,
        "{\"question\": \"12+7\", \"solution\": 19, \"extra\": [1]}\n\n\
         {\"question\": \"3*4\", \"solution\": \"12\"}\n",
    )
    .unwrap();
    let rows = read_rows(&path, &ColumnMapping::new("question", "solution")).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].question.as_str(), rows[0].answer.as_str()),
        ("12+7", "19")
    );
    assert_eq!(
        (rows[1].question.as_str(), rows[1].answer.as_str()),
        ("3*4", "12")
    );

    let set = Dataset::load(
        &DataFile::new(&path),
        &ColumnMapping::new("question", "solution"),
        &PromptFormat::plain("Q: {question}\nA:"),
        None,
    )
    .unwrap();
    assert_eq!(set.examples[1].prompt_text, "Q: 3*4\nA:");
    assert_eq!(set.examples[1].row, 1);
    assert_eq!(set.fingerprint.rows, 2);
    assert_eq!(set.fingerprint.sha256, sha256_file(&path).unwrap());
}

#[test]
fn parquet_with_a_column_mapping() {
    let path = repo().join("configs/data/arith_tiny.parquet");
    let mapping = ColumnMapping::new("question", "solution");
    let rows = read_rows(&path, &mapping).unwrap();
    // 12 rows in two row groups, an int64 answer column.
    assert_eq!(rows.len(), 12);
    assert_eq!(
        (rows[0].question.as_str(), rows[0].answer.as_str()),
        ("45+31", "76")
    );
    assert_eq!(
        (rows[1].question.as_str(), rows[1].answer.as_str()),
        ("64-56", "8")
    );
    for r in &rows {
        let q = &r.question;
        let (a, op, b) = if let Some((a, b)) = q.split_once('+') {
            (a, '+', b)
        } else if let Some((a, b)) = q.split_once('-') {
            (a, '-', b)
        } else {
            let (a, b) = q.split_once('*').unwrap();
            (a, '*', b)
        };
        let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
        let want = match op {
            '+' => a + b,
            '-' => a - b,
            _ => a * b,
        };
        assert_eq!(r.answer, want.to_string(), "{q}");
    }
    // The same rows as the first 12 of the eval JSONL file.
    let jsonl = read_rows(
        &repo().join("configs/data/arith_eval.jsonl"),
        &ColumnMapping::default(),
    )
    .unwrap();
    for (p, j) in rows.iter().zip(&jsonl) {
        assert_eq!((&p.question, &p.answer), (&j.question, &j.answer));
    }

    // A column the file does not have.
    let e = read_rows(&path, &ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("arith_tiny.parquet") && e.contains("\"prompt\""),
        "{e}"
    );
    assert!(e.contains("question, solution, kind"), "{e}");
}

#[test]
fn a_missing_column_names_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holes.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"1+1\", \"answer\": \"2\"}\n{\"prompt\": \"2+2\"}\n",
    )
    .unwrap();
    let e = read_rows(&path, &ColumnMapping::default()).unwrap_err();
    assert!(matches!(e, DataError::MissingColumn { .. }));
    let e = e.to_string();
    assert!(e.contains("holes.jsonl"), "{e}");
    assert!(e.contains("row 1 (line 2)"), "{e}");
    assert!(e.contains("no column \"answer\""), "{e}");

    std::fs::write(&path, "{\"prompt\": null, \"answer\": \"2\"}\n").unwrap();
    let e = read_rows(&path, &ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 0") && e.contains("\"prompt\""), "{e}");

    std::fs::write(&path, "not json\n").unwrap();
    let e = read_rows(&path, &ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1") && e.contains("not JSON"), "{e}");

    let e = read_rows(&dir.path().join("x.csv"), &ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(".jsonl or .parquet"), "{e}");
}

#[test]
fn mixture_draws_follow_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "a.jsonl", 10, "a");
    let b = write_jsonl(dir.path(), "b.jsonl", 30, "b");
    let mut src = PromptSource::new(vec![load(&a, 3.0), load(&b, 1.0)], 7, true, 0, 1).unwrap();
    let n = 20_000;
    let batch = src.next_batch(n);
    let from_a = batch.iter().filter(|e| e.source_file == a).count();
    let frac = from_a as f64 / n as f64;
    assert!((frac - 0.75).abs() < 0.015, "{frac}");
    // Every row of each file is used, epoch after epoch.
    let rows_a: HashSet<usize> = batch
        .iter()
        .filter(|e| e.source_file == a)
        .map(|e| e.row)
        .collect();
    assert_eq!(rows_a.len(), 10);
    assert_eq!(src.file_draws().iter().sum::<u64>(), n as u64);

    // The seed decides the order; the same seed, the same order.
    let mut again = PromptSource::new(vec![load(&a, 3.0), load(&b, 1.0)], 7, true, 0, 1).unwrap();
    assert_eq!(keys(&again.next_batch(100)), keys(&batch[..100]));
    let mut other = PromptSource::new(vec![load(&a, 3.0), load(&b, 1.0)], 8, true, 0, 1).unwrap();
    assert_ne!(keys(&other.next_batch(100)), keys(&batch[..100]));
}

#[test]
fn each_epoch_is_a_reshuffled_permutation() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "a.jsonl", 50, "a");
    let mut src = PromptSource::new(vec![load(&a, 1.0)], 1, true, 0, 1).unwrap();
    let e1: Vec<usize> = src.next_batch(50).iter().map(|e| e.row).collect();
    let e2: Vec<usize> = src.next_batch(50).iter().map(|e| e.row).collect();
    let all: HashSet<usize> = (0..50).collect();
    assert_eq!(e1.iter().copied().collect::<HashSet<_>>(), all);
    assert_eq!(e2.iter().copied().collect::<HashSet<_>>(), all);
    assert_ne!(e1, e2);
    assert_ne!(e1, (0..50).collect::<Vec<_>>());

    // Without shuffle: file order.
    let mut plain = PromptSource::new(vec![load(&a, 1.0)], 1, false, 0, 1).unwrap();
    let rows: Vec<usize> = plain.next_batch(53).iter().map(|e| e.row).collect();
    assert_eq!(&rows[..50], &(0..50).collect::<Vec<_>>()[..]);
    assert_eq!(&rows[50..], &[0, 1, 2]);
}

#[test]
fn shards_are_disjoint_and_cover_every_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "a.jsonl", 60, "a");
    let world = 3;
    for epoch in 0..2 {
        let mut seen = HashSet::new();
        for rank in 0..world {
            let mut src = PromptSource::new(vec![load(&a, 1.0)], 5, true, rank, world).unwrap();
            if epoch == 1 {
                src.next_batch(20);
            }
            for e in src.next_batch(20) {
                assert!(
                    seen.insert(e.row),
                    "row {} given twice in epoch {epoch}",
                    e.row
                );
            }
        }
        assert_eq!(seen.len(), 60);
    }
}

#[test]
fn two_ranks_see_the_prompts_of_one_rank_with_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "a.jsonl", 13, "a");
    let b = write_jsonl(dir.path(), "b.jsonl", 7, "b");
    let sets = || vec![load(&a, 2.0), load(&b, 1.0)];
    let mut one = PromptSource::new(sets(), 3, true, 0, 1).unwrap();
    let mut r0 = PromptSource::new(sets(), 3, true, 0, 2).unwrap();
    let mut r1 = PromptSource::new(sets(), 3, true, 1, 2).unwrap();
    for _step in 0..5 {
        let mut global = keys(&one.next_batch(8));
        let mut split = keys(&r0.next_batch(4));
        split.extend(keys(&r1.next_batch(4)));
        global.sort();
        split.sort();
        assert_eq!(global, split);
    }
}

#[test]
fn a_restored_cursor_gives_the_same_next_examples() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "a.jsonl", 9, "a");
    let b = write_jsonl(dir.path(), "b.jsonl", 4, "b");
    let sets = || vec![load(&a, 1.0), load(&b, 1.0)];
    let mut src = PromptSource::new(sets(), 11, true, 1, 2).unwrap();
    for _ in 0..3 {
        src.next_batch(7);
    }
    let cursor = src.cursor();
    let json = serde_json::to_string(&cursor).unwrap();
    let expected = src.next_batch(25);

    let mut resumed = PromptSource::new(sets(), 11, true, 1, 2).unwrap();
    let cursor: DataCursor = serde_json::from_str(&json).unwrap();
    resumed.restore(&cursor).unwrap();
    assert_eq!(resumed.next_batch(25), expected);

    // The cursor is the same on every rank: rank 0 continues its own share.
    let mut r0 = PromptSource::new(sets(), 11, true, 0, 2).unwrap();
    let mut r0_fresh = PromptSource::new(sets(), 11, true, 0, 2).unwrap();
    r0_fresh.next_batch(21);
    r0.restore(&cursor).unwrap();
    assert_eq!(r0.next_batch(5), r0_fresh.next_batch(5));

    // Another data file: refused.
    let c = write_jsonl(dir.path(), "c.jsonl", 4, "c");
    let mut changed =
        PromptSource::new(vec![load(&a, 1.0), load(&c, 1.0)], 11, true, 1, 2).unwrap();
    let e = changed.restore(&cursor).unwrap_err().to_string();
    assert!(e.contains("training files changed"), "{e}");
    let mut reseeded = PromptSource::new(sets(), 12, true, 1, 2).unwrap();
    assert!(reseeded.restore(&cursor).is_err());
}

#[test]
fn hash_drift_stops_with_both_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "a.jsonl", 5, "a");
    let good = sha256_file(&a).unwrap();
    assert_eq!(good.len(), 64);
    let file = DataFile {
        expected_hash: Some(good.to_uppercase()),
        ..DataFile::new(&a)
    };
    let fmt = PromptFormat::plain("{question}");
    Dataset::load(&file, &ColumnMapping::default(), &fmt, None).unwrap();

    std::fs::write(&a, "{\"prompt\": \"changed\", \"answer\": \"1\"}\n").unwrap();
    let now = sha256_file(&a).unwrap();
    let e = Dataset::load(&file, &ColumnMapping::default(), &fmt, None).unwrap_err();
    assert!(matches!(e, DataError::Drift { .. }));
    let e = e.to_string();
    assert!(
        e.contains(&good) && e.contains(&now) && e.contains("a.jsonl"),
        "{e}"
    );
}

/// A Hugging Face dataset's shards (`data/train-*.parquet`): a pattern
/// stands for the files it matches, in name order, as one dataset (one
/// weight, one fingerprint: the hash of its files' hashes), each example
/// keeping its shard and row; a pattern that matches nothing, or a file of
/// another format among its matches, is an error naming the pattern.
#[test]
fn a_pattern_loads_a_datasets_shards_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_jsonl(dir.path(), "train-00000-of-00002.jsonl", 3, "a");
    let b = write_jsonl(dir.path(), "train-00001-of-00002.jsonl", 2, "b");
    write_jsonl(dir.path(), "test-00000-of-00001.jsonl", 4, "t");
    let pattern = dir.path().join("train-*.jsonl");
    let d = load(&pattern, 2.0);
    assert_eq!(
        keys(&d.examples),
        [
            (a.clone(), 0),
            (a.clone(), 1),
            (a.clone(), 2),
            (b.clone(), 0),
            (b.clone(), 1)
        ]
    );
    assert!(
        d.examples
            .iter()
            .all(|e| e.dataset.as_ref() == Some(&pattern))
    );
    let f = &d.fingerprint;
    assert_eq!(
        (f.path.as_path(), f.rows, f.weight),
        (pattern.as_path(), 5, 2.0)
    );
    let both = format!(
        "{}\n{}\n",
        sha256_file(&a).unwrap(),
        sha256_file(&b).unwrap()
    );
    assert_eq!(f.sha256, learner::data::sha256_hex(both.as_bytes()));
    let sizes = std::fs::metadata(&a).unwrap().len() + std::fs::metadata(&b).unwrap().len();
    assert_eq!(f.bytes, sizes);
    // expected_hash pins the whole set: a changed shard is drift.
    let pinned = DataFile {
        expected_hash: Some(f.sha256.clone()),
        ..DataFile::new(&pattern)
    };
    let fmt = PromptFormat::plain("{question}=");
    Dataset::load(&pinned, &ColumnMapping::default(), &fmt, None).unwrap();
    write_jsonl(dir.path(), "train-00001-of-00002.jsonl", 1, "b");
    let e = Dataset::load(&pinned, &ColumnMapping::default(), &fmt, None).unwrap_err();
    assert!(matches!(e, DataError::Drift { .. }), "{e}");
    // One plain file is as before: its own hash, no dataset entry; so is
    // a file whose name looks like a pattern.
    let plain = load(&a, 1.0);
    assert_eq!(plain.fingerprint.sha256, sha256_file(&a).unwrap());
    assert!(plain.examples[0].dataset.is_none());
    let odd = write_jsonl(dir.path(), "set[1].jsonl", 2, "o");
    assert_eq!(
        keys(&load(&odd, 1.0).examples),
        [(odd.clone(), 0), (odd, 1)]
    );

    for (bad, says) in [
        (dir.path().join("valid-*.jsonl"), "matches no file"),
        (dir.path().join("[.jsonl"), "Pattern"),
    ] {
        let file = DataFile::new(&bad);
        let e = Dataset::load(&file, &ColumnMapping::default(), &fmt, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&bad.display().to_string()) && e.contains(says),
            "{e}"
        );
    }
    std::fs::write(dir.path().join("train-notes.txt"), "x").unwrap();
    let e = Dataset::load(
        &DataFile::new(dir.path().join("train-*")),
        &ColumnMapping::default(),
        &fmt,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("train-notes.txt") && e.contains(".parquet"),
        "{e}"
    );

    // Parquet shards too (the repo's file, twice).
    let shards = tempfile::tempdir().unwrap();
    for i in 0..2 {
        std::fs::copy(
            repo().join("configs/data/arith_tiny.parquet"),
            shards
                .path()
                .join(format!("train-0000{i}-of-00002.parquet")),
        )
        .unwrap();
    }
    let mapped = DataFile::new(shards.path().join("train-*.parquet"));
    let d = Dataset::load(
        &mapped,
        &ColumnMapping::new("question", "solution"),
        &fmt,
        None,
    )
    .unwrap();
    assert_eq!(d.examples.len(), 24);
}

#[test]
fn long_prompts_are_truncated_or_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"1+2\", \"answer\": \"3\"}\n{\"prompt\": \"12+75\", \"answer\": \"87\"}\n",
    )
    .unwrap();
    let mut fmt = PromptFormat::plain("{question}=");
    fmt.max_prompt_chars = Some(3);
    fmt.on_long_prompt = OnLongPrompt::Reject;
    let e = Dataset::load(&DataFile::new(&path), &ColumnMapping::default(), &fmt, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("long.jsonl") && e.contains("row 1 (line 2)"),
        "{e}"
    );
    assert!(
        e.contains("5 characters") && e.contains("max_prompt_chars = 3"),
        "{e}"
    );

    fmt.on_long_prompt = OnLongPrompt::Truncate;
    let set = Dataset::load(&DataFile::new(&path), &ColumnMapping::default(), &fmt, None).unwrap();
    assert_eq!(set.examples[0].prompt_text, "1+2=");
    assert_eq!(set.examples[1].prompt_text, "12+=");
    assert_eq!(set.examples[1].question, "12+");
}

/// verl's filter_overlong_prompts: rows whose templated prompt is longer than
/// the limit in tokens are left out (counted), the others keep their row
/// numbers; a file with none left is an error that says what to change.
#[test]
fn overlong_prompts_are_left_out_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"1+2\", \"answer\": \"3\"}\n\
         {\"prompt\": \"12+75\", \"answer\": \"87\"}\n\
         {\"prompt\": \"4*5\", \"answer\": \"20\"}\n",
    )
    .unwrap();
    let tok = model::presets::tokenizer().unwrap();
    let fmt = PromptFormat::plain("{question}=");
    let file = DataFile::new(&path);
    let mapping = ColumnMapping::default();
    // "1+2=" and "4*5=" are 4 characters (4 tokens here), "12+75=" 6.
    let set = Dataset::load_within(&file, &mapping, &fmt, Some(&tok), Some(4)).unwrap();
    let kept: Vec<(usize, &str)> = set
        .examples
        .iter()
        .map(|e| (e.row, e.prompt_text.as_str()))
        .collect();
    assert_eq!(kept, vec![(0, "1+2="), (2, "4*5=")]);
    assert_eq!(
        (set.fingerprint.rows, set.fingerprint.overlong_prompts),
        (2, 1)
    );
    // No limit: every row.
    let all = Dataset::load_within(&file, &mapping, &fmt, Some(&tok), None).unwrap();
    assert_eq!(all.examples.len(), 3);
    let e = Dataset::load_within(&file, &mapping, &fmt, Some(&tok), Some(3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mixed.jsonl") && e.contains("data.filter_overlong_prompts"),
        "{e}"
    );
}

#[test]
fn prompts_from_chat_template_system_prompt_and_template_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), "a.jsonl", 1, "7+");
    let row = &read_rows(&path, &ColumnMapping::default()).unwrap()[0];
    let tok = model::presets::tokenizer().unwrap();

    let chat = PromptFormat {
        template: PromptTemplate::Chat,
        system_prompt: Some("Add.".into()),
        ..PromptFormat::plain("")
    };
    let text = chat.build(&path, row, Some(&tok)).unwrap();
    assert!(text.contains("Add."), "{text}");
    assert!(text.contains("7+0"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    assert!(chat.build(&path, row, None).is_err());

    let mut plain = PromptFormat::plain("{system_prompt}|{question}=");
    plain.system_prompt = Some("S".into());
    assert_eq!(plain.build(&path, row, None).unwrap(), "S|7+0=");
    let mut plain = PromptFormat::plain("{question}=");
    plain.system_prompt = Some("S".into());
    assert_eq!(plain.build(&path, row, None).unwrap(), "S\n7+0=");

    let r1 = repo().join("configs/r1_zero_prompt.txt");
    let t = PromptTemplate::from_spec(r1.to_str().unwrap()).unwrap();
    let fmt = PromptFormat {
        template: t,
        ..PromptFormat::plain("")
    };
    let text = fmt.build(&path, row, None).unwrap();
    assert!(
        text.starts_with("A conversation between User and Assistant."),
        "{text}"
    );
    assert!(text.ends_with("User: 7+0\nAssistant: <think>"), "{text:?}");
    // Every character is in the tiny model's vocabulary.
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    assert_eq!(
        PromptTemplate::from_spec("chat").unwrap(),
        PromptTemplate::Chat
    );
    let e = PromptTemplate::from_spec("no/such/template.txt")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt_template") && e.contains("{question}"),
        "{e}"
    );
}

#[test]
fn the_demo_recipe_data_loads() {
    let mut recipe = Recipe::demo(&[] as &[&str]).unwrap();
    for f in recipe
        .data
        .train_files
        .iter_mut()
        .chain(recipe.data.eval_files.iter_mut())
    {
        f.path = repo().join(&f.path);
    }
    let mut src = PromptSource::from_recipe(&recipe, 0, 2, None, None).unwrap();
    let fp = src.fingerprints();
    assert_eq!(fp[0].rows, 6000);
    assert_eq!(
        Some(&fp[0].sha256),
        recipe.data.train_files[0].expected_hash.as_ref()
    );
    let batch = src.next_batch(recipe.prompts_per_rank_per_step());
    assert_eq!(batch.len(), 8);
    assert!(batch.iter().all(|e| e.prompt_text.ends_with('=')));

    let (eval, efp) = load_eval_examples(&recipe, recipe.eval.max_examples, None, None).unwrap();
    assert_eq!(eval.len(), 500);
    assert_eq!(efp[0].rows, 500);
    // Held out: no training question is an eval question.
    let train: HashSet<String> = src.datasets()[0]
        .examples
        .iter()
        .map(|e| e.question.clone())
        .collect();
    assert!(eval.iter().all(|e| !train.contains(&e.question)));
}

/// TRL's conversational format: the prompt column is a list of messages
/// (JSONL arrays, or Parquet list<struct<role, content>> as Hugging Face
/// datasets write it), rendered with the model's chat template.
#[test]
fn conversational_prompts_go_through_the_chat_template() {
    let tok = model::presets::tokenizer().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"prompt": [{"role": "user", "content": "12+7"}], "answer": "19"}"#,
            "\n",
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "3*"}, {"type": "text", "text": "4"}]}], "answer": "12"}"#,
            "\n"
        ),
    )
    .unwrap();
    let rows = read_rows(&path, &ColumnMapping::default()).unwrap();
    assert_eq!(rows[0].question, "12+7");
    assert_eq!(rows[1].question, "3*4");
    assert_eq!(rows[1].messages.as_ref().map(Vec::len), Some(2));

    // The text template does not apply; the recipe's system prompt is added
    // only where the conversation has none.
    let mut format = PromptFormat::plain("{question}=");
    format.system_prompt = Some("Add.".into());
    let first = format.build(&path, &rows[0], Some(&tok)).unwrap();
    assert_eq!(
        first,
        "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n12+7<|im_end|>\n<|im_start|>assistant\n"
    );
    let second = format.build(&path, &rows[1], Some(&tok)).unwrap();
    assert!(
        second.starts_with("<|im_start|>system\nBe brief.<|im_end|>"),
        "{second}"
    );
    assert!(!second.contains("Add."), "{second}");
    let e = format.build(&path, &rows[0], None).unwrap_err().to_string();
    assert!(e.contains("tokenizer"), "{e}");

    // The same shape from Parquet.
    let parquet = repo().join("configs/data/arith_chat_tiny.parquet");
    let rows = read_rows(&parquet, &ColumnMapping::default()).unwrap();
    assert_eq!(rows.len(), 4);
    let eval = std::fs::read_to_string(repo().join("configs/data/arith_eval.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(eval.lines().next().unwrap()).unwrap();
    assert_eq!(rows[0].question, first["prompt"].as_str().unwrap());
    assert_eq!(rows[0].answer, first["answer"].as_str().unwrap());
    let text = PromptFormat::plain("{question}=")
        .build(&parquet, &rows[0], Some(&tok))
        .unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nAnswer with the number.<|im_end|>"),
        "{text}"
    );

    // A list that is not a conversation says what it expected.
    std::fs::write(&path, "{\"prompt\": [1, 2], \"answer\": \"3\"}\n").unwrap();
    let e = read_rows(&path, &ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"role\"") && e.contains("row 0"), "{e}");
}

/// `data.chat_template_kwargs` reach the template for text prompts under
/// `prompt_template: chat` and for conversational rows, as TRL passes its
/// `chat_template_kwargs` (Qwen3's `enable_thinking: false`).
#[test]
fn chat_template_kwargs_reach_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let text_rows = write_jsonl(dir.path(), "a.jsonl", 1, "7+");
    let chat_rows = dir.path().join("chat.jsonl");
    std::fs::write(
        &chat_rows,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"2+2\"}], \"answer\": \"4\"}\n",
    )
    .unwrap();
    let tiny = model::presets::tokenizer().unwrap();
    // Qwen3's switch, reduced to what it does: an empty think block.
    let template = "{% for m in messages %}{{ m.content }}|{% endfor %}\
        {% if add_generation_prompt %}A:{% if enable_thinking is defined and \
        not enable_thinking %}<think></think>{% endif %}{% endif %}";
    let tok = model::tokenizer::Tokenizer::from_json(
        tiny.tokenizer_json(),
        Some(serde_json::json!({"chat_template": template})),
    )
    .unwrap();
    let mut chat = PromptFormat {
        template: PromptTemplate::Chat,
        ..PromptFormat::plain("")
    };
    let text_row = &read_rows(&text_rows, &ColumnMapping::default()).unwrap()[0];
    let chat_row = &read_rows(&chat_rows, &ColumnMapping::default()).unwrap()[0];
    assert_eq!(
        chat.build(&text_rows, text_row, Some(&tok)).unwrap(),
        "7+0|A:"
    );
    chat.chat_template_kwargs
        .insert("enable_thinking".into(), serde_json::json!(false));
    assert_eq!(
        chat.build(&text_rows, text_row, Some(&tok)).unwrap(),
        "7+0|A:<think></think>"
    );
    assert_eq!(
        chat.build(&chat_rows, chat_row, Some(&tok)).unwrap(),
        "2+2|A:<think></think>"
    );

    // From the recipe; the learner's own variables cannot be overridden.
    let base = "version: 1\nmodel: {preset: tiny}\ndata: {train_files: [t.jsonl]}\n\
                reward: {functions: [{name: exact_match}]}\n";
    let r = Recipe::from_yaml_str(
        base,
        "r.yaml",
        &["data.chat_template_kwargs.enable_thinking=false"],
    )
    .unwrap();
    assert_eq!(
        PromptFormat::from_recipe(&r.data)
            .unwrap()
            .chat_template_kwargs,
        chat.chat_template_kwargs
    );
    let e = Recipe::from_yaml_str(
        base,
        "r.yaml",
        &["data.chat_template_kwargs.add_generation_prompt=false"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("data.chat_template_kwargs.add_generation_prompt"),
        "{e}"
    );
}

/// `data.chat_template` (text or a file) takes the model folder's place
/// when prompts are rendered; one that does not compile is a recipe error
/// naming the key.
#[test]
fn a_recipe_chat_template_replaces_the_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    model::presets::tokenizer().unwrap().save(&folder).unwrap();
    let rows = write_jsonl(dir.path(), "a.jsonl", 1, "7+");
    let row = &read_rows(&rows, &ColumnMapping::default()).unwrap()[0];
    let file = dir.path().join("t.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}<{{ m.content }}>{% endfor %}=",
    )
    .unwrap();
    let base = "version: 1\nmodel: {preset: tiny}\ndata: {train_files: [t.jsonl]}\n\
                reward: {functions: [{name: exact_match}]}\n";
    for spec in [
        "\"{% for m in messages %}<{{ m.content }}>{% endfor %}=\"".to_string(),
        file.display().to_string(),
    ] {
        let r =
            Recipe::from_yaml_str(base, "r.yaml", &[format!("data.chat_template={spec}")]).unwrap();
        let tok = learner::data::policy_tokenizer(&folder, &r.data).unwrap();
        let chat = PromptFormat::from_recipe(&r.data).unwrap();
        assert_eq!(
            chat.build(&rows, row, Some(&tok)).unwrap(),
            "<7+0>=",
            "{spec}"
        );
    }
    // Without it, the folder's own (ChatML) template.
    let r = Recipe::from_yaml_str(base, "r.yaml", &[] as &[&str]).unwrap();
    let tok = learner::data::policy_tokenizer(&folder, &r.data).unwrap();
    let own = PromptFormat::from_recipe(&r.data)
        .unwrap()
        .build(&rows, row, Some(&tok))
        .unwrap();
    assert!(own.starts_with("<|im_start|>"), "{own:?}");
    for bad in ["\"{% if x %}\"", "no/such/template.jinja"] {
        let e = Recipe::from_yaml_str(base, "r.yaml", &[format!("data.chat_template={bad}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.chat_template"), "{bad}: {e}");
    }
}

/// verl's datasets keep the reference answer inside a struct column
/// (`reward_model.ground_truth`): a dotted column name reads it, from
/// Parquet (as verl's preprocessing writes it) and from JSONL objects.
#[test]
fn dotted_columns_read_inside_struct_columns() {
    let verl = ColumnMapping::new("prompt", "reward_model.ground_truth");
    let parquet = repo().join("configs/data/arith_verl_tiny.parquet");
    let rows = read_rows(&parquet, &verl).unwrap();
    assert_eq!(rows.len(), 4);
    let eval = std::fs::read_to_string(repo().join("configs/data/arith_eval.jsonl")).unwrap();
    for (row, line) in rows.iter().zip(eval.lines()) {
        let want: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row.answer, want["answer"].as_str().unwrap());
        assert_eq!(row.question, want["prompt"].as_str().unwrap());
        assert_eq!(row.messages.as_ref().map(Vec::len), Some(1));
    }
    // verl's data_source column, read when the mapping names it (Parquet
    // and JSONL); a missing one is named.
    let mut with_source = verl.clone();
    with_source.source_column = Some("data_source".into());
    let rows = read_rows(&parquet, &with_source).unwrap();
    assert!(
        rows.iter()
            .all(|r| r.data_source.as_deref() == Some("arith"))
    );
    assert!(read_rows(&parquet, &verl).unwrap()[0].data_source.is_none());
    let mut wrong = verl.clone();
    wrong.source_column = Some("source".into());
    let e = read_rows(&parquet, &wrong).unwrap_err().to_string();
    assert!(e.contains("\"source\"") && e.contains("data_source"), "{e}");
    // A number inside the struct reads as text; a missing inner key names
    // the ones there are.
    let by_index = ColumnMapping::new("prompt", "extra_info.index");
    let rows = read_rows(&parquet, &by_index).unwrap();
    assert_eq!(rows[3].answer, "3");
    let e = read_rows(
        &parquet,
        &ColumnMapping::new("prompt", "reward.ground_truth"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("reward.ground_truth") && e.contains("reward_model"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("verl.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"1+1\", \"reward_model\": {\"ground_truth\": \"2\", \"style\": \"rule\"}}\n\
         {\"prompt\": \"2+2\", \"reward_model\": {\"ground_truth\": 4}}\n",
    )
    .unwrap();
    let rows = read_rows(&path, &verl).unwrap();
    assert_eq!(
        (rows[0].answer.as_str(), rows[1].answer.as_str()),
        ("2", "4")
    );
    std::fs::write(
        &path,
        "{\"prompt\": \"1+1\", \"data_source\": \"openai/gsm8k\", \"reward_model\": {\"ground_truth\": \"2\"}}\n",
    )
    .unwrap();
    let rows = read_rows(&path, &with_source).unwrap();
    assert_eq!(rows[0].data_source.as_deref(), Some("openai/gsm8k"));
    // A key with a dot in its name is still read as it is.
    std::fs::write(&path, "{\"prompt\": \"x\", \"a.b\": \"literal\"}\n").unwrap();
    let rows = read_rows(&path, &ColumnMapping::new("prompt", "a.b")).unwrap();
    assert_eq!(rows[0].answer, "literal");
    std::fs::write(
        &path,
        "{\"prompt\": \"x\", \"reward_model\": {\"style\": \"rule\"}}\n",
    )
    .unwrap();
    let e = read_rows(&path, &verl).unwrap_err().to_string();
    assert!(
        e.contains("reward_model.ground_truth") && e.contains("reward_model.{style}"),
        "{e}"
    );
}

/// `python` reward functions take every column of a row, as TRL passes
/// them: a recipe with one keeps the rows' other columns (all but the
/// prompt's), with their values as read, a Parquet struct as an object.
#[test]
fn rows_keep_their_other_columns_for_python_reward_functions() {
    let mut r = learner::recipe::Recipe::demo(&[] as &[&str]).unwrap();
    assert!(!ColumnMapping::from_recipe(&r).keep_columns);
    // Read from the recipe where its rows are read, so a reward added in
    // code counts as one from the YAML.
    r.reward.functions.push(
        serde_json::from_value(
            serde_json::json!({"name": "python", "function": "my_rewards.py:f"}),
        )
        .unwrap(),
    );
    assert!(ColumnMapping::from_recipe(&r).keep_columns);

    let mut verl = ColumnMapping::new("prompt", "reward_model.ground_truth");
    assert!(
        read_rows(&repo().join("configs/data/arith_verl_tiny.parquet"), &verl).unwrap()[3]
            .columns
            .is_none()
    );
    verl.keep_columns = true;
    let rows = read_rows(&repo().join("configs/data/arith_verl_tiny.parquet"), &verl).unwrap();
    let columns: serde_json::Value =
        serde_json::from_str(rows[3].columns.as_ref().unwrap()).unwrap();
    assert_eq!(columns["extra_info"]["index"], 3, "{columns}");
    assert_eq!(
        columns["reward_model"]["ground_truth"], rows[3].answer,
        "{columns}"
    );
    assert_eq!(columns["data_source"], "arith", "{columns}");
    assert!(columns.get("prompt").is_none(), "{columns}");

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("code.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"Add.\", \"solution\": \"x\", \"level\": 3, \
         \"verification_info\": {\"test_cases\": [{\"input\": \"1 2\", \"output\": \"3\"}]}}\n",
    )
    .unwrap();
    let mut mapping = ColumnMapping::new("prompt", "solution");
    mapping.keep_columns = true;
    let rows = read_rows(&path, &mapping).unwrap();
    let columns: serde_json::Value =
        serde_json::from_str(rows[0].columns.as_ref().unwrap()).unwrap();
    assert_eq!(
        columns,
        serde_json::json!({"solution": "x", "level": 3, "verification_info":
            {"test_cases": [{"input": "1 2", "output": "3"}]}})
    );
}

/// TRL's dict of environment factories: each row's `environment` column
/// chooses its environment, and its prompt lists that environment's tools;
/// a row that names none of them stops the load, naming the row and the
/// names there are.
#[test]
fn rows_list_the_tools_of_the_environment_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("envs.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"2+2\", \"answer\": \"4\", \"environment\": \"count\"}\n\
         {\"prompt\": \"3+3\", \"answer\": \"6\", \"environment\": \"guess\"}\n\
         {\"prompt\": \"4+4\", \"answer\": \"8\"}\n\
         {\"prompt\": \"5+5\", \"answer\": \"10\", \"environment\": \"chess\"}\n",
    )
    .unwrap();
    let tiny = model::presets::tokenizer().unwrap();
    let template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}\
        {% for m in messages %}{{ m.content }}|{% endfor %}A:";
    let tok = model::tokenizer::Tokenizer::from_json(
        tiny.tokenizer_json(),
        Some(serde_json::json!({"chat_template": template})),
    )
    .unwrap();
    let tool = |name: &str| serde_json::json!([{"type": "function", "function": {"name": name}}]);
    let chat = PromptFormat {
        template: PromptTemplate::Chat,
        tools: Some(learner::data::PromptTools::ByEnvironment(
            [
                ("count".to_string(), tool("add")),
                ("guess".into(), tool("submit")),
            ]
            .into(),
        )),
        ..PromptFormat::plain("")
    };
    let mapping = ColumnMapping {
        keep_columns: true,
        ..ColumnMapping::default()
    };
    let read = read_rows(&rows, &mapping).unwrap();
    assert_eq!(
        chat.build(&rows, &read[0], Some(&tok)).unwrap(),
        "[add]2+2|A:"
    );
    assert_eq!(
        chat.build(&rows, &read[1], Some(&tok)).unwrap(),
        "[submit]3+3|A:"
    );
    let e = chat
        .build(&rows, &read[2], Some(&tok))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 2")
            && e.contains("has no `environment` column")
            && e.contains("count, guess"),
        "{e}"
    );
    let e = chat
        .build(&rows, &read[3], Some(&tok))
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 3") && e.contains("\"chess\""), "{e}");
}

/// TRL's environment-owned data: with an environment, a row without a
/// prompt gets an empty user message (its `reset()` writes the prompt) and
/// one without an answer an empty answer, in JSONL and Parquet; with no
/// training files at all, placeholder rows of that empty prompt stand for
/// the data, one step's prompts to a pass.
#[test]
fn environment_rows_may_leave_the_prompt_to_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("tasks.jsonl");
    std::fs::write(
        &rows,
        "{\"task\": \"wordle\"}\n{\"prompt\": \"2+2\", \"answer\": \"4\", \"task\": \"sum\"}\n",
    )
    .unwrap();
    let environment = ColumnMapping {
        keep_columns: true,
        environment_rows: true,
        ..ColumnMapping::default()
    };
    let read = read_rows(&rows, &environment).unwrap();
    assert_eq!(
        read[0].messages,
        Some(vec![model::tokenizer::ChatMessage::user("")])
    );
    assert_eq!(
        (read[0].question.as_str(), read[0].answer.as_str()),
        ("", "")
    );
    assert_eq!(read[0].columns.as_deref(), Some(r#"{"task":"wordle"}"#));
    assert_eq!(
        (read[1].question.as_str(), read[1].answer.as_str()),
        ("2+2", "4")
    );
    // Without an environment, a missing prompt is an error naming it.
    let e = read_rows(&rows, &ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"prompt\"") && e.contains("row 0"), "{e}");
    let parquet = read_rows(
        &repo().join("configs/data/arith_tiny.parquet"),
        &environment,
    )
    .unwrap();
    assert_eq!(parquet.len(), 12);
    assert!(
        parquet
            .iter()
            .all(|r| r.question.is_empty() && r.answer.is_empty())
    );
    assert!(
        parquet[0]
            .columns
            .as_deref()
            .unwrap()
            .contains("\"solution\"")
    );

    let base = "version: 1\nmodel: {preset: tiny}\ndata: {train_files: [], prompt_template: chat}\n\
                rollout: {environment_factory: \"env.py:Wordle\", num_generations: 4}\n\
                train: {per_device_train_batch_size: 8, max_steps: 3}\n";
    let recipe = Recipe::from_yaml_str(base, "r.yaml", &[] as &[&str]).unwrap();
    let tok = model::presets::tokenizer().unwrap();
    let source = PromptSource::from_recipe(&recipe, 0, 2, Some(&tok), None).unwrap();
    // Two prompts a rank a step, two ranks: four rows.
    assert_eq!(source.epoch_prompts(), 4);
    let example = &source.datasets()[0].examples[0];
    assert_eq!(
        example.messages,
        Some(vec![model::tokenizer::ChatMessage::user("")])
    );
    assert_eq!(
        example.prompt_text,
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        source.fingerprints()[0].path,
        Path::new(learner::data::PLACEHOLDER)
    );
}
