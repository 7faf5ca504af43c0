//! The launcher: the topology plan (which GPU or process is a rollout server
//! and which a learner rank), starting and supervising those processes
//! together, and reading the Slurm environment (node list, node rank, GPUs).
//! Filled by issue 6.
