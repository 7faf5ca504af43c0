//! Everything the plan is made from, gathered once: the recipe (with the
//! user's overrides), the flags, Slurm's environment, this node's GPUs, the
//! nodes' addresses and the ports. The impure half of planning; [`plan`] is
//! the pure half.

use std::collections::BTreeSet;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use learner::recipe::Recipe;
use serde_json::Value;

use crate::cli::{Args, DeviceArg};
use crate::devices;
use crate::plan::{
    BatchFacts, Device, Heads, NodeSpec, Plan, PlanInput, Ports, Role, RolloutPorts,
};
use crate::slurm::SlurmEnv;

/// The environment variable that names the job's node addresses.
pub const NODE_ADDRS_VAR: &str = "TANDEM_NODE_ADDRS";

/// Replicas a port block derived from SLURM_JOB_ID has room for.
const PORT_BLOCK: u16 = 16;

/// A plan and what this launcher does with it.
#[derive(Debug)]
pub struct Job {
    pub plan: Plan,
    /// Which node of the plan this launcher runs.
    pub node_rank: usize,
    /// Keys files of one attempt of one job (`job-<id>.<restart>`, or `local`).
    pub key: String,
    /// A preset model the launcher writes before starting the servers.
    pub model_to_make: Option<(model::presets::Preset, u64, PathBuf)>,
    /// Things the launcher decided that the user may want to know.
    pub notes: Vec<String>,
    /// How rank 0's progress is shown (`log.progress`).
    pub progress: learner::recipe::Progress,
}

impl Job {
    /// The plan as JSON, with this launcher's node and the notes.
    pub fn plan_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.plan).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("this_node".into(), Value::from(self.node_rank));
            if let Some(Value::Array(notes)) = map.get_mut("notes") {
                notes.extend(self.notes.iter().cloned().map(Value::from));
            }
        }
        v
    }

    /// Refusals that apply to a real start but not to `--dry-run`.
    pub fn check_startable(&self) -> anyhow::Result<()> {
        self.plan.check_startable()?;
        if self.plan.nodes.len() > 1 && std::env::var_os("SLURM_JOB_NODELIST").is_none() {
            bail!(
                "a {}-node plan needs one launcher per node: submit it with \
                 `sbatch ops/slurm/train.sbatch --config ...` (or run the launcher under \
                 `srun --ntasks-per-node=1`); without Slurm use --nodes 1",
                self.plan.nodes.len()
            );
        }
        Ok(())
    }

    /// Whether learners run on this node.
    pub fn runs_learners_here(&self) -> bool {
        self.plan
            .processes_on(self.node_rank)
            .any(|p| p.role == Role::Learner)
    }

    /// `<out>/launcher/<key>`: PIDs and the nodes' exit markers.
    pub fn job_dir(&self) -> PathBuf {
        self.plan.out.join("launcher").join(&self.key)
    }

    /// Writes the preset model the recipe names, once (several node
    /// launchers may race: each writes a private folder and renames it).
    pub fn make_model_if_missing(&self) -> anyhow::Result<()> {
        let Some((preset, seed, dir)) = &self.model_to_make else {
            return Ok(());
        };
        if dir.join("config.json").exists() {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let tmp = parent.join(format!(
            ".model-tmp-{}-{}",
            self.node_rank,
            std::process::id()
        ));
        eprintln!(
            "launcher: writing the {preset:?} model to {}",
            dir.display()
        );
        model::presets::init_model(*preset, &tmp, *seed)
            .with_context(|| format!("writing the {preset:?} model to {}", tmp.display()))?;
        if std::fs::rename(&tmp, dir).is_err() {
            // Another node won the race; its folder is the same bytes.
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join("config.json").exists() {
                bail!("could not move the model into {}", dir.display());
            }
        }
        Ok(())
    }
}

/// Keys (`section.key`) set by the recipe file or an override, as opposed to
/// defaults.
fn explicit_keys(config: &Path, overrides: &[String]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string(config)
        && let Ok(Value::Object(doc)) = serde_saphyr::from_str::<Value>(&text)
    {
        for (section, body) in &doc {
            if let Value::Object(body) = body {
                for key in body.keys() {
                    keys.insert(format!("{section}.{key}"));
                }
            }
        }
    }
    for o in overrides {
        if let Some((k, _)) = o.split_once('=') {
            keys.insert(k.trim().to_string());
        }
    }
    keys
}

fn read_heads(model_dir: &Path) -> Option<Heads> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let attention = v.get("num_attention_heads")?.as_u64()? as usize;
    let key_value = v
        .get("num_key_value_heads")
        .and_then(Value::as_u64)
        .map(|k| k as usize)
        .unwrap_or(attention);
    Some(Heads {
        attention,
        key_value,
    })
}

fn this_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Addresses of the job's nodes: `TANDEM_NODE_ADDRS` (one address for all,
/// a comma list in node order, or `name=addr` pairs), else the names
/// themselves when they resolve.
pub fn node_addrs(
    names: &[String],
    var: Option<&str>,
    resolves: impl Fn(&str) -> bool,
) -> Result<(Vec<NodeSpec>, Vec<String>), String> {
    let mut notes = Vec::new();
    let given: Vec<String> = match var.map(str::trim).filter(|v| !v.is_empty()) {
        None => Vec::new(),
        Some(v) if v.contains('=') => {
            let mut out = Vec::new();
            for name in names {
                let addr = v
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(n, _)| n.trim() == name)
                    .map(|(_, a)| a.trim().to_string())
                    .ok_or_else(|| {
                        format!("{NODE_ADDRS_VAR}={v:?} has no entry for node {name}")
                    })?;
                out.push(addr);
            }
            out
        }
        Some(v) => {
            let list: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
            match list.len() {
                1 => vec![list[0].clone(); names.len()],
                n if n == names.len() => list,
                n => {
                    return Err(format!(
                        "{NODE_ADDRS_VAR} lists {n} addresses for {} nodes ({})",
                        names.len(),
                        names.join(",")
                    ));
                }
            }
        }
    };
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let addr = match given.get(i) {
            Some(a) => a.clone(),
            None if resolves(name) => name.clone(),
            None => {
                return Err(format!(
                    "node name {name:?} does not resolve to an address, so other nodes could \
                     not reach it; set {NODE_ADDRS_VAR} (ops/slurm/train.sbatch sets it from \
                     Slurm's NodeAddr), e.g. {NODE_ADDRS_VAR}=10.0.0.1,10.0.0.2"
                ));
            }
        };
        if given.is_empty() && i == 0 {
            notes.push(format!(
                "node addresses are the node names (set {NODE_ADDRS_VAR} to change)"
            ));
        }
        nodes.push(NodeSpec {
            name: name.clone(),
            addr,
        });
    }
    Ok((nodes, notes))
}

fn resolves(name: &str) -> bool {
    (name, 0u16)
        .to_socket_addrs()
        .map(|mut a| a.next().is_some())
        .unwrap_or(false)
}

/// The lowest port of the kernel's ephemeral range (the ports it hands out
/// for a bind to port 0), Linux's default when it cannot be read.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Free ports on this machine, all distinct (held open until all are
/// chosen). They are drawn below the kernel's ephemeral range: the servers
/// bind them a moment after they are released here, and in that moment any
/// other process asking the kernel for a free port (port 0) is handed one
/// from the ephemeral range, never one of these. Port 0 where no such port
/// can be had.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    use rand::Rng;
    const LOWEST: u16 = 10000;
    let high = ephemeral_low();
    let mut rng = rand::rng();
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(n);
    while listeners.len() < n {
        let drawn = (high > LOWEST + 1000)
            .then(|| {
                (0..200).find_map(|_| {
                    let port = rng.random_range(LOWEST..high);
                    TcpListener::bind(("0.0.0.0", port)).ok()
                })
            })
            .flatten();
        let listener = match drawn {
            Some(l) => l,
            None => TcpListener::bind(("0.0.0.0", 0)).context("finding free ports")?,
        };
        listeners.push(listener);
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Ports from the flags; the rest free (one node) or derived from the job id
/// (several nodes: every node's launcher must compute the same ones).
pub fn choose_ports(
    dp: usize,
    multi_node: bool,
    job_id: Option<u64>,
    port: Option<u16>,
    grpc_port: Option<u16>,
    master_port: Option<u16>,
) -> anyhow::Result<Ports> {
    let plus = |base: u16, r: usize, what: &str| -> anyhow::Result<u16> {
        u16::try_from(base as usize + r)
            .with_context(|| format!("--{what} {base} + {r} is past 65535"))
    };
    let all_given = master_port.is_some() && port.is_some() && grpc_port.is_some();
    let block = if multi_node && !all_given {
        let job = job_id.context(
            "a multi-node plan needs fixed ports that every node agrees on: pass --port, \
             --grpc-port and --master-port, or run under Slurm (ports derive from SLURM_JOB_ID)",
        )?;
        if dp >= PORT_BLOCK as usize / 2 && (port.is_none() || grpc_port.is_none()) {
            bail!("with --dp {dp} pass --port and --grpc-port explicitly");
        }
        Some(20000 + (job % 2500) as u16 * PORT_BLOCK)
    } else {
        None
    };
    let mut free = if block.is_none() {
        free_ports(1 + 2 * dp)?.into_iter()
    } else {
        Vec::new().into_iter()
    };
    let mut next_free = || free.next().context("ran out of free ports");
    let master = match (master_port, block) {
        (Some(p), _) => p,
        (None, Some(b)) => b,
        (None, None) => next_free()?,
    };
    let mut rollout = Vec::new();
    for r in 0..dp {
        let http = match (port, block) {
            (Some(p), _) => plus(p, r, "port")?,
            (None, Some(b)) => b + 1 + 2 * r as u16,
            (None, None) => next_free()?,
        };
        let grpc = match (grpc_port, block) {
            (Some(p), _) => plus(p, r, "grpc-port")?,
            (None, Some(b)) => b + 2 + 2 * r as u16,
            (None, None) => next_free()?,
        };
        rollout.push(RolloutPorts { http, grpc });
    }
    Ok(Ports { master, rollout })
}

/// Whether the run folder already holds a checkpoint.
pub fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("step_") && e.path().is_dir())
        })
        .unwrap_or(false)
}

/// Reads everything and makes the plan.
pub fn prepare(args: &Args) -> anyhow::Result<Job> {
    let recipe = Recipe::load(&args.config, &args.overrides)
        .with_context(|| format!("reading the recipe {}", args.config.display()))?;
    let explicit = explicit_keys(&args.config, &args.overrides);
    let set = |k: &str| explicit.contains(k);
    let topo = &recipe.topology;
    let mut notes = Vec::new();

    let slurm = SlurmEnv::from_env()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| recipe.checkpoint.output_dir.clone());

    // Nodes and which one this is.
    let (names, node_rank, job_id, key) = match &slurm {
        Some(s) => {
            if let Some(n) = args.nodes
                && n != s.nodes.len()
            {
                bail!(
                    "--nodes {n} but the Slurm job has {} node(s) ({}); set #SBATCH --nodes \
                     instead",
                    s.nodes.len(),
                    s.nodes.join(",")
                );
            }
            let key = match s.job_id {
                Some(id) => format!("job-{id}.{}", s.restart_count),
                None => "local".into(),
            };
            (s.nodes.clone(), s.node_rank, s.job_id, key)
        }
        None => {
            let n = args
                .nodes
                .unwrap_or(if set("topology.nodes") { topo.nodes } else { 1 });
            if n == 1 {
                (vec![this_hostname()], 0, None, "local".to_string())
            } else {
                notes.push(format!(
                    "not under Slurm: the {n} nodes are placeholders (node0..); a real start \
                     needs Slurm"
                ));
                (
                    (0..n).map(|i| format!("node{i}")).collect(),
                    0,
                    None,
                    "local".into(),
                )
            }
        }
    };
    if names.is_empty() {
        bail!("--nodes must be at least 1");
    }
    let multi = names.len() > 1;
    let nodes = if !multi {
        vec![NodeSpec {
            name: names[0].clone(),
            addr: "127.0.0.1".into(),
        }]
    } else if slurm.is_none() {
        names
            .iter()
            .map(|n| NodeSpec {
                name: n.clone(),
                addr: n.clone(),
            })
            .collect()
    } else {
        let var = std::env::var(NODE_ADDRS_VAR).ok();
        let (nodes, more) =
            node_addrs(&names, var.as_deref(), resolves).map_err(|e| anyhow::anyhow!(e))?;
        notes.extend(more);
        nodes
    };

    // Device and GPUs.
    let visible = devices::visible_gpus();
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
        DeviceArg::Auto if visible.ids.is_empty() => Device::Cpu,
        DeviceArg::Auto if !model::device::CUDA_BUILD => {
            notes.push(format!(
                "{} GPU(s) visible, but this is a CPU build: running on the CPU (rebuild with \
                 `cargo build --release --features cuda` to use them)",
                visible.ids.len()
            ));
            Device::Cpu
        }
        DeviceArg::Auto => Device::Cuda,
    };
    // Said before any process starts, naming the key (the servers and the
    // learners would each refuse it on their own).
    model::device::DTypeSpec::from(recipe.model.dtype)
        .check(device == Device::Cuda)
        .with_context(|| {
            "model.dtype does not run on this job's device (set it to auto, which is f32 on \
             the CPU and bf16 on CUDA, or f32; or run on GPUs with --device cuda)"
        })?;
    let mut gpu_ids = visible.ids.clone();
    if device == Device::Cpu && args.gpus_per_node.is_some() {
        notes.push("--gpus-per-node is ignored on CPU (see --learner-ranks and --dp)".into());
    }
    if device == Device::Cuda {
        let want = args
            .gpus_per_node
            .or((topo.gpus_per_node > 0).then_some(topo.gpus_per_node));
        if let Some(g) = want {
            if gpu_ids.is_empty() && args.dry_run {
                notes.push(format!(
                    "no GPU visible here: the dry run assumes GPUs 0..{g} on every node"
                ));
                gpu_ids = (0..g).map(|i| i.to_string()).collect();
            } else if gpu_ids.len() < g {
                bail!(
                    "not enough GPUs: {g} per node asked for, but this node shows {} ({} = {:?}); \
                     lower --gpus-per-node, or request more GPUs from Slurm (--gres=gpu:{g})",
                    gpu_ids.len(),
                    visible.source,
                    visible.ids.join(",")
                );
            } else {
                gpu_ids.truncate(g);
            }
        }
    }

    let dp = args.dp.unwrap_or(if set("topology.dp") {
        topo.dp
    } else if set("topology.rollout_servers") && topo.rollout_servers > 1 {
        topo.rollout_servers
    } else {
        1
    });
    if topo.rollout_servers == 0 {
        bail!(
            "topology.rollout_servers = 0 (external rollout.endpoints only) is not supported by \
             the launcher yet: run `learner train` directly against those endpoints"
        );
    }
    let tp = args.tp.unwrap_or(topo.tp);
    // The recipe's value only when written: its default (1) would hide the
    // launcher's (every GPU left; two per learner node on CPU).
    let learner_ranks = args
        .learner_ranks
        .or(set("topology.learner_ranks").then_some(topo.learner_ranks));

    // The model: a folder, or a preset the launcher writes into the run folder.
    let (model_dir, model_to_make, learner_overrides) =
        match (&recipe.model.path, recipe.model.preset) {
            (Some(p), _) => (p.clone(), None, Vec::new()),
            (None, Some(preset)) => {
                let dir = out.join("model");
                let overrides = vec![
                    format!("model.path={}", dir.display()),
                    "model.preset=null".to_string(),
                ];
                (
                    dir.clone(),
                    Some((preset.into(), recipe.model.init_seed, dir)),
                    overrides,
                )
            }
            (None, None) => bail!("the recipe names no model: set model.path or model.preset"),
        };
    // A preset's heads are known before its folder exists.
    let heads = read_heads(&model_dir).or_else(|| {
        let (preset, _, _) = model_to_make.as_ref()?;
        let cfg = model::presets::config(*preset, 128, 0, 0).ok()?;
        Some(Heads {
            attention: cfg.num_attention_heads,
            key_value: cfg.num_key_value_heads,
        })
    });

    let ports = choose_ports(
        dp,
        multi,
        job_id,
        args.port,
        args.grpc_port,
        args.master_port,
    )?;

    let resume_from = match (&args.resume_from, args.auto_resume) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) if has_checkpoint(&out) => {
            notes.push(format!(
                "resuming from the latest checkpoint in {}",
                out.display()
            ));
            Some(out.clone())
        }
        _ => None,
    };

    // The servers generate in the learners' dtype, so their log-probs agree.
    let mut rollout_server_args = vec![
        "--dtype".to_string(),
        model::device::DTypeSpec::from(recipe.model.dtype).to_string(),
    ];
    if let Some(u) = recipe.rollout.gpu_memory_utilization {
        rollout_server_args.extend(["--gpu-memory-utilization".to_string(), u.to_string()]);
    }
    if let Some(k) = &recipe.rollout.weight_sync_token {
        rollout_server_args.extend(["--weight-sync-token".to_string(), k.clone()]);
    }
    if let Some(k) = &recipe.rollout.api_key {
        rollout_server_args.extend(["--api-key".to_string(), k.clone()]);
    }

    let input = PlanInput {
        device,
        nodes,
        gpu_ids,
        dp,
        tp,
        learner_ranks,
        ports,
        batch: BatchFacts {
            per_device_train_batch_size: recipe.train.per_device_train_batch_size,
            num_generations: recipe.rollout.num_generations,
            global_batch: None,
        },
        heads,
        config: args.config.clone(),
        model_dir,
        out,
        overrides: args.overrides.clone(),
        resume_from,
        allow_recipe_change: args.allow_recipe_change,
        rollout_server_args,
        learner_overrides,
        cpus_per_node: cpus_per_node(),
    };
    let plan = Plan::new(&input)?;
    // generation_batch_size must split over the planned learner ranks:
    // said now, not by every learner after the servers have started.
    recipe.for_world_size(plan.learner_ranks).with_context(|| {
        format!(
            "the recipe with {} learner rank(s) (--learner-ranks / topology.learner_ranks \
             change it)",
            plan.learner_ranks
        )
    })?;
    Ok(Job {
        plan,
        node_rank,
        key,
        model_to_make,
        notes,
        progress: recipe.log.progress,
    })
}

/// Cores of this node for the learners' compute threads: Slurm's allocation
/// when under Slurm, else the machine's; 0 (leave thread counts alone) when
/// the user set `RAYON_NUM_THREADS` themselves.
fn cpus_per_node() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return 0;
    }
    std::env::var("SLURM_CPUS_ON_NODE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(0, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn node_addresses_from_the_variable_or_dns() {
        let n = names(&["node1", "node2"]);
        let (nodes, _) = node_addrs(&n, Some("127.0.0.1"), |_| false).unwrap();
        assert!(nodes.iter().all(|n| n.addr == "127.0.0.1"));
        let (nodes, _) = node_addrs(&n, Some("10.0.0.1,10.0.0.2"), |_| false).unwrap();
        assert_eq!(nodes[1].addr, "10.0.0.2");
        let (nodes, _) = node_addrs(&n, Some("node2=b,node1=a"), |_| false).unwrap();
        assert_eq!((nodes[0].addr.as_str(), nodes[1].addr.as_str()), ("a", "b"));
        assert!(node_addrs(&n, Some("node1=a"), |_| false).is_err());
        assert!(node_addrs(&n, Some("a,b,c"), |_| false).is_err());
        let (nodes, _) = node_addrs(&n, None, |_| true).unwrap();
        assert_eq!(nodes[0].addr, "node1");
        let e = node_addrs(&n, None, |_| false).unwrap_err();
        assert!(e.contains(NODE_ADDRS_VAR), "{e}");
    }

    #[test]
    fn ports_from_flags_job_id_or_free() {
        let p = choose_ports(2, true, Some(7), None, None, None).unwrap();
        let b = 20000 + 7 * PORT_BLOCK;
        assert_eq!(p.master, b);
        assert_eq!(
            p.rollout[1],
            RolloutPorts {
                http: b + 3,
                grpc: b + 4
            }
        );
        // Same job, same ports on every node.
        assert_eq!(p, choose_ports(2, true, Some(7), None, None, None).unwrap());
        assert!(choose_ports(1, true, None, None, None, None).is_err());
        let p = choose_ports(2, true, None, Some(8000), Some(50051), Some(29500)).unwrap();
        assert_eq!(
            p.rollout[1],
            RolloutPorts {
                http: 8001,
                grpc: 50052
            }
        );
        assert_eq!(p.master, 29500);
        let p = choose_ports(2, false, None, None, None, None).unwrap();
        let mut all = vec![p.master];
        all.extend(p.rollout.iter().flat_map(|r| [r.http, r.grpc]));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5);
        // Below the ephemeral range, where no bind to port 0 lands.
        if ephemeral_low() > 11000 {
            assert!(
                all.iter().all(|&p| (10000..ephemeral_low()).contains(&p)),
                "{all:?}"
            );
        }
        assert!(choose_ports(1, false, None, Some(65535), None, None).is_ok());
        assert!(choose_ports(2, false, None, Some(65535), None, None).is_err());
    }

    /// Every learner command line the plan makes must be a valid recipe for
    /// the learner: the launcher and the recipe parser agree on the keys.
    #[test]
    fn learner_command_lines_are_valid_recipes() {
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/demo.yaml");
        let out = tempfile::tempdir().unwrap();
        let args = demo_args(out.path(), "train.max_steps=3");
        let job = prepare(&args).unwrap();
        assert_eq!(job.plan.learner_ranks, 2);
        assert!(job.model_to_make.is_some(), "demo.yaml names a preset");
        for p in job
            .plan
            .processes
            .iter()
            .filter(|p| p.role == Role::Learner)
        {
            assert_eq!(&p.args[..3], ["train", "--config", config]);
            let overrides: Vec<&String> = p.args[3..].iter().collect();
            let recipe = Recipe::load(Path::new(config), &overrides)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(recipe.train.max_steps, 3);
            assert_eq!(recipe.rollout.endpoints, job.plan.rollout_endpoints);
            assert_eq!(
                recipe.rollout.weight_sync_endpoints,
                job.plan.weight_sync_endpoints
            );
            assert_eq!(
                recipe.rollout.client_tag.as_deref(),
                Some(format!("rank-{}", p.index).as_str())
            );
            assert_eq!(recipe.model.path, Some(out.path().join("model")));
            assert_eq!(recipe.model.preset, None);
            assert_eq!(recipe.checkpoint.output_dir, out.path());
            assert_eq!(recipe.topology.learner_ranks, 2);
        }
    }

    /// The launcher's arguments for configs/demo.yaml on CPU into `out`,
    /// with one override.
    fn demo_args(out: &Path, extra: &str) -> Args {
        use clap::Parser;
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/demo.yaml");
        Args::parse_from([
            "launcher",
            "--config",
            config,
            "--device",
            "cpu",
            "--out",
            &out.display().to_string(),
            extra,
        ])
    }

    /// bf16 on a CPU job is refused before anything starts, naming the key.
    #[test]
    fn bf16_on_the_cpu_is_refused_up_front() {
        let out = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            prepare(&demo_args(out.path(), "model.dtype=bf16"))
                .err()
                .unwrap()
        );
        assert!(
            e.contains("model.dtype") && e.contains("--device cuda"),
            "{e}"
        );
        assert!(prepare(&demo_args(out.path(), "model.dtype=f32")).is_ok());
    }

    /// generation_batch_size that does not split over the planned ranks is
    /// refused before anything starts.
    #[test]
    fn generation_batch_size_is_checked_against_the_planned_ranks() {
        let out = tempfile::tempdir().unwrap();
        let args = |gbs: &str| demo_args(out.path(), &format!("train.generation_batch_size={gbs}"));
        // demo: 64 completions a rank, 2 ranks.
        assert!(prepare(&args("256")).is_ok());
        let e = format!("{:#}", prepare(&args("192")).err().unwrap());
        assert!(
            e.contains("2 learner rank(s)") && e.contains("multiple of 128"),
            "{e}"
        );
        // Dynamic sampling's rounds split over the ranks too.
        let rounds = |n: &str| {
            let mut args = demo_args(
                out.path(),
                &format!("train.dynamic_sampling_batch_prompts={n}"),
            );
            args.overrides.push("train.dynamic_sampling=true".into());
            args
        };
        let e = format!("{:#}", prepare(&rounds("7")).err().unwrap());
        assert!(
            e.contains("train.dynamic_sampling_batch_prompts") && e.contains("multiple of 2"),
            "{e}"
        );
        assert!(prepare(&rounds("8")).is_ok());
    }

    #[test]
    fn rollout_servers_get_the_recipes_dtype_and_memory_share() {
        let out = tempfile::tempdir().unwrap();
        let args = |extra: &str| demo_args(out.path(), extra);
        let job = prepare(&args("rollout.gpu_memory_utilization=0.5")).unwrap();
        let server = &job.plan.processes[0];
        assert_eq!(server.role, Role::RolloutServer);
        let has = |pair: [&str; 2]| server.args.windows(2).any(|w| w == pair);
        assert!(has(["--dtype", "float32"]), "{:?}", server.args);
        assert!(
            has(["--gpu-memory-utilization", "0.5"]),
            "{:?}",
            server.args
        );
        let e = prepare(&args("rollout.gpu_memory_utilization=1.5"))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("rollout.gpu_memory_utilization"), "{e}");
    }

    #[test]
    fn checkpoints_are_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_checkpoint(dir.path()));
        std::fs::create_dir_all(dir.path().join("checkpoints/step_000020")).unwrap();
        assert!(has_checkpoint(dir.path()));
    }
}
