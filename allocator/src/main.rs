//! The `vipam-allocator` binary.

use std::process::ExitCode;

use clap::Parser;
use vipam::runtime::ConfigError;
use vipam_allocator::args::Args;

#[tokio::main]
async fn main() -> ExitCode {
    match Args::parse().run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipam-allocator: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
