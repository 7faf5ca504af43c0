//! The command line and [`run`]: read the recipe, Slurm and the machine,
//! make the plan, then print it (`--dry-run`) or start and supervise this
//! node's part of it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::job::{self, Job};
use crate::supervise::{self, SupervisorOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// GPUs when this node shows any (CUDA_VISIBLE_DEVICES,
    /// SLURM_GPUS_ON_NODE, /dev/nvidia*), else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "launcher",
    version,
    about = "Plans GPUs (or CPU processes) between rollout servers and learner ranks, starts \
             them and supervises them together",
    after_help = "Overrides (`section.key=value`) apply to the recipe the launcher reads and are \
                  passed on to every learner. Under Slurm run one launcher per node \
                  (ops/slurm/train.sbatch does). Environment: TANDEM_BIN_DIR (folder of the \
                  rollout-server and learner binaries; default: the launcher's own folder), \
                  TANDEM_NODE_ADDRS (addresses of the job's nodes when their names do not \
                  resolve: one address for all, or a comma list in node order, or \
                  name=addr pairs). `launcher report RUN_DIR` writes RUN_DIR/report.md and \
                  its SVG curves from the run's logs (done at the end of every run)."
)]
pub struct Args {
    /// The recipe (YAML).
    #[arg(long)]
    pub config: PathBuf,
    /// Nodes of the job (default: Slurm's node list, else topology.nodes, else 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// GPUs per node to use (default: topology.gpus_per_node when set, else
    /// every GPU this node shows).
    #[arg(long)]
    pub gpus_per_node: Option<usize>,
    /// Rollout server replicas (default: topology.dp).
    #[arg(long)]
    pub dp: Option<usize>,
    /// GPUs per rollout server replica (default: topology.tp).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Learner ranks (default: topology.learner_ranks when the recipe writes
    /// it, else every GPU left, or two per learner node on CPU).
    #[arg(long)]
    pub learner_ranks: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// The run folder (default: the recipe's checkpoint.output_dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the plan (a table and JSON) and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also write the plan as JSON to this file (`{node}` becomes the node rank).
    #[arg(long)]
    pub plan_json: Option<String>,
    /// HTTP port of the first rollout server (replica r gets PORT + r).
    /// Default: free ports on one node, a block derived from SLURM_JOB_ID on several.
    #[arg(long)]
    pub port: Option<u16>,
    /// gRPC weight-sync port of the first rollout server (replica r gets PORT + r).
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// The learners' rendezvous port (MASTER_PORT).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds to wait for every rollout server's GET /health.
    #[arg(long, default_value_t = 600)]
    pub health_timeout: u64,
    /// Seconds between SIGTERM and SIGKILL when stopping processes.
    #[arg(long, default_value_t = 10)]
    pub grace_period: u64,
    /// Resume the learners from this checkpoint or run folder.
    #[arg(long, conflicts_with = "auto_resume")]
    pub resume_from: Option<PathBuf>,
    /// Resume from the run folder's latest checkpoint when it has one (what a
    /// requeued Slurm job needs).
    #[arg(long)]
    pub auto_resume: bool,
    /// Resume even where the recipe differs from the checkpoint's in keys
    /// that change training; without it the learners refuse and name them.
    #[arg(long)]
    pub allow_recipe_change: bool,
    /// `section.key=value` recipe overrides.
    #[arg(value_name = "section.key=value")]
    pub overrides: Vec<String>,
}

/// Runs the launcher; the value is the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let job = job::prepare(&args)?;
    if let Some(template) = &args.plan_json {
        let path = PathBuf::from(template.replace("{node}", &job.node_rank.to_string()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string(&job.plan_json())?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing the plan to {}", path.display()))?;
    }
    if args.dry_run {
        print_dry_run(&job)?;
        return Ok(0);
    }
    job.check_startable()?;
    let bin_dir = supervise::bin_dir()?;
    supervise::build_siblings_under_cargo(&bin_dir)?;
    job.make_model_if_missing()?;
    let options = SupervisorOptions {
        node: job.node_rank,
        bin_dir,
        health_timeout: Duration::from_secs(args.health_timeout),
        grace: Duration::from_secs(args.grace_period),
        job_dir: job.job_dir(),
        progress: job.progress,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // One thread: every child is spawned from the main thread, which lives as
    // long as the launcher, so their parent-death signal fires only when the
    // launcher itself dies.
    let code = runtime.block_on(supervise::supervise(&job.plan, &options))?;
    if job.runs_learners_here() && job.plan.out.join("train_log.jsonl").exists() {
        // The report is written after failed runs too: it shows how far they got.
        match crate::report::write_report(&job.plan.out) {
            Ok(paths) => eprintln!("launcher: report: {}", paths.report.display()),
            Err(e) => eprintln!("launcher: could not write the report: {e:#}"),
        }
    }
    if code == 0 && job.runs_learners_here() {
        eprintln!(
            "launcher: done. Run folder: {} (report {}, checkpoints in {}, logs in {})",
            job.plan.out.display(),
            job.plan.out.join("report.md").display(),
            job.plan.out.join("checkpoints").display(),
            job.plan.out.join("logs").display()
        );
    }
    Ok(code)
}

fn print_dry_run(job: &Job) -> anyhow::Result<()> {
    let mut out = String::new();
    out.push_str(&job.plan.table());
    for note in &job.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    if let Err(e) = job.check_startable() {
        out.push_str(&format!("would refuse to start: {e}\n"));
    }
    out.push_str(&format!(
        "this launcher: node {} of {}\n\nplan (JSON):\n",
        job.node_rank,
        job.plan.nodes.len()
    ));
    out.push_str(&serde_json::to_string_pretty(&job.plan_json())?);
    println!("{out}");
    Ok(())
}

/// `launcher report RUN_DIR`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "launcher report",
    about = "Writes RUN_DIR/report.md (recipe, summary table with bootstrap confidence \
             intervals) and SVG curves of reward, eval pass@k, KL and step time"
)]
pub struct ReportArgs {
    /// The run folder (holds manifest.json, train_log.jsonl, eval_log.jsonl).
    pub run_dir: PathBuf,
}

/// Runs `launcher report`; the value is the process exit code.
pub fn run_report(args: ReportArgs) -> anyhow::Result<i32> {
    let paths = crate::report::write_report(&args.run_dir)?;
    for note in &paths.notes {
        eprintln!("launcher: report: note: {note}");
    }
    println!("{}", paths.report.display());
    for svg in &paths.svgs {
        println!("{}", svg.display());
    }
    Ok(0)
}
