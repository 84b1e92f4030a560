//! The table of resources this server serves, and the schema facts the patch and apply
//! logic needs about them.
//!
//! Discovery, routing, storage keys, error messages and list/merge strategies all read
//! from here, so adding a resource is one entry, not a hunt through handlers.

use crate::error::GroupResource;

/// One served resource (one group/version/plural), as discovery describes it.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    /// API group, empty for core.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural name used in paths.
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Kind of objects.
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names kubectl accepts.
    pub short_names: &'static [&'static str],
    /// Whether the `status` subresource exists.
    pub has_status: bool,
    /// Storage shared between views: core and events.k8s.io Events are one set of objects.
    pub storage: Storage,
    /// Whether `PUT` to a missing object creates it (the real strategy's `AllowCreateOnUpdate`).
    pub create_on_update: bool,
}

/// Where objects of a resource are kept; two views of one storage see the same objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Storage {
    /// core/v1 Namespaces.
    Namespaces,
    /// core/v1 Services.
    Services,
    /// core/v1 ConfigMaps.
    ConfigMaps,
    /// Events, stored in their core/v1 form.
    Events,
    /// coordination.k8s.io/v1 Leases.
    Leases,
}

impl ResourceInfo {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Name used in error messages and details.
    pub fn group_resource(&self) -> GroupResource {
        GroupResource {
            group: self.group.to_owned(),
            resource: self.plural.to_owned(),
        }
    }

    /// Kind of the list object.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Whether this is the events.k8s.io view of events, whose fields are renamed.
    pub fn is_events_v1(&self) -> bool {
        self.group == "events.k8s.io"
    }
}

/// Every resource served, in discovery order.
pub static RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        has_status: true,
        storage: Storage::Namespaces,
        create_on_update: false,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        has_status: true,
        storage: Storage::Services,
        create_on_update: true,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        has_status: false,
        storage: Storage::ConfigMaps,
        create_on_update: false,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        storage: Storage::Events,
        create_on_update: true,
    },
    ResourceInfo {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        storage: Storage::Events,
        create_on_update: true,
    },
    ResourceInfo {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        has_status: false,
        storage: Storage::Leases,
        create_on_update: true,
    },
];

/// The resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource whose objects have this `apiVersion` and `kind`.
pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// The resource a test names loosely: a plural, singular, kind or short name, optionally
/// qualified with its group (`leases.coordination.k8s.io`). Core wins over other groups.
pub fn find_loose(name: &str) -> Option<&'static ResourceInfo> {
    let (base, group) = match name.split_once('.') {
        Some((b, g)) => (b, Some(g)),
        None => (name, None),
    };
    RESOURCES.iter().find(|r| {
        let named = r.plural == base
            || r.singular == base
            || r.kind.eq_ignore_ascii_case(base)
            || r.short_names.contains(&base);
        named && group.is_none_or(|g| g == r.group)
    })
}

/// The canonical (stored) view of a storage.
pub fn storage_view(storage: Storage) -> &'static ResourceInfo {
    RESOURCES
        .iter()
        .find(|r| r.storage == storage && r.group != "events.k8s.io")
        .unwrap_or(&RESOURCES[0])
}

/// Groups other than core, with their versions, in discovery order.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// How a list field merges, for strategic merge patch and server-side apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole.
    Atomic,
    /// A set of scalars (`finalizers`): SMP merges, apply owns each value.
    Set,
    /// A list of objects identified by key fields (`ports` by port and protocol).
    Map {
        /// The merge key strategic merge patch uses.
        merge_key: &'static str,
        /// The keys server-side apply uses.
        keys: &'static [&'static str],
    },
}

/// The list type of the field at `path` (field names from the object root) in `kind`.
pub fn list_type(kind: &str, path: &[&str]) -> ListType {
    match (kind, path) {
        (_, ["metadata", "finalizers"]) => ListType::Set,
        (_, ["metadata", "ownerReferences"]) => ListType::Map {
            merge_key: "uid",
            keys: &["uid"],
        },
        ("Service", ["spec", "ports"]) => ListType::Map {
            merge_key: "port",
            keys: &["port", "protocol"],
        },
        ("Service" | "Namespace", ["status", "conditions"]) => ListType::Map {
            merge_key: "type",
            keys: &["type"],
        },
        _ => ListType::Atomic,
    }
}

/// Whether the object at `path` is a map of free keys (labels), as opposed to a struct;
/// apply records ownership of maps themselves as well as of their keys.
pub fn is_map(kind: &str, path: &[&str]) -> bool {
    matches!(
        (kind, path),
        (_, ["metadata", "labels" | "annotations"])
            | ("ConfigMap", ["data" | "binaryData"])
            | ("Service", ["spec", "selector"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_names_resolve_like_kubectl() {
        assert_eq!(find_loose("svc").map(|r| r.kind), Some("Service"));
        assert_eq!(
            find_loose("leases").map(|r| r.group),
            Some("coordination.k8s.io")
        );
        assert_eq!(find_loose("events").map(|r| r.group), Some(""));
        assert_eq!(
            find_loose("events.events.k8s.io").map(|r| r.group),
            Some("events.k8s.io")
        );
        assert_eq!(find_loose("pods"), None);
    }
}
