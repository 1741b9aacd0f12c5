//! The walk over one statement's [`Tree`]: actions, tables, functions, `has_where`, prepared
//! statement names.

use std::collections::BTreeSet;

use pg_query::protobuf::{CmdType, ObjectType, OnConflictAction};

use super::tree::Tree;

pub(crate) const SELECT: &str = "sql:select";
pub(crate) const INSERT: &str = "sql:insert";
pub(crate) const UPDATE: &str = "sql:update";
pub(crate) const DELETE: &str = "sql:delete";
pub(crate) const MERGE: &str = "sql:merge";
pub(crate) const DROP: &str = "sql:drop";
pub(crate) const TRUNCATE: &str = "sql:truncate";
pub(crate) const ALTER: &str = "sql:alter";
pub(crate) const CREATE: &str = "sql:create";
pub(crate) const GRANT: &str = "sql:grant";
pub(crate) const REVOKE: &str = "sql:revoke";
pub(crate) const COPY: &str = "sql:copy";
pub(crate) const CALL: &str = "sql:call";
pub(crate) const DO: &str = "sql:do";
pub(crate) const SET: &str = "sql:set";
pub(crate) const SHOW: &str = "sql:show";
pub(crate) const TRANSACTION: &str = "sql:transaction";
pub(crate) const PREPARE: &str = "sql:prepare";
pub(crate) const EXPLAIN: &str = "sql:explain";
pub(crate) const LISTEN: &str = "sql:listen";
pub(crate) const NOTIFY: &str = "sql:notify";
pub(crate) const VACUUM: &str = "sql:vacuum";
pub(crate) const LOCK: &str = "sql:lock";
pub(crate) const OTHER: &str = "sql:other";
pub(crate) const UNPARSED: &str = "sql:unparsed";

/// Every action this module can emit (checked against `policy::ACTIONS` in the tests).
#[cfg(test)]
pub(crate) const ALL: &[&str] = &[
    SELECT,
    INSERT,
    UPDATE,
    DELETE,
    MERGE,
    DROP,
    TRUNCATE,
    ALTER,
    CREATE,
    GRANT,
    REVOKE,
    COPY,
    CALL,
    DO,
    SET,
    SHOW,
    TRANSACTION,
    PREPARE,
    EXPLAIN,
    LISTEN,
    NOTIFY,
    VACUUM,
    LOCK,
    OTHER,
    UNPARSED,
];

/// The primary action and the statement kind of a statement node (`None` for nodes that are
/// not statements, and for a nested bare `VALUES` list, which reads nothing).
pub(crate) fn stmt_info(node: &Tree, is_root: bool) -> Option<(&'static str, &'static str)> {
    let name = node.name()?;
    let info = match name {
        "SelectStmt" => {
            if node.field("into_clause").is_some() {
                (CREATE, "create")
            } else if !is_root && is_bare_values(node) {
                return None;
            } else {
                (SELECT, "select")
            }
        }
        "InsertStmt" => (INSERT, "insert"),
        "UpdateStmt" => (UPDATE, "update"),
        "DeleteStmt" => (DELETE, "delete"),
        "MergeStmt" => (MERGE, "merge"),
        "TruncateStmt" => (TRUNCATE, "truncate"),
        "GrantStmt" | "GrantRoleStmt" => {
            if node.bool_field("is_grant") {
                (GRANT, "grant")
            } else {
                (REVOKE, "revoke")
            }
        }
        "CopyStmt" => {
            let kind = if node.bool_field("is_program") {
                "copy_program"
            } else if !node.str_field("filename").is_empty() {
                "copy_file"
            } else {
                "copy"
            };
            (COPY, kind)
        }
        "CallStmt" => (CALL, "call"),
        "DoStmt" => (DO, "do"),
        // Nested, it is the `SET` clause of `ALTER SYSTEM/ROLE/DATABASE/FUNCTION`: part of the alter.
        "VariableSetStmt" if !is_root => return None,
        "VariableSetStmt" => (SET, "set"),
        "VariableShowStmt" => (SHOW, "show"),
        "TransactionStmt" => (TRANSACTION, "transaction"),
        "PrepareStmt" => (PREPARE, "prepare"),
        "ExecuteStmt" => (OTHER, "execute"),
        "DeallocateStmt" => (OTHER, "deallocate"),
        "ExplainStmt" => (EXPLAIN, "explain"),
        "ListenStmt" | "UnlistenStmt" => (LISTEN, "listen"),
        "NotifyStmt" => (NOTIFY, "notify"),
        "VacuumStmt" | "ClusterStmt" | "ReindexStmt" => (VACUUM, "vacuum"),
        "LockStmt" => (LOCK, "lock"),
        "RenameStmt" | "CommentStmt" | "SecLabelStmt" | "ReassignOwnedStmt" => (ALTER, "alter"),
        "IndexStmt"
        | "ViewStmt"
        | "RuleStmt"
        | "DefineStmt"
        | "CompositeTypeStmt"
        | "ImportForeignSchemaStmt" => (CREATE, "create"),
        // Only in SQL-standard function bodies / PL/pgSQL; never a statement of their own.
        "ReturnStmt" | "PlAssignStmt" | "SetOperationStmt" | "RawStmt" => return None,
        _ if name.ends_with("Stmt") => {
            if name.starts_with("Drop") {
                (DROP, "drop")
            } else if name.starts_with("Alter") {
                (ALTER, "alter")
            } else if name.starts_with("Create") {
                (CREATE, "create")
            } else {
                // DISCARD, CHECKPOINT, LOAD, DECLARE CURSOR, FETCH, CLOSE, SET CONSTRAINTS,
                // REFRESH MATERIALIZED VIEW, ...
                (OTHER, "other")
            }
        }
        _ => return None,
    };
    Some(info)
}

/// `VALUES (...)` with nothing else: reads no relation by itself (its subqueries are
/// separate `SelectStmt`s).
fn is_bare_values(node: &Tree) -> bool {
    !node.seq_field("values_lists").is_empty() && node.seq_field("from_clause").is_empty()
}

/// True when an `EXPLAIN` runs its statement: an `ANALYZE` option that is not explicitly false.
fn explain_executes(node: &Tree) -> bool {
    node.seq_field("options").iter().any(|opt| {
        opt.name() == Some("DefElem")
            && opt.str_field("defname").eq_ignore_ascii_case("analyze")
            && !is_false(opt.field("arg"))
    })
}

/// An option argument PostgreSQL's `defGetBoolean` reads as false.
fn is_false(arg: Option<&Tree>) -> bool {
    let Some(arg) = arg else { return false };
    match arg.name() {
        Some("Boolean") => !arg.bool_field("boolval"),
        Some("Integer") => arg.int_field("ival") == 0,
        Some("String") => {
            let s = arg.str_field("sval");
            s.eq_ignore_ascii_case("false") || s.eq_ignore_ascii_case("off")
        }
        _ => false,
    }
}

/// Object types whose names (in `DROP` / `COMMENT ON`) are relations.
fn is_relation_object(objtype: i64) -> bool {
    [
        ObjectType::ObjectTable,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectForeignTable,
        ObjectType::ObjectSequence,
        ObjectType::ObjectIndex,
    ]
    .iter()
    .any(|t| *t as i64 == objtype)
}

fn qualified(parts: &[&str]) -> String {
    parts.join(".").to_lowercase()
}

/// What the walk found.
#[derive(Debug)]
pub(crate) struct Facts {
    pub actions: Vec<&'static str>,
    pub tables: BTreeSet<String>,
    pub functions: BTreeSet<String>,
    pub has_where: bool,
    pub prepared_name: Option<String>,
}

pub(crate) struct Walker {
    pub facts: Facts,
    /// CTE names visible at the current point of the walk (innermost last).
    ctes: Vec<String>,
    /// Non-zero inside a statement that is only planned, never run (`EXPLAIN` without
    /// `ANALYZE`): its tables and functions are still reported, its actions are not needed.
    planned_only: u32,
}

impl Walker {
    pub(crate) fn new() -> Self {
        Walker {
            facts: Facts {
                actions: Vec::new(),
                tables: BTreeSet::new(),
                functions: BTreeSet::new(),
                has_where: true,
                prepared_name: None,
            },
            ctes: Vec::new(),
            planned_only: 0,
        }
    }

    pub(crate) fn action(&mut self, action: &'static str) {
        if self.planned_only == 0 && !self.facts.actions.contains(&action) {
            self.facts.actions.push(action);
        }
    }

    fn prepared(&mut self, name: &str) {
        if self.planned_only == 0 && self.facts.prepared_name.is_none() && !name.is_empty() {
            self.facts.prepared_name = Some(name.to_owned());
        }
    }

    /// A `RangeVar`. `may_be_cte`: false for DML targets, which never name a CTE.
    fn range_var(&mut self, node: &Tree, may_be_cte: bool) {
        if node.name() != Some("RangeVar") {
            // Defensive: a DML `relation` is always a RangeVar; walk anything else normally.
            self.visit(node);
            return;
        }
        let relname = node.str_field("relname");
        if relname.is_empty() {
            return;
        }
        let catalog = node.str_field("catalogname");
        let schema = node.str_field("schemaname");
        if may_be_cte
            && catalog.is_empty()
            && schema.is_empty()
            && self.ctes.iter().any(|c| c == relname)
        {
            return;
        }
        let parts: Vec<&str> = [catalog, schema, relname]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        self.facts.tables.insert(qualified(&parts));
    }

    fn function(&mut self, funcname: &[&str]) {
        let Some(last) = funcname.last() else { return };
        self.facts.functions.insert(qualified(funcname));
        if funcname.len() > 1 {
            self.facts.functions.insert(last.to_lowercase());
        }
    }

    pub(crate) fn visit(&mut self, node: &Tree) {
        match node {
            Tree::Seq(items) => items.iter().for_each(|item| self.visit(item)),
            Tree::Struct(name, fields) => self.visit_struct(node, name, fields),
            _ => {}
        }
    }

    fn visit_struct(&mut self, node: &Tree, name: &str, fields: &[(&'static str, Tree)]) {
        if let Some((action, _)) = stmt_info(node, false) {
            self.action(action);
        }
        match name {
            "RangeVar" => return self.range_var(node, true),
            // `FOR UPDATE OF a`: names FROM items (often aliases) that are already reported.
            "LockingClause" => return,
            "FuncCall" => {
                let parts = node.field("funcname").map(Tree::name_parts);
                self.function(parts.as_deref().unwrap_or_default());
            }
            "DeleteStmt" | "UpdateStmt" if node.field("where_clause").is_none() => {
                self.facts.has_where = false;
            }
            // SELECT ... INTO creates a table from what it reads.
            "SelectStmt" if node.field("into_clause").is_some() => self.action(SELECT),
            "CopyStmt" => {
                if node.bool_field("is_from") {
                    self.action(INSERT);
                } else if node.field("relation").is_some() {
                    self.action(SELECT);
                }
            }
            "MergeWhenClause" => {
                let cmd = node.int_field("command_type");
                if cmd == CmdType::CmdUpdate as i64 {
                    self.action(UPDATE);
                } else if cmd == CmdType::CmdDelete as i64 {
                    self.action(DELETE);
                } else if cmd == CmdType::CmdInsert as i64 {
                    self.action(INSERT);
                }
            }
            "OnConflictClause"
                if node.int_field("action") == OnConflictAction::OnconflictUpdate as i64 =>
            {
                self.action(UPDATE);
            }
            "ExecuteStmt" | "PrepareStmt" => self.prepared(node.str_field("name")),
            "DeallocateStmt" => self.prepared(node.str_field("name")),
            "DropStmt" => {
                let remove_type = node.int_field("remove_type");
                // `DROP TRIGGER/RULE/POLICY name ON table`: the last part is the object's name.
                let on_table = [
                    ObjectType::ObjectTrigger,
                    ObjectType::ObjectRule,
                    ObjectType::ObjectPolicy,
                ]
                .iter()
                .any(|t| *t as i64 == remove_type);
                for object in node.seq_field("objects") {
                    let parts = object.name_parts();
                    if is_relation_object(remove_type) && !parts.is_empty() {
                        self.facts.tables.insert(qualified(&parts));
                    } else if on_table && parts.len() > 1 {
                        self.facts
                            .tables
                            .insert(qualified(&parts[..parts.len() - 1]));
                    }
                }
            }
            "CommentStmt" => {
                let objtype = node.int_field("objtype");
                if let Some(object) = node.field("object") {
                    let parts = object.name_parts();
                    if is_relation_object(objtype) && !parts.is_empty() {
                        self.facts.tables.insert(qualified(&parts));
                    } else if objtype == ObjectType::ObjectColumn as i64 && parts.len() > 1 {
                        self.facts
                            .tables
                            .insert(qualified(&parts[..parts.len() - 1]));
                    }
                }
            }
            "ExplainStmt" => {
                let planned_only = !explain_executes(node);
                if planned_only {
                    self.planned_only += 1;
                }
                fields.iter().for_each(|(_, value)| self.visit(value));
                if planned_only {
                    self.planned_only -= 1;
                }
                return;
            }
            _ => {}
        }

        // Children, with the statement's CTE names in scope.
        let scope = self.ctes.len();
        if let Some(with) = node.field("with_clause") {
            self.with_clause(with);
        }
        let dml = matches!(
            name,
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
        );
        for (key, value) in fields {
            match *key {
                "with_clause" => {}
                "relation" if dml => self.range_var(value, false),
                _ => self.visit(value),
            }
        }
        self.ctes.truncate(scope);
    }

    /// Walks the CTEs and leaves their names in scope (the caller truncates). A non-recursive
    /// CTE sees only the CTEs before it; in `WITH RECURSIVE` every CTE sees all of them.
    fn with_clause(&mut self, with: &Tree) {
        let ctes = with.seq_field("ctes");
        if with.bool_field("recursive") {
            self.ctes
                .extend(ctes.iter().map(|cte| cte.str_field("ctename").to_owned()));
            ctes.iter().for_each(|cte| self.visit(cte));
        } else {
            for cte in ctes {
                self.visit(cte);
                self.ctes.push(cte.str_field("ctename").to_owned());
            }
        }
    }
}
