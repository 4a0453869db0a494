//! The disk-space reserve: new data is refused with `NoSpace` while the file system under the
//! rank's directory has less than the reserve free, before the storage engine itself runs out.
//! A storage engine that meets `ENOSPC` mid-write stops accepting writes until it is reopened
//! (fjall poisons itself; the group commit fails every later group): refusing early keeps a
//! full disk a clear, recoverable error. Deletes, reads, rebuild bookkeeping and transaction
//! resolution still run, and writes are accepted again as soon as space is freed.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use strata_rpc::{ErrorCode, RemoteError};

/// How stale the free-space figure may get in time...
const RECHECK_AFTER: Duration = Duration::from_millis(100);
/// ...and in bytes admitted since it was taken.
const RECHECK_AFTER_BYTES: u64 = 16 << 20;

pub struct SpaceGuard {
    dir: PathBuf,
    reserve_bytes: u64,
    seen: Mutex<Seen>,
}

struct Seen {
    at: Option<Instant>,
    free_bytes: u64,
    admitted_since: u64,
}

impl SpaceGuard {
    pub fn new(dir: PathBuf, reserve_bytes: u64) -> SpaceGuard {
        SpaceGuard { dir, reserve_bytes, seen: Mutex::new(Seen { at: None, free_bytes: u64::MAX, admitted_since: 0 }) }
    }

    /// Admit `incoming` new bytes, or refuse them with a message that says what to do.
    pub fn admit(&self, incoming: u64) -> Result<(), RemoteError> {
        if self.reserve_bytes == 0 {
            return Ok(());
        }
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let stale = s.at.is_none_or(|t| t.elapsed() >= RECHECK_AFTER) || s.admitted_since.saturating_add(incoming) >= RECHECK_AFTER_BYTES;
        if stale {
            // An unreadable figure admits: the storage engine's own error is still there.
            s.free_bytes = free_bytes(&self.dir).unwrap_or(u64::MAX);
            s.at = Some(Instant::now());
            s.admitted_since = 0;
        }
        if s.free_bytes < self.reserve_bytes.saturating_add(incoming) {
            return Err(RemoteError::new(
                ErrorCode::NoSpace,
                format!(
                    "no space for new data: the file system under {} has {} MiB free, below this rank's reserve of {} MiB (`strata server --reserve-mib`); free space there or add ranks; data already written stays readable",
                    self.dir.display(),
                    s.free_bytes >> 20,
                    self.reserve_bytes >> 20
                ),
            ));
        }
        s.admitted_since += incoming;
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    strata_vos::fs_space(dir).ok().map(|(_, free)| free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_reserve_with_an_actionable_message() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(SpaceGuard::new(dir.path().to_owned(), 0).admit(u64::MAX / 2).is_ok(), "no reserve: no check");
        assert!(SpaceGuard::new(dir.path().to_owned(), 1 << 20).admit(4096).is_ok() || free < (2 << 20));
        let e = SpaceGuard::new(dir.path().to_owned(), free.saturating_add(1 << 30)).admit(4096).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoSpace);
        assert!(e.message.contains("--reserve-mib") && e.message.contains("MiB free"), "{}", e.message);
    }
}
