//! The edge's Postgres codec on what a client sends: `custos_edge::pg::wire`.
//!
//! Properties:
//! - no parser panics on any bytes (`parse_startup_params`, `parse_error`, every `Body` method);
//! - `Body` agrees with a reference decoder: each read returns the bytes at the cursor, and
//!   `remaining()` drops by exactly what was read;
//! - `parse_startup_params` is a fixed point through `startup_packet`: whatever it parsed, encoded
//!   and parsed again, is the same list;
//! - `startup_packet(p)` read back through `Reader::startup` (split across reads anywhere) gives
//!   `PROTOCOL_V3` and `p` again, for parameters with non-empty names and no NUL; a packet over
//!   `MAX_STARTUP` is refused;
//! - `parse_error(error_body(s, c, m, d, h))` gives back `s`, `c`, `m` (no NUL in them).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use custos_edge::pg::wire::{
    error_body, parse_error, parse_startup_params, startup_packet, Body, Reader, WireError,
    MAX_STARTUP, PROTOCOL_V3,
};
use custos_fuzz::{runtime, Trickle};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    U8,
    I16,
    I32,
    Bytes(u16),
    Cstr,
    Value,
}

#[derive(Arbitrary, Debug)]
struct Case {
    ops: Vec<Op>,
    params: Vec<(String, String)>,
    step: u8,
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

/// Reference reads over `data[*pos..]`; `None` where the cursor must report a truncated message.
fn reference(op: &Op, data: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    let rest = &data[*pos..];
    let take = |n: usize, pos: &mut usize| -> Option<Vec<u8>> {
        let v = data.get(*pos..*pos + n)?.to_vec();
        *pos += n;
        Some(v)
    };
    match op {
        Op::U8 => take(1, pos),
        Op::I16 => take(2, pos),
        Op::I32 => take(4, pos),
        Op::Bytes(n) => take(usize::from(*n), pos),
        Op::Cstr => {
            let end = rest.iter().position(|&c| c == 0)?;
            let v = rest[..end].to_vec();
            *pos += end + 1;
            Some(v)
        }
        Op::Value => {
            let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
            *pos += 4;
            if len < 0 {
                return Some(b"<null>".to_vec());
            }
            take(len as usize, pos)
        }
    }
}

fn run_ops(data: &[u8], ops: &[Op]) {
    let mut body = Body::new(data);
    let mut pos = 0usize;
    for op in ops {
        let before = body.remaining();
        assert_eq!(before, data.len() - pos, "remaining() out of step");
        let want = reference(op, data, &mut pos);
        let got: Result<Vec<u8>, WireError> = match op {
            Op::U8 => body.u8().map(|v| vec![v]),
            Op::I16 => body.i16().map(|v| v.to_be_bytes().to_vec()),
            Op::I32 => body.i32().map(|v| v.to_be_bytes().to_vec()),
            Op::Bytes(n) => body.bytes(usize::from(*n)).map(<[u8]>::to_vec),
            Op::Cstr => body.cstr().map(String::into_bytes),
            Op::Value => body
                .value()
                .map(|v| v.map_or(b"<null>".to_vec(), <[u8]>::to_vec)),
        };
        match (got, want) {
            (Ok(g), Some(w)) => {
                if matches!(op, Op::Cstr) {
                    // The cursor decodes lossily.
                    assert_eq!(g, String::from_utf8_lossy(&w).as_bytes(), "{op:?}");
                } else {
                    assert_eq!(g, w, "{op:?}");
                }
            }
            (Err(WireError::Protocol(_)), None) => {
                // A failed read does not move the cursor, except `value()` whose length was read
                // before its bytes turned out to be missing (the message is dropped anyway).
                if !matches!(op, Op::Value) {
                    assert_eq!(body.remaining(), before, "{op:?} moved on failure");
                }
                return;
            }
            (g, w) => panic!("{op:?}: cursor {g:?}, reference {w:?}"),
        }
    }
}

fn startup_round_trip(params: &[(String, String)], step: u8) {
    // Names must be non-empty (an empty name ends the list) and nothing may hold a NUL: the
    // encoder writes them as C strings without checking.
    let params: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.replace('\0', ""), v.replace('\0', "")))
        .filter(|(k, _)| !k.is_empty())
        .collect();
    let pkt = startup_packet(&params);
    let len = i32::from_be_bytes(pkt[..4].try_into().unwrap());
    assert_eq!(len as usize, pkt.len(), "length prefix");
    let body = &pkt[4..];
    assert_eq!(
        i32::from_be_bytes(body[..4].try_into().unwrap()),
        PROTOCOL_V3
    );
    assert_eq!(parse_startup_params(&body[4..]).unwrap(), params);

    // Through the reader, split across reads.
    let read = runtime().block_on(async {
        let mut r = Reader::new(Trickle::new(&pkt, usize::from(step)));
        r.startup().await
    });
    match read {
        Ok(b) => {
            assert!(pkt.len() <= MAX_STARTUP);
            assert_eq!(&b[..], body);
        }
        Err(WireError::Protocol(_)) => assert!(pkt.len() > MAX_STARTUP, "refused {len} bytes"),
        Err(e) => panic!("startup: {e}"),
    }
}

fn error_round_trip(c: &Case) {
    let clean = |s: &str| s.replace('\0', "");
    let (s, code, m) = (clean(&c.severity), clean(&c.code), clean(&c.message));
    let d = c.detail.as_deref().map(clean);
    let h = c.hint.as_deref().map(clean);
    let body = error_body(&s, &code, &m, d.as_deref(), h.as_deref());
    let e = parse_error(&body);
    assert_eq!((e.severity, e.code, e.message), (s, code, m));
}

fuzz_target!(|data: &[u8]| {
    // Raw client bytes through every parser.
    if let Ok(params) = parse_startup_params(data) {
        assert!(params
            .iter()
            .all(|(k, v)| !k.is_empty() && !k.contains('\0') && !v.contains('\0')));
        let pkt = startup_packet(&params);
        assert_eq!(
            parse_startup_params(&pkt[8..]).unwrap(),
            params,
            "fixed point"
        );
    }
    let e = parse_error(data);
    let again = parse_error(&error_body(&e.severity, "", &e.message, None, None));
    assert_eq!((again.severity, again.message), (e.severity, e.message));
    let _ = runtime().block_on(async { Reader::new(data).startup().await });

    // Structured cases from the same bytes.
    let mut u = Unstructured::new(data);
    if let Ok(case) = Case::arbitrary(&mut u) {
        run_ops(u.peek_bytes(u.len()).unwrap_or_default(), &case.ops);
        run_ops(data, &case.ops);
        startup_round_trip(&case.params, case.step);
        error_round_trip(&case);
    }
});
