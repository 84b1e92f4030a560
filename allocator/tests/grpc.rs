//! The gRPC surface against an allocator served in-process on 127.0.0.1:0
//! with a real store on a temp dir, through the generated client: every
//! error code, paging, pool reports, the token, health and the HTTP
//! endpoints on the same port.

use std::collections::HashMap;

use tonic::{Code, Request, transport::Channel};
use vipam::v1::{
    AllocateRequest, Family, GetRequest, ListPoolsRequest, ListRequest, ReleaseRequest,
};

mod common;

use common::{Config, mk_allocate, mk_server};

fn mk_explicit(owner: &str, address: &str) -> AllocateRequest {
    AllocateRequest {
        owner: owner.to_string(),
        address: address.to_string(),
        ..Default::default()
    }
}

#[tokio::test]
async fn allocate_hands_out_the_lowest_free_address_then_reuses_released_ones() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    let mut got = Vec::new();
    for owner in ["a", "b", "c"] {
        got.push(
            c.allocate(mk_allocate(owner))
                .await
                .expect("allocate")
                .into_inner()
                .address,
        );
    }
    assert_eq!(got, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    let released = c
        .release(ReleaseRequest {
            owner: "b".into(),
            ..Default::default()
        })
        .await
        .expect("release")
        .into_inner();
    assert!(released.released);
    assert_eq!(
        released.allocation.expect("released allocation").address,
        "10.0.0.2"
    );
    assert_eq!(
        c.allocate(mk_allocate("d"))
            .await
            .expect("allocate")
            .into_inner()
            .address,
        "10.0.0.2"
    );
    server.stop().await;
}

#[tokio::test]
async fn allocate_is_idempotent_per_owner() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    let mut first = mk_allocate("svc");
    first.labels = HashMap::from([("namespace".to_string(), "default".to_string())]);
    let a = c.allocate(first).await.expect("first").into_inner();
    let b = c
        .allocate(mk_allocate("svc"))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(a, b, "same response, labels and revision included");
    let c2 = c
        .allocate(mk_explicit("svc", &a.address))
        .await
        .expect("explicit same address")
        .into_inner();
    assert_eq!(a, c2);
    server.stop().await;
}

#[tokio::test]
async fn owner_holding_another_address_gets_failed_precondition() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    c.allocate(mk_allocate("svc")).await.expect("allocate");
    c.allocate(mk_allocate("other"))
        .await
        .expect("allocate other");
    // 10.0.0.2 is held by "other": the owner rule is checked first.
    let err = c
        .allocate(mk_explicit("svc", "10.0.0.2"))
        .await
        .expect_err("must fail");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("\"svc\"") && err.message().contains("10.0.0.1"),
        "{}",
        err.message()
    );
    let err = c
        .allocate(mk_explicit("svc", "10.0.0.5"))
        .await
        .expect_err("must fail");
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn a_full_pool_is_resource_exhausted_naming_the_pool() {
    let server = mk_server(Config {
        pools: &["tiny=10.0.0.4/31"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    for owner in ["a", "b"] {
        c.allocate(mk_allocate(owner)).await.expect("allocate");
    }
    let err = c.allocate(mk_allocate("c")).await.expect_err("full");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("\"tiny\""), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn an_address_held_by_another_owner_is_already_exists_naming_the_holder() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    c.allocate(mk_explicit("ns/first", "10.0.0.4"))
        .await
        .expect("allocate");
    let err = c
        .allocate(mk_explicit("ns/second", "10.0.0.4"))
        .await
        .expect_err("held");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("\"ns/first\""), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn excluded_addresses_are_failed_precondition_saying_why() {
    let server = mk_server(Config {
        pools: &["default=10.0.0.0/29", "six=fd00::/120"],
        reserved: &["default=10.0.0.3"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    for (address, why) in [
        ("10.0.0.0", "network address"),
        ("10.0.0.7", "broadcast address"),
        ("10.0.0.3", "reserved"),
        ("fd00::", "subnet-router"),
    ] {
        let err = c
            .allocate(mk_explicit("x", address))
            .await
            .expect_err(address);
        assert_eq!(err.code(), Code::FailedPrecondition, "{address}");
        assert!(err.message().contains(why), "{address}: {}", err.message());
    }
    // Lowest-first skips the reserved address too.
    let got: Vec<String> = {
        let mut v = Vec::new();
        for o in ["a", "b", "c"] {
            v.push(
                c.allocate(mk_allocate(o))
                    .await
                    .expect("allocate")
                    .into_inner()
                    .address,
            );
        }
        v
    };
    assert_eq!(got, ["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
    server.stop().await;
}

#[tokio::test]
async fn explicit_addresses_outside_every_pool_are_recorded_and_reported() {
    let server = mk_server(Config {
        allow_outside: &["192.168.0.0/16"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let a = c
        .allocate(mk_explicit("legacy", "192.168.7.7"))
        .await
        .expect("outside")
        .into_inner();
    assert_eq!((a.address.as_str(), a.pool.as_str()), ("192.168.7.7", ""));
    let err = c
        .allocate(mk_explicit("dup", "192.168.7.7"))
        .await
        .expect_err("duplicate refused");
    assert_eq!(err.code(), Code::AlreadyExists);
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.outside_count, 1);
    assert_eq!(pools.outside[0].owner, "legacy");
    server.stop().await;
}

#[tokio::test]
async fn an_explicit_address_with_a_named_pool_must_lie_in_it() {
    let server = mk_server(Config {
        pools: &["a=10.0.0.0/29", "b=10.0.1.0/29"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let mut req = mk_explicit("x", "10.0.1.2");
    req.pool = "a".into();
    let err = c.allocate(req).await.expect_err("outside pool a");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("not in pool \"a\""),
        "{}",
        err.message()
    );
    // Without a pool it goes to the pool that contains it.
    let got = c
        .allocate(mk_explicit("x", "10.0.1.2"))
        .await
        .expect("allocate")
        .into_inner();
    assert_eq!(got.pool, "b");
    server.stop().await;
}

#[tokio::test]
async fn an_explicit_only_pool_refuses_requests_without_an_address() {
    let server = mk_server(Config {
        pools: &["a=10.0.0.0/29", "vip=10.0.1.0/29"],
        explicit_only: &["vip"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let mut req = mk_allocate("x");
    req.pool = "vip".into();
    let err = c.allocate(req).await.expect_err("explicit only");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("\"vip\""), "{}", err.message());
    let mut req = mk_explicit("x", "10.0.1.3");
    req.pool = "vip".into();
    assert_eq!(
        c.allocate(req)
            .await
            .expect("explicit")
            .into_inner()
            .address,
        "10.0.1.3"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_pool_is_not_found() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    let mut req = mk_allocate("x");
    req.pool = "nope".into();
    let err = c.allocate(req).await.expect_err("unknown pool");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());
    let err = c
        .list(ListRequest {
            pool: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown pool");
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn malformed_input_is_invalid_argument_naming_the_field_and_value() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    let long_owner = "o".repeat(300);
    let cases: Vec<(AllocateRequest, &str, &str)> = vec![
        (mk_allocate(""), "owner", "\"\""),
        (mk_allocate(&long_owner), "owner", &long_owner),
        (mk_allocate("bad\nowner"), "owner", "bad\\nowner"),
        (mk_explicit("x", "10.0.0.300"), "address", "10.0.0.300"),
        (mk_explicit("x", "0.0.0.0"), "address", "0.0.0.0"),
        (
            AllocateRequest {
                pool: "Bad!".into(),
                ..mk_allocate("x")
            },
            "pool",
            "Bad!",
        ),
        (
            AllocateRequest {
                family: Family::Ipv6 as i32,
                ..mk_explicit("x", "10.0.0.2")
            },
            "family",
            "IPv6",
        ),
        (
            AllocateRequest {
                family: 42,
                ..mk_allocate("x")
            },
            "family",
            "42",
        ),
        (
            AllocateRequest {
                labels: (0..40)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..mk_allocate("x")
            },
            "labels",
            "40 labels",
        ),
    ];
    for (req, field, value) in cases {
        let err = c.allocate(req).await.expect_err(field);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(field) && err.message().contains(value),
            "{field}/{value}: {}",
            err.message()
        );
    }
    for (req, field) in [
        (
            ListRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let err = c.list(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    let err = c
        .release(ReleaseRequest::default())
        .await
        .expect_err("empty release");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get(GetRequest {
            owner: "a".into(),
            address: "10.0.0.1".into(),
        })
        .await
        .expect_err("both");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing was allocated by any of these.
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.pools[0].allocated, 0);
    server.stop().await;
}

#[tokio::test]
async fn releasing_what_is_not_allocated_is_not_an_error() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    let r = c
        .release(ReleaseRequest {
            owner: "ghost".into(),
            ..Default::default()
        })
        .await
        .expect("release")
        .into_inner();
    assert!(!r.released && r.allocation.is_none());
    let r = c
        .release(ReleaseRequest {
            address: "10.0.0.2".into(),
            ..Default::default()
        })
        .await
        .expect("release")
        .into_inner();
    assert!(!r.released);
    server.stop().await;
}

#[tokio::test]
async fn release_by_address_and_owner_refuses_someone_elses_address() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    c.allocate(mk_allocate("mine")).await.expect("allocate");
    let err = c
        .release(ReleaseRequest {
            owner: "intruder".into(),
            address: "10.0.0.1".into(),
        })
        .await
        .expect_err("someone else's address");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("\"mine\""), "{}", err.message());
    assert_eq!(
        c.get(GetRequest {
            owner: "mine".into(),
            ..Default::default()
        })
        .await
        .expect("still held")
        .into_inner()
        .address,
        "10.0.0.1"
    );
    let r = c
        .release(ReleaseRequest {
            address: "10.0.0.1".into(),
            ..Default::default()
        })
        .await
        .expect("release")
        .into_inner();
    assert!(r.released);
    server.stop().await;
}

#[tokio::test]
async fn get_finds_by_owner_or_address_and_is_not_found_otherwise() {
    let server = mk_server(Config::default()).await;
    let mut c = server.client().await;
    let a = c
        .allocate(mk_allocate("svc"))
        .await
        .expect("allocate")
        .into_inner();
    let by_owner = c
        .get(GetRequest {
            owner: "svc".into(),
            ..Default::default()
        })
        .await
        .expect("by owner")
        .into_inner();
    let by_address = c
        .get(GetRequest {
            address: a.address.clone(),
            ..Default::default()
        })
        .await
        .expect("by address")
        .into_inner();
    assert_eq!(by_owner, a);
    assert_eq!(by_address, a);
    let err = c
        .get(GetRequest {
            owner: "nobody".into(),
            ..Default::default()
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn list_pages_in_address_order_with_pool_and_owner_filters() {
    let server = mk_server(Config {
        pools: &["a=10.0.0.0/24", "b=fd00::/120"],
        allow_outside: &["9.9.9.9/32"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    for i in 0..7 {
        c.allocate(mk_allocate(&format!("team-{i}")))
            .await
            .expect("allocate");
    }
    c.allocate(AllocateRequest {
        pool: "b".into(),
        ..mk_allocate("team-v6")
    })
    .await
    .expect("v6");
    c.allocate(mk_explicit("other", "9.9.9.9"))
        .await
        .expect("outside");
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list(ListRequest {
                page_size: 3,
                page_token: token.clone(),
                owner_prefix: "team-".into(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.allocations.len() <= 3);
        seen.extend(page.allocations.into_iter().map(|a| a.address));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut want: Vec<String> = (1..=7).map(|i| format!("10.0.0.{i}")).collect();
    want.push("fd00::1".into());
    assert_eq!(seen, want);
    let only_b = c
        .list(ListRequest {
            pool: "b".into(),
            ..Default::default()
        })
        .await
        .expect("list b")
        .into_inner();
    assert_eq!(
        only_b
            .allocations
            .iter()
            .map(|a| a.address.as_str())
            .collect::<Vec<_>>(),
        ["fd00::1"]
    );
    let page = c
        .list(ListRequest {
            pool: "a".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .expect("list a")
        .into_inner();
    let rest = c
        .list(ListRequest {
            pool: "a".into(),
            page_size: 5,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("list a page 2")
        .into_inner();
    assert_eq!(rest.allocations.len(), 2);
    assert!(rest.next_page_token.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_pool_with_both_families_hands_out_ipv4_unless_asked_for_ipv6() {
    let server = mk_server(Config {
        pools: &["dual=10.0.0.0/30,fd00::/126"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    assert_eq!(
        c.allocate(mk_allocate("v4"))
            .await
            .expect("v4")
            .into_inner()
            .address,
        "10.0.0.1"
    );
    let six = AllocateRequest {
        family: Family::Ipv6 as i32,
        ..mk_allocate("v6")
    };
    assert_eq!(
        c.allocate(six).await.expect("v6").into_inner().address,
        "fd00::1"
    );
    server.stop().await;
}

#[tokio::test]
async fn list_pools_reports_exact_sizes_of_huge_pools() {
    let server = mk_server(Config {
        pools: &["small=10.0.0.0/29", "big=10.128.0.0/9", "six=fd00::/64"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    c.allocate(AllocateRequest {
        pool: "six".into(),
        ..mk_allocate("x")
    })
    .await
    .expect("allocate");
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    let by_name: HashMap<_, _> = pools.pools.iter().map(|p| (p.name.as_str(), p)).collect();
    assert_eq!(by_name["big"].size, ((1u64 << 23) - 2).to_string());
    assert_eq!(by_name["six"].size, ((1u128 << 64) - 1).to_string());
    assert_eq!(by_name["six"].free, ((1u128 << 64) - 2).to_string());
    assert_eq!(by_name["six"].allocated, 1);
    assert!(by_name["small"].is_default);
    assert_eq!(pools.pools[0].name, "small", "the default pool comes first");
    server.stop().await;
}

#[tokio::test]
async fn mutating_calls_need_the_token_when_one_is_configured() {
    let server = mk_server(Config {
        token: Some("s3cret"),
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let err = c.allocate(mk_allocate("x")).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = Request::new(mk_allocate("x"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(
        c.allocate(wrong).await.expect_err("wrong token").code(),
        Code::Unauthenticated
    );
    let err = c
        .release(ReleaseRequest {
            owner: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Reads need no token.
    c.list(ListRequest::default())
        .await
        .expect("list without token");
    let mut right = Request::new(mk_allocate("x"));
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("header"));
    assert_eq!(
        c.allocate(right)
            .await
            .expect("with token")
            .into_inner()
            .address,
        "10.0.0.1"
    );
    server.stop().await;
}

#[tokio::test]
async fn messages_over_the_size_limit_are_refused_and_change_nothing() {
    let server = mk_server(Config {
        max_message_bytes: 1024,
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let big = AllocateRequest {
        labels: (0..8).map(|i| (format!("k{i}"), "v".repeat(500))).collect(),
        ..mk_allocate("x")
    };
    let err = c.allocate(big).await.expect_err("too big");
    assert_ne!(err.code(), Code::Ok);
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.pools[0].allocated, 0);
    server.stop().await;
}

#[tokio::test]
async fn many_concurrent_allocates_for_one_owner_yield_one_address() {
    let server = mk_server(Config {
        pools: &["default=10.0.0.0/16"],
        ..Default::default()
    })
    .await;
    let c = server.client().await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.allocate(mk_allocate("same"))
                    .await
                    .map(|r| r.into_inner().address)
            })
        })
        .collect();
    let mut addresses = std::collections::BTreeSet::new();
    for t in tasks {
        addresses.insert(t.await.expect("task").expect("allocate"));
    }
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    let pools = c
        .clone()
        .list_pools(ListPoolsRequest {})
        .await
        .expect("pools")
        .into_inner();
    assert_eq!(pools.pools[0].allocated, 1);
    server.stop().await;
}

#[tokio::test]
async fn many_owners_asking_for_one_address_yield_one_winner() {
    let server = mk_server(Config::default()).await;
    let c = server.client().await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.allocate(mk_explicit(&format!("owner-{i}"), "10.0.0.5"))
                    .await
            })
        })
        .collect();
    let (mut won, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(a) => won.push(a.into_inner().owner),
            Err(e) => {
                assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(won.len(), 1);
    assert_eq!(refused, 63);
    let holder = c
        .clone()
        .get(GetRequest {
            address: "10.0.0.5".into(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(holder.owner, won[0]);
    server.stop().await;
}

#[tokio::test]
async fn health_and_http_endpoints_share_the_grpc_port() {
    let server = mk_server(Config::default()).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vipam.v1.Allocator".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let mut c = server.client().await;
    c.allocate(mk_allocate("x")).await.expect("allocate");
    let _ = c.allocate(mk_allocate("")).await;
    assert_eq!(server.http_get("/healthz").await.0, 200);
    assert_eq!(server.http_get("/readyz").await.0, 200);
    let (code, metrics) = server.http_get("/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "vipam_pool_size{pool=\"default\"} 6.0",
        "vipam_pool_allocated{pool=\"default\"} 1.0",
        "vipam_pool_free{pool=\"default\"} 5.0",
        "vipam_grpc_requests_total{method=\"Allocate\",code=\"OK\"} 1",
        "vipam_grpc_requests_total{method=\"Allocate\",code=\"INVALID_ARGUMENT\"} 1",
        "vipam_grpc_request_duration_seconds_count{method=\"Allocate\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_drained_pool_and_addresses_outside_pools_show_in_the_metrics() {
    let server = mk_server(Config {
        pools: &["default=10.0.0.0/29", "drained=10.0.1.0/30"],
        reserved: &["drained=10.0.1.0/30"],
        allow_outside: &["198.51.100.0/24"],
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    c.allocate(mk_explicit("legacy", "198.51.100.7"))
        .await
        .expect("allowed outside");
    let (code, metrics) = server.http_get("/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "vipam_pool_size{pool=\"drained\"} 0.0",
        "vipam_pool_free{pool=\"drained\"} 0.0",
        "vipam_allocations_outside_pools 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    server.stop().await;
}
