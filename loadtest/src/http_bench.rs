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
}

pub struct LoadResult {
    pub errors: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

pub async fn load(o: &LoadOpts) -> Result<LoadResult> {
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
    };
    let edge = LoadOpts {
        url: o.edge.clone(),
        headers: o.edge_headers.clone(),
        connections: o.connections,
        seconds: o.seconds,
    };
    for x in [&direct, &edge] {
        load(&LoadOpts {
            seconds: o.warmup,
            ..x.clone()
        })
        .await?;
    }
    let (mut d, mut e) = (Vec::new(), Vec::new());
    let mut rows = String::new();
    for round in 1..=o.rounds {
        for (name, x, acc) in [("direct", &direct, &mut d), ("edge", &edge, &mut e)] {
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
    let (drps, erps) = (med(&d, &|r| r.rps), med(&e, &|r| r.rps));
    let (dp50, ep50) = (med(&d, &|r| r.p50_us as f64), med(&e, &|r| r.p50_us as f64));
    let (dp99, ep99) = (med(&d, &|r| r.p99_us as f64), med(&e, &|r| r.p99_us as f64));
    Ok(format!(
        "| round | target | req/s | p50 ms | p99 ms | errors |\n| --- | --- | ---: | ---: | ---: | ---: |\n{rows}\n\
         Medians over {} rounds of {} s, {} connections: direct {drps:.0} req/s, edge {erps:.0} req/s \
         (ratio {:.2}); added latency p50 {:.2} ms, p99 {:.2} ms.\n",
        o.rounds,
        o.seconds,
        o.connections,
        erps / drps,
        (ep50 - dp50) / 1000.0,
        (ep99 - dp99) / 1000.0
    ))
}
