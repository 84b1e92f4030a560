//! One HTTP/1.1 `GET` over a fresh TCP connection: the request the tests send to the
//! programs' `/healthz`, `/readyz` and `/metrics`, to etcd's `/health` and to Prometheus's
//! API. It asks the server to close the connection, reads the answer to its end within a time
//! limit, and gives the status code and the body (its chunks joined when the server sent it
//! `Transfer-Encoding: chunked`).
//!
//! Nothing the network sends makes it panic: a refused connection, a time limit passed or an
//! answer that is not HTTP is an `Err`, for the caller to assert on or to retry.
//!
//! ```no_run
//! # async fn probe(addr: std::net::SocketAddr) -> std::io::Result<()> {
//! let response = vipam_test_support::http::get(addr, "/readyz").await?;
//! assert_eq!(response.status, 200, "{}", response.body);
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long [`get`] may take, connecting included: a server that accepts but never answers
/// fails the request instead of holding up the test.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A complete answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code: `200` for `HTTP/1.1 200 OK`.
    pub status: u16,
    /// The body, its chunks joined.
    pub body: String,
}

/// `GET path` on `addr`, within [`TIMEOUT`].
#[cfg(feature = "tokio")]
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request(addr, path).as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| timed_out(TIMEOUT))
        .and_then(|raw| raw)
        .map_err(in_request(addr, path))?;
    Response::parse(&raw).map_err(in_request(addr, path))
}

/// `GET path` on `addr` from a thread that may block, within `timeout` to connect and
/// `timeout` for the answer: for code without an async runtime.
pub fn get_blocking(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    exchange_blocking(addr, path, timeout)
        .and_then(|raw| Response::parse(&raw))
        .map_err(in_request(addr, path))
}

fn exchange_blocking(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Vec<u8>> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request(addr, path).as_bytes())?;
    // A read timeout bounds each read; the deadline bounds them all, for a server that
    // trickles its answer.
    let deadline = Instant::now() + timeout;
    let mut raw = Vec::new();
    let mut buf = [0; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out(timeout));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Response {
    /// The response in `raw`, everything the server sent before it closed the connection:
    /// an `InvalidData` error when it is not one complete HTTP/1.x answer.
    pub fn parse(raw: &[u8]) -> io::Result<Response> {
        let end = find(raw, b"\r\n\r\n").ok_or_else(|| {
            invalid(format!(
                "no end of the headers in {:?}",
                String::from_utf8_lossy(raw)
            ))
        })?;
        let (head, rest) = (&raw[..end], &raw[end + 4..]);
        let head = std::str::from_utf8(head).map_err(|e| invalid(format!("headers: {e}")))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/")
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("not an HTTP status line: {status_line:?}")))?;
        let mut chunked = false;
        let mut length = None;
        for (name, value) in lines.filter_map(|line| line.split_once(':')) {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                let n: usize = value
                    .parse()
                    .map_err(|_| invalid(format!("Content-Length {value:?}")))?;
                length = Some(n);
            }
        }
        let body = match (chunked, length) {
            (true, _) => dechunk(rest)?,
            (false, Some(n)) => rest
                .get(..n)
                .ok_or_else(|| {
                    invalid(format!(
                        "a body of {} bytes for Content-Length {n}",
                        rest.len()
                    ))
                })?
                .to_vec(),
            (false, None) => rest.to_vec(),
        };
        let body = String::from_utf8(body).map_err(|e| invalid(format!("body: {e}")))?;
        Ok(Response { status, body })
    }
}

/// The request, asking the server to close the connection after its answer.
fn request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// The data of a chunked body, up to its last (empty) chunk; trailers are dropped.
fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = find(rest, b"\r\n").ok_or_else(|| invalid("a chunk without its size line"))?;
        let line = String::from_utf8_lossy(&rest[..end]);
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| invalid(format!("a chunk size line {line:?}")))?;
        let data = &rest[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| invalid(format!("a chunk of {size} bytes cut short")))?;
        body.extend_from_slice(chunk);
        rest = data
            .get(size..)
            .and_then(|after| after.strip_prefix(b"\r\n"))
            .ok_or_else(|| invalid("a chunk not followed by CRLF"))?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn timed_out(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no complete answer within {limit:?}"),
    )
}

/// Names the request in an error, keeping its kind.
fn in_request(addr: SocketAddr, path: &str) -> impl FnOnce(io::Error) -> io::Error {
    let request = format!("GET {path} on {addr}");
    move |e| io::Error::new(e.kind(), format!("{request}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    use super::*;

    /// A server on 127.0.0.1:0 that answers one connection with `response` and closes it;
    /// the thread gives back the request it read.
    fn mk_server(response: &'static [u8]) -> (SocketAddr, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            while find(&request, b"\r\n\r\n").is_none() {
                let n = conn.read(&mut buf).expect("read the request");
                assert!(n > 0, "the client closed before its request ended");
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(response).expect("write the response");
            String::from_utf8(request).expect("a UTF-8 request")
        });
        (addr, server)
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn get_gives_the_status_and_the_body_and_asks_to_close() {
        let (addr, server) =
            mk_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot ready");
        let response = get(addr, "/readyz").await.expect("get");
        assert_eq!(
            response,
            Response {
                status: 503,
                body: "not ready".into()
            }
        );
        let request = server.join().expect("server thread");
        assert_eq!(
            request,
            format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        );
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn get_joins_the_chunks_of_a_chunked_body() {
        let (addr, server) = mk_server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nvip_\r\n6;ext=1\r\nallocs\r\n0\r\nTrailer: x\r\n\r\n",
        );
        let response = get(addr, "/metrics").await.expect("get");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "vip_allocs");
        server.join().expect("server thread");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn get_of_a_closed_port_is_an_error_naming_the_request() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let err = get(addr, "/healthz").await.expect_err("nothing listens");
        assert!(
            err.to_string()
                .starts_with(&format!("GET /healthz on {addr}: ")),
            "{err}"
        );
    }

    #[test]
    fn get_blocking_gives_the_status_and_the_body() {
        let (addr, server) = mk_server(b"HTTP/1.0 200 OK\r\n\r\n{\"health\":\"true\"}");
        let response = get_blocking(addr, "/health", Duration::from_secs(5)).expect("get");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, r#"{"health":"true"}"#);
        server.join().expect("server thread");
    }

    #[test]
    fn get_blocking_gives_up_on_a_server_that_never_answers() {
        // The kernel accepts the connection into the backlog; nobody ever answers.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        let err = get_blocking(addr, "/health", limit).expect_err("no answer");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < limit * 10, "{:?}", started.elapsed());
    }

    #[test]
    fn an_answer_cut_short_is_invalid_data() {
        for raw in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\nshort",
        ] {
            let err = Response::parse(raw).expect_err("not a complete answer");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
    }
}
