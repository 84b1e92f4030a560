//! Discovery documents, `/version` and the OpenAPI v3 index kubectl reads.
//!
//! Discovery is answered in the legacy (non-aggregated) form: kubectl asks for aggregated
//! discovery through its Accept header and falls back when the response is plain JSON.
//! The OpenAPI v3 documents carry only what kubectl looks up (which PATCH operations accept
//! `fieldValidation`); they have no schemas, so kubectl computes client-side apply patches
//! from its built-in types, as it does for any server without schemas.

use serde_json::{Value, json};

use crate::resources::{RESOURCES, ResourceInfo, groups};

/// The Kubernetes version this server claims, matching the k8s-openapi API level it serves.
pub const VERSION: (&str, &str) = ("1", "33");

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": VERSION.0,
        "minor": VERSION.1,
        "gitVersion": format!("v{}.{}.0", VERSION.0, VERSION.1),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_entry(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

/// `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(g, v)| group_entry(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, if served.
pub fn api_group(group: &str) -> Option<Value> {
    let (g, v) = groups().into_iter().find(|(g, _)| *g == group)?;
    let mut entry = group_entry(g, v);
    entry["kind"] = json!("APIGroup");
    entry["apiVersion"] = json!("v1");
    Some(entry)
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

fn resource_entries(r: &ResourceInfo) -> Vec<Value> {
    let mut main = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        main["shortNames"] = json!(r.short_names);
    }
    if r.kind == "Service" {
        main["categories"] = json!(["all"]);
    }
    let mut out = vec![main];
    if r.has_status {
        out.push(json!({
            "name": format!("{}/status", r.plural),
            "singularName": "",
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["get", "patch", "update"],
        }));
    }
    out
}

/// `/api/v1` or `/apis/<group>/<version>`, if served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let entries: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(resource_entries)
        .collect();
    if entries.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}),
    )
}

fn gv_paths() -> Vec<(&'static str, &'static str, String)> {
    let mut out = vec![("", "v1", "api/v1".to_owned())];
    out.extend(
        groups()
            .into_iter()
            .map(|(g, v)| (g, v, format!("apis/{g}/{v}"))),
    );
    out
}

/// `/openapi/v3`.
pub fn openapi_v3_index() -> Value {
    let paths: serde_json::Map<String, Value> = gv_paths()
        .into_iter()
        .map(|(_, _, p)| {
            (
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=vipam-kube-api-1")}),
            )
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`, if served.
pub fn openapi_v3_document(gv_path: &str) -> Option<Value> {
    let (group, version, _) = gv_paths().into_iter().find(|(_, _, p)| p == gv_path)?;
    let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let write_params = json!([
            param("dryRun"),
            param("fieldManager"),
            param("fieldValidation")
        ]);
        let patch_params = json!([
            param("dryRun"),
            param("fieldManager"),
            param("fieldValidation"),
            param("force")
        ]);
        let op = |action: &str, params: &Value| {
            json!({
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
            })
        };
        let prefix = format!("/{gv_path}");
        let collection = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{prefix}/{}", r.plural)
        };
        paths.insert(
            collection.clone(),
            json!({"get": op("list", &json!([])), "post": op("post", &write_params)}),
        );
        let item = format!("{collection}/{{name}}");
        paths.insert(
            item.clone(),
            json!({"get": op("get", &json!([])), "put": op("put", &write_params), "patch": op("patch", &patch_params), "delete": op("delete", &json!([param("dryRun")]))}),
        );
        if r.has_status {
            paths.insert(
                format!("{item}/status"),
                json!({"get": op("get", &json!([])), "put": op("put", &write_params), "patch": op("patch", &patch_params)}),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{}.{}.0", VERSION.0, VERSION.1)},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_discovery_lists_the_status_subresource_and_no_deletecollection() {
        let list = resource_list("", "v1").expect("core served");
        let names: Vec<&str> = list["resources"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "namespaces",
                "namespaces/status",
                "services",
                "services/status",
                "configmaps",
                "events"
            ]
        );
        assert!(!list.to_string().contains("deletecollection"));
        assert!(resource_list("apps", "v1").is_none());
    }

    #[test]
    fn every_group_has_an_openapi_document() {
        let index = openapi_v3_index();
        for path in index["paths"].as_object().expect("paths").keys() {
            assert!(openapi_v3_document(path).is_some(), "{path}");
        }
    }
}
