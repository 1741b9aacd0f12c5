//! A whole data path for tests: a private PostgreSQL (SCRAM), `custos dev` (control plane +
//! Postgres edge + in-process bus) as a real process, a policy, a connection and tokens.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};

use super::pg::PgServer;
use super::{custos_bin, free_port, wait_port};

/// The policy the edge tests run with.
pub const POLICY: &str = r#"
@id("agents-read-write")
permit (principal in Custos::Group::"agents", action in [
    Custos::Action::"sql:select", Custos::Action::"sql:insert", Custos::Action::"sql:update",
    Custos::Action::"sql:delete", Custos::Action::"sql:set", Custos::Action::"sql:show",
    Custos::Action::"sql:transaction", Custos::Action::"sql:explain", Custos::Action::"sql:prepare",
    Custos::Action::"sql:other", Custos::Action::"sql:copy", Custos::Action::"sql:listen",
    Custos::Action::"sql:notify"
], resource);
@id("dba-all")
permit (principal in Custos::Group::"dba", action in Custos::Action::"sql:all", resource);
@id("no-drop-or-truncate")
forbid (principal, action in [Custos::Action::"sql:drop", Custos::Action::"sql:truncate"], resource);
@id("no-delete-without-where")
forbid (principal, action == Custos::Action::"sql:delete", resource) when { !context.has_where };
@id("no-server-files")
forbid (principal, action in Custos::Action::"sql:all", resource)
when { context.functions.contains("pg_read_file") || context.functions.contains("pg_read_binary_file")
    || context.functions.contains("lo_import") || context.functions.contains("lo_export")
    || context.functions.contains("dblink_exec") };
@id("no-copy-program")
forbid (principal, action == Custos::Action::"sql:copy", resource)
when { context.statement_kind == "copy_program" || context.statement_kind == "copy_file" };
@id("approval-for-grants")
@approval("group=dba-leads,timeout=2s")
permit (principal in Custos::Group::"agents", action == Custos::Action::"sql:grant", resource);
"#;

/// Masking rules the edge tests run with.
pub const MASKING: &str = r#"
[masking]
hash_key = "00112233445566778899aabbccddeeff"
columns = [
  { pattern = "users.ssn", strategy = "null" },
  { pattern = "*salary*", strategy = "redact" },
]
exempt = [ { connection = "app", groups = ["dba"] } ]
"#;

pub struct EdgeEnv {
    pub pg: PgServer,
    pub dir: tempfile::TempDir,
    pub server: String,
    pub admin_token: String,
    pub pg_port: u16,
    /// The edge's HTTP/LLM/MCP listener.
    pub http_port: u16,
    pub app_password: String,
    pub agent_token: String,
    pub dba_token: String,
    child: Option<Child>,
}

pub struct EnvOpts {
    pub allow_insecure: bool,
    pub audit_mode: &'static str,
    pub extra_dev_args: Vec<String>,
}

impl Default for EnvOpts {
    fn default() -> Self {
        EnvOpts {
            allow_insecure: true,
            audit_mode: "strict",
            extra_dev_args: vec![],
        }
    }
}

pub const SEED: &str = r#"
CREATE TABLE users (id int PRIMARY KEY, name text, email text, ssn text, salary int, card text);
INSERT INTO users VALUES
 (1, 'Ada', 'ada@example.com', '123-45-6789', 120000, '4111 1111 1111 1111'),
 (2, 'Bob', 'bob@example.org', '987-65-4321', 95000, '5500 0000 0000 0004');
CREATE TABLE canary (id int);
INSERT INTO canary VALUES (1), (2), (3);
CREATE TABLE notes (id serial PRIMARY KEY, body text);
"#;

/// Create role `app` (SCRAM password, returned) and database `app` with the seed tables.
pub fn app_database(pg: &PgServer) -> Result<String> {
    let app_password = format!("app-pw-{}", uuid::Uuid::now_v7().simple());
    pg.psql_super(
        "postgres",
        &format!("CREATE ROLE app LOGIN PASSWORD '{app_password}'"),
    )?;
    pg.psql_super("postgres", "CREATE DATABASE app OWNER app")?;
    // Seed as app, so app owns the tables.
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "app",
            "-d",
            "app",
            "-c",
            SEED,
        ])
        .env("PGPASSWORD", &app_password)
        .env("PGSSLMODE", "disable")
        .output()?;
    if !out.status.success() {
        bail!("seed failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(app_password)
}

impl EdgeEnv {
    pub fn start(opts: EnvOpts) -> Result<EdgeEnv> {
        let pg = PgServer::start(&[])?;
        let app_password = app_database(&pg)?;
        let dir = tempfile::tempdir()?;
        let masking = dir.path().join("masking.toml");
        std::fs::write(&masking, MASKING)?;
        let cp_port = free_port();
        let pg_port = free_port();
        let http_port = free_port();
        let log = std::fs::File::create(dir.path().join("custos.log"))?;
        let mut cmd = Command::new(custos_bin());
        cmd.args(["dev", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen", &format!("127.0.0.1:{cp_port}")])
            .args(["--postgres-listen", &format!("127.0.0.1:{pg_port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .arg("--masking")
            .arg(&masking);
        if opts.allow_insecure {
            cmd.arg("--allow-insecure-password");
        }
        cmd.args(&opts.extra_dev_args);
        let child = cmd
            .env("CUSTOS_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        let mut env = EdgeEnv {
            pg,
            server: format!("http://127.0.0.1:{cp_port}"),
            admin_token: String::new(),
            pg_port,
            http_port,
            app_password,
            agent_token: String::new(),
            dba_token: String::new(),
            dir,
            child: Some(child),
        };
        wait_port(cp_port, Duration::from_secs(30))?;
        wait_port(pg_port, Duration::from_secs(30))?;
        env.admin_token = std::fs::read_to_string(env.dir.path().join("data/admin.token"))?
            .trim()
            .to_string();
        let policy = env.dir.path().join("policy.cedar");
        std::fs::write(&policy, POLICY)?;
        env.ok(&["policy", "apply", policy.to_str().unwrap()])?;
        let addr = env.pg.addr();
        let mode = format!("audit_mode={}", opts.audit_mode);
        env.ok(&[
            "connection",
            "put",
            "app",
            "--kind",
            "postgres",
            "--address",
            &addr,
            "-o",
            "database=app",
            "-o",
            &mode,
            "-o",
            "audit_rows=20",
            "-s",
            "username=app",
            "-s",
            "password=env:APP_PW",
        ])?;
        env.agent_token = env
            .ok(&[
                "token",
                "issue",
                "agent:reporter",
                "--group",
                "agents",
                "--ttl",
                "1h",
            ])?
            .trim()
            .to_string();
        env.dba_token = env
            .ok(&["token", "issue", "alice", "--group", "dba", "--ttl", "1h"])?
            .trim()
            .to_string();
        // The edge sees the connection and tokens once the watch stream delivered them.
        for _ in 0..100 {
            let (code, _, _) = env.psql(&env.agent_token.clone(), "agent:reporter", "SELECT 1");
            if code == 0 {
                return Ok(env);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("edge never let the agent in; log:\n{}", env.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("custos.log")).unwrap_or_default()
    }

    /// Run a custos CLI command against this control plane.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(custos_bin())
            .args(args)
            .env("CUSTOS_SERVER", &self.server)
            .env("CUSTOS_TOKEN", &self.admin_token)
            .env("APP_PW", &self.app_password)
            .output()
            .expect("run custos")
    }

    /// Run a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            bail!(
                "custos {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The libpq connection string for a user and token.
    pub fn conninfo(&self, user: &str, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=app user={user} sslmode={sslmode}",
            self.pg_port
        )
    }

    /// psql through the edge (TLS required); returns (exit code, stdout, stderr).
    pub fn psql(&self, token: &str, user: &str, sql: &str) -> (i32, String, String) {
        self.psql_with(token, user, "require", &["-c", sql])
    }

    pub fn psql_with(
        &self,
        token: &str,
        user: &str,
        sslmode: &str,
        args: &[&str],
    ) -> (i32, String, String) {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(self.conninfo(user, sslmode))
            .args(args)
            .env("PGPASSWORD", token)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// psql through the edge, started in the background (its output is captured).
    pub fn psql_spawn(&self, token: &str, user: &str, sql: &str) -> Background {
        Background::spawn(
            Command::new("psql")
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .arg(self.conninfo(user, "require"))
                .args(["-c", sql])
                .env("PGPASSWORD", token)
                .env("PGCONNECT_TIMEOUT", "10")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
    }

    /// Run a custos CLI command with another token.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(custos_bin())
            .args(args)
            .env("CUSTOS_SERVER", &self.server)
            .env("CUSTOS_TOKEN", token)
            .output()
            .expect("run custos")
    }

    /// A tokio-postgres client through the edge (plain TCP; the env allows it).
    pub async fn client(&self, token: &str, user: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(
            &format!("{} password={token}", self.conninfo(user, "disable")),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Audit records as OCSF JSON values for a filter.
    pub fn audit(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let mut a = vec!["audit", "search", "--json", "--limit", "10000"];
        a.extend_from_slice(args);
        let out = self.ok(&a)?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for EdgeEnv {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client process running in the background; killed if the test ends before it does.
pub struct Background(Option<Child>);

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        Background(Some(cmd.spawn().expect("spawn")))
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill it and return what it printed: (stdout, stderr).
    pub fn stop(mut self) -> (String, String) {
        let Some(mut c) = self.0.take() else {
            return Default::default();
        };
        let _ = c.kill();
        match c.wait_with_output() {
            Ok(o) => (
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(_) => Default::default(),
        }
    }

    /// Wait for it to end: (exit code, stdout, stderr). Killed after `within`.
    pub fn finish(mut self, within: Duration) -> Result<(i32, String, String)> {
        let t0 = std::time::Instant::now();
        while self.running() {
            if t0.elapsed() > within {
                self.kill();
                bail!("the process did not finish within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some(c) = self.0.take() else {
            bail!("the process was killed");
        };
        let o = c.wait_with_output()?;
        Ok((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}
