//! The real allocator binary: flags and their environment forms, a clean
//! SIGTERM, restarts, and refusing bad configuration with a message that
//! names the flag.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use vipam::v1::{GetRequest, ListPoolsRequest};
use vipam_e2e::{Allocator, mk_allocate, run_allocator};

#[tokio::test]
async fn allocations_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start(dir.path(), &["--pool", "default=10.1.0.0/24"]).expect("start");
    let mut c = a.client().await.expect("connect");
    let first = c
        .allocate(mk_allocate("svc"))
        .await
        .expect("allocate")
        .into_inner();
    let a = a.restart().expect("restart");
    let mut c = a.client().await.expect("connect");
    let again = c
        .get(GetRequest {
            owner: "svc".into(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(again, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Allocator::start(dir.path(), &["--pool", "default=10.2.0.0/16"]).expect("start");
    let base = a.client().await.expect("connect");
    let acks = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let mut c = base.clone();
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut done = HashMap::new();
                for n in 0.. {
                    let owner = format!("t{i}-{n}");
                    match c.allocate(mk_allocate(&owner)).await {
                        Ok(r) => {
                            done.insert(owner, r.into_inner().address);
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                done
            })
        })
        .collect();
    while acks.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = a.terminate(Duration::from_secs(30)).expect("terminate");
    assert!(status.success(), "exit status {status}:\n{}", a.log());
    assert!(
        a.log().contains("stopped; every write is on disk"),
        "{}",
        a.log()
    );
    let mut acknowledged = HashMap::new();
    for t in tasks {
        acknowledged.extend(t.await.expect("task"));
    }
    let a = a.restart().expect("restart");
    let mut c = a.client().await.expect("connect");
    for (owner, address) in &acknowledged {
        let got = c
            .get(GetRequest {
                owner: owner.clone(),
                ..Default::default()
            })
            .await
            .expect("acknowledged allocation")
            .into_inner();
        assert_eq!(&got.address, address);
    }
}

#[test]
fn bad_flag_values_exit_non_zero_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let token = dir.path().join("missing-token");
    let token = token.to_str().expect("utf-8 path");
    // (flags, environment, what the error message must contain)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec!["--pool", "a=10.0.0.0/33"],
            vec![],
            vec!["--pool", "10.0.0.0/33"],
        ),
        (
            vec!["--pool", "a=10.0.0.1-10.0.0.300"],
            vec![],
            vec!["--pool", "10.0.0.300"],
        ),
        (
            vec!["--pool", "a=0.0.0.0/0"],
            vec![],
            vec!["--pool", "0.0.0.0"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--pool", "b=10.0.0.128/25"],
            vec![],
            vec!["--pool", "overlap"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--pool", "a=10.0.1.0/24"],
            vec![],
            vec!["--pool", "twice"],
        ),
        (
            vec!["--listen", "nowhere"],
            vec![],
            vec!["--listen", "nowhere"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--request-timeout", "0s"],
            vec![],
            vec!["--request-timeout"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--request-timeout", "soon"],
            vec![],
            vec!["--request-timeout", "soon"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--max-concurrent-requests", "0"],
            vec![],
            vec!["--max-concurrent-requests"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--default-pool", "b"],
            vec![],
            vec!["--default-pool", "\"b\""],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--reserved", "a=10.9.9.9"],
            vec![],
            vec!["reserved", "10.9.9.9"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--explicit-only", "b"],
            vec![],
            vec!["--explicit-only", "\"b\""],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--token-file", token],
            vec![],
            vec!["--token-file", token],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--watch-history", "0"],
            vec![],
            vec!["--watch-history"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--watch-buffer", "0"],
            vec![],
            vec!["--watch-buffer"],
        ),
        (
            vec!["--pool", "a=10.0.0.0/24", "--max-watchers", "0"],
            vec![],
            vec!["--max-watchers"],
        ),
        (
            vec![
                "--pool",
                "a=10.0.0.0/24",
                "--listen-authenticated",
                "nowhere",
            ],
            vec![],
            vec!["--listen-authenticated", "nowhere"],
        ),
        (vec![], vec![], vec!["--pool", "KEEPALIVED_SERVICE_CIDR"]),
        (
            vec![],
            vec![("KEEPALIVED_SERVICE_CIDR", "10.1.2.0/40")],
            vec!["--keepalived-service-cidr", "10.1.2.0/40"],
        ),
        (
            vec![],
            vec![("VIPAM_POOLS", "a=bogus")],
            vec!["--pool", "bogus"],
        ),
    ];
    for (args, envs, wants) in cases {
        let mut all = vec!["--data-dir", data];
        if !args.contains(&"--listen") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        all.extend(&args);
        let out = run_allocator(&all, &envs, Duration::from_secs(20)).expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {envs:?} was accepted");
        for want in &wants {
            assert!(
                stderr.contains(want),
                "{args:?} {envs:?}: {want:?} not in:\n{stderr}"
            );
        }
    }
}

#[tokio::test]
async fn keepalived_service_cidr_is_the_default_pool_when_no_pool_is_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start_with_env(
        dir.path(),
        &[],
        &[("KEEPALIVED_SERVICE_CIDR", "10.210.38.100/26")],
    )
    .expect("start");
    let mut c = a.client().await.expect("connect");
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.pools.len(), 1);
    assert_eq!(pools.pools[0].name, "default");
    assert_eq!(pools.pools[0].ranges, ["10.210.38.64/26"]);
    assert_eq!(
        c.allocate(mk_allocate("svc"))
            .await
            .expect("allocate")
            .into_inner()
            .address,
        "10.210.38.65"
    );
}

#[tokio::test]
async fn every_setting_works_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let a = Allocator::start_with_env(
        dir.path(),
        &[],
        &[
            ("VIPAM_DATA_DIR", data),
            ("VIPAM_POOLS", "a=10.0.0.0/29;b=10.0.1.0/29"),
            ("VIPAM_DEFAULT_POOL", "b"),
            ("VIPAM_RESERVED", "b=10.0.1.1"),
            ("VIPAM_EXPLICIT_ONLY", "a"),
            ("VIPAM_ALL_ADDRESSES", "a"),
        ],
    )
    .expect("start");
    let mut c = a.client().await.expect("connect");
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    let by_name: HashMap<_, _> = pools.pools.iter().map(|p| (p.name.as_str(), p)).collect();
    assert!(by_name["b"].is_default);
    assert_eq!(by_name["b"].reserved, ["10.0.1.1"]);
    assert!(by_name["a"].explicit_only && by_name["a"].all_addresses);
    assert_eq!(by_name["a"].size, "8");
    assert_eq!(
        c.allocate(mk_allocate("x"))
            .await
            .expect("allocate")
            .into_inner()
            .address,
        "10.0.1.2"
    );
    assert!(
        std::path::Path::new(data).join("db").is_file(),
        "VIPAM_DATA_DIR was not used"
    );
}

#[test]
fn help_lists_an_environment_form_for_every_flag() {
    for command in [&["--help"][..], &["migrate", "--help"]] {
        let out = run_allocator(command, &[], Duration::from_secs(10)).expect("help");
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        // Each flag's block: its line and, when clap puts the help on the
        // next lines (possible values, "- sled: ...", among them), those up
        // to the next flag.
        let mut flags: Vec<String> = Vec::new();
        for line in help.lines().map(str::trim_start) {
            if line.starts_with('-') && !line.starts_with("- ") {
                flags.push(line.to_string());
            } else if let Some(block) = flags.last_mut() {
                block.push(' ');
                block.push_str(line);
            }
        }
        assert!(flags.len() >= 10, "{help}");
        for block in flags
            .iter()
            .filter(|b| !b.starts_with("-h") && !b.starts_with("-V"))
        {
            assert!(
                block.contains("[env: "),
                "{command:?}: no env form: {block}"
            );
        }
    }
}

#[tokio::test]
async fn a_second_allocator_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Allocator::start(dir.path(), &["--pool", "default=10.1.0.0/24"]).expect("start");
    let data = dir.path().to_str().expect("utf-8 path");
    let out = run_allocator(
        &[
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "default=10.1.0.0/24",
        ],
        &[],
        Duration::from_secs(20),
    )
    .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--data-dir"), "{stderr}");
}

#[tokio::test]
async fn http_listen_serves_health_and_metrics_without_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start(
        dir.path(),
        &[
            "--pool",
            "default=10.6.0.0/29",
            "--http-listen",
            "127.0.0.1:0",
        ],
    )
    .expect("start");
    let http = a.http_addr().expect("http_listen in the log");
    for (path, want) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/vipam.v1.Allocator/List", 404),
    ] {
        let response = vipam_test_support::http::get(http, path)
            .await
            .expect("GET");
        assert_eq!(response.status, want, "{path}: {response:?}");
    }
    // gRPC is not served there.
    let mut c = vipam::v1::allocator_client::AllocatorClient::connect(format!("http://{http}"))
        .await
        .expect("connect");
    assert!(c.list_pools(ListPoolsRequest {}).await.is_err());
}
