//! A file's layout as an exNode (seed 003): `[exnode]` names the file, `[view]` lists its
//! segments, one `[segment-ID]` per object class with its driver (replicate, erasure, stripe)
//! and parameters, and one `[block-ID]` per shard with its target and a `read_cap` /
//! `write_cap` that the shard's engine honours for that shard alone.
//!
//! Segment and block ids are derived (xxh3 of the object id and shard), so the same layout
//! prints the same ids; capabilities are signed anew with each rendering.

use serde::Serialize;
use strata_placement::Layout;
use strata_rpc::capability::{sign, CapClaims, CapRights};
use strata_types::{ContId, ObjectClass, Oid, PoolId, Redundancy};
use xxhash_rust::xxh3::xxh3_64;

#[derive(Clone, Debug, Serialize)]
pub struct ExNode {
    pub exnode: ExHeader,
    pub view: View,
    pub segments: Vec<Segment>,
    pub blocks: Vec<Block>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExHeader {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub data_version: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct View {
    pub default: u64,
    pub segments: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Segment {
    pub id: u64,
    /// `replicate`, `erasure` or `stripe`.
    pub driver: &'static str,
    pub class: String,
    pub oid: String,
    pub chunk_bytes: u64,
    pub groups: usize,
    pub group_size: usize,
    pub replicas: Option<u8>,
    pub data_cells: Option<u8>,
    pub parity_cells: Option<u8>,
    pub cell_bytes: Option<u64>,
    pub blocks: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Block {
    pub id: u64,
    pub segment: u64,
    pub group: usize,
    pub shard: usize,
    /// What the shard holds: `replica N`, `data cell N`, `parity cell N`, `stripe`.
    pub role: String,
    pub target: String,
    pub address: String,
    /// A spare standing in for an unhealthy home target.
    pub spare: bool,
    pub read_cap: String,
    pub write_cap: String,
}

pub struct Signer<'a> {
    pub key: &'a [u8],
    pub pool: PoolId,
    pub cont: ContId,
    pub expires_ms: u64,
}

fn id63(parts: &[&[u8]]) -> u64 {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p);
    }
    xxh3_64(&b) & (u64::MAX >> 1)
}

#[allow(clippy::too_many_arguments)]
pub fn build(name: &str, ino: u64, size: u64, data_version: u64, oid: Oid, class: ObjectClass, chunk_bytes: u64, layout: &Layout, addr_of: impl Fn(u32) -> String, signer: &Signer<'_>) -> ExNode {
    let oid_bytes = [oid.hi.to_be_bytes(), oid.lo.to_be_bytes()].concat();
    let seg_id = id63(&[b"segment", &oid_bytes]);
    let (driver, replicas, data, parity, cell) = match class.redundancy() {
        Redundancy::Replicas(n) => ("replicate", Some(n), None, None, None),
        Redundancy::Erasure { data, parity } => ("erasure", None, Some(data), Some(parity), Some(strata_ec::CELL_BYTES_DEFAULT)),
        Redundancy::None => ("stripe", None, None, None, None),
    };
    let mut blocks = Vec::new();
    for (g, group) in layout.groups().enumerate() {
        for (s, loc) in group.iter().enumerate() {
            let id = id63(&[b"block", &oid_bytes, &(g as u64).to_be_bytes(), &(s as u64).to_be_bytes()]);
            let role = match class.redundancy() {
                Redundancy::Replicas(_) if s == 0 => "replica 0 (leader)".to_string(),
                Redundancy::Replicas(_) => format!("replica {s}"),
                Redundancy::Erasure { data, .. } if s < data as usize => format!("data cell {s}"),
                Redundancy::Erasure { data, .. } if s == data as usize => "parity cell 0 (leader)".to_string(),
                Redundancy::Erasure { data, .. } => format!("parity cell {}", s - data as usize),
                Redundancy::None => "stripe".to_string(),
            };
            let cap = |rights| sign(signer.key, &CapClaims { version: 1, pool: signer.pool, cont: signer.cont, oid, target: loc.target, group: g as u32, rights, expires_ms: signer.expires_ms });
            blocks.push(Block {
                id,
                segment: seg_id,
                group: g,
                shard: s,
                role,
                target: format!("rank {} target {}", loc.target.rank.0, loc.target.index),
                address: addr_of(loc.target.rank.0),
                spare: loc.is_spare,
                read_cap: cap(CapRights::Read),
                write_cap: cap(CapRights::Write),
            });
        }
    }
    let seg = Segment {
        id: seg_id,
        driver,
        class: class.to_string(),
        oid: oid.to_string(),
        chunk_bytes,
        groups: layout.group_count(),
        group_size: layout.groups().next().map_or(0, |g| g.len()),
        replicas,
        data_cells: data,
        parity_cells: parity,
        cell_bytes: cell,
        blocks: blocks.iter().map(|b| b.id).collect(),
    };
    ExNode { exnode: ExHeader { id: ino, name: name.to_string(), size, data_version }, view: View { default: seg_id, segments: vec![seg_id] }, segments: vec![seg], blocks }
}

/// The seed's text form: INI sections, `key = value`.
pub fn render(x: &ExNode) -> String {
    let mut o = String::new();
    o += &format!("[exnode]\nid = {}\nname = {}\nsize = {}\ndata_version = {}\n\n", x.exnode.id, x.exnode.name, x.exnode.size, x.exnode.data_version);
    o += &format!("[view]\ndefault = {}\n", x.view.default);
    for s in &x.view.segments {
        o += &format!("segment = {s}\n");
    }
    for s in &x.segments {
        o += &format!("\n[segment-{}]\ndriver = {}\nclass = {}\noid = {}\nchunk_bytes = {}\ngroups = {}\ngroup_size = {}\n", s.id, s.driver, s.class, s.oid, s.chunk_bytes, s.groups, s.group_size);
        if let Some(r) = s.replicas {
            o += &format!("replicas = {r}\n");
        }
        if let (Some(k), Some(p), Some(c)) = (s.data_cells, s.parity_cells, s.cell_bytes) {
            o += &format!("data_cells = {k}\nparity_cells = {p}\ncell_bytes = {c}\n");
        }
        for b in &s.blocks {
            o += &format!("block = {b}\n");
        }
    }
    for b in &x.blocks {
        o += &format!("\n[block-{}]\nsegment = {}\ngroup = {}\nshard = {}\nrole = {}\ntarget = {}\naddress = {}\n", b.id, b.segment, b.group, b.shard, b.role, b.target, b.address);
        if b.spare {
            o += "spare = true\n";
        }
        o += &format!("read_cap = {}\nwrite_cap = {}\n", b.read_cap, b.write_cap);
    }
    o
}
