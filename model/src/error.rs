use std::path::PathBuf;

/// Everything that can go wrong in the model crate. Each variant names the
/// file, tensor or field at fault, so that a user can fix it without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error(
        "{path}: `architectures` is {value:?}; Tandem supports Qwen2ForCausalLM, Qwen3ForCausalLM and LlamaForCausalLM"
    )]
    UnsupportedArchitecture { path: PathBuf, value: String },
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: corrupt or unreadable safetensors file: {message}")]
    WeightFile { path: PathBuf, message: String },
    #[error(
        "no weights found in {dir}: expected model.safetensors or model.safetensors.index.json"
    )]
    NoWeights { dir: PathBuf },
    #[error("tensor `{name}` is missing from the weights in {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor `{name}` in {location} has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        location: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ModelError::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
