//! A model folder SAVED BY TANDEM, read by Hugging Face transformers.
//!
//! `tests/fixtures/check_tandem_folder.py` (run by hand) wrote the tiny preset
//! with `learner init-model --preset tiny --seed 0`, loaded it with
//! `AutoModelForCausalLM` / `AutoTokenizer` (no missing or unexpected weights,
//! no warning) and recorded transformers' token ids, decoded text, chat
//! renders, logits and greedy tokens in `tandem_tiny_transformers.json`. These
//! tests write the same folder with `presets::init_model`, check that its files
//! are the recorded ones (model.safetensors byte for byte, the JSON files by
//! content), and compare Tandem with what transformers said.
//! No Python is needed.
//!
//! transformers 5 has two views of the tokenizer: `tokenizer_json` is
//! tokenizer.json as written (`TokenizersBackend`); `auto_tokenizer` is what
//! `AutoTokenizer` returns, which for `model_type == "qwen2"` is
//! `Qwen2Tokenizer` whatever `tokenizer_class` says: it keeps only the
//! vocabulary and rebuilds a byte-level BPE. Tandem's `char_level` writes
//! tokenizer.json in that very shape (byte-level vocabulary, no merges, no unk
//! token), so Tandem must equal both, on spaces, newlines and characters
//! outside the vocabulary (dropped everywhere) alike.

use std::path::{Path, PathBuf};

use model::presets::{self, Preset};
use model::tokenizer::{ChatMessage, Tokenizer};
use model::{CausalLM, DType, Device, Tensor};
use serde_json::Value;

/// Max |tandem - transformers| over the logits of real positions (f32 both
/// sides, fixture rounded to 7 significant digits).
const TOL: f32 = 1e-4;

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tandem_tiny_transformers.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tiny preset, seed 0, written the way `learner init-model` writes it.
fn tiny_folder() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    presets::init_model(Preset::Tiny, &dir, 0).unwrap();
    (tmp, dir)
}

/// FNV-1a, 64 bit (the fixture script computes the same).
fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("fixture: {key} is not a string"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("fixture: not an array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("fixture: not an id")).unwrap())
        .collect()
}

fn matrix(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(u32s).collect()
}

fn tensor(rows: &[Vec<u32>]) -> Tensor {
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    u32::try_from(best).unwrap()
}

#[test]
fn folder_is_the_one_the_fixture_was_made_from() {
    let fx = fixture();
    let (_tmp, dir) = tiny_folder();
    let files = fx["files"].as_object().unwrap();
    let again = "re-run tests/fixtures/check_tandem_folder.py if the change is intended";
    // The weights: the same bytes.
    let want = &files["model.safetensors"];
    let data = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(
        (data.len() as u64, fnv1a64(&data).as_str()),
        (want["bytes"].as_u64().unwrap(), str_of(want, "fnv1a64")),
        "model.safetensors of init_model(Tiny, seed 0) is not the file the fixture was made \
         from; {again}"
    );
    // The JSON files: the same content (key order may differ).
    let mut json_files = 0;
    for (name, want) in files {
        let Some(want_json) = want.get("json") else {
            continue;
        };
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            &got, want_json,
            "{name} of init_model(Tiny, seed 0) differs from the fixture's; {again}"
        );
        json_files += 1;
    }
    assert_eq!(
        json_files, 4,
        "config, generation_config, tokenizer, tokenizer_config"
    );
}

#[test]
fn transformers_loaded_the_model_cleanly() {
    let fx = fixture();
    let findings = &fx["findings"];
    assert_eq!(findings["model_loads_cleanly"], Value::Bool(true));
    let meta = &fx["metadata"];
    let (_tmp, dir) = tiny_folder();
    let lm = CausalLM::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(
        lm.config().num_parameters() as u64,
        meta["parameters"].as_u64().unwrap(),
        "parameter count (tied embeddings counted once)"
    );
}

#[test]
fn tokenizer_matches_tokenizer_json_in_transformers() {
    let fx = fixture();
    let (_tmp, dir) = tiny_folder();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let encodings = fx["encodings"].as_array().unwrap();
    assert!(encodings.len() >= 5);
    for enc in encodings {
        let name = str_of(enc, "name");
        let text = str_of(enc, "text");
        let want = &enc["tokenizer_json"];
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, u32s(&want["ids"]), "{name}: ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            str_of(want, "decoded"),
            "{name}: decode"
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            str_of(want, "decoded_skip_special"),
            "{name}: decode(skip_special_tokens)"
        );
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            str_of(&enc["auto_tokenizer"], "decoded_tokenizer_json_ids"),
            "{name}: AutoTokenizer's decode of the same ids"
        );
    }
    // Characters outside the vocabulary are dropped, not mapped to <unk>
    // (see `char_level`), and the text's other characters keep their ids.
    let unknown = encodings
        .iter()
        .find(|e| e["name"] == "unknown_chars")
        .unwrap();
    let ids = tok.encode(str_of(unknown, "text"), true).unwrap();
    assert!(!ids.contains(&tok.unk_token_id().unwrap()), "{ids:?}");
    assert_eq!(ids, tok.encode("caf  ok", true).unwrap());
    // Spaces and newlines are single tokens with the ids of ' ' and '\n'.
    let space = tok.token_to_id("\u{120}").unwrap();
    let newline = tok.token_to_id("\u{10a}").unwrap();
    assert_eq!(tok.encode(" \n", true).unwrap(), [space, newline]);
    assert_eq!(tok.encode("a b\nc", true).unwrap(), [48, 23, 49, 47, 50]);
}

/// transformers 5's AutoTokenizer loads `Qwen2Tokenizer` for model_type
/// qwen2, rebuilt from the vocabulary alone; it must encode and decode every
/// text as Tandem does.
#[test]
fn tokenizer_matches_auto_tokenizer() {
    let fx = fixture();
    let (_tmp, dir) = tiny_folder();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(
        fx["findings"]["auto_tokenizer_agrees_with_tokenizer_json"],
        Value::Bool(true)
    );
    let mut differ = Vec::new();
    for enc in fx["encodings"].as_array().unwrap() {
        let ids = tok.encode(str_of(enc, "text"), true).unwrap();
        let auto = &enc["auto_tokenizer"];
        if ids != u32s(&auto["ids"])
            || tok.decode(&ids, false).unwrap() != str_of(auto, "decoded")
            || tok.decode(&ids, true).unwrap() != str_of(auto, "decoded_skip_special")
        {
            differ.push(str_of(enc, "name").to_owned());
        }
    }
    assert!(
        differ.is_empty(),
        "AutoTokenizer ({}) encodes or decodes differently: {differ:?}",
        fx["findings"]["auto_tokenizer_class"]
    );
    let names: Vec<&str> = fx["encodings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| str_of(e, "name"))
        .collect();
    for name in ["sentence", "unknown_chars", "whitespace", "special_tokens"] {
        assert!(names.contains(&name), "fixture lacks {name}");
    }
}

#[test]
fn chat_template_renders_as_transformers() {
    let fx = fixture();
    let (_tmp, dir) = tiny_folder();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let chats = fx["chat_templates"].as_array().unwrap();
    assert!(chats.len() >= 3);
    for chat in chats {
        let name = str_of(chat, "name");
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(str_of(m, "role"), str_of(m, "content")))
            .collect();
        let add_generation_prompt = chat["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            tok.apply_chat_template(&messages, add_generation_prompt)
                .unwrap(),
            str_of(chat, "rendered"),
            "{name}"
        );
    }
}

#[test]
fn logits_match_transformers() {
    let fx = fixture();
    let (_tmp, dir) = tiny_folder();
    let lm = CausalLM::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    let vocab = lm.config().vocab_size;
    let mut worst = 0.0f32;
    let mut positions = 0;
    for case in fx["logits"].as_array().unwrap() {
        let name = str_of(case, "name");
        let ids = matrix(&case["input_ids"]);
        let mask = matrix(&case["attention_mask"]);
        let logits = lm.forward(&tensor(&ids), &tensor(&mask)).unwrap();
        assert_eq!(
            logits.dims3().unwrap(),
            (ids.len(), ids[0].len(), vocab),
            "{name}: logits shape"
        );
        let got: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
        let want = case["logits"].as_array().unwrap();
        for (b, (got_row, want_row)) in got.iter().zip(want).enumerate() {
            for (t, (got_pos, want_pos)) in
                got_row.iter().zip(want_row.as_array().unwrap()).enumerate()
            {
                assert_eq!(want_pos.is_null(), mask[b][t] == 0, "{name}: [{b}, {t}]");
                let Some(want_pos) = want_pos.as_array() else {
                    continue;
                };
                assert_eq!(want_pos.len(), vocab);
                let d = got_pos
                    .iter()
                    .zip(want_pos)
                    .map(|(g, w)| (g - w.as_f64().unwrap() as f32).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    d <= TOL,
                    "{name}: row {b} position {t}: max |tandem - transformers| = {d:e}"
                );
                worst = worst.max(d);
                positions += 1;
            }
        }
    }
    assert!(positions > 100);
    eprintln!("{positions} positions: max |tandem - transformers| = {worst:e}");
}

#[test]
fn greedy_tokens_match_transformers_generate() {
    let fx = fixture();
    let greedy = &fx["greedy"];
    let prompt_name = str_of(greedy, "prompt");
    let prompt = fx["encodings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == prompt_name)
        .map(|e| u32s(&e["tokenizer_json"]["ids"]))
        .unwrap();
    let want = u32s(&greedy["new_tokens"]);
    let (_tmp, dir) = tiny_folder();
    let lm = CausalLM::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    let mut seq = prompt.clone();
    for _ in 0..want.len() {
        let ids = vec![seq.clone()];
        let mask = vec![vec![1u32; seq.len()]];
        let logits: Vec<Vec<Vec<f32>>> = lm
            .forward(&tensor(&ids), &tensor(&mask))
            .unwrap()
            .to_vec3()
            .unwrap();
        seq.push(argmax(logits[0].last().unwrap()));
    }
    assert_eq!(&seq[prompt.len()..], want.as_slice());
}
