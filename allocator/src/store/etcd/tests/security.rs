//! Reaching etcd with TLS and client certificates, and as an etcd user
//! with a password file: the right credentials open a working store, the
//! wrong ones a clear error, and the password shows in no error and no log
//! line.

use std::{
    io::Write,
    path::Path,
    process::Command,
    sync::{Mutex, OnceLock, PoisonError},
};

use vipam_test_etcd::{Certificates, Cluster, require, require_etcdctl, require_tool};

use super::Etcd;
use crate::{
    fixtures::ip,
    store::{StoreError, contract::allocate},
};

/// Every log line of this process from the first [`capture_logs`] on.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Appends what the subscriber writes to [`LOGS`].
struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every event of every crate, at every level, to [`LOGS`] (and
/// the `log` records of the crates that use it).
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| Capture)
            .finish()
            .try_init()
            .expect("the only subscriber of this process");
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

#[test]
fn a_store_reaches_etcd_over_tls_with_a_client_certificate() {
    let test = "a_store_reaches_etcd_over_tls_with_a_client_certificate";
    let (Some(_), Some(openssl)) = (require(test), require_tool(test, "openssl")) else {
        return;
    };
    let certs = Certificates::generate(&openssl).expect("certificates");
    let etcd = Etcd::on(Cluster::start_with(1, certs.server_options()));
    let mut settings = etcd.settings();
    assert!(settings.endpoints[0].starts_with("https://"));
    settings.ca_file = Some(certs.ca());
    settings.cert_file = Some(certs.client_cert());
    settings.key_file = Some(certs.client_key());
    let pools = || crate::fixtures::mk_pools(&[super::POOL]);
    let store = etcd.open_with(&settings, pools()).expect("open over TLS");
    let record = allocate(&store, "10.0.0.1", "a");
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(record));
    assert_eq!(store.health(), Ok(()));

    settings.cert_file = None;
    settings.key_file = None;
    let err = etcd
        .open_with(&settings, pools())
        .expect_err("opened without a client certificate");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(text.contains(&settings.endpoints[0]), "names etcd: {text}");
    assert!(text.contains("--etcd-cert-file"), "names the flag: {text}");
    assert!(
        etcd.cluster()
            .log(0)
            .contains("tls: client didn't provide a certificate"),
        "etcd refused for another reason: {text}"
    );
}

/// Runs `etcdctl {args}` against `endpoint`; panics with its output when
/// it fails.
fn etcdctl(bin: &Path, endpoint: &str, args: &[&str]) {
    let out = Command::new(bin)
        .arg(format!("--endpoints={endpoint}"))
        .args(["--command-timeout=10s", "--dial-timeout=5s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {:?}: {}{}",
        args.first(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_store_reaches_etcd_as_a_user_and_never_shows_the_password() {
    let test = "a_store_reaches_etcd_as_a_user_and_never_shows_the_password";
    let Some(etcdctl_bin) = require_etcdctl(test) else {
        return;
    };
    capture_logs();
    let etcd = Etcd::on(Cluster::start(1));
    let endpoint = etcd.cluster().endpoint(0);
    let password = format!("pw-{}-5ecret", std::process::id());
    etcdctl(
        &etcdctl_bin,
        &endpoint,
        &["user", "add", &format!("root:{password}")],
    );
    etcdctl(&etcdctl_bin, &endpoint, &["auth", "enable"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let right = dir.path().join("password");
    std::fs::write(&right, format!("{password}\n")).expect("write the password");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, format!("{password}-not\n")).expect("write a wrong password");
    let pools = || crate::fixtures::mk_pools(&[super::POOL]);

    let mut settings = etcd.settings();
    let refused = etcd
        .open_with(&settings, pools())
        .expect_err("opened without credentials");
    settings.username = Some("root".into());
    settings.password_file = Some(wrong);
    let err = etcd
        .open_with(&settings, pools())
        .expect_err("opened with a wrong password");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(text.contains("authentication failed"), "{text}");

    settings.password_file = Some(right);
    let store = etcd.open_with(&settings, pools()).expect("open as root");
    let record = allocate(&store, "10.0.0.1", "a");
    assert_eq!(store.get(ip("10.0.0.1")).expect("get"), Some(record));
    assert_eq!(store.health(), Ok(()));

    let logs = logs();
    assert!(logs.contains("etcd store opened"), "logs were captured");
    for seen in [
        format!("{refused} {refused:?}"),
        format!("{err} {err:?}"),
        format!("{settings:?} {store:?}"),
        logs,
    ] {
        assert!(!seen.contains(&password), "the password in: {seen}");
    }
}
