//! Encryption of connection credentials at rest.
//!
//! Credentials are sealed with XChaCha20-Poly1305 under a 32-byte key read from a key file
//! (`[controlplane] secret_key_file`), before they are proposed to Raft. The Raft log, snapshots
//! and RocksDB therefore hold only ciphertext; every control-plane node needs the same key file.
//! The connection name is bound as associated data, so a sealed value cannot be moved to another
//! connection.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret key file {path}: {source}; create one with `custos dev` or `head -c 32 /dev/urandom | xxd -p -c 64 > {path}`")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("secret key file {path} must hold 64 hex digits (32 bytes)")]
    BadKey { path: String },
    #[error("cannot write secret key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("sealed credential is corrupt or was sealed with another key (check that every control-plane node has the same secret_key_file)")]
    Open,
}

/// The key that seals connection credentials.
#[derive(Clone)]
pub struct SecretKey(XChaCha20Poly1305);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        SecretKey(XChaCha20Poly1305::new(&key.into()))
    }

    /// Read a key file of 64 hex digits.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let bytes = hex::decode(text.trim()).map_err(|_| SecretError::BadKey {
            path: path.display().to_string(),
        })?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey {
            path: path.display().to_string(),
        })?;
        Ok(Self::from_bytes(key))
    }

    /// Read the key file, creating it (mode 0600) with a random key when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        if !path.exists() {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            write_private(path, hex::encode(key).as_bytes()).map_err(|source| {
                SecretError::Write {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        }
        Self::load(path)
    }

    /// Seal `plaintext`, binding `context` (e.g. the connection name).
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    /// Open a value sealed by [`SecretKey::seal`] with the same context.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map_err(|_| SecretError::Open)
    }
}

/// Write a file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = SecretKey::from_bytes([7; 32]);
        let sealed = k.seal(b"hunter2", b"prod-pg");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.open(&sealed, b"prod-pg").unwrap(), b"hunter2");
        assert!(k.open(&sealed, b"other").is_err());
        assert!(SecretKey::from_bytes([8; 32])
            .open(&sealed, b"prod-pg")
            .is_err());
        assert!(k.open(&sealed[..10], b"prod-pg").is_err());
    }

    #[test]
    fn key_files_are_created_private_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let k1 = SecretKey::load_or_create(&p).unwrap();
        let k2 = SecretKey::load(&p).unwrap();
        assert_eq!(k2.open(&k1.seal(b"x", b"c"), b"c").unwrap(), b"x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        std::fs::write(&p, "zz").unwrap();
        let err = SecretKey::load(&p).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        let err = SecretKey::load(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read secret key file"), "{err}");
    }
}
