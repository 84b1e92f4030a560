//! What tests control and observe from outside the API: the request log, injected
//! failures and added latency.
//!
//! A fault matches a method (or any) and a path pattern where `*` stands for one path
//! segment and `**` for any number of them; it fails the next N matching requests with a
//! chosen status and a proper `Status` body, before the request touches any state.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::Method;

use crate::error::ApiError;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    /// `Content-Type` of the request, if any.
    pub content_type: Option<String>,
    /// Status code of the response.
    pub status: u16,
    /// When the response was ready (for a watch: when it started streaming).
    pub at: Instant,
}

impl LoggedRequest {
    /// Whether the request asks to change state (anything but GET, HEAD, OPTIONS).
    pub fn is_write(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS)
    }

    /// Whether the request is a watch.
    pub fn is_watch(&self) -> bool {
        self.method == Method::GET
            && self.path.split_once('?').is_some_and(|(_, q)| {
                form_urlencoded::parse(q.as_bytes())
                    .any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
            })
    }

    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path
            .split_once('?')
            .map_or(self.path.as_str(), |(p, _)| p)
    }
}

/// An injected failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    method: Option<Method>,
    pattern: String,
    remaining: usize,
    code: u16,
    retry_after: Option<u64>,
    message: Option<String>,
}

impl Fault {
    /// Fails the next matching request with `code` (409, 429, 500, 503, ...), any method, any path.
    pub fn status(code: u16) -> Self {
        Self {
            method: None,
            pattern: "/**".into(),
            remaining: 1,
            code,
            retry_after: None,
            message: None,
        }
    }

    /// Only requests with this method.
    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Only requests whose path (without query) matches; `*` is one segment, `**` any.
    pub fn path(mut self, pattern: impl Into<String>) -> Self {
        self.pattern = pattern.into();
        self
    }

    /// Fail this many matching requests (default 1).
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = n;
        self
    }

    /// Send `Retry-After` (and `details.retryAfterSeconds`).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The message of the Status body.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && glob_match(&self.pattern, path)
    }

    fn error(&self) -> ApiError {
        let message = self.message.clone().unwrap_or_else(|| match self.code {
            409 => "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again".into(),
            429 => "Too many requests, please try again later.".into(),
            503 => "The server is currently unable to handle the request".into(),
            504 => "The server was unable to return a response in the time allotted, but may still be processing the request".into(),
            _ => "Internal error occurred: injected fault".into(),
        });
        ApiError::Injected {
            code: self.code,
            retry_after: self.retry_after,
            message,
        }
    }
}

/// Matches `/`-separated segments; `*` matches one segment (or part of one), `**` any number.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let s: Vec<&str> = path.trim_matches('/').split('/').collect();
    match_segments(&p, &s)
}

fn match_segments(p: &[&str], s: &[&str]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((&"**", rest)) => (0..=s.len()).any(|i| match_segments(rest, &s[i..])),
        Some((first, rest)) => s
            .split_first()
            .is_some_and(|(seg, srest)| match_segment(first, seg) && match_segments(rest, srest)),
    }
}

fn match_segment(p: &str, s: &str) -> bool {
    match p.split_once('*') {
        None => p == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            rest.char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(rest.len()))
                .any(|i| match_segment(tail, &rest[i..]))
        }
    }
}

#[derive(Debug, Default)]
struct State {
    faults: Vec<Fault>,
    latency: Duration,
    log: Vec<LoggedRequest>,
}

/// The request log and the fault table.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

impl Faults {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Adds a fault.
    pub fn add(&self, fault: Fault) {
        self.with(|s| s.faults.push(fault));
    }

    /// Removes every fault and the latency.
    pub fn clear(&self) {
        self.with(|s| {
            s.faults.clear();
            s.latency = Duration::ZERO;
        });
    }

    /// Delays every request by this much before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        self.with(|s| s.latency = latency);
    }

    /// The latency to add.
    pub fn latency(&self) -> Duration {
        self.with(|s| s.latency)
    }

    /// Takes one use of the first fault matching the request.
    pub fn take(&self, method: &Method, path: &str) -> Option<ApiError> {
        self.with(|s| {
            let idx = s
                .faults
                .iter()
                .position(|f| f.remaining > 0 && f.matches(method, path))?;
            let fault = &mut s.faults[idx];
            fault.remaining -= 1;
            let err = fault.error();
            if fault.remaining == 0 {
                s.faults.remove(idx);
            }
            Some(err)
        })
    }

    /// Records a request.
    pub fn log(&self, entry: LoggedRequest) {
        self.with(|s| s.log.push(entry));
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.with(|s| s.log.clone())
    }

    /// Returns and forgets the requests so far.
    pub fn take_requests(&self) -> Vec<LoggedRequest> {
        self.with(|s| std::mem::take(&mut s.log))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_segments() {
        assert!(glob_match(
            "/api/v1/namespaces/*/services/*/status",
            "/api/v1/namespaces/default/services/web/status"
        ));
        assert!(!glob_match(
            "/api/v1/namespaces/*/services/*",
            "/api/v1/namespaces/default/services/web/status"
        ));
        assert!(glob_match(
            "/apis/coordination.k8s.io/**",
            "/apis/coordination.k8s.io/v1/namespaces/x/leases/l"
        ));
        assert!(glob_match(
            "/api/v1/namespaces/*/config*",
            "/api/v1/namespaces/a/configmaps"
        ));
        assert!(glob_match("/**", "/version"));
    }

    #[test]
    fn a_fault_fails_only_the_next_n_matching_requests() {
        let f = Faults::default();
        f.add(
            Fault::status(503)
                .method(Method::PATCH)
                .path("/api/**")
                .times(2),
        );
        assert!(f.take(&Method::GET, "/api/v1/services").is_none());
        assert_eq!(
            f.take(&Method::PATCH, "/api/v1/x").map(|e| e.status_code()),
            Some(503)
        );
        assert!(f.take(&Method::PATCH, "/api/v1/x").is_some());
        assert!(f.take(&Method::PATCH, "/api/v1/x").is_none());
    }
}
