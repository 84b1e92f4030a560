//! The syncer's writes to a Service: the finalizer's JSON patches, the
//! status patches, and [`OwnWrites`], which waits until the Service cache
//! has seen them.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;

use crate::{desired::FINALIZER, error::Error};

/// Longest a reconcile waits for the Service cache to see its own writes.
const CACHE_WAIT: Duration = Duration::from_secs(2);

/// The resourceVersions a reconcile's own writes took its Service through.
///
/// The next reconcile of a Service reads it from the watch cache, which
/// learns of a write a moment after the write returns. Starting from the
/// copy from before the write, it would write the same again (a second
/// status PATCH for every new Service under load). So a reconcile that wrote
/// returns only once the cache holds none of the versions its writes
/// replaced; resourceVersions are only compared for equality.
pub struct OwnWrites {
    replaced: Vec<String>,
    last: Option<String>,
}

impl From<&Service> for OwnWrites {
    fn from(svc: &Service) -> Self {
        OwnWrites {
            replaced: svc.metadata.resource_version.clone().into_iter().collect(),
            last: None,
        }
    }
}

impl OwnWrites {
    /// Records a write, from the object it returned.
    pub fn wrote(&mut self, written: &Service) {
        if let Some(rv) = written.metadata.resource_version.clone()
            && let Some(previous) = self.last.replace(rv)
        {
            self.replaced.push(previous);
        }
    }

    /// Waits (at most [`CACHE_WAIT`]) until the cache holds the Service as
    /// last written or later, or no longer holds it.
    pub async fn settle(&self, services: &Store<Service>, svc: &Service) {
        if self.last.is_none() {
            return;
        }
        let object = ObjectRef::from_obj(svc);
        let deadline = tokio::time::Instant::now() + CACHE_WAIT;
        loop {
            let stale = services.get(&object).is_some_and(|cached| {
                cached
                    .metadata
                    .resource_version
                    .as_ref()
                    .is_some_and(|rv| self.replaced.contains(rv))
            });
            if !stale {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(service = %object, "the Service cache has not caught up with the last write");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn json_patch(ops: serde_json::Value) -> Result<json_patch::Patch, Error> {
    serde_json::from_value(ops).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))
}

/// Adds the finalizer; the Service as written.
pub async fn add_finalizer(api: &Api<Service>, svc: &Service) -> Result<Service, Error> {
    let patch = match &svc.metadata.finalizers {
        None => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
        Some(existing) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": existing},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    };
    Ok(api
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch(patch)?),
        )
        .await?)
}

/// Drops the finalizer; the Service as written, or `None` when it had none.
pub async fn remove_finalizer(api: &Api<Service>, svc: &Service) -> Result<Option<Service>, Error> {
    let Some(i) = svc
        .metadata
        .finalizers
        .as_ref()
        .and_then(|f| f.iter().position(|x| x == FINALIZER))
    else {
        return Ok(None);
    };
    let path = format!("/metadata/finalizers/{i}");
    let patch = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]);
    Ok(Some(
        api.patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch(patch)?),
        )
        .await?,
    ))
}

/// Writes the Service's address to its status, or clears it (`None`); the
/// Service as written.
pub async fn patch_status(
    api: &Api<Service>,
    svc: &Service,
    ip: Option<IpAddr>,
) -> Result<Service, Error> {
    let ingress = ip.map(|ip| json!([{"ip": ip.to_string()}]));
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    Ok(api
        .patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}
