//! The three non-apply patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902)
//! and strategic merge patch with the list strategies of the served kinds.
//!
//! Each takes the current object and the patch body and returns the patched object; the
//! registry then treats the result like an update. Failures carry the status the real
//! server uses: a malformed patch is 400, a failed `test` or impossible operation is 422.

use serde_json::{Map, Value};

use crate::error::{ApiError, Result};
use crate::resources::{ListType, list_type};

/// The real server refuses JSON patches with more operations than this.
const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// Applies a JSON merge patch.
pub fn merge_patch(mut doc: Value, patch: &Value) -> Result<Value> {
    if !patch.is_object() {
        return Err(ApiError::BadRequest(
            "error decoding patch: a merge patch must be a JSON object".into(),
        ));
    }
    json_patch::merge(&mut doc, patch);
    Ok(doc)
}

/// Applies a JSON patch. A `test` of a missing path against `null` succeeds, as in the
/// Go library the real server uses.
pub fn json_patch(mut doc: Value, patch: &Value) -> Result<Value> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?;
    if ops.0.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(ApiError::RequestEntityTooLarge(format!(
            "The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, got {}",
            ops.0.len()
        )));
    }
    for op in &ops.0 {
        if let json_patch::PatchOperation::Test(t) = op
            && t.value.is_null()
            && doc.pointer(t.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
            let detail = match e.kind {
                json_patch::PatchErrorKind::TestFailed => {
                    format!("testing value {} failed: test failed", e.path)
                }
                _ => format!(
                    "{} operation does not apply: doc is missing path: \"{}\": {}",
                    op_name(op),
                    e.path,
                    e.kind
                ),
            };
            ApiError::Unprocessable(detail)
        })?;
    }
    Ok(doc)
}

fn op_name(op: &json_patch::PatchOperation) -> &'static str {
    match op {
        json_patch::PatchOperation::Add(_) => "add",
        json_patch::PatchOperation::Remove(_) => "remove",
        json_patch::PatchOperation::Replace(_) => "replace",
        json_patch::PatchOperation::Move(_) => "move",
        json_patch::PatchOperation::Copy(_) => "copy",
        json_patch::PatchOperation::Test(_) => "test",
    }
}

/// Applies a strategic merge patch to an object of `kind`.
pub fn strategic_merge_patch(doc: Value, patch: &Value, kind: &str) -> Result<Value> {
    let (Value::Object(mut orig), Value::Object(p)) = (doc, patch) else {
        return Err(ApiError::BadRequest(
            "error decoding patch: a strategic merge patch must be a JSON object".into(),
        ));
    };
    smp_map(&mut orig, p, kind, &mut Vec::new())?;
    Ok(Value::Object(orig))
}

const DIRECTIVE: &str = "$patch";
const DELETE_FROM_PRIMITIVE: &str = "$deleteFromPrimitiveList/";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const RETAIN_KEYS: &str = "$retainKeys";

fn smp_map(
    orig: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    kind: &str,
    path: &mut Vec<String>,
) -> Result<()> {
    match patch.get(DIRECTIVE).and_then(Value::as_str) {
        Some("replace") => {
            *orig = strip_directives(patch);
            return Ok(());
        }
        Some("delete") => {
            orig.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(ApiError::BadRequest(format!("unknown patch type: {other}"))),
    }
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in patch {
        if k == DIRECTIVE || k == RETAIN_KEYS {
            continue;
        }
        if let Some(field) = k.strip_prefix(DELETE_FROM_PRIMITIVE) {
            let remove = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(list)) = orig.get_mut(field) {
                list.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix(SET_ELEMENT_ORDER) {
            orders.push((field.to_owned(), v.as_array().cloned().unwrap_or_default()));
            continue;
        }
        if v.is_null() {
            orig.remove(k);
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Object(pm) => {
                let delete = pm.get(DIRECTIVE).and_then(Value::as_str) == Some("delete");
                match orig.get_mut(k) {
                    _ if delete => {
                        orig.remove(k);
                    }
                    Some(Value::Object(om)) => smp_map(om, pm, kind, path)?,
                    _ => {
                        let mut fresh = Map::new();
                        smp_map(&mut fresh, pm, kind, path)?;
                        orig.insert(k.clone(), Value::Object(fresh));
                    }
                }
            }
            Value::Array(items) => {
                let current = match orig.remove(k) {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                let merged = smp_list(current, items, kind, path)?;
                orig.insert(k.clone(), Value::Array(merged));
            }
            scalar => {
                orig.insert(k.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    if let Some(Value::Array(keep)) = patch.get(RETAIN_KEYS) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        orig.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (field, order) in orders {
        path.push(field.clone());
        if let Some(Value::Array(list)) = orig.get_mut(&field) {
            let lt = list_type(kind, &path.iter().map(String::as_str).collect::<Vec<_>>());
            reorder(list, &order, lt);
        }
        path.pop();
    }
    Ok(())
}

fn strip_directives(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn smp_list(
    mut current: Vec<Value>,
    patch: &[Value],
    kind: &str,
    path: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let lt = list_type(kind, &path.iter().map(String::as_str).collect::<Vec<_>>());
    let replace_all = patch
        .iter()
        .any(|i| i.get(DIRECTIVE).and_then(Value::as_str) == Some("replace"));
    match lt {
        _ if replace_all => Ok(patch
            .iter()
            .filter(|i| i.get(DIRECTIVE).is_none())
            .map(|i| match i {
                Value::Object(m) => Value::Object(strip_directives(m)),
                other => other.clone(),
            })
            .collect()),
        ListType::Atomic => Ok(patch.to_vec()),
        ListType::Set => {
            for item in patch {
                if !current.contains(item) {
                    current.push(item.clone());
                }
            }
            Ok(current)
        }
        ListType::Map { merge_key, .. } => {
            for item in patch {
                let Value::Object(pm) = item else {
                    return Err(ApiError::BadRequest(format!(
                        "expected a map in list {}, got {item}",
                        path.join(".")
                    )));
                };
                let Some(key) = pm.get(merge_key) else {
                    return Err(ApiError::BadRequest(format!(
                        "map: {item} does not contain declared merge key: {merge_key}"
                    )));
                };
                let pos = current.iter().position(|c| c.get(merge_key) == Some(key));
                let delete = pm.get(DIRECTIVE).and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        current.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        if let Some(Value::Object(cm)) = current.get_mut(i) {
                            smp_map(cm, pm, kind, path)?;
                        }
                    }
                    (None, false) => {
                        let mut fresh = Map::new();
                        smp_map(&mut fresh, pm, kind, path)?;
                        current.push(Value::Object(fresh));
                    }
                }
            }
            Ok(current)
        }
    }
}

/// Orders a merged list as `$setElementOrder` asks: listed elements first in the given
/// order, the rest after them in their previous order.
fn reorder(list: &mut Vec<Value>, order: &[Value], lt: ListType) {
    let position = |item: &Value| -> Option<usize> {
        order.iter().position(|o| match lt {
            ListType::Map { merge_key, .. } => {
                o.get(merge_key).is_some() && o.get(merge_key) == item.get(merge_key)
            }
            _ => o == item,
        })
    };
    let mut indexed: Vec<(usize, usize, Value)> = list
        .drain(..)
        .enumerate()
        .map(|(i, v)| (position(&v).unwrap_or(usize::MAX), i, v))
        .collect();
    indexed.sort_by_key(|(p, i, _)| (*p, *i));
    list.extend(indexed.into_iter().map(|(_, _, v)| v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_patch_test_of_a_missing_path_against_null_succeeds() {
        let doc = json!({"metadata":{"name":"a"}});
        let patch = json!([
            {"op":"test","path":"/metadata/finalizers","value":null},
            {"op":"add","path":"/metadata/finalizers","value":["f"]}
        ]);
        let out = json_patch(doc, &patch).expect("applies");
        assert_eq!(out["metadata"]["finalizers"], json!(["f"]));
    }

    #[test]
    fn json_patch_failed_test_is_unprocessable() {
        let doc = json!({"metadata":{"finalizers":["g"]}});
        let patch = json!([{"op":"test","path":"/metadata/finalizers/0","value":"f"},{"op":"remove","path":"/metadata/finalizers/0"}]);
        let err = json_patch(doc, &patch).expect_err("test fails");
        assert_eq!((err.status_code(), err.reason()), (422, "Invalid"));
    }

    #[test]
    fn json_patch_that_is_not_a_patch_is_a_bad_request() {
        let err = json_patch(json!({}), &json!({"op":"add"})).expect_err("not a list");
        assert_eq!(err.status_code(), 400);
    }

    #[test]
    fn strategic_merge_null_deletes_and_maps_merge() {
        let doc = json!({"spec":{"holderIdentity":"a","renewTime":"t","leaseDurationSeconds":5}});
        let out = strategic_merge_patch(
            doc,
            &json!({"spec":{"holderIdentity":null,"renewTime":null}}),
            "Lease",
        )
        .expect("applies");
        assert_eq!(out, json!({"spec":{"leaseDurationSeconds":5}}));
    }

    #[test]
    fn strategic_merge_merges_finalizers_and_ports_by_key() {
        let doc = json!({"metadata":{"finalizers":["a"]},"spec":{"ports":[{"port":80,"name":"http"},{"port":443,"name":"https"}]}});
        let patch = json!({"metadata":{"finalizers":["b"]},"spec":{"ports":[{"port":80,"name":"web"},{"port":8080}]}});
        let out = strategic_merge_patch(doc, &patch, "Service").expect("applies");
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port":80,"name":"web"},{"port":443,"name":"https"},{"port":8080}])
        );
    }

    #[test]
    fn strategic_merge_directives_delete_items_and_primitives() {
        let doc = json!({"metadata":{"finalizers":["a","b"]},"spec":{"ports":[{"port":80},{"port":443}]}});
        let patch = json!({
            "metadata":{"$deleteFromPrimitiveList/finalizers":["a"]},
            "spec":{"ports":[{"port":80,"$patch":"delete"}]}
        });
        let out = strategic_merge_patch(doc, &patch, "Service").expect("applies");
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(out["spec"]["ports"], json!([{"port":443}]));
    }

    #[test]
    fn strategic_merge_replaces_atomic_lists() {
        let doc =
            json!({"status":{"loadBalancer":{"ingress":[{"ip":"1.1.1.1"},{"ip":"2.2.2.2"}]}}});
        let out = strategic_merge_patch(
            doc,
            &json!({"status":{"loadBalancer":{"ingress":[{"ip":"3.3.3.3"}]}}}),
            "Service",
        )
        .expect("applies");
        assert_eq!(
            out["status"]["loadBalancer"]["ingress"],
            json!([{"ip":"3.3.3.3"}])
        );
    }

    #[test]
    fn set_element_order_reorders_merged_items() {
        let doc = json!({"spec":{"ports":[{"port":80},{"port":443}]}});
        let patch = json!({"spec":{"$setElementOrder/ports":[{"port":443},{"port":80}]}});
        let out = strategic_merge_patch(doc, &patch, "Service").expect("applies");
        assert_eq!(out["spec"]["ports"], json!([{"port":443},{"port":80}]));
    }
}
