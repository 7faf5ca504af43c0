//! `--device` and `--dtype` as the command lines and recipes spell them:
//! `auto | cpu | cuda | cuda:N` and vLLM's `auto | bfloat16 | float16 |
//! float32` (plus `bf16`, `f16`, `f32`, `half`, `float`).
//!
//! `auto` picks the first CUDA GPU when this build has CUDA support and a GPU
//! answers, else the CPU; the `auto` dtype is bf16 on CUDA and f32 on the CPU
//! (CPU matmuls in bf16 are slow, and CPU runs are small).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};

/// Whether this binary was built with `--features cuda`.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// A device as the user named it, before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            ModelError::Invalid(format!(
                "device {s:?}: expected auto, cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)"
            ))
        };
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `cuda:N` on a build without CUDA, or on a machine
    /// whose GPU N does not answer, is an error that says what to do.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if CUDA_BUILD {
                    match Device::new_cuda(0) {
                        Ok(d) => return Ok(d),
                        Err(e) => {
                            tracing::info!("device auto: no usable CUDA GPU ({e}); using the CPU")
                        }
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceSpec::Cuda(i) => {
                if !CUDA_BUILD {
                    return Err(ModelError::Invalid(format!(
                        "device cuda:{i}: this binary was built without CUDA support; rebuild with \
                         `cargo build --release --features cuda` (needs nvcc on PATH and \
                         CUDA_COMPUTE_CAP set for the GPU, see the README), or use --device cpu"
                    )));
                }
                Device::new_cuda(i).map_err(|e| {
                    ModelError::Invalid(format!(
                        "device cuda:{i}: cannot open the GPU ({e}); check nvidia-smi and \
                         CUDA_VISIBLE_DEVICES (inside it GPUs are numbered from 0)"
                    ))
                })
            }
        }
    }
}

/// A dtype as the user named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    #[default]
    Auto,
    F32,
    BF16,
    F16,
}

impl FromStr for DTypeSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(DTypeSpec::Auto),
            "float32" | "f32" | "float" => Ok(DTypeSpec::F32),
            "bfloat16" | "bf16" => Ok(DTypeSpec::BF16),
            "float16" | "f16" | "half" => Ok(DTypeSpec::F16),
            other => Err(ModelError::Invalid(format!(
                "dtype {other:?}: expected auto, bfloat16, float16 or float32"
            ))),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeSpec::Auto => "auto",
            DTypeSpec::F32 => "float32",
            DTypeSpec::BF16 => "bfloat16",
            DTypeSpec::F16 => "float16",
        })
    }
}

impl DTypeSpec {
    /// The dtype of weights and activations on `device`: `auto` is bf16 on
    /// CUDA and f32 on the CPU. bf16 on the CPU is refused: candle's CPU
    /// matmul has no bf16 kernel.
    pub fn resolve(self, device: &Device) -> Result<DType> {
        self.check(device.is_cuda())?;
        Ok(match self {
            DTypeSpec::Auto if device.is_cuda() => DType::BF16,
            DTypeSpec::Auto => DType::F32,
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::BF16 => DType::BF16,
            DTypeSpec::F16 => DType::F16,
        })
    }

    /// Whether this dtype can run on CUDA (`cuda`) or on the CPU, before a
    /// device is opened (the launcher asks when it plans).
    pub fn check(self, cuda: bool) -> Result<()> {
        if self == DTypeSpec::BF16 && !cuda {
            return Err(ModelError::Invalid(
                "dtype bfloat16 on the CPU: candle's CPU matmul has no bf16 kernel; use \
                 float32 (or float16) on the CPU, bfloat16 on CUDA"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A short name of an opened device for logs: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Free and total bytes of the GPU behind `device` (`None` on the CPU).
pub fn gpu_memory(device: &Device) -> Result<Option<(usize, usize)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        return ctx
            .mem_get_info()
            .map(Some)
            .map_err(|e| ModelError::Invalid(format!("cannot read GPU memory: {e:?}")));
    }
    let _ = device;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_as_written() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA:0", "cuda:0,1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                e.contains("expected auto, cpu, cuda or cuda:N"),
                "{bad}: {e}"
            );
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn dtype_specs_accept_vllm_names() {
        for (s, want) in [
            ("auto", DTypeSpec::Auto),
            ("bfloat16", DTypeSpec::BF16),
            ("bf16", DTypeSpec::BF16),
            ("half", DTypeSpec::F16),
            ("float16", DTypeSpec::F16),
            ("float", DTypeSpec::F32),
            ("float32", DTypeSpec::F32),
        ] {
            assert_eq!(s.parse::<DTypeSpec>().unwrap(), want, "{s}");
        }
        assert!("int8".parse::<DTypeSpec>().is_err());
        assert_eq!(DTypeSpec::Auto.resolve(&Device::Cpu).unwrap(), DType::F32);
        assert_eq!(DTypeSpec::F16.resolve(&Device::Cpu).unwrap(), DType::F16);
        let e = DTypeSpec::BF16
            .resolve(&Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use float32"), "{e}");
    }

    #[test]
    fn auto_falls_back_to_the_cpu_without_a_gpu() {
        if !CUDA_BUILD {
            assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
            let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert_eq!(gpu_memory(&Device::Cpu).unwrap(), None);
    }
}
