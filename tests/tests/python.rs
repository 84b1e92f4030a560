//! The Python examples in `examples/python/` against the real allocator, run
//! with the interpreter of `VIPAM_PYTHON` (which `scripts/test` sets up with
//! grpcio, grpcio-tools, grpcio-reflection and protobuf): one through stubs
//! generated from `proto/` into a temp dir, one through server reflection.
//! Each allocates, lists, watches a change and releases on the listener
//! that needs the token, next to an allocation of the syncer's.

use std::{path::Path, time::Duration};

use vipam::{client::Client, v1::AllocateRequest};
use vipam_e2e::{Allocator, listed_owners, mk_client, python_path, run_python, workspace_dir};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

struct Setup {
    dir: tempfile::TempDir,
    allocator: Allocator,
    token_file: String,
}

/// The allocator with both listeners, holding the syncer's allocation of
/// 10.40.0.1 at revision 1.
async fn mk_setup() -> Setup {
    // Fail, never skip, when the interpreter is missing.
    python_path().expect("the Python examples need VIPAM_PYTHON");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token file");
    let token_file = token_file.to_str().expect("utf-8").to_string();
    let allocator = Allocator::start(
        &dir.path().join("data"),
        &[
            "--pool",
            "default=10.40.0.0/24",
            "--token-file",
            &token_file,
            "--listen-authenticated",
            "127.0.0.1:0",
        ],
    )
    .expect("start");
    let syncer = Client::builder(allocator.url()).build().expect("client");
    let web = syncer
        .allocate(AllocateRequest {
            owner: "service:default/web".into(),
            ..Default::default()
        })
        .await
        .expect("allocate");
    assert_eq!((web.address.as_str(), web.revision), ("10.40.0.1", 1));
    Setup {
        dir,
        allocator,
        token_file,
    }
}

fn example(name: &str) -> String {
    workspace_dir()
        .join("examples/python")
        .join(name)
        .to_str()
        .expect("utf-8")
        .to_string()
}

/// Runs a script off the async runtime and returns its stdout, failing with
/// its stderr when it fails.
async fn run_script(args: Vec<String>, envs: Vec<(String, String)>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = run_python(&args, &envs, SCRIPT_TIMEOUT).expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .expect("script task")
}

fn expected(prefix: &str) -> Vec<String> {
    let owner = format!("{prefix}vm-1");
    vec![
        format!("allocated {owner} 10.40.0.2 revision=2"),
        format!("refused ALREADY_EXISTS: address 10.40.0.2 is held by \"{owner}\""),
        format!("listed {owner} 10.40.0.2"),
        format!("snapshot {owner} 10.40.0.2"),
        "snapshot complete revision=2".to_string(),
        format!("watched RELEASED {owner} 10.40.0.2 revision=3"),
        "released 10.40.0.2".to_string(),
    ]
}

async fn assert_only_the_syncer_holds_an_address(setup: &Setup) {
    let client = mk_client(&setup.allocator.url(), None).expect("client");
    assert_eq!(listed_owners(&client).await, ["service:default/web"]);
}

fn generate_stubs(out: &Path) {
    std::fs::create_dir_all(out).expect("stubs dir");
    let root = workspace_dir();
    let proto = root.join("proto");
    let out_arg = out.to_str().expect("utf-8");
    let output = run_python(
        &[
            "-m",
            "grpc_tools.protoc",
            "-I",
            proto.to_str().expect("utf-8"),
            "--python_out",
            out_arg,
            "--grpc_python_out",
            out_arg,
            proto
                .join("vipam/v1/allocator.proto")
                .to_str()
                .expect("utf-8"),
        ],
        &[],
        SCRIPT_TIMEOUT,
    )
    .expect("run grpc_tools.protoc");
    assert!(
        output.status.success(),
        "grpc_tools.protoc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_with_generated_stubs_allocates_lists_watches_and_releases() {
    let setup = mk_setup().await;
    let stubs = setup.dir.path().join("stubs");
    let dir = stubs.clone();
    tokio::task::spawn_blocking(move || generate_stubs(&dir))
        .await
        .expect("generate");
    let target = setup.allocator.authenticated.expect("listener").to_string();
    let stdout = run_script(
        vec![
            example("stubs_client.py"),
            "--target".into(),
            target,
            "--token-file".into(),
            setup.token_file.clone(),
        ],
        vec![(
            "PYTHONPATH".into(),
            stubs.to_str().expect("utf-8").to_string(),
        )],
    )
    .await;
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        expected("example-py/"),
        "{stdout}"
    );
    assert_only_the_syncer_holds_an_address(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_through_reflection_allocates_lists_watches_and_releases() {
    let setup = mk_setup().await;
    let target = setup.allocator.authenticated.expect("listener").to_string();
    let stdout = run_script(
        vec![
            example("reflection_client.py"),
            "--target".into(),
            target,
            "--token-file".into(),
            setup.token_file.clone(),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        expected("example-py-reflection/"),
        "{stdout}"
    );
    assert_only_the_syncer_holds_an_address(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_without_the_token_is_refused_on_the_authenticated_listener() {
    let setup = mk_setup().await;
    let target = setup.allocator.authenticated.expect("listener").to_string();
    let args = [example("reflection_client.py"), "--target".into(), target];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_python(&args, &[], SCRIPT_TIMEOUT).expect("run python")
    })
    .await
    .expect("script task");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error UNAUTHENTICATED"), "{stderr}");
    assert_only_the_syncer_holds_an_address(&setup).await;
}
