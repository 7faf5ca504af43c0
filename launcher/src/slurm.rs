//! The Slurm environment of one launcher task: which node of the job it runs
//! on (`SLURM_NODEID`), the job's nodes (`SLURM_JOB_NODELIST`, compressed
//! host lists such as `node[1-3,5]` expanded as `scontrol show hostnames`
//! does), and the job id and restart count that key a requeued job's files.

use thiserror::Error;

/// A host list that is not in Slurm's compressed form.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("bad Slurm node list {list:?}: {reason}")]
pub struct NodelistError {
    pub list: String,
    pub reason: String,
}

/// Expands a Slurm host list (`SLURM_JOB_NODELIST`) into host names, in order:
/// `node[1-3,5]` -> node1 node2 node3 node5; `gpu-[01-02],cpu7` -> gpu-01
/// gpu-02 cpu7; `r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2. A range keeps the
/// zero padding of its lower bound (`[08-10]` -> 08 09 10).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, NodelistError> {
    let err = |reason: String| NodelistError {
        list: list.to_string(),
        reason,
    };
    let list_trimmed = list.trim();
    if list_trimmed.is_empty() {
        return Err(err("it is empty".into()));
    }
    let mut hosts = Vec::new();
    for item in split_top_level(list_trimmed).map_err(&err)? {
        if item.is_empty() {
            return Err(err("it has an empty entry (two commas in a row?)".into()));
        }
        hosts.extend(expand_item(item).map_err(&err)?);
    }
    Ok(hosts)
}

/// Splits at the commas that are outside brackets.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => {
                if depth > 0 {
                    return Err(format!("nested '[' at byte {i}"));
                }
                depth += 1;
            }
            ']' => {
                if depth == 0 {
                    return Err(format!("']' without '[' at byte {i}"));
                }
                depth -= 1;
            }
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            c if c.is_whitespace() => return Err(format!("whitespace at byte {i}")),
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a '[' is never closed".into());
    }
    items.push(&s[start..]);
    Ok(items)
}

/// One comma-free entry, possibly with several bracket groups (a product).
fn expand_item(item: &str) -> Result<Vec<String>, String> {
    let Some(open) = item.find('[') else {
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or_else(|| format!("'[' in {item:?} is never closed"))?;
    let prefix = &item[..open];
    let inner = &item[open + 1..close];
    let rest = expand_item(&item[close + 1..])?;
    let mut out = Vec::new();
    for part in expand_ranges(inner)? {
        for tail in &rest {
            out.push(format!("{prefix}{part}{tail}"));
        }
    }
    Ok(out)
}

/// `1-3,5,08-10` -> 1 2 3 5 08 09 10.
fn expand_ranges(inner: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for range in inner.split(',') {
        if range.is_empty() {
            return Err(format!("empty range in [{inner}]"));
        }
        let (lo, hi) = match range.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (range, range),
        };
        let number = |s: &str| -> Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{range:?} in [{inner}] is not a number or a range a-b"
                ));
            }
            s.parse::<u64>()
                .map_err(|_| format!("{s:?} in [{inner}] is too large"))
        };
        let (a, b) = (number(lo)?, number(hi)?);
        if a > b {
            return Err(format!("range {range:?} in [{inner}] runs backwards"));
        }
        if b - a >= 100_000 {
            return Err(format!("range {range:?} in [{inner}] has too many hosts"));
        }
        let width = lo.len();
        for n in a..=b {
            out.push(format!("{n:0width$}"));
        }
    }
    Ok(out)
}

/// What a launcher task reads from Slurm's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmEnv {
    /// `SLURM_NODEID`: this task's node, 0-based, in node-list order.
    pub node_rank: usize,
    /// `SLURM_JOB_NODELIST` expanded.
    pub nodes: Vec<String>,
    /// `SLURM_JOB_ID`.
    pub job_id: Option<u64>,
    /// `SLURM_RESTART_COUNT` (0 for a job never requeued).
    pub restart_count: u64,
    /// `SLURM_GPUS_ON_NODE`.
    pub gpus_on_node: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SlurmEnvError {
    #[error(transparent)]
    Nodelist(#[from] NodelistError),
    #[error("{var}={value:?} is not a number")]
    NotANumber { var: &'static str, value: String },
    #[error(
        "SLURM_NODEID={node_rank} but the job has {nodes} node(s) ({list}); \
         run one launcher per node with `srun --ntasks-per-node=1`"
    )]
    NodeRankOutOfRange {
        node_rank: usize,
        nodes: usize,
        list: String,
    },
}

impl SlurmEnv {
    /// Reads the process environment; `None` outside a Slurm job (no
    /// `SLURM_JOB_NODELIST`).
    pub fn from_env() -> Result<Option<SlurmEnv>, SlurmEnvError> {
        SlurmEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Same, from any variable lookup (tests).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<SlurmEnv>, SlurmEnvError> {
        let Some(list) = var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST")) else {
            return Ok(None);
        };
        let nodes = expand_nodelist(&list)?;
        let num = |name: &'static str| -> Result<Option<u64>, SlurmEnvError> {
            match var(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => {
                    v.trim()
                        .parse::<u64>()
                        .map(Some)
                        .map_err(|_| SlurmEnvError::NotANumber {
                            var: name,
                            value: v,
                        })
                }
            }
        };
        let node_rank = num("SLURM_NODEID")?.unwrap_or(0) as usize;
        if node_rank >= nodes.len() {
            return Err(SlurmEnvError::NodeRankOutOfRange {
                node_rank,
                nodes: nodes.len(),
                list,
            });
        }
        Ok(Some(SlurmEnv {
            node_rank,
            nodes,
            job_id: num("SLURM_JOB_ID")?,
            restart_count: num("SLURM_RESTART_COUNT")?.unwrap_or(0),
            gpus_on_node: num("SLURM_GPUS_ON_NODE")?.map(|g| g as usize),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(list: &str) -> Vec<String> {
        match expand_nodelist(list) {
            Ok(v) => v,
            Err(e) => panic!("{list}: {e}"),
        }
    }

    #[test]
    fn plain_names_and_single_host() {
        assert_eq!(ok("node1"), ["node1"]);
        assert_eq!(ok("a,b,c"), ["a", "b", "c"]);
        assert_eq!(ok("localhost"), ["localhost"]);
        assert_eq!(ok("10.0.0.1,10.0.0.2"), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn ranges_and_lists_in_brackets() {
        assert_eq!(ok("node[1-3,5]"), ["node1", "node2", "node3", "node5"]);
        assert_eq!(ok("node[1-2]"), ["node1", "node2"]);
        assert_eq!(ok("node[7]"), ["node7"]);
        assert_eq!(ok("n[9-11]"), ["n9", "n10", "n11"]);
    }

    #[test]
    fn zero_padding_follows_the_lower_bound() {
        assert_eq!(ok("gpu-[01-02],cpu7"), ["gpu-01", "gpu-02", "cpu7"]);
        assert_eq!(ok("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(ok("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(ok("n[001,010]"), ["n001", "n010"]);
    }

    #[test]
    fn several_groups_and_suffixes() {
        assert_eq!(ok("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(ok("node[1-2]-ib"), ["node1-ib", "node2-ib"]);
        assert_eq!(ok("a[1-2],b,c[3,5-6]"), ["a1", "a2", "b", "c3", "c5", "c6"]);
        assert_eq!(ok("[1-2]x"), ["1x", "2x"]);
    }

    #[test]
    fn malformed_lists_are_errors() {
        for bad in [
            "",
            "  ",
            "node[1-3",
            "node1-3]",
            "node[3-1]",
            "node[a-b]",
            "node[]",
            "node[1,,2]",
            "a,,b",
            "a,",
            "node[1-]",
            "node[[1]]",
            "node[1 -2]",
            "node[1-99999999999999999999999]",
            "n[0-1000000]",
        ] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?} should be refused");
        }
        let e = expand_nodelist("node[3-1]").unwrap_err();
        assert!(e.to_string().contains("backwards"), "{e}");
    }

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn slurm_env_from_variables() {
        assert_eq!(SlurmEnv::from_vars(vars(&[])), Ok(None));
        let env = SlurmEnv::from_vars(vars(&[
            ("SLURM_JOB_NODELIST", "node[1-2]"),
            ("SLURM_NODEID", "1"),
            ("SLURM_JOB_ID", "42"),
            ("SLURM_RESTART_COUNT", "2"),
            ("SLURM_GPUS_ON_NODE", "4"),
        ]));
        assert_eq!(
            env,
            Ok(Some(SlurmEnv {
                node_rank: 1,
                nodes: vec!["node1".into(), "node2".into()],
                job_id: Some(42),
                restart_count: 2,
                gpus_on_node: Some(4),
            }))
        );
        // SLURM_NODELIST as a fallback, defaults for the rest.
        let env = SlurmEnv::from_vars(vars(&[("SLURM_NODELIST", "x")]));
        assert_eq!(env.ok().flatten().map(|e| e.node_rank), Some(0));
    }

    #[test]
    fn slurm_env_refusals() {
        let e = SlurmEnv::from_vars(vars(&[
            ("SLURM_JOB_NODELIST", "node[1-2]"),
            ("SLURM_NODEID", "2"),
        ]));
        assert!(matches!(e, Err(SlurmEnvError::NodeRankOutOfRange { .. })));
        let e = SlurmEnv::from_vars(vars(&[
            ("SLURM_JOB_NODELIST", "node1"),
            ("SLURM_NODEID", "x"),
        ]));
        assert!(matches!(e, Err(SlurmEnvError::NotANumber { .. })));
        let e = SlurmEnv::from_vars(vars(&[("SLURM_JOB_NODELIST", "node[1-")]));
        assert!(matches!(e, Err(SlurmEnvError::Nodelist(_))));
    }
}
