//! How the engine reaches etcd's members: a client of its own per endpoint,
//! and calls that go to the member that answered last and, when it fails,
//! to the next ones within the etcd timeout, so that any quorum of members
//! serves whichever members are down.
//!
//! One client over every endpoint would not do: etcd-client balances its
//! requests over the endpoints' connections, and a connection to a member
//! that is down counts as ready (tonic connects lazily and hands the
//! connection error to the request), so a share of the requests fails at
//! once however many members are up.
//!
//! A call is sent again, to the next member, only when that cannot apply it
//! twice: after a failure to connect (nothing was sent), or a refusal for
//! want of a leader (etcd applied nothing), and for a call that may be
//! repeated ([`Resend::Always`]: reads, the sync key) after any failure a
//! member may cause. A transaction whose outcome is unknown is never sent
//! again.

use std::{
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;
use tonic::Code;

use super::lock;

/// When a failed call may be sent again, to another member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resend {
    /// After any failure a member may cause, or a time-out: reads, and
    /// writes whose repetition changes nothing that matters.
    Always,
    /// Only when nothing was applied: no connection could be made, or the
    /// member had no leader. For a transaction that must apply at most
    /// once.
    IfNotApplied,
}

/// Why a call failed, within the etcd timeout.
#[derive(Debug)]
pub(super) struct Failure {
    /// Whether a write may have been applied (etcd got it and did not say).
    pub unknown: bool,
    /// What went wrong, naming the member.
    pub why: String,
    /// The last error of etcd's client, when it gave one.
    pub error: Option<etcd_client::Error>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// What a failure says about the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// No connection: nothing reached etcd.
    NotSent,
    /// The member had no leader: it applied nothing.
    NoLeader,
    /// The member, or the connection to it, failed: another may answer.
    Transient,
    /// etcd refused the call for what it is (permissions, arguments):
    /// another member would too.
    Refused,
}

fn classify(e: &etcd_client::Error) -> Class {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let mut source = std::error::Error::source(status);
            while let Some(cause) = source {
                if cause.is::<tonic::ConnectError>() {
                    return Class::NotSent;
                }
                source = cause.source();
            }
            match status.code() {
                Code::Unavailable if status.message().contains("no leader") => Class::NoLeader,
                Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Internal => Class::Transient,
                _ => Class::Refused,
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Class::Transient,
        _ => Class::Refused,
    }
}

/// etcd's members, as the engine reaches them.
pub(super) struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    timeout: Duration,
    /// Each endpoint's client, once connected.
    clients: Mutex<Vec<Option<Client>>>,
    /// The member calls go to first: the last that answered.
    current: AtomicUsize,
}

impl Members {
    /// The members at `endpoints` (at least one), connected to with
    /// `options` when first called; each call takes at most `timeout`.
    pub(super) fn new(
        endpoints: Vec<String>,
        options: ConnectOptions,
        timeout: Duration,
    ) -> Members {
        let clients = Mutex::new(vec![None; endpoints.len()]);
        Members {
            endpoints,
            options,
            timeout,
            clients,
            current: AtomicUsize::new(0),
        }
    }

    /// The client of member `i`, connecting it first (which, with a user
    /// and password, authenticates).
    async fn client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        if let Some(client) = lock(&self.clients)[i].clone() {
            return Ok(client);
        }
        let endpoint = [self.endpoints[i].as_str()];
        let client = Client::connect(endpoint, Some(self.options.clone())).await?;
        lock(&self.clients)[i] = Some(client.clone());
        Ok(client)
    }

    /// Runs `call` on the member that answered last and, after a failure
    /// `resend` allows to repeat, on the next ones in turn, until one
    /// answers or the etcd timeout is up.
    pub(super) async fn call<T, F, Fut>(&self, resend: Resend, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let first = self.current.load(Ordering::Relaxed);
        let mut tries = 0;
        let mut said: Option<Failure> = None;
        loop {
            let i = (first + tries) % self.endpoints.len();
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = async { call(self.client(i).await?).await };
            let failure = match tokio::time::timeout(self.limit(resend, left), attempt).await {
                Ok(Ok(answer)) => {
                    self.answered(i);
                    return Ok(answer);
                }
                Ok(Err(e)) => match (classify(&e), resend) {
                    (Class::NotSent | Class::NoLeader, _) | (Class::Transient, Resend::Always) => {
                        self.failure(i, false, e)
                    }
                    (Class::Transient, Resend::IfNotApplied) => {
                        return Err(self.failure(i, true, e));
                    }
                    (Class::Refused, _) => return Err(self.failure(i, false, e)),
                },
                Err(_) if resend == Resend::Always => Failure {
                    unknown: false,
                    why: format!("etcd at {} did not answer in time", self.endpoints[i]),
                    error: None,
                },
                Err(_) => return Err(self.timed_out(i)),
            };
            tries += 1;
            // An attempt the deadline cut short says less than an error.
            if failure.error.is_some() || said.is_none() {
                said = Some(failure);
            }
            if Instant::now() >= deadline {
                return Err(said.unwrap_or_else(|| self.timed_out(i)));
            }
            if tries % self.endpoints.len() == 0 {
                // Every member failed: give the cluster a moment (an
                // election takes about a second).
                let pause = Duration::from_millis(25 << (tries / self.endpoints.len()).min(4));
                tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
    }

    /// How long one attempt may take, with `left` of the call: a call that
    /// may be repeated leaves time for another member when one does not
    /// answer.
    fn limit(&self, resend: Resend, left: Duration) -> Duration {
        match resend {
            Resend::Always if self.endpoints.len() > 1 => left / 2,
            _ => left,
        }
    }

    /// Member `i` answered: calls go to it first from now on.
    fn answered(&self, i: usize) {
        let was = self.current.swap(i, Ordering::Relaxed);
        if was != i {
            tracing::info!(
                endpoint = %self.endpoints[i],
                "etcd calls go to {} now",
                self.endpoints[i]
            );
        }
    }

    fn failure(&self, i: usize, unknown: bool, e: etcd_client::Error) -> Failure {
        Failure {
            unknown,
            why: format!("etcd at {}: {e}", self.endpoints[i]),
            error: Some(e),
        }
    }

    fn timed_out(&self, i: usize) -> Failure {
        Failure {
            unknown: true,
            why: format!(
                "etcd at {} did not answer within {:?}",
                self.endpoints[i], self.timeout
            ),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn a_cluster_without_a_leader_applied_nothing_and_a_timeout_may_have() {
        assert_eq!(
            classify(&status(Code::Unavailable, "etcdserver: no leader")),
            Class::NoLeader
        );
        assert_eq!(
            classify(&status(Code::Unavailable, "etcdserver: request timed out")),
            Class::Transient
        );
        assert_eq!(
            classify(&status(
                Code::PermissionDenied,
                "etcdserver: permission denied"
            )),
            Class::Refused
        );
    }

    #[test]
    fn a_failed_connection_sent_nothing() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect = tonic::ConnectError(Box::new(refused));
        let status = tonic::Status::from_error(Box::new(connect));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            classify(&etcd_client::Error::GRpcStatus(status)),
            Class::NotSent
        );
    }
}
