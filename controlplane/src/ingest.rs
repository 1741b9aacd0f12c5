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
    let linger_for = Duration::from_millis(inner.config.bus.batch_linger_ms);
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
    // A new term may follow a broker restart this node did not see: check what is applied once.
    let mut rewound = Rewound::default();
    rewound.arm(inner.store.bus_high(), inner.store.bus_high());
    let mut connects = src.connects();
    while inner.is_leader() && !*shutdown.borrow() {
        if rewound.due() && !check_rewound(inner, src, &mut rewound, max).await {
            backlog(None);
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        let batch = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            b = src.fetch(max, Duration::from_millis(200)) => b,
        };
        backlog(src.backlog());
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "ingest fetch failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        linger(src, &mut batch, max, linger_for).await;
        if src.connects() != connects {
            // The connection came back since the last fetch: the broker may have restarted. What
            // is applied is `bus_high`; this batch may hold deliveries from either side of the
            // reconnect, so its sequences are watched too.
            connects = src.connects();
            let applied = inner.store.bus_high();
            let fetched = batch.iter().map(|d| d.seq).max().unwrap_or(0);
            rewound.arm(applied, applied.max(fetched));
        }
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

/// After the first deliveries of a batch, wait up to `within` for more, until `max`: a busy bus is
/// then committed in fewer, larger Raft entries. A fetch error ends the wait; what was gathered
/// is committed, and the next fetch meets the error again.
async fn linger<S: EventSource + ?Sized>(
    src: &mut S,
    batch: &mut Vec<custos_core::bus::Delivery>,
    max: usize,
    within: Duration,
) {
    if batch.is_empty() || within.is_zero() {
        return;
    }
    let until = tokio::time::Instant::now() + within;
    while batch.len() < max {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match src.fetch(max - batch.len(), left).await {
            Ok(more) if !more.is_empty() => batch.extend(more),
            _ => return,
        }
    }
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

/// How often an armed [`Rewound`] check runs, until it finds the stream back past its mark.
const REWOUND_CHECK: Duration = Duration::from_millis(200);
/// Most stream sequences one [`check_rewound`] reads, so a check of a stream that lost a very long
/// tail cannot stall the ingest loop; the next check goes on.
const REWOUND_SCAN_MAX: u64 = 10_000;

/// A watch over stream sequences already applied, after the broker may have restarted.
///
/// A broker that loses the unsynced tail of a stream in a restart (nats-server 2.9 does not sync
/// each write; stop every server of a cluster at once and the last writes can be gone) numbers
/// the next messages from where its stream now ends. So events published
/// after the restart are stored at sequences this node already applied, and the durable
/// consumer, whose position survived the restart, never delivers them. Neither the gap check
/// nor the tail check looks below `bus_high`. This watch does: from its top down, every stored
/// message whose events are not all in the log is read back and committed, until a message at or
/// below `applied` whose events all are. It stays armed until the stream's last sequence reaches
/// the top again, because sequences at or below it are reused only until then.
#[derive(Debug, Default)]
struct Rewound {
    /// `(applied, top)`: every sequence up to `applied` was in the log when the watch was armed;
    /// sequences up to `top` may have been handed out before the restart. `None`: disarmed.
    marks: Option<(u64, u64)>,
    last: Option<tokio::time::Instant>,
    /// Sequences read back under this watch (their events may be malformed, and so never in the
    /// log): not read back twice.
    filled: std::collections::HashSet<u64>,
}

impl Rewound {
    /// Watch sequences up to `top`, of which those up to `applied` are in the log; nothing
    /// before the first bus event.
    fn arm(&mut self, applied: u64, top: u64) {
        if top == 0 {
            return;
        }
        self.marks = Some(match self.marks {
            Some((a, t)) => (a.min(applied), t.max(top)),
            None => (applied, top),
        });
        self.last = None;
    }

    fn due(&self) -> bool {
        self.marks.is_some() && self.last.is_none_or(|t| t.elapsed() >= REWOUND_CHECK)
    }
}

/// Whether every event of a stored message is in the log already.
fn logged(inner: &Inner, stored: &custos_core::bus::Stored) -> bool {
    use prost::Message as _;
    custos_core::bus::unbatch(&stored.subject, &stored.data)
        .iter()
        .all(|(_, data)| {
            custos_proto::v1::Event::decode(data.as_ref())
                .is_ok_and(|e| inner.store.audit_seq_of(&e.id).is_some())
        })
}

/// Run an armed [`Rewound`] check once: read back and commit the events stored at reused
/// sequences. False when the stream could not be read or the commit failed (the caller steps
/// back and the next term checks again).
async fn check_rewound<S: EventSource + ?Sized>(
    inner: &Inner,
    src: &mut S,
    watch: &mut Rewound,
    max: usize,
) -> bool {
    let Some((applied, mark)) = watch.marks else {
        return true;
    };
    watch.last = Some(tokio::time::Instant::now());
    // The stream's state first: when it has reached the mark, nothing at or below the mark can
    // be reused after this scan, and the watch ends with it.
    let (first, last) = match src.bounds().await {
        Ok(Some(b)) => b,
        Ok(None) => {
            watch.marks = None;
            return true;
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not read the stream's bounds; checking again later");
            return true;
        }
    };
    let top = mark.min(last);
    let floor = first.max(1);
    let mut found = Vec::new();
    let mut seq = top;
    let mut read = 0;
    let mut complete = true;
    while seq >= floor {
        // Read back by an earlier check: skipped (a malformed event there is never in the log).
        if !watch.filled.contains(&seq) {
            if read == REWOUND_SCAN_MAX {
                complete = false;
                break;
            }
            read += 1;
            match src.get(seq).await {
                Ok(Some(stored)) => match logged(inner, &stored) {
                    // Below the reused run: applied before the restart, still in the stream.
                    true if seq <= applied => break,
                    // Delivered after the reconnect, and applied already.
                    true => {}
                    false => found.push((seq, stored)),
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, seq, "could not read back a stream sequence the broker may have reused; retrying");
                    return false;
                }
            }
        }
        seq -= 1;
    }
    if !found.is_empty() {
        found.reverse();
        let (from, to) = (found[0].0, found[found.len() - 1].0);
        tracing::error!(
            from,
            to,
            mark,
            stream_last = last,
            "the bus reused stream sequences this node had already applied (it lost the tail of its stream in a restart); reading the events stored there back"
        );
        let mut items = Vec::new();
        let mut bytes = 0;
        for (seq, stored) in found {
            watch.filled.insert(seq);
            for (_, data) in custos_core::bus::unbatch(&stored.subject, &stored.data) {
                bytes += data.len();
                items.push(IngestItem {
                    data: data.to_vec(),
                    bus_seq: seq,
                });
            }
            if items.len() >= max.max(1) || bytes >= MAX_ENTRY_BYTES {
                if !commit_reused(inner, std::mem::take(&mut items)).await {
                    return false;
                }
                bytes = 0;
            }
        }
        if !items.is_empty() && !commit_reused(inner, items).await {
            return false;
        }
    }
    if last >= mark && complete {
        watch.marks = None;
        watch.filled.clear();
    }
    true
}

/// Commit events read back from the stream (by [`fill`] or [`check_rewound`]); counted under
/// `result`.
async fn commit_read_back(
    inner: &Inner,
    items: Vec<IngestItem>,
    result: &str,
) -> Result<(), String> {
    let n = items.len() as u64;
    let cmd = Command::Ingest {
        committed_unix_nano: custos_core::events::now_unix_nano(),
        items,
    };
    let resp = propose(inner, cmd).await?;
    count(inner, &resp);
    inner
        .metrics
        .add("custos_ingest_events_total", &[("result", result)], n);
    Ok(())
}

/// [`commit_read_back`] for [`check_rewound`]: false (and a warning) when the commit failed.
async fn commit_reused(inner: &Inner, items: Vec<IngestItem>) -> bool {
    match commit_read_back(inner, items, "reused").await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not commit events read back from the stream; retrying");
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
            commit_read_back(inner, found, "filled").await?;
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
    use super::{gaps, linger, seq_messages, Rewound};
    use custos_core::bus::{EventBus, EventSource, InProcBus};
    use std::time::Duration;

    /// Publish one event after `after` (on paused time); the in-process bus holds the publish
    /// until the event is acked, so each publish is its own task.
    fn publish_later(bus: &InProcBus, after: Duration, id: &str) {
        let bus = bus.clone();
        let ev = custos_proto::v1::Event {
            id: id.to_string(),
            ..Default::default()
        };
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = bus.publish(&ev).await;
        });
    }

    fn ids(batch: &[custos_core::bus::Delivery]) -> Vec<String> {
        use prost::Message as _;
        batch
            .iter()
            .map(|d| custos_proto::v1::Event::decode(d.data.as_ref()).unwrap().id)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_lingers_for_what_arrives_within_the_window_and_no_longer() {
        let (bus, mut src) = InProcBus::new(64);
        publish_later(&bus, Duration::ZERO, "a");
        publish_later(&bus, Duration::from_millis(1), "b");
        publish_later(&bus, Duration::from_millis(10), "c");
        let mut batch = src.fetch(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(ids(&batch), ["a"]);
        linger(&mut src, &mut batch, 10, Duration::ZERO).await;
        assert_eq!(ids(&batch), ["a"], "no linger: committed as fetched");
        linger(&mut src, &mut batch, 10, Duration::from_millis(2)).await;
        assert_eq!(ids(&batch), ["a", "b"], "b came within 2 ms, c did not");
        linger(&mut src, &mut batch, 2, Duration::from_secs(1)).await;
        assert_eq!(ids(&batch), ["a", "b"], "a full batch does not wait");
        let mut empty = Vec::new();
        linger(&mut src, &mut empty, 10, Duration::from_secs(1)).await;
        assert!(empty.is_empty(), "nothing fetched, nothing to wait for");
        let rest = src.fetch(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(ids(&rest), ["c"]);
    }

    #[test]
    fn a_rewound_watch_widens_to_cover_every_reconnect() {
        let mut w = Rewound::default();
        w.arm(0, 0);
        assert_eq!(w.marks, None, "nothing applied, nothing to watch");
        assert!(!w.due());
        w.arm(5, 5);
        assert_eq!(w.marks, Some((5, 5)));
        assert!(w.due());
        // A second reconnect before the stream came back: the lower applied mark and the
        // higher top both stay watched.
        w.arm(7, 9);
        assert_eq!(w.marks, Some((5, 9)));
        w.arm(6, 6);
        assert_eq!(w.marks, Some((5, 9)));
        w.last = Some(tokio::time::Instant::now());
        assert!(!w.due(), "checked just now");
        w.arm(8, 8);
        assert!(w.due(), "a new reconnect is checked at once");
    }

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
