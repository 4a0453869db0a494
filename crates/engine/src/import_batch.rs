//! Rebuild, resync and drain of replicated objects, many objects to an import message.
//!
//! Sending each object on its own cost a round trip, a durable import (an `fdatasync` on the
//! destination) and a few thread hand-offs per object: with 1 MiB objects most of the pass
//! was that overhead, not moving bytes. Here the groups bound for the same destinations are
//! exported, object after object, into one message (`Batch`) until it holds
//! `BATCH_BYTES` or `BATCH_RECORDS_MAX` records, and one blocking-pool trip fills
//! messages for a whole page of the walk. A full message goes to its destinations while the
//! next one fills; at most `MOVE_OBJECTS_IN_FLIGHT` messages (or EC objects, which still move
//! one at a time through `move_object`) are on their way at once. A large object simply spans
//! several messages: its export resumes after the last row the previous one took.
//!
//! Progress counts an object done once the message holding its last rows is acknowledged.

use super::*;
use futures::StreamExt;

/// Records per import message: bounds the destination's index work per commit for objects of
/// many small records (`BATCH_BYTES` bounds its bytes).
const BATCH_RECORDS_MAX: u64 = 4096;

/// Messages being filled at once (one per set of destinations); past it the fullest is sent
/// early, so memory stays bounded with many targets.
const BATCHES_OPEN_MAX: usize = 4;

/// Bytes of records per import message. Every buffer a pass holds at once (open messages and
/// those on their way, at each end) is memory the kernel zeroes on first touch, and in a pass
/// moving a few hundred MiB per rank most buffers are touched once or twice: with 16 MiB
/// messages and 6 open, that zeroing (and the page faults) was up to a third of the engines'
/// CPU by perf. 8 MiB still makes the per-message costs (a round trip, two syncs) small.
const BATCH_BYTES: usize = 8 << 20;
const _: () = assert!(BATCH_BYTES <= EXPORT_PAGE_BYTES);

/// The first message of a pass goes once it holds this much: with several destinations'
/// messages filling at once, waiting for one to hold `BATCH_BYTES` left the network and the
/// destinations idle for the first tenths of a second (a good part of `strata bench rebuild`'s
/// start-up, which counts in its rate).
const EAGER_BATCH_BYTES: usize = 1 << 20;
const _: () = assert!(EAGER_BATCH_BYTES <= BATCH_BYTES);

/// The engine's buffer pool for these messages keeps every buffer a pass uses at once (those
/// being filled and those on their way), so none is allocated fresh after the first ones
/// (`strata_rpc::buffer_pool`); it is emptied when the pass ends.
pub(super) const BUFFERS_KEPT_BYTES: usize = (BATCHES_OPEN_MAX + MOVE_OBJECTS_IN_FLIGHT) * BATCH_BUFFER_BYTES.next_multiple_of(64 << 10);

/// A message's buffer: `BATCH_BYTES`, the last record's overshoot, and room to start the list
/// and each extent on a block boundary (the padding is not counted in an export's budget; an
/// extent in a file is at least 64 KiB). Capacity never written is never touched.
const BATCH_BUFFER_BYTES: usize = BATCH_BYTES + PAGE_SLACK_BYTES + (BATCH_BYTES / (64 << 10) + 2) * strata_rpc::records::VALUE_ALIGN;

/// An import message as the object store's export writes it. Its values are all verified where
/// they land (`Vos::import_refs` checks each against its record header), so the export reads
/// extents without hashing them (`RecordSink::receiver_verifies`).
pub(super) struct ImportSink(pub(super) strata_rpc::records::Writer);

impl strata_vos::RecordSink for ImportSink {
    fn record(&mut self, punch: bool, key: &[u8], value_len: usize) -> &mut Vec<u8> {
        self.0.record(punch, key, value_len)
    }

    /// Extents go on block boundaries of the message: read into it from disk and written to
    /// disk from where they arrive, without a copy at either end (`records::VALUE_ALIGN`).
    fn record_aligned(&mut self, punch: bool, key: &[u8], value_len: usize, at: usize) -> &mut Vec<u8> {
        self.0.record_aligned(punch, key, value_len, at)
    }

    fn receiver_verifies(&self) -> bool {
        true
    }
}

/// One import message being filled for a set of destinations.
pub(super) struct Batch {
    sink: ImportSink,
    records: u64,
    bytes: u64,
    /// Objects whose last rows are in this message.
    objects_ended: u64,
}

impl Batch {
    fn new(buffers: &strata_rpc::buffer_pool::BufferPool) -> Batch {
        let buf = buffers.take(BATCH_BUFFER_BYTES);
        Batch { sink: ImportSink(strata_rpc::records::Writer::with_aligned_buffer(buf)), records: 0, bytes: 0, objects_ended: 0 }
    }

    /// Bytes of the message so far, the padding that aligns extents included.
    fn len(&self) -> u64 {
        self.bytes.max(self.sink.0.written_bytes() as u64)
    }

    /// Whether the message should go now: it holds `full_bytes` (`BATCH_BYTES`, or less for the
    /// first of a pass) or `BATCH_RECORDS_MAX` records.
    fn full(&self, full_bytes: usize) -> bool {
        self.len() >= full_bytes as u64 || self.records >= BATCH_RECORDS_MAX
    }
}

type Batches = HashMap<Vec<TargetId>, Batch>;

/// Where filling stopped in a page of objects: the object, its planned group, and the last
/// row exported of that group.
#[derive(Default)]
struct FillCursor {
    object: usize,
    group: usize,
    after: Option<Vec<u8>>,
}

/// What one blocking-pool trip of `fill` produced.
struct Filled {
    batches: Batches,
    cursor: FillCursor,
    /// Objects of the page that move one at a time (EC).
    single: Vec<usize>,
    /// A message to send now (full, or the fullest when too many are open); `None`: the page
    /// is done.
    ready: Option<(Vec<TargetId>, Batch)>,
}

/// Export the planned replicated groups of `page[cursor..]` into `batches` until one is full
/// or the page ends. Runs on the blocking pool.
fn fill(view: &PoolView, buffers: &strata_rpc::buffer_pool::BufferPool, since: Epoch, page: &[StoredObject], mut cursor: FillCursor, mut batches: Batches, full_bytes: usize) -> Result<Filled, VosError> {
    let mut single = Vec::new();
    while let Some(o) = page.get(cursor.object) {
        let layout = match view.placement.layout(o.oid) {
            Ok(l) if !matches!(l.class.redundancy(), Redundancy::Erasure { .. }) => Some(l),
            Ok(_) => {
                single.push(cursor.object);
                None
            }
            Err(_) => None,
        };
        let plan = layout.as_ref().map(|l| Engine::rebuild_plan(view, o.me, o.oid, l)).unwrap_or_default();
        while let (Some(l), Some((g, dests))) = (layout.as_ref(), plan.get(cursor.group)) {
            let (g, groups) = (*g, l.group_count());
            let keep = move |r: strata_vos::RecordRef<'_>| r.record_key().is_none_or(|k| k.epoch <= since) && r.dkey().is_none_or(|d| strata_placement::group_for_dkey(&d, groups) == g);
            if !batches.contains_key(dests) && batches.len() >= BATCHES_OPEN_MAX {
                let fullest = batches.iter().max_by_key(|(_, b)| b.len()).map(|(k, _)| k.clone()).expect("BATCHES_OPEN_MAX > 0");
                let b = batches.remove(&fullest).expect("just found");
                return Ok(Filled { batches, cursor, single, ready: Some((fullest, b)) });
            }
            let batch = batches.entry(dests.clone()).or_insert_with(|| Batch::new(buffers));
            let budget = (BATCH_BYTES as u64).saturating_sub(batch.len()).max(1) as usize;
            let exported = o.vos.export_object_page_to(o.cont, o.oid, cursor.after.as_deref(), budget, &keep, &mut batch.sink)?;
            batch.records += exported.records;
            batch.bytes += exported.bytes;
            cursor.after = exported.next;
            if cursor.after.is_none() {
                cursor.group += 1;
                if cursor.group == plan.len() {
                    batch.objects_ended += 1;
                }
            }
            if batch.full(full_bytes) {
                if cursor.group == plan.len() {
                    cursor = FillCursor { object: cursor.object + 1, ..Default::default() };
                }
                let b = batches.remove(dests).expect("just filled");
                return Ok(Filled { batches, cursor, single, ready: Some((dests.clone(), b)) });
            }
        }
        cursor = FillCursor { object: cursor.object + 1, ..Default::default() };
    }
    Ok(Filled { batches, cursor, single, ready: None })
}

impl Engine {
    /// The moving half of a rebuild pass (see the module doc); returns the records pushed.
    pub(super) async fn rebuild_batched(&self, view: &Arc<PoolView>, since: Epoch, walk: &mut ObjectWalk) -> Result<u64, RemoteError> {
        type Moving<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, RemoteError>> + Send + 'a>>;
        let mut inflight: futures::stream::FuturesUnordered<Moving<'_>> = futures::stream::FuturesUnordered::new();
        let (mut pushed, mut sent) = (0u64, 0u64);
        let mut batches = Batches::new();
        // Kept buffers are dropped when the pass ends, however it ends.
        struct Release<'a>(&'a strata_rpc::buffer_pool::BufferPool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.clear();
            }
        }
        let _release = Release(&self.page_buffers);
        while let Some(page) = walk.next_page().await? {
            let page = Arc::new(page);
            let mut cursor = FillCursor::default();
            loop {
                while inflight.len() >= MOVE_OBJECTS_IN_FLIGHT {
                    if let Some(r) = inflight.next().await {
                        pushed += r?;
                    }
                }
                let (v, p, buffers) = (view.clone(), page.clone(), self.page_buffers.clone());
                let full_bytes = if sent == 0 { EAGER_BATCH_BYTES } else { BATCH_BYTES };
                let step = self.on_movement_threads(move || fill(&v, &buffers, since, &p, cursor, batches, full_bytes));
                tokio::pin!(step);
                // Messages already on their way keep going while the next one fills.
                let filled = loop {
                    tokio::select! {
                        r = &mut step => break r?,
                        Some(r) = inflight.next(), if !inflight.is_empty() => pushed += r?,
                    }
                };
                (batches, cursor) = (filled.batches, filled.cursor);
                for i in filled.single {
                    inflight.push(Box::pin(self.move_object(view, PassKind::Rebuild, page[i].clone())));
                }
                match filled.ready {
                    Some((dests, b)) => {
                        sent += 1;
                        inflight.push(Box::pin(self.send_batch(view, dests, b)));
                    }
                    None => break,
                }
            }
        }
        for (dests, b) in batches.drain() {
            inflight.push(Box::pin(self.send_batch(view, dests, b)));
        }
        while let Some(r) = inflight.next().await {
            pushed += r?;
        }
        Ok(pushed)
    }

    /// One import message to all its destinations at once; the objects it ends are done.
    async fn send_batch(&self, view: &PoolView, dests: Vec<TargetId>, b: Batch) -> Result<u64, RemoteError> {
        let page = strata_vos::ExportedPage { records: b.records, bytes: b.bytes, next: None };
        let (buf, start) = b.sink.0.finish_at();
        let payload = self.page_buffers.lend(buf, start);
        // Id 0 is no object of the tracker's: progress is counted per message below.
        for r in futures::future::join_all(dests.iter().map(|t| self.import_encoded(view, *t, payload.clone(), &page, 0))).await {
            r?;
        }
        self.movement.batch_done(view.map_pool_id, b.objects_ended, b.bytes * dests.len() as u64);
        Ok(b.records * dests.len() as u64)
    }
}
