//! Slack approvals against a stand-in for Slack's Web API: a `custos controlplane` process with
//! `[slack]` posts the pending request (chat.postMessage with Approve/Deny buttons), takes a
//! correctly signed button click over HTTPS as carol's approval and updates the message
//! (chat.update); badly signed, stale and replayed clicks get 401 and change nothing.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{cli, cluster, free_port, make_pki, wait_port, ClusterOpts, ADMIN_TOKEN};
use custos_proto::v1::{approvals_client::ApprovalsClient, CreateApprovalRequest};
use hmac::{Hmac, Mac};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Records every request as a JSON line and answers like Slack's Web API.
const SLACK_STUB: &str = r#"
import http.server, json, sys
log = open(sys.argv[2], 'a')
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get('Content-Length', 0))
        body = self.rfile.read(n).decode()
        log.write(json.dumps({"path": self.path, "auth": self.headers.get('Authorization', ''), "body": body}) + "\n")
        log.flush()
        resp = json.dumps({"ok": True, "channel": "C0TEST", "ts": "1700000000.000100"}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(resp)))
        self.end_headers()
        self.wfile.write(resp)
    def log_message(self, *a):
        pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"#;

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

fn sign(ts: i64, body: &str, secret: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn click(user: &str, id: &str, approve: bool) -> String {
    let payload = serde_json::json!({
        "type": "block_actions",
        "user": {"id": user, "username": "carol"},
        "channel": {"id": "C0TEST"},
        "message": {"ts": "1700000000.000100"},
        "actions": [{"action_id": if approve { "custos_approve" } else { "custos_deny" }, "value": id}],
    });
    form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish()
}

/// POST to the interactions endpoint with curl; returns the HTTP status and body.
fn post(url: &str, ca: &std::path::Path, ts: &str, sig: &str, body: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "Content-Type: application/x-www-form-urlencoded"])
        .args(["-H", &format!("X-Slack-Request-Timestamp: {ts}")])
        .args(["-H", &format!("X-Slack-Signature: {sig}")])
        .args(["--data-binary", body, url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn stub_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn state(server: &str, token: &str, id: &str) -> String {
    let o = Command::new(common::custos_bin())
        .args(["approvals", "get", id, "--json"])
        .env("CUSTOS_SERVER", server)
        .env("CUSTOS_TOKEN", token)
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .map(|v| v["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_posts_the_request_and_only_a_correctly_signed_fresh_click_decides() -> Result<()> {
    let root = tempfile::tempdir()?;
    let api_port = free_port();
    let api_log = root.path().join("slack-api.jsonl");
    let _stub = Proc(
        Command::new("python3")
            .args(["-c", SLACK_STUB, &api_port.to_string()])
            .arg(&api_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(api_port, Duration::from_secs(10))?;
    make_pki(root.path(), &["slack"])?;
    std::fs::write(root.path().join("bot.token"), "xoxb-test-bot-token")?;
    std::fs::write(root.path().join("signing.secret"), SIGNING_SECRET)?;
    let slack_port = free_port();
    let mut nodes = cluster(root.path(), &[1], &[1], &ClusterOpts::default())?;
    let mut cfg = std::fs::read_to_string(&nodes[0].config)?;
    cfg.push_str(&format!(
        "\n[slack]\napi_base = \"http://127.0.0.1:{api_port}/api\"\nbot_token_file = \"{}\"\nchannel = \"C0TEST\"\nsigning_secret_file = \"{}\"\nlisten = \"127.0.0.1:{slack_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[slack.users]\nU0CAROL = \"carol\"\nU0MALLORY = \"mallory\"\n",
        root.path().join("bot.token").display(),
        root.path().join("signing.secret").display(),
        root.path().join("slack.pem").display(),
        root.path().join("slack.key").display(),
    ));
    std::fs::write(&nodes[0].config, cfg)?;
    nodes[0].spawn()?;
    wait_port(slack_port, Duration::from_secs(20))?;
    let server = nodes[0].server();
    let t0 = Instant::now();
    while !cli(&server, &["cluster", "status"]).1.contains("leader 1") {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", nodes[0].log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let carol = cli(
        &server,
        &[
            "token", "issue", "carol", "--group", "dba", "--role", "approver",
        ],
    )
    .1
    .trim()
    .to_string();

    // What an edge does when a command needs approval.
    let mut api = ApprovalsClient::connect(server.clone()).await?;
    let create = |text: &str| {
        let mut r = tonic::Request::new(CreateApprovalRequest {
            edge_id: "edge-test".into(),
            session_id: "s1".into(),
            command_id: "c1".into(),
            identity: "agent:writer".into(),
            groups: vec!["agents".into()],
            connection: "prod-pg".into(),
            action: "sql:delete".into(),
            text: text.into(),
            policy_id: "agent-deletes-need-a-dba".into(),
            approver_group: "dba".into(),
            quorum: 1,
            timeout_seconds: 300,
            held: true,
            ..Default::default()
        });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
        );
        r
    };
    let a = api
        .create(create("DELETE FROM orders WHERE id = 812"))
        .await?
        .into_inner();
    // The request is posted with both buttons.
    let t0 = Instant::now();
    let post_msg = loop {
        if let Some(p) = stub_log(&api_log).into_iter().find(|r| {
            r["path"]
                .as_str()
                .unwrap_or("")
                .ends_with("chat.postMessage")
        }) {
            break p;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("no chat.postMessage; node log:\n{}", nodes[0].log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(post_msg["auth"], "Bearer xoxb-test-bot-token");
    let body = post_msg["body"].as_str().unwrap();
    for want in [
        "C0TEST",
        "custos_approve",
        "custos_deny",
        a.id.as_str(),
        "DELETE FROM orders WHERE id = 812",
    ] {
        assert!(body.contains(want), "postMessage lacks {want}: {body}");
    }

    let url = format!("https://127.0.0.1:{slack_port}/slack/interactions");
    let ca = root.path().join("ca.pem");
    let now = chrono::Utc::now().timestamp();
    let good = click("U0CAROL", &a.id, true);
    // Badly signed: 401, nothing changes.
    let (code, why) = post(
        &url,
        &ca,
        &now.to_string(),
        &sign(now, &good, "not-the-secret"),
        &good,
    );
    assert_eq!(code, 401, "{why}");
    // Signed, but from more than 5 minutes ago (a replay of an old click): 401.
    let old = now - 600;
    let (code, why) = post(
        &url,
        &ca,
        &old.to_string(),
        &sign(old, &good, SIGNING_SECRET),
        &good,
    );
    assert_eq!(code, 401, "{why}");
    // A user custos does not know: 403.
    let stranger = click("U0STRANGER", &a.id, true);
    let (code, why) = post(
        &url,
        &ca,
        &now.to_string(),
        &sign(now, &stranger, SIGNING_SECRET),
        &stranger,
    );
    assert_eq!(code, 403, "{why}");
    // A known Slack user whose identity holds no approver token cannot decide.
    let mallory = click("U0MALLORY", &a.id, true);
    let (code, why) = post(
        &url,
        &ca,
        &now.to_string(),
        &sign(now, &mallory, SIGNING_SECRET),
        &mallory,
    );
    assert_eq!(code, 200, "{why}");
    assert!(why.contains("no valid approver token"), "{why}");
    assert_eq!(state(&server, &carol, &a.id), "pending");

    // Correctly signed and fresh: carol approves.
    let sig = sign(now, &good, SIGNING_SECRET);
    let (code, why) = post(&url, &ca, &now.to_string(), &sig, &good);
    assert_eq!(code, 200, "{why}");
    assert!(why.contains("approved"), "{why}");
    assert_eq!(state(&server, &carol, &a.id), "approved");
    // The same request again is a replay.
    let (code, why) = post(&url, &ca, &now.to_string(), &sig, &good);
    assert_eq!(code, 401, "{why}");
    // The original message is updated with the outcome.
    let t0 = Instant::now();
    loop {
        let log = stub_log(&api_log);
        if let Some(u) = log
            .iter()
            .find(|r| r["path"].as_str().unwrap_or("").ends_with("chat.update"))
        {
            let b = u["body"].as_str().unwrap();
            assert!(
                b.contains("1700000000.000100") && b.contains("carol"),
                "{b}"
            );
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("no chat.update: {log:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The decision is in the audit log as carol's.
    let recs = cli(
        &server,
        &["audit", "search", "--kind", "approval_decided", "--json"],
    )
    .1;
    assert!(recs.contains(&a.id) && recs.contains("\"carol\""), "{recs}");
    Ok(())
}
