//! The canonical audit log's hash chain, its verifier, and the OCSF-shaped JSON for SIEMs.
//!
//! ```text
//!   record n-1                      record n
//!  ┌──────────────┐               ┌──────────────────────────────────────────────┐
//!  │ hash(n-1) ───┼──────────────▶│ prev_hash                                    │
//!  └──────────────┘               │ hash = SHA-256("custos-audit-v1" ‖ seq ‖      │
//!                                 │   committed ‖ prev_hash ‖ len(id) ‖ id ‖ event)│
//!                                 └──────────────────────────────────────────────┘
//! ```
//!
//! Editing any byte of a record changes its hash; deleting a record leaves a gap in the sequence;
//! re-hashing an edited record breaks the link to the next one. [`ChainVerifier`] names the first
//! sequence number where any of these happens.

use std::collections::HashSet;

use custos_proto::v1::{event::Payload, AuditRecord, Event, Verdict};
use prost::Message;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

const DOMAIN: &[u8] = b"custos-audit-v1";

/// The hash of a record, over every field that matters (see `AuditRecord.hash` in the proto).
pub fn record_hash(
    seq: u64,
    committed_unix_nano: i64,
    prev_hash: &[u8],
    event_id: &str,
    event: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(committed_unix_nano.to_be_bytes());
    h.update(prev_hash);
    h.update((event_id.len() as u32).to_be_bytes());
    h.update(event_id.as_bytes());
    h.update(event);
    h.finalize().into()
}

/// Build the next record of a chain.
pub fn next_record(
    seq: u64,
    committed_unix_nano: i64,
    prev_hash: &[u8],
    event_id: &str,
    event: Vec<u8>,
) -> AuditRecord {
    let hash = record_hash(seq, committed_unix_nano, prev_hash, event_id, &event);
    AuditRecord {
        seq,
        event_id: event_id.to_string(),
        committed_unix_nano,
        event,
        prev_hash: prev_hash.to_vec(),
        hash: hash.to_vec(),
    }
}

/// What is wrong with a chain at its first bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainFault {
    /// A sequence number is absent (a record was deleted).
    Missing,
    /// The stored hash does not match the record's content (a record was edited).
    HashMismatch,
    /// The record's `prev_hash` is not the previous record's hash (a record was replaced).
    ChainBroken,
    /// The stored bytes are not an `AuditRecord`.
    Undecodable,
    /// The same event id appears twice.
    DuplicateId,
}

impl ChainFault {
    pub fn as_str(self) -> &'static str {
        match self {
            ChainFault::Missing => "missing",
            ChainFault::HashMismatch => "hash_mismatch",
            ChainFault::ChainBroken => "chain_broken",
            ChainFault::Undecodable => "undecodable",
            ChainFault::DuplicateId => "duplicate_id",
        }
    }
}

/// Walks a chain in key order and stops at the first fault.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_seq: u64,
    prev_hash: Vec<u8>,
    ids: HashSet<String>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_vec(),
            ids: HashSet::new(),
        }
    }
}

impl ChainVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records accepted so far.
    pub fn checked(&self) -> u64 {
        self.expected_seq - 1
    }

    /// Hash of the last accepted record.
    pub fn head_hash(&self) -> &[u8] {
        &self.prev_hash
    }

    /// Feed the record stored under key `key_seq` (raw stored bytes). Returns the fault and the
    /// first bad sequence number.
    pub fn push_raw(&mut self, key_seq: u64, bytes: &[u8]) -> Result<(), (u64, ChainFault)> {
        if key_seq != self.expected_seq {
            return Err((self.expected_seq, ChainFault::Missing));
        }
        let record = AuditRecord::decode(bytes).map_err(|_| (key_seq, ChainFault::Undecodable))?;
        self.push(&record)
    }

    /// Feed the next record.
    pub fn push(&mut self, record: &AuditRecord) -> Result<(), (u64, ChainFault)> {
        if record.seq != self.expected_seq {
            // A record claiming another position: the expected one is missing here.
            return Err((self.expected_seq, ChainFault::Missing));
        }
        let computed = record_hash(
            record.seq,
            record.committed_unix_nano,
            &record.prev_hash,
            &record.event_id,
            &record.event,
        );
        if computed[..] != record.hash[..] {
            return Err((record.seq, ChainFault::HashMismatch));
        }
        if record.prev_hash != self.prev_hash {
            return Err((record.seq, ChainFault::ChainBroken));
        }
        if !self.ids.insert(record.event_id.clone()) {
            return Err((record.seq, ChainFault::DuplicateId));
        }
        self.prev_hash = record.hash.clone();
        self.expected_seq += 1;
        Ok(())
    }

    /// Call at the end with the head the store claims; a shorter chain means the tail was cut.
    pub fn finish(&self, claimed_head: u64) -> Result<(), (u64, ChainFault)> {
        if claimed_head >= self.expected_seq {
            return Err((self.expected_seq, ChainFault::Missing));
        }
        Ok(())
    }
}

fn verdict_name(v: i32) -> &'static str {
    match Verdict::try_from(v).unwrap_or(Verdict::Unspecified) {
        Verdict::Unspecified => "unspecified",
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::PendingApproval => "pending_approval",
        Verdict::Approved => "approved",
    }
}

/// The verdict of a command event, as the audit query API spells it.
pub fn event_verdict(event: &Event) -> Option<&'static str> {
    match &event.payload {
        Some(Payload::CommandReceived(c)) => Some(verdict_name(c.verdict)),
        _ => None,
    }
}

/// OCSF class, activity and status for an event. See docs/audit-log.md for the table.
fn ocsf_class(event: &Event) -> (u32, &'static str, u32, &'static str, u32) {
    // (class_uid, class_name, activity_id, activity_name, status_id 1=success 2=failure 0=unknown)
    match &event.payload {
        Some(Payload::SessionStarted(_)) => (3002, "Authentication", 1, "Logon", 1),
        Some(Payload::SessionEnded(e)) => (
            3002,
            "Authentication",
            2,
            "Logoff",
            if e.error.is_empty() { 1 } else { 2 },
        ),
        Some(Payload::CommandReceived(c)) => {
            let status = match Verdict::try_from(c.verdict).unwrap_or(Verdict::Unspecified) {
                Verdict::Allow | Verdict::Approved => 1,
                Verdict::Deny => 2,
                _ => 0,
            };
            (6005, "Datastore Activity", 4, "Query", status)
        }
        Some(Payload::CommandCompleted(c)) => (
            6005,
            "Datastore Activity",
            4,
            "Query",
            if c.error.is_empty() { 1 } else { 2 },
        ),
        Some(Payload::ApprovalRequested(_)) => (3003, "Authorize Session", 99, "Other", 0),
        Some(Payload::ApprovalDecided(d)) => (
            3003,
            "Authorize Session",
            if d.state == "approved" { 1 } else { 99 },
            if d.state == "approved" {
                "Assign Privileges"
            } else {
                "Other"
            },
            if d.state == "approved" { 1 } else { 2 },
        ),
        Some(Payload::PolicyApplied(_)) => (3004, "Entity Management", 3, "Update", 1),
        Some(Payload::ConnectionChanged(c)) => match c.change.as_str() {
            "created" => (3004, "Entity Management", 1, "Create", 1),
            "deleted" => (3004, "Entity Management", 4, "Delete", 1),
            _ => (3004, "Entity Management", 3, "Update", 1),
        },
        Some(Payload::TokenIssued(_)) => (3004, "Entity Management", 1, "Create", 1),
        Some(Payload::GrantUsed(_)) => (3003, "Authorize Session", 1, "Assign Privileges", 1),
        Some(Payload::GrantRevoked(_)) => (3004, "Entity Management", 4, "Delete", 1),
        None => (0, "Base Event", 0, "Unknown", 0),
    }
}

/// The JSON record republished on `custos.audit.<kind>.<connection>` after commit: OCSF
/// attributes at the top level, the full custos record under `unmapped.custos`.
pub fn ocsf_json(record: &AuditRecord, event: &Event) -> Value {
    let (class_uid, class_name, activity_id, activity_name, status_id) = ocsf_class(event);
    let kind = custos_proto::payload_kind(event.payload.as_ref());
    let status = match status_id {
        1 => "Success",
        2 => "Failure",
        _ => "Unknown",
    };
    json!({
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": class_uid / 1000,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid as u64 * 100 + activity_id as u64,
        "severity_id": 1,
        "status_id": status_id,
        "status": status,
        "time": event.time_unix_nano / 1_000_000,
        "metadata": {
            "version": "1.1.0",
            "uid": event.id,
            "sequence": record.seq,
            "logged_time": record.committed_unix_nano / 1_000_000,
            "product": { "name": "custos", "vendor_name": "custos" },
        },
        "actor": { "user": { "name": event.identity }, "session": { "uid": event.session_id } },
        "device": { "name": event.edge_id },
        "unmapped": {
            "custos": {
                "seq": record.seq,
                "kind": kind,
                "connection": event.connection,
                "hash": hex::encode(&record.hash),
                "prev_hash": hex::encode(&record.prev_hash),
                "committed_unix_nano": record.committed_unix_nano,
                "event": event,
            }
        }
    })
}

/// The document [`ocsf_json`] builds, serialized straight to JSON bytes without a
/// `serde_json::Value` tree in between: byte for byte what `serde_json::to_vec(&ocsf_json(..))`
/// gives (fields in the same order), at a fraction of the allocations. The SIEM feed writes one
/// per committed record.
pub fn ocsf_bytes(record: &AuditRecord, event: &Event) -> serde_json::Result<Vec<u8>> {
    use serde::Serialize;
    #[derive(Serialize)]
    struct Doc<'a> {
        class_uid: u32,
        class_name: &'a str,
        category_uid: u32,
        activity_id: u32,
        activity_name: &'a str,
        type_uid: u64,
        severity_id: u32,
        status_id: u32,
        status: &'a str,
        time: i64,
        metadata: Metadata<'a>,
        actor: Actor<'a>,
        device: Name<'a>,
        unmapped: Unmapped<'a>,
    }
    #[derive(Serialize)]
    struct Metadata<'a> {
        version: &'a str,
        uid: &'a str,
        sequence: u64,
        logged_time: i64,
        product: Product<'a>,
    }
    #[derive(Serialize)]
    struct Product<'a> {
        name: &'a str,
        vendor_name: &'a str,
    }
    #[derive(Serialize)]
    struct Actor<'a> {
        user: Name<'a>,
        session: Uid<'a>,
    }
    #[derive(Serialize)]
    struct Name<'a> {
        name: &'a str,
    }
    #[derive(Serialize)]
    struct Uid<'a> {
        uid: &'a str,
    }
    #[derive(Serialize)]
    struct Unmapped<'a> {
        custos: Custos<'a>,
    }
    #[derive(Serialize)]
    struct Custos<'a> {
        seq: u64,
        kind: &'a str,
        connection: &'a str,
        hash: String,
        prev_hash: String,
        committed_unix_nano: i64,
        event: &'a Event,
    }
    let (class_uid, class_name, activity_id, activity_name, status_id) = ocsf_class(event);
    let status = match status_id {
        1 => "Success",
        2 => "Failure",
        _ => "Unknown",
    };
    serde_json::to_vec(&Doc {
        class_uid,
        class_name,
        category_uid: class_uid / 1000,
        activity_id,
        activity_name,
        type_uid: class_uid as u64 * 100 + activity_id as u64,
        severity_id: 1,
        status_id,
        status,
        time: event.time_unix_nano / 1_000_000,
        metadata: Metadata {
            version: "1.1.0",
            uid: &event.id,
            sequence: record.seq,
            logged_time: record.committed_unix_nano / 1_000_000,
            product: Product {
                name: "custos",
                vendor_name: "custos",
            },
        },
        actor: Actor {
            user: Name {
                name: &event.identity,
            },
            session: Uid {
                uid: &event.session_id,
            },
        },
        device: Name {
            name: &event.edge_id,
        },
        unmapped: Unmapped {
            custos: Custos {
                seq: record.seq,
                kind: custos_proto::payload_kind(event.payload.as_ref()),
                connection: &event.connection,
                hash: hex::encode(&record.hash),
                prev_hash: hex::encode(&record.prev_hash),
                committed_unix_nano: record.committed_unix_nano,
                event,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_proto::v1::{CommandReceived, SessionStarted};

    proptest::proptest! {
        /// The SIEM feed's straight serializer writes exactly what the `Value` tree gives, for
        /// every payload kind and any text (quotes, control characters, non-ASCII).
        #[test]
        fn ocsf_bytes_match_the_value_tree(
            kind in 0usize..12,
            text in ".{0,40}",
            who in "\\PC{0,12}",
            seq in proptest::prelude::any::<u64>(),
            time in proptest::prelude::any::<i64>(),
            committed in proptest::prelude::any::<i64>(),
            rows in proptest::prelude::any::<u64>(),
        ) {
            use custos_proto::v1::*;
            let payload = match kind {
                0 => Payload::SessionStarted(SessionStarted { client_addr: text.clone(), ..Default::default() }),
                1 => Payload::SessionEnded(SessionEnded { reason: text.clone(), ..Default::default() }),
                2 => Payload::CommandReceived(CommandReceived {
                    text: text.clone(),
                    parameters: vec![text.clone(), String::new()],
                    verdict: Verdict::Deny as i32,
                    ..Default::default()
                }),
                3 => Payload::CommandCompleted(CommandCompleted {
                    error: text.clone(),
                    rows,
                    result_excerpt: text.clone(),
                    ..Default::default()
                }),
                4 => Payload::ApprovalRequested(ApprovalRequested { reason: text.clone(), ..Default::default() }),
                5 => Payload::ApprovalDecided(ApprovalDecided { comment: text.clone(), ..Default::default() }),
                6 => Payload::PolicyApplied(PolicyApplied { description: text.clone(), ..Default::default() }),
                7 => Payload::ConnectionChanged(ConnectionChanged { address: text.clone(), ..Default::default() }),
                8 => Payload::TokenIssued(TokenIssued { subject: text.clone(), ..Default::default() }),
                9 => Payload::GrantUsed(GrantUsed { grant_id: text.clone(), ..Default::default() }),
                10 => Payload::GrantRevoked(GrantRevoked { grant_id: text.clone(), ..Default::default() }),
                _ => Payload::SessionStarted(SessionStarted::default()),
            };
            let event = Event {
                id: format!("id-{seq}"),
                identity: who.clone(),
                session_id: text.clone(),
                edge_id: who,
                connection: text,
                time_unix_nano: time,
                payload: (kind < 11).then_some(payload),
            };
            let mut rec = next_record(seq, committed, &GENESIS_HASH, &event.id, event.encode_to_vec());
            rec.seq = seq;
            let tree = serde_json::to_vec(&ocsf_json(&rec, &event)).unwrap();
            let straight = ocsf_bytes(&rec, &event).unwrap();
            proptest::prop_assert_eq!(String::from_utf8(straight).unwrap(), String::from_utf8(tree).unwrap());
        }
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_vec();
        (1..=n)
            .map(|seq| {
                let r = next_record(
                    seq,
                    1000 + seq as i64,
                    &prev,
                    &format!("id-{seq}"),
                    vec![seq as u8; 8],
                );
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn verify(records: &[AuditRecord]) -> Result<u64, (u64, ChainFault)> {
        let mut v = ChainVerifier::new();
        for r in records {
            v.push(r)?;
        }
        Ok(v.checked())
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(50)), Ok(50));
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_bad_seq() {
        let mut edited = chain(10);
        edited[4].event[0] ^= 1;
        assert_eq!(verify(&edited), Err((5, ChainFault::HashMismatch)));

        let mut deleted = chain(10);
        deleted.remove(6);
        assert_eq!(verify(&deleted), Err((7, ChainFault::Missing)));

        // Edit and re-hash: the record is self-consistent but the next link breaks.
        let mut rehashed = chain(10);
        rehashed[2].event[0] ^= 1;
        let r = &rehashed[2];
        rehashed[2].hash = record_hash(
            r.seq,
            r.committed_unix_nano,
            &r.prev_hash,
            &r.event_id,
            &r.event,
        )
        .to_vec();
        assert_eq!(verify(&rehashed), Err((4, ChainFault::ChainBroken)));

        let mut dup = chain(3);
        let r = &dup[2];
        dup[2] = next_record(
            3,
            r.committed_unix_nano,
            &r.prev_hash,
            "id-1",
            r.event.clone(),
        );
        assert_eq!(verify(&dup), Err((3, ChainFault::DuplicateId)));

        let v = ChainVerifier::new();
        assert_eq!(v.finish(1), Err((1, ChainFault::Missing)));
    }

    #[test]
    fn raw_records_check_their_key() {
        let records = chain(2);
        let mut v = ChainVerifier::new();
        v.push_raw(1, &records[0].encode_to_vec()).unwrap();
        assert_eq!(
            v.push_raw(3, &records[1].encode_to_vec()),
            Err((2, ChainFault::Missing))
        );
        assert_eq!(
            v.push_raw(2, b"\xff\xff"),
            Err((2, ChainFault::Undecodable))
        );
    }

    #[test]
    fn ocsf_json_has_the_class_and_the_custos_record() {
        let event = Event {
            id: "0190".into(),
            time_unix_nano: 5_000_000,
            identity: "alice".into(),
            connection: "prod".into(),
            payload: Some(Payload::CommandReceived(CommandReceived {
                text: "DROP TABLE x".into(),
                verdict: Verdict::Deny as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let rec = next_record(
            1,
            7_000_000,
            &GENESIS_HASH,
            &event.id,
            event.encode_to_vec(),
        );
        let j = ocsf_json(&rec, &event);
        assert_eq!(j["class_uid"], 6005);
        assert_eq!(j["type_uid"], 600504);
        assert_eq!(j["status"], "Failure");
        assert_eq!(j["time"], 5);
        assert_eq!(j["actor"]["user"]["name"], "alice");
        assert_eq!(
            j["unmapped"]["custos"]["event"]["payload"]["command_received"]["text"],
            "DROP TABLE x"
        );
        assert_eq!(event_verdict(&event), Some("deny"));

        let s = Event {
            payload: Some(Payload::SessionStarted(SessionStarted::default())),
            ..Default::default()
        };
        assert_eq!(ocsf_json(&rec, &s)["class_uid"], 3002);
    }
}
