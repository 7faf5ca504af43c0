//! TensorBoard event files, for TRL's `report_to: tensorboard`
//! (`log.report_to`): rank 0 writes every number of each train_log and
//! eval_log line as a scalar (`train/reward`, `train/timings/generate`,
//! `eval/pass_at_k/pass@1`...) into `<run>/runs/events.out.tfevents.*`, so
//! `tensorboard --logdir <run>` shows the run's curves as it goes.
//!
//! The format is TensorFlow's record file: each record is its length (u64
//! little-endian), the masked CRC-32C of those 8 bytes, the bytes of an
//! `Event` protocol buffer and their masked CRC-32C. The messages are
//! declared here with prost, with TensorFlow's field numbers.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::Value;

/// `tensorflow.Event` (event.proto): the fields Tandem writes.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The first event of a file: `brain.Event:2`.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "6")]
    pub session_log: Option<SessionLog>,
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorflow.SessionLog`: `START` at a step makes TensorBoard drop what an
/// earlier file logged at that step or later (a resumed run logs it again).
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// 1: START.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const SESSION_START: i32 = 1;

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TensorFlow's masked CRC: stored CRCs of data that holds CRCs stay
/// distinguishable from them.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = CRC32C.checksum(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One record of a TensorFlow record file.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The records of a file, checked: the inverse of [`record`] (for tests and
/// tools; an error names the record that is cut short or corrupt).
pub fn read_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| format!("record {}: cut short in its header", out.len()))?;
        let (len, len_crc) = header.split_at(8);
        if masked_crc(len).to_le_bytes() != len_crc {
            return Err(format!(
                "record {}: the length's CRC does not match",
                out.len()
            ));
        }
        let n = u64::from_le_bytes(len.try_into().unwrap_or_default());
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| (at + 16).checked_add(n))
            .ok_or_else(|| format!("record {}: length {n} is out of range", out.len()))?;
        let body = bytes
            .get(at + 12..end)
            .ok_or_else(|| format!("record {}: cut short in its data", out.len()))?;
        let n = end - at - 16;
        let (data, crc) = body.split_at(n);
        if masked_crc(data).to_le_bytes() != crc {
            return Err(format!(
                "record {}: the data's CRC does not match",
                out.len()
            ));
        }
        out.push(data.to_vec());
        at = end;
    }
    Ok(out)
}

/// The train-log keys whose TRL tag is not their flattened name: TRL's
/// GRPOTrainer logs these as `train/<TRL name>`, so a TensorBoard that
/// shows a TRL run next to a Tandem run lines the curves up.
const TRL_TAGS: &[(&str, &str)] = &[
    ("lr", "learning_rate"),
    ("clip_ratio_low", "clip_ratio/low_mean"),
    ("clip_ratio_high", "clip_ratio/high_mean"),
    ("clip_ratio_region", "clip_ratio/region_mean"),
    (
        "importance_sampling_ratio_mean",
        "sampling/importance_sampling_ratio/mean",
    ),
    (
        "importance_sampling_ratio_min",
        "sampling/importance_sampling_ratio/min",
    ),
    (
        "importance_sampling_ratio_max",
        "sampling/importance_sampling_ratio/max",
    ),
    (
        "sampling_logp_difference_mean",
        "sampling/sampling_logp_difference/mean",
    ),
    (
        "sampling_logp_difference_max",
        "sampling/sampling_logp_difference/max",
    ),
    ("vespo_phi_seq_mean", "vespo/phi_seq_mean"),
];

/// The train-log key whose entries TRL logs at the top (`train/<name>`):
/// the reward functions' `log_metric` values.
const TOP_LEVEL: &str = "reward_metrics";

/// Every number in `v`, flattened to `prefix/key/subkey` tags (booleans as
/// 0/1; strings, nulls and arrays left out); top-level keys with a TRL name
/// of their own ([`TRL_TAGS`]) take it, and [`TOP_LEVEL`]'s entries are
/// tagged `prefix/name`, as TRL tags them.
pub fn scalars(prefix: &str, v: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut walk: Vec<(String, &Value)> = match v {
        Value::Object(m) => m
            .iter()
            .rev()
            .flat_map(|(k, x)| match x {
                Value::Object(entries) if k == TOP_LEVEL => entries
                    .iter()
                    .rev()
                    .map(|(name, x)| (format!("{prefix}/{name}"), x))
                    .collect::<Vec<_>>(),
                _ => {
                    let name = TRL_TAGS
                        .iter()
                        .find(|(ours, _)| ours == k)
                        .map_or(k.as_str(), |(_, trl)| trl);
                    vec![(format!("{prefix}/{name}"), x)]
                }
            })
            .collect(),
        other => vec![(prefix.to_string(), other)],
    };
    while let Some((tag, v)) = walk.pop() {
        match v {
            Value::Number(n) => out.extend(n.as_f64().map(|x| (tag, x))),
            Value::Bool(b) => out.push((tag, f64::from(u8::from(*b)))),
            Value::Object(m) => {
                for (k, x) in m.iter().rev() {
                    walk.push((format!("{tag}/{k}"), x));
                }
            }
            _ => {}
        }
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file.
#[derive(Debug)]
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing). `resumed_at`: the
    /// first step this run will log after a resume, where TensorBoard
    /// forgets what earlier files logged from that step on.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now() as u64,
            std::process::id()
        ));
        let file = File::create(&path)?;
        let mut w = EventWriter { file, path };
        w.write(&Event {
            wall_time: now(),
            file_version: Some("brain.Event:2".into()),
            ..Event::default()
        })?;
        if let Some(step) = resumed_at {
            w.write(&Event {
                wall_time: now(),
                step: step as i64,
                session_log: Some(SessionLog {
                    status: SESSION_START,
                }),
                ..Event::default()
            })?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding every scalar of `values` at `step`, written
    /// through (TensorBoard reads the file as it grows).
    pub fn add_scalars(&mut self, step: u64, values: &[(String, f64)]) -> std::io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary {
                value: values
                    .iter()
                    .map(|(tag, x)| SummaryValue {
                        tag: tag.clone(),
                        simple_value: Some(*x as f32),
                    })
                    .collect(),
            }),
            ..Event::default()
        })
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        self.file.write_all(&record(&event.encode_to_vec()))?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TensorFlow's CRC-32C test vector, and its masking.
    #[test]
    fn crc32c_and_its_mask_match_tensorflow() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        let c: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc(b"123456789"),
            c.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn records_round_trip_and_corruption_is_named() {
        let bytes = [record(b"first"), record(b""), record(&[7u8; 300])].concat();
        let back = read_records(&bytes).unwrap();
        assert_eq!(back, vec![b"first".to_vec(), Vec::new(), vec![7u8; 300]]);
        let mut bad = bytes.clone();
        bad[14] ^= 1;
        assert!(read_records(&bad).unwrap_err().contains("record 0"));
        assert!(
            read_records(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .contains("record 2")
        );
    }

    #[test]
    fn nested_numbers_become_slash_tags() {
        let v = serde_json::json!({"step": 3, "reward": 0.5, "timings": {"generate": 0.1},
                                   "skipped": false, "note": "x", "kl": null, "lr": 1e-3,
                                   "clip_ratio_low": 0.25,
                                   "importance_sampling_ratio_max": 1.5,
                                   "advantages": {"lr": 2.0},
                                   "reward_metrics": {"judge/agreement": 0.75}});
        let mut s = scalars("train", &v);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            s,
            vec![
                ("train/advantages/lr".to_string(), 2.0),
                ("train/clip_ratio/low_mean".to_string(), 0.25),
                ("train/judge/agreement".to_string(), 0.75),
                ("train/learning_rate".to_string(), 1e-3),
                ("train/reward".to_string(), 0.5),
                (
                    "train/sampling/importance_sampling_ratio/max".to_string(),
                    1.5
                ),
                ("train/skipped".to_string(), 0.0),
                ("train/step".to_string(), 3.0),
                ("train/timings/generate".to_string(), 0.1),
            ]
        );
    }
}
