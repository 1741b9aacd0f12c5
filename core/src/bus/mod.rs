//! The event bus: one publishing trait ([`EventBus`]) used by edges, one consuming trait
//! ([`EventSource`]) used by the control-plane leader's ingest loop, and two implementations:
//!
//! - [`inproc`]: a bounded in-process queue for `custos dev` and tests. `publish` returns only once
//!   the consumer has acked (committed) the event, so it has the same "durably accepted" meaning as
//!   the production bus.
//! - [`nats`]: NATS JetStream. `publish` returns once the stream has stored the event (JetStream
//!   ack); the event id is the `Nats-Msg-Id`, so a re-publish within the duplicate window is dropped
//!   by the broker and reported with `duplicate: true`.
//!
//! Every event goes to the subject `custos.events.<kind>.<connection>` ([`subject_for`]).
//!
//! Errors ([`BusError`]) are meant to be shown to operators as they are: each message names the
//! cause and what to check next, and never contains credentials embedded in a URL.

use std::time::Duration;

use custos_proto::Event;
use futures::future::BoxFuture;

pub mod inproc;
pub mod nats;

pub use inproc::{InProcBus, InProcSource};
pub use nats::{NatsBus, NatsConfig, NatsSource, NATS_URL_ENV};

/// Prefix of every event subject; the JetStream stream captures `custos.events.>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "custos.events";

/// Subject of a bus message carrying several events (`custos.v1.EventBatch`).
pub const BATCH_SUBJECT: &str = "custos.events.batch";

/// The events a bus message carries, each with the subject it has on its own: the message itself
/// when it is a single event, or the events of an [`EventBatch`](custos_proto::v1::EventBatch)
/// when it was published on [`BATCH_SUBJECT`]. A batch that does not decode, or is empty, is
/// returned as the single raw message, so the consumer parks it as malformed instead of losing it.
pub fn unbatch(subject: &str, data: &bytes::Bytes) -> Vec<(String, bytes::Bytes)> {
    use prost::Message as _;
    if subject == BATCH_SUBJECT {
        if let Ok(batch) = custos_proto::v1::EventBatch::decode(data.as_ref()) {
            if !batch.events.is_empty() {
                return batch
                    .events
                    .into_iter()
                    .map(|e| (e.subject, bytes::Bytes::from(e.event)))
                    .collect();
            }
        }
    }
    vec![(subject.to_string(), data.clone())]
}

/// Why the bus could not take or hand over an event.
///
/// `Unavailable` and `Timeout` are transient (retry with back-off); `Rejected` and `Invalid` need a
/// change of configuration or input; `Closed` means the other side of the bus is gone for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The broker cannot be reached (cannot connect, connection lost, JetStream not enabled).
    /// `url` never contains credentials.
    #[error(
        "event bus unavailable: NATS at {url}: {detail}; check that nats-server is running with \
         JetStream (-js) and that [bus] url / CUSTOS_NATS_URL points at it"
    )]
    Unavailable { url: String, detail: String },
    /// The broker did not answer in time.
    #[error(
        "event bus timeout: no {what} within {after:?}; the NATS server may be down, overloaded \
         or partitioned; check nats-server health and logs, or raise [bus] publish_timeout_ms"
    )]
    Timeout { what: String, after: Duration },
    /// The broker (or the in-process consumer) answered and refused.
    #[error(
        "event bus rejected the request: {0}; check the nats-server logs and the [bus] settings \
         (stream, replicas, max_age_days) against the existing stream"
    )]
    Rejected(String),
    /// The other side of the bus is gone: the consumer stopped before committing the event (or,
    /// seen from the consumer, every publisher was dropped).
    #[error(
        "event bus closed: the other side of the in-process bus is gone (the consumer stopped \
         before committing the event, or every publisher was dropped); this is expected during \
         shutdown, otherwise check the control-plane logs for why event ingest stopped"
    )]
    Closed,
    /// The request cannot be valid as given (bad configuration or malformed event).
    #[error("event bus: invalid request: {0}; fix the configuration or the event and retry")]
    Invalid(String),
}

impl BusError {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BusError::Unavailable { .. } | BusError::Timeout { .. }
        )
    }
}

/// What the bus reports for an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    /// Sequence of the event in the stream (in-process: a per-bus counter starting at 1).
    pub stream_seq: u64,
    /// The broker had already stored an event with this id (within its duplicate window); this
    /// publish was dropped and `stream_seq` is the sequence of the first one.
    pub duplicate: bool,
}

/// Publishing side, used by edges (and by the control plane for its own events).
pub trait EventBus: Send + Sync + 'static {
    /// Publish one event; resolves once the bus has durably accepted it (JetStream ack;
    /// in-process: committed by the consumer).
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<PublishAck, BusError>>;
}

impl<T: EventBus + ?Sized> EventBus for std::sync::Arc<T> {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<PublishAck, BusError>> {
        (**self).publish(event)
    }
}

impl<T: EventBus + ?Sized> EventBus for Box<T> {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<PublishAck, BusError>> {
        (**self).publish(event)
    }
}

/// The bus subject of an event: `custos.events.<kind>.<connection>`.
///
/// `kind` is [`custos_proto::payload_kind`]; `connection` is made one NATS token: characters
/// other than `[A-Za-z0-9_-]` become `_`, and an empty name becomes `_`.
pub fn subject_for(event: &Event) -> String {
    let kind = custos_proto::payload_kind(event.payload.as_ref());
    format!(
        "{EVENTS_SUBJECT_PREFIX}.{kind}.{}",
        subject_token(&event.connection)
    )
}

/// Make `s` a single NATS subject token.
pub fn subject_token(s: &str) -> String {
    if s.is_empty() {
        return "_".to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Check what every bus requires of an event before it is put on the wire.
fn check_event(event: &Event) -> Result<(), BusError> {
    if event.id.is_empty() {
        return Err(BusError::Invalid(
            "event has no id (the id is the bus de-duplication key); build events with \
             custos_core::events::Origin::event"
                .to_string(),
        ));
    }
    Ok(())
}

/// Consuming side, used by the control-plane leader's ingest loop.
pub trait EventSource: Send + 'static {
    /// Wait at most `wait` for at least one delivery, return up to `max` (may return an empty
    /// `Vec` on timeout).
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BusError>>;

    /// Events the bus still holds for this consumer, as of the last fetch (the consumer lag);
    /// `None` when the source cannot tell.
    fn backlog(&self) -> Option<u64> {
        None
    }

    /// Read the event stored at stream sequence `seq`, whether or not the consumer delivered it:
    /// `Ok(None)` when the stream no longer holds it (deleted, expired, or never stored). The
    /// ingest loop uses this to fill sequences the consumer skipped. Sources without stream
    /// sequences (in-process: every [`Delivery::seq`] is 0) are never asked.
    fn get(&mut self, seq: u64) -> BoxFuture<'_, Result<Option<Stored>, BusError>> {
        Box::pin(async move {
            Err(BusError::Invalid(format!(
                "this event source cannot read stream sequence {seq} directly"
            )))
        })
    }

    /// The stream's last sequence, when the consumer has nothing left to deliver and no delivery
    /// awaits an ack: every sequence up to it was handed out (or skipped). `Ok(None)` when the
    /// consumer is still busy or the source cannot tell. The ingest loop asks while idle, so a
    /// skipped tail (no later event would reveal it) is found too.
    fn settled_tail(&mut self) -> BoxFuture<'_, Result<Option<u64>, BusError>> {
        Box::pin(async { Ok(None) })
    }

    /// How many times this source's connection to the broker has been established, the first
    /// time included. A change means the broker may have restarted, and a broker that lost the
    /// unsynced tail of its stream in a restart hands the lost sequence numbers out again: the
    /// ingest loop then checks the sequences it already applied ([`EventSource::bounds`]).
    /// Sources without a broker connection always say 0.
    fn connects(&self) -> u64 {
        0
    }

    /// The stream's first and last sequence as the broker reports them now; `Ok(None)` for
    /// sources without stream sequences.
    fn bounds(&mut self) -> BoxFuture<'_, Result<Option<(u64, u64)>, BusError>> {
        Box::pin(async { Ok(None) })
    }
}

/// An event read from the stream by sequence ([`EventSource::get`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The encoded `custos.v1.Event`, exactly as published.
    pub data: bytes::Bytes,
    /// The subject it was published on.
    pub subject: String,
}

impl<T: EventSource + ?Sized> EventSource for Box<T> {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BusError>> {
        (**self).fetch(max, wait)
    }

    fn backlog(&self) -> Option<u64> {
        (**self).backlog()
    }

    fn get(&mut self, seq: u64) -> BoxFuture<'_, Result<Option<Stored>, BusError>> {
        (**self).get(seq)
    }

    fn settled_tail(&mut self) -> BoxFuture<'_, Result<Option<u64>, BusError>> {
        (**self).settled_tail()
    }

    fn connects(&self) -> u64 {
        (**self).connects()
    }

    fn bounds(&mut self) -> BoxFuture<'_, Result<Option<(u64, u64)>, BusError>> {
        (**self).bounds()
    }
}

/// One event handed to the consumer. It must be [`ack`](Delivery::ack)ed once committed, or
/// [`nack`](Delivery::nack)ed. Dropping it without either means: in-process, the publisher gets
/// [`BusError::Closed`]; NATS, the event is redelivered after the consumer's ack wait.
pub struct Delivery {
    /// The encoded `custos.v1.Event`.
    pub data: bytes::Bytes,
    /// The subject it was published on.
    pub subject: String,
    /// Its sequence in the stream (JetStream stream sequence; 0 for the in-process bus, which
    /// has no stream to read back from).
    pub seq: u64,
    acker: Acker,
}

enum Acker {
    InProc(inproc::Acker),
    Nats(Box<nats::Acker>),
    /// An event of a batch other than its last: the batch's message is acknowledged with its last
    /// event. Consumers commit in delivery order, so when the last event is acked the earlier ones
    /// are committed; if any is not, the last is nacked or never acked and the whole batch comes
    /// back (the events already committed are then dropped as duplicates).
    InBatch,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("seq", &self.seq)
            .field("len", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The event is committed: remove it from the stream's pending set (in-process: the
    /// publisher's `publish` resolves with `Ok`).
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acker {
            Acker::InProc(a) => a.ack(),
            Acker::Nats(a) => a.ack().await,
            Acker::InBatch => Ok(()),
        }
    }

    /// The event is not committed: redeliver it later (NATS: negative ack with a short delay;
    /// in-process: the publisher gets [`BusError::Rejected`] with `reason`).
    pub async fn nack(self, reason: &str) -> Result<(), BusError> {
        match self.acker {
            Acker::InProc(a) => a.nack(reason),
            Acker::Nats(a) => a.nack(reason).await,
            Acker::InBatch => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_proto::v1::{event::Payload, SessionStarted};

    fn event(connection: &str, payload: Option<Payload>) -> Event {
        Event {
            id: "x".into(),
            connection: connection.into(),
            payload,
            ..Default::default()
        }
    }

    #[test]
    fn subject_for_sanitizes_the_connection_into_one_token() {
        let p = Some(Payload::SessionStarted(SessionStarted::default()));
        assert_eq!(
            subject_for(&event("prod-pg", p.clone())),
            "custos.events.session_started.prod-pg"
        );
        assert_eq!(
            subject_for(&event("a.b *>c d\té", p.clone())),
            "custos.events.session_started.a_b___c_d__"
        );
        assert_eq!(
            subject_for(&event("", p.clone())),
            "custos.events.session_started._"
        );
        assert_eq!(
            subject_for(&event("Snake_Case-9", None)),
            "custos.events.unknown.Snake_Case-9"
        );
        for s in [
            subject_for(&event("..", p.clone())),
            subject_for(&event(">", p)),
        ] {
            assert_eq!(s.split('.').count(), 4, "{s}");
            assert!(
                !s.contains('>') && !s.contains('*') && !s.contains(' '),
                "{s}"
            );
        }
    }

    #[test]
    fn a_batch_is_unpacked_and_anything_else_is_handed_over_as_it_is() {
        use custos_proto::v1::{BatchedEvent, EventBatch};
        use prost::Message as _;
        let batch = EventBatch {
            events: vec![
                BatchedEvent {
                    subject: "custos.events.command_received.a".into(),
                    event: b"one".to_vec(),
                },
                BatchedEvent {
                    subject: "custos.events.session_ended.b".into(),
                    event: b"two".to_vec(),
                },
            ],
        };
        let data = bytes::Bytes::from(batch.encode_to_vec());
        assert_eq!(
            unbatch(BATCH_SUBJECT, &data),
            vec![
                (
                    "custos.events.command_received.a".to_string(),
                    bytes::Bytes::from_static(b"one")
                ),
                (
                    "custos.events.session_ended.b".to_string(),
                    bytes::Bytes::from_static(b"two")
                ),
            ]
        );
        // The same bytes on an event subject are one event, not a batch.
        let single = "custos.events.command_received.a";
        assert_eq!(
            unbatch(single, &data),
            vec![(single.to_string(), data.clone())]
        );
        // A batch that does not decode, or holds nothing, is kept whole (to be parked).
        for raw in [
            bytes::Bytes::from_static(b"\xff\xff\xff not protobuf"),
            bytes::Bytes::new(),
        ] {
            assert_eq!(
                unbatch(BATCH_SUBJECT, &raw),
                vec![(BATCH_SUBJECT.to_string(), raw.clone())]
            );
        }
    }

    #[test]
    fn events_without_id_are_invalid() {
        assert!(matches!(
            check_event(&Event::default()),
            Err(BusError::Invalid(_))
        ));
        assert!(check_event(&event("c", None)).is_ok());
    }

    #[test]
    fn error_messages_name_cause_and_next_step() {
        let e = BusError::Unavailable {
            url: "nats://127.0.0.1:4222".into(),
            detail: "cannot connect (connection refused)".into(),
        };
        let s = e.to_string();
        assert!(
            s.contains("nats://127.0.0.1:4222") && s.contains("CUSTOS_NATS_URL"),
            "{s}"
        );
        let t = BusError::Timeout {
            what: "JetStream ack".into(),
            after: Duration::from_secs(5),
        }
        .to_string();
        assert!(t.contains("5s") && t.contains("publish_timeout_ms"), "{t}");
        assert!(BusError::Closed.to_string().contains("control-plane logs"));
    }
}
