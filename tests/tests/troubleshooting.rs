//! `docs/troubleshooting.md` against the programs: it explains every Event
//! reason the syncer declares and every gRPC code the allocator's sources
//! build a status with, so that a new reason or code cannot ship without
//! its row.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use vipam_e2e::workspace_dir;

mod common;

fn page() -> String {
    std::fs::read_to_string(workspace_dir().join("docs/troubleshooting.md"))
        .expect("docs/troubleshooting.md")
}

/// Every `.rs` file below `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Each gRPC code by its specification name.
fn all_codes() -> Vec<(tonic::Code, &'static str)> {
    (0..=16)
        .map(|n| {
            let code = tonic::Code::from_i32(n);
            (code, vipam::names::code_name(code))
        })
        .collect()
}

#[test]
fn the_page_explains_every_event_reason_the_syncer_declares() {
    use vipam_syncer::events::reason;
    // The reasons as the syncer's sources declare them, read from the
    // `reason` module's text so that a new constant needs a row here.
    let mut declared = BTreeSet::new();
    for file in sources(&workspace_dir().join("syncer/src")) {
        let text = std::fs::read_to_string(&file).expect("read source");
        let Some((_, module)) = text.split_once("pub mod reason {") else {
            continue;
        };
        let module = module.split("\n}").next().unwrap_or_default();
        for line in module.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("pub const ")
                && let Some((_, value)) = rest.split_once("= \"")
            {
                declared.insert(value.trim_end_matches("\";").to_string());
            }
        }
    }
    // The scan reads the real module: its first and last reasons are found.
    for r in [reason::ALLOCATED, reason::CONFIGMAP_TOO_LARGE] {
        assert!(
            declared.contains(r),
            "{r} not found in the reason module's text: {declared:?}"
        );
    }
    let documented = common::table_keys(&page(), "## Events");
    assert_eq!(
        documented, declared,
        "the Events table vs the syncer's reasons"
    );
}

#[test]
fn the_page_explains_every_grpc_code_the_allocator_returns() {
    let by_constructor: Vec<(String, &str)> = all_codes()
        .into_iter()
        .map(|(_, name)| (name.to_lowercase(), name))
        .collect();
    // Every `Status::<code>(` in the allocator's sources.
    let mut returned = BTreeSet::new();
    for file in sources(&workspace_dir().join("allocator/src")) {
        let text = std::fs::read_to_string(&file).expect("read source");
        for after in text.split("Status::").skip(1) {
            let Some((word, _)) = after.split_once('(') else {
                continue;
            };
            if let Some((_, name)) = by_constructor.iter().find(|(c, _)| c == word) {
                returned.insert(name.to_string());
            }
        }
    }
    assert!(
        returned.len() >= 8,
        "too few codes found in allocator/src, has the way statuses are built changed? {returned:?}"
    );
    // The request timeout (`--request-timeout`) is tonic's: CANCELLED.
    returned.insert(vipam::names::code_name(tonic::Code::Cancelled).to_string());
    let documented = common::table_keys(&page(), "## Error codes of the allocator");
    assert_eq!(
        documented, returned,
        "the error code table vs the allocator"
    );
}
