//! The leader's ingest loop: pull events from the bus, commit them to Raft in batches, and
//! acknowledge them only after the commit. A node that is not the leader does not pull.
//!
//! Exactly once: the bus redelivers anything not acknowledged (a crashed leader's in-flight batch,
//! a failed commit), and the state machine drops event ids it already holds. So every event is
//! applied at least once by redelivery and at most once by dedupe.

use std::sync::Arc;
use std::time::Duration;

use custos_core::bus::{EventSource, InProcSource, NatsBus};
use tokio::sync::{watch, Mutex};
use tracing::Instrument as _;

use crate::node::{items, Inner};
use crate::types::{Command, Response};

const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Most event bytes in one Raft entry. openraft bounds each AppendEntries by the heartbeat
/// interval, so an entry must stay small enough that a follower that fell behind receives
/// `max_payload_entries` of them within it; a fetched batch larger than this is committed as
/// several entries, in order.
pub(crate) const MAX_ENTRY_BYTES: usize = 256 * 1024;

pub(crate) enum Input {
    InProc(Arc<Mutex<InProcSource>>),
    Nats(Box<NatsBus>),
}

pub(crate) async fn run(inner: Arc<Inner>, input: Input, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = inner.raft.metrics();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !inner.is_leader() {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                _ = metrics.changed() => continue,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        }
        tracing::info!(node = inner.id, "leader: starting event ingest");
        match &input {
            Input::InProc(src) => {
                let mut guard = src.lock().await;
                term(&inner, &mut *guard, &mut shutdown).await;
            }
            Input::Nats(bus) => {
                let ack_wait = Duration::from_secs(inner.config.bus.ack_wait_secs);
                match bus.source(&inner.config.bus.durable, ack_wait).await {
                    Ok(mut src) => term(&inner, &mut src, &mut shutdown).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "ingest cannot open the event stream; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

/// Ingest while this node stays leader.
async fn term<S: EventSource + ?Sized>(
    inner: &Inner,
    src: &mut S,
    shutdown: &mut watch::Receiver<bool>,
) {
    let max = inner.config.bus.batch_max;
    let backlog = |v: Option<u64>| {
        let v = v.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
        inner
            .consumer_backlog
            .store(v, std::sync::atomic::Ordering::Relaxed);
    };
    while inner.is_leader() && !*shutdown.borrow() {
        let batch = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            b = src.fetch(max, Duration::from_millis(200)) => b,
        };
        backlog(src.backlog());
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "ingest fetch failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        let mut rest = batch;
        while !rest.is_empty() {
            let cut = entry_len(&rest);
            let later = rest.split_off(cut);
            if !commit(inner, rest).await {
                for d in later {
                    let _ = d.nack("control plane could not commit the event (leader change); it will be retried").await;
                }
                backlog(None);
                return;
            }
            rest = later;
        }
    }
    backlog(None);
}

/// How many of `batch`'s leading deliveries fit one entry (at least one).
fn entry_len(batch: &[custos_core::bus::Delivery]) -> usize {
    let mut bytes = 0;
    for (i, d) in batch.iter().enumerate() {
        bytes += d.data.len();
        if bytes > MAX_ENTRY_BYTES && i > 0 {
            return i;
        }
    }
    batch.len()
}

/// Commit one entry of events and ack them; on failure nack them and return false.
#[tracing::instrument(name = "ingest.commit", level = "debug", skip_all, fields(
    node = inner.id,
    events = batch.len(),
    appended = tracing::field::Empty,
    duplicates = tracing::field::Empty,
    parked = tracing::field::Empty,
    otel.status_code = tracing::field::Empty,
))]
async fn commit(inner: &Inner, batch: Vec<custos_core::bus::Delivery>) -> bool {
    let cmd = Command::Ingest {
        committed_unix_nano: custos_core::events::now_unix_nano(),
        items: items(&batch),
    };
    // Commit on this node only: if leadership moved, the new leader pulls the redelivery.
    // Bounded: a leader cut off from its quorum must not hold the batch forever. If the entry
    // commits after the timeout, the redelivered copies are dropped as duplicates.
    let write = tracing::debug_span!(
        "raft.client_write",
        otel.status_code = tracing::field::Empty
    );
    let res = match tokio::time::timeout(COMMIT_TIMEOUT, inner.raft.client_write(cmd))
        .instrument(write.clone())
        .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("commit did not finish within {COMMIT_TIMEOUT:?}")),
    };
    if res.is_err() {
        write.record("otel.status_code", "ERROR");
        tracing::Span::current().record("otel.status_code", "ERROR");
    }
    drop(write);
    match res {
        Ok(resp) => {
            if let Response::Ingested {
                appended,
                duplicates,
                parked,
                ..
            } = resp.data
            {
                let span = tracing::Span::current();
                span.record("appended", appended);
                span.record("duplicates", duplicates);
                span.record("parked", parked);
                let m = &inner.metrics;
                m.add(
                    "custos_ingest_events_total",
                    &[("result", "appended")],
                    appended,
                );
                m.add(
                    "custos_ingest_events_total",
                    &[("result", "duplicate")],
                    duplicates,
                );
                m.add(
                    "custos_ingest_events_total",
                    &[("result", "parked")],
                    parked,
                );
                if parked > 0 {
                    tracing::warn!(
                        parked,
                        "malformed events parked (see `custos audit verify`)"
                    );
                }
            }
            for d in batch {
                if let Err(e) = d.ack().await {
                    tracing::debug!(error = %e, "ack failed; the event will be redelivered and deduplicated");
                }
            }
            true
        }
        Err(e) => {
            inner
                .metrics
                .inc("custos_ingest_commit_failures_total", &[]);
            tracing::warn!(error = %e, "ingest commit failed; events will be redelivered");
            for d in batch {
                let _ = d.nack("control plane could not commit the event (leader change); it will be retried").await;
            }
            false
        }
    }
}
