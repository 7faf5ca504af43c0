//! Which GPUs this node shows the launcher: `CUDA_VISIBLE_DEVICES` (what
//! Slurm sets for `--gres=gpu:N`), else `SLURM_GPUS_ON_NODE`, else the
//! `/dev/nvidiaN` device files. None found means CPU under `--device auto`.

use std::path::Path;

/// The GPUs found and where the list came from (shown by `--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibleGpus {
    /// Ids as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs).
    pub ids: Vec<String>,
    pub source: &'static str,
}

/// Reads the GPUs visible to this process.
pub fn visible_gpus() -> VisibleGpus {
    detect(
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        std::env::var("SLURM_GPUS_ON_NODE").ok().as_deref(),
        Path::new("/dev"),
    )
}

/// Pure part of [`visible_gpus`].
pub fn detect(
    cuda_visible_devices: Option<&str>,
    slurm_gpus_on_node: Option<&str>,
    dev: &Path,
) -> VisibleGpus {
    if let Some(list) = cuda_visible_devices {
        // CUDA's rule: "" or an invalid first id hides every GPU.
        let ids: Vec<String> = list
            .split(',')
            .map(str::trim)
            .take_while(|s| !s.is_empty() && !s.starts_with('-'))
            .map(str::to_string)
            .collect();
        return VisibleGpus {
            ids,
            source: "CUDA_VISIBLE_DEVICES",
        };
    }
    if let Some(n) = slurm_gpus_on_node.and_then(|s| s.trim().parse::<usize>().ok()) {
        return VisibleGpus {
            ids: (0..n).map(|i| i.to_string()).collect(),
            source: "SLURM_GPUS_ON_NODE",
        };
    }
    let mut found: Vec<usize> = std::fs::read_dir(dev)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("nvidia"))
                        .and_then(|n| n.parse::<usize>().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_unstable();
    VisibleGpus {
        ids: found.into_iter().map(|i| i.to_string()).collect(),
        source: "/dev/nvidia*",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_wins() {
        let dir = tempfile::tempdir().unwrap();
        let g = detect(Some("2,3,7"), Some("8"), dir.path());
        assert_eq!(g.ids, ["2", "3", "7"]);
        assert_eq!(g.source, "CUDA_VISIBLE_DEVICES");
        assert!(detect(Some(""), None, dir.path()).ids.is_empty());
        assert!(detect(Some("-1"), None, dir.path()).ids.is_empty());
        assert_eq!(
            detect(Some("GPU-ab12,GPU-cd34"), None, dir.path())
                .ids
                .len(),
            2
        );
    }

    #[test]
    fn slurm_count_then_device_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect(None, Some("2"), dir.path()).ids, ["0", "1"]);
        assert!(detect(None, None, dir.path()).ids.is_empty());
        for name in ["nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm", "null"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let g = detect(None, None, dir.path());
        assert_eq!(g.ids, ["0", "1"]);
        assert_eq!(g.source, "/dev/nvidia*");
    }
}
