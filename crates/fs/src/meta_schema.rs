//! How the file system's metadata is laid out in the KV store.
//!
//! Keys (the first 9 bytes are the shard prefix; the volume's KV store shards by them, so
//! one directory's entries live in one shard and inodes spread by number):
//! - `D` + parent ino (8 bytes BE) + name → [`DentryRecord`]: a directory is one prefix scan.
//! - `I` + ino (8 bytes BE) → [`InodeRecord`].
//! - `O` + ino (8 bytes BE) → [`OrphanRecord`]: an orphan (unlinked while open) to reclaim
//!   at its last close, or by any mount once the session that held it open has expired.
//! - `S` + 8 zero bytes → [`SuperRecord`]: format version, chunk size, root inode.
//!
//! Every value carries a format version from v1 (an enum tag), so records can evolve.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SHARD_PREFIX_BYTES: usize = 9;
/// Longest file name (POSIX NAME_MAX).
pub const NAME_BYTES_MAX: usize = 255;
/// Longest symbolic link target (PATH_MAX).
pub const SYMLINK_BYTES_MAX: usize = 4096;
/// One extended attribute's name and value (Linux XATTR_NAME_MAX / XATTR_SIZE_MAX).
pub const XATTR_NAME_BYTES_MAX: usize = 255;
pub const XATTR_VALUE_BYTES_MAX: usize = 64 * 1024;
/// All extended attributes of one inode: they live inside the inode record, which must stay
/// well under the KV value limit (1 MiB).
pub const XATTRS_BYTES_MAX: usize = 256 * 1024;

pub fn dentry_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = dentry_prefix(parent);
    k.extend_from_slice(name);
    k
}

pub fn dentry_prefix(parent: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(SHARD_PREFIX_BYTES + NAME_BYTES_MAX);
    k.push(b'D');
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

pub fn inode_key(ino: u64) -> Vec<u8> {
    let mut k = vec![b'I'];
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn orphan_key(ino: u64) -> Vec<u8> {
    let mut k = vec![b'O'];
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub const ORPHAN_PREFIX: &[u8] = b"O";

pub fn super_key() -> Vec<u8> {
    let mut k = vec![b'S'];
    k.extend_from_slice(&[0u8; 8]);
    k
}

/// The name part of a dentry key.
pub fn dentry_name(key: &[u8]) -> &[u8] {
    &key[SHARD_PREFIX_BYTES.min(key.len())..]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDev => "chardev",
            Kind::BlockDev => "blockdev",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
    pub rdev: u32,
    /// Directories: their parent (for `..` and the rename-into-own-subtree check).
    pub parent: u64,
    /// Files: the object class of the data object. Directories: the class new children
    /// inherit (`None`: the container default).
    pub oclass: Option<String>,
    pub symlink: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bumped whenever file data changes, so other mounts know their page cache is stale.
    pub data_version: u64,
}

impl Inode {
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | u32::from(self.perm)
    }

    pub fn xattrs_bytes(&self) -> usize {
        self.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeRecord {
    V1(Inode),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dentry {
    pub ino: u64,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DentryRecord {
    V1(Dentry),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub root: u64,
    pub chunk_bytes: u64,
    pub created_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SuperRecord {
    V1(Superblock),
}

/// An inode unlinked while a mount had it open: the mount's session (a lease key in the
/// management service; empty if unknown) says whether that mount is still alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    pub session: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrphanRecord {
    V1(Orphan),
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt {what} record: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

pub fn encode_inode(i: &Inode) -> Vec<u8> {
    postcard::to_allocvec(&InodeRecord::V1(i.clone())).expect("inode records always serialize")
}

pub fn decode_inode(b: &[u8]) -> Result<Inode, DecodeError> {
    match postcard::from_bytes(b) {
        Ok(InodeRecord::V1(i)) => Ok(i),
        Err(e) => Err(DecodeError { what: "inode", reason: e.to_string() }),
    }
}

pub fn encode_dentry(d: Dentry) -> Vec<u8> {
    postcard::to_allocvec(&DentryRecord::V1(d)).expect("dentry records always serialize")
}

pub fn decode_dentry(b: &[u8]) -> Result<Dentry, DecodeError> {
    match postcard::from_bytes(b) {
        Ok(DentryRecord::V1(d)) => Ok(d),
        Err(e) => Err(DecodeError { what: "dentry", reason: e.to_string() }),
    }
}

pub fn encode_super(s: &Superblock) -> Vec<u8> {
    postcard::to_allocvec(&SuperRecord::V1(s.clone())).expect("superblocks always serialize")
}

pub fn decode_super(b: &[u8]) -> Result<Superblock, DecodeError> {
    match postcard::from_bytes(b) {
        Ok(SuperRecord::V1(s)) => Ok(s),
        Err(e) => Err(DecodeError { what: "superblock", reason: e.to_string() }),
    }
}

pub fn encode_orphan(o: &Orphan) -> Vec<u8> {
    postcard::to_allocvec(&OrphanRecord::V1(o.clone())).expect("orphan records always serialize")
}

pub fn decode_orphan(b: &[u8]) -> Result<Orphan, DecodeError> {
    // Empty: written before orphans named their session.
    if b.is_empty() {
        return Ok(Orphan { session: String::new() });
    }
    match postcard::from_bytes(b) {
        Ok(OrphanRecord::V1(o)) => Ok(o),
        Err(e) => Err(DecodeError { what: "orphan", reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_one_prefix_and_records_round_trip() {
        let k = dentry_key(7, b"name");
        assert!(k.starts_with(&dentry_prefix(7)));
        assert!(!k.starts_with(&dentry_prefix(8)));
        assert_eq!(dentry_name(&k), b"name");
        assert_eq!(inode_key(7).len(), SHARD_PREFIX_BYTES);
        let i = Inode { ino: 5, kind: Kind::File, perm: 0o644, uid: 1, gid: 2, size: 3, nlink: 1, atime_ns: 1, mtime_ns: 2, ctime_ns: 3, crtime_ns: 4, rdev: 0, parent: 1, oclass: Some("RP_2G1".into()), symlink: None, xattrs: [(b"user.a".to_vec(), b"v".to_vec())].into(), data_version: 9 };
        assert_eq!(decode_inode(&encode_inode(&i)).unwrap(), i);
        assert!(decode_inode(b"\xff\xff").is_err());
        let d = Dentry { ino: 5, kind: Kind::Dir };
        assert_eq!(decode_dentry(&encode_dentry(d)).unwrap(), d);
        let o = Orphan { session: "fs-mount/x/1".into() };
        assert_eq!(decode_orphan(&encode_orphan(&o)).unwrap(), o);
        assert_eq!(decode_orphan(b"").unwrap().session, "");
    }
}
