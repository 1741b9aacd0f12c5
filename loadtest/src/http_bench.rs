//! `custos-loadtest upstream` and `custos-loadtest http`: an HTTP upstream that answers a fixed
//! JSON document, and a closed-loop load generator (one request in flight per connection) that
//! reports requests/s and latency percentiles. `scripts/bench-http.sh` runs them direct and
//! through the edge in the same run.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A realistic API answer (~1.3 KB, no secrets, so masking scans and changes nothing).
fn document() -> String {
    let items: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"item {i}","status":"active","tags":["alpha","beta"],"price":{}.{:02},"updated":"2026-11-26T12:00:{:02}Z"}}"#,
                10 + i,
                i * 7 % 100,
                i
            )
        })
        .collect();
    format!(r#"{{"page":1,"total":12,"items":[{}]}}"#, items.join(","))
}

/// Serve the fixed document on every path until killed, after `delay` (a stand-in for the
/// upstream's own work; 0 answers from memory).
pub async fn upstream(port: u16, delay: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("bind 127.0.0.1:{port}"))?;
    let body = Bytes::from(document());
    println!("READY {}", listener.local_addr()?.port());
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body))
                            .expect("static response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Which program generates the load.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// This runner's own closed loop (hyper, one request in flight per connection).
    Builtin,
    /// `wrk` (on PATH, or `--wrk PATH`): an independent, widely used load generator, as a cross-check.
    Wrk,
}

#[derive(clap::Args, Clone, Debug)]
pub struct LoadOpts {
    /// http://host:port/path to GET.
    #[arg(long)]
    pub url: String,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// The load generator.
    #[arg(long, value_enum, default_value_t = Client::Builtin)]
    pub client: Client,
    /// Threads `wrk` runs (with `--client wrk`).
    #[arg(long, default_value_t = 2)]
    pub wrk_threads: usize,
    /// The `wrk` program (with `--client wrk`): a name looked up in PATH, or a path.
    #[arg(long = "wrk", default_value = "wrk")]
    pub wrk_program: String,
}

#[derive(Clone, Debug)]
pub struct LoadResult {
    pub errors: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

pub async fn load(o: &LoadOpts) -> Result<LoadResult> {
    if o.client == Client::Wrk {
        return wrk(o).await;
    }
    let uri: hyper::Uri = o.url.parse().context("--url")?;
    let host = uri.host().context("--url has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or("/".into());
    let headers: Vec<(String, String)> = o
        .headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').context("--header wants `Name: value`")?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect::<Result<_>>()?;
    let headers = Arc::new(headers);
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let mut tasks = Vec::new();
    for _ in 0..o.connections {
        let (host, path, headers) = (host.clone(), path.clone(), headers.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            while Instant::now() < deadline {
                let mut req = Request::get(&path).header("host", &host);
                for (k, v) in headers.iter() {
                    req = req.header(k, v);
                }
                let req = req.body(Empty::<Bytes>::new())?;
                let t = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if ok {
                            lat.push(t.elapsed().as_micros() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64().max(o.seconds as f64);
    if all.is_empty() {
        bail!("no request succeeded against {} ({errors} errors)", o.url);
    }
    all.sort_unstable();
    let p = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
    Ok(LoadResult {
        errors,
        rps: all.len() as f64 / secs,
        p50_us: p(0.5),
        p99_us: p(0.99),
    })
}

/// One run of `wrk` with the same connections, duration and headers.
async fn wrk(o: &LoadOpts) -> Result<LoadResult> {
    let mut cmd = tokio::process::Command::new(&o.wrk_program);
    cmd.arg("--latency")
        .arg("-t")
        .arg(o.wrk_threads.clamp(1, o.connections.max(1)).to_string())
        .arg("-c")
        .arg(o.connections.to_string())
        .arg("-d")
        .arg(format!("{}s", o.seconds));
    for h in &o.headers {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(&o.url).kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| {
        anyhow::anyhow!(
            "could not run wrk as {:?} ({e}); install it (Debian: apt-get install wrk), \
             give its path with --wrk, or use --client builtin",
            o.wrk_program
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_wrk(&text)
}

/// The request rate, the 50th and 99th latency percentiles and the errors of `wrk --latency`'s
/// report.
pub fn parse_wrk(text: &str) -> Result<LoadResult> {
    let field = |line: &str, name: &str| -> Option<String> {
        line.trim()
            .strip_prefix(name)
            .map(|rest| rest.trim().to_string())
    };
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0u64;
    let mut requests = None;
    for line in text.lines() {
        if let Some(v) = field(line, "Requests/sec:") {
            rps = Some(
                v.parse::<f64>()
                    .with_context(|| format!("wrk rate {v:?}"))?,
            );
        } else if let Some(v) = field(line, "50%") {
            p50 = Some(wrk_duration_us(&v)?);
        } else if let Some(v) = field(line, "99%") {
            p99 = Some(wrk_duration_us(&v)?);
        } else if let Some(v) = field(line, "Non-2xx or 3xx responses:") {
            errors += v
                .parse::<u64>()
                .with_context(|| format!("wrk non-2xx {v:?}"))?;
        } else if let Some(v) = field(line, "Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            for part in v.split(',') {
                let n = part.split_whitespace().last().unwrap_or("0");
                errors += n
                    .parse::<u64>()
                    .with_context(|| format!("wrk socket errors {v:?}"))?;
            }
        } else if line.contains(" requests in ") {
            requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    let (Some(rps), Some(p50_us), Some(p99_us)) = (rps, p50, p99) else {
        bail!("wrk's report has no request rate or latency percentiles:\n{text}");
    };
    // wrk counts non-2xx answers in its rate; the builtin client does not.
    let good = requests.map_or(rps, |n| {
        rps * n.saturating_sub(errors) as f64 / n.max(1) as f64
    });
    if good <= 0.0 {
        bail!("no request succeeded ({errors} errors):\n{text}");
    }
    Ok(LoadResult {
        errors,
        rps: good,
        p50_us,
        p99_us,
    })
}

/// `812.00us`, `1.25ms`, `2.01s`, `3.00m` as microseconds.
fn wrk_duration_us(v: &str) -> Result<u64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else {
        bail!("wrk latency {v:?} has no unit");
    };
    let x: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("wrk latency {v:?}"))?;
    Ok((x * mult).round() as u64)
}

#[derive(clap::Args, Clone, Debug)]
pub struct CompareOpts {
    /// The upstream directly.
    #[arg(long)]
    pub direct: String,
    /// The same resource through the edge.
    #[arg(long)]
    pub edge: String,
    /// Header for the edge requests (the custos token), `Name: value`.
    #[arg(long = "edge-header")]
    pub edge_headers: Vec<String>,
    /// Another proxy in front of the same upstream, measured in the same rounds:
    /// `NAME=URL` (repeatable; `scripts/bench-http.sh` adds haproxy when it is installed).
    #[arg(long = "baseline", value_name = "NAME=URL")]
    pub baselines: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Interleaved rounds (direct, edge, direct, edge …).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// A short unmeasured run of each first.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// The load generator.
    #[arg(long, value_enum, default_value_t = Client::Builtin)]
    pub client: Client,
    /// Threads `wrk` runs (with `--client wrk`).
    #[arg(long, default_value_t = 2)]
    pub wrk_threads: usize,
    /// The `wrk` program (with `--client wrk`): a name looked up in PATH, or a path.
    #[arg(long = "wrk", default_value = "wrk")]
    pub wrk_program: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Direct and through-the-edge in interleaved rounds; a Markdown table of medians.
pub async fn compare(o: &CompareOpts) -> Result<String> {
    let direct = LoadOpts {
        url: o.direct.clone(),
        headers: vec![],
        connections: o.connections,
        seconds: o.seconds,
        client: o.client,
        wrk_threads: o.wrk_threads,
        wrk_program: o.wrk_program.clone(),
    };
    let edge = LoadOpts {
        url: o.edge.clone(),
        headers: o.edge_headers.clone(),
        connections: o.connections,
        seconds: o.seconds,
        client: o.client,
        wrk_threads: o.wrk_threads,
        wrk_program: o.wrk_program.clone(),
    };
    // Targets in the order each round runs them: direct, the baselines, the edge.
    let mut targets = vec![("direct".to_string(), direct)];
    for b in &o.baselines {
        let (name, url) = baseline(b)?;
        targets.push((
            name,
            LoadOpts {
                url,
                headers: vec![],
                ..targets[0].1.clone()
            },
        ));
    }
    targets.push(("edge".to_string(), edge));
    for (_, x) in &targets {
        load(&LoadOpts {
            seconds: o.warmup,
            ..x.clone()
        })
        .await?;
    }
    let mut results: Vec<Vec<LoadResult>> = vec![Vec::new(); targets.len()];
    let mut rows = String::new();
    for round in 1..=o.rounds {
        for ((name, x), acc) in targets.iter().zip(&mut results) {
            let r = load(x).await?;
            rows.push_str(&format!(
                "| {round} | {name} | {:.0} | {:.2} | {:.2} | {} |\n",
                r.rps,
                r.p50_us as f64 / 1000.0,
                r.p99_us as f64 / 1000.0,
                r.errors
            ));
            acc.push(r);
        }
    }
    let med = |v: &[LoadResult], f: &dyn Fn(&LoadResult) -> f64| median(v.iter().map(f).collect());
    let rps = |v: &[LoadResult]| med(v, &|r| r.rps);
    let p50 = |v: &[LoadResult]| med(v, &|r| r.p50_us as f64);
    let p99 = |v: &[LoadResult]| med(v, &|r| r.p99_us as f64);
    let d = &results[0];
    let drps = rps(d);
    // Each proxy against direct: "name R req/s (ratio X); added latency p50 A ms, p99 B ms".
    let against = |name: &str, v: &[LoadResult]| {
        format!(
            "{name} {:.0} req/s (ratio {:.2}); added latency p50 {:.2} ms, p99 {:.2} ms",
            rps(v),
            rps(v) / drps,
            (p50(v) - p50(d)) / 1000.0,
            (p99(v) - p99(d)) / 1000.0
        )
    };
    let mut summary = against("edge", &results[results.len() - 1]);
    for ((name, _), v) in targets.iter().zip(&results).skip(1) {
        if name != "edge" {
            summary.push_str(&format!("; {}", against(name, v)));
        }
    }
    Ok(format!(
        "| round | target | req/s | p50 ms | p99 ms | errors |\n| --- | --- | ---: | ---: | ---: | ---: |\n{rows}\n\
         Medians over {} rounds of {} s, {} connections, load from {}: direct {drps:.0} req/s, {summary}.\n",
        o.rounds,
        o.seconds,
        o.connections,
        match o.client {
            Client::Builtin => "custos-loadtest".to_string(),
            Client::Wrk => format!("wrk ({} threads)", o.wrk_threads),
        },
    ))
}

/// A `--baseline` value: `NAME=URL`, the name not `direct` or `edge`.
fn baseline(spec: &str) -> Result<(String, String)> {
    let (name, url) = spec
        .split_once('=')
        .filter(|(n, u)| !n.is_empty() && !u.is_empty())
        .with_context(|| format!("--baseline wants NAME=URL, got {spec:?}"))?;
    if matches!(name, "direct" | "edge") {
        bail!("--baseline {spec:?}: the name {name:?} is taken; pick another (haproxy, nginx …)");
    }
    url.parse::<hyper::Uri>()
        .with_context(|| format!("--baseline {spec:?}: not a URL"))?;
    Ok((name.to_string(), url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports of wrk 4.1.0 (Debian), run against `python3 -m http.server`.
    const OK: &str = "Running 1s test @ http://127.0.0.1:18999/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.65ms    4.25ms  20.56ms   63.24%
    Req/Sec   300.10     50.80   401.00     70.00%
  Latency Distribution
     50%    6.49ms
     75%    9.55ms
     90%   12.06ms
     99%   17.30ms
  300 requests in 1.00s, 699.32KB read
Requests/sec:    298.90
Transfer/sec:    696.76KB
";

    #[test]
    fn a_wrk_report_gives_rate_percentiles_and_errors() {
        let r = parse_wrk(OK).unwrap();
        assert!((r.rps - 298.90).abs() < 1e-9, "{}", r.rps);
        assert_eq!((r.p50_us, r.p99_us, r.errors), (6490, 17300, 0));

        let some_bad = OK.replace(
            "Requests/sec:",
            "  Non-2xx or 3xx responses: 30\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:",
        );
        let r = parse_wrk(&some_bad).unwrap();
        assert_eq!(r.errors, 33);
        // Only the 267 good answers of 300 count in the rate, as with the builtin client.
        assert!((r.rps - 298.90 * 267.0 / 300.0).abs() < 1e-9, "{}", r.rps);

        let us = OK.replace("6.49ms", "812.00us").replace("17.30ms", "1.02s");
        let r = parse_wrk(&us).unwrap();
        assert_eq!((r.p50_us, r.p99_us), (812, 1_020_000));
    }

    #[test]
    fn a_wrk_report_with_no_good_answer_or_no_figures_is_an_error() {
        let all_bad = OK.replace(
            "Requests/sec:",
            "  Non-2xx or 3xx responses: 300\nRequests/sec:",
        );
        let e = parse_wrk(&all_bad).expect_err("all answers were errors");
        assert!(
            e.to_string().contains("no request succeeded (300 errors)"),
            "{e}"
        );

        let e = parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")
            .expect_err("no report");
        assert!(e.to_string().contains("no request rate"), "{e}");

        let e = parse_wrk(&OK.replace("6.49ms", "6.49")).expect_err("no unit");
        assert!(e.to_string().contains("no unit"), "{e}");
    }

    fn wrk_opts(program: &str) -> LoadOpts {
        LoadOpts {
            url: "http://127.0.0.1:1/".into(),
            headers: vec![],
            connections: 1,
            seconds: 1,
            client: Client::Wrk,
            wrk_threads: 1,
            wrk_program: program.into(),
        }
    }

    #[test]
    fn baseline_values_are_checked() {
        let (n, u) = baseline("haproxy=http://127.0.0.1:8080/items").unwrap();
        assert_eq!(
            (n.as_str(), u.as_str()),
            ("haproxy", "http://127.0.0.1:8080/items")
        );
        for (bad, says) in [
            ("haproxy", "NAME=URL"),
            ("=http://127.0.0.1:1/", "NAME=URL"),
            ("haproxy=", "NAME=URL"),
            ("edge=http://127.0.0.1:1/", "is taken"),
            ("direct=http://127.0.0.1:1/", "is taken"),
            ("haproxy=http://a b/", "not a URL"),
        ] {
            let e = format!("{:#}", baseline(bad).expect_err(bad));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// A baseline runs in every round beside direct and the edge, and the summary gives its
    /// ratio to direct. (All three are the same upstream here; the figures are not checked.)
    #[tokio::test]
    async fn baselines_run_in_the_same_rounds() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = tokio::spawn(upstream(port, Duration::ZERO));
        let url = format!("http://127.0.0.1:{port}/items");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let o = CompareOpts {
            direct: url.clone(),
            edge: url.clone(),
            edge_headers: vec![],
            baselines: vec![format!("proxy={url}")],
            connections: 2,
            seconds: 1,
            rounds: 2,
            warmup: 1,
            client: Client::Builtin,
            wrk_threads: 1,
            wrk_program: "wrk".into(),
        };
        let md = compare(&o).await.unwrap();
        server.abort();
        for round in 1..=2 {
            for name in ["direct", "proxy", "edge"] {
                assert!(md.contains(&format!("| {round} | {name} | ")), "{md}");
            }
        }
        assert!(md.contains(", edge "), "{md}");
        assert!(md.contains("; proxy "), "{md}");
        assert_eq!(md.matches("(ratio ").count(), 2, "{md}");
    }

    /// A missing wrk names the program and the ways out; a wrk that fails passes on its exit
    /// status and output.
    #[tokio::test]
    async fn a_missing_or_failing_wrk_is_a_clear_error() {
        let e = load(&wrk_opts("/nonexistent/wrk"))
            .await
            .expect_err("no such program");
        let e = e.to_string();
        assert!(
            e.contains("could not run wrk as \"/nonexistent/wrk\""),
            "{e}"
        );
        assert!(e.contains("apt-get install wrk"), "{e}");
        assert!(e.contains("--client builtin"), "{e}");

        // `false` stands for a wrk that exits with an error (a script written here could hit
        // ETXTBSY when another test forks meanwhile).
        let e = load(&wrk_opts("false")).await.expect_err("wrk exits 1");
        let e = e.to_string();
        assert!(e.contains("wrk failed (exit status: 1)"), "{e}");
    }
}
