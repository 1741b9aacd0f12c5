//! Peak memory of building and installing a Raft snapshot of a large store.
//!
//! Ignored by default (it writes a few hundred MB); run it with
//! `cargo test -p custos-controlplane --test snapshot_memory -- --ignored --nocapture`.
//! `CUSTOS_SNAP_BENCH_RECORDS` sets the number of audit records (default 200,000 of ~1 KiB).
//! Each phase's peak RSS (`VmHWM`) is measured on its own: the kernel's peak is reset between
//! phases through `/proc/self/clear_refs`.
#![allow(clippy::result_large_err)]

use std::time::Instant;

use custos_controlplane::store;
use custos_controlplane::types::{Command, IngestItem, TypeConfig};
use custos_proto::v1::{event::Payload, CommandReceived};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use prost::Message;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reset the peak RSS to the current RSS (Linux >= 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes under `dir`, recursively.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ingest(index: u64, n: usize, text: &str) -> Entry<TypeConfig> {
    let origin = custos_core::events::Origin {
        edge_id: "edge-bench".into(),
        session_id: "session-bench".into(),
        identity: "agent-bench".into(),
        connection: "pg-bench".into(),
    };
    let items = (0..n)
        .map(|i| {
            let e = origin.event(Payload::CommandReceived(CommandReceived {
                command_id: format!("c{index}-{i}"),
                text: text.to_string(),
                ..Default::default()
            }));
            IngestItem {
                data: e.encode_to_vec(),
                bus_seq: 0,
            }
        })
        .collect();
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Ingest {
            committed_unix_nano: 1,
            items,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a large store; run by hand to measure snapshot memory"]
async fn snapshot_build_and_install_peak_rss() -> anyhow::Result<()> {
    let records: usize = std::env::var("CUSTOS_SNAP_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let base = std::env::var("CUSTOS_SNAP_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::TempDir::new_in(base)?;
    let text =
        "SELECT id, name, email, created_at FROM customers WHERE region = 'eu' AND ".repeat(12);

    let (leader_store, _, mut leader) = store::open(&dir.path().join("leader"))?;
    let per_entry = 1000;
    let mut index = 0;
    let t = Instant::now();
    while (index as usize) * per_entry < records {
        index += 1;
        leader.apply([ingest(index, per_entry, &text)]).await?;
    }
    let head = leader_store.audit_head().seq;
    println!(
        "populated {head} audit records in {:.1?}; RSS {:.0} MiB, peak so far {:.0} MiB",
        t.elapsed(),
        mib(status_kib("VmRSS:")),
        mib(status_kib("VmHWM:"))
    );

    leader_store.flush()?;
    println!(
        "leader data directory before the snapshot: {:.0} MiB",
        dir_bytes(&dir.path().join("leader")) as f64 / (1 << 20) as f64
    );
    let resettable = reset_peak();
    let before = status_kib("VmRSS:");
    let t = Instant::now();
    let snap: Snapshot<TypeConfig> = leader.get_snapshot_builder().await.build_snapshot().await?;
    let build_peak = status_kib("VmHWM:");
    println!(
        "build: {:.1?}, RSS before {:.0} MiB, peak {:.0} MiB (+{:.0} MiB){}",
        t.elapsed(),
        mib(before),
        mib(build_peak),
        mib(build_peak.saturating_sub(before)),
        if resettable {
            ""
        } else {
            " [peak not resettable]"
        }
    );
    let meta = snap.meta.clone();
    let mut data = snap.snapshot;

    let (follower_store, _, mut follower) = store::open(&dir.path().join("follower"))?;
    reset_peak();
    let before = status_kib("VmRSS:");
    let t = Instant::now();
    let mut recv = follower.begin_receiving_snapshot().await?;
    tokio::io::AsyncSeekExt::seek(&mut data, std::io::SeekFrom::Start(0)).await?;
    // Chunked like openraft's sender (3 MiB default).
    let mut buf = vec![0u8; 3 << 20];
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut data, &mut buf).await?;
        if n == 0 {
            break;
        }
        tokio::io::AsyncWriteExt::write_all(&mut recv, &buf[..n]).await?;
    }
    tokio::io::AsyncWriteExt::shutdown(&mut recv).await?;
    drop(buf);
    drop(data);
    follower.install_snapshot(&meta, recv).await?;
    let install_peak = status_kib("VmHWM:");
    println!(
        "transfer+install: {:.1?}, RSS before {:.0} MiB, peak {:.0} MiB (+{:.0} MiB)",
        t.elapsed(),
        mib(before),
        mib(install_peak),
        mib(install_peak.saturating_sub(before))
    );
    let v = follower_store.verify();
    assert_eq!(v.fault, None);
    assert_eq!(v.checked, head);
    println!("follower verified {} records", v.checked);
    Ok(())
}
