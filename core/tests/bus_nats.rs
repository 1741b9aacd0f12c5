//! The NATS JetStream bus against a real nats-server (Debian's /usr/sbin/nats-server, 2.9.x).
//!
//! Every test starts its own server on a free port with its own store directory, and kills it
//! when done. Every wait is bounded.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_core::bus::{
    BusError, Delivery, EventBus, EventSource, NatsBus, NatsConfig, NatsSource,
};
use custos_core::events::Origin;
use custos_core::proto::v1::{event::Payload, CommandReceived};
use custos_core::proto::Event;
use prost::Message;

const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// Upper bound for anything that should be quick.
const BOUND: Duration = Duration::from_secs(20);

/// A nats-server child process, killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    jetstream: bool,
}

impl Server {
    fn start() -> Server {
        Server::start_with(true)
    }

    fn start_with(jetstream: bool) -> Server {
        let store = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut server = Server {
            child: None,
            port,
            store,
            jetstream,
        };
        server.spawn();
        server
    }

    fn log_path(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
    }

    /// (Re)start the process on the same port and store.
    fn spawn(&mut self) {
        assert!(
            Path::new(NATS_SERVER).exists(),
            "{NATS_SERVER} is missing; install Debian's nats-server package"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(NATS_SERVER);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.store.path().join("js"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                panic!("nats-server did not listen on {addr} within 10s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn config(&self) -> NatsConfig {
        NatsConfig {
            url: self.url(),
            ..Default::default()
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

fn event(n: usize) -> Event {
    Origin {
        edge_id: "edge-1".into(),
        session_id: custos_core::events::new_id(),
        identity: "alice".into(),
        connection: "prod-pg".into(),
    }
    .event(Payload::CommandReceived(CommandReceived {
        command_id: n.to_string(),
        text: format!("select {n}"),
        ..Default::default()
    }))
}

fn decode(d: &Delivery) -> Event {
    Event::decode(d.data.clone()).expect("a custos.v1.Event")
}

/// Fetch until `n` deliveries arrived (or `BOUND` passed).
async fn fetch_n(source: &mut NatsSource, n: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + BOUND;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} deliveries within {BOUND:?}",
            out.len()
        );
        let got = bounded("fetch", source.fetch(n - out.len(), Duration::from_secs(2)))
            .await
            .expect("fetch");
        out.extend(got);
    }
    out
}

async fn ack_all(deliveries: Vec<Delivery>) {
    for d in deliveries {
        bounded("ack", d.ack()).await.expect("ack");
    }
}

/// Once everything is acked: nothing comes back, not even after the ack wait, and the consumer
/// has no ack pending. Returns the consumer's state for further checks.
async fn assert_nothing_redelivered(
    source: &mut NatsSource,
) -> async_nats::jetstream::consumer::Info {
    let again = bounded("fetch", source.fetch(100, Duration::from_secs(2)))
        .await
        .unwrap();
    assert!(again.is_empty(), "{} redelivered after ack", again.len());
    let info = bounded("consumer info", source.consumer().info())
        .await
        .unwrap()
        .clone();
    assert_eq!(info.num_ack_pending, 0);
    info
}

/// How many events share each stream sequence (the events of one batch share it).
fn per_seq(seqs: impl Iterator<Item = u64>) -> std::collections::BTreeMap<u64, usize> {
    let mut out = std::collections::BTreeMap::new();
    for seq in seqs {
        *out.entry(seq).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn publishes_500_and_reads_them_all_back_once() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();

    // The stream is what we asked for, on nats-server 2.9.
    let info = bus
        .jetstream()
        .get_stream("CUSTOS_EVENTS")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.subjects, ["custos.events.>"]);
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 86_400));

    // Short ack wait, so events whose ack got lost would be back by the final fetch.
    let mut source = bounded("source", bus.source("ingest", Duration::from_secs(1)))
        .await
        .unwrap();

    let mut sent = BTreeSet::new();
    for n in 0..500 {
        let e = event(n);
        let ack = bounded("publish", bus.publish(&e)).await.unwrap();
        assert_eq!(ack.stream_seq, n as u64 + 1);
        assert!(!ack.duplicate);
        sent.insert(e.id);
    }

    let got = fetch_n(&mut source, 500).await;
    let mut received = BTreeSet::new();
    for d in &got {
        let e = decode(d);
        assert_eq!(d.subject, "custos.events.command_received.prod-pg");
        assert!(received.insert(e.id), "delivered twice");
    }
    assert_eq!(received, sent);
    ack_all(got).await;

    // Nothing left, not even after the ack wait.
    let info = assert_nothing_redelivered(&mut source).await;
    assert_eq!(info.num_pending, 0);
    assert_eq!(info.delivered.stream_sequence, 500);
}

/// Publish `n` events at once; returns them with their acks.
async fn publish_concurrently(bus: &NatsBus, n: usize) -> Vec<(Event, u64)> {
    let events: Vec<Event> = (0..n).map(event).collect();
    let acks = bounded(
        "concurrent publishes",
        futures::future::join_all(events.iter().map(|e| bus.publish(e))),
    )
    .await;
    events
        .into_iter()
        .zip(acks)
        .map(|(e, ack)| {
            let ack = ack.expect("publish");
            assert!(!ack.duplicate);
            (e, ack.stream_seq)
        })
        .collect()
}

async fn stream_messages(bus: &NatsBus) -> u64 {
    let mut stream = bus.jetstream().get_stream("CUSTOS_EVENTS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn concurrent_publishes_share_bus_messages_and_are_handed_over_one_by_one() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let mut source = bus.source("ingest", Duration::from_secs(1)).await.unwrap();

    let sent = publish_concurrently(&bus, 400).await;
    let messages = stream_messages(&bus).await;
    assert!(
        messages <= 200,
        "400 events published at once took {messages} bus messages; they should be batched"
    );
    // Events of one batch share its stream sequence, and no batch exceeds the maximum.
    let per_seq = per_seq(sent.iter().map(|(_, seq)| *seq));
    assert_eq!(per_seq.len() as u64, messages);
    assert!(per_seq.values().all(|n| *n <= 64), "{per_seq:?}");

    // The consumer sees each event on its own, with its own subject and the batch's sequence.
    let got = fetch_n(&mut source, 400).await;
    assert_eq!(got.len(), 400);
    let seq_of: std::collections::HashMap<String, u64> =
        sent.iter().map(|(e, s)| (e.id.clone(), *s)).collect();
    let mut received = BTreeSet::new();
    for d in &got {
        let e = decode(d);
        assert_eq!(d.subject, "custos.events.command_received.prod-pg");
        assert_eq!(Some(&d.seq), seq_of.get(&e.id), "event {}", e.id);
        assert!(received.insert(e.id), "delivered twice");
    }
    assert_eq!(received.len(), 400);
    ack_all(got).await;
    assert_nothing_redelivered(&mut source).await;
}

#[tokio::test]
async fn a_batch_comes_back_whole_unless_its_last_event_is_acked() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let mut source = bus.source("ingest", Duration::from_secs(1)).await.unwrap();
    publish_concurrently(&bus, 50).await;
    let got = fetch_n(&mut source, 50).await;

    // The largest batch: ack all of its events but the last; ack every other event.
    let per_seq = per_seq(got.iter().map(|d| d.seq));
    let (&batch_seq, &size) = per_seq.iter().max_by_key(|(_, n)| **n).unwrap();
    assert!(
        size > 1,
        "no batch among 50 concurrent publishes: {per_seq:?}"
    );
    let expected: BTreeSet<String> = got
        .iter()
        .filter(|d| d.seq == batch_seq)
        .map(|d| decode(d).id)
        .collect();
    let mut seen = 0;
    for d in got {
        if d.seq == batch_seq {
            seen += 1;
            if seen == size {
                drop(d); // the last: neither ack nor nack
                continue;
            }
        }
        bounded("ack", d.ack()).await.unwrap();
    }

    // After the ack wait, the whole batch is back, and nothing else.
    let back = fetch_n(&mut source, size).await;
    let ids: BTreeSet<String> = back.iter().map(|d| decode(d).id).collect();
    assert_eq!(ids, expected);
    assert_eq!(back.len(), size);
    ack_all(back).await;
    assert_nothing_redelivered(&mut source).await;
}

#[tokio::test]
async fn publish_batch_max_1_sends_every_event_alone() {
    let server = Server::start();
    let cfg = NatsConfig {
        publish_batch_max: 1,
        ..server.config()
    };
    let bus = bounded("connect", NatsBus::connect(cfg)).await.unwrap();
    let sent = publish_concurrently(&bus, 100).await;
    assert_eq!(stream_messages(&bus).await, 100);
    let seqs: BTreeSet<u64> = sent.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs.len(), 100);
}

#[tokio::test]
async fn fetch_returns_as_soon_as_something_is_there() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let mut source = bus.source("ingest", Duration::from_secs(30)).await.unwrap();

    // Empty: waits about `wait`, returns nothing.
    let started = Instant::now();
    let none = bounded("fetch", source.fetch(10, Duration::from_millis(500)))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );

    // One event there and `max` 100: does not wait to fill the batch.
    bus.publish(&event(1)).await.unwrap();
    let started = Instant::now();
    let got = bounded("fetch", source.fetch(100, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fetch waited {:?} for a full batch",
        started.elapsed()
    );

    // An event published while fetch waits is returned promptly.
    let publisher = bus.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        publisher.publish(&event(2)).await
    });
    let started = Instant::now();
    let got2 = bounded("fetch", source.fetch(100, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(got2.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    late.await.unwrap().unwrap();
    ack_all(got.into_iter().chain(got2).collect()).await;
}

#[tokio::test]
async fn the_same_event_id_is_stored_once() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let mut source = bus.source("ingest", Duration::from_secs(1)).await.unwrap();

    let e = event(7);
    let first = bounded("publish", bus.publish(&e)).await.unwrap();
    let second = bounded("publish", bus.publish(&e)).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "the broker must drop the re-publish");
    assert_eq!(second.stream_seq, first.stream_seq);
    let other = bounded("publish", bus.publish(&event(8))).await.unwrap();
    assert_eq!(other.stream_seq, first.stream_seq + 1);

    let got = fetch_n(&mut source, 2).await;
    let ids: Vec<_> = got.iter().map(|d| decode(d).id).collect();
    assert_eq!(ids.iter().filter(|id| **id == e.id).count(), 1);
    ack_all(got).await;
    let more = source.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert!(more.is_empty(), "{} extra deliveries", more.len());
}

#[tokio::test]
async fn unacked_events_come_back_after_the_ack_wait() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let ack_wait = Duration::from_secs(1);
    let mut source = bus.source("ingest", ack_wait).await.unwrap();

    let e = event(1);
    bus.publish(&e).await.unwrap();
    let got = fetch_n(&mut source, 1).await;
    let delivered_at = Instant::now();
    drop(got); // neither ack nor nack

    let soon = source.fetch(10, Duration::from_millis(300)).await.unwrap();
    assert!(soon.is_empty(), "redelivered before the ack wait");
    let back = fetch_n(&mut source, 1).await;
    assert_eq!(decode(&back[0]).id, e.id);
    let after = delivered_at.elapsed();
    assert!(
        after >= ack_wait.mul_f32(0.9) && after < ack_wait * 5,
        "{after:?}"
    );
    ack_all(back).await;
    let none = source.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert!(none.is_empty(), "redelivered after ack");
}

#[tokio::test]
async fn nacked_events_come_back_without_waiting_for_the_ack_wait() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    // Long ack wait: only the nack can bring an event back during this test.
    let mut source = bus.source("ingest", Duration::from_secs(60)).await.unwrap();

    let (a, b) = (event(1), event(2));
    bus.publish(&a).await.unwrap();
    bus.publish(&b).await.unwrap();
    let got = fetch_n(&mut source, 2).await;
    let mut held = Vec::new();
    for d in got {
        if decode(&d).id == a.id {
            bounded("nack", d.nack("raft not ready")).await.unwrap();
        } else {
            held.push(d); // b: neither ack nor nack
        }
    }
    assert_eq!(held.len(), 1);

    let back = fetch_n(&mut source, 1).await;
    assert_eq!(decode(&back[0]).id, a.id, "the nacked event comes back");
    ack_all(back).await;
    let none = source.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert!(
        none.is_empty(),
        "only the nacked event comes back before the ack wait"
    );
    ack_all(held).await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_promptly() {
    let port = free_port(); // nobody listens there
    let url = format!("nats://alice:s3cret@127.0.0.1:{port}");
    let cfg = NatsConfig {
        url,
        connect_timeout_ms: 1000,
        ..Default::default()
    };
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), NatsBus::connect(cfg))
        .await
        .expect("connect must not hang on an unreachable server")
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, BusError::Unavailable { .. }), "{err:?}");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&format!("nats://127.0.0.1:{port}")), "{msg}");
    assert!(
        msg.contains("nats-server") && msg.contains("CUSTOS_NATS_URL"),
        "{msg}"
    );
    assert!(!msg.contains("s3cret") && !msg.contains("alice"), "{msg}");
}

#[tokio::test]
async fn a_server_without_jetstream_is_named() {
    let server = Server::start_with(false);
    let err = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Unavailable { .. }), "{err:?}");
    eprintln!("{err}");
    assert!(err.to_string().contains("-js"), "{err}");
}

#[tokio::test]
async fn publish_fails_in_bounded_time_when_the_server_dies_and_recovers_after() {
    let mut server = Server::start();
    let cfg = NatsConfig {
        publish_timeout_ms: 1500,
        ..server.config()
    };
    let bus = bounded("connect", NatsBus::connect(cfg)).await.unwrap();
    bus.publish(&event(1)).await.unwrap();

    server.kill();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_millis(1500 + 2000), bus.publish(&event(2)))
        .await
        .expect("publish must not hang when the server is gone")
        .unwrap_err();
    assert!(
        matches!(err, BusError::Timeout { .. } | BusError::Unavailable { .. }),
        "{err:?}"
    );
    eprintln!("{err}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_millis(3500));

    // Same port, same store: the client reconnects and the stream is still there.
    server.spawn();
    let deadline = Instant::now() + BOUND;
    let ack = loop {
        match bus.publish(&event(3)).await {
            Ok(ack) => break ack,
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_transient(), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery within {BOUND:?}: {e}"),
        }
    };
    assert!(ack.stream_seq >= 2, "{ack:?}");
}

#[tokio::test]
async fn a_durable_source_created_twice_binds_to_the_same_consumer() {
    let server = Server::start();
    let bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let mut first = bus.source("ingest", Duration::from_secs(30)).await.unwrap();
    for n in 0..4 {
        bus.publish(&event(n)).await.unwrap();
    }
    let got = fetch_n(&mut first, 4).await;
    let mut got = got.into_iter();
    ack_all(got.by_ref().take(2).collect()).await;
    let _held: Vec<_> = got.collect(); // two left pending on the consumer

    // Another process (e.g. a new leader) binding the same durable name.
    let other_bus = bounded("connect", NatsBus::connect(server.config()))
        .await
        .unwrap();
    let mut second = other_bus
        .source("ingest", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(second.durable(), "ingest");
    let info = bounded("consumer info", second.consumer().info())
        .await
        .unwrap()
        .clone();
    assert_eq!(info.name, "ingest");
    assert_eq!(
        info.delivered.stream_sequence, 4,
        "a fresh consumer would have delivered nothing"
    );
    assert_eq!(info.num_ack_pending, 2);

    let stream = bus.jetstream().get_stream("CUSTOS_EVENTS").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.consumer_count, 1);

    // Nothing new for the second handle: the two acked ones are done, the two held are pending.
    let none = second.fetch(10, Duration::from_millis(500)).await.unwrap();
    assert!(none.is_empty());
}
