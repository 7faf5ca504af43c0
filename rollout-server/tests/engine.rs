//! The engine without HTTP: tokens in, tokens out, and weight swaps applied
//! between decode steps.

use std::sync::Arc;

use candle_core::{DType, Device};
use model::Weights;
use model::presets::{Preset, config};
use model::sampling::SamplingParams;
use rollout_server::engine::{self, EngineConfig, EngineEvent, GenerateRequest, GenerationStream};
use rollout_server::metrics::Metrics;

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        n: 1,
        params: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        seed: None,
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        min_tokens: 0,
        prompt_logprobs: None,
        guide: None,
        guide_after: None,
    }
}

/// Token ids with their log-probs and the weight version of each.
async fn collect(mut s: GenerationStream) -> Vec<(u32, f32, u64)> {
    let mut out = Vec::new();
    while let Some(e) = s.events.recv().await {
        match e {
            EngineEvent::Token {
                token,
                weight_version,
                finish,
                ..
            } => {
                out.push((token.token, token.logprob, weight_version));
                if finish.is_some() {
                    break;
                }
            }
            EngineEvent::Error(e) => panic!("{e}"),
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
    out
}

#[tokio::test]
async fn weight_swaps_apply_between_steps_and_bad_ones_change_nothing() {
    let cfg = config(Preset::Tiny, 100, 1, 0).unwrap();
    let w0 = Weights::random(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
    let w1 = Weights::random(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    let engine = engine::start(
        cfg.clone(),
        w0,
        EngineConfig {
            max_model_len: 512,
            max_num_seqs: 4,
            ..EngineConfig::default()
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    assert_eq!(engine.weight_version(), 0);
    let run = |max| {
        let engine = engine.clone();
        async move {
            let s = engine.submit(vec![greedy(vec![5, 6, 7], max)]).unwrap();
            collect(s.into_iter().next().unwrap()).await
        }
    };
    let before = run(12).await;
    assert!(before.iter().all(|(_, _, v)| *v == 0));

    // A bad push: unknown tensor, or wrong shape: refused, nothing changes.
    let t = w1.get("model.norm.weight").unwrap().clone();
    let err = engine
        .swap_weights(vec![("model.nope".into(), t.clone())], 3)
        .await
        .unwrap_err();
    assert!(err.contains("model.nope"), "{err}");
    let wrong = w1.get("model.embed_tokens.weight").unwrap().clone();
    let err = engine
        .swap_weights(vec![("model.norm.weight".into(), wrong)], 3)
        .await
        .unwrap_err();
    assert!(err.contains("shape"), "{err}");
    assert_eq!(engine.weight_version(), 0);
    assert_eq!(run(12).await, before);

    // A whole push: greedy output changes and carries the new version.
    let all: Vec<_> = w1.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    engine.swap_weights(all.clone(), 7).await.unwrap();
    assert_eq!(engine.weight_version(), 7);
    let after = run(12).await;
    assert!(after.iter().all(|(_, _, v)| *v == 7));
    // (Random tiny weights tend to repeat the last token greedily: compare
    // the log-probs, which any change of weights moves.)
    let lps = |x: &[(u32, f32, u64)]| x.iter().map(|p| p.1).collect::<Vec<_>>();
    assert_ne!(lps(&before), lps(&after));

    // A swap in the middle of a long generation: the sequence goes on, its
    // later tokens come from the new weights.
    let w0 = Weights::random(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
    let back: Vec<_> = w0.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    let mut s = engine
        .submit(vec![greedy(vec![1, 2], 400)])
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let first = s.events.recv().await.unwrap();
    assert!(matches!(
        first,
        EngineEvent::Token {
            weight_version: 7,
            ..
        }
    ));
    engine.swap_weights(back, 8).await.unwrap();
    let rest = collect(s).await;
    assert_eq!(rest.len(), 399);
    assert_eq!(rest.last().unwrap().2, 8);
    assert!(engine.is_alive());
}

#[tokio::test]
async fn queue_full_is_refused_at_once() {
    let cfg = config(Preset::Tiny, 100, 1, 0).unwrap();
    let w = Weights::random(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
    let engine = engine::start(
        cfg,
        w,
        EngineConfig {
            max_model_len: 64,
            max_num_seqs: 1,
            max_queue: 2,
            ..EngineConfig::default()
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    // Three prompts in one submission exceed a queue of 2: all refused.
    let reqs = vec![greedy(vec![1], 4), greedy(vec![2], 4), greedy(vec![3], 4)];
    assert!(matches!(
        engine.submit(reqs),
        Err(engine::EngineError::QueueFull { max_queue: 2 })
    ));
    let streams = engine
        .submit(vec![greedy(vec![1], 4), greedy(vec![2], 4)])
        .unwrap();
    for s in streams {
        assert_eq!(collect(s).await.len(), 4);
    }
}

/// Every sample's tokens, by sample index, until each has finished.
async fn collect_samples(mut s: GenerationStream, n: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); n];
    let mut done = 0;
    while done < n {
        match s.events.recv().await {
            Some(EngineEvent::Token {
                sample,
                token,
                finish,
                ..
            }) => {
                out[sample].push(token.token);
                if finish.is_some() {
                    done += 1;
                }
            }
            Some(EngineEvent::Error(e)) => panic!("{e}"),
            Some(EngineEvent::PromptLogprobs(_)) => {}
            None => panic!("the stream ended with {done} of {n} samples finished"),
        }
    }
    out
}

/// More samples than --max-num-seqs run in turns (vLLM queues them too):
/// with 3 slots, or 1 (each later sample prefills the prompt again, since no
/// sample of its prompt is left running to copy it from), 10 seeded samples
/// of different lengths give the tokens that 16 slots give, sample by
/// sample, and a second prompt still gets through.
#[tokio::test]
async fn more_samples_than_max_num_seqs_run_in_turns() {
    let cfg = config(Preset::Tiny, 100, 1, 0).unwrap();
    let sampled = |max_tokens| GenerateRequest {
        n: 10,
        params: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        },
        seed: Some(42),
        ..greedy(vec![3, 1, 4, 1, 5], max_tokens)
    };
    let mut results = Vec::new();
    for max_num_seqs in [16, 3, 1] {
        let w = Weights::random(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
        let engine = engine::start(
            cfg.clone(),
            w,
            EngineConfig {
                max_model_len: 64,
                max_num_seqs,
                ..EngineConfig::default()
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        // Stop at token 7 too, so samples end at different steps and free
        // their slots at different times.
        let mut request = sampled(20);
        request.stop_token_ids = vec![7];
        let mut streams = engine
            .submit(vec![request, greedy(vec![2, 2], 5)])
            .unwrap()
            .into_iter();
        let many = collect_samples(streams.next().unwrap(), 10).await;
        let other = collect(streams.next().unwrap()).await;
        assert_eq!(other.len(), 5);
        assert!(many.iter().all(|s| !s.is_empty() && s.len() <= 20));
        results.push(many);
        assert!(engine.is_alive());
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
    // The samples differ from one another (each has its own seed).
    assert!(results[0].iter().any(|s| s != &results[0][0]));
}
