//! What a test does when this machine cannot run it (no etcd, not root): it says so loudly and
//! returns, or fails where every test must run (env `CI` set).

use std::io::Write as _;
use std::path::Path;

/// Says that `test` cannot run here and why: prints `SKIPPED {test}: {reason}` to stderr and
/// appends it to the workspace's `target/skipped-tests.txt`, which the test command prints at
/// the end.
///
/// # Panics
///
/// When env `CI` is set: there every test must run.
pub fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run (and CI is set): {reason}");
    }
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/skipped-tests.txt");
    // The list is a convenience for the reader of the test command's output; the line on
    // stderr above is the record.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = writeln!(f, "{line}");
    }
}
