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
//!  snapshot        "current_file"           bincode SnapshotRecord (meta + file name, no data)
//!                  "installing"             bincode SnapshotRecord — an install is under way
//! ```
//!
//! Applying a batch of entries writes one RocksDB `WriteBatch` that also moves `applied`, so a
//! crash never leaves an entry half applied: on restart openraft re-applies from `applied`.
//!
//! Snapshots are files in `<db>/snapshots/` (format in [`crate::snapshot`]), never held whole
//! in memory:
//!
//! ```text
//!  build     RocksDB snapshot ─iterate each SM CF─▶ build-*.tmp ─fsync, rename─▶ snap-*.snap
//!            ─▶ "current_file" (older snap-*.snap removed)
//!  receive   openraft chunks ─▶ recv-*.tmp (begin_receiving_snapshot)
//!  install   verify whole file (count, SHA-256, known CFs) ─▶ rename to snap-*.snap
//!            ─▶ "installing" (sync) ─▶ clear SM CFs ─▶ load in ~4 MiB WriteBatches
//!            ─▶ one synced batch: applied, membership, "current_file", delete "installing"
//!  open      "installing" present ─▶ redo the load from the kept file before openraft reads
//!            `applied`; stray temporaries and older files are removed
//! ```

// openraft's trait methods return `StorageError`, a large type we do not choose.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::approvals;
use crate::snapshot::{self, FormatError, Frame, SnapshotFile};
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

/// Before snapshot files: the current snapshot's meta and its whole data, in CF `snapshot`.
const K_SNAPSHOT_IN_DB: &[u8] = b"current";
const K_SNAPSHOT: &[u8] = b"current_file";
const K_INSTALLING: &[u8] = b"installing";
/// Table files RocksDB keeps open at most (see [`Store::open`]).
const MAX_OPEN_TABLE_FILES: i32 = 512;
const SNAPSHOT_DIR: &str = "snapshots";
/// An install writes the snapshot's records in RocksDB batches of about this many bytes.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Buffer for streaming snapshot files.
const FILE_BUFFER: usize = 1 << 20;

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
    /// Where snapshot files live (`<db>/snapshots`).
    snap_dir: PathBuf,
    /// Held while the set of snapshot files and `current_file` change, and while a file named
    /// by `current_file` is opened.
    snap_lock: parking_lot::Mutex<()>,
    /// Held for a whole install; a build takes its RocksDB snapshot under it, so it never sees
    /// a half-loaded state machine.
    install_lock: parking_lot::Mutex<()>,
    /// Makes temporary file names unique within this process.
    snap_seq: AtomicU64,
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

/// A snapshot as recorded in CF `snapshot`: its meta and its file in the snapshot directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub meta: SnapshotMeta<NodeId, Node>,
    /// File name inside the snapshot directory.
    pub file: String,
    pub records: u64,
    pub sha256: [u8; 32],
}

/// Why a snapshot could not be built, checked or installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(
        "snapshot holds column family {0:?}, which this node's state machine does not have \
         (built by a newer version?)"
    )]
    UnknownCf(String),
    #[error("snapshot file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("snapshot bookkeeping: {0}")]
    Encode(#[from] bincode::Error),
    /// Found before anything was changed: the state machine is as it was.
    #[error("snapshot refused, the state machine was not changed: {0}")]
    Refused(#[source] Box<SnapshotError>),
    /// The test hook of [`Store::install_snapshot_file`] stopped the load.
    #[error("snapshot install stopped after {0} records (test hook)")]
    Stopped(u64),
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("snapshot directory {path}: {source}")]
    SnapshotDir { path: PathBuf, source: io::Error },
    #[error(
        "an interrupted snapshot install could not be completed: {0}; this node's state \
         machine is incomplete: move its data directory aside and let it rejoin the cluster"
    )]
    Recover(#[source] SnapshotError),
    #[error("snapshot bookkeeping: {0}")]
    Snapshot(#[source] SnapshotError),
}

fn file_err(path: &Path) -> impl Fn(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a temporary file when dropped, unless kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Make a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))
}

impl Store {
    /// Open (or create) the database under `dir`, finishing an interrupted snapshot install.
    pub fn open(dir: &Path) -> Result<Arc<Store>, OpenError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // RocksDB keeps every table file open by default, and the audit log only grows: a node's
        // descriptors would follow its data forever (the soak saw 36 → 54 in 30 minutes). Past
        // this many, table files are closed and reopened through RocksDB's table cache.
        opts.set_max_open_files(MAX_OPEN_TABLE_FILES);
        let cfs = [CF_RAFT, CF_LOGS, CF_SNAPSHOT]
            .iter()
            .chain(SM_CFS.iter())
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let snap_dir = dir.join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&snap_dir).map_err(|source| OpenError::SnapshotDir {
            path: snap_dir.clone(),
            source,
        })?;
        let (audit_tx, _) = broadcast::channel(16_384);
        let (changes_tx, _) = broadcast::channel(1024);
        let store = Arc::new(Store {
            db,
            snap_dir,
            snap_lock: parking_lot::Mutex::new(()),
            install_lock: parking_lot::Mutex::new(()),
            snap_seq: AtomicU64::new(0),
            audit_tx,
            changes_tx,
        });
        store.open_snapshots()?;
        Ok(store)
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

// ===== Snapshot files ========================================================================

impl Store {
    /// The snapshot directory (`<db>/snapshots`).
    pub fn snapshot_dir(&self) -> &Path {
        &self.snap_dir
    }

    fn sm_cf(&self, name: &str) -> Result<&ColumnFamily, SnapshotError> {
        if SM_CFS.contains(&name) {
            Ok(self.cf(name))
        } else {
            Err(SnapshotError::UnknownCf(name.to_string()))
        }
    }

    fn snapshot_record(&self, key: &[u8]) -> Result<Option<SnapshotRecord>, SnapshotError> {
        match self.db.get_cf(self.cf(CF_SNAPSHOT), key)? {
            None => Ok(None),
            Some(v) => Ok(Some(bincode::deserialize(&v)?)),
        }
    }

    fn put_snapshot_record(&self, key: &[u8], rec: &SnapshotRecord) -> Result<(), SnapshotError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_SNAPSHOT), key, bincode::serialize(rec)?, &wo)?;
        Ok(())
    }

    /// The current snapshot's record, if any (operations and tests).
    pub fn current_snapshot_record(&self) -> Result<Option<SnapshotRecord>, SnapshotError> {
        self.snapshot_record(K_SNAPSHOT)
    }

    /// Whether a snapshot install is under way (or was interrupted and not yet redone).
    pub fn installing_snapshot(&self) -> bool {
        matches!(self.snapshot_record(K_INSTALLING), Ok(Some(_)))
    }

    /// A new, empty file in the snapshot directory, named `<prefix>-<time>-<n>.tmp`.
    fn new_temp_file(&self, prefix: &str) -> Result<(File, PathBuf), SnapshotError> {
        let n = self.snap_seq.fetch_add(1, Ordering::Relaxed);
        let now = custos_core::events::now_unix_nano();
        let path = self.snap_dir.join(format!("{prefix}-{now}-{n}.tmp"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(file_err(&path))?;
        Ok((file, path))
    }

    /// Rename a complete, synced temporary to its kept name and make that durable.
    fn keep_file(&self, tmp: &Path, index: Option<u64>) -> Result<String, SnapshotError> {
        let n = self.snap_seq.fetch_add(1, Ordering::Relaxed);
        let now = custos_core::events::now_unix_nano();
        let name = format!("snap-{}-{now}-{n}.snap", index.unwrap_or(0));
        let path = self.snap_dir.join(&name);
        std::fs::rename(tmp, &path).map_err(file_err(tmp))?;
        sync_dir(&self.snap_dir)?;
        Ok(name)
    }

    /// Remove snapshot files no record names. `all` also removes temporaries (only at open:
    /// later, a build or a receive may be writing one).
    fn prune_snapshot_files(&self, all: bool) -> Result<(), SnapshotError> {
        let keep: Vec<String> = [K_SNAPSHOT, K_INSTALLING]
            .iter()
            .filter_map(|k| self.snapshot_record(k).transpose())
            .map(|r| r.map(|r| r.file))
            .collect::<Result<_, _>>()?;
        let entries = std::fs::read_dir(&self.snap_dir).map_err(file_err(&self.snap_dir))?;
        for entry in entries {
            let entry = entry.map_err(file_err(&self.snap_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".snap") || (all && name.ends_with(".tmp"));
            if ours && !keep.contains(&name) {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(file = %name, error = %e, "cannot remove an old snapshot file");
                }
            }
        }
        Ok(())
    }

    /// At open: drop the old in-database snapshot, finish an interrupted install, forget a
    /// current snapshot whose file is gone, remove stray files.
    fn open_snapshots(&self) -> Result<(), OpenError> {
        let cf = self.cf(CF_SNAPSHOT);
        // Migration: the old format kept the whole snapshot data in this CF. It is dropped, not
        // converted: a snapshot can always be rebuilt from the state machine, and openraft
        // builds one at start when logs were purged and no snapshot is found.
        if self.db.get_pinned_cf(cf, K_SNAPSHOT_IN_DB)?.is_some() {
            tracing::info!("dropping the snapshot kept in the database by an older version");
            self.db.delete_cf(cf, K_SNAPSHOT_IN_DB)?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        if let Some(rec) = self
            .snapshot_record(K_INSTALLING)
            .map_err(OpenError::Recover)?
        {
            tracing::warn!(
                snapshot = %rec.meta.snapshot_id,
                file = %rec.file,
                "a snapshot install was interrupted; loading the snapshot again from its file"
            );
            let path = self.snap_dir.join(&rec.file);
            self.verify_snapshot_file(&path)
                .map_err(OpenError::Recover)?;
            self.load_snapshot(&rec, None).map_err(OpenError::Recover)?;
        }
        if let Some(rec) = self
            .snapshot_record(K_SNAPSHOT)
            .map_err(OpenError::Snapshot)?
        {
            if !self.snap_dir.join(&rec.file).exists() {
                tracing::warn!(
                    snapshot = %rec.meta.snapshot_id,
                    file = %rec.file,
                    "the current snapshot's file is missing; forgetting it (openraft rebuilds one)"
                );
                self.db.delete_cf(cf, K_SNAPSHOT)?;
            }
        }
        self.prune_snapshot_files(true).map_err(OpenError::Snapshot)
    }

    /// Read a snapshot file through: framing, record count, SHA-256 and column family names.
    pub fn verify_snapshot_file(&self, path: &Path) -> Result<snapshot::Summary, SnapshotError> {
        let f = File::open(path).map_err(file_err(path))?;
        snapshot::verify(BufReader::with_capacity(FILE_BUFFER, f), |name| {
            self.sm_cf(name).map(|_| ())
        })
    }

    /// Write the state machine, as of one RocksDB snapshot, to a new kept file. Returns its
    /// record and a handle open for reading.
    fn build_snapshot_file(&self) -> Result<(SnapshotRecord, File), SnapshotError> {
        let view = {
            let _install = self.install_lock.lock();
            self.db.snapshot()
        };
        let applied: Option<LogId<NodeId>> = match view.get_cf(self.cf(CF_SM), K_APPLIED)? {
            Some(v) => bincode::deserialize::<Option<LogId<NodeId>>>(&v)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, Node> =
            match view.get_cf(self.cf(CF_SM), K_MEMBERSHIP)? {
                Some(v) => bincode::deserialize(&v)?,
                None => StoredMembership::default(),
            };
        let (file, tmp) = self.new_temp_file("build")?;
        let guard = TempFile(Some(tmp.clone()));
        let io = file_err(&tmp);
        let mut w =
            snapshot::Writer::new(BufWriter::with_capacity(FILE_BUFFER, file)).map_err(&io)?;
        for name in SM_CFS {
            w.section(name).map_err(&io)?;
            let mut ro = ReadOptions::default();
            // One pass over everything: do not push the hot set out of the block cache.
            ro.fill_cache(false);
            for item in view.iterator_cf_opt(self.cf(name), ro, IteratorMode::Start) {
                let (k, v) = item?;
                w.record(&k, &v).map_err(&io)?;
            }
        }
        drop(view);
        let (buf, summary) = w.finish().map_err(&io)?;
        let file = buf.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(&io)?;
        drop(file);
        let name = self.keep_file(&tmp, applied.map(|l| l.index))?;
        guard.keep();
        let path = self.snap_dir.join(&name);
        let reader = File::open(&path).map_err(file_err(&path))?;
        let now = custos_core::events::now_unix_nano();
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{now}", l.leader_id, l.index),
            None => format!("--{now}"),
        };
        Ok((
            SnapshotRecord {
                meta: SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id,
                },
                file: name,
                records: summary.records,
                sha256: summary.sha256,
            },
            reader,
        ))
    }

    /// Make a built snapshot the current one, unless a newer one (installed meanwhile) is.
    fn set_current_snapshot(&self, rec: &SnapshotRecord) -> Result<(), SnapshotError> {
        let _g = self.snap_lock.lock();
        if let Some(cur) = self.snapshot_record(K_SNAPSHOT)? {
            if cur.meta.last_log_id > rec.meta.last_log_id {
                let _ = std::fs::remove_file(self.snap_dir.join(&rec.file));
                return Ok(());
            }
        }
        self.put_snapshot_record(K_SNAPSHOT, rec)?;
        self.prune_snapshot_files(false)
    }

    /// The current snapshot's record and its file, opened for reading.
    fn current_snapshot(&self) -> Result<Option<(SnapshotRecord, File)>, SnapshotError> {
        let _g = self.snap_lock.lock();
        let Some(rec) = self.snapshot_record(K_SNAPSHOT)? else {
            return Ok(None);
        };
        let path = self.snap_dir.join(&rec.file);
        match File::open(&path) {
            Ok(f) => Ok(Some((rec, f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(file = %path.display(), "the current snapshot's file is missing");
                Ok(None)
            }
            Err(e) => Err(file_err(&path)(e)),
        }
    }

    /// Install a snapshot received into (or given as) `file` at `path`:
    ///
    /// 1. own the bytes: a temporary we created is used as is, anything else is copied;
    /// 2. verify the whole file — a bad file is refused here, before anything changed;
    /// 3. keep it under its final name, then write the `installing` marker (synced);
    /// 4. load it ([`Store::load_snapshot`]), which removes the marker in its last batch.
    ///
    /// `stop_after`: a test hook that stops the load after about that many records, leaving
    /// what a crash would.
    pub fn install_snapshot_file(
        &self,
        meta: &SnapshotMeta<NodeId, Node>,
        mut file: File,
        path: &Path,
        temporary: bool,
        stop_after: Option<u64>,
    ) -> Result<SnapshotRecord, SnapshotError> {
        let _install = self.install_lock.lock();
        let (tmp, guard) = if temporary && path.parent() == Some(self.snap_dir.as_path()) {
            file.sync_all().map_err(file_err(path))?;
            (path.to_path_buf(), TempFile(Some(path.to_path_buf())))
        } else {
            let (dst, tmp) = self.new_temp_file("recv")?;
            let guard = TempFile(Some(tmp.clone()));
            file.seek(SeekFrom::Start(0)).map_err(file_err(path))?;
            let mut src = BufReader::with_capacity(FILE_BUFFER, file);
            let mut dst = BufWriter::with_capacity(FILE_BUFFER, dst);
            io::copy(&mut src, &mut dst).map_err(file_err(&tmp))?;
            let dst = dst
                .into_inner()
                .map_err(|e| file_err(&tmp)(e.into_error()))?;
            dst.sync_all().map_err(file_err(&tmp))?;
            (tmp, guard)
        };
        let summary = self
            .verify_snapshot_file(&tmp)
            .map_err(|e| SnapshotError::Refused(Box::new(e)))?;
        let name = self.keep_file(&tmp, meta.last_log_id.map(|l| l.index))?;
        guard.keep();
        let rec = SnapshotRecord {
            meta: meta.clone(),
            file: name,
            records: summary.records,
            sha256: summary.sha256,
        };
        {
            let _g = self.snap_lock.lock();
            self.put_snapshot_record(K_INSTALLING, &rec)?;
        }
        self.load_snapshot(&rec, stop_after)?;
        let _g = self.snap_lock.lock();
        self.prune_snapshot_files(false)?;
        Ok(rec)
    }

    /// Replace the state machine with a verified, kept snapshot file: clear the state-machine
    /// CFs, write the records in batches of about [`INSTALL_BATCH_BYTES`], then, in one synced
    /// batch, `applied`, `membership`, the new current record and the removal of the marker.
    /// RocksDB's WAL keeps writes in order, so after a crash the marker is present until the
    /// last batch is; [`Store::open`] then runs this again from the same file.
    fn load_snapshot(
        &self,
        rec: &SnapshotRecord,
        stop_after: Option<u64>,
    ) -> Result<(), SnapshotError> {
        let path = self.snap_dir.join(&rec.file);
        let mut wb = WriteBatch::default();
        for name in SM_CFS {
            let cf = self.cf(name);
            let first = self.db.iterator_cf(cf, IteratorMode::Start).next();
            let last = self.db.iterator_cf(cf, IteratorMode::End).next();
            if let (Some(first), Some(last)) = (first, last) {
                let (first, last) = (first?.0, last?.0);
                wb.delete_range_cf(cf, &first, &last);
                wb.delete_cf(cf, &last);
            }
        }
        self.db.write(wb)?;

        let f = File::open(&path).map_err(file_err(&path))?;
        let mut reader = snapshot::Reader::new(BufReader::with_capacity(FILE_BUFFER, f))?;
        let mut wb = WriteBatch::default();
        let mut cf = None;
        let mut loaded = 0u64;
        while let Some(frame) = reader.next_frame()? {
            match frame {
                Frame::Section(name) => cf = Some(self.sm_cf(&name)?),
                Frame::Record { key, value } => {
                    let cf = cf.ok_or(FormatError::NoSection)?;
                    wb.put_cf(cf, key, value);
                    loaded += 1;
                    if wb.size_in_bytes() >= INSTALL_BATCH_BYTES {
                        self.db.write(std::mem::take(&mut wb))?;
                        if stop_after.is_some_and(|n| loaded >= n) {
                            return Err(SnapshotError::Stopped(loaded));
                        }
                    }
                }
            }
        }
        let sm = self.cf(CF_SM);
        wb.put_cf(sm, K_APPLIED, bincode::serialize(&rec.meta.last_log_id)?);
        wb.put_cf(
            sm,
            K_MEMBERSHIP,
            bincode::serialize(&rec.meta.last_membership)?,
        );
        let snap = self.cf(CF_SNAPSHOT);
        wb.put_cf(snap, K_SNAPSHOT, bincode::serialize(rec)?);
        wb.delete_cf(snap, K_INSTALLING);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo)?;
        Ok(())
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
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Streams one RocksDB snapshot of the state-machine column families to a file (on a
    /// blocking thread: `apply` keeps running meanwhile and does not disturb the view).
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let store = self.store.clone();
        let (rec, file) = tokio::task::spawn_blocking(move || {
            let (rec, file) = store.build_snapshot_file()?;
            store.set_current_snapshot(&rec)?;
            Ok::<_, SnapshotError>((rec, file))
        })
        .await
        .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
        .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        tracing::info!(
            snapshot = %rec.meta.snapshot_id,
            records = rec.records,
            file = %rec.file,
            "built snapshot"
        );
        let path = self.store.snap_dir.join(&rec.file);
        Ok(Snapshot {
            meta: rec.meta,
            snapshot: Box::new(SnapshotFile::new(file, path, false)),
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

    /// A fresh temporary file in the snapshot directory; openraft writes the chunks into it.
    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<SnapshotFile>> {
        let store = self.store.clone();
        let (file, path) = tokio::task::spawn_blocking(move || store.new_temp_file("recv"))
            .await
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(Box::new(SnapshotFile::new(file, path, true)))
    }

    /// Verify the received file, keep it, then load it in bounded batches (see
    /// [`Store::install_snapshot_file`]).
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotFile>,
    ) -> StorageResult<()> {
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let (file, path, temporary) = snapshot
            .into_parts()
            .await
            .map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        let store = self.store.clone();
        let owned_meta = meta.clone();
        let started = std::time::Instant::now();
        let rec = tokio::task::spawn_blocking(move || {
            store.install_snapshot_file(&owned_meta, file, &path, temporary, None)
        })
        .await
        .map_err(|e| io_err(subject(), ErrorVerb::Write, e))?
        .map_err(|e| {
            let verb = match e {
                SnapshotError::Refused(_) => ErrorVerb::Read,
                _ => ErrorVerb::Write,
            };
            tracing::error!(snapshot = %meta.snapshot_id, error = %e, "snapshot install failed");
            io_err(subject(), verb, e)
        })?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            records = rec.records,
            file = %rec.file,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "installed snapshot"
        );
        let _ = self
            .store
            .changes_tx
            .send((self.store.revision(), StateChange::Resync));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let current = self
            .store
            .current_snapshot()
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(current.map(|(rec, file)| Snapshot {
            snapshot: Box::new(SnapshotFile::new(
                file,
                self.store.snap_dir.join(&rec.file),
                false,
            )),
            meta: rec.meta,
        }))
    }
}

/// Open a store and return the two halves openraft needs.
pub fn open(dir: &Path) -> Result<(Arc<Store>, LogStore, StateMachine), OpenError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use custos_core::events::Origin;
    use custos_proto::v1::CommandReceived;
    use openraft::{CommittedLeaderId, Membership};
    use std::collections::BTreeSet;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    type Dump = Vec<(&'static str, Vec<(Vec<u8>, Vec<u8>)>)>;

    /// The descriptor bound reaches RocksDB: its options file for the open database says so.
    #[test]
    fn rocksdb_keeps_a_bounded_number_of_table_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        let newest = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .max_by_key(|e| e.file_name())
            .expect("RocksDB writes an OPTIONS file");
        let text = std::fs::read_to_string(newest.path()).unwrap();
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("max_open_files={MAX_OPEN_TABLE_FILES}")),
            "{text}"
        );
    }

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    fn event(text: &str) -> Vec<u8> {
        let origin = Origin {
            edge_id: "edge-t".into(),
            session_id: "s".into(),
            identity: "alice".into(),
            connection: "pg".into(),
        };
        origin
            .event(Payload::CommandReceived(CommandReceived {
                command_id: "c".into(),
                text: text.into(),
                ..Default::default()
            }))
            .encode_to_vec()
    }

    /// A store with `records` ingested events and something in every state-machine CF.
    async fn populate(sm: &mut StateMachine, records: usize, tag: &str) -> u64 {
        let mut index = 0;
        let mut next = |p| {
            index += 1;
            entry(index, p)
        };
        let mut entries = vec![next(EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            (),
        )))];
        let cmds = vec![
            Command::ApplyPolicy {
                text: format!("permit(principal, action, resource); // {tag}"),
                description: "all".into(),
                author: "admin".into(),
                expected_version: 0,
                applied_unix_nano: 1,
                event: event("policy"),
            },
            Command::PutConnection {
                conn: StoredConnection {
                    name: format!("pg-{tag}"),
                    kind: "postgres".into(),
                    ..Default::default()
                },
                keep_secrets: false,
                event: event("conn"),
                committed_unix_nano: 2,
            },
            Command::IssueToken {
                token: StoredToken {
                    token_id: format!("tok-{tag}"),
                    sha256: "00".into(),
                    subject: "alice".into(),
                    ..Default::default()
                },
                event: event("token"),
                committed_unix_nano: 3,
            },
            Command::CreateApproval {
                approval: Approval {
                    id: format!("appr-{tag}"),
                    state: approvals::PENDING.into(),
                    identity: "alice".into(),
                    expires_unix_nano: i64::MAX,
                    ..Default::default()
                }
                .encode_to_vec(),
                event_id: custos_core::events::new_id(),
            },
            Command::Ingest {
                committed_unix_nano: 4,
                items: vec![IngestItem {
                    data: b"not an event".to_vec(),
                    bus_seq: 7,
                }],
            },
        ];
        entries.extend(cmds.into_iter().map(|c| next(EntryPayload::Normal(c))));
        sm.apply(entries).await.unwrap();
        let text = format!("SELECT * FROM customers WHERE region = '{tag}' ").repeat(4);
        let mut left = records;
        while left > 0 {
            let n = left.min(2000);
            left -= n;
            let items = (0..n)
                .map(|_| IngestItem {
                    data: event(&text),
                    bus_seq: 0,
                })
                .collect();
            sm.apply([next(EntryPayload::Normal(Command::Ingest {
                committed_unix_nano: 5,
                items,
            }))])
            .await
            .unwrap();
        }
        index
    }

    fn dump(store: &Store) -> Dump {
        SM_CFS
            .iter()
            .map(|name| {
                let kv = store
                    .db
                    .iterator_cf(store.cf(name), IteratorMode::Start)
                    .map(|i| {
                        let (k, v) = i.unwrap();
                        (k.to_vec(), v.to_vec())
                    })
                    .collect();
                (*name, kv)
            })
            .collect()
    }

    fn files(store: &Store) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(store.snapshot_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Send a snapshot the way openraft's chunked transport does: seek, read chunks, write.
    async fn transfer(from: &mut SnapshotFile, to: &mut SnapshotFile) {
        from.seek(SeekFrom::Start(0)).await.unwrap();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = from.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).await.unwrap();
        }
        to.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_snapshot_installs_every_cf_identically() {
        let dir = tempfile::TempDir::new().unwrap();
        let (a, _, mut sma) = open(&dir.path().join("a")).unwrap();
        populate(&mut sma, 60_000, "a").await;
        let mut snap = sma
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, sma.applied_state().await.unwrap().0);
        assert_eq!(files(&a).len(), 1, "{:?}", files(&a));

        let (b, _, mut smb) = open(&dir.path().join("b")).unwrap();
        populate(&mut smb, 100, "b").await;
        let mut changes = b.changes_tx.subscribe();
        let mut recv = smb.begin_receiving_snapshot().await.unwrap();
        transfer(&mut snap.snapshot, &mut recv).await;
        smb.install_snapshot(&snap.meta, recv).await.unwrap();

        assert_eq!(dump(&a), dump(&b));
        let v = b.verify();
        assert_eq!(v.fault, None);
        assert_eq!(v.checked, a.audit_head().seq);
        assert!(v.checked > 60_000);
        assert_eq!(v.parked, 1);
        assert_eq!(
            smb.applied_state().await.unwrap(),
            sma.applied_state().await.unwrap()
        );
        assert!(matches!(changes.try_recv(), Ok((_, StateChange::Resync))));
        let cur = smb.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, snap.meta);
        let kept = files(&b);
        assert_eq!(kept.len(), 1, "only the installed file is kept: {kept:?}");
        assert!(kept[0].ends_with(".snap"));
        assert!(!b.installing_snapshot());

        // A newer build replaces the file; the old one goes.
        let before = files(&a);
        sma.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let after = files(&a);
        assert_eq!(after.len(), 1);
        assert_ne!(before, after);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_snapshot_is_refused_and_changes_nothing() {
        let dir = tempfile::TempDir::new().unwrap();
        let (_a, _, mut sma) = open(&dir.path().join("a")).unwrap();
        populate(&mut sma, 3000, "a").await;
        let snap = sma
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let good = std::fs::read(snap.snapshot.path()).unwrap();

        let (b, _, mut smb) = open(&dir.path().join("b")).unwrap();
        populate(&mut smb, 50, "b").await;
        smb.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let before = dump(&b);
        let before_files = files(&b);
        let before_applied = smb.applied_state().await.unwrap();

        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x10;
        let mut wrong_cf = Vec::new();
        {
            let mut w = snapshot::Writer::new(&mut wrong_cf).unwrap();
            w.section("not_a_cf").unwrap();
            w.record(b"k", b"v").unwrap();
            w.finish().unwrap();
        }
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
            (
                "last byte cut",
                good[..good.len() - 1].to_vec(),
                "truncated",
            ),
            ("bit flip", flipped, "checksum"),
            ("empty", Vec::new(), "truncated"),
            ("unknown cf", wrong_cf, "not_a_cf"),
        ];
        for (what, bytes, expect) in cases {
            let mut recv = smb.begin_receiving_snapshot().await.unwrap();
            recv.write_all(&bytes).await.unwrap();
            recv.shutdown().await.unwrap();
            let err = smb
                .install_snapshot(&snap.meta, recv)
                .await
                .expect_err(what)
                .to_string();
            assert!(
                err.contains("refused") && err.contains(expect),
                "{what}: {err}"
            );
            assert_eq!(dump(&b), before, "{what}: state machine changed");
            assert_eq!(files(&b), before_files, "{what}: files changed");
            assert!(!b.installing_snapshot());
            assert_eq!(smb.applied_state().await.unwrap(), before_applied);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_install_is_finished_on_reopen() {
        let dir = tempfile::TempDir::new().unwrap();
        let (a, _, mut sma) = open(&dir.path().join("a")).unwrap();
        populate(&mut sma, 30_000, "a").await;
        let snap = sma
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let path = snap.snapshot.path().to_path_buf();

        let b_dir = dir.path().join("b");
        let (b, lb, mut smb) = open(&b_dir).unwrap();
        populate(&mut smb, 100, "b").await;
        let file = File::open(&path).unwrap();
        let err = b
            .install_snapshot_file(&snap.meta, file, &path, false, Some(1))
            .unwrap_err();
        assert!(matches!(err, SnapshotError::Stopped(_)), "{err}");
        assert!(b.installing_snapshot());
        let partial = dump(&b);
        assert_ne!(partial, dump(&a), "the load stopped part way");
        assert!(partial.iter().any(|(_, kv)| !kv.is_empty()));
        drop((b, lb, smb));

        // Reopen: the marker makes the store load the kept file again before anything reads it.
        let (b, _, mut smb) = open(&b_dir).unwrap();
        assert!(!b.installing_snapshot());
        assert_eq!(dump(&b), dump(&a));
        assert_eq!(b.verify().fault, None);
        assert_eq!(
            smb.applied_state().await.unwrap(),
            sma.applied_state().await.unwrap()
        );
        let cur = smb.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, snap.meta);
        assert_eq!(files(&b).len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_install_with_a_damaged_file_fails_to_open() {
        let dir = tempfile::TempDir::new().unwrap();
        let (_a, _, mut sma) = open(&dir.path().join("a")).unwrap();
        populate(&mut sma, 20_000, "a").await;
        let snap = sma
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let path = snap.snapshot.path().to_path_buf();
        let b_dir = dir.path().join("b");
        let (b, lb, smb) = open(&b_dir).unwrap();
        let rec = b
            .install_snapshot_file(
                &snap.meta,
                File::open(&path).unwrap(),
                &path,
                false,
                Some(1),
            )
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(rec, SnapshotError::Stopped(_)));
        let kept = b.snapshot_record(K_INSTALLING).unwrap().unwrap().file;
        drop((b, lb, smb));
        let kept = b_dir.join(SNAPSHOT_DIR).join(kept);
        let len = std::fs::metadata(&kept).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&kept)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let err = open(&b_dir).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("interrupted snapshot install") && err.contains("truncated"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_old_in_database_snapshot_and_stray_files_are_dropped_at_open() {
        let dir = tempfile::TempDir::new().unwrap();
        let db_dir = dir.path().join("db");
        let (s, l, mut sm) = open(&db_dir).unwrap();
        populate(&mut sm, 10, "a").await;
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let kept = files(&s);
        s.db.put_cf(s.cf(CF_SNAPSHOT), K_SNAPSHOT_IN_DB, vec![7u8; 1 << 20])
            .unwrap();
        let _ = s.snapshot_record(K_SNAPSHOT).unwrap().unwrap();
        for stray in ["recv-1-1.tmp", "build-1-1.tmp", "snap-1-1-1.snap"] {
            std::fs::write(s.snapshot_dir().join(stray), b"x").unwrap();
        }
        drop((s, l, sm));
        let (s, _, mut sm) = open(&db_dir).unwrap();
        assert_eq!(
            s.db.get_cf(s.cf(CF_SNAPSHOT), K_SNAPSHOT_IN_DB).unwrap(),
            None
        );
        assert_eq!(files(&s), kept);
        assert!(sm.get_current_snapshot().await.unwrap().is_some());

        // A current record whose file is gone is forgotten (openraft rebuilds).
        std::fs::remove_file(s.snapshot_dir().join(&kept[0])).unwrap();
        drop((s, sm));
        let (s, _, mut sm) = open(&db_dir).unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        assert!(s.current_snapshot_record().unwrap().is_none());
    }
}
