//! The SQL bypass corpus: every line of `tests/data/sql_bypass.tsv` is a statement an agent
//! might use to sneak something past a policy, and what the classifier must detect in it.

use std::path::Path;

use custos_core::classify::{classify, Statement};

const MIN_CASES: usize = 60;

/// Checks one expectation; `Err` explains what was missing.
fn check(expectation: &str, statements: &[Statement]) -> Result<(), String> {
    let ok = if let Some(action) = expectation.strip_prefix("sql:") {
        let action = format!("sql:{action}");
        if !custos_core::policy::is_valid_action(&action) {
            return Err(format!(
                "{action} is not a policy action (typo in the corpus?)"
            ));
        }
        statements
            .iter()
            .any(|s| s.actions.contains(&action.as_str()))
    } else if let Some(function) = expectation.strip_prefix("fn:") {
        statements.iter().any(|s| s.functions.contains(function))
    } else if let Some(kind) = expectation.strip_prefix("kind:") {
        statements.iter().any(|s| s.statement_kind == kind)
    } else if let Some(table) = expectation.strip_prefix("table:") {
        statements.iter().any(|s| s.tables.contains(table))
    } else if expectation == "nowhere" {
        statements.iter().any(|s| s.parsed && !s.has_where)
    } else if expectation == "where" {
        !statements.is_empty() && statements.iter().all(|s| s.parsed && s.has_where)
    } else {
        return Err(format!("unknown expectation {expectation:?}"));
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{expectation} not detected"))
    }
}

fn summary(statements: &[Statement]) -> String {
    statements
        .iter()
        .map(|s| {
            format!(
                "[{} kind={} actions={:?} tables={:?} functions={:?} has_where={}]",
                s.text, s.statement_kind, s.actions, s.tables, s.functions, s.has_where
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn sql_bypass_corpus() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sql_bypass.tsv");
    let corpus = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));

    let mut cases = 0;
    let mut failures = Vec::new();
    for (index, line) in corpus.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((expectations, sql)) = line.split_once('\t') else {
            failures.push(format!(
                "line {number}: no TAB between expectation and SQL: {line}"
            ));
            continue;
        };
        cases += 1;
        let sql = sql.replace("{NL}", "\n").replace("{TAB}", "\t");
        let statements = classify(&sql);
        for expectation in expectations.split(',').map(str::trim) {
            if let Err(why) = check(expectation, &statements) {
                failures.push(format!(
                    "line {number}: {why}\n    sql: {sql}\n    got: {}",
                    summary(&statements)
                ));
            }
        }
    }

    for failure in &failures {
        eprintln!("{failure}");
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} bypass cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        cases >= MIN_CASES,
        "the bypass corpus has {cases} cases, want at least {MIN_CASES}"
    );
}
