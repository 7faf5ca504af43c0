//! Named model tensors with Hugging Face names: loaded from memory-mapped
//! safetensors (one file or shards with an index), saved as one safetensors
//! file, or initialised at random from a seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// A tensor's values copied to the host in their own type (f32, bf16 or
/// f16), readable as the little-endian bytes that safetensors and the
/// weight-sync wire carry (`as_ref()`), with no second copy.
#[derive(Debug, Clone)]
pub enum HostValues {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl AsRef<[u8]> for HostValues {
    fn as_ref(&self) -> &[u8] {
        const _: () = assert!(cfg!(target_endian = "little"));
        match self {
            HostValues::F32(v) => bytemuck::cast_slice(v),
            HostValues::BF16(v) => bytemuck::cast_slice(v),
            HostValues::F16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// One device-to-host copy of a tensor's raw values, never a round trip
/// through f32.
pub fn host_values(t: &Tensor) -> Result<HostValues> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => HostValues::F32(flat.to_vec1()?),
        DType::BF16 => HostValues::BF16(flat.to_vec1()?),
        DType::F16 => HostValues::F16(flat.to_vec1()?),
        other => {
            return Err(ModelError::Invalid(format!(
                "raw bytes of a {other:?} tensor: only f32, bf16 and f16 are supported"
            )));
        }
    })
}

pub const SAFETENSORS_FILE: &str = "model.safetensors";
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The parameters of a model, by Hugging Face name. Cloning is cheap: candle
/// tensors share their storage.
#[derive(Clone, Debug, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Where they came from, for error messages ("model.safetensors in DIR").
    location: String,
}

impl Weights {
    pub fn new(tensors: BTreeMap<String, Tensor>) -> Self {
        Weights {
            tensors,
            location: "the given weights".to_string(),
        }
    }

    /// Loads every tensor of a model folder (`model.safetensors`, or the shards
    /// listed in `model.safetensors.index.json`), memory-mapped, converted to
    /// `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Weights::load_files(&weight_files(dir)?, dir, device, dtype)
    }

    /// Loads every tensor of the given safetensors files (`dir`: where they
    /// are, for messages), as [`Weights::load`] does.
    pub fn load_files(
        files: &[PathBuf],
        dir: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for file in files {
            // SAFETY: the file is mapped read-only; Tandem never writes a
            // weight file while it is mapped (saves go to a new file).
            let st =
                unsafe { MmapedSafetensors::new(file) }.map_err(|e| weight_file_error(file, e))?;
            for (name, _) in st.tensors() {
                let tensor = st
                    .load(&name, device)
                    .and_then(|t| t.to_dtype(dtype))
                    .map_err(|e| weight_file_error(file, e))?;
                tensors.insert(name, tensor);
            }
        }
        let location = if files.len() == 1 {
            files[0].display().to_string()
        } else {
            format!("the {} shards in {}", files.len(), dir.display())
        };
        Ok(Weights { tensors, location })
    }

    /// Random weights as transformers initialises a fresh model: normal(0,
    /// `initializer_range`) for matrices and embeddings, zero biases, unit norms.
    /// The same config and seed give the same bytes.
    pub fn random(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let std = cfg
            .raw
            .get("initializer_range")
            .and_then(Value::as_f64)
            .unwrap_or(0.02);
        let normal = Normal::new(0.0f32, std as f32)
            .map_err(|e| ModelError::Invalid(format!("initializer_range {std}: {e}")))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in cfg.tensor_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            tensors.insert(name, tensor);
        }
        Ok(Weights {
            tensors,
            location: format!("random weights (seed {seed})"),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name` with exactly `shape`, or an error naming it.
    pub fn require(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                location: self.location.clone(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                location: self.location.clone(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// The same weights converted to `dtype` (a no-op clone when equal).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        Ok(Weights {
            tensors,
            location: self.location.clone(),
        })
    }

    /// Writes all tensors to one safetensors file, with the `{"format": "pt"}`
    /// metadata transformers expects. Written to a temporary name and renamed,
    /// so that a crash never leaves a half-written file under the real name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("safetensors.tmp");
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        // Tensors must be contiguous for their bytes to be written as-is.
        let contiguous: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(contiguous, metadata, &tmp).map_err(|e| {
            ModelError::WeightFile {
                path: tmp.clone(),
                message: e.to_string(),
            }
        })?;
        // The serializer creates the file owner-only; a model folder is shared
        // (rollout servers, other users of a cluster), as transformers writes it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
    }
}

/// The safetensors files of a model folder, single or sharded.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(SAFETENSORS_INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: index.clone(),
            message: e.to_string(),
        })?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::config(&index, "weight_map", "missing or not an object"))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::config(
                    &index,
                    format!("weight_map.{tensor}"),
                    "expected a file name",
                )
            })?;
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            return Err(ModelError::io(
                missing,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("shard listed in {SAFETENSORS_INDEX_FILE} is missing"),
                ),
            ));
        }
        return Ok(paths);
    }
    let single = dir.join(SAFETENSORS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

fn weight_file_error(path: &Path, e: candle_core::Error) -> ModelError {
    ModelError::WeightFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
