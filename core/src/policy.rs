//! The Cedar schema every custos policy is checked against, and policy validation.
//!
//! Policies are [Cedar](https://www.cedarpolicy.com/) text. Before the control plane stores a
//! policy set (and before an edge loads one) it goes through [`validate`]: the text must parse
//! *and* typecheck in strict mode against [`SCHEMA`]. That second step is the point of this
//! module: a typo in an action (`Custos::Action::"sql:selct"`), an entity type
//! (`Custos::Gruop`) or a context attribute (`context.has_wher`) is an error with a line and a
//! column, never a rule that silently never matches. For the same reason the two validator
//! *warnings* that mean "this policy can never apply to any request" (an impossible policy, or an
//! action scope that no principal/resource pair in the schema allows) are reported as errors
//! here; all other warnings are returned in [`ValidatedPolicies::warnings`].
//!
//! # Policy ids
//!
//! A policy may carry `@id("some-name")`. That name becomes the policy's id in the returned
//! [`cedar_policy::PolicySet`] (so an authorization response's `reason()` names it), and edges
//! name it in denials ("denied by policy `no-ddl`"). Ids must be unique and non-empty. A policy
//! without `@id` keeps Cedar's positional id `policy0`, `policy1`, … (its index in the text), which
//! shifts when policies are added above it, so give every policy that may deny something an
//! `@id`.
//!
//! Other annotations are kept as written; e.g. `@approval("group=dba,quorum=1,timeout=15m")` on a
//! permit is read by the control plane's approval flow, not by this module.
//!
//! # Empty text
//!
//! An empty text (or one holding only comments) is valid and holds 0 policies: Cedar denies
//! everything that no policy permits.
//!
//! # Other rules
//!
//! - Policy templates (`?principal`, `?resource`) are rejected: custos never links them, so they
//!   would never match.
//! - Expressions may nest at most about [`MAX_NESTING`] levels (brackets count
//!   4). Cedar's parser recurses without a guard (a deep enough text overflows the stack and
//!   aborts the process), and its typechecker, when its stack runs low, stops *without reporting
//!   an error*, so a typo deep in a long expression would pass. [`validate`] therefore rejects
//!   deeper text before Cedar sees it and runs Cedar on its own thread with a 64 MiB stack.
//! - Problems carry 1-based lines and columns; columns count characters, not bytes.
//!
//! The schema is described for policy authors in `docs/policy-schema.md`.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use cedar_policy::ffi::DetailedError;
use cedar_policy::{PolicyId, PolicySet, Schema, ValidationMode, ValidationWarning, Validator};

/// The Cedar schema (human-readable `.cedarschema` syntax) in namespace `Custos`.
///
/// Policies always use the namespaced names: `Custos::Identity`, `Custos::Group`,
/// `Custos::Connection`, `Custos::Action::"sql:select"`.
pub const SCHEMA: &str = r#"// custos policy schema. Everything lives in namespace `Custos`.
//
// Entities
//   Group                 a group of identities; groups may nest (`Group in [Group]`).
//   Identity in [Group]   a person, agent or service. `kind` is "human" | "agent" | "service";
//                         it is optional, so test it with `principal has kind && ...`.
//   Connection            a production system custos fronts. `kind` names the protocol/product
//                         ("postgres", "mysql", "ssh", "kubernetes", "http", "llm", "mcp");
//                         `environment` (e.g. "production", "staging") is optional, so test it
//                         with `resource has environment && resource.environment == "..."`.
//   Tool in [Connection]  an MCP tool, named as the server names it: the resource of mcp:call
//                         (`resource == Custos::Tool::"search"`). It is `in` its connection and
//                         carries the connection's `kind` and `environment`, so connection-level
//                         rules (`resource in Custos::Connection::"…"`) also cover tool calls.
//   Table / Route         parts of a connection (SQL tables, HTTP routes), declared
//                         `in [Connection]`; no request uses them as its resource: match tables
//                         and routes through the context (`context.tables`, `context.route`).
//
// Actions: every request names exactly one concrete action and its principal is an Identity.
// Its resource is a Connection, except for mcp:call, whose resource is the Tool called.
// Action groups (no requests name them; use `action in ...`):
//   sql:read  = select show explain          sql:write = insert update delete merge copy
//   sql:ddl   = drop truncate alter create   sql:all   = every sql:* action
//   k8s:read  = get list watch               k8s:write = create update patch delete
//   k8s:all   = every k8s:* action
//   http:read = GET HEAD OPTIONS             http:write = POST PUT PATCH DELETE
//   http:all  = every http:* action
//   ssh:all, llm:all, mcp:all = every action of that protocol
//
// Contexts: every attribute is required, and the edge always fills every one (an empty string
// or an empty set when it does not apply or is unknown), so policies never need `has` on
// context. A policy that reads a context attribute must restrict `action` to the protocol
// whose context has it (e.g. `action in Custos::Action::"sql:all"`).
namespace Custos {
  entity Group in [Group];
  entity Identity in [Group] { kind?: String };
  entity Connection { kind: String, environment?: String };
  entity Table in [Connection];
  entity Tool in [Connection] { kind: String, environment?: String };
  entity Route in [Connection];

  // SQL (PostgreSQL, MySQL).
  //   tables          every table the statement touches, as written, lower-cased
  //                   ("public.users", "users")
  //   functions       every function called, lower-cased ("pg_read_file", "now")
  //   has_where       true when the statement (UPDATE/DELETE) has a WHERE clause
  //   text            the statement text
  //   statement_kind  the parser's name for the statement ("select", "insert", ...;
  //                   "unparsed" when it could not be parsed)
  type SqlContext = {
    tables: Set<String>,
    functions: Set<String>,
    has_where: Bool,
    text: String,
    statement_kind: String,
  };

  // Kubernetes API.
  //   namespace    the namespace ("" for cluster-scoped resources)
  //   kind         the resource kind/plural ("pods", "deployments", "secrets")
  //   name         the object name ("" for list/watch/create)
  //   subresource  "exec", "log", "status", "portforward" ... ("" when none)
  type K8sContext = {
    "namespace": String,
    kind: String,
    name: String,
    subresource: String,
  };

  // SSH.
  //   command  the command line for ssh:exec ("" for shell, sftp, forward)
  type SshContext = {
    command: String,
  };

  // HTTP.
  //   path   the request path ("/v1/users/42")
  //   route  the matched route template ("/v1/users/{id}"; "" when none matched)
  //   query    the raw query string without "?" ("" when none)
  //   headers  selected request headers as "name: value" (names lower-case): content-type, and
  //            those the connection lists in its policy_headers option
  type HttpContext = {
    path: String,
    route: String,
    query: String,
    headers: Set<String>,
  };

  // LLM APIs.
  //   model             the requested model ("gpt-4o", "claude-sonnet-4")
  //   tools             names of the tools offered to the model
  //   prompt_detectors  names of the detectors that fired on the prompt ("pii", "secret", ...)
  type LlmContext = {
    model: String,
    tools: Set<String>,
    prompt_detectors: Set<String>,
  };

  // MCP.
  //   tool       the tool name for mcp:call ("" for mcp:list)
  //   arguments  the call's arguments as JSON text ("" for mcp:list)
  type McpContext = {
    tool: String,
    arguments: String,
  };

  action "sql:all", "k8s:all", "ssh:all", "http:all", "llm:all", "mcp:all";
  action "sql:read", "sql:write", "sql:ddl" in ["sql:all"];
  action "k8s:read", "k8s:write" in ["k8s:all"];
  action "http:read", "http:write" in ["http:all"];

  action "sql:select", "sql:show", "sql:explain" in ["sql:read"]
    appliesTo { principal: [Identity], resource: [Connection], context: SqlContext };
  action "sql:insert", "sql:update", "sql:delete", "sql:merge", "sql:copy" in ["sql:write"]
    appliesTo { principal: [Identity], resource: [Connection], context: SqlContext };
  action "sql:drop", "sql:truncate", "sql:alter", "sql:create" in ["sql:ddl"]
    appliesTo { principal: [Identity], resource: [Connection], context: SqlContext };
  action "sql:grant", "sql:revoke", "sql:call", "sql:do", "sql:set", "sql:transaction",
         "sql:prepare", "sql:listen", "sql:notify", "sql:vacuum", "sql:lock", "sql:other",
         "sql:unparsed" in ["sql:all"]
    appliesTo { principal: [Identity], resource: [Connection], context: SqlContext };

  action "k8s:get", "k8s:list", "k8s:watch" in ["k8s:read"]
    appliesTo { principal: [Identity], resource: [Connection], context: K8sContext };
  action "k8s:create", "k8s:update", "k8s:patch", "k8s:delete" in ["k8s:write"]
    appliesTo { principal: [Identity], resource: [Connection], context: K8sContext };
  action "k8s:exec", "k8s:portforward" in ["k8s:all"]
    appliesTo { principal: [Identity], resource: [Connection], context: K8sContext };

  action "ssh:shell", "ssh:exec", "ssh:sftp", "ssh:forward" in ["ssh:all"]
    appliesTo { principal: [Identity], resource: [Connection], context: SshContext };

  action "http:GET", "http:HEAD", "http:OPTIONS" in ["http:read"]
    appliesTo { principal: [Identity], resource: [Connection], context: HttpContext };
  action "http:POST", "http:PUT", "http:PATCH", "http:DELETE" in ["http:write"]
    appliesTo { principal: [Identity], resource: [Connection], context: HttpContext };

  action "llm:chat", "llm:embeddings" in ["llm:all"]
    appliesTo { principal: [Identity], resource: [Connection], context: LlmContext };

  action "mcp:call" in ["mcp:all"]
    appliesTo { principal: [Identity], resource: [Tool], context: McpContext };
  action "mcp:list" in ["mcp:all"]
    appliesTo { principal: [Identity], resource: [Connection], context: McpContext };
}
"#;

/// Every concrete action an edge may put in a request (without the `Custos::Action::` prefix).
pub const ACTIONS: &[&str] = &[
    // SQL
    "sql:select",
    "sql:insert",
    "sql:update",
    "sql:delete",
    "sql:merge",
    "sql:drop",
    "sql:truncate",
    "sql:alter",
    "sql:create",
    "sql:grant",
    "sql:revoke",
    "sql:copy",
    "sql:call",
    "sql:do",
    "sql:set",
    "sql:show",
    "sql:transaction",
    "sql:prepare",
    "sql:explain",
    "sql:listen",
    "sql:notify",
    "sql:vacuum",
    "sql:lock",
    "sql:other",
    "sql:unparsed",
    // Kubernetes
    "k8s:get",
    "k8s:list",
    "k8s:watch",
    "k8s:create",
    "k8s:update",
    "k8s:patch",
    "k8s:delete",
    "k8s:exec",
    "k8s:portforward",
    // SSH
    "ssh:shell",
    "ssh:exec",
    "ssh:sftp",
    "ssh:forward",
    // HTTP
    "http:GET",
    "http:HEAD",
    "http:POST",
    "http:PUT",
    "http:PATCH",
    "http:DELETE",
    "http:OPTIONS",
    // LLM
    "llm:chat",
    "llm:embeddings",
    // MCP
    "mcp:call",
    "mcp:list",
];

/// Action groups: usable in policies as `action in Custos::Action::"sql:write"`, never as the
/// action of a request.
pub const ACTION_GROUPS: &[&str] = &[
    "sql:read",
    "sql:write",
    "sql:ddl",
    "sql:all",
    "k8s:read",
    "k8s:write",
    "k8s:all",
    "ssh:all",
    "http:read",
    "http:write",
    "http:all",
    "llm:all",
    "mcp:all",
];

/// True when `name` (e.g. `"sql:select"`, without the `Custos::Action::` prefix) is a concrete
/// action of the schema, i.e. one an edge may put in a request. Action groups are not.
pub fn is_valid_action(name: &str) -> bool {
    ACTIONS.contains(&name)
}

/// The parsed [`SCHEMA`] (parsed once).
pub fn schema() -> &'static Schema {
    static SCHEMA_CELL: OnceLock<Schema> = OnceLock::new();
    SCHEMA_CELL.get_or_init(|| {
        // The built-in schema is a constant; the `schema_parses` test proves it parses.
        let (schema, _warnings) =
            Schema::from_cedarschema_str(SCHEMA).expect("the built-in custos Cedar schema parses");
        schema
    })
}

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| Validator::new(schema().clone()))
}

/// One problem in a policy text: where Cedar points (1-based line and column; the column counts
/// characters, not bytes) and what is wrong (Cedar's message, then in parentheses its label, e.g.
/// "expected `,`", and its help text when it has them). A problem Cedar gives no location for points at line 1, column 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// Why a policy text was rejected: every problem found, in text order. `Display` writes one
/// problem per line as `line L, column C: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_problems(.problems))]
pub struct PolicyErrors {
    pub problems: Vec<PolicyProblem>,
}

fn display_problems(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A policy text that parsed and validated against [`SCHEMA`].
#[derive(Debug, Clone)]
pub struct ValidatedPolicies {
    /// The policies, keyed by their ids (`@id` when present, else `policyN`).
    pub set: PolicySet,
    /// How many policies `set` holds.
    pub count: usize,
    /// Every policy's id, in text order.
    pub ids: Vec<String>,
    /// Non-fatal validator warnings (e.g. mixed-script or confusable identifiers).
    pub warnings: Vec<PolicyProblem>,
}

/// Parse `text` as a Cedar policy set and validate it (strict mode) against [`SCHEMA`].
///
/// See the module documentation for ids, annotations and which warnings count as errors.
pub fn validate(text: &str) -> Result<ValidatedPolicies, PolicyErrors> {
    if let Some(problem) = check_nesting(text) {
        return Err(PolicyErrors {
            problems: vec![problem],
        });
    }
    // Cedar's parser recurses on nesting without a guard, and its typechecker silently gives up
    // (reporting no error) when the stack runs low, so parse and validate on a thread whose
    // stack is far larger than `MAX_NESTING` needs, whatever the caller's stack is.
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("custos-policy-validate".to_string())
            .stack_size(VALIDATION_STACK)
            .spawn_scoped(scope, || validate_on_this_thread(text));
        match worker {
            Ok(worker) => match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            },
            Err(e) => Err(PolicyErrors {
                problems: vec![problem_at(
                    text,
                    None,
                    format!("could not start the policy validation thread: {e}"),
                )],
            }),
        }
    })
}

/// The stack of the validation thread (reserved address space; only touched pages are used).
const VALIDATION_STACK: usize = 64 << 20;

/// The deepest expression a policy may hold, as estimated by [`check_nesting`]. Realistic
/// policies stay below 30; the limit keeps Cedar's recursive parser, typechecker and evaluator
/// (which errors out, so a `forbid` would silently not apply) well inside their stacks.
pub const MAX_NESTING: usize = 128;

/// Each bracket level counts this much towards [`MAX_NESTING`] (brackets cost Cedar's parser
/// several stack frames each).
const BRACKET_WEIGHT: usize = 4;

fn validate_on_this_thread(text: &str) -> Result<ValidatedPolicies, PolicyErrors> {
    let parsed = match PolicySet::from_str(text) {
        Ok(set) => set,
        Err(errors) => {
            let problems = errors
                .iter()
                .map(|e| problem_from(text, &DetailedError::from(e)))
                .collect();
            return Err(PolicyErrors {
                problems: finish(problems),
            });
        }
    };

    let marks = scan(text);
    let mut problems = Vec::new();

    // Templates (`?principal`/`?resource` slots) are never instantiated by custos, so a template
    // would be a rule that never matches.
    if parsed.templates().next().is_some() {
        let slots: Vec<&Mark> = marks.iter().filter(|m| m.kind == MarkKind::Slot).collect();
        if slots.is_empty() {
            problems.push(problem_at(text, None, TEMPLATE_MESSAGE.to_string()));
        }
        for slot in slots {
            problems.push(problem_at(
                text,
                Some(slot.offset),
                format!("`?{}`: {TEMPLATE_MESSAGE}", slot.name),
            ));
        }
    }

    // Static policies in text order (Cedar numbers them policy0, policy1, ... in text order,
    // counting templates too).
    let mut policies: Vec<&cedar_policy::Policy> = parsed.policies().collect();
    policies.sort_by_key(|p| positional_index(p.id().as_ref()));

    // `@id` annotations in text order; the k-th one belongs to the k-th policy that has one.
    let id_marks: Vec<usize> = marks
        .iter()
        .filter(|m| m.kind == MarkKind::Annotation && m.name == "id")
        .map(|m| m.offset)
        .collect();
    let annotated = policies
        .iter()
        .filter(|p| p.annotation("id").is_some())
        .count();
    let id_offset = |k: usize| {
        if id_marks.len() == annotated {
            id_marks.get(k).copied()
        } else {
            None
        }
    };

    // (final id, offset of its `@id` when it has one)
    let mut ids: Vec<(String, Option<usize>)> = Vec::with_capacity(policies.len());
    let mut k = 0;
    for p in &policies {
        match p.annotation("id") {
            Some(id) => {
                let offset = id_offset(k);
                k += 1;
                if id.trim().is_empty() {
                    problems.push(problem_at(
                        text,
                        offset,
                        "`@id` must be a non-empty name, e.g. `@id(\"no-ddl\")`".to_string(),
                    ));
                }
                ids.push((id.to_string(), offset));
            }
            None => ids.push((p.id().to_string(), None)),
        }
    }
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, (id, offset)) in ids.iter().enumerate() {
        if id.trim().is_empty() {
            continue;
        }
        if let Some(&j) = seen.get(id.as_str()) {
            let first = describe_policy(text, j, ids[j].1);
            let second = describe_policy(text, i, *offset);
            problems.push(problem_at(
                text,
                offset.or(ids[j].1),
                format!(
                    "duplicate policy id `{id}`: used by {first} and by {second}; policy ids must be unique"
                ),
            ));
        } else {
            seen.insert(id, i);
        }
    }

    // Re-key the set by the final ids so that validation messages and authorization reasons name
    // `@id`s. When ids are broken, validate the set as parsed to still report every problem.
    let (set, rekeyed) = if problems.is_empty() {
        let mut set = PolicySet::new();
        let mut failed = None;
        for (p, (id, _)) in policies.iter().zip(&ids) {
            if let Err(e) = set.add(p.new_id(PolicyId::new(id.as_str()))) {
                failed = Some(e.to_string());
                break;
            }
        }
        match failed {
            None => (set, true),
            Some(message) => {
                problems.push(problem_at(text, None, message));
                (parsed.clone(), false)
            }
        }
    } else {
        (parsed.clone(), false)
    };

    let result = validator().validate(&set, ValidationMode::Strict);
    let mut failed: Vec<&PolicyId> = Vec::new();
    let mut errors = Vec::new();
    for e in result.validation_errors() {
        failed.push(e.policy_id());
        errors.push(problem_from(text, &DetailedError::from(e)));
    }
    problems.extend(merge_per_action(errors));
    let mut warnings = Vec::new();
    // One "can never apply" problem per policy, and none for a policy that already has an error
    // (an unknown action or type also makes the policy impossible).
    let (mut fatal, other): (Vec<&ValidationWarning>, Vec<&ValidationWarning>) = result
        .validation_warnings()
        .partition(|w| warning_is_fatal(w));
    fatal.sort_by_key(|w| !matches!(w, ValidationWarning::InvalidActionApplication(_)));
    for w in fatal {
        if !failed.contains(&w.policy_id()) {
            failed.push(w.policy_id());
            problems.push(problem_from(text, &DetailedError::from(w)));
        }
    }
    for w in other {
        warnings.push(problem_from(text, &DetailedError::from(w)));
    }

    if !problems.is_empty() || !rekeyed {
        return Err(PolicyErrors {
            problems: finish(problems),
        });
    }
    Ok(ValidatedPolicies {
        count: ids.len(),
        ids: ids.into_iter().map(|(id, _)| id).collect(),
        set,
        warnings: finish(warnings),
    })
}

const TEMPLATE_MESSAGE: &str = "policy templates (`?principal`/`?resource` slots) are not supported; write the entity (e.g. `principal in Custos::Group::\"dba\"`)";

/// The warnings that mean a policy can never apply to any request: a silently dead rule.
fn warning_is_fatal(w: &ValidationWarning) -> bool {
    matches!(
        w,
        ValidationWarning::ImpossiblePolicy(_) | ValidationWarning::InvalidActionApplication(_)
    )
}

/// `policyN` → N (Cedar's positional ids); anything else sorts last.
fn positional_index(id: &str) -> usize {
    id.strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn describe_policy(text: &str, index: usize, offset: Option<usize>) -> String {
    match offset {
        Some(offset) => {
            let (line, _) = line_column(text, offset);
            format!("policy #{} (line {line})", index + 1)
        }
        None => format!("policy #{} (no @id)", index + 1),
    }
}

/// Sort by position and drop exact duplicates (Cedar may report the same thing twice).
fn finish(mut problems: Vec<PolicyProblem>) -> Vec<PolicyProblem> {
    problems.sort_by(|a, b| (a.line, a.column, &a.message).cmp(&(b.line, b.column, &b.message)));
    problems.dedup();
    problems
}

const ACTION_MARK: &str = " for Custos::Action::\"";

/// Cedar typechecks a policy once per action it may apply to and reports an error for each
/// (e.g. `context.tables` in a policy whose `action` is unconstrained fails for every non-SQL
/// action). Fold such errors at one place into one problem that lists the actions.
fn merge_per_action(problems: Vec<PolicyProblem>) -> Vec<PolicyProblem> {
    struct Group {
        /// The message without the action and the help text (empty when not per-action).
        key: String,
        first: PolicyProblem,
        actions: Vec<String>,
    }
    let mut groups: Vec<Group> = Vec::new();
    for problem in problems {
        let Some((key, action)) = split_action(&problem.message) else {
            groups.push(Group {
                key: String::new(),
                first: problem,
                actions: Vec::new(),
            });
            continue;
        };
        let same = |g: &&mut Group| {
            !g.actions.is_empty()
                && g.key == key
                && (g.first.line, g.first.column) == (problem.line, problem.column)
        };
        match groups.iter_mut().find(same) {
            Some(group) => group.actions.push(action),
            None => groups.push(Group {
                key,
                first: problem,
                actions: vec![action],
            }),
        }
    }
    groups
        .into_iter()
        .map(|mut g| {
            if g.actions.len() < 2 {
                return g.first;
            }
            g.actions.sort();
            g.actions.dedup();
            let shown = g.actions.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
            let more = if g.actions.len() > 6 { ", ..." } else { "" };
            PolicyProblem {
                line: g.first.line,
                column: g.first.column,
                message: format!(
                    "{} for {} actions ({shown}{more}) (help: a condition that reads a context attribute must restrict `action` to actions whose context has it, e.g. `action in Custos::Action::\"sql:all\"`)",
                    g.key,
                    g.actions.len()
                ),
            }
        })
        .collect()
}

/// `... for Custos::Action::"k8s:get" not found (help: ...)` -> (`... not found`, `k8s:get`).
fn split_action(message: &str) -> Option<(String, String)> {
    let start = message.find(ACTION_MARK)?;
    let rest = &message[start + ACTION_MARK.len()..];
    let end = rest.find('"')?;
    let action = rest[..end].to_string();
    let mut key = format!("{}{}", &message[..start], &rest[end + 1..]);
    if let Some(help) = key.find(" (help: ") {
        key.truncate(help);
    }
    Some((key, action))
}

fn problem_from(text: &str, e: &DetailedError) -> PolicyProblem {
    let offset = first_offset(e);
    let mut message = one_line(&e.message);
    // the primary label says e.g. "expected `,`" for a parse error
    if let Some(label) = e
        .source_locations
        .first()
        .and_then(|l| l.label.as_deref())
        .map(one_line)
        .filter(|l| !l.is_empty() && !message.contains(l.as_str()))
    {
        message.push_str(" (");
        message.push_str(&label);
        message.push(')');
    }
    if let Some(help) = e.help.as_deref().map(one_line).filter(|h| !h.is_empty()) {
        message.push_str(" (help: ");
        message.push_str(&help);
        message.push(')');
    }
    problem_at(text, offset, message)
}

/// The start of the first labelled span, looking into related diagnostics when the error itself
/// has none.
fn first_offset(e: &DetailedError) -> Option<usize> {
    e.source_locations
        .first()
        .map(|l| l.loc.start)
        .or_else(|| e.related.iter().find_map(first_offset))
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn problem_at(text: &str, offset: Option<usize>, message: String) -> PolicyProblem {
    let (line, column) = offset.map_or((1, 1), |o| line_column(text, o));
    PolicyProblem {
        line,
        column,
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text` (clamped to the text).
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A token of Cedar text, as far as nesting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// A binary/unary operator; the number is its precedence level (0 binds loosest).
    Op(u8),
    Open,
    Close,
    /// `,` or `:` (separates sibling expressions).
    Sep,
    /// `;` (ends a policy).
    End,
    /// Anything else (names, literals, keywords that are not operators).
    Atom,
}

/// The highest precedence level `Tok::Op` uses (member access and unary operators).
const TOP_LEVEL: u8 = 6;

/// Split Cedar text into [`Tok`]s with their byte offsets, skipping comments and whitespace.
fn lex(text: &str) -> Vec<(Tok, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        let tok = match c {
            b'/' if next == Some(b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                Tok::Atom
            }
            c if c.is_ascii_alphanumeric() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                match &text[start..i] {
                    "if" | "then" | "else" => Tok::Op(0),
                    "in" | "has" | "like" | "is" => Tok::Op(3),
                    _ => Tok::Atom,
                }
            }
            _ => {
                let two = [c, next.unwrap_or(0)];
                let (tok, len) = match &two {
                    b"||" => (Tok::Op(1), 2),
                    b"&&" => (Tok::Op(2), 2),
                    b"==" | b"!=" | b"<=" | b">=" => (Tok::Op(3), 2),
                    b"::" => (Tok::Atom, 2),
                    _ => (
                        match c {
                            b'<' | b'>' => Tok::Op(3),
                            b'+' | b'-' => Tok::Op(4),
                            b'*' => Tok::Op(5),
                            b'!' | b'.' => Tok::Op(TOP_LEVEL),
                            b'(' | b'[' | b'{' => Tok::Open,
                            b')' | b']' | b'}' => Tok::Close,
                            b',' | b':' => Tok::Sep,
                            b';' => Tok::End,
                            _ => Tok::Atom,
                        },
                        1,
                    ),
                };
                // step over a whole UTF-8 character for non-ASCII atoms
                i += len;
                while i < bytes.len() && !text.is_char_boundary(i) {
                    i += 1;
                }
                tok
            }
        };
        out.push((tok, start));
    }
    out
}

/// An element of an expression for depth estimation: an operator or an operand of known depth.
#[derive(Debug, Clone, Copy)]
enum Item {
    Op(u8),
    Operand(usize),
}

/// Estimate of the AST depth of a flat sequence of operators and operands, assuming the
/// precedence levels of [`Tok::Op`]: a chain of `n` operators at one level nests `n` deep.
fn chain_depth(items: &[Item], level: u8) -> usize {
    if level > TOP_LEVEL {
        return items
            .iter()
            .map(|i| match i {
                Item::Operand(d) => *d,
                Item::Op(_) => 0,
            })
            .max()
            .unwrap_or(0);
    }
    let parts = items.split(|i| matches!(i, Item::Op(l) if *l == level));
    let mut ops = 0;
    let mut deepest = 0;
    for part in parts {
        ops += 1;
        deepest = deepest.max(chain_depth(part, level + 1));
    }
    ops - 1 + deepest
}

/// Read sibling expressions up to the matching close bracket (or the end of the policy) and
/// return the deepest one's estimated depth, or `Err(offset)` of a bracket nested too deeply.
fn group_depth(toks: &[(Tok, usize)], pos: &mut usize, brackets: usize) -> Result<usize, usize> {
    let mut deepest = 0;
    let mut element: Vec<Item> = Vec::new();
    while let Some(&(tok, offset)) = toks.get(*pos) {
        *pos += 1;
        match tok {
            Tok::Op(level) => element.push(Item::Op(level)),
            Tok::Atom => element.push(Item::Operand(1)),
            Tok::Open => {
                if (brackets + 1) * BRACKET_WEIGHT > MAX_NESTING {
                    return Err(offset);
                }
                let inner = group_depth(toks, pos, brackets + 1)?;
                element.push(Item::Operand(inner + BRACKET_WEIGHT));
            }
            Tok::Sep => {
                deepest = deepest.max(chain_depth(&element, 0));
                element.clear();
            }
            Tok::Close if brackets > 0 => break,
            Tok::Close | Tok::End => {}
        }
    }
    Ok(deepest.max(chain_depth(&element, 0)))
}

/// Reject text whose expressions nest deeper than [`MAX_NESTING`] (see [`validate`]).
fn check_nesting(text: &str) -> Option<PolicyProblem> {
    let toks = lex(text);
    for policy in toks.split(|(t, _)| *t == Tok::End) {
        let Some(&(_, start)) = policy.first() else {
            continue;
        };
        let mut pos = 0;
        let (offset, what) = match group_depth(policy, &mut pos, 0) {
            Ok(depth) if depth <= MAX_NESTING => continue,
            Ok(depth) => (start, format!("about {depth} levels")),
            Err(offset) => (
                offset,
                format!("more than {} brackets", MAX_NESTING / BRACKET_WEIGHT),
            ),
        };
        return Some(problem_at(
            text,
            Some(offset),
            format!(
                "expression nested too deeply ({what}; the limit is {MAX_NESTING}): split the policy, or use `containsAny`/`in [...]` instead of long `||` chains"
            ),
        ));
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkKind {
    /// `@name` (the offset is the `@`).
    Annotation,
    /// `?name` (the offset is the `?`).
    Slot,
}

#[derive(Debug)]
struct Mark {
    kind: MarkKind,
    offset: usize,
    name: String,
}

/// Find annotations and template slots in Cedar text, skipping `//` comments and string literals.
/// Only used on text Cedar already parsed, to point at `@id`s and slots (Cedar's API does not
/// expose policy locations).
fn scan(text: &str) -> Vec<Mark> {
    let bytes = text.as_bytes();
    let mut marks = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            c @ (b'@' | b'?') => {
                let offset = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if i > start {
                    marks.push(Mark {
                        kind: if c == b'@' {
                            MarkKind::Annotation
                        } else {
                            MarkKind::Slot
                        },
                        offset,
                        name: text[start..i].to_string(),
                    });
                }
            }
            _ => i += 1,
        }
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A realistic policy set: everything in it must validate.
    const REALISTIC: &str = r#"// Agents may read everywhere.
@id("agents-read")
permit(principal in Custos::Group::"agents", action in Custos::Action::"sql:read", resource);

// The exact namespaced form of a single action.
@id("ops-select")
permit(principal in Custos::Group::"ops", action == Custos::Action::"sql:select", resource)
when { resource.kind == "postgres" };

// No DROP/TRUNCATE anywhere, for anyone.
@id("no-drop-truncate")
forbid(
  principal,
  action in [Custos::Action::"sql:drop", Custos::Action::"sql:truncate"],
  resource
);

// No DELETE without WHERE.
@id("no-unbounded-delete")
forbid(principal, action == Custos::Action::"sql:delete", resource)
when { !context.has_where };

// No reading server files through SQL.
@id("no-pg-read-file")
forbid(principal, action in Custos::Action::"sql:all", resource)
when { context.functions.contains("pg_read_file") };

// Writes in production need a DBA's approval.
@id("prod-writes-need-dba")
@approval("group=dba,quorum=1,timeout=15m")
permit(principal in Custos::Group::"agents", action in Custos::Action::"sql:write", resource)
when { resource has environment && resource.environment == "production" };

// Human DBAs may run DDL outside production.
permit(principal in Custos::Group::"dba", action in Custos::Action::"sql:ddl", resource)
when {
  principal has kind && principal.kind == "human" &&
  !(resource has environment && resource.environment == "production")
};

// Kubernetes: read anything but secrets, exec only in the sandbox namespace.
@id("k8s-read-no-secrets")
permit(principal in Custos::Group::"agents", action in Custos::Action::"k8s:read", resource)
unless { context.kind == "secrets" };
@id("k8s-exec-sandbox")
permit(principal in Custos::Group::"agents", action == Custos::Action::"k8s:exec", resource)
when { context.namespace == "sandbox" && context.subresource == "exec" };

// SSH, HTTP, LLM, MCP.
@id("ssh-readonly-commands")
permit(principal, action == Custos::Action::"ssh:exec", resource == Custos::Connection::"bastion")
when { context.command like "systemctl status *" };
@id("http-get-users")
permit(principal, action in Custos::Action::"http:read", resource)
when { context.route == "/v1/users/{id}" && context.path like "/v1/users/*" };
@id("llm-no-secrets")
forbid(principal, action in Custos::Action::"llm:all", resource)
when { context.prompt_detectors.contains("secret") || context.tools.contains("shell") };
@id("llm-chat")
permit(principal, action == Custos::Action::"llm:chat", resource)
when { context.model == "claude-sonnet-4" };
@id("mcp-no-delete")
forbid(principal, action == Custos::Action::"mcp:call", resource)
when { context.tool == "delete_repo" || context.arguments like "*\"force\": true*" };
"#;

    fn errors(text: &str) -> Vec<PolicyProblem> {
        match validate(text) {
            Ok(v) => panic!(
                "expected errors, got {} valid policies: {:?}",
                v.count, v.ids
            ),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn schema_parses() {
        let (_, warnings) = Schema::from_cedarschema_str(SCHEMA).expect("schema parses");
        let warnings: Vec<String> = warnings.map(|w| w.to_string()).collect();
        assert!(warnings.is_empty(), "schema warnings: {warnings:?}");
        // and the cached copy is usable
        assert!(schema().action_entities().is_ok());
    }

    #[test]
    fn every_action_is_in_the_schema() {
        let ids: Vec<String> = schema()
            .actions()
            .map(|a| a.id().unescaped().to_string())
            .collect();
        for name in ACTIONS.iter().chain(ACTION_GROUPS) {
            assert!(
                ids.iter().any(|id| id == name),
                "{name} missing from schema"
            );
        }
        assert_eq!(ids.len(), ACTIONS.len() + ACTION_GROUPS.len(), "{ids:?}");
        for name in ACTIONS {
            assert!(is_valid_action(name));
            // each concrete action can be requested by an Identity on a Connection, except
            // mcp:call, which is on a Tool
            let resource = if *name == "mcp:call" {
                "Custos::Tool"
            } else {
                "Custos::Connection"
            };
            let text = format!(
                "permit(principal, action == Custos::Action::\"{name}\", resource is {resource});"
            );
            validate(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ACTION_GROUPS {
            assert!(!is_valid_action(name));
            let text =
                format!("permit(principal, action in Custos::Action::\"{name}\", resource);");
            validate(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(!is_valid_action("sql:selct"));
        assert!(!is_valid_action("Custos::Action::\"sql:select\""));
    }

    #[test]
    fn action_groups_contain_their_members() {
        let entities = schema().action_entities().expect("action entities");
        let group = |g: &str, member: &str| {
            let uid = |n: &str| {
                cedar_policy::EntityUid::from_str(&format!("Custos::Action::\"{n}\"")).unwrap()
            };
            entities.is_ancestor_of(&uid(g), &uid(member))
        };
        for m in ["sql:select", "sql:show", "sql:explain"] {
            assert!(group("sql:read", m), "{m}");
        }
        for m in [
            "sql:insert",
            "sql:update",
            "sql:delete",
            "sql:merge",
            "sql:copy",
        ] {
            assert!(group("sql:write", m), "{m}");
        }
        for m in ["sql:drop", "sql:truncate", "sql:alter", "sql:create"] {
            assert!(group("sql:ddl", m), "{m}");
        }
        assert!(!group("sql:read", "sql:delete"));
        for a in ACTIONS {
            let family = a.split(':').next().unwrap();
            assert!(group(&format!("{family}:all"), a), "{a}");
        }
    }

    #[test]
    fn realistic_policies_validate() {
        let v = validate(REALISTIC).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.count, 14);
        assert_eq!(v.set.policies().count(), 14);
        assert_eq!(
            v.ids,
            [
                "agents-read",
                "ops-select",
                "no-drop-truncate",
                "no-unbounded-delete",
                "no-pg-read-file",
                "prod-writes-need-dba",
                "policy6",
                "k8s-read-no-secrets",
                "k8s-exec-sandbox",
                "ssh-readonly-commands",
                "http-get-users",
                "llm-no-secrets",
                "llm-chat",
                "mcp-no-delete",
            ]
        );
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        let approval = v
            .set
            .annotation(&PolicyId::new("prod-writes-need-dba"), "approval");
        assert_eq!(approval, Some("group=dba,quorum=1,timeout=15m"));
        assert!(v.set.policy(&PolicyId::new("no-drop-truncate")).is_some());
    }

    /// The validated set works with Cedar's authorizer against the schema, and the `@id`s are the
    /// policy ids a response names.
    #[test]
    fn validated_set_authorizes_and_names_ids() {
        use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, Request};
        use serde_json::json;

        let v = validate(REALISTIC).unwrap_or_else(|e| panic!("{e}"));
        let entities = Entities::from_json_value(
            json!([
                {"uid": {"type": "Custos::Identity", "id": "bot"}, "attrs": {"kind": "agent"},
                 "parents": [{"type": "Custos::Group", "id": "agents"}]},
                {"uid": {"type": "Custos::Group", "id": "agents"}, "attrs": {}, "parents": []},
                {"uid": {"type": "Custos::Connection", "id": "prod-db"},
                 "attrs": {"kind": "postgres", "environment": "production"}, "parents": []},
            ]),
            Some(schema()),
        )
        .unwrap();
        let uid = |s: &str| EntityUid::from_str(s).unwrap();
        let sql = |action: &str, has_where: bool, functions: &[&str]| {
            let action = uid(&format!("Custos::Action::\"{action}\""));
            let context = Context::from_json_value(
                json!({
                    "tables": ["public.users"],
                    "functions": functions,
                    "has_where": has_where,
                    "text": "…",
                    "statement_kind": "select",
                }),
                Some((schema(), &action)),
            )
            .unwrap();
            let request = Request::new(
                uid("Custos::Identity::\"bot\""),
                action,
                uid("Custos::Connection::\"prod-db\""),
                context,
                Some(schema()),
            )
            .unwrap();
            let response = Authorizer::new().is_authorized(&request, &v.set, &entities);
            assert_eq!(response.diagnostics().errors().count(), 0);
            let mut reasons: Vec<String> = response
                .diagnostics()
                .reason()
                .map(ToString::to_string)
                .collect();
            reasons.sort();
            (response.decision(), reasons)
        };
        assert_eq!(
            sql("sql:select", false, &[]),
            (Decision::Allow, vec!["agents-read".to_string()])
        );
        assert_eq!(
            sql("sql:select", false, &["pg_read_file"]),
            (Decision::Deny, vec!["no-pg-read-file".to_string()])
        );
        assert_eq!(
            sql("sql:update", true, &[]),
            (Decision::Allow, vec!["prod-writes-need-dba".to_string()])
        );
        assert_eq!(
            sql("sql:delete", false, &[]),
            (Decision::Deny, vec!["no-unbounded-delete".to_string()])
        );
        assert_eq!(
            sql("sql:drop", true, &[]),
            (Decision::Deny, vec!["no-drop-truncate".to_string()])
        );
        assert_eq!(sql("sql:grant", true, &[]), (Decision::Deny, vec![]));
    }

    #[test]
    fn empty_text_is_valid() {
        for text in ["", "   \n", "// nothing yet\n"] {
            let v = validate(text).unwrap();
            assert_eq!(v.count, 0);
            assert!(v.ids.is_empty());
            assert_eq!(v.set.policies().count(), 0);
        }
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let text = "permit(principal, action, resource);\n\nforbid(principal, action resource);\n";
        let problems = errors(text);
        assert_eq!(problems[0].line, 3, "{problems:?}");
        assert_eq!(problems[0].column, 26, "{problems:?}");
        let shown = PolicyErrors {
            problems: problems.clone(),
        }
        .to_string();
        assert!(shown.starts_with("line 3, column 26: "), "{shown}");
    }

    #[test]
    fn action_typo_is_an_error_with_location() {
        let text = "permit(principal, action, resource);\n  permit(principal, action == Custos::Action::\"sql:selct\", resource);\n";
        let problems = errors(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (2, 31),
            "{problems:?}"
        );
        assert!(problems[0].message.contains("sql:selct"), "{problems:?}");
        assert!(problems[0].message.contains("sql:select"), "{problems:?}");
        // the un-namespaced form is a typo too
        let problems = errors("permit(principal, action == Action::\"sql:select\", resource);");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 29),
            "{problems:?}"
        );
        assert!(
            problems[0]
                .message
                .contains("Custos::Action::\"sql:select\""),
            "{problems:?}"
        );
    }

    #[test]
    fn entity_type_typo_is_an_error() {
        let text = "permit(principal in Custos::Gruop::\"agents\", action, resource);";
        let problems = errors(text);
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 21),
            "{problems:?}"
        );
        assert!(problems[0].message.contains("Gruop"), "{problems:?}");
        // an un-namespaced type is a typo too
        let problems = errors("permit(principal in Group::\"agents\", action, resource);");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 21),
            "{problems:?}"
        );
    }

    #[test]
    fn unknown_context_attribute_is_an_error() {
        let text = "forbid(principal, action == Custos::Action::\"sql:delete\", resource)\nwhen { !context.has_wher };";
        let problems = errors(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2, "{problems:?}");
        assert!(problems[0].message.contains("has_wher"), "{problems:?}");
        // a context attribute of another protocol
        let problems = errors(
            "forbid(principal, action == Custos::Action::\"k8s:get\", resource)\nwhen { context.has_where };",
        );
        assert_eq!(problems[0].line, 2, "{problems:?}");
        // a SQL attribute in a policy that applies to every action: one problem, not one per
        // non-SQL action
        let problems = errors(
            "forbid(principal, action, resource)\nwhen { context.tables.contains(\"users\") };",
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (2, 8),
            "{problems:?}"
        );
        let m = &problems[0].message;
        assert!(
            m.contains("`tables`") && m.contains("for 24 actions"),
            "{m}"
        );
        assert!(m.contains("sql:all"), "{m}");
        // an optional attribute without `has`
        let problems = errors(
            "permit(principal, action, resource)\nwhen { resource.environment == \"production\" };",
        );
        assert_eq!(problems[0].line, 2, "{problems:?}");
    }

    #[test]
    fn duplicate_id_is_an_error() {
        let text = "@id(\"a\")\npermit(principal, action, resource);\n@id(\"b\")\npermit(principal, action, resource);\n  @id(\"a\")\nforbid(principal, action, resource);\n";
        let problems = errors(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (5, 3),
            "{problems:?}"
        );
        let m = &problems[0].message;
        assert!(
            m.contains("`a`") && m.contains("line 1") && m.contains("line 5"),
            "{m}"
        );

        // an @id equal to another policy's positional id
        let text = "@id(\"policy1\")\npermit(principal, action, resource);\npermit(principal, action, resource);";
        let problems = errors(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 1),
            "{problems:?}"
        );

        let problems = errors("@id(\"\") permit(principal, action, resource);");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 1),
            "{problems:?}"
        );
    }

    #[test]
    fn ids_with_at_signs_in_strings_and_comments() {
        let text = "// @id(\"x\")\n@note(\"@id\") @id(\"y\")\npermit(principal, action, resource) when { context has \"@id\" };\n@id(\"y\") permit(principal, action, resource);";
        let problems = errors(text);
        let dup = problems
            .iter()
            .find(|p| p.message.contains("duplicate"))
            .unwrap();
        assert_eq!((dup.line, dup.column), (4, 1), "{problems:?}");
    }

    #[test]
    fn validation_messages_name_the_id() {
        let text = "@id(\"readers\")\npermit(principal, action == Custos::Action::\"sql:slect\", resource);";
        let problems = errors(text);
        assert!(problems[0].message.contains("readers"), "{problems:?}");
    }

    #[test]
    fn impossible_policies_are_errors() {
        // the action group itself is never requested
        let problems =
            errors("permit(principal, action == Custos::Action::\"sql:read\", resource);");
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 1),
            "{problems:?}"
        );
        // resources are Connections, never Tables
        let problems = errors(
            "permit(principal, action == Custos::Action::\"sql:select\", resource is Custos::Table);",
        );
        assert_eq!(problems[0].line, 1, "{problems:?}");
    }

    #[test]
    fn templates_are_rejected() {
        let text = "permit(principal == ?principal, action, resource);";
        let problems = errors(text);
        assert_eq!(
            (problems[0].line, problems[0].column),
            (1, 21),
            "{problems:?}"
        );
        assert!(problems[0].message.contains("template"), "{problems:?}");
    }

    #[test]
    fn columns_count_characters() {
        let text =
            "// héllo wörld\npermit(principal, action == Custos::Action::\"sql:selct\", resource);";
        let problems = errors(text);
        assert_eq!(
            (problems[0].line, problems[0].column),
            (2, 29),
            "{problems:?}"
        );
        assert_eq!(line_column("aé\nb", 3), (1, 3));
        assert_eq!(line_column("aé\nb", 2), (1, 2)); // inside 'é': clamped back
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "permit(principal, action == Custos::Action::\"sql:selct\", resource);\npermit(principal, action == Custos::Action::\"k8s:gett\", resource);";
        let problems = errors(text);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].line, 1);
        assert_eq!(problems[1].line, 2);
        let shown = PolicyErrors { problems }.to_string();
        assert_eq!(shown.lines().count(), 2, "{shown}");
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_crash() {
        for depth in [40, 2000, 100_000] {
            let text = format!(
                "permit(principal, action, resource)\nwhen {{ {}true{} }};",
                "(".repeat(depth),
                ")".repeat(depth)
            );
            let problems = errors(&text);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].message.contains("nested too deeply"),
                "{problems:?}"
            );
            assert_eq!(problems[0].line, 2, "{problems:?}");
            // unclosed brackets too
            let problems = errors(&"[".repeat(depth));
            assert!(
                problems[0].message.contains("nested too deeply"),
                "{problems:?}"
            );
        }
        for depth in [200, 100_000] {
            let chain = vec!["true"; depth].join(" && ");
            let problems = errors(&format!(
                "permit(principal, action, resource);\n\npermit(principal, action, resource) when {{ {chain} }};"
            ));
            assert!(
                problems[0].message.contains("nested too deeply"),
                "{problems:?}"
            );
            assert_eq!(
                (problems[0].line, problems[0].column),
                (3, 1),
                "{problems:?}"
            );
            let dots = ".a".repeat(depth);
            let problems = errors(&format!(
                "permit(principal, action, resource) when {{ principal{dots} == 1 }};"
            ));
            assert!(
                problems[0].message.contains("nested too deeply"),
                "{problems:?}"
            );
        }
    }

    /// Cedar's typechecker stops (without an error) when its stack runs low; within
    /// `MAX_NESTING`, a typo at the bottom of a deep expression must still be found.
    #[test]
    fn deep_but_allowed_expressions_are_still_typechecked() {
        let chain = vec!["true"; 110].join(" && ");
        let text = format!(
            "forbid(principal, action == Custos::Action::\"sql:delete\", resource)\nwhen {{ context.has_wher && {chain} }};"
        );
        let problems = errors(&text);
        assert!(problems[0].message.contains("has_wher"), "{problems:?}");
        let text = format!(
            "permit(principal, action, resource) when {{ {}context.nope{} }};",
            "(".repeat(MAX_NESTING / BRACKET_WEIGHT - 2),
            ")".repeat(MAX_NESTING / BRACKET_WEIGHT - 2)
        );
        let problems = errors(&text);
        assert!(problems[0].message.contains("nope"), "{problems:?}");
        // and on a small caller stack too
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let problems = errors(&text);
                assert!(problems[0].message.contains("nope"), "{problems:?}");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn realistic_policies_are_far_from_the_nesting_limit() {
        let toks = lex(REALISTIC);
        for policy in toks.split(|(t, _)| *t == Tok::End) {
            let depth = group_depth(policy, &mut 0, 0).unwrap();
            assert!(depth < 32, "{depth}");
        }
        // a long list of alternatives is a flat chain, not a deep one
        let alternatives: Vec<String> = (0..100)
            .map(|i| format!("context.tables.contains(\"t{i}\")"))
            .collect();
        let text = format!(
            "forbid(principal, action in Custos::Action::\"sql:all\", resource) when {{ {} }};",
            alternatives.join(" || ")
        );
        validate(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    fn mutate(text: &str, at: usize, len: usize, insert: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let at = at % (chars.len() + 1);
        let end = (at + len).min(chars.len());
        let mut out: String = chars[..at].iter().collect();
        out.push_str(insert);
        out.extend(&chars[end..]);
        out
    }

    fn check_bounds(text: &str) {
        match validate(text) {
            Ok(v) => {
                assert_eq!(v.ids.len(), v.count);
                assert_eq!(v.set.policies().count(), v.count);
            }
            Err(e) => {
                assert!(!e.problems.is_empty());
                let lines = text.split('\n').count();
                for p in &e.problems {
                    assert!(p.line >= 1 && p.line <= lines, "{p:?}");
                    assert!(p.column >= 1, "{p:?}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn validate_never_panics_on_arbitrary_text(text in ".{0,300}") {
            check_bounds(&text);
        }

        #[test]
        fn validate_never_panics_on_cedarish_text(
            tokens in proptest::collection::vec(
                prop_oneof![
                    Just("permit"), Just("forbid"), Just("("), Just(")"), Just(","), Just(";"),
                    Just("principal"), Just("action"), Just("resource"), Just("context"),
                    Just("when"), Just("unless"), Just("{"), Just("}"), Just("["), Just("]"),
                    Just("=="), Just("in"), Just("has"), Just("like"), Just("."), Just("&&"),
                    Just("!"), Just("@id(\"x\")"), Just("\"sql:select\""), Just("Custos::Action::"),
                    Just("Custos::Group::\"g\""), Just("?principal"), Just("//"), Just("\n"),
                    Just("has_where"), Just("tables"), Just("contains"), Just("\""), Just("1"),
                ],
                0..40,
            )
        ) {
            check_bounds(&tokens.join(" "));
        }

        #[test]
        fn validate_never_panics_on_mutated_policies(
            at in 0usize..4000,
            len in 0usize..20,
            insert in "[ -~\n]{0,8}",
        ) {
            check_bounds(&mutate(REALISTIC, at, len, &insert));
        }
    }
}
