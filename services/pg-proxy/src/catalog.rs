//! Where a result column comes from: RowDescription gives a table OID and a column number;
//! the catalog turns them into `schema.table.column`, the name masking rules are written
//! against. Resolved on a connection of the proxy's own (never the agent's, whose
//! transaction state must not change) and cached, so a table costs one lookup per minute.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_pgwire::{CommandComplete, DataRow, ErrorFields, FrameCodec, FrameReader, Query};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::upstream::{self, UpstreamTarget};

/// How long a table's column names are trusted: a rename shows within this time.
const TTL: Duration = Duration::from_secs(60);
/// Most tables cached per connection.
const MAX_TABLES: usize = 10_000;

/// A table's qualified name and its columns by attribute number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumns {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Column names by attribute number (index = attnum; index 0 unused).
    pub columns: Vec<Option<String>>,
}

impl TableColumns {
    /// The name of attribute `attnum`, if it exists.
    pub fn column(&self, attnum: i16) -> Option<&str> {
        usize::try_from(attnum)
            .ok()
            .and_then(|i| self.columns.get(i))
            .and_then(|c| c.as_deref())
    }
}

/// When a table was looked up, and what was found (`None`: not a table the user sees).
type CacheEntry = (Instant, Option<Arc<TableColumns>>);

/// The column-origin cache of one upstream connection, shared by its sessions.
pub struct Catalog {
    target: UpstreamTarget,
    conn: Mutex<Option<crate::stream::Stream>>,
    cache: std::sync::Mutex<HashMap<u32, CacheEntry>>,
}

impl Catalog {
    /// A catalog that logs in as `target` when it first needs to.
    pub fn new(target: UpstreamTarget) -> Catalog {
        Catalog {
            target,
            conn: Mutex::new(None),
            cache: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, oid: u32) -> Option<Option<Arc<TableColumns>>> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(&oid)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, t)| t.clone())
    }

    /// The tables behind `oids`; an OID that is not a table (or that the upstream user cannot
    /// see) maps to `None`. Fails when the catalog cannot be read: the caller then masks
    /// every column of unknown origin with the strictest plan (fail closed).
    pub async fn tables(
        &self,
        oids: &[u32],
    ) -> Result<HashMap<u32, Option<Arc<TableColumns>>>, String> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for &oid in oids {
            if oid == 0 || out.contains_key(&oid) {
                continue;
            }
            match self.cached(oid) {
                Some(t) => {
                    out.insert(oid, t);
                }
                None => missing.push(oid),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        missing.sort_unstable();
        missing.dedup();
        let fetched = self.fetch(&missing).await?;
        let now = Instant::now();
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() + missing.len() > MAX_TABLES {
                cache.clear();
            }
            for oid in &missing {
                let t = fetched.get(oid).cloned().map(Arc::new);
                cache.insert(*oid, (now, t.clone()));
                out.insert(*oid, t);
            }
        }
        Ok(out)
    }

    /// The result columns `sql` would return, as the server describes them (Parse and
    /// Describe on the proxy's own connection: nothing runs). For COPY TO STDOUT, whose
    /// rows come without a RowDescription.
    pub async fn describe(
        &self,
        sql: &str,
    ) -> Result<Vec<agentgate_pgwire::FieldDescription>, String> {
        let mut parse = Vec::with_capacity(sql.len() + 4);
        parse.push(0);
        parse.extend_from_slice(sql.as_bytes());
        parse.push(0);
        parse.extend_from_slice(&0i16.to_be_bytes());
        let mut request = Vec::new();
        request.extend_from_slice(agentgate_pgwire::Frame::new(b'P', &parse).raw());
        request.extend_from_slice(agentgate_pgwire::Frame::new(b'D', b"S\0").raw());
        request.extend_from_slice(agentgate_pgwire::build::sync().raw());
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let up = upstream::connect(&self.target, &[])
                .await
                .map_err(|e| e.to_string())?;
            *guard = Some(up.stream);
        }
        let Some(stream) = guard.as_mut() else {
            return Err("catalog unavailable".into());
        };
        let result = async {
            stream
                .write_all(&request)
                .await
                .map_err(|e| e.to_string())?;
            let mut reader = FrameReader::new(&mut *stream, FrameCodec::new(16 * 1024 * 1024));
            let mut fields = Vec::new();
            let mut error = None;
            loop {
                let frame = reader
                    .read_frame()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("catalog connection closed")?;
                match frame.tag() {
                    b'T' => {
                        fields = agentgate_pgwire::RowDescription::parse(&frame)
                            .map_err(|e| e.to_string())?
                            .fields
                    }
                    b'E' => {
                        error = Some(
                            ErrorFields::parse(&frame)
                                .map_err(|e| e.to_string())?
                                .message,
                        )
                    }
                    b'Z' => break,
                    _ => {}
                }
            }
            match error {
                Some(e) => Err(e),
                None => Ok(fields),
            }
        }
        .await;
        if result.is_err() {
            // A broken connection is replaced next time; an SQL error leaves it usable,
            // but a fresh one costs little and is always in a known state.
            *guard = None;
        }
        result
    }

    async fn fetch(&self, oids: &[u32]) -> Result<HashMap<u32, TableColumns>, String> {
        let list = oids
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(",");
        // Only integers are interpolated: the OIDs come from the server, formatted here.
        let sql = format!(
            "SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attrelid IN ({list}) AND a.attnum > 0 AND NOT a.attisdropped"
        );
        let mut guard = self.conn.lock().await;
        for attempt in 0..2 {
            if guard.is_none() {
                let up = upstream::connect(&self.target, &[])
                    .await
                    .map_err(|e| e.to_string())?;
                *guard = Some(up.stream);
            }
            let Some(stream) = guard.as_mut() else {
                continue;
            };
            match run_query(stream, &sql).await {
                Ok(rows) => return Ok(tables_from_rows(rows)),
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "catalog connection failed; reconnecting");
                    *guard = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err("catalog unavailable".into())
    }
}

fn tables_from_rows(rows: Vec<Vec<Option<String>>>) -> HashMap<u32, TableColumns> {
    let mut out: HashMap<u32, TableColumns> = HashMap::new();
    for row in rows {
        let [oid, schema, table, attnum, name] = row.as_slice() else {
            continue;
        };
        let (Some(oid), Some(schema), Some(table), Some(attnum), Some(name)) = (
            oid.as_deref().and_then(|o| o.parse::<u32>().ok()),
            schema,
            table,
            attnum.as_deref().and_then(|a| a.parse::<usize>().ok()),
            name,
        ) else {
            continue;
        };
        let entry = out.entry(oid).or_insert_with(|| TableColumns {
            schema: schema.clone(),
            table: table.clone(),
            columns: Vec::new(),
        });
        if entry.columns.len() <= attnum {
            entry.columns.resize(attnum + 1, None);
        }
        entry.columns[attnum] = Some(name.clone());
    }
    out
}

/// Runs one simple query on the proxy's own connection and returns its rows as text.
async fn run_query(
    stream: &mut crate::stream::Stream,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    stream
        .write_all(Query::frame(sql).raw())
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(stream, FrameCodec::new(16 * 1024 * 1024));
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let frame = reader
            .read_frame()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("catalog connection closed")?;
        match frame.tag() {
            b'D' => {
                let row = DataRow::parse(&frame).map_err(|e| e.to_string())?;
                rows.push(
                    row.cells
                        .iter()
                        .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                );
            }
            b'C' => {
                CommandComplete::parse(&frame).map_err(|e| e.to_string())?;
            }
            b'E' => {
                error = Some(
                    ErrorFields::parse(&frame)
                        .map_err(|e| e.to_string())?
                        .message,
                )
            }
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}
