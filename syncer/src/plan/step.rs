//! The vocabulary of a plan: the [`Step`]s a reconcile takes, in the order a
//! plan lists them, and the [`Answer`]s of the calls whose outcome decides
//! the steps that follow (see [`Plan::then`](super::Plan::then)). What each
//! step does is fixed here, so that a list of steps says all a reconcile
//! does.

use std::net::IpAddr;

use crate::{
    allocation::{AllocError, Allocated},
    desired::Request,
    index::ServiceKey,
    render::Entry,
};

use super::Note;

/// One thing a reconcile does to a Service, the allocator, the index or
/// the syncer's shared state. A step that fails ends the reconcile with its
/// error, except where its description says otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Forget the Events published under a reason, so that they are
    /// published again if they come back.
    ClearReason(&'static str),
    /// Publish an Event on the Service, unless the same one was published
    /// already; a failure is only logged.
    PublishEvent(Note),
    /// Add the finalizer.
    AddFinalizer,
    /// Release whatever the Service holds. Answers [`Answer::Released`].
    Release,
    /// Release whatever the Service holds, whatever the answer: the
    /// address it was just given is another Service's.
    GiveBack,
    /// Adopt every address in use, unless that was done since adoption was
    /// last required.
    AdoptAll,
    /// Ask the allocator for an address. Answers [`Answer::Allocated`].
    Allocate(Request),
    /// Require adoption of every address again before the next new one: the
    /// allocator may have lost its state.
    RequireAdoption,
    /// Reconcile the Service again after the next release: its pool is full.
    WaitForRelease,
    /// Record the Service's address and ConfigMap entry in the index.
    RecordEntry {
        /// The address.
        ip: IpAddr,
        /// The entry.
        entry: Entry,
    },
    /// Drop the Service's entry from the index.
    DropEntry,
    /// Set the gauge of managed Services from the index.
    CountManaged,
    /// Wait until the ConfigMap no longer holds the dropped entry; fails
    /// when it takes longer than the clean-up waits.
    WaitConfigMapPublished,
    /// Write the address to the Service's status, or clear it (`None`).
    PatchStatus(Option<IpAddr>),
    /// Remove the finalizer, if the Service has it.
    RemoveFinalizer,
    /// Record that the Service's clean-up started here, so that a retry
    /// still knows it was served.
    MarkCleaning,
    /// Record that the Service's clean-up ended.
    UnmarkCleaning,
    /// Reconcile again every Service waiting for a free address.
    WakeWaiting,
    /// Forget every Event published about the Service: it is gone.
    ForgetEvents,
    /// Wait (briefly) until the Service cache has seen this reconcile's own
    /// writes, so that the next reconcile does not write them again.
    SettleWrites,
    /// Leave the finalizer alone: this syncer did not serve the Service,
    /// and another implementation may hold the same finalizer.
    LeaveFinalizer,
    /// End the reconcile with the allocator's failure.
    Fail(AllocError),
    /// End the reconcile: the allocator handed out an address that another
    /// Service holds, so it lost its state.
    FailStale {
        /// The address.
        ip: IpAddr,
        /// The Service holding it.
        holder: ServiceKey,
    },
}

/// The answer of a call whose outcome decides what follows, with what the
/// syncer knew right after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The allocator's answer to [`Step::Allocate`], and the Service the
    /// index holds the answered address for.
    Allocated(Result<Allocated, AllocError>, Option<ServiceKey>),
    /// The allocator's answer to [`Step::Release`] (the released address,
    /// if any), whether the index then held an entry of the Service and
    /// whether its clean-up had started here.
    Released {
        /// The released address.
        released: Result<Option<IpAddr>, AllocError>,
        /// Whether the index held an entry of the Service.
        indexed: bool,
        /// Whether the Service's clean-up had started here.
        cleaning: bool,
    },
}
