//! What a fault-injection run records: every call a client made to an
//! allocator replica ([`Operation`]: who, when it was invoked and when it
//! returned, what it asked and what it was answered) and what each replica's
//! Watch stream delivered ([`WatchRecord`]). The types are plain data, built
//! from the gRPC replies with the `*_reply` constructors and printed one
//! operation a line; [`crate::checker`] decides whether they could have
//! happened on one correct allocator.

use std::{fmt, net::IpAddr};

use tonic::{Code, Status};
use vipam::v1 as pb;

/// Nanoseconds since a start common to every client of a run (monotonic).
pub type Time = u64;

/// An address and the owner holding it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holding {
    /// The address.
    pub address: IpAddr,
    /// Its holder.
    pub owner: String,
}

impl Holding {
    /// `owner` holds `address`.
    pub fn new(address: IpAddr, owner: impl Into<String>) -> Self {
        Holding {
            address,
            owner: owner.into(),
        }
    }
}

/// What a client asked. The checker's model knows one pool: `pool` is kept
/// for the record only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Allocate for `owner`, the given address or any free one.
    Allocate {
        /// The owner, the idempotency key.
        owner: String,
        /// The address asked for; `None` for any free address.
        address: Option<IpAddr>,
        /// The pool named in the request.
        pool: Option<String>,
    },
    /// Release by owner, by address, or both.
    Release {
        /// The owner whose address to release.
        owner: Option<String>,
        /// The address to release.
        address: Option<IpAddr>,
    },
    /// Look one allocation up, by owner or by address.
    Get {
        /// The owner to look up.
        owner: Option<String>,
        /// The address to look up.
        address: Option<IpAddr>,
    },
    /// The whole table of the run's pool, in one page.
    List,
}

impl Input {
    /// Allocate any free address for `owner`.
    pub fn allocate(owner: impl Into<String>) -> Self {
        Input::Allocate {
            owner: owner.into(),
            address: None,
            pool: None,
        }
    }

    /// Allocate `address` for `owner`.
    pub fn allocate_at(owner: impl Into<String>, address: IpAddr) -> Self {
        Input::Allocate {
            owner: owner.into(),
            address: Some(address),
            pool: None,
        }
    }

    /// Release whatever `owner` holds.
    pub fn release_owner(owner: impl Into<String>) -> Self {
        Input::Release {
            owner: Some(owner.into()),
            address: None,
        }
    }

    /// Release `address`, whoever holds it.
    pub fn release_address(address: IpAddr) -> Self {
        Input::Release {
            owner: None,
            address: Some(address),
        }
    }

    /// Look up the address `owner` holds.
    pub fn get_owner(owner: impl Into<String>) -> Self {
        Input::Get {
            owner: Some(owner.into()),
            address: None,
        }
    }

    /// Look up who holds `address`.
    pub fn get_address(address: IpAddr) -> Self {
        Input::Get {
            owner: None,
            address: Some(address),
        }
    }
}

/// What a client was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Allocate succeeded: the address and the revision of the write that
    /// created the allocation.
    Allocated {
        /// The address the owner holds.
        address: IpAddr,
        /// The revision in the reply.
        revision: u64,
    },
    /// Release answered: what it removed, or `None` when nothing matched.
    Released(Option<Holding>),
    /// Get answered (NOT_FOUND is `Got(None)`).
    Got(Option<Holding>),
    /// List answered with these allocations.
    Listed(Vec<Holding>),
    /// A definite refusal: nothing changed.
    Refused {
        /// The gRPC code.
        code: Code,
        /// The message, for the record.
        message: String,
    },
    /// No definite answer (UNAVAILABLE, DEADLINE_EXCEEDED, a transport
    /// error…): the call may have taken effect, at any time after it was
    /// invoked, or never.
    Unknown(String),
}

/// Whether a failed call may still have taken effect.
fn indeterminate(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal
        | Code::Aborted
        | Code::DataLoss => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => false,
    }
}

/// A reply the allocator should never send (an unparsable address, a
/// List that needs a second page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedReply(pub String);

impl fmt::Display for MalformedReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed reply: {}", self.0)
    }
}

impl std::error::Error for MalformedReply {}

fn parse_address(text: &str) -> Result<IpAddr, MalformedReply> {
    text.parse()
        .map_err(|_| MalformedReply(format!("address {text:?}")))
}

/// The holding an allocation message describes.
pub fn holding(allocation: &pb::Allocation) -> Result<Holding, MalformedReply> {
    Ok(Holding::new(
        parse_address(&allocation.address)?,
        allocation.owner.clone(),
    ))
}

impl Output {
    /// The output of a failed call: unknown when the call may still have
    /// taken effect (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN,
    /// INTERNAL, ABORTED, DATA_LOSS: transport errors come as some of
    /// these), a refusal that changed nothing otherwise.
    pub fn from_status(status: &Status) -> Self {
        if indeterminate(status.code()) {
            Output::Unknown(format!("{:?}: {}", status.code(), status.message()))
        } else {
            Output::Refused {
                code: status.code(),
                message: status.message().to_string(),
            }
        }
    }

    /// The output of an Allocate call.
    pub fn allocate_reply(reply: &Result<pb::Allocation, Status>) -> Result<Self, MalformedReply> {
        match reply {
            Ok(allocation) => Ok(Output::Allocated {
                address: parse_address(&allocation.address)?,
                revision: allocation.revision,
            }),
            Err(status) => Ok(Output::from_status(status)),
        }
    }

    /// The output of a Release call.
    pub fn release_reply(
        reply: &Result<pb::ReleaseResponse, Status>,
    ) -> Result<Self, MalformedReply> {
        match reply {
            Ok(pb::ReleaseResponse {
                released: true,
                allocation: Some(allocation),
            }) => Ok(Output::Released(Some(holding(allocation)?))),
            Ok(pb::ReleaseResponse {
                released: true,
                allocation: None,
            }) => Err(MalformedReply("released without the allocation".into())),
            Ok(pb::ReleaseResponse {
                released: false, ..
            }) => Ok(Output::Released(None)),
            Err(status) => Ok(Output::from_status(status)),
        }
    }

    /// The output of a Get call; NOT_FOUND is `Got(None)`.
    pub fn get_reply(reply: &Result<pb::Allocation, Status>) -> Result<Self, MalformedReply> {
        match reply {
            Ok(allocation) => Ok(Output::Got(Some(holding(allocation)?))),
            Err(status) if status.code() == Code::NotFound => Ok(Output::Got(None)),
            Err(status) => Ok(Output::from_status(status)),
        }
    }

    /// The output of a List call that asked for the whole table in one page.
    pub fn list_reply(reply: &Result<pb::ListResponse, Status>) -> Result<Self, MalformedReply> {
        match reply {
            Ok(page) if !page.next_page_token.is_empty() => Err(MalformedReply(
                "List needs more than one page: raise page_size".into(),
            )),
            Ok(page) => page
                .allocations
                .iter()
                .map(holding)
                .collect::<Result<_, _>>()
                .map(Output::Listed),
            Err(status) => Ok(Output::from_status(status)),
        }
    }

    /// Whether the call may or may not have taken effect.
    pub fn is_unknown(&self) -> bool {
        matches!(self, Output::Unknown(_))
    }
}

/// One call: who made it, when, what it asked and what it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// The client (one sequential caller) that made it.
    pub client: usize,
    /// When it was invoked.
    pub invoked: Time,
    /// When it returned; `None` when it never did. An `Unknown` output is
    /// taken as never returned whatever this says: its effect may come later.
    pub returned: Option<Time>,
    /// What was asked.
    pub input: Input,
    /// What was answered.
    pub output: Output,
}

impl Operation {
    /// A call of `client` that ran from `invoked` to `returned`.
    pub fn new(client: usize, invoked: Time, returned: Time, input: Input, output: Output) -> Self {
        Operation {
            client,
            invoked,
            returned: Some(returned),
            input,
            output,
        }
    }

    /// When its effect happened at the latest: its return, or never for an
    /// unknown outcome.
    pub fn deadline(&self) -> Time {
        match (&self.output, self.returned) {
            (Output::Unknown(_), _) | (_, None) => Time::MAX,
            (_, Some(t)) => t,
        }
    }
}

/// Everything the clients of one run did, in any order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The calls.
    pub ops: Vec<Operation>,
}

impl History {
    /// Records a call.
    pub fn push(&mut self, op: Operation) {
        self.ops.push(op);
    }
}

/// What a Watch event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    /// An allocation of the snapshot.
    Snapshot,
    /// The snapshot shows the table at this revision.
    SnapshotComplete,
    /// An allocation was created.
    Allocated,
    /// An allocation was removed.
    Released,
    /// Every change up to this revision was sent.
    Progress,
}

/// One Watch event as a client received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRecord {
    /// What it says.
    pub kind: WatchKind,
    /// Its revision (0 for a SNAPSHOT).
    pub revision: u64,
    /// The allocation, for SNAPSHOT, ALLOCATED and RELEASED.
    pub holding: Option<Holding>,
}

impl WatchRecord {
    /// The record of an event received from a Watch stream.
    pub fn from_event(event: &pb::WatchEvent) -> Result<Self, MalformedReply> {
        let kind = match event.r#type() {
            pb::WatchEventType::Snapshot => WatchKind::Snapshot,
            pb::WatchEventType::SnapshotComplete => WatchKind::SnapshotComplete,
            pb::WatchEventType::Allocated => WatchKind::Allocated,
            pb::WatchEventType::Released => WatchKind::Released,
            pb::WatchEventType::Progress => WatchKind::Progress,
            pb::WatchEventType::Unspecified => {
                return Err(MalformedReply(format!("watch event type {}", event.r#type)));
            }
        };
        let holding = match (&event.allocation, kind) {
            (Some(a), WatchKind::Snapshot | WatchKind::Allocated | WatchKind::Released) => {
                Some(holding(a)?)
            }
            (None, WatchKind::Snapshot | WatchKind::Allocated | WatchKind::Released) => {
                return Err(MalformedReply(format!("{kind:?} event without allocation")));
            }
            (_, WatchKind::SnapshotComplete | WatchKind::Progress) => None,
        };
        Ok(WatchRecord {
            kind,
            revision: event.revision,
            holding,
        })
    }
}

/// What a client watching one replica received, across reconnects, in
/// order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchStream {
    /// The replica watched, for messages.
    pub replica: String,
    /// The events, as received.
    pub events: Vec<WatchRecord>,
}

/// A time as milliseconds with nanosecond digits.
struct Millis(Time);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>6}.{:06}ms", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl fmt::Display for Holding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.address, self.owner)
    }
}

/// `key=value` when there is a value.
fn field<T: fmt::Display>(name: &str, value: &Option<T>) -> String {
    value
        .as_ref()
        .map(|v| format!(" {name}={v}"))
        .unwrap_or_default()
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Allocate {
                owner,
                address,
                pool,
            } => write!(
                f,
                "allocate owner={owner}{}{}",
                field("address", address),
                field("pool", pool)
            ),
            Input::Release { owner, address } => write!(
                f,
                "release{}{}",
                field("owner", owner),
                field("address", address)
            ),
            Input::Get { owner, address } => write!(
                f,
                "get{}{}",
                field("owner", owner),
                field("address", address)
            ),
            Input::List => write!(f, "list"),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Allocated { address, revision } => {
                write!(f, "allocated {address} (revision {revision})")
            }
            Output::Released(Some(h)) => write!(f, "released {h}"),
            Output::Released(None) => write!(f, "released nothing"),
            Output::Got(Some(h)) => write!(f, "got {h}"),
            Output::Got(None) => write!(f, "got nothing"),
            Output::Listed(table) => {
                let entries: Vec<String> = table.iter().map(Holding::to_string).collect();
                write!(f, "listed [{}]", entries.join(", "))
            }
            Output::Refused { code, message } => write!(f, "refused {code:?} {message:?}"),
            Output::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let returned = match self.returned {
            Some(t) => Millis(t).to_string(),
            None => format!("{:>15}", "never"),
        };
        write!(
            f,
            "client {:<3} {} → {}  {} → {}",
            self.client,
            Millis(self.invoked),
            returned,
            self.input,
            self.output
        )
    }
}

impl fmt::Display for WatchRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} revision {}", self.kind, self.revision)?;
        match &self.holding {
            Some(h) => write!(f, " {h}"),
            None => Ok(()),
        }
    }
}
