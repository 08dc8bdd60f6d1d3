//! The shared, bounded classification cache.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Classification, ClassifyError, SessionEffect, StatementClass, analyze, shape};

/// Classifies SQL and remembers the result by text, so that a statement an agent sends again
/// (an ORM's query, a prepared statement's text, a retry) is parsed once.
///
/// One `Classifier` is meant to be shared by every session of a proxy (`Arc<Classifier>`):
/// agents tend to repeat the same few hundred statements, across sessions as much as within
/// one. The classification of a text never depends on the session, so sharing is safe; what
/// does depend on the session (`EXECUTE` of a prepared statement) is resolved afterwards by
/// [`crate::PreparedStatements`].
///
/// The cache is bounded both in entries and in bytes, so that neither many small distinct
/// texts nor a few large ones grow it without limit. It is split into shards behind their own
/// locks so that sessions on different cores rarely wait for each other, and each shard
/// evicts in generations (recently used entries survive, the rest of the older generation is
/// dropped at once): an approximation of LRU with O(1) work per lookup. Failures are cached
/// too, so an agent retrying the same broken text does not make the proxy parse it again.
#[derive(Debug)]
pub struct Classifier {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters for a proxy's metrics: how well the cache does and how full it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to parse.
    pub misses: u64,
    /// Classifications held now.
    pub entries: usize,
    /// Approximate bytes held now (texts and classifications).
    pub bytes: usize,
}

type Cached = Result<Arc<Classification>, ClassifyError>;

#[derive(Debug, Default)]
struct Shard {
    current: HashMap<Box<str>, (Cached, usize)>,
    current_bytes: usize,
    previous: HashMap<Box<str>, (Cached, usize)>,
    previous_bytes: usize,
}

const SHARDS: usize = 16;

impl Classifier {
    /// The default entry bound: a few thousand distinct statements covers what an agent
    /// fleet repeats, at well under a megabyte for typical statement sizes.
    pub const DEFAULT_MAX_ENTRIES: usize = 4096;
    /// The default byte bound (texts plus classifications): large statements are cached
    /// too, but cannot make the cache hold more than this.
    pub const DEFAULT_MAX_BYTES: usize = 32 * 1024 * 1024;

    /// A classifier with the default bounds.
    pub fn new() -> Classifier {
        Classifier::with_limits(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_BYTES)
    }

    /// A classifier holding at most about `max_entries` classifications and `max_bytes`
    /// bytes. Zero for either disables caching (every call parses), which tests and
    /// memory-starved deployments may want.
    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Classifier {
        Classifier {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            max_entries_per_shard: max_entries.div_ceil(SHARDS),
            max_bytes_per_shard: max_bytes.div_ceil(SHARDS),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Classifies `sql` like [`crate::classify`], from the cache when this text was seen
    /// before. The `Arc` makes a hit a reference count increment, not a copy.
    ///
    /// `EXECUTE name` comes back as [`crate::risk::OPAQUE_CODE`] (the cache knows no
    /// session); pass the result through [`crate::PreparedStatements::resolve`], or call
    /// [`crate::PreparedStatements::classify`], to classify what it runs.
    pub fn classify(&self, sql: &str) -> Result<Arc<Classification>, ClassifyError> {
        if let Some(found) = self.lookup(sql) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return found;
        }
        // The same statement with other numbers: see crate::shape for when that is safe.
        let shape = shape::shape_key(sql);
        if let Some(key) = &shape
            && let Some(Ok(found)) = self.lookup(key)
            && let Some(adapted) = for_text(&found, sql)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::new(adapted));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Parse outside the lock: parsing is the slow part and sessions must not queue on it.
        let result = analyze::classify(sql).map(Arc::new);
        self.store(sql, &result);
        if let (Some(key), Ok(classification)) = (&shape, &result)
            && shape_independent(classification)
        {
            self.store(key, &result);
        }
        result
    }

    fn lookup(&self, key: &str) -> Option<Cached> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        lock(shard).get(key)
    }

    fn store(&self, key: &str, result: &Cached) {
        let size = key.len() + cost(result);
        if size <= self.max_bytes_per_shard / 2 && self.max_entries_per_shard > 0 {
            let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
            lock(shard).insert(
                key,
                result.clone(),
                size,
                self.max_entries_per_shard,
                self.max_bytes_per_shard,
            );
        }
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        let mut stats = CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            ..CacheStats::default()
        };
        for shard in &*self.shards {
            let shard = lock(shard);
            stats.entries += shard.current.len() + shard.previous.len();
            stats.bytes += shard.current_bytes + shard.previous_bytes;
        }
        stats
    }
}

/// Whether a classification holds for every text of the same shape: one plain `SELECT` or
/// `INSERT` that reads or writes and nothing else, with no session effect.
fn shape_independent(c: &Classification) -> bool {
    match c.statements.as_slice() {
        [s] => {
            matches!(s.command.as_str(), "SELECT" | "INSERT")
                && s.executes.is_empty()
                && matches!(s.session, SessionEffect::None)
                && s.risk_classes
                    .iter()
                    .all(|r| *r == crate::risk::READ || *r == crate::risk::WRITE)
        }
        _ => false,
    }
}

/// The cached classification of a same-shape text, with this text's own span and text.
fn for_text(found: &Classification, sql: &str) -> Option<Classification> {
    let [statement] = found.statements.as_slice() else {
        return None;
    };
    let trimmed_end = sql.trim_end().trim_end_matches(';').trim_end().len();
    let start = sql.len() - sql.trim_start().len();
    if start > trimmed_end {
        return None;
    }
    // Field by field, so the cached statement's own text is not copied only to be replaced.
    let statement = StatementClass {
        risk_classes: statement.risk_classes.clone(),
        command: statement.command.clone(),
        tables: statement.tables.clone(),
        span: start..trimmed_end,
        text: sql[start..trimmed_end].to_owned(),
        notes: statement.notes.clone(),
        copy_source: statement.copy_source.clone(),
        base: statement.base,
        executes: statement.executes.clone(),
        session: statement.session.clone(),
    };
    Some(Classification {
        statements: vec![statement],
    })
}

impl Default for Classifier {
    fn default() -> Classifier {
        Classifier::new()
    }
}

/// A poisoned shard only means another thread panicked while holding it; the maps are still
/// consistent (every mutation is a single insert or swap), so keep going.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Approximate heap bytes of a cached result.
fn cost(result: &Cached) -> usize {
    const OVERHEAD: usize = 128;
    match result {
        Ok(classification) => {
            OVERHEAD
                + classification
                    .statements
                    .iter()
                    .map(|statement| {
                        OVERHEAD
                            + statement.text.len()
                            + statement.command.len()
                            + statement.tables.iter().map(String::len).sum::<usize>()
                            + statement.executes.iter().map(String::len).sum::<usize>()
                            + 16 * (statement.risk_classes.len() + statement.notes.len())
                            + statement.session_cost()
                    })
                    .sum::<usize>()
        }
        Err(error) => OVERHEAD + error.to_string().len(),
    }
}

impl Shard {
    fn get(&mut self, sql: &str) -> Option<Cached> {
        if let Some((found, _)) = self.current.get(sql) {
            return Some(found.clone());
        }
        // Used again: promote to the current generation so it survives the next rotation.
        let (key, (found, size)) = self.previous.remove_entry(sql)?;
        self.previous_bytes -= size;
        self.current_bytes += size;
        self.current.insert(key, (found.clone(), size));
        Some(found)
    }

    fn insert(
        &mut self,
        sql: &str,
        result: Cached,
        size: usize,
        max_entries: usize,
        max_bytes: usize,
    ) {
        if self.current.contains_key(sql) {
            return;
        }
        // Each generation holds at most half the bounds, so both together stay within them.
        if self.current.len() + 1 > max_entries.div_ceil(2)
            || self.current_bytes + size > max_bytes / 2
        {
            self.previous = std::mem::take(&mut self.current);
            self.previous_bytes = std::mem::replace(&mut self.current_bytes, 0);
        }
        if let Some((_, old_size)) = self.previous.remove(sql) {
            self.previous_bytes -= old_size;
        }
        self.current.insert(sql.into(), (result, size));
        self.current_bytes += size;
    }
}
