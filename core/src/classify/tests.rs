use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn one(sql: &str) -> Statement {
    let mut statements = classify(sql);
    assert_eq!(statements.len(), 1, "{sql}: {statements:#?}");
    statements.remove(0)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn tables(sql: &str) -> BTreeSet<String> {
    one(sql).tables
}

fn functions(sql: &str) -> BTreeSet<String> {
    one(sql).functions
}

/// A corpus covering every statement family, used by several tests.
const CORPUS: &[&str] = &[
    "SELECT 1",
    "VALUES (1), (2)",
    "TABLE users",
    "SELECT * INTO new_t FROM t",
    "INSERT INTO t VALUES (1)",
    "INSERT INTO t SELECT * FROM u",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 1",
    "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
    "UPDATE t SET a = 1 WHERE id = 2",
    "DELETE FROM t WHERE id = 1",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a",
    "DROP TABLE t",
    "DROP OWNED BY bob",
    "DROP ROLE bob",
    "DROP DATABASE prod",
    "DROP FUNCTION f(int)",
    "TRUNCATE t",
    "ALTER TABLE t ADD COLUMN c int",
    "ALTER SYSTEM SET fsync = off",
    "ALTER ROLE bob SUPERUSER",
    "ALTER TABLE t RENAME TO u",
    "COMMENT ON TABLE t IS 'x'",
    "CREATE TABLE t (a int)",
    "CREATE TABLE t AS SELECT * FROM u",
    "CREATE MATERIALIZED VIEW mv AS SELECT * FROM u",
    "CREATE INDEX i ON t (a)",
    "CREATE VIEW v AS SELECT * FROM u",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN END $$",
    "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
    "CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING",
    "CREATE EXTENSION dblink",
    "CREATE ROLE bob",
    "CREATE SCHEMA s",
    "CREATE SEQUENCE s",
    "CREATE TYPE ty AS (a int)",
    "CREATE DATABASE d",
    "GRANT SELECT ON t TO bob",
    "GRANT admin TO bob",
    "REVOKE ALL ON t FROM bob",
    "REVOKE admin FROM bob",
    "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob",
    "COPY t FROM STDIN",
    "COPY t TO STDOUT",
    "COPY (SELECT * FROM t) TO STDOUT",
    "COPY t TO PROGRAM 'curl x'",
    "COPY t FROM '/etc/passwd'",
    "CALL p(1)",
    "DO $$ BEGIN END $$",
    "SET search_path = x",
    "RESET ALL",
    "SET ROLE admin",
    "SHOW search_path",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s",
    "PREPARE p AS DELETE FROM t",
    "PREPARE q(int) AS SELECT * FROM t WHERE id = $1",
    "EXECUTE p",
    "DEALLOCATE p",
    "DEALLOCATE ALL",
    "EXPLAIN SELECT * FROM t",
    "EXPLAIN ANALYZE DELETE FROM t",
    "LISTEN ch",
    "UNLISTEN *",
    "NOTIFY ch, 'x'",
    "VACUUM FULL t",
    "ANALYZE t",
    "CLUSTER t USING i",
    "REINDEX TABLE t",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "LOAD 'plpgsql'",
    "DISCARD ALL",
    "CHECKPOINT",
    "DECLARE c CURSOR FOR SELECT * FROM t",
    "FETCH 10 FROM c",
    "CLOSE c",
    "REFRESH MATERIALIZED VIEW mv",
    "SECURITY LABEL ON TABLE t IS 'x'",
    "REASSIGN OWNED BY a TO b",
    "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END",
    "this is not sql",
    "",
];

#[test]
fn classify_emits_only_valid_actions() {
    for action in walk::ALL {
        assert!(
            crate::policy::is_valid_action(action),
            "{action} is not in policy::ACTIONS"
        );
    }
    for sql in CORPUS {
        for statement in classify(sql) {
            assert!(!statement.actions.is_empty(), "{sql}");
            for action in &statement.actions {
                assert!(crate::policy::ACTIONS.contains(action), "{sql}: {action}");
                assert!(walk::ALL.contains(action), "{sql}: {action}");
            }
        }
    }
}

#[test]
fn classify_action_mapping() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("SELECT 1", &["sql:select"], "select"),
        ("VALUES (1), (2)", &["sql:select"], "select"),
        ("TABLE users", &["sql:select"], "select"),
        (
            "SELECT * INTO new_t FROM t",
            &["sql:create", "sql:select"],
            "create",
        ),
        ("INSERT INTO t VALUES (1)", &["sql:insert"], "insert"),
        (
            "INSERT INTO t SELECT * FROM u",
            &["sql:insert", "sql:select"],
            "insert",
        ),
        (
            "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 1",
            &["sql:insert", "sql:update"],
            "insert",
        ),
        (
            "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
            &["sql:insert"],
            "insert",
        ),
        ("UPDATE t SET a = 1 WHERE id = 2", &["sql:update"], "update"),
        (
            "UPDATE t SET a = 1 WHERE id IN (SELECT id FROM u)",
            &["sql:update", "sql:select"],
            "update",
        ),
        ("DELETE FROM t WHERE id = 1", &["sql:delete"], "delete"),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
            &["sql:merge", "sql:delete", "sql:insert"],
            "merge",
        ),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a",
            &["sql:merge", "sql:update"],
            "merge",
        ),
        ("DROP TABLE t", &["sql:drop"], "drop"),
        ("DROP OWNED BY bob", &["sql:drop"], "drop"),
        ("DROP ROLE bob", &["sql:drop"], "drop"),
        ("DROP DATABASE prod", &["sql:drop"], "drop"),
        ("TRUNCATE t", &["sql:truncate"], "truncate"),
        ("ALTER TABLE t ADD COLUMN c int", &["sql:alter"], "alter"),
        ("ALTER SYSTEM SET fsync = off", &["sql:alter"], "alter"),
        ("ALTER ROLE bob SUPERUSER", &["sql:alter"], "alter"),
        ("ALTER TABLE t RENAME TO u", &["sql:alter"], "alter"),
        ("COMMENT ON TABLE t IS 'x'", &["sql:alter"], "alter"),
        ("CREATE TABLE t (a int)", &["sql:create"], "create"),
        (
            "CREATE TABLE t AS SELECT * FROM u",
            &["sql:create", "sql:select"],
            "create",
        ),
        ("CREATE INDEX i ON t (a)", &["sql:create"], "create"),
        (
            "CREATE VIEW v AS SELECT * FROM u",
            &["sql:create", "sql:select"],
            "create",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$",
            &["sql:create"],
            "create",
        ),
        (
            "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
            &["sql:create"],
            "create",
        ),
        ("CREATE EXTENSION dblink", &["sql:create"], "create"),
        ("CREATE ROLE bob", &["sql:create"], "create"),
        ("CREATE SCHEMA s", &["sql:create"], "create"),
        ("GRANT SELECT ON t TO bob", &["sql:grant"], "grant"),
        ("GRANT admin TO bob", &["sql:grant"], "grant"),
        ("REVOKE ALL ON t FROM bob", &["sql:revoke"], "revoke"),
        ("REVOKE admin FROM bob", &["sql:revoke"], "revoke"),
        (
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob",
            &["sql:alter", "sql:grant"],
            "alter",
        ),
        ("COPY t FROM STDIN", &["sql:copy", "sql:insert"], "copy"),
        ("COPY t TO STDOUT", &["sql:copy", "sql:select"], "copy"),
        (
            "COPY (SELECT * FROM t) TO STDOUT",
            &["sql:copy", "sql:select"],
            "copy",
        ),
        (
            "COPY t TO PROGRAM 'curl x'",
            &["sql:copy", "sql:select"],
            "copy_program",
        ),
        (
            "COPY t FROM PROGRAM 'id'",
            &["sql:copy", "sql:insert"],
            "copy_program",
        ),
        (
            "COPY t FROM '/etc/passwd'",
            &["sql:copy", "sql:insert"],
            "copy_file",
        ),
        ("CALL p(1)", &["sql:call"], "call"),
        ("DO $$ BEGIN END $$", &["sql:do"], "do"),
        ("SET search_path = x", &["sql:set"], "set"),
        ("RESET ALL", &["sql:set"], "set"),
        ("SET ROLE admin", &["sql:set"], "set"),
        ("SHOW search_path", &["sql:show"], "show"),
        ("BEGIN", &["sql:transaction"], "transaction"),
        ("COMMIT", &["sql:transaction"], "transaction"),
        ("ROLLBACK TO SAVEPOINT s", &["sql:transaction"], "transaction"),
        (
            "PREPARE p AS DELETE FROM t",
            &["sql:prepare", "sql:delete"],
            "prepare",
        ),
        ("EXECUTE p", &["sql:other"], "execute"),
        ("DEALLOCATE p", &["sql:other"], "deallocate"),
        ("EXPLAIN SELECT * FROM t", &["sql:explain"], "explain"),
        ("EXPLAIN DELETE FROM t", &["sql:explain"], "explain"),
        (
            "EXPLAIN ANALYZE DELETE FROM t",
            &["sql:explain", "sql:delete"],
            "explain",
        ),
        (
            "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1",
            &["sql:explain", "sql:update"],
            "explain",
        ),
        (
            "EXPLAIN (ANALYZE true) DELETE FROM t",
            &["sql:explain", "sql:delete"],
            "explain",
        ),
        (
            "EXPLAIN (ANALYZE 1) DELETE FROM t",
            &["sql:explain", "sql:delete"],
            "explain",
        ),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", &["sql:explain"], "explain"),
        ("EXPLAIN (ANALYZE off) DELETE FROM t", &["sql:explain"], "explain"),
        ("EXPLAIN (ANALYZE 0) DELETE FROM t", &["sql:explain"], "explain"),
        ("LISTEN ch", &["sql:listen"], "listen"),
        ("UNLISTEN *", &["sql:listen"], "listen"),
        ("NOTIFY ch, 'x'", &["sql:notify"], "notify"),
        ("VACUUM FULL t", &["sql:vacuum"], "vacuum"),
        ("ANALYZE t", &["sql:vacuum"], "vacuum"),
        ("CLUSTER t USING i", &["sql:vacuum"], "vacuum"),
        ("REINDEX TABLE t", &["sql:vacuum"], "vacuum"),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", &["sql:lock"], "lock"),
        ("LOAD 'plpgsql'", &["sql:other"], "other"),
        ("DISCARD ALL", &["sql:other"], "other"),
        (
            "DECLARE c CURSOR FOR SELECT * FROM t",
            &["sql:other", "sql:select"],
            "other",
        ),
        (
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            &["sql:select", "sql:delete"],
            "select",
        ),
        (
            "WITH u AS (UPDATE t SET a = 1 WHERE b RETURNING *) INSERT INTO log SELECT * FROM u",
            &["sql:insert", "sql:update", "sql:select"],
            "insert",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END",
            &["sql:create", "sql:delete"],
            "create",
        ),
        (
            "CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u",
            &["sql:create", "sql:delete"],
            "create",
        ),
    ];
    let mut failures = Vec::new();
    for (sql, actions, kind) in cases {
        let statement = one(sql);
        if statement.actions != *actions || statement.statement_kind != *kind {
            failures.push(format!(
                "{sql}: got {:?} / {}, want {actions:?} / {kind}",
                statement.actions, statement.statement_kind
            ));
        }
        assert!(statement.parsed, "{sql}");
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn classify_tables_simple_and_qualified() {
    assert_eq!(tables("SELECT * FROM users"), set(&["users"]));
    assert_eq!(tables("SELECT * FROM public.users"), set(&["public.users"]));
    assert_eq!(
        tables("SELECT * FROM db.public.users"),
        set(&["db.public.users"])
    );
    assert_eq!(tables("SELECT * FROM PUBLIC.Users"), set(&["public.users"]));
    assert_eq!(
        tables(r#"SELECT * FROM "Public"."USERS""#),
        set(&["public.users"])
    );
    assert_eq!(tables(r#"SELECT * FROM U&"t\0061ble""#), set(&["table"]));
    assert_eq!(tables("SELECT 1"), set(&[]));
}

#[test]
fn classify_tables_aliases_joins_subqueries() {
    assert_eq!(
        tables("SELECT u.id FROM users AS u JOIN orders o ON o.uid = u.id"),
        set(&["users", "orders"])
    );
    assert_eq!(
        tables(
            "SELECT * FROM a LEFT JOIN (SELECT * FROM b WHERE x IN (SELECT y FROM c)) s ON true \
             WHERE EXISTS (SELECT 1 FROM d) AND a.z = (SELECT max(z) FROM e)"
        ),
        set(&["a", "b", "c", "d", "e"])
    );
    assert_eq!(
        tables("SELECT * FROM a, LATERAL (SELECT * FROM b WHERE b.id = a.id) l"),
        set(&["a", "b"])
    );
    assert_eq!(
        tables("SELECT * FROM a UNION SELECT * FROM b EXCEPT SELECT * FROM c"),
        set(&["a", "b", "c"])
    );
    // FOR UPDATE OF names the alias, which is not a table.
    assert_eq!(
        tables("SELECT * FROM users u FOR UPDATE OF u"),
        set(&["users"])
    );
    assert_eq!(
        tables("UPDATE t SET a = s.a FROM src s WHERE t.id = s.id RETURNING (SELECT 1 FROM r)"),
        set(&["t", "src", "r"])
    );
    assert_eq!(
        tables("DELETE FROM t USING u WHERE t.id = u.id"),
        set(&["t", "u"])
    );
    assert_eq!(tables("INSERT INTO t SELECT * FROM u"), set(&["t", "u"]));
}

#[test]
fn classify_tables_cte_names_excluded() {
    assert_eq!(
        tables("WITH x AS (SELECT * FROM users) SELECT * FROM x"),
        set(&["users"])
    );
    assert_eq!(
        tables("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r"),
        set(&[])
    );
    // A later CTE can read an earlier one.
    assert_eq!(
        tables("WITH a AS (SELECT * FROM t), b AS (SELECT * FROM a) SELECT * FROM b"),
        set(&["t"])
    );
    // A non-recursive CTE does not see itself: the inner `t` is the real table.
    assert_eq!(
        tables("WITH t AS (SELECT * FROM t) SELECT * FROM t"),
        set(&["t"])
    );
    // A CTE only shadows inside its own statement.
    assert_eq!(
        tables("SELECT * FROM users, (WITH users AS (SELECT 1) SELECT * FROM users) s"),
        set(&["users"])
    );
    // Schema-qualified names never refer to a CTE.
    assert_eq!(
        tables("WITH users AS (SELECT 1) SELECT * FROM public.users"),
        set(&["public.users"])
    );
    // A DML target is never a CTE.
    assert_eq!(
        tables("WITH t AS (SELECT 1) DELETE FROM t WHERE true"),
        set(&["t"])
    );
    assert_eq!(
        tables("WITH t AS (SELECT 1) UPDATE t SET a = 1 WHERE true"),
        set(&["t"])
    );
    assert_eq!(
        tables("WITH t AS (SELECT 1) INSERT INTO t SELECT * FROM t"),
        set(&["t"])
    );
    // Data-modifying CTEs.
    assert_eq!(
        tables("WITH d AS (DELETE FROM logs RETURNING *) INSERT INTO archive SELECT * FROM d"),
        set(&["logs", "archive"])
    );
}

#[test]
fn classify_tables_ddl_and_utility() {
    assert_eq!(
        tables("DROP TABLE IF EXISTS a, public.b CASCADE"),
        set(&["a", "public.b"])
    );
    assert_eq!(tables("DROP VIEW v"), set(&["v"]));
    assert_eq!(tables("DROP FUNCTION f(int)"), set(&[]));
    assert_eq!(tables("DROP TRIGGER tr ON s.t"), set(&["s.t"]));
    assert_eq!(tables("DROP POLICY p ON t"), set(&["t"]));
    assert_eq!(tables("TRUNCATE ONLY a, b"), set(&["a", "b"]));
    assert_eq!(tables("ALTER TABLE t ADD COLUMN c int"), set(&["t"]));
    assert_eq!(tables("ALTER TABLE t RENAME TO u"), set(&["t"]));
    assert_eq!(
        tables("CREATE TABLE t (a int REFERENCES u(id))"),
        set(&["t", "u"])
    );
    assert_eq!(
        tables("CREATE TABLE t AS SELECT * FROM u"),
        set(&["t", "u"])
    );
    assert_eq!(tables("SELECT * INTO new_t FROM t"), set(&["new_t", "t"]));
    assert_eq!(tables("CREATE INDEX i ON t (a)"), set(&["t"]));
    assert_eq!(tables("GRANT SELECT ON t, s.u TO bob"), set(&["t", "s.u"]));
    assert_eq!(tables("LOCK TABLE t"), set(&["t"]));
    assert_eq!(tables("VACUUM FULL t"), set(&["t"]));
    assert_eq!(tables("COPY t TO STDOUT"), set(&["t"]));
    assert_eq!(tables("COMMENT ON TABLE t IS 'x'"), set(&["t"]));
    assert_eq!(tables("COMMENT ON COLUMN s.t.c IS 'x'"), set(&["s.t"]));
    assert_eq!(tables("EXPLAIN SELECT * FROM t"), set(&["t"]));
    assert_eq!(tables("PREPARE p AS SELECT * FROM t"), set(&["t"]));
}

#[test]
fn classify_functions_everywhere() {
    let cases: &[(&str, &str)] = &[
        ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
        ("SELECT 1 WHERE pg_sleep(1) IS NULL", "pg_sleep"),
        ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
        ("SELECT * FROM ROWS FROM (pg_ls_dir('.'))", "pg_ls_dir"),
        ("SELECT * FROM t, LATERAL pg_read_file(t.path) f", "pg_read_file"),
        ("SELECT 1 ORDER BY pg_sleep(1)", "pg_sleep"),
        ("SELECT 1 GROUP BY 1 HAVING count(lo_export(1, '/tmp/x')) > 0", "lo_export"),
        ("WITH x AS (SELECT dblink_exec('c', 'DROP TABLE t')) SELECT * FROM x", "dblink_exec"),
        ("SELECT (SELECT set_config('role', 'admin', false))", "set_config"),
        ("INSERT INTO t SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "pg_terminate_backend"),
        ("INSERT INTO t VALUES (pg_read_file('x'))", "pg_read_file"),
        ("INSERT INTO t VALUES (1) RETURNING pg_read_file('x')", "pg_read_file"),
        ("UPDATE t SET a = pg_read_file('x') WHERE id = 1", "pg_read_file"),
        ("UPDATE t SET a = 1 WHERE id = 1 RETURNING lo_export(1, '/tmp/x')", "lo_export"),
        ("DELETE FROM t WHERE id = 1 RETURNING pg_read_file('x')", "pg_read_file"),
        ("CREATE TABLE t (a text DEFAULT pg_read_file('x'))", "pg_read_file"),
        ("ALTER TABLE t ALTER COLUMN a SET DEFAULT pg_read_file('x')", "pg_read_file"),
        ("CALL proc()", "proc"),
        ("CALL s.proc(pg_read_file('x'))", "pg_read_file"),
        ("EXECUTE p(pg_read_file('x'))", "pg_read_file"),
        ("SELECT max(x) OVER (ORDER BY pg_sleep(1)) FROM t", "pg_sleep"),
        ("SELECT count(*) FILTER (WHERE pg_sleep(1) IS NULL) FROM t", "pg_sleep"),
        ("SELECT CASE WHEN true THEN pg_read_file('x') END", "pg_read_file"),
        ("SELECT ARRAY[pg_read_file('x')]", "pg_read_file"),
        ("SELECT pg_read_file('x')::int", "pg_read_file"),
        ("VALUES (pg_read_file('x'))", "pg_read_file"),
        ("SELECT 1 FROM t LIMIT pg_backend_pid()", "pg_backend_pid"),
        ("SELECT * FROM t JOIN u ON u.id = pg_backend_pid()", "pg_backend_pid"),
        ("EXPLAIN SELECT pg_read_file('x')", "pg_read_file"),
        ("PREPARE p AS SELECT pg_read_file($1)", "pg_read_file"),
        ("COPY (SELECT pg_read_file('x')) TO STDOUT", "pg_read_file"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = pg_read_file('x')", "pg_read_file"),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = pg_read_file('x')", "pg_read_file"),
        (r#"SELECT U&"pg\005fread\005ffile"('x')"#, "pg_read_file"),
        (r#"SELECT "PG_READ_FILE"('x')"#, "pg_read_file"),
        ("CREATE VIEW v AS SELECT pg_read_file('x')", "pg_read_file"),
    ];
    let mut failures = Vec::new();
    for (sql, function) in cases {
        let found = functions(sql);
        if !found.contains(*function) {
            failures.push(format!("{sql}: {function} not in {found:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn classify_functions_qualified_names() {
    assert_eq!(
        functions("SELECT pg_catalog.pg_read_file('x')"),
        set(&["pg_catalog.pg_read_file", "pg_read_file"])
    );
    assert_eq!(
        functions("SELECT PG_CATALOG.Pg_Read_File('x'), now()"),
        set(&["pg_catalog.pg_read_file", "pg_read_file", "now"])
    );
    assert_eq!(functions("CALL s.p()"), set(&["s.p", "p"]));
}

#[test]
fn classify_has_where() {
    let cases: &[(&str, bool)] = &[
        ("SELECT * FROM t", true),
        ("INSERT INTO t VALUES (1)", true),
        ("DELETE FROM t", false),
        ("DELETE FROM t WHERE id = 1", true),
        // A WHERE is a WHERE, even a trivial one: policies that care must look at the text.
        ("DELETE FROM t WHERE true", true),
        ("DELETE FROM t WHERE CURRENT OF c", true),
        ("UPDATE t SET a = 1", false),
        ("UPDATE t SET a = 1 WHERE id = 1", true),
        ("UPDATE t SET a = 1 FROM u", false),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", false),
        ("WITH d AS (DELETE FROM t WHERE a RETURNING *) SELECT * FROM d", true),
        (
            "WITH d AS (DELETE FROM t WHERE a RETURNING *) UPDATE u SET b = 1",
            false,
        ),
        (
            "WITH d AS (UPDATE t SET a = 1 RETURNING *) DELETE FROM u WHERE id IN (SELECT id FROM d)",
            false,
        ),
        ("PREPARE p AS DELETE FROM t", false),
        ("EXPLAIN ANALYZE DELETE FROM t", false),
        ("EXPLAIN DELETE FROM t", false),
        ("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u", false),
        ("TRUNCATE t", true),
        ("this is not sql", false),
    ];
    let mut failures = Vec::new();
    for (sql, want) in cases {
        let got = one(sql).has_where;
        if got != *want {
            failures.push(format!("{sql}: has_where {got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn classify_splits_statements() {
    let statements = classify("SELECT 1; DROP TABLE t");
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[0].text, "SELECT 1");
    assert_eq!(statements[0].actions, ["sql:select"]);
    assert_eq!(statements[1].text, "DROP TABLE t");
    assert_eq!(statements[1].actions, ["sql:drop"]);
    assert_eq!(statements[1].tables, set(&["t"]));

    let sql = r#"select /*;*/ 1; select "2;", (select 3);"#;
    let texts: Vec<String> = classify(sql).into_iter().map(|s| s.text).collect();
    let split = pg_query::split_with_parser(sql).unwrap();
    assert_eq!(texts, split);

    let sql = "SELECT 'a;b'; -- ; comment\n UPDATE t SET a = $$;$$ WHERE b; ;; DELETE FROM t";
    let statements = classify(sql);
    let split = pg_query::split_with_parser(sql).unwrap();
    assert_eq!(
        statements
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>(),
        split
    );
    assert_eq!(
        statements
            .iter()
            .map(|s| s.primary_action())
            .collect::<Vec<_>>(),
        ["sql:select", "sql:update", "sql:delete"]
    );
    assert!(statements.iter().all(|s| s.parsed));
}

#[test]
fn classify_empty_and_comment_only() {
    assert!(classify("").is_empty());
    assert!(classify("   \n\t").is_empty());
    assert!(classify(";").is_empty());
    assert!(classify(";;;").is_empty());
    assert!(classify("-- just a comment").is_empty());
    assert!(classify("/* a /* nested */ comment */").is_empty());
}

#[test]
fn classify_unparsed_input() {
    for sql in [
        "this is not sql",
        "SELECT 1; this is not sql; DROP TABLE t",
        "DROP TABLE t; SELEC 1",
        "SELECT 'unterminated",
        "SELECT 1 /* unterminated comment",
        "SELECT $$unterminated",
        "SELECT 1\0; DROP TABLE t",
    ] {
        let statements = classify(sql);
        assert_eq!(statements.len(), 1, "{sql}");
        let s = &statements[0];
        assert!(!s.parsed, "{sql}");
        assert_eq!(s.actions, ["sql:unparsed"], "{sql}");
        assert_eq!(s.statement_kind, "unparsed", "{sql}");
        assert_eq!(s.text, sql);
        assert!(!s.has_where);
        assert!(s.tables.is_empty() && s.functions.is_empty());
    }
}

#[test]
fn classify_prepared_names() {
    assert_eq!(one("EXECUTE p").prepared_name.as_deref(), Some("p"));
    assert_eq!(
        one("EXECUTE \"MyPlan\"(1, 2)").prepared_name.as_deref(),
        Some("MyPlan")
    );
    assert_eq!(one("DEALLOCATE p").prepared_name.as_deref(), Some("p"));
    assert_eq!(
        one("DEALLOCATE PREPARE p").prepared_name.as_deref(),
        Some("p")
    );
    assert_eq!(one("DEALLOCATE ALL").prepared_name, None);
    assert_eq!(
        one("EXPLAIN ANALYZE EXECUTE p").prepared_name.as_deref(),
        Some("p")
    );
    assert_eq!(one("EXPLAIN EXECUTE p").prepared_name, None);
    assert_eq!(
        one("CREATE TABLE x AS EXECUTE p").prepared_name.as_deref(),
        Some("p")
    );
    assert_eq!(one("SELECT 1").prepared_name, None);
    let prepare = one("PREPARE p AS DELETE FROM t");
    assert_eq!(prepare.prepared_name.as_deref(), Some("p"));
    assert_eq!(prepare.actions, ["sql:prepare", "sql:delete"]);
}

#[test]
fn classify_standard_conforming_strings_off() {
    // With standard_conforming_strings on, `\'` does not escape: the DROP is visible...
    let sql = r"SELECT 'x\'; DROP TABLE t; --'";
    let on = classify(sql);
    assert!(
        on.iter().any(|s| s.actions.contains(&"sql:drop")),
        "{on:#?}"
    );
    // ...with it off, the same bytes are one string literal.
    let off = classify_with(
        sql,
        &ClassifyOptions {
            standard_conforming_strings: false,
        },
    );
    assert_eq!(off.len(), 1, "{off:#?}");
    assert_eq!(off[0].actions, ["sql:select"]);

    // And the other way round: what hides in a string when on is code when off.
    let sql = r"SELECT 'x\'' ; DROP TABLE t; --'";
    let on = classify(sql);
    assert_eq!(on.len(), 1, "{on:#?}");
    let off = classify_with(
        sql,
        &ClassifyOptions {
            standard_conforming_strings: false,
        },
    );
    assert!(
        off.iter().any(|s| s.actions.contains(&"sql:drop")),
        "{off:#?}"
    );
}

#[test]
fn classify_deep_nesting_does_not_crash() {
    // Ordinary depths classify normally (see the module docs for the limit).
    let moderate = format!("SELECT a{} FROM t", " || a".repeat(40));
    assert!(one(&moderate).parsed);
    let long_and = format!(
        "SELECT 1 FROM t WHERE {}",
        vec!["a = 1"; 1000].join(" AND ")
    );
    assert!(one(&long_and).parsed);
    let depth = 5_000;
    let parens = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
    let sums = format!("SELECT 1{}", "+1".repeat(depth));
    let subqueries = format!(
        "SELECT * FROM {}t{}",
        "(SELECT * FROM ".repeat(depth),
        ") s".repeat(depth)
    );
    let ctes = format!(
        "WITH {} SELECT 1",
        (0..depth)
            .map(|i| format!("c{i} AS (SELECT * FROM c{})", i.saturating_sub(1)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for sql in [parens, sums, subqueries, ctes] {
        let statements = classify(&sql);
        assert_eq!(statements.len(), 1);
        // Either fully classified or refused; never a panic or a partial guess.
        let s = &statements[0];
        assert!(s.parsed || s.actions == ["sql:unparsed"]);
    }
}

#[test]
fn classify_statement_serializes() {
    let json = serde_json::to_value(one("DELETE FROM t")).unwrap();
    assert_eq!(json["actions"], serde_json::json!(["sql:delete"]));
    assert_eq!(json["statement_kind"], "delete");
    assert_eq!(json["tables"], serde_json::json!(["t"]));
    assert_eq!(json["has_where"], false);
}

const FRAGMENTS: &[&str] = &[
    "SELECT",
    "*",
    "FROM",
    "t",
    "WHERE",
    "1",
    ";",
    "(",
    ")",
    ",",
    "'",
    "\"",
    "$$",
    "$x$",
    "/*",
    "*/",
    "--",
    "\n",
    "DELETE FROM t",
    "WITH d AS (",
    "DELETE FROM t RETURNING *)",
    "UPDATE t SET a = 1",
    "INSERT INTO t VALUES (1)",
    "DROP TABLE t",
    "EXPLAIN ANALYZE",
    "PREPARE p AS",
    "EXECUTE p",
    "COPY t TO PROGRAM 'x'",
    "DO $$ BEGIN END $$",
    "pg_read_file('x')",
    "U&\"t\\0061\"",
    "U&'\\0061'",
    "E'\\''",
    "\\",
    "::",
    "CREATE TABLE x AS",
    "UNION",
    "LATERAL",
    "JOIN u ON true",
    "VALUES (1)",
    "é",
    "\u{0}",
    "🦀",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn classify_never_panics_on_arbitrary_text(sql in any::<String>()) {
        let statements = classify(&sql);
        for s in &statements {
            prop_assert!(!s.actions.is_empty());
            prop_assert!(s.actions.iter().all(|a| crate::policy::is_valid_action(a)));
        }
    }

    #[test]
    fn classify_never_panics_on_sql_fragments(
        parts in proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..24),
        seps in proptest::collection::vec(proptest::sample::select(&[" ", "", "\n", ";"][..]), 24),
    ) {
        let sql: String = parts
            .iter()
            .zip(seps.iter())
            .flat_map(|(p, s)| [*p, *s])
            .collect();
        let statements = classify(&sql);
        for s in &statements {
            prop_assert!(!s.actions.is_empty());
            prop_assert!(s.actions.iter().all(|a| crate::policy::is_valid_action(a)));
            if !s.parsed {
                prop_assert_eq!(statements.len(), 1);
                prop_assert_eq!(&s.text, &sql);
            }
        }
    }
}
