//! Relaying an upgraded connection (WebSocket and other `Upgrade`s) with a transcript.
//!
//! Bytes pass unchanged both ways. For a WebSocket each direction is also read as frames
//! ([`custos_core::ws::Reader`]) and every message goes in the transcript: text messages with
//! their first [`KEEP`] bytes, other kinds by size (a close with its code and reason). The
//! transcript is capped at [`CAP`] bytes and masked with the audit detectors when it is recorded,
//! in the command-completed event of the upgrade request, when the tunnel closes.

use custos_core::ws::{Kind, Message, Reader};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Payload bytes kept of each message.
pub const KEEP: usize = 4 * 1024;
/// Transcript bytes kept in all.
pub const CAP: usize = 64 * 1024;

/// What a tunnel carried, for its audit record.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The transcript, headed by a one-line summary.
    pub record: Vec<u8>,
    pub truncated: bool,
    /// Bytes the upstream sent.
    pub from_upstream: u64,
    /// Why the tunnel broke, when it did not close cleanly.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Transcript {
    text: Vec<u8>,
    truncated: bool,
}

impl Transcript {
    fn push(&mut self, line: &[u8]) {
        if self.text.len() + line.len() <= CAP {
            self.text.extend_from_slice(line);
        } else {
            self.truncated = true;
        }
    }
}

struct Side {
    arrow: char,
    reader: Option<Reader>,
    bytes: u64,
    messages: u64,
}

impl Side {
    fn new(arrow: char, websocket: bool) -> Self {
        Side {
            arrow,
            reader: websocket.then(|| Reader::new(KEEP)),
            bytes: 0,
            messages: 0,
        }
    }

    fn tap(&mut self, bytes: &[u8], transcript: &Mutex<Transcript>) {
        self.bytes += bytes.len() as u64;
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        if reader.failed().is_some() {
            return;
        }
        let mut out = Vec::new();
        let res = reader.feed(bytes, &mut out);
        self.messages += out.len() as u64;
        let mut t = transcript.lock();
        for m in &out {
            t.push(&line(self.arrow, m));
        }
        if let Err(e) = res {
            t.push(
                format!(
                    "{} the bytes stopped being WebSocket frames ({e}); not transcribed from here on\n",
                    self.arrow
                )
                .as_bytes(),
            );
        }
    }

    fn summary(&self, from: &str) -> String {
        match &self.reader {
            Some(r) => format!(
                "{} messages in {} frames, {} bytes from the {from}",
                self.messages,
                r.frames(),
                self.bytes
            ),
            None => format!("{} bytes from the {from}", self.bytes),
        }
    }
}

/// One transcript line for `m`.
fn line(arrow: char, m: &Message) -> Vec<u8> {
    let mut l = format!("{arrow} {}", m.kind.name()).into_bytes();
    match m.kind {
        Kind::Text => {
            l.extend_from_slice(b": ");
            l.extend_from_slice(&m.data);
            if m.truncated() {
                l.extend_from_slice(format!(" … ({} bytes in all)", m.len).as_bytes());
            }
        }
        Kind::Close if m.data.len() >= 2 => {
            let code = u16::from_be_bytes([m.data[0], m.data[1]]);
            l.extend_from_slice(format!(": {code}").as_bytes());
            if m.data.len() > 2 {
                l.push(b' ');
                l.extend_from_slice(&m.data[2..]);
            }
        }
        _ => l.extend_from_slice(format!(": {} bytes", m.len).as_bytes()),
    }
    if m.frames > 1 {
        l.extend_from_slice(format!(" ({} frames)", m.frames).as_bytes());
    }
    l.push(b'\n');
    l
}

/// Copy `r` to `w`, feeding `side` what passes, until `r` ends (then `w` is shut down).
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    side: &mut Side,
    transcript: &Mutex<Transcript>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        side.tap(&buf[..n], transcript);
        w.write_all(&buf[..n]).await?;
    }
}

/// Relay `client` and `upstream` until both directions ended, or one broke. `websocket`: read
/// the bytes as WebSocket frames for the transcript.
pub async fn relay<C, U>(client: C, upstream: U, websocket: bool) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let transcript = Mutex::new(Transcript::default());
    let mut up = Side::new('>', websocket);
    let mut down = Side::new('<', websocket);
    let error = {
        let a = pump(cr, uw, &mut up, &transcript);
        let b = pump(ur, cw, &mut down, &transcript);
        tokio::pin!(a, b);
        // A direction that ends cleanly half-closes; the other runs on. One that breaks ends
        // the tunnel.
        let first = tokio::select! {
            r = &mut a => r.map_err(|e| ("client", e)).map(|()| true),
            r = &mut b => r.map_err(|e| ("upstream", e)).map(|()| false),
        };
        let broke = match first {
            Err(broke) => Some(broke),
            Ok(true) => (&mut b).await.err().map(|e| ("upstream", e)),
            Ok(false) => (&mut a).await.err().map(|e| ("client", e)),
        };
        broke.map(|(from, e)| format!("the tunnel broke reading from the {from}: {e}"))
    };
    let t = transcript.into_inner();
    let kind = if websocket { " (websocket)" } else { "" };
    let mut record = format!(
        "upgraded connection{kind}: {}, {}\n",
        up.summary("client"),
        down.summary("upstream")
    )
    .into_bytes();
    record.extend_from_slice(&t.text);
    Outcome {
        record,
        truncated: t.truncated,
        from_upstream: down.bytes,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_core::ws::encode_frame;

    #[tokio::test]
    async fn a_websocket_exchange_is_relayed_unchanged_and_transcribed() {
        // Buffers larger than any write below: each side writes whole before the other reads.
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1 << 16);
        let tunnel = tokio::spawn(relay(client, upstream, true));
        let mut sent = Vec::new();
        encode_frame(&mut sent, false, 1, Some([9, 8, 7, 6]), b"select ");
        encode_frame(&mut sent, true, 0, Some([1, 1, 1, 1]), b"42");
        encode_frame(&mut sent, true, 2, Some([0, 0, 0, 0]), &[0u8; 300]);
        client_peer.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        upstream_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent, "relayed unchanged");
        let mut answer = Vec::new();
        encode_frame(&mut answer, true, 1, None, "x".repeat(KEEP + 10).as_bytes());
        encode_frame(&mut answer, true, 8, None, b"\x03\xe8bye");
        upstream_peer.write_all(&answer).await.unwrap();
        let mut got = vec![0u8; answer.len()];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, answer);
        drop(client_peer);
        drop(upstream_peer);
        let out = tunnel.await.unwrap();
        let text = String::from_utf8_lossy(&out.record);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "upgraded connection (websocket): 2 messages in 3 frames, {} bytes from the client, 2 messages in 2 frames, {} bytes from the upstream",
                sent.len(),
                answer.len()
            )
        );
        assert_eq!(lines[1], "> text: select 42 (2 frames)");
        assert_eq!(lines[2], "> binary: 300 bytes");
        assert_eq!(
            lines[3],
            format!(
                "< text: {} … ({} bytes in all)",
                "x".repeat(KEEP),
                KEEP + 10
            )
        );
        assert_eq!(lines[4], "< close: 1000 bye");
        assert_eq!((out.from_upstream, out.error), (answer.len() as u64, None));
    }

    #[tokio::test]
    async fn bytes_that_are_not_frames_are_relayed_and_the_transcript_says_where_it_stopped() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn(relay(client, upstream, true));
        let mut sent = Vec::new();
        encode_frame(&mut sent, true, 1, Some([1, 2, 3, 4]), b"ok");
        sent.extend_from_slice(b"\x83\x00 and then junk");
        client_peer.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        upstream_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent);
        drop(client_peer);
        drop(upstream_peer);
        let out = tunnel.await.unwrap();
        let text = String::from_utf8_lossy(&out.record);
        assert!(text.contains("> text: ok\n"), "{text}");
        assert!(
            text.contains(
                "> the bytes stopped being WebSocket frames (frame with reserved opcode 0x3)"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_transcript_is_capped() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1 << 16);
        let tunnel = tokio::spawn(relay(client, upstream, true));
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            upstream_peer.read_to_end(&mut sink).await.unwrap();
            sink.len()
        });
        let mut sent = Vec::new();
        for _ in 0..40 {
            encode_frame(&mut sent, true, 1, Some([1, 2, 3, 4]), &[b'a'; 3000]);
        }
        client_peer.write_all(&sent).await.unwrap();
        client_peer.shutdown().await.unwrap();
        assert_eq!(drain.await.unwrap(), sent.len());
        drop(client_peer);
        let out = tunnel.await.unwrap();
        assert!(out.truncated);
        assert!(out.record.len() <= CAP + 200, "{}", out.record.len());
    }
}
