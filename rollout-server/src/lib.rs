//! The rollout server: an OpenAI/vLLM-compatible HTTP API (axum) in front of an
//! engine thread that owns the model and its KV cache, a scheduler that runs
//! continuous batching over it, and the gRPC `WeightSync` service that swaps
//! new weights in between decode steps.
//!
//! Layers, bottom up (each uses only the ones below it):
//! - [`engine`] (tokens in, tokens out, on its own thread) and its
//!   [`scheduler`] (continuous batching over the model's KV cache);
//! - [`text`]: detokenization, stop strings, choice indexes;
//! - [`validation`]: a loose OpenAI request becomes a trusted one;
//! - [`completions`], [`chat`], [`tokenize`], [`server`]: the OpenAI/vLLM
//!   HTTP API (axum), with [`error`] mapping every failure to vLLM's error
//!   object and [`metrics`] for `/metrics`;
//! - [`weight_sync`]: the gRPC service that pushes weights into the engine;
//! - [`cli`]: flags and the process's life (`main.rs` only calls it).

pub mod chat;
pub mod cli;
pub mod completions;
pub mod engine;
pub mod error;
pub mod kv_budget;
pub mod metrics;
pub mod reasoning;
pub mod scheduler;
pub mod server;
pub mod text;
pub mod tokenize;
pub mod tools;
pub mod validation;
pub mod weight_sync;
