//! PostgreSQL v3 wire framing: read message headers, bodies (buffered or streamed), and build the
//! few messages the edge writes itself.
//!
//! Every message after start-up is `tag: u8, len: i32 (includes itself), body`. The reader
//! hands out the header first, so the caller decides per message whether to buffer the body
//! (it needs to look inside) or stream it through in chunks (a 1 GiB `CopyData` or `DataRow`
//! that nobody has to inspect passes in bounded memory).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version number of a v3 start-up message.
pub const PROTOCOL_V3: i32 = 196_608;
/// `SSLRequest` code.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest` code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest` code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Largest start-up packet accepted (PostgreSQL allows 10000 bytes).
pub const MAX_STARTUP: usize = 10_000;
/// Chunk size for streamed bodies.
pub const CHUNK: usize = 64 * 1024;

/// A framing error: the peer broke the protocol or went away.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("message of {0} bytes is larger than the {1}-byte limit")]
    TooLarge(usize, usize),
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Body length (without the tag and the length field).
    pub len: usize,
}

/// Buffered reader of v3 messages.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Bytes already read from the socket and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    async fn fill(&mut self, want: usize) -> Result<(), WireError> {
        while self.buf.len() < want {
            self.buf.reserve(want.max(8192) - self.buf.len().min(want));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
        Ok(())
    }

    /// Wait for more bytes from the peer without handing any out: `Err(Closed)` when it hung
    /// up. Once `cap` bytes are buffered it waits for ever (the caller stops reading). Cancel-safe.
    pub async fn readable(&mut self, cap: usize) -> Result<(), WireError> {
        if self.buf.len() >= cap {
            return std::future::pending().await;
        }
        self.buf.reserve(8192);
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(WireError::Closed);
        }
        Ok(())
    }

    /// Read the next header. Cancel-safe: bytes read so far stay buffered.
    pub async fn header(&mut self) -> Result<Header, WireError> {
        self.fill(5).await?;
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(WireError::Protocol(format!(
                "message '{}' has length {len}",
                tag as char
            )));
        }
        self.buf.advance(5);
        Ok(Header {
            tag,
            len: len as usize - 4,
        })
    }

    /// Read a whole body of `len` bytes into memory.
    pub async fn body(&mut self, len: usize) -> Result<Bytes, WireError> {
        self.fill(len).await?;
        Ok(self.buf.split_to(len).freeze())
    }

    /// Up to `max` bytes of a body being streamed (at least one byte).
    pub async fn chunk(&mut self, max: usize) -> Result<Bytes, WireError> {
        if self.buf.is_empty() {
            self.fill(1).await?;
        }
        let n = self.buf.len().min(max);
        Ok(self.buf.split_to(n).freeze())
    }

    /// A start-up-phase packet (`len: i32` then body, no tag).
    pub async fn startup(&mut self) -> Result<Bytes, WireError> {
        self.fill(4).await?;
        let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len < 8 || len as usize > MAX_STARTUP {
            return Err(WireError::Protocol(format!(
                "start-up packet length {len} is out of range"
            )));
        }
        self.fill(len as usize).await?;
        self.buf.advance(4);
        Ok(self.buf.split_to(len as usize - 4).freeze())
    }

    /// Give back the inner stream; fails if bytes are buffered (they would be lost).
    pub fn into_inner(self) -> Result<R, WireError> {
        if !self.buf.is_empty() {
            return Err(WireError::Protocol(
                "data arrived before the TLS handshake".into(),
            ));
        }
        Ok(self.io)
    }
}

/// Writer that batches messages and flushes on demand.
pub struct Writer<W> {
    io: W,
    pub buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Self {
        Writer {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Append a whole message.
    pub fn msg(&mut self, tag: u8, body: &[u8]) {
        self.buf.reserve(5 + body.len());
        self.buf.put_u8(tag);
        self.buf.put_i32((body.len() + 4) as i32);
        self.buf.put_slice(body);
    }

    /// Append a header whose body follows through [`Writer::raw`].
    pub fn header(&mut self, tag: u8, len: usize) {
        self.buf.put_u8(tag);
        self.buf.put_i32((len + 4) as i32);
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.put_slice(bytes);
    }

    /// Write out what is buffered once it exceeds `threshold` bytes.
    pub async fn flush_if(&mut self, threshold: usize) -> Result<(), WireError> {
        if self.buf.len() >= threshold {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.io
    }

    /// The inner stream; anything still buffered is dropped (flush first).
    pub fn into_inner(self) -> W {
        self.io
    }
}

/// Cursor over a message body.
pub struct Body<'a> {
    b: &'a [u8],
}

impl<'a> Body<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Body { b }
    }

    pub fn remaining(&self) -> usize {
        self.b.len()
    }

    fn bad(what: &str) -> WireError {
        WireError::Protocol(format!("truncated message ({what})"))
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let (&v, rest) = self.b.split_first().ok_or_else(|| Self::bad("byte"))?;
        self.b = rest;
        Ok(v)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        let v = self.bytes(2)?;
        Ok(i16::from_be_bytes([v[0], v[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        let v = self.bytes(4)?;
        Ok(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(Self::bad("field"));
        }
        let (v, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(v)
    }

    /// A NUL-terminated string (lossy UTF-8).
    pub fn cstr(&mut self) -> Result<String, WireError> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| Self::bad("string without NUL"))?;
        let s = String::from_utf8_lossy(&self.b[..end]).into_owned();
        self.b = &self.b[end + 1..];
        Ok(s)
    }

    /// A length-prefixed value (`-1` = NULL).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        Ok(Some(self.bytes(n as usize)?))
    }
}

pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// The body of an `ErrorResponse` (or `NoticeResponse`).
pub fn error_body(
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> BytesMut {
    let mut b = BytesMut::new();
    for (f, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        b.put_u8(f);
        put_cstr(&mut b, v);
    }
    if let Some(d) = detail {
        b.put_u8(b'D');
        put_cstr(&mut b, d);
    }
    if let Some(h) = hint {
        b.put_u8(b'H');
        put_cstr(&mut b, h);
    }
    b.put_u8(0);
    b
}

/// The fields of an `ErrorResponse`/`NoticeResponse` body.
#[derive(Debug, Clone, Default)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error(body: &[u8]) -> ErrorFields {
    let mut out = ErrorFields::default();
    let mut b = Body::new(body);
    while let Ok(f) = b.u8() {
        if f == 0 {
            break;
        }
        let Ok(v) = b.cstr() else { break };
        match f {
            b'S' => out.severity = v,
            b'C' => out.code = v,
            b'M' => out.message = v,
            _ => {}
        }
    }
    out
}

/// A start-up message's parameters (`user`, `database`, `application_name`, `options` …).
pub fn parse_startup_params(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut b = Body::new(body);
    let mut out = Vec::new();
    loop {
        let k = b.cstr()?;
        if k.is_empty() {
            break;
        }
        let v = b.cstr()?;
        out.push((k, v));
    }
    Ok(out)
}

/// Build a start-up packet (length-prefixed, no tag).
pub fn startup_packet(params: &[(String, String)]) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_V3);
    for (k, v) in params {
        put_cstr(&mut body, k);
        put_cstr(&mut body, v);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_body_and_chunks() {
        let mut w = Writer::new(Vec::new());
        w.msg(b'Q', b"select 1\0");
        w.msg(b'd', &[7u8; 100_000]);
        w.flush().await.unwrap();
        let data = w.get_mut().clone();
        let mut r = Reader::new(&data[..]);
        let h = r.header().await.unwrap();
        assert_eq!((h.tag, h.len), (b'Q', 9));
        assert_eq!(&r.body(h.len).await.unwrap()[..], b"select 1\0");
        let h = r.header().await.unwrap();
        assert_eq!(h.len, 100_000);
        let mut got = 0;
        while got < h.len {
            got += r.chunk((h.len - got).min(CHUNK)).await.unwrap().len();
        }
        assert_eq!(got, 100_000);
        assert!(matches!(r.header().await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn rejects_bad_lengths() {
        let data = [b'Q', 0, 0, 0, 2];
        let mut r = Reader::new(&data[..]);
        assert!(matches!(r.header().await, Err(WireError::Protocol(_))));
        let data = [0u8, 0, 0, 2];
        let mut r = Reader::new(&data[..]);
        assert!(matches!(r.startup().await, Err(WireError::Protocol(_))));
    }

    #[test]
    fn error_round_trip() {
        let b = error_body("ERROR", "42501", "denied", Some("d"), None);
        let e = parse_error(&b);
        assert_eq!((e.code.as_str(), e.message.as_str()), ("42501", "denied"));
    }

    proptest::proptest! {
        /// Arbitrary bytes from a peer never panic the framing, and never make it allocate more
        /// than the length field claims.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = Reader::new(&data[..]);
                let _ = r.startup().await;
                let mut r = Reader::new(&data[..]);
                while let Ok(h) = r.header().await {
                    if r.body(h.len).await.is_err() {
                        break;
                    }
                }
            });
            let _ = parse_error(&data);
            let _ = parse_startup_params(&data);
            let mut b = Body::new(&data);
            while b.value().is_ok_and(|v| v.is_some()) {}
        }
    }
}
