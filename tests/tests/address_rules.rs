//! The allocator's address rules through the real binary: special-purpose
//! addresses, one key per address, explicit addresses outside every pool,
//! pools scoped to owners and per-prefix default pools, pool specs refused at
//! start, and a pool whose every address is reserved.

use std::time::Duration;

use tonic::Code;
use vipam::v1::{AllocateRequest, ListPoolsRequest, allocator_client::AllocatorClient};
use vipam_e2e::{Allocator, grpcurl, run_allocator};

/// An Allocate request; empty strings mean "not given".
fn mk_request(owner: &str, pool: &str, address: &str) -> AllocateRequest {
    AllocateRequest {
        owner: owner.into(),
        pool: pool.into(),
        address: address.into(),
        ..Default::default()
    }
}

/// Runs `grpcurl -d <body> <addr> Allocate` and returns whether it
/// succeeded, its stdout and its stderr.
fn grpcurl_allocate(addr: &str, body: &str) -> (bool, String, String) {
    let out = grpcurl(&["-d", body, addr, "vipam.v1.Allocator/Allocate"]).expect("grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn mk_client(a: &Allocator) -> AllocatorClient<tonic::transport::Channel> {
    a.client().await.expect("connect")
}

/// One address in each refused block, with the block the error must name.
const SPECIAL: [(&str, &str); 12] = [
    ("0.1.2.3", "0.0.0.0/8"),
    ("127.0.0.1", "127.0.0.0/8"),
    ("169.254.169.254", "169.254.0.0/16"),
    ("224.0.0.18", "224.0.0.0/4"),
    ("240.0.0.1", "240.0.0.0/4"),
    ("255.255.255.255", "255.255.255.255/32"),
    ("::", "unspecified"),
    ("::1", "::1/128"),
    ("fe80::1", "fe80::/10"),
    ("ff02::12", "ff00::/8"),
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("::10.0.0.1", "::/96"),
];

#[tokio::test]
async fn every_special_purpose_address_is_invalid_argument_naming_the_value_and_block_even_when_allowed()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start(
        dir.path(),
        &[
            "--pool",
            "a=10.0.0.0/29",
            "--allow-outside-pools",
            "0.0.0.0/0,::/0",
        ],
    )
    .expect("start");
    let mut c = mk_client(&a).await;
    for (address, block) in SPECIAL {
        let err = c
            .allocate(mk_request("svc", "", address))
            .await
            .expect_err(address);
        assert_eq!(err.code(), Code::InvalidArgument, "{address}: {err}");
        let msg = err.message();
        assert!(msg.contains("address"), "{msg}");
        assert!(msg.contains(block), "{address}: {msg}");
    }
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.outside_count, 0, "nothing was allocated");
}

#[test]
fn an_ipv4_mapped_spelling_is_refused_and_the_ipv4_spelling_is_allocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start(dir.path(), &["--pool", "doc=192.0.2.0/24"]).expect("start");
    let addr = a.addr.to_string();
    let (ok, _, err) = grpcurl_allocate(&addr, r#"{"owner": "a", "address": "::ffff:192.0.2.5"}"#);
    assert!(!ok);
    assert!(
        err.contains("Code: InvalidArgument")
            && err.contains("invalid address \"::ffff:192.0.2.5\"")
            && err.contains("ask for 192.0.2.5"),
        "{err}"
    );
    let (ok, stdout, err) = grpcurl_allocate(&addr, r#"{"owner": "b", "address": "192.0.2.5"}"#);
    assert!(ok, "{err}");
    assert!(stdout.contains(r#""address": "192.0.2.5""#), "{stdout}");
}

#[test]
fn pool_specs_overlapping_a_special_purpose_block_are_refused_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    // (flags, environment, what the error message must contain)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec!["--pool", "a=127.0.0.0/24"],
            vec![],
            vec!["--pool", "127.0.0.0/24", "127.0.0.0/8", "loopback"],
        ),
        (
            vec![],
            vec![("VIPAM_POOLS", "a=10.0.0.0/24;b=224.0.0.0/24")],
            vec!["--pool", "224.0.0.0/24", "224.0.0.0/4"],
        ),
        (
            vec![],
            vec![("KEEPALIVED_SERVICE_CIDR", "169.254.0.0/24")],
            vec![
                "KEEPALIVED_SERVICE_CIDR",
                "169.254.0.0/24",
                "169.254.0.0/16",
            ],
        ),
        (
            vec!["--pool", "a=fe80::/64"],
            vec![],
            vec!["--pool", "fe80::/64", "fe80::/10"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--reserved", "a=127.0.0.1"],
            vec![],
            vec!["--reserved", "127.0.0.1", "127.0.0.0/8"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--pool-owners", "b=service:x/"],
            vec![],
            vec!["--pool-owners", "\"b\""],
        ),
        (
            vec![
                "--pool",
                "a=10.0.0.0/24",
                "--default-pool-for",
                "service:x/=b",
            ],
            vec![],
            vec!["--default-pool-for", "\"b\""],
        ),
        (
            vec![
                "--pool",
                "team-a=10.0.0.0/24",
                "--pool-owners",
                "team-a=service:team-a/",
                "--default-pool-for",
                "service:team-b/=team-a",
            ],
            vec![],
            vec!["--default-pool-for", "service:team-b/", "does not admit"],
        ),
    ];
    for (args, envs, wants) in cases {
        for check in [false, true] {
            let mut all = vec!["--data-dir", data, "--listen", "127.0.0.1:0"];
            if check {
                all.push("--check");
            }
            all.extend(&args);
            let out = run_allocator(&all, &envs, Duration::from_secs(20)).expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {envs:?}:\n{stderr}");
            for want in &wants {
                assert!(
                    stderr.contains(want),
                    "{args:?} {envs:?}: {want:?} not in:\n{stderr}"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_address_outside_every_pool_is_refused_until_allowed_and_stays_held_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let strict = Allocator::start(dir.path(), &["--pool", "a=10.0.0.0/29"]).expect("start");
    let err = mk_client(&strict)
        .await
        .allocate(mk_request("legacy", "", "198.51.100.7"))
        .await
        .expect_err("outside");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("198.51.100.7") && err.message().contains("--allow-outside-pools"),
        "{}",
        err.message()
    );
    drop(strict);

    let allowing = Allocator::start(
        dir.path(),
        &[
            "--pool",
            "a=10.0.0.0/29",
            "--allow-outside-pools",
            "198.51.100.0/24",
        ],
    )
    .expect("start allowing");
    let got = mk_client(&allowing)
        .await
        .allocate(mk_request("legacy", "", "198.51.100.7"))
        .await
        .expect("allowed")
        .into_inner();
    assert_eq!(
        (got.address.as_str(), got.pool.as_str()),
        ("198.51.100.7", "")
    );
    drop(allowing);

    // Without the setting again the address stays held, reported and
    // answered to its owner.
    let strict = Allocator::start(dir.path(), &["--pool", "a=10.0.0.0/29"]).expect("restart");
    let mut c = mk_client(&strict).await;
    let again = c
        .allocate(mk_request("legacy", "", "198.51.100.7"))
        .await
        .expect("its owner gets it again")
        .into_inner();
    assert_eq!(again.address, "198.51.100.7");
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.outside_count, 1);
    assert_eq!(pools.outside[0].address, "198.51.100.7");
    let err = c
        .allocate(mk_request("other", "", "198.51.100.8"))
        .await
        .expect_err("still refused for others");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn a_pool_limited_to_a_prefix_refuses_other_owners_and_a_prefix_gets_its_default_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start_with_env(
        dir.path(),
        &[
            "--pool",
            "shared=10.0.0.0/29",
            "--pool",
            "team-a=10.0.1.0/29",
            "--pool-owners",
            "team-a=service:team-a/",
        ],
        &[("VIPAM_DEFAULT_POOL_FOR", "service:team-a/=team-a")],
    )
    .expect("start");
    let mut c = mk_client(&a).await;
    for request in [
        mk_request("service:team-b/web", "team-a", ""),
        mk_request("service:team-b/web", "", "10.0.1.3"),
    ] {
        let err = c.allocate(request).await.expect_err("team-b refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
        assert!(
            err.message().contains("pool \"team-a\"")
                && err.message().contains("\"service:team-b/web\""),
            "{}",
            err.message()
        );
    }
    let admitted = c
        .allocate(mk_request("service:team-a/web", "team-a", ""))
        .await
        .expect("team-a admitted")
        .into_inner();
    assert_eq!(admitted.address, "10.0.1.1");
    let by_default = c
        .allocate(mk_request("service:team-a/api", "", ""))
        .await
        .expect("team-a default pool")
        .into_inner();
    assert_eq!(
        (by_default.address.as_str(), by_default.pool.as_str()),
        ("10.0.1.2", "team-a")
    );
    let others = c
        .allocate(mk_request("service:team-b/web", "", ""))
        .await
        .expect("the default pool admits every owner")
        .into_inner();
    assert_eq!(others.pool, "shared");
}

#[tokio::test]
async fn a_pool_whose_every_address_is_reserved_starts_and_is_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start(
        dir.path(),
        &[
            "--pool",
            "open=10.0.0.0/29",
            "--pool",
            "drained=10.0.1.0/30",
            "--reserved",
            "drained=10.0.1.0/30",
        ],
    )
    .expect("a drained pool does not stop the allocator");
    let mut c = mk_client(&a).await;
    let err = c
        .allocate(mk_request("svc", "drained", ""))
        .await
        .expect_err("drained");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("\"drained\""), "{}", err.message());
    c.allocate(mk_request("svc", "open", ""))
        .await
        .expect("the other pool serves");
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    let drained = pools
        .pools
        .iter()
        .find(|p| p.name == "drained")
        .expect("drained listed");
    assert_eq!(drained.size, "0");
    assert!(
        a.log().contains("every address of the pool is reserved") && a.log().contains("drained"),
        "{}",
        a.log()
    );
}

#[tokio::test]
async fn an_address_in_use_outside_every_pool_is_adopted_only_with_adopt_and_a_credential_for_every_pool()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = tempfile::tempdir().expect("tempdir");
    let client = |name: &str, token: &str, owners: &str, pools: &str| {
        let file = tokens.path().join(name);
        std::fs::write(&file, token).expect("token");
        format!(
            "name={name},token-file={},owners={owners},pools={pools}",
            file.display()
        )
    };
    let syncer = client("syncer", "adopt-syncer-token-9a7b", "service:", "*");
    let tool = client("tool", "adopt-tool-token-5e1c", "vm:", "a");
    let a = Allocator::start(
        dir.path(),
        &[
            "--pool",
            "a=10.0.0.0/29",
            "--client",
            &syncer,
            "--client",
            &tool,
        ],
    )
    .expect("start");
    let addr = a.addr.to_string();
    let as_syncer = |body: &str| {
        let out = grpcurl(&[
            "-H",
            "authorization: Bearer adopt-syncer-token-9a7b",
            "-d",
            body,
            &addr,
            "vipam.v1.Allocator/Allocate",
        ])
        .expect("grpcurl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Without adopt the rule holds; with it, what is in use is recorded,
    // outside every pool, and reported as such.
    let (ok, _, stderr) = as_syncer(r#"{"owner": "service:shop/web", "address": "198.51.100.7"}"#);
    assert!(!ok && stderr.contains("FailedPrecondition"), "{stderr}");
    let (ok, stdout, stderr) =
        as_syncer(r#"{"owner": "service:shop/web", "address": "198.51.100.7", "adopt": true}"#);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(r#""address": "198.51.100.7""#) && !stdout.contains(r#""pool""#),
        "{stdout}"
    );
    let pools = mk_client(&a)
        .await
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.outside_count, 1);

    // Adopt waives nothing else: special-purpose addresses stay refused, and
    // adopt needs an address.
    let (ok, _, stderr) =
        as_syncer(r#"{"owner": "service:shop/lo", "address": "127.0.0.1", "adopt": true}"#);
    assert!(!ok && stderr.contains("InvalidArgument"), "{stderr}");
    let (ok, _, stderr) = as_syncer(r#"{"owner": "service:shop/x", "adopt": true}"#);
    assert!(!ok && stderr.contains("adopt"), "{stderr}");

    // A credential that may not draw from every pool cannot adopt outside
    // them.
    let err = vipam_e2e::mk_client(&format!("http://{addr}"), Some("adopt-tool-token-5e1c"))
        .expect("client")
        .allocate(AllocateRequest {
            adopt: true,
            ..mk_request("vm:db", "", "198.51.100.9")
        })
        .await
        .expect_err("outside its pools");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}
