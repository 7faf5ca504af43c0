//! Tandem's sequence classifier (a reward model) against transformers'
//! `*ForSequenceClassification`.
//!
//! `tests/fixtures/make_reward_model_fixture.py` (run by hand) saved two
//! random classifiers with transformers (a Qwen2 with one label and pad token
//! 0, a Llama with two labels and no pad token) and recorded, in
//! `reward_model/scores.json`, the token ids of a few texts and one
//! conversation, and the logits transformers gives for them as one
//! right-padded batch (TRL's GRPOTrainer's call). No Python is needed.

use std::path::{Path, PathBuf};

use model::tokenizer::{ChatMessage, Tokenizer};
use model::{CausalLM, DType, Device, SequenceClassifier};
use serde_json::Value;

/// Max |tandem - transformers| over the logits (f32 both sides, the fixture
/// rounded to 7 significant digits).
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward_model")
}

fn record() -> Value {
    let path = fixtures().join("scores.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn classifiers_give_transformers_scores_at_transformers_positions() {
    let record = record();
    let texts: Vec<String> = serde_json::from_value(record["texts"].clone()).unwrap();
    let conversation: Vec<ChatMessage> =
        serde_json::from_value(record["conversation"].clone()).unwrap();
    for (name, expected_labels) in [("qwen2", 1), ("llama", 2)] {
        let dir = fixtures().join(name);
        let m = &record["models"][name];
        let rm = SequenceClassifier::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(rm.num_labels(), expected_labels, "{name}");

        // The same tokens and the same rendered conversation.
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let rendered = tokenizer.apply_chat_template(&conversation, false).unwrap();
        assert_eq!(rendered, m["conversation_text"].as_str().unwrap(), "{name}");
        let ids: Vec<Vec<u32>> = serde_json::from_value(m["input_ids"].clone()).unwrap();
        for (text, want) in texts.iter().chain([&rendered]).zip(&ids) {
            assert_eq!(
                &tokenizer.encode(text, false).unwrap(),
                want,
                "{name}: {text}"
            );
        }

        // One batch, as TRL scores; and one at a time, the same.
        let want: Vec<Vec<f32>> = serde_json::from_value(m["logits"].clone()).unwrap();
        let batch = rm.scores(&ids).unwrap();
        for (i, (got, want)) in batch.iter().zip(&want).enumerate() {
            assert_eq!(got.len(), expected_labels);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= TOL, "{name} text {i}: {got:?} vs {want:?}");
            }
            let alone = rm.scores(std::slice::from_ref(&ids[i])).unwrap();
            for (a, g) in alone[0].iter().zip(got) {
                assert!(
                    (a - g).abs() <= 1e-5,
                    "{name} text {i}: {a} alone, {g} batched"
                );
            }
        }
        // The random scores differ from text to text: the comparison means
        // something.
        assert!(batch.windows(2).any(|w| (w[0][0] - w[1][0]).abs() > 1e-2));
    }
}

#[test]
fn the_score_is_read_at_the_last_token_that_is_not_padding() {
    // Qwen2's pad token is 0: a text ending in it is read one token earlier
    // (what transformers does); the Llama has none and reads the last token.
    let qwen =
        SequenceClassifier::from_dir(&fixtures().join("qwen2"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(qwen.score_position(&[11, 14, 11, 0]), 2);
    assert_eq!(qwen.score_position(&[0, 0]), 0);
    assert_eq!(qwen.score_position(&[0, 7]), 1);
    let llama =
        SequenceClassifier::from_dir(&fixtures().join("llama"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(llama.score_position(&[11, 14, 11, 0]), 3);
    assert!(llama.scores(&[vec![]]).is_err());
}

#[test]
fn a_classifier_is_not_a_language_model_and_back() {
    let err = CausalLM::from_dir(&fixtures().join("qwen2"), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("Qwen2ForSequenceClassification") && err.contains("reward_model"),
        "{err}"
    );
    let lm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2");
    let err = SequenceClassifier::from_dir(&lm, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("Qwen2ForCausalLM") && err.contains("not a classifier"),
        "{err}"
    );
}
