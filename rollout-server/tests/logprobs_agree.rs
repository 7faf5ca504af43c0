//! The log-probs the server reports for a completion equal the model crate's
//! training-path log-probs of the same tokens (`CausalLM::completion_logprobs`,
//! full-sequence differentiable forward) to 1e-5: the learner scores exactly
//! what the rollout server sampled from.

mod common;

use candle_core::{DType, Device, Tensor};
use common::Server;
use e2e::tiny_model;
use model::CausalLM;
use serde_json::{Value, json};

/// Server log-probs and the training path's for the same prompt+completion.
async fn compare(s: &Server, body: Value, temperature: f64) {
    let (st, r) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{r}");
    let lm = CausalLM::from_dir(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let choices = r["choices"].as_array().unwrap();
    assert!(!choices.is_empty());
    for c in choices {
        let prompt: Vec<u32> = serde_json::from_value(c["prompt_token_ids"].clone()).unwrap();
        let completion: Vec<u32> = serde_json::from_value(c["token_ids"].clone()).unwrap();
        let served: Vec<f32> = c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(served.len(), completion.len());
        let ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let t = ids.len();
        let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap();
        let trained: Vec<f32> = lm
            .completion_logprobs(&input, &mask, completion.len(), temperature, false)
            .unwrap()
            .logprobs
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = served
            .iter()
            .zip(&trained)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "max |served - training| = {worst}\nserved  {served:?}\ntraining {trained:?}"
        );
    }
}

#[tokio::test]
async fn processed_logprobs_match_training_path_at_temperature() {
    let s = Server::start(&["--logprobs-mode", "processed_logprobs"]).await;
    let body = json!({"prompt": "12+34=", "n": 4, "max_tokens": 24, "temperature": 0.7,
                      "seed": 5, "logprobs": 0, "return_token_ids": true, "ignore_eos": true});
    compare(&s, body, 0.7).await;
    // Chat and several prompts in one continuous batch, with a longer prompt.
    let body = json!({"prompt": ["a much longer prompt than the other one", "x"], "n": 3,
                      "max_tokens": 16, "temperature": 1.3, "logprobs": 2,
                      "return_token_ids": true, "ignore_eos": true});
    compare(&s, body, 1.3).await;
}

#[tokio::test]
async fn raw_logprobs_match_training_path_at_temperature_one() {
    let s = Server::start(&[]).await;
    let body = json!({"prompt": [3, 1, 4, 1, 5, 9, 2, 6], "n": 2, "max_tokens": 20,
                      "logprobs": 1, "return_token_ids": true, "ignore_eos": true, "seed": 11});
    compare(&s, body, 1.0).await;
}
