//! custos-loadtest: load generators and the benchmark runner behind docs/benchmarks.md.
//!
//! `custos-loadtest ingest` starts its own nats-server and a 1- or 3-node control plane (real
//! `custos controlplane` processes on loopback), publishes events through JetStream with many
//! in-flight publishes, follows the leader's committed audit tail, and reports committed events
//! per second and publish-to-commit latency (p50, p99). `--markdown FILE` appends a results table.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod approvals_bench;
mod http_bench;
mod mask_bench;
mod pg_bench;
mod soak;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use custos_core::bus::{EventBus, NatsBus, NatsConfig};
use custos_core::events::Origin;
use custos_proto::v1::{
    audit_client::AuditClient, cluster_client::ClusterClient, event::Payload, CommandReceived,
    Empty, Event, TailRequest, Verdict,
};
use futures::StreamExt;
use prost::Message;
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(about = "custos load generators and benchmark runner")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// An HTTP upstream answering a fixed ~1.3 KB JSON document (for `http`).
    Upstream {
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Answer after this many milliseconds (the upstream's own work).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Requests/s and latency, direct and through the edge, interleaved (scripts/bench-http.sh).
    Http {
        #[command(flatten)]
        opts: http_bench::CompareOpts,
        /// Append the table to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Decision-to-execution latency of held statements (scripts/bench-approvals.sh sets it up).
    Approvals {
        #[command(flatten)]
        opts: approvals_bench::Opts,
        /// Append the table to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Events/s committed and publish-to-commit latency through NATS and the Raft control plane.
    Ingest {
        /// Control-plane nodes to start (1 or 3).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value_t = 50_000)]
        events: u64,
        /// Publishes in flight at once.
        #[arg(long, default_value_t = 512)]
        inflight: usize,
        /// Events per Raft entry (bus.batch_max).
        #[arg(long, default_value_t = 2000)]
        batch: usize,
        /// Path of the custos binary (default: next to this one).
        #[arg(long)]
        custos: Option<PathBuf>,
        /// Append a Markdown row to this file.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Masking engine throughput (MB/s per core), recall and precision on a generated corpus.
    Mask {
        #[arg(long, default_value_t = 64)]
        megabytes: usize,
        /// Measure the streaming JSON and SSE rewriters instead of the text engine.
        #[arg(long)]
        streams: bool,
        /// Append the table to this file.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// A long mixed Postgres load through edges, sampling RSS, fds and p99 every interval
    /// (scripts/soak.sh).
    Soak {
        #[command(flatten)]
        opts: soak::Opts,
        /// Append the table to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Postgres TPS and added latency through pgbouncer, haproxy and extra targets (pgbench -S).
    Pgbench {
        #[command(flatten)]
        opts: pg_bench::Opts,
        /// Append the Markdown section to this file.
        #[arg(long, alias = "markdown")]
        out: Option<PathBuf>,
    },
}

/// Append a result to the `--out`/`--markdown` file, when one was given.
fn append_to(out: Option<&std::path::Path>, text: &str) -> Result<()> {
    if let Some(out) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .with_context(|| format!("open {}", out.display()))?;
        writeln!(f, "{text}")?;
    }
    Ok(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) -> Result<()> {
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("port {port} never opened")
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn ingest(
    nodes: u64,
    events: u64,
    inflight: usize,
    batch: usize,
    custos: PathBuf,
    markdown: Option<PathBuf>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut procs = Procs(Vec::new());
    let nats_port = free_port();
    procs.0.push(
        Command::new(if Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        })
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-sd",
        ])
        .arg(dir.path().join("nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start nats-server")?,
    );
    wait_port(nats_port)?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared)?;
    std::fs::write(shared.join("secret.key"), "22".repeat(32))?;
    std::fs::write(shared.join("cluster.secret"), "bench-cluster")?;
    std::fs::write(shared.join("admin.token"), "bench-admin")?;
    let ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let members: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{} = \"127.0.0.1:{p}\"\n", i + 1))
        .collect();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let ndir = dir.path().join(format!("node{id}"));
        std::fs::create_dir_all(&ndir)?;
        let cfg = format!(
            "[node]\nid = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{d}\"\nsecret_key_file = \"{s}/secret.key\"\ncluster_secret_file = \"{s}/cluster.secret\"\nadmin_token_file = \"{s}/admin.token\"\n[cluster]\nsnapshot_every = 20000\nkeep_logs = 2000\n[cluster.initial_members]\n{members}[bus]\nkind = \"nats\"\nbatch_max = {batch}\n[bus.nats]\nurl = \"{nats_url}\"\n[siem]\nenabled = false\n",
            d = ndir.display(),
            s = shared.display()
        );
        std::fs::write(ndir.join("c.toml"), cfg)?;
        procs.0.push(
            Command::new(&custos)
                .args(["controlplane", "--config"])
                .arg(ndir.join("c.toml"))
                .env("CUSTOS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start custos controlplane")?,
        );
        wait_port(*port)?;
    }
    // Find the leader.
    let mut leader_addr = String::new();
    for _ in 0..200 {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ports[0]))?
            .connect_lazy();
        let mut req = tonic::Request::new(Empty {});
        req.metadata_mut()
            .insert("authorization", "Bearer bench-admin".parse()?);
        if let Ok(s) = ClusterClient::new(ch).status(req).await {
            let s = s.into_inner();
            if s.leader_id != 0 && !s.leader_addr.is_empty() {
                leader_addr = s.leader_addr;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if leader_addr.is_empty() {
        bail!("no leader elected");
    }

    let sent: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(events as usize)));
    // Follow the committed tail on the leader.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{leader_addr}"))?
        .connect()
        .await?;
    let mut audit = AuditClient::new(ch).max_decoding_message_size(256 << 20);
    let mut req = tonic::Request::new(TailRequest {
        after_seq: 0,
        last: 0,
        follow: true,
    });
    req.metadata_mut()
        .insert("authorization", "Bearer bench-admin".parse()?);
    let mut tail = audit.tail(req).await?.into_inner();
    let sent2 = sent.clone();
    let collector = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(events as usize);
        let mut last = Instant::now();
        while let Some(Ok(rec)) = tail.next().await {
            let now = Instant::now();
            let Ok(e) = Event::decode(&*rec.event) else {
                continue;
            };
            if let Some(t0) = sent2.lock().await.get(&e.id) {
                lat.push(now.duration_since(*t0));
                last = now;
            }
            if lat.len() as u64 >= events {
                break;
            }
        }
        (lat, last)
    });

    let bus = NatsBus::connect(NatsConfig {
        url: nats_url,
        ..Default::default()
    })
    .await?;
    let origin = Origin {
        edge_id: "loadtest".into(),
        session_id: "bench".into(),
        identity: "agent".into(),
        connection: "prod".into(),
    };
    let start = Instant::now();
    futures::stream::iter(0..events)
        .map(|i| {
            let e = origin.event(Payload::CommandReceived(CommandReceived {
                command_id: i.to_string(),
                text: format!("SELECT * FROM orders WHERE id = {i}"),
                verdict: Verdict::Allow as i32,
                ..Default::default()
            }));
            let bus = &bus;
            let sent = sent.clone();
            async move {
                sent.lock().await.insert(e.id.clone(), Instant::now());
                bus.publish(&e).await
            }
        })
        .buffer_unordered(inflight)
        .for_each(|r| async move {
            if let Err(e) = r {
                eprintln!("publish failed: {e}");
            }
        })
        .await;
    let published = start.elapsed();
    let (mut lat, last) = tokio::time::timeout(Duration::from_secs(300), collector)
        .await
        .context("commit tail timed out")??;
    let total = last.duration_since(start);
    lat.sort();
    let rate = lat.len() as f64 / total.as_secs_f64();
    let pub_rate = events as f64 / published.as_secs_f64();
    let line = format!(
        "| {nodes} | {events} | {inflight} | {batch} | {pub_rate:.0} | {rate:.0} | {:.1} | {:.1} | {:.1} |",
        pct(&lat, 0.5).as_secs_f64() * 1000.0,
        pct(&lat, 0.99).as_secs_f64() * 1000.0,
        pct(&lat, 1.0).as_secs_f64() * 1000.0,
    );
    println!("| nodes | events | in flight | batch | published/s | committed/s | p50 ms | p99 ms | max ms |");
    println!("{line}");
    append_to(markdown.as_deref(), &line)?;
    drop(procs);
    Ok(())
}

/// The allocator the `custos` binary uses (src/main.rs), so that the masking runner measures
/// the engine as the edge runs it; the load generators allocate little.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().cmd {
        Cmd::Ingest {
            nodes,
            events,
            inflight,
            batch,
            custos,
            markdown,
        } => {
            let custos =
                custos.unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("custos"));
            ingest(nodes, events, inflight, batch, custos, markdown).await
        }
        Cmd::Mask {
            megabytes,
            streams,
            markdown,
        } => {
            let table = if streams {
                mask_bench::run_streams(megabytes)?
            } else {
                mask_bench::run(megabytes)?
            };
            println!("{table}");
            append_to(markdown.as_deref(), &table)
        }
        Cmd::Upstream { port, delay_ms } => {
            http_bench::upstream(port, Duration::from_millis(delay_ms)).await
        }
        Cmd::Http { opts, out } => {
            let table = http_bench::compare(&opts).await?;
            println!("{table}");
            append_to(out.as_deref(), &table)
        }
        Cmd::Approvals { opts, out } => {
            let table = approvals_bench::run(&opts).await?;
            println!("{table}");
            append_to(out.as_deref(), &table)
        }
        Cmd::Soak { opts, out } => {
            let table = soak::run(opts).await?;
            println!("{table}");
            append_to(out.as_deref(), &table)
        }
        Cmd::Pgbench { opts, out } => {
            let section = pg_bench::run(&opts)?;
            println!("{section}");
            append_to(out.as_deref(), &section)
        }
    }
}
