//! The real allocator with several credentials (`--client`): the syncer's,
//! for the `service:` owners in every pool, and a tool's, for `vm:` owners
//! in the pool `vms`. Each may change only its own owners' allocations and
//! draw only from its own pools, and reads only its own owners' allocations
//! in its own pools; the authenticated listener needs a credential for
//! every call; a token never shows in a log or an error.

use tonic::{Code, Status};
use vipam::{
    client::Client,
    v1::{AllocateRequest, ReleaseRequest, WatchRequest},
};
use vipam_e2e::{Allocator, grpcurl, listed_owners, mk_client, refused_at_start};

const SYNCER_TOKEN: &str = "syncer-token-3b1f9e";
const TOOL_TOKEN: &str = "tool-token-8c2d7a";

/// The allocator (with its directory, removed on drop).
type Setup = (tempfile::TempDir, Allocator);

/// Token files for the syncer and the tool in a fresh directory.
fn mk_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("syncer"), format!("{SYNCER_TOKEN}\n")).expect("token");
    std::fs::write(dir.path().join("tool"), TOOL_TOKEN).expect("token");
    dir
}

fn mk_allocator() -> Setup {
    let dir = mk_dir();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let syncer = format!(
        "name=syncer,token-file={},owners=service:,pools=*",
        file("syncer")
    );
    let tool = format!("name=tool,token-file={},owners=vm:,pools=vms", file("tool"));
    let allocator = Allocator::start(
        &dir.path().join("data"),
        &[
            "--pool",
            "services=10.40.0.0/24",
            "--pool",
            "vms=10.40.1.0/24",
            "--client",
            &syncer,
            "--client",
            &tool,
            "--listen-authenticated",
            "127.0.0.1:0",
        ],
    )
    .expect("start");
    (dir, allocator)
}

/// An Allocate request of `owner` in `pool` for `address` (empty: any).
fn mk_allocate_at(owner: &str, pool: &str, address: &str) -> AllocateRequest {
    AllocateRequest {
        owner: owner.to_string(),
        pool: pool.to_string(),
        address: address.to_string(),
        ..Default::default()
    }
}

fn client(url: &str, token: Option<&str>) -> Client {
    mk_client(url, token).expect("client")
}

/// Asserts that `client` may allocate for `owner` and release it again.
async fn assert_allocates_and_releases(client: &Client, owner: &str) {
    let allocated = client
        .allocate(mk_allocate_at(owner, "", ""))
        .await
        .expect("allocate");
    let released = client.release_owner(owner).await.expect("release");
    assert_eq!(released, Some(allocated), "{owner}");
}

/// Asserts a refusal with `code` whose message holds every one of `words`;
/// returns the message.
fn assert_refused(err: Status, code: Code, words: &[&str]) -> String {
    assert_eq!(err.code(), code, "{err:?}");
    for word in words {
        assert!(err.message().contains(word), "{word:?} in {err:?}");
    }
    err.message().to_string()
}

#[tokio::test]
async fn a_tool_credential_changes_only_its_own_owners_in_its_own_pools() {
    let (_dir, allocator) = mk_allocator();
    let wide = allocator.authenticated_url().expect("authenticated");
    let syncer = client(&wide, Some(SYNCER_TOKEN));
    let tool = client(&wide, Some(TOOL_TOKEN));
    let mut errors = Vec::new();

    // The syncer's credential does its job: allocate and release Services.
    let web = syncer
        .allocate(mk_allocate_at("service:default/web", "", ""))
        .await
        .expect("the syncer allocates a service");
    assert_eq!(
        (web.address.as_str(), web.pool.as_str()),
        ("10.40.0.1", "services")
    );
    assert_allocates_and_releases(&syncer, "service:default/gone").await;

    // The tool may not release the Service's address, by owner or address.
    for release in [
        ReleaseRequest {
            owner: "service:default/web".into(),
            ..Default::default()
        },
        ReleaseRequest {
            address: web.address.clone(),
            ..Default::default()
        },
    ] {
        let err = tool.release(release).await.expect_err("not the tool's");
        errors.push(assert_refused(
            err,
            Code::PermissionDenied,
            &["\"tool\"", "\"service:default/web\""],
        ));
    }
    // Nor take it, nor allocate outside its prefixes.
    for (request, words) in [
        (
            mk_allocate_at("vm:thief", "", &web.address),
            ["\"tool\"", "\"service:default/web\""],
        ),
        (
            mk_allocate_at("service:default/fake", "vms", ""),
            ["\"tool\"", "\"service:default/fake\""],
        ),
        // Nor draw from a pool it is not given: named, by an address in
        // it, or as the default pool.
        (
            mk_allocate_at("vm:one", "services", ""),
            ["\"tool\"", "\"services\""],
        ),
        (
            mk_allocate_at("vm:one", "", "10.40.0.9"),
            ["\"tool\"", "\"services\""],
        ),
        (
            mk_allocate_at("vm:one", "", ""),
            ["\"tool\"", "\"services\""],
        ),
    ] {
        let err = tool.allocate(request).await.expect_err("refused");
        errors.push(assert_refused(err, Code::PermissionDenied, &words));
    }
    // Through grpcurl too.
    let out = grpcurl(&[
        "-H",
        &format!("authorization: Bearer {TOOL_TOKEN}"),
        "-d",
        r#"{"owner": "service:default/web"}"#,
        &allocator.authenticated.expect("listener").to_string(),
        "vipam.v1.Allocator/Release",
    ])
    .expect("grpcurl");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && stderr.contains("Code: PermissionDenied"),
        "{out:?}"
    );
    errors.push(stderr);

    // Its own owners in its own pool are fine.
    let vm = tool
        .allocate(mk_allocate_at("vm:one", "vms", ""))
        .await
        .expect("the tool allocates in vms");
    assert_eq!(vm.address, "10.40.1.1");
    assert_eq!(
        syncer.get_owner("service:default/web").await.expect("get"),
        Some(web),
        "the service's allocation is untouched"
    );

    // Reads without a token, or with an unknown one, are refused on the
    // authenticated listener; the tool reads with its own.
    for stranger in [client(&wide, None), client(&wide, Some("tool-token"))] {
        let err = stranger.list_all("", "").await.expect_err("no credential");
        errors.push(assert_refused(err, Code::Unauthenticated, &[]));
        let err = stranger
            .watch(WatchRequest::default())
            .await
            .expect_err("no credential");
        errors.push(assert_refused(err, Code::Unauthenticated, &[]));
    }
    assert_eq!(tool.list_all("", "vm:").await.expect("list"), vec![vm]);

    // Accepted changes are logged with the credential's name; no token
    // shows in the log or in any error.
    let log = allocator.log();
    for (credential, owner) in [("syncer", "service:default/web"), ("tool", "vm:one")] {
        assert!(
            log.lines().any(|l| l.contains(" allocated ")
                && l.contains(&format!("credential=\"{credential}\""))
                && l.contains(owner)),
            "{credential}: {log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains(" released ") && l.contains("credential=\"syncer\"")),
        "{log}"
    );
    for token in [SYNCER_TOKEN, TOOL_TOKEN] {
        assert!(!log.contains(token), "token in the log:\n{log}");
        for error in &errors {
            assert!(!error.contains(token), "token in {error}");
        }
    }
}

#[tokio::test]
async fn a_tool_credential_reads_only_its_own_owners_in_its_own_pools() {
    let (_dir, allocator) = mk_allocator();
    let wide = allocator.authenticated_url().expect("authenticated");
    let syncer = client(&wide, Some(SYNCER_TOKEN));
    let tool = client(&wide, Some(TOOL_TOKEN));
    let web = syncer
        .allocate(mk_allocate_at("service:default/web", "", ""))
        .await
        .expect("the syncer allocates a service");
    // The syncer's owner in the tool's pool: the tool may not read it.
    syncer
        .allocate(mk_allocate_at("service:default/vm-side", "vms", ""))
        .await
        .expect("the syncer draws from every pool");
    let vm = tool
        .allocate(mk_allocate_at("vm:one", "vms", ""))
        .await
        .expect("the tool allocates in vms");

    assert_eq!(tool.list_all("", "").await.expect("list"), vec![vm.clone()]);
    assert_eq!(
        tool.get_owner("vm:one").await.expect("get"),
        Some(vm.clone())
    );
    for owner in ["service:default/web", "service:default/vm-side"] {
        let err = tool.get_owner(owner).await.expect_err("not the tool's");
        assert_refused(err, Code::PermissionDenied, &["\"tool\"", owner]);
    }
    let err = tool
        .get_address(&web.address)
        .await
        .expect_err("not the tool's");
    let message = assert_refused(err, Code::PermissionDenied, &["\"tool\"", &web.address]);
    assert!(
        !message.contains("service:"),
        "the holder is not named: {message}"
    );
    // The syncer, scoped to every pool and its own owners, sees its own.
    assert_eq!(
        listed_owners(&syncer).await,
        ["service:default/web", "service:default/vm-side"]
    );
    // On the loopback listener, a call without a token reads everything.
    let local = client(&allocator.url(), None);
    assert_eq!(local.list_all("", "").await.expect("list").len(), 3);

    // Through grpcurl, as an operator of the tool would list.
    let out = grpcurl(&[
        "-H",
        &format!("authorization: Bearer {TOOL_TOKEN}"),
        &allocator.authenticated.expect("listener").to_string(),
        "vipam.v1.Allocator/List",
    ])
    .expect("grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("\"vm:one\""), "{stdout}");
    assert!(!stdout.contains("service:"), "{stdout}");
}

#[tokio::test]
async fn calls_without_a_token_on_the_loopback_listener_keep_every_right() {
    let (_dir, allocator) = mk_allocator();
    let local = client(&allocator.url(), None);
    assert_allocates_and_releases(&local, "vm:one").await;
    // A token sent there is still checked, and grants only its scope.
    let tool = client(&allocator.url(), Some(TOOL_TOKEN));
    let err = tool
        .allocate(mk_allocate_at("service:default/web", "", ""))
        .await
        .expect_err("the tool's scope applies on loopback too");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let stranger = client(&allocator.url(), Some("guess"));
    let err = stranger.list_all("", "").await.expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[test]
fn bad_clients_are_refused_at_start_naming_the_flag_and_the_value_but_never_the_token() {
    let setup_dir = mk_dir();
    let file = |name: &str| setup_dir.path().join(name).display().to_string();
    std::fs::write(setup_dir.path().join("empty"), "\n").expect("empty token file");
    let client = |name: &str, token: &str, pools: &str| {
        format!(
            "name={name},token-file={},owners=vm:,pools={pools}",
            file(token)
        )
    };
    let cases = [
        (
            vec![client("tool", "tool", "nope")],
            "pool \"nope\" does not exist",
        ),
        (vec![client("tool", "empty", "*")], "the file is empty"),
        (vec![client("tool", "missing", "*")], "token-file"),
        (
            vec![client("tool", "tool", "*"), client("tool", "syncer", "*")],
            "the name \"tool\" is taken",
        ),
        (
            vec![client("tool", "tool", "*"), client("other", "tool", "*")],
            "the same as credential \"tool\"'s",
        ),
    ];
    let data = file("data");
    for (clients, why) in cases {
        let mut args = vec!["--check", "--data-dir", &data, "--pool", "vms=10.40.1.0/24"];
        for c in &clients {
            args.extend(["--client", c.as_str()]);
        }
        let joined = clients.join(";");
        let env = [("VIPAM_CLIENTS", joined.as_str())];
        for (args, envs) in [(&args[..], &[][..]), (&args[..5], &env[..])] {
            let stderr = refused_at_start(args, envs).expect(why);
            let last = clients.last().expect("a client");
            assert!(
                stderr.contains(why) && stderr.contains(&format!("--client {last}")),
                "{why}: {stderr}"
            );
            assert!(!stderr.contains(TOOL_TOKEN) && !stderr.contains(SYNCER_TOKEN));
        }
    }
    let stderr = refused_at_start(
        &[
            "--check",
            "--pool",
            "vms=10.40.1.0/24",
            "--client",
            "name=tool",
        ],
        &[],
    )
    .expect("a malformed client");
    assert!(
        stderr.contains("--client") && stderr.contains("name=tool"),
        "{stderr}"
    );
}
