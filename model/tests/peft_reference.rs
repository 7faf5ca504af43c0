//! Tandem's LoRA against Hugging Face PEFT.
//!
//! `tests/fixtures/make_peft_fixture.py` (run by hand) put LoRA adapters on
//! the tiny preset (`learner init-model --preset tiny --seed 0`; untied for
//! the head and embeddings' modules_to_save) with PEFT's `get_peft_model`
//! (random A and B, modules_to_save copies moved off the base), saved them
//! with PEFT's
//! `save_pretrained` under `tests/fixtures/peft/<name>/`, and recorded PEFT's
//! logits in `peft/logits.json`. These tests load PEFT's folders with
//! [`Lora::load_peft`], compute the logits with the adapters (Tandem's
//! training path) and merged (what the rollout servers get), and write the
//! adapters back with [`Lora::save_peft`]: the same tensor names, shapes and
//! config values PEFT wrote, so PEFT loads what Tandem saves.
//! No Python is needed.

use std::path::{Path, PathBuf};

use model::lora::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, Lora};
use model::presets::{self, Preset};
use model::{CausalLM, DType, Device, Tensor, Weights};
use serde_json::Value;

/// Max |tandem - PEFT| over the logits (f32 both sides, the fixture rounded
/// to 7 significant digits).
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture's record, a folder holding the tiny bases PEFT's adapters
/// were made on (`tiny/`, and `untied/`: the same with lm_head its own copy
/// of the embeddings, as the fixture script's `untie` makes it), and the
/// record's input ids with their mask.
fn setup() -> (Value, tempfile::TempDir, Tensor, Tensor) {
    let record = read_json(&fixtures().join("logits.json"));
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tmp.path().join("tiny");
    presets::init_model(Preset::Tiny, &tiny, 0).unwrap();
    let untied = tmp.path().join("untied");
    std::fs::create_dir(&untied).unwrap();
    for entry in std::fs::read_dir(&tiny).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, untied.join(path.file_name().unwrap())).unwrap();
    }
    let mut config = read_json(&untied.join("config.json"));
    config["tie_word_embeddings"] = Value::Bool(false);
    std::fs::write(untied.join("config.json"), config.to_string()).unwrap();
    let mut weights = Weights::load(&tiny, &Device::Cpu, DType::F32).unwrap();
    let embed = weights
        .get("model.embed_tokens.weight")
        .unwrap()
        .copy()
        .unwrap();
    weights.insert("lm_head.weight", embed);
    weights.save(&untied.join("model.safetensors")).unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(record["input_ids"].clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    let ids = Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap();
    (record, tmp, ids, mask)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The base folder an adapter of the record was made on.
fn base_of(tmp: &tempfile::TempDir, case: &Value) -> PathBuf {
    match case["base"].as_str() {
        Some("untied") => tmp.path().join("untied"),
        _ => tmp.path().join("tiny"),
    }
}

#[test]
fn peft_adapters_give_pefts_logits_with_adapters_and_merged() {
    let (record, tmp, ids, mask) = setup();
    let adapters = record["adapters"].as_object().unwrap();
    assert_eq!(adapters.len(), 5);
    for (name, case) in adapters {
        let base_dir = base_of(&tmp, case);
        let cfg = model::ModelConfig::from_dir(&base_dir).unwrap();
        let base = Weights::load(&base_dir, &Device::Cpu, DType::F32).unwrap();
        let expected: Vec<Vec<Vec<f32>>> = serde_json::from_value(case["logits"].clone()).unwrap();
        let expected = Tensor::new(expected, &Device::Cpu).unwrap();
        let lora = Lora::load_peft(&fixtures().join(name), &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let adapted = CausalLM::with_lora(&cfg, &base, &lora)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .forward(&ids, &mask)
            .unwrap();
        let d = max_abs_diff(&adapted, &expected);
        assert!(
            d < TOL,
            "{name}: Tandem's adapters differ from PEFT's by {d}"
        );
        let plain = CausalLM::new(&cfg, &base)
            .unwrap()
            .forward(&ids, &mask)
            .unwrap();
        assert!(
            max_abs_diff(&plain, &expected) > 1e-2,
            "{name}: the adapters do not change the output"
        );
        let mut merged = base.clone();
        for (k, v) in lora.config.merge(&cfg, &base, &lora.adapters).unwrap() {
            merged.insert(k, v);
        }
        let d = max_abs_diff(
            &CausalLM::new(&cfg, &merged)
                .unwrap()
                .forward(&ids, &mask)
                .unwrap(),
            &expected,
        );
        assert!(
            d < TOL,
            "{name}: Tandem's merged weights differ from PEFT's by {d}"
        );
    }
}

/// PEFT's gradients, of the sum of `log_softmax(logits) w` with the fixture
/// script's pattern `w = ((7 b + 3 t + v) mod 5 - 2) / 2`, for every
/// trained tensor: DoRA's (which finite differences cannot check, its row
/// norms being constants of the backward pass), and the modules_to_save
/// copies' beside their adapters.
#[test]
fn dora_and_saved_module_gradients_are_pefts() {
    let (record, tmp, ids, mask) = setup();
    let mut checked = Vec::new();
    for (name, case) in record["adapters"].as_object().unwrap() {
        if case.get("gradients").is_none() {
            continue;
        }
        gradients_are_pefts(name, case, &base_of(&tmp, case), &ids, &mask);
        checked.push(name.as_str());
    }
    assert_eq!(
        checked,
        ["dora_qv_down", "saved_norms", "saved_lm_head_embed"]
    );
}

fn gradients_are_pefts(name: &str, case: &Value, base_dir: &Path, ids: &Tensor, mask: &Tensor) {
    let cfg = model::ModelConfig::from_dir(base_dir).unwrap();
    let base = Weights::load(base_dir, &Device::Cpu, DType::F32).unwrap();
    let lora = Lora::load_peft(&fixtures().join(name), &Device::Cpu, DType::F32).unwrap();
    let (vars, adapters) = model::decoder::trainable(&lora.adapters).unwrap();
    let trained = Lora {
        config: lora.config.clone(),
        adapters,
    };
    let logits = CausalLM::with_lora(&cfg, &base, &trained)
        .unwrap()
        .forward(ids, mask)
        .unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    let pattern: Vec<f32> = (0..b * t * v)
        .map(|i| {
            let (bi, ti, vi) = (i / (t * v), (i / v) % t, i % v);
            (((7 * bi + 3 * ti + vi) % 5) as f32 - 2.0) / 2.0
        })
        .collect();
    let w = Tensor::from_vec(pattern, (b, t, v), &Device::Cpu).unwrap();
    let objective = (candle_nn::ops::log_softmax(&logits, 2).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = objective.backward().unwrap();
    let expected = case["gradients"].as_object().unwrap();
    assert_eq!(expected.len(), vars.len(), "{name}");
    for (var_name, var) in &vars {
        let theirs: Vec<f32> =
            serde_json::from_value(expected[&format!("base_model.model.{var_name}")].clone())
                .unwrap_or_else(|e| panic!("{var_name}: {e}"));
        let ours: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {var_name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            scale > 0.0 && d <= 1e-4 * scale + 1e-6,
            "{name} {var_name}: Tandem's gradient differs from PEFT's by {d} (largest {scale})"
        );
    }
}

/// `learner merge-adapter`'s library half: PEFT's folder merged into the
/// base and written as a model folder gives PEFT's logits as a plain model
/// (with modules_to_save, their trained copies in place).
#[test]
fn a_merged_folder_gives_pefts_logits() {
    let (record, tmp, ids, mask) = setup();
    for name in ["qv_down", "saved_lm_head_embed"] {
        let case = &record["adapters"][name];
        let out = tmp.path().join(format!("merged-{name}"));
        Lora::merge_folders(&base_of(&tmp, case), &fixtures().join(name), &out).unwrap();
        let expected: Vec<Vec<Vec<f32>>> = serde_json::from_value(case["logits"].clone()).unwrap();
        let expected = Tensor::new(expected, &Device::Cpu).unwrap();
        let merged = CausalLM::from_dir(&out, &Device::Cpu, DType::F32).unwrap();
        let d = max_abs_diff(&merged.forward(&ids, &mask).unwrap(), &expected);
        assert!(
            d < TOL,
            "{name}: the merged folder differs from PEFT by {d}"
        );
        // The tokenizer and config came along.
        assert!(out.join("tokenizer.json").exists() && out.join("config.json").exists());
    }
}

#[test]
fn tandem_writes_adapters_as_peft_does() {
    let tmp = tempfile::tempdir().unwrap();
    let record = read_json(&fixtures().join("logits.json"));
    for name in record["adapters"].as_object().unwrap().keys() {
        let dir = fixtures().join(name);
        let lora = Lora::load_peft(&dir, &Device::Cpu, DType::F32).unwrap();
        let out = tmp.path().join(name);
        let peft_config = read_json(&dir.join(ADAPTER_CONFIG_FILE));
        let base = peft_config["base_model_name_or_path"]
            .as_str()
            .unwrap_or("");
        lora.save_peft(&out, base).unwrap();
        // The same tensors under the same names, bit for bit.
        let theirs = Weights::load_files(
            &[dir.join(ADAPTER_WEIGHTS_FILE)],
            &dir,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let ours = Weights::load_files(
            &[out.join(ADAPTER_WEIGHTS_FILE)],
            &out,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let names = |w: &Weights| w.names().cloned().collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs), "{name}");
        for (k, t) in theirs.iter() {
            assert_eq!(max_abs_diff(t, ours.get(k).unwrap()), 0.0, "{name} {k}");
        }
        // The config values PEFT reads to rebuild the adapters.
        let ours = read_json(&out.join(ADAPTER_CONFIG_FILE));
        for key in [
            "peft_type",
            "task_type",
            "r",
            "use_rslora",
            "bias",
            "fan_in_fan_out",
            "use_dora",
            "modules_to_save",
            "base_model_name_or_path",
        ] {
            assert_eq!(ours[key], peft_config[key], "{name}: {key}");
        }
        assert_eq!(
            ours["lora_alpha"].as_f64(),
            peft_config["lora_alpha"].as_f64(),
            "{name}"
        );
        // PEFT writes the modules it found (a set, in no fixed order).
        let sorted = |v: &Value| -> Value {
            match v {
                Value::Array(a) => {
                    let mut s: Vec<String> =
                        a.iter().map(|x| x.as_str().unwrap().to_string()).collect();
                    s.sort();
                    serde_json::json!(s)
                }
                other => other.clone(),
            }
        };
        assert_eq!(
            sorted(&ours["target_modules"]),
            sorted(&peft_config["target_modules"]),
            "{name}"
        );
    }
}
