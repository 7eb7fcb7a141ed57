//! Error classes of one BigQuery call, and how gRPC statuses and HTTP answers map onto them.

use std::fmt;

/// How a failed call should be handled by the retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Worth retrying: the service is down, overloaded or timed out.
    Transient,
    /// Retrying cannot help: a bad request, a schema mismatch, missing permissions.
    Permanent,
    /// Something we created is gone (an in-memory emulator restarted, a table was dropped
    /// behind our back): retry the whole publication, which recreates what is missing.
    NotFound,
}

/// A failed call: its class and a message for humans.
#[derive(Debug, Clone)]
pub struct CallError {
    pub class: Class,
    pub detail: String,
}

impl CallError {
    pub fn transient(detail: impl Into<String>) -> Self {
        CallError {
            class: Class::Transient,
            detail: detail.into(),
        }
    }
    pub fn permanent(detail: impl Into<String>) -> Self {
        CallError {
            class: Class::Permanent,
            detail: detail.into(),
        }
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        CallError {
            class: Class::NotFound,
            detail: detail.into(),
        }
    }
    /// Prefixes the message with what we were doing.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.detail = format!("{what}: {}", self.detail);
        self
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Classifies a gRPC status from the Storage Write API.
pub fn from_status(status: &tonic::Status) -> CallError {
    use tonic::Code;
    let class = match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Cancelled
        | Code::Unknown => Class::Transient,
        Code::NotFound => Class::NotFound,
        _ => Class::Permanent,
    };
    // Transport failures (connection refused/reset) surface as Unavailable or Unknown
    // with the cause in the message.
    CallError {
        class,
        detail: format!("gRPC {:?}: {}", status.code(), status.message()),
    }
}

/// Classifies a transport-level reqwest error (no HTTP answer at all).
pub fn from_reqwest(err: &reqwest::Error) -> CallError {
    let mut detail = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    if err.is_decode() || err.is_builder() {
        CallError::permanent(detail)
    } else {
        // connect, timeout, reset, body read errors
        CallError::transient(detail)
    }
}

/// Classifies an HTTP answer that was not a success. `reason` is BigQuery's
/// `error.errors[0].reason` when the body had one.
pub fn from_http(status: u16, reason: &str, message: &str) -> CallError {
    let detail = if reason.is_empty() {
        format!("HTTP {status}: {message}")
    } else {
        format!("HTTP {status} ({reason}): {message}")
    };
    let class = match (status, reason) {
        (429, _) | (500..=599, _) => Class::Transient,
        // BigQuery reports rate limits as 403 rateLimitExceeded.
        (403, "rateLimitExceeded" | "backendError") => Class::Transient,
        (404, _) => Class::NotFound,
        _ => Class::Permanent,
    };
    CallError { class, detail }
}

/// Classifies an entry of a job's or query's `errors` list (HTTP 200 with errors).
pub fn from_job_reason(reason: &str, message: &str) -> CallError {
    let detail = format!("{reason}: {message}");
    match reason {
        "backendError" | "rateLimitExceeded" | "internalError" | "timeout" => {
            CallError::transient(detail)
        }
        "notFound" => CallError::not_found(detail),
        _ => CallError::permanent(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes() {
        assert_eq!(
            from_status(&tonic::Status::unavailable("x")).class,
            Class::Transient
        );
        assert_eq!(
            from_status(&tonic::Status::resource_exhausted("x")).class,
            Class::Transient
        );
        assert_eq!(
            from_status(&tonic::Status::invalid_argument("x")).class,
            Class::Permanent
        );
        assert_eq!(
            from_status(&tonic::Status::permission_denied("x")).class,
            Class::Permanent
        );
        assert_eq!(
            from_status(&tonic::Status::not_found("x")).class,
            Class::NotFound
        );
    }

    #[test]
    fn http_statuses() {
        assert_eq!(from_http(503, "", "").class, Class::Transient);
        assert_eq!(from_http(429, "", "").class, Class::Transient);
        assert_eq!(from_http(400, "invalid", "").class, Class::Permanent);
        assert_eq!(from_http(403, "accessDenied", "").class, Class::Permanent);
        assert_eq!(
            from_http(403, "rateLimitExceeded", "").class,
            Class::Transient
        );
        assert_eq!(from_http(404, "notFound", "").class, Class::NotFound);
        assert_eq!(from_job_reason("invalidQuery", "x").class, Class::Permanent);
    }
}
