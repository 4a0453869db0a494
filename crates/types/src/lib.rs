//! `strata-types`: the vocabulary every Strata layer shares.
//!
//! This crate owns the identifiers (pools, containers, objects, ranks, targets), the epoch
//! type and the hybrid logical clock that produces epochs, and object classes (how an object
//! is striped, replicated or erasure-coded). It has no I/O beyond the HLC's high-water-mark
//! file and depends on nothing of ours.
//!
//! Invariants:
//! - An [`Oid`] is 128 bits; its top 32 bits are reserved for the object type (8 bits) and the
//!   encoded object class (24 bits), so any layer can recover both from the id alone.
//! - An [`Epoch`] is 48 bits of physical milliseconds and 16 bits of logical counter; epochs
//!   issued by one [`Hlc`] strictly increase, across restarts too when it persists a
//!   high-water mark.
//! - [`ObjectClass`] values are always valid: construction goes through `FromStr`/`new_*`,
//!   which check the limits below.
//!
//! Limits: replicas 2..=8, EC data cells 2..=16 and parity 1..=4 (never more parity than
//! data), fixed group counts 1..=16383 (`GX` means "as many as fit").

mod bytes_fmt;
mod epoch;
mod hlc;
mod ids;
mod oclass;
mod oid;

pub use bytes_fmt::human_bytes;
pub use epoch::Epoch;
pub use hlc::{Hlc, HlcError, PhysicalClock, SystemClock, HLC_MAX_DRIFT_MS_DEFAULT};
pub use ids::{ContId, IdParseError, PoolId, Rank, TargetId};
pub use oclass::{GroupCount, ObjectClass, ObjectClassError, Redundancy};
pub use oid::{ObjectType, Oid, OidParseError};
