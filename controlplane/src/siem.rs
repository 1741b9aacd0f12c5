//! The SIEM feed: after commit, the leader republishes each canonical record as OCSF-shaped JSON
//! on `custos.audit.<kind>.<connection>` into the `CUSTOS_AUDIT` JetStream stream.
//!
//! Each message carries `Nats-Msg-Id: audit-<seq>` and `Custos-Seq: <seq>`. A new leader reads the
//! stream's last `Custos-Seq` and continues from there, so a failover neither skips records nor
//! (thanks to the broker's duplicate window) publishes one twice.

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
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !inner.is_leader() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        }
        if let Err(e) = publish_while_leader(&inner, &bus, &mut audit_rx, &mut shutdown).await {
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

async fn last_published(stream: &mut stream::Stream) -> Result<u64, String> {
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let last = info.state.last_sequence;
    if info.state.messages == 0 || last == 0 {
        return Ok(0);
    }
    let msg = stream
        .get_raw_message(last)
        .await
        .map_err(|e| e.to_string())?;
    Ok(msg
        .headers
        .get("Custos-Seq")
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0))
}

fn subject(event: &Event) -> String {
    let kind = custos_proto::payload_kind(event.payload.as_ref());
    let conn = custos_core::bus::subject_token(&event.connection);
    format!("{AUDIT_SUBJECT_PREFIX}.{kind}.{conn}")
}

async fn publish_while_leader(
    inner: &Inner,
    bus: &NatsBus,
    audit_rx: &mut tokio::sync::broadcast::Receiver<AuditRecord>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let mut stream = ensure_stream(bus, &inner.config.siem.stream).await?;
    let mut next = last_published(&mut stream).await? + 1;
    let js: &jetstream::Context = bus.jetstream();
    while inner.is_leader() && !*shutdown.borrow() {
        let records = inner.store.audit_range(next, 500);
        if records.is_empty() {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = audit_rx.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            continue;
        }
        let mut acks = Vec::with_capacity(records.len());
        for rec in &records {
            let event = Event::decode(&*rec.event).unwrap_or_default();
            let body = custos_core::audit::ocsf_bytes(rec, &event).map_err(|e| e.to_string())?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("audit-{}", rec.seq).as_str());
            headers.insert("Custos-Seq", rec.seq.to_string().as_str());
            let ack = js
                .publish_with_headers(subject(&event), headers, body.into())
                .await
                .map_err(|e| e.to_string())?;
            acks.push(ack);
        }
        for ack in acks {
            tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .map_err(|_| "SIEM publish ack timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
        next = records.last().map(|r| r.seq + 1).unwrap_or(next);
    }
    Ok(())
}
