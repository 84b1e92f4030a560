//! The allocator owners and labels of Services, as pure functions of the
//! syncer's cluster name. Without a name a Service's owner is
//! `service:<namespace>/<name>`; with one it is
//! `service:<cluster>/<namespace>/<name>`, so that clusters sharing one pool
//! never share an owner. [`Owners::parse`] says which owners are this
//! syncer's own: only those are released when their Service is gone. The
//! one exception to "never touch another form" is [`Owners::former`]: the
//! owners Services had before their cluster got a name, from which a
//! Service's own address is taken over.

use std::{collections::HashMap, fmt, str::FromStr};

use vipam::names::{DNS_LABEL_RULE, is_dns_label};

use crate::desired::Subject;

/// Prefix of every owner the syncer creates in the allocator. Other tools
/// must not use it.
pub const OWNER_PREFIX: &str = "service:";
/// Label keys recorded with each allocation.
pub const LABEL_NAMESPACE: &str = "namespace";
/// See [`LABEL_NAMESPACE`].
pub const LABEL_NAME: &str = "name";
/// See [`LABEL_NAMESPACE`].
pub const LABEL_UID: &str = "uid";
/// See [`LABEL_NAMESPACE`]; only with a cluster name.
pub const LABEL_CLUSTER: &str = "cluster";

/// The name of the cluster whose Services this syncer serves: a DNS-1123
/// label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterName(String);

impl FromStr for ClusterName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if is_dns_label(s) {
            Ok(ClusterName(s.to_string()))
        } else {
            Err(format!("not a DNS-1123 label ({DNS_LABEL_RULE})"))
        }
    }
}

impl ClusterName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The owners of this syncer's Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    cluster: Option<ClusterName>,
}

impl Owners {
    /// The owners of a cluster's Services; `None`: the unnamed form.
    pub fn new(cluster: Option<ClusterName>) -> Self {
        Owners { cluster }
    }

    /// The cluster name, if set.
    pub fn cluster(&self) -> Option<&ClusterName> {
        self.cluster.as_ref()
    }

    /// The owner of a Service.
    pub fn of(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.prefix())
    }

    /// The prefix every owner of this syncer starts with, to list them by.
    /// Owners of other forms may start with it too (`service:` without a
    /// name; `service:c1/` is also the unnamed form's namespace `c1`), so
    /// what is listed is filtered with [`Owners::parse`].
    pub fn prefix(&self) -> String {
        match &self.cluster {
            None => OWNER_PREFIX.to_string(),
            Some(c) => format!("{OWNER_PREFIX}{c}/"),
        }
    }

    /// The namespace and name of the Service an owner belongs to, when it is
    /// one of this syncer's owners: exactly `service:<namespace>/<name>`
    /// without a cluster name, exactly `service:<cluster>/<namespace>/<name>`
    /// with this cluster's name. Namespaces and Service names hold no '/', so
    /// the two forms cannot be mistaken for each other.
    pub fn parse<'a>(&self, owner: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = owner.strip_prefix(OWNER_PREFIX)?;
        let rest = match &self.cluster {
            None => rest,
            Some(c) => rest.strip_prefix(c.as_str())?.strip_prefix('/')?,
        };
        let (namespace, name) = rest.split_once('/')?;
        let plain = |s: &str| !s.is_empty() && !s.contains('/');
        (plain(namespace) && plain(name)).then_some((namespace, name))
    }

    /// The owners this cluster's Services had before it got a name (the
    /// unnamed form), when this syncer has one. An address a Service has in
    /// its status and that its owner under them holds is the Service's own,
    /// taken over when the name is turned on.
    pub fn former(&self) -> Option<Owners> {
        self.cluster.as_ref().map(|_| Owners::default())
    }

    /// The labels recorded with a Service's allocation: its namespace, name
    /// and uid, and the cluster name when set.
    pub fn labels(&self, service: &Subject) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_NAMESPACE.to_string(), service.namespace.clone()),
            (LABEL_NAME.to_string(), service.name.clone()),
            (LABEL_UID.to_string(), service.uid.clone()),
        ]);
        if let Some(c) = &self.cluster {
            labels.insert(LABEL_CLUSTER.to_string(), c.to_string());
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::mk_owners;

    #[test]
    fn cluster_names_are_dns_labels() {
        for good in ["c1", "prod", "eu-west-1", "0", &"x".repeat(63)] {
            assert_eq!(
                good.parse::<ClusterName>().map(|c| c.to_string()),
                Ok(good.to_string())
            );
        }
        for bad in [
            "",
            "C1",
            "-c1",
            "c1-",
            "c_1",
            "c.1",
            "c/1",
            "c 1",
            "ä",
            &"x".repeat(64),
        ] {
            let error = bad.parse::<ClusterName>().expect_err(bad);
            assert!(error.contains("DNS-1123 label"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn without_a_name_owners_are_the_unnamed_form_and_round_trip() {
        let owners = mk_owners(None);
        assert_eq!(owners.of("shop", "web"), "service:shop/web");
        assert_eq!(owners.prefix(), "service:");
        assert_eq!(owners.parse("service:shop/web"), Some(("shop", "web")));
    }

    #[test]
    fn with_a_name_owners_carry_it_and_round_trip() {
        let owners = mk_owners(Some("c1"));
        assert_eq!(owners.of("shop", "web"), "service:c1/shop/web");
        assert_eq!(owners.prefix(), "service:c1/");
        assert_eq!(owners.parse("service:c1/shop/web"), Some(("shop", "web")));
    }

    #[test]
    fn without_a_name_owners_of_named_clusters_are_not_its_own() {
        let owners = mk_owners(None);
        assert_eq!(owners.parse("service:c1/shop/web"), None);
        assert_eq!(owners.parse("service:c2/c1/web"), None);
    }

    #[test]
    fn with_a_name_owners_of_other_clusters_are_not_its_own() {
        let owners = mk_owners(Some("c1"));
        assert_eq!(owners.parse("service:c2/shop/web"), None);
        assert_eq!(owners.parse("service:c10/shop/web"), None);
        assert_eq!(owners.parse("service:c/shop/web"), None);
    }

    #[test]
    fn with_a_name_owners_of_the_unnamed_form_are_not_its_own() {
        let owners = mk_owners(Some("c1"));
        assert_eq!(owners.parse("service:shop/web"), None);
        // The unnamed form of a Service in the namespace named like the
        // cluster starts with the same prefix.
        assert!("service:c1/web".starts_with(&owners.prefix()));
        assert_eq!(owners.parse("service:c1/web"), None);
    }

    #[test]
    fn owners_of_other_tools_and_malformed_owners_are_nobodys() {
        for cluster in [None, Some("c1")] {
            let owners = mk_owners(cluster);
            for owner in [
                "tool/x",
                "shop/web",
                "service:",
                "service:shop",
                "service:/web",
                "service:shop/",
                "service:c1/shop/",
                "service:c1//web",
                "service:c1/shop/web/x",
                "Service:shop/web",
            ] {
                assert_eq!(owners.parse(owner), None, "{cluster:?} {owner}");
            }
        }
    }

    #[test]
    fn only_a_named_syncer_has_former_owners_the_unnamed_form() {
        assert_eq!(mk_owners(None).former(), None);
        let owners = mk_owners(Some("c1"));
        let former = owners.former().expect("former owners");
        assert_eq!(former, mk_owners(None));
        let owner = former.of("shop", "web");
        assert_eq!(owner, "service:shop/web");
        assert_eq!(owners.parse(&owner), None, "a former owner is not its own");
    }

    #[test]
    fn labels_name_the_service_and_the_cluster_when_set() {
        let subject = Subject {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u-1".into(),
        };
        let mut want = HashMap::from([
            ("namespace".to_string(), "shop".to_string()),
            ("name".to_string(), "web".to_string()),
            ("uid".to_string(), "u-1".to_string()),
        ]);
        assert_eq!(mk_owners(None).labels(&subject), want);
        want.insert("cluster".into(), "c1".into());
        assert_eq!(mk_owners(Some("c1")).labels(&subject), want);
    }
}
