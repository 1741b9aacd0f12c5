//! `custos local-cluster`: the production topology on one machine, for trying custos and for the
//! fault suite. It starts, as real processes on loopback ports:
//!
//! - a 3-node NATS JetStream cluster (nats-server cluster routes; the event stream has 3 replicas),
//! - 3 control-plane nodes (one Raft cluster, all ingesting from NATS),
//! - N edges (default 2) following every control-plane node and publishing to every NATS node.
//!
//! Everything lives in one folder: configs, secrets, data directories and logs. Started again on
//! the same folder it reuses the ports, secrets and data. Stopping sends SIGTERM to the edges, then
//! the control plane, then NATS, and waits for each (SIGKILL after 10 s).
//!
//! The tests drive single members through [`LocalCluster`]: SIGKILL, SIGTERM, SIGSTOP/SIGCONT and
//! restart. With [`Options::isolate`] one control-plane node runs in its own network namespace
//! behind a veth pair, so a test can cut it off from every other process (a real partition in
//! both directions) and heal it; that needs root and iproute2.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// The folder holding every config, secret, data directory and log.
    pub dir: PathBuf,
    /// The `custos` binary the members run.
    pub custos_bin: PathBuf,
    /// First port of a fixed layout (see [`Layout::fixed`]); `None` picks free ephemeral ports.
    pub base_port: Option<u16>,
    /// Number of edges.
    pub edges: usize,
    /// Run this control-plane node (1..=3) in its own network namespace (root only).
    pub isolate: Option<u64>,
    /// `CUSTOS_LOG` for the custos members.
    pub log_filter: String,
}

impl Options {
    pub fn new(dir: impl Into<PathBuf>, custos_bin: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            custos_bin: custos_bin.into(),
            base_port: None,
            edges: 2,
            isolate: None,
            log_filter: "info,openraft=warn,async_nats=warn".into(),
        }
    }
}

/// Ports of every member, kept in `<dir>/layout.toml` so a restart finds the same cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Layout {
    /// The address every member in the root network namespace binds to.
    pub host: String,
    pub nats: Vec<NatsPorts>,
    pub nodes: Vec<NodePorts>,
    pub edges: Vec<EdgePorts>,
    /// The isolated node's namespace, when there is one.
    pub netns: Option<NetnsLayout>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NatsPorts {
    pub client: u16,
    pub cluster: u16,
    pub monitor: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodePorts {
    pub id: u64,
    pub grpc: u16,
    pub metrics: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgePorts {
    pub postgres: u16,
    pub http: u16,
    pub metrics: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetnsLayout {
    pub name: String,
    /// The veth end in the root namespace (its link is what a cut takes down).
    pub host_if: String,
    pub node: u64,
    /// The isolated node's address inside its namespace.
    pub node_ip: String,
}

/// Hands out free ports, each distinct: every probe listener stays open until the layout is
/// complete, so the kernel cannot give the same port twice.
struct PortPicker(Vec<std::net::TcpListener>);

impl PortPicker {
    fn next(&mut self) -> Result<u16> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        self.0.push(l);
        Ok(port)
    }
}

impl Layout {
    /// Ports counted up from `base`: NATS client, cluster and monitor ports for 3 servers, then
    /// each node's gRPC and metrics ports, then each edge's Postgres, HTTP and metrics ports.
    pub fn fixed(base: u16, edges: usize) -> Layout {
        let mut p = base;
        let mut next = || {
            let v = p;
            p += 1;
            v
        };
        Layout {
            host: "127.0.0.1".into(),
            nats: (0..3)
                .map(|_| NatsPorts {
                    client: next(),
                    cluster: next(),
                    monitor: next(),
                })
                .collect(),
            nodes: (1..=3)
                .map(|id| NodePorts {
                    id,
                    grpc: next(),
                    metrics: next(),
                })
                .collect(),
            edges: (0..edges)
                .map(|_| EdgePorts {
                    postgres: next(),
                    http: next(),
                    metrics: next(),
                })
                .collect(),
            netns: None,
        }
    }

    fn ephemeral(edges: usize) -> Result<Layout> {
        let mut l = Layout::fixed(0, edges);
        let mut p = PortPicker(Vec::new());
        for n in &mut l.nats {
            *n = NatsPorts {
                client: p.next()?,
                cluster: p.next()?,
                monitor: p.next()?,
            };
        }
        for n in &mut l.nodes {
            n.grpc = p.next()?;
            n.metrics = p.next()?;
        }
        for e in &mut l.edges {
            *e = EdgePorts {
                postgres: p.next()?,
                http: p.next()?,
                metrics: p.next()?,
            };
        }
        Ok(l)
    }

    /// How many ports a layout with `edges` edges uses.
    pub fn port_count(edges: usize) -> usize {
        3 * 3 + 3 * 2 + edges * 3
    }

    /// Every port of the layout, with the member and use it is for.
    pub fn ports(&self) -> Vec<(String, u16)> {
        let mut v = Vec::new();
        for (i, n) in self.nats.iter().enumerate() {
            let m = Member::Nats(i).to_string();
            v.push((format!("{m} client"), n.client));
            v.push((format!("{m} cluster"), n.cluster));
            v.push((format!("{m} monitor"), n.monitor));
        }
        for n in &self.nodes {
            let m = Member::Node(n.id).to_string();
            v.push((format!("{m} gRPC"), n.grpc));
            v.push((format!("{m} metrics"), n.metrics));
        }
        for (i, e) in self.edges.iter().enumerate() {
            let m = Member::Edge(i).to_string();
            v.push((format!("{m} Postgres"), e.postgres));
            v.push((format!("{m} HTTP"), e.http));
            v.push((format!("{m} metrics"), e.metrics));
        }
        v
    }

    /// Refuse to start when a port is taken: a member that cannot listen would otherwise be
    /// found out only when the wait for it times out.
    fn check_ports_free(&self) -> Result<()> {
        for (what, port) in self.ports() {
            if let Err(e) = std::net::TcpListener::bind((self.host.as_str(), port)) {
                bail!(
                    "port {port} ({what}) on {} is not free ({e}); stop what holds it (another \
                     local-cluster in this folder?), or start with another --base-port",
                    self.host
                );
            }
        }
        Ok(())
    }

    /// The address node `id` listens on and is known by.
    pub fn node_addr(&self, id: u64) -> String {
        let port = self.node(id).grpc;
        match &self.netns {
            Some(ns) if ns.node == id => format!("{}:{port}", ns.node_ip),
            _ => format!("{}:{port}", self.host),
        }
    }

    fn node(&self, id: u64) -> &NodePorts {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("node ids are 1..=3")
    }

    /// Every NATS client URL, comma separated.
    pub fn nats_urls(&self) -> String {
        self.nats
            .iter()
            .map(|n| format!("nats://{}:{}", self.host, n.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn edge_postgres(&self, i: usize) -> String {
        format!("{}:{}", self.host, self.edges[i].postgres)
    }

    pub fn edge_http(&self, i: usize) -> String {
        format!("{}:{}", self.host, self.edges[i].http)
    }
}

/// Which member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// NATS server 0..3.
    Nats(usize),
    /// Control-plane node 1..=3.
    Node(u64),
    /// Edge 0..N.
    Edge(usize),
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Member::Nats(i) => write!(f, "nats{}", i + 1),
            Member::Node(id) => write!(f, "node{id}"),
            Member::Edge(i) => write!(f, "edge{}", i + 1),
        }
    }
}

/// One child process, with its log file and the command that starts it again.
struct Proc {
    name: String,
    argv: Vec<OsString>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} ({})",
                self.name,
                self.argv[0].to_string_lossy()
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let Some(c) = &self.child else {
            bail!("{} is not running", self.name)
        };
        let st = Command::new("kill")
            .args([format!("-{sig}"), c.id().to_string()])
            .status()
            .context("cannot run kill")?;
        if !st.success() {
            bail!("kill -{sig} {} failed", self.name);
        }
        Ok(())
    }

    /// SIGKILL: nothing of the member's shutdown path runs.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `within`.
    fn stop(&mut self, within: Duration) {
        if !self.running() {
            self.child = None;
            return;
        }
        // A paused process would never see SIGTERM.
        let _ = self.signal("CONT");
        let _ = self.signal("TERM");
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if !self.running() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within {within:?}; killing it", self.name);
        self.kill();
    }
}

impl Drop for Proc {
    /// A member never outlives its handle (e.g. when starting the cluster fails half-way).
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A running local cluster. Dropping it kills every member (SIGKILL); call
/// [`LocalCluster::shutdown`] for the clean path.
pub struct LocalCluster {
    pub dir: PathBuf,
    pub layout: Layout,
    /// The admin token (also in `<dir>/shared/admin.token`).
    pub admin_token: String,
    nats: Vec<Proc>,
    nodes: Vec<Proc>,
    edges: Vec<Proc>,
}

const NATS_CANDIDATES: [&str; 2] = ["/usr/sbin/nats-server", "/usr/bin/nats-server"];

fn nats_bin() -> Result<PathBuf> {
    for c in NATS_CANDIDATES {
        if Path::new(c).exists() {
            return Ok(c.into());
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("nats-server");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("nats-server is not installed; install it (Debian: apt-get install nats-server)")
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn write_new(path: &Path, content: &str) -> Result<()> {
    if !path.exists() {
        custos_core::secrets::write_private(path, content.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn http_get_ok(addr: &str, path: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

fn wait_port(addr: &str, within: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl LocalCluster {
    /// Write what is missing under `opts.dir`, start NATS, then the control plane, then the
    /// edges, and wait until NATS has JetStream, the control plane has a leader and every edge
    /// listens.
    pub async fn start(opts: Options) -> Result<LocalCluster> {
        let dir = &opts.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let layout_file = dir.join("layout.toml");
        let layout = if layout_file.exists() {
            let text = std::fs::read_to_string(&layout_file)?;
            toml::from_str::<Layout>(&text).with_context(|| {
                format!(
                    "{} is not a layout custos wrote; remove the folder or choose another --dir",
                    layout_file.display()
                )
            })?
        } else {
            let mut l = match opts.base_port {
                Some(b) => {
                    let last = b as usize + Layout::port_count(opts.edges) - 1;
                    if b < 1024 || last > u16::MAX as usize {
                        bail!(
                            "--base-port {b} with {} edges needs ports {b}..={last}; choose a base \
                             from 1024 to {}",
                            opts.edges,
                            u16::MAX as usize + 1 - Layout::port_count(opts.edges)
                        );
                    }
                    Layout::fixed(b, opts.edges)
                }
                None => Layout::ephemeral(opts.edges)?,
            };
            if let Some(node) = opts.isolate {
                if !(1..=3).contains(&node) {
                    bail!("--isolate takes a node id from 1 to 3");
                }
                // One /30 per cluster, from the process id, in 10.213.0.0/16.
                let n = std::process::id() % 16_000;
                let (a, b) = ((n * 4) / 256, (n * 4) % 256);
                l.host = format!("10.213.{a}.{}", b + 1);
                l.netns = Some(NetnsLayout {
                    name: format!("custos-{}-n{node}", std::process::id()),
                    host_if: format!("cx{}h", std::process::id()),
                    node,
                    node_ip: format!("10.213.{a}.{}", b + 2),
                });
            }
            l
        };
        // Checked before the layout is kept, so a retry with another --base-port is not held to
        // the ports that were taken.
        if layout.netns.is_none() {
            layout.check_ports_free()?;
        }
        if !layout_file.exists() {
            std::fs::write(&layout_file, toml::to_string(&layout)?)?;
        }
        if let Some(ns) = &layout.netns {
            setup_netns(ns, &layout.host)?;
        }

        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared)?;
        write_new(&shared.join("secret.key"), &random_hex(32)?)?;
        write_new(&shared.join("cluster.secret"), &random_hex(32)?)?;
        write_new(&shared.join("admin.token"), &random_hex(24)?)?;
        let admin_token = std::fs::read_to_string(shared.join("admin.token"))?
            .trim()
            .to_string();

        let env = vec![("CUSTOS_LOG".to_string(), opts.log_filter.clone())];
        let nats_bin = nats_bin()?;
        let mut nats = Vec::new();
        for (i, n) in layout.nats.iter().enumerate() {
            let d = dir.join(format!("nats{}", i + 1));
            std::fs::create_dir_all(&d)?;
            let routes: Vec<String> = layout
                .nats
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, o)| format!("\"nats-route://{}:{}\"", layout.host, o.cluster))
                .collect();
            let conf = format!(
                "# written by custos local-cluster\nserver_name: \"n{}\"\nlisten: \"{}:{}\"\nhttp: \"{}:{}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}}\n\
                 cluster {{\n  name: \"custos\"\n  listen: \"{}:{}\"\n  routes: [{}]\n}}\n",
                i + 1,
                layout.host,
                n.client,
                layout.host,
                n.monitor,
                d.join("js").display(),
                layout.host,
                n.cluster,
                routes.join(", ")
            );
            let cfg = d.join("nats.conf");
            std::fs::write(&cfg, conf)?;
            nats.push(Proc {
                name: Member::Nats(i).to_string(),
                argv: vec![nats_bin.clone().into(), "-c".into(), cfg.into()],
                env: vec![],
                log: d.join("nats.log"),
                child: None,
            });
        }

        let members: String = layout
            .nodes
            .iter()
            .map(|n| format!("{} = \"{}\"\n", n.id, layout.node_addr(n.id)))
            .collect();
        let mut nodes = Vec::new();
        for n in &layout.nodes {
            let d = dir.join(format!("node{}", n.id));
            std::fs::create_dir_all(&d)?;
            let isolated = layout.netns.as_ref().filter(|ns| ns.node == n.id);
            let metrics_host = if isolated.is_some() {
                "0.0.0.0"
            } else {
                &layout.host
            };
            let conf = format!(
                "# written by custos local-cluster\n[node]\nid = {id}\nlisten = \"{listen}\"\ndata_dir = \"{data}\"\n\
                 secret_key_file = \"{sk}\"\ncluster_secret_file = \"{cs}\"\nadmin_token_file = \"{at}\"\n\n\
                 [cluster.initial_members]\n{members}\n\
                 [bus]\nkind = \"nats\"\nack_wait_secs = 5\n[bus.nats]\nurl = \"{nats}\"\nreplicas = 3\n\n\
                 [metrics]\nlisten = \"{metrics_host}:{metrics}\"\n",
                id = n.id,
                listen = layout.node_addr(n.id),
                data = d.join("data").display(),
                sk = shared.join("secret.key").display(),
                cs = shared.join("cluster.secret").display(),
                at = shared.join("admin.token").display(),
                nats = layout.nats_urls(),
                metrics = n.metrics,
            );
            let cfg = d.join("controlplane.toml");
            std::fs::write(&cfg, conf)?;
            let mut argv: Vec<OsString> = Vec::new();
            if let Some(ns) = isolated {
                argv.extend([
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    (&ns.name).into(),
                ]);
            }
            argv.extend([
                opts.custos_bin.clone().into(),
                "controlplane".into(),
                "--config".into(),
                cfg.into(),
            ]);
            nodes.push(Proc {
                name: Member::Node(n.id).to_string(),
                argv,
                env: env.clone(),
                log: d.join("controlplane.log"),
                child: None,
            });
        }

        let mut cluster = LocalCluster {
            dir: dir.clone(),
            layout,
            admin_token,
            nats,
            nodes,
            edges: Vec::new(),
        };
        for i in 0..cluster.nats.len() {
            cluster.nats[i].spawn()?;
        }
        cluster.wait_nats(Duration::from_secs(60)).await?;
        for i in 0..cluster.nodes.len() {
            cluster.nodes[i].spawn()?;
        }
        for n in cluster.layout.nodes.clone() {
            let addr = cluster.layout.node_addr(n.id);
            let ok = tokio::task::spawn_blocking(move || wait_port(&addr, Duration::from_secs(30)))
                .await
                .unwrap_or(false);
            if !ok {
                bail!(
                    "node{} did not start listening within 30 s; see {}/node{}/controlplane.log",
                    n.id,
                    dir.display(),
                    n.id
                );
            }
        }
        cluster
            .wait_leader(Duration::from_secs(60))
            .await
            .context("the control plane elected no leader")?;

        // A fresh edge token at every start (tokens live at most 90 days).
        let edge_token_file = shared.join("edge.token");
        let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        let mut c = cluster.client(leader).await?;
        let t = c
            .issue_token(
                "local-cluster-edges".into(),
                vec![],
                90 * 86_400,
                vec!["edge".into()],
            )
            .await
            .context("cannot issue the edges' token")?;
        custos_core::secrets::write_private(&edge_token_file, t.token.as_bytes())
            .with_context(|| format!("cannot write {}", edge_token_file.display()))?;
        let (cert, key) = crate::edge_cmd::dev_certificate(&shared)?;
        let servers: Vec<String> = cluster
            .layout
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", cluster.layout.node_addr(n.id)))
            .collect();
        for (i, e) in cluster.layout.edges.clone().iter().enumerate() {
            let d = dir.join(format!("edge{}", i + 1));
            std::fs::create_dir_all(&d)?;
            let host = &cluster.layout.host;
            let conf = format!(
                "# written by custos local-cluster\n[edge]\nid = \"edge{n}\"\n\n[controlplane]\nservers = [{servers}]\n\
                 token_file = \"{token}\"\nmax_backoff_ms = 1000\n\n[bus.nats]\nurl = \"{nats}\"\nreplicas = 3\n\n\
                 [postgres]\nlisten = \"{host}:{pg}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
                 # loopback only: lets psql send a token without TLS\nallow_insecure_password = true\n\n\
                 [http]\nlisten = \"{host}:{http}\"\n\n[metrics]\nlisten = \"{host}:{metrics}\"\n",
                n = i + 1,
                servers = servers.join(", "),
                token = edge_token_file.display(),
                nats = cluster.layout.nats_urls(),
                pg = e.postgres,
                cert = cert.display(),
                key = key.display(),
                http = e.http,
                metrics = e.metrics,
            );
            let cfg = d.join("edge.toml");
            std::fs::write(&cfg, conf)?;
            cluster.edges.push(Proc {
                name: Member::Edge(i).to_string(),
                argv: vec![
                    opts.custos_bin.clone().into(),
                    "edge".into(),
                    "--config".into(),
                    cfg.into(),
                ],
                env: env.clone(),
                log: d.join("edge.log"),
                child: None,
            });
        }
        for i in 0..cluster.edges.len() {
            cluster.start_member(Member::Edge(i)).await?;
        }
        Ok(cluster)
    }

    fn proc_mut(&mut self, m: Member) -> Result<&mut Proc> {
        let p = match m {
            Member::Nats(i) => self.nats.get_mut(i),
            Member::Node(id) => self.nodes.get_mut((id as usize).wrapping_sub(1)),
            Member::Edge(i) => self.edges.get_mut(i),
        };
        p.with_context(|| format!("{m} is not a member of this cluster"))
    }

    /// The log file of a member.
    pub fn log_path(&mut self, m: Member) -> Result<PathBuf> {
        Ok(self.proc_mut(m)?.log.clone())
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, m: Member) -> Result<()> {
        self.proc_mut(m)?.kill();
        Ok(())
    }

    /// SIGTERM one member and wait for it to exit.
    pub fn stop(&mut self, m: Member) -> Result<()> {
        self.proc_mut(m)?.stop(Duration::from_secs(10));
        Ok(())
    }

    /// SIGSTOP (`pause = true`) or SIGCONT one member.
    pub fn pause(&mut self, m: Member, pause: bool) -> Result<()> {
        self.proc_mut(m)?
            .signal(if pause { "STOP" } else { "CONT" })
    }

    /// Start a member that is not running, and wait until it listens.
    pub async fn start_member(&mut self, m: Member) -> Result<()> {
        self.proc_mut(m)?.spawn()?;
        let addr = match m {
            Member::Nats(i) => format!("{}:{}", self.layout.host, self.layout.nats[i].client),
            Member::Node(id) => self.layout.node_addr(id),
            Member::Edge(i) => self.layout.edge_postgres(i),
        };
        let ok = tokio::task::spawn_blocking(move || wait_port(&addr, Duration::from_secs(30)))
            .await
            .unwrap_or(false);
        if !ok {
            let log = self.proc_mut(m)?.log.clone();
            bail!(
                "{m} did not start listening within 30 s; see {}",
                log.display()
            );
        }
        Ok(())
    }

    /// Cut the isolated node off from every other process (`cut = true`), or heal it.
    pub fn partition(&self, cut: bool) -> Result<()> {
        let ns = self
            .layout
            .netns
            .as_ref()
            .context("this cluster was started without an isolated node (Options::isolate)")?;
        ip(&["link", "set", &ns.host_if, if cut { "down" } else { "up" }])?;
        if !cut {
            ip(&[
                "addr",
                "replace",
                &format!("{}/30", self.layout.host),
                "dev",
                &ns.host_if,
            ])?;
        }
        Ok(())
    }

    /// The gRPC URL of a node.
    pub fn server(&self, id: u64) -> String {
        format!("http://{}", self.layout.node_addr(id))
    }

    /// An admin client of node `id`.
    pub async fn client(&self, id: u64) -> Result<crate::Client> {
        let g = crate::Global {
            server: self.server(id),
            token: Some(self.admin_token.clone()),
            token_file: None,
            ca: None,
            cert: None,
            key: None,
        };
        crate::Client::connect(&g).await
    }

    /// The leader as reported by the first node that answers (skipping `except`).
    pub async fn leader_except(&self, except: &[u64]) -> Option<u64> {
        for n in &self.layout.nodes {
            if except.contains(&n.id) {
                continue;
            }
            let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(2), self.client(n.id)).await
            else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await {
                if s.leader_id != 0 && !except.contains(&s.leader_id) {
                    return Some(s.leader_id);
                }
            }
        }
        None
    }

    /// Wait until a leader is known.
    pub async fn wait_leader(&self, within: Duration) -> Result<u64> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.leader_except(&[]).await {
                return Ok(l);
            }
            if t0.elapsed() > within {
                bail!(
                    "no control-plane leader after {within:?}; see {}/node*/controlplane.log",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until every NATS server reports itself healthy (JetStream included).
    pub async fn wait_nats(&self, within: Duration) -> Result<()> {
        let addrs: Vec<String> = self
            .layout
            .nats
            .iter()
            .map(|n| format!("{}:{}", self.layout.host, n.monitor))
            .collect();
        let ok = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            while t0.elapsed() < within {
                if addrs.iter().all(|a| http_get_ok(a, "/healthz")) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
        .await
        .unwrap_or(false);
        if !ok {
            bail!(
                "the NATS cluster is not healthy after {within:?}; see {}/nats*/nats.log",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Stop everything: edges, then control plane, then NATS (SIGTERM, SIGKILL after 10 s), and
    /// remove the network namespace.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for p in self
            .edges
            .iter_mut()
            .chain(&mut self.nodes)
            .chain(&mut self.nats)
        {
            p.stop(Duration::from_secs(10));
        }
        if let Some(ns) = &self.layout.netns {
            teardown_netns(ns);
        }
    }

    /// Print where everything is.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("custos local cluster in {}\n", self.dir.display()));
        for (i, n) in self.layout.nats.iter().enumerate() {
            s.push_str(&format!(
                "  nats{}          nats://{}:{} (monitor http://{}:{})\n",
                i + 1,
                self.layout.host,
                n.client,
                self.layout.host,
                n.monitor
            ));
        }
        for n in &self.layout.nodes {
            s.push_str(&format!(
                "  node{}          {} (metrics http://{}:{}/metrics)\n",
                n.id,
                self.server(n.id),
                self.layout.host,
                n.metrics
            ));
        }
        for (i, e) in self.layout.edges.iter().enumerate() {
            s.push_str(&format!(
                "  edge{}          postgres {}  http http://{}:{}  metrics http://{}:{}/metrics\n",
                i + 1,
                self.layout.edge_postgres(i),
                self.layout.host,
                e.http,
                self.layout.host,
                e.metrics
            ));
        }
        s.push_str(&format!(
            "  logs           {}/*/*.log\n\ntry:\n  export CUSTOS_SERVER={} CUSTOS_TOKEN_FILE={}/shared/admin.token\n  custos cluster status\n",
            self.dir.display(),
            self.server(1),
            self.dir.display()
        ));
        s
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for p in self
            .edges
            .iter_mut()
            .chain(&mut self.nodes)
            .chain(&mut self.nats)
        {
            let _ = p.signal("CONT");
            p.kill();
        }
        if let Some(ns) = &self.layout.netns {
            teardown_netns(ns);
        }
    }
}

/// Remove namespaces and links left by clusters whose process is gone (killed before cleanup).
fn remove_stale_netns() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("custos-") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once("-n") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            teardown_netns(&NetnsLayout {
                name: name.to_string(),
                host_if: format!("cx{pid}h"),
                node: 0,
                node_ip: String::new(),
            });
        }
    }
}

fn setup_netns(ns: &NetnsLayout, host_ip: &str) -> Result<()> {
    remove_stale_netns();
    teardown_netns(ns);
    let peer = format!("{}n", ns.host_if.trim_end_matches('h'));
    ip(&["netns", "add", &ns.name]).context(
        "an isolated node needs a network namespace: run as root with iproute2 installed",
    )?;
    ip(&[
        "link",
        "add",
        &ns.host_if,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ])?;
    ip(&["link", "set", &peer, "netns", &ns.name])?;
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if])?;
    ip(&["link", "set", &ns.host_if, "up"])?;
    let inside = |args: &[&str]| {
        let mut v = vec!["netns", "exec", &ns.name, "ip"];
        v.extend_from_slice(args);
        ip(&v)
    };
    inside(&["link", "set", "lo", "up"])?;
    inside(&["addr", "add", &format!("{}/30", ns.node_ip), "dev", &peer])?;
    inside(&["link", "set", &peer, "up"])?;
    Ok(())
}

fn teardown_netns(ns: &NetnsLayout) {
    let _ = Command::new("ip")
        .args(["link", "del", &ns.host_if])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["netns", "del", &ns.name])
        .stderr(Stdio::null())
        .status();
}

/// `custos local-cluster`.
#[derive(clap::Args, Debug)]
pub struct LocalClusterArgs {
    /// The folder for configs, secrets, data and logs (reused when started again).
    #[arg(long, default_value = ".custos-cluster")]
    pub dir: PathBuf,
    /// First of the ports the members use, counted up from here (NATS, control plane, edges).
    #[arg(long, default_value_t = 24000)]
    pub base_port: u16,
    /// Number of edges.
    #[arg(long, default_value_t = 2)]
    pub edges: usize,
}

pub async fn run(args: LocalClusterArgs) -> Result<()> {
    let mut opts = Options::new(
        &args.dir,
        std::env::current_exe().context("cannot find the custos binary")?,
    );
    opts.base_port = Some(args.base_port);
    opts.edges = args.edges;
    // Ctrl-C while starting drops what was started (every member is killed).
    let cluster = tokio::select! {
        c = LocalCluster::start(opts) => c?,
        _ = crate::dev::wait_for_signal() => bail!("interrupted while starting; every member was stopped"),
    };
    println!("{}", cluster.describe());
    println!(
        "Ctrl-C stops every member (data stays in {}).",
        cluster.dir.display()
    );
    crate::dev::wait_for_signal().await;
    eprintln!("stopping edges, control plane, NATS");
    tokio::task::spawn_blocking(move || cluster.shutdown()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(l: &Layout) -> Vec<u16> {
        l.ports().into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn every_member_gets_its_own_port() {
        for l in [Layout::ephemeral(2).unwrap(), Layout::fixed(24000, 2)] {
            let all = ports(&l);
            let distinct: std::collections::BTreeSet<_> = all.iter().collect();
            assert_eq!(all.len(), 21);
            assert_eq!(distinct.len(), all.len(), "{all:?}");
        }
        // scripts/soak.sh counts on this layout.
        let l = Layout::fixed(26000, 2);
        assert_eq!(l.node(1).grpc, 26009);
        assert_eq!((l.edges[0].postgres, l.edges[1].postgres), (26015, 26018));
        assert_eq!(ports(&l).len(), Layout::port_count(2));
    }

    fn opts(dir: &Path, base: u16) -> Options {
        let mut o = Options::new(dir, "/nonexistent/custos");
        o.base_port = Some(base);
        o
    }

    async fn start_err(o: Options) -> String {
        match LocalCluster::start(o).await {
            Ok(_) => panic!("started"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_named_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        // Hold a free port and start a layout that begins with it (NATS 1's client port).
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = start_err(opts(dir.path(), port)).await;
        assert!(
            err.contains(&format!("port {port} (nats1 client)"))
                && err.contains("--base-port")
                && err.contains("not free"),
            "{err}"
        );
        // Nothing was started, and the refused layout was not kept for the next start.
        assert!(!dir.path().join("nats1").exists(), "{err}");
        assert!(!dir.path().join("layout.toml").exists(), "{err}");
        drop(held);
    }

    #[tokio::test]
    async fn a_base_port_out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = start_err(opts(dir.path(), 65530)).await;
        assert!(
            err.contains("--base-port 65530") && err.contains("65515"),
            "{err}"
        );
        let err = start_err(opts(dir.path(), 80)).await;
        assert!(err.contains("from 1024"), "{err}");
    }

    #[tokio::test]
    async fn a_folder_holding_something_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("layout.toml"), "not = [a layout").unwrap();
        let err = start_err(opts(dir.path(), 30000)).await;
        assert!(
            err.contains("is not a layout custos wrote") && err.contains("choose another --dir"),
            "{err}"
        );
    }
}
