//! `custos-loadtest soak`: a long mixed load through one or more edges, sampling every interval
//! the resident memory and open file descriptors of the processes named with `--pid`, and the
//! statement latency (p50/p99) of that interval. scripts/soak.sh runs it against
//! `custos local-cluster`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// An edge's Postgres address HOST:PORT (repeatable; clients are spread over them).
    #[arg(long = "edge", required = true)]
    pub edges: Vec<String>,
    /// The custos token the clients present as their password.
    #[arg(long, env = "SOAK_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long, default_value = "agent:soak")]
    pub user: String,
    /// The connection name (the database the clients ask for).
    #[arg(long, default_value = "app")]
    pub dbname: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Pause between a client's statements, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub think_ms: u64,
    /// How long to run.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    pub sample_secs: u64,
    /// A process to sample, NAME=PID (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<String>,
    /// Every this many statements a client closes its connection and opens a new one (sessions
    /// come and go as they do in production).
    #[arg(long, default_value_t = 200)]
    pub reconnect_every: u64,
}

/// (RSS in KiB, open file descriptors) of a process.
fn sample(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Shared {
    /// Latencies (µs) of the current interval.
    lat: Mutex<Vec<u64>>,
    errors: AtomicU64,
    last_error: Mutex<String>,
    stop: AtomicBool,
}

async fn client(id: usize, opts: Arc<Opts>, shared: Arc<Shared>) {
    let mut n = 0u64;
    let mut conn: Option<tokio_postgres::Client> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if conn.as_ref().is_none_or(|c| c.is_closed())
            || (opts.reconnect_every > 0 && n.is_multiple_of(opts.reconnect_every) && n > 0)
        {
            conn = None;
            let addr = &opts.edges[(id + n as usize) % opts.edges.len()];
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "15432"));
            let conninfo = format!(
                "host={host} port={port} user={} dbname={} password={} sslmode=disable connect_timeout=5",
                opts.user, opts.dbname, opts.token
            );
            match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    conn = Some(c);
                }
                Err(e) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    *shared.last_error.lock().unwrap() = format!("connect: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    n += 1;
                    continue;
                }
            }
        }
        let c = conn.as_ref().expect("connected above");
        let marker = format!("soak_{id}_{n}");
        let t = Instant::now();
        let r = match n % 6 {
            0 => c
                .simple_query(&format!(
                    "INSERT INTO soak_log (marker, client, note) VALUES ('{marker}', {id}, 'contact ops-{id}@example.com')"
                ))
                .await
                .map(|_| ()),
            1 => c
                .query("SELECT marker, note FROM soak_log WHERE client = $1 ORDER BY marker DESC LIMIT 20", &[&(id as i32)])
                .await
                .map(|_| ()),
            2 => c
                .simple_query(&format!(
                    "UPDATE soak_log SET n = n + 1 WHERE marker = 'soak_{id}_{}'",
                    n.saturating_sub(2)
                ))
                .await
                .map(|_| ()),
            3 => c.query("SELECT count(*) FROM soak_log", &[]).await.map(|_| ()),
            4 => c
                .simple_query(&format!(
                    "DELETE FROM soak_log WHERE client = {id} AND marker < 'soak_{id}_{}'",
                    n.saturating_sub(500)
                ))
                .await
                .map(|_| ()),
            _ => c.simple_query("SELECT 1").await.map(|_| ()),
        };
        match r {
            Ok(()) => shared
                .lat
                .lock()
                .unwrap()
                .push(t.elapsed().as_micros() as u64),
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                *shared.last_error.lock().unwrap() = e.to_string();
            }
        }
        n += 1;
        if opts.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(opts.think_ms)).await;
        }
    }
}

/// Run the soak; returns the Markdown table.
pub async fn run(opts: Opts) -> Result<String> {
    if opts.sample_secs == 0 || opts.minutes == 0 {
        bail!("--minutes and --sample-secs must be greater than 0");
    }
    let mut pids = BTreeMap::new();
    for p in &opts.pids {
        let (name, pid) = p
            .split_once('=')
            .with_context(|| format!("--pid {p:?} must be NAME=PID"))?;
        let pid: u32 = pid.parse().with_context(|| format!("--pid {p:?}"))?;
        if sample(pid).is_none() {
            bail!("--pid {p:?}: no such process (or /proc is not readable)");
        }
        pids.insert(name.to_string(), pid);
    }
    let opts = Arc::new(opts);
    let shared = Arc::new(Shared {
        lat: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        last_error: Mutex::new(String::new()),
        stop: AtomicBool::new(false),
    });
    let mut tasks = Vec::new();
    for id in 0..opts.clients {
        tasks.push(tokio::spawn(client(id, opts.clone(), shared.clone())));
    }
    let mut header = String::from("| minute | statements | errors | p50 ms | p99 ms |");
    let mut rule = String::from("|---:|---:|---:|---:|---:|");
    for name in pids.keys() {
        header.push_str(&format!(" {name} RSS MiB | {name} fds |"));
        rule.push_str("---:|---:|");
    }
    let mut table = format!("{header}\n{rule}\n");
    print!("{table}");
    let start = Instant::now();
    let total = Duration::from_secs(opts.minutes * 60);
    // Per sample: each process's (RSS KiB, fds).
    let mut rows: Vec<BTreeMap<String, (u64, usize)>> = Vec::new();
    let mut last_errors = 0;
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(opts.sample_secs)).await;
        let mut lat = std::mem::take(&mut *shared.lat.lock().unwrap());
        lat.sort_unstable();
        let errors = shared.errors.load(Ordering::Relaxed);
        let mut row = format!(
            "| {:.0} | {} | {} | {:.2} | {:.2} |",
            start.elapsed().as_secs_f64() / 60.0,
            lat.len(),
            errors - last_errors,
            percentile(&lat, 0.50) as f64 / 1000.0,
            percentile(&lat, 0.99) as f64 / 1000.0
        );
        last_errors = errors;
        let mut sampled = BTreeMap::new();
        for (name, pid) in &pids {
            match sample(*pid) {
                Some((rss, fds)) => {
                    row.push_str(&format!(" {:.1} | {fds} |", rss as f64 / 1024.0));
                    sampled.insert(name.clone(), (rss, fds));
                }
                None => row.push_str(" gone | gone |"),
            }
        }
        println!("{row}");
        let _ = std::io::stdout().flush();
        table.push_str(&row);
        table.push('\n');
        rows.push(sampled);
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let last = shared.last_error.lock().unwrap().clone();
    if !last.is_empty() {
        table.push_str(&format!("\nlast client error: {last}\n"));
    }
    // Growth over the second half against the first half (after warm-up): a leak keeps growing.
    if rows.len() >= 4 {
        let half = rows.len() / 2;
        table.push('\n');
        for name in pids.keys() {
            let first: Vec<u64> = rows[1..half]
                .iter()
                .filter_map(|r| r.get(name).map(|v| v.0))
                .collect();
            let second: Vec<u64> = rows[half..]
                .iter()
                .filter_map(|r| r.get(name).map(|v| v.0))
                .collect();
            if let (Some(a), Some(b)) = (first.iter().max(), second.iter().max()) {
                table.push_str(&format!(
                    "{name}: peak RSS {:.1} MiB in the first half (after minute 1), {:.1} MiB in the second ({:+.1}%)\n",
                    *a as f64 / 1024.0,
                    *b as f64 / 1024.0,
                    (*b as f64 / *a as f64 - 1.0) * 100.0
                ));
            }
        }
    }
    Ok(table)
}
