//! The opt-in monitoring component (`deploy/components/monitoring`) against
//! Prometheus itself: `promtool` accepts its alert rules and passes their unit
//! tests, every alert is unit-tested and explained in the troubleshooting
//! page, and a real Prometheus on loopback, scraping the real allocator and
//! syncer, sees the pool alert go pending once a pool is more than 95 %
//! allocated. `promtool` and `prometheus` come from Debian's `prometheus`
//! package, which `scripts/test` installs.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vipam_e2e::{
    syncer::{Kube, wait_until},
    workspace_dir,
};
use vipam_test_support::http::{self, Response};

mod common;

fn component() -> PathBuf {
    workspace_dir().join("deploy/components/monitoring")
}

/// A program from the `PATH`; its absence fails the test, naming the package.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/test, or apt-get install prometheus")
        })
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The PrometheusRule's `spec` is a Prometheus rule file as it stands:
/// written out as `rules.yaml` in `dir`, the name the unit tests load.
fn write_rules(dir: &Path) -> PathBuf {
    let rule = yaml_file(&component().join("prometheusrule.yaml"));
    assert_eq!(rule["kind"], "PrometheusRule");
    let path = dir.join("rules.yaml");
    std::fs::write(
        &path,
        serde_yaml::to_string(&rule["spec"]).expect("rules as YAML"),
    )
    .expect("write rules.yaml");
    path
}

fn alert_names() -> BTreeSet<String> {
    let rule = yaml_file(&component().join("prometheusrule.yaml"));
    rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| r["alert"].as_str().expect("alert name").to_string())
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_alert_rules_and_their_unit_tests_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = write_rules(dir.path());
    let promtool = tool("promtool");
    let checked = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alert_names().len())),
        "{checked}"
    );
    std::fs::copy(
        component().join("alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .expect("copy the unit tests");
    let tested = run(Command::new(&promtool).current_dir(dir.path()).args([
        "test",
        "rules",
        "alerts.test.yaml",
    ]));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_unit_test_and_a_troubleshooting_section() {
    let tests = yaml_file(&component().join("alerts.test.yaml"));
    let tested: BTreeSet<String> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().expect("alert_rule_test"))
        // An alert counts as tested when some case expects it to fire.
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().expect("alertname").to_string())
        .collect();
    let alerts = alert_names();
    let untested: Vec<_> = alerts.difference(&tested).collect();
    assert!(
        untested.is_empty(),
        "alerts never seen firing in alerts.test.yaml: {untested:?}"
    );

    let page = std::fs::read_to_string(workspace_dir().join("docs/troubleshooting.md"))
        .expect("docs/troubleshooting.md");
    for alert in &alerts {
        assert!(
            page.lines().any(|l| l == format!("### {alert}")),
            "docs/troubleshooting.md has no section ### {alert}"
        );
        // The runbook link of the alert is that section's anchor.
        let anchor = format!("troubleshooting.md#{}", alert.to_lowercase());
        let rule = std::fs::read_to_string(component().join("prometheusrule.yaml"))
            .expect("prometheusrule.yaml");
        assert!(
            rule.contains(&anchor),
            "{alert} has no runbook_url to {anchor}"
        );
    }
}

#[test]
fn the_readme_alert_table_names_every_alert() {
    let readme = std::fs::read_to_string(workspace_dir().join("README.md")).expect("README.md");
    assert_eq!(
        common::table_keys(&readme, "### Monitoring (opt-in)"),
        alert_names()
    );
}

/// A free loopback port: bound, read and released for Prometheus to take.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `GET path` on Prometheus's HTTP API as JSON.
async fn api(addr: SocketAddr, path: &str) -> Result<Value> {
    let Response { status, body } = http::get(addr, path).await?;
    if status != 200 {
        bail!("GET {path}: {status} {body}");
    }
    let v: Value = serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))?;
    if v["status"] != "success" {
        bail!("GET {path}: {v}");
    }
    Ok(v["data"].clone())
}

/// The value of the one sample of `query` whose `container` label is
/// `container`, when Prometheus has it.
async fn sample(addr: SocketAddr, query: &str, container: &str) -> Result<Option<f64>> {
    let data = api(addr, &format!("/api/v1/query?query={query}")).await?;
    Ok(data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["metric"]["container"] == container)
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_both_programs_and_the_pool_alert_goes_pending() -> Result<()> {
    let prometheus = tool("prometheus");
    let kube = Kube::start("monitoring").await?;
    // 254 usable addresses: 242 allocated is 95.3 %, past the 95 % alert
    // but short of exhaustion.
    let allocator = kube.allocator(&["default=10.9.0.0/24"])?;
    let syncer = kube.syncer(&allocator, &[])?;
    syncer.wait_ready().await?;
    kube.create(kube.lb("web")).await?;
    kube.wait_ip("web").await?;
    let mut client = allocator.client().await?;
    for i in 0..241 {
        client
            .allocate(vipam::v1::AllocateRequest {
                owner: format!("fill/{i}"),
                ..Default::default()
            })
            .await
            .with_context(|| format!("allocate fill/{i}"))?;
    }

    let dir = tempfile::tempdir()?;
    write_rules(dir.path());
    let target = |job: &str, addr: String| {
        format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n        labels: {{namespace: vipam-system, pod: vipam-0, container: {job}}}\n"
        )
    };
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n{}{}",
            target("vipam-allocator", allocator.addr.to_string()),
            target("vipam-syncer", syncer.http.to_string()),
        ),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let log = dir.path().join("prometheus.log");
    let _prometheus = tokio::process::Command::new(prometheus)
        .current_dir(dir.path())
        .arg("--config.file=prometheus.yml")
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus")?;
    let log = || std::fs::read_to_string(&log).unwrap_or_default();
    let timeout = Duration::from_secs(60);

    for container in ["vipam-allocator", "vipam-syncer"] {
        wait_until(
            timeout,
            &format!("Prometheus scrapes {container}"),
            async || Ok(sample(addr, "up", container).await?.filter(|v| *v == 1.0)),
        )
        .await
        .with_context(|| format!("prometheus log:\n{}", log()))?;
    }
    wait_until(
        timeout,
        "Prometheus sees the syncer leading with one Service",
        async || {
            let leader = sample(addr, "vipam_syncer_leader", "vipam-syncer").await?;
            let managed = sample(addr, "vipam_syncer_managed_services", "vipam-syncer").await?;
            Ok((leader == Some(1.0) && managed == Some(1.0)).then_some(()))
        },
    )
    .await?;

    // 95.3 % is past every usage threshold but not exhaustion, and nothing
    // else is wrong. Until the syncer's first scrape reaches the rules, its
    // group may still hold VipamSyncerNoLeader pending; it then resolves.
    let expected = BTreeSet::from([
        "VipamPoolUsageHigh".to_string(),
        "VipamPoolUsageVeryHigh".to_string(),
        "VipamPoolUsageCritical".to_string(),
    ]);
    let mut last = Value::Null;
    let critical = wait_until(
        timeout,
        "VipamPoolUsageCritical is pending for pool default, beside the lower thresholds only",
        async || {
            let data = api(addr, "/api/v1/alerts").await?;
            last = data.clone();
            let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
            let names: BTreeSet<String> = alerts
                .iter()
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                .collect();
            let critical = alerts.into_iter().find(|a| {
                a["labels"]["alertname"] == "VipamPoolUsageCritical"
                    && a["labels"]["pool"] == "default"
                    && a["labels"]["container"] == "vipam-allocator"
            });
            Ok(critical.filter(|_| names == expected))
        },
    )
    .await
    .with_context(|| format!("last alerts: {last}\nprometheus log:\n{}", log()))?;
    assert_eq!(critical["state"], "pending", "{critical}");
    Ok(())
}
