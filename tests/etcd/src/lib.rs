//! Real etcd processes on loopback for tests: a single member or a cluster of several, each
//! member with its own temporary data directory and free loopback ports, killed with SIGKILL
//! and restarted on the same data to test what survives a crash.
//!
//! The binary is `etcd` on `PATH`, or the one env `VIPAM_ETCD_BIN` names. A test that needs
//! it asks [`require`] first, which says loudly when etcd is missing and the test cannot run
//! (and fails instead when env `CI` is set):
//!
//! ```no_run
//! use vipam_test_etcd::{Cluster, require};
//! if require("writes_survive_a_crash").is_none() {
//!     return;
//! }
//! let mut cluster = Cluster::start(3);
//! let endpoints = cluster.endpoints(); // "http://127.0.0.1:PORT", one per member
//! cluster.kill(0);
//! cluster.restart(0);
//! # let _ = endpoints;
//! ```
//!
//! Members may serve clients over TLS with client certificates ([`Cluster::start_with`],
//! [`Certificates`], made with the `openssl` program that [`require_tool`] finds).
//!
//! Std only, no async runtime: the cluster is driven by blocking calls, which a test on any
//! runtime may make before and after its async part.

mod cluster;
mod health;
mod ports;
mod tls;

#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use cluster::{Cluster, Options};
pub use tls::Certificates;
use vipam_test_support::skip::skip_or_fail;

/// The env variable naming the etcd binary to run instead of `etcd` on `PATH`.
pub const ETCD_BIN_ENV: &str = "VIPAM_ETCD_BIN";

/// Whether etcd can run here: `Ok(path)` of a binary that answers `--version`, or `Err` with
/// the reason it cannot.
pub fn etcd_binary() -> Result<PathBuf, String> {
    let path = find_binary(
        "etcd",
        std::env::var_os(ETCD_BIN_ENV).as_deref(),
        std::env::var_os("PATH").as_deref(),
    )?;
    runs(&path)?;
    Ok(path)
}

/// For tests: `Some(path)` of the etcd binary, or, when there is none, prints
/// `SKIPPED {test}: {reason}` to stderr (and appends it to the workspace's
/// `target/skipped-tests.txt`, which the test command prints at the end) and returns `None`.
///
/// # Panics
///
/// When etcd is missing and env `CI` is set: there every test must run.
pub fn require(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Ok(path) => Some(path),
        Err(reason) => {
            skip_or_fail(test, &reason);
            None
        }
    }
}

/// For tests: `Some(path)` of `etcdctl` (next to the etcd binary, or on `PATH`), or, when
/// etcd or etcdctl is missing, says so as [`require`] does and returns `None`.
///
/// # Panics
///
/// When one is missing and env `CI` is set.
pub fn require_etcdctl(test: &str) -> Option<PathBuf> {
    let etcd = require(test)?;
    let mut dirs: Vec<PathBuf> = etcd.parent().map(PathBuf::from).into_iter().collect();
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let found = std::env::join_paths(dirs)
        .map_err(|e| format!("a PATH of the etcd directory and PATH: {e}"))
        .and_then(|path| find_binary("etcdctl", None, Some(&path)));
    found.map_err(|reason| skip_or_fail(test, &reason)).ok()
}

/// For tests: `Some(path)` of the program `name` on `PATH` (such as `openssl`), or, when
/// there is none, says so as [`require`] does and returns `None`.
///
/// # Panics
///
/// When it is missing and env `CI` is set.
pub fn require_tool(test: &str, name: &str) -> Option<PathBuf> {
    find_binary(name, None, std::env::var_os("PATH").as_deref())
        .map_err(|reason| skip_or_fail(test, &reason))
        .ok()
}

/// The binary `name`: the one `explicit` names (which must exist), or else the first file
/// of that name in the directories of `path` (a `PATH` value).
pub(crate) fn find_binary(
    name: &str,
    explicit: Option<&OsStr>,
    path: Option<&OsStr>,
) -> Result<PathBuf, String> {
    if let Some(explicit) = explicit.filter(|e| !e.is_empty()) {
        let explicit = PathBuf::from(explicit);
        return if explicit.is_file() {
            Ok(explicit)
        } else {
            Err(format!(
                "{ETCD_BIN_ENV}={} is not a file",
                explicit.display()
            ))
        };
    }
    std::env::split_paths(path.unwrap_or(&OsString::new()))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!("no {name} on PATH (Debian: apt-get install etcd-server etcd-client)")
        })
}

/// Whether the binary at `path` starts at all (`--version` exits successfully).
fn runs(path: &Path) -> Result<(), String> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} does not run: {e}", path.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{} --version failed ({}) {}",
            path.display(),
            out.status,
            stderr.trim()
        )
        .trim_end()
        .to_string())
    }
}
