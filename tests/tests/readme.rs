//! The README's reference against the programs: its flag tables list exactly
//! the flags and environment variables that `--help` of each binary shows,
//! and its metric tables name metrics the programs export.

use std::{collections::BTreeSet, path::Path, process::Command};

use vipam_e2e::binary;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md")
}

/// The lines of the README section under `heading`, up to the next heading.
fn section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "README has no {heading:?} section");
    lines.take_while(|l| !l.starts_with('#')).collect()
}

/// The backquoted first words of the first two columns of a table's rows:
/// (flag, env).
fn table_flags(lines: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for row in lines.iter().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let first = |cell: &str| {
            cell.trim_start_matches("| ")
                .trim_matches('`')
                .split([' ', '`'])
                .next()
                .unwrap_or_default()
                .to_string()
        };
        flags.insert(first(cells[0]));
        if let Some(env) = cells.get(1).filter(|c| c.starts_with('`')) {
            envs.insert(first(env));
        }
    }
    (flags, envs)
}

fn help(name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary(name).expect("binary"))
        .arg("--help")
        .output()
        .expect("--help");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for line in text.lines().map(str::trim_start) {
        if let Some(rest) = line.strip_prefix("--") {
            let flag = format!("--{}", rest.split_whitespace().next().unwrap_or_default());
            if flag != "--help" && flag != "--version" {
                flags.insert(flag);
            }
        }
        if let Some((_, env)) = line.split_once("[env: ") {
            envs.insert(env.split('=').next().unwrap_or_default().to_string());
        }
    }
    (flags, envs)
}

#[test]
fn readme_flag_tables_match_the_help_of_both_binaries() {
    let text = readme();
    for (heading, name) in [
        ("### Flags", "vipam-allocator"),
        ("### Syncer flags", "vipam-syncer"),
    ] {
        let (readme_flags, readme_envs) = table_flags(&section(&text, heading));
        let (help_flags, help_envs) = help(name);
        assert_eq!(
            readme_flags, help_flags,
            "flags of {name}: README {heading} vs --help"
        );
        assert_eq!(
            readme_envs, help_envs,
            "environment variables of {name}: README {heading} vs --help"
        );
    }
}

#[test]
fn readme_names_every_event_reason_and_annotation_the_syncer_uses() {
    use vipam_syncer::{desired, events::reason, render};
    let text = readme();
    let events = section(&text, "### Events").join("\n");
    for r in [
        reason::ALLOCATED,
        reason::RELEASED,
        reason::ALLOCATION_FAILED,
        reason::INVALID_ANNOTATION,
        reason::IPV6_NOT_SUPPORTED,
        reason::CONFIGMAP_TOO_LARGE,
    ] {
        assert!(
            events.contains(&format!("| `{r}` |")),
            "README Events lack {r}"
        );
    }
    let annotations = section(&text, "### Annotations").join("\n");
    for a in [
        desired::FORWARD_METHOD_ANNOTATION,
        desired::POOL_ANNOTATION,
        desired::ADDRESS_ANNOTATION,
        render::LEGACY_ANNOTATION,
    ] {
        assert!(
            annotations.contains(&format!("| `{a}` |")),
            "README Annotations lack {a}"
        );
    }
}

fn metric_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let kind = words.next()?;
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            })
        })
        .collect()
}

fn readme_metrics(lines: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for row in lines.iter().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split(" | ").next().unwrap_or_default();
        for name in first_cell.split('`').skip(1).step_by(2) {
            out.insert(name.to_string());
        }
    }
    out
}

#[test]
fn readme_metric_tables_match_what_the_syncer_exports() {
    let metrics = vipam_syncer::metrics::Metrics::new();
    // Families show only once they have a sample.
    metrics.error("allocator_unreachable");
    metrics.observe_allocator("Allocate", tonic::Code::Ok, 0.001);
    metrics
        .events
        .get_or_create(&vipam_syncer::metrics::EventLabels {
            reason: "Allocated",
        })
        .inc();
    let exported = metric_names(&metrics.render().expect("render"));
    let documented = readme_metrics(&section(&readme(), "### Syncer metrics"));
    assert_eq!(documented, exported);
}

#[tokio::test]
async fn readme_metric_tables_match_what_the_allocator_exports() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let a =
        vipam_e2e::Allocator::start(dir.path(), &["--pool", "default=10.8.0.0/29"]).expect("start");
    // One request so that the per-request families have a sample.
    a.client()
        .await
        .expect("client")
        .list_pools(vipam::v1::ListPoolsRequest {})
        .await
        .expect("list pools");
    let mut conn = tokio::net::TcpStream::connect(a.addr)
        .await
        .expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    conn.read_to_string(&mut body).await.expect("read");
    let exported = metric_names(&body);
    let documented = readme_metrics(&section(&readme(), "### Health and metrics"));
    assert_eq!(documented, exported);
}
