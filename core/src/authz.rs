//! Authorization: one Cedar decision per classified action, with approval requirements.
//!
//! ```text
//!  identity + groups ─┐
//!  connection ────────┼─▶ Cedar request (schema-checked) ─▶ Authorizer ─▶ Decision
//!  action + context ──┘                                      │
//!                       determining permit has @approval(…) ─┴─▶ NeedsApproval
//! ```
//!
//! Fail closed: a request the schema rejects, a policy that errors while evaluating, or a
//! malformed `@approval` annotation all deny, and the reason says which.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicySet, Request, RestrictedExpression,
};

use crate::policy;

/// Who is asking.
#[derive(Debug, Clone)]
pub struct Principal<'a> {
    pub identity: &'a str,
    pub groups: &'a [String],
}

/// What they ask about.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub connection: &'a str,
    pub kind: &'a str,
    pub environment: Option<&'a str>,
}

/// A context attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bool(bool),
    Set(Vec<String>),
}

/// What a permit annotated `@approval("group=dba,quorum=2,timeout=15m,reason=required")` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequirement {
    pub group: String,
    pub quorum: u32,
    pub timeout: Duration,
    pub reason_required: bool,
}

impl FromStr for ApprovalRequirement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut req = ApprovalRequirement {
            group: String::new(),
            quorum: 1,
            timeout: Duration::from_secs(900),
            reason_required: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match k.trim() {
                "group" => req.group = v.trim().to_string(),
                "quorum" => {
                    req.quorum = v
                        .trim()
                        .parse()
                        .map_err(|_| format!("quorum `{v}` is not a number"))?;
                    if req.quorum == 0 || req.quorum > 10 {
                        return Err("quorum must be between 1 and 10".into());
                    }
                }
                "timeout" => req.timeout = parse_duration(v.trim())?,
                "reason" => req.reason_required = v.trim() == "required",
                other => {
                    return Err(format!(
                        "unknown key `{other}` (use group, quorum, timeout, reason)"
                    ))
                }
            }
        }
        if req.group.is_empty() {
            return Err("`group=` is required".into());
        }
        Ok(req)
    }
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("timeout `{v}` must look like 30s, 15m or 2h"))?;
    let secs = match unit {
        "s" => n,
        "m" | "" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("timeout `{v}` must look like 30s, 15m or 2h")),
    };
    if secs == 0 || secs > 24 * 3600 {
        return Err("timeout must be between 1 s and 24 h".into());
    }
    Ok(Duration::from_secs(secs))
}

/// The outcome for one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        policies: Vec<String>,
    },
    /// `policies` are the forbids that fired (empty when nothing permitted the action).
    Deny {
        policies: Vec<String>,
        reason: String,
    },
    NeedsApproval {
        policies: Vec<String>,
        requirement: ApprovalRequirement,
    },
}

/// Check every `@approval` annotation of a validated set; a malformed one is an error at apply time.
pub fn check_annotations(set: &PolicySet) -> Result<(), Vec<String>> {
    let errors: Vec<String> = set
        .policies()
        .filter_map(|p| {
            let a = p.annotation("approval")?;
            a.parse::<ApprovalRequirement>()
                .err()
                .map(|e| format!("policy {}: @approval(\"{a}\"): {e}", p.id()))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// A policy set ready to answer requests.
#[derive(Debug)]
pub struct Engine {
    set: PolicySet,
    pub version: u64,
    /// Schema-validated entity sets by (identity, groups, connection, kind, environment): they do
    /// not depend on the action or the context, and building them is most of a decision's cost.
    entities: parking_lot::Mutex<HashMap<EntityKey, std::sync::Arc<Entities>>>,
    /// Request shapes the schema accepted.
    shapes: parking_lot::Mutex<HashSet<Shape>>,
    /// Decisions by the SHA-256 of everything they depend on (see [`decision_key`]). A Cedar
    /// decision is a pure function of the policy set (this engine), the entities and the
    /// request, so a repeated request gets the same answer without evaluating the policies
    /// again. Keyed by a digest so the cache keeps no request text, and a collision-resistant
    /// one so no crafted request can take another's decision.
    decisions: parking_lot::Mutex<HashMap<[u8; 32], Decision>>,
    /// Every string in the policy set's JSON form (values and keys), to tell which context
    /// attributes it can read (see [`Engine::reads`]); `None` when it could not be written out,
    /// and then every attribute counts as read.
    names: Option<HashSet<String>>,
}

/// Identity, groups, connection, kind, environment, and the tool of an `mcp:call`.
type EntityKey = (
    String,
    Vec<String>,
    String,
    String,
    Option<String>,
    Option<String>,
);
/// An action and its context's attribute names and value types.
type Shape = (String, Vec<(String, u8)>);

/// Entity sets kept per engine before the cache is emptied.
const ENTITY_CACHE_MAX: usize = 4096;
/// Decisions kept per engine before the cache is emptied.
const DECISION_CACHE_MAX: usize = 16_384;

/// The digest of everything a decision depends on besides the policy set: who, the target,
/// the action and the context, each length-prefixed so no two inputs encode alike.
fn decision_key(
    who: &Principal<'_>,
    target: &Target<'_>,
    action: &str,
    context: &[(&str, Value)],
    reads: impl Fn(&str) -> bool,
) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut put = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(who.identity.as_bytes());
    put(&(who.groups.len() as u64).to_le_bytes());
    for g in who.groups {
        put(g.as_bytes());
    }
    put(target.connection.as_bytes());
    put(target.kind.as_bytes());
    match target.environment {
        None => put(b"-"),
        Some(e) => {
            put(b"+");
            put(e.as_bytes());
        }
    }
    put(action.as_bytes());
    put(&(context.len() as u64).to_le_bytes());
    for (k, v) in context {
        put(k.as_bytes());
        if !reads(k) {
            // No policy can see this value, so it cannot change the decision: requests that
            // differ only here (a statement's text, say) share one.
            put(b"_");
            continue;
        }
        match v {
            Value::Str(s) => {
                put(b"s");
                put(s.as_bytes());
            }
            Value::Bool(b) => put(if *b { b"t" } else { b"f" }),
            Value::Set(items) => {
                put(b"S");
                put(&(items.len() as u64).to_le_bytes());
                for i in items {
                    put(i.as_bytes());
                }
            }
        }
    }
    h.finalize().into()
}

/// Collect every string of a JSON value: string values and object keys.
fn json_strings(v: &serde_json::Value, out: &mut HashSet<String>) {
    match v {
        serde_json::Value::String(s) => {
            out.insert(s.clone());
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_strings(i, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                json_strings(v, out);
            }
        }
        _ => {}
    }
}

impl Clone for Engine {
    fn clone(&self) -> Self {
        Engine {
            set: self.set.clone(),
            version: self.version,
            entities: Default::default(),
            shapes: Default::default(),
            decisions: Default::default(),
            names: self.names.clone(),
        }
    }
}

fn uid(ty: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(ty).expect("static type name"),
        EntityId::new(id),
    )
}

fn expr(v: &Value) -> RestrictedExpression {
    match v {
        Value::Str(s) => RestrictedExpression::new_string(s.clone()),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Set(items) => RestrictedExpression::new_set(
            items
                .iter()
                .map(|s| RestrictedExpression::new_string(s.clone())),
        ),
    }
}

impl Engine {
    /// Validate `text` against the schema and its annotations. Version 0 with empty text denies all.
    pub fn new(text: &str, version: u64) -> Result<Engine, Vec<String>> {
        let v = policy::validate(text).map_err(|e| {
            e.problems
                .iter()
                .map(|p| format!("line {}, column {}: {}", p.line, p.column, p.message))
                .collect::<Vec<_>>()
        })?;
        check_annotations(&v.set)?;
        let names = v.set.clone().to_json().ok().map(|j| {
            let mut names = HashSet::new();
            json_strings(&j, &mut names);
            names
        });
        Ok(Engine {
            names,
            set: v.set,
            version,
            entities: Default::default(),
            shapes: Default::default(),
            decisions: Default::default(),
        })
    }

    fn entities(
        &self,
        who: &Principal<'_>,
        target: &Target<'_>,
        principal: &EntityUid,
        tool: Option<&str>,
    ) -> Result<std::sync::Arc<Entities>, String> {
        let key: EntityKey = (
            who.identity.to_string(),
            who.groups.to_vec(),
            target.connection.to_string(),
            target.kind.to_string(),
            target.environment.map(str::to_string),
            tool.map(str::to_string),
        );
        if let Some(e) = self.entities.lock().get(&key) {
            return Ok(e.clone());
        }
        let parents: HashSet<EntityUid> =
            who.groups.iter().map(|g| uid("Custos::Group", g)).collect();
        let groups = who
            .groups
            .iter()
            .map(|g| Entity::new_no_attrs(uid("Custos::Group", g), HashSet::new()));
        let mut conn_attrs = HashMap::from([(
            "kind".to_string(),
            RestrictedExpression::new_string(target.kind.to_string()),
        )]);
        if let Some(env) = target.environment {
            conn_attrs.insert(
                "environment".into(),
                RestrictedExpression::new_string(env.to_string()),
            );
        }
        let conn_uid = uid("Custos::Connection", target.connection);
        // An MCP tool is a part of its connection and carries the connection's attributes, so
        // `resource in Custos::Connection::"…"` and `resource.environment` work for tool calls.
        let tool = tool
            .map(|t| {
                Entity::new(
                    uid("Custos::Tool", t),
                    conn_attrs.clone(),
                    HashSet::from([conn_uid.clone()]),
                )
                .map_err(|e| format!("bad tool entity: {e}"))
            })
            .transpose()?;
        let conn = Entity::new(conn_uid, conn_attrs, HashSet::new())
            .map_err(|e| format!("bad connection entity: {e}"))?;
        let entities = Entities::from_entities(
            groups
                .chain([Entity::new_no_attrs(principal.clone(), parents), conn])
                .chain(tool),
            Some(policy::schema()),
        )
        .map_err(|e| format!("entities rejected by the schema: {e}"))?;
        let entities = std::sync::Arc::new(entities);
        let mut cache = self.entities.lock();
        if cache.len() >= ENTITY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, entities.clone());
        Ok(entities)
    }

    /// Whether some policy can read the context attribute `attr`. Cedar reaches a record's
    /// attribute only by naming it in the policy (`context.text`, `context["text"]`, `context has
    /// text`, a record literal to compare with; there is no computed attribute name), and the
    /// JSON form writes every such name as a JSON string of its own, escapes resolved. So a
    /// policy set whose JSON holds no string equal to the name cannot read it. The same string
    /// anywhere else (a literal, a record key) counts as a read too: this errs only towards
    /// deciding again.
    pub fn reads(&self, attr: &str) -> bool {
        self.names.as_ref().is_none_or(|n| n.contains(attr))
    }

    /// Decide one action. `context` must carry every attribute the action's context type declares.
    pub fn authorize(
        &self,
        who: &Principal<'_>,
        target: &Target<'_>,
        action: &str,
        context: &[(&str, Value)],
    ) -> Decision {
        // `tool` names the resource of an `mcp:call` (see `evaluate`), so it always counts.
        let key = decision_key(who, target, action, context, |attr| {
            attr == "tool" || self.reads(attr)
        });
        if let Some(d) = self.decisions.lock().get(&key) {
            return d.clone();
        }
        let d = self.evaluate(who, target, action, context);
        let mut cache = self.decisions.lock();
        if cache.len() >= DECISION_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, d.clone());
        d
    }

    /// Decide one action with Cedar (what [`Engine::authorize`] caches).
    fn evaluate(
        &self,
        who: &Principal<'_>,
        target: &Target<'_>,
        action: &str,
        context: &[(&str, Value)],
    ) -> Decision {
        let deny = |reason: String| Decision::Deny {
            policies: vec![],
            reason,
        };
        if !policy::is_valid_action(action) {
            return deny(format!("unknown action {action}"));
        }
        let principal = uid("Custos::Identity", who.identity);
        // `mcp:call` is on the tool (`Custos::Tool::"<name>"`, in its connection); every other
        // action is on the connection.
        let tool = (action == "mcp:call").then(|| {
            context
                .iter()
                .find_map(|(k, v)| match (k, v) {
                    (&"tool", Value::Str(t)) => Some(t.as_str()),
                    _ => None,
                })
                .unwrap_or("")
        });
        let resource = match tool {
            Some(t) => uid("Custos::Tool", t),
            None => uid("Custos::Connection", target.connection),
        };
        let entities = match self.entities(who, target, &principal, tool) {
            Ok(e) => e,
            Err(reason) => return deny(reason),
        };
        let ctx = match Context::from_pairs(context.iter().map(|(k, v)| (k.to_string(), expr(v)))) {
            Ok(c) => c,
            Err(e) => return deny(format!("bad context: {e}")),
        };
        // The schema check of a request depends only on the action and the context's shape
        // (attribute names and value types): check each shape once, then trust it. Validating
        // every request cost ~25 µs per decision.
        let shape: Shape = (
            action.to_string(),
            context
                .iter()
                .map(|(k, v)| {
                    let t = match v {
                        Value::Str(_) => 0u8,
                        Value::Bool(_) => 1,
                        Value::Set(_) => 2,
                    };
                    (k.to_string(), t)
                })
                .collect(),
        );
        let known = self.shapes.lock().contains(&shape);
        let request = match Request::new(
            principal,
            uid("Custos::Action", action),
            resource,
            ctx,
            (!known).then(policy::schema),
        ) {
            Ok(r) => r,
            Err(e) => return deny(format!("request rejected by the schema: {e}")),
        };
        if !known {
            self.shapes.lock().insert(shape);
        }
        let resp = Authorizer::new().is_authorized(&request, &self.set, &entities);
        let policies: Vec<String> = resp.diagnostics().reason().map(|p| p.to_string()).collect();
        let errors: Vec<String> = resp.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            // An erroring forbid would silently not apply: refuse instead.
            return Decision::Deny {
                policies,
                reason: format!("policy evaluation failed: {}", errors.join("; ")),
            };
        }
        match resp.decision() {
            CedarDecision::Deny if policies.is_empty() => deny(format!(
                "no policy permits {action} on {}",
                target.connection
            )),
            CedarDecision::Deny => Decision::Deny {
                reason: format!("denied by policy {}", policies.join(", ")),
                policies,
            },
            CedarDecision::Allow => {
                let approval = policies.iter().find_map(|id| {
                    self.set
                        .annotation(&cedar_policy::PolicyId::new(id), "approval")
                });
                match approval.map(str::parse::<ApprovalRequirement>) {
                    None => Decision::Allow { policies },
                    Some(Ok(requirement)) => Decision::NeedsApproval {
                        policies,
                        requirement,
                    },
                    Some(Err(e)) => Decision::Deny {
                        policies,
                        reason: format!("malformed @approval annotation: {e}"),
                    },
                }
            }
        }
    }
}

/// The SQL context for one classified statement.
pub fn sql_context(s: &crate::classify::Statement) -> Vec<(&'static str, Value)> {
    vec![
        ("tables", Value::Set(s.tables.iter().cloned().collect())),
        (
            "functions",
            Value::Set(s.functions.iter().cloned().collect()),
        ),
        ("has_where", Value::Bool(s.has_where)),
        ("text", Value::Str(s.text.clone())),
        ("statement_kind", Value::Str(s.statement_kind.clone())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
@id("agents-read")
permit (principal in Custos::Group::"agents", action in Custos::Action::"sql:read", resource);
@id("dba-all")
permit (principal in Custos::Group::"dba", action in Custos::Action::"sql:all", resource);
@id("no-drop")
forbid (principal, action == Custos::Action::"sql:drop", resource);
@id("no-unbounded-delete")
forbid (principal, action == Custos::Action::"sql:delete", resource) when { !context.has_where };
@id("no-file-read")
forbid (principal, action in Custos::Action::"sql:all", resource) when { context.functions.contains("pg_read_file") };
@id("prod-writes-need-approval")
@approval("group=dba-leads,quorum=2,timeout=10m,reason=required")
permit (principal in Custos::Group::"agents", action in Custos::Action::"sql:write", resource)
when { resource has environment && resource.environment == "production" };
"#;

    fn decide(engine: &Engine, groups: &[&str], env: Option<&str>, sql: &str) -> Vec<Decision> {
        let groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
        let who = Principal {
            identity: "agent:reporter",
            groups: &groups,
        };
        let target = Target {
            connection: "prod-pg",
            kind: "postgres",
            environment: env,
        };
        crate::classify::classify(sql)
            .iter()
            .flat_map(|s| {
                let ctx = sql_context(s);
                s.actions
                    .iter()
                    .map(|a| engine.authorize(&who, &target, a, &ctx))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn reads_allowed_forbids_win_and_unpermitted_is_denied() {
        let e = Engine::new(POLICY, 1).unwrap();
        assert!(
            matches!(&decide(&e, &["agents"], None, "SELECT * FROM orders")[0], Decision::Allow { policies } if policies == &["agents-read"])
        );
        assert!(
            matches!(&decide(&e, &["dba"], None, "DROP TABLE orders")[0], Decision::Deny { policies, .. } if policies == &["no-drop"])
        );
        assert!(
            matches!(&decide(&e, &["dba"], None, "DELETE FROM orders")[0], Decision::Deny { policies, .. } if policies == &["no-unbounded-delete"])
        );
        assert!(matches!(
            &decide(&e, &["dba"], None, "DELETE FROM orders WHERE id = 1")[0],
            Decision::Allow { .. }
        ));
        assert!(
            matches!(&decide(&e, &["agents"], None, "SELECT pg_read_file('/etc/passwd')")[0], Decision::Deny { policies, .. } if policies == &["no-file-read"])
        );
        match &decide(&e, &["agents"], None, "INSERT INTO t VALUES (1)")[0] {
            Decision::Deny { policies, reason } => {
                assert!(policies.is_empty());
                assert!(reason.contains("no policy permits sql:insert"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // A CTE hiding a DELETE: the delete action is judged too.
        let ds = decide(
            &e,
            &["agents"],
            None,
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        );
        assert!(
            ds.iter().any(|d| matches!(d, Decision::Deny { .. })),
            "{ds:?}"
        );
    }

    #[test]
    fn cached_decisions_match_fresh_ones_and_keep_inputs_apart() {
        let e = Engine::new(POLICY, 1).unwrap();
        let cases: &[(&[&str], Option<&str>, &str)] = &[
            (&["agents"], None, "SELECT * FROM orders"),
            (&["dba"], None, "DROP TABLE orders"),
            (&["agents"], None, "DROP TABLE orders"),
            (&["dba"], None, "DELETE FROM orders"),
            (&["dba"], None, "DELETE FROM orders WHERE id = 1"),
            (&["agents"], Some("production"), "INSERT INTO t VALUES (1)"),
            (&["agents"], Some("staging"), "INSERT INTO t VALUES (1)"),
            (&["agents"], None, "INSERT INTO t VALUES (1)"),
            // Groups that concatenate alike must not share a decision.
            (&["agen", "ts"], None, "SELECT * FROM orders"),
        ];
        for (groups, env, sql) in cases {
            let fresh = decide(&Engine::new(POLICY, 1).unwrap(), groups, *env, sql);
            for _ in 0..3 {
                assert_eq!(
                    decide(&e, groups, *env, sql),
                    fresh,
                    "{groups:?} {env:?} {sql}"
                );
            }
        }
        assert!(matches!(
            &decide(&e, &["agen", "ts"], None, "SELECT * FROM orders")[0],
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn a_value_no_policy_reads_does_not_split_the_decision_cache() {
        // POLICY never names `text`: statements differing only in their text share a decision.
        let e = Engine::new(POLICY, 1).unwrap();
        assert!(!e.reads("text"));
        assert!(e.reads("has_where") && e.reads("functions"));
        for id in 0..50 {
            let sql = format!("SELECT abalance FROM orders WHERE aid = {id}");
            assert!(matches!(
                &decide(&e, &["agents"], None, &sql)[0],
                Decision::Allow { .. }
            ));
        }
        assert_eq!(e.decisions.lock().len(), 1);

        // Every way Cedar can name the attribute counts as reading it, escapes included, and
        // then each text is decided on its own.
        let reading = [
            r#"context.text like "*DROP*""#,
            r#"context["text"] like "*DROP*""#,
            r#"context["t\u{65}xt"] like "*DROP*""#,
            r#"context has text && context.text like "*DROP*""#,
        ];
        for cond in reading {
            let policy = format!(
                "{POLICY}\n@id(\"no-drop-text\")\nforbid (principal, action in Custos::Action::\"sql:all\", resource) when {{ {cond} }};"
            );
            let e = Engine::new(&policy, 2).unwrap_or_else(|errs| panic!("{cond}: {errs:?}"));
            assert!(e.reads("text"), "{cond}");
            assert!(matches!(
                &decide(&e, &["agents"], None, "SELECT 1 FROM orders")[0],
                Decision::Allow { .. }
            ));
            assert!(
                matches!(&decide(&e, &["agents"], None, "SELECT 'DROP' FROM orders")[0], Decision::Deny { policies, .. } if policies == &["no-drop-text"]),
                "{cond}"
            );
            assert_eq!(e.decisions.lock().len(), 2, "{cond}");
        }
    }

    #[test]
    fn annotated_permits_ask_for_approval() {
        let e = Engine::new(POLICY, 1).unwrap();
        match &decide(
            &e,
            &["agents"],
            Some("production"),
            "UPDATE orders SET x = 1 WHERE id = 2",
        )[0]
        {
            Decision::NeedsApproval {
                policies,
                requirement,
            } => {
                assert_eq!(policies, &["prod-writes-need-approval"]);
                assert_eq!(
                    requirement,
                    &ApprovalRequirement {
                        group: "dba-leads".into(),
                        quorum: 2,
                        timeout: Duration::from_secs(600),
                        reason_required: true
                    }
                );
            }
            d => panic!("{d:?}"),
        }
        // Outside production the annotated permit does not apply.
        assert!(matches!(
            &decide(
                &e,
                &["agents"],
                Some("staging"),
                "UPDATE orders SET x = 1 WHERE id = 2"
            )[0],
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn bad_annotations_and_unknown_actions_fail_closed() {
        let bad = "@approval(\"quorum=2\")\npermit(principal, action == Custos::Action::\"sql:select\", resource);";
        let errs = Engine::new(bad, 1).unwrap_err();
        assert!(errs[0].contains("group="), "{errs:?}");
        assert!("group=x,timeout=99d"
            .parse::<ApprovalRequirement>()
            .is_err());
        assert!("group=x,color=red".parse::<ApprovalRequirement>().is_err());
        let e = Engine::new(POLICY, 1).unwrap();
        let who = Principal {
            identity: "a",
            groups: &[],
        };
        let t = Target {
            connection: "c",
            kind: "postgres",
            environment: None,
        };
        assert!(matches!(
            e.authorize(&who, &t, "sql:nuke", &[]),
            Decision::Deny { .. }
        ));
        // A context missing required attributes is rejected by the schema: deny.
        match e.authorize(&who, &t, "sql:select", &[]) {
            Decision::Deny { reason, .. } => assert!(reason.contains("schema"), "{reason}"),
            d => panic!("{d:?}"),
        }
        // No policy at all denies everything.
        let empty = Engine::new("", 0).unwrap();
        assert!(matches!(
            &decide(&empty, &["dba"], None, "SELECT 1")[0],
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn an_mcp_tool_call_is_on_the_tool_which_is_in_its_connection() {
        let text = r#"
@id("tools-prod-agents")
permit (principal in Custos::Group::"agents", action in Custos::Action::"mcp:all",
        resource in Custos::Connection::"tools-prod");
@id("no-delete-repo")
forbid (principal, action == Custos::Action::"mcp:call", resource == Custos::Tool::"delete_repo");
@id("prod-deploy-dba-only")
forbid (principal, action == Custos::Action::"mcp:call", resource == Custos::Tool::"deploy")
when { resource has environment && resource.environment == "production" }
unless { principal in Custos::Group::"dba" };
"#;
        let e = Engine::new(text, 1).unwrap();
        let call = |groups: &[&str], conn: &str, env: Option<&str>, action: &str, tool: &str| {
            let groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
            let who = Principal {
                identity: "agent:ops",
                groups: &groups,
            };
            let target = Target {
                connection: conn,
                kind: "mcp",
                environment: env,
            };
            e.authorize(
                &who,
                &target,
                action,
                &[
                    ("tool", Value::Str(tool.into())),
                    ("arguments", Value::Str(String::new())),
                ],
            )
        };
        let prod = Some("production");
        assert!(matches!(
            call(&["agents"], "tools-prod", prod, "mcp:call", "search"),
            Decision::Allow { policies } if policies == ["tools-prod-agents"]
        ));
        assert!(matches!(
            call(&["agents"], "tools-prod", prod, "mcp:list", ""),
            Decision::Allow { .. }
        ));
        // The tool named as the resource; the connection-level permit does not save it.
        assert!(matches!(
            call(&["agents"], "tools-prod", prod, "mcp:call", "delete_repo"),
            Decision::Deny { policies, .. } if policies == ["no-delete-repo"]
        ));
        // The tool carries its connection's environment.
        assert!(matches!(
            call(&["agents"], "tools-prod", prod, "mcp:call", "deploy"),
            Decision::Deny { policies, .. } if policies == ["prod-deploy-dba-only"]
        ));
        assert!(matches!(
            call(&["agents", "dba"], "tools-prod", prod, "mcp:call", "deploy"),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            call(
                &["agents"],
                "tools-prod",
                Some("staging"),
                "mcp:call",
                "deploy"
            ),
            Decision::Allow { .. }
        ));
        // A tool of another connection is not in tools-prod.
        assert!(matches!(
            call(&["agents"], "tools-dev", None, "mcp:call", "search"),
            Decision::Deny { policies, .. } if policies.is_empty()
        ));
        // A tool is not a connection: a policy that says so can never apply and is refused.
        let errs = Engine::new(
            "permit (principal, action == Custos::Action::\"mcp:call\", resource is Custos::Connection);",
            2,
        )
        .unwrap_err();
        assert!(!errs.is_empty());
    }
}
