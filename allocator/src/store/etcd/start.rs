//! Starting a replica on etcd: the settings and the client options they
//! give (credentials read from their files, never logged), the agreement on
//! the pool definitions, and the first copy of the allocations and owner
//! keys.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};

use super::{
    keys::{self, Keys},
    members::{Failure, Members, Resend},
    mirror::{Entry, OwnerKey},
    unavailable,
};
use crate::{
    addresses::pool::Pools,
    store::{Result, StoreError},
};

/// How to reach etcd and where this installation's keys live.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Client URLs (`http://` or `https://`), any member of the cluster.
    pub endpoints: Vec<String>,
    /// The installation's key prefix.
    pub prefix: String,
    /// Limit of each etcd call.
    pub timeout: Duration,
    /// CA certificate (PEM) to verify etcd with.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for certificate auth.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's key.
    pub key_file: Option<PathBuf>,
    /// etcd user, with the password read from `password_file`.
    pub username: Option<String>,
    /// File holding the etcd user's password.
    pub password_file: Option<PathBuf>,
    /// Changes kept for Watch to replay.
    pub history: u64,
}

fn read_file(flag: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| StoreError::Unavailable(format!("{flag} {}: {e}", path.display())))
}

impl EtcdSettings {
    /// Settings for `prefix` on the cluster at `endpoints`, without TLS or
    /// credentials, a 5 s limit per call and the default history.
    pub fn plain(endpoints: Vec<String>, prefix: &str) -> EtcdSettings {
        EtcdSettings {
            endpoints,
            prefix: prefix.to_string(),
            timeout: Duration::from_secs(5),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            history: crate::store::DEFAULT_HISTORY,
        }
    }

    /// The client options: TLS material and credentials read from their
    /// files (never logged).
    pub(super) fn connect_options(&self) -> Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(2), self.timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_file("--etcd-ca-file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read_file("--etcd-cert-file", cert)?,
                    read_file("--etcd-key-file", key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.username, &self.password_file) {
            let password = String::from_utf8(read_file("--etcd-password-file", file)?)
                .map_err(|_| StoreError::Unavailable("--etcd-password-file: not UTF-8".into()))?;
            options = options.with_user(user.clone(), password.trim_end_matches(['\n', '\r']));
        }
        Ok(options)
    }
}

/// What to check when `failure` says the connection itself failed (a server
/// that refused the TLS handshake shows only as a closed connection).
fn connection_hint(failure: &Failure) -> &'static str {
    let connection = match &failure.error {
        Some(etcd_client::Error::TransportError(_)) => true,
        Some(etcd_client::Error::GRpcStatus(status)) => std::error::Error::source(status).is_some(),
        _ => false,
    };
    if connection {
        "; check that etcd answers at that address and, over TLS, that --etcd-ca-file signed \
         its certificate and that it accepts the client certificate of --etcd-cert-file and \
         --etcd-key-file (or requires one)"
    } else {
        ""
    }
}

/// Writes the pool definitions etcd does not hold yet and checks the others;
/// the mod revision of each pool's key. Each transaction may be sent again
/// (to another member): it writes a definition only where there is none,
/// and reads it otherwise.
pub(super) async fn agree_on_pools(
    members: &Members,
    keys: &Keys,
    pools: &Pools,
) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::with_capacity(pools.len());
    for pool in pools.iter() {
        let key = keys.pool(pool.name());
        let ours = keys::pool_definition(pool);
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), ours.clone(), None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let send = |mut client: Client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        };
        let response = members.call(Resend::Always, send).await.map_err(|f| {
            unavailable(format!(
                "checking pool definitions: {f}{}",
                connection_hint(&f)
            ))
        })?;
        let revision = if response.succeeded() {
            tracing::info!(pool = pool.name(), definition = %ours, "pool definition written to etcd");
            response.header().map_or(0, |h| h.revision())
        } else {
            let stored = response.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            });
            let Some(kv) = stored else {
                return Err(unavailable(format!(
                    "pool {} changed in etcd while starting; start again",
                    pool.name()
                )));
            };
            let theirs = String::from_utf8_lossy(kv.value());
            if theirs != ours {
                return Err(StoreError::Refused(format!(
                    "pool {} is defined differently in the shared store: there \"{theirs}\", \
                     here \"{ours}\"; give every replica the same --pool, or use another \
                     --etcd-prefix",
                    pool.name()
                )));
            }
            kv.mod_revision()
        };
        out.push((ours, revision));
    }
    Ok(out)
}

/// What a replica starts from: the allocations and the owner keys, read
/// at one etcd revision.
pub(super) struct Loaded {
    /// The allocations, by address.
    pub entries: Vec<(IpAddr, Entry)>,
    /// The owner keys, by owner.
    pub owner_keys: Vec<(String, OwnerKey)>,
    /// The etcd revision they were read at.
    pub revision: u64,
}

/// Reads every allocation, then every owner key at the same revision.
pub(super) async fn load(members: &Members, keys: &Keys) -> Result<Loaded> {
    let mut entries = Vec::new();
    let at = read_all(members, keys.addresses(), 0, |kv| {
        if let keys::Key::Address(ip) = keys.classify(kv.key())? {
            let record = keys::decode(kv.key(), kv.value(), kv.mod_revision(), 0)?;
            let mod_revision = kv.mod_revision();
            entries.push((
                ip,
                Entry {
                    record,
                    mod_revision,
                },
            ));
        }
        Ok(())
    })
    .await?;
    let mut owner_keys = Vec::new();
    read_all(members, keys.owners(), at, |kv| {
        if let keys::Key::Owner(owner) = keys.classify(kv.key())? {
            let value = String::from_utf8_lossy(kv.value()).into_owned();
            let mod_revision = kv.mod_revision();
            owner_keys.push((
                owner,
                OwnerKey {
                    value,
                    mod_revision,
                },
            ));
        }
        Ok(())
    })
    .await?;
    Ok(Loaded {
        entries,
        owner_keys,
        revision: u64::try_from(at).unwrap_or(0),
    })
}

/// Reads every key that starts with `first`, page by page at etcd revision
/// `at` (0: the current one), each page from any member that answers, and
/// hands each to `each`; the revision read at.
async fn read_all(
    members: &Members,
    first: Vec<u8>,
    mut at: i64,
    mut each: impl FnMut(&etcd_client::KeyValue) -> Result<()>,
) -> Result<i64> {
    const PAGE: i64 = 10_000;
    let mut end = first.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut start = first;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if at > 0 {
            options = options.with_revision(at);
        }
        let read = |mut client: Client| {
            let (start, options) = (start.clone(), options.clone());
            async move { client.get(start, Some(options)).await }
        };
        let page = members
            .call(Resend::Always, read)
            .await
            .map_err(|f| unavailable(format!("loading allocations from etcd: {f}")))?;
        if at == 0 {
            at = page.header().map_or(0, |h| h.revision());
        }
        page.kvs().iter().try_for_each(&mut each)?;
        match (page.more(), page.kvs().last()) {
            (true, Some(last)) => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(at),
        }
    }
}
