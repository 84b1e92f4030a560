//! What both programs need to run as a service, behind the `runtime`
//! feature: duration flags, the configuration error that exits with code 2,
//! the logging set-up, SIGTERM/SIGINT, the `/healthz` `/readyz` `/metrics`
//! routes ([`probes`]) and the supervisor of long-running tasks
//! ([`supervisor`]).

pub mod probes;
pub mod supervisor;

use std::time::Duration;

pub use probes::probe_router;
pub use supervisor::{EndedError, Supervisor};

/// A configuration error found after parsing the flags; the binaries exit
/// with code 2 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Parses a duration flag such as `10s` or `500ms`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 10s or 500ms)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_string());
    }
    Ok(d)
}

/// Logs to stderr with the `--log` filter (as `RUST_LOG`) in the
/// `--log-format` `text` or `json`.
pub fn init_logging(filter: &str, format: &str) -> Result<(), ConfigError> {
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| ConfigError(format!("--log {filter:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Another subscriber may already be set (tests run several servers).
    let _ = match format {
        "json" => builder.json().try_init(),
        _ => builder.try_init(),
    };
    Ok(())
}

/// Completes on SIGTERM or SIGINT, logging which; never completes when the
/// signals cannot be listened for (the error is logged).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_reads_humantime_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn parse_duration_refuses_zero() {
        assert_eq!(
            parse_duration("0s"),
            Err("must be longer than zero".to_string())
        );
    }

    #[test]
    fn parse_duration_refuses_a_bare_number_with_an_example() {
        let err = parse_duration("10").expect_err("a number without a unit");
        assert!(err.contains("use a duration such as 10s"), "{err}");
    }

    #[test]
    fn init_logging_names_the_flag_of_a_bad_filter() {
        let err = init_logging("=[", "text").expect_err("bad filter");
        assert!(err.0.starts_with("--log \"=[\""), "{err}");
    }
}
