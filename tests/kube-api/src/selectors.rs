//! Label and field selectors: parsing the query syntax and matching objects.
//!
//! Parse errors become 400 BadRequest, as on the real server; an unsupported field in a
//! field selector is refused rather than ignored, so a test cannot pass on a filter the
//! real server would reject.

use serde_json::Value;

use crate::error::{ApiError, Result};
use crate::resources::Storage;

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<(String, LabelOp)>,
}

fn bad(sel: &str, why: &str) -> ApiError {
    ApiError::BadRequest(format!("unable to parse requirement: {why} in {sel:?}"))
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl LabelSelector {
    /// Parses the `labelSelector` syntax: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`,
    /// `k`, `!k`, `k>1`, `k<1`, comma separated.
    pub fn parse(sel: &str) -> Result<Self> {
        let mut reqs = Vec::new();
        if sel.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for part in split_top_level(sel) {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad(
                    sel,
                    "found '', expected: !, identifier, or 'end of string'",
                ));
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                (key.trim().to_owned(), LabelOp::NotExists)
            } else if let Some((k, v)) = part.split_once("!=") {
                (k.trim().to_owned(), LabelOp::NotEq(v.trim().to_owned()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k.trim().to_owned(), LabelOp::Eq(v.trim().to_owned()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k.trim().to_owned(), LabelOp::Eq(v.trim().to_owned()))
            } else if let Some((k, v)) = part.split_once('>') {
                (
                    k.trim().to_owned(),
                    LabelOp::Gt(v.trim().parse().map_err(|_| {
                        bad(
                            sel,
                            "for 'Gt', 'Lt' operators, the value must be an integer",
                        )
                    })?),
                )
            } else if let Some((k, v)) = part.split_once('<') {
                (
                    k.trim().to_owned(),
                    LabelOp::Lt(v.trim().parse().map_err(|_| {
                        bad(
                            sel,
                            "for 'Gt', 'Lt' operators, the value must be an integer",
                        )
                    })?),
                )
            } else if let Some((k, rest)) = part.split_once(char::is_whitespace) {
                let rest = rest.trim();
                let (neg, list) = if let Some(l) = rest.strip_prefix("notin") {
                    (true, l)
                } else if let Some(l) = rest.strip_prefix("in") {
                    (false, l)
                } else {
                    return Err(bad(
                        sel,
                        &format!("found '{rest}', expected: in, notin, =, ==, !=, gt, lt"),
                    ));
                };
                let list = list.trim();
                let inner = list
                    .strip_prefix('(')
                    .and_then(|l| l.strip_suffix(')'))
                    .ok_or_else(|| bad(sel, "found '', expected: '('"))?;
                let values: Vec<String> = inner
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    return Err(bad(
                        sel,
                        "for 'in', 'notin' operators, values set can't be empty",
                    ));
                }
                (
                    k.trim().to_owned(),
                    if neg {
                        LabelOp::NotIn(values)
                    } else {
                        LabelOp::In(values)
                    },
                )
            } else {
                (part.to_owned(), LabelOp::Exists)
            };
            if !valid_key(&req.0) {
                return Err(bad(sel, &format!("invalid label key {:?}", req.0)));
            }
            let values: Vec<&String> = match &req.1 {
                LabelOp::Eq(v) | LabelOp::NotEq(v) => vec![v],
                LabelOp::In(vs) | LabelOp::NotIn(vs) => vs.iter().collect(),
                _ => vec![],
            };
            if let Some(v) = values.into_iter().find(|v| !valid_value(v)) {
                return Err(bad(sel, &format!("invalid label value: {v:?}")));
            }
            reqs.push(req);
        }
        Ok(Self { reqs })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &serde_json::Map<String, Value>) -> bool {
        self.reqs.iter().all(|(k, op)| {
            let v = labels.get(k).and_then(Value::as_str);
            match op {
                LabelOp::Eq(x) => v == Some(x.as_str()),
                LabelOp::NotEq(x) => v != Some(x.as_str()),
                LabelOp::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                LabelOp::NotIn(xs) => v.is_none_or(|v| !xs.iter().any(|x| x == v)),
                LabelOp::Exists => v.is_some(),
                LabelOp::NotExists => v.is_none(),
                LabelOp::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

/// A parsed `fieldSelector`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

/// The JSON pointer (in the stored object) a field selector field reads, per storage.
fn field_pointer(storage: Storage, field: &str) -> Option<String> {
    let common = match field {
        "metadata.name" => Some("/metadata/name"),
        "metadata.namespace" => Some("/metadata/namespace"),
        _ => None,
    };
    if let Some(p) = common {
        return Some(p.to_owned());
    }
    match storage {
        Storage::Services => matches!(field, "spec.clusterIP" | "spec.type")
            .then(|| format!("/{}", field.replace('.', "/"))),
        Storage::Namespaces => (field == "status.phase").then(|| "/status/phase".to_owned()),
        Storage::Events => {
            let f = field
                .replace("regarding.", "involvedObject.")
                .replace("reportingController", "reportingComponent");
            match f.as_str() {
                "involvedObject.kind"
                | "involvedObject.namespace"
                | "involvedObject.name"
                | "involvedObject.uid"
                | "involvedObject.apiVersion"
                | "involvedObject.resourceVersion"
                | "involvedObject.fieldPath"
                | "reason"
                | "reportingComponent"
                | "type" => Some(format!("/{}", f.replace('.', "/"))),
                "source" => Some("/source/component".to_owned()),
                _ => None,
            }
        }
        Storage::ConfigMaps | Storage::Leases => None,
    }
}

impl FieldSelector {
    /// Parses `field=value`, `field==value` and `field!=value` terms, comma separated.
    pub fn parse(sel: &str, storage: Storage) -> Result<Self> {
        let mut reqs = Vec::new();
        if sel.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for part in sel.split(',') {
            let (field, neg, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, false, v)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid selector: '{sel}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            let Some(pointer) = field_pointer(storage, field) else {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {field}"
                )));
            };
            reqs.push((pointer, neg, value.trim().to_owned()));
        }
        Ok(Self { reqs })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether a stored object is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(pointer, neg, value)| {
            let actual = match obj.pointer(pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) != *neg
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn every_label_operator_matches_like_the_real_server() {
        let l = labels(json!({"app":"web","tier":"front","n":"5"}));
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web,db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("missing", false),
            ("!missing", true),
            ("app notin (db),!missing", true),
            ("n>4", true),
            ("n<4", false),
            ("missing!=x", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).expect("parses").matches(&l),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn malformed_label_selectors_are_bad_requests() {
        for sel in ["app in web", "a=b,,c", "app in ()", "key with space=x"] {
            let err = LabelSelector::parse(sel).expect_err(sel);
            assert_eq!(err.status_code(), 400, "{sel}");
        }
    }

    #[test]
    fn field_selectors_support_name_and_namespace_and_refuse_the_rest() {
        let obj = json!({"metadata":{"name":"a","namespace":"ns"}});
        assert!(
            FieldSelector::parse("metadata.name=a", Storage::ConfigMaps)
                .expect("parses")
                .matches(&obj)
        );
        assert!(
            !FieldSelector::parse("metadata.namespace!=ns", Storage::ConfigMaps)
                .expect("parses")
                .matches(&obj)
        );
        let err = FieldSelector::parse("spec.foo=a", Storage::ConfigMaps).expect_err("unsupported");
        assert_eq!(err.status_code(), 400);
    }
}
