//! A private PostgreSQL for tests: its own data directory, an ephemeral port, SCRAM-SHA-256
//! passwords, killed on drop. Runs the server as the `postgres` user when the tests run as root
//! (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::free_port;

pub struct PgServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Password of the `postgres` superuser.
    pub superuser_password: String,
}

fn bin_dir() -> Result<PathBuf> {
    for v in ["17", "16", "15", "14", "13"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    bail!(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (install postgresql)"
    )
}

fn as_root() -> bool {
    // SAFETY-free check: `id -u` prints 0 for root.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn pg_cmd(bin: &Path) -> Command {
    if as_root() {
        // setpriv execs in place, so the child's pid is the server's own.
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl PgServer {
    /// Start a server with `extra` `-c name=value` settings.
    pub fn start(extra: &[&str]) -> Result<PgServer> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("custos-pg").tempdir()?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        let superuser_password = format!("su-{}", uuid::Uuid::now_v7().simple());
        std::fs::write(&pwfile, &superuser_password)?;
        if as_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !st.success() {
                bail!("chown postgres failed");
            }
        }
        let out = pg_cmd(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .context("initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port();
        let mut cmd = pg_cmd(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        for e in extra {
            cmd.args(["-c", e]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("server.log"),
            )?))
            .spawn()
            .context("start postgres")?;
        let s = PgServer {
            child: Some(child),
            port,
            dir,
            superuser_password,
        };
        let start = Instant::now();
        loop {
            if s.psql_super("postgres", "SELECT 1").is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("postgres did not start: {}", s.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Run SQL as the superuser over TCP (SCRAM); returns stdout.
    pub fn psql_super(&self, db: &str, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.superuser_password)
            .env("PGSSLMODE", "disable")
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown (the child may run as another user, so use kill(1)).
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
