//! `strata-fs`: the POSIX file system of Strata (seeds 001 and 003).
//!
//! A volume is a container of type `posix`. Its metadata lives in KV tables
//! ([`meta_schema`]): dentries `(parent ino, name) -> (ino, kind)` and inodes
//! `ino -> attributes`, sharded by the key's 8-byte home so a directory (its entries, its inode
//! and the inodes of the files created in it) is one shard and one prefix scan. Every
//! multi-key change is one serializable transaction ([`namespace`]), retried on conflict a
//! bounded number of times; what it would read it takes, when it can, from the values this
//! client last saw as expectations checked at the commit ([`expect_cache`]); a commit whose
//! answer was lost is settled by reading its keys back ([`commit_outcome`]). File data is one array object per file,
//! chunked by dkey ([`file_data`]); the object class comes from the file, its directory, or
//! the container default. The FUSE mount ([`fuse_mount`]) adds a metadata cache with
//! close-to-open consistency and write-back buffering ([`write_back`]) flushed on fsync and
//! close. A mount holds a session lease ([`mount_session`]) so that another mount can
//! reclaim what it left behind (files unlinked while open) if it dies.
//!
//! Limits: names 255 bytes, symlink targets 4096 bytes, files 16 TiB
//! ([`namespace::FILE_BYTES_MAX`]), xattrs 64 KiB per value and 256 KiB per inode.

pub mod commit_outcome;
pub mod dir_lease;
pub mod exnode;
pub mod expect_cache;
pub mod file_data;
pub mod fs_error;
pub mod fuse_mount;
pub mod ino_alloc;
pub mod kv_meta;
pub mod meta_schema;
pub mod meta_store;
pub mod mount_session;
pub mod namespace;
pub mod read_cache;
pub mod volume;
pub mod write_back;

pub use fs_error::FsError;
