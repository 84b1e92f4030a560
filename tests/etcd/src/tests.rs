//! The harness against real etcd: starts, health, kills, restarts on the same data, and a
//! three-member cluster that loses and regains a member. Pure helpers are tested without
//! etcd.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cluster::PortTaken;
use crate::health::healthy_response;
use crate::{Certificates, Cluster, find_binary, ports, require, require_etcdctl, require_tool};

/// `etcdctl`, next to the etcd binary or on PATH, when etcd runs here; `None` (after saying
/// why) when the test cannot run.
fn mk_etcdctl(test: &str) -> Option<PathBuf> {
    require_etcdctl(test)
}

/// Runs `etcdctl --endpoints {endpoint} {args}` and returns its stdout; panics with its
/// output and the cluster's logs when it fails.
fn etcdctl(bin: &Path, cluster: &Cluster, endpoint: usize, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg(format!("--endpoints={}", cluster.endpoint(endpoint)))
        .args(["--command-timeout=10s", "--dial-timeout=5s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?} on member {endpoint} failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mk_logs(cluster),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mk_logs(cluster: &Cluster) -> String {
    (0..cluster.endpoints().len())
        .map(|i| format!("---- member {i}:\n{}\n", cluster.log(i)))
        .collect()
}

fn get(bin: &Path, cluster: &Cluster, endpoint: usize, key: &str) -> String {
    etcdctl(bin, cluster, endpoint, &["get", key, "--print-value-only"])
        .trim_end()
        .to_string()
}

fn accepts_connections(endpoint: &str) -> bool {
    let port: u16 = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("an endpoint ends in its port");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[test]
fn a_single_member_keeps_its_data_across_a_kill_and_restart() {
    let test = "a_single_member_keeps_its_data_across_a_kill_and_restart";
    let Some(etcdctl_bin) = mk_etcdctl(test) else {
        return;
    };
    let mut cluster = Cluster::start(1);
    assert_eq!(cluster.endpoints(), vec![cluster.endpoint(0)]);
    assert!(cluster.endpoint(0).starts_with("http://127.0.0.1:"));
    assert!(cluster.is_running(0));
    assert!(cluster.is_healthy(0), "{}", cluster.log(0));
    etcdctl(&etcdctl_bin, &cluster, 0, &["put", "k", "v"]);

    cluster.kill(0);
    assert!(!cluster.is_running(0));
    assert!(!cluster.is_healthy(0), "a killed member answers health");

    cluster.restart(0);
    assert!(cluster.is_running(0));
    assert!(cluster.is_healthy(0));
    assert_eq!(
        get(&etcdctl_bin, &cluster, 0, "k"),
        "v",
        "{}",
        mk_logs(&cluster)
    );
    assert_eq!(
        cluster.log(0).matches("==== starting etcd member").count(),
        2,
        "the log spans both starts"
    );
}

#[test]
fn a_three_member_cluster_answers_without_one_member_and_takes_it_back() {
    let test = "a_three_member_cluster_answers_without_one_member_and_takes_it_back";
    let Some(etcdctl_bin) = mk_etcdctl(test) else {
        return;
    };
    let mut cluster = Cluster::start(3);
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    let distinct: std::collections::BTreeSet<&String> = endpoints.iter().collect();
    assert_eq!(distinct.len(), 3, "one endpoint per member: {endpoints:?}");
    etcdctl(&etcdctl_bin, &cluster, 0, &["put", "before", "1"]);

    cluster.kill(0);
    assert!(!cluster.is_running(0));
    assert!(cluster.is_running(1) && cluster.is_running(2));
    assert!(!cluster.is_healthy(0));
    // Member 0 may have been the leader: the others answer once they have elected another.
    cluster.wait_healthy(1);
    cluster.wait_healthy(2);
    etcdctl(&etcdctl_bin, &cluster, 1, &["put", "during", "2"]);
    assert_eq!(get(&etcdctl_bin, &cluster, 2, "before"), "1");
    assert_eq!(get(&etcdctl_bin, &cluster, 2, "during"), "2");

    cluster.restart(0);
    assert!(cluster.is_healthy(0));
    // Written while it was down: it rejoined and caught up.
    assert_eq!(get(&etcdctl_bin, &cluster, 0, "during"), "2");
    assert_eq!(get(&etcdctl_bin, &cluster, 0, "before"), "1");
    let members = etcdctl(&etcdctl_bin, &cluster, 0, &["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
}

#[test]
fn a_whole_cluster_restarts_on_its_data() {
    let test = "a_whole_cluster_restarts_on_its_data";
    let Some(etcdctl_bin) = mk_etcdctl(test) else {
        return;
    };
    let mut cluster = Cluster::start(3);
    etcdctl(&etcdctl_bin, &cluster, 2, &["put", "k", "v"]);

    cluster.kill_all();
    assert!((0..3).all(|i| !cluster.is_running(i)));
    cluster.restart_all();
    assert!((0..3).all(|i| cluster.is_running(i) && cluster.is_healthy(i)));
    assert_eq!(
        get(&etcdctl_bin, &cluster, 1, "k"),
        "v",
        "{}",
        mk_logs(&cluster)
    );
}

#[test]
fn a_member_with_client_tls_admits_only_clients_with_a_certificate_of_its_ca() {
    let test = "a_member_with_client_tls_admits_only_clients_with_a_certificate_of_its_ca";
    let (Some(etcdctl_bin), Some(openssl)) = (mk_etcdctl(test), require_tool(test, "openssl"))
    else {
        return;
    };
    let certs = Certificates::generate(&openssl).expect("certificates");
    let cluster = Cluster::start_with(1, certs.server_options());
    assert!(cluster.endpoint(0).starts_with("https://127.0.0.1:"));
    assert!(cluster.is_healthy(0), "health over the metrics listener");
    let tls = |with_client_cert: bool| {
        let mut command = Command::new(&etcdctl_bin);
        command
            .arg(format!("--endpoints={}", cluster.endpoint(0)))
            .args(["--command-timeout=3s", "--dial-timeout=1s"])
            .arg("--cacert")
            .arg(certs.ca());
        if with_client_cert {
            command
                .arg("--cert")
                .arg(certs.client_cert())
                .arg("--key")
                .arg(certs.client_key());
        }
        command
            .args(["put", "k", "v"])
            .output()
            .expect("run etcdctl")
    };
    let with = tls(true);
    assert!(
        with.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&with.stdout),
        String::from_utf8_lossy(&with.stderr),
        cluster.log(0)
    );
    let without = tls(false);
    assert!(
        !without.status.success(),
        "a client without a certificate was admitted"
    );
    assert!(
        cluster
            .log(0)
            .contains("tls: client didn't provide a certificate"),
        "refused for another reason: {}",
        cluster.log(0)
    );
}

#[test]
fn a_frozen_member_answers_nothing_until_thawed() {
    if require("a_frozen_member_answers_nothing_until_thawed").is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    cluster.freeze(0);
    assert!(cluster.is_running(0), "a frozen member is still there");
    assert!(!cluster.is_healthy(0), "a frozen member answered health");
    cluster.thaw(0);
    cluster.wait_healthy(0);
}

#[test]
fn dropping_the_cluster_stops_every_member() {
    if require("dropping_the_cluster_stops_every_member").is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    let endpoint = cluster.endpoint(0);
    assert!(accepts_connections(&endpoint));
    drop(cluster);
    // The member was killed and waited for, so its listener is closed now.
    assert!(!accepts_connections(&endpoint));
}

#[test]
fn a_port_taken_by_another_process_makes_the_start_retryable() {
    let Some(etcd) = require("a_port_taken_by_another_process_makes_the_start_retryable") else {
        return;
    };
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port");
    let taken_port = taken.local_addr().expect("its port").port();
    let free = ports::free_ports(1);
    match Cluster::try_start(etcd, vec![taken_port, free[0]]) {
        Ok(cluster) => panic!("etcd started on a taken port:\n{}", cluster.log(0)),
        Err(PortTaken { log }) => assert!(log.contains("address already in use"), "{log}"),
    }
}

#[test]
fn an_explicit_binary_is_used_when_it_exists_and_refused_when_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("my-etcd");
    std::fs::write(&bin, "").expect("write a file");
    assert_eq!(
        find_binary("etcd", Some(bin.as_os_str()), None),
        Ok(bin.clone())
    );
    let missing = dir.path().join("missing");
    let err = find_binary("etcd", Some(missing.as_os_str()), None).expect_err("missing binary");
    assert!(
        err.contains("VIPAM_ETCD_BIN") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn the_binary_is_found_on_path_or_named_as_missing() {
    let empty = tempfile::tempdir().expect("temp dir");
    let with = tempfile::tempdir().expect("temp dir");
    std::fs::write(with.path().join("etcd"), "").expect("write a file");
    let path = std::env::join_paths([empty.path(), with.path()]).expect("a PATH");
    assert_eq!(
        find_binary("etcd", None, Some(&path)),
        Ok(with.path().join("etcd"))
    );
    // An empty VIPAM_ETCD_BIN counts as unset.
    assert_eq!(
        find_binary("etcd", Some(&OsString::new()), Some(&path)),
        Ok(with.path().join("etcd"))
    );
    let only_empty = std::env::join_paths([empty.path()]).expect("a PATH");
    let err = find_binary("etcd", None, Some(&only_empty)).expect_err("no etcd");
    assert!(err.contains("no etcd on PATH"), "{err}");
}

#[test]
fn free_ports_are_distinct_and_not_zero() {
    let ports = ports::free_ports(6);
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), 6, "{ports:?}");
    assert!(!ports.contains(&0), "{ports:?}");
}

#[test]
fn health_is_true_only_for_a_200_that_says_so() {
    let ok = "HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"health\":\"true\"}";
    assert!(healthy_response(ok));
    let with_reason = "HTTP/1.1 200 OK\r\n\r\n{\"health\": \"true\", \"reason\": \"\"}";
    assert!(healthy_response(with_reason));
    let unhealthy = "HTTP/1.1 503 Service Unavailable\r\n\r\n{\"health\":\"false\"}";
    assert!(!healthy_response(unhealthy));
    let false_200 = "HTTP/1.1 200 OK\r\n\r\n{\"health\":\"false\"}";
    assert!(!healthy_response(false_200));
    assert!(!healthy_response(""));
    assert!(!healthy_response("HTTP/1.1 200 OK\r\n"));
}
