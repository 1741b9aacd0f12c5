//! The relay between a logged-in client and its upstream.
//!
//! Two halves run concurrently in the session's task:
//!
//! - client → upstream: every `Query`, `Parse` and `Execute` is classified and authorized; an
//!   allowed command is recorded (strictly: acknowledged by the bus) before it is forwarded. A
//!   refused one is replaced by a *poison* message the server must reject (a syntax error, an
//!   unknown portal), so the server's own `ErrorResponse`/`ReadyForQuery` flow keeps the
//!   transaction state the client sees equal to the server's; the error text is swapped for
//!   custos's on the way back.
//! - upstream → client: responses are matched to the [`Step`]s the client half queued (the
//!   protocol answers in order), DataRows are masked one at a time, and every command's
//!   completion is recorded with its row count, masked-value count and a masked excerpt.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use custos_core::authz;
use custos_core::classify::{classify_with, ClassifyOptions, Statement};
use custos_core::events::{new_id, Origin};
use custos_core::mask::{Masked, Scope, Stats, StreamMasker};
use custos_core::proto::v1::{
    event::Payload, Classification, CommandCompleted, Connection, Verdict as PbVerdict,
};
use parking_lot::Mutex;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tracing::field::Empty;
use tracing::Instrument as _;

use super::catalog::Catalog;
use super::upstream::{BoxIo, Target, Upstream};
use super::wire::{self, Body, Reader, WireError, Writer};
use crate::pipeline::{
    command_received, option_usize, refused_at_once, sql_reason, ActionRequest, ApprovalRequest,
    AuditMode, HoldStart, Identity, Outcome as Decided, Services, Verdict,
};

/// Messages larger than this are streamed through when nothing needs to look inside them.
const STREAM_ABOVE: usize = 1 << 20;
/// The largest message buffered for inspection (PostgreSQL's own field limit is 1 GiB).
const MAX_BUFFERED: usize = (1 << 30) + 1024;
/// Flush the outgoing buffer when it grows past this.
const FLUSH_AT: usize = 64 * 1024;
/// Parameters longer than this are cut in the audit record.
const PARAM_CAP: usize = 1024;
/// A query the server rejects with a syntax error without touching anything.
const POISON_SQL: &[u8] = b"custos_refused\0";
/// A portal name no client can create (it starts with a control character).
const POISON_PORTAL: &[u8] = b"\x01custos_refused\0";

type ClientReader = Reader<ReadHalf<BoxIo>>;
type ClientWriter = Writer<WriteHalf<BoxIo>>;
type UpReader = Reader<ReadHalf<BoxIo>>;
type UpWriter = Writer<WriteHalf<BoxIo>>;

/// How the relay ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reason: String,
    pub commands: u64,
    pub denied: u64,
    pub error: Option<String>,
}

pub struct Relay<'a> {
    pub services: Services,
    pub catalog: &'a Catalog,
    pub origin: Origin,
    pub who: Identity,
    pub conn: Connection,
    pub target: Target,
    pub mode: AuditMode,
    pub scs: bool,
}

/// One result column, resolved for masking.
#[derive(Debug, Clone)]
struct Col {
    /// `schema.table` when the column comes straight from a table.
    table: Option<String>,
    /// The real column name (not the alias) when known, else the label.
    name: String,
    type_oid: u32,
    format: i16,
}

type Cols = Arc<Vec<Col>>;

/// A prepared statement as judged at Parse.
struct Stmt {
    text: String,
    stmts: Vec<Statement>,
    cols: Mutex<Option<Cols>>,
    /// Parameter type OIDs (from Parse, completed by the server's ParameterDescription).
    param_types: Mutex<Vec<u32>>,
}

/// A bound portal.
struct Portal {
    stmt: Option<Arc<Stmt>>,
    formats: Vec<i16>,
    params: Vec<String>,
    cols: Mutex<Option<Cols>>,
}

/// A command being recorded.
struct Cmd {
    id: String,
    started: Instant,
    rows: u64,
    data_rows: u64,
    bytes: u64,
    stats: Stats,
    excerpt: String,
    excerpt_rows: usize,
    truncated: bool,
    error: Option<String>,
    cols: Option<Cols>,
    formats: Vec<i16>,
    copy: Option<StreamMasker>,
    rows_cap: usize,
    bytes_cap: usize,
    /// The statement's span, open until the command completes.
    span: tracing::Span,
    /// Its time at the upstream, when it was forwarded.
    upstream: Option<tracing::Span>,
}

impl Cmd {
    fn new(id: String, rows_cap: usize, bytes_cap: usize) -> Cmd {
        Cmd {
            id,
            started: Instant::now(),
            rows: 0,
            data_rows: 0,
            bytes: 0,
            stats: Stats::default(),
            excerpt: String::new(),
            excerpt_rows: 0,
            truncated: false,
            error: None,
            cols: None,
            formats: Vec::new(),
            copy: None,
            rows_cap,
            bytes_cap,
            span: tracing::Span::none(),
            upstream: None,
        }
    }
}

/// The span of one judged statement (a simple Query, or a Parse/Execute of the extended
/// protocol). Its attributes are the statement kinds and the verdict, never the text.
fn statement_span(message: &'static str, stmts: &[Statement]) -> tracing::Span {
    let mut kinds: Vec<&str> = stmts.iter().map(|s| s.statement_kind.as_str()).collect();
    kinds.dedup();
    tracing::debug_span!(
        "pg.statement",
        pg.message = message,
        statements = stmts.len(),
        db.operation = kinds.join(",").as_str(),
        command_id = Empty,
        action = Empty,
        verdict = Empty,
        approval_id = Empty,
        rows = Empty,
        otel.status_code = Empty,
    )
}

enum Kind {
    Parse,
    Bind,
    DescribeStmt {
        stmt: Option<Arc<Stmt>>,
        injected: bool,
    },
    DescribePortal {
        portal: Option<Arc<Portal>>,
    },
    Execute {
        portal: Option<Arc<Portal>>,
    },
    Close,
    Sync,
    Query,
    FunctionCall,
}

/// What the client half sent, awaiting its response.
struct Step {
    kind: Kind,
    cmd: Option<Box<Cmd>>,
    /// The client sees this `ErrorResponse` body instead of the server's.
    deny: Option<Bytes>,
}

struct Shared {
    steps: VecDeque<Step>,
    scs: bool,
    commands: u64,
    denied: u64,
}

#[derive(Debug)]
enum End {
    Client(String),
    Server(String),
    Fatal(String),
}

impl From<WireError> for End {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Closed => End::Fatal("connection closed".into()),
            e => End::Fatal(e.to_string()),
        }
    }
}

impl Relay<'_> {
    pub async fn run(self, creader: ClientReader, cwriter: ClientWriter, up: Upstream) -> Outcome {
        let shared = Mutex::new(Shared {
            steps: VecDeque::new(),
            scs: self.scs,
            commands: 0,
            denied: 0,
        });
        let Upstream {
            reader: ureader,
            writer: uwriter,
            ..
        } = up;
        let masker = self.services.masker.clone();
        let scope = masker.scope(&self.conn.name, &self.who.groups);
        let audit = masker.audit_scope();
        let rows_cap = option_usize(&self.conn, "audit_rows", 100);
        let bytes_cap = option_usize(&self.conn, "audit_bytes", 64 * 1024);
        let (notices_tx, notices) = mpsc::unbounded_channel();
        let mut c2u = ClientHalf {
            notices: notices_tx,
            r: &self,
            shared: &shared,
            reader: creader,
            up: uwriter,
            statements: HashMap::new(),
            portals: HashMap::new(),
            sql_prepared: HashMap::new(),
            audit,
            rows_cap,
            bytes_cap,
        };
        let mut u2c = ServerHalf {
            r: &self,
            shared: &shared,
            reader: ureader,
            client: cwriter,
            notices,
            cur: None,
            scope,
            audit,
        };
        let end = tokio::select! {
            e = c2u.run() => e,
            e = u2c.run() => e,
        };
        // Tell the client why, when it is still there.
        let (reason, error) = match end {
            End::Client(r) => (r, None),
            End::Server(r) => (r, None),
            End::Fatal(e) => {
                let body = wire::error_body("FATAL", "08006", &format!("custos: {e}"), None, None);
                u2c.client.msg(b'E', &body);
                ("error".to_string(), Some(e))
            }
        };
        u2c.client.shutdown().await;
        c2u.up.msg(b'X', &[]);
        c2u.up.shutdown().await;
        // Commands still in flight never completed.
        let pending: Vec<Step> = u2c
            .cur
            .take()
            .into_iter()
            .chain(shared.lock().steps.drain(..))
            .collect();
        for s in pending {
            u2c.finish(s, Some("session ended before the command completed".into()))
                .await;
        }
        let s = shared.lock();
        Outcome {
            reason,
            commands: s.commands,
            denied: s.denied,
            error,
        }
    }

    fn decide(&self, stmts: &[Statement]) -> Verdict {
        let mut actions = Vec::new();
        for (i, s) in stmts.iter().enumerate() {
            for a in &s.actions {
                actions.push(ActionRequest {
                    action: a,
                    context: authz::sql_context(s),
                    index: i,
                });
            }
        }
        let cfg = self.services.config();
        // The connection may have been deleted or changed since login: judge with the latest.
        let conn = cfg.connections.get(&self.conn.name).unwrap_or(&self.conn);
        self.services
            .policies
            .decide(&cfg, &self.who, conn, &actions)
    }
}

fn cstr_lossy(body: &[u8]) -> String {
    let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

fn denial_body(code: &str, message: &str, detail: &str, hint: &str) -> Bytes {
    wire::error_body("ERROR", code, message, Some(detail), Some(hint)).freeze()
}

// ===== client → upstream =======================================================================

struct ClientHalf<'s, 'a> {
    r: &'s Relay<'a>,
    shared: &'s Mutex<Shared>,
    reader: ClientReader,
    up: UpWriter,
    statements: HashMap<String, Arc<Stmt>>,
    portals: HashMap<String, Arc<Portal>>,
    /// SQL-level `PREPARE name AS …`, so `EXECUTE name` is judged by what it runs.
    sql_prepared: HashMap<String, Statement>,
    audit: Scope<'s>,
    rows_cap: usize,
    bytes_cap: usize,
    /// NoticeResponse bodies for the server half to send to the client between messages.
    notices: mpsc::UnboundedSender<Bytes>,
}

impl ClientHalf<'_, '_> {
    async fn run(&mut self) -> End {
        match self.pump().await {
            Ok(e) => e,
            Err(WireError::Closed) => End::Client("client closed the connection".into()),
            Err(e) => End::Fatal(format!("client: {e}")),
        }
    }

    async fn pump(&mut self) -> Result<End, WireError> {
        loop {
            if self.reader.buffered() == 0 {
                self.up.flush().await?;
            }
            let h = self.reader.header().await?;
            match h.tag {
                b'd' if h.len > STREAM_ABOVE => {
                    self.up.header(b'd', h.len);
                    let mut left = h.len;
                    while left > 0 {
                        let c = self.reader.chunk(left.min(wire::CHUNK)).await?;
                        left -= c.len();
                        self.up.raw(&c);
                        self.up.flush_if(FLUSH_AT).await?;
                    }
                    continue;
                }
                _ if h.len > MAX_BUFFERED => return Err(WireError::TooLarge(h.len, MAX_BUFFERED)),
                _ => {}
            }
            let body = self.reader.body(h.len).await?;
            match h.tag {
                b'Q' => self.query(body).await?,
                b'P' => self.parse(body).await?,
                b'B' => self.bind(body)?,
                b'D' => self.describe(body)?,
                b'E' => self.execute(body).await?,
                b'C' => self.close(body)?,
                b'S' => {
                    self.push(Kind::Sync, None, None);
                    self.up.msg(b'S', &body);
                }
                b'H' => {
                    self.up.msg(b'H', &body);
                    self.up.flush().await?;
                }
                b'd' | b'c' | b'f' => self.up.msg(h.tag, &body),
                b'F' => {
                    let cmd = self.cmd(new_id());
                    self.shared.lock().denied += 1;
                    let deny = denial_body(
                        "42501",
                        "custos: permission denied: fast-path function calls are not allowed through custos",
                        "the FunctionCall message bypasses SQL classification",
                        "call the function with SELECT so policy can judge it",
                    );
                    self.push(Kind::FunctionCall, Some(cmd), Some(deny));
                    self.up.msg(b'Q', POISON_SQL);
                }
                b'X' => {
                    self.up.msg(b'X', &[]);
                    self.up.flush().await?;
                    return Ok(End::Client("client terminated the session".into()));
                }
                t => {
                    return Err(WireError::Protocol(format!(
                        "unexpected message '{}' from the client",
                        t as char
                    )))
                }
            }
            self.up.flush_if(FLUSH_AT).await?;
        }
    }

    fn push(&self, kind: Kind, cmd: Option<Box<Cmd>>, deny: Option<Bytes>) {
        self.shared.lock().steps.push_back(Step { kind, cmd, deny });
    }

    fn cmd(&self, id: String) -> Box<Cmd> {
        Box::new(Cmd::new(id, self.rows_cap, self.bytes_cap))
    }

    fn classify(&self, sql: &str) -> Vec<Statement> {
        let scs = self.shared.lock().scs;
        let mut stmts = classify_with(
            sql,
            &ClassifyOptions {
                standard_conforming_strings: scs,
            },
        );
        // `EXECUTE p` runs what `PREPARE p` classified: judge it by that.
        for s in &mut stmts {
            if s.statement_kind == "prepare" || s.statement_kind == "deallocate" {
                continue;
            }
            let Some(p) = s
                .prepared_name
                .as_ref()
                .and_then(|n| self.sql_prepared.get(n))
            else {
                continue;
            };
            for a in &p.actions {
                if *a != "sql:prepare" && !s.actions.contains(a) {
                    s.actions.push(a);
                }
            }
            s.tables.extend(p.tables.iter().cloned());
            s.functions.extend(p.functions.iter().cloned());
            s.has_where &= p.has_where;
        }
        stmts
    }

    /// Hold for approval if needed, record the command, and say whether it may run; in the
    /// statement's span, which the command keeps until it completes.
    async fn gate(
        &mut self,
        span: tracing::Span,
        text: &str,
        stmts: &[Statement],
        verdict: Verdict,
        parameters: Vec<String>,
    ) -> Result<(Box<Cmd>, Option<Bytes>), WireError> {
        let (mut cmd, deny) = self
            .gate_now(text, stmts, verdict, parameters)
            .instrument(span.clone())
            .await?;
        if deny.is_none() {
            cmd.upstream = Some(tracing::debug_span!(
                parent: &span,
                "upstream",
                otel.kind = "client",
                db.system = "postgresql",
                rows = Empty,
                otel.status_code = Empty,
            ));
        } else {
            span.record("otel.status_code", "ERROR");
        }
        cmd.span = span;
        Ok((cmd, deny))
    }

    async fn gate_now(
        &mut self,
        text: &str,
        stmts: &[Statement],
        mut verdict: Verdict,
        parameters: Vec<String>,
    ) -> Result<(Box<Cmd>, Option<Bytes>), WireError> {
        let r = self.r;
        let id = new_id();
        let mut scratch = Stats::default();
        let masked_text = self.audit.mask_text(text, &mut scratch).into_owned();
        let classifications: Vec<Classification> = stmts
            .iter()
            .enumerate()
            .map(|(i, s)| Classification {
                action: s.actions.join(","),
                resources: s.tables.iter().cloned().collect(),
                functions: s.functions.iter().cloned().collect(),
                has_where: s.has_where,
                parsed: s.parsed,
                statement_index: i as u32,
            })
            .collect();
        let mut approval_id = String::new();
        let mut approved = false;
        if let Decided::Approval(req) = &verdict.outcome {
            let refuse_now = r
                .conn
                .options
                .get("approval_wait")
                .is_some_and(|v| v == "refuse");
            let areq = ApprovalRequest {
                origin: r.origin.clone(),
                groups: r.who.groups.clone(),
                command_id: id.clone(),
                text: masked_text.clone(),
                classifications: classifications.clone(),
                action: verdict.action.clone(),
                policies: verdict.policies.clone(),
                requirement: req.clone(),
                reason: sql_reason(text),
                refuse_now,
            };
            let hook = &r.services.approvals;
            let hold = tracing::debug_span!(
                "approval.hold",
                group = req.group.as_str(),
                approval_id = Empty,
                outcome = Empty
            );
            let out = match hook.start(&areq).instrument(hold.clone()).await {
                HoldStart::Done(o) => o,
                HoldStart::Held(held) => {
                    hold.record("approval_id", held.approval_id.as_str());
                    let notice = held.notice(&verdict.action, &r.conn.name);
                    let body = wire::error_body("NOTICE", "01000", &notice, None, None).freeze();
                    let _ = self.notices.send(body);
                    if refuse_now {
                        refused_at_once(&verdict, &held, &r.conn.name)
                    } else {
                        // What the client sent before the held command goes on meanwhile.
                        self.up.flush().await?;
                        let wait = hook.wait(&held).instrument(hold.clone());
                        tokio::pin!(wait);
                        loop {
                            tokio::select! {
                                o = &mut wait => break o,
                                gone = self.reader.readable(MAX_BUFFERED) => if gone.is_err() {
                                    hook.cancel(&held, "the client disconnected while waiting").await;
                                    return Err(WireError::Closed);
                                }
                            }
                        }
                    }
                }
            };
            (approval_id, approved) = r
                .services
                .settle_approval(r.mode, &r.origin, &id, &mut verdict, out)
                .instrument(hold.clone())
                .await;
            hold.record("outcome", verdict.label(approved));
            if !approval_id.is_empty() {
                hold.record("approval_id", approval_id.as_str());
            }
        }
        {
            let span = tracing::Span::current();
            span.record("command_id", id.as_str());
            span.record("action", verdict.action.as_str());
            span.record("verdict", verdict.label(approved));
            if !approval_id.is_empty() {
                span.record("approval_id", approval_id.as_str());
            }
        }
        let mut ev = command_received(
            &r.origin,
            &id,
            masked_text.clone(),
            classifications,
            &verdict,
            parameters,
        );
        if let Some(Payload::CommandReceived(c)) = ev.payload.as_mut() {
            c.approval_id = approval_id.clone();
            if approved {
                c.verdict = PbVerdict::Approved as i32;
            }
        }
        r.services
            .recorder
            .count_command("postgres", &verdict, approved);
        let recorded = r.services.recorder.record(r.mode, ev).await;
        let deny = if verdict.outcome == Decided::Deny {
            let detail = if verdict.policies.is_empty() {
                format!("command {id}; no policy permits it")
            } else {
                format!("command {id}; policy {}", verdict.policies.join(", "))
            };
            let hint = if approval_id.is_empty() {
                "ask a custos administrator to change the policy if this should be allowed"
                    .to_string()
            } else {
                format!("approval {approval_id}: see `custos approvals get {approval_id}`")
            };
            Some(denial_body(
                "42501",
                &format!("custos: permission denied: {}", verdict.reason),
                &detail,
                &hint,
            ))
        } else if let Err(e) = recorded {
            Some(denial_body(
                "57P03",
                &format!(
                    "custos: the statement was not run: the audit bus is unavailable ({e}) and connection {} records strictly",
                    r.conn.name
                ),
                &format!("command {id}"),
                "retry when the bus is back; operators: check NATS, or set audit_mode=async on the connection",
            ))
        } else {
            None
        };
        {
            let mut s = self.shared.lock();
            s.commands += 1;
            if deny.is_some() {
                s.denied += 1;
            }
        }
        Ok((self.cmd(id), deny))
    }

    async fn query(&mut self, body: Bytes) -> Result<(), WireError> {
        let text = cstr_lossy(&body);
        let stmts = self.classify(&text);
        if stmts.is_empty() {
            self.push(Kind::Query, None, None);
            self.up.msg(b'Q', &body);
            return Ok(());
        }
        let span = statement_span("query", &stmts);
        let verdict = span.in_scope(|| self.r.decide(&stmts));
        let (cmd, deny) = self.gate(span, &text, &stmts, verdict, Vec::new()).await?;
        if deny.is_some() {
            self.push(Kind::Query, Some(cmd), deny);
            self.up.msg(b'Q', POISON_SQL);
            return Ok(());
        }
        for s in &stmts {
            if s.statement_kind == "prepare" {
                if let Some(n) = &s.prepared_name {
                    self.sql_prepared.insert(n.clone(), s.clone());
                }
            }
        }
        self.push(Kind::Query, Some(cmd), None);
        self.up.msg(b'Q', &body);
        Ok(())
    }

    async fn parse(&mut self, body: Bytes) -> Result<(), WireError> {
        let mut b = Body::new(&body);
        let name = b.cstr()?;
        let text = b.cstr()?;
        let stmts = self.classify(&text);
        if !stmts.is_empty() {
            // An early check (its `authorize` span sits under the session); the statement is
            // judged again at Execute, where its `pg.statement` span is.
            let verdict = self.r.decide(&stmts);
            if verdict.outcome == Decided::Deny {
                // Judged at Parse: refuse now, and record it.
                let span = statement_span("parse", &stmts);
                let (cmd, deny) = self.gate(span, &text, &stmts, verdict, Vec::new()).await?;
                self.statements.remove(&name);
                self.push(Kind::Parse, Some(cmd), deny);
                let mut m = BytesMut::new();
                wire::put_cstr(&mut m, &name);
                m.put_slice(POISON_SQL);
                m.put_i16(0);
                self.up.msg(b'P', &m);
                return Ok(());
            }
        }
        let declared: Vec<u32> = match b.i16() {
            Ok(n) => (0..n.max(0))
                .map_while(|_| b.i32().ok().map(|o| o as u32))
                .collect(),
            Err(_) => Vec::new(),
        };
        let stmt = Arc::new(Stmt {
            text,
            stmts,
            cols: Mutex::new(None),
            param_types: Mutex::new(declared),
        });
        self.statements.insert(name.clone(), stmt.clone());
        self.push(Kind::Parse, None, None);
        self.up.msg(b'P', &body);
        // Learn the result columns now, so Execute results can be masked even when the client
        // never asks for a description.
        let mut m = BytesMut::new();
        m.put_u8(b'S');
        wire::put_cstr(&mut m, &name);
        self.push(
            Kind::DescribeStmt {
                stmt: Some(stmt),
                injected: true,
            },
            None,
            None,
        );
        self.up.msg(b'D', &m);
        Ok(())
    }

    fn bind(&mut self, body: Bytes) -> Result<(), WireError> {
        let mut b = Body::new(&body);
        let portal = b.cstr()?;
        let stmt_name = b.cstr()?;
        let nfmt = b.i16()?.max(0) as usize;
        let pfmts: Vec<i16> = (0..nfmt).map(|_| b.i16()).collect::<Result<_, _>>()?;
        let nparams = b.i16()?.max(0) as usize;
        let mut params = Vec::with_capacity(nparams);
        let types = self
            .statements
            .get(&stmt_name)
            .map(|s| s.param_types.lock().clone())
            .unwrap_or_default();
        let mut scratch = Stats::default();
        for i in 0..nparams {
            let fmt = match pfmts.len() {
                0 => 0,
                1 => pfmts[0],
                _ => pfmts.get(i).copied().unwrap_or(0),
            };
            params.push(match b.value()? {
                None => "NULL".to_string(),
                Some(v) if fmt != 0 && !text_like(types.get(i).copied().unwrap_or(0)) => {
                    binary_param(types.get(i).copied().unwrap_or(0), v)
                }
                Some(v) => {
                    // Text, or the binary form of a text-like type (jsonb: a version byte first).
                    let v = if fmt != 0 && types.get(i) == Some(&3802) && !v.is_empty() {
                        &v[1..]
                    } else {
                        v
                    };
                    let s = String::from_utf8_lossy(&v[..v.len().min(PARAM_CAP)]);
                    let mut m = self.audit.mask_text(&s, &mut scratch).into_owned();
                    if v.len() > PARAM_CAP {
                        m.push('…');
                    }
                    m
                }
            });
        }
        let nres = b.i16()?.max(0) as usize;
        let formats: Vec<i16> = (0..nres).map(|_| b.i16()).collect::<Result<_, _>>()?;
        self.portals.insert(
            portal,
            Arc::new(Portal {
                stmt: self.statements.get(&stmt_name).cloned(),
                formats,
                params,
                cols: Mutex::new(None),
            }),
        );
        self.push(Kind::Bind, None, None);
        self.up.msg(b'B', &body);
        Ok(())
    }

    fn describe(&mut self, body: Bytes) -> Result<(), WireError> {
        let mut b = Body::new(&body);
        let what = b.u8()?;
        let name = b.cstr()?;
        let kind = if what == b'S' {
            Kind::DescribeStmt {
                stmt: self.statements.get(&name).cloned(),
                injected: false,
            }
        } else {
            Kind::DescribePortal {
                portal: self.portals.get(&name).cloned(),
            }
        };
        self.push(kind, None, None);
        self.up.msg(b'D', &body);
        Ok(())
    }

    async fn execute(&mut self, body: Bytes) -> Result<(), WireError> {
        let mut b = Body::new(&body);
        let name = b.cstr()?;
        let max_rows = b.i32()?;
        let portal = self.portals.get(&name).cloned();
        let stmt = portal.as_ref().and_then(|p| p.stmt.clone());
        let Some(stmt) = stmt.filter(|s| !s.stmts.is_empty()) else {
            // Unknown portal (the server rejects it too) or an empty query: nothing to judge.
            self.push(Kind::Execute { portal }, None, None);
            self.up.msg(b'E', &body);
            return Ok(());
        };
        // Enforced at Execute, with the policy in force now.
        let span = statement_span("execute", &stmt.stmts);
        let verdict = span.in_scope(|| self.r.decide(&stmt.stmts));
        let params = portal
            .as_ref()
            .map(|p| p.params.clone())
            .unwrap_or_default();
        let (cmd, deny) = self
            .gate(span, &stmt.text, &stmt.stmts, verdict, params)
            .await?;
        if deny.is_some() {
            self.push(Kind::Execute { portal }, Some(cmd), deny);
            let mut m = BytesMut::new();
            m.put_slice(POISON_PORTAL);
            m.put_i32(max_rows);
            self.up.msg(b'E', &m);
            return Ok(());
        }
        self.push(Kind::Execute { portal }, Some(cmd), None);
        self.up.msg(b'E', &body);
        Ok(())
    }

    fn close(&mut self, body: Bytes) -> Result<(), WireError> {
        let mut b = Body::new(&body);
        let what = b.u8()?;
        let name = b.cstr()?;
        if what == b'S' {
            self.statements.remove(&name);
        } else {
            self.portals.remove(&name);
        }
        self.push(Kind::Close, None, None);
        self.up.msg(b'C', &body);
        Ok(())
    }
}

// ===== upstream → client =======================================================================

struct ServerHalf<'s, 'a> {
    r: &'s Relay<'a>,
    shared: &'s Mutex<Shared>,
    reader: UpReader,
    client: ClientWriter,
    /// Notices from the client half (a command waiting for approval), sent between messages.
    notices: mpsc::UnboundedReceiver<Bytes>,
    cur: Option<Step>,
    scope: Scope<'s>,
    audit: Scope<'s>,
}

/// Types whose binary form is their text (jsonb: a version byte, then the text).
fn text_like(oid: u32) -> bool {
    matches!(oid, 25 | 1043 | 1042 | 19 | 114 | 142 | 705 | 18 | 3802)
}

fn rows_of(tag: &str) -> Option<u64> {
    let mut parts = tag.split_whitespace();
    let verb = parts.next()?;
    if matches!(
        verb,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "COPY" | "FETCH" | "MOVE" | "MERGE"
    ) {
        parts.last()?.parse().ok()
    } else {
        None
    }
}

impl ServerHalf<'_, '_> {
    async fn run(&mut self) -> End {
        match self.pump().await {
            Ok(e) => e,
            Err(End::Fatal(e)) if e == "connection closed" => {
                End::Server("the server closed the connection".into())
            }
            Err(e) => e,
        }
    }

    fn desync(what: &str) -> End {
        End::Fatal(format!(
            "protocol out of step with the server ({what}); session closed to stay safe"
        ))
    }

    fn step(&mut self) -> Option<&mut Step> {
        if self.cur.is_none() {
            self.cur = self.shared.lock().steps.pop_front();
        }
        self.cur.as_mut()
    }

    async fn finish(&mut self, step: Step, error: Option<String>) {
        let Some(mut cmd) = step.cmd else { return };
        if cmd.error.is_none() {
            cmd.error = error;
        }
        if cmd.rows == 0 {
            cmd.rows = cmd.data_rows;
        }
        // The statement's spans end here (no error text: it can quote the data).
        if let Some(up) = cmd.upstream.take() {
            up.record("rows", cmd.rows);
            if cmd.error.is_some() {
                up.record("otel.status_code", "ERROR");
            }
        }
        cmd.span.record("rows", cmd.rows);
        if cmd.error.is_some() {
            cmd.span.record("otel.status_code", "ERROR");
        }
        let _statement = std::mem::replace(&mut cmd.span, tracing::Span::none());
        let ev = self
            .r
            .origin
            .event(Payload::CommandCompleted(CommandCompleted {
                command_id: cmd.id,
                duration_us: cmd.started.elapsed().as_micros() as u64,
                rows: cmd.rows,
                bytes: cmd.bytes,
                masked_values: cmd.stats.total(),
                error: cmd.error.unwrap_or_default(),
                result_excerpt: cmd.excerpt,
                result_truncated: cmd.truncated,
                ..Default::default()
            }));
        self.r.services.recorder.later(ev).await;
    }

    async fn finish_cur(&mut self, error: Option<String>) {
        if let Some(s) = self.cur.take() {
            self.finish(s, error).await;
        }
    }

    async fn pump(&mut self) -> Result<End, End> {
        loop {
            if self.reader.buffered() == 0 {
                self.client.flush().await?;
            }
            let h = tokio::select! {
                biased;
                Some(n) = self.notices.recv() => {
                    self.client.msg(b'N', &n);
                    self.client.flush().await?;
                    continue;
                }
                h = self.reader.header() => h?,
            };
            if h.len > STREAM_ABOVE && self.streamable(h.tag) {
                self.stream(h).await?;
                continue;
            }
            if h.len > MAX_BUFFERED {
                return Err(WireError::TooLarge(h.len, MAX_BUFFERED).into());
            }
            let body = self.reader.body(h.len).await?;
            self.on_message(h.tag, body).await?;
            self.client.flush_if(FLUSH_AT).await?;
        }
    }

    /// May this large message pass without being looked at?
    fn streamable(&mut self, tag: u8) -> bool {
        let clear = self.scope.is_clear();
        match tag {
            b'D' | b'd' => {
                if !clear {
                    return false;
                }
                // The row belongs to the head step (an Execute's first row may arrive before
                // anything else of its response).
                if let Some(cmd) = self.step().and_then(|s| s.cmd.as_mut()) {
                    cmd.truncated = true;
                }
                true
            }
            _ => false,
        }
    }

    async fn stream(&mut self, h: wire::Header) -> Result<(), End> {
        if let Some(cmd) = self.cur.as_mut().and_then(|s| s.cmd.as_mut()) {
            cmd.bytes += h.len as u64;
            if h.tag == b'D' {
                cmd.data_rows += 1;
            }
        }
        self.client.header(h.tag, h.len);
        let mut left = h.len;
        while left > 0 {
            let c = self.reader.chunk(left.min(wire::CHUNK)).await?;
            left -= c.len();
            self.client.raw(&c);
            self.client.flush_if(FLUSH_AT).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, tag: u8, body: Bytes) -> Result<(), End> {
        match tag {
            b'N' | b'A' => self.client.msg(tag, &body),
            b'S' => {
                let mut b = Body::new(&body);
                if let (Ok(k), Ok(v)) = (b.cstr(), b.cstr()) {
                    if k == "standard_conforming_strings" {
                        self.shared.lock().scs = v == "on";
                    }
                }
                self.client.msg(b'S', &body);
            }
            b'Z' => {
                // Everything up to the Sync (or the simple Query) this answers is over; steps
                // the server skipped after an error never ran.
                while let Some(s) = self.step() {
                    let end = matches!(s.kind, Kind::Sync | Kind::Query | Kind::FunctionCall);
                    let skipped = !end;
                    self.finish_cur(skipped.then(|| {
                        "not run: an earlier message in the same pipeline failed".to_string()
                    }))
                    .await;
                    if end {
                        break;
                    }
                }
                self.client.msg(b'Z', &body);
            }
            b'E' => {
                let fields = wire::parse_error(&body);
                let Some(step) = self.step() else {
                    // Not an answer to anything (e.g. the server is shutting down).
                    self.client.msg(b'E', &body);
                    return Ok(());
                };
                let out = step.deny.clone().unwrap_or_else(|| body.clone());
                let error = if step.deny.is_some() {
                    wire::parse_error(&out).message
                } else {
                    format!("{}: {}", fields.code, fields.message)
                };
                if let Some(cmd) = step.cmd.as_mut() {
                    cmd.error.get_or_insert(error.clone());
                }
                // A simple query's (or a Sync's commit) error is followed by its ReadyForQuery.
                let keep = matches!(step.kind, Kind::Query | Kind::FunctionCall | Kind::Sync);
                if !keep {
                    self.finish_cur(Some(error)).await;
                }
                self.client.msg(b'E', &out);
            }
            b'1' | b'2' | b'3' => {
                let ok = matches!(
                    (tag, self.step().map(|s| &s.kind)),
                    (b'1', Some(Kind::Parse))
                        | (b'2', Some(Kind::Bind))
                        | (b'3', Some(Kind::Close))
                );
                if !ok {
                    return Err(Self::desync(&format!("'{}'", tag as char)));
                }
                self.finish_cur(None).await;
                self.client.msg(tag, &body);
            }
            b't' => match self.step().map(|s| &s.kind) {
                Some(Kind::DescribeStmt { injected, stmt }) => {
                    if let Some(st) = stmt {
                        let mut b = Body::new(&body);
                        let n = b.i16().map_err(End::from)?.max(0);
                        let types: Vec<u32> = (0..n)
                            .map_while(|_| b.i32().ok().map(|o| o as u32))
                            .collect();
                        *st.param_types.lock() = types;
                    }
                    if !injected {
                        self.client.msg(tag, &body);
                    }
                }
                _ => return Err(Self::desync("ParameterDescription")),
            },
            b'T' | b'n' => {
                let cols = if tag == b'T' {
                    Some(columns(self.r, &body).await?)
                } else {
                    None
                };
                let Some(step) = self.step() else {
                    return Err(Self::desync("RowDescription"));
                };
                let mut forward = true;
                match &step.kind {
                    Kind::DescribeStmt { stmt, injected } => {
                        if let Some(s) = stmt {
                            *s.cols.lock() = Some(cols.unwrap_or_default());
                        }
                        forward = !injected;
                        self.finish_cur(None).await;
                    }
                    Kind::DescribePortal { portal } => {
                        if let Some(p) = portal {
                            *p.cols.lock() = Some(cols.unwrap_or_default());
                        }
                        self.finish_cur(None).await;
                    }
                    Kind::Query => {
                        if let Some(cmd) = step.cmd.as_mut() {
                            cmd.cols = cols;
                            cmd.formats.clear();
                        }
                    }
                    _ => return Err(Self::desync("RowDescription")),
                }
                if forward {
                    self.client.msg(tag, &body);
                }
            }
            b'D' => {
                let (scope, audit) = (self.scope, self.audit);
                let Some(step) = self.step() else {
                    return Err(Self::desync("DataRow"));
                };
                if !matches!(step.kind, Kind::Execute { .. } | Kind::Query) {
                    return Err(Self::desync("DataRow"));
                }
                prepare_cols(step);
                let out = match step.cmd.as_mut() {
                    Some(cmd) => mask_row(&body, cmd, scope, audit)?,
                    None => None,
                };
                match out {
                    Some(b) => self.client.msg(b'D', &b),
                    None => self.client.msg(b'D', &body),
                }
            }
            b'C' | b'I' | b's' => {
                let Some(step) = self.step() else {
                    return Err(Self::desync("CommandComplete"));
                };
                let is_exec = matches!(step.kind, Kind::Execute { .. });
                if !is_exec && !matches!(step.kind, Kind::Query) {
                    return Err(Self::desync("CommandComplete"));
                }
                if let Some(cmd) = step.cmd.as_mut() {
                    if tag == b'C' {
                        if let Some(n) = rows_of(&cstr_lossy(&body)) {
                            cmd.rows += n;
                        }
                    }
                    // The next statement of a simple query describes its own columns.
                    cmd.cols = None;
                }
                if is_exec {
                    self.finish_cur(None).await;
                }
                self.client.msg(tag, &body);
            }
            b'G' | b'H' | b'W' => {
                let scope = self.scope;
                let clear = scope.is_clear();
                let Some(step) = self.step() else {
                    return Err(Self::desync("CopyResponse"));
                };
                if tag == b'H' {
                    let binary = body.first() == Some(&1);
                    if binary && !clear {
                        return Err(End::Fatal(
                            "binary COPY out cannot be masked; use COPY … TO STDOUT in text or CSV format".into(),
                        ));
                    }
                    if let Some(cmd) = step.cmd.as_mut() {
                        if !clear {
                            cmd.copy = Some(scope.stream());
                        }
                    }
                }
                self.client.msg(tag, &body);
            }
            b'd' => {
                let audit = self.audit;
                let Some(step) = self.step() else {
                    return Err(Self::desync("CopyData"));
                };
                let out = match step.cmd.as_mut() {
                    Some(cmd) => copy_data(cmd, &body, audit),
                    None => None,
                };
                match out {
                    Some(o) if !o.is_empty() => self.client.msg(b'd', o.as_bytes()),
                    Some(_) => {}
                    None => self.client.msg(b'd', &body),
                }
            }
            b'c' => {
                if let Some(cmd) = self.step().and_then(|s| s.cmd.as_mut()) {
                    if let Some(mut m) = cmd.copy.take() {
                        let rest = m.finish(&mut cmd.stats);
                        if !rest.is_empty() {
                            excerpt_text(cmd, &rest);
                            self.client.msg(b'd', rest.as_bytes());
                        }
                    }
                }
                self.client.msg(b'c', &body);
            }
            b'V' => self.client.msg(b'V', &body),
            t => {
                return Err(End::Fatal(format!(
                    "unexpected message '{}' from the server",
                    t as char
                )))
            }
        }
        Ok(())
    }
}

/// Resolve a RowDescription's columns to real table and column names.
async fn columns(r: &Relay<'_>, body: &[u8]) -> Result<Cols, End> {
    let mut b = Body::new(body);
    let n = b.i16().map_err(End::from)?.max(0) as usize;
    let mut raw = Vec::with_capacity(n);
    for _ in 0..n {
        let name = b.cstr()?;
        let table = b.i32()? as u32;
        let attnum = b.i16()?;
        let type_oid = b.i32()? as u32;
        let _size = b.i16()?;
        let _modifier = b.i32()?;
        let format = b.i16()?;
        raw.push((name, table, attnum, type_oid, format));
    }
    let mut oids: Vec<u32> = raw.iter().map(|c| c.1).filter(|o| *o != 0).collect();
    oids.sort_unstable();
    oids.dedup();
    let tables = if oids.is_empty() {
        HashMap::new()
    } else {
        r.catalog
            .tables(&r.target, &oids)
            .await
            .map_err(|e| End::Fatal(format!("cannot resolve result columns for masking: {e}")))?
    };
    Ok(Arc::new(
        raw.into_iter()
            .map(|(label, table, attnum, type_oid, format)| {
                let t = tables.get(&table);
                Col {
                    table: t.filter(|t| !t.name.is_empty()).map(|t| t.name.clone()),
                    name: t
                        .and_then(|t| t.columns.get(&attnum).cloned())
                        .unwrap_or(label),
                    type_oid,
                    format,
                }
            })
            .collect(),
    ))
}

/// A binary parameter for the audit record: numbers and booleans decoded, the rest described.
fn binary_param(oid: u32, v: &[u8]) -> String {
    match (oid, v.len()) {
        (16, 1) => (v[0] != 0).to_string(),
        (21, 2) => i16::from_be_bytes([v[0], v[1]]).to_string(),
        (23, 4) => i32::from_be_bytes([v[0], v[1], v[2], v[3]]).to_string(),
        (20, 8) => i64::from_be_bytes(v.try_into().unwrap_or([0; 8])).to_string(),
        (700, 4) => f32::from_be_bytes([v[0], v[1], v[2], v[3]]).to_string(),
        (701, 8) => f64::from_be_bytes(v.try_into().unwrap_or([0; 8])).to_string(),
        _ => format!("<binary {} bytes>", v.len()),
    }
}

/// Give an Execute step's command the columns and formats its rows have.
fn prepare_cols(step: &mut Step) {
    let Kind::Execute { portal: Some(p) } = &step.kind else {
        return;
    };
    let Some(cmd) = step.cmd.as_mut() else { return };
    if cmd.cols.is_some() {
        return;
    }
    let cols = p
        .cols
        .lock()
        .clone()
        .or_else(|| p.stmt.as_ref().and_then(|s| s.cols.lock().clone()));
    cmd.cols = cols;
    cmd.formats = p.formats.clone();
}

fn format_of(cmd: &Cmd, i: usize) -> i16 {
    match cmd.formats.len() {
        0 => cmd
            .cols
            .as_ref()
            .and_then(|c| c.get(i))
            .map(|c| c.format)
            .unwrap_or(0),
        1 => cmd.formats[0],
        _ => cmd.formats.get(i).copied().unwrap_or(0),
    }
}

/// Mask one DataRow; returns the new body when a value changed. Also counts the row and
/// appends it (masked) to the command's excerpt while the caps allow.
fn mask_row(
    body: &[u8],
    cmd: &mut Cmd,
    scope: Scope<'_>,
    audit: Scope<'_>,
) -> Result<Option<BytesMut>, End> {
    cmd.data_rows += 1;
    cmd.bytes += body.len() as u64;
    let clear = scope.is_clear();
    let want_excerpt = !cmd.truncated;
    if clear && !want_excerpt {
        return Ok(None);
    }
    let mut b = Body::new(body);
    let n = b.i16()?.max(0) as usize;
    let mut out: Vec<Option<Option<Vec<u8>>>> = Vec::with_capacity(n);
    let mut changed = false;
    let mut line = String::new();
    let mut scratch = Stats::default();
    for i in 0..n {
        let v = b.value()?;
        let col = cmd.cols.as_ref().and_then(|c| c.get(i)).cloned();
        let fmt = format_of(cmd, i);
        let textual = fmt == 0 || col.as_ref().is_some_and(|c| text_like(c.type_oid));
        let colref = col.as_ref().map(|c| (c.table.as_deref(), c.name.as_str()));
        // What the client gets instead of this value (Some(None): NULL), and what the
        // excerpt shows (None: NULL).
        let mut replaced: Option<Option<Vec<u8>>> = None;
        let mut shown: Option<String> = None;
        if let Some(v) = v {
            let (prefix, payload) =
                if fmt != 0 && col.as_ref().is_some_and(|c| c.type_oid == 3802) && !v.is_empty() {
                    (&v[..1], &v[1..])
                } else {
                    (&v[..0], v)
                };
            if textual {
                let s = String::from_utf8_lossy(payload);
                if !clear {
                    match scope.mask_value(colref, &s, &mut cmd.stats) {
                        Masked::Unchanged => {
                            if want_excerpt {
                                shown = Some(s.into_owned());
                            }
                        }
                        Masked::Text(t) => {
                            let mut nv = prefix.to_vec();
                            nv.extend_from_slice(t.as_bytes());
                            replaced = Some(Some(nv));
                            shown = Some(t);
                        }
                        Masked::Null => replaced = Some(None),
                    }
                } else if want_excerpt {
                    shown = match audit.mask_value(colref, &s, &mut scratch) {
                        Masked::Unchanged => Some(s.into_owned()),
                        Masked::Text(t) => Some(t),
                        Masked::Null => None,
                    };
                }
            } else {
                // Binary and not text-like: a column rule turns it into NULL.
                let (sc, stats) = if clear {
                    (audit, &mut scratch)
                } else {
                    (scope, &mut cmd.stats)
                };
                if sc.mask_value(colref, "", stats) != Masked::Unchanged {
                    if !clear {
                        replaced = Some(None);
                    }
                } else {
                    shown = Some(format!("<binary {} bytes>", v.len()));
                }
            }
        }
        if want_excerpt {
            if i > 0 {
                line.push('\t');
            }
            line.push_str(shown.as_deref().unwrap_or("\\N"));
        }
        changed |= replaced.is_some();
        out.push(replaced);
    }
    if want_excerpt {
        line.push('\n');
        excerpt_text(cmd, &line);
    }
    if !changed {
        return Ok(None);
    }
    // Rebuild the row with the replaced values.
    let mut b = Body::new(body);
    let _ = b.i16()?;
    let mut nb = BytesMut::with_capacity(body.len() + 32);
    nb.put_i16(n as i16);
    for r in out {
        let orig = b.value()?;
        let v = match r {
            Some(x) => x,
            None => orig.map(|o| o.to_vec()),
        };
        match v {
            None => nb.put_i32(-1),
            Some(v) => {
                nb.put_i32(v.len() as i32);
                nb.put_slice(&v);
            }
        }
    }
    Ok(Some(nb))
}

/// Append to the excerpt within the caps, marking truncation.
fn excerpt_text(cmd: &mut Cmd, text: &str) {
    if cmd.truncated {
        return;
    }
    if cmd.excerpt_rows >= cmd.rows_cap || cmd.excerpt.len() + text.len() > cmd.bytes_cap {
        cmd.truncated = true;
        return;
    }
    cmd.excerpt.push_str(text);
    cmd.excerpt_rows += text.matches('\n').count().max(1);
}

/// Mask COPY out data; returns the text to send (None: send as is).
fn copy_data(cmd: &mut Cmd, body: &[u8], audit: Scope<'_>) -> Option<String> {
    cmd.bytes += body.len() as u64;
    let s = String::from_utf8_lossy(body);
    match cmd.copy.as_mut() {
        Some(m) => {
            let out = m.push(&s, &mut cmd.stats);
            excerpt_text(cmd, &out);
            Some(out)
        }
        None => {
            if !cmd.truncated {
                let mut scratch = Stats::default();
                let masked = audit.mask_text(&s, &mut scratch).into_owned();
                excerpt_text(cmd, &masked);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_core::mask::{MaskConfig, Masker};

    fn cmd(cols: Option<Cols>, formats: Vec<i16>) -> Cmd {
        let mut c = Cmd::new("c".into(), 2, 1024);
        c.cols = cols;
        c.formats = formats;
        c
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
        b.to_vec()
    }

    fn masker() -> Masker {
        let cfg: MaskConfig = toml::from_str(
            "columns = [ { pattern = \"users.ssn\", strategy = \"null\" } ]\nexempt = [ { connection = \"c\", groups = [\"dba\"] } ]",
        )
        .unwrap();
        Masker::new(&cfg).unwrap()
    }

    fn col(table: Option<&str>, name: &str, type_oid: u32) -> Col {
        Col {
            table: table.map(String::from),
            name: name.into(),
            type_oid,
            format: 0,
        }
    }

    #[test]
    fn data_rows_are_masked_value_by_value_and_excerpted() {
        let m = masker();
        let scope = m.scope("c", &[]);
        let cols = Arc::new(vec![
            col(Some("public.users"), "email", 25),
            col(Some("public.users"), "ssn", 25),
            col(None, "n", 23),
        ]);
        let mut c = cmd(Some(cols.clone()), vec![]);
        let body = row(&[Some(b"ada@example.com"), Some(b"123-45-6789"), Some(b"7")]);
        let out = mask_row(&body, &mut c, scope, m.audit_scope())
            .ok()
            .flatten()
            .expect("changed");
        let mut b = Body::new(&out);
        assert_eq!(b.i16().unwrap(), 3);
        assert_eq!(b.value().unwrap(), Some(&b"[REDACTED:email]"[..]));
        assert_eq!(b.value().unwrap(), None);
        assert_eq!(b.value().unwrap(), Some(&b"7"[..]));
        assert_eq!(c.stats.total(), 2);
        assert_eq!(c.excerpt, "[REDACTED:email]\t\\N\t7\n");
        // Binary results: an int column under a rule becomes NULL, text-like is masked.
        let mut c = cmd(Some(cols), vec![1]);
        let body = row(&[
            Some(b"bob@example.org"),
            Some(&[0, 0, 0, 1]),
            Some(&[0, 0, 0, 7]),
        ]);
        let out = mask_row(&body, &mut c, scope, m.audit_scope())
            .ok()
            .flatten()
            .expect("changed");
        let mut b = Body::new(&out);
        b.i16().unwrap();
        assert_eq!(b.value().unwrap(), Some(&b"[REDACTED:email]"[..]));
        assert_eq!(b.value().unwrap(), None);
        assert_eq!(b.value().unwrap(), Some(&[0u8, 0, 0, 7][..]));
        // An exempt scope passes values through but the excerpt is still masked; caps hold.
        let clear = m.scope("c", &["dba".to_string()]);
        let mut c = cmd(None, vec![]);
        for _ in 0..3 {
            let body = row(&[Some(b"ada@example.com")]);
            assert!(mask_row(&body, &mut c, clear, m.audit_scope())
                .unwrap()
                .is_none());
        }
        assert_eq!(c.excerpt, "[REDACTED:email]\n[REDACTED:email]\n");
        assert!(c.truncated);
        assert_eq!(c.data_rows, 3);
    }

    #[test]
    fn command_tags_give_row_counts() {
        assert_eq!(rows_of("SELECT 5"), Some(5));
        assert_eq!(rows_of("INSERT 0 3"), Some(3));
        assert_eq!(rows_of("COPY 262144"), Some(262_144));
        assert_eq!(rows_of("CREATE TABLE"), None);
    }

    proptest::proptest! {
        /// A malformed DataRow from a (hostile or broken) server is an error, never a panic.
        #[test]
        fn arbitrary_data_rows_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256), fmt in 0i16..2) {
            let m = masker();
            let cols = Arc::new(vec![col(Some("public.users"), "ssn", 23), col(None, "x", 3802)]);
            let mut c = cmd(Some(cols), vec![fmt]);
            let _ = mask_row(&data, &mut c, m.scope("c", &[]), m.audit_scope());
        }
    }
}
