//! Routing and classification of HTTP, LLM and MCP requests: pure functions over the request
//! line, headers and body, so they are tested without a network.

use custos_core::authz::Value;
use custos_core::proto::v1::Connection;
use serde_json::Value as Json;

/// Which connection a request is for, and the path to use upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub connection: String,
    /// The path (without the query) to request upstream.
    pub path: String,
}

/// The connection kinds this listener serves.
pub const KINDS: &[&str] = &["http", "llm", "mcp"];

fn host_only(host: &str) -> &str {
    // [v6]:port, name:port, name
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
}

/// Route by the `host` option of a connection (`Host: openai.custos.internal`), else by the first
/// path segment (`/openai/v1/chat/completions` → connection `openai`, path `/v1/chat/completions`).
pub fn route<'c>(
    connections: impl Iterator<Item = &'c Connection> + Clone,
    host: Option<&str>,
    path: &str,
) -> Option<Routed> {
    if let Some(h) = host.map(host_only) {
        if let Some(c) = connections.clone().find(|c| {
            KINDS.contains(&c.kind.as_str())
                && c.options
                    .get("host")
                    .is_some_and(|v| v.eq_ignore_ascii_case(h))
        }) {
            return Some(Routed {
                connection: c.name.clone(),
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                },
            });
        }
    }
    let trimmed = path.strip_prefix('/')?;
    let (first, rest) = match trimmed.find('/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, "/"),
    };
    let c = connections
        .clone()
        .find(|c| c.name == first && KINDS.contains(&c.kind.as_str()))?;
    Some(Routed {
        connection: c.name.clone(),
        path: rest.to_string(),
    })
}

/// Match `path` against route templates like `/v1/users/{id}`; the first match wins.
pub fn match_route<'t>(templates: impl Iterator<Item = &'t str>, path: &str) -> Option<&'t str> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    templates.into_iter().find(|t| {
        let tsegs: Vec<&str> = t.trim().trim_matches('/').split('/').collect();
        if tsegs.last() == Some(&"*") {
            return segs.len() >= tsegs.len() - 1
                && tsegs[..tsegs.len() - 1]
                    .iter()
                    .zip(&segs)
                    .all(|(t, s)| seg_matches(t, s));
        }
        tsegs.len() == segs.len() && tsegs.iter().zip(&segs).all(|(t, s)| seg_matches(t, s))
    })
}

fn seg_matches(t: &str, s: &str) -> bool {
    (t.starts_with('{') && t.ends_with('}') && !s.is_empty()) || t == s
}

/// One action to judge, with its Cedar context.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub action: String,
    pub context: Vec<(&'static str, Value)>,
    /// What the audit record shows as the command text.
    pub text: String,
}

pub const HTTP_METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"];

/// The request headers policy sees: `content-type` and the connection's `policy_headers`, as
/// `name: value` with lower-case names.
pub fn policy_headers(conn: &Connection, headers: &hyper::HeaderMap) -> Vec<String> {
    let mut names = vec!["content-type".to_string()];
    if let Some(list) = conn.options.get("policy_headers") {
        names.extend(
            list.split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty() && n != "authorization" && n != "x-api-key"),
        );
    }
    let mut out = Vec::new();
    for n in names {
        for v in headers.get_all(n.as_str()) {
            if let Ok(v) = v.to_str() {
                out.push(format!("{n}: {}", v.trim()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `http:<METHOD>` with path, matched route, query and selected headers.
pub fn classify_http(
    conn: &Connection,
    method: &str,
    path: &str,
    query: &str,
    headers: Vec<String>,
) -> Judged {
    let routes = conn.options.get("routes").map(String::as_str).unwrap_or("");
    let route = match_route(routes.split(',').filter(|r| !r.trim().is_empty()), path)
        .unwrap_or("")
        .trim()
        .to_string();
    let action = if HTTP_METHODS.contains(&method) {
        format!("http:{method}")
    } else {
        // Not in the schema: nothing permits it, so it is refused with a clear reason.
        format!("http:{method}")
    };
    Judged {
        action,
        context: vec![
            ("path", Value::Str(path.to_string())),
            ("route", Value::Str(route)),
            ("query", Value::Str(query.to_string())),
            ("headers", Value::Set(headers)),
        ],
        text: if query.is_empty() {
            format!("{method} {path}")
        } else {
            format!("{method} {path}?{query}")
        },
    }
}

/// What an LLM request asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LlmRequest {
    pub action: &'static str,
    pub model: String,
    pub tools: Vec<String>,
    pub stream: bool,
    /// The prompt text (every message's text, in order), for detectors and the record.
    pub prompt: String,
}

/// Classify an OpenAI- or Anthropic-style request. `None` for endpoints custos does not know.
pub fn classify_llm(method: &str, path: &str, body: &[u8]) -> Result<LlmRequest, String> {
    let p = path.trim_end_matches('/');
    let action = match (method, p) {
        ("POST", "/v1/chat/completions" | "/v1/responses" | "/v1/messages" | "/v1/completions") => {
            "llm:chat"
        }
        ("POST", "/v1/embeddings") => "llm:embeddings",
        ("GET", "/v1/models") => "llm:chat",
        _ => {
            return Err(format!(
                "custos does not know the LLM endpoint {method} {path}; known: POST /v1/chat/completions, /v1/responses, /v1/messages, /v1/embeddings, GET /v1/models"
            ))
        }
    };
    let mut r = LlmRequest {
        action,
        ..Default::default()
    };
    if method == "GET" {
        return Ok(r);
    }
    let j: Json =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?;
    r.model = j["model"].as_str().unwrap_or("").to_string();
    r.stream = j["stream"].as_bool().unwrap_or(false);
    if let Some(tools) = j["tools"].as_array() {
        for t in tools {
            let name = t["function"]["name"]
                .as_str()
                .or_else(|| t["name"].as_str())
                .unwrap_or("");
            if !name.is_empty() {
                r.tools.push(name.to_string());
            }
        }
    }
    let mut prompt = String::new();
    if let Some(s) = j["system"].as_str() {
        prompt.push_str(s);
        prompt.push('\n');
    }
    for key in ["messages", "input", "prompt"] {
        collect_text(&j[key], &mut prompt);
    }
    r.prompt = prompt;
    Ok(r)
}

/// Every string under `v` (message contents, parts), newline-separated.
fn collect_text(v: &Json, out: &mut String) {
    match v {
        Json::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Json::Array(a) => a.iter().for_each(|x| collect_text(x, out)),
        Json::Object(o) => {
            for (k, x) in o {
                if matches!(k.as_str(), "content" | "text" | "input" | "arguments") {
                    collect_text(x, out);
                } else if let Json::Array(_) | Json::Object(_) = x {
                    collect_text(x, out);
                }
            }
        }
        _ => {}
    }
}

pub fn llm_context(r: &LlmRequest, detectors: Vec<String>) -> Vec<(&'static str, Value)> {
    vec![
        ("model", Value::Str(r.model.clone())),
        ("tools", Value::Set(r.tools.clone())),
        ("prompt_detectors", Value::Set(detectors)),
    ]
}

/// One JSON-RPC message of an MCP request.
#[derive(Debug, Clone, PartialEq)]
pub struct McpMessage {
    /// The request id (absent for notifications).
    pub id: Option<Json>,
    pub method: String,
    /// For tools/call: the tool and its arguments as JSON text.
    pub tool: String,
    pub arguments: String,
}

impl McpMessage {
    pub fn action(&self) -> &'static str {
        if self.method == "tools/call" {
            "mcp:call"
        } else {
            "mcp:list"
        }
    }
}

/// Parse an MCP POST body: one JSON-RPC message or a batch. Errors are JSON-RPC parse errors.
pub fn parse_mcp(body: &[u8]) -> Result<Vec<McpMessage>, String> {
    let j: Json = serde_json::from_slice(body).map_err(|e| format!("parse error: {e}"))?;
    let items = match j {
        Json::Array(a) if !a.is_empty() => a,
        Json::Array(_) => return Err("invalid request: an empty batch".into()),
        o @ Json::Object(_) => vec![o],
        _ => return Err("invalid request: not a JSON-RPC object".into()),
    };
    let mut out = Vec::new();
    for m in items {
        if m["jsonrpc"] != "2.0" {
            return Err("invalid request: jsonrpc must be \"2.0\"".into());
        }
        let id = m.get("id").cloned();
        let Some(method) = m["method"].as_str() else {
            // A response from the client (to a server request): judged as a listing.
            out.push(McpMessage {
                id,
                method: String::new(),
                tool: String::new(),
                arguments: String::new(),
            });
            continue;
        };
        let (tool, arguments) = if method == "tools/call" {
            let name = m["params"]["name"]
                .as_str()
                .ok_or("invalid params: tools/call needs params.name")?;
            (
                name.to_string(),
                m["params"]
                    .get("arguments")
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "{}".into()),
            )
        } else {
            (String::new(), String::new())
        };
        out.push(McpMessage {
            id,
            method: method.to_string(),
            tool,
            arguments,
        });
    }
    Ok(out)
}

pub fn mcp_context(m: &McpMessage) -> Vec<(&'static str, Value)> {
    vec![
        ("tool", Value::Str(m.tool.clone())),
        ("arguments", Value::Str(m.arguments.clone())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(name: &str, kind: &str, opts: &[(&str, &str)]) -> Connection {
        Connection {
            name: name.into(),
            kind: kind.into(),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn routes_by_host_then_by_first_segment() {
        let cs = [
            conn("api", "http", &[("host", "api.internal")]),
            conn("openai", "llm", &[]),
            conn("pg", "postgres", &[]),
        ];
        assert_eq!(
            route(cs.iter(), Some("api.internal:18080"), "/v1/x"),
            Some(Routed {
                connection: "api".into(),
                path: "/v1/x".into()
            })
        );
        assert_eq!(
            route(
                cs.iter(),
                Some("127.0.0.1:18080"),
                "/openai/v1/chat/completions"
            ),
            Some(Routed {
                connection: "openai".into(),
                path: "/v1/chat/completions".into()
            })
        );
        assert_eq!(
            route(cs.iter(), None, "/openai").unwrap().path,
            "/".to_string()
        );
        // Postgres connections are not served here; unknown names route nowhere.
        assert_eq!(route(cs.iter(), None, "/pg/x"), None);
        assert_eq!(route(cs.iter(), None, "/nope/x"), None);
    }

    #[test]
    fn route_templates() {
        let t = ["/v1/users/{id}", "/v1/files/*", "/health"];
        assert_eq!(
            match_route(t.iter().copied(), "/v1/users/42"),
            Some("/v1/users/{id}")
        );
        assert_eq!(match_route(t.iter().copied(), "/v1/users/42/x"), None);
        assert_eq!(
            match_route(t.iter().copied(), "/v1/files/a/b"),
            Some("/v1/files/*")
        );
        assert_eq!(match_route(t.iter().copied(), "/health"), Some("/health"));
    }

    #[test]
    fn llm_requests() {
        let b = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi 4111 1111 1111 1111"}],
            "tools":[{"type":"function","function":{"name":"get_weather"}}]}"#;
        let r = classify_llm("POST", "/v1/chat/completions", b).unwrap();
        assert_eq!(r.action, "llm:chat");
        assert_eq!(r.model, "gpt-4o");
        assert!(r.stream);
        assert_eq!(r.tools, vec!["get_weather"]);
        assert!(r.prompt.contains("4111 1111 1111 1111"));
        let e = classify_llm(
            "POST",
            "/v1/embeddings",
            br#"{"model":"e","input":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(e.action, "llm:embeddings");
        assert!(e.prompt.contains('a') && e.prompt.contains('b'));
        assert!(classify_llm("POST", "/v1/images/generations", b"{}").is_err());
        assert!(classify_llm("POST", "/v1/chat/completions", b"not json").is_err());
    }

    #[test]
    fn mcp_messages() {
        let m = parse_mcp(
            br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(m[0].action(), "mcp:call");
        assert_eq!(m[0].tool, "echo");
        assert_eq!(m[0].arguments, r#"{"text":"x"}"#);
        let m = parse_mcp(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].action(), "mcp:list");
        assert!(m[1].id.is_none());
        assert!(parse_mcp(b"{").is_err());
        assert!(parse_mcp(br#"{"jsonrpc":"1.0","id":1,"method":"x"}"#).is_err());
        assert!(
            parse_mcp(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#).is_err()
        );
        assert!(parse_mcp(b"[]").is_err());
    }
}
