//! The manifests in `deploy/`, checked for what breaks deployments: every
//! manifest parses into its Kubernetes type without losing a field, container
//! flags and environment variables are ones the binaries accept (and their
//! values pass the binaries' own checks), probes point at ports the programs
//! listen on, names agree across files, every credential's token comes from
//! a Secret mounted where its flag points, and RBAC grants exactly what the
//! syncer is seen to call against the Kubernetes API test server.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;
use vipam_e2e::{binary, syncer::wait_until};

mod manifests;

use manifests::*;

#[test]
fn every_manifest_parses_into_its_kubernetes_type_without_losing_a_field() {
    let docs = rendered();
    assert!(docs.len() >= 10, "{docs:?}");
    for doc in &docs {
        check_round_trip(doc);
    }
    for entry in std::fs::read_dir(repo().join("deploy/examples")).expect("deploy/examples") {
        let path = entry.expect("entry").path();
        for doc in yaml_docs(&std::fs::read_to_string(&path).expect("read example")) {
            check_round_trip(&doc);
        }
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_uses_current_api_versions() {
    let kustomization: Value = yaml_docs(
        &std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).expect("read"),
    )[0]
    .clone();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("path").to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(repo().join("deploy"))
        .expect("deploy/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
    for doc in rendered() {
        let api = doc["apiVersion"].as_str().expect("apiVersion");
        assert!(
            ["v1", "apps/v1", "rbac.authorization.k8s.io/v1"].contains(&api),
            "{api} of {} is not a current version",
            doc["kind"]
        );
        if doc["kind"] != "Namespace"
            && !doc["kind"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Cluster")
        {
            assert_eq!(
                doc["metadata"]["namespace"], NAMESPACE,
                "{} {}",
                doc["kind"], doc["metadata"]["name"]
            );
        }
    }
}

#[test]
fn container_flags_and_env_are_ones_the_binaries_accept() {
    let docs = rendered();
    let pod = pod(&deployment(&docs));
    let mut seen = BTreeSet::new();
    for c in &pod.containers {
        let name = binary_of(c);
        seen.insert(name.clone());
        assert_eq!(c.name, name, "container names follow the binaries");
        let (flags, envs) = help_of(&name);
        for arg in c.args.iter().flatten() {
            let flag = arg.split('=').next().expect("flag");
            assert!(
                flags.contains(flag),
                "{name} has no flag {flag} (from {arg:?}); it has {flags:?}"
            );
            assert!(
                arg.contains('='),
                "{arg:?}: write flags as --flag=value so they read as one argument"
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
    assert_eq!(
        seen,
        BTreeSet::from(["vipam-allocator".to_string(), "vipam-syncer".to_string()])
    );
}

/// The allocator's `--client` named `name`, as its `key=value` parts.
fn client_of(args: &[String], name: &str) -> BTreeMap<String, String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--client="))
        .map(|c| {
            c.split(',')
                .filter_map(|part| part.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        })
        .find(|c| c.get("name").map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no --client name={name} in {args:?}"))
}

#[test]
fn the_syncer_has_its_own_credential_for_service_owners_from_a_secret_both_containers_mount() {
    let docs = rendered();
    let pod = pod(&deployment(&docs));
    let allocator = container(&pod, "vipam-allocator");
    let syncer = container(&pod, "vipam-syncer");
    let allocator_args = allocator.args.clone().unwrap_or_default();
    let syncer_args = syncer.args.clone().unwrap_or_default();
    let client = client_of(&allocator_args, "syncer");
    assert_eq!(client["owners"], "service:", "only the Services' owners");
    assert!(
        flag_value(&allocator_args, "--token-file").is_none(),
        "no all-powerful credential in the base"
    );
    let token_file =
        flag_value(&syncer_args, "--allocator-token-file").expect("the syncer sends its token");
    assert_eq!(client["token-file"], token_file);
    assert_eq!(secret_at(&pod, allocator, token_file), "vipam-syncer-token");
    assert_eq!(secret_at(&pod, syncer, token_file), "vipam-syncer-token");
    // Where to create the Secret is said next to the manifest and in the
    // README, with a command that generates a token.
    for doc in ["deploy/vipam.yaml", "README.md"] {
        let text = std::fs::read_to_string(repo().join(doc)).expect("read");
        assert!(
            text.contains("create secret generic vipam-syncer-token")
                && text.contains("head -c 32 /dev/urandom | base64"),
            "{doc} says how to create the Secret vipam-syncer-token"
        );
    }
}

#[test]
fn container_settings_pass_the_binaries_own_checks() {
    let docs = rendered();
    let pod = pod(&deployment(&docs));
    let dir = tempfile::tempdir().expect("tempdir");
    for c in &pod.containers {
        let name = binary_of(c);
        let mut cmd = Command::new(binary(&name).expect("binary"));
        cmd.args(with_stand_in_tokens(
            &c.args.clone().unwrap_or_default(),
            dir.path(),
        ))
        .arg("--check")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in resolved_env(&docs, c) {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run --check");
        assert!(
            out.status.success(),
            "{name} refuses the manifest's settings:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn probes_use_ports_and_paths_the_programs_serve_on_the_pod_address() {
    let docs = rendered();
    let pod = pod(&deployment(&docs));
    // The flag of each binary that serves /healthz and /readyz over HTTP.
    let http_flag = BTreeMap::from([
        ("vipam-allocator", "--http-listen"),
        ("vipam-syncer", "--listen"),
    ]);
    for c in &pod.containers {
        let name = binary_of(c);
        let args: Vec<String> = c.args.clone().unwrap_or_default();
        let listen = flag_value(&args, http_flag[name.as_str()])
            .unwrap_or_else(|| panic!("{name} sets no {}", http_flag[name.as_str()]));
        let (host, port) = listen.rsplit_once(':').expect("ADDR:PORT");
        assert!(
            host != "127.0.0.1" && host != "localhost" && host != "[::1]",
            "{name} serves probes on loopback, which the kubelet cannot reach"
        );
        let port: i32 = port.parse().expect("port");
        for (kind, probe, path) in [
            ("liveness", &c.liveness_probe, "/healthz"),
            ("readiness", &c.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{name} has no {kind} httpGet probe"));
            assert_eq!(port_number(c, &get.port), port, "{name} {kind} probe port");
            assert_eq!(get.path.as_deref(), Some(path), "{name} {kind} probe path");
        }
    }
    // gRPC stays on loopback: the syncer reaches it there.
    let allocator = pod
        .containers
        .iter()
        .find(|c| binary_of(c) == "vipam-allocator")
        .expect("allocator");
    let syncer = pod
        .containers
        .iter()
        .find(|c| binary_of(c) == "vipam-syncer")
        .expect("syncer");
    let grpc =
        flag_value(allocator.args.as_deref().unwrap_or_default(), "--listen").expect("--listen");
    assert!(grpc.starts_with("127.0.0.1:"), "{grpc}");
    assert_eq!(
        flag_value(syncer.args.as_deref().unwrap_or_default(), "--allocator"),
        Some(format!("http://{grpc}").as_str())
    );
}

#[test]
fn names_agree_across_files() {
    let docs = rendered();
    let d = deployment(&docs);
    let pod = pod(&d);
    let sa = pod
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    let _: ServiceAccount = one(&docs, "ServiceAccount", &sa);
    for c in &pod.containers {
        for e in c.env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|f| f.config_map_key_ref.as_ref())
            {
                assert!(
                    config_data(&docs, &r.name).contains_key(&r.key),
                    "ConfigMap {} lacks {}",
                    r.name,
                    r.key
                );
            }
        }
    }
    for v in pod.volumes.iter().flatten() {
        if let Some(claim) = &v.persistent_volume_claim {
            let _: PersistentVolumeClaim = one(&docs, "PersistentVolumeClaim", &claim.claim_name);
        }
    }
    // Bindings point at roles and ServiceAccounts that exist.
    for b in of_kind(&docs, "ClusterRoleBinding") {
        let b: ClusterRoleBinding = typed(&b);
        let _: ClusterRole = one(&docs, "ClusterRole", &b.role_ref.name);
        for s in b.subjects.iter().flatten() {
            assert_eq!(s.namespace.as_deref(), Some(NAMESPACE));
            let _: ServiceAccount = one(&docs, "ServiceAccount", &s.name);
        }
    }
    for b in of_kind(&docs, "RoleBinding") {
        let b: RoleBinding = typed(&b);
        let _: Role = one(&docs, "Role", &b.role_ref.name);
        for s in b.subjects.iter().flatten() {
            let _: ServiceAccount = one(&docs, "ServiceAccount", &s.name);
        }
    }
    // The ConfigMap the syncer writes is the one kube-keepalived-vip reads,
    // and the manifest holding it has no data to reset on a re-apply.
    let config = config_data(&docs, "vipam-config");
    let ns = &config["KEEPALIVED_NAMESPACE"];
    let name = &config["KEEPALIVED_CONFIG_MAP"];
    assert_eq!(ns, NAMESPACE);
    let vips: ConfigMap = one(&docs, "ConfigMap", name);
    assert!(
        vips.data.is_none(),
        "the VIP ConfigMap manifest must not carry data"
    );
    let ds: DaemonSet = one(&docs, "DaemonSet", "kube-keepalived-vip");
    let ds_pod = ds.spec.and_then(|s| s.template.spec).expect("pod");
    let _: ServiceAccount = one(
        &docs,
        "ServiceAccount",
        ds_pod
            .service_account_name
            .as_deref()
            .expect("keepalived SA"),
    );
    assert_ne!(
        ds_pod.service_account_name.as_deref(),
        Some(sa.as_str()),
        "kube-keepalived-vip has its own ServiceAccount"
    );
    let args = ds_pod.containers[0].args.clone().unwrap_or_default();
    assert_eq!(
        flag_value(&args, "--services-configmap"),
        Some(format!("{ns}/{name}").as_str())
    );
}

#[test]
fn one_allocator_per_volume() {
    let docs = rendered();
    let d = deployment(&docs);
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate")
    );
    let pvc: PersistentVolumeClaim = one(&docs, "PersistentVolumeClaim", "vipam-data");
    assert_eq!(
        pvc.spec.and_then(|s| s.access_modes),
        Some(vec!["ReadWriteOnce".to_string()])
    );
}

#[test]
fn vipam_runs_locked_down_with_resource_limits() {
    let docs = rendered();
    let pod = pod(&deployment(&docs));
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    for c in &pod.containers {
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{} securityContext", c.name));
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()]),
            "{}",
            c.name
        );
        let r = c
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("{} resources", c.name));
        assert!(
            r.requests
                .as_ref()
                .is_some_and(|q| q.contains_key("cpu") && q.contains_key("memory")),
            "{}",
            c.name
        );
        assert!(
            r.limits.as_ref().is_some_and(|q| q.contains_key("memory")),
            "{}",
            c.name
        );
    }
    let ds: DaemonSet = one(&docs, "DaemonSet", "kube-keepalived-vip");
    let kc = &ds
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod")
        .containers[0];
    assert!(
        kc.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key("memory"))
    );
}

#[test]
fn the_dockerfile_builds_both_binaries_into_a_small_non_root_image() {
    let text =
        std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage");
    assert!(
        froms.last().is_some_and(|f| f.contains("distroless")),
        "small final image: {froms:?}"
    );
    assert!(text.contains("--locked"));
    for b in ["vipam-allocator", "vipam-syncer"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("COPY --from=") && l.contains(b)),
            "{b} is not copied into the image"
        );
    }
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("COPY --from=") && l.trim_end().ends_with("/usr/local/bin/"))
    );
    let pod = pod(&deployment(&rendered()));
    for c in &pod.containers {
        let command = c.command.as_ref().and_then(|c| c.first()).expect("command");
        assert!(
            command.starts_with("/usr/local/bin/"),
            "{command} is not where the image puts the binaries"
        );
    }
}

/// (group, resource, verb) of a logged request, by the rules RBAC applies.
fn rbac_of(
    method: &http::Method,
    path_and_query: &str,
) -> Option<(String, String, String, Option<String>)> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("".to_string(), rest.to_vec()),
        ["apis", g, _v, rest @ ..] => (g.to_string(), rest.to_vec()),
        _ => return None,
    };
    let (namespace, rest) = match rest.as_slice() {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns.to_string()), r.to_vec()),
        r => (None, r.to_vec()),
    };
    let (resource, named) = match rest.as_slice() {
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub] => (format!("{r}/{sub}"), true),
        _ => return None,
    };
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let verb = match (method.as_str(), named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", _, _) => "delete",
        _ => return None,
    };
    Some((group, resource, verb.to_string(), namespace))
}

fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

/// Runs the real syncer and allocator against the test server through a
/// Service's whole life and a lost ConfigMap, and returns what the syncer
/// asked of the API.
async fn observed_calls(docs: &[Value]) -> BTreeSet<(String, String, String, Option<String>)> {
    use k8s_openapi::api::core::v1::ConfigMap as Cm;
    use kube::{Api, api::DeleteParams, api::PostParams};
    use vipam_e2e::Allocator;

    let server = vipam_kube_api::TestServer::start()
        .await
        .expect("test server");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = server.client().expect("client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces
        .get_opt(NAMESPACE)
        .await
        .expect("get ns")
        .is_none()
    {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))
                .expect("ns");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("create ns");
    }
    let allocator = Allocator::start(
        &dir.path().join("data"),
        &["--pool", "default=10.77.0.0/29"],
    )
    .expect("allocator");
    let d = deployment(docs);
    let syncer_container = pod(&d)
        .containers
        .into_iter()
        .find(|c| binary_of(c) == "vipam-syncer")
        .expect("syncer");
    let mut cmd = tokio::process::Command::new(binary("vipam-syncer").expect("binary"));
    cmd.arg(format!("--allocator={}", allocator.url()))
        .arg("--listen=127.0.0.1:0")
        .arg("--resync=1s")
        .arg("--lease-duration=3s")
        .arg("--configmap-coalesce=50ms")
        .env("KUBECONFIG", &kubeconfig)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("syncer.log")).expect("log file"));
    for (k, v) in resolved_env(docs, &syncer_container) {
        cmd.env(k, v);
    }
    let _syncer = cmd.spawn().expect("spawn syncer");

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "annotations": {"k8s.co/keepalived-forward-method": "bogus"}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .expect("service");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let config = config_data(docs, "vipam-config");
    let cms: Api<Cm> = Api::namespaced(client.clone(), &config["KEEPALIVED_NAMESPACE"]);
    let cm_name = config["KEEPALIVED_CONFIG_MAP"].clone();
    let log = || std::fs::read_to_string(dir.path().join("syncer.log")).unwrap_or_default();
    let has_entry = |cm: Option<Cm>| {
        cm.and_then(|c| c.data)
            .is_some_and(|d| d.contains_key("10.77.0.1"))
    };
    let entry_written = async || -> anyhow::Result<Option<()>> {
        Ok(has_entry(cms.get_opt(&cm_name).await?).then_some(()))
    };
    let timeout = Duration::from_secs(30);
    wait_until(timeout, "the syncer writes the ConfigMap", entry_written)
        .await
        .unwrap_or_else(|e| panic!("{e:#}:\n{}", log()));
    // A lost ConfigMap is recreated (create), then the Service goes away.
    cms.delete(&cm_name, &DeleteParams::default())
        .await
        .expect("delete cm");
    wait_until(timeout, "the syncer recreates the ConfigMap", entry_written)
        .await
        .unwrap_or_else(|e| panic!("{e:#}:\n{}", log()));
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    wait_until(timeout, "the syncer releases the Service", async || {
        Ok(services.get_opt("web").await?.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", log()));
    // The test's own requests carry no fieldManager or user agent that tells
    // them apart, so compare against a log taken with the syncer alone: the
    // test made only namespace, service and ConfigMap reads and its three
    // writes, which are removed below.
    let mut calls = BTreeSet::new();
    for r in server.requests() {
        if let Some(call) = rbac_of(&r.method, &r.path) {
            calls.insert(call);
        }
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_what_the_syncer_calls() {
    let docs = rendered();
    let mut calls = observed_calls(&docs).await;
    // Requests the test itself made (not the syncer): creating and deleting
    // the Service, deleting the ConfigMap, reading the namespace.
    for c in [
        ("", "services", "create", Some("default")),
        ("", "services", "delete", Some("default")),
        ("", "services", "get", Some("default")),
        ("", "configmaps", "delete", Some(NAMESPACE)),
        ("", "namespaces", "get", None),
        ("", "namespaces", "create", None),
    ] {
        calls.remove(&(
            c.0.to_string(),
            c.1.to_string(),
            c.2.to_string(),
            c.3.map(str::to_string),
        ));
    }
    let sa = pod(&deployment(&docs)).service_account_name.expect("sa");
    let mut cluster = BTreeSet::new();
    for b in of_kind(&docs, "ClusterRoleBinding") {
        let b: ClusterRoleBinding = typed(&b);
        if b.subjects.iter().flatten().any(|s| s.name == sa) {
            cluster.extend(grants(
                &one::<ClusterRole>(&docs, "ClusterRole", &b.role_ref.name)
                    .rules
                    .unwrap_or_default(),
            ));
        }
    }
    let mut local = BTreeSet::new();
    for b in of_kind(&docs, "RoleBinding") {
        let b: RoleBinding = typed(&b);
        if b.subjects.iter().flatten().any(|s| s.name == sa) {
            local.extend(grants(
                &one::<Role>(&docs, "Role", &b.role_ref.name)
                    .rules
                    .unwrap_or_default(),
            ));
        }
    }
    let mut used = BTreeSet::new();
    for (group, resource, verb, namespace) in &calls {
        let key = (group.clone(), resource.clone(), verb.clone());
        let allowed = cluster.contains(&key)
            || (namespace.as_deref() == Some(NAMESPACE) && local.contains(&key));
        assert!(
            allowed,
            "the syncer calls {verb} {group}/{resource} in {namespace:?}, which its RBAC does not grant"
        );
        used.insert(key);
    }
    // Least privilege: nothing granted that the syncer was not seen to use,
    // except Event series updates (a PATCH only when an Event repeats).
    let granted: BTreeSet<_> = cluster.union(&local).cloned().collect();
    let unused: Vec<_> = granted
        .difference(&used)
        .filter(|(g, r, v)| !(g == "events.k8s.io" && r == "events" && v == "patch"))
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
    // Cluster-wide grants are only Services, their status and Events.
    for (g, r, _) in &cluster {
        assert!(
            ["services", "services/status", "events"].contains(&r.as_str()),
            "cluster-wide grant on {g}/{r}"
        );
    }
}

/// The base with the opt-in `expose-allocator` component.
fn rendered_exposed() -> Vec<Value> {
    rendered_with(&["expose-allocator"])
}

/// The objects of the base a component leaves out on purpose: on etcd, the
/// sled store's volume claim has no use.
fn dropped_by(component: &str) -> BTreeSet<(String, String)> {
    match component {
        "etcd-store" => BTreeSet::from([(
            "PersistentVolumeClaim".to_string(),
            "vipam-data".to_string(),
        )]),
        _ => BTreeSet::new(),
    }
}

#[test]
fn the_base_renders_alone_with_each_component_and_with_all_of_them() {
    let base: BTreeSet<_> = rendered().iter().map(kind_and_name).collect();
    let names = components();
    for expected in ["etcd-store", "expose-allocator", "monitoring"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    let mut added = BTreeSet::new();
    let mut dropped = BTreeSet::new();
    for name in &names {
        let docs = rendered_with(&[name.as_str()]);
        let objects: BTreeSet<_> = docs.iter().map(kind_and_name).collect();
        let missing: BTreeSet<_> = base.difference(&objects).cloned().collect();
        assert_eq!(
            missing,
            dropped_by(name),
            "{name} drops other objects of the base than it should"
        );
        let new: BTreeSet<_> = objects.difference(&base).cloned().collect();
        assert!(!new.is_empty(), "{name} adds nothing");
        for doc in docs.iter().filter(|d| !base.contains(&kind_and_name(d))) {
            assert_eq!(
                doc["metadata"]["namespace"],
                NAMESPACE,
                "{name}: {:?} is outside {NAMESPACE}",
                kind_and_name(doc)
            );
        }
        added.extend(new);
        dropped.extend(missing);
    }
    // Every component, and the one nested in etcd-store, in one overlay.
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("etcd-store/password");
    let together: BTreeSet<_> = rendered_with(&all).iter().map(kind_and_name).collect();
    let expected: BTreeSet<_> = base.difference(&dropped).cloned().chain(added).collect();
    assert_eq!(
        together, expected,
        "the components together render each one's objects"
    );
}

#[test]
fn the_monitoring_component_scrapes_both_programs_on_the_ports_that_serve_metrics() {
    let docs = rendered_with(&["monitoring"]);
    let d = deployment(&docs);
    let pod_labels = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.clone())
        .and_then(|m| m.labels)
        .expect("pod labels");
    let pod = pod(&d);
    let monitors = of_kind(&docs, "PodMonitor");
    assert_eq!(monitors.len(), 1, "{monitors:?}");
    let monitor = &monitors[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            pod_labels.get(k).map(String::as_str),
            v.as_str(),
            "the PodMonitor selects the vipam pod"
        );
    }
    let mut scraped = BTreeSet::new();
    for endpoint in monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints")
    {
        let port = endpoint["port"].as_str().expect("a named port");
        assert_eq!(endpoint["path"], "/metrics");
        let container = pod
            .containers
            .iter()
            .find(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some(port))
            })
            .unwrap_or_else(|| panic!("no container has the port {port}"));
        // The port is the one the program serves /metrics on: the
        // allocator's --http-listen, the syncer's --listen.
        let number = port_number(container, &IntOrString::String(port.to_string()));
        let args = container.args.clone().unwrap_or_default();
        let flag = match binary_of(container).as_str() {
            "vipam-allocator" => "--http-listen",
            "vipam-syncer" => "--listen",
            other => panic!("unexpected container {other}"),
        };
        let listen = flag_value(&args, flag).unwrap_or_else(|| panic!("{flag}"));
        assert_eq!(
            listen.rsplit_once(':').map(|(_, p)| p),
            Some(number.to_string().as_str()),
            "{port} is where {} serves /metrics",
            container.name
        );
        scraped.insert(binary_of(container));
    }
    assert_eq!(
        scraped,
        BTreeSet::from(["vipam-allocator".to_string(), "vipam-syncer".to_string()])
    );
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["apiVersion"], "monitoring.coreos.com/v1");
    assert!(
        rules[0]["spec"]["groups"]
            .as_array()
            .is_some_and(|g| !g.is_empty())
    );
    // The base alone needs no monitoring CRDs.
    assert!(of_kind(&rendered(), "PodMonitor").is_empty());
    assert!(of_kind(&rendered(), "PrometheusRule").is_empty());
}

#[test]
fn the_expose_allocator_component_requires_a_scoped_credential_and_admits_only_labelled_pods() {
    let docs = rendered_exposed();
    for doc in &docs {
        check_round_trip(doc);
    }
    let pod = pod(&deployment(&docs));
    let allocator = container(&pod, "vipam-allocator");
    let args = allocator.args.clone().unwrap_or_default();
    let (flags, _) = help_of("vipam-allocator");
    for arg in &args {
        assert!(
            flags.contains(arg.split('=').next().expect("flag")),
            "{arg}"
        );
    }
    assert!(
        flag_value(&args, "--listen")
            .expect("--listen")
            .starts_with("127.0.0.1:"),
        "the syncer's listener stays on loopback"
    );
    let exposed = flag_value(&args, "--listen-authenticated").expect("--listen-authenticated");
    let port: i32 = exposed
        .rsplit_once(':')
        .expect("ADDR:PORT")
        .1
        .parse()
        .expect("port");
    // The tool's credential is scoped (owners and pools), its token comes
    // from its own Secret, mounted where its token-file points.
    let tool = client_of(&args, "tool");
    assert_ne!(tool["owners"], "*", "a tool gets owner prefixes of its own");
    assert!(!tool["owners"].contains("service:"), "{tool:?}");
    assert_ne!(tool["pools"], "*", "a tool gets pools of its own");
    assert_eq!(
        secret_at(&pod, allocator, &tool["token-file"]),
        "vipam-tool-token"
    );
    // The settings pass the binary's own checks (with stand-in token files).
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(binary("vipam-allocator").expect("binary"))
        .args(with_stand_in_tokens(&args, dir.path()))
        .arg("--check")
        .env(
            "KEEPALIVED_SERVICE_CIDR",
            &config_data(&docs, "vipam-config")["KEEPALIVED_SERVICE_CIDR"],
        )
        .output()
        .expect("--check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The Service reaches that port on the vipam pod.
    let svc: Service = one(&docs, "Service", "vipam-allocator");
    let spec = svc.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let pod_labels = deployment(&docs)
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.labels)
        .expect("pod labels");
    for (k, v) in spec.selector.iter().flatten() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "the Service selects the vipam pod"
        );
    }
    let target = spec.ports.expect("ports")[0]
        .target_port
        .clone()
        .expect("targetPort");
    assert_eq!(port_number(allocator, &target), port);
    // Only labelled pods reach the gRPC port.
    let np: NetworkPolicy = one(&docs, "NetworkPolicy", "vipam-allocator");
    let np = np.spec.expect("spec");
    for (k, v) in np
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default()
    {
        assert_eq!(
            pod_labels.get(&k),
            Some(&v),
            "the policy selects the vipam pod"
        );
    }
    let rules = np.ingress.expect("ingress");
    let grpc_rules: Vec<_> = rules
        .iter()
        .filter(|r| {
            r.ports
                .iter()
                .flatten()
                .any(|p| p.port == Some(IntOrString::Int(port)))
        })
        .collect();
    assert_eq!(grpc_rules.len(), 1);
    let from = grpc_rules[0]
        .from
        .as_ref()
        .expect("the gRPC port is not open to everyone");
    assert!(!from.is_empty());
    for peer in from {
        let labels = peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        assert_eq!(
            labels.get("vipam.io/allocator-client").map(String::as_str),
            Some("true"),
            "{peer:?}"
        );
    }
    // The base alone stays closed: no Service, no token.
    let base = rendered();
    assert!(of_kind(&base, "Service").is_empty() && of_kind(&base, "NetworkPolicy").is_empty());
    let base_args = self::pod(&deployment(&base)).containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(flag_value(&base_args, "--listen-authenticated").is_none());
}
