//! The GRPO learner. One rank pulls completion groups tagged with its own
//! client tag from rollout endpoints, scores them with reward functions, turns
//! rewards into group-normalized advantages, computes the policy-gradient loss
//! over micro-batches, all-reduces gradients with the other ranks, steps the
//! optimizer, and (rank 0) pushes new weights to the rollout servers.
//!
//! Modules are named after the words of the GRPO papers: `advantages`,
//! `loss`, `kl`, `rewards`, `collective`, `checkpoint`...

pub mod accumulation;
pub mod advantages;
pub mod batch;
pub mod checkpoint;
pub mod code_execution;
pub mod collective;
pub mod data;
pub mod dynamic_sampling;
pub mod eval;
pub mod grpo_config;
pub mod grpo_error;
pub mod kl;
pub mod loss;
pub mod metrics;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod parameters;
pub mod python;
pub mod recipe;
pub mod recipe_import;
pub mod rewards;
pub mod rollout;
pub mod run_dir;
pub mod tensorboard;
pub mod tools;
pub mod train;
