//! Errors of the KV layer. Callers branch on [`KvError::is_retryable`]: a conflict means "run
//! the transaction again from `begin()`"; anything else needs a person or a different input.

use strata_types::Epoch;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Another transaction touched what this one read or wrote; nothing of this transaction
    /// is visible. Retry from `begin()`.
    #[error("transaction conflict{}: {reason}; nothing was written, run the transaction again", key.as_ref().map(|k| format!(" on key {}", crate::show_key(k))).unwrap_or_default())]
    Conflict { key: Option<Vec<u8>>, reason: String },
    /// A compare-and-set found another value (`current`, `None` = absent). Nothing was written.
    #[error("compare-and-set failed on key {}: the current value is {}", crate::show_key(key), current.as_deref().map(crate::show_key).unwrap_or_else(|| "absent".into()))]
    CasFailed { key: Vec<u8>, current: Option<Vec<u8>> },
    #[error("{what} is {got} bytes; the limit is {max} bytes")]
    TooLarge { what: &'static str, got: usize, max: usize },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The container is not a KV store (or the store's metadata is unusable).
    #[error("{0}")]
    NotAStore(String),
    #[error("no snapshot named '{name}' in this store; `strata kv snapshot list` shows them")]
    NoSnapshot { name: String },
    /// The transaction ran past its deadline before it committed; nothing was written.
    #[error("transaction past its deadline of {deadline_ms} ms; nothing was written")]
    Deadline { deadline_ms: u64 },
    /// The commit may or may not have happened (the coordinator became unreachable at the
    /// commit point). Read the keys to find out; do not blindly retry non-idempotent work.
    #[error("commit outcome unknown: {0}")]
    Indeterminate(String),
    /// The cluster could not serve the request in time (ranks down, map changing).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The engines refused the write for lack of space (their `--reserve-mib`); nothing was
    /// written. Not worth retrying until space is freed.
    #[error("no space left in the pool: {0}")]
    NoSpace(String),
    #[error("a read at epoch {epoch} is not possible: {reason}")]
    BadEpoch { epoch: Epoch, reason: String },
    #[error(transparent)]
    Client(#[from] strata_client::ClientError),
    #[error("engine: {0}")]
    Remote(String),
}

impl KvError {
    /// Worth running the whole transaction (or single operation) again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KvError::Conflict { .. } | KvError::Unavailable(_))
    }
}
