//! The node's one error type, and [`ApiError`]: how any failure is rendered as an HTTP response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bunting_model::Problems;
use serde_json::{json, Value};

/// Everything that can stop the node or a CLI command.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration file or a command-line option is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// The store refused or failed an operation.
    #[error("store: {0}")]
    Store(#[from] bunting_store::StoreError),
    /// A socket or file operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The flagd file given with `--flags` does not validate.
    #[error("flag file {path}: {problems}")]
    FlagFile {
        /// The file as given on the command line.
        path: String,
        /// Every problem found in it.
        problems: Problems,
    },
    /// Something read back from the store did not decode.
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// A CLI request to a node failed or was refused.
    #[error("{0}")]
    Client(String),
}

/// An HTTP error response: a status, a JSON body, and optional extra headers.
///
/// Admin API errors have the body `{"error": CODE, "message": TEXT, ...}`; OFREP errors use the
/// protocol's own shapes (`errorCode` / `errorDetails`) and are built with [`ApiError::raw`].
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An admin API error: `{"error": code, "message": message}`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({"error": code, "message": message.into()}),
            retry_after: None,
        }
    }

    /// An error with a body given whole (OFREP's shapes).
    pub fn raw(status: StatusCode, body: Value) -> Self {
        ApiError {
            status,
            body,
            retry_after: None,
        }
    }

    /// Adds a member to an object body.
    pub fn with(mut self, name: &str, value: Value) -> Self {
        if let Value::Object(map) = &mut self.body {
            map.insert(name.to_owned(), value);
        }
        self
    }

    /// 400 with every validation problem, each with its JSON Pointer.
    pub fn invalid(problems: &Problems) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{} problem(s) found", problems.0.len()),
        )
        .with("problems", problems_json(problems))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// Problems as `[{"pointer": ..., "message": ...}]`.
pub fn problems_json(problems: &Problems) -> Value {
    Value::Array(
        problems
            .0
            .iter()
            .map(|p| json!({"pointer": p.pointer, "message": p.message}))
            .collect(),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
