//! The topology plan: which GPU (or, on CPU, which process) of which node
//! runs a rollout server and which a learner rank, with the ports, the
//! environment and the command line of every process. Pure: everything it
//! needs from the machine, Slurm or the recipe comes in a [`PlanInput`], so
//! `--dry-run` and the tests see exactly what a real start would do.
//!
//! Rules (issue 6):
//! - one node: the first `dp x tp` GPUs host the rollout servers (`dp`
//!   replicas of `tp` GPUs each), every other GPU one learner rank;
//! - several nodes: the last node hosts the rollout servers, the other nodes
//!   the learners; the learners rendezvous on the first node;
//! - CPU: the same with processes; one rollout server and two learner ranks
//!   per learner node by default.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;
use thiserror::Error;

/// Learner ranks per learner node on CPU when the recipe does not say.
pub const DEFAULT_CPU_LEARNERS_PER_NODE: usize = 2;

/// The recipe keys the launcher sets on each learner's command line
/// (`section.key=value`).
pub mod keys {
    pub const ENDPOINTS: &str = "rollout.endpoints";
    pub const WEIGHT_SYNC_ENDPOINTS: &str = "rollout.weight_sync_endpoints";
    pub const CLIENT_TAG: &str = "rollout.client_tag";
    pub const OUTPUT_DIR: &str = "checkpoint.output_dir";
    pub const DEVICE: &str = "model.device";
    pub const NODES: &str = "topology.nodes";
    pub const GPUS_PER_NODE: &str = "topology.gpus_per_node";
    pub const DP: &str = "topology.dp";
    pub const TP: &str = "topology.tp";
    pub const LEARNER_RANKS: &str = "topology.learner_ranks";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// A node of the job: its name (Slurm's) and the address other nodes reach
/// it at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    pub name: String,
    pub addr: String,
}

/// HTTP and gRPC ports of one rollout server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RolloutPorts {
    pub http: u16,
    pub grpc: u16,
}

/// Every port of the job, chosen by the caller (free ones, or from flags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// The learners' rendezvous (`MASTER_PORT`).
    pub master: u16,
    /// One entry per rollout server replica (`dp` of them).
    pub rollout: Vec<RolloutPorts>,
}

/// The recipe's batch shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFacts {
    /// Completions per learner rank per step (TRL's name).
    pub per_device_train_batch_size: usize,
    /// Completions per prompt (the group size `G`).
    pub num_generations: usize,
    /// Completions per step over all ranks, when the recipe fixes it;
    /// otherwise `per_device_train_batch_size x learner ranks`.
    pub global_batch: Option<usize>,
}

/// Attention heads of the model (config.json), for the tensor-parallel check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub attention: usize,
    pub key_value: usize,
}

/// `--gpu-memory-utilization` of a rollout server that shares its GPU with
/// a learner (TRL's `vllm_gpu_memory_utilization` default in colocate mode).
pub const COLOCATED_GPU_MEMORY_UTILIZATION: f64 = 0.3;

/// Everything the plan is made from.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub device: Device,
    /// The job's nodes in order (one entry when not under Slurm).
    pub nodes: Vec<NodeSpec>,
    /// GPU ids of a node (`CUDA_VISIBLE_DEVICES` names); every node is
    /// assumed to look like the one the launcher runs on. Ignored on CPU.
    pub gpu_ids: Vec<String>,
    /// Rollout server replicas.
    pub dp: usize,
    /// GPUs per rollout server replica.
    pub tp: usize,
    /// Learner ranks; `None`: every GPU left (GPU), two per learner node (CPU).
    pub learner_ranks: Option<usize>,
    pub ports: Ports,
    pub batch: BatchFacts,
    /// `None` when the model folder does not exist yet.
    pub heads: Option<Heads>,
    /// The recipe file passed on to each learner.
    pub config: PathBuf,
    /// The model folder the rollout servers load.
    pub model_dir: PathBuf,
    /// The run folder.
    pub out: PathBuf,
    /// The user's `section.key=value` overrides, passed on to each learner.
    pub overrides: Vec<String>,
    /// `--resume-from` for each learner.
    pub resume_from: Option<PathBuf>,
    /// `--allow-recipe-change` for each learner (with `resume_from`).
    pub allow_recipe_change: bool,
    /// Extra flags for every rollout server (from the recipe).
    pub rollout_server_args: Vec<String>,
    /// Overrides the launcher adds for every learner after the user's
    /// (e.g. the model folder it made for a preset).
    pub learner_overrides: Vec<String>,
    /// CPU cores of a node, to split between the learner ranks of a CPU plan
    /// (`RAYON_NUM_THREADS`); 0 leaves the thread counts alone.
    pub cpus_per_node: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    RolloutServer,
    Learner,
}

/// One process of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessPlan {
    /// `rollout-0`, `learner-rank1`: the name in messages and the log's name.
    pub name: String,
    pub role: Role,
    /// Replica index (rollout server) or global rank (learner).
    pub index: usize,
    /// Node rank it runs on.
    pub node: usize,
    /// GPU ids it sees (empty on CPU).
    pub gpus: Vec<String>,
    /// Ports it binds: `http` and `grpc` for a rollout server, `master` for
    /// learner rank 0.
    pub ports: BTreeMap<String, u16>,
    /// Sibling binary to run (`rollout-server`, `learner`).
    pub program: String,
    pub args: Vec<String>,
    /// Variables set on top of the launcher's environment.
    pub env: BTreeMap<String, String>,
    /// `<out>/logs/<name>.log`.
    pub log: PathBuf,
    /// `http://ADDR:PORT/health` (rollout servers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
}

/// The whole job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub device: Device,
    pub nodes: Vec<NodeSpec>,
    /// GPUs used per node (0 on CPU).
    pub gpus_per_node: usize,
    pub dp: usize,
    pub tp: usize,
    /// The learners' world size.
    pub learner_ranks: usize,
    /// Node rank of the rollout servers.
    pub rollout_node: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub rollout_endpoints: Vec<String>,
    pub weight_sync_endpoints: Vec<String>,
    pub global_batch: usize,
    pub num_generations: usize,
    pub out: PathBuf,
    pub processes: Vec<ProcessPlan>,
    /// Things that are allowed but probably not meant (idle GPUs...).
    pub notes: Vec<String>,
}

/// A plan that cannot run, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("--{what} must be at least 1 (got {got})")]
    Zero { what: &'static str, got: usize },
    #[error(
        "no GPU found on this node (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE and /dev/nvidia* \
         are all empty): run with --device cpu, or request GPUs from Slurm (--gres=gpu:N)"
    )]
    NoGpus,
    #[error("not enough GPUs: {0}")]
    NotEnoughGpus(String),
    #[error(
        "the global batch ({global} completions = {how}) does not divide by num_generations x \
         learner ranks ({g} x {ranks} = {need}): every rank needs whole groups of {g} \
         completions; set train.per_device_train_batch_size to a multiple of {g} (e.g. {suggest}) \
         or change rollout.num_generations"
    )]
    Batch {
        global: usize,
        how: String,
        g: usize,
        ranks: usize,
        need: usize,
        suggest: usize,
    },
    #[error(
        "--tp {tp} does not divide the model's heads (num_attention_heads {attention}, \
         num_key_value_heads {key_value} in {model}/config.json): use a --tp that divides both{hint}"
    )]
    Heads {
        tp: usize,
        attention: usize,
        key_value: usize,
        model: String,
        hint: String,
    },
    #[error(
        "--tp {tp} needs the model's head counts, but {model}/config.json does not exist yet: \
         create the model first (learner init-model) or use --tp 1"
    )]
    HeadsUnknown { tp: usize, model: String },
    #[error(
        "tensor parallelism inside the rollout server is not implemented yet (--tp {tp}): run \
         with --tp 1 and more replicas (--dp) instead; `--dry-run` shows the tp plan"
    )]
    TensorParallelNotImplemented { tp: usize },
    #[error("ports: {0}")]
    Ports(String),
}

impl Plan {
    /// Makes and checks the plan.
    pub fn new(input: &PlanInput) -> Result<Plan, PlanError> {
        make(input)
    }

    /// Refusals that apply at start but not to `--dry-run`.
    pub fn check_startable(&self) -> Result<(), PlanError> {
        if self.tp > 1 {
            return Err(PlanError::TensorParallelNotImplemented { tp: self.tp });
        }
        Ok(())
    }

    /// The processes a launcher on node `node` starts.
    pub fn processes_on(&self, node: usize) -> impl Iterator<Item = &ProcessPlan> {
        self.processes.iter().filter(move |p| p.node == node)
    }

    /// Nodes that run learners.
    pub fn learner_nodes(&self) -> Vec<usize> {
        let mut nodes: Vec<usize> = self
            .processes
            .iter()
            .filter(|p| p.role == Role::Learner)
            .map(|p| p.node)
            .collect();
        nodes.dedup();
        nodes
    }

    /// The plan as a table: node, GPU, role, ports, environment; then each
    /// process's command line.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "NODE".to_string(),
            if self.device == Device::Cpu {
                "GPU".to_string()
            } else {
                "GPU(S)".to_string()
            },
            "ROLE".to_string(),
            "PORTS".to_string(),
            "ENVIRONMENT".to_string(),
        ]];
        for p in &self.processes {
            let node = &self.nodes[p.node];
            let node_col = if node.name == node.addr {
                format!("{} {}", p.node, node.name)
            } else {
                format!("{} {} ({})", p.node, node.name, node.addr)
            };
            let gpus = if p.gpus.is_empty() {
                "-".to_string()
            } else {
                p.gpus.join(",")
            };
            let ports = if p.ports.is_empty() {
                "-".to_string()
            } else {
                p.ports
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let env = p
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            rows.push([node_col, gpus, p.name.clone(), ports, env]);
        }
        let mut widths = [0usize; 5];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plan: {} node(s), device {}, {} rollout server(s) (dp {} x tp {}), {} learner rank(s), \
             global batch {} (num_generations {})",
            self.nodes.len(),
            self.device.as_str(),
            self.dp,
            self.dp,
            self.tp,
            self.learner_ranks,
            self.global_batch,
            self.num_generations
        );
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        let _ = writeln!(out, "commands:");
        for p in &self.processes {
            let _ = writeln!(out, "  {}: {} {}", p.name, p.program, shell_words(&p.args));
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// Arguments joined for display, quoted where a shell would need it.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A JSON list as a recipe override value: `["a","b"]`.
fn list_value(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

/// Splits `total` items over `parts` bins in contiguous, balanced blocks.
fn balanced(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

fn make(input: &PlanInput) -> Result<Plan, PlanError> {
    let n_nodes = input.nodes.len();
    if n_nodes == 0 {
        return Err(PlanError::Zero {
            what: "nodes",
            got: 0,
        });
    }
    if input.dp == 0 {
        return Err(PlanError::Zero { what: "dp", got: 0 });
    }
    if input.tp == 0 {
        return Err(PlanError::Zero { what: "tp", got: 0 });
    }
    if input.ports.rollout.len() != input.dp {
        return Err(PlanError::Ports(format!(
            "{} rollout port pairs for {} replicas",
            input.ports.rollout.len(),
            input.dp
        )));
    }
    let multi = n_nodes > 1;
    let rollout_node = n_nodes - 1;
    let learner_node_list: Vec<usize> = if multi {
        (0..n_nodes - 1).collect()
    } else {
        vec![0]
    };
    let mut notes = Vec::new();
    let mut colocated = false;

    // Who goes where: per learner node, the GPU slots (or process count).
    let server_slots = input.dp * input.tp;
    let (gpus_per_node, per_node_learners): (usize, Vec<usize>) = match input.device {
        Device::Cuda => {
            let g = input.gpu_ids.len();
            if g == 0 {
                return Err(PlanError::NoGpus);
            }
            let free_per_learner_node = if multi {
                if server_slots > g {
                    return Err(PlanError::NotEnoughGpus(format!(
                        "dp {} x tp {} = {server_slots} GPUs for rollout servers, but the \
                         rollout node ({}) has {g}: lower --dp or --tp, or use nodes with more \
                         GPUs (--gpus-per-node)",
                        input.dp, input.tp, input.nodes[rollout_node].name
                    )));
                }
                if server_slots < g {
                    notes.push(format!(
                        "{} GPU(s) of the rollout node stay idle (dp x tp = {server_slots} of {g})",
                        g - server_slots
                    ));
                }
                g
            } else if server_slots > g {
                return Err(PlanError::NotEnoughGpus(format!(
                    "dp {} x tp {} = {server_slots} GPUs for rollout servers, but this node has \
                     {g}: lower --dp or --tp, add GPUs, or use several nodes (--nodes 2 puts \
                     the rollout servers on their own node)",
                    input.dp, input.tp
                )));
            } else if server_slots == g {
                // TRL's colocate mode: no GPU is left over, so each learner
                // shares a server's GPU and the server keeps to a fraction
                // of its memory.
                colocated = true;
                notes.push(format!(
                    "colocated: the rollout server(s) and learner(s) share {g} GPU(s); each \
                     server uses --gpu-memory-utilization {COLOCATED_GPU_MEMORY_UTILIZATION} \
                     unless rollout.gpu_memory_utilization sets it"
                ));
                g
            } else {
                g - server_slots
            };
            let available = free_per_learner_node * learner_node_list.len();
            let ranks = input.learner_ranks.unwrap_or(available);
            if ranks == 0 {
                return Err(PlanError::Zero {
                    what: "learner ranks (topology.learner_ranks)",
                    got: 0,
                });
            }
            if ranks > available {
                return Err(PlanError::NotEnoughGpus(format!(
                    "topology.learner_ranks = {ranks} but only {available} GPU(s) are left for \
                     learners ({} learner node(s) x {free_per_learner_node}): lower \
                     topology.learner_ranks or add nodes/GPUs",
                    learner_node_list.len()
                )));
            }
            if ranks < available {
                notes.push(format!(
                    "{} GPU(s) meant for learners stay idle (topology.learner_ranks = {ranks})",
                    available - ranks
                ));
            }
            // Fill learner nodes in order, one rank per GPU.
            let mut left = ranks;
            let per_node = learner_node_list
                .iter()
                .map(|_| {
                    let here = left.min(free_per_learner_node);
                    left -= here;
                    here
                })
                .collect();
            (g, per_node)
        }
        Device::Cpu => {
            let default = DEFAULT_CPU_LEARNERS_PER_NODE * learner_node_list.len();
            let ranks = input.learner_ranks.unwrap_or(default);
            if ranks == 0 {
                return Err(PlanError::Zero {
                    what: "learner ranks (topology.learner_ranks)",
                    got: 0,
                });
            }
            if ranks < learner_node_list.len() {
                notes.push(format!(
                    "{} learner node(s) stay idle ({ranks} learner rank(s))",
                    learner_node_list.len() - ranks
                ));
            }
            (0, balanced(ranks, learner_node_list.len()))
        }
    };
    let learner_ranks: usize = per_node_learners.iter().sum();

    // The batch must split into whole groups on every rank.
    let b = input.batch;
    if b.num_generations == 0 {
        return Err(PlanError::Zero {
            what: "rollout.num_generations",
            got: 0,
        });
    }
    let (global, how) = match b.global_batch {
        Some(gb) => (gb, "as the recipe sets it".to_string()),
        None => (
            b.per_device_train_batch_size * learner_ranks,
            format!(
                "per_device_train_batch_size {} x {learner_ranks} learner ranks",
                b.per_device_train_batch_size
            ),
        ),
    };
    let need = b.num_generations * learner_ranks;
    if global == 0 || global % need != 0 {
        let g = b.num_generations;
        let per_rank = b.per_device_train_batch_size.max(1);
        return Err(PlanError::Batch {
            global,
            how,
            g,
            ranks: learner_ranks,
            need,
            suggest: per_rank.div_ceil(g) * g,
        });
    }

    // Tensor parallelism needs heads that split evenly.
    if input.tp > 1 {
        let model = input.model_dir.display().to_string();
        let Some(h) = input.heads else {
            return Err(PlanError::HeadsUnknown {
                tp: input.tp,
                model,
            });
        };
        if h.attention % input.tp != 0 || h.key_value % input.tp != 0 {
            let ok: Vec<String> = (1..=h.key_value.min(h.attention))
                .filter(|t| h.attention % t == 0 && h.key_value % t == 0)
                .map(|t| t.to_string())
                .collect();
            return Err(PlanError::Heads {
                tp: input.tp,
                attention: h.attention,
                key_value: h.key_value,
                model,
                hint: format!(" ({})", ok.join(", ")),
            });
        }
    }

    let logs = input.out.join("logs");
    let server_node = &input.nodes[rollout_node];
    let master_node_rank = learner_node_list[0];
    let master_addr = input.nodes[master_node_rank].addr.clone();
    let bind_host = if multi { "0.0.0.0" } else { "127.0.0.1" };

    let mut processes = Vec::new();
    let mut rollout_endpoints = Vec::new();
    let mut weight_sync_endpoints = Vec::new();
    for (r, ports) in input.ports.rollout.iter().enumerate() {
        let url = format!("http://{}:{}", server_node.addr, ports.http);
        rollout_endpoints.push(url.clone());
        weight_sync_endpoints.push(format!("http://{}:{}", server_node.addr, ports.grpc));
        let gpus: Vec<String> = match input.device {
            Device::Cuda => input.gpu_ids[r * input.tp..(r + 1) * input.tp].to_vec(),
            Device::Cpu => Vec::new(),
        };
        let mut env = BTreeMap::new();
        if input.device == Device::Cuda {
            env.insert("CUDA_VISIBLE_DEVICES".into(), gpus.join(","));
        }
        let mut args = vec![
            "--model".to_string(),
            input.model_dir.display().to_string(),
            "--host".into(),
            bind_host.into(),
            "--port".into(),
            ports.http.to_string(),
            "--grpc-port".into(),
            ports.grpc.to_string(),
            "--device".into(),
            input.device.as_str().into(),
        ];
        let set_by_recipe = input
            .rollout_server_args
            .iter()
            .any(|a| a.starts_with("--gpu-memory-utilization"));
        if colocated && !set_by_recipe {
            args.push("--gpu-memory-utilization".into());
            args.push(COLOCATED_GPU_MEMORY_UTILIZATION.to_string());
        }
        args.extend(input.rollout_server_args.iter().cloned());
        let name = format!("rollout-{r}");
        processes.push(ProcessPlan {
            log: logs.join(format!("{name}.log")),
            name,
            role: Role::RolloutServer,
            index: r,
            node: rollout_node,
            gpus,
            ports: BTreeMap::from([("http".into(), ports.http), ("grpc".into(), ports.grpc)]),
            program: "rollout-server".into(),
            args,
            env,
            health_url: Some(format!("{url}/health")),
        });
    }

    let mut rank = 0;
    for (&node, &count) in learner_node_list.iter().zip(&per_node_learners) {
        // On one node the learners take the GPUs after the servers' (the
        // same ones when colocated).
        let first_gpu = if multi || colocated { 0 } else { server_slots };
        for local_rank in 0..count {
            let mut env = BTreeMap::from([
                ("RANK".to_string(), rank.to_string()),
                ("WORLD_SIZE".to_string(), learner_ranks.to_string()),
                ("LOCAL_RANK".to_string(), local_rank.to_string()),
                ("LOCAL_WORLD_SIZE".to_string(), count.to_string()),
                ("MASTER_ADDR".to_string(), master_addr.clone()),
                ("MASTER_PORT".to_string(), input.ports.master.to_string()),
            ]);
            let gpus = match input.device {
                Device::Cuda => vec![input.gpu_ids[first_gpu + local_rank].clone()],
                Device::Cpu => Vec::new(),
            };
            if input.device == Device::Cpu && input.cpus_per_node > 0 {
                // The ranks of a node train at the same time: each gets its
                // share of the cores, since more compute threads than cores
                // slow every rank down (the rollout server keeps all: it
                // runs while the learners wait for it).
                let threads = (input.cpus_per_node / count).max(1);
                env.insert("RAYON_NUM_THREADS".into(), threads.to_string());
            }
            if input.device == Device::Cuda {
                env.insert("CUDA_VISIBLE_DEVICES".into(), gpus.join(","));
                // NCCL connects peers inside the (watched) communicator init
                // instead of lazily inside a collective, where a dead peer
                // could block the call itself.
                env.insert("NCCL_RUNTIME_CONNECT".into(), "0".into());
            }
            let mut args = vec![
                "train".to_string(),
                "--config".into(),
                input.config.display().to_string(),
            ];
            args.extend(input.overrides.iter().cloned());
            args.push(format!(
                "{}={}",
                keys::ENDPOINTS,
                list_value(&rollout_endpoints)
            ));
            args.push(format!(
                "{}={}",
                keys::WEIGHT_SYNC_ENDPOINTS,
                list_value(&weight_sync_endpoints)
            ));
            args.push(format!("{}=rank-{rank}", keys::CLIENT_TAG));
            args.push(format!("{}={}", keys::OUTPUT_DIR, input.out.display()));
            args.push(format!("{}={}", keys::DEVICE, input.device.as_str()));
            // The real topology, so that the learner's manifest shows it.
            args.push(format!("{}={}", keys::NODES, n_nodes));
            args.push(format!("{}={}", keys::GPUS_PER_NODE, gpus_per_node));
            args.push(format!("{}={}", keys::DP, input.dp));
            args.push(format!("{}={}", keys::TP, input.tp));
            args.push(format!("{}={}", keys::LEARNER_RANKS, learner_ranks));
            args.extend(input.learner_overrides.iter().cloned());
            if let Some(dir) = &input.resume_from {
                args.push("--resume-from".into());
                args.push(dir.display().to_string());
                if input.allow_recipe_change {
                    args.push("--allow-recipe-change".into());
                }
            }
            let ports = if rank == 0 {
                BTreeMap::from([("master".to_string(), input.ports.master)])
            } else {
                BTreeMap::new()
            };
            let name = format!("learner-rank{rank}");
            processes.push(ProcessPlan {
                log: logs.join(format!("{name}.log")),
                name,
                role: Role::Learner,
                index: rank,
                node,
                gpus,
                ports,
                program: "learner".into(),
                args,
                env,
                health_url: None,
            });
            rank += 1;
        }
    }
    // Table order: node, then servers before learners on a shared node.
    processes.sort_by_key(|p| (p.node, p.role == Role::Learner, p.index));

    Ok(Plan {
        device: input.device,
        nodes: input.nodes.clone(),
        gpus_per_node,
        dp: input.dp,
        tp: input.tp,
        learner_ranks,
        rollout_node,
        master_addr,
        master_port: input.ports.master,
        rollout_endpoints,
        weight_sync_endpoints,
        global_batch: global,
        num_generations: b.num_generations,
        out: input.out.clone(),
        processes,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<NodeSpec> {
        (0..n)
            .map(|i| NodeSpec {
                name: format!("node{}", i + 1),
                addr: format!("10.0.0.{}", i + 1),
            })
            .collect()
    }

    fn input(device: Device, n_nodes: usize, gpus: usize, dp: usize, tp: usize) -> PlanInput {
        PlanInput {
            device,
            nodes: nodes(n_nodes),
            gpu_ids: (0..gpus).map(|g| g.to_string()).collect(),
            dp,
            tp,
            learner_ranks: None,
            ports: Ports {
                master: 29500,
                rollout: (0..dp)
                    .map(|r| RolloutPorts {
                        http: 8000 + r as u16,
                        grpc: 50051 + r as u16,
                    })
                    .collect(),
            },
            batch: BatchFacts {
                per_device_train_batch_size: 8,
                num_generations: 4,
                global_batch: None,
            },
            heads: Some(Heads {
                attention: 8,
                key_value: 4,
            }),
            config: "configs/demo.yaml".into(),
            model_dir: "runs/model".into(),
            out: "runs/x".into(),
            overrides: vec!["train.max_steps=3".into()],
            resume_from: None,
            allow_recipe_change: false,
            rollout_server_args: vec![],
            learner_overrides: vec![],
            cpus_per_node: 0,
        }
    }

    fn plan(i: &PlanInput) -> Plan {
        match Plan::new(i) {
            Ok(p) => p,
            Err(e) => panic!("plan refused: {e}"),
        }
    }

    fn roles(p: &Plan) -> Vec<(usize, Vec<String>, String)> {
        p.processes
            .iter()
            .map(|p| (p.node, p.gpus.clone(), p.name.clone()))
            .collect()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn one_node_gpus_split_servers_first() {
        let p = plan(&input(Device::Cuda, 1, 4, 1, 1));
        assert_eq!(
            roles(&p),
            vec![
                (0, s(&["0"]), "rollout-0".to_string()),
                (0, s(&["1"]), "learner-rank0".to_string()),
                (0, s(&["2"]), "learner-rank1".to_string()),
                (0, s(&["3"]), "learner-rank2".to_string()),
            ]
        );
        assert_eq!(p.learner_ranks, 3);
        assert_eq!(p.rollout_node, 0);
        assert_eq!(p.master_addr, "10.0.0.1");
        let l1 = &p.processes[2];
        assert_eq!(l1.env["RANK"], "1");
        assert_eq!(l1.env["LOCAL_RANK"], "1");
        assert_eq!(l1.env["WORLD_SIZE"], "3");
        assert_eq!(l1.env["CUDA_VISIBLE_DEVICES"], "2");
        assert_eq!(l1.env["NCCL_RUNTIME_CONNECT"], "0");
        assert_eq!(l1.env["MASTER_PORT"], "29500");
        assert!(l1.args.contains(&"rollout.client_tag=rank-1".to_string()));
        assert!(
            l1.args
                .contains(&r#"rollout.endpoints=["http://10.0.0.1:8000"]"#.to_string())
        );
        assert!(
            l1.args.contains(
                &r#"rollout.weight_sync_endpoints=["http://10.0.0.1:50051"]"#.to_string()
            )
        );
        assert_eq!(
            &l1.args[..4],
            [
                "train",
                "--config",
                "configs/demo.yaml",
                "train.max_steps=3"
            ]
        );
        let server = &p.processes[0];
        assert_eq!(server.env["CUDA_VISIBLE_DEVICES"], "0");
        assert!(server.args.windows(2).any(|w| w == ["--host", "127.0.0.1"]));
        assert_eq!(
            server.health_url.as_deref(),
            Some("http://10.0.0.1:8000/health")
        );
        assert_eq!(server.log, PathBuf::from("runs/x/logs/rollout-0.log"));
        assert_eq!(
            p.processes[1].log,
            PathBuf::from("runs/x/logs/learner-rank0.log")
        );
        assert!(p.check_startable().is_ok());
    }

    #[test]
    fn one_node_dp_and_tp() {
        // dp 2 x tp 1 on 8 GPUs: 2 servers, 6 learners.
        let p = plan(&input(Device::Cuda, 1, 8, 2, 1));
        assert_eq!(p.processes[0].gpus, s(&["0"]));
        assert_eq!(p.processes[1].gpus, s(&["1"]));
        assert_eq!(p.processes[1].ports["http"], 8001);
        assert_eq!(p.learner_ranks, 6);
        assert_eq!(p.processes[2].gpus, s(&["2"]));
        assert_eq!(p.rollout_endpoints.len(), 2);
        // dp 2 x tp 2 on 8 GPUs: servers on 0-1 and 2-3, learners 4-7.
        let mut i = input(Device::Cuda, 1, 8, 2, 2);
        i.batch.per_device_train_batch_size = 4;
        let p = plan(&i);
        assert_eq!(p.processes[0].gpus, s(&["0", "1"]));
        assert_eq!(p.processes[0].env["CUDA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(p.processes[1].gpus, s(&["2", "3"]));
        assert_eq!(p.learner_ranks, 4);
        assert_eq!(p.processes[2].gpus, s(&["4"]));
        assert_eq!(p.processes[5].gpus, s(&["7"]));
        // Computed, but refused at start.
        assert_eq!(
            p.check_startable(),
            Err(PlanError::TensorParallelNotImplemented { tp: 2 })
        );
        let msg = p.check_startable().unwrap_err().to_string();
        assert!(msg.contains("not implemented yet"), "{msg}");
    }

    #[test]
    fn gpu_ids_come_from_cuda_visible_devices() {
        let mut i = input(Device::Cuda, 1, 3, 1, 1);
        i.gpu_ids = s(&["4", "6", "7"]);
        i.batch.per_device_train_batch_size = 4;
        let p = plan(&i);
        assert_eq!(p.processes[0].env["CUDA_VISIBLE_DEVICES"], "4");
        assert_eq!(p.processes[1].env["CUDA_VISIBLE_DEVICES"], "6");
        assert_eq!(p.processes[2].env["CUDA_VISIBLE_DEVICES"], "7");
        assert_eq!(p.processes[2].env["LOCAL_RANK"], "1");
    }

    #[test]
    fn two_nodes_servers_on_the_last() {
        let p = plan(&input(Device::Cuda, 2, 4, 2, 1));
        let servers: Vec<_> = p
            .processes
            .iter()
            .filter(|p| p.role == Role::RolloutServer)
            .collect();
        assert_eq!(servers.len(), 2);
        assert!(servers.iter().all(|s| s.node == 1));
        assert_eq!(servers[1].gpus, s(&["1"]));
        assert!(
            servers[0]
                .args
                .windows(2)
                .any(|w| w == ["--host", "0.0.0.0"])
        );
        let learners: Vec<_> = p.processes_on(0).collect();
        assert_eq!(learners.len(), 4);
        assert!(learners.iter().all(|l| l.role == Role::Learner));
        assert_eq!(learners[0].gpus, s(&["0"]));
        assert_eq!(p.learner_ranks, 4);
        assert_eq!(p.master_addr, "10.0.0.1");
        assert_eq!(
            p.rollout_endpoints,
            s(&["http://10.0.0.2:8000", "http://10.0.0.2:8001"])
        );
        assert_eq!(
            p.weight_sync_endpoints,
            s(&["http://10.0.0.2:50051", "http://10.0.0.2:50052"])
        );
        assert_eq!(p.learner_nodes(), [0]);
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes); // 2 idle GPUs on node 2
    }

    #[test]
    fn three_nodes_learners_span_the_first_two() {
        let mut i = input(Device::Cuda, 3, 8, 1, 1);
        i.batch.per_device_train_batch_size = 4;
        let p = plan(&i);
        assert_eq!(p.learner_ranks, 16);
        assert_eq!(p.learner_nodes(), [0, 1]);
        let on1: Vec<_> = p.processes_on(1).collect();
        assert_eq!(on1.len(), 8);
        assert_eq!(on1[0].env["RANK"], "8");
        assert_eq!(on1[0].env["LOCAL_RANK"], "0");
        assert_eq!(on1[0].env["LOCAL_WORLD_SIZE"], "8");
        assert_eq!(on1[0].env["MASTER_ADDR"], "10.0.0.1");
        assert_eq!(p.processes_on(2).count(), 1);
        assert_eq!(p.rollout_node, 2);
        // Fewer learner ranks than GPUs: the first nodes fill first.
        i.learner_ranks = Some(10);
        let p = plan(&i);
        assert_eq!(p.processes_on(0).count(), 8);
        assert_eq!(p.processes_on(1).count(), 2);
        assert!(p.notes.iter().any(|n| n.contains("idle")));
    }

    #[test]
    fn cpu_defaults_to_one_server_and_two_learners() {
        let p = plan(&input(Device::Cpu, 1, 0, 1, 1));
        assert_eq!(p.learner_ranks, 2);
        assert_eq!(p.gpus_per_node, 0);
        assert_eq!(p.processes.len(), 3);
        assert!(p.processes.iter().all(|p| p.gpus.is_empty()));
        assert!(
            p.processes
                .iter()
                .all(|p| !p.env.contains_key("CUDA_VISIBLE_DEVICES"))
        );
        assert!(
            p.processes[0]
                .args
                .windows(2)
                .any(|w| w == ["--device", "cpu"])
        );
        // GPUs in the input are ignored on CPU.
        let p2 = plan(&input(Device::Cpu, 1, 4, 1, 1));
        assert_eq!(p2.learner_ranks, 2);
        // Unknown cores: thread counts are left alone.
        assert!(
            p.processes
                .iter()
                .all(|p| !p.env.contains_key("RAYON_NUM_THREADS"))
        );
        // The learners of a node split its cores; the server keeps them all.
        for (cpus, want) in [(2, "1"), (16, "8"), (1, "1")] {
            let mut i = input(Device::Cpu, 1, 0, 1, 1);
            i.cpus_per_node = cpus;
            let p = plan(&i);
            assert!(!p.processes[0].env.contains_key("RAYON_NUM_THREADS"));
            for l in &p.processes[1..] {
                assert_eq!(l.env["RAYON_NUM_THREADS"], want, "{cpus} cpus");
            }
        }
    }

    #[test]
    fn cpu_two_nodes_and_explicit_ranks() {
        let p = plan(&input(Device::Cpu, 2, 0, 1, 1));
        assert_eq!(
            roles(&p),
            vec![
                (0, vec![], "learner-rank0".to_string()),
                (0, vec![], "learner-rank1".to_string()),
                (1, vec![], "rollout-0".to_string()),
            ]
        );
        let mut i = input(Device::Cpu, 3, 0, 2, 1);
        i.learner_ranks = Some(3);
        i.batch.per_device_train_batch_size = 4;
        let p = plan(&i);
        assert_eq!(p.processes_on(0).count(), 2);
        assert_eq!(p.processes_on(1).count(), 1);
        assert_eq!(p.processes_on(2).count(), 2);
        assert_eq!(
            p.processes_on(1).next().map(|l| l.env["RANK"].clone()),
            Some("2".into())
        );
    }

    #[test]
    fn one_gpu_colocates_the_server_and_the_learner() {
        let p = plan(&input(Device::Cuda, 1, 1, 1, 1));
        assert_eq!(
            roles(&p),
            vec![
                (0, s(&["0"]), "rollout-0".to_string()),
                (0, s(&["0"]), "learner-rank0".to_string()),
            ]
        );
        assert_eq!(p.learner_ranks, 1);
        let server = &p.processes[0];
        assert!(
            server
                .args
                .windows(2)
                .any(|w| w == ["--gpu-memory-utilization", "0.3"]),
            "{:?}",
            server.args
        );
        assert!(
            p.notes.iter().any(|n| n.contains("colocated")),
            "{:?}",
            p.notes
        );
        // The recipe's own value wins.
        let mut i = input(Device::Cuda, 1, 2, 2, 1);
        i.rollout_server_args = s(&["--gpu-memory-utilization=0.5"]);
        let p = plan(&i);
        assert_eq!(p.learner_ranks, 2);
        assert_eq!(p.processes[2].name, "learner-rank0");
        assert_eq!(p.processes[2].gpus, s(&["0"]));
        assert_eq!(p.processes[3].gpus, s(&["1"]));
        let args = &p.processes[0].args;
        assert!(
            !args.iter().any(|a| a == "--gpu-memory-utilization"),
            "{args:?}"
        );
        assert!(args.iter().any(|a| a == "--gpu-memory-utilization=0.5"));
        // With a GPU to spare nothing is shared.
        let p = plan(&input(Device::Cuda, 1, 2, 1, 1));
        assert!(
            !p.processes[0]
                .args
                .iter()
                .any(|a| a.contains("utilization"))
        );
    }

    #[test]
    fn refuses_too_few_gpus() {
        let e = Plan::new(&input(Device::Cuda, 1, 1, 2, 1)).unwrap_err();
        assert!(matches!(e, PlanError::NotEnoughGpus(_)), "{e}");
        assert!(e.to_string().contains("lower --dp or --tp"), "{e}");
        let e = Plan::new(&input(Device::Cuda, 1, 4, 3, 2)).unwrap_err();
        assert!(matches!(e, PlanError::NotEnoughGpus(_)), "{e}");
        let e = Plan::new(&input(Device::Cuda, 2, 2, 3, 1)).unwrap_err();
        assert!(e.to_string().contains("rollout node"), "{e}");
        let mut i = input(Device::Cuda, 1, 4, 1, 1);
        i.learner_ranks = Some(4);
        let e = Plan::new(&i).unwrap_err();
        assert!(e.to_string().contains("topology.learner_ranks"), "{e}");
        let e = Plan::new(&input(Device::Cuda, 1, 0, 1, 1)).unwrap_err();
        assert_eq!(e, PlanError::NoGpus);
        assert!(e.to_string().contains("--device cpu"));
    }

    #[test]
    fn refuses_a_batch_without_whole_groups() {
        let mut i = input(Device::Cpu, 1, 0, 1, 1);
        i.batch.per_device_train_batch_size = 6; // 12 over 2 ranks, groups of 4
        let e = Plan::new(&i).unwrap_err();
        assert!(matches!(e, PlanError::Batch { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("num_generations"), "{msg}");
        assert!(msg.contains("multiple of 4 (e.g. 8)"), "{msg}");
        // A recipe-fixed global batch is checked as it is.
        i.batch.global_batch = Some(16);
        assert_eq!(plan(&i).global_batch, 16);
        i.batch.global_batch = Some(12);
        assert!(Plan::new(&i).is_err());
        let mut i = input(Device::Cpu, 1, 0, 1, 1);
        i.batch.num_generations = 0;
        assert!(Plan::new(&i).is_err());
    }

    #[test]
    fn refuses_tp_that_does_not_divide_the_heads() {
        let mut i = input(Device::Cuda, 1, 8, 1, 3);
        i.batch.per_device_train_batch_size = 4;
        let e = Plan::new(&i).unwrap_err();
        assert!(matches!(e, PlanError::Heads { .. }), "{e}");
        assert!(e.to_string().contains("(1, 2, 4)"), "{e}");
        // kv heads 2: tp 4 divides 8 attention heads but not 2 kv heads.
        let mut i = input(Device::Cuda, 1, 8, 1, 4);
        i.heads = Some(Heads {
            attention: 8,
            key_value: 2,
        });
        assert!(matches!(Plan::new(&i), Err(PlanError::Heads { .. })));
        i.heads = None;
        assert!(matches!(Plan::new(&i), Err(PlanError::HeadsUnknown { .. })));
        // tp 1 needs no heads.
        let mut i = input(Device::Cuda, 1, 2, 1, 1);
        i.heads = None;
        i.batch.per_device_train_batch_size = 4;
        assert!(Plan::new(&i).is_ok());
    }

    #[test]
    fn refuses_zeroes_and_port_mismatch() {
        assert!(matches!(
            Plan::new(&input(Device::Cpu, 1, 0, 0, 1)),
            Err(PlanError::Zero { what: "dp", .. })
        ));
        assert!(matches!(
            Plan::new(&input(Device::Cpu, 1, 0, 1, 0)),
            Err(PlanError::Zero { what: "tp", .. })
        ));
        let mut i = input(Device::Cpu, 1, 0, 1, 1);
        i.learner_ranks = Some(0);
        assert!(Plan::new(&i).is_err());
        i.learner_ranks = None;
        i.ports.rollout.clear();
        assert!(matches!(Plan::new(&i), Err(PlanError::Ports(_))));
    }

    #[test]
    fn resume_and_table_and_json() {
        let mut i = input(Device::Cuda, 2, 2, 1, 1);
        i.batch.per_device_train_batch_size = 4;
        i.resume_from = Some("runs/x".into());
        let p = plan(&i);
        let l0 = &p.processes[0];
        assert_eq!(&l0.args[l0.args.len() - 2..], ["--resume-from", "runs/x"]);
        i.allow_recipe_change = true;
        let allowed = plan(&i);
        let l0 = &allowed.processes[0];
        assert_eq!(
            &l0.args[l0.args.len() - 3..],
            ["--resume-from", "runs/x", "--allow-recipe-change"]
        );
        let l0 = &p.processes[0];
        assert_eq!(l0.ports["master"], 29500);
        let t = p.table();
        assert!(t.contains("NODE"), "{t}");
        assert!(t.contains("0 node1 (10.0.0.1)"), "{t}");
        assert!(t.contains("learner-rank1"), "{t}");
        assert!(t.contains("grpc=50051 http=8000"), "{t}");
        assert!(t.contains("MASTER_ADDR=10.0.0.1"), "{t}");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["device"], "cuda");
        assert_eq!(json["processes"][0]["role"], "learner");
        assert_eq!(json["processes"][2]["role"], "rollout_server");
        assert_eq!(json["processes"][2]["ports"]["grpc"], 50051);
        assert_eq!(json["rollout_endpoints"][0], "http://10.0.0.2:8000");
    }

    #[test]
    fn shell_words_quotes_when_needed() {
        assert_eq!(
            shell_words(&s(&["a=b", "x y", r#"k=["u"]"#, "it's"])),
            r#"a=b 'x y' 'k=["u"]' 'it'\''s'"#
        );
    }
}
