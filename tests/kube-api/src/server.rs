//! The test server as tests use it: start on a loopback port, seed and read objects,
//! inspect the request log, inject faults, and hand out clients and kubeconfigs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{ApiError, Result};
use crate::faults::{Fault, Faults, LoggedRequest};
use crate::http::{AppState, router};
use crate::kubeconfig;
use crate::registry::{Registry, Target, WriteOptions};
use crate::resources;

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// How often watches that allow bookmarks get one (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// How many changes are kept for watches and paginated lists before older ones expire.
    pub max_history: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bookmark_interval: Duration::from_secs(60),
            max_history: 100_000,
        }
    }
}

/// A running Kubernetes API test server. Dropping it stops it.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    registry: Arc<Registry>,
    faults: Arc<Faults>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on `127.0.0.1:0` with default settings.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Config::default()).await
    }

    /// Starts a server with these settings.
    pub async fn start_with(config: Config) -> std::io::Result<Self> {
        let Config {
            listen,
            bookmark_interval,
            max_history,
        } = config;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let registry = Arc::new(Registry::new(max_history, bookmark_interval));
        let faults = Arc::new(Faults::default());
        let state = AppState {
            registry: registry.clone(),
            faults: faults.clone(),
            server_address: addr.to_string(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let app = router(state);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "kube api test server stopped");
            }
        });
        tracing::info!(%addr, "kube api test server listening");
        Ok(Self {
            addr,
            registry,
            faults,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig (plain HTTP, no credentials, namespace `default`) for this server.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        kubeconfig::write(path.as_ref(), &self.url())
    }

    /// A kube client for this server, default namespace `default`.
    pub fn client(&self) -> Result<kube::Client, kube::Error> {
        let uri: http::Uri = self
            .url()
            .parse()
            .map_err(|e: http::uri::InvalidUri| kube::Error::Service(e.into()))?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        kube::Client::try_from(config)
    }

    /// Creates an object through the same rules as a POST (defaults, validation, events),
    /// with field manager `vipam-kube-api-seed`. The object names its `apiVersion` and `kind`.
    pub fn seed(&self, obj: Value) -> Result<Value> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let view = resources::find_kind(api_version, kind).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "this server does not serve {kind} in {api_version}"
            ))
        })?;
        let namespace = view.namespaced.then(|| {
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned()
        });
        let target = Target {
            view,
            namespace,
            name: None,
            subresource: None,
        };
        let opts = WriteOptions {
            field_manager: "vipam-kube-api-seed".into(),
            ..WriteOptions::default()
        };
        Ok(self.registry.create(&target, obj, &opts)?.object)
    }

    /// [`seed`](Self::seed) for a typed object.
    pub fn seed_typed<K>(&self, obj: &K) -> Result<K>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut v = serde_json::to_value(obj).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        v["apiVersion"] = Value::from(K::api_version(&()).into_owned());
        v["kind"] = Value::from(K::kind(&()).into_owned());
        let stored = self.seed(v)?;
        serde_json::from_value(stored).map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Replaces the status of an object as a controller writing `/status` would.
    pub fn set_status(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value> {
        let view = resources::find_loose(resource)
            .ok_or_else(|| ApiError::BadRequest(format!("unknown resource {resource}")))?;
        let target = Target {
            view,
            namespace: namespace.map(str::to_owned),
            name: Some(name.to_owned()),
            subresource: Some("status".into()),
        };
        let patch = serde_json::json!({ "status": status }).to_string();
        let opts = WriteOptions {
            field_manager: "vipam-kube-api-seed".into(),
            ..WriteOptions::default()
        };
        Ok(self
            .registry
            .patch(
                &target,
                crate::registry::PatchType::Merge,
                patch.as_bytes(),
                &opts,
            )?
            .object)
    }

    /// The stored object, by resource (`services`, `svc`, `Service`, `leases`, ...), namespace and name.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let view = resources::find_loose(resource)?;
        let target = Target {
            view,
            namespace: namespace.map(str::to_owned),
            name: Some(name.to_owned()),
            subresource: None,
        };
        self.registry.get(&target).ok()
    }

    /// The stored object, typed.
    pub fn get_typed<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let view = resources::find_kind(&K::api_version(&()), &K::kind(&()))?;
        let target = Target {
            view,
            namespace: namespace.map(str::to_owned),
            name: Some(name.to_owned()),
            subresource: None,
        };
        let v = self.registry.get(&target).ok()?;
        serde_json::from_value(v).ok()
    }

    /// Every stored object of a resource, optionally in one namespace, as list items.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let Some(view) = resources::find_loose(resource) else {
            return Vec::new();
        };
        let target = Target {
            view,
            namespace: namespace.map(str::to_owned),
            name: None,
            subresource: None,
        };
        self.registry
            .list(&target, &crate::registry::ListOptions::default())
            .ok()
            .and_then(|l| l.get("items").and_then(Value::as_array).cloned())
            .unwrap_or_default()
    }

    /// How many stored objects of a resource, optionally in one namespace, satisfy `what`,
    /// looking at each in storage form without copying it (cheap enough to poll with
    /// thousands of objects stored).
    pub fn count(
        &self,
        resource: &str,
        namespace: Option<&str>,
        what: impl Fn(&Value) -> bool,
    ) -> usize {
        let Some(view) = resources::find_loose(resource) else {
            return 0;
        };
        self.registry
            .lock()
            .map(|store| {
                store
                    .list(view.storage, namespace)
                    .iter()
                    .filter(|(_, obj)| what(obj))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The resourceVersion of the last write.
    pub fn resource_version(&self) -> u64 {
        self.registry.lock().map(|s| s.current_rv()).unwrap_or(0)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.faults.requests()
    }

    /// Returns the requests so far and clears the log.
    pub fn take_requests(&self) -> Vec<LoggedRequest> {
        self.faults.take_requests()
    }

    /// Clears the request log.
    pub fn clear_requests(&self) {
        self.faults.take_requests();
    }

    /// Fails the next matching requests (see [`Fault`]).
    pub fn fail_next(&self, fault: Fault) {
        self.faults.add(fault);
    }

    /// Delays every request.
    pub fn set_latency(&self, latency: Duration) {
        self.faults.set_latency(latency);
    }

    /// Removes every pending fault and the latency.
    pub fn clear_faults(&self) {
        self.faults.clear();
    }

    /// Ends every open watch stream.
    pub fn close_watches(&self) {
        self.registry.close_watches();
    }

    /// Drops the change history: the next watch or continue token from an older
    /// resourceVersion gets 410 Expired.
    pub fn compact(&self) {
        if let Err(e) = self.registry.compact() {
            tracing::error!(error = %e, "cannot compact");
        }
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        self.registry.close_watches();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.registry.close_watches();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
