//! Reconciling one Service: [`reconcile`] asks [`plan`](crate::plan) what to
//! do and dispatches to [`apply`] (hold the finalizer, get the address,
//! record it for the ConfigMap, publish it in the status) or [`cleanup`]
//! (the reverse, when the Service goes away or stops being a LoadBalancer).
//! Both carry out their plan step by step; every decision is in the plan.

use std::{net::IpAddr, sync::Arc, time::Duration};

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
    events::reason,
    index,
    plan::{self, Apply, Cleanup, Failure, Note, Notes, Outcome, Plan},
    writes::{OwnWrites, add_finalizer, patch_status, remove_finalizer},
};

/// How long a clean-up waits for the ConfigMap to drop the entry.
const CONFIGMAP_WAIT: Duration = Duration::from_secs(30);

/// Reconciles one Service.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    match plan::plan(&svc, &ctx.settings, ctx.state.adoption.adoptable()) {
        Plan::Ignore => {}
        Plan::Refuse(notes) => publish(&ctx, &svc, notes).await,
        Plan::Apply(p) => apply(&svc, &ctx, p).await?,
        Plan::Cleanup(p) => cleanup(&svc, &ctx, p).await?,
    }
    Ok(Action::await_change())
}

fn reference(svc: &Service) -> ObjectReference {
    svc.object_ref(&())
}

async fn publish(ctx: &Context, svc: &Service, notes: Notes) {
    let object = reference(svc);
    for r in notes.clear {
        ctx.clients.events.clear(&object, r);
    }
    for n in notes.publish {
        tell(ctx, svc, n).await;
    }
}

async fn tell(ctx: &Context, svc: &Service, n: Note) {
    ctx.clients
        .events
        .publish(&reference(svc), n.type_, n.reason, n.action, n.message)
        .await;
}

/// Carries out a failed allocator call; the reconcile's error.
async fn failed(ctx: &Context, svc: &Service, f: Failure) -> Error {
    if f.wait_for_release {
        ctx.state.wait_for_release(ObjectRef::from_obj(svc));
    }
    if f.adopt_again {
        ctx.state.adoption.require();
    }
    if let Some(ip) = f.reclaim {
        let keep = Request::keep(ip);
        if let Err(e) = ctx
            .clients
            .allocator
            .allocate(&Subject::of(svc), &keep)
            .await
        {
            tracing::warn!(address = %ip, error = %e, "claiming back the address of a refused move failed; adopting every address again");
            ctx.state.adoption.require();
        }
    }
    tell(ctx, svc, f.note).await;
    Error::Alloc(f.error)
}

/// Releases whatever the Service holds; a failure is reported as one.
async fn release(ctx: &Context, svc: &Service, s: &Subject) -> Result<Option<IpAddr>, Error> {
    match ctx.clients.allocator.release(&s.namespace, &s.name).await {
        Ok(released) => Ok(released),
        Err(e) => Err(failed(ctx, svc, plan::failure(&e)).await),
    }
}

/// Gives the Service its address: the steps before the allocation, the
/// allocation, then what its outcome says.
async fn apply(svc: &Service, ctx: &Context, mut p: Apply) -> Result<(), Error> {
    publish(ctx, svc, std::mem::take(&mut p.notes)).await;
    let api: Api<Service> = Api::namespaced(ctx.clients.kube.clone(), &p.subject.namespace);
    let mut own = OwnWrites::from(svc);
    if p.add_finalizer {
        own.wrote(&add_finalizer(&api, svc).await?);
    }
    if p.release_first {
        release(ctx, svc, &p.subject).await?;
    }
    if p.adopt_first {
        ctx.adopt_all().await?;
    }
    let answer = ctx.clients.allocator.allocate(&p.subject, &p.ask).await;
    let holder = answer
        .as_ref()
        .ok()
        .and_then(|a| ctx.state.index.holder(a.ip));
    if answer.is_ok() {
        ctx.clients
            .events
            .clear(&reference(svc), reason::ALLOCATION_FAILED);
    }
    let s = &p.subject;
    match p.outcome(answer.as_ref(), holder.as_ref()) {
        Outcome::Failed(f) => Err(failed(ctx, svc, f).await),
        Outcome::Stale { ip, holder } => {
            // Never publish an address twice. Give it back and adopt everything.
            let _ = ctx.clients.allocator.release(&s.namespace, &s.name).await;
            ctx.state.adoption.require();
            Err(Error::Stale {
                ip,
                owner: s.to_string(),
                holder: format!("{}/{}", holder.0, holder.1),
            })
        }
        Outcome::Ipv6 { note } => {
            release(ctx, svc, s).await?;
            tell(ctx, svc, note).await;
            ctx.state.index.remove(&s.key());
            Ok(())
        }
        Outcome::Publish {
            ip,
            entry,
            announce,
            notes,
        } => {
            ctx.state.index.upsert(s.key(), ip, entry);
            index::record_managed(&ctx.state.index, &ctx.metrics);
            if let Some(note) = announce {
                own.wrote(&patch_status(&api, svc, Some(ip)).await?);
                tell(ctx, svc, note).await;
            }
            publish(ctx, svc, notes).await;
            own.settle(&ctx.state.services, svc).await;
            Ok(())
        }
    }
}

/// Releases the address, waits until the ConfigMap no longer holds it, clears
/// the status of a Service that stays, then drops the finalizer; only for a
/// Service this syncer served (see [`Cleanup::served`]).
async fn cleanup(svc: &Service, ctx: &Context, p: Cleanup) -> Result<(), Error> {
    let s = &p.subject;
    let key = s.key();
    let released = release(ctx, svc, s).await?;
    let indexed = ctx.state.index.address(&key).is_some();
    if !p.served(released, indexed, ctx.state.is_cleaning(&s.uid)) {
        tracing::debug!(service = %s, "not served by this syncer; its finalizer is left alone");
        return Ok(());
    }
    ctx.state.set_cleaning(&s.uid, true);
    let generation = ctx.state.index.remove(&key);
    index::record_managed(&ctx.state.index, &ctx.metrics);
    if tokio::time::timeout(CONFIGMAP_WAIT, ctx.state.index.wait_published(generation))
        .await
        .is_err()
    {
        return Err(Error::ConfigMapPending(s.to_string()));
    }
    let api: Api<Service> = Api::namespaced(ctx.clients.kube.clone(), &s.namespace);
    let mut own = OwnWrites::from(svc);
    if p.clear_status {
        own.wrote(&patch_status(&api, svc, None).await?);
    }
    if let Some(written) = remove_finalizer(&api, svc).await? {
        own.wrote(&written);
    }
    ctx.state.set_cleaning(&s.uid, false);
    if let Some(note) = p.released(released) {
        tell(ctx, svc, note).await;
        ctx.state.wake_waiting();
    }
    if p.deleting {
        ctx.clients.events.forget(&reference(svc));
    }
    own.settle(&ctx.state.services, svc).await;
    Ok(())
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
