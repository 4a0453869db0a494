use strata_types::TargetId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("object class {class} needs {needed} targets per group but the pool has only {have} usable targets; use a class with fewer shards or add targets")]
    ClassDoesNotFit { class: String, needed: usize, have: usize },
    #[error("object class {class} with {groups} groups needs {needed} targets but the pool has {have}; use fewer groups (or GX)")]
    GroupsDoNotFit { class: String, groups: usize, needed: usize, have: usize },
    #[error("object id {0} carries no valid object class")]
    BadOid(String),
    #[error("target {target} cannot go from {from} to {to}; allowed from {from}: {allowed}")]
    IllegalTransition { target: TargetId, from: String, to: String, allowed: String },
    #[error("target {0} is not in this pool map")]
    UnknownTarget(TargetId),
    #[error("target {0} is already in the pool map")]
    DuplicateTarget(TargetId),
    #[error("group {group} of object {oid} has no healthy target left for shard {shard}: too many failures for its class")]
    NoSpare { oid: String, group: usize, shard: usize },
    #[error("{0}")]
    Invalid(String),
}
