//! The streaming JSON masker (`custos_core::mask::JsonMasker`) with a fuzzer-chosen chunking.
//!
//! Input: the raw bytes as the body, or a JSON document built from fuzzer choices with realistic
//! secrets from `mask::corpus` as values (under plain keys and under secret-label keys such as
//! `password`); optionally one of a few field paths. The input's last bytes choose.
//!
//! Properties:
//! - no panic; `JsonPath::from_str` on the input never panics and an accepted path prints as
//!   written;
//! - the output does not depend on the chunking (same bytes as one `push` of the whole body);
//! - `pending()` stays under `MAX_STRING_HOLD` plus the text masker's hold-back, and is 0 after
//!   `finish`;
//! - if the input is valid JSON (`serde_json::from_slice`): the output is valid JSON, `invalid()`
//!   is false, no string value of the output holds a detector match (`Masker::find` over every
//!   string, keys excepted: keys are not masked, by design; placeholders ignored, see
//!   `custos_fuzz::survivors`); without paths the output has the
//!   input's shape (same keys in the same order, same array lengths, scalars equal, a string
//!   stays a string, a number stays a number or becomes a string when masked); when nothing was
//!   masked (`Stats::total() == 0`) the output is byte-identical.
#![no_main]

use std::str::FromStr;

use arbitrary::{Arbitrary, Unstructured};
use custos_core::mask::corpus::{self, Style};
use custos_core::mask::{Detector, JsonMasker, JsonPath, Stats};
use custos_fuzz::{chunks, masker, survivors};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

#[derive(Arbitrary, Debug)]
enum Gen {
    Text(String),
    Secret(u8, u8),
    Number(i64),
    Card(u8),
    Bool(bool),
    Null,
    Array(Vec<Gen>),
    Object(Vec<(u8, Gen)>),
}

const KEYS: &[&str] = &[
    "note",
    "email",
    "password",
    "api_key",
    "client_secret",
    "token",
    "data",
    "items",
    "card",
    "db_pwd",
    "private_key_id",
    "message",
    "content",
];

fn build(g: &Gen, depth: usize) -> Value {
    match g {
        Gen::Text(s) => Value::String(s.clone()),
        Gen::Secret(d, seed) => {
            let kind = Detector::ALL[usize::from(*d) % Detector::ALL.len()];
            let s = corpus::sample(kind, u64::from(*seed), Style::Log);
            let first = s.secrets().next().unwrap_or(&s.text).to_string();
            Value::String(first)
        }
        Gen::Number(n) => Value::from(*n),
        Gen::Card(seed) => {
            let s = corpus::sample(Detector::CreditCard, u64::from(*seed), Style::Log);
            let digits: String = s
                .secrets()
                .next()
                .unwrap_or("4111111111111111")
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            serde_json::from_str(&digits).unwrap_or(Value::Null)
        }
        Gen::Bool(b) => Value::Bool(*b),
        Gen::Null => Value::Null,
        Gen::Array(items) if depth < 8 => {
            Value::Array(items.iter().map(|x| build(x, depth + 1)).collect())
        }
        Gen::Object(fields) if depth < 8 => {
            let mut m = Map::new();
            for (k, v) in fields {
                m.insert(
                    KEYS[usize::from(*k) % KEYS.len()].to_string(),
                    build(v, depth + 1),
                );
            }
            Value::Object(m)
        }
        _ => Value::Null,
    }
}

/// Steering, read from the input's last bytes (the body is the whole input, so hand-written
/// seeds are plain JSON).
#[derive(Arbitrary, Debug)]
struct Control {
    /// Bit 0: build a document from the whole input (`Gen`) instead of using it raw.
    /// Bits 1-3: a field path (0 = none).
    flags: u8,
    sizes: Vec<u8>,
}

/// Bytes at the end of the input that also steer the run.
const CONTROL: usize = 16;

const PATHS: &[&str] = &[
    "$.token",
    "$..password",
    "$.data[*].card",
    "$.items[0]",
    "$['note']",
    "$..*",
    "$",
];

fn run(body: &[u8], paths: &[JsonPath], sizes: &[u8]) -> (Vec<u8>, Stats, bool) {
    let m = masker();
    let hold_cap = JsonMasker::MAX_STRING_HOLD + 2 * m.max_holdback() + 1024;
    let mut jm = JsonMasker::new(m.audit_scope(), paths.to_vec());
    let mut stats = Stats::default();
    let mut out = Vec::new();
    for c in chunks(body, sizes) {
        out.extend(jm.push(c, &mut stats));
        assert!(jm.pending() <= hold_cap, "pending {}", jm.pending());
    }
    out.extend(jm.finish(&mut stats));
    assert_eq!(jm.pending(), 0, "pending after finish");
    (out, stats, jm.invalid())
}

/// Every string value (not keys) of `v`.
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && same_shape(va, vb))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_shape(p, q))
        }
        (Value::String(_), Value::String(_)) => true,
        (Value::Number(_), Value::String(_)) => true,
        (x, y) => x == y,
    }
}

fuzz_target!(|data: &[u8]| {
    let tail = &data[data.len().saturating_sub(CONTROL)..];
    let Ok(control) = Control::arbitrary(&mut Unstructured::new(tail)) else {
        return;
    };
    let mut paths = Vec::new();
    let path = usize::from(control.flags >> 1 & 7);
    if path > 0 {
        let p = PATHS[(path - 1) % PATHS.len()];
        paths.push(JsonPath::from_str(p).expect("valid path"));
    }
    // The path parser on the input itself (as text): never panics, prints as written.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(path) = JsonPath::from_str(text) {
            assert_eq!(path.as_str(), text);
        }
    }
    let body = if control.flags & 1 == 1 {
        let Ok(g) = Gen::arbitrary(&mut Unstructured::new(data)) else {
            return;
        };
        serde_json::to_vec(&build(&g, 0)).unwrap()
    } else {
        data.to_vec()
    };
    let sizes = &control.sizes;

    let (out, stats, invalid) = run(&body, &paths, sizes);
    let (whole, _, _) = run(&body, &paths, &[]);
    assert!(
        out == whole,
        "output depends on the chunking:\n chunked {:?}: {:?}\n whole:   {:?}",
        chunks(&body, sizes)
            .iter()
            .map(|c| c.len())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&whole)
    );

    let Ok(original) = serde_json::from_slice::<Value>(&body) else {
        return;
    };
    assert!(!invalid, "valid JSON reported invalid");
    let masked: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!(
            "valid JSON in, invalid out ({e}): {}",
            String::from_utf8_lossy(&out)
        ),
    };
    let mut values = Vec::new();
    strings(&masked, &mut values);
    for s in values {
        let found = survivors(s);
        assert!(
            found.is_empty(),
            "{found:?} survives in the value {s:?}; body {:?}, output {:?}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&out)
        );
    }
    if paths.is_empty() {
        assert!(same_shape(&original, &masked), "shape changed");
    }
    if stats.total() == 0 {
        assert!(out == body, "nothing masked, yet the bytes changed");
    }
});
