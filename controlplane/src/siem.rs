//! The SIEM feed: after commit, the leader republishes each canonical record as OCSF-shaped JSON
//! on `custos.audit.<kind>.<connection>` into the `CUSTOS_AUDIT` JetStream stream.
//!
//! Each message carries `Nats-Msg-Id: audit-<seq>` and `Custos-Seq: <seq>`. A new leader reads the
//! stream's last `Custos-Seq` and continues from there, so a failover neither skips records nor
//! (thanks to the broker's duplicate window) publishes one twice.
//!
//! Records go out in batches of what has committed since the last one. Only a batch's last
//! message asks for a JetStream ack; its stream sequence shows whether the stream stored the
//! whole batch (see [`batch_stored`]). When it does not, the batch is re-sent with an ack per
//! record, so a record the stream dropped or refused is never skipped.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use custos_core::bus::NatsBus;
use custos_proto::v1::{AuditRecord, Event};
use prost::Message;
use tokio::sync::watch;

use crate::node::Inner;

pub const AUDIT_SUBJECT_PREFIX: &str = "custos.audit";

pub(crate) async fn run(inner: Arc<Inner>, bus: NatsBus, mut shutdown: watch::Receiver<bool>) {
    let mut audit_rx = inner.store.audit_tx.subscribe();
    // The last record this leader knows the stream holds, kept across retries within one
    // leadership so a failed batch is re-sent from there rather than from the stream's last
    // record (which may lie beyond a record the stream refused).
    let mut confirmed: Option<u64> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !inner.is_leader() {
            confirmed = None;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        }
        if let Err(e) =
            publish_while_leader(&inner, &bus, &mut audit_rx, &mut shutdown, &mut confirmed).await
        {
            tracing::warn!(error = %e, "SIEM republisher paused; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn ensure_stream(bus: &NatsBus, name: &str) -> Result<stream::Stream, String> {
    bus.jetstream()
        .get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{AUDIT_SUBJECT_PREFIX}.>")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            // As many replicas as the event stream: a 3-node NATS cluster keeps both streams
            // through the loss of one server.
            num_replicas: bus.config().replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot create stream {name}: {e}"))
}

/// The stream's last sequence and the `Custos-Seq` of the record stored there (0 when empty).
async fn last_published(stream: &mut stream::Stream) -> Result<(u64, u64), String> {
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let last = info.state.last_sequence;
    if info.state.messages == 0 || last == 0 {
        return Ok((last, 0));
    }
    let msg = stream
        .get_raw_message(last)
        .await
        .map_err(|e| e.to_string())?;
    let custos_seq = msg
        .headers
        .get("Custos-Seq")
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0);
    Ok((last, custos_seq))
}

fn subject(event: &Event) -> String {
    let kind = custos_proto::payload_kind(event.payload.as_ref());
    let conn = custos_core::bus::subject_token(&event.connection);
    format!("{AUDIT_SUBJECT_PREFIX}.{kind}.{conn}")
}

/// The headers and body of record `rec` as the SIEM stream carries it.
fn message(rec: &AuditRecord) -> Result<(String, async_nats::HeaderMap, bytes::Bytes), String> {
    let event = Event::decode(&*rec.event).unwrap_or_default();
    let body = custos_core::audit::ocsf_bytes(rec, &event).map_err(|e| e.to_string())?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("audit-{}", rec.seq).as_str());
    headers.insert("Custos-Seq", rec.seq.to_string().as_str());
    Ok((subject(&event), headers, body.into()))
}

/// Whether the ack of a batch's last message proves the stream stored all `sent` of them: only
/// the leader publishes into the SIEM stream, and the stream numbers what it stores
/// consecutively, so the batch holds exactly the sequences after `before` up to the ack's. Any
/// other answer (a record refused or dropped on the way, a duplicate, a foreign message in the
/// stream) means the batch is re-sent with an ack for each record.
fn batch_stored(before: u64, sent: usize, ack: &jetstream::publish::PublishAck) -> bool {
    !ack.duplicate && ack.sequence == before + sent as u64
}

async fn publish_while_leader(
    inner: &Inner,
    bus: &NatsBus,
    audit_rx: &mut tokio::sync::broadcast::Receiver<AuditRecord>,
    shutdown: &mut watch::Receiver<bool>,
    confirmed: &mut Option<u64>,
) -> Result<(), String> {
    let mut stream = ensure_stream(bus, &inner.config.siem.stream).await?;
    let (mut stream_last, stored_last) = last_published(&mut stream).await?;
    // Resume after the stream's last record, or after the last record this leader confirmed if
    // that is earlier: the broker's duplicate window drops what is sent twice.
    let mut next = confirmed.map_or(stored_last, |c| c.min(stored_last)) + 1;
    let js: &jetstream::Context = bus.jetstream();
    let client = bus.client();
    let timeout = Duration::from_secs(5);
    while inner.is_leader() && !*shutdown.borrow() {
        let records = inner.store.audit_range(next, 500);
        let Some((last, rest)) = records.split_last() else {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = audit_rx.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            continue;
        };
        // Fast path: every record but the last without an ack, then the last with one. The
        // connection keeps them in order, so its ack answers for the whole batch.
        for rec in rest {
            let (subject, headers, body) = message(rec)?;
            client
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| e.to_string())?;
        }
        let (subject, headers, body) = message(last)?;
        let ack = js
            .publish_with_headers(subject, headers, body)
            .await
            .map_err(|e| e.to_string())?;
        let ack = tokio::time::timeout(timeout, ack)
            .await
            .map_err(|_| format!("SIEM publish ack for record {} timed out", last.seq))?
            .map_err(|e| format!("the SIEM stream refused record {}: {e}", last.seq))?;
        if batch_stored(stream_last, records.len(), &ack) {
            stream_last = ack.sequence;
            inner.metrics.add(
                "custos_siem_records_total",
                &[("result", "published")],
                records.len() as u64,
            );
        } else {
            // Slow path: each record again, each with its ack. The broker drops those it holds
            // already (same Nats-Msg-Id within the duplicate window) and stores the others, so
            // none is skipped; a record it refuses stops the feed here, with the broker's reason.
            let mut acks = Vec::with_capacity(records.len());
            for rec in &records {
                let (subject, headers, body) = message(rec)?;
                acks.push((
                    rec.seq,
                    js.publish_with_headers(subject, headers, body)
                        .await
                        .map_err(|e| e.to_string())?,
                ));
            }
            for (seq, ack) in acks {
                tokio::time::timeout(timeout, ack)
                    .await
                    .map_err(|_| format!("SIEM publish ack for record {seq} timed out"))?
                    .map_err(|e| format!("the SIEM stream refused record {seq}: {e}"))?;
                *confirmed = Some(seq);
            }
            stream_last = last_published(&mut stream).await?.0;
            inner.metrics.add(
                "custos_siem_records_total",
                &[("result", "resent")],
                records.len() as u64,
            );
        }
        *confirmed = Some(last.seq);
        next = last.seq + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u64, duplicate: bool) -> jetstream::publish::PublishAck {
        serde_json::from_value(serde_json::json!({
            "stream": "CUSTOS_AUDIT", "seq": seq, "duplicate": duplicate
        }))
        .unwrap()
    }

    #[test]
    fn only_an_ack_that_accounts_for_every_message_confirms_a_batch() {
        assert!(batch_stored(10, 5, &ack(15, false)));
        assert!(batch_stored(0, 1, &ack(1, false)));
        // One message of the batch was not stored (refused, or lost on the way).
        assert!(!batch_stored(10, 5, &ack(14, false)));
        // Something else was stored in between (a foreign publisher, or a re-send overlap).
        assert!(!batch_stored(10, 5, &ack(16, false)));
        // The last record was a duplicate: the ack names an older message.
        assert!(!batch_stored(10, 5, &ack(15, true)));
    }
}
