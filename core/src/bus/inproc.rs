//! The in-process bus: a bounded queue between publishers and one consumer, for `custos dev` and
//! tests.
//!
//! `publish` waits while the queue is full (back-pressure), then waits for the consumer's verdict:
//! it resolves with `Ok` only once the consumer acked (committed) the event, with
//! [`BusError::Rejected`] when it nacked, and with [`BusError::Closed`] as soon as the consumer is
//! gone or drops the delivery without a verdict. It never hangs on a dead consumer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use custos_proto::Event;
use futures::future::BoxFuture;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::{check_event, subject_for, BusError, Delivery, EventBus, EventSource, PublishAck};

type Verdict = Result<PublishAck, BusError>;

struct Item {
    data: Bytes,
    subject: String,
    reply: oneshot::Sender<Verdict>,
}

/// Publishing half of the in-process bus. Cheap to clone; all clones feed the same
/// [`InProcSource`].
#[derive(Clone)]
pub struct InProcBus {
    tx: mpsc::Sender<Item>,
}

/// Consuming half of the in-process bus.
pub struct InProcSource {
    rx: mpsc::Receiver<Item>,
    seq: Arc<AtomicU64>,
}

impl std::fmt::Debug for InProcBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcBus")
            .field("capacity", &self.tx.max_capacity())
            .field("free", &self.tx.capacity())
            .finish()
    }
}

impl std::fmt::Debug for InProcSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcSource")
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl InProcBus {
    /// A bus that holds at most `capacity` events not yet fetched (at least 1).
    pub fn new(capacity: usize) -> (InProcBus, InProcSource) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            InProcBus { tx },
            InProcSource {
                rx,
                seq: Arc::new(AtomicU64::new(0)),
            },
        )
    }
}

impl EventBus for InProcBus {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<PublishAck, BusError>> {
        Box::pin(async move {
            check_event(event)?;
            let (reply, verdict) = oneshot::channel();
            let item = Item {
                data: Bytes::from(event.encode_to_vec()),
                subject: subject_for(event),
                reply,
            };
            self.tx.send(item).await.map_err(|_| BusError::Closed)?;
            // The sender half is dropped (never answered) when the source or the delivery is
            // dropped: that is `Closed`.
            verdict.await.unwrap_or(Err(BusError::Closed))
        })
    }
}

impl InProcSource {
    fn delivery(&self, item: Item) -> Delivery {
        let stream_seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        Delivery {
            data: item.data,
            subject: item.subject,
            seq: 0,
            acker: super::Acker::InProc(Acker {
                reply: item.reply,
                stream_seq,
            }),
        }
    }
}

impl EventSource for InProcSource {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BusError>> {
        Box::pin(async move {
            if max == 0 {
                return Ok(Vec::new());
            }
            let first = match tokio::time::timeout(wait, self.rx.recv()).await {
                Err(_elapsed) => return Ok(Vec::new()),
                Ok(None) => return Err(BusError::Closed),
                Ok(Some(item)) => item,
            };
            let mut out = Vec::with_capacity(max.min(self.rx.len() + 1));
            out.push(self.delivery(first));
            while out.len() < max {
                match self.rx.try_recv() {
                    Ok(item) => out.push(self.delivery(item)),
                    Err(_) => break,
                }
            }
            Ok(out)
        })
    }
}

/// The private verdict channel of an in-process delivery.
pub(super) struct Acker {
    reply: oneshot::Sender<Verdict>,
    stream_seq: u64,
}

impl Acker {
    pub(super) fn ack(self) -> Result<(), BusError> {
        // A publisher that stopped waiting (its future was dropped) does not make the commit
        // fail: the event is committed either way.
        let _ = self.reply.send(Ok(PublishAck {
            stream_seq: self.stream_seq,
            duplicate: false,
        }));
        Ok(())
    }

    pub(super) fn nack(self, reason: &str) -> Result<(), BusError> {
        let _ = self.reply.send(Err(BusError::Rejected(reason.to_string())));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Origin;
    use custos_proto::v1::{event::Payload, SessionStarted};
    use tokio::time::timeout;

    const SHORT: Duration = Duration::from_millis(100);
    const BOUND: Duration = Duration::from_secs(5);

    fn ev(connection: &str) -> Event {
        Origin {
            edge_id: "edge-1".into(),
            identity: "alice".into(),
            connection: connection.into(),
            ..Default::default()
        }
        .event(Payload::SessionStarted(SessionStarted::default()))
    }

    fn spawn_publish(
        bus: &InProcBus,
        event: Event,
    ) -> tokio::task::JoinHandle<Result<PublishAck, BusError>> {
        let bus = bus.clone();
        tokio::spawn(async move { bus.publish(&event).await })
    }

    #[tokio::test]
    async fn publish_resolves_only_after_ack() {
        let (bus, mut source) = InProcBus::new(8);
        let e = ev("prod-pg");
        let mut publishing = spawn_publish(&bus, e.clone());
        assert!(
            timeout(SHORT, &mut publishing).await.is_err(),
            "publish must wait for the consumer"
        );
        let mut got = timeout(BOUND, source.fetch(10, BOUND))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
        let d = got.pop().unwrap();
        assert_eq!(d.subject, "custos.events.session_started.prod-pg");
        assert_eq!(Event::decode(d.data.clone()).unwrap(), e);
        assert!(
            timeout(SHORT, &mut publishing).await.is_err(),
            "fetched but not acked: publish must still wait"
        );
        d.ack().await.unwrap();
        let ack = timeout(BOUND, publishing).await.unwrap().unwrap().unwrap();
        assert_eq!(
            ack,
            PublishAck {
                stream_seq: 1,
                duplicate: false
            }
        );
        // Sequences count up per bus.
        let second = spawn_publish(&bus, ev("x"));
        let d = source.fetch(1, BOUND).await.unwrap().pop().unwrap();
        d.ack().await.unwrap();
        assert_eq!(second.await.unwrap().unwrap().stream_seq, 2);
    }

    #[tokio::test]
    async fn nack_rejects_with_the_reason() {
        let (bus, mut source) = InProcBus::new(8);
        let publishing = spawn_publish(&bus, ev("c"));
        let d = source.fetch(10, BOUND).await.unwrap().pop().unwrap();
        d.nack("event has no payload").await.unwrap();
        let err = timeout(BOUND, publishing)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err, BusError::Rejected("event has no payload".into()));
        assert!(err.to_string().contains("event has no payload"));
    }

    #[tokio::test]
    async fn dropping_a_delivery_closes_its_publish() {
        let (bus, mut source) = InProcBus::new(8);
        let publishing = spawn_publish(&bus, ev("c"));
        let d = source.fetch(10, BOUND).await.unwrap();
        drop(d);
        let err = timeout(BOUND, publishing)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err, BusError::Closed);
    }

    #[tokio::test]
    async fn dropping_the_source_closes_queued_and_new_publishes() {
        let (bus, source) = InProcBus::new(8);
        let queued = spawn_publish(&bus, ev("c"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bus.tx.capacity(), 7, "the event is queued");
        drop(source);
        let err = timeout(BOUND, queued).await.unwrap().unwrap().unwrap_err();
        assert_eq!(err, BusError::Closed);
        let err = timeout(BOUND, bus.publish(&ev("c")))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err, BusError::Closed);
    }

    #[tokio::test]
    async fn dropping_the_source_releases_publishers_blocked_on_a_full_queue() {
        let (bus, source) = InProcBus::new(1);
        let first = spawn_publish(&bus, ev("a"));
        let blocked = spawn_publish(&bus, ev("b"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!blocked.is_finished());
        drop(source);
        for h in [first, blocked] {
            let err = timeout(BOUND, h).await.unwrap().unwrap().unwrap_err();
            assert_eq!(err, BusError::Closed);
        }
    }

    #[tokio::test]
    async fn a_full_queue_applies_back_pressure() {
        // Current-thread runtime: nothing runs between the source's receive and its drain, so
        // the drain sees exactly what was queued.
        let (bus, mut source) = InProcBus::new(1);
        let a = spawn_publish(&bus, ev("a"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = spawn_publish(&bus, ev("b"));
        let c = spawn_publish(&bus, ev("c"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bus.tx.capacity(), 0, "the one slot is taken");

        let got = source.fetch(10, BOUND).await.unwrap();
        assert_eq!(got.len(), 1, "only one event fits in a capacity-1 queue");
        assert_eq!(got[0].subject, "custos.events.session_started.a");
        for d in got {
            d.ack().await.unwrap();
        }
        assert_eq!(a.await.unwrap().unwrap().stream_seq, 1);

        // The blocked publishers get in one at a time.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let got = timeout(BOUND, source.fetch(10, BOUND))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got.len(), 1);
            for d in got {
                seen.push(d.subject.clone());
                d.ack().await.unwrap();
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "custos.events.session_started.b",
                "custos.events.session_started.c"
            ]
        );
        assert!(b.await.unwrap().is_ok());
        assert!(c.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn fetch_waits_at_most_wait_and_drains_up_to_max() {
        let (bus, mut source) = InProcBus::new(16);
        let started = tokio::time::Instant::now();
        assert!(source
            .fetch(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty());
        assert!(started.elapsed() < BOUND);
        assert!(source.fetch(0, BOUND).await.unwrap().is_empty());

        let handles: Vec<_> = (0..5)
            .map(|i| spawn_publish(&bus, ev(&i.to_string())))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let first = source.fetch(3, BOUND).await.unwrap();
        assert_eq!(first.len(), 3);
        let rest = source.fetch(10, BOUND).await.unwrap();
        assert_eq!(rest.len(), 2);
        for d in first.into_iter().chain(rest) {
            d.ack().await.unwrap();
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap().unwrap().stream_seq);
        }
        seqs.sort();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn source_reports_closed_when_every_publisher_is_gone() {
        let (bus, mut source) = InProcBus::new(4);
        let other = bus.clone();
        drop(bus);
        assert!(source
            .fetch(1, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty());
        drop(other);
        assert_eq!(source.fetch(1, BOUND).await.unwrap_err(), BusError::Closed);
    }

    #[tokio::test]
    async fn events_without_id_are_refused_before_queueing() {
        let (bus, mut source) = InProcBus::new(4);
        let err = bus.publish(&Event::default()).await.unwrap_err();
        assert!(matches!(err, BusError::Invalid(_)));
        assert!(source.fetch(1, SHORT).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn works_behind_arc_dyn() {
        let (bus, mut source) = InProcBus::new(4);
        let bus: Arc<dyn EventBus> = Arc::new(bus);
        let e = ev("c");
        let publishing = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish(&e).await }
        });
        let d = source.fetch(1, BOUND).await.unwrap().pop().unwrap();
        d.ack().await.unwrap();
        assert!(publishing.await.unwrap().is_ok());
    }
}
