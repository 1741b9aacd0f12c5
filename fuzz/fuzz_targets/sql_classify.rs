//! SQL classification (`custos_core::classify::classify_with`) on arbitrary text.
//!
//! Properties, on the raw input (UTF-8, or the bytes decoded lossily), in both lexing modes
//! (`standard_conforming_strings` on and off):
//! - no panic escapes `classify_with` (it catches panics of pg_query's Rust post-processing and
//!   answers "unparsed"; the hook installed below lets exactly those unwind, as in production);
//! - every statement has at least one action, each a known policy action (`policy::ACTIONS`);
//! - unparsed text is exactly one `sql:unparsed` statement over the whole input, `has_where`
//!   false; a parsed statement's text is a slice of the input;
//! - against pg_query itself: text it rejects is unparsed; text it accepts gives one statement
//!   per raw statement (or one unparsed, for trees deeper than prost's recursion limit); a single
//!   top-level `DELETE`/`UPDATE` without `WHERE` has `has_where == false`, and with a `WHERE`
//!   and no other `DELETE`/`UPDATE` anywhere in its tree, `has_where == true`;
//! - classification is deterministic (same input, same result).
//!
//! And on generated statements (`DELETE`/`UPDATE` with and without `WHERE`, plain, after another
//! statement, in a data-modifying CTE, under `EXPLAIN ANALYZE` or `PREPARE`): `has_where` is
//! exactly "the generated statement has a WHERE", the DML action is there, the target table is
//! listed.
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use arbitrary::{Arbitrary, Unstructured};
use custos_core::classify::{classify_with, ClassifyOptions, Statement};
use custos_core::policy::ACTIONS;
use libfuzzer_sys::fuzz_target;
use pg_query::NodeEnum;

/// ASan's fake stacks (`detect_stack_use_after_return`) move C frames off the thread's stack, and
/// libpg_query's stack-depth check (measured from frame addresses) then reports "stack depth
/// limit exceeded" for ordinary statements (seen: a CTE with a sub-select in its WHERE), which
/// classify rightly turns into `unparsed`. Production has no fake stacks: turn them off here so
/// the target sees the parser as it runs in production.
#[no_mangle]
pub extern "C" fn __asan_default_options() -> *const std::ffi::c_char {
    c"detect_stack_use_after_return=0:detect_odr_violation=0".as_ptr()
}

/// Panics inside pg_query that `classify_with` caught (reported once each on stderr).
static CAUGHT: AtomicUsize = AtomicUsize::new(0);

/// libfuzzer-sys aborts on every panic, even one the code under test catches. classify catches
/// panics from pg_query on purpose, so let those unwind (and say so); anything else aborts.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_pg_query = info
                .location()
                .is_some_and(|l| l.file().contains("pg_query-"));
            if in_pg_query {
                if CAUGHT.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!(
                        "note: pg_query panicked (classify turns it into `unparsed`): {info}"
                    );
                }
                return;
            }
            abort_hook(info);
        }));
    });
}

fn check_shape(sql: &str, out: &[Statement]) {
    for s in out {
        assert!(!s.actions.is_empty(), "no action: {s:?}");
        for a in &s.actions {
            assert!(ACTIONS.contains(a), "unknown action {a}");
        }
        if s.parsed {
            assert!(
                sql.contains(s.text.as_str()),
                "statement text is not from the input"
            );
            assert_ne!(s.statement_kind, "unparsed");
        } else {
            assert_eq!(out.len(), 1, "unparsed must be the only statement");
            assert_eq!(s.actions, ["sql:unparsed"]);
            assert!(!s.has_where);
            assert_eq!(s.text, sql);
        }
    }
}

/// What pg_query says about the text (the same parser, called directly).
fn oracle(sql: &str, options: &ClassifyOptions, out: &[Statement]) {
    let mut po = pg_query::ParserOptions::DEFAULT;
    if !options.standard_conforming_strings {
        po |= pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    }
    let parsed = match std::panic::catch_unwind(|| pg_query::parse(sql, po)) {
        Ok(Ok(p)) => p,
        _ => {
            assert!(
                out.len() == 1 && !out[0].parsed,
                "pg_query rejects it, classify did not"
            );
            return;
        }
    };
    let stmts = &parsed.protobuf.stmts;
    let unparsed = out.len() == 1 && !out[0].parsed;
    if unparsed {
        // Allowed only when the tree could not be converted (prost's recursion limit).
        return;
    }
    assert_eq!(out.len(), stmts.len(), "one statement per raw statement");
    if stmts.len() != 1 {
        return;
    }
    let Some(node) = stmts[0].stmt.as_deref().and_then(|n| n.node.as_ref()) else {
        return;
    };
    let where_clause = match node {
        NodeEnum::DeleteStmt(d) => d.where_clause.is_some(),
        NodeEnum::UpdateStmt(u) => u.where_clause.is_some(),
        _ => return,
    };
    if !where_clause {
        assert!(
            !out[0].has_where,
            "DELETE/UPDATE without WHERE reported has_where: {sql:?}"
        );
        return;
    }
    // With a WHERE: true unless another DELETE/UPDATE hides in the tree (CTE, subquery).
    let json = serde_json::to_string(&stmts[0]).unwrap_or_default();
    let dml = json.matches("\"DeleteStmt\"").count() + json.matches("\"UpdateStmt\"").count();
    if dml == 1 {
        assert!(
            out[0].has_where,
            "DELETE/UPDATE with WHERE reported has_where false: {sql:?}"
        );
    }
}

fn check_text(sql: &str, options: &ClassifyOptions) {
    let out = classify_with(sql, options);
    check_shape(sql, &out);
    oracle(sql, options, &out);
    assert_eq!(classify_with(sql, options), out, "not deterministic");
}

#[derive(Arbitrary, Debug)]
struct Gen {
    delete: bool,
    schema: Option<u16>,
    table: u16,
    alias: bool,
    join: bool,
    predicate: Option<u8>,
    returning: bool,
    wrap: u8,
    scs: bool,
}

const PREDICATES: &[&str] = &[
    "id = 1",
    "true",
    "a IN (SELECT b FROM t_other)",
    "EXISTS (SELECT 1 FROM t_other o WHERE o.id = 3)",
    "name = 'it''s' AND x <> $1",
    "CURRENT OF c_cursor",
    "(SELECT count(*) FROM t_other) > 0",
];

fn generated(g: &Gen) {
    let table = format!("t_{}", g.table);
    let rel = match g.schema {
        Some(s) => format!("s_{s}.{table}"),
        None => table.clone(),
    };
    let current_of = g.predicate.map(|p| usize::from(p) % PREDICATES.len()) == Some(5);
    let mut stmt = if g.delete {
        format!("DELETE FROM {rel}")
    } else {
        format!("UPDATE {rel}")
    };
    if g.alias {
        stmt.push_str(" AS x");
    }
    if !g.delete {
        stmt.push_str(" SET c_1 = c_1 + 1, c_2 = DEFAULT");
    }
    if g.join && !current_of {
        stmt.push_str(if g.delete {
            " USING t_join j"
        } else {
            " FROM t_join j"
        });
    }
    if let Some(p) = g.predicate {
        stmt.push_str(" WHERE ");
        stmt.push_str(PREDICATES[usize::from(p) % PREDICATES.len()]);
    }
    let with_returning = |s: &str| format!("{s} RETURNING *");
    let sql = match g.wrap % 5 {
        0 => stmt.clone(),
        1 => format!(
            "SELECT 1; {}",
            if g.returning {
                with_returning(&stmt)
            } else {
                stmt.clone()
            }
        ),
        2 => format!("WITH d AS ({}) SELECT * FROM d", with_returning(&stmt)),
        3 => format!("EXPLAIN ANALYZE {stmt}"),
        _ => format!("PREPARE p_1 AS {stmt}"),
    };
    let options = ClassifyOptions {
        standard_conforming_strings: g.scs,
    };
    let out = classify_with(&sql, &options);
    check_shape(&sql, &out);
    let mut po = pg_query::ParserOptions::DEFAULT;
    if !g.scs {
        po |= pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    }
    if let Err(e) = pg_query::parse(&sql, po) {
        panic!("the generator wrote SQL that pg_query rejects ({e}): {sql:?}");
    }
    let last = out.last().unwrap_or_else(|| panic!("nothing for {sql:?}"));
    assert!(
        last.parsed,
        "generated SQL classified as unparsed: {sql:?}: {out:?}"
    );
    assert_eq!(last.has_where, g.predicate.is_some(), "{sql:?}: {last:?}");
    let action = if g.delete { "sql:delete" } else { "sql:update" };
    assert!(
        last.actions.contains(&action),
        "{sql:?}: {:?}",
        last.actions
    );
    assert!(last.tables.contains(&rel), "{sql:?}: {:?}", last.tables);
}

fuzz_target!(|data: &[u8]| {
    install_hook();
    let sql = String::from_utf8_lossy(data);
    for scs in [true, false] {
        check_text(
            &sql,
            &ClassifyOptions {
                standard_conforming_strings: scs,
            },
        );
    }
    if let Ok(g) = Gen::arbitrary(&mut Unstructured::new(data)) {
        generated(&g);
    }
});
