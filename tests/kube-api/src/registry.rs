//! The API server's behaviour for each verb, independent of HTTP: get, list, create,
//! update, patch (all types), delete, and the namespace lifecycle.
//!
//! Every write goes through one pipeline (`commit`): decode, names and namespaces,
//! system fields, subresource rules, defaults, validation, field ownership, no-op
//! detection, finalizer-driven deletion, and only then storage. That single path is what
//! keeps the rules consistent between POST, PUT, every PATCH type and seeding.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::apply::{self, Scope, Writer};
use crate::defaults::{self, Allocated};
use crate::error::{ApiError, FieldError, GroupResource, Result};
use crate::objects::{
    self, decode, finalizers_of, is_being_deleted, metadata_mut, name_of, namespace_of,
    resource_version_of, storage_to_view, view_to_storage,
};
use crate::patch;
use crate::resources::{self, ResourceInfo, Storage};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Key, Store};
use crate::validation;

/// The namespaces a new cluster has.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// What a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// The resource (view) of the path.
    pub view: &'static ResourceInfo,
    /// Namespace of the path, if any.
    pub namespace: Option<String>,
    /// Object name of the path, if any.
    pub name: Option<String>,
    /// Subresource of the path (`status`), if any.
    pub subresource: Option<String>,
}

impl Target {
    fn key(&self) -> Key {
        (
            self.view.storage,
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }

    fn not_found(&self) -> ApiError {
        ApiError::NotFound {
            resource: self.view.group_resource(),
            name: self.name.clone().unwrap_or_default(),
        }
    }

    fn is_status(&self) -> bool {
        self.subresource.as_deref() == Some("status")
    }
}

/// `fieldValidation` of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Drop unknown fields silently.
    Ignore,
    /// Drop unknown fields with a warning header (the default).
    #[default]
    Warn,
    /// Refuse unknown fields.
    Strict,
}

/// Options of a write, from its query.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: do everything but store.
    pub dry_run: bool,
    /// The field manager (from `fieldManager` or the user agent).
    pub field_manager: String,
    /// How to treat unknown fields.
    pub field_validation: FieldValidation,
    /// `force=true` for apply.
    pub force: bool,
}

/// The patch formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml`.
    Apply,
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct Written {
    /// The object as the response shows it.
    pub object: Value,
    /// Whether the write created the object (201).
    pub created: bool,
    /// `Warning` headers to send.
    pub warnings: Vec<String>,
}

/// The result of a delete.
#[derive(Debug, Clone)]
pub enum Deleted {
    /// The object is gone; the body is a success Status.
    Gone(Value),
    /// The object waits for finalizers; the body is the object.
    Pending(Value),
}

/// Options of a delete, from its body.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `dryRun` (from the body or the query).
    pub dry_run: bool,
}

/// Options of a list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit` (0 or absent: everything).
    pub limit: Option<usize>,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
}

/// The state of the server and the rules applied to it.
#[derive(Debug)]
pub struct Registry {
    store: Mutex<Store>,
    rv_tx: watch::Sender<u64>,
    close_tx: watch::Sender<u64>,
    /// How often open watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

fn generated_suffix() -> String {
    // The alphabet of the real name generator: no vowels, no confusable digits.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(5)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn continue_token(rv: u64, start: &str) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{start}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.to_string())
}

fn parse_continue(token: &str) -> Result<(u64, String)> {
    let bad = |why: &str| ApiError::BadRequest(format!("continue key is not valid: {why}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad("illegal base64 data"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not a continue token"))?;
    if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
        return Err(bad(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = v
        .get("rv")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("incorrect encoded start resourceVersion"))?;
    let start = v
        .get("start")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no start key"))?;
    Ok((rv, start.trim_end_matches('\u{0}').to_owned()))
}

fn parse_rv(rv: &str) -> Result<u64> {
    rv.parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid resource version: {rv:?}")))
}

impl Registry {
    /// A registry with the default namespaces, keeping `max_history` changes for watches.
    pub fn new(max_history: usize, bookmark_interval: Duration) -> Self {
        let (rv_tx, _) = watch::channel(1);
        let (close_tx, _) = watch::channel(0);
        let registry = Self {
            store: Mutex::new(Store::new(max_history)),
            rv_tx,
            close_tx,
            bookmark_interval,
        };
        let ns_view = resources::storage_view(Storage::Namespaces);
        for ns in DEFAULT_NAMESPACES {
            let target = Target {
                view: ns_view,
                namespace: None,
                name: None,
                subresource: None,
            };
            let opts = WriteOptions {
                field_manager: "kube-apiserver".into(),
                ..WriteOptions::default()
            };
            if let Err(e) = registry.create(&target, json!({"metadata": {"name": ns}}), &opts) {
                tracing::error!(error = %e, namespace = ns, "cannot create a default namespace");
            }
        }
        registry
    }

    /// Locks the store.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Store>> {
        self.store
            .lock()
            .map_err(|_| ApiError::Internal("the store lock is poisoned".into()))
    }

    /// Watches the latest resourceVersion.
    pub(crate) fn subscribe_rv(&self) -> watch::Receiver<u64> {
        self.rv_tx.subscribe()
    }

    /// Watches the "close every watch" epoch.
    pub(crate) fn subscribe_close(&self) -> watch::Receiver<u64> {
        self.close_tx.subscribe()
    }

    /// Ends every open watch stream, as an API server restart or a load balancer would.
    pub fn close_watches(&self) {
        self.close_tx.send_modify(|e| *e += 1);
    }

    /// Forgets all history, so any watch or continue token from an older resourceVersion gets 410.
    pub fn compact(&self) -> Result<()> {
        self.lock()?.compact();
        Ok(())
    }

    fn notify(&self, store: &Store) {
        self.rv_tx.send_replace(store.current_rv());
    }

    /// GET of one object.
    pub fn get(&self, t: &Target) -> Result<Value> {
        let store = self.lock()?;
        let obj = store.get(&t.key()).ok_or_else(|| t.not_found())?;
        Ok(storage_to_view(t.view, &obj))
    }

    /// LIST.
    pub fn list(&self, t: &Target, o: &ListOptions) -> Result<Value> {
        let store = self.lock()?;
        let rv_param = o.resource_version.as_deref().filter(|r| !r.is_empty());
        if o.continue_token.is_some() && rv_param.is_some_and(|r| r != "0") {
            return Err(ApiError::BadRequest(
                "specifying resource version is not allowed when using continue".into(),
            ));
        }
        let exact = match o.resource_version_match.as_deref() {
            None | Some("") => rv_param.is_some_and(|r| r != "0") && o.limit.is_some_and(|l| l > 0),
            Some("Exact") if rv_param.is_none_or(|r| r == "0") => {
                return Err(ApiError::BadRequest(
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"".into(),
                ));
            }
            Some("Exact") => true,
            Some("NotOlderThan") if rv_param.is_none() => {
                return Err(ApiError::BadRequest(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                ));
            }
            Some("NotOlderThan") => false,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "unsupported resourceVersionMatch value: {other:?}"
                )));
            }
        };
        let (at, start) = match &o.continue_token {
            Some(token) => {
                let (rv, start) = parse_continue(token)?;
                (Some(rv), Some(start))
            }
            None => match rv_param {
                Some(r) if r != "0" => {
                    let n = parse_rv(r)?;
                    if n > store.current_rv() {
                        return Err(ApiError::Timeout(format!(
                            "Too large resource version: {n}, current: {}",
                            store.current_rv()
                        )));
                    }
                    (exact.then_some(n), None)
                }
                _ => (None, None),
            },
        };
        let list_rv = at.unwrap_or(store.current_rv());
        let objects: Vec<(Key, Arc<Value>)> = match at {
            Some(rv) => store
                .snapshot(t.view.storage, rv)
                .map_err(|_| {
                    if o.continue_token.is_some() {
                        ApiError::Expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into())
                    } else {
                        ApiError::Expired(format!("too old resource version: {rv} ({})", store.oldest_rv()))
                    }
                })?
                .into_iter()
                .collect(),
            None => store.list(t.view.storage, None),
        };
        let key_str = |k: &Key| {
            if k.1.is_empty() {
                k.2.clone()
            } else {
                format!("{}/{}", k.1, k.2)
            }
        };
        let mut matching = objects.into_iter().filter(|(k, obj)| {
            t.namespace.as_deref().is_none_or(|ns| ns == k.1)
                && start.as_deref().is_none_or(|s| key_str(k).as_str() > s)
                && o.labels.matches(&objects::labels_of(obj))
                && o.fields.matches(obj)
        });
        let limit = o.limit.filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut last_key: Option<String> = None;
        for (k, obj) in matching.by_ref() {
            if limit.is_some_and(|l| items.len() >= l) {
                // One more exists: the page is cut here.
                let rest = 1 + matching.count();
                let mut meta = json!({"resourceVersion": list_rv.to_string(), "continue": continue_token(list_rv, &last_key.clone().unwrap_or_default())});
                if o.labels.is_empty() && o.fields.is_empty() {
                    meta["remainingItemCount"] = json!(rest);
                }
                return Ok(self.list_body(t.view, meta, items));
            }
            last_key = Some(key_str(&k));
            items.push(objects::as_list_item(storage_to_view(t.view, &obj)));
        }
        Ok(self.list_body(
            t.view,
            json!({"resourceVersion": list_rv.to_string()}),
            items,
        ))
    }

    fn list_body(&self, view: &ResourceInfo, metadata: Value, items: Vec<Value>) -> Value {
        json!({"kind": view.list_kind(), "apiVersion": view.api_version(), "metadata": metadata, "items": items})
    }

    /// POST.
    pub fn create(&self, t: &Target, body: Value, o: &WriteOptions) -> Result<Written> {
        let mut store = self.lock()?;
        self.commit(&mut store, t, None, body, o, Mode::Create)
    }

    /// PUT.
    pub fn update(&self, t: &Target, body: Value, o: &WriteOptions) -> Result<Written> {
        let mut store = self.lock()?;
        match store.get(&t.key()) {
            Some(old) => self.commit(&mut store, t, Some(old), body, o, Mode::Update),
            None if t.view.create_on_update && t.subresource.is_none() => {
                if !resource_version_of(&body).is_empty() {
                    return Err(t.not_found());
                }
                self.commit(&mut store, t, None, body, o, Mode::Create)
            }
            None => Err(t.not_found()),
        }
    }

    /// PATCH of any type.
    pub fn patch(
        &self,
        t: &Target,
        ty: PatchType,
        body: &[u8],
        o: &WriteOptions,
    ) -> Result<Written> {
        let mut store = self.lock()?;
        let old = store.get(&t.key());
        let parse = || -> Result<Value> {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))
        };
        let base = || {
            old.as_deref()
                .map(|o| storage_to_view(t.view, o))
                .ok_or_else(|| t.not_found())
        };
        let patched = match ty {
            PatchType::Apply => return self.apply(&mut store, t, old.clone(), body, o),
            PatchType::Merge => patch::merge_patch(base()?, &parse()?)?,
            PatchType::Json => patch::json_patch(base()?, &parse()?)?,
            PatchType::Strategic => patch::strategic_merge_patch(base()?, &parse()?, t.view.kind)?,
        };
        let old = old.ok_or_else(|| t.not_found())?;
        self.commit(&mut store, t, Some(old), patched, o, Mode::Update)
    }

    fn apply(
        &self,
        store: &mut Store,
        t: &Target,
        old: Option<Arc<Value>>,
        body: &[u8],
        o: &WriteOptions,
    ) -> Result<Written> {
        let config: Value = serde_yaml::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?;
        if !config.is_object() {
            return Err(ApiError::BadRequest(
                "the apply configuration must be an object".into(),
            ));
        }
        for field in ["apiVersion", "kind"] {
            if config
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::BadRequest(format!(
                    "{field} must be set in an apply configuration"
                )));
            }
        }
        if config
            .pointer("/metadata/managedFields")
            .is_some_and(|m| !m.is_null())
        {
            return Err(ApiError::BadRequest(
                "metadata.managedFields must be nil".into(),
            ));
        }
        // Type-check the configuration on its own, as the real server decodes it.
        decode(t.view, config.clone())?;
        let scope = match (t.is_status(), t.view.has_status) {
            (true, _) => Scope::Status,
            (false, true) => Scope::MainWithStatusSubresource,
            (false, false) => Scope::All,
        };
        let kind = t.view.kind;
        let config_storage = view_to_storage(t.view, config.clone());
        let new_set = apply::field_set(&config_storage, kind, scope);
        let live = match &old {
            Some(o) => (**o).clone(),
            None if t.is_status() => return Err(t.not_found()),
            None => {
                json!({"apiVersion": t.view.api_version(), "kind": t.view.kind, "metadata": {"name": t.name, "namespace": t.namespace}})
            }
        };
        let mut merged = live.clone();
        apply::merge_config(&mut merged, &config_storage, kind);
        let writer = Writer {
            manager: &o.field_manager,
            subresource: t.subresource.as_deref(),
            api_version: &t.view.api_version(),
            now: &objects::now_time(),
        };
        apply::prune_unapplied(&mut merged, &live, kind, &writer, &new_set);
        let candidate = storage_to_view(t.view, &merged);
        let mode = Mode::Apply {
            set: new_set,
            force: o.force,
        };
        match old {
            Some(old) => self.commit(store, t, Some(old), candidate, o, mode),
            None => self.commit(store, t, None, candidate, o, mode),
        }
    }

    /// The write pipeline shared by every verb.
    fn commit(
        &self,
        store: &mut Store,
        t: &Target,
        old: Option<Arc<Value>>,
        candidate: Value,
        o: &WriteOptions,
        mode: Mode,
    ) -> Result<Written> {
        let view = t.view;
        let storage = view.storage;
        let kind = view.kind;
        let (decoded, unknown) = decode(view, candidate)?;
        let mut warnings = Vec::new();
        if !unknown.is_empty() {
            match o.field_validation {
                FieldValidation::Strict => {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|u| format!("unknown field {u:?}"))
                        .collect();
                    return Err(ApiError::BadRequest(format!(
                        "strict decoding error: {}",
                        list.join(", ")
                    )));
                }
                FieldValidation::Warn => {
                    warnings.extend(unknown.iter().map(|u| format!("unknown field {u:?}")))
                }
                FieldValidation::Ignore => {}
            }
        }
        let mut obj = view_to_storage(view, decoded);
        if view.is_events_v1() {
            obj = decode(resources::storage_view(storage), obj)?.0;
        }

        // Names and namespaces: the URL is authoritative.
        let body_name = name_of(&obj).to_owned();
        if let Some(url_name) = &t.name {
            if !body_name.is_empty() && body_name != *url_name {
                return Err(ApiError::BadRequest(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
                )));
            }
            metadata_mut(&mut obj).insert("name".into(), json!(url_name));
        }
        if view.namespaced {
            let url_ns = t.namespace.clone().unwrap_or_default();
            let body_ns = namespace_of(&obj);
            if !body_ns.is_empty() && body_ns != url_ns {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            metadata_mut(&mut obj).insert("namespace".into(), json!(url_ns));
        } else {
            metadata_mut(&mut obj).remove("namespace");
        }

        match &old {
            None => self.prepare_create(store, t, &mut obj, &mode)?,
            Some(old) => {
                obj = prepare_update(t, obj, old)?;
            }
        }
        let name = name_of(&obj).to_owned();
        let key: Key = (storage, namespace_of(&obj).to_owned(), name.clone());

        let mut allocated = Allocated::new(store.held(), old.as_deref());
        defaults::apply(storage, &mut obj, old.as_deref(), &mut allocated)?;
        defaults::ingress_ip_mode(&mut obj);

        let mut errs: Vec<FieldError> = Vec::new();
        if old.is_none() {
            errs.extend(validation::validate_name(storage, &name));
        }
        errs.extend(validation::validate_metadata(&obj));
        errs.extend(validation::validate_object(
            storage,
            &obj,
            old.as_deref(),
            view.is_events_v1(),
        ));
        if let Some(old) = &old {
            errs.extend(validation::validate_finalizers_update(&obj, old));
        }
        if !errs.is_empty() {
            return Err(ApiError::Invalid {
                group: view.group.to_owned(),
                kind: kind.to_owned(),
                name,
                causes: errs,
            });
        }

        let now = objects::now_time();
        let api_version = view.api_version();
        let writer = Writer {
            manager: &o.field_manager,
            subresource: t.subresource.as_deref(),
            api_version: &api_version,
            now: &now,
        };
        let empty = json!({});
        let before = old.as_deref().unwrap_or(&empty);
        match mode {
            Mode::Create | Mode::Update => apply::record_update(before, &mut obj, kind, &writer),
            Mode::Apply { set, force } => apply::record_apply(
                before, &mut obj, kind, &writer, set, force,
            )
            .map_err(|conflicts| ApiError::ApplyConflicts {
                resource: view.group_resource(),
                name: name.clone(),
                conflicts,
            })?,
        }
        objects::shape(storage, &mut obj);

        if let Some(old) = &old {
            let mut a = obj.clone();
            let mut b = (**old).clone();
            metadata_mut(&mut a).remove("resourceVersion");
            metadata_mut(&mut b).remove("resourceVersion");
            if a == b {
                return Ok(Written {
                    object: storage_to_view(view, old),
                    created: false,
                    warnings,
                });
            }
            if is_being_deleted(&obj) && finalizers_of(&obj).is_empty() {
                if !o.dry_run {
                    store.remove(&key);
                    finalize_namespaces(store);
                    self.notify(store);
                }
                return Ok(Written {
                    object: storage_to_view(view, &obj),
                    created: false,
                    warnings,
                });
            }
        }
        if o.dry_run {
            return Ok(Written {
                object: storage_to_view(view, &obj),
                created: old.is_none(),
                warnings,
            });
        }
        let stored = store.put(key, obj);
        self.notify(store);
        Ok(Written {
            object: storage_to_view(view, &stored),
            created: old.is_none(),
            warnings,
        })
    }

    fn prepare_create(
        &self,
        store: &Store,
        t: &Target,
        obj: &mut Value,
        mode: &Mode,
    ) -> Result<()> {
        let view = t.view;
        if !resource_version_of(obj).is_empty() && matches!(mode, Mode::Create) && t.name.is_none()
        {
            return Err(ApiError::Internal(
                "resourceVersion should not be set on objects to be created".into(),
            ));
        }
        if name_of(obj).is_empty() {
            let generate = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if generate.is_empty() {
                return Err(ApiError::invalid_one(
                    view.group,
                    view.kind,
                    "",
                    FieldError::required("metadata.name", "name or generateName is required"),
                ));
            }
            metadata_mut(obj).insert(
                "name".into(),
                json!(format!("{generate}{}", generated_suffix())),
            );
        }
        if view.namespaced {
            let ns = namespace_of(obj).to_owned();
            match store.get(&(Storage::Namespaces, String::new(), ns.clone())) {
                None => {
                    return Err(ApiError::NotFound {
                        resource: GroupResource {
                            group: String::new(),
                            resource: "namespaces".into(),
                        },
                        name: ns,
                    });
                }
                Some(n) if is_being_deleted(&n) => {
                    return Err(ApiError::Forbidden {
                        resource: view.group_resource(),
                        name: name_of(obj).to_owned(),
                        detail: format!(
                            "unable to create new content in namespace {ns} because it is being terminated"
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let key: Key = (
            view.storage,
            namespace_of(obj).to_owned(),
            name_of(obj).to_owned(),
        );
        if store.get(&key).is_some() {
            return Err(ApiError::AlreadyExists {
                resource: view.group_resource(),
                name: key.2,
            });
        }
        let meta = metadata_mut(obj);
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
            "managedFields",
        ] {
            meta.remove(f);
        }
        meta.insert("uid".into(), json!(objects::new_uid()));
        meta.insert("creationTimestamp".into(), json!(objects::now_time()));
        if view.has_status
            && let Value::Object(m) = obj
        {
            m.insert("status".into(), json!({}));
        }
        Ok(())
    }

    /// DELETE of one object.
    pub fn delete(&self, t: &Target, o: &DeleteOptions) -> Result<Deleted> {
        let mut store = self.lock()?;
        let key = t.key();
        let old = store.get(&key).ok_or_else(|| t.not_found())?;
        let uid = old
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let conflict = |detail: String| ApiError::Conflict {
            resource: t.view.group_resource(),
            name: key.2.clone(),
            detail,
        };
        if let Some(want) = o.uid.as_deref().filter(|u| !u.is_empty())
            && want != uid
        {
            return Err(conflict(format!(
                "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
            )));
        }
        if let Some(want) = o.resource_version.as_deref().filter(|r| !r.is_empty()) {
            let have = resource_version_of(&old);
            if want != have {
                return Err(conflict(format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {have}"
                )));
            }
        }
        let pending = t.view.storage == Storage::Namespaces || !finalizers_of(&old).is_empty();
        if is_being_deleted(&old) {
            return Ok(Deleted::Pending(storage_to_view(t.view, &old)));
        }
        if pending {
            let mut obj = (*old).clone();
            let meta = metadata_mut(&mut obj);
            meta.insert("deletionTimestamp".into(), json!(objects::now_time()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            if t.view.storage == Storage::Namespaces {
                obj["status"] = json!({"phase": "Terminating"});
            }
            if o.dry_run {
                return Ok(Deleted::Pending(storage_to_view(t.view, &obj)));
            }
            let stored = store.put(key.clone(), obj);
            finalize_namespaces(&mut store);
            self.notify(&store);
            let shown = store.get(&key).unwrap_or(stored);
            return Ok(Deleted::Pending(storage_to_view(t.view, &shown)));
        }
        if !o.dry_run {
            store.remove(&key);
            finalize_namespaces(&mut store);
            self.notify(&store);
        }
        let mut details = json!({"name": key.2, "kind": t.view.plural, "uid": uid});
        if !t.view.group.is_empty() {
            details["group"] = json!(t.view.group);
        }
        Ok(Deleted::Gone(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
        ))
    }
}

/// How a write came in, for field ownership.
#[derive(Debug)]
enum Mode {
    Create,
    Update,
    Apply { set: apply::FieldSet, force: bool },
}

/// Carries system fields over from the stored object and applies the subresource rules.
fn prepare_update(t: &Target, mut obj: Value, old: &Value) -> Result<Value> {
    let conflict = |detail: String| ApiError::Conflict {
        resource: t.view.group_resource(),
        name: name_of(old).to_owned(),
        detail,
    };
    let rv = resource_version_of(&obj);
    if !rv.is_empty() && rv != resource_version_of(old) {
        return Err(conflict("the object has been modified; please apply your changes to the latest version and try again".into()));
    }
    let old_uid = old
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !uid.is_empty() && uid != old_uid {
        return Err(conflict(format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
        )));
    }
    if t.is_status() {
        // The status subresource changes status and nothing else.
        let mut next = old.clone();
        if let Value::Object(m) = &mut next {
            match obj.get("status") {
                Some(s) => m.insert("status".into(), s.clone()),
                None => m.remove("status"),
            };
        }
        return Ok(next);
    }
    let meta = metadata_mut(&mut obj);
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "managedFields",
        "resourceVersion",
    ] {
        match old.pointer(&format!("/metadata/{f}")) {
            Some(v) => meta.insert(f.to_owned(), v.clone()),
            None => meta.remove(f),
        };
    }
    if t.view.has_status
        && let Value::Object(m) = &mut obj
    {
        match old.get("status") {
            Some(s) => m.insert("status".into(), s.clone()),
            None => m.remove("status"),
        };
    }
    Ok(obj)
}

/// The namespace controller: content of a terminating namespace is deleted (objects with
/// finalizers are marked), and the namespace goes once it is empty.
fn finalize_namespaces(store: &mut Store) {
    let terminating: Vec<Key> = store
        .list(Storage::Namespaces, None)
        .into_iter()
        .filter(|(_, ns)| is_being_deleted(ns))
        .map(|(k, _)| k)
        .collect();
    for ns_key in terminating {
        let ns = ns_key.2.clone();
        let mut remaining = 0;
        for storage in [
            Storage::Services,
            Storage::ConfigMaps,
            Storage::Events,
            Storage::Leases,
        ] {
            for (key, obj) in store.list(storage, Some(&ns)) {
                if finalizers_of(&obj).is_empty() {
                    store.remove(&key);
                    continue;
                }
                remaining += 1;
                if !is_being_deleted(&obj) {
                    let mut marked = (*obj).clone();
                    let meta = metadata_mut(&mut marked);
                    meta.insert("deletionTimestamp".into(), json!(objects::now_time()));
                    meta.insert("deletionGracePeriodSeconds".into(), json!(0));
                    store.put(key, marked);
                }
            }
        }
        if remaining == 0 {
            store.remove(&ns_key);
        }
    }
}
