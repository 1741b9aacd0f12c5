//! The HTTP, LLM and MCP listener end to end: `custos dev` with its HTTP listener, real upstream
//! processes (a Python HTTP API, an OpenAI-compatible server, a FastMCP server) and real clients
//! (curl, the `openai` and `mcp` Python SDKs).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::edge::{Background, EdgeEnv, EnvOpts};
use serde_json::Value;

const POLICY: &str = r#"
@id("agents-http-read")
permit (principal in Custos::Group::"agents", action in Custos::Action::"http:read", resource);
@id("agents-http-echo")
permit (principal in Custos::Group::"agents", action == Custos::Action::"http:POST", resource)
when { context.path like "/echo*" };
@id("no-admin-api")
forbid (principal, action in Custos::Action::"http:all", resource) when { context.path like "/admin*" };
@id("not-against-production")
forbid (principal, action in Custos::Action::"http:all", resource)
when { context.headers.contains("x-env: production") };
@id("agents-llm")
permit (principal in Custos::Group::"agents", action in Custos::Action::"llm:all", resource);
@id("no-cards-to-llms")
forbid (principal, action == Custos::Action::"llm:chat", resource)
when { context.prompt_detectors.contains("credit_card") };
@id("only-approved-models")
forbid (principal, action == Custos::Action::"llm:chat", resource)
when { context.model like "*forbidden*" };
@id("agents-mcp")
permit (principal in Custos::Group::"agents", action in Custos::Action::"mcp:all", resource);
@id("no-delete-everything")
forbid (principal, action == Custos::Action::"mcp:call", resource == Custos::Tool::"delete_everything");
@id("add-needs-a-dba")
@approval("group=dba,timeout=60s")
permit (principal in Custos::Group::"agents", action == Custos::Action::"mcp:call", resource)
when { context.tool == "add" };
"#;

/// A small HTTP API: logs each request's headers, answers with JSON holding PII and a secret.
const API_STUB: &str = r#"
import http.server, json, sys
log = open(sys.argv[2], 'a')
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def reply(self, code, ctype, body):
        b = body.encode()
        self.send_response(code)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(b)))
        self.send_header('Connection', 'keep-alive, x-hop')
        self.send_header('X-Hop', 'must-not-pass')
        self.end_headers()
        self.wfile.write(b)
    def handle_any(self):
        n = int(self.headers.get('Content-Length', 0) or 0)
        body = self.rfile.read(n).decode() if n else ''
        log.write(json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}) + "\n")
        log.flush()
        if self.path.startswith('/users'):
            self.reply(200, 'application/json', json.dumps({"users": [{"id": 1, "name": "Ada", "email": "ada@example.com"}], "note": "key AKIAIOSFODNN7EXAMPLE"}))
        elif self.path.startswith('/text'):
            self.reply(200, 'text/plain; charset=utf-8', 'contact bob@example.org now')
        elif self.path.startswith('/echo'):
            self.reply(200, 'application/json', body or '{}')
        else:
            self.reply(200, 'application/json', '{"ok": true}')
    do_GET = handle_any
    do_POST = handle_any
    do_DELETE = handle_any
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"#;

fn py(script: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script)
}

/// Start a Python server that prints `READY <port>`.
fn server(args: &[&str]) -> Result<Background> {
    let port: u16 = args
        .windows(2)
        .find(|w| w[0] == "--port")
        .and_then(|w| w[1].parse().ok())
        .expect("--port");
    let bg = Background::spawn(
        Command::new("python3")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    common::wait_port(port, Duration::from_secs(30))?;
    Ok(bg)
}

struct Curl {
    status: u16,
    headers: String,
    body: String,
}

fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (mut head, mut body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Interim answers (100 Continue) come first.
    while head.starts_with("HTTP/1.1 1") {
        (head, body) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
    }
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Curl {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

fn put_connection(env: &EdgeEnv, args: &[&str]) -> Result<()> {
    let mut a = vec!["connection", "put"];
    a.extend_from_slice(args);
    env.ok(&a)?;
    Ok(())
}

fn setup() -> Result<EdgeEnv> {
    let env = EdgeEnv::start(EnvOpts::default())?;
    let policy = env.dir.path().join("http.cedar");
    std::fs::write(&policy, POLICY)?;
    env.ok(&["policy", "apply", policy.to_str().unwrap()])?;
    Ok(env)
}

/// Wait until the edge serves `url` with something other than 404 (it learns connections
/// through its stream).
fn wait_served(env: &EdgeEnv, path: &str) -> Result<()> {
    let url = format!("http://127.0.0.1:{}{path}", env.http_port);
    let t0 = Instant::now();
    loop {
        let r = curl(&[
            "-H",
            &format!("Authorization: Bearer {}", env.agent_token),
            &url,
        ]);
        if r.status != 404 && r.status != 0 {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{url} never served: {} {}", r.status, r.body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Put an `http` connection `name` to the upstream on `port` and wait until the edge serves it.
fn http_connection(env: &EdgeEnv, name: &str, port: u16) -> Result<()> {
    put_connection(
        env,
        &[
            name,
            "--kind",
            "http",
            "--address",
            &format!("http://127.0.0.1:{port}"),
        ],
    )?;
    wait_served(env, &format!("/{name}/x"))
}

fn event(v: &Value) -> &Value {
    &v["unmapped"]["custos"]["event"]
}

#[test]
fn http_api_allowed_denied_masked_with_the_credential_injected() -> Result<()> {
    let env = setup()?;
    let port = common::free_port();
    let log = env.dir.path().join("api.jsonl");
    let _api = server(&[
        "-c",
        API_STUB,
        &port.to_string(),
        log.to_str().unwrap(),
        "--port",
        &port.to_string(),
    ])?;
    put_connection(
        &env,
        &[
            "api",
            "--kind",
            "http",
            "--address",
            &format!("http://127.0.0.1:{port}"),
            "-o",
            "mask_paths=$.users[*].name",
            "-o",
            "policy_headers=x-env",
            "-s",
            "bearer_token=upstream-secret-token",
        ],
    )?;
    wait_served(&env, "/api/users")?;
    let base = format!("http://127.0.0.1:{}/api", env.http_port);
    let auth = format!("Authorization: Bearer {}", env.agent_token);

    // Allowed, masked: the field path and the detectors.
    let r = curl(&["-H", &auth, &format!("{base}/users?limit=1")]);
    assert_eq!(r.status, 200, "{} {}", r.headers, r.body);
    let v: Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["users"][0]["name"], "[REDACTED:field]", "{}", r.body);
    assert!(!r.body.contains("ada@example.com"), "{}", r.body);
    assert!(!r.body.contains("AKIAIOSFODNN7EXAMPLE"), "{}", r.body);
    assert!(r.body.contains("[REDACTED:email]"), "{}", r.body);
    assert_eq!(v["users"][0]["id"], 1);
    // Hop-by-hop headers do not pass; the masked body is re-framed correctly.
    assert!(
        !r.headers.to_ascii_lowercase().contains("x-hop"),
        "{}",
        r.headers
    );
    assert!(
        !r.headers.contains("upstream-secret-token") && !r.body.contains("upstream-secret-token")
    );
    // Text bodies are masked too.
    let t = curl(&["-H", &auth, &format!("{base}/text")]);
    assert_eq!(t.status, 200);
    assert!(
        t.body.contains("[REDACTED:email]") && !t.body.contains("bob@example.org"),
        "{}",
        t.body
    );
    // POST allowed on /echo only.
    let e = curl(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"a":"b"}"#,
        &format!("{base}/echo"),
    ]);
    assert_eq!((e.status, e.body.as_str()), (200, r#"{"a":"b"}"#));

    // The upstream saw the injected credential and never the custos token.
    let seen = std::fs::read_to_string(&log)?;
    assert!(seen.contains("Bearer upstream-secret-token"), "{seen}");
    assert!(
        !seen.contains(&env.agent_token),
        "the upstream saw the custos token: {seen}"
    );

    // Denied: a forbid, and no permit. RFC 9457 problem documents naming the rule.
    let d = curl(&["-H", &auth, &format!("{base}/admin/keys")]);
    assert_eq!(d.status, 403);
    assert!(
        d.headers.contains("application/problem+json"),
        "{}",
        d.headers
    );
    let p: Value = serde_json::from_str(&d.body)?;
    assert_eq!(p["status"], 403);
    assert!(
        p["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "no-admin-api"),
        "{}",
        d.body
    );
    let d = curl(&["-H", &auth, "-X", "DELETE", &format!("{base}/users/1")]);
    assert_eq!(d.status, 403, "{}", d.body);
    // Selected headers are in the policy context.
    let d = curl(&[
        "-H",
        &auth,
        "-H",
        "X-Env: production",
        &format!("{base}/users"),
    ]);
    assert_eq!(d.status, 403, "{}", d.body);
    assert!(d.body.contains("not-against-production"), "{}", d.body);
    let n = std::fs::read_to_string(&log)?.lines().count();
    assert_eq!(n, 4, "denied requests must not reach the upstream");

    // No token, a bad token.
    let u = curl(&[&format!("{base}/users")]);
    assert_eq!(u.status, 401);
    assert!(
        u.headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        u.headers
    );
    let u = curl(&[
        "-H",
        "Authorization: Bearer cst_nope_nope",
        &format!("{base}/users"),
    ]);
    assert_eq!(u.status, 401);
    assert!(u.body.contains("token"), "{}", u.body);
    // An unknown connection.
    let nf = curl(&[
        "-H",
        &auth,
        &format!("http://127.0.0.1:{}/nope/x", env.http_port),
    ]);
    assert_eq!(nf.status, 404);

    // The audit log: allowed and denied commands, and the completion with status and masking.
    let t0 = Instant::now();
    loop {
        let recs = env.audit(&["--connection", "api"])?;
        let got = |f: &dyn Fn(&Value) -> bool| recs.iter().any(|r| f(event(r)));
        let ok = got(&|e| e["payload"]["command_received"]["text"] == "GET /users?limit=1")
            && got(&|e| {
                e["payload"]["command_received"]["text"] == "GET /admin/keys"
                    && e["payload"]["command_received"]["verdict"] == 2
            })
            && got(&|e| {
                e["payload"]["command_completed"]["status"] == 200
                    && e["payload"]["command_completed"]["masked_values"]
                        .as_u64()
                        .unwrap_or(0)
                        >= 3
            });
        if ok {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("audit records missing: {recs:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn openai(env: &EdgeEnv, args: &[&str]) -> (i32, Value) {
    let out = Command::new("python3")
        .arg(py("openai_client.py"))
        .args([
            "--base-url",
            &format!("http://127.0.0.1:{}/openai/v1", env.http_port),
            "--api-key",
            &env.agent_token,
        ])
        .args(args)
        .output()
        .expect("python3");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        serde_json::json!({"raw": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr)})
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn llm_through_the_openai_sdk_streams_masked_at_every_split() -> Result<()> {
    let env = setup()?;
    let port = common::free_port();
    let log = env.dir.path().join("llm.jsonl");
    let _llm = server(&[
        py("llm_upstream.py").to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--key",
        "upstream-llm-key",
        "--log",
        log.to_str().unwrap(),
    ])?;
    put_connection(
        &env,
        &[
            "openai",
            "--kind",
            "llm",
            "--address",
            &format!("http://127.0.0.1:{port}"),
            "-s",
            "api_key=upstream-llm-key",
        ],
    )?;
    wait_served(&env, "/openai/v1/models")?;

    let (code, v) = openai(&env, &["--mode", "chat", "--message", "hi"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["content"], "hello from upstream");
    let (code, v) = openai(&env, &["--mode", "embeddings", "--message", "hi"]);
    assert_eq!(code, 0, "{v}");
    assert!(v["count"].as_u64().unwrap() >= 1);
    // The upstream saw only the provider key.
    let seen = std::fs::read_to_string(&log)?;
    assert!(seen.contains("upstream-llm-key") && !seen.contains(&env.agent_token));

    // A secret split across delta events at every offset never reaches the client.
    let secret = "AKIAIOSFODNN7EXAMPLE";
    let reply = format!("the key is {secret} ok");
    let start = reply.find(secret).unwrap();
    for k in start..=start + secret.len() {
        let msg = format!(
            "REPLY:{}",
            serde_json::json!({"text": reply, "split": [k, (k + 7).min(reply.len())]})
        );
        let (code, v) = openai(&env, &["--mode", "chat-stream", "--message", &msg]);
        assert_eq!(code, 0, "split {k}: {v}");
        let content = v["content"].as_str().unwrap_or("");
        assert!(!content.contains(secret), "split {k} leaked: {v}");
        assert!(content.contains("[REDACTED"), "split {k}: {v}");
        assert!(
            content.starts_with("the key is ") && content.ends_with(" ok"),
            "split {k}: {v}"
        );
    }

    // Policy on the prompt and the model.
    let (code, v) = openai(
        &env,
        &[
            "--mode",
            "chat",
            "--message",
            "my card is 4111 1111 1111 1111",
        ],
    );
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["status"], 403, "{v}");
    assert!(v.to_string().contains("no-cards-to-llms"), "{v}");
    let (code, v) = openai(
        &env,
        &[
            "--mode",
            "chat",
            "--message",
            "hi",
            "--model",
            "gpt-forbidden",
        ],
    );
    assert_eq!((code, v["status"].as_i64()), (3, Some(403)), "{v}");

    // Model and token usage are recorded with the completion.
    let t0 = Instant::now();
    loop {
        let recs = env.audit(&["--connection", "openai", "--kind", "command_completed"])?;
        if recs.iter().any(|r| {
            let c = &event(r)["payload"]["command_completed"];
            c["model"].as_str().is_some_and(|m| !m.is_empty())
                && c["output_tokens"].as_u64().unwrap_or(0) > 0
        }) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("no completion with usage: {recs:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn mcp(env: &EdgeEnv, args: &[&str]) -> (i32, Value) {
    let out = Command::new("python3")
        .arg(py("mcp_client.py"))
        .args([
            "--url",
            &format!("http://127.0.0.1:{}/tools/mcp", env.http_port),
            "--header",
            &format!("Authorization: Bearer {}", env.agent_token),
        ])
        .args(args)
        .output()
        .expect("python3");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        serde_json::json!({"raw": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr)})
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn mcp_tools_are_filtered_denied_held_and_masked() -> Result<()> {
    let env = setup()?;
    let port = common::free_port();
    let _srv = server(&[
        py("mcp_server.py").to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--require-bearer",
        "upstream-mcp-token",
    ])?;
    put_connection(
        &env,
        &[
            "tools",
            "--kind",
            "mcp",
            "--address",
            &format!("http://127.0.0.1:{port}"),
            "-s",
            "bearer_token=upstream-mcp-token",
        ],
    )?;
    wait_served(&env, "/tools/mcp")?;
    let (code, v) = mcp(&env, &["--list"]);
    assert_eq!(code, 0, "{v}");
    let tools: Vec<&str> = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        tools.contains(&"echo") && tools.contains(&"lookup_user"),
        "{v}"
    );
    assert!(
        !tools.contains(&"delete_everything"),
        "a forbidden tool is listed: {v}"
    );
    let (code, v) = mcp(&env, &["--call", "echo", "--args", r#"{"text":"hello"}"#]);
    assert_eq!(code, 0, "{v}");
    assert!(v.to_string().contains("hello"), "{v}");
    // Tool results are masked.
    let (code, v) = mcp(
        &env,
        &["--call", "lookup_user", "--args", r#"{"user_id":1}"#],
    );
    assert_eq!(code, 0, "{v}");
    let s = v.to_string();
    assert!(
        !s.contains("ada@example.com") && !s.contains("AKIAIOSFODNN7EXAMPLE"),
        "{s}"
    );
    assert!(s.contains("[REDACTED:email]"), "{s}");
    // A denied tool: a JSON-RPC error naming the rule.
    let (code, v) = mcp(
        &env,
        &[
            "--call",
            "delete_everything",
            "--args",
            r#"{"confirm":true}"#,
        ],
    );
    assert_eq!(code, 3, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("permission denied"),
        "{v}"
    );
    // A held tool call runs once a DBA approves.
    let carol = env
        .ok(&[
            "token", "issue", "carol", "--group", "dba", "--role", "approver",
        ])?
        .trim()
        .to_string();
    let call = Background::spawn(
        Command::new("python3")
            .arg(py("mcp_client.py"))
            .args([
                "--url",
                &format!("http://127.0.0.1:{}/tools/mcp", env.http_port),
                "--header",
                &format!("Authorization: Bearer {}", env.agent_token),
                "--call",
                "add",
                "--args",
                r#"{"a":2,"b":3}"#,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let t0 = Instant::now();
    let id = loop {
        let o = env.cli_as(
            &carol,
            &["approvals", "list", "--state", "pending", "--json"],
        );
        if let Some(l) = String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with('{'))
        {
            let a: Value = serde_json::from_str(l)?;
            break a["id"].as_str().unwrap().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no approval request"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(env
        .cli_as(&carol, &["approvals", "approve", &id])
        .status
        .success());
    let (code, out, err) = call.finish(Duration::from_secs(30))?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains('5'), "{out}");

    // Malformed JSON-RPC: a parse error, recorded.
    let url = format!("http://127.0.0.1:{}/tools/mcp", env.http_port);
    let auth = format!("Authorization: Bearer {}", env.agent_token);
    let r = curl(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        "{not json",
        &url,
    ]);
    assert_eq!(r.status, 400);
    let j: Value = serde_json::from_str(&r.body)?;
    assert_eq!(j["error"]["code"], -32700, "{}", r.body);
    Ok(())
}

#[test]
fn bad_input_gets_clear_bounded_answers() -> Result<()> {
    let env = setup()?;
    let port = common::free_port();
    let _llm = server(&[
        py("llm_upstream.py").to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--key",
        "k",
        "--die-after",
        "2",
    ])?;
    put_connection(
        &env,
        &[
            "dying",
            "--kind",
            "llm",
            "--address",
            &format!("http://127.0.0.1:{port}"),
            "-s",
            "api_key=k",
        ],
    )?;
    put_connection(
        &env,
        &["dead", "--kind", "http", "--address", "http://127.0.0.1:1"],
    )?;
    wait_served(&env, "/dying/v1/models")?;
    let auth = format!("Authorization: Bearer {}", env.agent_token);
    // Oversize body: 413 without reading it all.
    let big = "x".repeat(11 << 20);
    let body_file = env.dir.path().join("big.json");
    std::fs::write(
        &body_file,
        format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{big}\"}}]}}"),
    )?;
    let r = curl(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", body_file.display()),
        &format!(
            "http://127.0.0.1:{}/dying/v1/chat/completions",
            env.http_port
        ),
    ]);
    assert_eq!(r.status, 413, "{}", r.body);
    // A dead upstream: 502 naming the connection.
    let r = curl(&[
        "-H",
        &auth,
        &format!("http://127.0.0.1:{}/dead/x", env.http_port),
    ]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("dead"), "{}", r.body);
    // An upstream that dies mid-stream: the client sees an error, and the audit says why.
    let out = Command::new("python3")
        .arg(py("openai_client.py"))
        .args([
            "--base-url",
            &format!("http://127.0.0.1:{}/dying/v1", env.http_port),
            "--api-key",
            &env.agent_token,
            "--mode",
            "chat-stream",
            "--message",
            "hi there, a long answer please",
        ])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.code() != Some(0) || v["finish_reason"].is_null(),
        "{v}"
    );
    let t0 = Instant::now();
    loop {
        let recs = env.audit(&["--connection", "dying", "--kind", "command_completed"])?;
        if recs.iter().any(|r| {
            event(r)["payload"]["command_completed"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("broke off"))
        }) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("no completion with the upstream's failure: {recs:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A bad token and the oversize body above are refusals on the record.
    let r = curl(&[
        "-H",
        "Authorization: Bearer cst_bogus_token",
        &format!("http://127.0.0.1:{}/dead/x", env.http_port),
    ]);
    assert_eq!(r.status, 401);
    let t0 = Instant::now();
    loop {
        let recs = env.audit(&["--kind", "command_received"])?;
        let reasons: Vec<String> = recs
            .iter()
            .map(|r| {
                event(r)["payload"]["command_received"]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        if reasons.iter().any(|r| r.contains("exceeds"))
            && reasons.iter().any(|r| r.contains("authentication failed"))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("refusals not recorded: {reasons:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A slow-loris client: headers never finish; the edge closes within its header timeout.
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", env.http_port))?;
    s.write_all(b"GET /dying/v1/models HTTP/1.1\r\nHost: x\r\n")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "slow client held for {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Answers any request with 101 and then echoes bytes, upper-cased.
const UPGRADE_STUB: &str = r#"
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('127.0.0.1', int(sys.argv[1]))); srv.listen(8)
def serve(c):
    buf = b''
    while b'\r\n\r\n' not in buf:
        d = c.recv(4096)
        if not d: return
        buf += d
    if b'upgrade: echo' not in buf.lower():
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok')
        c.close()
        return
    c.sendall(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n')
    while True:
        d = c.recv(4096)
        if not d: break
        c.sendall(d.upper())
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn upgraded_connections_are_relayed_after_authorization() -> Result<()> {
    use std::io::{Read, Write};
    let env = setup()?;
    let port = common::free_port();
    let _up = server(&[
        "-c",
        UPGRADE_STUB,
        &port.to_string(),
        "--port",
        &port.to_string(),
    ])?;
    http_connection(&env, "ws", port)?;
    let open = |path: &str| -> Result<(String, std::net::TcpStream)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", env.http_port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            env.agent_token
        )?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b)? == 0 {
                break;
            }
            head.push(b[0]);
        }
        Ok((String::from_utf8_lossy(&head).into_owned(), s))
    };
    let (head, mut s) = open("/ws/stream")?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"hello tunnel")?;
    let mut got = [0u8; 12];
    s.read_exact(&mut got)?;
    assert_eq!(&got, b"HELLO TUNNEL");
    drop(s);
    // Authorization still applies before the upgrade.
    let (head, _) = open("/ws/admin/stream")?;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let t0 = Instant::now();
    loop {
        let recs = env.audit(&["--connection", "ws", "--kind", "command_completed"])?;
        if recs.iter().any(|r| {
            let c = &event(r)["payload"]["command_completed"];
            c["status"] == 101
                && c["result_excerpt"]
                    .as_str()
                    .unwrap_or("")
                    .contains("12 bytes from the client")
        }) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{recs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A real WebSocket client and server (the Python `websockets` library) through the edge: the
/// messages pass, the server's text messages reach the client masked (a secret split across the
/// frames of one message too), the custos token and the compression offer never reach the
/// server, and the upgrade's record holds a masked transcript of every message, both ways.
#[test]
fn websocket_messages_are_relayed_and_transcribed() -> Result<()> {
    let env = setup()?;
    let port = common::free_port();
    let log = env.dir.path().join("ws-headers.jsonl");
    let _up = server(&[
        py("ws_echo.py").to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--log",
        log.to_str().unwrap(),
    ])?;
    http_connection(&env, "ws", port)?;
    let client = |path: &str| -> (i32, Value) {
        let out = Command::new("python3")
            .arg(py("ws_client.py"))
            .args([
                "--url",
                &format!("ws://127.0.0.1:{}{path}", env.http_port),
                "--header",
                &format!("Authorization: Bearer {}", env.agent_token),
            ])
            .output()
            .expect("python3");
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            serde_json::json!({"raw": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr)})
        });
        (out.status.code().unwrap_or(-1), v)
    };
    let (code, v) = client("/ws/chat");
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v["answers"],
        serde_json::json!([
            "HELLO TUNNEL",
            "KEY [REDACTED:aws_access_key_id] IN THREE FRAGMENTS",
            1024
        ]),
        "relayed both ways, the server's text masked"
    );
    assert_eq!(
        v["extensions"],
        Value::Null,
        "no compression negotiated: {v}"
    );
    let headers = std::fs::read_to_string(&log)?;
    assert!(!headers.contains(&env.agent_token), "{headers}");
    assert!(!headers.contains("sec-websocket-extensions"), "{headers}");
    assert!(headers.contains("\"upgrade\": \"websocket\""), "{headers}");
    // The handshake is still authorized first.
    let (code, v) = client("/ws/admin/chat");
    assert_eq!((code, &v["status"]), (3, &serde_json::json!(403)), "{v}");

    let t0 = Instant::now();
    let (record, masked) = loop {
        let recs = env.audit(&["--connection", "ws", "--kind", "command_completed"])?;
        let found = recs.iter().find_map(|r| {
            let c = &event(r)["payload"]["command_completed"];
            let x = c["result_excerpt"].as_str().unwrap_or("");
            (c["status"] == 101 && x.contains("> close"))
                .then(|| (x.to_string(), c["masked_values"].clone()))
        });
        if let Some(x) = found {
            break x;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{recs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        // websockets ends a fragmented message with an empty final frame: 3 fragments, 4 frames.
        record.starts_with("upgraded connection (websocket): 5 messages in 8 frames"),
        "{record}"
    );
    for line in [
        "> text: hello tunnel\n",
        "< text: HELLO TUNNEL\n",
        " in three fragments (4 frames)\n",
        "> binary: 1024 bytes\n",
        "< binary: 1024 bytes\n",
        "> ping: 13 bytes\n",
        "< pong: 13 bytes\n",
        "> close: 1000 done\n",
        "< close: 1000 done\n",
    ] {
        assert!(record.contains(line), "{line:?} missing from {record}");
    }
    assert!(
        !record.contains("AKIAIOSF") && !record.contains("ODNN7EXAMPLE"),
        "a secret split across fragments is masked in the record: {record}"
    );
    // The value masked on its way to the client is counted.
    assert_eq!(masked.as_u64(), Some(1), "{masked}");
    Ok(())
}

/// The same API through a Rust client (hyper): allowed and masked, denied, and the injected
/// credential never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_hyper_client_gets_the_same_answers() -> Result<()> {
    use http_body_util::BodyExt;
    let env = setup()?;
    let port = common::free_port();
    let log = env.dir.path().join("api.jsonl");
    let _api = server(&[
        "-c",
        API_STUB,
        &port.to_string(),
        log.to_str().unwrap(),
        "--port",
        &port.to_string(),
    ])?;
    put_connection(
        &env,
        &[
            "api",
            "--kind",
            "http",
            "--address",
            &format!("http://127.0.0.1:{port}"),
            "-s",
            "api_key=hyper-upstream-key",
            "-o",
            "api_key_header=x-upstream-key",
        ],
    )?;
    wait_served(&env, "/api/users")?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.http_port)).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let get = |method: &str, path: &str| {
        hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {}", env.agent_token))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // Keep-alive: several requests on one connection.
    let r = send.send_request(get("GET", "/api/users")).await?;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-length").is_none(),
        "a masked body is re-framed"
    );
    let body = String::from_utf8(r.into_body().collect().await?.to_bytes().to_vec())?;
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["users"][0]["email"], "[REDACTED:email]", "{body}");
    send.ready().await?;
    let r = send.send_request(get("DELETE", "/api/users/1")).await?;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    send.ready().await?;
    let r = send.send_request(get("GET", "/api/text")).await?;
    let body = String::from_utf8(r.into_body().collect().await?.to_bytes().to_vec())?;
    assert_eq!(body, "contact [REDACTED:email] now");
    let seen = std::fs::read_to_string(&log)?;
    assert!(
        seen.contains("hyper-upstream-key") && !seen.contains(&env.agent_token),
        "{seen}"
    );
    assert!(!body.contains("hyper-upstream-key"));
    Ok(())
}

/// Anthropic's Messages API shape (x-api-key both ways): a secret split across
/// `content_block_delta` events at every offset is masked; the text around it arrives intact.
#[test]
fn anthropic_message_streams_are_masked_across_deltas() -> Result<()> {
    let env = setup()?;
    let port = common::free_port();
    let _llm = server(&[
        py("llm_upstream.py").to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--key",
        "anthropic-upstream-key",
    ])?;
    put_connection(
        &env,
        &[
            "claude",
            "--kind",
            "llm",
            "--address",
            &format!("http://127.0.0.1:{port}"),
            "-s",
            "api_key=anthropic-upstream-key",
            "-o",
            "api_key_header=x-api-key",
        ],
    )?;
    wait_served(&env, "/claude/v1/models")?;
    let secret = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIj-AAAA";
    let reply = format!("token {secret} done");
    let start = reply.find(secret).unwrap();
    for k in [
        start,
        start + 1,
        start + 7,
        start + 20,
        start + secret.len() / 2,
        start + secret.len() - 1,
    ] {
        let body = serde_json::json!({
            "model": "claude-3-5-haiku-latest", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": format!("REPLY:{}", serde_json::json!({"text": reply, "split": [k]}))}],
        });
        let r = curl(&[
            "-N",
            "-H",
            &format!("x-api-key: {}", env.agent_token),
            "-H",
            "anthropic-version: 2023-06-01",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
            &format!("http://127.0.0.1:{}/claude/v1/messages", env.http_port),
        ]);
        assert_eq!(r.status, 200, "split {k}: {}", r.body);
        let text: String = r
            .body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["type"] == "content_block_delta")
            .filter_map(|v| v["delta"]["text"].as_str().map(str::to_string))
            .collect();
        assert!(!text.contains("sk-ant-"), "split {k} leaked: {text}");
        assert!(
            text.starts_with("token ") && text.ends_with(" done"),
            "split {k}: {text}"
        );
        assert!(
            text.contains("[REDACTED:anthropic_api_key]"),
            "split {k}: {text}"
        );
        assert!(!r.body.contains("anthropic-upstream-key"));
    }
    Ok(())
}
