//! Column names from `RowDescription`'s table OID and column number, looked up on a side
//! connection to the upstream and cached per connection. Aliases cannot hide a column from its
//! masking rule: `SELECT ssn AS x FROM users` still describes column `users.ssn`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::upstream::{self, Target, Upstream};
use super::wire::{Body, WireError};

/// One table's name (`schema.table`) and its columns by number.
#[derive(Debug, Default, Clone)]
pub struct TableInfo {
    pub name: String,
    pub columns: HashMap<i16, String>,
}

#[derive(Default)]
struct ConnCache {
    tables: HashMap<u32, Arc<TableInfo>>,
    side: Option<Upstream>,
}

/// Per-connection caches of table descriptions.
#[derive(Default)]
pub struct Catalog {
    conns: parking_lot::Mutex<HashMap<String, Arc<Mutex<ConnCache>>>>,
}

impl Catalog {
    /// Names for these table OIDs (unknown OIDs are looked up; dropped tables are absent).
    pub async fn tables(
        &self,
        target: &Target,
        oids: &[u32],
    ) -> Result<HashMap<u32, Arc<TableInfo>>, String> {
        let cache = self
            .conns
            .lock()
            .entry(target.conn.clone())
            .or_default()
            .clone();
        let mut c = cache.lock().await;
        let missing: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| *o != 0 && !c.tables.contains_key(o))
            .collect();
        if !missing.is_empty() {
            let found = match lookup(&mut c, target, &missing).await {
                Ok(f) => f,
                Err(e) => {
                    // Drop the side connection; the next lookup opens a fresh one.
                    c.side = None;
                    return Err(e);
                }
            };
            for oid in &missing {
                // Remember misses too (a table dropped since), so a hot query does not look up
                // again and again; a placeholder has no columns.
                c.tables
                    .insert(*oid, Arc::new(found.get(oid).cloned().unwrap_or_default()));
            }
        }
        Ok(oids
            .iter()
            .filter_map(|o| c.tables.get(o).map(|t| (*o, t.clone())))
            .collect())
    }

    /// Forget a connection's cache (its definition changed).
    pub fn forget(&self, conn: &str) {
        self.conns.lock().remove(conn);
    }
}

async fn lookup(
    c: &mut ConnCache,
    target: &Target,
    oids: &[u32],
) -> Result<HashMap<u32, TableInfo>, String> {
    if c.side.is_none() {
        let up = upstream::connect(
            target,
            &[("application_name".into(), "custos-catalog".into())],
        )
        .await
        .map_err(|e| e.to_string())?;
        c.side = Some(up);
    }
    let up = c.side.as_mut().expect("side connection just opened");
    let list = oids
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // OIDs are numbers we formatted ourselves: nothing from a client reaches this text.
    let sql = format!(
        "SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE c.oid IN ({list})\0"
    );
    up.writer.msg(b'Q', sql.as_bytes());
    up.writer.flush().await.map_err(|e| e.to_string())?;
    let mut out: HashMap<u32, TableInfo> = HashMap::new();
    let mut error = None;
    loop {
        let h = up.reader.header().await.map_err(|e| e.to_string())?;
        let body = up.reader.body(h.len).await.map_err(|e| e.to_string())?;
        match h.tag {
            b'D' => {
                let row = parse_row(&body).map_err(|e| e.to_string())?;
                let [Some(oid), Some(ns), Some(rel), Some(num), Some(att)] = row.as_slice() else {
                    continue;
                };
                let (Ok(oid), Ok(num)) = (oid.parse::<u32>(), num.parse::<i16>()) else {
                    continue;
                };
                let t = out.entry(oid).or_default();
                t.name = format!("{ns}.{rel}");
                t.columns.insert(num, att.clone());
            }
            b'E' => error = Some(super::wire::parse_error(&body).message),
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(format!("catalog lookup failed: {e}")),
        None => Ok(out),
    }
}

fn parse_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let mut b = Body::new(body);
    let n = b.i16()?;
    (0..n)
        .map(|_| Ok(b.value()?.map(|v| String::from_utf8_lossy(v).into_owned())))
        .collect()
}
