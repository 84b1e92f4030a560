//! A small tmpfs of its own for a test that fills a disk: mounted on a fresh directory, filled
//! to its last byte by a file, emptied again, and unmounted (its directory removed) when the
//! guard drops, also when the test fails. Mounting needs root (or `CAP_SYS_ADMIN`);
//! [`require`] skips the test where that is missing, as [`crate::skip`] says.
//!
//! ```no_run
//! let Some(disk) = vipam_test_support::tmpfs::require("fills_the_disk", 16 << 20) else {
//!     return;
//! };
//! disk.fill().expect("fill");
//! // ... a write fails with ENOSPC ...
//! disk.free().expect("free");
//! ```

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::skip::skip_or_fail;

/// The name of the file that fills the disk.
const FILLER: &str = "filler";

/// A mounted tmpfs; unmounted when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

/// For tests: a tmpfs of `bytes` mounted for `test`, or, where it cannot be mounted, `None`
/// after [`skip_or_fail`] said why.
///
/// # Panics
///
/// When it cannot be mounted and env `CI` is set.
pub fn require(test: &str, bytes: u64) -> Option<Tmpfs> {
    Tmpfs::mount(bytes)
        .map_err(|reason| skip_or_fail(test, &reason))
        .ok()
}

/// Runs `program args`; why not, when it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} does not run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on a fresh directory under the temporary directory; why not,
    /// where this machine does not let the test mount one.
    pub fn mount(bytes: u64) -> Result<Tmpfs, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vipam-tmpfs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let target = dir.to_string_lossy().to_string();
        let size = format!("size={bytes}");
        if let Err(why) = run("mount", &["-t", "tmpfs", "-o", &size, "tmpfs", &target]) {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("cannot mount a tmpfs (it needs root): {why}"));
        }
        Ok(Tmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Fills the disk to its last byte with one file.
    pub fn fill(&self) -> io::Result<()> {
        let mut file = std::fs::File::create(self.dir.join(FILLER))?;
        let chunk = vec![0x5a_u8; 64 << 10];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e),
            }
        }
        // What is left is less than a chunk: take it byte by byte.
        loop {
            match file.write_all(&[0x5a]) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::StorageFull => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the file that filled the disk.
    pub fn free(&self) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(FILLER))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = self.dir.to_string_lossy().to_string();
        // A process still using the mount (a test that failed before stopping its program)
        // keeps it busy: detach it then, so that it goes once that process has.
        if run("umount", &[&target]).is_err() {
            let _ = run("umount", &["--lazy", &target]);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
