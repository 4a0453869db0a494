//! How the file system's metadata is laid out in the KV store (format 2).
//!
//! Every key starts with a **home**: 8 bytes (a big-endian inode number) that alone decide the
//! key's KV shard (`prefix:8`), then a tag byte:
//! - home = parent ino, `D` + name → [`DentryRecord`]: a directory is one shard and one scan;
//! - home = ino, `I` → [`InodeRecord`]: a directory's inode lives with its own entries;
//! - home = directory ino, `L` → [`DirLeaseRecord`]: the mount that holds the directory's
//!   lease (`dir_lease.rs`), next to the entries it covers;
//! - home 0, `O` + ino (8 bytes BE) → [`OrphanRecord`]: an orphan (unlinked while open) to
//!   reclaim at its last close, or by any mount once the session that held it open expired;
//! - home 0, `S` → [`SuperRecord`]: format version, chunk size, root inode.
//!
//! A file, symlink or special file gets an inode number whose home hashes to the same shard
//! as its directory's (`InoAlloc::next_in`), so its inode record, its dentry and its
//! directory's inode share a shard: create, unlink and rename within a directory are
//! one-shard transactions, committed in one round. Directories take numbers spread over the
//! shards (a directory's entries are its own shard), hard links and moves to another
//! directory leave the inode where it was born (those operations are then two-shard
//! transactions; nothing depends on where an inode lives, only speed).
//!
//! Format 1 (tag first, `prefix:9`, KV table 1) is not read: such a volume is refused with a
//! message (no deployed volumes existed). Every value carries a format version (an enum tag).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Key bytes that choose the shard (the home).
pub const HOME_BYTES: usize = 8;
/// Home and tag: a dentry's name starts after them.
pub const KEY_HEADER_BYTES: usize = HOME_BYTES + 1;
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
/// The home of the volume-wide records (superblock, orphans); 0 is never an inode.
const VOLUME_HOME: u64 = 0;

fn header(home: u64, tag: u8, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(KEY_HEADER_BYTES + extra);
    k.extend_from_slice(&home.to_be_bytes());
    k.push(tag);
    k
}

pub fn dentry_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = header(parent, b'D', name.len());
    k.extend_from_slice(name);
    k
}

pub fn dentry_prefix(parent: u64) -> Vec<u8> {
    header(parent, b'D', NAME_BYTES_MAX)
}

pub fn inode_key(ino: u64) -> Vec<u8> {
    header(ino, b'I', 0)
}

pub fn lease_key(dir: u64) -> Vec<u8> {
    header(dir, b'L', 0)
}

pub fn orphan_key(ino: u64) -> Vec<u8> {
    let mut k = header(VOLUME_HOME, b'O', 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// Every orphan key starts with this.
pub fn orphan_prefix() -> Vec<u8> {
    header(VOLUME_HOME, b'O', 0)
}

/// The inode number of an orphan key.
pub fn orphan_ino(key: &[u8]) -> Option<u64> {
    key.get(KEY_HEADER_BYTES..KEY_HEADER_BYTES + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

pub fn super_key() -> Vec<u8> {
    header(VOLUME_HOME, b'S', 0)
}

/// Where format 1 kept its superblock (`S` + 8 zero bytes, in KV table 1): found there, the
/// volume is of the old format.
pub fn super_key_format1() -> Vec<u8> {
    let mut k = vec![b'S'];
    k.extend_from_slice(&[0u8; 8]);
    k
}

/// The name part of a dentry key.
pub fn dentry_name(key: &[u8]) -> &[u8] {
    &key[KEY_HEADER_BYTES.min(key.len())..]
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

/// A directory lease: `holder` (a namespace instance, i.e. one mount) may change the
/// directory's entries and its files' inodes in its own memory and commit them later, until
/// `expires_ns` (wall clock) unless renewed. `wanted`: another mount asked for it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirLease {
    pub holder: u64,
    pub expires_ns: i64,
    pub wanted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirLeaseRecord {
    V1(DirLease),
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

pub fn encode_lease(l: &DirLease) -> Vec<u8> {
    postcard::to_allocvec(&DirLeaseRecord::V1(l.clone())).expect("lease records always serialize")
}

pub fn decode_lease(b: &[u8]) -> Result<DirLease, DecodeError> {
    match postcard::from_bytes(b) {
        Ok(DirLeaseRecord::V1(l)) => Ok(l),
        Err(e) => Err(DecodeError { what: "directory lease", reason: e.to_string() }),
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
        // A directory's inode and entries share the home that picks the shard.
        assert_eq!(inode_key(7)[..HOME_BYTES], dentry_key(7, b"x")[..HOME_BYTES]);
        assert!(!dentry_key(7, b"x").starts_with(&inode_key(7)) && !inode_key(7).starts_with(&dentry_prefix(7)));
        assert_eq!(orphan_ino(&orphan_key(42)), Some(42));
        assert!(orphan_key(42).starts_with(&orphan_prefix()));
        let i = Inode { ino: 5, kind: Kind::File, perm: 0o644, uid: 1, gid: 2, size: 3, nlink: 1, atime_ns: 1, mtime_ns: 2, ctime_ns: 3, crtime_ns: 4, rdev: 0, parent: 1, oclass: Some("RP_2G1".into()), symlink: None, xattrs: [(b"user.a".to_vec(), b"v".to_vec())].into(), data_version: 9 };
        assert_eq!(decode_inode(&encode_inode(&i)).unwrap(), i);
        assert!(decode_inode(b"\xff\xff").is_err());
        let d = Dentry { ino: 5, kind: Kind::Dir };
        assert_eq!(decode_dentry(&encode_dentry(d)).unwrap(), d);
        let o = Orphan { session: "fs-mount/x/1".into() };
        assert_eq!(decode_orphan(&encode_orphan(&o)).unwrap(), o);
        assert_eq!(decode_orphan(b"").unwrap().session, "");
        let l = DirLease { holder: 3, expires_ns: 4, wanted: true };
        assert_eq!(decode_lease(&encode_lease(&l)).unwrap(), l);
        assert_eq!(lease_key(7)[..HOME_BYTES], dentry_key(7, b"x")[..HOME_BYTES]);
        assert!(!lease_key(7).starts_with(&dentry_prefix(7)));
    }
}
