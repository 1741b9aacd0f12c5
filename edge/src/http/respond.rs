//! Requests out and responses back: problem documents, JSON-RPC errors, credential injection,
//! hop-by-hop headers, and the response relay that masks as it streams.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use custos_core::mask::{JsonMasker, JsonPath, Masker, SseMasker, SseMode, Stats, StreamMasker};
use custos_core::proto::v1::Connection;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use serde_json::{json, Value as Json};
use tokio_stream::wrappers::ReceiverStream;

use super::{Body, BoxError};

/// What the audit record keeps of a response.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    /// The first bytes sent to the client (masked for the client; masked again for the audit).
    pub head: Vec<u8>,
    /// The last bytes (LLM usage is reported at the end of a stream).
    pub tail: Vec<u8>,
    pub bytes: u64,
    pub truncated: bool,
    /// The body is an LLM API's answer: read the model and token usage from `head` and `tail`
    /// (scanning every other response for them would cost a UTF-8 pass and a search each).
    pub llm: bool,
}

const HEAD_CAP: usize = 64 * 1024;
const TAIL_CAP: usize = 8 * 1024;
/// MCP responses are inspected whole (tools/list filtering); larger ones are refused.
const MCP_CAP: usize = 16 << 20;

impl Captured {
    fn add(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        if self.head.len() < HEAD_CAP {
            let n = (HEAD_CAP - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..n]);
            if n < b.len() {
                self.truncated = true;
            }
        } else if !b.is_empty() {
            self.truncated = true;
        }
        self.tail.extend_from_slice(b);
        if self.tail.len() > TAIL_CAP {
            let cut = self.tail.len() - TAIL_CAP;
            self.tail.drain(..cut);
        }
    }
}

pub fn empty() -> Body {
    full(Bytes::new())
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// An RFC 9457 problem document.
pub fn problem(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: &str,
    extra: Json,
) -> Response<Body> {
    let mut doc = json!({
        "type": format!("https://custos.dev/problems/{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(d), Json::Object(x)) = (doc.as_object_mut(), extra) {
        d.extend(x);
    }
    let mut r = Response::new(full(doc.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

pub fn unauthorized(detail: &str) -> Response<Body> {
    let mut r = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Not authenticated",
        detail,
        json!({}),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"custos\""),
    );
    r
}

/// A JSON-RPC 2.0 error response (MCP).
pub fn jsonrpc_error(
    status: StatusCode,
    id: &Json,
    code: i64,
    message: &str,
    data: Json,
) -> Response<Body> {
    let doc = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}});
    let mut r = Response::new(full(doc.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The client's custos token: the connection's `client_auth_header`, else `Authorization:
/// Bearer`, else `x-api-key` (what Anthropic's SDK sends).
pub fn client_token(h: &HeaderMap, conn: &Connection) -> Option<String> {
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(name) = conn.options.get("client_auth_header") {
        if let Some(v) = get(name) {
            return Some(v.strip_prefix("Bearer ").unwrap_or(v).to_string());
        }
    }
    if let Some(v) = get("authorization").and_then(|v| v.strip_prefix("Bearer ")) {
        return Some(v.trim().to_string());
    }
    get("x-api-key").map(str::to_string)
}

pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
}

/// Whether an upgrade request asks for a WebSocket.
pub fn is_websocket(h: &HeaderMap) -> bool {
    h.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
    })
}

pub fn cap(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

pub enum BodyError {
    TooLarge,
    Timeout,
    Read(String),
}

/// Read the whole request body, bounded in size and time.
pub async fn read_body(
    mut body: Incoming,
    max: usize,
    within: Duration,
) -> Result<Bytes, BodyError> {
    let read = async {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            if let Ok(d) = frame.into_data() {
                if out.len() + d.len() > max {
                    return Err(BodyError::TooLarge);
                }
                out.extend_from_slice(&d);
            }
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| BodyError::Timeout)?
}

/// RFC 9110 §7.6.1 hop-by-hop headers, plus those named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The request to send upstream: the connection's base URL plus the routed path, the client's
/// headers without hop-by-hop ones and without its custos token, and the connection's credential.
pub fn upstream_request(
    conn: &Connection,
    parts: &hyper::http::request::Parts,
    path: &str,
    query: &str,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let base = conn.address.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        return Err(format!(
            "connection {} has address {:?}; http, llm and mcp connections need an http:// or https:// base URL",
            conn.name, conn.address
        ));
    }
    let mut query = query.to_string();
    if let (Some(param), Some(key)) = (
        conn.options.get("api_key_query"),
        conn.secrets.get("api_key"),
    ) {
        let pair: String = form_pair(param, key);
        query = if query.is_empty() {
            pair
        } else {
            format!("{query}&{pair}")
        };
    }
    let uri: Uri = if query.is_empty() {
        format!("{base}{path}")
    } else {
        format!("{base}{path}?{query}")
    }
    .parse()
    .map_err(|e| format!("connection {}: bad upstream URL: {e}", conn.name))?;
    let mut h = parts.headers.clone();
    strip_hop_by_hop(&mut h);
    for n in [
        "authorization",
        "x-api-key",
        "host",
        "content-length",
        "accept-encoding",
        "x-custos-reason",
    ] {
        h.remove(n);
    }
    if let Some(name) = conn.options.get("client_auth_header") {
        h.remove(name.as_str());
    }
    inject(conn, &mut h)?;
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = h;
    Ok(req)
}

fn form_pair(k: &str, v: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    format!("{}={}", enc(k), enc(v))
}

/// Put the connection's credential on the request: `bearer_token`, `api_key` (in
/// `api_key_header`, default `Authorization: Bearer`; or the `api_key_query` parameter), or
/// `username` + `password` (Basic).
fn inject(conn: &Connection, h: &mut HeaderMap) -> Result<(), String> {
    let s = &conn.secrets;
    let bad = |what: &str| {
        format!(
            "connection {}: the {what} is not valid header text",
            conn.name
        )
    };
    if let Some(t) = s.get("bearer_token") {
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| bad("bearer_token"))?,
        );
    } else if let Some(k) = s.get("api_key") {
        if conn.options.contains_key("api_key_query") {
            // Already in the query.
        } else {
            match conn
                .options
                .get("api_key_header")
                .map(|v| v.to_ascii_lowercase())
            {
                None => {
                    h.insert(
                        header::AUTHORIZATION,
                        HeaderValue::from_str(&format!("Bearer {k}"))
                            .map_err(|_| bad("api_key"))?,
                    );
                }
                Some(name) if name == "authorization" => {
                    h.insert(
                        header::AUTHORIZATION,
                        HeaderValue::from_str(&format!("Bearer {k}"))
                            .map_err(|_| bad("api_key"))?,
                    );
                }
                Some(name) => {
                    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        format!(
                            "connection {}: api_key_header {name:?} is not a header name",
                            conn.name
                        )
                    })?;
                    h.insert(n, HeaderValue::from_str(k).map_err(|_| bad("api_key"))?);
                }
            }
        }
    } else if let (Some(u), Some(p)) = (s.get("username"), s.get("password")) {
        use base64::Engine;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {enc}")).map_err(|_| bad("username/password"))?,
        );
    }
    Ok(())
}

/// Model and token counts from a response's first and last bytes (OpenAI and Anthropic shapes).
pub fn llm_usage(head: &[u8], tail: &[u8]) -> (String, u64, u64) {
    let head = String::from_utf8_lossy(head);
    let tail = String::from_utf8_lossy(tail);
    let model = string_field(&head, "model").unwrap_or_default();
    let num = |keys: &[&str]| -> u64 {
        for text in [&tail, &head] {
            for k in keys {
                if let Some(n) = last_number(text, k) {
                    return n;
                }
            }
        }
        0
    };
    (
        model,
        num(&["prompt_tokens", "input_tokens"]),
        num(&["completion_tokens", "output_tokens"]),
    )
}

fn string_field(text: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let at = text.find(&pat)? + pat.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

fn last_number(text: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\"");
    let at = text.rfind(&pat)? + pat.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Whether the caller may call a tool (tools/list filtering).
pub type MayCall = Box<dyn Fn(&str) -> bool + Send>;

/// How to rewrite a response.
pub struct Rewrite {
    pub masker: Arc<Masker>,
    pub connection: Connection,
    pub groups: Vec<String>,
    /// JSON-RPC ids of tools/list requests whose results are filtered.
    pub tools_list: Vec<Json>,
    pub may_call: Option<MayCall>,
}

pub type Done =
    Box<dyn FnOnce(u16, Option<String>, Captured, Stats) -> BoxFuture<'static, ()> + Send>;

enum Rewriter {
    Pass,
    Text(StreamMasker, Vec<u8>),
    Json(JsonMasker),
    Sse(SseMasker),
    /// MCP: inspected message by message (whole JSON bodies, or SSE events).
    Mcp {
        sse: bool,
        buf: Vec<u8>,
    },
}

fn media_type(h: &HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Mask every string of a JSON value with the detectors.
fn mask_json(v: &mut Json, scope: &custos_core::mask::Scope<'_>, stats: &mut Stats) {
    match v {
        Json::String(s) => {
            if let Cow::Owned(m) = scope.mask_text(s, stats) {
                *s = m;
            }
        }
        Json::Array(a) => a.iter_mut().for_each(|x| mask_json(x, scope, stats)),
        Json::Object(o) => o.values_mut().for_each(|x| mask_json(x, scope, stats)),
        _ => {}
    }
}

impl Rewrite {
    /// One JSON-RPC message from the MCP server: filter tools/list results, mask strings.
    fn mcp_message(&self, v: &mut Json, stats: &mut Stats) {
        let scope = self.masker.scope(&self.connection.name, &self.groups);
        let mut handle = |m: &mut Json| {
            if let (Some(id), Some(f)) = (m.get("id"), &self.may_call) {
                if self.tools_list.contains(id) {
                    if let Some(tools) = m.pointer_mut("/result/tools").and_then(Json::as_array_mut)
                    {
                        tools.retain(|t| t["name"].as_str().is_some_and(f));
                    }
                }
            }
            mask_json(m, &scope, stats);
        };
        match v {
            Json::Array(a) => a.iter_mut().for_each(&mut handle),
            m => handle(m),
        }
    }

    /// One SSE event (without its blank-line terminator) of an MCP stream.
    fn mcp_event(&self, ev: &[u8], stats: &mut Stats) -> Vec<u8> {
        let text = String::from_utf8_lossy(ev);
        let mut data = Vec::new();
        let mut other = String::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            } else {
                other.push_str(line);
                other.push('\n');
            }
        }
        let mut out = other;
        if !data.is_empty() {
            let joined = data.join("\n");
            match serde_json::from_str::<Json>(&joined) {
                Ok(mut v) => {
                    self.mcp_message(&mut v, stats);
                    out.push_str("data: ");
                    out.push_str(&v.to_string());
                    out.push('\n');
                }
                Err(_) => {
                    let scope = self.masker.scope(&self.connection.name, &self.groups);
                    for l in scope.mask_text(&joined, stats).split('\n') {
                        out.push_str("data: ");
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out.push('\n');
        out.into_bytes()
    }

    fn rewriter(&self, h: &HeaderMap) -> Result<Rewriter, String> {
        let scope = self.masker.scope(&self.connection.name, &self.groups);
        let media = media_type(h);
        let json_like = media == "application/json" || media.ends_with("+json");
        if self.connection.kind == "mcp" && (json_like || media == "text/event-stream") {
            return Ok(Rewriter::Mcp {
                sse: media == "text/event-stream",
                buf: Vec::new(),
            });
        }
        if scope.is_clear() {
            return Ok(Rewriter::Pass);
        }
        if media == "text/event-stream" {
            let mode = if self.connection.kind == "llm" {
                SseMode::LlmDeltas
            } else {
                SseMode::Text
            };
            return Ok(Rewriter::Sse(SseMasker::new(scope, mode)));
        }
        if json_like {
            let mut paths = Vec::new();
            if let Some(p) = self.connection.options.get("mask_paths") {
                for s in p.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    paths.push(s.parse::<JsonPath>().map_err(|e| {
                        format!("connection {}: mask_paths {s:?}: {e}", self.connection.name)
                    })?);
                }
            }
            return Ok(Rewriter::Json(JsonMasker::new(scope, paths)));
        }
        if media.starts_with("text/")
            || media == "application/xml"
            || media == "application/x-ndjson"
            || media.is_empty()
        {
            return Ok(Rewriter::Text(scope.stream(), Vec::new()));
        }
        Ok(Rewriter::Pass)
    }
}

/// Feed text to a StreamMasker, keeping an incomplete UTF-8 sequence for the next chunk.
fn text_push(
    m: &mut StreamMasker,
    carry: &mut Vec<u8>,
    chunk: &[u8],
    stats: &mut Stats,
) -> Vec<u8> {
    carry.extend_from_slice(chunk);
    let s = decode_utf8(carry);
    m.push(&s, stats).into_bytes()
}

/// Take the text that is complete from the front of `carry`. A byte that cannot start or
/// continue a character becomes U+FFFD (masked as text, never passed on unmasked); a character
/// cut at the end stays in `carry` for its next bytes, so the text is the same however the bytes
/// were cut.
pub(super) fn decode_utf8(carry: &mut Vec<u8>) -> String {
    let mut s = String::new();
    let mut at = 0;
    loop {
        match std::str::from_utf8(&carry[at..]) {
            Ok(v) => {
                s.push_str(v);
                at = carry.len();
                break;
            }
            Err(e) => {
                let ok = at + e.valid_up_to();
                s.push_str(std::str::from_utf8(&carry[at..ok]).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        s.push(char::REPLACEMENT_CHARACTER);
                        at = ok + bad;
                    }
                    None => {
                        at = ok;
                        break;
                    }
                }
            }
        }
    }
    carry.drain(..at);
    s
}

/// A response that declares a length up to this is read whole and masked in one go, without a
/// relay task and its channel.
const INLINE_MAX: u64 = 256 * 1024;

/// Records the completion if the response is dropped before it was read (the client went away
/// while the edge read the upstream's body), so no forwarded command goes unrecorded.
struct DoneGuard {
    done: Option<Done>,
    status: u16,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            tokio::spawn(done(
                self.status,
                Some("the client went away before the response ended".into()),
                Captured::default(),
                Stats::default(),
            ));
        }
    }
}

/// Relay the upstream response to the client through the rewriter; `done` records the
/// completion. Small bodies of a declared length (not event streams, not MCP) are read whole
/// and masked at once; everything else streams.
pub async fn relay_response(resp: Response<Incoming>, rw: Rewrite, done: Done) -> Response<Body> {
    let (mut parts, mut body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let status = parts.status.as_u16();
    let llm = rw.connection.kind == "llm";
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut rewriter = match rw.rewriter(&parts.headers) {
        Ok(r) => r,
        Err(e) => {
            let fut = done(
                status,
                Some(e.clone()),
                Captured::default(),
                Stats::default(),
            );
            tokio::spawn(fut);
            return problem(
                StatusCode::BAD_GATEWAY,
                "bad-connection",
                "Misconfigured connection",
                &e,
                json!({}),
            );
        }
    };
    if !matches!(rewriter, Rewriter::Pass) {
        // The body changes length as it is masked: the client gets it chunked.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if declared.is_some_and(|n| n <= INLINE_MAX)
        && matches!(
            rewriter,
            Rewriter::Pass | Rewriter::Text(..) | Rewriter::Json(..)
        )
    {
        let mut guard = DoneGuard {
            done: Some(done),
            status,
        };
        let mut stats = Stats::default();
        let mut raw = Vec::with_capacity(declared.unwrap_or(0) as usize);
        let mut error = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        raw.extend_from_slice(&d);
                    }
                }
                Err(e) => {
                    error = Some(format!(
                        "the upstream broke off the response: {}",
                        error_chain(&e)
                    ));
                    break;
                }
            }
        }
        let out = match &mut rewriter {
            Rewriter::Text(m, carry) => {
                let mut out = text_push(m, carry, &raw, &mut stats);
                if !carry.is_empty() {
                    let s = String::from_utf8_lossy(carry).into_owned();
                    out.extend(m.push(&s, &mut stats).into_bytes());
                }
                out.extend(m.finish(&mut stats).into_bytes());
                out
            }
            Rewriter::Json(m) => {
                let mut out = m.push(&raw, &mut stats);
                out.extend(m.finish(&mut stats));
                out
            }
            _ => raw,
        };
        let mut cap = Captured {
            llm,
            ..Captured::default()
        };
        cap.add(&out);
        if let Some(done) = guard.done.take() {
            tokio::spawn(done(status, error.clone(), cap, stats));
        }
        let body = match error {
            // The body as read, then the error: hyper aborts the chunked body, as when streaming.
            Some(e) => {
                let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = Vec::new();
                if !out.is_empty() {
                    frames.push(Ok(Frame::data(Bytes::from(out))));
                }
                frames.push(Err(e.into()));
                StreamBody::new(futures::stream::iter(frames)).boxed()
            }
            None if matches!(rewriter, Rewriter::Pass) => full(out),
            // No length known to hyper, so the masked body goes out chunked like a streamed one.
            None => StreamBody::new(futures::stream::once(std::future::ready(
                Ok::<_, BoxError>(Frame::data(Bytes::from(out))),
            )))
            .boxed(),
        };
        return Response::from_parts(parts, body);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    tokio::spawn(async move {
        let mut stats = Stats::default();
        let mut cap = Captured {
            llm,
            ..Captured::default()
        };
        let mut error = None;
        let mut last = Vec::new();
        let send = |b: Vec<u8>, cap: &mut Captured| {
            cap.add(&b);
            let tx = tx.clone();
            async move {
                if b.is_empty() {
                    return true;
                }
                tx.send(Ok(Frame::data(Bytes::from(b)))).await.is_ok()
            }
        };
        loop {
            let frame = match body.frame().await {
                None => break,
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    error = Some(format!(
                        "the upstream broke off the response: {}",
                        error_chain(&e)
                    ));
                    break;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let out = match &mut rewriter {
                Rewriter::Pass => data.to_vec(),
                Rewriter::Text(m, carry) => text_push(m, carry, &data, &mut stats),
                Rewriter::Json(m) => m.push(&data, &mut stats),
                Rewriter::Sse(m) => m.push(&data, &mut stats),
                Rewriter::Mcp { sse, buf } => {
                    buf.extend_from_slice(&data);
                    if buf.len() > MCP_CAP {
                        error = Some(format!(
                            "the MCP response exceeds {MCP_CAP} bytes, too large to inspect"
                        ));
                        break;
                    }
                    if *sse {
                        let mut out = Vec::new();
                        while let Some(end) = event_end(buf) {
                            let ev: Vec<u8> = buf.drain(..end.0).collect();
                            buf.drain(..end.1);
                            out.extend(rw.mcp_event(&ev, &mut stats));
                        }
                        out
                    } else {
                        Vec::new()
                    }
                }
            };
            if hyper::body::Body::is_end_stream(&body) {
                // The last piece: send it together with what the masker still holds, in one
                // write instead of two.
                last = out;
                break;
            }
            if !send(out, &mut cap).await {
                error = Some("the client went away before the response ended".into());
                break;
            }
        }
        // The rest: what the maskers held back, or the whole MCP JSON body.
        let rest = match &mut rewriter {
            Rewriter::Pass => Vec::new(),
            Rewriter::Text(m, carry) => {
                let mut out = Vec::new();
                if !carry.is_empty() {
                    let s = String::from_utf8_lossy(carry).into_owned();
                    out.extend(m.push(&s, &mut stats).into_bytes());
                }
                out.extend(m.finish(&mut stats).into_bytes());
                out
            }
            Rewriter::Json(m) => m.finish(&mut stats),
            Rewriter::Sse(m) => m.finish(&mut stats),
            Rewriter::Mcp { sse: true, buf } => {
                if buf.is_empty() {
                    Vec::new()
                } else {
                    let ev = std::mem::take(buf);
                    rw.mcp_event(&ev, &mut stats)
                }
            }
            Rewriter::Mcp { sse: false, buf } => {
                if error.is_some() {
                    Vec::new()
                } else {
                    match serde_json::from_slice::<Json>(buf) {
                        Ok(mut v) => {
                            rw.mcp_message(&mut v, &mut stats);
                            v.to_string().into_bytes()
                        }
                        Err(_) => {
                            let scope = rw.masker.scope(&rw.connection.name, &rw.groups);
                            let s = String::from_utf8_lossy(buf).into_owned();
                            scope.mask_text(&s, &mut stats).into_owned().into_bytes()
                        }
                    }
                }
            }
        };
        last.extend(rest);
        if error.is_none() || !last.is_empty() {
            let _ = send(last, &mut cap).await;
        }
        if let Some(e) = &error {
            // Tell the client the body is incomplete: hyper aborts the chunked body.
            let _ = tx.send(Err(e.clone().into())).await;
        }
        drop(tx);
        done(status, error, cap, stats).await;
    });
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
    Response::from_parts(parts, body)
}

/// The end of the first complete SSE event in `buf`: (event length, terminator length).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_decoded_the_same_however_the_bytes_are_cut() {
        let bytes = b"a\xff\xe2\x82\xacb\xc3(\xf0\x9f\x98\x80z\xe2\x82";
        let whole = String::from_utf8_lossy(bytes).into_owned();
        let finish = |carry: &mut Vec<u8>, s: &mut String| {
            s.push_str(&String::from_utf8_lossy(carry));
            carry.clear();
        };
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut carry = Vec::new();
                let mut s = String::new();
                for piece in [&bytes[..i], &bytes[i..j], &bytes[j..]] {
                    carry.extend_from_slice(piece);
                    s.push_str(&decode_utf8(&mut carry));
                    assert!(carry.len() < 4, "only a cut character waits");
                }
                finish(&mut carry, &mut s);
                assert_eq!(s, whole, "cut at {i} and {j}");
            }
        }
    }

    #[test]
    fn websocket_upgrades_are_told_from_other_protocols() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::UPGRADE, v.parse().unwrap());
            m
        };
        assert!(is_websocket(&h("websocket")));
        assert!(is_websocket(&h("WebSocket")));
        assert!(is_websocket(&h("h2c, websocket")));
        assert!(!is_websocket(&h("h2c")));
        assert!(!is_websocket(&h("websocketx")));
        assert!(!is_websocket(&HeaderMap::new()));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("x-keep").unwrap(), "1");
    }

    #[test]
    fn usage_from_openai_and_anthropic_shapes() {
        let head = br#"{"id":"x","model":"gpt-4o-mini","choices":[]"#;
        let tail = br#","usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        assert_eq!(llm_usage(head, tail), ("gpt-4o-mini".into(), 12, 7));
        let a = br#"event: message_delta
data: {"type":"message_delta","usage":{"input_tokens":5,"output_tokens":9}}"#;
        assert_eq!(
            llm_usage(br#"{"model": "claude"}"#, a),
            ("claude".into(), 5, 9)
        );
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some((7, 2)));
        assert_eq!(event_end(b"data: a\r\n\r\n"), Some((7, 4)));
        assert_eq!(event_end(b"data: a\n"), None);
    }

    #[test]
    fn tokens_come_from_bearer_or_x_api_key() {
        let c = Connection::default();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer cst_abc"));
        assert_eq!(client_token(&h, &c).as_deref(), Some("cst_abc"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("cst_k"));
        assert_eq!(client_token(&h, &c).as_deref(), Some("cst_k"));
        assert_eq!(client_token(&HeaderMap::new(), &c), None);
    }
}
