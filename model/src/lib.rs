//! Tandem's one decoder LM, shared by the rollout server (generation) and the
//! learners (training) so that their log-probs agree by construction.
//!
//! - [`config`]: `config.json` of a Hugging Face folder (Qwen2, Llama, Qwen3);
//! - [`weights`]: named tensors with Hugging Face names, memory-mapped
//!   safetensors in (single file or sharded), safetensors out;
//! - [`decoder`]: the causal LM: a differentiable full-sequence forward for
//!   training and a KV-cached batched forward for generation;
//! - [`kv_cache`]: slot-based KV cache that sequences join and leave between
//!   decode steps (continuous batching);
//! - [`logprobs`]: log-probs of given tokens and entropy, computed in chunks;
//! - [`lora`]: LoRA adapters (PEFT's config, names and files), merged weights;
//! - [`reward_model`]: `*ForSequenceClassification` folders (reward models):
//!   the decoder with a score head, read at each sequence's last token;
//! - `autograd` (internal): differentiable ops whose backward makes only the
//!   gradients training needs (frozen linears, LoRA, rotary embedding, constants);
//! - `fused` (internal): CPU kernels, forward and backward, for attention,
//!   RMSNorm, SwiGLU and linears, and decode attention read from the KV cache;
//! - [`sampling`]: temperature, top-p/k, min-p, penalties, seeded RNG;
//! - [`tokenizer`]: `tokenizer.json` and chat templates (minijinja);
//! - [`tool_calls`]: the tool calls a model wrote (vLLM's hermes / llama3_json);
//! - [`pretrained`]: whole model folders in and out;
//! - [`presets`]: the embedded tiny/small models with a character tokenizer;
//! - [`device`]: `--device` / `--dtype` parsing, `auto` resolution, GPU memory;
//! - [`allocator`]: the host allocator kept from returning freed tensor buffers.
//!
//! Device and dtype are parameters everywhere (`candle_core::Device`,
//! `DType`): CPU f32 is the default, CUDA bf16 a switch.

pub mod allocator;
pub(crate) mod autograd;
pub mod config;
pub mod decoder;
pub mod device;
pub mod error;
pub(crate) mod fused;
pub mod guided;
pub mod kv_cache;
pub mod logprobs;
pub mod lora;
pub mod presets;
pub mod pretrained;
pub mod reward_model;
pub mod sampling;
pub mod tokenizer;
pub mod tool_calls;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use config::{Architecture, ModelConfig, ModelHead};
pub use decoder::CausalLM;
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use reward_model::SequenceClassifier;
pub use weights::Weights;
