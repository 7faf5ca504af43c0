//! The rollout server: an OpenAI/vLLM-compatible HTTP API (axum) in front of an
//! engine thread that owns the model and its KV cache, a scheduler that runs
//! continuous batching over it, and the gRPC `WeightSync` service that swaps
//! new weights in between decode steps. Filled by issue 4; the model crate
//! already provides the batched KV-cached decoding and sampling it needs.
