//! Names both programs and every client agree on: what a DNS label (a pool
//! name, the syncer's cluster name) may be, and how a gRPC status code is
//! spelled in logs and metric labels.

/// What a DNS-1123 label may be, in words, for error messages.
pub const DNS_LABEL_RULE: &str =
    "1 to 63 lowercase letters, digits and '-', not starting or ending with '-'";

/// What a pool name may be, in words, for error messages.
pub const POOL_NAME_RULE: &str = DNS_LABEL_RULE;

/// Whether `name` is a DNS-1123 label: 1 to 63 lowercase letters, digits and
/// '-', starting and ending with a letter or digit.
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether `name` is a valid pool name: a DNS label.
pub fn is_pool_name(name: &str) -> bool {
    is_dns_label(name)
}

/// The name of a gRPC code as the gRPC specification spells it
/// (`RESOURCE_EXHAUSTED`), used as the `code` label of every metric.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_dns_labels() {
        for good in ["a", "default", "team-a", "p0", &"x".repeat(63)] {
            assert!(is_pool_name(good), "{good} should be a pool name");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "ä",
            &"x".repeat(64),
        ] {
            assert!(!is_pool_name(bad), "{bad:?} should not be a pool name");
        }
    }

    #[test]
    fn code_names_are_the_specification_spellings() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
