//! `vipam-allocator migrate`: its flags, and the wiring that opens the two
//! stores, runs [`crate::store::migrate`]'s copy, opens the target again and
//! verifies it, and prints what was copied.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use vipam::runtime::{self, ConfigError};

use super::{Engine, EtcdFlags, PoolFlags};
use crate::{
    addresses::pool::Pools,
    store::migrate::{self, Side},
    store::{SledStore, Store},
};

/// Watch history the etcd side keeps: migrate serves no Watch.
const ETCD_HISTORY: u64 = 1;

/// The flags of `migrate` (its help is [`super::Command::Migrate`]'s).
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The engine to copy from: sled (the store in --data-dir) or etcd (the
    /// one --etcd-endpoints and --etcd-prefix reach).
    #[arg(long, env = "VIPAM_MIGRATE_FROM", value_enum, value_name = "ENGINE")]
    pub from: Engine,

    /// The engine to copy into, the other one; it must hold no allocation.
    #[arg(long, env = "VIPAM_MIGRATE_TO", value_enum, value_name = "ENGINE")]
    pub to: Engine,

    /// Directory of the sled store. As the source it must hold one; as the
    /// target it is created if missing.
    #[arg(
        long,
        env = "VIPAM_DATA_DIR",
        default_value = "vipam-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// Page cache of the sled store, in bytes.
    #[arg(long, env = "VIPAM_CACHE_BYTES", default_value_t = 64 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub cache_bytes: u64,

    #[command(flatten)]
    pub pool_flags: PoolFlags,

    #[command(flatten)]
    pub etcd: EtcdFlags,

    /// Log filter, as RUST_LOG (for example "info" or "vipam_allocator=debug").
    #[arg(long, env = "VIPAM_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "VIPAM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Refuses a copy from an engine to itself: there is one --data-dir and one
/// etcd prefix, so it would be the same store.
fn check_engines(from: Engine, to: Engine) -> Result<(), ConfigError> {
    if from != to {
        return Ok(());
    }
    let engine = match from {
        Engine::Sled => "sled",
        Engine::Etcd => "etcd",
    };
    Err(ConfigError(format!(
        "--from and --to are both {engine}: source and target would be the same store; migrate copies between sled (--data-dir) and etcd (--etcd-*): --from sled --to etcd, or --from etcd --to sled"
    )))
}

/// How to open either store.
struct Stores {
    data_dir: PathBuf,
    cache_bytes: u64,
    etcd: EtcdFlags,
    pools: Arc<Pools>,
}

impl Stores {
    /// The store of `engine` in messages.
    fn name(&self, engine: Engine) -> String {
        match engine {
            Engine::Sled => format!("the sled store in {}", self.data_dir.display()),
            Engine::Etcd => self.etcd.describe(),
        }
    }

    async fn open(&self, engine: Engine) -> anyhow::Result<Store> {
        Ok(match engine {
            // As it is: the source's change history stays whole.
            Engine::Sled => super::open_sled(&self.data_dir, self.cache_bytes)?.into(),
            Engine::Etcd => self
                .etcd
                .open(self.pools.clone(), ETCD_HISTORY)
                .await?
                .into(),
        })
    }
}

impl MigrateArgs {
    /// Checks the settings, copies, verifies and prints the summary. A
    /// refused target, a failed copy or a target that differs afterwards is
    /// an error (exit 1); bad settings are a [`ConfigError`] (exit 2).
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            from,
            to,
            data_dir,
            cache_bytes,
            pool_flags,
            etcd,
            log,
            log_format,
        } = self;
        runtime::init_logging(&log, &log_format)?;
        check_engines(from, to)?;
        let (pools, _policy) = pool_flags.check()?;
        etcd.check("migrate")?;
        if from == Engine::Sled && !SledStore::exists_in(&data_dir) {
            return Err(ConfigError(format!(
                "--data-dir {}: no sled store there to copy from (give the allocator's --data-dir)",
                data_dir.display()
            ))
            .into());
        }
        let stores = Stores {
            data_dir,
            cache_bytes,
            etcd,
            pools: Arc::new(pools),
        };
        let (origin, target) = (stores.name(from), stores.name(to));
        let source = stores.open(from).await?;
        let summary = {
            let (source, into, pools) =
                (source.clone(), stores.open(to).await?, stores.pools.clone());
            let (o, t) = (origin.clone(), target.clone());
            blocking(move || migrate::copy(side(&source, &o), side(&into, &t), &pools)).await?
        };
        println!(
            "copied {} allocation(s) from {origin} to {target}",
            summary.total()
        );
        for line in summary.lines(&stores.pools) {
            println!("  {line}");
        }
        // What a fresh allocator would load: the target as stored, not as
        // the copy's own handle sees it.
        let reopened = stores.open(to).await?;
        let (o, t) = (origin.clone(), target.clone());
        let count =
            blocking(move || migrate::verify(side(&source, &o), side(&reopened, &t))).await?;
        println!(
            "verified: {target} holds exactly the {count} allocation(s) of {origin} (address, owner, labels, creation time) and each owner's index"
        );
        Ok(())
    }
}

fn side<'a>(store: &'a Store, name: &'a str) -> Side<'a> {
    Side { store, name }
}

/// Runs `f` where blocking store calls may wait (the etcd engine waits for
/// its commits on the runtime).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, migrate::MigrateError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .context("the migration stopped")??)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Args, Command};

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vipam-allocator").chain(args.iter().copied()))
    }

    #[test]
    fn a_copy_from_an_engine_to_itself_is_refused() {
        for engine in [Engine::Sled, Engine::Etcd] {
            let err = check_engines(engine, engine).expect_err("same engine");
            assert!(err.0.contains("would be the same store"), "{err}");
        }
        assert!(check_engines(Engine::Sled, Engine::Etcd).is_ok());
        assert!(check_engines(Engine::Etcd, Engine::Sled).is_ok());
    }

    #[test]
    fn migrate_takes_the_allocators_store_and_pool_flags() {
        let args = parse(&[
            "migrate",
            "--from=sled",
            "--to",
            "etcd",
            "--data-dir=/var/lib/vipam",
            "--pool",
            "a=10.0.0.0/24",
            "--reserved",
            "a=10.0.0.1",
            "--etcd-endpoints=http://127.0.0.1:2379",
            "--etcd-prefix=/x/",
        ])
        .expect("parses");
        let Some(Command::Migrate(m)) = args.command else {
            panic!("not migrate: {:?}", args.command);
        };
        assert_eq!((m.from, m.to), (Engine::Sled, Engine::Etcd));
        assert_eq!(m.data_dir, PathBuf::from("/var/lib/vipam"));
        assert_eq!(m.pool_flags.pools.len(), 1);
        assert_eq!(m.etcd.etcd_prefix, "/x/");
    }

    #[test]
    fn migrate_needs_from_and_to() {
        let err = parse(&["migrate", "--from=sled"]).expect_err("no --to");
        assert!(err.to_string().contains("--to"), "{err}");
    }

    #[test]
    fn the_allocators_own_flags_do_not_mix_with_migrate() {
        let err = parse(&[
            "--listen",
            "127.0.0.1:1",
            "migrate",
            "--from=sled",
            "--to=etcd",
        ])
        .expect_err("conflict");
        assert!(err.to_string().contains("migrate"), "{err}");
    }

    #[test]
    fn without_a_command_the_allocator_parses_as_before() {
        let args = parse(&["--pool", "a=10.0.0.0/24", "--check"]).expect("parses");
        assert!(args.command.is_none());
        assert!(args.check);
    }
}
