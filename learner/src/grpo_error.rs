//! Errors of the GRPO numerics: bad configuration, inputs of the wrong shape
//! or with non-finite values, and candle errors.

/// What went wrong in batching, advantages, losses or the KL controller.
#[derive(Debug, thiserror::Error)]
pub enum GrpoError {
    #[error("grpo config: field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("`{name}` has shape {got:?}, expected {expected}")]
    Shape {
        name: String,
        expected: String,
        got: Vec<usize>,
    },
    #[error("{what} is required when {when}")]
    Missing { what: String, when: String },
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = GrpoError> = std::result::Result<T, E>;
