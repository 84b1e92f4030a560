//! A member's health as etcd reports it on `GET /health`: `{"health":"true"}` when it has a
//! leader, no alarm and answers a read through the quorum.
//!
//! A tiny blocking HTTP/1.1 client over a `TcpStream`, enough for this one request.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long one health request may take. etcd answers within about a second even when its
/// read through the quorum fails; the limit is for a process that accepts but never answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the member listening for clients on 127.0.0.1:`port` reports itself healthy.
pub(crate) fn is_healthy(port: u16) -> bool {
    get_health(port).is_some_and(|response| healthy_response(&response))
}

/// The raw response to `GET /health`, or `None` when there was no complete answer.
fn get_health(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    Some(String::from_utf8_lossy(&response).into_owned())
}

/// Whether `response` is a 200 whose body says `"health":"true"`.
pub(crate) fn healthy_response(response: &str) -> bool {
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return false;
    };
    let status_ok = head
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        == Some("200");
    let body: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    status_ok && body.contains(r#""health":"true""#)
}
