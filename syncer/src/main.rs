//! The `vipam-syncer` binary.

use std::process::ExitCode;

use clap::Parser;
use vipam_syncer::args::{Args, ConfigError};

#[tokio::main]
async fn main() -> ExitCode {
    match Args::parse().run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipam-syncer: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
