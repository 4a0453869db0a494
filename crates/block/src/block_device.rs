//! The seam between the NBD server and what it exports: a [`BlockDevice`] (byte-addressed
//! reads and writes of a fixed size) and [`Exports`] (which names exist and how to open them).
//! Volumes implement them over objects; tests implement them in memory.

use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;

/// Why a device operation failed; each maps to the NBD errno the client sees.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DevError {
    #[error("request past the end of the device")]
    OutOfRange,
    #[error("the export is read-only")]
    ReadOnly,
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("this server no longer holds the writer lease of the volume: {0}")]
    LeaseLost(String),
    #[error("I/O error: {0}")]
    Io(String),
}

impl DevError {
    pub fn errno(&self) -> u32 {
        use crate::nbd_wire::*;
        match self {
            DevError::OutOfRange => EINVAL,
            DevError::ReadOnly => EPERM,
            DevError::NoSpace(_) => ENOSPC,
            DevError::LeaseLost(_) | DevError::Io(_) => EIO,
        }
    }
}

/// A fixed-size byte-addressed device. Callers have checked ranges against `size_bytes()`.
///
/// Contract (NBD's): a change is durable once it returned with `fua` set, or once a `flush`
/// that started after it returned has returned; reads see every change that returned (and
/// reads of never-written or trimmed ranges return zeros; in a clone, the parent's bytes until
/// the clone writes or trims them).
pub trait BlockDevice: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<u8>, DevError>>;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DevError>>;
    /// Discard a range: it reads back as zeros.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), DevError>>;
    /// Zero a range; `allocate` (NBD's NO_HOLE) asks for zeros to be written, not a hole.
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool, fua: bool) -> BoxFuture<'_, Result<(), DevError>>;
    /// Make every change that returned before this call durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), DevError>>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDesc {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
}

/// Why an export could not be described or opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Unknown(String),
    /// Refused by policy (e.g. another server holds the volume's writer lease).
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The set of exports one NBD server offers.
pub trait Exports: Send + Sync + 'static {
    /// Names and descriptions, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// The export used when a client asks for the empty name.
    fn default_name(&self) -> Option<String>;
    fn describe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ExportDesc, OpenError>>;
    /// Open for transmission; a writable volume takes its writer lease here and releases it
    /// when the last `Arc` of the device is dropped.
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, OpenError>>;
}

/// An in-memory device, for protocol tests.
#[cfg(test)]
pub mod mem {
    use super::*;
    use futures::FutureExt;
    use std::sync::Mutex;

    pub struct MemDevice {
        pub data: Mutex<Vec<u8>>,
        pub ro: bool,
    }

    impl BlockDevice for MemDevice {
        fn size_bytes(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<u8>, DevError>> {
            let d = self.data.lock().unwrap();
            let r = d[offset as usize..offset as usize + len as usize].to_vec();
            async move { Ok(r) }.boxed()
        }
        fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            async { Ok(()) }.boxed()
        }
        fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
            self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            async { Ok(()) }.boxed()
        }
        fn write_zeroes(&self, offset: u64, len: u64, _allocate: bool, fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
            self.trim(offset, len, fua)
        }
        fn flush(&self) -> BoxFuture<'_, Result<(), DevError>> {
            async { Ok(()) }.boxed()
        }
    }

    pub struct MemExports {
        pub devs: Vec<(String, Arc<MemDevice>)>,
    }

    impl Exports for MemExports {
        fn list(&self) -> Vec<(String, String)> {
            self.devs.iter().map(|(n, _)| (n.clone(), format!("memory {n}"))).collect()
        }
        fn default_name(&self) -> Option<String> {
            self.devs.first().map(|(n, _)| n.clone())
        }
        fn describe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ExportDesc, OpenError>> {
            let r = self.devs.iter().find(|(n, _)| n == name).map(|(n, d)| ExportDesc { name: n.clone(), description: String::new(), size_bytes: d.size_bytes(), read_only: d.ro });
            async move { r.ok_or_else(|| OpenError::Unknown(format!("no export '{name}'"))) }.boxed()
        }
        fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, OpenError>> {
            let r = self.devs.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone() as Arc<dyn BlockDevice>);
            async move { r.ok_or_else(|| OpenError::Unknown(format!("no export '{name}'"))) }.boxed()
        }
    }
}
