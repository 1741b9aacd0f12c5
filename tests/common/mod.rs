//! Test harness: real nats-server and real `custos` processes on ephemeral loopback ports.
#![allow(dead_code)]

pub mod edge;
pub mod pg;
pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16, within: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < within {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} after {within:?}")
}

pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {within:?} waiting for {what}")
}

/// A nats-server with JetStream on an ephemeral port, killed on drop.
pub struct Nats {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Result<Nats> {
        Nats::start_on(free_port())
    }

    /// On a given port (e.g. one a process was already told to connect to).
    pub fn start_on(port: u16) -> Result<Nats> {
        let dir = tempfile::tempdir()?;
        let child = Nats::spawn(port, dir.path())?;
        Ok(Nats { child, port, dir })
    }

    fn spawn(port: u16, store: &Path) -> Result<Child> {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server (install the nats-server package)")?;
        wait_port(port, Duration::from_secs(10))?;
        Ok(child)
    }

    /// Stop the server the way an operator does (SIGTERM: it writes its stores out), run
    /// `between` on its store directory, and start it again on the same port over that store.
    pub fn restart(&mut self, between: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM nats-server failed: {status}");
        self.child.wait()?;
        between(self.dir.path())?;
        self.child = Nats::spawn(self.port, self.dir.path())?;
        Ok(())
    }

    /// With JetStream file storage capped at `max_file_store` bytes for the whole server, so a
    /// test can fill the bus.
    pub fn start_with_store_limit(max_file_store: u64) -> Result<Nats> {
        let port = free_port();
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  max_file_store: {max_file_store}\n  max_memory_store: 16777216\n}}\n",
                dir.path().join("js").display()
            ),
        )?;
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server (install the nats-server package)")?;
        wait_port(port, Duration::from_secs(10))?;
        Ok(Nats { child, port, dir })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn custos_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_custos"))
}

/// One `custos controlplane` process.
pub struct NodeProc {
    pub id: u64,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))?;
        let child = Command::new(custos_bin())
            .args(["controlplane", "--config"])
            .arg(&self.config)
            .env("CUSTOS_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(20))
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct ClusterOpts {
    pub nats_url: Option<String>,
    pub snapshot_every: u64,
    pub keep_logs: u64,
}

impl Default for ClusterOpts {
    /// No bus, and snapshots rare enough that no test sees one unless it asks.
    fn default() -> Self {
        ClusterOpts {
            nats_url: None,
            snapshot_every: 5000,
            keep_logs: 1000,
        }
    }
}

/// Write configs for `ids` (all initial members) and return the unstarted processes.
/// Every node shares the same secret key, cluster secret and admin token files.
pub fn cluster(
    root: &Path,
    ids: &[u64],
    initial: &[u64],
    opts: &ClusterOpts,
) -> Result<Vec<NodeProc>> {
    let shared = root.join("shared");
    std::fs::create_dir_all(&shared)?;
    std::fs::write(shared.join("secret.key"), "11".repeat(32))?;
    std::fs::write(shared.join("cluster.secret"), "test-cluster-secret")?;
    std::fs::write(shared.join("admin.token"), "test-admin-token")?;
    let ports: Vec<u16> = ids.iter().map(|_| free_port()).collect();
    let mut members = String::new();
    for (id, port) in ids.iter().zip(&ports) {
        if initial.contains(id) {
            members.push_str(&format!("{id} = \"127.0.0.1:{port}\"\n"));
        }
    }
    let mut out = Vec::new();
    for (id, port) in ids.iter().zip(&ports) {
        let dir = root.join(format!("node{id}"));
        std::fs::create_dir_all(&dir)?;
        let bus = match &opts.nats_url {
            Some(url) => {
                format!("[bus]\nkind = \"nats\"\nack_wait_secs = 3\n[bus.nats]\nurl = \"{url}\"\n")
            }
            None => "[bus]\nkind = \"none\"\n".to_string(),
        };
        let members_section = if initial.contains(id) {
            format!("[cluster.initial_members]\n{members}")
        } else {
            String::new()
        };
        let text = format!(
            "[node]\nid = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nsecret_key_file = \"{}\"\ncluster_secret_file = \"{}\"\nadmin_token_file = \"{}\"\n\n[cluster]\nheartbeat_ms = 100\nelection_timeout_min_ms = 600\nelection_timeout_max_ms = 1200\nsnapshot_every = {}\nkeep_logs = {}\n{members_section}\n{bus}",
            dir.display(),
            shared.join("secret.key").display(),
            shared.join("cluster.secret").display(),
            shared.join("admin.token").display(),
            opts.snapshot_every,
            opts.keep_logs,
        );
        let config = dir.join("custos.toml");
        std::fs::write(&config, text)?;
        out.push(NodeProc {
            id: *id,
            port: *port,
            dir,
            config,
            child: None,
        });
    }
    Ok(out)
}

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Run the custos CLI against a node; returns (exit code, stdout, stderr).
pub fn cli(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(custos_bin())
        .args(args)
        .env("CUSTOS_SERVER", server)
        .env("CUSTOS_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run custos");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An authenticated gRPC client for tests.
pub async fn client(server: &str) -> custos_cli::Client {
    let g = custos_cli::Global {
        server: server.to_string(),
        token: Some(ADMIN_TOKEN.into()),
        token_file: None,
        ca: None,
        cert: None,
        key: None,
    };
    custos_cli::Client::connect(&g).await.unwrap()
}

/// The leader's id as seen by any reachable node.
pub async fn leader(nodes: &[&NodeProc]) -> Option<u64> {
    for n in nodes {
        if let Ok(s) = client(&n.server()).await.status().await {
            if s.leader_id != 0 {
                return Some(s.leader_id);
            }
        }
    }
    None
}

/// A throwaway CA and one certificate (SAN 127.0.0.1, localhost) per name, made with openssl.
pub fn make_pki(dir: &Path, names: &[&str]) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("openssl {args:?} failed");
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=custos-test-ca",
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    for n in names {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{n}.key"),
            "-out",
            &format!("{n}.csr"),
            "-subj",
            &format!("/CN={n}"),
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{n}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{n}.pem"),
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ])?;
    }
    Ok(())
}
