//! One error type for file-system operations, with the errno each maps to at the FUSE boundary.

use crate::meta_schema::DecodeError;
use crate::meta_store::MetaError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name longer than 255 bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such extended attribute")]
    NoXattr,
    #[error("value does not fit the buffer")]
    Range,
    #[error("operation not permitted: {0}")]
    Perm(&'static str),
    #[error("file too large (limit {0} bytes)")]
    TooBig(u64),
    #[error("no space for extended attributes (limit {0} bytes per inode)")]
    NoSpace(usize),
    #[error("too many levels of symbolic links")]
    Loop,
    #[error("the file was deleted by another mount while open here")]
    Stale,
    #[error("gave up on {0} after {1} conflicting attempts")]
    Contended(&'static str, u32),
    /// Another mount holds this directory's lease (`dir_lease.rs`); the caller recalls it and
    /// retries. Never reaches a user except after the recall timed out.
    #[error("directory {0} is leased by another mount that did not give it back")]
    Leased(u64),
    /// This mount lost a directory lease (expired while it could not renew): the changes it
    /// had not committed there are gone, as after a crash.
    #[error("lost the lease of directory {0}; its uncommitted changes were dropped")]
    LeaseLost(u64),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Corrupt(#[from] DecodeError),
    #[error("data store: {0}")]
    Data(String),
    /// The engines refused a write for lack of space (their `--reserve-mib`): ENOSPC, which
    /// applications handle, rather than EIO.
    #[error("no space left in the pool: {0}")]
    StoreFull(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoXattr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Perm(_) => libc::EPERM,
            FsError::TooBig(_) => libc::EFBIG,
            FsError::NoSpace(_) | FsError::StoreFull(_) | FsError::Meta(MetaError::Full(_)) => libc::ENOSPC,
            FsError::Loop => libc::ELOOP,
            FsError::Stale => libc::ESTALE,
            FsError::Contended(..) | FsError::Leased(_) => libc::EAGAIN,
            FsError::LeaseLost(_) => libc::EIO,
            FsError::Meta(MetaError::Conflict | MetaError::Stale) => libc::EAGAIN,
            FsError::Meta(MetaError::Invalid(_)) => libc::EINVAL,
            FsError::Meta(MetaError::Unavailable(_)) | FsError::Corrupt(_) | FsError::Data(_) => libc::EIO,
        }
    }
}
