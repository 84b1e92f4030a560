//! Allocator replicas on etcd: the flags that put a real allocator on an
//! etcd cluster, and etcd's own view of an installation's keys, read with
//! the etcd client so a test can hold what the replicas answer against what
//! etcd holds.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use etcd_client::{Client, GetOptions};

use crate::Allocator;

/// The installation prefix the allocator uses when none is given.
pub const DEFAULT_PREFIX: &str = "/vipam/";

/// How long one etcd call of a test may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The flags of a replica on the etcd cluster at `endpoints`, then `extra`.
pub fn replica_args(endpoints: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--store".to_string(),
        "etcd".to_string(),
        "--etcd-endpoints".to_string(),
        endpoints.join(","),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Starts an allocator replica on the etcd cluster at `endpoints` with the
/// `extra` flags (its pools among them), on a free loopback port.
/// `dir` is its `--data-dir`, which the etcd engine does not use.
pub fn start_replica(dir: &Path, endpoints: &[String], extra: &[&str]) -> Result<Allocator> {
    let args = replica_args(endpoints, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Allocator::start(dir, &args)
}

/// A client of the etcd cluster at `endpoints`.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    let connecting = Client::connect(endpoints, None);
    tokio::time::timeout(CALL_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("etcd at {endpoints:?} did not answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to etcd at {endpoints:?}"))
}

/// What etcd holds under one installation's prefix, read at one revision.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `<prefix>a/...`: address → the owner its value names.
    pub addresses: BTreeMap<IpAddr, String>,
    /// `<prefix>o/<owner>`: owner → the address its value names.
    pub owners: BTreeMap<String, IpAddr>,
    /// `<prefix>pools/<name>`: pool → its definition.
    pub pools: BTreeMap<String, String>,
    /// etcd's revision of the read.
    pub revision: i64,
}

impl Keys {
    /// Reads every key under `prefix` with one linearizable read.
    pub async fn read(etcd: &mut Client, prefix: &str) -> Result<Keys> {
        let reading = etcd.get(prefix, Some(GetOptions::new().with_prefix()));
        let response = tokio::time::timeout(CALL_TIMEOUT, reading)
            .await
            .map_err(|_| anyhow!("etcd did not answer a read within {CALL_TIMEOUT:?}"))?
            .context("reading the installation's keys")?;
        let mut keys = Keys {
            revision: response.header().map_or(0, |h| h.revision()),
            ..Keys::default()
        };
        for kv in response.kvs() {
            let key = kv.key_str().context("a key that is not UTF-8")?;
            let value = kv.value_str().context("a value that is not UTF-8")?;
            let rest = key
                .strip_prefix(prefix)
                .ok_or_else(|| anyhow!("{key} is not under {prefix}"))?;
            if let Some(hex) = rest.strip_prefix("a/") {
                let json: serde_json::Value = serde_json::from_str(value)
                    .with_context(|| format!("the value of {key}: {value}"))?;
                let owner = json["owner"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no owner in the value of {key}: {value}"))?;
                keys.addresses.insert(address_of(hex)?, owner.to_string());
            } else if let Some(owner) = rest.strip_prefix("o/") {
                let address = value
                    .parse()
                    .with_context(|| format!("the value of {key}: {value:?}"))?;
                keys.owners.insert(owner.to_string(), address);
            } else if let Some(pool) = rest.strip_prefix("pools/") {
                keys.pools.insert(pool.to_string(), value.to_string());
            } else if rest == "sync" {
                // Written only to mark points in the replicas' watches.
            } else {
                bail!("an unexpected key {key}");
            }
        }
        Ok(keys)
    }

    /// Checks that the address keys and the owner keys say the same: every
    /// address's owner names that address, and every owner's address names
    /// that owner (so no address is held twice and no owner holds two).
    pub fn check_agree(&self) -> Result<()> {
        for (address, owner) in &self.addresses {
            ensure!(
                self.owners.get(owner) == Some(address),
                "address key {address} names owner {owner:?}, whose owner key names {:?}",
                self.owners.get(owner)
            );
        }
        for (owner, address) in &self.owners {
            ensure!(
                self.addresses.get(address) == Some(owner),
                "owner key {owner:?} names {address}, whose address key names {:?}",
                self.addresses.get(address)
            );
        }
        Ok(())
    }
}

/// The address of an address key's end: `4/<8 hex>` or `6/<32 hex>`.
fn address_of(end: &str) -> Result<IpAddr> {
    let bad = || anyhow!("an address key ending in {end:?}");
    let (family, hex) = end.split_once('/').ok_or_else(bad)?;
    let x = u128::from_str_radix(hex, 16).map_err(|_| bad())?;
    match (family, hex.len()) {
        ("4", 8) => Ok(IpAddr::V4(Ipv4Addr::from(
            u32::try_from(x).map_err(|_| bad())?,
        ))),
        ("6", 32) => Ok(IpAddr::V6(Ipv6Addr::from(x))),
        _ => Err(bad()),
    }
}

/// Compacts etcd's history up to `revision`, as `etcdctl compact` does:
/// watches and reads of older revisions fail from then on.
pub async fn compact(etcd: &mut Client, revision: i64) -> Result<()> {
    let compacting = etcd.compact(revision, None);
    tokio::time::timeout(CALL_TIMEOUT, compacting)
        .await
        .map_err(|_| anyhow!("etcd did not compact within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("compacting etcd up to revision {revision}"))?;
    Ok(())
}

/// Which of the members at `endpoints` (by index) leads the cluster.
pub async fn leader(endpoints: &[String]) -> Result<usize> {
    for (i, endpoint) in endpoints.iter().enumerate() {
        let mut member = connect(std::slice::from_ref(endpoint)).await?;
        let asking = member.status();
        let status = tokio::time::timeout(CALL_TIMEOUT, asking)
            .await
            .map_err(|_| anyhow!("{endpoint} did not answer status in time"))?
            .with_context(|| format!("the status of {endpoint}"))?;
        let id = status.header().map(|h| h.member_id());
        if id == Some(status.leader()) {
            return Ok(i);
        }
    }
    bail!("no member of {endpoints:?} says it leads")
}

/// Whether a call that failed with `code` may have failed for the replica's
/// sake (it is down, restarting, or cannot reach etcd now) and is worth
/// sending to another replica.
pub fn is_transient(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Sends `call` to the replica of `clients` at `first`, and after a
/// transient failure ([`is_transient`]) to the next one, round after
/// round, until one answers or `deadline` passes. Allocate and Release may
/// be repeated so: a repeated Allocate answers what the owner holds, a
/// repeated Release releases nothing more.
///
/// # Errors
///
/// The first answer that is not transient, or the last one at the deadline.
pub async fn on_any_replica<C, T, F, Fut>(
    clients: &[C],
    first: usize,
    deadline: tokio::time::Instant,
    mut call: F,
) -> Result<T, tonic::Status>
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut i = first;
    loop {
        match call(clients[i % clients.len()].clone()).await {
            Err(status)
                if is_transient(status.code()) && tokio::time::Instant::now() < deadline =>
            {
                i += 1;
                // A whole round failed: give the replicas and etcd a moment.
                if (i - first).is_multiple_of(clients.len()) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            answer => return answer,
        }
    }
}
