//! What to do with one Service, decided by pure functions of the Service,
//! what the syncer knows of it and the settings. [`plan`] decides before any
//! call: leave the Service alone, refuse it (Events only), apply it (the
//! finalizer, what to release and what to ask the allocator for) or clean it
//! up. What follows an answer of the allocator is decided by
//! [`Apply::outcome`], [`failure`] and the methods of [`Cleanup`]. The
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

/// Events settled before anything else: the reasons whose published Events
/// are forgotten (so they are published again if they come back), then the
/// Events to publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Notes {
    /// Reasons to forget.
    pub clear: Vec<&'static str>,
    /// Events to publish, in order.
    pub publish: Vec<Note>,
}

/// What a reconcile does with a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not this syncer's Service, or nothing left to clean up.
    Ignore,
    /// Publish the Events and allocate nothing: what the Service has stays.
    Refuse(Notes),
    /// Give the Service its address.
    Apply(Apply),
    /// Take the Service's address away.
    Cleanup(Cleanup),
}

/// Giving a Service its address, in order: the Events, the finalizer, a
/// release (when it moves), adoption of every address in use (before a new
/// one), the allocation (an address in answer forgets the earlier
/// allocation-failed Events), then what [`Apply::outcome`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Apply {
    /// The Service.
    pub subject: Subject,
    /// Events first.
    pub notes: Notes,
    /// Whether the finalizer is to be added.
    pub add_finalizer: bool,
    /// The address in the Service's status.
    pub status: Option<IpAddr>,
    /// Whether the held address is released first: the Service asks for
    /// another one.
    pub release_first: bool,
    /// Whether every address in use is adopted first: the Service may get a
    /// new address.
    pub adopt_first: bool,
    /// What to ask the allocator for.
    pub ask: Request,
    /// The address from before vipam, for a Service without a status.
    pub adopted: Option<IpAddr>,
    /// The forward method of its ConfigMap entry.
    pub forward_method: Option<ForwardMethod>,
    /// The ports keepalived rewrites to the virtual port (forward method DR).
    pub port_rewrites: Vec<PortRewrite>,
}

/// A failed call to the allocator: its Event, and what else it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The failure, returned as the reconcile's error.
    pub error: AllocError,
    /// The Event.
    pub note: Note,
    /// Whether every address is adopted again before a new one: an
    /// allocator that was unreachable may come back without its data.
    pub adopt_again: bool,
    /// Whether the Service is reconciled again after the next release: its
    /// pool is full.
    pub wait_for_release: bool,
    /// The address the Service held before a refused move, claimed back so
    /// that it keeps it (its status and entry still name it) and no other
    /// Service is handed it.
    pub reclaim: Option<IpAddr>,
}

/// What to do with the allocator's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The allocation failed.
    Failed(Failure),
    /// Another Service holds the address: the allocator lost its state.
    /// Give the address back, adopt every address again and fail.
    Stale {
        /// The address.
        ip: IpAddr,
        /// Who holds it.
        holder: ServiceKey,
    },
    /// The address is IPv6, which nothing can announce: release it (a later
    /// change of pool then allocates anew), publish the Event, drop the
    /// ConfigMap entry.
    Ipv6 {
        /// The Event.
        note: Note,
    },
    /// Record the entry; with `announce`, write the address to the status,
    /// then publish the Event; then settle the `notes`.
    Publish {
        /// The address.
        ip: IpAddr,
        /// The ConfigMap entry.
        entry: Entry,
        /// The Event of a new address in the status.
        announce: Option<Note>,
        /// The warnings of the entry (a port rewrite) and of an address
        /// outside every pool, or the forgetting of earlier ones.
        notes: Notes,
    },
}

/// Taking a Service's address away, in order: release it, check that this
/// syncer served the Service ([`Cleanup::served`]), drop the entry and wait
/// until the ConfigMap no longer holds it, clear the status (of a Service
/// that stays), drop the finalizer, then the Event ([`Cleanup::released`]).
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
            return Plan::Refuse(notes);
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
        return Plan::Refuse(notes);
    }
    let subject = Subject::of(svc);
    let status = status_ip(svc);
    let adopted = status.is_none().then(|| adoptable.of(&subject)).flatten();
    let (ask, release_first, adopt_first) = match (status, request.address) {
        // The user asks for another address: move (and only then).
        (Some(have), Some(want)) if have != want => (request, true, false),
        (Some(have), _) => (Request::keep(have), false, false),
        (None, Some(_)) => (request, false, false),
        (None, None) => match adopted {
            Some(ip) => (Request::keep(ip), false, false),
            None => (request, false, true),
        },
    };
    Plan::Apply(Apply {
        subject,
        notes,
        add_finalizer: !has_finalizer(svc),
        status,
        release_first,
        adopt_first,
        ask,
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

/// What a failed allocator call means for the Service.
pub fn failure(error: &AllocError) -> Failure {
    Failure {
        note: Note::warning(reason::ALLOCATION_FAILED, "Allocate", error.to_string()),
        adopt_again: matches!(error, AllocError::Unreachable(_)),
        wait_for_release: false,
        reclaim: None,
        error: error.clone(),
    }
}

fn from_pool(pool: &str) -> String {
    if pool.is_empty() {
        "outside every pool".to_string()
    } else {
        format!("from pool {pool}")
    }
}

impl Apply {
    /// What to do with the allocator's answer, given the Service the index
    /// holds the answered address for.
    pub fn outcome(
        &self,
        answer: Result<&Allocated, &AllocError>,
        holder: Option<&ServiceKey>,
    ) -> Outcome {
        let Allocated { ip, pool } = match answer {
            Ok(a) => a,
            Err(e) => {
                let f = failure(e);
                return Outcome::Failed(Failure {
                    wait_for_release: matches!(e, AllocError::Exhausted(_)),
                    // An unreachable allocator is not asked again now: the
                    // adoption it requires claims the status address.
                    reclaim: self.status.filter(|_| self.release_first && !f.adopt_again),
                    ..f
                });
            }
        };
        let ip = *ip;
        if let Some(holder) = holder.filter(|h| **h != self.subject.key()) {
            return Outcome::Stale {
                ip,
                holder: holder.clone(),
            };
        }
        if ip.is_ipv6() {
            return Outcome::Ipv6 {
                note: Note::warning(
                    reason::IPV6_NOT_SUPPORTED,
                    "Allocate",
                    format!(
                        "{ip} {} is IPv6, which kube-keepalived-vip cannot announce (its ConfigMap keys cannot hold ':'); it is released and not published",
                        from_pool(pool)
                    ),
                ),
            };
        }
        let how = if self.adopted == Some(ip) {
            "adopted"
        } else {
            "allocated"
        };
        Outcome::Publish {
            ip,
            notes: given(ip, pool, &self.port_rewrites),
            entry: Entry::of(&self.subject, self.forward_method),
            announce: (self.status != Some(ip)).then(|| {
                Note::normal(
                    reason::ALLOCATED,
                    "Allocate",
                    format!("{how} {ip} {}", from_pool(pool)),
                )
            }),
        }
    }
}

impl Cleanup {
    /// Whether this syncer served the Service, so that the clean-up goes
    /// on: always when it manages it; otherwise only when the allocator
    /// released an address of it, the index holds it, it had an address from
    /// before vipam or its clean-up began here. Another implementation may
    /// hold the same finalizer.
    pub fn served(&self, released: Option<IpAddr>, indexed: bool, cleaning: bool) -> bool {
        self.managed || released.is_some() || indexed || self.adoptable || cleaning
    }

    /// The Event of the release, once the finalizer is gone; with it, the
    /// Services waiting for a free address are reconciled again.
    pub fn released(&self, released: Option<IpAddr>) -> Option<Note> {
        released.map(|ip| Note::normal(reason::RELEASED, "Release", format!("released {ip}")))
    }
}

#[cfg(test)]
mod tests;
