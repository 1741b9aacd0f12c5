//! RocksDB storage: the Raft log and the replicated state machine, in one database.
//!
//! ```text
//!  column family   key                      value
//!  raft            vote|committed|purged    bincode
//!  logs            index (u64 BE)           bincode Entry<TypeConfig>
//!  sm              applied|membership|…     bincode
//!  audit           seq (u64 BE)             AuditRecord (protobuf)
//!  audit_ids       event id                 seq (u64 BE)          — exactly-once dedupe
//!  parked          n (u64 BE)               JSON {reason, bus_seq, bytes_hex}
//!  policies        version (u64 BE)         PolicySet (protobuf)
//!  connections     name                     bincode StoredConnection (credentials sealed)
//!  tokens          token id                 bincode StoredToken (hash only)
//!  approvals       approval id (UUIDv7)     Approval (protobuf)
//!  approvals_open  approval id              expires_unix_nano (i64 BE) — pending ones only
//!  grants          grant id                 Grant (protobuf)
//!  snapshot        "current"                bincode StoredSnapshot
//! ```
//!
//! Applying a batch of entries writes one RocksDB `WriteBatch` that also moves `applied`, so a
//! crash never leaves an entry half applied: on restart openraft re-applies from `applied`.

// openraft's trait methods return `StorageError`, a large type we do not choose.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use custos_core::audit::{next_record, ChainVerifier, GENESIS_HASH};
use custos_proto::v1::{event::Payload, Approval, AuditRecord, Event, Grant, PolicySet};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use prost::Message;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::approvals;
use crate::types::{
    Command, IngestItem, Node, NodeId, Response, StoredConnection, StoredToken, TypeConfig,
};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const CF_RAFT: &str = "raft";
const CF_LOGS: &str = "logs";
const CF_SM: &str = "sm";
const CF_AUDIT: &str = "audit";
const CF_AUDIT_IDS: &str = "audit_ids";
const CF_PARKED: &str = "parked";
const CF_POLICIES: &str = "policies";
const CF_CONNECTIONS: &str = "connections";
const CF_TOKENS: &str = "tokens";
const CF_SNAPSHOT: &str = "snapshot";
const CF_APPROVALS: &str = "approvals";
const CF_APPROVALS_OPEN: &str = "approvals_open";
const CF_GRANTS: &str = "grants";

/// The column families whose contents make up the state machine (and so a snapshot).
const SM_CFS: &[&str] = &[
    CF_SM,
    CF_AUDIT,
    CF_AUDIT_IDS,
    CF_PARKED,
    CF_POLICIES,
    CF_CONNECTIONS,
    CF_TOKENS,
    CF_APPROVALS,
    CF_APPROVALS_OPEN,
    CF_GRANTS,
];

const K_APPLIED: &[u8] = b"applied";
const K_MEMBERSHIP: &[u8] = b"membership";
const K_HEAD: &[u8] = b"audit_head";
const K_REVISION: &[u8] = b"revision";
const K_PARKED: &[u8] = b"parked_count";
const K_POLICY_VERSION: &[u8] = b"policy_version";
/// Highest bus stream sequence applied (0: none yet, or an in-process bus).
const K_BUS_HIGH: &[u8] = b"bus_high";
/// Events lost before ingest (sum of recorded [`Command::BusGap`] lengths).
const K_LOST: &[u8] = b"lost_count";

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn from_be(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(a)
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Write, e)
}

/// A change the edges must hear about, or a full resync after a snapshot was installed.
#[derive(Debug, Clone)]
pub enum StateChange {
    Policy(PolicySet),
    ConnectionUpserted(String),
    ConnectionDeleted(String),
    Token(String),
    Approval(Approval),
    Grant(Grant),
    Resync,
}

/// The shared, read-side handle on the database. gRPC handlers read through it concurrently with
/// the state machine's writes.
#[derive(Debug)]
pub struct Store {
    db: DB,
    /// Committed audit records, in order, as they are applied.
    pub audit_tx: broadcast::Sender<AuditRecord>,
    /// Revision-numbered configuration changes, for EdgeSync.
    pub changes_tx: broadcast::Sender<(u64, StateChange)>,
}

/// The audit head: last sequence number and its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: Vec<u8>,
}

impl Default for AuditHead {
    fn default() -> Self {
        AuditHead {
            seq: 0,
            hash: GENESIS_HASH.to_vec(),
        }
    }
}

/// Outcome of verifying the local copy of the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub checked: u64,
    pub fault: Option<(u64, &'static str)>,
    pub head_hash: Vec<u8>,
    pub parked: u64,
    /// Events lost before ingest: the log is known to be incomplete when above 0.
    pub lost: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

impl Store {
    /// Open (or create) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Store>, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_RAFT, CF_LOGS, CF_SNAPSHOT]
            .iter()
            .chain(SM_CFS.iter())
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let (audit_tx, _) = broadcast::channel(16_384);
        let (changes_tx, _) = broadcast::channel(1024);
        Ok(Arc::new(Store {
            db,
            audit_tx,
            changes_tx,
        }))
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, cf: &str, key: &[u8]) -> StorageResult<Option<T>> {
        match self.db.get_cf(self.cf(cf), key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(read_err),
        }
    }

    // ----- read side used by the services -------------------------------------------------

    pub fn audit_head(&self) -> AuditHead {
        self.get(CF_SM, K_HEAD).ok().flatten().unwrap_or_default()
    }

    pub fn revision(&self) -> u64 {
        self.get(CF_SM, K_REVISION).ok().flatten().unwrap_or(0)
    }

    pub fn parked_count(&self) -> u64 {
        self.get(CF_SM, K_PARKED).ok().flatten().unwrap_or(0)
    }

    /// The highest bus stream sequence applied to the log (0 when none is known).
    pub fn bus_high(&self) -> u64 {
        self.get(CF_SM, K_BUS_HIGH).ok().flatten().unwrap_or(0)
    }

    /// Events the bus acknowledged but lost before ingest (see [`Command::BusGap`]).
    pub fn lost_count(&self) -> u64 {
        self.get(CF_SM, K_LOST).ok().flatten().unwrap_or(0)
    }

    /// Audit records with seq in `[from, ..]`, at most `limit`, in order.
    pub fn audit_range(&self, from: u64, limit: usize) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_AUDIT),
            IteratorMode::From(&be(from), Direction::Forward),
        );
        for item in it {
            let Ok((_, v)) = item else { break };
            if let Ok(r) = AuditRecord::decode(&*v) {
                out.push(r);
            }
            if out.len() >= limit {
                break;
            }
        }
        out
    }

    pub fn audit_seq_of(&self, event_id: &str) -> Option<u64> {
        self.db
            .get_cf(self.cf(CF_AUDIT_IDS), event_id.as_bytes())
            .ok()
            .flatten()
            .map(|v| from_be(&v))
    }

    /// Walk the whole local chain and report the first fault.
    pub fn verify(&self) -> VerifyOutcome {
        // One snapshot for the records and the head: records applied while the walk runs must
        // not make the head claim more than the walk saw.
        let snap = self.db.snapshot();
        let claimed_head = snap
            .get_cf(self.cf(CF_SM), K_HEAD)
            .ok()
            .flatten()
            .and_then(|v| bincode::deserialize::<AuditHead>(&v).ok())
            .unwrap_or_default()
            .seq;
        let mut v = ChainVerifier::new();
        let mut fault = None;
        for item in snap.iterator_cf(self.cf(CF_AUDIT), IteratorMode::Start) {
            let (k, val) = match item {
                Ok(kv) => kv,
                Err(_) => {
                    fault = Some((v.checked() + 1, "undecodable"));
                    break;
                }
            };
            if let Err((seq, f)) = v.push_raw(from_be(&k), &val) {
                fault = Some((seq, f.as_str()));
                break;
            }
        }
        if fault.is_none() {
            if let Err((seq, f)) = v.finish(claimed_head) {
                fault = Some((seq, f.as_str()));
            }
        }
        VerifyOutcome {
            checked: v.checked(),
            fault,
            head_hash: v.head_hash().to_vec(),
            parked: self.parked_count(),
            lost: snap
                .get_cf(self.cf(CF_SM), K_LOST)
                .ok()
                .flatten()
                .and_then(|v| bincode::deserialize::<u64>(&v).ok())
                .unwrap_or(0),
        }
    }

    /// The parked (malformed) events: (n, JSON description).
    pub fn parked(&self) -> Vec<(u64, String)> {
        self.db
            .iterator_cf(self.cf(CF_PARKED), IteratorMode::Start)
            .filter_map(|i| i.ok())
            .map(|(k, v)| (from_be(&k), String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    pub fn policy(&self, version: u64) -> Option<PolicySet> {
        let version = if version == 0 {
            self.get::<u64>(CF_SM, K_POLICY_VERSION).ok().flatten()?
        } else {
            version
        };
        let v = self
            .db
            .get_cf(self.cf(CF_POLICIES), be(version))
            .ok()
            .flatten()?;
        PolicySet::decode(&*v).ok()
    }

    pub fn connection(&self, name: &str) -> Option<StoredConnection> {
        self.get(CF_CONNECTIONS, name.as_bytes()).ok().flatten()
    }

    pub fn connections(&self) -> Vec<StoredConnection> {
        self.db
            .iterator_cf(self.cf(CF_CONNECTIONS), IteratorMode::Start)
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| bincode::deserialize(&v).ok())
            .collect()
    }

    pub fn token(&self, id: &str) -> Option<StoredToken> {
        self.get(CF_TOKENS, id.as_bytes()).ok().flatten()
    }

    pub fn tokens(&self) -> Vec<StoredToken> {
        self.db
            .iterator_cf(self.cf(CF_TOKENS), IteratorMode::Start)
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| bincode::deserialize(&v).ok())
            .collect()
    }

    pub fn approval(&self, id: &str) -> Option<Approval> {
        let v = self
            .db
            .get_cf(self.cf(CF_APPROVALS), id.as_bytes())
            .ok()
            .flatten()?;
        Approval::decode(&*v).ok()
    }

    /// Approval requests, newest first, optionally only in one state.
    pub fn approvals(&self, state: Option<&str>, limit: usize) -> Vec<Approval> {
        if state == Some(crate::approvals::PENDING) {
            let mut v: Vec<Approval> = self
                .open_approvals()
                .into_iter()
                .filter_map(|(id, _)| self.approval(&id))
                .collect();
            v.reverse();
            v.truncate(limit);
            return v;
        }
        self.db
            .iterator_cf(self.cf(CF_APPROVALS), IteratorMode::End)
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| Approval::decode(&*v).ok())
            .filter(|a| state.is_none_or(|s| a.state == s))
            .take(limit)
            .collect()
    }

    /// Pending approvals with their deadlines, oldest first.
    pub fn open_approvals(&self) -> Vec<(String, i64)> {
        self.db
            .iterator_cf(self.cf(CF_APPROVALS_OPEN), IteratorMode::Start)
            .filter_map(|i| i.ok())
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), from_be(&v) as i64))
            .collect()
    }

    pub fn grant(&self, id: &str) -> Option<Grant> {
        let v = self
            .db
            .get_cf(self.cf(CF_GRANTS), id.as_bytes())
            .ok()
            .flatten()?;
        Grant::decode(&*v).ok()
    }

    pub fn grants(&self) -> Vec<Grant> {
        self.db
            .iterator_cf(self.cf(CF_GRANTS), IteratorMode::Start)
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| Grant::decode(&*v).ok())
            .collect()
    }

    /// Test and operations aid: the raw key/value of an audit record, to demonstrate tampering.
    pub fn raw_audit_put(&self, seq: u64, bytes: Option<&[u8]>) -> Result<(), rocksdb::Error> {
        match bytes {
            Some(b) => self.db.put_cf(self.cf(CF_AUDIT), be(seq), b),
            None => self.db.delete_cf(self.cf(CF_AUDIT), be(seq)),
        }
    }

    pub fn flush(&self) -> Result<(), rocksdb::Error> {
        self.db.flush_wal(true)
    }
}

// ===== Raft log ==============================================================================

/// The Raft log store.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<Store>,
}

impl LogStore {
    pub fn new(store: Arc<Store>) -> Self {
        LogStore { store }
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        self.store.get(CF_RAFT, key)
    }

    fn put_meta<T: Serialize>(
        &self,
        key: &[u8],
        v: &T,
        sync: bool,
        subject: ErrorSubject<NodeId>,
    ) -> StorageResult<()> {
        let bytes =
            bincode::serialize(v).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.store
            .db
            .put_cf_opt(self.store.cf(CF_RAFT), key, bytes, &wo)
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(x) => *x,
            std::ops::Bound::Excluded(x) => *x + 1,
            std::ops::Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let it = self.store.db.iterator_cf(
            self.store.cf(CF_LOGS),
            IteratorMode::From(&be(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let idx = from_be(&k);
            if !range.contains(&idx) {
                break;
            }
            let entry: Entry<TypeConfig> = bincode::deserialize(&v)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last = match self
            .store
            .db
            .iterator_cf(self.store.cf(CF_LOGS), IteratorMode::End)
            .next()
        {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let e: Entry<TypeConfig> = bincode::deserialize(&v)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(e.log_id)
            }
        };
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(b"purged")?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(b"vote", vote, true, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta(b"vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_meta(b"committed", &committed, false, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.meta::<Option<LogId<NodeId>>>(b"committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = bincode::serialize(&entry)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.put_cf(self.store.cf(CF_LOGS), be(entry.log_id.index), bytes);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let res = self
            .store
            .db
            .write_opt(batch, &wo)
            .map_err(std::io::Error::other);
        let ret = res.as_ref().map(|_| ()).map_err(|e| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other(e.to_string()),
            )
        });
        callback.log_io_completed(res);
        ret
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.store
            .db
            .delete_range_cf(self.store.cf(CF_LOGS), be(log_id.index), be(u64::MAX))
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.put_meta(b"purged", &log_id, true, ErrorSubject::Store)?;
        self.store
            .db
            .delete_range_cf(self.store.cf(CF_LOGS), be(0), be(log_id.index + 1))
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

// ===== State machine =========================================================================

/// The replicated state machine.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<Store>,
}

/// Notifications collected while applying, sent only after the batch is durable in RocksDB.
#[derive(Default)]
struct Pending {
    records: Vec<AuditRecord>,
    changes: Vec<(u64, StateChange)>,
}

/// The in-flight view of the mutable counters during one `apply` call.
struct Cursor_ {
    head: AuditHead,
    revision: u64,
    parked: u64,
    policy_version: u64,
    bus_high: u64,
    lost: u64,
    /// Ids appended in this batch (not yet visible in RocksDB).
    batch_ids: HashMap<String, u64>,
}

impl StateMachine {
    pub fn new(store: Arc<Store>) -> Self {
        StateMachine { store }
    }

    fn append_audit(
        &self,
        wb: &mut WriteBatch,
        cur: &mut Cursor_,
        pending: &mut Pending,
        committed: i64,
        id: &str,
        data: Vec<u8>,
    ) -> bool {
        if cur.batch_ids.contains_key(id) || self.store.audit_seq_of(id).is_some() {
            return false;
        }
        let seq = cur.head.seq + 1;
        let rec = next_record(seq, committed, &cur.head.hash, id, data);
        wb.put_cf(self.store.cf(CF_AUDIT), be(seq), rec.encode_to_vec());
        wb.put_cf(self.store.cf(CF_AUDIT_IDS), id.as_bytes(), be(seq));
        cur.head = AuditHead {
            seq,
            hash: rec.hash.clone(),
        };
        cur.batch_ids.insert(id.to_string(), seq);
        pending.records.push(rec);
        true
    }

    fn park(&self, wb: &mut WriteBatch, cur: &mut Cursor_, item: &IngestItem, reason: &str) {
        cur.parked += 1;
        let doc = serde_json::json!({
            "reason": reason,
            "bus_seq": item.bus_seq,
            "bytes_hex": hex::encode(&item.data[..item.data.len().min(4096)]),
            "len": item.data.len(),
        });
        wb.put_cf(self.store.cf(CF_PARKED), be(cur.parked), doc.to_string());
    }

    /// Append a control-plane event (already encoded by the proposer) to the chain.
    fn append_own_event(
        &self,
        wb: &mut WriteBatch,
        cur: &mut Cursor_,
        pending: &mut Pending,
        committed: i64,
        event: &[u8],
    ) {
        if let Ok(e) = Event::decode(event) {
            self.append_audit(wb, cur, pending, committed, &e.id, event.to_vec());
        }
    }

    fn apply_command(
        &self,
        wb: &mut WriteBatch,
        cur: &mut Cursor_,
        pending: &mut Pending,
        cmd: Command,
    ) -> Response {
        match cmd {
            Command::Ingest {
                committed_unix_nano,
                items,
            } => {
                let (mut appended, mut duplicates, mut parked) = (0, 0, 0);
                for item in items {
                    cur.bus_high = cur.bus_high.max(item.bus_seq);
                    match custos_core::events::decode_checked(&item.data) {
                        Ok(event) => {
                            if self.append_audit(
                                wb,
                                cur,
                                pending,
                                committed_unix_nano,
                                &event.id,
                                item.data,
                            ) {
                                appended += 1;
                            } else {
                                duplicates += 1;
                            }
                        }
                        Err(e) => {
                            self.park(wb, cur, &item, &e.to_string());
                            parked += 1;
                        }
                    }
                }
                Response::Ingested {
                    appended,
                    duplicates,
                    parked,
                    head_seq: cur.head.seq,
                }
            }
            Command::BusGap {
                from,
                to,
                detail,
                committed_unix_nano,
            } => {
                let lost = to.saturating_sub(from) + 1;
                cur.lost += lost;
                cur.parked += 1;
                cur.bus_high = cur.bus_high.max(to);
                let doc = serde_json::json!({
                    "reason": format!(
                        "lost before ingest: the bus acknowledged stream sequences {from}..={to} \
                         ({lost} events) but the consumer never delivered them and the stream no \
                         longer holds them ({detail})"
                    ),
                    "kind": "lost_before_ingest",
                    "bus_seq": from,
                    "bus_seq_to": to,
                    "committed_unix_nano": committed_unix_nano,
                });
                wb.put_cf(self.store.cf(CF_PARKED), be(cur.parked), doc.to_string());
                Response::None
            }
            Command::ApplyPolicy {
                text,
                description,
                author,
                expected_version,
                applied_unix_nano,
                event,
            } => {
                if expected_version != 0 && expected_version != cur.policy_version {
                    return Response::VersionConflict {
                        current: cur.policy_version,
                    };
                }
                cur.policy_version += 1;
                cur.revision += 1;
                let set = PolicySet {
                    version: cur.policy_version,
                    sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())),
                    text,
                    author,
                    description,
                    applied_unix_nano,
                };
                wb.put_cf(
                    self.store.cf(CF_POLICIES),
                    be(set.version),
                    set.encode_to_vec(),
                );
                self.append_own_event(wb, cur, pending, applied_unix_nano, &event);
                pending
                    .changes
                    .push((cur.revision, StateChange::Policy(set)));
                Response::PolicyVersion(cur.policy_version)
            }
            Command::PutConnection {
                mut conn,
                keep_secrets,
                event,
                committed_unix_nano,
            } => {
                if keep_secrets {
                    if let Some(old) = self.store.connection(&conn.name) {
                        for (k, v) in old.sealed_secrets {
                            conn.sealed_secrets.entry(k).or_insert(v);
                        }
                    }
                }
                cur.revision += 1;
                conn.revision = cur.revision;
                let bytes = bincode::serialize(&conn).expect("StoredConnection serializes");
                wb.put_cf(self.store.cf(CF_CONNECTIONS), conn.name.as_bytes(), bytes);
                self.append_own_event(wb, cur, pending, committed_unix_nano, &event);
                pending
                    .changes
                    .push((cur.revision, StateChange::ConnectionUpserted(conn.name)));
                Response::Revision(cur.revision)
            }
            Command::DeleteConnection {
                name,
                event,
                committed_unix_nano,
            } => {
                if self.store.connection(&name).is_none() {
                    return Response::NotFound;
                }
                cur.revision += 1;
                wb.delete_cf(self.store.cf(CF_CONNECTIONS), name.as_bytes());
                self.append_own_event(wb, cur, pending, committed_unix_nano, &event);
                pending
                    .changes
                    .push((cur.revision, StateChange::ConnectionDeleted(name)));
                Response::Revision(cur.revision)
            }
            Command::IssueToken {
                token,
                event,
                committed_unix_nano,
            } => {
                cur.revision += 1;
                let bytes = bincode::serialize(&token).expect("StoredToken serializes");
                wb.put_cf(self.store.cf(CF_TOKENS), token.token_id.as_bytes(), bytes);
                self.append_own_event(wb, cur, pending, committed_unix_nano, &event);
                pending
                    .changes
                    .push((cur.revision, StateChange::Token(token.token_id)));
                Response::Revision(cur.revision)
            }
            Command::RevokeToken { token_id } => {
                let Some(mut t) = self.store.token(&token_id) else {
                    return Response::NotFound;
                };
                t.revoked = true;
                cur.revision += 1;
                wb.put_cf(
                    self.store.cf(CF_TOKENS),
                    token_id.as_bytes(),
                    bincode::serialize(&t).expect("serializes"),
                );
                pending
                    .changes
                    .push((cur.revision, StateChange::Token(token_id)));
                Response::Revision(cur.revision)
            }
            Command::CreateApproval { approval, event_id } => {
                let Ok(a) = Approval::decode(&*approval) else {
                    return Response::Refused("undecodable approval request".into());
                };
                if self.store.approval(&a.id).is_some() {
                    return Response::Refused(format!("approval {} already exists", a.id));
                }
                let ev = approvals::event(
                    &event_id,
                    a.created_unix_nano,
                    &a.edge_id,
                    &a,
                    &a.identity,
                    approvals::requested_payload(&a),
                );
                self.put_approval(wb, cur, pending, &a);
                self.append_own_event(wb, cur, pending, a.created_unix_nano, &ev.encode_to_vec());
                Response::Approval(a.encode_to_vec())
            }
            Command::DecideApproval {
                id,
                approver,
                approver_groups,
                approve,
                comment,
                grant_seconds,
                now_unix_nano,
                event_id,
                grant_id,
            } => {
                let Some(mut a) = self.store.approval(&id) else {
                    return Response::Refused(approvals::Refusal::Unknown(id).to_string());
                };
                let v = approvals::Vote {
                    approver: &approver,
                    groups: &approver_groups,
                    approve,
                    comment: &comment,
                    grant_seconds,
                    now: now_unix_nano,
                };
                let grant = match approvals::vote(&mut a, &v, &grant_id) {
                    Err(r) => return Response::Refused(r.to_string()),
                    Ok(approvals::Transition::Approved { grant }) => grant.map(|g| *g),
                    Ok(_) => None,
                };
                // The grant first: an edge that sees the approval also finds its grant.
                if let Some(g) = &grant {
                    self.put_grant(wb, cur, pending, g);
                }
                self.put_approval(wb, cur, pending, &a);
                let ev = approvals::event(
                    &event_id,
                    now_unix_nano,
                    approvals::SOURCE,
                    &a,
                    &approver,
                    approvals::decided_payload(&a, &approver, grant.as_ref()),
                );
                self.append_own_event(wb, cur, pending, now_unix_nano, &ev.encode_to_vec());
                Response::Approval(a.encode_to_vec())
            }
            Command::CloseApproval {
                id,
                state,
                reason,
                now_unix_nano,
                event_id,
            } => {
                let Some(mut a) = self.store.approval(&id) else {
                    return Response::Refused(approvals::Refusal::Unknown(id).to_string());
                };
                if state != approvals::EXPIRED && state != approvals::CANCELLED {
                    return Response::Refused(format!("cannot close an approval as {state:?}"));
                }
                if !approvals::close(&mut a, &state, &reason, now_unix_nano) {
                    return Response::Approval(a.encode_to_vec());
                }
                self.put_approval(wb, cur, pending, &a);
                let ev = approvals::event(
                    &event_id,
                    now_unix_nano,
                    if state == approvals::CANCELLED {
                        &a.edge_id
                    } else {
                        approvals::SOURCE
                    },
                    &a,
                    "",
                    approvals::decided_payload(&a, "", None),
                );
                self.append_own_event(wb, cur, pending, now_unix_nano, &ev.encode_to_vec());
                Response::Approval(a.encode_to_vec())
            }
            Command::UseGrant {
                grant_id,
                identity,
                connection,
                text_sha256,
                command_id,
                now_unix_nano,
                event_id,
                edge_id,
                session_id,
            } => {
                let Some(mut g) = self.store.grant(&grant_id) else {
                    return Response::Refused(format!("no grant with id {grant_id}"));
                };
                if let Err(r) = approvals::use_one_shot(
                    &mut g,
                    &identity,
                    &connection,
                    &text_sha256,
                    now_unix_nano,
                ) {
                    return Response::Refused(r.to_string());
                }
                self.put_grant(wb, cur, pending, &g);
                let ev = Event {
                    id: event_id,
                    time_unix_nano: now_unix_nano,
                    edge_id,
                    session_id,
                    identity,
                    connection,
                    payload: Some(Payload::GrantUsed(custos_proto::v1::GrantUsed {
                        grant_id: g.id.clone(),
                        approval_id: g.approval_id.clone(),
                        kind: g.kind.clone(),
                        command_id,
                        action: g.actions.join(","),
                    })),
                };
                self.append_own_event(wb, cur, pending, now_unix_nano, &ev.encode_to_vec());
                Response::Grant(g.encode_to_vec())
            }
            Command::RevokeGrant {
                grant_id,
                by,
                now_unix_nano,
                event_id,
            } => {
                let Some(mut g) = self.store.grant(&grant_id) else {
                    return Response::Refused(format!("no grant with id {grant_id}"));
                };
                if g.revoked {
                    return Response::Grant(g.encode_to_vec());
                }
                g.revoked = true;
                g.revoked_by = by.clone();
                self.put_grant(wb, cur, pending, &g);
                let ev = Event {
                    id: event_id,
                    time_unix_nano: now_unix_nano,
                    edge_id: approvals::SOURCE.into(),
                    session_id: String::new(),
                    identity: by.clone(),
                    connection: g.connection.clone(),
                    payload: Some(Payload::GrantRevoked(custos_proto::v1::GrantRevoked {
                        grant_id: g.id.clone(),
                        approval_id: g.approval_id.clone(),
                        revoked_by: by,
                    })),
                };
                self.append_own_event(wb, cur, pending, now_unix_nano, &ev.encode_to_vec());
                Response::Grant(g.encode_to_vec())
            }
        }
    }

    /// Store an approval (keeping the open index in step) and tell the edges.
    fn put_approval(
        &self,
        wb: &mut WriteBatch,
        cur: &mut Cursor_,
        pending: &mut Pending,
        a: &Approval,
    ) {
        wb.put_cf(
            self.store.cf(CF_APPROVALS),
            a.id.as_bytes(),
            a.encode_to_vec(),
        );
        if a.state == approvals::PENDING {
            wb.put_cf(
                self.store.cf(CF_APPROVALS_OPEN),
                a.id.as_bytes(),
                be(a.expires_unix_nano as u64),
            );
        } else {
            wb.delete_cf(self.store.cf(CF_APPROVALS_OPEN), a.id.as_bytes());
        }
        cur.revision += 1;
        pending
            .changes
            .push((cur.revision, StateChange::Approval(a.clone())));
    }

    fn put_grant(&self, wb: &mut WriteBatch, cur: &mut Cursor_, pending: &mut Pending, g: &Grant) {
        wb.put_cf(self.store.cf(CF_GRANTS), g.id.as_bytes(), g.encode_to_vec());
        cur.revision += 1;
        pending
            .changes
            .push((cur.revision, StateChange::Grant(g.clone())));
    }

    fn snapshot_data(&self) -> StorageResult<Vec<u8>> {
        let mut all: Vec<(u8, Vec<u8>, Vec<u8>)> = Vec::new();
        for (i, cf) in SM_CFS.iter().enumerate() {
            for item in self
                .store
                .db
                .iterator_cf(self.store.cf(cf), IteratorMode::Start)
            {
                let (k, v) =
                    item.map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
                all.push((i as u8, k.to_vec(), v.to_vec()));
            }
        }
        bincode::serialize(&all).map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
    }

    fn put_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        let bytes = bincode::serialize(snap).map_err(write_err)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.store
            .db
            .put_cf_opt(self.store.cf(CF_SNAPSHOT), b"current", bytes, &wo)
            .map_err(|e| {
                io_err(
                    ErrorSubject::Snapshot(Some(snap.meta.signature())),
                    ErrorVerb::Write,
                    e,
                )
            })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // A consistent view: the state machine is only written by `apply`, which does not run
        // concurrently with this builder's reads of a RocksDB snapshot.
        let (applied, membership) = self.applied_state().await?;
        let data = self.snapshot_data()?;
        let snapshot_id = match applied {
            Some(l) => format!(
                "{}-{}-{}",
                l.leader_id,
                l.index,
                custos_core::events::now_unix_nano()
            ),
            None => format!("--{}", custos_core::events::now_unix_nano()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.put_snapshot(&stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let applied: Option<LogId<NodeId>> = self
            .store
            .get::<Option<LogId<NodeId>>>(CF_SM, K_APPLIED)?
            .flatten();
        let membership = self.store.get(CF_SM, K_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut wb = WriteBatch::default();
        let mut pending = Pending::default();
        let mut cur = Cursor_ {
            head: self.store.audit_head(),
            revision: self.store.revision(),
            parked: self.store.parked_count(),
            policy_version: self.store.get(CF_SM, K_POLICY_VERSION)?.unwrap_or(0),
            bus_high: self.store.get(CF_SM, K_BUS_HIGH)?.unwrap_or(0),
            lost: self.store.get(CF_SM, K_LOST)?.unwrap_or(0),
            batch_ids: HashMap::new(),
        };
        let mut replies = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Response::None),
                EntryPayload::Normal(cmd) => {
                    replies.push(self.apply_command(&mut wb, &mut cur, &mut pending, cmd))
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    replies.push(Response::None);
                }
            }
        }
        let sm = self.store.cf(CF_SM);
        wb.put_cf(sm, K_APPLIED, ser(&last_applied));
        if let Some(m) = &membership {
            wb.put_cf(sm, K_MEMBERSHIP, ser(m));
        }
        wb.put_cf(sm, K_HEAD, ser(&cur.head));
        wb.put_cf(sm, K_REVISION, ser(&cur.revision));
        wb.put_cf(sm, K_PARKED, ser(&cur.parked));
        wb.put_cf(sm, K_POLICY_VERSION, ser(&cur.policy_version));
        wb.put_cf(sm, K_BUS_HIGH, ser(&cur.bus_high));
        wb.put_cf(sm, K_LOST, ser(&cur.lost));
        self.store
            .db
            .write(wb)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        for rec in pending.records {
            let _ = self.store.audit_tx.send(rec);
        }
        for change in pending.changes {
            let _ = self.store.changes_tx.send(change);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let all: Vec<(u8, Vec<u8>, Vec<u8>)> = bincode::deserialize(&data).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        let mut wb = WriteBatch::default();
        for cf in SM_CFS {
            let h = self.store.cf(cf);
            for item in self.store.db.iterator_cf(h, IteratorMode::Start) {
                let (k, _) =
                    item.map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
                wb.delete_cf(h, k);
            }
        }
        for (i, k, v) in all {
            let Some(cf) = SM_CFS.get(i as usize) else {
                continue;
            };
            wb.put_cf(self.store.cf(cf), k, v);
        }
        // The snapshot's own applied/membership are authoritative.
        let sm = self.store.cf(CF_SM);
        wb.put_cf(
            sm,
            K_APPLIED,
            bincode::serialize(&meta.last_log_id).map_err(write_err)?,
        );
        wb.put_cf(
            sm,
            K_MEMBERSHIP,
            bincode::serialize(&meta.last_membership).map_err(write_err)?,
        );
        self.store
            .db
            .write(wb)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        self.put_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        let _ = self
            .store
            .changes_tx
            .send((self.store.revision(), StateChange::Resync));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let snap: Option<StoredSnapshot> = self.store.get(CF_SNAPSHOT, b"current")?;
        Ok(snap.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// Open a store and return the two halves openraft needs.
pub fn open(dir: &Path) -> Result<(Arc<Store>, LogStore, StateMachine), rocksdb::Error> {
    let store = Store::open(dir)?;
    Ok((
        store.clone(),
        LogStore::new(store.clone()),
        StateMachine::new(store),
    ))
}

/// bincode of plain data (cannot fail for the types stored here).
fn ser<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("plain data serializes")
}

/// Convert stored connections to the EdgeSync / admin wire form.
pub fn connection_to_proto(
    c: &StoredConnection,
    secrets: BTreeMap<String, String>,
) -> custos_proto::v1::Connection {
    custos_proto::v1::Connection {
        name: c.name.clone(),
        kind: c.kind.clone(),
        address: c.address.clone(),
        options: c.options.clone().into_iter().collect(),
        secrets: secrets.into_iter().collect(),
        revision: c.revision,
    }
}
