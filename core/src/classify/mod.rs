//! SQL classification with the real PostgreSQL parser (`pg_query`, libpg_query 18).
//!
//! [`classify`] splits a query string into statements and, for each, reports every policy action
//! it needs (see [`crate::policy::ACTIONS`]), its statement kind, the tables and functions it
//! references anywhere (CTEs, subqueries, joins, `RETURNING`, `DEFAULT`s, DDL, ...), and whether
//! every `UPDATE`/`DELETE` in it has a `WHERE`. These fill the Cedar `SqlContext`.
//!
//! The walk covers every node of the parse tree, not a hand-picked subset: the pg_query protobuf
//! structs are converted into a generic, type-tagged tree (`tree::Tree`) through their `Serialize`
//! impls, so a node kind nobody thought of is still visited.
//!
//! Deny-by-default stays the caller's job: text that does not parse becomes a single
//! `sql:unparsed` statement, never a guess.
//!
//! Action mapping (the first action is the primary one; all must be permitted):
//!
//! | statement | actions |
//! |---|---|
//! | `SELECT`, `VALUES`, `TABLE` | `sql:select` |
//! | `INSERT` / `UPDATE` / `DELETE` / `MERGE` | `sql:insert` / `sql:update` / `sql:delete` / `sql:merge` |
//! | `MERGE ... THEN UPDATE/DELETE/INSERT` | `sql:merge` + each clause's action |
//! | `INSERT ... ON CONFLICT DO UPDATE` | `sql:insert`, `sql:update` |
//! | any subquery / `INSERT ... SELECT` / CTE | + `sql:select` (a bare `VALUES` list adds nothing) |
//! | data-modifying CTE | + its `sql:insert` / `sql:update` / `sql:delete` / `sql:merge` |
//! | `DROP *`, `DROP OWNED` | `sql:drop` |
//! | `TRUNCATE` | `sql:truncate` |
//! | `ALTER *` (incl. `ALTER SYSTEM`, `ALTER ROLE`), `RENAME`, `COMMENT ON`, `SECURITY LABEL`, `REASSIGN OWNED` | `sql:alter` |
//! | `CREATE *`, `SELECT ... INTO` | `sql:create` (+ `sql:select` when it runs a query) |
//! | `GRANT` / `REVOKE` (incl. roles) | `sql:grant` / `sql:revoke` |
//! | `COPY ... FROM` / `COPY ... TO` | `sql:copy` + `sql:insert` / `sql:select`; kind `copy_program` or `copy_file` for `PROGRAM` / server files |
//! | `CALL` / `DO` | `sql:call` / `sql:do` |
//! | `SET`, `RESET` / `SHOW` | `sql:set` / `sql:show` |
//! | `BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, ... | `sql:transaction` |
//! | `PREPARE` | `sql:prepare` + the prepared statement's actions |
//! | `EXECUTE`, `DEALLOCATE` | `sql:other`, with [`Statement::prepared_name`] |
//! | `EXPLAIN` | `sql:explain` (+ the statement's actions with `ANALYZE`, which runs it) |
//! | `LISTEN`, `UNLISTEN` / `NOTIFY` | `sql:listen` / `sql:notify` |
//! | `VACUUM`, `ANALYZE`, `CLUSTER`, `REINDEX` | `sql:vacuum` |
//! | `LOCK` | `sql:lock` |
//! | anything else (`LOAD`, `DISCARD`, `CHECKPOINT`, cursors, `REFRESH MATERIALIZED VIEW`, ...) | `sql:other` |
//! | text that does not parse | `sql:unparsed` |
//!
//! Known limits (all fail closed or are documented for policy authors):
//! - Nesting: pg_query decodes the tree with prost, whose recursion limit (100 messages) turns
//!   very deep trees into `unparsed`: chains of more than ~45 binary operators (`a || b || ...`),
//!   ~22 nested subqueries or `CASE`s, ~48 chained `JOIN`s. `AND`/`OR` chains, `IN` lists and
//!   `UNION` chains of ordinary length are flat and unaffected.
//! - Code in strings is opaque: `DO` bodies, `CREATE FUNCTION ... AS '...'` bodies, and SQL passed
//!   to functions (`dblink_exec`, `query_to_xml`, ...) are not classified; forbid `sql:do`
//!   and those functions instead. (`BEGIN ATOMIC` bodies are parsed and walked.)
//! - Functions run implicitly (operators, casts, views, triggers, rules, defaults of the target
//!   table, RLS policies) are not visible in the text.
//! - `has_where` reports the presence of a `WHERE`, not its selectivity (`WHERE true` counts),
//!   and `MERGE` is never "without WHERE".
//! - Lexing depends on the session: pass `standard_conforming_strings` (see
//!   [`ClassifyOptions`]); the input must be UTF-8 (the edge must insist on
//!   `client_encoding = UTF8`).

mod tree;
mod walk;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use walk::Walker;

/// One classified SQL statement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Statement {
    /// Every policy action this statement needs; ALL must be permitted. The first is the primary
    /// one. E.g. `WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d` →
    /// `["sql:select", "sql:delete"]`; `EXPLAIN ANALYZE DELETE FROM t` →
    /// `["sql:explain", "sql:delete"]`; `CREATE TABLE x AS SELECT ...` →
    /// `["sql:create", "sql:select"]`.
    pub actions: Vec<&'static str>,
    /// The statement kind in snake case: "select", "insert", "update", "delete", "merge",
    /// "drop", "truncate", "alter", "create", "grant", "revoke", "copy", "copy_program"
    /// (`COPY ... TO/FROM PROGRAM`), "copy_file" (`COPY` to/from a server file), "call", "do",
    /// "set", "show", "transaction", "prepare", "execute", "deallocate", "explain", "listen",
    /// "notify", "vacuum", "lock", "other", "unparsed".
    pub statement_kind: String,
    /// Every relation referenced anywhere (CTE bodies, subqueries, joins, DML targets, DDL
    /// objects), lower-cased: "public.users" when schema-qualified, else "users". CTE names
    /// are not tables; aliases are resolved to the relation they name.
    pub tables: BTreeSet<String>,
    /// Every function called anywhere, lower-cased; a qualified call yields both
    /// "pg_catalog.pg_read_file" and "pg_read_file".
    pub functions: BTreeSet<String>,
    /// True unless some `UPDATE`/`DELETE` in the statement (including in CTEs, `PREPARE`,
    /// `EXPLAIN`, rule and function bodies) has no `WHERE`. `WHERE CURRENT OF` counts as a
    /// `WHERE`; so does `WHERE true`. False for unparsed text (nothing is known about it).
    pub has_where: bool,
    /// The statement's own text (the same slice `pg_query::split_with_parser` returns); the
    /// whole input when unparsed.
    pub text: String,
    /// False when the input did not parse.
    pub parsed: bool,
    /// The prepared statement this one defines, runs or drops: `PREPARE name AS …` (its own
    /// actions, tables and functions are those of the prepared body), `EXECUTE name`,
    /// `DEALLOCATE name`,
    /// `EXPLAIN ANALYZE EXECUTE name`, `CREATE TABLE ... AS EXECUTE name`. The edge adds the
    /// actions of what `PREPARE name` classified.
    pub prepared_name: Option<String>,
}

impl Statement {
    /// The single statement that stands for input the parser rejected.
    pub fn unparsed(sql: &str) -> Statement {
        Statement {
            actions: vec![walk::UNPARSED],
            statement_kind: "unparsed".to_owned(),
            tables: BTreeSet::new(),
            functions: BTreeSet::new(),
            has_where: false,
            text: sql.to_owned(),
            parsed: false,
            prepared_name: None,
        }
    }

    /// The primary action.
    pub fn primary_action(&self) -> &'static str {
        self.actions.first().copied().unwrap_or(walk::UNPARSED)
    }
}

/// Session settings that change how PostgreSQL lexes a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifyOptions {
    /// The session's `standard_conforming_strings` (default on). When a session turns it off,
    /// backslashes escape quotes in `'...'` literals, so the same bytes split into different
    /// tokens: the edge must classify with the server's value (it is reported in
    /// `ParameterStatus`) or refuse sessions that turn it off.
    pub standard_conforming_strings: bool,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        ClassifyOptions {
            standard_conforming_strings: true,
        }
    }
}

/// Classifies every statement in `sql` (one [`Statement`] per statement; none for an empty or
/// comment-only query). If any part fails to parse, the result is a single unparsed statement
/// covering the whole input.
pub fn classify(sql: &str) -> Vec<Statement> {
    classify_with(sql, &ClassifyOptions::default())
}

/// [`classify`] with explicit session settings.
pub fn classify_with(sql: &str, options: &ClassifyOptions) -> Vec<Statement> {
    let mut parser_options = pg_query::ParserOptions::DEFAULT;
    if !options.standard_conforming_strings {
        parser_options |= pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    }
    // One parse of the whole input: `split_with_parser` runs this same raw parse and slices
    // the text by each RawStmt's location and length, which is what `statement_text` does.
    // pg_query's Rust post-processing indexes into the tree; never let a surprise there take
    // the caller down with it: a panic is just one more way of "could not parse".
    let Ok(Ok(parsed)) = std::panic::catch_unwind(|| pg_query::parse(sql, parser_options)) else {
        return vec![Statement::unparsed(sql)];
    };
    let mut statements = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
        let classified = raw
            .stmt
            .as_deref()
            .and_then(|node| tree::to_tree(node).ok())
            .and_then(|tree| classify_tree(&tree, text));
        match classified {
            Some(statement) => statements.push(statement),
            None => return vec![Statement::unparsed(sql)],
        }
    }
    statements
}

/// The text of one statement, as `split_with_parser` slices it (a length of 0 means "to the
/// end of the input").
fn statement_text(sql: &str, location: i32, len: i32) -> &str {
    let start = usize::try_from(location).unwrap_or(0);
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(len) => start.saturating_add(len).min(sql.len()),
    };
    sql.get(start..end).unwrap_or(sql)
}

fn classify_tree(root: &tree::Tree, text: &str) -> Option<Statement> {
    // A RawStmt always holds a statement node; anything else is not something to guess about.
    let (primary, kind) = walk::stmt_info(root, true)?;
    let mut walker = Walker::new();
    walker.action(primary);
    walker.visit(root);
    let facts = walker.facts;
    Some(Statement {
        actions: facts.actions,
        statement_kind: kind.to_owned(),
        tables: facts.tables,
        functions: facts.functions,
        has_where: facts.has_where,
        text: text.to_owned(),
        parsed: true,
        prepared_name: facts.prepared_name,
    })
}
