//! The control plane's snapshot file format (`controlplane/src/snapshot.rs`: `Writer`, `Reader`,
//! `verify`), included by path: the controlplane crate itself would bring RocksDB into the fuzz
//! build. A follower reads these files from its leader's chunks and from its own disk at start.
//!
//! Input: raw bytes, or a snapshot the fuzzer describes (sections and records), written with
//! `Writer` and then damaged one way (a byte changed, cut short, bytes appended) or left whole;
//! the reader reads through a fuzzer-chosen number of bytes per `read`.
//!
//! Properties:
//! - no panic on any bytes;
//! - memory: reading never makes an allocation larger than twice the input plus 64 KiB, whatever
//!   lengths the bytes declare (a damaged length must not reserve up to `MAX_VALUE`);
//! - whatever `verify` accepts is canonical: writing the frames it read with `Writer` gives the
//!   same bytes, and the same record count and digest;
//! - a written snapshot verifies, with the frames, count and digest the writer reported;
//! - a damaged one never does: every changed byte, every cut and any appended byte is an error.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use custos_fuzz::{arm, disarm, Counting, Trickle};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../controlplane/src/snapshot.rs"]
mod snapshot;

use snapshot::{verify, FormatError, Frame, Reader, Writer};

#[global_allocator]
static ALLOC: Counting = Counting;

/// Read `bytes` through: the frames, and the summary or the error; asserts the memory bound.
fn read_all(bytes: &[u8], step: usize) -> (Vec<Frame>, Result<snapshot::Summary, FormatError>) {
    arm();
    let mut frames = Vec::new();
    let res = (|| {
        let mut r = Reader::new(Trickle::new(bytes, step))?;
        while let Some(f) = r.next_frame()? {
            frames.push(f);
        }
        Ok(r.summary().expect("set at the end"))
    })();
    let largest = disarm();
    // `frames` itself grows by doubling: count its buffer in the bound.
    let bound = 2 * bytes.len() + 64 * 1024 + 2 * frames.capacity() * std::mem::size_of::<Frame>();
    assert!(
        largest <= bound,
        "reading {} bytes made an allocation of {largest} bytes",
        bytes.len()
    );
    (frames, res)
}

fn write(frames: &[Frame]) -> (Vec<u8>, snapshot::Summary) {
    let mut w = Writer::new(Vec::new()).unwrap();
    for f in frames {
        match f {
            Frame::Section(name) => w.section(name).unwrap(),
            Frame::Record { key, value } => w.record(key, value).unwrap(),
        }
    }
    w.finish().unwrap()
}

#[derive(Arbitrary, Debug)]
enum Damage {
    None,
    Flip { at: u16, xor: u8 },
    Cut { at: u16 },
    Append(Vec<u8>),
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let step = usize::from(u.arbitrary::<u8>().unwrap_or(0)).max(1);
    let generated = u.arbitrary::<bool>().unwrap_or(false);
    if !generated {
        let raw = u.take_rest();
        let (frames, res) = read_all(raw, step);
        if let Ok(summary) = res {
            let (again, s2) = write(&frames);
            assert_eq!(again, raw, "an accepted file is exactly what Writer writes");
            assert_eq!(s2, summary);
        }
        // `verify` is the same reading.
        let v = verify(Trickle::new(raw, step), |_| Ok::<(), FormatError>(()));
        assert_eq!(v.is_ok(), res.is_ok());
        return;
    }
    let Ok(sections) = <Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>>::arbitrary(&mut u) else {
        return;
    };
    let Ok(damage) = Damage::arbitrary(&mut u) else {
        return;
    };
    let mut frames = Vec::new();
    for (name, records) in sections.into_iter().take(16) {
        let mut name = name;
        while name.len() > 255 {
            name.pop();
        }
        frames.push(Frame::Section(name));
        for (key, value) in records.into_iter().take(64) {
            frames.push(Frame::Record { key, value });
        }
    }
    let (mut bytes, summary) = write(&frames);
    let (got, res) = read_all(&bytes, step);
    assert_eq!(res.as_ref().ok(), Some(&summary), "{res:?}");
    assert_eq!(got, frames);
    let damaged = match damage {
        Damage::None => return,
        Damage::Flip { at, xor } => {
            if xor == 0 {
                return;
            }
            let i = usize::from(at) % bytes.len();
            bytes[i] ^= xor;
            true
        }
        Damage::Cut { at } => {
            bytes.truncate(usize::from(at) % bytes.len());
            true
        }
        Damage::Append(extra) => {
            if extra.is_empty() {
                return;
            }
            bytes.extend_from_slice(&extra);
            true
        }
    };
    if damaged {
        let (_, res) = read_all(&bytes, step);
        assert!(res.is_err(), "a damaged snapshot verified: {res:?}");
    }
});
