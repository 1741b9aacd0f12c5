//! The fault suite (bounded form, run in CI): the production topology from `custos local-cluster`
//! (3 NATS JetStream servers, 3 control-plane nodes, 2 edges), a private PostgreSQL, and a load
//! of clients running mixed statements through both edges, each statement carrying a unique
//! marker. Faults are injected while the load runs; afterwards every statement any client saw
//! succeed must have exactly one command record on every node, no statement may have two,
//! sequences are gapless and `audit verify` passes everywhere. The scenarios run on a connection
//! that records strictly; two more (`async-…`) repeat a leader kill and a restart of the whole
//! NATS cluster on one that records asynchronously (the edge queues and retries).
//!
//! `CUSTOS_FAULT_STATEMENTS` sets the minimum statements per scenario (default 2000);
//! `CUSTOS_FAULT_CLIENTS` the number of clients (default 8). The long form is in
//! docs/reliability.md.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::pg::PgServer;
use custos_cli::local_cluster::{LocalCluster, Member, Options};
use custos_proto::v1::{event::Payload, Event};
use prost::Message;
use tokio::sync::watch;

const POLICY: &str = r#"
@id("fault-suite-agents")
permit (principal in Custos::Group::"agents", action, resource);
"#;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Markers of statements whose success a client saw.
    acked: Mutex<Vec<String>>,
    attempted: AtomicU64,
    refused: AtomicU64,
    /// A few distinct error messages, to show what clients were told.
    errors: Mutex<HashMap<String, u64>>,
}

impl Seen {
    fn error(&self, e: &str) {
        let mut m = self.errors.lock().unwrap();
        // Grouped by the first 100 characters (event ids and addresses come later).
        let key: String = e.chars().take(100).collect();
        if m.len() < 12 || m.contains_key(&key) {
            *m.entry(key).or_insert(0) += 1;
        }
    }
}

/// A statement's text (its own marker always comes first: the log is searched for the first
/// marker in each record) and whether to send it with the extended protocol.
fn statement(marker: &str, client: usize, seq: u64, prev: &str) -> (String, bool) {
    match seq % 5 {
        0 | 1 => (
            format!("INSERT INTO fault_log (marker, client) VALUES ('{marker}', {client})"),
            seq % 2 == 1,
        ),
        2 => (
            format!("SELECT count(*) FROM fault_log WHERE marker IN ('{marker}', '{prev}')"),
            true,
        ),
        3 => (
            format!("UPDATE fault_log SET n = n + 1 WHERE marker IN ('{marker}', '{prev}')"),
            false,
        ),
        _ => (
            format!("DELETE FROM fault_log WHERE marker = '{marker}'"),
            false,
        ),
    }
}

async fn connect(addr: &str, token: &str, database: &str) -> Result<tokio_postgres::Client> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let conninfo = format!(
        "host={host} port={port} user=agent:fault dbname={database} password={token} sslmode=disable connect_timeout=5"
    );
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
    )
    .await
    .context("connect timed out")??;
    tokio::spawn(conn);
    Ok(client)
}

/// One client: statements in a loop until `stop`, moving to the next edge when its connection
/// breaks. A statement is never retried: a new attempt gets a new marker.
async fn client_loop(
    scenario: String,
    id: usize,
    edges: Vec<String>,
    token: String,
    database: String,
    seen: Arc<Seen>,
    mut stop: watch::Receiver<bool>,
) {
    let mut edge = id % edges.len();
    let mut conn: Option<tokio_postgres::Client> = None;
    let mut seq = 0u64;
    let mut prev = String::from("none");
    while !*stop.borrow() {
        let c = match &conn {
            Some(c) if !c.is_closed() => c,
            _ => {
                conn = None;
                match connect(&edges[edge], &token, &database).await {
                    Ok(c) => {
                        conn = Some(c);
                        conn.as_ref().unwrap()
                    }
                    Err(e) => {
                        seen.error(&format!("connect: {e}"));
                        edge = (edge + 1) % edges.len();
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
            }
        };
        let marker = format!("mk_{scenario}_{id}_{seq}");
        let (text, extended) = statement(&marker, id, seq, &prev);
        seq += 1;
        seen.attempted.fetch_add(1, Ordering::Relaxed);
        let r = if extended {
            tokio::time::timeout(Duration::from_secs(20), c.query(text.as_str(), &[]))
                .await
                .map(|r| r.map(|_| ()))
        } else {
            tokio::time::timeout(Duration::from_secs(20), c.simple_query(&text))
                .await
                .map(|r| r.map(|_| ()))
        };
        match r {
            Ok(Ok(())) => {
                seen.acked.lock().unwrap().push(marker.clone());
                prev = marker;
            }
            Ok(Err(e)) => {
                if let Some(db) = e.as_db_error() {
                    seen.refused.fetch_add(1, Ordering::Relaxed);
                    seen.error(&format!("{}: {}", db.code().code(), db.message()));
                } else {
                    seen.error(&format!("{e}"));
                    edge = (edge + 1) % edges.len();
                    conn = None;
                }
            }
            Err(_) => {
                seen.error("statement timed out after 20 s");
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads one node's canonical log incrementally: command records per marker, event ids, and a
/// gapless sequence.
#[derive(Default)]
struct NodeLog {
    last_seq: u64,
    markers: HashMap<String, u32>,
    event_ids: HashSet<String>,
    duplicate_event_ids: u64,
}

fn marker_of(text: &str) -> Option<&str> {
    let i = text.find("mk_")?;
    let rest = &text[i..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

impl NodeLog {
    async fn catch_up(&mut self, cluster: &LocalCluster, id: u64) -> Result<()> {
        let mut c = tokio::time::timeout(Duration::from_secs(5), cluster.client(id))
            .await
            .context("connect timed out")??;
        loop {
            let recs =
                tokio::time::timeout(Duration::from_secs(20), c.search_after(self.last_seq, 5000))
                    .await
                    .context("query timed out")??;
            if recs.is_empty() {
                return Ok(());
            }
            for r in &recs {
                if r.seq != self.last_seq + 1 {
                    bail!(
                        "node {id}: sequence gap: {} follows {}",
                        r.seq,
                        self.last_seq
                    );
                }
                self.last_seq = r.seq;
                let e = Event::decode(&*r.event)?;
                if !self.event_ids.insert(e.id.clone()) {
                    self.duplicate_event_ids += 1;
                }
                if let Some(Payload::CommandReceived(cr)) = &e.payload {
                    if let Some(m) = marker_of(&cr.text) {
                        *self.markers.entry(m.to_string()).or_insert(0) += 1;
                    }
                }
            }
        }
    }
}

struct Row {
    scenario: String,
    attempted: u64,
    acked: usize,
    refused: u64,
    found: usize,
    missing: usize,
    duplicated: usize,
    /// Events `audit verify` reports lost before ingest (bus gaps recorded in the log).
    lost: u64,
    recover: Duration,
    note: String,
    /// For missing statements: whether their record is in the NATS stream.
    diagnosis: String,
}

struct Suite {
    cluster: LocalCluster,
    edges: Vec<String>,
    token: String,
    /// The connection the clients use: `app` records strictly, `app_async` asynchronously.
    database: String,
    logs: HashMap<u64, NodeLog>,
    min_statements: u64,
    clients: usize,
    rows: Vec<Row>,
}

type Fault = Box<
    dyn for<'a> FnOnce(
        &'a mut LocalCluster,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + 'a>>,
>;

impl Suite {
    /// Run the load, inject `fault` once a third of the statements have gone through, keep the
    /// load on until the fault is over and at least `min_statements` were attempted, then wait
    /// until every node holds every acknowledged statement and check the invariant.
    async fn scenario(&mut self, name: &str, fault: Fault) -> Result<()> {
        eprintln!("--- scenario {name}");
        let seen = Arc::new(Seen::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for id in 0..self.clients {
            tasks.push(tokio::spawn(client_loop(
                name.replace('-', ""),
                id,
                self.edges.clone(),
                self.token.clone(),
                self.database.clone(),
                seen.clone(),
                stop_rx.clone(),
            )));
        }
        let third = self.min_statements / 3;
        let t0 = Instant::now();
        while seen.attempted.load(Ordering::Relaxed) < third {
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{name}: the load did not start: {:?}",
                    seen.errors.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let load_started = t0.elapsed();
        let note = fault(&mut self.cluster).await?;
        let fault_over = Instant::now();
        eprintln!(
            "{name}: fault injected after {:.1} s of load, over after {:.1} s: {note}",
            load_started.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
        let t1 = Instant::now();
        while seen.attempted.load(Ordering::Relaxed) < self.min_statements {
            if t1.elapsed() > Duration::from_secs(180) {
                bail!(
                    "{name}: the load stalled: {:?}",
                    seen.errors.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Some statements after the fault must succeed: the cluster has recovered for clients.
        let acked_at_fault_end = seen.acked.lock().unwrap().len();
        let t2 = Instant::now();
        while seen.acked.lock().unwrap().len() < acked_at_fault_end + 50 {
            if t2.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{name}: clients do not succeed after the fault: {:?}",
                    seen.errors.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "{name}: load done after {:.1} s: {} statements, {} acknowledged",
            t0.elapsed().as_secs_f64(),
            seen.attempted.load(Ordering::Relaxed),
            seen.acked.lock().unwrap().len()
        );
        let _ = stop_tx.send(true);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .context("a client did not stop")??;
        }
        let acked: Vec<String> = seen.acked.lock().unwrap().clone();
        let prefix = format!("mk_{}_", name.replace('-', ""));

        // Wait until every node holds every acknowledged statement (or give up after 120 s).
        let ids: Vec<u64> = self.cluster.layout.nodes.iter().map(|n| n.id).collect();
        let recovered = loop {
            let mut all = true;
            for id in &ids {
                let log = self.logs.entry(*id).or_default();
                if let Err(e) = log.catch_up(&self.cluster, *id).await {
                    eprintln!("{name}: node {id}: {e:#}");
                    all = false;
                    continue;
                }
                if acked.iter().any(|m| !log.markers.contains_key(m)) {
                    all = false;
                }
            }
            if all || fault_over.elapsed() > Duration::from_secs(120) {
                if !all {
                    for id in &ids {
                        let log = &self.logs[id];
                        let gone: Vec<&String> = acked
                            .iter()
                            .filter(|m| !log.markers.contains_key(*m))
                            .collect();
                        eprintln!(
                            "{name}: node {id} (log head {}) lacks {} acknowledged statements, e.g. {:?}",
                            log.last_seq,
                            gone.len(),
                            &gone[..gone.len().min(5)]
                        );
                    }
                }
                break fault_over.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        eprintln!(
            "{name}: every node holds every acknowledged statement {:.1} s after the fault",
            recovered.as_secs_f64()
        );
        let mut found = usize::MAX;
        let mut missing = 0;
        let mut duplicated = 0;
        for id in &ids {
            let log = &self.logs[id];
            let f = acked
                .iter()
                .filter(|m| log.markers.get(*m) == Some(&1))
                .count();
            found = found.min(f);
            missing = missing.max(
                acked
                    .iter()
                    .filter(|m| !log.markers.contains_key(*m))
                    .count(),
            );
            duplicated = duplicated.max(
                log.markers
                    .iter()
                    .filter(|(m, n)| m.starts_with(&prefix) && **n > 1)
                    .count()
                    + log.duplicate_event_ids as usize,
            );
        }
        let mut diagnosis = String::new();
        if missing > 0 {
            // Where did it go? Look for each missing statement's record in the NATS stream.
            let log1 = &self.logs[&ids[0]];
            let gone: Vec<String> = acked
                .iter()
                .filter(|m| !log1.markers.contains_key(*m))
                .take(5)
                .cloned()
                .collect();
            diagnosis = find_in_stream(&self.cluster.layout.nats_urls(), &gone).await;
            eprintln!("{name}: missing statements in the NATS stream: {diagnosis}");
        }
        let mut lost = 0;
        for id in &ids {
            let mut c = self.cluster.client(*id).await?;
            let v = c.verify().await?;
            if !v.ok && v.reason == "lost_before_ingest" && v.first_bad_seq == 0 {
                // The chain is intact, but the bus lost events it had acknowledged: counted
                // below like a missing statement, with its cause.
                lost = lost.max(v.lost);
            } else if !v.ok {
                bail!("{name}: audit verify failed on node {id}: {v:?}");
            }
        }
        let (filled, lost_total) = read_back(&self.cluster);
        eprintln!(
            "{name}: so far the ingest read back {filled} events the bus consumer skipped and recorded {lost_total} as lost"
        );
        if lost > 0 {
            diagnosis.push_str(&format!(
                "; audit verify: {lost} events the bus acknowledged were lost before ingest (the stream no longer held them)"
            ));
        }
        eprintln!(
            "{name}: errors clients saw: {:#?}",
            seen.errors.lock().unwrap()
        );
        self.rows.push(Row {
            scenario: name.to_string(),
            attempted: seen.attempted.load(Ordering::Relaxed),
            acked: acked.len(),
            refused: seen.refused.load(Ordering::Relaxed),
            found,
            missing,
            duplicated,
            lost,
            recover: recovered,
            note,
            diagnosis,
        });
        Ok(())
    }

    fn table(&self) -> String {
        let mut s = String::from(
            "| scenario | statements sent | acknowledged | refused | records found | missing | duplicated | time to recover | fault |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} s | {} |\n",
                r.scenario,
                r.attempted,
                r.acked,
                r.refused,
                r.found,
                r.missing,
                r.duplicated,
                r.recover.as_secs_f64(),
                r.note
            ));
        }
        s
    }
}

fn netns_possible() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    root && std::process::Command::new("ip").arg("-V").output().is_ok()
}

/// For each marker, the stream sequence of its command record in CUSTOS_EVENTS, or "absent":
/// tells a message JetStream lost after acknowledging it from one the ingest never took.
async fn find_in_stream(urls: &str, markers: &[String]) -> String {
    let addrs: Vec<async_nats::ServerAddr> =
        urls.split(',').filter_map(|u| u.parse().ok()).collect();
    let Ok(client) = async_nats::connect(addrs).await else {
        return "cannot connect to NATS".into();
    };
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream("CUSTOS_EVENTS").await else {
        return "no stream CUSTOS_EVENTS".into();
    };
    let Ok(info) = stream.info().await else {
        return "no stream info".into();
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut found: HashMap<String, u64> = HashMap::new();
    for seq in first..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let Ok(e) = Event::decode(&*m.payload) else {
            continue;
        };
        if let Some(Payload::CommandReceived(cr)) = &e.payload {
            if let Some(mk) = marker_of(&cr.text) {
                if markers.iter().any(|x| x == mk) {
                    found.insert(mk.to_string(), seq);
                }
            }
        }
    }
    markers
        .iter()
        .map(|m| match found.get(m) {
            Some(seq) => format!("{m}: in the stream at seq {seq} (the ingest skipped it)"),
            None => format!("{m}: absent from the stream (seqs {first}..={last}): JetStream lost it after acknowledging it"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The value of `custos_bus_consumer_pending` on a node.
fn consumer_pending(cluster: &LocalCluster, id: u64) -> Option<f64> {
    metric(
        cluster,
        id,
        &format!("custos_bus_consumer_pending{{node=\"{id}\"}}"),
    )
}

/// Events the ingest read back from the stream because the consumer skipped them, and events it
/// recorded as lost, summed over the nodes (counters restart with their process).
fn read_back(cluster: &LocalCluster) -> (f64, f64) {
    let sum = |result: &str| {
        (1..=3)
            .filter_map(|id| {
                metric(
                    cluster,
                    id,
                    &format!("custos_ingest_events_total{{result=\"{result}\"}}"),
                )
            })
            // From 0.0: an empty f64 sum is -0.0, which prints as "-0".
            .fold(0.0, |a, b| a + b)
    };
    (sum("filled"), sum("lost"))
}

/// GET /metrics of a node, and the value of the sample `key` (name and labels) on it.
fn metric(cluster: &LocalCluster, id: u64, key: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let port = cluster.layout.nodes.iter().find(|n| n.id == id)?.metrics;
    let host = match &cluster.layout.netns {
        Some(ns) if ns.node == id => ns.node_ip.clone(),
        _ => cluster.layout.host.clone(),
    };
    let mut s = std::net::TcpStream::connect((host.as_str(), port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    let key = format!("{key} ");
    page.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

async fn admin(cluster: &LocalCluster, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(args)
        .env("CUSTOS_SERVER", cluster.server(1))
        .env("CUSTOS_TOKEN", &cluster.admin_token)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "custos {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn boxed<F>(f: F) -> Fault
where
    F: for<'a> FnOnce(
            &'a mut LocalCluster,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + 'a>>
        + 'static,
{
    Box::new(f)
}

/// SIGKILL the Raft leader; restart it 3 s after a new leader is elected.
fn leader_kill() -> Fault {
    boxed(|c| {
        Box::pin(async move {
            let old = c.wait_leader(Duration::from_secs(30)).await?;
            c.kill(Member::Node(old))?;
            let t0 = Instant::now();
            let new = loop {
                if let Some(l) = c.leader_except(&[old]).await {
                    break l;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("no new leader 30 s after killing node {old}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let elected = t0.elapsed();
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.start_member(Member::Node(old)).await?;
            Ok(format!(
            "SIGKILL leader node{old}; node{new} elected in {:.1} s; node{old} restarted 3 s later",
            elected.as_secs_f64()
        ))
        })
    })
}

/// Stop all three NATS servers for 3 s.
fn nats_cluster_restart() -> Fault {
    boxed(|c| {
        Box::pin(async move {
            for i in 0..3 {
                c.stop(Member::Nats(i))?;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            for i in 0..3 {
                c.start_member(Member::Nats(i)).await?;
            }
            let t0 = Instant::now();
            c.wait_nats(Duration::from_secs(60)).await?;
            Ok(format!(
                "restart all 3 NATS servers (down 3 s; JetStream healthy {:.1} s after start)",
                t0.elapsed().as_secs_f64()
            ))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_statement_is_lost_or_duplicated_under_faults() -> Result<()> {
    // CUSTOS_FAULT_DIR keeps every config, log and data directory for a look afterwards.
    let tmp = tempfile::tempdir()?;
    let dir_path = std::env::var_os("CUSTOS_FAULT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let partition = netns_possible();
    let mut opts = Options::new(dir_path.join("cluster"), env!("CARGO_BIN_EXE_custos"));
    if partition {
        opts.isolate = Some(3);
    }
    let t_start = Instant::now();
    let cluster = LocalCluster::start(opts).await?;
    eprintln!(
        "cluster up in {:.1} s\n{}",
        t_start.elapsed().as_secs_f64(),
        cluster.describe()
    );

    let pg = PgServer::start(&[])?;
    let app_pw = common::edge::app_database(&pg)?;
    pg.psql_super(
        "app",
        "CREATE TABLE fault_log (marker text PRIMARY KEY, client int, n int NOT NULL DEFAULT 0); \
         GRANT ALL ON fault_log TO app",
    )?;
    let policy = dir_path.join("policy.cedar");
    std::fs::write(&policy, POLICY)?;
    admin(&cluster, &["policy", "apply", policy.to_str().unwrap()]).await?;
    // The same database recorded asynchronously: the edge queues each record and retries until
    // the bus takes it, so nothing waits for the bus, yet nothing may be lost or duplicated
    // while the edges stay up.
    for (name, mode) in [("app", "strict"), ("app_async", "async")] {
        admin(
            &cluster,
            &[
                "connection",
                "put",
                name,
                "--kind",
                "postgres",
                "--address",
                &pg.addr(),
                "-o",
                "database=app",
                "-o",
                &format!("audit_mode={mode}"),
                "-s",
                "username=app",
                "-s",
                &format!("password={app_pw}"),
            ],
        )
        .await?;
    }
    let token = admin(
        &cluster,
        &[
            "token",
            "issue",
            "agent:fault",
            "--group",
            "agents",
            "--ttl",
            "4h",
        ],
    )
    .await?
    .trim()
    .to_string();
    let edges: Vec<String> = (0..cluster.layout.edges.len())
        .map(|i| cluster.layout.edge_postgres(i))
        .collect();
    // Both edges serve before the load starts.
    for e in &edges {
        let t0 = Instant::now();
        loop {
            if let Ok(c) = connect(e, &token, "app").await {
                if c.simple_query("SELECT 1").await.is_ok() {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("edge {e} never served");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut suite = Suite {
        cluster,
        edges,
        token,
        database: "app".to_string(),
        logs: HashMap::new(),
        min_statements: env_num("CUSTOS_FAULT_STATEMENTS", 2000),
        clients: env_num("CUSTOS_FAULT_CLIENTS", 8) as usize,
        rows: Vec::new(),
    };

    suite
        .scenario(
            "baseline",
            boxed(|_c| Box::pin(async { Ok("none".to_string()) })),
        )
        .await?;
    suite.scenario("leader-kill", leader_kill()).await?;
    suite
        .scenario(
            "follower-kill",
            boxed(|c| {
                Box::pin(async move {
                    let leader = c.wait_leader(Duration::from_secs(30)).await?;
                    let f = (1..=3).find(|i| *i != leader).unwrap();
                    c.kill(Member::Node(f))?;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    c.start_member(Member::Node(f)).await?;
                    Ok(format!("SIGKILL follower node{f}, restarted after 5 s"))
                })
            }),
        )
        .await?;
    suite
        .scenario(
            "nats-node-restart",
            boxed(|c| {
                Box::pin(async move {
                    c.stop(Member::Nats(1))?;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    c.start_member(Member::Nats(1)).await?;
                    c.wait_nats(Duration::from_secs(60)).await?;
                    Ok("restart nats2 (down 3 s)".to_string())
                })
            }),
        )
        .await?;
    suite
        .scenario("nats-cluster-restart", nats_cluster_restart())
        .await?;
    suite
        .scenario(
            "edge-kill",
            boxed(|c| {
                Box::pin(async move {
                    c.kill(Member::Edge(0))?;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    c.start_member(Member::Edge(0)).await?;
                    Ok(
                        "SIGKILL edge1; its clients move to edge2; edge1 restarted after 3 s"
                            .to_string(),
                    )
                })
            }),
        )
        .await?;
    if partition {
        suite
            .scenario(
                "cp-partition",
                boxed(|c| {
                    Box::pin(async move {
                        let leader = c.wait_leader(Duration::from_secs(30)).await?;
                        c.partition(true)?;
                        tokio::time::sleep(Duration::from_secs(20)).await;
                        c.partition(false)?;
                        Ok(format!(
                            "node3 cut off from every process for 20 s (leader was node{leader})"
                        ))
                    })
                }),
            )
            .await?;
    } else {
        eprintln!("cp-partition skipped: a partition needs root and iproute2 (network namespaces)");
    }
    suite
        .scenario(
            "bus-backlog",
            boxed(|c| {
                Box::pin(async move {
                    for id in 1..=3 {
                        c.pause(Member::Node(id), true)?;
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    for id in 1..=3 {
                        c.pause(Member::Node(id), false)?;
                    }
                    // The leader reports the backlog it finds (custos_bus_consumer_pending).
                    let mut peak = 0f64;
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(5) {
                        for id in 1..=3 {
                            if let Some(v) = consumer_pending(c, id) {
                                peak = peak.max(v);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(format!(
                        "SIGSTOP every control-plane node for 10 s: no consumer, the stream backs up \
                         (peak consumer lag seen {peak})"
                    ))
                })
            }),
        )
        .await?;

    // Asynchronous records through the faults that keep the bus from taking them for a while.
    suite.database = "app_async".to_string();
    suite.scenario("async-leader-kill", leader_kill()).await?;
    suite
        .scenario("async-nats-cluster-restart", nats_cluster_restart())
        .await?;

    let table = suite.table();
    println!(
        "\nfault suite ({} clients, at least {} statements per scenario)\n{table}",
        suite.clients, suite.min_statements
    );
    eprintln!("\n{table}");
    // A known, open defect (docs/reliability.md, "Acknowledged records lost in a restart of the
    // whole NATS cluster"): in one run of about eight, a statement acknowledged around the moment
    // every NATS server is stopped had no record afterwards. The ingest now reads back any stream
    // sequence the consumer skipped, and events stored at sequences a restarted broker reused,
    // and records one the stream no longer holds as lost (verify fails). What is still excused
    // here, in the bounded form only, is an event JetStream itself no longer holds;
    // CUSTOS_FAULT_STRICT=1 (the long form) fails on it too.
    let strict_all = std::env::var("CUSTOS_FAULT_STRICT").is_ok_and(|v| v == "1");
    for r in &suite.rows {
        // Excused only when JetStream itself no longer has the event: one the stream still holds
        // is read back by the ingest (it fills sequences the consumer skipped), so a miss of
        // that kind is a custos bug and fails.
        let jetstream_lost = !r.diagnosis.contains("the ingest skipped it");
        if r.scenario.ends_with("nats-cluster-restart")
            && !strict_all
            && jetstream_lost
            && (r.missing > 0 || r.lost > 0)
        {
            eprintln!(
                "KNOWN DEFECT (open): {} lost {} acknowledged record(s): {}",
                r.scenario, r.missing, r.diagnosis
            );
            println!(
                "KNOWN DEFECT (open): {} lost {} acknowledged record(s): {}",
                r.scenario, r.missing, r.diagnosis
            );
            assert_eq!(
                r.duplicated, 0,
                "{}: duplicated records\n{table}",
                r.scenario
            );
            continue;
        }
        assert_eq!(
            r.missing, 0,
            "{}: acknowledged statements without a record ({})\n{table}",
            r.scenario, r.diagnosis
        );
        assert_eq!(
            r.lost, 0,
            "{}: events lost before ingest ({})\n{table}",
            r.scenario, r.diagnosis
        );
        assert_eq!(
            r.duplicated, 0,
            "{}: duplicated records\n{table}",
            r.scenario
        );
        assert_eq!(r.found, r.acked, "{}\n{table}", r.scenario);
    }
    // Once everything is ingested, the ingesting leader reports a consumer lag of 0 and the
    // others report none.
    let Suite { cluster, .. } = suite;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let t0 = Instant::now();
    loop {
        let seen: Vec<Option<f64>> = (1..=3).map(|id| consumer_pending(&cluster, id)).collect();
        let ok = seen.iter().enumerate().all(|(i, v)| {
            if i as u64 + 1 == leader {
                *v == Some(0.0)
            } else {
                v.is_none()
            }
        });
        if ok {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("custos_bus_consumer_pending on nodes 1..3 (leader {leader}): {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::spawn_blocking(move || cluster.shutdown()).await?;
    Ok(())
}
