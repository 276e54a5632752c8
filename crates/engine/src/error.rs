//! The engine's one error type.

use crate::resolution::ErrorCode;

/// What can go wrong outside a resolution (a resolution carries its own error code instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The evaluation context was not a JSON object, or a member had a type OpenFeature forbids.
    #[error("invalid evaluation context: {0}")]
    InvalidContext(String),
}

impl EngineError {
    /// The OpenFeature error code a resolution reports for this error.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            EngineError::InvalidContext(_) => ErrorCode::InvalidContext,
        }
    }
}
