//! The shape of stored objects: decoding request bodies into the served types,
//! normalizing them the way the real server's Go structs serialize, converting between
//! the two views of Events, and rendering objects for responses.
//!
//! Decoding goes through the k8s-openapi types so that a field of the wrong type is refused
//! and an unknown field is detected, as the real server's typed decoder does; what is stored
//! is JSON, so that fields a newer client sends survive exactly when the real server keeps them.

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Event, Namespace, Service},
    events::v1::Event as EventV1,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};

use crate::error::{ApiError, Result};
use crate::resources::{ResourceInfo, Storage};

/// The current time as the API server writes `metav1.Time`.
pub fn now_time() -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", jiff::Timestamp::now()).unwrap_or_default()
}

/// The current time as the API server writes `metav1.MicroTime`.
pub fn now_micro_time() -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%S%.6fZ", jiff::Timestamp::now()).unwrap_or_default()
}

/// A fresh object uid.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `metadata.name`, or "" when absent.
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `metadata.namespace`, or "" when absent.
pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `metadata.resourceVersion`, or "" when absent.
pub fn resource_version_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `metadata.finalizers` as strings.
pub fn finalizers_of(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `metadata.deletionTimestamp` is set.
pub fn is_being_deleted(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// The `metadata` object, created if missing or not an object.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let Value::Object(root) = obj else {
        unreachable!("just made an object")
    };
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    match meta {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

/// The labels of an object.
pub fn labels_of(obj: &Value) -> Map<String, Value> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn roundtrip<K: DeserializeOwned + Serialize>(
    v: &Value,
) -> std::result::Result<Value, serde_json::Error> {
    let typed: K = serde_json::from_value(v.clone())?;
    serde_json::to_value(&typed)
}

/// Checks `apiVersion`/`kind` of a body against the endpoint, fills them in when absent (as the
/// real decoder defaults them), and decodes through the typed struct. Returns the normalized
/// object and the paths of fields the type does not know.
pub fn decode(view: &ResourceInfo, mut body: Value) -> Result<(Value, Vec<String>)> {
    let Value::Object(map) = &mut body else {
        return Err(ApiError::BadRequest(format!(
            "the body of the request must be a {} object",
            view.kind
        )));
    };
    let expected_av = view.api_version();
    match map.get("apiVersion") {
        None | Some(Value::Null) => {
            map.insert("apiVersion".into(), json!(expected_av));
        }
        Some(Value::String(av)) if *av == expected_av => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({}) does not match the expected API version ({expected_av})",
                other.as_str().unwrap_or("")
            )));
        }
    }
    match map.get("kind") {
        None | Some(Value::Null) => {
            map.insert("kind".into(), json!(view.kind));
        }
        Some(Value::String(k)) if k == view.kind => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: the kind in the data ({}) does not match the expected kind ({kind})",
                other.as_str().unwrap_or(""),
                kind = view.kind,
                v = view.version,
            )));
        }
    }
    let typed = match (view.group, view.kind) {
        ("", "Namespace") => roundtrip::<Namespace>(&body),
        ("", "Service") => roundtrip::<Service>(&body),
        ("", "ConfigMap") => roundtrip::<ConfigMap>(&body),
        ("", "Event") => roundtrip::<Event>(&body),
        ("events.k8s.io", "Event") => roundtrip::<EventV1>(&body),
        ("coordination.k8s.io", "Lease") => roundtrip::<Lease>(&body),
        _ => return Err(ApiError::Internal(format!("no decoder for {}", view.kind))),
    }
    .map_err(|e| {
        ApiError::BadRequest(format!(
            "{kind} in version \"{v}\" cannot be handled as a {kind}: {e}",
            kind = view.kind,
            v = view.version
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(&body, &typed, "", &mut unknown);
    let mut out = typed;
    prune_empty(&mut out, view.kind, &mut Vec::new());
    Ok((out, unknown))
}

fn unknown_fields(input: &Value, typed: &Value, prefix: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (k, v) in i {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match t.get(k) {
                    None if !v.is_null() => out.push(path),
                    None => {}
                    Some(tv) => unknown_fields(v, tv, &path, out),
                }
            }
        }
        (Value::Array(i), Value::Array(t)) => {
            for (n, (iv, tv)) in i.iter().zip(t).enumerate() {
                unknown_fields(iv, tv, &format!("{prefix}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Whether an empty value at `path` survives serialization (a non-pointer struct, a
/// non-omitempty string or a pointer), given the kind.
fn keeps_empty(kind: &str, path: &[String]) -> bool {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    matches!(
        (kind, p.as_slice()),
        ("Lease", ["spec"] | ["spec", _])
            | (
                "Service",
                ["spec"] | ["status"] | ["status", "loadBalancer"] | ["spec", "loadBalancerClass"]
            )
            | (
                "Service",
                ["status", "loadBalancer", "ingress", _, "ipMode"]
            )
            | ("Namespace", ["spec"] | ["status"])
            | (
                "Event",
                ["involvedObject"] | ["source"] | ["reportingComponent"] | ["reportingInstance"]
            )
            | (_, ["metadata", "annotations" | "labels", _])
            | ("ConfigMap", ["data" | "binaryData", _])
            | ("Service", ["spec", "selector", _])
    )
}

/// Drops what Go's `omitempty` drops: nulls, empty strings, lists and maps, except where
/// the real type keeps them.
pub fn prune_empty(v: &mut Value, kind: &str, path: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                path.push(k.clone());
                let drop = match map.get_mut(&k) {
                    Some(child) => {
                        // fieldsV1 is a free-form ownership tree whose empty objects are meaningful.
                        if k != "fieldsV1" {
                            prune_empty(child, kind, path);
                        }
                        is_empty(child) && !keeps_empty(kind, path)
                    }
                    None => false,
                };
                if drop {
                    map.remove(&k);
                }
                path.pop();
            }
        }
        Value::Array(items) => {
            for (n, item) in items.iter_mut().enumerate() {
                path.push(n.to_string());
                prune_empty(item, kind, path);
                path.pop();
            }
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

/// Adds the fields the real server always serializes for this kind (non-pointer structs,
/// `null` times of core Events).
pub fn shape(storage: Storage, obj: &mut Value) {
    let Value::Object(map) = obj else { return };
    match storage {
        Storage::Services => {
            map.entry("spec").or_insert_with(|| json!({}));
            let status = map.entry("status").or_insert_with(|| json!({}));
            if let Value::Object(s) = status {
                s.entry("loadBalancer").or_insert_with(|| json!({}));
            }
        }
        Storage::Namespaces => {
            map.entry("spec").or_insert_with(|| json!({}));
            map.entry("status").or_insert_with(|| json!({}));
        }
        Storage::Leases => {
            map.entry("spec").or_insert_with(|| json!({}));
        }
        Storage::Events => {
            map.entry("involvedObject").or_insert_with(|| json!({}));
            map.entry("source").or_insert_with(|| json!({}));
            for t in ["firstTimestamp", "lastTimestamp", "eventTime"] {
                map.entry(t).or_insert(Value::Null);
            }
            for s in ["reportingComponent", "reportingInstance"] {
                map.entry(s).or_insert_with(|| json!(""));
            }
        }
        Storage::ConfigMaps => {}
    }
}

const EVENT_RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// Converts an object of a view into its stored form (events.k8s.io Events become core Events).
pub fn view_to_storage(view: &ResourceInfo, mut obj: Value) -> Value {
    if !view.is_events_v1() {
        return obj;
    }
    if let Value::Object(map) = &mut obj {
        for (v1, core) in EVENT_RENAMES {
            if let Some(val) = map.remove(*v1) {
                map.insert((*core).to_owned(), val);
            }
        }
        map.insert("apiVersion".into(), json!("v1"));
    }
    obj
}

/// Converts a stored object into a view's form.
pub fn storage_to_view(view: &ResourceInfo, obj: &Value) -> Value {
    if !view.is_events_v1() {
        return obj.clone();
    }
    let mut out = obj.clone();
    if let Value::Object(map) = &mut out {
        for (v1, core) in EVENT_RENAMES {
            if let Some(val) = map.remove(*core) {
                map.insert((*v1).to_owned(), val);
            }
        }
        map.insert("apiVersion".into(), json!(view.api_version()));
    }
    prune_empty(&mut out, "EventV1", &mut Vec::new());
    out
}

/// How an object is rendered, chosen from the request's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rendering {
    /// The object itself.
    #[default]
    Full,
    /// `meta.k8s.io/v1` PartialObjectMetadata.
    Metadata,
    /// `meta.k8s.io/v1` Table, for kubectl's server-side printing.
    Table,
}

/// An object as a list item: the real server leaves out `kind` and `apiVersion`.
pub fn as_list_item(mut obj: Value) -> Value {
    if let Value::Object(map) = &mut obj {
        map.remove("kind");
        map.remove("apiVersion");
    }
    obj
}

/// PartialObjectMetadata of an object.
pub fn as_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn view(group: &str, plural: &str) -> &'static ResourceInfo {
        find(group, "v1", plural).expect("served resource")
    }

    #[test]
    fn decoding_drops_empty_lists_like_omitempty() {
        let (obj, unknown) = decode(
            view("", "configmaps"),
            json!({"metadata":{"name":"a","finalizers":[]},"data":{"k":""}}),
        )
        .expect("decodes");
        assert!(unknown.is_empty());
        assert_eq!(
            obj,
            json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"k":""}})
        );
    }

    #[test]
    fn decoding_reports_unknown_fields_and_refuses_wrong_types() {
        let (_, unknown) = decode(
            view("", "services"),
            json!({"metadata":{"name":"a"},"spec":{"bogus":1}}),
        )
        .expect("decodes");
        assert_eq!(unknown, vec!["spec.bogus".to_owned()]);
        let err = decode(
            view("", "services"),
            json!({"metadata":{"name":"a"},"spec":{"ports":[{"port":"x"}]}}),
        )
        .expect_err("wrong type");
        assert_eq!(err.status_code(), 400);
    }

    #[test]
    fn decoding_refuses_a_body_of_another_kind() {
        let err = decode(
            view("", "services"),
            json!({"kind":"ConfigMap","apiVersion":"v1"}),
        )
        .expect_err("kind mismatch");
        assert_eq!(err.reason(), "BadRequest");
    }

    #[test]
    fn events_v1_fields_map_onto_core_events_and_back() {
        let v1 = view("events.k8s.io", "events");
        let core = view_to_storage(
            v1,
            json!({"apiVersion":"events.k8s.io/v1","kind":"Event","note":"hi","regarding":{"name":"s"}}),
        );
        assert_eq!(core["message"], "hi");
        assert_eq!(core["involvedObject"]["name"], "s");
        assert_eq!(core["apiVersion"], "v1");
        let back = storage_to_view(v1, &core);
        assert_eq!(back["note"], "hi");
        assert_eq!(back["apiVersion"], "events.k8s.io/v1");
    }
}
