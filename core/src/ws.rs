//! A passive WebSocket (RFC 6455) frame reader, for the audit record of upgraded connections.
//!
//! The edge relays an upgraded connection's bytes unchanged. It feeds a copy of each direction to
//! a [`Reader`], which parses the frames, removes the client's masking and reassembles fragmented
//! messages, keeping at most `keep` payload bytes of each for the transcript. The reader never
//! changes what is relayed: when the bytes stop being valid frames it fails once, says why, and
//! ignores the rest (the tunnel goes on; the record says the transcript stops there).
//!
//! Compressed frames (`permessage-deflate`, RSV1) cannot be read. The edge removes the client's
//! `Sec-WebSocket-Extensions` offer before forwarding, so a server never turns them on.

use thiserror::Error;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Kind {
    fn from_opcode(op: u8) -> Option<Self> {
        Some(match op {
            OP_TEXT => Kind::Text,
            OP_BINARY => Kind::Binary,
            OP_CLOSE => Kind::Close,
            OP_PING => Kind::Ping,
            OP_PONG => Kind::Pong,
            _ => return None,
        })
    }

    /// The opcode of this kind's first frame.
    pub fn opcode(self) -> u8 {
        match self {
            Kind::Text => OP_TEXT,
            Kind::Binary => OP_BINARY,
            Kind::Close => OP_CLOSE,
            Kind::Ping => OP_PING,
            Kind::Pong => OP_PONG,
        }
    }

    /// Its name in transcripts: `text`, `binary`, `close`, `ping`, `pong`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Binary => "binary",
            Kind::Close => "close",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Kind::Close | Kind::Ping | Kind::Pong)
    }
}

/// One whole message (a data message reassembled from its frames, or a control frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    /// Its payload bytes in all (after unmasking; frame headers not counted).
    pub len: u64,
    /// The first `keep` bytes of the payload, unmasked.
    pub data: Vec<u8>,
    /// How many frames carried it.
    pub frames: u32,
}

impl Message {
    /// Whether `data` holds less than the whole payload.
    pub fn truncated(&self) -> bool {
        (self.data.len() as u64) < self.len
    }
}

/// Why the bytes stopped being WebSocket frames.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame with reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error(
        "frame with RSV bits {0:#05b} set: an extension (e.g. permessage-deflate) the edge cannot read"
    )]
    Extension(u8),
    #[error("frame length {0} has its most significant bit set")]
    Length(u64),
    #[error("control frame ({0}) fragmented or longer than 125 bytes")]
    Control(&'static str),
    #[error("continuation frame without a message to continue")]
    Continuation,
    #[error("new {0} message before the previous one ended")]
    Interleaved(&'static str),
}

/// The frame being read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Option<Kind>,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes of this frame still to come.
    remaining: u64,
    /// Payload bytes of this frame already read (the masking key's phase).
    pos: u64,
}

/// Reads one direction of a WebSocket connection. See the module documentation.
#[derive(Debug)]
pub struct Reader {
    keep: usize,
    head: [u8; 14],
    head_len: usize,
    frame: Option<Frame>,
    /// The data message being assembled, across its frames.
    data: Option<Message>,
    /// The control frame being read (it may arrive inside a fragmented data message).
    control: Option<Message>,
    failed: Option<FrameError>,
    frames: u64,
}

impl Reader {
    /// A reader keeping at most `keep` payload bytes of each message.
    pub fn new(keep: usize) -> Self {
        Reader {
            keep,
            head: [0; 14],
            head_len: 0,
            frame: None,
            data: None,
            control: None,
            failed: None,
            frames: 0,
        }
    }

    /// Frames read whole so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Why reading stopped, if it did.
    pub fn failed(&self) -> Option<&FrameError> {
        self.failed.as_ref()
    }

    /// Read `bytes`, the next ones of this direction, appending every message they complete to
    /// `out`. After an error every later call returns it again and reads nothing.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Message>) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        while !bytes.is_empty() {
            let Some(frame) = self.frame.as_mut() else {
                let used = self.read_head(bytes, out).inspect_err(|e| {
                    self.failed = Some(e.clone());
                })?;
                bytes = &bytes[used..];
                continue;
            };
            let n = frame.remaining.min(bytes.len() as u64) as usize;
            let (chunk, rest) = bytes.split_at(n);
            bytes = rest;
            let msg = match frame.kind {
                Some(k) if k.is_control() => self.control.as_mut(),
                _ => self.data.as_mut(),
            };
            if let Some(msg) = msg {
                msg.len += n as u64;
                let room = self.keep.saturating_sub(msg.data.len()).min(n);
                let start = msg.data.len();
                msg.data.extend_from_slice(&chunk[..room]);
                if let Some(key) = frame.mask {
                    for (i, b) in msg.data[start..].iter_mut().enumerate() {
                        *b ^= key[((frame.pos + i as u64) % 4) as usize];
                    }
                }
            }
            frame.pos += n as u64;
            frame.remaining -= n as u64;
            if frame.remaining == 0 {
                self.end_frame(out);
            }
        }
        Ok(())
    }

    /// Read (part of) a frame header from `bytes`; returns how many bytes it used.
    fn read_head(&mut self, bytes: &[u8], out: &mut Vec<Message>) -> Result<usize, FrameError> {
        let mut used = 0;
        loop {
            let need = head_len(&self.head[..self.head_len]);
            if self.head_len >= need {
                break;
            }
            let n = (need - self.head_len).min(bytes.len() - used);
            if n == 0 {
                return Ok(used);
            }
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[used..used + n]);
            self.head_len += n;
            used += n;
        }
        let h = &self.head[..self.head_len];
        self.head_len = 0;
        let (b0, b1) = (h[0], h[1]);
        let fin = b0 & 0x80 != 0;
        let rsv = (b0 >> 4) & 0x7;
        let op = b0 & 0x0F;
        if rsv != 0 {
            return Err(FrameError::Extension(rsv));
        }
        let (len, mut at) = match b1 & 0x7F {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (n as u64, 2),
        };
        if len >> 63 != 0 {
            return Err(FrameError::Length(len));
        }
        let mask = if b1 & 0x80 != 0 {
            let mut k = [0u8; 4];
            k.copy_from_slice(&h[at..at + 4]);
            at += 4;
            Some(k)
        } else {
            None
        };
        debug_assert_eq!(at, h.len());
        let kind = if op == OP_CONTINUATION {
            if self.data.is_none() {
                return Err(FrameError::Continuation);
            }
            None
        } else {
            let kind = Kind::from_opcode(op).ok_or(FrameError::ReservedOpcode(op))?;
            let slot = if kind.is_control() {
                if !fin || len > 125 {
                    return Err(FrameError::Control(kind.name()));
                }
                &mut self.control
            } else {
                if self.data.is_some() {
                    return Err(FrameError::Interleaved(kind.name()));
                }
                &mut self.data
            };
            *slot = Some(Message {
                kind,
                len: 0,
                data: Vec::new(),
                frames: 0,
            });
            Some(kind)
        };
        self.frame = Some(Frame {
            kind,
            fin,
            mask,
            remaining: len,
            pos: 0,
        });
        if len == 0 {
            self.end_frame(out);
        }
        Ok(used)
    }

    fn end_frame(&mut self, out: &mut Vec<Message>) {
        let Some(frame) = self.frame.take() else {
            return;
        };
        self.frames += 1;
        let control = matches!(frame.kind, Some(k) if k.is_control());
        let slot = if control {
            &mut self.control
        } else {
            &mut self.data
        };
        if let Some(msg) = slot.as_mut() {
            msg.frames += 1;
        }
        if frame.fin {
            if let Some(msg) = slot.take() {
                out.push(msg);
            }
        }
    }
}

/// How long the frame header starting with `h` is (2 until its second byte is known).
pub fn head_len(h: &[u8]) -> usize {
    if h.len() < 2 {
        return 2;
    }
    let ext = match h[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// Encode one frame (for tests, fuzzing and benchmarks): `mask` as a client would, `None` as a
/// server does.
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(
        reader: &mut Reader,
        bytes: &[u8],
        cuts: &[usize],
    ) -> Result<Vec<Message>, FrameError> {
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts {
            let c = c.min(bytes.len());
            if c > at {
                reader.feed(&bytes[at..c], &mut out)?;
                at = c;
            }
        }
        reader.feed(&bytes[at..], &mut out)?;
        Ok(out)
    }

    #[test]
    fn masked_fragmented_text_with_a_ping_inside_is_reassembled() {
        let key = Some([1, 2, 3, 4]);
        let mut b = Vec::new();
        encode_frame(&mut b, false, OP_TEXT, key, b"hello ");
        encode_frame(&mut b, true, OP_PING, key, b"p");
        encode_frame(&mut b, true, OP_CONTINUATION, key, b"world");
        encode_frame(&mut b, true, OP_CLOSE, key, &[0x03, 0xE8]);
        let mut r = Reader::new(1024);
        let out = read_all(&mut r, &b, &[1, 3, 9]).unwrap();
        let got: Vec<(Kind, &[u8], u32)> = out
            .iter()
            .map(|m| (m.kind, m.data.as_slice(), m.frames))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::Ping, &b"p"[..], 1),
                (Kind::Text, &b"hello world"[..], 2),
                (Kind::Close, &[0x03, 0xE8][..], 1),
            ]
        );
        assert_eq!(r.frames(), 4);
    }

    #[test]
    fn long_payloads_are_kept_up_to_the_cap_and_counted_whole() {
        let payload = vec![b'x'; 70_000];
        let mut b = Vec::new();
        encode_frame(&mut b, true, OP_BINARY, None, &payload);
        encode_frame(&mut b, true, OP_TEXT, None, b"");
        let mut r = Reader::new(100);
        let out = read_all(&mut r, &b, &[5, 4000]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].kind, out[0].len, out[0].data.len()),
            (Kind::Binary, 70_000, 100)
        );
        assert!(out[0].truncated());
        assert_eq!(
            (out[1].kind, out[1].len, out[1].truncated()),
            (Kind::Text, 0, false)
        );
    }

    #[test]
    fn bad_frames_stop_the_reader_with_the_cause() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (vec![0x83, 0x00], FrameError::ReservedOpcode(3)),
            (vec![0xC1, 0x00], FrameError::Extension(4)),
            (vec![0x80, 0x00], FrameError::Continuation),
            (vec![0x09, 0x00], FrameError::Control("ping")),
            (
                {
                    let mut b = vec![0x01, 0x00];
                    b.extend([0x02, 0x00]);
                    b
                },
                FrameError::Interleaved("binary"),
            ),
            (
                {
                    let mut b = vec![0x82, 127];
                    b.extend(u64::MAX.to_be_bytes());
                    b
                },
                FrameError::Length(u64::MAX),
            ),
            (
                {
                    let mut b = vec![0x88, 126];
                    b.extend(200u16.to_be_bytes());
                    b
                },
                FrameError::Control("close"),
            ),
        ];
        for (bytes, want) in cases {
            let mut r = Reader::new(16);
            let mut out = Vec::new();
            assert_eq!(r.feed(&bytes, &mut out), Err(want.clone()), "{bytes:?}");
            // It stays failed, and reads nothing more.
            assert_eq!(r.feed(&[0x81, 0x00], &mut out), Err(want.clone()));
            assert!(out.is_empty());
            assert_eq!(r.failed(), Some(&want));
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Text),
            Just(Kind::Binary),
            Just(Kind::Close),
            Just(Kind::Ping),
            Just(Kind::Pong),
        ]
    }

    proptest! {
        /// Messages encoded as frames (data messages split in up to 4 frames, masked or not) are
        /// read back the same whatever the chunking, with at most `keep` bytes kept of each.
        #[test]
        fn frames_read_back_whatever_the_chunking(
            msgs in prop::collection::vec(
                (kind(), prop::collection::vec(any::<u8>(), 0..300), 1usize..5, any::<Option<[u8; 4]>>()),
                0..12,
            ),
            cuts in prop::collection::vec(0usize..4000, 0..20),
            keep in 0usize..200,
        ) {
            let mut bytes = Vec::new();
            let mut want = Vec::new();
            for (kind, payload, parts, mask) in &msgs {
                let payload = if kind.is_control() { &payload[..payload.len().min(125)] } else { &payload[..] };
                let parts = if kind.is_control() { 1 } else { (*parts).min(payload.len().max(1)) };
                let step = payload.len().div_ceil(parts).max(1);
                let mut chunks: Vec<&[u8]> = payload.chunks(step).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                for (i, c) in chunks.iter().enumerate() {
                    let op = if i == 0 { kind.opcode() } else { OP_CONTINUATION };
                    encode_frame(&mut bytes, i + 1 == chunks.len(), op, *mask, c);
                }
                want.push(Message {
                    kind: *kind,
                    len: payload.len() as u64,
                    data: payload[..payload.len().min(keep)].to_vec(),
                    frames: chunks.len() as u32,
                });
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut r = Reader::new(keep);
            let got = read_all(&mut r, &bytes, &cuts).unwrap();
            prop_assert_eq!(got, want);
        }

        /// Any bytes: no panic, nothing kept beyond `keep`, and once failed it stays failed.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), keep in 0usize..64) {
            let mut r = Reader::new(keep);
            let mut out = Vec::new();
            let res = r.feed(&bytes, &mut out);
            for m in &out {
                prop_assert!(m.data.len() <= keep && m.data.len() as u64 <= m.len);
            }
            if res.is_err() {
                prop_assert_eq!(r.feed(b"\x81\x00", &mut out), res);
            }
        }
    }
}
