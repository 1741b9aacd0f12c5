//! The `[masking]` configuration: detectors, strategies, column rules, exemptions, hash key.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The `[masking]` section of a configuration file.
///
/// ```toml
/// [masking]
/// detectors = []                     # empty: every built-in detector
/// disable = ["phone"]                # minus these
/// default_strategy = "redact"
/// hash_key = "4f1c…"                 # hex, at least 16 bytes; REQUIRED in production
/// strategies = { email = "hash", credit_card = { partial = 4 } }
/// columns = [
///   { pattern = "*email*", strategy = "hash" },
///   { pattern = "public.users.ssn", strategy = "null" },
/// ]
/// exempt = [ { connection = "staging", groups = ["dba"] } ]
/// ```
#[derive(Deserialize, Serialize, Default, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MaskConfig {
    /// Enabled detector names; empty means every built-in detector.
    pub detectors: Vec<String>,
    /// Detector names to switch off (applied after `detectors`).
    pub disable: Vec<String>,
    /// Strategy for detectors without an entry in `strategies` (default `redact`).
    pub default_strategy: Strategy,
    /// Strategy per detector name.
    pub strategies: BTreeMap<String, Strategy>,
    /// Column rules, first match wins. They apply to column values only (not to free text).
    pub columns: Vec<ColumnRule>,
    /// Who sees clear data where.
    pub exempt: Vec<Exemption>,
    /// Hex HMAC key for the `hash` strategy (at least 16 bytes). When absent a key derived from a
    /// constant built into custos is used: fine for `custos mask` demos, useless as protection
    /// (anyone can recompute the hashes of guessed values). Production must set it.
    pub hash_key: Option<String>,
}

/// A column rule: a pattern and the strategy for every value of matching columns.
#[derive(Deserialize, Serialize, Default, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ColumnRule {
    /// `*email*` (a column-name glob), `users.ssn` (table.column) or `public.users.ssn`
    /// (schema.table.column). `*` and `?` are wildcards; matching ignores ASCII case.
    pub pattern: String,
    /// The strategy; absent means the configuration's `default_strategy`.
    pub strategy: Option<Strategy>,
}

/// Members of any of `groups` see clear data on connections matching `connection`.
#[derive(Deserialize, Serialize, Default, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Exemption {
    /// Connection name or glob (`staging`, `dev-*`, `*`).
    pub connection: String,
    /// Group names; `"*"` means everyone on that connection. Must not be empty.
    pub groups: Vec<String>,
}

/// What replaces a detected value.
///
/// In TOML: `"redact"`, `"hash"`, `"null"`, `"partial"` (keeps 4), `"partial:6"` or
/// `{ partial = 6 }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// `[REDACTED:<detector>]` (`[REDACTED:column]` for column rules).
    #[default]
    Redact,
    /// Keep the last `keep` characters and replace the others with `*`. A value of at most
    /// `2 * keep` characters is starred entirely, so short values are never shown whole.
    Partial { keep: usize },
    /// `h:` + the first 16 hex digits of HMAC-SHA256(hash_key, value): deterministic, so masked
    /// values still join and group.
    Hash,
    /// The column value becomes SQL NULL; in free text this acts like `Redact`.
    Null,
}

impl Strategy {
    fn parse_name(s: &str) -> Option<Strategy> {
        match s {
            "redact" => Some(Strategy::Redact),
            "hash" => Some(Strategy::Hash),
            "null" => Some(Strategy::Null),
            "partial" => Some(Strategy::Partial { keep: 4 }),
            _ => {
                let n = s.strip_prefix("partial:")?;
                n.trim().parse().ok().map(|keep| Strategy::Partial { keep })
            }
        }
    }
}

impl Serialize for Strategy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Strategy::Redact => s.serialize_str("redact"),
            Strategy::Hash => s.serialize_str("hash"),
            Strategy::Null => s.serialize_str("null"),
            Strategy::Partial { keep } => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("partial", keep)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Strategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str =
            r#""redact", "hash", "null", "partial", "partial:N" or { partial = N }"#;
        impl<'de> Visitor<'de> for V {
            type Value = Strategy;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Strategy, E> {
                Strategy::parse_name(v).ok_or_else(|| {
                    E::custom(format!("unknown strategy {v:?}; expected {EXPECTED}"))
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strategy, A::Error> {
                let mut keep = None;
                while let Some(k) = map.next_key::<String>()? {
                    if k != "partial" || keep.is_some() {
                        return Err(de::Error::custom(format!(
                            "unknown strategy key {k:?}; expected {EXPECTED}"
                        )));
                    }
                    keep = Some(map.next_value::<usize>()?);
                }
                keep.map(|keep| Strategy::Partial { keep }).ok_or_else(|| {
                    de::Error::custom(format!("empty strategy; expected {EXPECTED}"))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A configuration mistake, naming the field (`columns[2].pattern`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("masking.{field}: {reason}")]
pub struct MaskConfigError {
    pub field: String,
    pub reason: String,
}

impl MaskConfigError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        MaskConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A compiled column pattern.
#[derive(Clone, Debug)]
pub(crate) struct ColumnPattern {
    /// schema.table glob, table glob or none.
    table: Option<String>,
    column: String,
}

impl ColumnPattern {
    pub(crate) fn parse(p: &str) -> Result<ColumnPattern, String> {
        let p = p.trim();
        if p.is_empty() {
            return Err("empty pattern".into());
        }
        if p.chars().any(|c| c.is_whitespace() || c == '"' || c == '`') {
            return Err(format!("pattern {p:?} contains blanks or quotes"));
        }
        let parts: Vec<&str> = p.split('.').collect();
        if parts.iter().any(|s| s.is_empty()) {
            return Err(format!("pattern {p:?} has an empty part"));
        }
        match parts.as_slice() {
            [c] => Ok(ColumnPattern {
                table: None,
                column: c.to_ascii_lowercase(),
            }),
            [t, c] => Ok(ColumnPattern {
                table: Some(t.to_ascii_lowercase()),
                column: c.to_ascii_lowercase(),
            }),
            [s, t, c] => Ok(ColumnPattern {
                table: Some(format!("{s}.{t}").to_ascii_lowercase()),
                column: c.to_ascii_lowercase(),
            }),
            _ => Err(format!(
                "pattern {p:?} has more than three parts (use column, table.column or schema.table.column)"
            )),
        }
    }

    /// `table` is `schema.table` or `table` when the protocol knows it. A table-qualified rule
    /// also applies when the table is unknown (a computed or aliased column): masking too much
    /// is the safe side.
    pub(crate) fn matches(&self, table: Option<&str>, column: &str) -> bool {
        if !glob(&self.column, column, true) {
            return false;
        }
        let (Some(pt), Some(t)) = (&self.table, table) else {
            return true;
        };
        let pt_has_schema = pt.contains('.');
        let t_has_schema = t.contains('.');
        match (pt_has_schema, t_has_schema) {
            (true, true) | (false, false) => glob(pt, t, true),
            // rule `users.ssn`, table `public.users`: compare the table names
            (false, true) => glob(pt, t.rsplit('.').next().unwrap_or(t), true),
            // rule `public.users.ssn`, table `users` (schema unknown): compare the table names
            (true, false) => glob(pt.rsplit('.').next().unwrap_or(pt), t, true),
        }
    }
}

/// Glob with `*` (any run) and `?` (one character).
pub(crate) fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let eq = |a: char, b: char| {
        if ignore_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && eq(p[pi], t[ti]))) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}
