use std::path::PathBuf;

/// Errors of the versioned object store. Every variant says what was refused and why, so the
/// engine can turn it into a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum VosError {
    #[error("{what} is {got} bytes; the limit is {max} bytes")]
    TooLarge { what: &'static str, got: usize, max: usize },
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("extent [{offset}, +{len}) is past the array limit of {max} bytes")]
    ExtentOutOfRange { offset: u64, len: u64, max: u64 },
    #[error("batch is {got} bytes or {ops} updates; the limit is {max_bytes} bytes and {max_ops} updates")]
    BatchTooLarge { got: usize, ops: usize, max_bytes: usize, max_ops: usize },
    #[error("corrupt record at {location}: {defect}; the data must be repaired from a replica")]
    Corrupt { location: String, defect: String },
    #[error("store at {path} is not a usable Strata target ({reason})")]
    OpenFailed { path: PathBuf, reason: String },
    #[error("store at {path} has format version {found}; this build reads version {supported}")]
    FormatVersion { path: PathBuf, found: String, supported: u32 },
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("epoch {epoch} of container {cont} is below its aggregation horizon {horizon} and is not a retained snapshot; older versions may be gone: read at a newer epoch or at a snapshot")]
    Aggregated { cont: strata_types::ContId, epoch: strata_types::Epoch, horizon: strata_types::Epoch },
    #[error("the store's writer thread has stopped (an earlier write failed: {0}); reopen the target")]
    WriterStopped(String),
}
