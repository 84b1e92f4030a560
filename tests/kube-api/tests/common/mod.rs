//! Helpers shared by the integration tests: a server with short bookmark intervals and a
//! raw HTTP client that shows status codes and bodies exactly as sent.

#![allow(dead_code)]

use std::time::Duration;

use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use vipam_kube_api::{Config, TestServer};

pub async fn mk_server() -> TestServer {
    TestServer::start_with(Config {
        bookmark_interval: Duration::from_millis(200),
        ..Config::default()
    })
    .await
    .expect("test server starts")
}

pub struct Raw {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes_alias::Bytes>>,
}

pub mod bytes_alias {
    pub use axum::body::Bytes;
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn reason(&self) -> &str {
        self.body["reason"].as_str().unwrap_or("")
    }
}

pub fn mk_raw(server: &TestServer) -> Raw {
    Raw {
        base: server.url(),
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Raw {
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let text = body.map(|b| b.to_string()).unwrap_or_default();
        self.send_text(method, path, content_type, &text).await
    }

    pub async fn send_text(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> Reply {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req
            .body(Full::new(bytes_alias::Bytes::from(body.to_owned())))
            .expect("request builds");
        let resp = self.client.request(req).await.expect("request is answered");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("body reads")
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(Method::POST, path, Some("application/json"), Some(body))
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(Method::PUT, path, Some("application/json"), Some(body))
            .await
    }

    pub async fn patch(&self, path: &str, content_type: &str, body: Value) -> Reply {
        self.send(Method::PATCH, path, Some(content_type), Some(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(
            Method::DELETE,
            path,
            Some("application/json"),
            Some(serde_json::json!({})),
        )
        .await
    }

    /// Opens a watch and returns its event lines as they arrive.
    pub async fn watch(&self, path: &str) -> Watch {
        let req = http::Request::builder()
            .method(Method::GET)
            .uri(format!("{}{}", self.base, path))
            .body(Full::new(bytes_alias::Bytes::new()))
            .expect("request builds");
        let resp = self.client.request(req).await.expect("watch is answered");
        Watch {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

pub struct Watch {
    pub status: u16,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or None when the server ended the stream. Fails the test after 10 s.
    pub async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=pos).collect();
                    return Some(serde_json::from_slice(&line).expect("watch line is JSON"));
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await
        .expect("watch event within 10 s")
    }

    /// The next event that is not a BOOKMARK.
    pub async fn next_change(&mut self) -> Option<Value> {
        loop {
            let ev = self.next().await?;
            if ev["type"] != "BOOKMARK" {
                return Some(ev);
            }
        }
    }
}

pub fn cm(name: &str, ns: &str) -> Value {
    serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":name,"namespace":ns},"data":{"k":"v"}})
}

pub fn lb_service(name: &str, ns: &str) -> Value {
    serde_json::json!({"apiVersion":"v1","kind":"Service","metadata":{"name":name,"namespace":ns},"spec":{"type":"LoadBalancer","ports":[{"port":80}]}})
}
