//! Raft snapshots as files: the framed on-disk format, written and read in one pass with memory
//! bounded by the largest record, and [`SnapshotFile`], the `SnapshotData` openraft moves around.
//!
//! ```text
//!  header   "CUSTSNAP" (8 bytes)   version u32 LE (= 1)
//!  frames   0x01  name_len u8  name                      the records that follow belong to CF `name`
//!           0x02  key_len u32 LE  key  value_len u32 LE  value
//!  trailer  0x00  records u64 LE  SHA-256 (32 bytes) of every byte before it
//! ```
//!
//! The reader checks every declared length against a limit before allocating, and reports the
//! end of the file only after the record count and the digest match and nothing follows the
//! trailer; a caller that must not act on a damaged file reads it through once ([`verify`])
//! before it changes anything.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"CUSTSNAP";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Longest key accepted (state-machine keys are ids and names).
pub const MAX_KEY: usize = 1 << 20;
/// Longest value accepted: no replicated value can exceed a Raft message (network::MAX_MESSAGE).
pub const MAX_VALUE: usize = 256 << 20;

const TAG_END: u8 = 0x00;
const TAG_SECTION: u8 = 0x01;
const TAG_RECORD: u8 = 0x02;

/// Why a snapshot file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("snapshot file I/O: {0}")]
    Io(#[from] io::Error),
    #[error("not a custos snapshot file (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("snapshot file is truncated at byte {0}")]
    Truncated(u64),
    #[error("snapshot file has an unknown frame tag {tag:#04x} at byte {offset}")]
    BadTag { tag: u8, offset: u64 },
    #[error(
        "snapshot file declares a {what} of {len} bytes at byte {offset}, over the limit of {max}"
    )]
    TooLong {
        what: &'static str,
        len: u64,
        max: usize,
        offset: u64,
    },
    #[error("snapshot file has a column family name that is not UTF-8 at byte {0}")]
    BadName(u64),
    #[error("snapshot file has a record before any column family section")]
    NoSection,
    #[error("snapshot file declares {declared} records but holds {seen}")]
    Count { declared: u64, seen: u64 },
    #[error("snapshot file checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("snapshot file has bytes after its trailer")]
    Trailing,
}

/// What a complete file held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub sha256: [u8; 32],
}

/// Writes the format to any `Write` (wrap files in a `BufWriter`).
pub struct Writer<W: Write> {
    inner: W,
    hasher: Sha256,
    records: u64,
    in_section: bool,
}

impl<W: Write> Writer<W> {
    pub fn new(inner: W) -> io::Result<Self> {
        let mut w = Writer {
            inner,
            hasher: Sha256::new(),
            records: 0,
            in_section: false,
        };
        w.put(MAGIC)?;
        w.put(&VERSION.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hasher.update(b);
        self.inner.write_all(b)
    }

    /// Start the records of one column family.
    pub fn section(&mut self, name: &str) -> io::Result<()> {
        let len = u8::try_from(name.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "column family name too long")
        })?;
        self.put(&[TAG_SECTION, len])?;
        self.put(name.as_bytes())?;
        self.in_section = true;
        Ok(())
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if !self.in_section {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "record before any section",
            ));
        }
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "record too large for a snapshot (key {} bytes, value {} bytes)",
                    key.len(),
                    value.len()
                ),
            ));
        }
        self.put(&[TAG_RECORD])?;
        self.put(&(key.len() as u32).to_le_bytes())?;
        self.put(key)?;
        self.put(&(value.len() as u32).to_le_bytes())?;
        self.put(value)?;
        self.records += 1;
        Ok(())
    }

    /// Write the trailer and hand back the writer (flush and sync it).
    pub fn finish(mut self) -> io::Result<(W, Summary)> {
        self.put(&[TAG_END])?;
        let records = self.records;
        self.put(&records.to_le_bytes())?;
        let sha256: [u8; 32] = self.hasher.finalize_reset().into();
        self.inner.write_all(&sha256)?;
        Ok((self.inner, Summary { records, sha256 }))
    }
}

/// One frame as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Section(String),
    Record { key: Vec<u8>, value: Vec<u8> },
}

/// Reads the format from any `Read` (wrap files in a `BufReader`).
pub struct Reader<R: Read> {
    inner: R,
    hasher: Sha256,
    offset: u64,
    records: u64,
    in_section: bool,
    done: Option<Summary>,
}

impl<R: Read> Reader<R> {
    /// Read and check the header.
    pub fn new(inner: R) -> Result<Self, FormatError> {
        let mut r = Reader {
            inner,
            hasher: Sha256::new(),
            offset: 0,
            records: 0,
            in_section: false,
            done: None,
        };
        let mut magic = [0u8; 8];
        r.fill(&mut magic)?;
        if &magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        Ok(r)
    }

    fn fill_raw(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(FormatError::Truncated(self.offset))
            }
            Err(e) => Err(FormatError::Io(e)),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        self.fill_raw(buf)?;
        self.hasher.update(&*buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, FormatError> {
        let at = self.offset;
        let len = self.u32()? as usize;
        if len > max {
            return Err(FormatError::TooLong {
                what,
                len: len as u64,
                max,
                offset: at,
            });
        }
        // Grown as the bytes arrive, not reserved from the declared length: a damaged length
        // costs no more memory than the file holds.
        let mut v = Vec::new();
        match (&mut self.inner).take(len as u64).read_to_end(&mut v) {
            Ok(n) if n == len => {}
            Ok(n) => return Err(FormatError::Truncated(self.offset + n as u64)),
            Err(e) => return Err(FormatError::Io(e)),
        }
        self.offset += len as u64;
        self.hasher.update(&v);
        Ok(v)
    }

    /// The next frame, or `None` once the trailer has been checked.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FormatError> {
        if self.done.is_some() {
            return Ok(None);
        }
        let at = self.offset;
        let mut tag = [0u8; 1];
        self.fill(&mut tag)?;
        match tag[0] {
            TAG_SECTION => {
                let mut len = [0u8; 1];
                self.fill(&mut len)?;
                let mut name = vec![0u8; len[0] as usize];
                self.fill(&mut name)?;
                let name = String::from_utf8(name).map_err(|_| FormatError::BadName(at))?;
                self.in_section = true;
                Ok(Some(Frame::Section(name)))
            }
            TAG_RECORD => {
                if !self.in_section {
                    return Err(FormatError::NoSection);
                }
                let key = self.bytes("key", MAX_KEY)?;
                let value = self.bytes("value", MAX_VALUE)?;
                self.records += 1;
                Ok(Some(Frame::Record { key, value }))
            }
            TAG_END => {
                let mut n = [0u8; 8];
                self.fill(&mut n)?;
                let declared = u64::from_le_bytes(n);
                let computed: [u8; 32] = self.hasher.finalize_reset().into();
                let mut stored = [0u8; 32];
                self.fill_raw(&mut stored)?;
                // The digest first: a flipped bit in the count is corruption, not a miscount.
                if stored != computed {
                    return Err(FormatError::Checksum);
                }
                if declared != self.records {
                    return Err(FormatError::Count {
                        declared,
                        seen: self.records,
                    });
                }
                let mut extra = [0u8; 1];
                loop {
                    match self.inner.read(&mut extra) {
                        Ok(0) => break,
                        Ok(_) => return Err(FormatError::Trailing),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(FormatError::Io(e)),
                    }
                }
                self.done = Some(Summary {
                    records: self.records,
                    sha256: computed,
                });
                Ok(None)
            }
            other => Err(FormatError::BadTag {
                tag: other,
                offset: at,
            }),
        }
    }

    /// The summary, once `next_frame` returned `None`.
    pub fn summary(&self) -> Option<Summary> {
        self.done
    }
}

/// Read a whole file through, checking every frame, the count and the digest; `section` is
/// called with each column family name and may refuse it.
pub fn verify<R: Read, E: From<FormatError>>(
    r: R,
    mut section: impl FnMut(&str) -> Result<(), E>,
) -> Result<Summary, E> {
    let mut reader = Reader::new(r)?;
    while let Some(frame) = reader.next_frame()? {
        if let Frame::Section(name) = frame {
            section(&name)?;
        }
    }
    Ok(reader.summary().expect("set when next_frame returns None"))
}

/// A snapshot's data as openraft sees it: an open file in the node's snapshot directory (or, in
/// openraft's storage suite, another store's). A file made by `begin_receiving_snapshot` is a
/// temporary: it is removed when dropped unless the install kept it.
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
    temporary: bool,
}

impl SnapshotFile {
    pub(crate) fn new(file: std::fs::File, path: PathBuf, temporary: bool) -> Self {
        SnapshotFile {
            file: tokio::fs::File::from_std(file),
            path,
            temporary,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finish pending writes and take the file over: the caller becomes responsible for the
    /// path (a temporary is no longer removed on drop). Returns a handle, the path and whether
    /// it was a temporary.
    pub(crate) async fn into_parts(mut self) -> io::Result<(std::fs::File, PathBuf, bool)> {
        tokio::io::AsyncWriteExt::flush(&mut self.file).await?;
        let handle = self.file.try_clone().await?.into_std().await;
        let temporary = std::mem::replace(&mut self.temporary, false);
        Ok((handle, std::mem::take(&mut self.path), temporary))
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.get_mut().file).start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().file).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Cfs = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

    fn write(cfs: &Cfs) -> (Vec<u8>, Summary) {
        let mut w = Writer::new(Vec::new()).unwrap();
        for (name, recs) in cfs {
            w.section(name).unwrap();
            for (k, v) in recs {
                w.record(k, v).unwrap();
            }
        }
        w.finish().unwrap()
    }

    fn read<R: Read>(r: R) -> Result<(Cfs, Summary), FormatError> {
        let mut reader = Reader::new(r)?;
        let mut out: Cfs = Vec::new();
        while let Some(f) = reader.next_frame()? {
            match f {
                Frame::Section(n) => out.push((n, Vec::new())),
                Frame::Record { key, value } => out.last_mut().unwrap().1.push((key, value)),
            }
        }
        Ok((out, reader.summary().unwrap()))
    }

    /// Delivers one byte per read call.
    struct OneByte<'a>(&'a [u8]);
    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }

    fn sample() -> Cfs {
        vec![
            ("sm".into(), vec![(b"applied".to_vec(), vec![1, 2, 3])]),
            ("audit".into(), vec![]),
            (
                "tokens".into(),
                vec![(b"t1".to_vec(), b"x".to_vec()), (vec![], vec![])],
            ),
        ]
    }

    #[test]
    fn round_trip_and_split_reads() {
        let cfs = sample();
        let (bytes, sum) = write(&cfs);
        assert_eq!(sum.records, 3);
        let (back, s2) = read(&bytes[..]).unwrap();
        assert_eq!(back, cfs);
        assert_eq!(s2, sum);
        let (back, _) = read(OneByte(&bytes)).unwrap();
        assert_eq!(back, cfs);
    }

    #[test]
    fn every_truncation_is_refused() {
        let (bytes, _) = write(&sample());
        for cut in 0..bytes.len() {
            let err = read(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated(_)),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let (bytes, _) = write(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    read(&b[..]).is_err(),
                    "flip of bit {bit} in byte {i} passed"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_and_oversized_lengths_are_refused() {
        let (mut bytes, _) = write(&sample());
        bytes.push(0);
        assert!(matches!(read(&bytes[..]), Err(FormatError::Trailing)));

        // A record declaring a 4 GiB key is refused before anything is allocated.
        let mut w = Writer::new(Vec::new()).unwrap();
        w.section("sm").unwrap();
        let (mut b, _) = w.finish().unwrap();
        b.truncate(b.len() - 41);
        b.push(TAG_RECORD);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read(&b[..]),
            Err(FormatError::TooLong { what: "key", .. })
        ));
    }

    #[test]
    fn verify_lets_the_caller_refuse_a_section() {
        let (bytes, _) = write(&sample());
        let err = verify::<_, FormatError>(&bytes[..], |n| {
            if n == "tokens" {
                Err(FormatError::BadName(0))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(err, FormatError::BadName(_)));
        assert_eq!(
            verify::<_, FormatError>(&bytes[..], |_| Ok(()))
                .unwrap()
                .records,
            3
        );
    }

    proptest! {
        #[test]
        fn arbitrary_contents_round_trip(
            cfs in proptest::collection::vec(
                ("[a-z_]{1,12}", proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..40),
                     proptest::collection::vec(any::<u8>(), 0..200)), 0..20)),
                0..6)
        ) {
            let (bytes, sum) = write(&cfs);
            let (back, s2) = read(OneByte(&bytes)).unwrap();
            prop_assert_eq!(back, cfs);
            prop_assert_eq!(s2, sum);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&bytes);
            let _ = read(&b[..]);
        }
    }
}
