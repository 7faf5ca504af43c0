//! The launcher: the topology plan (which GPU or process is a rollout server
//! and which a learner rank), starting and supervising those processes
//! together, and reading the Slurm environment (node list, node rank, GPUs).
//!
//! - [`plan`]: the pure plan, its checks, its table and JSON;
//! - [`job`]: what the plan is made from (recipe, flags, Slurm, GPUs, ports);
//! - [`slurm`], [`devices`]: what Slurm and the machine say;
//! - [`supervise`]: start, watch, pass signals on, stop everything together;
//! - [`report`]: the run folder's report.md and SVG curves;
//! - [`cli`]: the command line.

pub mod cli;
pub mod devices;
pub mod job;
pub mod plan;
pub mod progress;
pub mod report;
pub mod slurm;
pub mod supervise;
