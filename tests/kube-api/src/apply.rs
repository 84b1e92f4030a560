//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! This follows structured-merge-diff as far as the served kinds need: every write
//! records which manager owns which fields; an apply merges the configuration into the
//! live object using the list types of the schema, removes fields the manager applied
//! before and no longer applies, and refuses (unless forced) to change fields that
//! another manager owns. Fields removed from the object are removed from every owner.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::error::ApplyConflict;
use crate::resources::{ListType, is_map, list_type};

/// A field path as managedFields writes it: `f:spec`, `k:{"port":80,"protocol":"TCP"}`, `v:"x"`.
pub type FieldPath = Vec<String>;
/// A set of owned fields.
pub type FieldSet = BTreeSet<FieldPath>;

/// One entry of `metadata.managedFields`.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerEntry {
    /// The field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// The apiVersion the manager wrote with.
    pub api_version: String,
    /// When the manager last changed its set.
    pub time: String,
    /// `status` for writes through the status subresource.
    pub subresource: Option<String>,
    /// The owned fields.
    pub set: FieldSet,
}

impl ManagerEntry {
    fn same_identity(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }
}

/// Which fields a write may own: the main resource does not own status (when the kind has a
/// status subresource), the status subresource owns nothing but status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every field.
    All,
    /// Everything except `status`.
    MainWithStatusSubresource,
    /// Only `status`.
    Status,
}

fn in_scope(path: &FieldPath, scope: Scope) -> bool {
    let first = path.first().map(String::as_str);
    match scope {
        Scope::All => true,
        Scope::MainWithStatusSubresource => first != Some("f:status"),
        Scope::Status => first == Some("f:status"),
    }
}

const STRIPPED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "selfLink",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// The fields an object sets, as ownership paths.
pub fn field_set(obj: &Value, kind: &str, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(map) = obj {
        for (k, v) in map {
            if k == "apiVersion" || k == "kind" || v.is_null() {
                continue;
            }
            let mut schema = vec![k.clone()];
            let mut path = vec![format!("f:{k}")];
            if k == "metadata" {
                if let Value::Object(meta) = v {
                    for (mk, mv) in meta {
                        if STRIPPED_META.contains(&mk.as_str()) || mv.is_null() {
                            continue;
                        }
                        schema.push(mk.clone());
                        path.push(format!("f:{mk}"));
                        walk(mv, kind, &mut schema, &mut path, &mut out);
                        schema.pop();
                        path.pop();
                    }
                }
                continue;
            }
            walk(v, kind, &mut schema, &mut path, &mut out);
        }
    }
    out.retain(|p| in_scope(p, scope));
    out
}

fn schema_refs(schema: &[String]) -> Vec<&str> {
    schema.iter().map(String::as_str).collect()
}

/// The key of a keyed list item, with defaults the schema gives key fields (a port's protocol).
fn item_key(item: &Value, keys: &[&str]) -> Value {
    let mut k = Map::new();
    for key in keys {
        match item.get(*key) {
            Some(v) if !v.is_null() => {
                k.insert((*key).to_owned(), v.clone());
            }
            _ if *key == "protocol" => {
                k.insert((*key).to_owned(), json!("TCP"));
            }
            _ => {}
        }
    }
    Value::Object(k)
}

fn walk(v: &Value, kind: &str, schema: &mut Vec<String>, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(map) => {
            if is_map(kind, &schema_refs(schema)) && !map.is_empty() {
                out.insert(path.clone());
            }
            for (k, child) in map {
                if child.is_null() {
                    continue;
                }
                schema.push(k.clone());
                path.push(format!("f:{k}"));
                walk(child, kind, schema, path, out);
                schema.pop();
                path.pop();
            }
        }
        Value::Array(items) => match list_type(kind, &schema_refs(schema)) {
            ListType::Atomic => {
                out.insert(path.clone());
            }
            ListType::Set => {
                out.insert(path.clone());
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Map { keys, .. } => {
                out.insert(path.clone());
                for item in items {
                    path.push(format!("k:{}", item_key(item, keys)));
                    out.insert(path.clone());
                    if let Value::Object(fields) = item {
                        for (k, child) in fields {
                            if child.is_null() {
                                continue;
                            }
                            schema.push(k.clone());
                            path.push(format!("f:{k}"));
                            walk(child, kind, schema, path, out);
                            schema.pop();
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at an ownership path, if present.
fn value_at<'a>(obj: &'a Value, kind: &str, path: &FieldPath) -> Option<&'a Value> {
    let mut cur = obj;
    let mut schema: Vec<String> = Vec::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            cur = cur.get(f)?;
            schema.push(f.to_owned());
        } else if let Some(k) = el.strip_prefix("k:") {
            let want: Value = serde_json::from_str(k).ok()?;
            let keys: Vec<&str> = match list_type(kind, &schema_refs(&schema)) {
                ListType::Map { keys, .. } => keys.to_vec(),
                _ => return None,
            };
            cur = cur
                .as_array()?
                .iter()
                .find(|i| item_key(i, &keys) == want)?;
        } else if let Some(v) = el.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array()?.iter().find(|i| **i == want)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Removes the field or list item at an ownership path.
fn remove_at(obj: &mut Value, kind: &str, path: &FieldPath) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let parent_path: FieldPath = parent_path.to_vec();
    let mut schema: Vec<String> = parent_path
        .iter()
        .filter_map(|e| e.strip_prefix("f:").map(str::to_owned))
        .collect();
    let keys: Vec<&str> = match list_type(kind, &schema_refs(&schema)) {
        ListType::Map { keys, .. } => keys.to_vec(),
        _ => Vec::new(),
    };
    schema.clear();
    let Some(parent) = value_at_mut(obj, kind, &parent_path) else {
        return;
    };
    if let Some(f) = last.strip_prefix("f:") {
        if let Value::Object(m) = parent {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Value::Array(items), Ok(want)) = (parent, serde_json::from_str::<Value>(k)) {
            items.retain(|i| item_key(i, &keys) != want);
        }
    } else if let Some(v) = last.strip_prefix("v:")
        && let (Value::Array(items), Ok(want)) = (parent, serde_json::from_str::<Value>(v))
    {
        items.retain(|i| *i != want);
    }
}

fn value_at_mut<'a>(obj: &'a mut Value, kind: &str, path: &FieldPath) -> Option<&'a mut Value> {
    let mut cur = obj;
    let mut schema: Vec<String> = Vec::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            cur = cur.get_mut(f)?;
            schema.push(f.to_owned());
        } else if let Some(k) = el.strip_prefix("k:") {
            let want: Value = serde_json::from_str(k).ok()?;
            let keys: Vec<&str> = match list_type(kind, &schema_refs(&schema)) {
                ListType::Map { keys, .. } => keys.to_vec(),
                _ => return None,
            };
            cur = cur
                .as_array_mut()?
                .iter_mut()
                .find(|i| item_key(i, &keys) == want)?;
        } else if let Some(v) = el.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array_mut()?.iter_mut().find(|i| **i == want)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Merges an apply configuration into the live object, by the schema's list types.
pub fn merge_config(live: &mut Value, config: &Value, kind: &str) {
    merge_at(live, config, kind, &mut Vec::new());
}

fn merge_at(live: &mut Value, config: &Value, kind: &str, schema: &mut Vec<String>) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    l.remove(k);
                    continue;
                }
                schema.push(k.clone());
                match l.get_mut(k) {
                    Some(existing) => merge_at(existing, v, kind, schema),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
                schema.pop();
            }
        }
        (Value::Array(l), Value::Array(c)) => match list_type(kind, &schema_refs(schema)) {
            ListType::Atomic => *l = c.clone(),
            ListType::Set => {
                for item in c {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            ListType::Map { keys, .. } => {
                for item in c {
                    let key = item_key(item, keys);
                    match l.iter_mut().find(|i| item_key(i, keys) == key) {
                        Some(existing) => merge_at(existing, item, kind, schema),
                        None => l.push(item.clone()),
                    }
                }
            }
        },
        (live, config) => *live = config.clone(),
    }
}

/// Reads `metadata.managedFields`.
pub fn read_entries(obj: &Value) -> Vec<ManagerEntry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let mut set = FieldSet::new();
            if let Some(tree) = e.get("fieldsV1") {
                from_tree(tree, &mut Vec::new(), &mut set);
            }
            ManagerEntry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                subresource: e
                    .get("subresource")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                set,
            }
        })
        .collect()
}

fn from_tree(node: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    let Value::Object(m) = node else { return };
    if !path.is_empty() && (m.is_empty() || m.contains_key(".")) {
        out.insert(path.clone());
    }
    for (k, child) in m {
        if k == "." {
            continue;
        }
        path.push(k.clone());
        from_tree(child, path, out);
        path.pop();
    }
}

#[derive(Default)]
struct Node {
    member: bool,
    children: std::collections::BTreeMap<String, Node>,
}

impl Node {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, child) in &self.children {
            m.insert(k.clone(), child.to_value());
        }
        Value::Object(m)
    }
}

/// The `fieldsV1` tree of a set: a member that also has members below it is marked `.`.
pub fn to_tree(set: &FieldSet) -> Value {
    let mut root = Node::default();
    for path in set {
        let mut node = &mut root;
        for el in path {
            node = node.children.entry(el.clone()).or_default();
        }
        node.member = true;
    }
    root.to_value()
}

/// Writes entries back into `metadata.managedFields`, leaving out empty sets.
pub fn write_entries(obj: &mut Value, entries: &[ManagerEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_tree(&e.set),
            });
            if let Some(sub) = &e.subresource {
                v["subresource"] = json!(sub);
            }
            v
        })
        .collect();
    let meta = crate::objects::metadata_mut(obj);
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

struct Comparison {
    added: FieldSet,
    removed: FieldSet,
    modified: FieldSet,
}

fn compare(old: &Value, new: &Value, kind: &str) -> Comparison {
    let (a, b) = (
        field_set(old, kind, Scope::All),
        field_set(new, kind, Scope::All),
    );
    let modified = a
        .intersection(&b)
        .filter(|p| {
            let (x, y) = (value_at(old, kind, p), value_at(new, kind, p));
            let leaf = |v: Option<&Value>| match v {
                Some(Value::Object(m)) => m.is_empty(),
                Some(Value::Array(_)) => list_type(kind, &schema_of(p)) == ListType::Atomic,
                _ => true,
            };
            leaf(x) && leaf(y) && x != y
        })
        .cloned()
        .collect();
    Comparison {
        added: b.difference(&a).cloned().collect(),
        removed: a.difference(&b).cloned().collect(),
        modified,
    }
}

fn schema_of(path: &FieldPath) -> Vec<&str> {
    path.iter().filter_map(|e| e.strip_prefix("f:")).collect()
}

/// The notation of conflict messages: `.spec.ports[port=80,protocol="TCP"].name`.
fn display_path(path: &FieldPath) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let parts: Vec<String> = serde_json::from_str::<Map<String, Value>>(k)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

/// Who is writing and how.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    /// Field manager name.
    pub manager: &'a str,
    /// `status` for the status subresource.
    pub subresource: Option<&'a str>,
    /// The apiVersion of the request.
    pub api_version: &'a str,
    /// The current time.
    pub now: &'a str,
}

/// Records a non-apply write: the writer takes the fields it added or changed from every
/// other manager, and removed fields are removed from every owner.
pub fn record_update(old: &Value, new: &mut Value, kind: &str, writer: &Writer<'_>) {
    let mut entries = read_entries(old);
    let cmp = compare(old, new, kind);
    let taken: FieldSet = cmp.added.union(&cmp.modified).cloned().collect();
    let scope = scope_of(writer.subresource);
    for e in entries
        .iter_mut()
        .filter(|e| !e.same_identity(writer.manager, "Update", writer.subresource))
    {
        e.set = e.set.difference(&taken).cloned().collect();
        e.set = e.set.difference(&cmp.removed).cloned().collect();
    }
    let mine: FieldSet = taken
        .iter()
        .filter(|p| in_scope(p, scope))
        .cloned()
        .collect();
    match entries
        .iter_mut()
        .find(|e| e.same_identity(writer.manager, "Update", writer.subresource))
    {
        Some(e) => {
            let set: FieldSet = e
                .set
                .union(&mine)
                .cloned()
                .collect::<FieldSet>()
                .difference(&cmp.removed)
                .cloned()
                .collect();
            if set != e.set {
                e.set = set;
                e.time = writer.now.to_owned();
                e.api_version = writer.api_version.to_owned();
            }
        }
        None if !mine.is_empty() => entries.push(ManagerEntry {
            manager: writer.manager.to_owned(),
            operation: "Update".into(),
            api_version: writer.api_version.to_owned(),
            time: writer.now.to_owned(),
            subresource: writer.subresource.map(str::to_owned),
            set: mine,
        }),
        None => {}
    }
    write_entries(new, &entries);
}

fn scope_of(subresource: Option<&str>) -> Scope {
    if subresource == Some("status") {
        Scope::Status
    } else {
        Scope::All
    }
}

/// Removes from a merged object the fields the applier applied last time, does not apply
/// now, and no other applier owns.
pub fn prune_unapplied(
    merged: &mut Value,
    live: &Value,
    kind: &str,
    writer: &Writer<'_>,
    new_set: &FieldSet,
) {
    let entries = read_entries(live);
    let Some(last) = entries
        .iter()
        .find(|e| e.same_identity(writer.manager, "Apply", writer.subresource))
    else {
        return;
    };
    let others: FieldSet = entries
        .iter()
        .filter(|e| {
            e.operation == "Apply" && !e.same_identity(writer.manager, "Apply", writer.subresource)
        })
        .flat_map(|e| e.set.iter().cloned())
        .collect();
    let mut gone: Vec<&FieldPath> = last
        .set
        .iter()
        .filter(|p| {
            !new_set.contains(*p)
                && !others.iter().any(|o| o.starts_with(p))
                && !new_set.iter().any(|n| n.starts_with(p))
        })
        .collect();
    gone.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in gone {
        remove_at(merged, kind, p);
    }
}

/// Records an apply: conflicts with other managers' fields that the apply changes are
/// refused unless `force`; with force the fields move to the applier.
pub fn record_apply(
    live: &Value,
    new: &mut Value,
    kind: &str,
    writer: &Writer<'_>,
    new_set: FieldSet,
    force: bool,
) -> Result<(), Vec<ApplyConflict>> {
    let mut entries = read_entries(live);
    let cmp = compare(live, new, kind);
    let changed: FieldSet = cmp.added.union(&cmp.modified).cloned().collect();
    let mut conflicts = Vec::new();
    for e in entries
        .iter_mut()
        .filter(|e| !e.same_identity(writer.manager, "Apply", writer.subresource))
    {
        let clash: FieldSet = e.set.intersection(&changed).cloned().collect();
        for p in &clash {
            conflicts.push(ApplyConflict {
                manager: e.manager.clone(),
                api_version: e.api_version.clone(),
                field: display_path(p),
            });
        }
        e.set = e
            .set
            .difference(&clash)
            .cloned()
            .collect::<FieldSet>()
            .difference(&cmp.removed)
            .cloned()
            .collect();
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    match entries
        .iter_mut()
        .find(|e| e.same_identity(writer.manager, "Apply", writer.subresource))
    {
        Some(e) => {
            if e.set != new_set {
                e.set = new_set;
                e.time = writer.now.to_owned();
                e.api_version = writer.api_version.to_owned();
            }
        }
        None => entries.push(ManagerEntry {
            manager: writer.manager.to_owned(),
            operation: "Apply".into(),
            api_version: writer.api_version.to_owned(),
            time: writer.now.to_owned(),
            subresource: writer.subresource.map(str::to_owned),
            set: new_set,
        }),
    }
    write_entries(new, &entries);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer<'a>(m: &'a str) -> Writer<'a> {
        Writer {
            manager: m,
            subresource: None,
            api_version: "v1",
            now: "2024-01-01T00:00:00Z",
        }
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let obj = json!({"metadata":{"name":"s","labels":{"a":"b"},"finalizers":["x"]},"spec":{"ports":[{"port":80,"name":"http"}]}});
        let set = field_set(&obj, "Service", Scope::All);
        let tree = to_tree(&set);
        assert_eq!(tree["f:metadata"]["f:labels"], json!({".":{},"f:a":{}}));
        assert_eq!(
            tree["f:metadata"]["f:finalizers"],
            json!({".":{},"v:\"x\"":{}})
        );
        assert!(
            tree["f:spec"]["f:ports"]["k:{\"port\":80,\"protocol\":\"TCP\"}"]["f:name"].is_object()
        );
        let mut back = FieldSet::new();
        from_tree(&tree, &mut Vec::new(), &mut back);
        assert_eq!(back, set);
    }

    #[test]
    fn applying_a_field_another_manager_set_differently_conflicts() {
        let mut live = json!({"spec":{"holderIdentity":"a"}});
        record_update(&json!({}), &mut live, "Lease", &writer("other"));
        let config = json!({"spec":{"holderIdentity":"b"}});
        let mut new = live.clone();
        merge_config(&mut new, &config, "Lease");
        let set = field_set(&config, "Lease", Scope::All);
        let conflicts = record_apply(
            &live,
            &mut new.clone(),
            "Lease",
            &writer("me"),
            set.clone(),
            false,
        )
        .expect_err("conflict");
        assert_eq!(conflicts[0].field, ".spec.holderIdentity");
        assert_eq!(conflicts[0].manager, "other");
        record_apply(&live, &mut new, "Lease", &writer("me"), set, true).expect("force wins");
        let entries = read_entries(&new);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "me");
    }

    #[test]
    fn applying_the_same_value_shares_ownership_without_conflict() {
        let mut live = json!({"spec":{"holderIdentity":"a"}});
        record_update(&json!({}), &mut live, "Lease", &writer("other"));
        let config = json!({"spec":{"holderIdentity":"a"}});
        let mut new = live.clone();
        record_apply(
            &live,
            &mut new,
            "Lease",
            &writer("me"),
            field_set(&config, "Lease", Scope::All),
            false,
        )
        .expect("no conflict");
        assert_eq!(read_entries(&new).len(), 2);
    }

    #[test]
    fn removed_fields_leave_every_owner() {
        let mut live = json!({"spec":{"holderIdentity":"a"}});
        let config = json!({"spec":{"holderIdentity":"a"}});
        record_apply(
            &json!({}),
            &mut live,
            "Lease",
            &writer("me"),
            field_set(&config, "Lease", Scope::All),
            false,
        )
        .expect("apply");
        let mut released = json!({"spec":{}, "metadata": live["metadata"].clone()});
        record_update(&live, &mut released, "Lease", &writer("me"));
        assert!(read_entries(&released).is_empty());
    }

    #[test]
    fn fields_no_longer_applied_are_pruned() {
        let mut live = json!({"metadata":{"labels":{"a":"1","b":"2"}}});
        let first = json!({"metadata":{"labels":{"a":"1","b":"2"}}});
        record_apply(
            &json!({}),
            &mut live,
            "ConfigMap",
            &writer("me"),
            field_set(&first, "ConfigMap", Scope::All),
            false,
        )
        .expect("apply");
        let second = json!({"metadata":{"labels":{"a":"1"}}});
        let set = field_set(&second, "ConfigMap", Scope::All);
        let mut merged = live.clone();
        merge_config(&mut merged, &second, "ConfigMap");
        prune_unapplied(&mut merged, &live, "ConfigMap", &writer("me"), &set);
        assert_eq!(merged["metadata"]["labels"], json!({"a":"1"}));
    }
}
