//! A member's health as etcd reports it on `GET /health`: `{"health":"true"}` when it has a
//! leader, no alarm and answers a read through the quorum.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use vipam_test_support::http::{self, Response};

/// How long one health request may take. etcd answers within about a second even when its
/// read through the quorum fails; the limit is for a process that accepts but never answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the member listening for clients on 127.0.0.1:`port` reports itself healthy.
pub(crate) fn is_healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    http::get_blocking(addr, "/health", REQUEST_TIMEOUT).is_ok_and(|r| says_healthy(&r))
}

/// Whether `response`, as the member sent it, is a 200 whose body says `"health":"true"`.
#[cfg(test)]
pub(crate) fn healthy_response(response: &str) -> bool {
    Response::parse(response.as_bytes()).is_ok_and(|r| says_healthy(&r))
}

/// Whether `response` is a 200 whose body says `"health":"true"`.
fn says_healthy(response: &Response) -> bool {
    let body: String = response
        .body
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    response.status == 200 && body.contains(r#""health":"true""#)
}
