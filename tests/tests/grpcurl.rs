//! The real `grpcurl` CLI against the real allocator binary, through server
//! reflection only: what an operator types.

use serde_json::Value;
use vipam_e2e::{Allocator, grpcurl};

fn mk_allocator(dir: &std::path::Path) -> Allocator {
    Allocator::start(
        dir,
        &[
            "--pool",
            "default=192.0.2.0/29",
            "--pool",
            "lab=fd00:10::/125",
        ],
    )
    .expect("start allocator")
}

/// Runs grpcurl and returns stdout, failing with its stderr when it fails.
fn ok(args: &[&str]) -> String {
    let out = grpcurl(args).expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json(args: &[&str]) -> Value {
    let text = ok(args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("grpcurl {args:?} printed no JSON ({e}): {text}"))
}

#[test]
fn grpcurl_lists_the_services_through_reflection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = mk_allocator(dir.path());
    let addr = a.addr.to_string();
    let services: Vec<String> = ok(&[&addr, "list"]).lines().map(str::to_string).collect();
    for want in ["vipam.v1.Allocator", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} not in {services:?}"
        );
    }
    let methods = ok(&[&addr, "list", "vipam.v1.Allocator"]);
    for m in ["Allocate", "Release", "Get", "List", "ListPools"] {
        assert!(
            methods
                .lines()
                .any(|l| l == format!("vipam.v1.Allocator.{m}")),
            "{m} not in {methods}"
        );
    }
}

#[test]
fn grpcurl_describe_shows_the_documentation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = mk_allocator(dir.path());
    let addr = a.addr.to_string();
    let service = ok(&[&addr, "describe", "vipam.v1.Allocator"]);
    assert!(
        service.contains(
            "rpc Allocate ( .vipam.v1.AllocateRequest ) returns ( .vipam.v1.Allocation );"
        ),
        "{service}"
    );
    assert!(
        service.contains("RESOURCE_EXHAUSTED   the pool has no free address"),
        "{service}"
    );
    let request = ok(&[&addr, "describe", "vipam.v1.AllocateRequest"]);
    assert!(
        request.contains("// Pool to allocate from. Empty means the default"),
        "{request}"
    );
    assert!(request.contains("string owner = 2;"), "{request}");
}

#[test]
fn grpcurl_allocates_lists_gets_and_releases_with_json_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = mk_allocator(dir.path());
    let addr = a.addr.to_string();
    let allocate = "vipam.v1.Allocator/Allocate";

    let first = json(&[
        "-d",
        r#"{"owner": "demo/web", "labels": {"team": "web"}}"#,
        &addr,
        allocate,
    ]);
    assert_eq!(first["address"], "192.0.2.1");
    assert_eq!(first["pool"], "default");
    assert_eq!(first["labels"]["team"], "web");
    let again = json(&["-d", r#"{"owner": "demo/web"}"#, &addr, allocate]);
    assert_eq!(again, first, "idempotent per owner");
    let six = json(&[
        "-d",
        r#"{"owner": "demo/v6", "pool": "lab"}"#,
        &addr,
        allocate,
    ]);
    assert_eq!(six["address"], "fd00:10::1");
    let explicit = json(&[
        "-d",
        r#"{"owner": "demo/fixed", "address": "192.0.2.6"}"#,
        &addr,
        allocate,
    ]);
    assert_eq!(explicit["address"], "192.0.2.6");

    let list = json(&[
        "-d",
        r#"{"owner_prefix": "demo/"}"#,
        &addr,
        "vipam.v1.Allocator/List",
    ]);
    let addresses: Vec<&str> = list["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .filter_map(|a| a["address"].as_str())
        .collect();
    assert_eq!(addresses, ["192.0.2.1", "192.0.2.6", "fd00:10::1"]);

    let got = json(&[
        "-d",
        r#"{"address": "192.0.2.6"}"#,
        &addr,
        "vipam.v1.Allocator/Get",
    ]);
    assert_eq!(got["owner"], "demo/fixed");

    let pools = json(&[&addr, "vipam.v1.Allocator/ListPools"]);
    assert_eq!(pools["pools"][0]["name"], "default");
    assert_eq!(pools["pools"][0]["size"], "6");
    assert_eq!(pools["pools"][0]["allocated"], "2");

    let released = json(&[
        "-d",
        r#"{"owner": "demo/web"}"#,
        &addr,
        "vipam.v1.Allocator/Release",
    ]);
    assert_eq!(released["released"], true);
    assert_eq!(released["allocation"]["address"], "192.0.2.1");
    let nothing = json(&[
        "-d",
        r#"{"owner": "demo/web"}"#,
        &addr,
        "vipam.v1.Allocator/Release",
    ]);
    assert_eq!(
        nothing,
        serde_json::json!({}),
        "released=false is the default value, printed as an empty object"
    );
}

#[test]
fn grpcurl_shows_error_codes_and_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = mk_allocator(dir.path());
    let addr = a.addr.to_string();
    ok(&[
        "-d",
        r#"{"owner": "a", "address": "192.0.2.3"}"#,
        &addr,
        "vipam.v1.Allocator/Allocate",
    ]);
    let out = grpcurl(&[
        "-d",
        r#"{"owner": "b", "address": "192.0.2.3"}"#,
        &addr,
        "vipam.v1.Allocator/Allocate",
    ])
    .expect("grpcurl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Code: AlreadyExists") && err.contains("address 192.0.2.3 is held by \"a\""),
        "{err}"
    );
    let out = grpcurl(&[
        "-d",
        r#"{"owner": "c", "address": "192.0.2.300"}"#,
        &addr,
        "vipam.v1.Allocator/Allocate",
    ])
    .expect("grpcurl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Code: InvalidArgument") && err.contains("invalid address \"192.0.2.300\""),
        "{err}"
    );
}

#[test]
fn grpcurl_checks_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = mk_allocator(dir.path());
    let addr = a.addr.to_string();
    let health = json(&[&addr, "grpc.health.v1.Health/Check"]);
    assert_eq!(health["status"], "SERVING");
}

#[test]
fn grpcurl_describes_watch_and_streams_its_snapshot_through_reflection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = mk_allocator(dir.path());
    let addr = a.addr.to_string();
    let service = ok(&[&addr, "describe", "vipam.v1.Allocator"]);
    assert!(
        service.contains(
            "rpc Watch ( .vipam.v1.WatchRequest ) returns ( stream .vipam.v1.WatchEvent );"
        ),
        "{service}"
    );
    assert!(service.contains("OUT_OF_RANGE"), "{service}");
    let request = ok(&[&addr, "describe", "vipam.v1.WatchRequest"]);
    assert!(request.contains("uint64 since_revision = 3;"), "{request}");
    let types = ok(&[&addr, "describe", "vipam.v1.WatchEventType"]);
    assert!(
        types.contains("WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE = 2;"),
        "{types}"
    );
    json(&[
        "-d",
        r#"{"owner": "demo/web"}"#,
        &addr,
        "vipam.v1.Allocator/Allocate",
    ]);
    // The stream does not end by itself: grpcurl stops it after a second.
    let out = grpcurl(&[
        "-max-time",
        "1",
        "-d",
        r#"{"since_revision": 0}"#,
        &addr,
        "vipam.v1.Allocator/Watch",
    ])
    .expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DeadlineExceeded"), "{stderr}");
    let snapshot = stdout
        .find(r#""type": "WATCH_EVENT_TYPE_SNAPSHOT""#)
        .expect("a SNAPSHOT event");
    let complete = stdout
        .find(r#""type": "WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE""#)
        .expect("the SNAPSHOT_COMPLETE event");
    assert!(snapshot < complete, "{stdout}");
    assert!(stdout.contains(r#""owner": "demo/web""#), "{stdout}");
    // A revision the allocator never reached.
    let out = grpcurl(&[
        "-d",
        r#"{"since_revision": 99}"#,
        &addr,
        "vipam.v1.Allocator/Watch",
    ])
    .expect("run grpcurl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("OutOfRange"), "{stderr}");
}
