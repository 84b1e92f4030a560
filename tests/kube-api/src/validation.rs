//! The validation rules of the real API server for the served kinds, with its messages.
//!
//! Each function returns the field errors it finds; the registry turns a non-empty list
//! into one 422 `Invalid` Status, listing every cause, as the real server does.

use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use crate::error::FieldError;
use crate::objects::{finalizers_of, is_being_deleted};
use crate::resources::Storage;

/// The largest ConfigMap payload (`data` plus `binaryData`) the real server accepts.
pub const MAX_CONFIG_MAP_BYTES: usize = 1_048_576;
/// The largest total size of an object's annotations.
pub const MAX_ANNOTATION_BYTES: usize = 262_144;

/// A constant pattern; `None` only if the pattern itself were broken, which the unit tests rule out.
fn re(pattern: &str) -> Option<Regex> {
    Regex::new(pattern).ok()
}

fn is_match(re: &LazyLock<Option<Regex>>, s: &str) -> bool {
    re.as_ref().is_some_and(|r| r.is_match(s))
}

static DNS1123_LABEL: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"));
static DNS1035_LABEL: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"^[a-z]([-a-z0-9]*[a-z0-9])?$"));
static DNS1123_SUBDOMAIN: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"));
static QUALIFIED_NAME_PART: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$"));
static LABEL_VALUE: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"));
static CONFIG_KEY: LazyLock<Option<Regex>> = LazyLock::new(|| re(r"^[-._a-zA-Z0-9]+$"));

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";
const IP_MSG: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
const STANDARD_FINALIZERS: &[&str] = &["kubernetes", "orphan", "foregroundDeletion"];

/// Checks an object name against the rule of its kind.
pub fn validate_name(storage: Storage, name: &str) -> Vec<FieldError> {
    let (ok, msg, max) = match storage {
        Storage::Namespaces => (is_match(&DNS1123_LABEL, name), DNS1123_LABEL_MSG, 63),
        Storage::Services => (is_match(&DNS1035_LABEL, name), DNS1035_LABEL_MSG, 63),
        Storage::ConfigMaps | Storage::Events | Storage::Leases => (
            is_match(&DNS1123_SUBDOMAIN, name),
            DNS1123_SUBDOMAIN_MSG,
            253,
        ),
    };
    let mut errs = Vec::new();
    if name.len() > max {
        errs.push(FieldError::invalid(
            "metadata.name",
            name,
            format!("must be no more than {max} characters"),
        ));
    }
    if !ok {
        errs.push(FieldError::invalid("metadata.name", name, msg));
    }
    errs
}

fn qualified_name_errors(field: &str, value: &str) -> Vec<FieldError> {
    let (prefix, name) = match value.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, value),
    };
    let mut errs = Vec::new();
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !is_match(&DNS1123_SUBDOMAIN, p))
    {
        errs.push(FieldError::invalid(
            field,
            value,
            format!("prefix part {DNS1123_SUBDOMAIN_MSG}"),
        ));
    }
    if name.is_empty() || name.len() > 63 || !is_match(&QUALIFIED_NAME_PART, name) {
        errs.push(FieldError::invalid(field, value, QUALIFIED_NAME_MSG));
    }
    errs
}

/// Checks labels, annotations and finalizers.
pub fn validate_metadata(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            errs.extend(qualified_name_errors("metadata.labels", k));
            let value = v.as_str().unwrap_or("");
            if value.len() > 63 {
                errs.push(FieldError::invalid(
                    "metadata.labels",
                    value,
                    "must be no more than 63 characters",
                ));
            }
            if !is_match(&LABEL_VALUE, value) {
                errs.push(FieldError::invalid(
                    "metadata.labels",
                    value,
                    LABEL_VALUE_MSG,
                ));
            }
        }
    }
    if let Some(annotations) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (k, v) in annotations {
            for mut e in qualified_name_errors("metadata.annotations", &k.to_lowercase()) {
                e.kind = crate::error::FieldErrorKind::Invalid(Value::String(k.clone()));
                errs.push(e);
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > MAX_ANNOTATION_BYTES {
            errs.push(FieldError::too_long(
                "metadata.annotations",
                MAX_ANNOTATION_BYTES,
            ));
        }
    }
    for (i, f) in finalizers_of(obj).iter().enumerate() {
        let field = format!("metadata.finalizers[{i}]");
        let errs_f = qualified_name_errors(&field, f);
        if !errs_f.is_empty() {
            errs.extend(errs_f);
        } else if !f.contains('/') && !STANDARD_FINALIZERS.contains(&f.as_str()) {
            errs.push(FieldError::invalid(
                &field,
                f.as_str(),
                "name is neither a standard finalizer name nor is it fully qualified",
            ));
        }
    }
    errs
}

/// New finalizers on an object that is being deleted are refused.
pub fn validate_finalizers_update(new: &Value, old: &Value) -> Vec<FieldError> {
    if !is_being_deleted(old) {
        return Vec::new();
    }
    let old_f = finalizers_of(old);
    let added: Vec<String> = finalizers_of(new)
        .into_iter()
        .filter(|f| !old_f.contains(f))
        .collect();
    if added.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = added.iter().map(|f| format!("{f:?}")).collect();
    vec![FieldError::forbidden(
        "metadata.finalizers",
        format!(
            "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
            list.join(", ")
        ),
    )]
}

/// Kind-specific rules. `old` is the stored object on update.
pub fn validate_object(
    storage: Storage,
    obj: &Value,
    old: Option<&Value>,
    events_v1: bool,
) -> Vec<FieldError> {
    match storage {
        Storage::ConfigMaps => validate_config_map(obj, old),
        Storage::Services => validate_service(obj, old),
        Storage::Leases => validate_lease(obj),
        Storage::Events => validate_event(obj, events_v1),
        Storage::Namespaces => Vec::new(),
    }
}

fn validate_config_map(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut total = 0usize;
    let binary = obj.get("binaryData").and_then(Value::as_object);
    for field in ["data", "binaryData"] {
        let Some(map) = obj.get(field).and_then(Value::as_object) else {
            continue;
        };
        for (k, v) in map {
            let path = format!("{field}[{k}]");
            if k.len() > 253 {
                errs.push(FieldError::invalid(
                    &path,
                    k.as_str(),
                    "must be no more than 253 characters",
                ));
            }
            if !is_match(&CONFIG_KEY, k) {
                errs.push(FieldError::invalid(&path, k.as_str(), CONFIG_KEY_MSG));
            } else if k == "." || k == ".." || k.starts_with("..") {
                errs.push(FieldError::invalid(
                    &path,
                    k.as_str(),
                    "must not be '.' or '..' and must not start with '..'",
                ));
            }
            if field == "data" && binary.is_some_and(|b| b.contains_key(k)) {
                errs.push(FieldError::invalid(
                    &path,
                    k.as_str(),
                    "duplicate of key present in binaryData",
                ));
            }
            // binaryData travels base64-encoded; the limit is on the decoded bytes.
            total += match (field, v.as_str()) {
                ("binaryData", Some(s)) => s.len() / 4 * 3,
                (_, Some(s)) => s.len(),
                _ => 0,
            };
        }
    }
    if total > MAX_CONFIG_MAP_BYTES {
        errs.push(FieldError::too_long("[]", MAX_CONFIG_MAP_BYTES));
    }
    if let Some(old) = old
        && old.get("immutable").and_then(Value::as_bool) == Some(true)
    {
        if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
            errs.push(FieldError::forbidden(
                "immutable",
                "field is immutable when `immutable` is set",
            ));
        }
        for field in ["data", "binaryData"] {
            if obj.get(field) != old.get(field) {
                errs.push(FieldError::forbidden(
                    field,
                    "field is immutable when `immutable` is set",
                ));
            }
        }
    }
    errs
}

fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

fn validate_service(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
    if !TYPES.contains(&ty) {
        errs.push(FieldError::not_supported("spec.type", ty, TYPES));
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() && ty != "ExternalName" && !headless {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names = Vec::new();
    let mut keys = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            errs.push(FieldError::required(format!("spec.ports[{i}].name"), ""));
        } else if !name.is_empty() {
            if names.contains(&name) {
                errs.push(FieldError::duplicate(format!("spec.ports[{i}].name"), name));
            }
            names.push(name);
        }
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            errs.push(FieldError::invalid(
                format!("spec.ports[{i}].port"),
                port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
        if !PROTOCOLS.contains(&protocol) {
            errs.push(FieldError::not_supported(
                format!("spec.ports[{i}].protocol"),
                protocol,
                PROTOCOLS,
            ));
        }
        let key = (port, protocol.to_owned());
        if keys.contains(&key) {
            errs.push(FieldError::duplicate(
                format!("spec.ports[{i}]"),
                serde_json::json!({"port": port, "protocol": protocol}),
            ));
        }
        keys.push(key);
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            if ty == "ClusterIP" || ty == "ExternalName" {
                errs.push(FieldError::forbidden(
                    format!("spec.ports[{i}].nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            } else if !(1..=65535).contains(&np) {
                errs.push(FieldError::invalid(
                    format!("spec.ports[{i}].nodePort"),
                    np,
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
    }
    let class = spec.get("loadBalancerClass").and_then(Value::as_str);
    if ty == "LoadBalancer" {
        if let Some(c) = class {
            errs.extend(qualified_name_errors("spec.loadBalancerClass", c));
        }
    } else if class.is_some() {
        errs.push(FieldError::forbidden(
            "spec.loadBalancerClass",
            "may only be used when `type` is 'LoadBalancer'",
        ));
    }
    if let Some(old) = old {
        let old_ty = old
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP");
        let old_class = old
            .pointer("/spec/loadBalancerClass")
            .and_then(Value::as_str);
        if old_ty == "LoadBalancer" && ty == "LoadBalancer" && old_class != class {
            errs.push(FieldError::invalid(
                "spec.loadBalancerClass",
                class.map_or(Value::Null, Value::from),
                "may not change once set",
            ));
        }
        for field in ["clusterIP", "clusterIPs"] {
            let (n, o) = (spec.get(field), old.pointer(&format!("/spec/{field}")));
            let changeable = ty == "ExternalName" || old_ty == "ExternalName";
            if o.is_some() && n != o && !changeable {
                errs.push(FieldError::invalid(
                    format!("spec.{field}"),
                    n.cloned().unwrap_or(Value::Null),
                    "field is immutable",
                ));
            }
        }
    }
    errs.extend(validate_service_status(obj));
    errs
}

fn validate_service_status(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let ingress = obj
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, ing) in ingress.iter().enumerate() {
        let base = format!("status.loadBalancer.ingress[{i}]");
        let ip = ing.get("ip").and_then(Value::as_str).unwrap_or("");
        if !ip.is_empty() && !is_ip(ip) {
            errs.push(FieldError::invalid(format!("{base}.ip"), ip, IP_MSG));
        }
        match ing.get("ipMode").and_then(Value::as_str) {
            Some(_) if ip.is_empty() => errs.push(FieldError::forbidden(
                format!("{base}.ipMode"),
                "may not be specified when `ip` is not",
            )),
            Some(mode) if mode != "VIP" && mode != "Proxy" => errs.push(FieldError::not_supported(
                format!("{base}.ipMode"),
                mode,
                &["Proxy", "VIP"],
            )),
            _ => {}
        }
        let host = ing.get("hostname").and_then(Value::as_str).unwrap_or("");
        if !host.is_empty() {
            if !is_match(&DNS1123_SUBDOMAIN, host) {
                errs.push(FieldError::invalid(
                    format!("{base}.hostname"),
                    host,
                    DNS1123_SUBDOMAIN_MSG,
                ));
            }
            if is_ip(host) {
                errs.push(FieldError::invalid(
                    format!("{base}.hostname"),
                    host,
                    "must be a DNS name, not an IP address",
                ));
            }
        }
    }
    errs
}

fn validate_lease(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(d) = obj
        .pointer("/spec/leaseDurationSeconds")
        .and_then(Value::as_i64)
        && d <= 0
    {
        errs.push(FieldError::invalid(
            "spec.leaseDurationSeconds",
            d,
            "must be greater than 0",
        ));
    }
    if let Some(t) = obj
        .pointer("/spec/leaseTransitions")
        .and_then(Value::as_i64)
        && t < 0
    {
        errs.push(FieldError::invalid(
            "spec.leaseTransitions",
            t,
            "must be greater than or equal to 0",
        ));
    }
    errs
}

fn validate_event(obj: &Value, events_v1: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let involved_ns = obj
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (regarding, note, controller) = if events_v1 {
        ("regarding", "note", "reportingController")
    } else {
        ("involvedObject", "message", "reportingComponent")
    };
    if !involved_ns.is_empty() && involved_ns != ns {
        errs.push(FieldError::invalid(
            format!("{regarding}.namespace"),
            involved_ns,
            "does not match event.namespace",
        ));
    }
    if events_v1 {
        if obj.get("eventTime").is_none_or(Value::is_null) {
            errs.push(FieldError::required("eventTime", ""));
        }
        for (field, stored) in [
            (controller, "reportingComponent"),
            ("reportingInstance", "reportingInstance"),
            ("action", "action"),
            ("reason", "reason"),
        ] {
            let v = obj.get(stored).and_then(Value::as_str).unwrap_or("");
            if v.is_empty() {
                errs.push(FieldError::required(field, ""));
            } else if v.len() > 128 {
                errs.push(FieldError::too_long(field, 128));
            }
        }
        let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
        if ty != "Normal" && ty != "Warning" {
            errs.push(FieldError::not_supported(
                "type",
                ty,
                &["Normal", "Warning"],
            ));
        }
        if obj
            .get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| m.len() > 1024)
        {
            errs.push(FieldError::too_long(note, 1024));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_pattern_compiles() {
        for r in [
            &DNS1123_LABEL,
            &DNS1035_LABEL,
            &DNS1123_SUBDOMAIN,
            &QUALIFIED_NAME_PART,
            &LABEL_VALUE,
            &CONFIG_KEY,
        ] {
            assert!(r.is_some());
        }
    }

    #[test]
    fn config_map_keys_follow_the_config_key_rule() {
        let errs = validate_object(
            Storage::ConfigMaps,
            &json!({"data":{"10.0.0.1":"a","fd00::1":"b"}}),
            None,
            false,
        );
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "data[fd00::1]");
    }

    #[test]
    fn config_map_payload_over_one_mebibyte_is_too_long() {
        let big = "x".repeat(MAX_CONFIG_MAP_BYTES + 1);
        let errs = validate_object(
            Storage::ConfigMaps,
            &json!({"data":{"k": big}}),
            None,
            false,
        );
        assert_eq!(
            errs[0].to_string(),
            "[]: Too long: must have at most 1048576 bytes"
        );
        let exact = "x".repeat(MAX_CONFIG_MAP_BYTES);
        assert!(
            validate_object(
                Storage::ConfigMaps,
                &json!({"data":{"k": exact}}),
                None,
                false
            )
            .is_empty()
        );
    }

    #[test]
    fn load_balancer_ingress_ip_must_be_an_ip() {
        let svc = json!({"spec":{"ports":[{"port":80}]},"status":{"loadBalancer":{"ingress":[{"ip":"nope"}]}}});
        let errs = validate_object(Storage::Services, &svc, None, false);
        assert_eq!(errs[0].field, "status.loadBalancer.ingress[0].ip");
    }

    #[test]
    fn finalizer_names_must_be_qualified_or_standard() {
        assert!(
            validate_metadata(&json!({"metadata":{"finalizers":["kubernetes","example.com/f"]}}))
                .is_empty()
        );
        assert_eq!(
            validate_metadata(&json!({"metadata":{"finalizers":["mine"]}})).len(),
            1
        );
    }

    #[test]
    fn service_names_are_dns1035_labels() {
        assert!(validate_name(Storage::Services, "web-1").is_empty());
        assert!(!validate_name(Storage::Services, "1web").is_empty());
        assert!(validate_name(Storage::ConfigMaps, "a.b").is_empty());
    }
}
