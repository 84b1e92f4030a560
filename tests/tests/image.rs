//! The container image: `deploy/image.spec` says what it holds (binaries,
//! user, entrypoint, base files); `deploy/Dockerfile` and the manifests are
//! checked against it, and the image `scripts/image` builds from scratch
//! with buildah is checked against it and run: both binaries' `--help` and
//! `--check` (with the manifests' flags) inside it, as the manifests' user.
//! Where this machine cannot build or run it, the test says so and why.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::Value;
use vipam_e2e::{token_files, workspace_dir};

/// What `deploy/image.spec` declares.
#[derive(Debug, Default)]
struct Spec {
    user: String,
    entrypoint: String,
    /// (binary name, path in the image)
    binaries: BTreeSet<(String, String)>,
    base: Vec<String>,
}

fn spec() -> Spec {
    let text = std::fs::read_to_string(workspace_dir().join("deploy/image.spec"))
        .expect("deploy/image.spec");
    let mut spec = Spec::default();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["user", u] => spec.user = u.to_string(),
            ["entrypoint", e] => spec.entrypoint = e.to_string(),
            ["binary", name, path] => {
                spec.binaries.insert((name.to_string(), path.to_string()));
            }
            ["base", path] => spec.base.push(path.to_string()),
            _ => panic!("deploy/image.spec: unknown line {line:?}"),
        }
    }
    assert!(!spec.user.is_empty() && !spec.entrypoint.is_empty() && !spec.binaries.is_empty());
    spec
}

/// The final stage of `deploy/Dockerfile`: its base, the binaries it copies
/// (name, destination), its user and its entrypoint.
fn dockerfile() -> (String, BTreeSet<(String, String)>, String, String) {
    let text = std::fs::read_to_string(workspace_dir().join("deploy/Dockerfile"))
        .expect("deploy/Dockerfile");
    let stage: Vec<&str> = text
        .lines()
        .rev()
        .take_while(|l| !l.starts_with("FROM "))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let base = text
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("FROM")
        .to_string();
    let mut copied = BTreeSet::new();
    let mut user = String::new();
    let mut entrypoint = String::new();
    for line in stage {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("COPY") => {
                let args: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                let (dest, sources) = args.split_last().expect("COPY destination");
                assert!(dest.ends_with('/'), "COPY into a directory: {line}");
                for source in sources {
                    let name = source.rsplit('/').next().expect("file name");
                    copied.insert((name.to_string(), format!("{dest}{name}")));
                }
            }
            Some("USER") => user = words.collect(),
            Some("ENTRYPOINT") => {
                let json: Vec<String> = serde_json::from_str(&words.collect::<Vec<_>>().join(" "))
                    .expect("ENTRYPOINT in exec form");
                assert_eq!(json.len(), 1, "{line}");
                entrypoint = json[0].clone();
            }
            _ => {}
        }
    }
    (base, copied, user, entrypoint)
}

fn deployment() -> Deployment {
    let text = std::fs::read_to_string(workspace_dir().join("deploy/vipam.yaml"))
        .expect("deploy/vipam.yaml");
    serde_yaml::from_str(&text).expect("the Deployment")
}

/// The manifests' image, user (`runAsUser:runAsGroup`), and each container's
/// (command, args).
fn manifests() -> (String, String, Vec<(String, Vec<String>)>) {
    let d = deployment();
    let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
    let sc = pod.security_context.expect("pod securityContext");
    let user = format!(
        "{}:{}",
        sc.run_as_user.expect("runAsUser"),
        sc.run_as_group.expect("runAsGroup")
    );
    let images: BTreeSet<String> = pod
        .containers
        .iter()
        .filter_map(|c| c.image.clone())
        .collect();
    assert_eq!(images.len(), 1, "one image for both containers: {images:?}");
    let commands = pod
        .containers
        .iter()
        .map(|c| {
            let command = c.command.clone().unwrap_or_default();
            assert_eq!(command.len(), 1, "{}: {command:?}", c.name);
            (command[0].clone(), c.args.clone().unwrap_or_default())
        })
        .collect();
    (
        images.into_iter().next().unwrap_or_default(),
        user,
        commands,
    )
}

#[test]
fn the_dockerfile_and_the_manifests_agree_with_the_image_spec() {
    let spec = spec();
    let (base, copied, user, entrypoint) = dockerfile();
    // The base the spec's `base` files come from.
    assert_eq!(base, "gcr.io/distroless/cc-debian12:nonroot");
    assert_eq!(copied, spec.binaries, "the Dockerfile's binaries");
    assert_eq!(user, spec.user, "the Dockerfile's USER");
    assert_eq!(entrypoint, spec.entrypoint, "the Dockerfile's ENTRYPOINT");

    let (_, manifest_user, commands) = manifests();
    assert_eq!(
        manifest_user, spec.user,
        "the manifests' runAsUser:runAsGroup"
    );
    let paths: BTreeSet<String> = spec.binaries.iter().map(|(_, p)| p.clone()).collect();
    let used: BTreeSet<String> = commands.into_iter().map(|(c, _)| c).collect();
    assert_eq!(used, paths, "the manifests run the image's binaries");
}

/// Says loudly that the image test cannot run here and why, also in
/// `target/skipped-tests.txt`, which `scripts/test` prints at the end.
fn skip(why: &str) {
    let line = format!("SKIPPED the_image_built_from_scratch_runs_both_binaries: {why}");
    println!("{line}");
    eprintln!("{line}");
    let file = workspace_dir().join("target/skipped-tests.txt");
    let previous = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::write(&file, format!("{previous}{line}\n"));
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Buildah {
    root: tempfile::TempDir,
}

impl Buildah {
    fn cmd(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--storage-driver=vfs")
            .arg(format!(
                "--root={}",
                self.root.path().join("root").display()
            ))
            .arg(format!(
                "--runroot={}",
                self.root.path().join("run").display()
            ));
        cmd
    }

    /// Runs buildah with `args`; its stdout, or a panic with its output.
    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run buildah");
        assert!(
            out.status.success(),
            "buildah {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Every file below `root`, as absolute paths inside it.
fn files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("read image dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(root, &path, out);
        } else {
            out.insert(format!(
                "/{}",
                path.strip_prefix(root).expect("inside").display()
            ));
        }
    }
}

#[test]
fn the_image_built_from_scratch_runs_both_binaries_as_the_manifests_user() {
    if on_path("buildah").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "buildah is not installed: scripts/test installs it (apt-get install buildah)"
        );
        return skip("buildah is not installed (apt-get install buildah)");
    }
    // /proc/self belongs to the process's effective user.
    let uid =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self"));
    if uid != 0 {
        return skip(&format!(
            "buildah's vfs storage needs root here and this runs as uid {uid}"
        ));
    }
    let root = workspace_dir();
    // The release binaries when built (scripts/test builds them), else the
    // debug ones: the image's make-up is the same.
    let bin_dir = ["target/release", "target/debug"]
        .into_iter()
        .map(|d| root.join(d))
        .find(|d| d.join("vipam-allocator").is_file() && d.join("vipam-syncer").is_file())
        .expect(
            "no built binaries: cargo build --release --bin vipam-allocator --bin vipam-syncer",
        );
    println!("image from {}", bin_dir.display());
    let spec = spec();
    let (image, user, commands) = manifests();
    let buildah = Buildah {
        root: tempfile::tempdir().expect("tempdir"),
    };

    let out = Command::new(root.join("scripts/image"))
        .arg(&image)
        .env("VIPAM_IMAGE_BIN_DIR", &bin_dir)
        .env("VIPAM_BUILDAH_ROOT", buildah.root.path())
        .output()
        .expect("run scripts/image");
    assert!(
        out.status.success(),
        "scripts/image failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let inspected: Value =
        serde_json::from_str(&buildah.run(&["inspect", "--type", "image", &image]))
            .expect("buildah inspect JSON");
    let config = &inspected["OCIv1"]["config"];
    assert_eq!(config["User"], spec.user.as_str(), "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!([spec.entrypoint]),
        "{config}"
    );

    let container = buildah.run(&["from", &image]);
    let mount = PathBuf::from(buildah.run(&["mount", &container]));
    let mut present = BTreeSet::new();
    files(&mount, &mount, &mut present);
    for (_, path) in &spec.binaries {
        assert!(present.contains(path), "{path} missing from {present:?}");
    }
    for path in &spec.base {
        assert!(present.contains(path), "{path} missing from {present:?}");
    }
    let passwd = std::fs::read_to_string(mount.join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with(&format!("nonroot:x:{user}:"))),
        "{passwd}"
    );
    // Nothing from the build machine beyond the spec and the libraries.
    let unexpected: Vec<_> = present
        .iter()
        .filter(|p| {
            !spec.binaries.iter().any(|(_, b)| b == *p)
                && !spec.base.contains(p)
                && !p.starts_with("/lib")
        })
        .collect();
    assert!(unexpected.is_empty(), "unexpected files: {unexpected:?}");
    buildah.run(&["umount", &container]);

    // The Secrets the manifests mount, as the kubelet would: a stand-in
    // token at each token file the flags name, readable by the user.
    let tokens = tempfile::tempdir().expect("tempdir");
    for (_, args) in &commands {
        for path in token_files(args) {
            let stand_in = tokens.path().join(path.replace('/', "_"));
            std::fs::write(&stand_in, format!("stand-in for {path}")).expect("stand-in token");
            let source = stand_in.display().to_string();
            buildah.run(&["copy", "--chown", &user, &container, &source, &path]);
        }
    }

    let config_env: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/config.yaml")).expect("deploy/config.yaml"),
    )
    .expect("config.yaml");
    let cidr = config_env["data"]["KEEPALIVED_SERVICE_CIDR"]
        .as_str()
        .expect("KEEPALIVED_SERVICE_CIDR");
    for (command, args) in &commands {
        let run = |extra: &[&str]| {
            let mut cmd = buildah.cmd();
            cmd.args(["run", "--isolation", "chroot", "--user", &user])
                .args(["--env", &format!("KEEPALIVED_SERVICE_CIDR={cidr}")])
                .arg(&container)
                .arg("--")
                .arg(command)
                .args(extra);
            let out = cmd.output().expect("buildah run");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "{command} {extra:?} in the image:\n{text}"
            );
            text
        };
        let help = run(&["--help"]);
        assert!(
            help.contains("Usage:") && help.contains("--check"),
            "{help}"
        );
        let mut check: Vec<&str> = args.iter().map(String::as_str).collect();
        check.push("--check");
        let checked = run(&check);
        assert!(checked.contains("the settings are valid"), "{checked}");
    }
    buildah.run(&["rm", &container]);
}
