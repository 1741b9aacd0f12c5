//! What a server (or a client after start-up) sends, through `wire::Reader`, the way the relay
//! drives it: a header, then the body buffered (if its declared length is under the caller's cap)
//! or streamed in chunks, the peer's bytes delivered a fuzzer-chosen few at a time.
//!
//! Properties:
//! - no panic, whatever the bytes and however they are split across reads;
//! - the reader agrees with a reference framer over the whole input: the same headers, bodies and
//!   chunk bytes, `Closed` exactly when the input runs out, `Protocol` exactly for a length
//!   under 4; `buffered()` is always "delivered minus handed out";
//! - memory: buffering a body never makes an allocation larger than about twice its declared
//!   length plus what the peer actually sent (the reader may reserve what the header announces;
//!   that is why every caller checks the length against its cap first — here a length over the
//!   cap is an error before any `body()` call, as in the relay); streaming a body of any declared
//!   length, up to 2 GiB, allocates only in proportion to the bytes that arrived;
//! - `Writer::msg` output read back through the reader gives the same messages.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use custos_edge::pg::wire::{Reader, WireError, Writer, CHUNK};
use custos_fuzz::{arm, disarm, runtime, Counting, Trickle};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` and return the largest single allocation it made.
async fn largest<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    arm();
    let out = f.await;
    (out, disarm())
}

/// Slack over the bounds: the reader's initial 16 KiB buffer and `bytes`' growth policy (a shared
/// buffer that must grow is reallocated with up to twice its original capacity, at most 128 KiB).
const SLACK: usize = 256 * 1024;

#[derive(Arbitrary, Debug)]
struct Setup {
    /// Bytes per read from the peer (0 = 1).
    step: u8,
    /// The caller's cap on buffered bodies: the relay's login cap (64 KiB), the upstream login
    /// cap (1 MiB), or a small one so that the refusal path runs often.
    cap: u8,
    /// Bodies over this are streamed in chunks (the relay's `STREAM_ABOVE`, scaled down).
    stream_above: u16,
    /// Chunk size asked for when streaming (0 = `CHUNK`).
    chunk: u16,
    /// Read a start-up packet first.
    startup: bool,
    /// Messages for the writer round trip (decoded from the whole input).
    #[arbitrary(default)]
    messages: Vec<(u8, Vec<u8>)>,
}

fn cap(c: u8) -> usize {
    match c % 3 {
        0 => 64 * 1024,
        1 => 1 << 20,
        _ => 64,
    }
}

/// The reference framer's view of one message at `pos`.
enum Next {
    /// Fewer than 5 bytes left.
    Closed,
    BadLength,
    Msg {
        tag: u8,
        len: usize,
    },
}

fn next(data: &[u8], pos: usize) -> Next {
    let Some(h) = data.get(pos..pos + 5) else {
        return Next::Closed;
    };
    let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len < 4 {
        return Next::BadLength;
    }
    Next::Msg {
        tag: h[0],
        len: len as usize - 4,
    }
}

async fn drive(data: &[u8], s: &Setup) {
    let trickle = Trickle::new(data, usize::from(s.step));
    let delivered = trickle.delivered.clone();
    let mut r = Reader::new(trickle);
    let cap = cap(s.cap);
    let chunk_max = if s.chunk == 0 {
        CHUNK
    } else {
        usize::from(s.chunk)
    };
    let mut pos = 0usize;
    let check_buffered = |r: &Reader<Trickle<'_>>, pos: usize| {
        assert_eq!(r.buffered(), delivered.get() - pos, "buffered() at {pos}");
    };

    if s.startup {
        let want = data
            .get(..4)
            .map(|b| i32::from_be_bytes(b.try_into().unwrap()));
        let (got, big) = largest(r.startup()).await;
        assert!(
            big <= 2 * (10_000 + data.len()) + SLACK,
            "start-up allocated {big}"
        );
        match (got, want) {
            (Ok(body), Some(len)) => {
                assert!((8..=10_000).contains(&len), "accepted length {len}");
                assert_eq!(&body[..], &data[4..len as usize]);
                pos = len as usize;
            }
            (Err(WireError::Closed), Some(len)) => {
                assert!((8..=10_000).contains(&len) && data.len() < len as usize);
                return;
            }
            (Err(WireError::Closed), None) => return,
            (Err(WireError::Protocol(_)), Some(len)) => {
                assert!(!(8..=10_000).contains(&len), "refused length {len}");
                return;
            }
            (g, w) => panic!("startup: {g:?} vs reference length {w:?}"),
        }
        check_buffered(&r, pos);
    }

    loop {
        let h = r.header().await;
        match (h, next(data, pos)) {
            (Err(WireError::Closed), Next::Closed) => return,
            (Err(WireError::Protocol(_)), Next::BadLength) => return,
            (Ok(h), Next::Msg { tag, len }) => {
                assert_eq!((h.tag, h.len), (tag, len));
                pos += 5;
            }
            (h, _) => panic!("header at {pos}: {h:?}"),
        }
        let Next::Msg { len, .. } = next(data, pos - 5) else {
            unreachable!()
        };
        check_buffered(&r, pos);
        let available = data.len() - pos;
        if len > usize::from(s.stream_above) {
            // Streamed: chunks of at most `chunk_max`, at least one byte each.
            let mut left = len;
            while left > 0 {
                let max = left.min(chunk_max);
                let (c, big) = largest(r.chunk(max)).await;
                assert!(
                    big <= 2 * (8192 + data.len()) + SLACK,
                    "chunk allocated {big} (declared {len})"
                );
                match c {
                    Ok(c) => {
                        assert!(
                            !c.is_empty() && c.len() <= max,
                            "chunk of {} for max {max}",
                            c.len()
                        );
                        assert_eq!(&c[..], &data[pos..pos + c.len()]);
                        pos += c.len();
                        left -= c.len();
                    }
                    Err(WireError::Closed) => {
                        assert_eq!(pos, data.len(), "closed early");
                        return;
                    }
                    Err(e) => panic!("chunk: {e}"),
                }
                check_buffered(&r, pos);
            }
            continue;
        }
        if len > cap {
            // The caller refuses it (WireError::TooLarge) without reading the body.
            return;
        }
        let (b, big) = largest(r.body(len)).await;
        assert!(
            big <= 2 * (len.max(8192) + data.len()) + SLACK,
            "body of declared length {len} allocated {big}"
        );
        match b {
            Ok(b) => {
                assert!(len <= available);
                assert_eq!(&b[..], &data[pos..pos + len]);
                pos += len;
            }
            Err(WireError::Closed) => {
                assert!(
                    len > available,
                    "closed with {available} of {len} bytes there"
                );
                return;
            }
            Err(e) => panic!("body: {e}"),
        }
        check_buffered(&r, pos);
    }
}

async fn writer_round_trip(s: &Setup) {
    let mut w = Writer::new(Vec::new());
    for (tag, body) in &s.messages {
        w.msg(*tag, body);
    }
    w.flush().await.unwrap();
    let bytes = w.into_inner();
    let mut r = Reader::new(Trickle::new(&bytes, usize::from(s.step)));
    for (tag, body) in &s.messages {
        let h = r.header().await.unwrap();
        assert_eq!((h.tag, h.len), (*tag, body.len()));
        assert_eq!(&r.body(h.len).await.unwrap()[..], &body[..]);
    }
    assert!(matches!(r.header().await, Err(WireError::Closed)));
    assert!(r.into_inner().is_ok());
}

/// Bytes at the end of the input that also steer the run (the peer's bytes are the whole input,
/// so hand-written seeds are plain protocol captures).
const CONTROL: usize = 8;

fuzz_target!(|data: &[u8]| {
    let tail = &data[data.len().saturating_sub(CONTROL)..];
    let Ok(mut setup) = Setup::arbitrary(&mut Unstructured::new(tail)) else {
        return;
    };
    setup.messages = Vec::arbitrary(&mut Unstructured::new(data)).unwrap_or_default();
    runtime().block_on(async {
        drive(data, &setup).await;
        writer_round_trip(&setup).await;
    });
});
