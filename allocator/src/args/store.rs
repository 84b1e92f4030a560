//! The flags that choose and reach the store engine: sled in `--data-dir`
//! (the default) or etcd shared by replicas.

use std::path::PathBuf;
use std::{sync::Arc, time::Duration};

use vipam::runtime::{ConfigError, parse_duration};

use crate::{
    addresses::pool::Pools,
    store::{EtcdSettings, EtcdStore, StoreError},
};

/// Which engine keeps the allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Embedded, in --data-dir: one allocator.
    Sled,
    /// etcd, shared by any number of allocator replicas.
    Etcd,
}

/// The store flags.
#[derive(Debug, clap::Args)]
pub struct StoreFlags {
    /// Where allocations live: sled (embedded, in --data-dir; the default)
    /// or etcd (shared by allocator replicas; needs --etcd-endpoints).
    #[arg(
        long = "store",
        env = "VIPAM_STORE",
        value_enum,
        default_value = "sled"
    )]
    pub engine: Engine,

    #[command(flatten)]
    pub etcd: EtcdFlags,
}

/// The flags that reach etcd: for `--store etcd`, and for either side of
/// `migrate`.
#[derive(Debug, clap::Args)]
pub struct EtcdFlags {
    /// etcd client URLs, comma-separated (http:// or https://): give every
    /// member's, so that any quorum of them serves.
    #[arg(
        long,
        env = "VIPAM_ETCD_ENDPOINTS",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of this installation in etcd. Installations with the same
    /// prefix share every pool (and must define them alike).
    #[arg(
        long,
        env = "VIPAM_ETCD_PREFIX",
        default_value = "/vipam/",
        value_name = "PREFIX"
    )]
    pub etcd_prefix: String,

    /// CA certificate (PEM) that signed etcd's server certificates.
    #[arg(long, env = "VIPAM_ETCD_CA_FILE", value_name = "PATH")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for etcd, with --etcd-key-file.
    #[arg(long, env = "VIPAM_ETCD_CERT_FILE", value_name = "PATH")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Key (PEM) of the client certificate.
    #[arg(long, env = "VIPAM_ETCD_KEY_FILE", value_name = "PATH")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user name, with --etcd-password-file.
    #[arg(long, env = "VIPAM_ETCD_USERNAME", value_name = "NAME")]
    pub etcd_username: Option<String>,

    /// File holding the etcd user's password (never logged).
    #[arg(long, env = "VIPAM_ETCD_PASSWORD_FILE", value_name = "PATH")]
    pub etcd_password_file: Option<PathBuf>,

    /// Limit of each etcd call; a write etcd has not committed by then is
    /// answered UNAVAILABLE.
    #[arg(long, env = "VIPAM_ETCD_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub etcd_timeout: std::time::Duration,
}

/// The settings wrong together, as the message the allocator exits with.
pub fn check_flags(f: &StoreFlags) -> Result<(), ConfigError> {
    match f.engine {
        Engine::Sled if f.etcd.is_set() => Err(ConfigError(
            "--etcd-* flags are set but --store is sled; add --store etcd".into(),
        )),
        Engine::Sled => Ok(()),
        Engine::Etcd => f.etcd.check("--store etcd"),
    }
}

impl EtcdFlags {
    /// Whether any flag that reaches etcd is given.
    pub fn is_set(&self) -> bool {
        !self.etcd_endpoints.is_empty()
            || self.etcd_ca_file.is_some()
            || self.etcd_cert_file.is_some()
            || self.etcd_username.is_some()
    }

    /// The flags wrong alone or together; `user` (such as "--store etcd")
    /// is what needs them.
    pub fn check(&self, user: &str) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.etcd_endpoints.is_empty() {
            return err(format!("{user} needs --etcd-endpoints URL[,URL...]"));
        }
        for url in &self.etcd_endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 9 {
                return err(format!(
                    "--etcd-endpoints {url:?}: not an http:// or https:// URL"
                ));
            }
        }
        if self.etcd_prefix.is_empty() {
            return err("--etcd-prefix \"\": give a prefix such as /vipam/".into());
        }
        if self.etcd_cert_file.is_some() != self.etcd_key_file.is_some() {
            return err("--etcd-cert-file and --etcd-key-file go together".into());
        }
        if self.etcd_username.is_some() != self.etcd_password_file.is_some() {
            return err("--etcd-username and --etcd-password-file go together".into());
        }
        for (flag, path) in [
            ("--etcd-ca-file", &self.etcd_ca_file),
            ("--etcd-cert-file", &self.etcd_cert_file),
            ("--etcd-key-file", &self.etcd_key_file),
            ("--etcd-password-file", &self.etcd_password_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::metadata(path)
            {
                return err(format!("{flag} {}: {e}", path.display()));
            }
        }
        Ok(())
    }

    /// The etcd engine's settings.
    pub fn settings(&self, history: u64) -> EtcdSettings {
        EtcdSettings {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            timeout: self.etcd_timeout.max(Duration::from_millis(100)),
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            username: self.etcd_username.clone(),
            password_file: self.etcd_password_file.clone(),
            history,
        }
    }

    /// Where the store lives, for messages: the endpoints and the prefix.
    pub fn describe(&self) -> String {
        format!(
            "etcd at {} under prefix {}",
            self.etcd_endpoints.join(","),
            self.etcd_prefix
        )
    }

    /// Connects to etcd and opens the store there; a pool defined otherwise
    /// in etcd is a settings error.
    pub async fn open(&self, pools: Arc<Pools>, history: u64) -> anyhow::Result<EtcdStore> {
        match EtcdStore::open(&self.settings(history), pools).await {
            Ok(store) => Ok(store),
            Err(e @ StoreError::Refused(_)) => Err(ConfigError(e.to_string()).into()),
            Err(e) => Err(anyhow::Error::new(e).context("opening the etcd store")),
        }
    }
}
