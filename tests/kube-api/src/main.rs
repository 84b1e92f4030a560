//! The standalone test server: listens on an address and writes a kubeconfig for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A Kubernetes API test server for kubectl and the vipam syncer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "VIPAM_KUBE_API_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server to this path.
    #[arg(long, env = "VIPAM_KUBE_API_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Interval between watch bookmarks.
    #[arg(long, env = "VIPAM_KUBE_API_BOOKMARK_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    bookmark_interval: Duration,
    /// Changes kept for watches before older resourceVersions expire.
    #[arg(long, env = "VIPAM_KUBE_API_MAX_HISTORY", default_value_t = 100_000)]
    max_history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let Args {
        listen,
        kubeconfig,
        bookmark_interval,
        max_history,
    } = Args::parse();
    let server = vipam_kube_api::TestServer::start_with(vipam_kube_api::Config {
        listen,
        bookmark_interval,
        max_history,
    })
    .await?;
    if let Some(path) = &kubeconfig {
        server.write_kubeconfig(path)?;
    }
    println!("{}", server.url());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
