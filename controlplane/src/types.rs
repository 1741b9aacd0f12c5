//! The Raft type configuration and the commands replicated through the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// custos's Raft types: commands in, responses out, snapshots as files (crate::snapshot).
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime
);

pub type Raft = openraft::Raft<TypeConfig>;

/// One event delivered by the bus, as it goes into the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestItem {
    /// The raw `custos.v1.Event` bytes, exactly as published. `serde_bytes` writes the same
    /// bincode as a plain `Vec<u8>` (length, then the bytes) but in one copy instead of one call
    /// per byte: in a debug build that per-byte path made a 2 MiB append take ~300 ms, longer
    /// than the AppendEntries deadline, so a lagging follower never caught up.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Where the bus had it (JetStream stream sequence, or 0): the state machine keeps the
    /// highest one applied so the ingest loop can tell when the consumer skipped a sequence.
    pub bus_seq: u64,
}

/// A connection as the state machine stores it: credentials sealed by the proposer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StoredConnection {
    pub name: String,
    pub kind: String,
    pub address: String,
    pub options: BTreeMap<String, String>,
    /// Credential name → XChaCha20-Poly1305 sealed value (see custos_core::secrets).
    pub sealed_secrets: BTreeMap<String, Vec<u8>>,
    pub revision: u64,
}

/// A token as stored: the hash only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StoredToken {
    pub token_id: String,
    pub sha256: String,
    pub subject: String,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
    pub expires_unix_nano: i64,
    pub revoked: bool,
}

/// Everything that changes the replicated state. Commands are deterministic: anything random or
/// time-dependent (ids, timestamps, ciphertext) is chosen by the proposer and carried here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Append bus events to the canonical audit log (deduplicated by event id).
    Ingest {
        committed_unix_nano: i64,
        items: Vec<IngestItem>,
    },
    /// Store a new policy version. `event` is the PolicyApplied event for the audit log.
    ApplyPolicy {
        text: String,
        description: String,
        author: String,
        expected_version: u64,
        applied_unix_nano: i64,
        #[serde(with = "serde_bytes")]
        event: Vec<u8>,
    },
    /// Create or replace a connection. `keep_secrets`: keep stored credentials not given here.
    PutConnection {
        conn: StoredConnection,
        keep_secrets: bool,
        #[serde(with = "serde_bytes")]
        event: Vec<u8>,
        committed_unix_nano: i64,
    },
    DeleteConnection {
        name: String,
        #[serde(with = "serde_bytes")]
        event: Vec<u8>,
        committed_unix_nano: i64,
    },
    IssueToken {
        token: StoredToken,
        #[serde(with = "serde_bytes")]
        event: Vec<u8>,
        committed_unix_nano: i64,
    },
    RevokeToken {
        token_id: String,
    },
    /// Open an approval request (`approval` is an encoded `custos.v1.Approval` in state pending).
    CreateApproval {
        #[serde(with = "serde_bytes")]
        approval: Vec<u8>,
        event_id: String,
    },
    /// One approver's vote. Whether it counts (group, self-approval, state, deadline) is decided
    /// when applied, from the data carried here, so every node decides the same way.
    DecideApproval {
        id: String,
        approver: String,
        approver_groups: Vec<String>,
        approve: bool,
        comment: String,
        grant_seconds: u64,
        now_unix_nano: i64,
        event_id: String,
        /// Id for the grant the vote creates if it completes the quorum.
        grant_id: String,
    },
    /// Close a pending request as `expired` (the deadline passed) or `cancelled` (the client left).
    CloseApproval {
        id: String,
        state: String,
        reason: String,
        now_unix_nano: i64,
        event_id: String,
    },
    /// Consume a one-shot grant (the retry of a command approved while its client was away).
    UseGrant {
        grant_id: String,
        identity: String,
        connection: String,
        text_sha256: String,
        command_id: String,
        now_unix_nano: i64,
        event_id: String,
        edge_id: String,
        session_id: String,
    },
    RevokeGrant {
        grant_id: String,
        by: String,
        now_unix_nano: i64,
        event_id: String,
    },
    /// Stream sequences `from..=to` were never delivered by the consumer and the stream no longer
    /// holds them: record the loss (it makes `audit verify` fail) and move past it. Proposed by
    /// the ingest loop only after reading each sequence back from the stream found nothing.
    BusGap {
        from: u64,
        to: u64,
        /// What the stream said (e.g. its first sequence), for the operator.
        detail: String,
        committed_unix_nano: i64,
    },
}

/// What applying a command produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Response {
    #[default]
    None,
    Ingested {
        appended: u64,
        duplicates: u64,
        parked: u64,
        head_seq: u64,
    },
    PolicyVersion(u64),
    /// The optimistic-concurrency check of ApplyPolicy failed.
    VersionConflict {
        current: u64,
    },
    Revision(u64),
    NotFound,
    /// An encoded `custos.v1.Approval` after the command.
    Approval(#[serde(with = "serde_bytes")] Vec<u8>),
    /// An encoded `custos.v1.Grant` after the command.
    Grant(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The command was refused; the text says why and what to do.
    Refused(String),
}
