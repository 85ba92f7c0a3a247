//! One error shape for every response: `{"error": {"code", "message"}}`.
//!
//! Operations return [`ApiError`]; errors raised by poem itself (bad
//! parameters, missing token, unknown route) are turned into the same shape
//! by [`to_json_error`], installed around the whole app.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use crate::store::StoreError;

/// What went wrong, for people and programs.
#[derive(Object, Debug, Clone)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `not_found`, `bad_request`, `unauthorized`, …
    pub code: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The body of every error response.
#[derive(Object, Debug, Clone)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Json<Self> {
        Json(Self {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        })
    }
}

/// Errors an admin operation may answer with.
#[derive(ApiResponse, Debug)]
pub enum ApiError {
    /// A parameter is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The admin token is missing or wrong.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// No such object.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The request conflicts with the object's state.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The input is well-formed but invalid (e.g. workflow files that do not validate).
    #[oai(status = 422)]
    Invalid(Json<ErrorBody>),
    /// Stored data could not be read back (`store_corrupt`), or another
    /// internal failure (`internal_error`); see the server log.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unreachable or overloaded (`store_unavailable`); retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest(ErrorBody::new("bad_request", message))
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::NotFound(ErrorBody::new(
            "not_found",
            format!("no {what} with id `{id}`"),
        ))
    }
}

impl ApiError {
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict(ErrorBody::new("conflict", message))
    }
}

impl From<StoreError> for ApiError {
    /// Unavailable (the database is down, busy or full: 503, retry) is told
    /// apart from corrupt data or an internal failure (500, with a code).
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "admin API: the database is unavailable");
            return Self::Unavailable(ErrorBody::new(
                "store_unavailable",
                "the database could not be reached; retry later",
            ));
        }
        tracing::error!(error = %e, "admin API store error");
        match e {
            StoreError::Corrupt(detail) => Self::Internal(ErrorBody::new(
                "store_corrupt",
                format!(
                    "stored data could not be read ({detail}); `switchboard rebuild-projections` \
                     rebuilds derived tables, anything else needs an operator: see the server log"
                ),
            )),
            _ => Self::Internal(ErrorBody::new(
                "internal_error",
                "a database statement failed; see the server log",
            )),
        }
    }
}

/// Turns any poem error into the common JSON shape.
pub async fn to_json_error(err: poem::Error) -> Response {
    if err.is_from_response() {
        // An operation's own error response (already in this shape): keep it.
        return err.into_response();
    }
    let status = err.status();
    let (code, message) = match status {
        StatusCode::UNAUTHORIZED => (
            "unauthorized",
            "missing or wrong admin token: send `Authorization: Bearer <token>` with the value of \
             SWITCHBOARD_ADMIN_TOKEN (printed at startup when it is generated)"
                .to_owned(),
        ),
        StatusCode::NOT_FOUND => ("not_found", "no such route".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", err.to_string()),
        StatusCode::BAD_REQUEST => (
            "bad_request",
            super::params::describe(&err).unwrap_or_else(|| err.to_string()),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", err.to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            super::params::describe_media(&err).unwrap_or_else(|| err.to_string()),
        ),
        s if s.is_server_error() => {
            tracing::error!(error = %err, "request failed");
            (
                "internal_error",
                "internal error; see the server log".to_owned(),
            )
        }
        _ => ("error", err.to_string()),
    };
    (status, ErrorBody::new(code, message)).into_response()
}
