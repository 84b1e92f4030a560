//! Reconciling one Service: [`reconcile`] asks [`plan`](crate::plan) for
//! the steps and carries them out one by one; where a call's answer decides
//! what follows, the plan gives the next steps
//! ([`Plan::then`](crate::plan::Plan::then)). This module decides nothing:
//! it only knows how each [`Step`] is done.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::{
    Api, Resource,
    runtime::{controller::Action, reflector::ObjectRef},
};

use crate::{
    allocation::Owned,
    context::Context,
    desired::{Request, Subject},
    error::Error,
    index,
    plan::{self, Answer, Note, Step},
    writes::{OwnWrites, add_finalizer, patch_status, remove_finalizer},
};

/// How long a clean-up waits for the ConfigMap to drop the entry.
const CONFIGMAP_WAIT: Duration = Duration::from_secs(30);

/// Reconciles one Service: takes the plan's steps in order, and the steps
/// each answer adds before those still to come.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let plan = plan::plan(&svc, &ctx.settings, ctx.state.adoption.adoptable());
    let mut run = Run::new(&svc, &ctx);
    let mut steps = VecDeque::from(plan.steps());
    while let Some(step) = steps.pop_front() {
        if let Some(answer) = run.take(step).await? {
            let rest = std::mem::take(&mut steps);
            steps = plan.then(&answer).into_iter().chain(rest).collect();
        }
    }
    Ok(Action::await_change())
}

/// One reconcile of a Service under way: what its steps act on, and what
/// earlier steps left for later ones.
struct Run<'a> {
    svc: &'a Service,
    ctx: &'a Context,
    subject: Subject,
    object: ObjectReference,
    api: Api<Service>,
    own: OwnWrites,
    /// The index generation without the Service's entry, once dropped.
    dropped: u64,
}

impl<'a> Run<'a> {
    fn new(svc: &'a Service, ctx: &'a Context) -> Self {
        let subject = Subject::of(svc);
        Run {
            api: Api::namespaced(ctx.clients.kube.clone(), &subject.namespace),
            object: svc.object_ref(&()),
            own: OwnWrites::from(svc),
            dropped: 0,
            subject,
            svc,
            ctx,
        }
    }

    /// Takes one step; the answer of a call whose answer decides what
    /// follows.
    async fn take(&mut self, step: Step) -> Result<Option<Answer>, Error> {
        let Context { clients, state, .. } = self.ctx;
        match step {
            Step::ClearReason(reason) => clients.events.clear(&self.object, reason),
            Step::PublishEvent(note) => self.publish(note).await,
            Step::AddFinalizer => self.own.wrote(&add_finalizer(&self.api, self.svc).await?),
            Step::Release => return Ok(Some(self.release().await)),
            Step::GiveBack => {
                let s = &self.subject;
                let _ = clients.allocator.release(&s.namespace, &s.name).await;
            }
            Step::AdoptAll => self.ctx.adopt_all().await?,
            Step::Allocate(request) => return Ok(Some(self.allocate(&request).await)),
            Step::RequireAdoption => state.adoption.require(),
            Step::WaitForRelease => state.wait_for_release(ObjectRef::from_obj(self.svc)),
            Step::RecordEntry { ip, entry } => {
                state.index.upsert(self.subject.key(), ip, entry);
            }
            Step::DropEntry => self.dropped = state.index.remove(&self.subject.key()),
            Step::CountManaged => index::record_managed(&state.index, &self.ctx.metrics),
            Step::WaitConfigMapPublished => self.wait_published().await?,
            Step::PatchStatus(ip) => {
                self.own
                    .wrote(&patch_status(&self.api, self.svc, ip).await?);
            }
            Step::RemoveFinalizer => {
                if let Some(written) = remove_finalizer(&self.api, self.svc).await? {
                    self.own.wrote(&written);
                }
            }
            Step::MarkCleaning => state.set_cleaning(&self.subject.uid, true),
            Step::UnmarkCleaning => state.set_cleaning(&self.subject.uid, false),
            Step::WakeWaiting => state.wake_waiting(),
            Step::ForgetEvents => clients.events.forget(&self.object),
            Step::SettleWrites => self.own.settle(&state.services, self.svc).await,
            Step::LeaveFinalizer => {
                tracing::debug!(service = %self.subject, "not served by this syncer; its finalizer is left alone");
            }
            Step::Fail(e) => return Err(Error::Alloc(e)),
            Step::FailStale { ip, holder } => {
                return Err(Error::Stale {
                    ip,
                    owner: self.subject.to_string(),
                    holder: format!("{}/{}", holder.0, holder.1),
                });
            }
        }
        Ok(None)
    }

    async fn publish(&self, n: Note) {
        self.ctx
            .clients
            .events
            .publish(&self.object, n.type_, n.reason, n.action, n.message)
            .await;
    }

    async fn release(&self) -> Answer {
        let s = &self.subject;
        let released = self
            .ctx
            .clients
            .allocator
            .release(&s.namespace, &s.name)
            .await;
        Answer::Released {
            released,
            indexed: self.ctx.state.index.address(&s.key()).is_some(),
            cleaning: self.ctx.state.is_cleaning(&s.uid),
        }
    }

    async fn allocate(&self, request: &Request) -> Answer {
        let answer = self
            .ctx
            .clients
            .allocator
            .allocate(&self.subject, request)
            .await;
        let holder = answer
            .as_ref()
            .ok()
            .and_then(|a| self.ctx.state.index.holder(a.ip));
        Answer::Allocated(answer, holder)
    }

    async fn wait_published(&self) -> Result<(), Error> {
        let published = self.ctx.state.index.wait_published(self.dropped);
        tokio::time::timeout(CONFIGMAP_WAIT, published)
            .await
            .map_err(|_| Error::ConfigMapPending(self.subject.to_string()))
    }
}

/// How long to wait before trying a failed Service again.
pub fn error_policy(_svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.reason());
    tracing::warn!(error = %error, "reconcile failed");
    Action::requeue(error.retry_after())
}

/// Releases allocations the syncer owns whose Service is gone: only its own
/// owners (this cluster's form, see [`Owners::parse`](crate::owner::Owners::parse)),
/// never another cluster's. Run after the first full sync.
pub async fn release_orphans(ctx: &Context) -> Result<usize, Error> {
    let allocator = &ctx.clients.allocator;
    let owned = allocator.owned().await?;
    let mut released = 0;
    for Owned {
        service: (ns, name),
        owner,
        address,
    } in owned
    {
        let exists = ctx
            .state
            .services
            .get(&ObjectRef::new(&name).within(&ns))
            .is_some();
        if !exists {
            allocator.release(&ns, &name).await?;
            tracing::info!(
                owner,
                address,
                "released the address of a Service that is gone"
            );
            released += 1;
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests;
