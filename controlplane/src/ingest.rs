//! The leader's ingest loop: pull events from the bus, commit them to Raft in batches, and
//! acknowledge them only after the commit. A node that is not the leader does not pull.
//!
//! Exactly once: the bus redelivers anything not acknowledged (a crashed leader's in-flight batch,
//! a failed commit), and the state machine drops event ids it already holds. So every event is
//! applied at least once by redelivery and at most once by dedupe.
//!
//! The loop does not trust the consumer alone to deliver every event. The state machine keeps the
//! highest stream sequence it applied; a consumer hands out first deliveries in stream order, so
//! a delivery beyond the next expected sequence means the consumer skipped some (as JetStream
//! consumers have done after a cluster restart). The loop then reads each skipped sequence back
//! from the stream and commits it before the batch. A sequence the stream no longer holds is
//! committed as a [`Command::BusGap`]: the loss is recorded in the log and `audit verify` fails,
//! instead of the log silently missing an event an edge was told was durable. A skipped tail,
//! which no later delivery would reveal, is found while idle: the consumer has nothing left to
//! deliver, yet the stream holds sequences beyond the last one received.

use std::sync::Arc;
use std::time::Duration;

use custos_core::bus::{EventSource, InProcSource, NatsBus};
use tokio::sync::{watch, Mutex};
use tracing::Instrument as _;

use crate::node::{items, Inner};
use crate::types::{Command, IngestItem, Response};

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
    // The next stream sequence expected; unknown until the log holds a bus event.
    let mut next = match inner.store.bus_high() {
        0 => None,
        h => Some(h + 1),
    };
    let backlog = |v: Option<u64>| {
        let v = v.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
        inner
            .consumer_backlog
            .store(v, std::sync::atomic::Ordering::Relaxed);
    };
    let mut last_tail_check = tokio::time::Instant::now();
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
            if last_tail_check.elapsed() >= TAIL_CHECK {
                last_tail_check = tokio::time::Instant::now();
                if !fill_tail(inner, src, &mut next, max).await {
                    backlog(None);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return;
                }
            }
            continue;
        }
        inner
            .metrics
            .add("custos_ingest_bus_messages_total", &[], messages(&batch));
        let gaps = gaps(&mut next, batch.iter().map(|d| d.seq));
        for (from, to) in gaps {
            if let Err(e) = fill(inner, src, from, to, max).await {
                tracing::warn!(error = %e, from, to, "could not fill stream sequences the consumer skipped; retrying");
                for d in batch {
                    let _ = d.nack("control plane is filling skipped stream sequences first; it will be retried").await;
                }
                backlog(None);
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
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

/// While idle, ask the source at most this often whether it skipped the stream's tail.
const TAIL_CHECK: Duration = Duration::from_secs(1);

/// A skipped tail: sequences after the last one received that the consumer will never deliver
/// (it is idle, yet the stream holds them). No later delivery reveals such a gap, so the idle loop
/// asks, reads them back and commits them. False when reading them failed (the caller steps back
/// and retries); a source that cannot tell, or a busy consumer, is no gap.
async fn fill_tail<S: EventSource + ?Sized>(
    inner: &Inner,
    src: &mut S,
    next: &mut Option<u64>,
    max: usize,
) -> bool {
    let Some(n) = *next else { return true };
    let last = match src.settled_tail().await {
        Ok(Some(last)) if last >= n => last,
        Ok(_) => return true,
        Err(e) => {
            tracing::debug!(error = %e, "could not read the stream's tail; asking again later");
            return true;
        }
    };
    match fill(inner, src, n, last, max).await {
        Ok(()) => {
            *next = Some(last + 1);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, from = n, to = last, "could not fill the stream's tail the consumer skipped; retrying");
            false
        }
    }
}

/// How many bus messages `batch` came in: the events of one batch are adjacent and share its
/// stream sequence; every in-process delivery (sequence 0) is a message of its own.
fn messages(batch: &[custos_core::bus::Delivery]) -> u64 {
    seq_messages(batch.iter().map(|d| d.seq))
}

fn seq_messages(seqs: impl Iterator<Item = u64>) -> u64 {
    let mut n = 0;
    let mut prev = None;
    for seq in seqs {
        if seq == 0 || prev != Some(seq) {
            n += 1;
        }
        prev = Some(seq);
    }
    n
}

/// The ranges of stream sequences the consumer skipped before or inside `batch`, advancing
/// `next` past the batch. Redeliveries (at or below what was seen) and sources without sequences
/// (0) never make a gap.
fn gaps(next: &mut Option<u64>, seqs: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for seq in seqs {
        if seq == 0 {
            continue;
        }
        match *next {
            None => *next = Some(seq + 1),
            Some(n) if seq > n => {
                out.push((n, seq - 1));
                *next = Some(seq + 1);
            }
            Some(n) if seq == n => *next = Some(n + 1),
            Some(_) => {}
        }
    }
    out
}

/// Read stream sequences `from..=to` back from the stream and commit them in order, at most
/// `max` per entry; runs the stream no longer holds are committed as [`Command::BusGap`].
async fn fill<S: EventSource + ?Sized>(
    inner: &Inner,
    src: &mut S,
    from: u64,
    to: u64,
    max: usize,
) -> Result<(), String> {
    tracing::warn!(
        from,
        to,
        "the bus consumer skipped stream sequences; reading them back from the stream"
    );
    let mut seq = from;
    while seq <= to {
        let mut found = Vec::new();
        let mut bytes = 0;
        let mut missing: Option<(u64, u64)> = None;
        while seq <= to && found.len() < max.max(1) && bytes < MAX_ENTRY_BYTES {
            match src.get(seq).await.map_err(|e| e.to_string())? {
                Some(stored) => {
                    if missing.is_some() {
                        break;
                    }
                    bytes += stored.data.len();
                    for (_, data) in custos_core::bus::unbatch(&stored.subject, &stored.data) {
                        found.push(IngestItem {
                            data: data.to_vec(),
                            bus_seq: seq,
                        });
                    }
                }
                None => {
                    if !found.is_empty() {
                        break;
                    }
                    missing = Some((missing.map_or(seq, |m| m.0), seq));
                }
            }
            seq += 1;
        }
        if let Some((a, b)) = missing {
            tracing::error!(
                from = a,
                to = b,
                "lost before ingest: the stream no longer holds sequences the consumer never delivered; recorded in the log, `custos audit verify` will fail"
            );
            let cmd = Command::BusGap {
                from: a,
                to: b,
                detail: "the JetStream stream answered \"no message found\"".to_string(),
                committed_unix_nano: custos_core::events::now_unix_nano(),
            };
            propose(inner, cmd).await?;
            inner.metrics.add(
                "custos_ingest_events_total",
                &[("result", "lost")],
                b - a + 1,
            );
        }
        if !found.is_empty() {
            let n = found.len() as u64;
            let resp = propose(
                inner,
                Command::Ingest {
                    committed_unix_nano: custos_core::events::now_unix_nano(),
                    items: found,
                },
            )
            .await?;
            count(inner, &resp);
            inner
                .metrics
                .add("custos_ingest_events_total", &[("result", "filled")], n);
        }
    }
    Ok(())
}

/// Propose one command on this node, bounded by [`COMMIT_TIMEOUT`].
async fn propose(inner: &Inner, cmd: Command) -> Result<Response, String> {
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
        Ok(r) => r.map(|r| r.data).map_err(|e| e.to_string()),
        Err(_) => Err(format!("commit did not finish within {COMMIT_TIMEOUT:?}")),
    };
    if res.is_err() {
        write.record("otel.status_code", "ERROR");
        tracing::Span::current().record("otel.status_code", "ERROR");
    }
    res
}

/// Count an ingest outcome in the metrics.
fn count(inner: &Inner, resp: &Response) {
    if let Response::Ingested {
        appended,
        duplicates,
        parked,
        ..
    } = *resp
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
    match propose(inner, cmd).await {
        Ok(resp) => {
            count(inner, &resp);
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

#[cfg(test)]
mod tests {
    use super::{gaps, seq_messages};

    #[test]
    fn the_events_of_one_batch_count_as_one_message() {
        assert_eq!(seq_messages([5, 5, 5, 6, 7, 7].into_iter()), 3);
        assert_eq!(seq_messages([0, 0, 0].into_iter()), 3);
        assert_eq!(seq_messages(std::iter::empty()), 0);
    }

    #[test]
    fn gaps_are_the_sequences_skipped_before_and_inside_a_batch() {
        let mut next = Some(4);
        assert_eq!(gaps(&mut next, [4, 5, 6].into_iter()), vec![]);
        assert_eq!(next, Some(7));
        // Skipped 7..=9 before the batch and 11 inside it.
        assert_eq!(
            gaps(&mut next, [10, 12, 13].into_iter()),
            vec![(7, 9), (11, 11)]
        );
        assert_eq!(next, Some(14));
        // Redeliveries never make a gap, nor move `next` back.
        assert_eq!(gaps(&mut next, [8, 3, 14].into_iter()), vec![]);
        assert_eq!(next, Some(15));
    }

    #[test]
    fn an_unknown_start_or_a_source_without_sequences_never_makes_a_gap() {
        let mut next = None;
        assert_eq!(gaps(&mut next, [100, 101].into_iter()), vec![]);
        assert_eq!(next, Some(102));
        let mut none = None;
        assert_eq!(gaps(&mut none, [0, 0, 0].into_iter()), vec![]);
        assert_eq!(none, None);
    }
}
