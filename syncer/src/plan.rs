//! What to do with one Service, decided by pure functions of the Service,
//! what the syncer knows of it and the settings, and given as the ordered
//! [`Step`]s a reconcile takes. [`plan`] decides before any call: leave the
//! Service alone, refuse it (Events only), apply it (the finalizer, what to
//! release, adoption, the allocation) or clean it up (the release first).
//! Where a call's answer decides what follows, [`Plan::then`] gives the next
//! steps: [`Apply::outcome`] after the allocation, [`Cleanup::released`]
//! after a clean-up's release, [`failure`] after a failed release. The
//! reconciler only carries the steps out.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use kube::runtime::events::EventType;

use crate::{
    adopt::Adoptable,
    allocation::{AllocError, Allocated},
    desired::{
        self, Desired, ForwardMethod, PortRewrite, Request, Settings, Subject, has_finalizer,
        status_ip,
    },
    events::reason,
    index::ServiceKey,
    render::Entry,
};

mod step;

pub use step::{Answer, Step};

/// An Event to publish on the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Normal or Warning.
    pub type_: EventType,
    /// One of [`reason`].
    pub reason: &'static str,
    /// What the syncer was doing.
    pub action: &'static str,
    /// What happened.
    pub message: String,
}

impl Note {
    fn warning(reason: &'static str, action: &'static str, message: String) -> Self {
        Note {
            type_: EventType::Warning,
            reason,
            action,
            message,
        }
    }

    fn normal(reason: &'static str, action: &'static str, message: String) -> Self {
        Note {
            type_: EventType::Normal,
            reason,
            action,
            message,
        }
    }
}

/// Events settled together: the reasons whose published Events are
/// forgotten (so they are published again if they come back), then the
/// Events to publish.
#[derive(Debug, Default)]
struct Notes {
    clear: Vec<&'static str>,
    publish: Vec<Note>,
}

impl Notes {
    /// The steps: every reason cleared, then every Event published.
    fn steps(self) -> impl Iterator<Item = Step> {
        let clear = self.clear.into_iter().map(Step::ClearReason);
        clear.chain(self.publish.into_iter().map(Step::PublishEvent))
    }
}

/// What a reconcile does with a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not this syncer's Service, or nothing left to clean up: no step.
    Ignore,
    /// Publish the Events and allocate nothing: what the Service has stays.
    Refuse(Vec<Step>),
    /// Give the Service its address.
    Apply(Apply),
    /// Take the Service's address away.
    Cleanup(Cleanup),
}

impl Plan {
    /// The first steps, up to and including the call whose answer decides
    /// the rest.
    pub fn steps(&self) -> Vec<Step> {
        match self {
            Plan::Ignore => Vec::new(),
            Plan::Refuse(steps) => steps.clone(),
            Plan::Apply(a) => a.steps.clone(),
            Plan::Cleanup(_) => vec![Step::Release],
        }
    }

    /// The steps an answer adds, taken before any step that was still to
    /// come: after a failed release, those of [`failure`] (which end the
    /// reconcile); after a clean-up's release, those of
    /// [`Cleanup::released`]; after the allocation, those of
    /// [`Apply::outcome`]. Any other answer adds nothing.
    pub fn then(&self, answer: &Answer) -> Vec<Step> {
        match (self, answer) {
            (
                _,
                Answer::Released {
                    released: Err(e), ..
                },
            ) => failure(e),
            (
                Plan::Cleanup(c),
                Answer::Released {
                    released: Ok(released),
                    indexed,
                    cleaning,
                },
            ) => c.released(*released, *indexed, *cleaning),
            (Plan::Apply(a), Answer::Allocated(answer, holder)) => {
                a.outcome(answer.as_ref(), holder.as_ref())
            }
            _ => Vec::new(),
        }
    }
}

/// Giving a Service its address: the first [`steps`](Apply::steps), and
/// what [`Apply::outcome`] needs to decide what follows the allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Apply {
    /// The Service.
    pub subject: Subject,
    /// In order: the Events, the finalizer, adoption of every address in
    /// use (before a new one), the allocation (a move, when the Service asks
    /// for another address than the one in its status).
    pub steps: Vec<Step>,
    /// The address in the Service's status.
    pub status: Option<IpAddr>,
    /// The address from before vipam, for a Service without a status.
    pub adopted: Option<IpAddr>,
    /// The forward method of its ConfigMap entry.
    pub forward_method: Option<ForwardMethod>,
    /// The ports keepalived rewrites to the virtual port (forward method DR).
    pub port_rewrites: Vec<PortRewrite>,
}

/// Taking a Service's address away: a release first, then what
/// [`Cleanup::released`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleanup {
    /// The Service.
    pub subject: Subject,
    /// Whether this syncer manages the Service (it is being deleted).
    pub managed: bool,
    /// Whether it had an address from before vipam.
    pub adoptable: bool,
    /// Whether it is being deleted (its Events are then forgotten).
    pub deleting: bool,
    /// Whether its status is cleared: it stays, with an address.
    pub clear_status: bool,
}

/// What a reconcile does with the Service.
pub fn plan(svc: &Service, settings: &Settings, adoptable: &Adoptable) -> Plan {
    let d = desired::desired(svc, settings);
    let deleting = svc.metadata.deletion_timestamp.is_some();
    if !deleting && d.managed {
        return apply(svc, d, adoptable);
    }
    if !has_finalizer(svc) || !(d.managed || desired::may_have_been_managed(svc, settings)) {
        return Plan::Ignore;
    }
    let subject = Subject::of(svc);
    Plan::Cleanup(Cleanup {
        managed: d.managed,
        adoptable: adoptable.of(&subject).is_some(),
        deleting,
        clear_status: !deleting && status_ip(svc).is_some(),
        subject,
    })
}

fn invalid(problem: &impl ToString) -> Note {
    Note::warning(reason::INVALID_ANNOTATION, "Validate", problem.to_string())
}

fn apply(svc: &Service, d: Desired, adoptable: &Adoptable) -> Plan {
    let mut notes = Notes {
        clear: Vec::new(),
        publish: d.warnings.iter().map(invalid).collect(),
    };
    let request = match d.request {
        Ok(r) => r,
        Err(problem) => {
            notes.publish.push(invalid(&problem));
            return Plan::Refuse(notes.steps().collect());
        }
    };
    if d.warnings.is_empty() {
        notes.clear.push(reason::INVALID_ANNOTATION);
    }
    if let Some(ip) = request.address.filter(IpAddr::is_ipv6) {
        notes.publish.push(Note::warning(
            reason::IPV6_NOT_SUPPORTED,
            "Allocate",
            format!(
                "the requested address {ip} is IPv6, which kube-keepalived-vip cannot announce (its ConfigMap keys cannot hold ':'); it is not allocated"
            ),
        ));
        return Plan::Refuse(notes.steps().collect());
    }
    let subject = Subject::of(svc);
    let status = status_ip(svc);
    let adopted = status.is_none().then(|| adoptable.of(&subject)).flatten();
    let (ask, adopt_first) = match (status, request.address) {
        // The user asks for another address: move (and only then), in one
        // write, so the old address is never free for another claimant and a
        // refused move leaves the Service what it holds.
        (Some(have), Some(want)) if have != want => (
            Request {
                moving: true,
                ..request
            },
            false,
        ),
        (Some(have), _) => (Request::keep(have), false),
        (None, Some(_)) => (request, false),
        (None, None) => match adopted {
            Some(ip) => (Request::keep(ip), false),
            None => (request, true),
        },
    };
    let steps = notes
        .steps()
        .chain((!has_finalizer(svc)).then_some(Step::AddFinalizer))
        .chain(adopt_first.then_some(Step::AdoptAll))
        .chain([Step::Allocate(ask)])
        .collect();
    Plan::Apply(Apply {
        subject,
        steps,
        status,
        adopted,
        forward_method: d.forward_method,
        port_rewrites: d.port_rewrites,
    })
}

fn port_rewrite(rewrites: &[PortRewrite]) -> Note {
    let ports: Vec<String> = rewrites.iter().map(ToString::to_string).collect();
    Note::warning(
        reason::PORT_REWRITE,
        "Validate",
        format!(
            "the forward method DR cannot translate ports: keepalived will rewrite each real server's port to the virtual port, so the pods are reached on the Service port, not on the targetPort, for {}",
            ports.join(", ")
        ),
    )
}

/// The warnings about what the Service is given: the ports keepalived
/// rewrites, an address outside every pool. A warning that no longer holds
/// is forgotten, so that it is published again if it comes back.
fn given(ip: IpAddr, pool: &str, rewrites: &[PortRewrite]) -> Notes {
    let mut notes = Notes::default();
    if rewrites.is_empty() {
        notes.clear.push(reason::PORT_REWRITE);
    } else {
        notes.publish.push(port_rewrite(rewrites));
    }
    if pool.is_empty() {
        notes.publish.push(Note::warning(
            reason::OUTSIDE_POOLS,
            "Allocate",
            format!(
                "{ip} lies outside every pool of the allocator: the Service keeps it, but no pool reserves it for Services; make sure nothing else on the network uses it, or add it to a pool"
            ),
        ));
    } else {
        notes.clear.push(reason::OUTSIDE_POOLS);
    }
    notes
}

/// What a failed call to the allocator means for the Service: a Service
/// whose pool is full waits for a release; every address is adopted again
/// when the allocator was unreachable (it may come back without its data);
/// then the Event, then the reconcile fails. A refused move changed
/// nothing: the Service keeps the address its status names.
pub fn failure(error: &AllocError) -> Vec<Step> {
    let unreachable = matches!(error, AllocError::Unreachable(_));
    let full = matches!(error, AllocError::Exhausted(_));
    let note = Note::warning(reason::ALLOCATION_FAILED, "Allocate", error.to_string());
    full.then_some(Step::WaitForRelease)
        .into_iter()
        .chain(unreachable.then_some(Step::RequireAdoption))
        .chain([Step::PublishEvent(note), Step::Fail(error.clone())])
        .collect()
}

fn from_pool(pool: &str) -> String {
    if pool.is_empty() {
        "outside every pool".to_string()
    } else {
        format!("from pool {pool}")
    }
}

impl Apply {
    /// The steps that follow the allocator's answer, given the Service the
    /// index holds the answered address for. An address in answer first
    /// forgets the earlier allocation-failed Events. Another Service's
    /// address means the allocator lost its state: give it back, adopt every
    /// address again and fail. An IPv6 address, which nothing can announce,
    /// is released (a later change of pool then allocates anew) with an
    /// Event, and the entry dropped. Otherwise the entry is recorded; a new
    /// address is written to the status and announced; then the warnings of
    /// what it is given.
    pub fn outcome(
        &self,
        answer: Result<&Allocated, &AllocError>,
        holder: Option<&ServiceKey>,
    ) -> Vec<Step> {
        let Allocated { ip, pool } = match answer {
            Ok(a) => a,
            Err(e) => return failure(e),
        };
        let ip = *ip;
        let mut steps = vec![Step::ClearReason(reason::ALLOCATION_FAILED)];
        if let Some(holder) = holder.filter(|h| **h != self.subject.key()) {
            steps.extend([
                Step::GiveBack,
                Step::RequireAdoption,
                Step::FailStale {
                    ip,
                    holder: holder.clone(),
                },
            ]);
            return steps;
        }
        if ip.is_ipv6() {
            steps.extend([
                Step::Release,
                Step::PublishEvent(Note::warning(
                    reason::IPV6_NOT_SUPPORTED,
                    "Allocate",
                    format!(
                        "{ip} {} is IPv6, which kube-keepalived-vip cannot announce (its ConfigMap keys cannot hold ':'); it is released and not published",
                        from_pool(pool)
                    ),
                )),
                Step::DropEntry,
            ]);
            return steps;
        }
        let entry = Entry::of(&self.subject, self.forward_method);
        steps.extend([Step::RecordEntry { ip, entry }, Step::CountManaged]);
        if self.status != Some(ip) {
            steps.extend([Step::PatchStatus(Some(ip)), self.announce(ip, pool)]);
        }
        steps.extend(given(ip, pool, &self.port_rewrites).steps());
        steps.push(Step::SettleWrites);
        steps
    }

    /// The Event of a new address in the status.
    fn announce(&self, ip: IpAddr, pool: &str) -> Step {
        let how = if self.adopted == Some(ip) {
            "adopted"
        } else {
            "allocated"
        };
        let message = format!("{how} {ip} {}", from_pool(pool));
        Step::PublishEvent(Note::normal(reason::ALLOCATED, "Allocate", message))
    }
}

impl Cleanup {
    /// The steps that follow the release, given whether the index held an
    /// entry of the Service and whether its clean-up started here. The
    /// clean-up goes on only for a Service this syncer served: always one it
    /// manages; otherwise only when the allocator released an address of
    /// it, the index holds it, it had an address from before vipam or its
    /// clean-up began here (another implementation may hold the same
    /// finalizer). Then: drop the entry and wait until the ConfigMap no
    /// longer holds it, clear the status (of a Service that stays), drop the
    /// finalizer, and, when an address was released, its Event and a wake-up
    /// of the Services waiting for a free address.
    pub fn released(&self, released: Option<IpAddr>, indexed: bool, cleaning: bool) -> Vec<Step> {
        let served = self.managed || released.is_some() || indexed || self.adoptable || cleaning;
        if !served {
            return vec![Step::LeaveFinalizer];
        }
        let note = |ip| Note::normal(reason::RELEASED, "Release", format!("released {ip}"));
        [
            Step::MarkCleaning,
            Step::DropEntry,
            Step::CountManaged,
            Step::WaitConfigMapPublished,
        ]
        .into_iter()
        .chain(self.clear_status.then_some(Step::PatchStatus(None)))
        .chain([Step::RemoveFinalizer, Step::UnmarkCleaning])
        .chain(
            released
                .into_iter()
                .flat_map(|ip| [Step::PublishEvent(note(ip)), Step::WakeWaiting]),
        )
        .chain(self.deleting.then_some(Step::ForgetEvents))
        .chain([Step::SettleWrites])
        .collect()
    }
}

#[cfg(test)]
mod tests;
