//! Removal of an object shard a target no longer serves (the engine's reclaim pass after an
//! extension, drain or reintegration moved it elsewhere): its rows are deleted durably, in
//! bounded batches, and the extent-file blocks of deleted rows are freed (hole punched) only
//! after the batch that deleted their index rows is on stable storage, as aggregation and
//! container destruction do. A crash part way leaves a smaller object that is still listed
//! (the index row goes in the last batch), so the next pass finishes it.
//!
//! The caller makes sure nothing writes the object meanwhile: a row written between the scan
//! and the delete commit with a key the scan saw (an import of the same version) would be
//! deleted, and a write that found the object indexed before the index row is deleted would
//! leave rows nothing lists. The engine gates updates and imports under newer pool maps
//! against its deletes (`engine/src/reclaim.rs`).

use super::*;

/// Rows one reclaim batch deletes at most, so a large object does not become one huge commit.
const RECLAIM_BATCH_ROWS: usize = 10_000;

/// What [`Vos::reclaim_object`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Record rows (values and extent punches) deleted.
    pub records: u64,
    /// Their stored value bytes (extent-file extents by their length).
    pub bytes: u64,
    /// Nothing of the object is left: its punches and its index row went too.
    pub object_removed: bool,
}

impl ReclaimStats {
    /// Count record row `v`, about to be deleted; an extent-file extent it references joins
    /// `dead` (its blocks are freed once the delete is durable).
    pub(crate) fn count_deleted(&mut self, v: &[u8], dead: &mut Vec<(ExtentRef, u64)>) {
        self.records += 1;
        match record::decode(v) {
            Ok(rec) if rec.kind == RecordKind::ValueRef => {
                self.bytes += rec.len;
                dead.extend(ExtentRef::decode(rec.payload).map(|x| (x, rec.len)));
            }
            Ok(rec) => self.bytes += rec.payload.len() as u64,
            // A damaged row goes as well: nothing of it is needed here.
            Err(_) => self.bytes += v.len() as u64,
        }
    }
}

impl Vos {
    /// Delete every row of object `oid` in `cont` on this target: all versions, punches, its
    /// index row; frees the extent-file blocks its extents used. Durable on return.
    pub fn delete_object(&self, cont: ContId, oid: Oid) -> Result<ReclaimStats, VosError> {
        self.reclaim_object(cont, oid, &|_| true)
    }

    /// Delete the record rows of object `oid` in `cont` that `drop` selects (by decoded key:
    /// the dkeys of groups this target no longer holds, or erasure-coded cells of a shard index
    /// it no longer serves), durably, freeing the extent-file blocks of deleted extents. When no
    /// record row is left, the object's punches and index row are deleted too, so it no longer
    /// lists; otherwise punches stay (they only hide versions, and are history readers at older
    /// epochs may need). Undecodable rows are never selected.
    ///
    /// Nothing may write the object while this runs (see the module doc).
    pub fn reclaim_object(&self, cont: ContId, oid: Oid, drop: &dyn Fn(&RecordKey) -> bool) -> Result<ReclaimStats, VosError> {
        Ok(self.reclaim_objects(cont, &[oid], drop)?.pop().unwrap_or_default())
    }

    /// [`Vos::reclaim_object`] for several objects of one container in as few commits as their
    /// rows allow (one sync for a page of small objects, not one each); what each lost, in
    /// order. `drop` sees keys of every one of them (the key names its object).
    pub fn reclaim_objects(&self, cont: ContId, oids: &[Oid], drop: &dyn Fn(&RecordKey) -> bool) -> Result<Vec<ReclaimStats>, VosError> {
        let mut out = Vec::with_capacity(oids.len());
        let mut ops = Vec::new();
        let mut dead: Vec<(ExtentRef, u64)> = Vec::new();
        let mut removed = Vec::new();
        for &oid in oids {
            let p = object_prefix(cont, oid);
            let end = prefix_successor(&p);
            let mut stats = ReclaimStats::default();
            let mut kept = false;
            for r in self.engine.scan(Space::Records, &p, Some(&end), false) {
                let (k, v) = r?;
                if !decode_record_key(&k).is_some_and(|key| drop(&key)) {
                    kept = true;
                    continue;
                }
                stats.count_deleted(&v, &mut dead);
                ops.push(EngineOp::Delete(Space::Records, k));
                if ops.len() >= RECLAIM_BATCH_ROWS {
                    self.writer.commit(std::mem::take(&mut ops), Vec::new(), 0)?;
                    self.free_extents(&mut dead);
                }
            }
            if !kept {
                // In the same batch as the object's last record rows or a later one: the object
                // lists until nothing of it is left.
                for r in self.engine.scan(Space::Punches, &p, Some(&end), false) {
                    let (k, _) = r?;
                    ops.push(EngineOp::Delete(Space::Punches, k));
                }
                ops.push(EngineOp::Delete(Space::Objects, p.clone()));
                // Forgotten before the delete commits: a later write must write the index row again.
                self.indexed().remove(&(cont, oid));
                stats.object_removed = true;
                removed.push(oid);
            }
            out.push(stats);
        }
        if !ops.is_empty() {
            self.writer.commit(ops, Vec::new(), 0)?;
        }
        self.free_extents(&mut dead);
        for oid in removed {
            self.punches.remove_object(cont, oid);
        }
        Ok(out)
    }
}
