//! Postgres benchmark: what a proxy in the data path costs a Postgres client, measured with pgbench
//! against the server directly, against the usual baselines (pgbouncer in session mode, haproxy in
//! tcp mode) and against any extra targets (`--target NAME=URI`, how the custos edge is plugged in).
//!
//! `run(opts)` in one go:
//! - prepares the pgbench database (`pgbench -i -s SCALE`, unless it already holds that scale with
//!   its primary keys; `--reinit` forces it);
//! - starts its own pgbouncer and haproxy on ephemeral loopback ports, config and logs in a
//!   temporary directory, waits until each answers `psql -c 'select 1'`, and kills them when done
//!   (a guard, so also on error);
//! - throughput: `pgbench -n -S -c C -j J -T S -M P` per target, interleaved in rounds (every target
//!   once per round, the starting target rotated each round) so machine noise hits all alike; the
//!   figure is the median TPS of the rounds (pgbench's TPS without the initial connection time);
//! - latency: in each round after the throughput runs, `pgbench -n -S -c 1 -T S -M P -l` per target;
//!   p50 and p99 over every logged transaction of all rounds (the third column of pgbench's
//!   per-transaction log is the transaction's elapsed time in microseconds);
//! - returns a Markdown section: a paragraph naming date, machine and parameters, then the tables.
//!
//! A target that fails (refused connection, missing tables, timeout) is reported as failed with the
//! first line of pgbench's stderr; passwords given in a target URI go to pgbench in PGPASSWORD,
//! never on its command line or into the report.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Transactions whose pgbench log column 3 is not a number (`failed`, `skipped`) are not latencies.
const LOG_LATENCY_COLUMN: usize = 2;
/// How long pgbouncer/haproxy get to answer `select 1` after they start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Extra time a pgbench run gets past `-T` before it is killed (a target that stops answering).
const RUN_GRACE: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Postgres server the bench database lives on (the "direct" target).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 5432)]
    pub port: u16,
    /// User for direct, pgbouncer and haproxy connections (trust or PGPASSWORD auth).
    #[arg(long, default_value = "postgres")]
    pub user: String,
    /// pgbench database (created when missing).
    #[arg(long, default_value = "custos_bench")]
    pub db: String,
    /// pgbench scale factor (`pgbench -i -s`).
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Re-initialize the database even when it already has the scale.
    #[arg(long)]
    pub reinit: bool,
    /// Concurrent clients in the throughput runs (`pgbench -c`).
    #[arg(long, default_value_t = 16)]
    pub clients: u32,
    /// pgbench worker threads in the throughput runs (`pgbench -j`).
    #[arg(long, default_value_t = 2)]
    pub jobs: u32,
    /// Length of each throughput run (`pgbench -T`).
    #[arg(long, default_value_t = 20)]
    pub seconds: u32,
    /// Length of each 1-client latency run (default: --seconds).
    #[arg(long)]
    pub latency_seconds: Option<u32>,
    /// Rounds; each runs every target once (throughput, then latency).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Query protocol (`pgbench -M`).
    #[arg(long, default_value = "simple", value_parser = ["simple", "extended", "prepared"])]
    pub protocol: String,
    /// Unreported warm-up run against direct before round 1, in seconds (0: none).
    #[arg(long, default_value_t = 5)]
    pub warmup: u32,
    /// Extra target, NAME=postgresql://user:password@host:port/dbname?sslmode=... (repeatable).
    /// Its database must hold the pgbench tables (the same database behind the proxy).
    #[arg(long = "target", value_name = "NAME=URI")]
    pub targets: Vec<String>,
    /// Leave out a built-in baseline: pgbouncer or haproxy (repeatable).
    #[arg(long, value_name = "NAME", value_parser = ["pgbouncer", "haproxy"])]
    pub skip: Vec<String>,
}

/// One thing pgbench connects to.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    name: String,
    /// Connection URI without the password (safe to put on a command line and in the report).
    uri: String,
    /// Password from the URI, percent-decoded; passed in PGPASSWORD.
    password: Option<String>,
}

/// Outcome of one pgbench run.
#[derive(Debug, Clone)]
enum Outcome<T> {
    Ok(T),
    Failed(String),
}

/// Run the benchmark and return the Markdown section.
pub fn run(opts: &Opts) -> Result<String> {
    ensure!(opts.clients >= 1, "--clients must be at least 1");
    ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    ensure!(opts.seconds >= 1, "--seconds must be at least 1");
    let latency_seconds = opts.latency_seconds.unwrap_or(opts.seconds).max(1);
    let extra = opts
        .targets
        .iter()
        .map(|s| parse_target(s))
        .collect::<Result<Vec<_>>>()?;
    for (i, t) in extra.iter().enumerate() {
        ensure!(
            !["direct", "pgbouncer", "haproxy"].contains(&t.name.as_str()),
            "--target name {:?} is taken by a built-in target",
            t.name
        );
        ensure!(
            !extra[..i].iter().any(|o| o.name == t.name),
            "--target name {:?} given twice",
            t.name
        );
    }
    let use_pgbouncer = !opts.skip.iter().any(|s| s == "pgbouncer");
    let use_haproxy = !opts.skip.iter().any(|s| s == "haproxy");

    let pgbench = find_tool("pgbench")?;
    let psql = find_tool("psql")?;
    let pgbouncer = if use_pgbouncer {
        Some(find_tool("pgbouncer")?)
    } else {
        None
    };
    let haproxy = if use_haproxy {
        Some(find_tool("haproxy")?)
    } else {
        None
    };

    let direct = Target {
        name: "direct".into(),
        uri: uri(&opts.host, opts.port, &opts.user, &opts.db),
        password: None,
    };
    let server_version = prepare_db(&pgbench, &psql, opts)?;

    let dir = tempfile::Builder::new()
        .prefix("custos-pgbench")
        .tempdir()?;
    let mut daemons = Daemons::default();
    let mut targets = vec![direct.clone()];
    let mut notes = Vec::new();
    if let Some(bin) = &pgbouncer {
        let (port, version) = start_pgbouncer(bin, &psql, opts, &mut daemons)?;
        targets.push(Target {
            name: "pgbouncer".into(),
            uri: uri("127.0.0.1", port, &opts.user, &opts.db),
            password: None,
        });
        notes.push(format!("pgbouncer: {version}, pool_mode=session"));
    }
    if let Some(bin) = &haproxy {
        let (port, version) = start_haproxy(bin, &psql, opts, dir.path(), &mut daemons)?;
        targets.push(Target {
            name: "haproxy".into(),
            uri: uri("127.0.0.1", port, &opts.user, &opts.db),
            password: None,
        });
        notes.push(format!("haproxy: {version}, mode tcp"));
    }
    for t in &extra {
        notes.push(format!("{}: `{}`", t.name, t.uri));
    }
    targets.extend(extra);

    let started = chrono::Utc::now();
    if opts.warmup > 0 {
        eprintln!("warm-up: {}s against direct", opts.warmup);
        let args = tps_args(opts, opts.warmup);
        if let Outcome::Failed(e) = pgbench_run(&pgbench, &direct, &args, dir.path(), "warmup")? {
            bail!("pgbench against the server directly failed: {e}");
        }
    }

    let n = targets.len();
    let mut tps: Vec<Vec<Outcome<f64>>> = vec![Vec::new(); n];
    let mut lat: Vec<Vec<Outcome<Vec<u64>>>> = vec![Vec::new(); n];
    for round in 0..opts.rounds as usize {
        let order: Vec<usize> = (0..n).map(|i| (round + i) % n).collect();
        for &i in &order {
            let t = &targets[i];
            eprintln!(
                "round {}/{}: {} throughput ({}s)",
                round + 1,
                opts.rounds,
                t.name,
                opts.seconds
            );
            let tag = format!("tps-{round}-{i}");
            let args = tps_args(opts, opts.seconds);
            let out = match pgbench_run(&pgbench, t, &args, dir.path(), &tag)? {
                Outcome::Ok(stdout) => match parse_tps(&stdout) {
                    Some(v) => Outcome::Ok(v),
                    None => Outcome::Failed("no `tps =` line in pgbench output".into()),
                },
                Outcome::Failed(e) => Outcome::Failed(e),
            };
            tps[i].push(out);
        }
        for &i in &order {
            let t = &targets[i];
            eprintln!(
                "round {}/{}: {} latency, 1 client ({}s)",
                round + 1,
                opts.rounds,
                t.name,
                latency_seconds
            );
            let prefix = format!("lat-{round}-{i}");
            let mut args = vec![
                "-n".into(),
                "-S".into(),
                "-c".into(),
                "1".into(),
                "-j".into(),
                "1".into(),
                "-T".into(),
                latency_seconds.to_string(),
                "-M".into(),
                opts.protocol.clone(),
                "-l".into(),
                "--log-prefix".into(),
            ];
            args.push(dir.path().join(&prefix).display().to_string());
            let out = match pgbench_run(&pgbench, t, &args, dir.path(), &prefix)? {
                Outcome::Ok(_) => match read_latency_logs(dir.path(), &prefix) {
                    Ok(v) if !v.is_empty() => Outcome::Ok(v),
                    Ok(_) => Outcome::Failed("pgbench logged no successful transaction".into()),
                    Err(e) => Outcome::Failed(format!("{e:#}")),
                },
                Outcome::Failed(e) => Outcome::Failed(e),
            };
            lat[i].push(out);
        }
    }
    drop(daemons);

    let header = Header {
        date: started.format("%Y-%m-%d %H:%M UTC").to_string(),
        machine: machine(),
        pgbench: tool_version(&pgbench, &["--version"]),
        server: server_version,
        notes,
        latency_seconds,
    };
    Ok(report(opts, &header, &targets, &tps, &lat))
}

struct Header {
    date: String,
    machine: String,
    pgbench: String,
    server: String,
    notes: Vec<String>,
    latency_seconds: u32,
}

fn report(
    opts: &Opts,
    h: &Header,
    targets: &[Target],
    tps: &[Vec<Outcome<f64>>],
    lat: &[Vec<Outcome<Vec<u64>>>],
) -> String {
    let jobs = opts.jobs.clamp(1, opts.clients);
    let mut md = String::new();
    md.push_str(&format!(
        "Postgres through a proxy: pgbench select-only (`-S`), run {date} on {machine}; \
         {pgbench}, server PostgreSQL {server} on {host}:{port}, database `{db}` at scale {scale}; \
         everything on the one machine. Throughput: `pgbench -n -S -c {c} -j {jobs} -T {s} -M {p}`, \
         {r} round{rs} with the targets interleaved (the first target rotated each round), median of \
         the rounds' TPS (without initial connection time). Latency: `pgbench -n -S -c 1 -T {ls} \
         -M {p} -l` once per target per round, percentiles over every logged transaction.\n",
        date = h.date,
        machine = h.machine,
        pgbench = h.pgbench,
        server = h.server,
        host = opts.host,
        port = opts.port,
        db = opts.db,
        scale = opts.scale,
        c = opts.clients,
        s = opts.seconds,
        p = opts.protocol,
        r = opts.rounds,
        rs = if opts.rounds == 1 { "" } else { "s" },
        ls = h.latency_seconds,
    ));
    if !h.notes.is_empty() {
        md.push_str(&format!("Targets: {}.\n", h.notes.join("; ")));
    }

    let medians: Vec<Option<f64>> = tps
        .iter()
        .map(|runs| {
            let ok: Vec<f64> = runs.iter().filter_map(ok_value).copied().collect();
            median(&ok)
        })
        .collect();
    let direct_tps = medians.first().copied().flatten();
    let mut failures = Vec::new();
    md.push_str(&format!(
        "\n| target | median TPS ({} clients) | ratio to direct | TPS per round |\n",
        opts.clients
    ));
    md.push_str("| --- | ---: | ---: | --- |\n");
    for (i, t) in targets.iter().enumerate() {
        let per_round: Vec<String> = tps[i]
            .iter()
            .enumerate()
            .map(|(r, o)| match o {
                Outcome::Ok(v) => format!("{v:.0}"),
                Outcome::Failed(e) => {
                    failures.push(format!("{} throughput, round {}: {e}", t.name, r + 1));
                    "failed".into()
                }
            })
            .collect();
        let (median_cell, ratio_cell) = match medians[i] {
            Some(m) => (
                format!("{m:.0}"),
                direct_tps.map_or("—".into(), |d| format!("{:.2}", m / d)),
            ),
            None => (failed_cell(&tps[i]), "—".into()),
        };
        md.push_str(&format!(
            "| {} | {median_cell} | {ratio_cell} | {} |\n",
            t.name,
            per_round.join(", ")
        ));
    }

    let pcts: Vec<Option<(u64, u64, usize)>> = lat
        .iter()
        .map(|runs| {
            let mut all: Vec<u64> = runs
                .iter()
                .filter_map(ok_value)
                .flatten()
                .copied()
                .collect();
            if all.is_empty() {
                return None;
            }
            all.sort_unstable();
            Some((percentile(&all, 0.50), percentile(&all, 0.99), all.len()))
        })
        .collect();
    let direct_lat = pcts.first().copied().flatten();
    md.push_str(
        "\n| target | p50 µs (1 client) | p99 µs | added p50 µs | added p99 µs | transactions |\n",
    );
    md.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    for (i, t) in targets.iter().enumerate() {
        for (r, o) in lat[i].iter().enumerate() {
            if let Outcome::Failed(e) = o {
                failures.push(format!("{} latency, round {}: {e}", t.name, r + 1));
            }
        }
        match pcts[i] {
            Some((p50, p99, count)) => {
                let (a50, a99) = match direct_lat {
                    Some((d50, d99, _)) => (signed(p50, d50), signed(p99, d99)),
                    None => ("—".into(), "—".into()),
                };
                md.push_str(&format!(
                    "| {} | {p50} | {p99} | {a50} | {a99} | {count} |\n",
                    t.name
                ));
            }
            None => md.push_str(&format!(
                "| {} | {} | — | — | — | 0 |\n",
                t.name,
                failed_cell(&lat[i])
            )),
        }
    }
    if !failures.is_empty() {
        md.push_str("\nFailed runs:\n");
        for f in failures {
            md.push_str(&format!("- {}\n", md_cell(&f)));
        }
    }
    md
}

fn ok_value<T>(o: &Outcome<T>) -> Option<&T> {
    match o {
        Outcome::Ok(v) => Some(v),
        Outcome::Failed(_) => None,
    }
}

/// "failed: <first error>" for a target none of whose runs succeeded.
fn failed_cell<T>(runs: &[Outcome<T>]) -> String {
    let first = runs.iter().find_map(|o| match o {
        Outcome::Failed(e) => Some(e.as_str()),
        Outcome::Ok(_) => None,
    });
    format!("failed: {}", md_cell(first.unwrap_or("no run")))
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn signed(v: u64, base: u64) -> String {
    let d = v as i64 - base as i64;
    if d >= 0 {
        format!("+{d}")
    } else {
        d.to_string()
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn tps_args(opts: &Opts, seconds: u32) -> Vec<String> {
    vec![
        "-n".into(),
        "-S".into(),
        "-c".into(),
        opts.clients.to_string(),
        "-j".into(),
        opts.jobs.clamp(1, opts.clients).to_string(),
        "-T".into(),
        seconds.to_string(),
        "-M".into(),
        opts.protocol.clone(),
    ]
}

/// `postgresql://user@host:port/db` (no password: trust, or PGPASSWORD from the environment).
fn uri(host: &str, port: u16, user: &str, db: &str) -> String {
    format!(
        "postgresql://{}@{host}:{port}/{}",
        pct_encode(user),
        pct_encode(db)
    )
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pct_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .with_context(|| format!("bad percent-escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("percent-decoded text is not UTF-8")
}

/// `NAME=postgresql://user:password@host:port/db?params` → the URI without the password, and the
/// password (percent-decoded).
fn parse_target(spec: &str) -> Result<Target> {
    let (name, uri) = spec
        .split_once('=')
        .with_context(|| format!("--target wants NAME=postgresql://…, got {spec:?}"))?;
    let name = name.trim();
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "--target name {name:?}: use letters, digits, '-', '_' or '.'"
    );
    let rest = uri
        .strip_prefix("postgresql://")
        .or_else(|| uri.strip_prefix("postgres://"))
        .with_context(|| {
            format!("--target {name}: the URI must start with postgresql:// or postgres://")
        })?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    ensure!(
        !hostport.is_empty(),
        "--target {name}: the URI names no host"
    );
    let (user, password) = match userinfo {
        Some(ui) => match ui.split_once(':') {
            Some((u, p)) => (
                Some(u),
                Some(pct_decode(p).with_context(|| format!("--target {name}: password"))?),
            ),
            None => (Some(ui), None),
        },
        None => (None, None),
    };
    let uri = match user {
        Some(u) if !u.is_empty() => format!("postgresql://{u}@{hostport}{tail}"),
        _ => format!("postgresql://{hostport}{tail}"),
    };
    Ok(Target {
        name: name.to_string(),
        uri,
        password,
    })
}

/// `tps = 12345.678901 (without initial connection time)` from pgbench's report.
fn parse_tps(stdout: &str) -> Option<f64> {
    stdout.lines().find_map(|l| {
        let v = l.trim().strip_prefix("tps = ")?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Latencies (µs) of the successful transactions in pgbench's per-transaction logs `prefix.*`.
fn read_latency_logs(dir: &Path, prefix: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut files = 0;
    let lead = format!("{prefix}.");
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        // prefix.PID, or prefix.PID.N for worker threads past the first.
        let name = e.file_name().to_string_lossy().into_owned();
        let is_log = name.strip_prefix(&lead).is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
        });
        if !is_log {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(e.path())?;
        out.extend(parse_latency_log(&text));
    }
    ensure!(files > 0, "pgbench wrote no transaction log ({prefix}.*)");
    Ok(out)
}

fn parse_latency_log(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.lines().filter_map(|l| {
        l.split_whitespace()
            .nth(LOG_LATENCY_COLUMN)
            .and_then(|v| v.parse().ok())
    })
}

/// Run pgbench against `t`; stdout and stderr go to files in `dir` (no pipe to fill up), and a run
/// that outlives `-T` by `RUN_GRACE` is killed.
fn pgbench_run(
    pgbench: &Path,
    t: &Target,
    args: &[String],
    dir: &Path,
    tag: &str,
) -> Result<Outcome<String>> {
    let out_path = dir.join(format!("{tag}-stdout.txt"));
    let err_path = dir.join(format!("{tag}-stderr.txt"));
    let seconds: u64 = args
        .iter()
        .position(|a| a == "-T")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut cmd = Command::new(pgbench);
    cmd.args(args)
        .arg(&t.uri)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
        cmd.env("PGCONNECT_TIMEOUT", "10");
    }
    if let Some(pw) = &t.password {
        cmd.env("PGPASSWORD", pw);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", pgbench.display()))?;
    let deadline = Instant::now() + Duration::from_secs(seconds) + RUN_GRACE;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let redact = |s: String| match &t.password {
        Some(pw) if !pw.is_empty() => s.replace(pw.as_str(), "***"),
        _ => s,
    };
    Ok(match status {
        Some(s) if s.success() => Outcome::Ok(stdout),
        Some(s) => Outcome::Failed(redact(
            first_error_line(&stderr)
                .unwrap_or_else(|| format!("pgbench exited with {s} and no message")),
        )),
        None => Outcome::Failed(format!(
            "timed out: pgbench still running {}s after -T {seconds}",
            RUN_GRACE.as_secs()
        )),
    })
}

/// The first line of pgbench's stderr that reports an error (else the first non-empty line).
fn first_error_line(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .find(|l| l.contains("error") || l.contains("FATAL"))
        .or_else(|| lines.first())
        .map(|l| l.to_string())
}

/// Make sure the pgbench database exists at the scale; returns the server version.
fn prepare_db(pgbench: &Path, psql: &Path, opts: &Opts) -> Result<String> {
    let admin = uri(&opts.host, opts.port, &opts.user, "postgres");
    let server = psql_query(psql, &admin, "show server_version").with_context(|| {
        format!(
            "cannot reach PostgreSQL at {}:{} as {}",
            opts.host, opts.port, opts.user
        )
    })?;
    let exists = psql_query(
        psql,
        &admin,
        &format!(
            "select count(*) from pg_database where datname = {}",
            sql_literal(&opts.db)
        ),
    )? == "1";
    if !exists {
        eprintln!("creating database {}", opts.db);
        psql_query(
            psql,
            &admin,
            &format!("create database {}", sql_ident(&opts.db)),
        )?;
    }
    let db = uri(&opts.host, opts.port, &opts.user, &opts.db);
    let ready = exists
        && !opts.reinit
        && psql_query(
            psql,
            &db,
            "select (select count(*) from pgbench_branches)::text || ' ' || \
             (to_regclass('pgbench_accounts_pkey') is not null)::text",
        )
        .ok()
        .is_some_and(|s| s == format!("{} true", opts.scale));
    if !ready {
        eprintln!(
            "initializing {} at scale {} (pgbench -i -s {})",
            opts.db, opts.scale, opts.scale
        );
        let out = Command::new(pgbench)
            .args(["-i", "-q", "-s", &opts.scale.to_string()])
            .arg(&db)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("start {}", pgbench.display()))?;
        if !out.status.success() {
            bail!(
                "pgbench -i failed: {}",
                first_error_line(&String::from_utf8_lossy(&out.stderr)).unwrap_or_default()
            );
        }
    }
    Ok(server)
}

fn psql_query(psql: &Path, uri: &str, sql: &str) -> Result<String> {
    let out = Command::new(psql)
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            uri,
            "-c",
            sql,
        ])
        .env(
            "PGCONNECT_TIMEOUT",
            std::env::var("PGCONNECT_TIMEOUT").unwrap_or_else(|_| "5".into()),
        )
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("start {}", psql.display()))?;
    if !out.status.success() {
        bail!(
            "psql {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Child processes killed (and reaped) when the guard is dropped: at the end, on error, on panic;
/// then their directories are removed.
#[derive(Default)]
struct Daemons {
    procs: Vec<(&'static str, Child)>,
    dirs: Vec<tempfile::TempDir>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The same log file for a child's stdout and stderr.
fn log_file(path: &Path) -> Result<(File, File)> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    Ok((f.try_clone()?, f))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// pgbouncer in session mode on an ephemeral port; returns the port and its version.
fn start_pgbouncer(
    bin: &Path,
    psql: &Path,
    opts: &Opts,
    daemons: &mut Daemons,
) -> Result<(u16, String)> {
    // pgbouncer refuses to run as root: as root it switches to an unprivileged user (-u), so its
    // directory is its own, outside the 0700 temp directory of this run.
    let run_as = if is_root() {
        Some(
            ["postgres", "nobody"]
                .into_iter()
                .find_map(|u| passwd_ids(u).map(|ids| (u, ids)))
                .context("pgbouncer cannot run as root and there is no postgres or nobody user")?,
        )
    } else {
        None
    };
    let dir = tempfile::Builder::new()
        .prefix("custos-pgbouncer")
        .tempdir()?;
    let port = free_port()?;
    let users = dir.path().join("userlist.txt");
    std::fs::write(
        &users,
        format!("\"{}\" \"\"\n", opts.user.replace('"', "\"\"")),
    )?;
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             * = host={host} port={pgport}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = session\n\
             default_pool_size = {pool}\n\
             max_client_conn = {maxconn}\n\
             log_connections = 0\n\
             log_disconnections = 0\n\
             ignore_startup_parameters = extra_float_digits\n",
            host = opts.host,
            pgport = opts.port,
            users = users.display(),
            pool = opts.clients + 4,
            maxconn = opts.clients * 2 + 20,
        ),
    )?;
    let log = dir.path().join("pgbouncer.log");
    let mut cmd = Command::new(bin);
    if let Some((user, (uid, gid))) = run_as {
        for p in [dir.path(), &users, &ini] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
        }
        cmd.args(["-u", user]);
    }
    let (out, err) = log_file(&log)?;
    let child = cmd
        .arg(&ini)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    daemons.procs.push(("pgbouncer", child));
    daemons.dirs.push(dir);
    wait_ready(daemons, psql, port, &opts.user, &opts.db, &log)?;
    let version = tool_version(bin, &["--version"]);
    Ok((port, version))
}

/// haproxy in tcp mode on an ephemeral port, in front of the server.
fn start_haproxy(
    bin: &Path,
    psql: &Path,
    opts: &Opts,
    dir: &Path,
    daemons: &mut Daemons,
) -> Result<(u16, String)> {
    let port = free_port()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn {maxconn}\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
             frontend pg\n    bind 127.0.0.1:{port}\n    default_backend pg\n\
             backend pg\n    server pg1 {host}:{pgport}\n",
            maxconn = opts.clients * 4 + 100,
            host = opts.host,
            pgport = opts.port,
        ),
    )?;
    let log = dir.join("haproxy.log");
    let (out, err) = log_file(&log)?;
    let child = Command::new(bin)
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    daemons.procs.push(("haproxy", child));
    wait_ready(daemons, psql, port, &opts.user, &opts.db, &log)?;
    let version = tool_version(bin, &["-v"]);
    let version = version.split(" - ").next().unwrap_or(&version).to_string();
    Ok((port, version))
}

/// Wait until the last daemon answers `select 1` through psql; fail with its log if it exits.
fn wait_ready(
    daemons: &mut Daemons,
    psql: &Path,
    port: u16,
    user: &str,
    db: &str,
    log: &Path,
) -> Result<()> {
    let (name, child) = daemons.procs.last_mut().expect("a daemon was just started");
    let target = uri("127.0.0.1", port, user, db);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited ({status}) right after start; its log:\n{}",
                log_tail(log)
            );
        }
        let last_err = match psql_query(psql, &target, "select 1") {
            Ok(s) if s == "1" => return Ok(()),
            Ok(s) => format!("select 1 returned {s:?}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{name} on 127.0.0.1:{port} did not answer `select 1` within {}s ({last_err}); its log:\n{}",
                READY_TIMEOUT.as_secs(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// uid and gid of `user` from /etc/passwd.
fn passwd_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// A tool on PATH, or where Debian puts it (sbin, PostgreSQL's versioned bin directories).
fn find_tool(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = rd.filter_map(|e| Some(e.ok()?.path())).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev().map(|v| v.join("bin")));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            let hint = match name {
                "pgbouncer" | "haproxy" => format!(" (or leave it out with --skip {name})"),
                _ => String::new(),
            };
            format!("{name} not found: run scripts/bench-deps.sh{hint}")
        })
}

/// First line of `bin args` (a version banner), or "NAME (version unknown)".
fn tool_version(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{} (version unknown)", bin.display()))
}

/// "2 CPUs (Model name)" from available_parallelism and /proc/cpuinfo.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
    });
    match model {
        Some(m) => format!("{cpus} CPUs (nproc; {m})"),
        None => format!("{cpus} CPUs (nproc)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_password_leaves_the_uri() {
        let t =
            parse_target("custos=postgresql://alice:p%40ss:w@127.0.0.1:15432/prod?sslmode=require")
                .unwrap();
        assert_eq!(t.name, "custos");
        assert_eq!(
            t.uri,
            "postgresql://alice@127.0.0.1:15432/prod?sslmode=require"
        );
        assert_eq!(t.password.as_deref(), Some("p@ss:w"));

        let t = parse_target("x=postgres://h:1/db").unwrap();
        assert_eq!(t.uri, "postgresql://h:1/db");
        assert_eq!(t.password, None);
        let t = parse_target("x=postgresql://bob@h?sslmode=disable").unwrap();
        assert_eq!(t.uri, "postgresql://bob@h?sslmode=disable");

        assert!(parse_target("no-equals").is_err());
        assert!(parse_target("x=mysql://h/db").is_err());
        assert!(parse_target("bad name=postgresql://h/db").is_err());
        assert!(parse_target("x=postgresql://u:%zz@h/db").is_err());
    }

    #[test]
    fn tps_line_and_log_column() {
        let out = "number of failed transactions: 0 (0.000%)\n\
                   latency average = 1.234 ms\n\
                   initial connection time = 12.3 ms\n\
                   tps = 12963.081234 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(12963.081234));
        assert_eq!(parse_tps("nothing"), None);
        let log = "0 199 2241 0 1175850568 995598\n0 200 failed 0 1175850568 998079\n\
                   0 201 2513 0 1175850569 608\n";
        assert_eq!(parse_latency_log(log).collect::<Vec<_>>(), vec![2241, 2513]);
    }

    #[test]
    fn latency_logs_are_only_prefix_dot_pid() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lat-0-1.4242"), "0 1 150 0 1 2\n").unwrap();
        std::fs::write(dir.path().join("lat-0-1.4242.1"), "1 1 170 0 1 2\n").unwrap();
        std::fs::write(dir.path().join("lat-0-1-stdout.txt"), "x y 10\n").unwrap();
        std::fs::write(dir.path().join("lat-0-11.99"), "0 1 999 0 1 2\n").unwrap();
        let mut v = read_latency_logs(dir.path(), "lat-0-1").unwrap();
        v.sort_unstable();
        assert_eq!(v, vec![150, 170]);
        assert!(read_latency_logs(dir.path(), "lat-9-9").is_err());
    }

    #[test]
    fn missing_tool_names_the_script() {
        let e = find_tool("custos-no-such-tool").unwrap_err().to_string();
        assert!(
            e.contains("custos-no-such-tool not found: run scripts/bench-deps.sh"),
            "{e}"
        );
    }

    #[test]
    fn percentiles_and_median() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(signed(120, 100), "+20");
        assert_eq!(signed(90, 100), "-10");
    }

    #[test]
    fn error_line_prefers_errors() {
        let err = "pgbench (15.20)\npgbench: error: connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running?\n";
        assert_eq!(
            first_error_line(err).unwrap(),
            "pgbench: error: connection to server at \"127.0.0.1\", port 1 failed: Connection refused"
        );
        assert_eq!(first_error_line("\n  \n"), None);
    }

    #[test]
    fn report_marks_failed_targets() {
        let opts = Opts {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            db: "custos_bench".into(),
            scale: 10,
            reinit: false,
            clients: 16,
            jobs: 2,
            seconds: 10,
            latency_seconds: None,
            rounds: 2,
            protocol: "simple".into(),
            warmup: 0,
            targets: vec![],
            skip: vec![],
        };
        let h = Header {
            date: "2026-01-01 00:00 UTC".into(),
            machine: "2 CPUs (nproc)".into(),
            pgbench: "pgbench (PostgreSQL) 15.20".into(),
            server: "15.20".into(),
            notes: vec![],
            latency_seconds: 10,
        };
        let t = |n: &str| Target {
            name: n.into(),
            uri: String::new(),
            password: None,
        };
        let refused = "pgbench: error: connection refused".to_string();
        let md = report(
            &opts,
            &h,
            &[t("direct"), t("edge")],
            &[
                vec![Outcome::Ok(1000.0), Outcome::Ok(1200.0)],
                vec![
                    Outcome::Failed(refused.clone()),
                    Outcome::Failed(refused.clone()),
                ],
            ],
            &[
                vec![Outcome::Ok(vec![100, 200]), Outcome::Ok(vec![300])],
                vec![Outcome::Failed(refused.clone()), Outcome::Ok(vec![250])],
            ],
        );
        assert!(md.contains("| direct | 1100 | 1.00 | 1000, 1200 |"), "{md}");
        assert!(
            md.contains(
                "| edge | failed: pgbench: error: connection refused | — | failed, failed |"
            ),
            "{md}"
        );
        assert!(md.contains("| direct | 200 | 300 | +0 | +0 | 3 |"), "{md}");
        assert!(md.contains("| edge | 250 | 250 | +50 | -50 | 1 |"), "{md}");
        assert!(
            md.contains("- edge latency, round 1: pgbench: error"),
            "{md}"
        );
    }
}
