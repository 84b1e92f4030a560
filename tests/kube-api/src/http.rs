//! The HTTP surface: path routing, query and header parsing, content negotiation, the
//! request log and fault hooks, and turning registry results into responses.
//!
//! Anything this server does not implement is answered with an error Status (404 for
//! paths, 405 for verbs, 415 for content types, 406 for response formats, 400 for option
//! values), never with a 200 that ignored part of the request.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderValue, Method, StatusCode, header};
use serde_json::Value;

use crate::discovery;
use crate::error::{ApiError, FieldError, Result};
use crate::faults::{Faults, LoggedRequest};
use crate::objects::Rendering;
use crate::registry::{
    DeleteOptions, FieldValidation, ListOptions, PatchType, Registry, Target, WriteOptions,
};
use crate::resources::{self, ResourceInfo};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::watch::{self, WatchOptions};

/// The real server's limit on request bodies.
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
const PATCH_TYPES: &str = "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json";

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The API state.
    pub registry: Arc<Registry>,
    /// Log and faults.
    pub faults: Arc<Faults>,
    /// `host:port` for `/api`'s serverAddressByClientCIDRs.
    pub server_address: String,
}

/// The router: one fallback handler, since API paths are data, not routes.
pub fn router(state: AppState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

async fn handle(State(st): State<AppState>, req: Request) -> Response {
    let method = req.method().clone();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let latency = st.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = match st.faults.take(&method, req.uri().path()) {
        Some(err) => error_response(&err),
        None => match dispatch(&st, req).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        },
    };
    tracing::debug!(%method, path = %path_and_query, status = response.status().as_u16(), "request");
    st.faults.log(LoggedRequest {
        method,
        path: path_and_query,
        content_type,
        status: response.status().as_u16(),
        at: std::time::Instant::now(),
    });
    response
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {w:?}")) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

/// The response for an error: its Status body, code and `Retry-After`.
pub fn error_response(err: &ApiError) -> Response {
    let mut resp = json_response(err.status_code(), &err.status_body(), &[]);
    if let Some(secs) = err.retry_after()
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// What a path addresses.
#[derive(Debug)]
enum Route {
    Json(Value),
    Health,
    Resource { target: Target, collection: bool },
}

fn route(path: &str, server_address: &str) -> Result<Route> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let found = |v: Option<Value>| v.map(Route::Json).ok_or(ApiError::UnknownPath);
    match segs.as_slice() {
        ["version"] => Ok(Route::Json(discovery::version())),
        ["healthz" | "readyz" | "livez"] => Ok(Route::Health),
        ["api"] => Ok(Route::Json(discovery::api_versions(server_address))),
        ["apis"] => Ok(Route::Json(discovery::api_group_list())),
        ["api", v] => found(discovery::resource_list("", v)),
        ["apis", g] => found(discovery::api_group(g)),
        ["apis", g, v] => found(discovery::resource_list(g, v)),
        ["openapi", "v3"] => Ok(Route::Json(discovery::openapi_v3_index())),
        ["openapi", "v3", rest @ ..] => found(discovery::openapi_v3_document(&rest.join("/"))),
        ["api", v, rest @ ..] => resource_route("", v, rest),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest),
        _ => Err(ApiError::UnknownPath),
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Result<Route> {
    let find = |plural: &str| resources::find(group, version, plural).ok_or(ApiError::UnknownPath);
    let target = |view: &'static ResourceInfo,
                  ns: Option<&str>,
                  name: Option<&str>,
                  sub: Option<&str>| Target {
        view,
        namespace: ns.map(str::to_owned),
        name: name.map(str::to_owned),
        subresource: sub.map(str::to_owned),
    };
    let item = |view: &'static ResourceInfo, ns, name, sub: Option<&str>| {
        if let Some(s) = sub
            && (s != "status" || !view.has_status)
        {
            return Err(ApiError::UnknownPath);
        }
        Ok(Route::Resource {
            target: target(view, ns, Some(name), sub),
            collection: false,
        })
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] if *plural != "status" => {
            let view = find(plural)?;
            if !view.namespaced {
                return Err(ApiError::UnknownPath);
            }
            match tail {
                [] => Ok(Route::Resource {
                    target: target(view, Some(ns), None, None),
                    collection: true,
                }),
                [name] => item(view, Some(ns), name, None),
                [name, sub] => item(view, Some(ns), name, Some(sub)),
                _ => Err(ApiError::UnknownPath),
            }
        }
        [plural, tail @ ..] => {
            let view = find(plural)?;
            match tail {
                [] => Ok(Route::Resource {
                    target: target(view, None, None, None),
                    collection: true,
                }),
                [name] if !view.namespaced => item(view, None, name, None),
                [name, sub] if !view.namespaced => item(view, None, name, Some(sub)),
                _ => Err(ApiError::UnknownPath),
            }
        }
        [] => Err(ApiError::UnknownPath),
    }
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn get_all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0" | "") => Ok(Some(false)),
            Some(other) => Err(ApiError::BadRequest(format!(
                "invalid value {other:?} for {key}: must be true or false"
            ))),
        }
    }
}

fn media_type(ct: Option<&str>) -> String {
    ct.unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Picks the response rendering from `Accept`, refusing formats this server cannot produce.
fn negotiate(accept: Option<&str>) -> Result<Rendering> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Rendering::Full);
    };
    for entry in accept.split(',') {
        let mut parts = entry.split(';').map(str::trim);
        let mt = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: Vec<(String, String)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        if !matches!(mt.as_str(), "application/json" | "application/*" | "*/*") {
            continue;
        }
        let as_ = params
            .iter()
            .find(|(k, _)| k == "as")
            .map(|(_, v)| v.as_str());
        match as_ {
            None => return Ok(Rendering::Full),
            Some("PartialObjectMetadata" | "PartialObjectMetadataList") => {
                return Ok(Rendering::Metadata);
            }
            // Tables are not produced; kubectl lists plain JSON as a fallback after them.
            Some(_) => continue,
        }
    }
    Err(ApiError::NotAcceptable)
}

fn write_options(
    q: &Query,
    headers: &http::HeaderMap,
    verb_options: &str,
    patch: Option<PatchType>,
) -> Result<WriteOptions> {
    let mut errs = Vec::new();
    let dry_run = q.get_all("dryRun");
    for d in &dry_run {
        if *d != "All" {
            errs.push(FieldError::not_supported("dryRun", *d, &["All"]));
        }
    }
    let manager = q.get("fieldManager").unwrap_or("").to_owned();
    if manager.len() > 128 {
        errs.push(FieldError::too_long("fieldManager", 128));
    }
    if patch == Some(PatchType::Apply) && manager.is_empty() {
        errs.push(FieldError::required(
            "fieldManager",
            "is required for apply patch",
        ));
    }
    let force = q.flag("force")?;
    if force.is_some() && patch.is_some_and(|p| p != PatchType::Apply) {
        errs.push(FieldError::forbidden(
            "force",
            "may not be specified for non-apply patch",
        ));
    }
    let field_validation = match q.get("fieldValidation") {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Ignore") => FieldValidation::Ignore,
        Some("Strict") => FieldValidation::Strict,
        Some(other) => {
            errs.push(FieldError::not_supported(
                "fieldValidation",
                other,
                &["Ignore", "Strict", "Warn"],
            ));
            FieldValidation::Warn
        }
    };
    if !errs.is_empty() {
        return Err(ApiError::Invalid {
            group: "meta.k8s.io".into(),
            kind: verb_options.into(),
            name: String::new(),
            causes: errs,
        });
    }
    let field_manager = if manager.is_empty() {
        // Without a fieldManager the real server names the manager after the user agent.
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_owned()
    } else {
        manager
    };
    Ok(WriteOptions {
        dry_run: !dry_run.is_empty(),
        field_manager,
        field_validation,
        force: force.unwrap_or(false),
    })
}

fn parse_body(body: &Bytes, content_type: &str) -> Result<Value> {
    match content_type {
        "" | "application/json" => serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body of the request could not be decoded as JSON: {e}"
            ))
        }),
        "application/yaml" => serde_yaml::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body of the request could not be decoded as YAML: {e}"
            ))
        }),
        _ => Err(ApiError::UnsupportedMediaType {
            accepted: "application/json, application/yaml".into(),
        }),
    }
}

fn delete_options(q: &Query, body: &Bytes, content_type: &str) -> Result<DeleteOptions> {
    let opts: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_body(body, content_type)?
    };
    let s = |ptr: &str| opts.pointer(ptr).and_then(Value::as_str).map(str::to_owned);
    let policy = s("/propagationPolicy").or_else(|| q.get("propagationPolicy").map(str::to_owned));
    if let Some(p) = policy.as_deref() {
        match p {
            "Background" => {}
            "Foreground" | "Orphan" => {
                return Err(ApiError::BadRequest(format!(
                    "propagationPolicy {p} is not implemented by this test server (there is no garbage collector)"
                )));
            }
            other => {
                return Err(ApiError::invalid_one(
                    "meta.k8s.io",
                    "DeleteOptions",
                    "",
                    FieldError::not_supported(
                        "propagationPolicy",
                        other,
                        &["Background", "Foreground", "Orphan"],
                    ),
                ));
            }
        }
    }
    let orphan = opts
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or(q.flag("orphanDependents")?);
    if orphan == Some(true) {
        return Err(ApiError::BadRequest(
            "orphanDependents is not implemented by this test server".into(),
        ));
    }
    let mut dry: Vec<String> = opts
        .get("dryRun")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    dry.extend(q.get_all("dryRun").into_iter().map(str::to_owned));
    if let Some(bad) = dry.iter().find(|d| *d != "All") {
        return Err(ApiError::invalid_one(
            "meta.k8s.io",
            "DeleteOptions",
            "",
            FieldError::not_supported("dryRun", bad.as_str(), &["All"]),
        ));
    }
    Ok(DeleteOptions {
        uid: s("/preconditions/uid"),
        resource_version: s("/preconditions/resourceVersion"),
        dry_run: !dry.is_empty(),
    })
}

async fn dispatch(st: &AppState, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let route = route(parts.uri.path(), &st.server_address)?;
    let q = Query::parse(parts.uri.query());
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let content_type = media_type(
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let (target, collection) = match route {
        Route::Health if parts.method == Method::GET => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(r);
        }
        Route::Json(doc) if parts.method == Method::GET => {
            negotiate(accept)?;
            return Ok(json_response(200, &doc, &[]));
        }
        Route::Health | Route::Json(_) => {
            return Err(ApiError::MethodNotAllowed(
                "the server does not allow this method on the requested resource".into(),
            ));
        }
        Route::Resource { target, collection } => (target, collection),
    };
    let rendering = negotiate(accept)?;
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::RequestEntityTooLarge(format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes"
            ))
        })?;
    let registry = &st.registry;
    let not_allowed = |what: &str| {
        ApiError::MethodNotAllowed(format!(
            "the server does not allow this method on the requested resource ({what})"
        ))
    };
    let render = |v: Value| match rendering {
        Rendering::Metadata => crate::objects::as_metadata(&v),
        _ => v,
    };
    let respond = |w: crate::registry::Written| {
        json_response(
            if w.created { 201 } else { 200 },
            &render(w.object),
            &w.warnings,
        )
    };
    match (parts.method.clone(), collection) {
        (Method::GET, true) => {
            let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
            let fields =
                FieldSelector::parse(q.get("fieldSelector").unwrap_or(""), target.view.storage)?;
            if q.flag("watch")? == Some(true) {
                let opts = WatchOptions {
                    labels,
                    fields,
                    resource_version: q.get("resourceVersion").map(str::to_owned),
                    bookmarks: q.flag("allowWatchBookmarks")?.unwrap_or(false),
                    timeout: q
                        .get("timeoutSeconds")
                        .map(|t| {
                            t.parse::<u64>().map_err(|_| {
                                ApiError::BadRequest(format!("invalid timeoutSeconds {t:?}"))
                            })
                        })
                        .transpose()?
                        .map(std::time::Duration::from_secs),
                    send_initial_events: q.flag("sendInitialEvents")?,
                    resource_version_match: q.get("resourceVersionMatch").map(str::to_owned),
                    rendering,
                };
                let stream = watch::start(registry.clone(), target, opts)?;
                let mut resp = Response::new(Body::from_stream(stream));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(resp);
            }
            if q.flag("sendInitialEvents")?.is_some() {
                return Err(ApiError::invalid_one(
                    "meta.k8s.io",
                    "ListOptions",
                    "",
                    FieldError::forbidden(
                        "sendInitialEvents",
                        "sendInitialEvents is forbidden for list",
                    ),
                ));
            }
            let opts = ListOptions {
                labels,
                fields,
                limit: q
                    .get("limit")
                    .map(|l| {
                        l.parse::<usize>()
                            .map_err(|_| ApiError::BadRequest(format!("invalid limit {l:?}")))
                    })
                    .transpose()?,
                continue_token: q
                    .get("continue")
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
                resource_version: q.get("resourceVersion").map(str::to_owned),
                resource_version_match: q.get("resourceVersionMatch").map(str::to_owned),
            };
            let list = registry.list(&target, &opts)?;
            let list = if rendering == Rendering::Metadata {
                metadata_list(list)
            } else {
                list
            };
            Ok(json_response(200, &list, &[]))
        }
        (Method::GET, false) => Ok(json_response(200, &render(registry.get(&target)?), &[])),
        (Method::POST, true) if target.namespace.is_some() || !target.view.namespaced => {
            let opts = write_options(&q, &parts.headers, "CreateOptions", None)?;
            let obj = parse_body(&body, &content_type)?;
            Ok(respond(registry.create(&target, obj, &opts)?))
        }
        (Method::PUT, false) => {
            let opts = write_options(&q, &parts.headers, "UpdateOptions", None)?;
            let obj = parse_body(&body, &content_type)?;
            Ok(respond(registry.update(&target, obj, &opts)?))
        }
        (Method::PATCH, false) => {
            let ty = match content_type.as_str() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/json-patch+json" => PatchType::Json,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" => PatchType::Apply,
                _ => {
                    return Err(ApiError::UnsupportedMediaType {
                        accepted: PATCH_TYPES.into(),
                    });
                }
            };
            let opts = write_options(&q, &parts.headers, "PatchOptions", Some(ty))?;
            Ok(respond(registry.patch(&target, ty, &body, &opts)?))
        }
        (Method::DELETE, false) if target.subresource.is_none() => {
            let opts = delete_options(&q, &body, &content_type)?;
            match registry.delete(&target, &opts)? {
                crate::registry::Deleted::Gone(status) => Ok(json_response(200, &status, &[])),
                crate::registry::Deleted::Pending(obj) => Ok(json_response(200, &render(obj), &[])),
            }
        }
        (Method::DELETE, true) => Err(not_allowed(
            "deletecollection is not implemented by this test server",
        )),
        (m, _) => Err(not_allowed(m.as_str())),
    }
}

fn metadata_list(mut list: Value) -> Value {
    if let Value::Object(m) = &mut list {
        m.insert("kind".into(), Value::from("PartialObjectMetadataList"));
        m.insert("apiVersion".into(), Value::from("meta.k8s.io/v1"));
        if let Some(Value::Array(items)) = m.get_mut("items") {
            for item in items.iter_mut() {
                let meta = item.get("metadata").cloned().unwrap_or(Value::Null);
                *item = serde_json::json!({"metadata": meta});
            }
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_and_cluster_paths_route_to_resources() {
        let r = route("/api/v1/namespaces/default/services/web/status", "x").expect("routes");
        let Route::Resource { target, collection } = r else {
            panic!("not a resource route")
        };
        assert!(!collection);
        assert_eq!(
            (
                target.view.plural,
                target.namespace.as_deref(),
                target.name.as_deref()
            ),
            ("services", Some("default"), Some("web"))
        );
        assert_eq!(target.subresource.as_deref(), Some("status"));
        let Route::Resource { target, .. } =
            route("/api/v1/namespaces/default", "x").expect("routes")
        else {
            panic!("not a resource route")
        };
        assert_eq!(
            (target.view.plural, target.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let Route::Resource { target, collection } =
            route("/apis/coordination.k8s.io/v1/leases", "x").expect("routes")
        else {
            panic!("not a resource route")
        };
        assert!(collection && target.namespace.is_none());
    }

    #[test]
    fn unknown_paths_and_subresources_are_not_found() {
        for p in [
            "/api/v1/pods",
            "/apis/apps/v1/deployments",
            "/api/v1/namespaces/x/configmaps/c/status",
            "/foo",
            "/api/v1/namespaces/x/services/s/proxy",
        ] {
            assert!(matches!(route(p, "x"), Err(ApiError::UnknownPath)), "{p}");
        }
    }

    #[test]
    fn tables_fall_back_to_json_and_protobuf_alone_is_refused() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl)).expect("json"), Rendering::Full);
        assert_eq!(
            negotiate(Some(
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
            ))
            .expect("meta"),
            Rendering::Metadata
        );
        assert!(negotiate(Some("application/vnd.kubernetes.protobuf")).is_err());
        assert!(negotiate(Some("application/json;as=Table;v=v1;g=meta.k8s.io")).is_err());
    }

    #[test]
    fn kube_style_queries_with_empty_pairs_parse() {
        let q = Query::parse(Some("&limit=500&&labelSelector=a%3Db"));
        assert_eq!(q.get("limit"), Some("500"));
        assert_eq!(q.get("labelSelector"), Some("a=b"));
    }
}
