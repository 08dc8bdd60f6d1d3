//! The durable local spool: an append-only log of segment files.
//!
//! Why not SQLite (the first spool was one): per event it cost an INSERT on sqlx's worker
//! thread (a hand-off each way), a B-tree insert, the shipper reading the row back and a
//! DELETE once acknowledged — about 60 % of pg-proxy's CPU per proxied query. An event here
//! costs a copy into a buffer; one writer thread appends everything that queued up meanwhile
//! with one `write` and one `fdatasync` (group commit), and the shipper takes freshly written
//! events from memory. The files are only read again after a crash, a restart, or an outage
//! longer than the in-memory window.
//!
//! Layout of the spool directory:
//! - `<first id, 20 digits>.seg`: frames `[body length u32][CRC-32C u32 of id and body]
//!   [id u64][body]` (little-endian), ids strictly increasing, then zeros: the writer extends
//!   a segment by [`PREALLOCATE`] bytes of zeros at a time, so that a group's fdatasync finds
//!   the file's size and blocks unchanged and flushes only the group's pages — not the
//!   inode, and on a journalling file system no journal commit (what PostgreSQL does for its
//!   WAL segments). A header of zeros ends a segment's frames (ids start at 1). A new segment
//!   starts when the current one passes [`SEGMENT_MAX`] and at every open.
//! - `acked`: the id through which the audit store has acknowledged, with its CRC. Written
//!   without fsync: losing it only means resending, and the store is idempotent on
//!   (session, sequence).
//! - `rejected.log`: events the store refused as malformed, kept for an operator (frames of
//!   `[reason length u32][reason][event]`).
//! - `lock`: held (flock) while a process has the spool open.
//!
//! Recovery on open: every segment is scanned; the zeros after its last frame are cut, and a
//! frame that is short, too long, fails its CRC or does not increase the id ends the
//! segment's readable part and the file is truncated there (a torn tail from a crash mid-write; nothing in it was acknowledged as durable,
//! since acknowledgement follows the fdatasync). Segments wholly acknowledged are deleted.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use crate::RecorderError;

/// A segment is closed and a new one started once it is this large.
pub(crate) const SEGMENT_MAX: u64 = 64 << 20;
/// Bytes of zeros a segment grows by ahead of its frames: one size change (and its metadata
/// flush) per this many bytes of events instead of one per fdatasync.
pub(crate) const PREALLOCATE: u64 = 4 << 20;
/// Largest event accepted (the store's gRPC limit is 64 MiB per batch).
pub(crate) const EVENT_MAX: usize = 16 << 20;
/// Bytes queued and not yet written before `reserve` makes callers wait (backpressure).
const PENDING_MAX: usize = 16 << 20;
/// Bytes of written events kept in memory for the shipper.
const CACHE_MAX: usize = 32 << 20;
/// The default shortest time between two fdatasyncs while events keep coming: an fdatasync
/// costs tens of microseconds of CPU (and a VM exit on virtual disks), so under load the
/// writer lets a group fill for this long instead of syncing every few events. An idle spool
/// syncs at once. It is also the most a crash of the machine or the process can take of
/// events already queued.
pub const DEFAULT_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);
/// Failed write groups remembered for callers still waiting on them.
const FAILURES_KEPT: usize = 256;
const HEADER: usize = 16;

/// A queued event's place in the spool; wait for it with `Spool::durable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub(crate) u64);

/// Progress of the writer, watched by callers waiting for durability.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// Every id below this is resolved: durable, or failed (see `failures`).
    pub(crate) resolved_below: u64,
    /// Recent failed groups: (first id, last id, why).
    failures: VecDeque<(u64, u64, String)>,
    /// Failures of ids below this were forgotten (too many since): treated as failed.
    forgotten_below: u64,
    /// How many groups failed since open.
    pub(crate) failed_groups: u64,
}

impl Progress {
    /// Why the most recent failed group failed.
    pub(crate) fn last_failure(&self) -> Option<&str> {
        self.failures.back().map(|f| f.2.as_str())
    }
}

struct Queue {
    /// Frames queued, not yet handed to the writer.
    pending: Vec<u8>,
    /// Events in `pending`.
    pending_events: u64,
    /// The id the next queued event gets.
    next_id: u64,
    closed: bool,
}

/// Written events kept in memory for the shipper.
struct Cache {
    /// Every durable event with id >= `floor` is in `chunks`.
    floor: u64,
    chunks: VecDeque<Chunk>,
    bytes: usize,
}

struct Chunk {
    last: u64,
    frames: Bytes,
}

struct Segments {
    /// (first id, path), oldest first; the last one is being written.
    list: Vec<(u64, PathBuf)>,
    acked: u64,
    ack_file: File,
    rejected: File,
    rejected_count: u64,
}

struct Shared {
    dir: PathBuf,
    display: String,
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    /// Wakes callers waiting for room in the queue.
    room: Notify,
    progress: watch::Sender<Progress>,
    /// Events queued or written, and not yet acknowledged by the store.
    backlog: watch::Sender<u64>,
    cache: Mutex<Cache>,
    segments: Mutex<Segments>,
    /// Told when events became durable (the shipper).
    written: Notify,
    /// Where the shipper's last read from disk stopped: (next id, segment first id, offset).
    cursor: Mutex<Option<(u64, u64, u64)>>,
    _lock: File,
}

/// The spool; cheap to clone. The writer thread ends when the last clone is dropped, after
/// writing what was queued.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut q) = self.0.queue.lock() {
            q.closed = true;
        }
        self.0.wake_writer.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every update is a
    // plain assignment or push), so a poisoned lock is taken over rather than propagated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Spool {
    /// Opens or creates the spool directory, recovers it, and starts the writer thread,
    /// syncing at most every [`DEFAULT_SYNC_INTERVAL`] under load.
    pub async fn open(path: &Path) -> Result<Spool, RecorderError> {
        Spool::open_with(path, DEFAULT_SYNC_INTERVAL).await
    }

    /// Like [`Spool::open`], syncing at most every `sync_interval` under load: longer saves
    /// CPU and disk flushes, and widens how much of the last events a crash can take.
    pub async fn open_with(
        path: &Path,
        sync_interval: std::time::Duration,
    ) -> Result<Spool, RecorderError> {
        crate::migrate::prepare(path)
            .await
            .map_err(|e| error(&path.display().to_string(), e))?;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || open_blocking(&path, sync_interval))
            .await
            .map_err(|e| RecorderError::Spool {
                path: String::new(),
                reason: e.to_string(),
            })?
    }

    fn error(&self, e: impl std::fmt::Display) -> RecorderError {
        error(&self.shared.display, e)
    }

    /// Waits while the queue is over its bound (backpressure; the writer is behind the disk).
    pub async fn reserve(&self) -> Result<(), RecorderError> {
        loop {
            let notified = self.shared.room.notified();
            {
                let q = lock(&self.shared.queue);
                if q.closed {
                    return Err(RecorderError::Closed);
                }
                if q.pending.len() < PENDING_MAX {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Queues one event, encoded by `encode` straight into the queue, without waiting; the
    /// writer makes it durable with whatever else queued meanwhile.
    pub(crate) fn queue_with(
        &self,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Ticket, RecorderError> {
        let ticket = {
            let mut q = lock(&self.shared.queue);
            if q.closed {
                return Err(RecorderError::Closed);
            }
            let id = q.next_id;
            let start = q.pending.len();
            q.pending.extend_from_slice(&[0u8; HEADER]);
            encode(&mut q.pending);
            let len = q.pending.len() - start - HEADER;
            if len > EVENT_MAX {
                q.pending.truncate(start);
                return Err(self.error(format!(
                    "an event of {len} bytes is larger than the spool's limit of {EVENT_MAX}"
                )));
            }
            let mut crc = Crc32c::new();
            crc.update(&id.to_le_bytes());
            crc.update(&q.pending[start + HEADER..]);
            let header = &mut q.pending[start..start + HEADER];
            header[..4].copy_from_slice(&(len as u32).to_le_bytes());
            header[4..8].copy_from_slice(&crc.finish().to_le_bytes());
            header[8..].copy_from_slice(&id.to_le_bytes());
            q.next_id += 1;
            q.pending_events += 1;
            // Only an idle writer needs waking; a busy one takes the queue when it is done.
            if q.pending_events == 1 {
                self.shared.wake_writer.notify_one();
            }
            Ticket(id)
        };
        // A rise wakes no one: the backlog is watched only for going down (to zero, in
        // `Recorder::flush`), and this runs for every event.
        self.shared.backlog.send_if_modified(|n| {
            *n += 1;
            false
        });
        Ok(ticket)
    }

    /// Queues one encoded event (the concatenation of `parts`) without waiting.
    pub fn queue(&self, parts: &[&[u8]]) -> Result<Ticket, RecorderError> {
        self.queue_with(|buf| {
            for p in parts {
                buf.extend_from_slice(p);
            }
        })
    }

    /// Appends one encoded event; returns once it is durable.
    pub async fn append(&self, body: &[u8]) -> Result<(), RecorderError> {
        self.reserve().await?;
        let ticket = self.queue(&[body])?;
        self.durable(ticket).await
    }

    /// Waits until the event of `ticket` is durable (or its write failed).
    pub async fn durable(&self, ticket: Ticket) -> Result<(), RecorderError> {
        let mut progress = self.shared.progress.subscribe();
        let p = progress
            .wait_for(|p| p.resolved_below > ticket.0)
            .await
            .map_err(|_| RecorderError::Closed)?;
        match failure_of(&p, ticket.0) {
            None => Ok(()),
            Some(why) => Err(self.error(why)),
        }
    }

    /// Waits until every event from `first` through `last` is durable; an error if the
    /// write of any of them failed.
    pub async fn durable_range(&self, first: Ticket, last: Ticket) -> Result<(), RecorderError> {
        let mut progress = self.shared.progress.subscribe();
        let p = progress
            .wait_for(|p| p.resolved_below > last.0)
            .await
            .map_err(|_| RecorderError::Closed)?;
        if first.0 < p.forgotten_below {
            return Err(self.error("the spool write failed"));
        }
        match p
            .failures
            .iter()
            .find(|(f, l, _)| *f <= last.0 && *l >= first.0)
        {
            None => Ok(()),
            Some((_, _, why)) => Err(self.error(why)),
        }
    }

    /// Whether the event of `ticket` is known durable now (`Some(Ok)`), failed (`Some(Err)`),
    /// or still being written (`None`).
    pub fn status(&self, ticket: Ticket) -> Option<Result<(), RecorderError>> {
        let p = self.shared.progress.borrow();
        if p.resolved_below <= ticket.0 {
            return None;
        }
        Some(match failure_of(&p, ticket.0) {
            None => Ok(()),
            Some(why) => Err(self.error(why)),
        })
    }

    /// Watches the writer's progress (e.g. for failed groups).
    pub(crate) fn progress(&self) -> watch::Receiver<Progress> {
        self.shared.progress.subscribe()
    }

    /// Resolves when events were written since the last call (for the shipper).
    pub(crate) fn written(&self) -> &Notify {
        &self.shared.written
    }

    /// Up to `limit` durable, unacknowledged events after id `after`, oldest first: from memory when they
    /// are still there, else from the segment files.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Bytes)>, RecorderError> {
        let mut out = Vec::new();
        // What the store acknowledged is never sent again.
        let mut after = after.max(lock(&self.shared.segments).acked);
        while out.len() < limit {
            let floor = {
                let cache = lock(&self.shared.cache);
                if after + 1 >= cache.floor {
                    // Everything durable from `after + 1` on is in memory.
                    'chunks: for chunk in &cache.chunks {
                        if chunk.last <= after {
                            continue;
                        }
                        for (id, body) in frames(&chunk.frames) {
                            if id > after {
                                out.push((id, body));
                                if out.len() >= limit {
                                    break 'chunks;
                                }
                            }
                        }
                    }
                    return Ok(out);
                }
                cache.floor
            };
            match self.read_disk(after, limit - out.len(), floor, &mut out)? {
                DiskStop::Limit | DiskStop::NotDurable => return Ok(out),
                // Every id below `floor` was read (ids missing from the files are those of a
                // failed write): go on from memory, or from disk again if memory moved on.
                DiskStop::Floor | DiskStop::End => {
                    after = after.max(out.last().map_or(0, |e| e.0)).max(floor - 1);
                }
            }
        }
        Ok(out)
    }

    fn read_disk(
        &self,
        after: u64,
        limit: usize,
        floor: u64,
        out: &mut Vec<(u64, Bytes)>,
    ) -> Result<DiskStop, RecorderError> {
        let resolved = self.shared.progress.borrow().resolved_below;
        let list = lock(&self.shared.segments).list.clone();
        let cursor = *lock(&self.shared.cursor);
        // Start at the cursor if it is where this read begins, else at the start of the
        // last segment that begins at or before `after + 1`.
        let (mut index, mut offset) = match cursor
            .filter(|(next, _, _)| *next == after + 1)
            .and_then(|(_, first, offset)| {
                list.iter()
                    .position(|(f, _)| *f == first)
                    .map(|i| (i, offset))
            }) {
            Some(at) => at,
            None => (
                list.iter()
                    .rposition(|(first, _)| *first <= after + 1)
                    .unwrap_or(0),
                0,
            ),
        };
        let mut taken = 0;
        while index < list.len() {
            let (first, path) = &list[index];
            let mut file = match File::open(path) {
                Ok(f) => f,
                // Deleted meanwhile (acknowledged): go on with the next.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    index += 1;
                    offset = 0;
                    continue;
                }
                Err(e) => return Err(self.error(format!("{}: {e}", path.display()))),
            };
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| self.error(e))?;
            let mut reader = std::io::BufReader::with_capacity(256 << 10, file);
            // Up to the end of what is readable in this segment.
            while let Ok(Some((id, body))) = read_frame(&mut reader) {
                if id >= floor {
                    return Ok(DiskStop::Floor);
                }
                if id >= resolved {
                    return Ok(DiskStop::NotDurable);
                }
                offset += (HEADER + body.len()) as u64;
                if id > after {
                    out.push((id, Bytes::from(body)));
                    *lock(&self.shared.cursor) = Some((id + 1, *first, offset));
                    taken += 1;
                    if taken >= limit {
                        return Ok(DiskStop::Limit);
                    }
                }
            }
            index += 1;
            offset = 0;
        }
        Ok(DiskStop::End)
    }

    /// Forgets everything through `id`, `count` events: the store has acknowledged them.
    pub fn acknowledge_through(&self, id: u64, count: u64) -> Result<(), RecorderError> {
        self.advance(id, count)
    }

    fn advance(&self, id: u64, count: u64) -> Result<(), RecorderError> {
        let mut deleted = Vec::new();
        {
            let mut s = lock(&self.shared.segments);
            if id <= s.acked {
                return Ok(());
            }
            s.acked = id;
            let mut record = [0u8; 16];
            record[..8].copy_from_slice(&id.to_le_bytes());
            let mut crc = Crc32c::new();
            crc.update(&record[..8]);
            record[8..12].copy_from_slice(&crc.finish().to_le_bytes());
            s.ack_file
                .write_all_at(&record, 0)
                .map_err(|e| self.error(format!("acked: {e}")))?;
            // A segment is done when the next one starts at or before `id + 1`; the last
            // one is being written and stays.
            while s.list.len() > 1 && s.list[1].0 <= id + 1 {
                deleted.push(s.list.remove(0).1);
            }
        }
        for path in deleted {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an acknowledged spool segment");
            }
        }
        {
            let mut cache = lock(&self.shared.cache);
            while cache.chunks.front().is_some_and(|c| c.last <= id) {
                if let Some(c) = cache.chunks.pop_front() {
                    cache.bytes -= c.frames.len();
                    cache.floor = cache.floor.max(c.last + 1);
                }
            }
        }
        self.shared
            .backlog
            .send_modify(|n| *n = n.saturating_sub(count));
        Ok(())
    }

    /// Moves the store-refused events `events` (ids through `last`) aside, so they neither
    /// block the spool nor vanish: they stay in `rejected.log` for an operator.
    pub fn reject(&self, events: &[(u64, Bytes)], reason: &str) -> Result<(), RecorderError> {
        let Some(last) = events.last().map(|e| e.0) else {
            return Ok(());
        };
        {
            let mut s = lock(&self.shared.segments);
            let mut buf = Vec::new();
            for (_, body) in events {
                let id = s.rejected_count + 1;
                push_frame(&mut buf, id, &rejected_record(reason, body));
                s.rejected_count += 1;
            }
            s.rejected
                .write_all(&buf)
                .and_then(|()| s.rejected.sync_data())
                .map_err(|e| self.error(format!("rejected.log: {e}")))?;
        }
        self.advance(last, events.len() as u64)
    }

    /// Events queued or spooled and not yet acknowledged.
    pub fn len(&self) -> u64 {
        *self.shared.backlog.borrow()
    }

    /// Whether everything spooled has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Watches the backlog going down as the store acknowledges, e.g. to wait until it
    /// reaches zero; events queued raise it without a notification.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.backlog.subscribe()
    }

    /// Events the store refused, kept aside.
    pub fn rejected(&self) -> u64 {
        lock(&self.shared.segments).rejected_count
    }
}

/// Why a read from the segment files stopped.
enum DiskStop {
    Limit,
    /// At an event not yet durable.
    NotDurable,
    /// At an event that memory holds.
    Floor,
    /// At the end of the files.
    End,
}

fn failure_of(p: &Progress, id: u64) -> Option<String> {
    if id < p.forgotten_below {
        return Some("the spool write failed".into());
    }
    p.failures
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&id))
        .map(|(_, _, why)| why.clone())
}

fn error(path: &str, e: impl std::fmt::Display) -> RecorderError {
    RecorderError::Spool {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn push_frame(buf: &mut Vec<u8>, id: u64, body: &[u8]) {
    let mut crc = Crc32c::new();
    crc.update(&id.to_le_bytes());
    crc.update(body);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finish().to_le_bytes());
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(body);
}

/// Reads one frame; `Ok(None)` at a clean end or at anything that is not a whole, valid
/// frame (a torn tail).
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let mut header = [0u8; HEADER];
    if !read_full(r, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let mut id_bytes = [0u8; 8];
    id_bytes.copy_from_slice(&header[8..16]);
    let id = u64::from_le_bytes(id_bytes);
    if header == [0u8; HEADER] || len > EVENT_MAX.max(1 << 20) + 4096 {
        // Zeros: the preallocated rest of the segment.
        return Ok(None);
    }
    let mut body = vec![0u8; len];
    if !read_full(r, &mut body)? {
        return Ok(None);
    }
    let mut c = Crc32c::new();
    c.update(&id_bytes);
    c.update(&body);
    if c.finish() != crc {
        return Ok(None);
    }
    Ok(Some((id, body)))
}

/// Fills `buf`; false if the input ended first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Ok(false),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The frames of a written chunk (valid by construction).
fn frames(buf: &Bytes) -> impl Iterator<Item = (u64, Bytes)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at + HEADER > buf.len() {
            return None;
        }
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[at + 8..at + 16]);
        let start = at + HEADER;
        let end = (start + len).min(buf.len());
        at = end;
        Some((u64::from_le_bytes(id), buf.slice(start..end)))
    })
}

/// Writes a whole segment of `bodies` with ids from `first` (used to take over an old spool).
pub(crate) fn write_segment(dir: &Path, first: u64, bodies: &[&[u8]]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        push_frame(&mut buf, first + i as u64, body);
    }
    let mut f = File::create(dir.join(segment_name(first)))?;
    f.write_all(&buf)?;
    f.sync_all()
}

/// Writes `rejected.log` with (reason, event) records (used to take over an old spool).
pub(crate) fn write_rejected(dir: &Path, events: &[(&str, &[u8])]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for (i, (reason, body)) in events.iter().enumerate() {
        push_frame(&mut buf, i as u64 + 1, &rejected_record(reason, body));
    }
    let mut f = File::create(dir.join("rejected.log"))?;
    f.write_all(&buf)?;
    f.sync_all()
}

fn rejected_record(reason: &str, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + reason.len() + body.len());
    frame.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    frame.extend_from_slice(reason.as_bytes());
    frame.extend_from_slice(body);
    frame
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Scans one segment: (valid frames, last id, readable length), truncating a torn tail.
fn recover_segment(path: &Path, after: u64) -> std::io::Result<(u64, Option<u64>, u64)> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let size = file.metadata()?.len();
    let mut reader = std::io::BufReader::with_capacity(256 << 10, &mut file);
    let (mut count, mut last, mut offset) = (0u64, None::<u64>, 0u64);
    while let Some((id, body)) = read_frame(&mut reader)? {
        if last.is_some_and(|l| id <= l) {
            break;
        }
        offset += (HEADER + body.len()) as u64;
        last = Some(id);
        if id > after {
            count += 1;
        }
    }
    drop(reader);
    let mut next = [0u8; HEADER];
    let preallocated = offset < size
        && file
            .read_exact_at(&mut next, offset)
            .is_ok_and(|()| next == [0u8; HEADER]);
    if preallocated {
        // The zeros the writer put ahead of its frames: the segment is closed now.
        file.set_len(offset)?;
        file.sync_all()?;
    } else if offset < size {
        tracing::warn!(
            segment = %path.display(),
            kept = offset,
            dropped = size - offset,
            "spool segment ends in an incomplete or damaged frame (a write cut short by a crash); truncating it there"
        );
        file.set_len(offset)?;
        file.sync_all()?;
    }
    Ok((count, last, offset))
}

fn open_blocking(path: &Path, sync_interval: std::time::Duration) -> Result<Spool, RecorderError> {
    let display = path.display().to_string();
    let err = |e: &dyn std::fmt::Display| error(&display, e);
    std::fs::create_dir_all(path).map_err(|e| err(&e))?;
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path.join("lock"))
        .map_err(|e| err(&e))?;
    // A previous owner in this process may still be writing its last group: give it a moment.
    let mut tries = 0;
    loop {
        match lock_file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => {
                return Err(err(&format!(
                    "the spool is in use by another recorder ({e})"
                )));
            }
        }
    }

    let mut ack_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path.join("acked"))
        .map_err(|e| err(&e))?;
    let mut record = [0u8; 16];
    let acked = match ack_file.read_exact(&mut record) {
        Ok(()) => {
            let mut c = Crc32c::new();
            c.update(&record[..8]);
            let crc = u32::from_le_bytes([record[8], record[9], record[10], record[11]]);
            let mut id = [0u8; 8];
            id.copy_from_slice(&record[..8]);
            if c.finish() == crc {
                u64::from_le_bytes(id)
            } else {
                tracing::warn!(spool = %path.display(), "spool acknowledgement record damaged; resending everything spooled (the store drops duplicates)");
                0
            }
        }
        Err(_) => 0,
    };

    let mut list: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| err(&e))? {
        let entry = entry.map_err(|e| err(&e))?;
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        list.push((first, entry.path()));
    }
    list.sort();
    let mut backlog = 0u64;
    let mut last_id = acked;
    let mut keep = Vec::new();
    for (first, seg) in list {
        let (n, last, _) = recover_segment(&seg, acked).map_err(|e| err(&e))?;
        last_id = last_id.max(last.unwrap_or(0));
        let done = last.is_none_or(|l| l <= acked);
        if done {
            // Wholly acknowledged, or empty: a new segment is started below anyway.
            std::fs::remove_file(&seg).map_err(|e| err(&e))?;
            continue;
        }
        backlog += n;
        keep.push((first, seg));
    }
    let next_id = last_id + 1;
    let current = path.join(segment_name(next_id));
    let segment = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&current)
        .map_err(|e| err(&e))?;
    keep.push((next_id, current));

    let rejected_path = path.join("rejected.log");
    let mut rejected_count = 0;
    if let Ok(f) = File::open(&rejected_path) {
        let mut r = std::io::BufReader::new(f);
        while let Ok(Some(_)) = read_frame(&mut r) {
            rejected_count += 1;
        }
    }
    let rejected = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&rejected_path)
        .map_err(|e| err(&e))?;
    sync_dir(path).map_err(|e| err(&e))?;

    ack_file.seek(SeekFrom::Start(0)).map_err(|e| err(&e))?;
    let shared = Arc::new(Shared {
        dir: path.to_owned(),
        display: display.clone(),
        queue: Mutex::new(Queue {
            pending: Vec::with_capacity(64 << 10),
            pending_events: 0,
            next_id,
            closed: false,
        }),
        wake_writer: Condvar::new(),
        room: Notify::new(),
        progress: watch::Sender::new(Progress {
            resolved_below: next_id,
            ..Default::default()
        }),
        backlog: watch::Sender::new(backlog),
        cache: Mutex::new(Cache {
            floor: next_id,
            chunks: VecDeque::new(),
            bytes: 0,
        }),
        segments: Mutex::new(Segments {
            list: keep,
            acked,
            ack_file,
            rejected,
            rejected_count,
        }),
        written: Notify::new(),
        cursor: Mutex::new(None),
        _lock: lock_file,
    });
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("audit-spool".into())
        .spawn(move || write_loop(writer, segment, next_id, sync_interval))
        .map_err(|e| err(&e))?;
    Ok(Spool {
        _closer: Arc::new(Closer(shared.clone())),
        shared,
    })
}

/// The writer thread: takes everything queued, appends it with one write, fdatasyncs, then
/// tells the waiters and the shipper. Ends when the spool is dropped and the queue is empty.
fn write_loop(
    shared: Arc<Shared>,
    mut segment: File,
    mut segment_first: u64,
    sync_interval: std::time::Duration,
) {
    // Bytes of frames in the segment, and bytes of it written (frames, then zeros).
    let mut size = 0u64;
    let mut allocated = 0u64;
    let mut spare: Vec<u8> = Vec::with_capacity(64 << 10);
    // After a failed write the segment's tail is unknown: the next group starts a new one.
    let mut broken = false;
    let mut last_sync: Option<std::time::Instant> = None;
    loop {
        let (buf, first, events) = {
            let mut q = lock(&shared.queue);
            while q.pending_events == 0 && !q.closed {
                q = shared
                    .wake_writer
                    .wait(q)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if q.pending_events == 0 {
                // Closed and empty: a clean close leaves no zeros behind.
                if !broken {
                    let _ = segment.set_len(size);
                }
                return;
            }
            // Group commit: right after a sync, let more events join this group (unless the
            // queue is already large, or the spool is closing).
            if let Some(at) = last_sync {
                let until = at + sync_interval;
                loop {
                    let now = std::time::Instant::now();
                    if now >= until || q.closed || q.pending.len() >= PENDING_MAX / 4 {
                        break;
                    }
                    q = shared
                        .wake_writer
                        .wait_timeout(q, until - now)
                        .map(|(q, _)| q)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
            let events = q.pending_events;
            let first = q.next_id - events;
            q.pending_events = 0;
            spare.clear();
            (std::mem::replace(&mut q.pending, spare), first, events)
        };
        shared.room.notify_waiters();
        let last = first + events - 1;
        let result = (|| -> std::io::Result<()> {
            if broken || size >= SEGMENT_MAX {
                if !broken {
                    // Closed: its zeros go. Not worth failing a group for: a crash, or a
                    // failure here, only leaves them for recovery to cut.
                    let _ = segment.set_len(size);
                }
                let path = shared.dir.join(segment_name(first));
                segment = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&path)?;
                sync_dir(&shared.dir)?;
                lock(&shared.segments).list.push((first, path));
                segment_first = first;
                size = 0;
                allocated = 0;
                broken = false;
            }
            let end = size + buf.len() as u64;
            if end > allocated {
                allocated = preallocate(&segment, allocated, end.next_multiple_of(PREALLOCATE))?;
            }
            segment.write_all_at(&buf, size)?;
            last_sync = Some(std::time::Instant::now());
            segment.sync_data()
        })();
        match result {
            Ok(()) => {
                size += buf.len() as u64;
                let frames = Bytes::from(buf);
                {
                    let mut cache = lock(&shared.cache);
                    cache.bytes += frames.len();
                    cache.chunks.push_back(Chunk { last, frames });
                    while cache.bytes > CACHE_MAX && cache.chunks.len() > 1 {
                        if let Some(c) = cache.chunks.pop_front() {
                            cache.bytes -= c.frames.len();
                            cache.floor = c.last + 1;
                        }
                    }
                }
                shared.progress.send_modify(|p| p.resolved_below = last + 1);
                shared.written.notify_one();
                spare = Vec::with_capacity(64 << 10);
            }
            Err(e) => {
                broken = true;
                let why = format!(
                    "writing {} events to segment {} failed: {e}",
                    events,
                    segment_name(segment_first)
                );
                tracing::error!(spool = %shared.display, error = %why, "audit spool write failed");
                {
                    // Nothing of this group is served from memory, and the shipper does not
                    // wait for it: later chunks start past it.
                    let mut cache = lock(&shared.cache);
                    if cache.chunks.is_empty() {
                        cache.floor = last + 1;
                    }
                }
                shared
                    .backlog
                    .send_modify(|n| *n = n.saturating_sub(events));
                shared.progress.send_modify(|p| {
                    p.resolved_below = last + 1;
                    p.failed_groups += 1;
                    p.failures.push_back((first, last, why));
                    while p.failures.len() > FAILURES_KEPT {
                        if let Some((_, l, _)) = p.failures.pop_front() {
                            p.forgotten_below = l + 1;
                        }
                    }
                });
                let mut b = buf;
                b.clear();
                spare = b;
            }
        }
    }
}

/// Writes zeros to `file` from `from` to `to`; returns `to`. Zeros written, not a hole or
/// an unwritten extent (`fallocate`): overwriting those would change the file's metadata
/// again at every fdatasync.
fn preallocate(file: &File, from: u64, to: u64) -> std::io::Result<u64> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(to)
}

/// CRC-32C (Castagnoli) of a frame, fed in parts. The `crc32c` crate uses the CPU's CRC
/// instruction where there is one (SSE 4.2, ARMv8), which matters as every event is summed
/// once when queued and again when read back.
struct Crc32c(u32);

impl Crc32c {
    fn new() -> Self {
        Crc32c(0)
    }

    fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }

    fn finish(&self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until the writer of a dropped spool has finished (it holds the lock until then).
    fn wait_closed(path: &Path) {
        let lock = File::open(path.join("lock")).expect("lock file");
        for _ in 0..500 {
            if lock.try_lock().is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the spool's writer did not finish");
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xE306_9283);
        // Split anywhere, long or short: the same as bytewise.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut bytewise = Crc32c::new();
        for b in &data {
            bytewise.update(std::slice::from_ref(b));
        }
        let mut split = Crc32c::new();
        split.update(&data[..13]);
        split.update(&data[13..]);
        assert_eq!(bytewise.finish(), split.finish());
    }

    #[tokio::test]
    async fn survives_reopen_and_acknowledges_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool");
        {
            let spool = Spool::open(&path).await.expect("open");
            for i in 0..5u8 {
                spool.append(&[i]).await.expect("append");
            }
        }
        let spool = Spool::open(&path).await.expect("reopen");
        assert_eq!(spool.len(), 5);
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        spool.acknowledge_through(rows[2].0, 3).expect("ack");
        assert_eq!(spool.len(), 2);
        spool.reject(&rows[3..4], "bad").expect("reject");
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.rejected(), 1);
        drop(spool);

        // What was acknowledged or rejected does not come back; the rest does.
        let spool = Spool::open(&path).await.expect("reopen");
        assert_eq!(spool.len(), 1);
        assert_eq!(spool.rejected(), 1);
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(), vec![4]);
        // New events follow, served from memory after the disk.
        spool.append(&[5]).await.expect("append");
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(), vec![4, 5]);
        let after = rows[0].0;
        let rows = spool.read_after(after, 10).expect("read");
        assert_eq!(rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(), vec![5]);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool");
        {
            let spool = Spool::open(&path).await.expect("open");
            for i in 0..3u8 {
                spool.append(&[i; 100]).await.expect("append");
            }
        }
        wait_closed(&path);
        let segment = std::fs::read_dir(&path)
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.extension().is_some_and(|x| x == "seg")
                    && std::fs::metadata(p).is_ok_and(|m| m.len() > 0)
            })
            .expect("a segment with the events");
        let full = std::fs::metadata(&segment).expect("meta").len();
        // A crash mid-write: half of a fourth frame, then garbage in the middle of another.
        {
            let mut f = OpenOptions::new()
                .append(true)
                .open(&segment)
                .expect("open");
            let mut frame = Vec::new();
            push_frame(&mut frame, 4, &[9u8; 100]);
            f.write_all(&frame[..60]).expect("write");
        }
        let spool = Spool::open(&path).await.expect("reopen");
        assert_eq!(spool.len(), 3);
        assert_eq!(std::fs::metadata(&segment).expect("meta").len(), full);
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // New events get ids after the recovered ones and are read in order.
        spool.append(&[3u8; 10]).await.expect("append");
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
        drop(spool);
        wait_closed(&path);

        // A flipped bit in the last frame: its CRC fails, it is cut, the first two stay.
        {
            let mut bytes = std::fs::read(&segment).expect("read");
            let n = bytes.len();
            bytes[n - 1] ^= 0x40;
            std::fs::write(&segment, bytes).expect("write");
        }
        let spool = Spool::open(&path).await.expect("reopen");
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
    }

    #[tokio::test]
    async fn zeros_ahead_of_the_frames_are_cut_on_recovery_and_nothing_is_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool");
        let spool = Spool::open(&path).await.expect("open");
        for i in 0..3u8 {
            spool.append(&[i; 100]).await.expect("append");
        }
        let segment = std::fs::read_dir(&path)
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .expect("the live segment");
        // While open, the segment is frames and then zeros up to a whole preallocation.
        let image = std::fs::read(&segment).expect("read");
        let frames = 3 * (HEADER + 100);
        assert_eq!(image.len() as u64, PREALLOCATE);
        assert!(image[frames..].iter().all(|b| *b == 0));
        drop(spool);
        wait_closed(&path);
        // A clean close cuts the zeros.
        assert_eq!(
            std::fs::metadata(&segment).expect("meta").len(),
            frames as u64
        );

        // A crash leaves them: recovery cuts them quietly and keeps every frame.
        std::fs::write(&segment, &image).expect("restore the crash image");
        let spool = Spool::open(&path).await.expect("reopen");
        assert_eq!(spool.len(), 3);
        assert_eq!(
            std::fs::metadata(&segment).expect("meta").len(),
            frames as u64
        );
        let rows = spool.read_after(0, 10).expect("read");
        assert_eq!(
            rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // A frame cut short inside the zeros is a torn tail like any other.
        drop(spool);
        wait_closed(&path);
        let mut torn = image.clone();
        let mut frame = Vec::new();
        push_frame(&mut frame, 4, &[9u8; 100]);
        torn[frames..frames + 60].copy_from_slice(&frame[..60]);
        std::fs::write(&segment, &torn).expect("write the torn image");
        let spool = Spool::open(&path).await.expect("reopen");
        assert_eq!(spool.len(), 3);
        assert_eq!(
            std::fs::metadata(&segment).expect("meta").len(),
            frames as u64
        );
    }

    #[tokio::test]
    async fn queued_events_are_written_in_groups_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(&dir.path().join("spool")).await.expect("open");
        let mut tickets = Vec::new();
        for i in 0..2000u32 {
            spool.reserve().await.expect("room");
            tickets.push(spool.queue(&[b"ev", &i.to_le_bytes()]).expect("queue"));
        }
        for t in &tickets {
            spool.durable(*t).await.expect("durable");
        }
        assert_eq!(spool.len(), 2000);
        let rows = spool.read_after(0, 5000).expect("read");
        assert_eq!(rows.len(), 2000);
        for (i, (_, body)) in rows.iter().enumerate() {
            assert_eq!(&body[..2], b"ev");
            assert_eq!(&body[2..], &(i as u32).to_le_bytes());
        }
        spool.acknowledge_through(rows[1999].0, 2000).expect("ack");
        assert!(spool.is_empty());
    }
}
