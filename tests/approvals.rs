//! Just-in-time approvals end to end: `custos dev` (control plane + edge), a private PostgreSQL,
//! psql as the client and the `custos approvals` CLI as the approver, all real processes.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::edge::{Background, EdgeEnv, EnvOpts};
use serde_json::Value;

const POLICY: &str = r#"
@id("agents-read")
permit (principal in Custos::Group::"agents", action in [
    Custos::Action::"sql:select", Custos::Action::"sql:set", Custos::Action::"sql:show",
    Custos::Action::"sql:transaction"
], resource);
@id("agent-deletes-need-a-dba")
@approval("group=dba,quorum=1,timeout=60s")
permit (principal in Custos::Group::"agents", action == Custos::Action::"sql:delete", resource)
when { context.has_where };
@id("agent-updates-need-two-dbas")
@approval("group=dba,quorum=2,timeout=60s")
permit (principal in Custos::Group::"agents", action == Custos::Action::"sql:update", resource);
@id("agent-inserts-expire-fast")
@approval("group=dba,timeout=3s")
permit (principal in Custos::Group::"agents", action == Custos::Action::"sql:insert", resource);
@id("no-truncate")
forbid (principal, action == Custos::Action::"sql:truncate", resource);
"#;

struct Approvals {
    env: EdgeEnv,
    carol: String,
    dave: String,
    /// An approver token for the requester itself (in group dba), to try self-approval.
    agent_as_approver: String,
}

fn setup(opts: EnvOpts) -> Result<Approvals> {
    let env = EdgeEnv::start(opts)?;
    let policy = env.dir.path().join("approvals.cedar");
    std::fs::write(&policy, POLICY)?;
    env.ok(&["policy", "apply", policy.to_str().unwrap()])?;
    let approver = |who: &str| -> Result<String> {
        Ok(env
            .ok(&[
                "token", "issue", who, "--group", "dba", "--role", "approver",
            ])?
            .trim()
            .to_string())
    };
    let carol = approver("carol")?;
    let dave = approver("dave")?;
    let agent_as_approver = approver("agent:reporter")?;
    // The edge has the new policy once a DELETE without WHERE is refused by it.
    let t0 = Instant::now();
    loop {
        let (_, _, err) = env.psql(
            &env.agent_token,
            "agent:reporter",
            "INSERT INTO canary VALUES (0) ON CONFLICT DO NOTHING; TRUNCATE canary",
        );
        if err.contains("no-truncate") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the edge never got the approvals policy: {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Approvals {
        env,
        carol,
        dave,
        agent_as_approver,
    })
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Approvals {
    fn as_(&self, token: &str, args: &[&str]) -> Output {
        self.env.cli_as(token, args)
    }

    /// Pending requests (JSON), waiting until there are `n`.
    fn pending(&self, n: usize) -> Result<Vec<Value>> {
        let t0 = Instant::now();
        loop {
            let o = self.as_(
                &self.carol,
                &["approvals", "list", "--state", "pending", "--json"],
            );
            let list: Vec<Value> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).expect("json"))
                .collect();
            if list.len() >= n {
                return Ok(list);
            }
            if t0.elapsed() > Duration::from_secs(15) {
                bail!(
                    "{} pending requests, wanted {n}: {}\nlog:\n{}",
                    list.len(),
                    out(&o),
                    self.env.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, id: &str) -> Value {
        let o = self.as_(&self.carol, &["approvals", "get", id, "--json"]);
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    fn canary(&self) -> Result<String> {
        Ok(self
            .env
            .pg
            .psql_super(
                "app",
                "SELECT string_agg(id::text, ',' ORDER BY id) FROM canary",
            )?
            .trim()
            .to_string())
    }
}

fn finish(c: Background, within: Duration) -> Result<(i32, String, String)> {
    c.finish(within)
}

fn still_running(c: &mut Background) -> bool {
    c.running()
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

fn event(v: &Value) -> &Value {
    &v["unmapped"]["custos"]["event"]
}

#[test]
fn a_held_delete_runs_once_approved_and_the_log_shows_it_in_order() -> Result<()> {
    let t = setup(EnvOpts::default())?;
    let env = &t.env;
    assert_eq!(t.canary()?, "1,2,3");
    // An approver watching live.
    let watch = Background::spawn(
        std::process::Command::new(common::custos_bin())
            .args(["approvals", "watch"])
            .env("CUSTOS_SERVER", &env.server)
            .env("CUSTOS_TOKEN", &t.carol)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let mut psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "/* reason: clean up test row */ DELETE FROM canary WHERE id = 1",
    );
    let pending = t.pending(1)?;
    let id = id_of(&pending[0]);
    assert_eq!(pending[0]["identity"], "agent:reporter");
    assert_eq!(pending[0]["action"], "sql:delete");
    assert_eq!(pending[0]["approver_group"], "dba");
    assert_eq!(pending[0]["reason"], "clean up test row");
    assert!(pending[0]["text"]
        .as_str()
        .unwrap()
        .contains("DELETE FROM canary WHERE id = 1"));
    // Held: nothing ran yet.
    std::thread::sleep(Duration::from_millis(300));
    let (watched, _) = watch.stop();
    assert!(watched.contains(&id), "watch printed: {watched}");
    assert!(
        watched.contains(&format!("custos approvals approve {id}")),
        "{watched}"
    );
    assert!(still_running(&mut psql), "psql must wait for the approval");
    assert_eq!(t.canary()?, "1,2,3");
    // The requester may not approve its own request, even as a member of the group.
    let own = t.as_(&t.agent_as_approver, &["approvals", "approve", &id]);
    assert!(!own.status.success());
    assert!(out(&own).contains("cannot approve"), "{}", out(&own));
    // A plain client token cannot decide at all.
    let plain = t.as_(&env.agent_token, &["approvals", "approve", &id]);
    assert!(!plain.status.success());
    assert!(out(&plain).contains("approver role"), "{}", out(&plain));
    assert!(still_running(&mut psql));

    let ok = t.as_(
        &t.carol,
        &["approvals", "approve", &id, "--comment", "go ahead"],
    );
    assert!(ok.status.success(), "{}", out(&ok));
    let (code, _, stderr) = finish(psql, Duration::from_secs(10))?;
    assert_eq!(code, 0, "{stderr}");
    // The client was told at once what it waits for.
    assert!(
        stderr.contains(&format!("waiting for approval {id}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("custos approvals approve {id}")),
        "{stderr}"
    );
    assert!(stderr.contains("group dba"), "{stderr}");
    assert_eq!(t.canary()?, "2,3");
    let a = t.get(&id);
    assert_eq!(a["state"], "approved");
    assert_eq!(a["decisions"][0]["approver"], "carol");

    // The audit log: the request, the approval and the command, in this order, chained.
    let t0 = Instant::now();
    let (req, dec, cmd) = loop {
        let recs = env.audit(&["--connection", "app"])?;
        let seq_of = |pred: &dyn Fn(&Value) -> bool| {
            recs.iter()
                .find(|r| pred(event(r)))
                .map(|r| r["unmapped"]["custos"]["seq"].as_u64().unwrap())
        };
        let req = seq_of(&|e| e["payload"]["approval_requested"]["approval_id"] == id.as_str());
        let dec = seq_of(&|e| {
            e["payload"]["approval_decided"]["approval_id"] == id.as_str()
                && e["payload"]["approval_decided"]["state"] == "approved"
        });
        let cmd = seq_of(&|e| e["payload"]["command_received"]["approval_id"] == id.as_str());
        if let (Some(a), Some(b), Some(c)) = (req, dec, cmd) {
            break (a, b, c);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("audit records missing: {req:?} {dec:?} {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(req < dec && dec < cmd, "order: {req} {dec} {cmd}");
    let recs = env.audit(&["--connection", "app", "--kind", "command_received"])?;
    let c = recs
        .iter()
        .map(event)
        .find(|e| e["payload"]["command_received"]["approval_id"] == id.as_str())
        .unwrap();
    assert_eq!(c["payload"]["command_received"]["verdict"], 4, "APPROVED");
    let verify = env.ok(&["audit", "verify"])?;
    assert!(verify.starts_with("ok:"), "{verify}");
    // The session's replay shows the hold and the decision with the statement.
    let session = a["session_id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let replay = env.ok(&["replay", &session]).unwrap_or_default();
        if replay.contains(&format!("approval {id} requested from dba"))
            && replay.contains(&format!("approval {id} approved by carol"))
            && replay.contains("DELETE FROM canary WHERE id = 1")
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "replay: {replay}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn denial_expiry_and_quorum() -> Result<()> {
    let t = setup(EnvOpts::default())?;
    let env = &t.env;
    // Denied: the rows remain and the client sees the approver's comment.
    let psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "DELETE FROM canary WHERE id = 2",
    );
    let id = id_of(&t.pending(1)?[0]);
    let no = t.as_(
        &t.dave,
        &[
            "approvals",
            "deny",
            &id,
            "--comment",
            "not during the freeze",
        ],
    );
    assert!(no.status.success(), "{}", out(&no));
    let (code, _, stderr) = finish(psql, Duration::from_secs(10))?;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("42501") || stderr.contains("permission denied"),
        "{stderr}"
    );
    assert!(
        stderr.contains("denied by dave: not during the freeze"),
        "{stderr}"
    );
    assert_eq!(t.canary()?, "1,2,3");
    // A decided request cannot be decided again.
    let late = t.as_(&t.carol, &["approvals", "approve", &id]);
    assert!(!late.status.success());
    assert!(out(&late).contains("already denied"), "{}", out(&late));

    // Expiry: nobody decides within 3 s.
    let started = Instant::now();
    let psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "INSERT INTO canary VALUES (9)",
    );
    let (code, _, stderr) = finish(psql, Duration::from_secs(20))?;
    assert_ne!(code, 0);
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(t.canary()?, "1,2,3");

    // Quorum 2: one approval is not enough.
    let mut psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "UPDATE canary SET id = 20 WHERE id = 2",
    );
    let id = id_of(&t.pending(1)?[0]);
    let one = t.as_(&t.carol, &["approvals", "approve", &id]);
    assert!(out(&one).contains("1 of 2"), "{}", out(&one));
    let again = t.as_(&t.carol, &["approvals", "approve", &id]);
    assert!(out(&again).contains("already voted"), "{}", out(&again));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        still_running(&mut psql),
        "one approval of two must not release it"
    );
    assert_eq!(t.get(&id)["state"], "pending");
    assert_eq!(t.canary()?, "1,2,3");
    let two = t.as_(&t.dave, &["approvals", "approve", &id]);
    assert!(two.status.success(), "{}", out(&two));
    let (code, _, stderr) = finish(psql, Duration::from_secs(10))?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.canary()?, "1,3,20");
    Ok(())
}

#[test]
fn time_boxed_grants_and_revocation_and_a_client_that_leaves() -> Result<()> {
    let t = setup(EnvOpts::default())?;
    let env = &t.env;
    let psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "DELETE FROM canary WHERE id = 1",
    );
    let id = id_of(&t.pending(1)?[0]);
    let ok = t.as_(&t.carol, &["approvals", "approve", &id, "--for", "4s"]);
    assert!(
        ok.status.success() && out(&ok).contains("grant"),
        "{}",
        out(&ok)
    );
    let granted_at = Instant::now();
    assert_eq!(finish(psql, Duration::from_secs(10))?.0, 0);
    // Within the window a second matching DELETE runs without asking.
    let (code, _, stderr) = env.psql(
        &env.agent_token,
        "agent:reporter",
        "DELETE FROM canary WHERE id = 2",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        granted_at.elapsed() < Duration::from_secs(4),
        "too slow to test the window"
    );
    assert_eq!(t.canary()?, "3");
    let uses = env.audit(&["--kind", "grant_used"])?;
    assert_eq!(uses.len(), 1, "one recorded use of the grant");
    // After the window it asks again; the client leaves while waiting: the request is cancelled.
    std::thread::sleep(
        Duration::from_secs(4).saturating_sub(granted_at.elapsed()) + Duration::from_millis(200),
    );
    let mut psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "DELETE FROM canary WHERE id = 3",
    );
    let id2 = id_of(&t.pending(1)?[0]);
    assert_ne!(id2, id);
    psql.kill();
    let t0 = Instant::now();
    while t.get(&id2)["state"] != "cancelled" {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not cancelled: {}",
            t.get(&id2)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(t.canary()?, "3");

    // Revoking a grant ends it at once.
    let psql = env.psql_spawn(
        &env.agent_token,
        "agent:reporter",
        "DELETE FROM canary WHERE id = 100",
    );
    let id3 = id_of(&t.pending(1)?[0]);
    assert!(t
        .as_(&t.carol, &["approvals", "approve", &id3, "--for", "30m"])
        .status
        .success());
    assert_eq!(finish(psql, Duration::from_secs(10))?.0, 0);
    let grant = t.get(&id3)["grant_id"].as_str().unwrap().to_string();
    let listed = t.as_(&t.carol, &["grants", "list"]);
    assert!(out(&listed).contains(&grant), "{}", out(&listed));
    assert!(t
        .as_(&t.carol, &["grants", "revoke", &grant])
        .status
        .success());
    // The edge hears of the revocation through its stream; then the DELETE asks again.
    let t0 = Instant::now();
    loop {
        let mut psql = env.psql_spawn(
            &env.agent_token,
            "agent:reporter",
            "DELETE FROM canary WHERE id = 101",
        );
        std::thread::sleep(Duration::from_millis(300));
        if still_running(&mut psql) {
            psql.kill();
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the revoked grant still applies"
        );
    }
    Ok(())
}

/// psql through the edge to another connection name.
fn psql_db(env: &EdgeEnv, db: &str, sql: &str) -> (i32, String, String) {
    let o = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} dbname={db} user=agent:reporter sslmode=require",
            env.pg_port
        ))
        .args(["-c", sql])
        .env("PGPASSWORD", &env.agent_token)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_connection_that_refuses_at_once_runs_the_retry_after_approval() -> Result<()> {
    let t = setup(EnvOpts::default())?;
    let env = &t.env;
    let addr = env.pg.addr();
    env.ok(&[
        "connection",
        "put",
        "app-refuse",
        "--kind",
        "postgres",
        "--address",
        &addr,
        "-o",
        "database=app",
        "-o",
        "approval_wait=refuse",
        "-s",
        "username=app",
        "-s",
        "password=env:APP_PW",
    ])?;
    let t0 = Instant::now();
    while psql_db(env, "app-refuse", "SELECT 1").0 != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the edge never got app-refuse"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sql = "DELETE FROM canary WHERE id = 3";
    let (code, _, stderr) = psql_db(env, "app-refuse", sql);
    assert_ne!(code, 0);
    assert!(stderr.contains("does not wait"), "{stderr}");
    let pending = t.pending(1)?;
    assert_eq!(pending[0]["held"], false);
    let id = id_of(&pending[0]);
    assert!(stderr.contains(&id), "{stderr}");
    assert_eq!(t.canary()?, "1,2,3");
    assert!(t
        .as_(&t.carol, &["approvals", "approve", &id])
        .status
        .success());
    // The retry runs once; a third try asks again.
    let t0 = Instant::now();
    loop {
        let (code, _, stderr) = psql_db(env, "app-refuse", sql);
        if code == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(t.canary()?, "1,2");
    let (code, _, stderr) = psql_db(env, "app-refuse", sql);
    assert_ne!(code, 0);
    assert!(stderr.contains("does not wait"), "{stderr}");
    let used = env.audit(&["--kind", "grant_used"])?;
    assert_eq!(used.len(), 1);
    assert_eq!(event(&used[0])["payload"]["grant_used"]["kind"], "one_shot");
    Ok(())
}
