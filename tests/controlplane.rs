//! Control-plane behaviour against real processes: recovery from log and snapshot, joining a node,
//! tamper detection, bad input, and `custos dev`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use common::*;
use custos_core::bus::{EventBus, NatsBus, NatsConfig};
use custos_core::events::Origin;
use custos_proto::v1::{event::Payload, AuditRecord, CommandReceived, SessionStarted};
use prost::Message;

async fn head(server: &str) -> u64 {
    client(server)
        .await
        .status()
        .await
        .map(|s| s.audit_head_seq)
        .unwrap_or(0)
}

/// A bus client publishing as an edge would, and the origin its events carry.
async fn publisher(nats: &Nats, identity: &str, connection: &str) -> Result<(NatsBus, Origin)> {
    let bus = NatsBus::connect(NatsConfig {
        url: nats.url(),
        ..Default::default()
    })
    .await?;
    let origin = Origin {
        edge_id: "e".into(),
        identity: identity.into(),
        connection: connection.into(),
        ..Default::default()
    };
    Ok((bus, origin))
}

async fn issue_tokens(server: &str, n: usize) -> Result<()> {
    let mut c = client(server).await;
    for i in 0..n {
        c.issue_token(format!("svc-{i}"), vec!["agents".into()], 600, vec![])
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_catches_up_from_snapshot_and_a_new_node_joins() -> Result<()> {
    let root = tempfile::tempdir()?;
    // Snapshots every 40 entries, keeping only 5 logs: a node that misses 200 writes needs a snapshot.
    let opts = ClusterOpts {
        nats_url: None,
        snapshot_every: 40,
        keep_logs: 5,
    };
    let mut nodes = cluster(root.path(), &[1, 2, 3, 4], &[1, 2, 3], &opts)?;
    for n in nodes.iter_mut().take(3) {
        n.spawn()?;
    }
    let first3: Vec<&NodeProc> = nodes.iter().take(3).collect();
    eventually(Duration::from_secs(30), "a leader", || async {
        leader(&first3).await.is_some()
    })
    .await?;

    // Writes through any node are forwarded to the leader.
    issue_tokens(&nodes[0].server(), 20).await?;
    issue_tokens(&nodes[2].server(), 20).await?;

    // Stop a follower, write enough to purge the log it would need, restart it.
    let l = leader(&first3).await.unwrap();
    let victim = nodes.iter().take(3).position(|n| n.id != l).unwrap();
    nodes[victim].kill();
    let live = nodes
        .iter()
        .take(3)
        .find(|n| n.id != nodes[victim].id)
        .unwrap()
        .server();
    issue_tokens(&live, 200).await?;
    // `live` may be a follower that has not applied the last commit yet: wait for it.
    eventually(
        Duration::from_secs(10),
        "240 records on the live node",
        || async { head(&live).await >= 240 },
    )
    .await?;
    let want = head(&live).await;
    assert!(want >= 240, "head {want}");
    nodes[victim].spawn()?;
    let vs = nodes[victim].server();
    eventually(
        Duration::from_secs(60),
        "restarted node to catch up",
        || {
            let vs = vs.clone();
            async move { head(&vs).await >= want }
        },
    )
    .await?;
    let st = client(&vs).await.status().await?;
    assert!(
        st.snapshot_index > 0,
        "restarted node should hold a snapshot: {st:?}"
    );
    let (code, out, err) = cli(&vs, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");

    // A fourth node, started with no initial members, joins through `custos cluster add`.
    nodes[3].spawn()?;
    let (code, out, err) = cli(
        &live,
        &["cluster", "add", "--id", "4", "--addr", &nodes[3].addr()],
    );
    assert_eq!(code, 0, "cluster add: {out}{err}");
    assert!(
        out.contains("4 127.0.0.1") && out.contains("voter"),
        "{out}"
    );
    let n4 = nodes[3].server();
    eventually(Duration::from_secs(60), "node 4 to catch up", || {
        let n4 = n4.clone();
        async move { head(&n4).await >= want }
    })
    .await?;
    let (code, out, err) = cli(&n4, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&n4, &["cluster", "status"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("voter").count(), 4, "{out}");

    // Remove the node that was stopped earlier (sent to any node, executed by the leader).
    let gone = nodes[victim].id.to_string();
    let (code, out, err) = cli(&n4, &["cluster", "remove", "--id", &gone]);
    assert_eq!(code, 0, "cluster remove: {out}{err}");
    assert_eq!(out.matches("voter").count(), 3, "{out}");
    assert!(!out.contains(&format!("\n  {gone} ")), "{out}");
    let (code, _, err) = cli(&n4, &["cluster", "remove", "--id", "99"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a voter"), "{err}");
    Ok(())
}

/// A node started before NATS (a host booting, a JetStream cluster still electing) waits for it
/// and then serves, instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_waits_for_it() -> Result<()> {
    let nats_port = free_port();
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(
        root.path(),
        &[1],
        &[1],
        &ClusterOpts {
            nats_url: Some(format!("nats://127.0.0.1:{nats_port}")),
            ..Default::default()
        },
    )?;
    let mut node = nodes.remove(0);
    // `spawn` returns once the node listens, which it does only after the bus is connected.
    let starting = std::thread::spawn(move || node.spawn().map(|_| node));
    std::thread::sleep(Duration::from_secs(3));
    let _nats = Nats::start_on(nats_port)?;
    let node = starting.join().expect("spawn thread")?;
    eventually(Duration::from_secs(20), "a leader", || async {
        leader(&[&node]).await == Some(1)
    })
    .await?;
    let log = node.log();
    assert!(log.contains("event bus not ready; retrying"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_a_stored_record_is_detected_and_named() -> Result<()> {
    use custos_controlplane::types::{Command as Cmd, IngestItem};
    let root = tempfile::tempdir()?;
    let mut cfg = custos_controlplane::ControlPlaneConfig::default();
    cfg.node.listen = "127.0.0.1:0".into();
    cfg.node.data_dir = root.path().to_path_buf();
    cfg.node.admin_token_file = Some(root.path().join("admin.token"));
    std::fs::write(root.path().join("admin.token"), ADMIN_TOKEN)?;
    cfg.bus.kind = custos_controlplane::config::BusKind::None;
    cfg.cluster
        .initial_members
        .insert("1".into(), "127.0.0.1:0".into());
    let node = custos_controlplane::ControlPlane::start(cfg, custos_controlplane::EventInput::None)
        .await?;
    let server = format!("http://{}", node.addr());
    eventually(Duration::from_secs(10), "leadership", || async {
        node.raft().current_leader().await == Some(1)
    })
    .await?;

    let origin = Origin {
        edge_id: "e".into(),
        identity: "alice".into(),
        ..Default::default()
    };
    let items = (0..100)
        .map(|_| IngestItem {
            data: origin
                .event(Payload::SessionStarted(SessionStarted::default()))
                .encode_to_vec(),
            bus_seq: 0,
        })
        .collect();
    node.write(Cmd::Ingest {
        committed_unix_nano: 1,
        items,
    })
    .await?;
    let (code, out, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("holds 100 records"), "{out}");

    // Edit one byte of record 37's event.
    let store = node.store().clone();
    let original = store.audit_range(37, 1).remove(0);
    let mut edited = original.clone();
    edited.event[5] ^= 0x20;
    store.raw_audit_put(37, Some(&edited.encode_to_vec()))?;
    let (code, out, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("seq 37 (hash_mismatch)"), "{out}");

    // Restore it, then delete record 58.
    store.raw_audit_put(37, Some(&original.encode_to_vec()))?;
    assert_eq!(cli(&server, &["audit", "verify"]).0, 0);
    store.raw_audit_put(58, None)?;
    let (code, out, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(code, 1);
    assert!(out.contains("seq 58 (missing)"), "{out}");

    // Replace record 58 with a re-hashed forgery: the next link breaks.
    let r57: AuditRecord = store.audit_range(57, 1).remove(0);
    let forged = custos_core::audit::next_record(58, 1, &r57.hash, "forged-id", b"forged".to_vec());
    store.raw_audit_put(58, Some(&forged.encode_to_vec()))?;
    let (code, out, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(code, 1);
    assert!(out.contains("seq 59 (chain_broken)"), "{out}");

    // Delete the last record: the tail cut is detected against the stored head.
    let r58 = store.audit_range(58, 1);
    assert!(!r58.is_empty());
    node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_parked_and_do_not_block_ingest() -> Result<()> {
    let OneNode {
        nodes: _nodes,
        server,
        bus,
        origin,
        _root,
        _nats,
    } = one_node_over_nats().await?;
    let js = bus.jetstream().clone();
    let mut good = 0;
    for i in 0..60 {
        if i % 10 == 3 {
            // Garbage bytes, an event without payload, and a non-UUID id.
            let junk: Vec<u8> = match i % 3 {
                0 => vec![0xff, 0xfe, 0x01, 0x02],
                1 => custos_proto::v1::Event {
                    id: uuid::Uuid::now_v7().to_string(),
                    ..Default::default()
                }
                .encode_to_vec(),
                _ => custos_proto::v1::Event {
                    id: "not-a-uuid".into(),
                    payload: Some(Payload::SessionStarted(SessionStarted::default())),
                    ..Default::default()
                }
                .encode_to_vec(),
            };
            js.publish(format!("custos.events.junk.{i}"), junk.into())
                .await?
                .await?;
        } else {
            bus.publish(&origin.event(Payload::SessionStarted(SessionStarted::default())))
                .await?;
            good += 1;
        }
    }
    // On the batch subject: bytes that are no batch are parked whole; a batch holding a good and
    // a malformed event commits the good one and parks the other.
    js.publish(
        custos_core::bus::BATCH_SUBJECT,
        vec![0xff, 0xff, 0x07, 0x00].into(),
    )
    .await?
    .await?;
    let batch = custos_proto::v1::EventBatch {
        events: vec![
            custos_proto::v1::BatchedEvent {
                subject: "custos.events.session_started.db".into(),
                event: origin
                    .event(Payload::SessionStarted(SessionStarted::default()))
                    .encode_to_vec(),
            },
            custos_proto::v1::BatchedEvent {
                subject: "custos.events.junk.db".into(),
                event: vec![0xff, 0xfe, 0x01],
            },
        ],
    };
    js.publish(
        custos_core::bus::BATCH_SUBJECT,
        batch.encode_to_vec().into(),
    )
    .await?
    .await?;
    good += 1;
    head_reaches(&server, good, "all good events committed").await?;
    let v = client(&server).await.verify().await?;
    assert!(v.ok, "{v:?}");
    assert_eq!(v.checked, good);
    assert_eq!(v.parked, 8);
    let (_, out, _) = cli(&server, &["audit", "verify"]);
    assert!(out.contains("8 malformed events parked"), "{out}");
    Ok(())
}

/// The consumer skips stream sequences (as JetStream consumers have done after a cluster restart):
/// the leader reads them back from the stream and commits them; one the stream no longer holds is
/// recorded as lost and makes `audit verify` fail, naming the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_consumer_skipped_are_read_back_and_a_lost_one_fails_verify() -> Result<()> {
    let OneNode {
        mut nodes,
        server,
        bus,
        origin,
        _root,
        _nats,
    } = one_node_over_nats().await?;
    let mut ids = Vec::new();
    let mut publish = |n: usize| {
        let evs: Vec<_> = (0..n)
            .map(|_| origin.event(Payload::SessionStarted(SessionStarted::default())))
            .collect();
        ids.extend(evs.iter().map(|e| e.id.clone()));
        evs
    };
    let mut seqs = Vec::new();
    for e in publish(5) {
        seqs.push(bus.publish(&e).await?.stream_seq);
    }
    head_reaches(&server, 5, "the first 5 events committed").await?;
    // The node goes down; 6 more events arrive while it is away. First wait until the server
    // has dropped the dead node's waiting pull request (it expires after 5 s): a message it took
    // would be pending on a dead client, and the side consumer below would skip other sequences
    // than 6..=10.
    nodes[0].kill();
    pull_expired(&bus).await?;
    for e in publish(6) {
        seqs.push(bus.publish(&e).await?.stream_seq);
    }
    assert_eq!(seqs, (1..=11).collect::<Vec<u64>>());
    // Something else moves the durable consumer past sequences 6..=10 without ingesting them,
    // and sequence 10 is then gone from the stream.
    let taken = side_take(&bus, 5).await?;
    assert_eq!(
        taken,
        (6..=10).collect::<Vec<u64>>(),
        "the side consumer took sequences 6..=10"
    );
    let stream = bus.jetstream().get_stream("CUSTOS_EVENTS").await?;
    assert!(stream.delete_message(10).await?);
    nodes[0].spawn()?;
    let got = committed_ids(&server, 10, "the skipped events read back and committed").await?;
    let mut want = ids.clone();
    want.remove(9); // sequence 10
    assert_eq!(
        {
            let mut g = got.clone();
            g.sort();
            g
        },
        {
            let mut w = want.clone();
            w.sort();
            w
        },
        "every event the stream still holds is in the log exactly once"
    );
    // Read-back sequences come before the batch that revealed the gap: stream order is kept.
    assert_eq!(got, want, "records are in stream order");
    let v = client(&server).await.verify().await?;
    assert!(!v.ok, "{v:?}");
    assert_eq!(
        (v.lost, v.reason.as_str(), v.checked),
        (1, "lost_before_ingest", 10)
    );
    let (code, out, _) = cli(&server, &["audit", "verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("1 events the bus acknowledged were lost before ingest"),
        "{out}"
    );
    assert!(
        nodes[0].log().contains("lost before ingest"),
        "the leader's log names the lost sequence: {}",
        nodes[0].log()
    );
    Ok(())
}

/// One control-plane node ingesting from a private nats-server, and a publisher on that server.
/// Fields drop in order: the node before the directory and the server it uses.
struct OneNode {
    nodes: Vec<NodeProc>,
    server: String,
    bus: NatsBus,
    origin: Origin,
    _root: tempfile::TempDir,
    _nats: Nats,
}

async fn one_node_over_nats() -> Result<OneNode> {
    let nats = Nats::start()?;
    let root = tempfile::tempdir()?;
    let opts = ClusterOpts {
        nats_url: Some(nats.url()),
        ..Default::default()
    };
    let mut nodes = cluster(root.path(), &[1], &[1], &opts)?;
    nodes[0].spawn()?;
    let server = nodes[0].server();
    let (bus, origin) = publisher(&nats, "bob", "db").await?;
    Ok(OneNode {
        nodes,
        server,
        bus,
        origin,
        _root: root,
        _nats: nats,
    })
}

/// Wait until `server`'s log holds at least `n` records; their event ids, in log order.
async fn committed_ids(server: &str, n: u64, what: &str) -> Result<Vec<String>> {
    head_reaches(server, n, what).await?;
    let recs = client(server).await.search_after(0, 100).await?;
    Ok(recs.iter().map(|r| r.event_id.clone()).collect())
}

/// Wait up to 30 s until the audit head on `server` reaches `n`.
async fn head_reaches(server: &str, n: u64, what: &str) -> Result<()> {
    eventually(Duration::from_secs(30), what, || {
        let server = server.to_string();
        async move { head(&server).await >= n }
    })
    .await
}

/// Wait until the server has dropped a killed node's waiting pull request (the ingest's pull
/// requests expire after 5 s): a message it took would be pending on a dead client.
async fn pull_expired(bus: &NatsBus) -> Result<()> {
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = bus
        .jetstream()
        .get_stream("CUSTOS_EVENTS")
        .await?
        .get_consumer("custos-controlplane")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while consumer
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .num_waiting
        > 0
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the killed node's pull request was still waiting after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Something other than the ingest moves the durable consumer past the next `n` messages: it
/// takes and acks them. Returns their stream sequences.
async fn side_take(bus: &NatsBus, n: usize) -> Result<Vec<u64>> {
    let consumer: async_nats::jetstream::consumer::PullConsumer = bus
        .jetstream()
        .get_stream("CUSTOS_EVENTS")
        .await?
        .get_consumer("custos-controlplane")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut skipped = consumer
        .fetch()
        .max_messages(n)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut taken = Vec::new();
    while let Some(m) = futures::StreamExt::next(&mut skipped).await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        taken.push(
            m.info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence,
        );
        m.double_ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(taken)
}

/// The consumer skips the stream's last events, and nothing is published after them: no later
/// delivery reveals the gap. The idle ingest finds it (the consumer has nothing left, the stream
/// holds more than was received) and reads the tail back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_tail_is_read_back_while_the_bus_is_idle() -> Result<()> {
    let OneNode {
        mut nodes,
        server,
        bus,
        origin,
        _root,
        _nats,
    } = one_node_over_nats().await?;
    let mut ids = Vec::new();
    for i in 0..7 {
        if i == 3 {
            head_reaches(&server, 3, "the first 3 events committed").await?;
            nodes[0].kill();
            pull_expired(&bus).await?;
        }
        let e = origin.event(Payload::SessionStarted(SessionStarted::default()));
        ids.push(e.id.clone());
        assert_eq!(bus.publish(&e).await?.stream_seq, i + 1);
    }
    assert_eq!(side_take(&bus, 4).await?, (4..=7).collect::<Vec<u64>>());
    nodes[0].spawn()?;
    let got = committed_ids(&server, 7, "the skipped tail read back and committed").await?;
    assert_eq!(got, ids, "every event once, in stream order");
    let v = client(&server).await.verify().await?;
    assert!(v.ok && v.checked == 7, "{v:?}");
    assert!(
        nodes[0].log().contains("skipped stream sequences"),
        "the leader's log says it read sequences back: {}",
        nodes[0].log()
    );
    Ok(())
}

/// nats-server 2.9 can lose the unsynced tail of a stream when its servers stop together. It then
/// numbers new messages from where the stream now ends, while the durable consumer keeps its
/// position: the events stored at the reused sequences are never delivered. Emulated exactly
/// here: across a broker restart the stream's message files are rolled back to a copy taken
/// earlier, and the consumer's state is left as it was.
///
/// With the node up, its leader sees its connection come back; with the node down during the
/// restart, the new term checks on its own. Either way it finds the events at the reused
/// sequences and reads them back: every event is in the log once and verify passes.
async fn events_at_reused_sequences_are_read_back(node_down: bool) -> Result<()> {
    let OneNode {
        mut nodes,
        server,
        bus,
        origin,
        _root,
        _nats: mut nats,
    } = one_node_over_nats().await?;
    let mut ids = Vec::new();
    let mut publish = |n: u64, first_seq: u64| {
        let evs: Vec<_> = (0..n)
            .map(|_| origin.event(Payload::SessionStarted(SessionStarted::default())))
            .collect();
        ids.extend(evs.iter().map(|e| e.id.clone()));
        let bus = &bus;
        async move {
            for (i, e) in evs.iter().enumerate() {
                // The publisher reconnects on its own after a restart; retry until it has.
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let ack = loop {
                    match bus.publish(e).await {
                        Ok(ack) => break ack,
                        Err(err) if std::time::Instant::now() < deadline => {
                            eprintln!("publish not taken yet: {err}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(err) => return Err(err.into()),
                    }
                };
                anyhow::ensure!(
                    ack.stream_seq == first_seq + i as u64,
                    "event {i} stored at sequence {} instead of {}",
                    ack.stream_seq,
                    first_seq + i as u64
                );
            }
            anyhow::Ok(())
        }
    };
    let msgs = |store: &std::path::Path| store.join("jetstream/$G/streams/CUSTOS_EVENTS/msgs");
    let saved = tempfile::tempdir()?;
    let saved_msgs = saved.path().join("msgs");
    publish(3, 1).await?;
    head_reaches(&server, 3, "the first 3 events committed").await?;
    nats.restart(|store| copy_dir(&msgs(store), &saved_msgs))?;
    publish(2, 4).await?;
    head_reaches(&server, 5, "5 events committed").await?;
    if node_down {
        nodes[0].kill();
    }
    nats.restart(|store| {
        std::fs::remove_dir_all(msgs(store))?;
        copy_dir(&saved_msgs, &msgs(store))
    })?;
    // The stream ends at 3 again, the consumer has delivered 5: sequences 4 and 5 are reused
    // (the publish checks it), 6 and 7 are new.
    publish(4, 4).await?;
    if node_down {
        nodes[0].spawn()?;
    }
    let got = committed_ids(&server, 9, "the events at reused sequences read back").await;
    let mut got = got.map_err(|e| anyhow::anyhow!("{e}; the node's log:\n{}", nodes[0].log()))?;
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "every event once");
    let v = client(&server).await.verify().await?;
    assert!(v.ok && v.checked == 9, "{v:?}");
    assert!(
        nodes[0].log().contains("reused stream sequences"),
        "the leader's log says it read reused sequences back: {}",
        nodes[0].log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_at_sequences_a_restarted_broker_reused_are_read_back() -> Result<()> {
    events_at_reused_sequences_are_read_back(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_term_reads_back_events_at_reused_sequences() -> Result<()> {
    events_at_reused_sequences_are_read_back(true).await
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    anyhow::ensure!(
        status.success(),
        "cp -a {} {}: {status}",
        from.display(),
        to.display()
    );
    Ok(())
}

/// A follower that missed megabytes of events catches up through a multi-chunk snapshot. In a
/// debug build each 3 MiB chunk once took ~440 ms to encode and decode, twice openraft's 200 ms
/// chunk deadline, and a late chunk restarts the transfer: the follower never caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_through_a_large_snapshot() -> Result<()> {
    let nats = Nats::start()?;
    let root = tempfile::tempdir()?;
    let opts = ClusterOpts {
        nats_url: Some(nats.url()),
        snapshot_every: 20,
        keep_logs: 5,
    };
    let mut nodes = cluster(root.path(), &[1, 2, 3], &[1, 2, 3], &opts)?;
    for n in nodes.iter_mut() {
        n.spawn()?;
    }
    let all: Vec<&NodeProc> = nodes.iter().collect();
    eventually(Duration::from_secs(30), "a leader", || async {
        leader(&all).await.is_some()
    })
    .await?;
    let l = leader(&all).await.unwrap();
    let victim = nodes.iter().position(|n| n.id != l).unwrap();
    let live = nodes.iter().find(|n| n.id == l).unwrap().server();
    nodes[victim].kill();

    let (bus, origin) = publisher(&nats, "bob", "db").await?;
    // 1,600 events of ~8 KiB: ~13 MiB of state, a snapshot of five chunks, ~50 log entries.
    const N: u64 = 1600;
    for i in 0..N {
        let text = format!("select {i} /* {} */", "x".repeat(8 * 1024));
        let ev = origin.event(Payload::CommandReceived(CommandReceived {
            command_id: i.to_string(),
            text,
            ..Default::default()
        }));
        bus.publish(&ev).await?;
    }
    eventually(
        Duration::from_secs(120),
        "the leader to commit every event",
        || {
            let live = live.clone();
            async move { head(&live).await >= N }
        },
    )
    .await?;
    let want = head(&live).await;

    nodes[victim].spawn()?;
    let vs = nodes[victim].server();
    let caught_up = eventually(
        Duration::from_secs(120),
        "the restarted follower to catch up",
        || {
            let vs = vs.clone();
            async move { head(&vs).await >= want }
        },
    )
    .await;
    if caught_up.is_err() {
        let tail: String = nodes[victim]
            .log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n");
        anyhow::bail!("{caught_up:?}\nfollower log (last lines, newest first):\n{tail}");
    }
    // The store holds the snapshot's records a moment before Raft's metrics (which the status
    // reports) show the snapshot: wait for those too.
    let reported = eventually(
        Duration::from_secs(15),
        "the follower's status to report the installed snapshot",
        || {
            let vs = vs.clone();
            async move {
                match client(&vs).await.status().await {
                    Ok(st) => st.snapshot_index > 0,
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    let st = client(&vs).await.status().await?;
    assert!(
        reported.is_ok() && st.snapshot_index > 0,
        "it caught up from a snapshot: {st:?}"
    );
    assert!(
        nodes[victim].log().contains("installed snapshot"),
        "{}",
        nodes[victim].log()
    );
    let (code, out, err) = cli(&vs, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&live, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_is_rejected_and_the_previous_version_stays() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(root.path(), &[1], &[1], &ClusterOpts::default())?;
    nodes[0].spawn()?;
    let server = nodes[0].server();
    eventually(Duration::from_secs(20), "leader", || async {
        head(&server).await == 0 && leader(&[&nodes[0]]).await.is_some()
    })
    .await?;

    let dir = root.path();
    let good = dir.join("good.cedar");
    std::fs::write(
        &good,
        "@id(\"agents-read\")\npermit(principal in Custos::Group::\"agents\", action in Custos::Action::\"sql:read\", resource);\n",
    )?;
    let (code, out, err) = cli(
        &server,
        &["policy", "apply", good.to_str().unwrap(), "-m", "first"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("version 1"), "{out}");

    let typo = dir.join("typo.cedar");
    std::fs::write(
        &typo,
        "permit(principal, action == Custos::Action::\"sql:selct\", resource);\n",
    )?;
    let (code, out, err) = cli(&server, &["policy", "apply", typo.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("previous version stays in force") && err.contains("line 1"),
        "{out}{err}"
    );

    let syntax = dir.join("syntax.cedar");
    std::fs::write(
        &syntax,
        "permit(principal, action, resource)\nforbid(principal action, resource);\n",
    )?;
    let (code, _, err) = cli(&server, &["policy", "apply", syntax.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("line 2") || err.contains("line 1"), "{err}");
    // The local validator reports file:line:column.
    let (code, _, err) = cli(&server, &["policy", "validate", syntax.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("syntax.cedar:"), "{err}");

    let (code, out, err) = cli(&server, &["policy", "get"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("agents-read") && err.contains("version 1"),
        "{out}{err}"
    );

    // Bad requests name the problem.
    let (code, _, err) = cli(
        &server,
        &[
            "connection",
            "put",
            "x y",
            "--kind",
            "postgres",
            "--address",
            "a:1",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("connection name"), "{err}");
    let (code, _, err) = cli(
        &server,
        &[
            "connection",
            "put",
            "db",
            "--kind",
            "oracle",
            "--address",
            "a:1",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("kind"), "{err}");
    // A bad token is refused with the next step.
    let out = Command::new(custos_bin())
        .args(["policy", "get"])
        .env("CUSTOS_SERVER", &server)
        .env(
            "CUSTOS_TOKEN",
            "cst_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("custos token issue"),
        "{err}"
    );
    // An unreachable server is named.
    let (code, _, err) = cli(
        &format!("http://127.0.0.1:{}", free_port()),
        &["cluster", "status"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach the control plane"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_secrets_are_sealed_and_never_returned_to_admins() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(root.path(), &[1], &[1], &ClusterOpts::default())?;
    nodes[0].spawn()?;
    let server = nodes[0].server();
    eventually(Duration::from_secs(20), "leader", || async {
        leader(&[&nodes[0]]).await.is_some()
    })
    .await?;
    let (code, out, err) = cli(
        &server,
        &[
            "connection",
            "put",
            "prod-pg",
            "--kind",
            "postgres",
            "--address",
            "127.0.0.1:5432",
            "-o",
            "database=app",
            "-s",
            "username=app",
            "-s",
            "password=S3cr3t-P4ss",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("secrets=password,username") && !out.contains("S3cr3t"),
        "{out}"
    );
    let (_, out, _) = cli(
        &server,
        &["audit", "search", "--kind", "connection_changed", "--json"],
    );
    assert!(out.contains("created") && !out.contains("S3cr3t"), "{out}");
    // Not in the node's log either, nor in plain text anywhere in its data directory.
    assert!(!nodes[0].log().contains("S3cr3t"));
    let mut found = false;
    for entry in walk(&nodes[0].dir) {
        if std::fs::read(&entry)
            .map(|b| b.windows(11).any(|w| w == b"S3cr3t-P4ss"))
            .unwrap_or(false)
        {
            found = true;
        }
    }
    assert!(!found, "a credential was stored in plain text");
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custos_dev_runs_the_embedded_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut child = Command::new(custos_bin())
        .args(["dev", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--postgres-listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    wait_port(port, Duration::from_secs(20))?;
    let server = format!("http://127.0.0.1:{port}");
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let run = |args: &[&str]| {
        let out = Command::new(custos_bin())
            .args(args)
            .env("CUSTOS_SERVER", &server)
            .env("CUSTOS_TOKEN", token.trim())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/policies/agents.cedar"
    );
    let mut ok = false;
    for _ in 0..50 {
        let (code, _, _) = run(&["cluster", "status"]);
        if code == 0 && run(&["cluster", "status"]).1.contains("leader 1") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "dev node never became leader");
    let (code, out, err) = run(&["policy", "apply", example]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&[
        "token",
        "issue",
        "agent:reporter",
        "--group",
        "agents",
        "--ttl",
        "8h",
    ]);
    assert_eq!(code, 0);
    assert!(out.trim().starts_with("cst_"));
    let (code, out, _) = run(&["audit", "search", "--kind", "token_issued"]);
    assert_eq!(code, 0);
    assert!(out.contains("agent:reporter"), "{out}");
    assert!(
        !out.contains("cst_"),
        "a token leaked into the audit log: {out}"
    );
    let (code, out, _) = run(&["audit", "verify"]);
    assert_eq!(code, 0, "{out}");
    // SIGTERM shuts it down cleanly.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    assert!(status.success(), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_follow_configuration_and_keep_it_when_the_control_plane_goes_away() -> Result<()> {
    use custos_edge::watch::{run, EdgeConfig, WatchOptions};
    use std::sync::Arc;
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(root.path(), &[1], &[1], &ClusterOpts::default())?;
    nodes[0].spawn()?;
    let server = nodes[0].server();
    eventually(Duration::from_secs(20), "leader", || async {
        leader(&[&nodes[0]]).await.is_some()
    })
    .await?;
    let (code, out, err) = cli(
        &server,
        &[
            "connection",
            "put",
            "prod-pg",
            "--kind",
            "postgres",
            "--address",
            "127.0.0.1:5432",
            "-s",
            "password=hunter2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");

    // A client token without the edge role may not follow configuration.
    let plain = client(&server)
        .await
        .issue_token("alice".into(), vec![], 600, vec![])
        .await?;
    let edge = client(&server)
        .await
        .issue_token("edge-1".into(), vec![], 600, vec!["edge".into()])
        .await?;

    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(EdgeConfig::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opts = WatchOptions {
        edge_id: "edge-1".into(),
        servers: vec![nodes[0].addr()],
        token: edge.token.clone(),
        max_backoff: Duration::from_millis(500),
        tls: None,
    };
    let task = tokio::spawn(run(opts, tx, stop_rx));
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| c.synced)).await??;
    {
        let c = rx.borrow().clone();
        let conn = &c.connections["prod-pg"];
        assert_eq!(
            conn.secrets.get("password").map(String::as_str),
            Some("hunter2"),
            "edges receive opened credentials"
        );
        assert!(c.tokens.contains_key(&plain.token_id));
    }
    // Changes stream in.
    let policy = root.path().join("p.cedar");
    std::fs::write(
        &policy,
        "permit(principal, action == Custos::Action::\"sql:select\", resource);\n",
    )?;
    assert_eq!(
        cli(&server, &["policy", "apply", policy.to_str().unwrap()]).0,
        0
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|c| c.policy.as_ref().map(|p| p.version) == Some(1)),
    )
    .await??;
    assert_eq!(cli(&server, &["connection", "delete", "prod-pg"]).0, 0);
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|c| !c.connections.contains_key("prod-pg")),
    )
    .await??;
    let rev = rx.borrow().revision;

    // The control plane dies: the edge keeps the last configuration.
    nodes[0].kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = rx.borrow().clone();
    assert!(c.synced && c.revision == rev && c.policy.is_some());
    // …and resynchronizes when it returns.
    nodes[0].spawn()?;
    eventually(Duration::from_secs(20), "leader again", || async {
        leader(&[&nodes[0]]).await.is_some()
    })
    .await?;
    assert_eq!(
        cli(
            &server,
            &[
                "connection",
                "put",
                "other",
                "--kind",
                "mysql",
                "--address",
                "127.0.0.1:3306"
            ]
        )
        .0,
        0
    );
    tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|c| c.connections.contains_key("other")),
    )
    .await??;
    let _ = stop_tx.send(true);
    task.await?;

    // The plain token is refused by EdgeSync.
    let (tx2, rx2) = tokio::sync::watch::channel(Arc::new(EdgeConfig::default()));
    let (_stop2, stop_rx2) = tokio::sync::watch::channel(false);
    let opts = WatchOptions {
        edge_id: "x".into(),
        servers: vec![nodes[0].addr()],
        token: plain.token,
        max_backoff: Duration::from_millis(200),
        tls: None,
    };
    let t2 = tokio::spawn(run(opts, tx2, stop_rx2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !rx2.borrow().synced,
        "a token without the edge role must not receive configuration"
    );
    t2.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_records_are_republished_as_ocsf_json_for_siems() -> Result<()> {
    use futures::StreamExt;
    let nats = Nats::start()?;
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(
        root.path(),
        &[1],
        &[1],
        &ClusterOpts {
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )?;
    nodes[0].spawn()?;
    let (bus, origin) = publisher(&nats, "carol", "prod.pg").await?;
    for _ in 0..25 {
        bus.publish(&origin.event(Payload::SessionStarted(SessionStarted {
            protocol: "postgres".into(),
            ..Default::default()
        })))
        .await?;
    }
    let js = bus.jetstream().clone();
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = js.get_stream("CUSTOS_AUDIT").await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream = stream.expect("CUSTOS_AUDIT stream created by the leader");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("siem".into()),
            ..Default::default()
        })
        .await?;
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 25 && std::time::Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(m.subject.as_str(), "custos.audit.session_started.prod_pg");
            let seq_header = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Custos-Seq"))
                .map(|v| v.as_str().to_string());
            let j: serde_json::Value = serde_json::from_slice(&m.payload)?;
            assert_eq!(j["class_uid"], 3002);
            assert_eq!(j["actor"]["user"]["name"], "carol");
            assert_eq!(Some(j["metadata"]["sequence"].to_string()), seq_header);
            seen.push(j["metadata"]["sequence"].as_u64().unwrap());
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    assert_eq!(
        seen,
        (1..=25).collect::<Vec<u64>>(),
        "every record once, in order"
    );
    Ok(())
}

/// Read `CUSTOS_AUDIT` from the start until `want` records arrived or 20 s passed; returns each
/// record's `Custos-Seq` in stream order.
async fn siem_sequences(
    js: &async_nats::jetstream::Context,
    durable: &str,
    want: usize,
) -> Result<Vec<u64>> {
    use futures::StreamExt;
    let stream = js.get_stream("CUSTOS_AUDIT").await?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(durable.into()),
                ..Default::default()
            },
        )
        .await?;
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < want && std::time::Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(300))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            let seq = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Custos-Seq"))
                .and_then(|v| v.as_str().parse().ok())
                .ok_or_else(|| anyhow::anyhow!("SIEM message without Custos-Seq"))?;
            seen.push(seq);
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(seen)
}

/// The SIEM feed sends most records without a per-message ack. A record the stream refuses in
/// the middle of a batch (here: larger than the stream's `max_msg_size`) must stop the feed at
/// that record, not be skipped because the records after it were stored; once the operator lifts
/// the limit, it arrives, exactly once, and so does everything after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_siem_stream_refuses_is_sent_again_not_skipped() -> Result<()> {
    let nats = Nats::start()?;
    let root = tempfile::tempdir()?;
    let (bus, origin) = publisher(&nats, "carol", "prod.pg").await?;
    let js = bus.jetstream().clone();
    let mut config = async_nats::jetstream::stream::Config {
        name: "CUSTOS_AUDIT".into(),
        subjects: vec!["custos.audit.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        max_message_size: 4096,
        ..Default::default()
    };
    js.create_stream(config.clone()).await?;
    let mut nodes = cluster(
        root.path(),
        &[1],
        &[1],
        &ClusterOpts {
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )?;
    let started = |protocol: String| {
        origin.event(Payload::SessionStarted(SessionStarted {
            protocol,
            ..Default::default()
        }))
    };
    // Record 6 is too large for the stream; the ones around it are not. All eleven are on the
    // bus before the node starts, so they commit, and reach the SIEM feed, together.
    for i in 1..=11 {
        let protocol = if i == 6 {
            "x".repeat(8192)
        } else {
            "postgres".into()
        };
        bus.publish(&started(protocol)).await?;
    }
    nodes[0].spawn()?;
    let seen = siem_sequences(&js, "before", 10).await?;
    assert_eq!(
        seen,
        vec![1, 2, 3, 4, 5, 7, 8, 9, 10, 11],
        "the stream holds every record it accepted, once"
    );
    // The feed is stuck at record 6 and says why.
    let mut said = false;
    for _ in 0..50 {
        if nodes[0].log().contains("refused record 6") {
            said = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(said, "the log names the refused record: {}", nodes[0].log());
    config.max_message_size = -1;
    js.update_stream(config).await?;
    for _ in 12..=14 {
        bus.publish(&started("postgres".into())).await?;
    }
    let mut seen = siem_sequences(&js, "after", 14).await?;
    assert_eq!(seen.len(), 14, "each record once: {seen:?}");
    seen.sort_unstable();
    assert_eq!(seen, (1..=14).collect::<Vec<u64>>(), "no record skipped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_nodes_and_clients() -> Result<()> {
    let root = tempfile::tempdir()?;
    let pki = root.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    make_pki(&pki, &["node", "cli"])?;
    let mut nodes = cluster(root.path(), &[1, 2, 3], &[1, 2, 3], &ClusterOpts::default())?;
    for n in nodes.iter_mut() {
        let mut text = std::fs::read_to_string(&n.config)?;
        text.push_str(&format!(
            "\n[tls]\ncert = \"{0}/node.pem\"\nkey = \"{0}/node.key\"\nca = \"{0}/ca.pem\"\n",
            pki.display()
        ));
        std::fs::write(&n.config, text)?;
        n.spawn()?;
    }
    let tls_cli = |port: u16, with_cert: bool, args: &[&str]| {
        let mut cmd = Command::new(custos_bin());
        cmd.args(["--server", &format!("https://127.0.0.1:{port}"), "--ca"])
            .arg(pki.join("ca.pem"));
        if with_cert {
            cmd.arg("--cert")
                .arg(pki.join("cli.pem"))
                .arg("--key")
                .arg(pki.join("cli.key"));
        }
        let out = cmd
            .args(args)
            .env("CUSTOS_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Raft runs over mutual TLS: a leader is elected and a write through a follower commits.
    let mut elected = false;
    for _ in 0..100 {
        let (code, out, _) = tls_cli(nodes[1].port, true, &["cluster", "status"]);
        if code == 0 && !out.contains("leader none") {
            elected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(elected, "no leader over mTLS: {}", nodes[0].log());
    let (code, out, err) = tls_cli(
        nodes[2].port,
        true,
        &["token", "issue", "bob", "--ttl", "10m"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = tls_cli(
        nodes[0].port,
        true,
        &["audit", "search", "--kind", "token_issued"],
    );
    assert_eq!(code, 0, "{out}{err}");
    // An edge follows the control plane over mutual TLS: once synced it judges tokens (an
    // unsynced edge would answer "has not received its configuration").
    let nats = Nats::start()?;
    let edge_port = free_port();
    let edge_cfg = root.path().join("edge.toml");
    std::fs::write(
        &edge_cfg,
        format!(
            "[edge]\nid = \"tls-edge\"\n[controlplane]\nservers = [\"{}\"]\ntoken = \"{ADMIN_TOKEN}\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/cli.pem\"\nkey = \"{p}/cli.key\"\n[bus.nats]\nurl = \"{}\"\n[postgres]\nlisten = \"127.0.0.1:{edge_port}\"\nallow_insecure_password = true\n",
            nodes[1].addr(),
            nats.url(),
            p = pki.display()
        ),
    )?;
    let mut edge = Command::new(custos_bin())
        .args(["edge", "--config"])
        .arg(&edge_cfg)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_port(edge_port, Duration::from_secs(20))?;
    let mut synced = false;
    let mut last = String::new();
    for _ in 0..100 {
        let out = Command::new("psql")
            .args(["-X", "-c", "SELECT 1"])
            .arg(format!(
                "host=127.0.0.1 port={edge_port} dbname=app user=bob sslmode=disable"
            ))
            .env(
                "PGPASSWORD",
                "cst_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            )
            .output()?;
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if last.contains("unknown token id") {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = edge.kill();
    let _ = edge.wait();
    assert!(synced, "edge never synced over mTLS: {last}");
    // Without a client certificate, and in plain text, the node refuses.
    let (code, _, _) = tls_cli(nodes[0].port, false, &["cluster", "status"]);
    assert_ne!(code, 0);
    let (code, _, _) = cli(&nodes[0].server(), &["cluster", "status"]);
    assert_ne!(code, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_a_majority_fail_with_a_clear_error() -> Result<()> {
    let root = tempfile::tempdir()?;
    // Three initial members, only one started: no leader can be elected.
    let mut nodes = cluster(root.path(), &[1, 2, 3], &[1, 2, 3], &ClusterOpts::default())?;
    nodes[0].spawn()?;
    let (code, out, err) = cli(&nodes[0].server(), &["token", "issue", "bob"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no control-plane leader") && err.contains("custos cluster status"),
        "{err}"
    );
    let (code, out, _) = cli(&nodes[0].server(), &["cluster", "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("leader none"), "{out}");
    Ok(())
}
