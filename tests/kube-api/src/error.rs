//! The one error type of the server and its mapping to Kubernetes `Status` bodies.
//!
//! Every failure a handler can produce is a variant here; `status_code`, `reason` and
//! `status_body` are the only place that decides what a client sees, so the wire format
//! of errors cannot drift between handlers.

use serde_json::{Value, json};

/// A group and a plural resource name, as the API server names things in messages
/// (`services`, `leases.coordination.k8s.io`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupResource {
    /// API group, empty for the core group.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
}

impl std::fmt::Display for GroupResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// What is wrong with one field, in the categories the API server reports as causes.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldErrorKind {
    /// `Invalid value: <value>: <detail>`.
    Invalid(Value),
    /// `Required value`.
    Required,
    /// `Forbidden: <detail>`.
    Forbidden,
    /// `Too long: must have at most <n> bytes`.
    TooLong(usize),
    /// `Unsupported value: <value>: supported values: ...`.
    NotSupported(Value, Vec<&'static str>),
    /// `Duplicate value: <value>`.
    Duplicate(Value),
}

/// One validation failure on one field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// The field path as the API server prints it (`spec.ports[0].port`, `data[a:b]`).
    pub field: String,
    /// The category and offending value.
    pub kind: FieldErrorKind,
    /// Human readable detail.
    pub detail: String,
}

impl FieldError {
    /// An `Invalid value` error.
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<Value>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Invalid(value.into()),
            detail: detail.into(),
        }
    }
    /// A `Required value` error.
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Required,
            detail: detail.into(),
        }
    }
    /// A `Forbidden` error.
    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Forbidden,
            detail: detail.into(),
        }
    }
    /// A `Too long` error.
    pub fn too_long(field: impl Into<String>, max: usize) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::TooLong(max),
            detail: String::new(),
        }
    }
    /// An `Unsupported value` error.
    pub fn not_supported(
        field: impl Into<String>,
        value: impl Into<Value>,
        supported: &[&'static str],
    ) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::NotSupported(value.into(), supported.to_vec()),
            detail: String::new(),
        }
    }
    /// A `Duplicate value` error.
    pub fn duplicate(field: impl Into<String>, value: impl Into<Value>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Duplicate(value.into()),
            detail: String::new(),
        }
    }

    fn cause_reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Invalid(_) => "FieldValueInvalid",
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::TooLong(_) => "FieldValueTooLong",
            FieldErrorKind::NotSupported(..) => "FieldValueNotSupported",
            FieldErrorKind::Duplicate(_) => "FieldValueDuplicate",
        }
    }

    /// The message without the field, as it appears in `details.causes[].message`.
    pub fn body(&self) -> String {
        let with_detail = |head: String| {
            if self.detail.is_empty() {
                head
            } else {
                format!("{head}: {}", self.detail)
            }
        };
        match &self.kind {
            FieldErrorKind::Invalid(v) => with_detail(format!("Invalid value: {}", go_value(v))),
            FieldErrorKind::Required => with_detail("Required value".to_owned()),
            FieldErrorKind::Forbidden => with_detail("Forbidden".to_owned()),
            FieldErrorKind::TooLong(max) => format!("Too long: must have at most {max} bytes"),
            FieldErrorKind::NotSupported(v, supported) => {
                let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
                format!(
                    "Unsupported value: {}: supported values: {}",
                    go_value(v),
                    list.join(", ")
                )
            }
            FieldErrorKind::Duplicate(v) => format!("Duplicate value: {}", go_value(v)),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// Formats a value the way Go's `%#v`-ish field errors show it: strings quoted, numbers bare.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".to_owned(),
        other => other.to_string(),
    }
}

/// One field owned by another manager that a server-side apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConflict {
    /// The manager that owns the field.
    pub manager: String,
    /// The API version that manager wrote with.
    pub api_version: String,
    /// The field, in the `.spec.holderIdentity` notation of conflict messages.
    pub field: String,
}

/// Every way a request can fail.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The named object does not exist.
    #[error("{resource} {name:?} not found")]
    NotFound {
        /// Resource of the object.
        resource: GroupResource,
        /// Name of the object.
        name: String,
    },
    /// The path names nothing this server serves.
    #[error("the server could not find the requested resource")]
    UnknownPath,
    /// A create collided with an existing object.
    #[error("{resource} {name:?} already exists")]
    AlreadyExists {
        /// Resource of the object.
        resource: GroupResource,
        /// Name of the object.
        name: String,
    },
    /// A precondition (resourceVersion, uid) did not hold.
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {detail}")]
    Conflict {
        /// Resource of the object.
        resource: GroupResource,
        /// Name of the object.
        name: String,
        /// Why.
        detail: String,
    },
    /// A server-side apply would take fields owned by other managers.
    #[error("Apply failed with {} conflict{}: {}", conflicts.len(), if conflicts.len() == 1 { "" } else { "s" }, apply_conflict_list(conflicts))]
    ApplyConflicts {
        /// Resource of the object.
        resource: GroupResource,
        /// Name of the object.
        name: String,
        /// The conflicting fields.
        conflicts: Vec<ApplyConflict>,
    },
    /// Validation failed.
    #[error("{kind} {name:?} is invalid: {}", field_error_list(causes))]
    Invalid {
        /// API group of the kind.
        group: String,
        /// Kind (not resource) of the object, as the real server reports it.
        kind: String,
        /// Name of the object.
        name: String,
        /// The failed fields.
        causes: Vec<FieldError>,
    },
    /// A request that failed for a reason reported as a bare 422 (a failed JSON patch `test`).
    #[error("{0}")]
    Unprocessable(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request is refused for a policy reason (content of a terminating namespace).
    #[error("{resource} {name:?} is forbidden: {detail}")]
    Forbidden {
        /// Resource of the object.
        resource: GroupResource,
        /// Name of the object.
        name: String,
        /// Why.
        detail: String,
    },
    /// The verb is not served on this path.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request body's content type is not accepted here.
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {accepted}"
    )]
    UnsupportedMediaType {
        /// The content types that are accepted.
        accepted: String,
    },
    /// No acceptable response format.
    #[error("only the following media types are accepted: application/json, application/yaml")]
    NotAcceptable,
    /// A resourceVersion or continue token refers to compacted history.
    #[error("{0}")]
    Expired(String),
    /// The body is larger than the server accepts.
    #[error("{0}")]
    RequestEntityTooLarge(String),
    /// The request waited too long (a resourceVersion that does not exist yet).
    #[error("Timeout: {0}")]
    Timeout(String),
    /// A failure injected by a test.
    #[error("{message}")]
    Injected {
        /// HTTP status code.
        code: u16,
        /// Value of `Retry-After`, also put in `details.retryAfterSeconds`.
        retry_after: Option<u64>,
        /// Message of the Status body.
        message: String,
    },
    /// A bug in this server.
    #[error("Internal error occurred: {0}")]
    Internal(String),
}

fn field_error_list(causes: &[FieldError]) -> String {
    match causes {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn apply_conflict_list(conflicts: &[ApplyConflict]) -> String {
    match conflicts {
        [one] => format!(
            "conflict with {:?} using {}: {}",
            one.manager, one.api_version, one.field
        ),
        many => {
            let lines: Vec<String> = many
                .iter()
                .map(|c| {
                    format!(
                        "\n- conflict with {:?} using {}: {}",
                        c.manager, c.api_version, c.field
                    )
                })
                .collect();
            lines.concat()
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    /// The HTTP status code.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::NotFound { .. } | Self::UnknownPath => 404,
            Self::AlreadyExists { .. } | Self::Conflict { .. } | Self::ApplyConflicts { .. } => 409,
            Self::Invalid { .. } | Self::Unprocessable(_) => 422,
            Self::BadRequest(_) => 400,
            Self::Forbidden { .. } => 403,
            Self::MethodNotAllowed(_) => 405,
            Self::UnsupportedMediaType { .. } => 415,
            Self::NotAcceptable => 406,
            Self::Expired(_) => 410,
            Self::RequestEntityTooLarge(_) => 413,
            Self::Timeout(_) => 504,
            Self::Injected { code, .. } => *code,
            Self::Internal(_) => 500,
        }
    }

    /// The `reason` of the Status body: what clients such as kube-rs classify errors by.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::UnknownPath => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } | Self::ApplyConflicts { .. } => "Conflict",
            Self::Invalid { .. } | Self::Unprocessable(_) => "Invalid",
            Self::BadRequest(_) => "BadRequest",
            Self::Forbidden { .. } => "Forbidden",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            Self::NotAcceptable => "NotAcceptable",
            Self::Expired(_) => "Expired",
            Self::RequestEntityTooLarge(_) => "RequestEntityTooLarge",
            Self::Timeout(_) => "Timeout",
            Self::Injected { code, .. } => reason_for_code(*code),
            Self::Internal(_) => "InternalError",
        }
    }

    /// The `details` of the Status body, if the real server sends one.
    fn details(&self) -> Option<Value> {
        let named = |resource: &GroupResource, name: &str| {
            let mut d = json!({ "name": name, "kind": resource.resource });
            if !resource.group.is_empty() {
                d["group"] = json!(resource.group);
            }
            d
        };
        match self {
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name }
            | Self::Conflict { resource, name, .. }
            | Self::Forbidden { resource, name, .. } => Some(named(resource, name)),
            Self::ApplyConflicts {
                resource,
                name,
                conflicts,
            } => {
                let mut d = named(resource, name);
                d["causes"] = conflicts
                    .iter()
                    .map(|c| {
                        json!({
                            "reason": "FieldManagerConflict",
                            "message": format!("conflict with {:?} using {}", c.manager, c.api_version),
                            "field": c.field,
                        })
                    })
                    .collect();
                Some(d)
            }
            Self::Invalid {
                group,
                kind,
                name,
                causes,
            } => {
                let mut d = json!({ "name": name, "kind": kind });
                if !group.is_empty() {
                    d["group"] = json!(group);
                }
                d["causes"] = causes
                    .iter()
                    .map(|c| json!({ "reason": c.cause_reason(), "message": c.body(), "field": c.field }))
                    .collect();
                Some(d)
            }
            Self::Unprocessable(message) => Some(json!({ "causes": [{ "message": message }] })),
            Self::UnknownPath => Some(json!({})),
            Self::Injected {
                retry_after: Some(secs),
                ..
            } => Some(json!({ "retryAfterSeconds": secs })),
            Self::Timeout(_) => Some(
                json!({ "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }] }),
            ),
            _ => None,
        }
    }

    /// The `Status` object the real API server would send for this error.
    pub fn status_body(&self) -> Value {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.status_code(),
        });
        if let Some(details) = self.details() {
            body["details"] = details;
        }
        body
    }

    /// Seconds for a `Retry-After` header, if any.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Injected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// An `Invalid` error with one cause.
    pub fn invalid_one(group: &str, kind: &str, name: &str, cause: FieldError) -> Self {
        Self::Invalid {
            group: group.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
            causes: vec![cause],
        }
    }
}

/// The Status reason the API server uses for a bare HTTP code.
pub fn reason_for_code(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_matches_the_real_status_body() {
        let err = ApiError::NotFound {
            resource: GroupResource {
                group: String::new(),
                resource: "configmaps".into(),
            },
            name: "x".into(),
        };
        assert_eq!(
            err.status_body(),
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"configmaps \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"configmaps"},"code":404})
        );
    }

    #[test]
    fn invalid_lists_every_cause_with_field_and_reason() {
        let err = ApiError::Invalid {
            group: String::new(),
            kind: "ConfigMap".into(),
            name: "c".into(),
            causes: vec![
                FieldError::too_long("[]", 1_048_576),
                FieldError::required("metadata.name", ""),
            ],
        };
        let body = err.status_body();
        assert_eq!(
            body["message"],
            "ConfigMap \"c\" is invalid: [[]: Too long: must have at most 1048576 bytes, metadata.name: Required value]"
        );
        assert_eq!(body["details"]["causes"][0]["reason"], "FieldValueTooLong");
        assert_eq!(body["details"]["causes"][1]["field"], "metadata.name");
    }

    #[test]
    fn grouped_resources_are_qualified_in_messages() {
        let err = ApiError::NotFound {
            resource: GroupResource {
                group: "coordination.k8s.io".into(),
                resource: "leases".into(),
            },
            name: "l".into(),
        };
        assert_eq!(
            err.to_string(),
            "leases.coordination.k8s.io \"l\" not found"
        );
        assert_eq!(err.status_body()["details"]["group"], "coordination.k8s.io");
    }
}
