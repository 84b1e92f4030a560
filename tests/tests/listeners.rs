//! The real allocator on two listeners at once: `--listen` (loopback, for
//! the syncer in the same pod) and `--listen-authenticated` (for other
//! tools), where every allocator call, reads included, needs the bearer
//! token.

use std::time::Duration;

use tonic::Code;
use vipam::{
    client::Client,
    v1::{AllocateRequest, ReleaseRequest, WatchEventType, WatchRequest},
};
use vipam_e2e::{Allocator, grpcurl, mk_allocate, run_allocator};
use vipam_test_support::http::{self, Response};

struct Setup {
    _dir: tempfile::TempDir,
    allocator: Allocator,
}

fn mk_allocator() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token file");
    let allocator = Allocator::start(
        &dir.path().join("data"),
        &[
            "--pool",
            "default=10.32.0.0/24",
            "--token-file",
            token_file.to_str().expect("utf-8"),
            "--listen-authenticated",
            "127.0.0.1:0",
        ],
    )
    .expect("start");
    Setup {
        _dir: dir,
        allocator,
    }
}

fn mk_client(url: &str, token: Option<&str>) -> Client {
    vipam_e2e::mk_client(url, token).expect("client")
}

#[tokio::test]
async fn the_authenticated_listener_refuses_calls_without_the_token_and_loopback_does_not() {
    let setup = mk_allocator();
    let a = &setup.allocator;
    let wide = a.authenticated_url().expect("authenticated url");
    // The syncer, on loopback, needs no token.
    let syncer = mk_client(&a.url(), None);
    let web = syncer
        .allocate(mk_allocate("service:default/web"))
        .await
        .expect("loopback allocates without the token");

    // A tool without the token can neither take over nor release it.
    let anonymous = mk_client(&wide, None);
    let wrong = mk_client(&wide, Some("guess"));
    for tool in [&anonymous, &wrong] {
        let err = tool
            .allocate(AllocateRequest {
                address: web.address.clone(),
                ..mk_allocate("tool/thief")
            })
            .await
            .expect_err("no token, no allocate");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = tool
            .release(ReleaseRequest {
                owner: "service:default/web".into(),
                ..Default::default()
            })
            .await
            .expect_err("no token, no release");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = tool
            .release(ReleaseRequest {
                address: web.address.clone(),
                ..Default::default()
            })
            .await
            .expect_err("no token, no release by address");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    // Reads need the token too: Get, List, ListPools and Watch.
    for tool in [&anonymous, &wrong] {
        let err = tool
            .get_owner("service:default/web")
            .await
            .expect_err("no token, no get");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = tool.list_all("", "").await.expect_err("no token, no list");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = tool.list_pools().await.expect_err("no token, no pools");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = tool
            .watch(WatchRequest::default())
            .await
            .expect_err("no token, no watch");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    // With the token, they read.
    let reader = mk_client(&wide, Some("s3cret"));
    assert_eq!(
        reader.get_owner("service:default/web").await.expect("get"),
        Some(web.clone())
    );
    assert_eq!(
        reader.list_all("", "").await.expect("list"),
        std::slice::from_ref(&web)
    );
    let mut stream = reader
        .watch(WatchRequest::default())
        .await
        .expect("watch with the token");
    let first = stream.message().await.expect("ok").expect("event");
    assert_eq!(first.r#type(), WatchEventType::Snapshot);
    assert_eq!(first.allocation, Some(web.clone()));

    // With the token, a tool allocates on the authenticated listener.
    let tool = mk_client(&wide, Some("s3cret"));
    let mine = tool
        .allocate(mk_allocate("tool/vm-1"))
        .await
        .expect("allocate with the token");
    assert_eq!(mine.address, "10.32.0.2");
    assert_eq!(
        syncer.get_owner("service:default/web").await.expect("get"),
        Some(web),
        "the service's allocation is untouched"
    );
}

#[tokio::test]
async fn both_listeners_serve_health_reflection_and_http_endpoints() {
    let setup = mk_allocator();
    let a = &setup.allocator;
    let wide = a.authenticated.expect("authenticated listener");
    for addr in [a.addr, wide] {
        let Response { status, body } = http::get(addr, "/readyz").await.expect("GET /readyz");
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{addr}");
        let Response { status, body } = http::get(addr, "/metrics").await.expect("GET /metrics");
        assert_eq!(status, 200, "{addr}");
        assert!(body.contains("vipam_watchers 0"), "{addr}: {body}");
        let out = grpcurl(&[&addr.to_string(), "list"]).expect("grpcurl");
        let services = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{addr}: {out:?}");
        assert!(services.contains("vipam.v1.Allocator"), "{services}");
        assert!(services.contains("grpc.health.v1.Health"), "{services}");
    }
}

#[test]
fn listen_authenticated_without_a_token_file_is_refused_naming_both_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8");
    let base = [
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--pool",
        "default=10.0.0.0/24",
    ];
    let mut flag = base.to_vec();
    flag.extend(["--listen-authenticated", "127.0.0.1:0"]);
    let env = [("VIPAM_LISTEN_AUTHENTICATED", "127.0.0.1:0")];
    for (args, envs) in [(flag.as_slice(), &[][..]), (&base[..], &env[..])] {
        let out = run_allocator(args, envs, Duration::from_secs(20)).expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {envs:?}: {stderr}");
        assert!(
            stderr.contains("--listen-authenticated") && stderr.contains("--token-file"),
            "{stderr}"
        );
    }
}

#[test]
fn listen_authenticated_is_refused_when_listen_is_not_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token file");
    let data = dir.path().join("data");
    let out = run_allocator(
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen",
            "0.0.0.0:0",
            "--listen-authenticated",
            "127.0.0.1:0",
            "--token-file",
            token_file.to_str().expect("utf-8"),
            "--pool",
            "default=10.0.0.0/24",
        ],
        &[],
        Duration::from_secs(20),
    )
    .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen 0.0.0.0:0") && stderr.contains("loopback"),
        "{stderr}"
    );
}
