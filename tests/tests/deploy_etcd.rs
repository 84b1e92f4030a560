//! The opt-in component `deploy/components/etcd-store` (replicated
//! allocators on etcd), its nested `password` component and the migration
//! Job in `deploy/examples`, checked as rendered: three replicas with no
//! sled volume, a rolling update, a disruption budget and anti-affinity that
//! select the pod, the etcd client settings from the Secret `vipam-etcd`, a
//! syncer that waits for the Lease without holding the pod unready, a Job
//! that copies the sled volume into the replicas' prefix, and flags and
//! values that the binaries accept.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        batch::v1::Job,
        core::v1::{Container, PodSpec},
        policy::v1::PodDisruptionBudget,
        rbac::v1::Role,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;
use vipam_e2e::binary;

// deploy.rs uses the rest of these helpers.
#[allow(dead_code)]
mod manifests;

use manifests::*;

/// The base with the etcd store.
fn rendered_etcd() -> Vec<Value> {
    rendered_with(&["etcd-store"])
}

/// The base with the etcd store and etcd's password authentication.
fn rendered_etcd_password() -> Vec<Value> {
    rendered_with(&["etcd-store", "etcd-store/password"])
}

fn args_of(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

fn pod_labels(d: &Deployment) -> std::collections::BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.clone())
        .and_then(|m| m.labels)
        .expect("pod labels")
}

/// The path of the allocator's file flags (`--etcd-ca-file` ...), each the
/// file of the Secret's key named beside it.
const ETCD_FILES: [(&str, &str); 3] = [
    ("--etcd-ca-file", "ca.crt"),
    ("--etcd-cert-file", "tls.crt"),
    ("--etcd-key-file", "tls.key"),
];

#[test]
fn the_etcd_store_runs_three_allocators_with_no_sled_volume_or_claim() {
    let docs = rendered_etcd();
    for doc in &docs {
        check_round_trip(doc);
    }
    assert!(
        of_kind(&docs, "PersistentVolumeClaim").is_empty(),
        "the sled store's claim is not rendered"
    );
    let d = deployment(&docs);
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let pod = pod(&d);
    for v in pod.volumes.iter().flatten() {
        assert!(
            v.persistent_volume_claim.is_none() && v.empty_dir.is_none(),
            "no data volume on etcd: {v:?}"
        );
        assert_ne!(v.name, "data");
    }
    let allocator = container(&pod, "vipam-allocator");
    let args = args_of(allocator);
    assert_eq!(flag_value(&args, "--store"), Some("etcd"));
    assert_eq!(flag_value(&args, "--data-dir"), None, "{args:?}");
    for c in &pod.containers {
        for m in c.volume_mounts.iter().flatten() {
            assert_ne!(m.mount_path, "/var/lib/vipam", "{}", c.name);
        }
    }
}

#[test]
fn replicas_roll_one_at_a_time_spread_across_nodes_under_a_disruption_budget() {
    let docs = rendered_etcd();
    let d = deployment(&docs);
    let spec = d.spec.as_ref().expect("spec");
    let strategy = spec.strategy.as_ref().expect("strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    // A ready replica goes only once its successor is ready.
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    let labels = pod_labels(&d);
    let selects_the_pod = |match_labels: &std::collections::BTreeMap<String, String>| {
        !match_labels.is_empty() && match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    // Preferred, not required: a cluster with fewer nodes still runs three.
    let anti = pod(&d)
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .expect("podAntiAffinity");
    assert!(
        anti.required_during_scheduling_ignored_during_execution
            .is_none()
    );
    let preferred = anti
        .preferred_during_scheduling_ignored_during_execution
        .expect("preferred anti-affinity");
    assert!(preferred.iter().any(|p| {
        p.pod_affinity_term.topology_key == "kubernetes.io/hostname"
            && p.pod_affinity_term
                .label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(selects_the_pod)
    }));
    let budgets = of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(budgets.len(), 1, "{budgets:?}");
    let pdb: PodDisruptionBudget = typed(&budgets[0]);
    assert_eq!(pdb.metadata.namespace.as_deref(), Some(NAMESPACE));
    let pdb = pdb.spec.expect("spec");
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(pdb.min_available, None);
    assert_eq!(
        pdb.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    let budget_selects = pdb
        .selector
        .and_then(|s| s.match_labels)
        .expect("matchLabels");
    assert!(selects_the_pod(&budget_selects), "{budget_selects:?}");
    assert_eq!(
        Some(budget_selects),
        spec.selector.match_labels.clone(),
        "the budget counts exactly the Deployment's pods"
    );
}

#[test]
fn the_etcd_endpoints_and_client_files_come_from_the_secret_vipam_etcd() {
    let docs = rendered_etcd();
    let pod = pod(&deployment(&docs));
    let allocator = container(&pod, "vipam-allocator");
    let args = args_of(allocator);
    for (flag, key) in ETCD_FILES {
        let path = flag_value(&args, flag).unwrap_or_else(|| panic!("no {flag}"));
        assert_eq!(secret_at(&pod, allocator, path), "vipam-etcd", "{flag}");
        let (dir, file) = path.rsplit_once('/').expect("a path");
        assert_eq!(file, key, "{flag} is the Secret's key {key}");
        let mount = allocator
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == dir)
            .unwrap_or_else(|| panic!("{flag}: nothing mounted at {dir}"));
        assert_eq!(mount.read_only, Some(true), "{flag}");
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.secret.clone())
            .expect("a Secret volume");
        assert!(secret.items.is_none(), "every key, under its own name");
        // 0440, as the base's token: the key is not readable by others.
        assert_eq!(secret.default_mode, Some(0o440));
    }
    let env = |name: &str| {
        allocator
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.clone())
            .unwrap_or_else(|| panic!("{name} is not set from a reference"))
    };
    let endpoints = env("VIPAM_ETCD_ENDPOINTS")
        .secret_key_ref
        .expect("the endpoints from a Secret");
    assert_eq!(
        (endpoints.name.as_str(), endpoints.key.as_str()),
        ("vipam-etcd", "endpoints")
    );
    assert_eq!(endpoints.optional, None, "the endpoints are required");
    let prefix = env("VIPAM_ETCD_PREFIX")
        .config_map_key_ref
        .expect("the prefix from a ConfigMap");
    assert!(config_data(&docs, &prefix.name).contains_key(&prefix.key));
    // The syncer has no business with etcd.
    let syncer = container(&pod, "vipam-syncer");
    for m in syncer.volume_mounts.iter().flatten() {
        assert!(!m.mount_path.contains("etcd"), "{m:?}");
    }
}

#[test]
fn the_password_component_reads_the_user_and_password_from_the_same_secret() {
    let docs = rendered_etcd_password();
    for doc in &docs {
        check_round_trip(doc);
    }
    let pod = pod(&deployment(&docs));
    let allocator = container(&pod, "vipam-allocator");
    let args = args_of(allocator);
    let password = flag_value(&args, "--etcd-password-file").expect("--etcd-password-file");
    assert_eq!(secret_at(&pod, allocator, password), "vipam-etcd");
    assert!(password.ends_with("/password"), "{password}");
    let user = allocator
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "VIPAM_ETCD_USERNAME")
        .and_then(|e| e.value_from.clone())
        .and_then(|f| f.secret_key_ref)
        .expect("the user name from a Secret");
    assert_eq!(
        (user.name.as_str(), user.key.as_str()),
        ("vipam-etcd", "username")
    );
    // Without the component, no authentication is asked for.
    let plain = args_of(container(
        &self::pod(&deployment(&rendered_etcd())),
        "vipam-allocator",
    ));
    assert_eq!(flag_value(&plain, "--etcd-password-file"), None);
}

#[test]
fn every_replicas_syncer_waits_for_the_lease_without_holding_its_pod_unready() {
    let docs = rendered_etcd();
    let pod = pod(&deployment(&docs));
    let syncer = container(&pod, "vipam-syncer");
    let env = resolved_env(&docs, syncer);
    let value = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the syncer has no {name}"))
    };
    // One Lease for all replicas, one identity per replica: the pod's name.
    let identity = syncer
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|f| f.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(identity.as_deref(), Some("metadata.name"));
    let args = args_of(syncer);
    for flag in ["--identity", "--lease-name"] {
        assert_eq!(flag_value(&args, flag), None, "{flag} is not set per pod");
    }
    assert_eq!(value("VIPAM_LEASE_NAMESPACE"), NAMESPACE);
    let role: Role = one(&docs, "Role", "vipam-syncer");
    let leases = role
        .rules
        .iter()
        .flatten()
        .filter(|r| r.resources.iter().flatten().any(|r| r == "leases"))
        .flat_map(|r| r.verbs.clone())
        .collect::<BTreeSet<_>>();
    assert!(
        ["get", "create", "patch"]
            .iter()
            .all(|v| leases.contains(*v)),
        "{leases:?}"
    );
    // The syncer's /readyz is 200 only while it leads; the pod's readiness
    // (rollouts, the budget, the Service of expose-allocator) is the
    // allocator's.
    let path = |c: &Container| {
        c.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.clone())
    };
    assert_eq!(path(syncer).as_deref(), Some("/healthz"));
    let allocator = container(&pod, "vipam-allocator");
    assert_eq!(path(allocator).as_deref(), Some("/readyz"));
    // Each cluster's owners, from the config.
    assert!(!value("VIPAM_CLUSTER_NAME").is_empty());
}

#[test]
fn every_flag_and_variable_of_the_etcd_store_is_one_the_binaries_accept() {
    let docs = rendered_etcd_password();
    for c in &pod(&deployment(&docs)).containers {
        let name = binary_of(c);
        let (flags, envs) = help_of(&name);
        for arg in c.args.iter().flatten() {
            let flag = arg.split('=').next().expect("flag");
            assert!(
                flags.contains(flag),
                "{name} has no flag {flag} (from {arg:?}); it has {flags:?}"
            );
        }
        for e in c.env.iter().flatten() {
            assert!(
                envs.contains(&e.name),
                "{name} reads no environment variable {}; it reads {envs:?}",
                e.name
            );
        }
    }
}

/// Says that a test cannot run here and why; under CI, fails instead.
fn skip(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

/// A self-signed certificate and its key in `dir`, made with openssl,
/// standing in for the CA and the client certificate; None without openssl.
fn stand_in_certificate(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=vipam", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((cert, key))
}

/// `args` with each etcd file (certificates, key, password) replaced by a
/// stand-in in `dir`.
fn with_stand_in_etcd_files(args: &[String], dir: &Path, cert: &Path, key: &Path) -> Vec<String> {
    let password = dir.join("password");
    std::fs::write(&password, "stand-in password").expect("stand-in password");
    let stand_in = |flag: &str| match flag {
        "--etcd-ca-file" | "--etcd-cert-file" => Some(cert),
        "--etcd-key-file" => Some(key),
        "--etcd-password-file" => Some(password.as_path()),
        _ => None,
    };
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((flag, _)) => stand_in(flag)
                .map(|p| format!("{flag}={}", p.display()))
                .unwrap_or_else(|| arg.clone()),
            None => arg.clone(),
        })
        .collect()
}

#[test]
fn the_etcd_store_settings_pass_the_binaries_own_checks() {
    let test = "the_etcd_store_settings_pass_the_binaries_own_checks";
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((cert, key)) = stand_in_certificate(dir.path()) else {
        return skip(test, "openssl is not installed (apt-get install openssl)");
    };
    let docs = rendered_etcd_password();
    for c in &pod(&deployment(&docs)).containers {
        let name = binary_of(c);
        let args = with_stand_in_tokens(&args_of(c), dir.path());
        let mut cmd = Command::new(binary(&name).expect("binary"));
        cmd.args(with_stand_in_etcd_files(&args, dir.path(), &cert, &key))
            .arg("--check")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in resolved_env(&docs, c) {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run --check");
        assert!(
            out.status.success(),
            "{name} refuses the etcd store's settings:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn migration_job() -> Job {
    let path = repo().join("deploy/examples/migrate-sled-to-etcd.yaml");
    let docs = yaml_docs(&std::fs::read_to_string(&path).expect("the migration Job"));
    assert_eq!(docs.len(), 1);
    check_round_trip(&docs[0]);
    typed(&docs[0])
}

fn job_pod(job: &Job) -> PodSpec {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec")
}

#[test]
fn the_migration_job_copies_the_sled_volume_into_the_installations_prefix() {
    let job = migration_job();
    assert_eq!(job.metadata.namespace.as_deref(), Some(NAMESPACE));
    let pod = job_pod(&job);
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.containers.len(), 1);
    let migrate = &pod.containers[0];
    assert_eq!(binary_of(migrate), "vipam-allocator");
    let args = args_of(migrate);
    assert_eq!(args.first().map(String::as_str), Some("migrate"));
    assert_eq!(flag_value(&args, "--from"), Some("sled"));
    assert_eq!(flag_value(&args, "--to"), Some("etcd"));
    // From the base's volume, where the base's allocator keeps it.
    let base = rendered();
    let base_pod = self::pod(&deployment(&base));
    let base_args = args_of(container(&base_pod, "vipam-allocator"));
    let data_dir = flag_value(&args, "--data-dir").expect("--data-dir");
    assert_eq!(Some(data_dir), flag_value(&base_args, "--data-dir"));
    let mount = migrate
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == data_dir)
        .expect("the data directory is mounted");
    let claim = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.persistent_volume_claim.clone())
        .expect("a claim");
    assert_eq!(claim.claim_name, "vipam-data");
    assert!(!of_kind(&base, "PersistentVolumeClaim").is_empty());
    // Into the prefix and with the client settings the replicas use.
    let docs = rendered_etcd();
    assert_eq!(
        flag_value(&args, "--etcd-prefix"),
        config_data(&docs, "vipam-config")
            .get("VIPAM_ETCD_PREFIX")
            .map(String::as_str)
    );
    let replicas = self::pod(&deployment(&docs));
    let allocator_args = args_of(container(&replicas, "vipam-allocator"));
    for (flag, _) in ETCD_FILES {
        assert_eq!(
            flag_value(&args, flag),
            flag_value(&allocator_args, flag),
            "{flag}"
        );
        let path = flag_value(&args, flag).unwrap_or_default();
        assert_eq!(secret_at(&pod, migrate, path), "vipam-etcd");
    }
    assert_eq!(
        migrate
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "VIPAM_ETCD_ENDPOINTS"),
        container(&replicas, "vipam-allocator")
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "VIPAM_ETCD_ENDPOINTS"),
    );
    // With the base allocator's pool settings, which migrate needs: etcd
    // keeps the pool definitions and refuses others.
    let (_, migrate_envs) = help_of_command("vipam-allocator", &["migrate"]);
    let settings: Vec<_> = container(&base_pod, "vipam-allocator")
        .env
        .iter()
        .flatten()
        .filter(|e| migrate_envs.contains(&e.name))
        .cloned()
        .collect();
    assert!(
        settings.iter().any(|e| e.name == "KEEPALIVED_SERVICE_CIDR"),
        "{settings:?}"
    );
    for setting in &settings {
        assert_eq!(
            migrate
                .env
                .iter()
                .flatten()
                .find(|e| e.name == setting.name),
            Some(setting),
            "{}",
            setting.name
        );
    }
    // Its pod is none of the Deployment's (nor counted by the budget).
    let labels = job
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.labels)
        .unwrap_or_default();
    let selector = deployment(&docs)
        .spec
        .map(|s| s.selector.match_labels.unwrap_or_default())
        .unwrap_or_default();
    assert!(selector.iter().any(|(k, v)| labels.get(k) != Some(v)));
}

#[test]
fn the_migration_jobs_flags_are_ones_migrate_accepts() {
    let job = migration_job();
    let migrate = &job_pod(&job).containers[0];
    let (flags, envs) = help_of_command("vipam-allocator", &["migrate"]);
    for arg in args_of(migrate).iter().skip(1) {
        let flag = arg.split('=').next().expect("flag");
        assert!(
            flags.contains(flag),
            "vipam-allocator migrate has no flag {flag}; it has {flags:?}"
        );
    }
    for e in migrate.env.iter().flatten() {
        assert!(envs.contains(&e.name), "{}: {envs:?}", e.name);
    }
}
