//! Key management: a random 256-bit master key encrypts the pool; it is
//! stored in every superblock wrapped (AES-256-GCM) under a key derived with
//! Argon2id from a passphrase or from the bytes of a key file. Changing the
//! passphrase re-wraps the master key; no data is rewritten.

use crate::codec::{Dec, Enc};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;
use zeroize::Zeroizing;

pub type Key = Zeroizing<[u8; 32]>;

/// Where the secret that unlocks a pool comes from.
pub enum Secret {
    Passphrase(Zeroizing<Vec<u8>>),
    KeyFile(Zeroizing<Vec<u8>>),
}

const PASSPHRASE: u8 = 1;
const KEY_FILE: u8 = 2;

impl Secret {
    fn bytes(&self) -> &[u8] {
        match self {
            Secret::Passphrase(b) | Secret::KeyFile(b) => b,
        }
    }
    fn kind(&self) -> u8 {
        match self {
            Secret::Passphrase(_) => PASSPHRASE,
            Secret::KeyFile(_) => KEY_FILE,
        }
    }

    /// A passphrase file: its first line.
    pub fn passphrase_file(path: &Path) -> Result<Secret, String> {
        let raw = Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("passphrase file {}: {e}", path.display()))?,
        );
        let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Err(format!("passphrase file {} is empty", path.display()));
        }
        Ok(Secret::Passphrase(Zeroizing::new(line.to_vec())))
    }

    /// A key file: all of its bytes.
    pub fn key_file(path: &Path) -> Result<Secret, String> {
        let raw = Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("key file {}: {e}", path.display()))?,
        );
        if raw.len() < 16 {
            return Err(format!(
                "key file {} is too short ({} bytes; at least 16)",
                path.display(),
                raw.len()
            ));
        }
        Ok(Secret::KeyFile(raw))
    }
}

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kdf {
    pub memory_kib: u32,
    pub time: u32,
    pub lanes: u32,
}

impl Default for Kdf {
    fn default() -> Self {
        Kdf {
            memory_kib: 256 << 10,
            time: 3,
            lanes: 1,
        }
    }
}

/// The wrapped master key as stored in the superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyBlob {
    pub kind: u8,
    pub kdf: Kdf,
    salt: [u8; 16],
    nonce: [u8; 12],
    wrapped: [u8; 48],
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("wrong key file")]
    WrongKeyFile,
    #[error("this pool is unlocked with a {0}, not a {1}")]
    WrongKind(&'static str, &'static str),
    #[error("key material in the superblock is malformed")]
    Malformed,
    #[error("key derivation: {0}")]
    Kdf(String),
    #[error("no random numbers from the system")]
    Random,
}

fn kind_name(k: u8) -> &'static str {
    if k == KEY_FILE {
        "key file"
    } else {
        "passphrase"
    }
}

/// The largest Argon2id cost a pool may ask for (what mkfs accepts): a
/// planted key blob cannot make an unlock take terabytes or hours.
pub const MAX_KDF_MEMORY_KIB: u32 = 64 << 20;
pub const MAX_KDF_TIME: u32 = 64;
pub const MAX_KDF_LANES: u32 = 16;

/// Physical memory in KiB (0 when unknown).
fn physical_kib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64 / 1024
    } else {
        0
    }
}

fn kek(secret: &[u8], kdf: Kdf, salt: &[u8; 16]) -> Result<LessSafeKey, KeyError> {
    let phys = physical_kib();
    if phys > 0 && kdf.memory_kib as u64 > phys / 2 {
        return Err(KeyError::Kdf(format!(
            "the key material asks for {} MiB of memory for Argon2id; this machine has {} MiB",
            kdf.memory_kib >> 10,
            phys >> 10
        )));
    }
    let params = argon2::Params::new(kdf.memory_kib, kdf.time, kdf.lanes, Some(32))
        .map_err(|e| KeyError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(secret, salt, out.as_mut())
        .map_err(|e| KeyError::Kdf(e.to_string()))?;
    let unbound = UnboundKey::new(&AES_256_GCM, out.as_ref())
        .map_err(|_| KeyError::Kdf("key length".into()))?;
    Ok(LessSafeKey::new(unbound))
}

pub fn random_key() -> Result<Key, KeyError> {
    let mut k = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(k.as_mut())
        .map_err(|_| KeyError::Random)?;
    Ok(k)
}

impl KeyBlob {
    /// Wrap `master` under `secret`; the pool UUID is bound in as associated data.
    pub fn wrap(
        master: &Key,
        secret: &Secret,
        kdf: Kdf,
        pool_uuid: &[u8; 16],
    ) -> Result<KeyBlob, KeyError> {
        let rng = SystemRandom::new();
        let (mut salt, mut nonce) = ([0u8; 16], [0u8; 12]);
        rng.fill(&mut salt).map_err(|_| KeyError::Random)?;
        // One wrap per key-encryption key (a fresh salt each time): a random nonce is safe.
        rng.fill(&mut nonce).map_err(|_| KeyError::Random)?;
        let k = kek(secret.bytes(), kdf, &salt)?;
        let mut wrapped = [0u8; 48];
        wrapped[..32].copy_from_slice(master.as_ref());
        let tag = k
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(pool_uuid),
                &mut wrapped[..32],
            )
            .map_err(|_| KeyError::Kdf("sealing failed".into()))?;
        wrapped[32..].copy_from_slice(tag.as_ref());
        Ok(KeyBlob {
            kind: secret.kind(),
            kdf,
            salt,
            nonce,
            wrapped,
        })
    }

    pub fn unwrap(&self, secret: &Secret, pool_uuid: &[u8; 16]) -> Result<Key, KeyError> {
        if secret.kind() != self.kind {
            return Err(KeyError::WrongKind(
                kind_name(self.kind),
                kind_name(secret.kind()),
            ));
        }
        let k = kek(secret.bytes(), self.kdf, &self.salt)?;
        let mut buf = Zeroizing::new(self.wrapped);
        let plain = k
            .open_in_place(
                Nonce::assume_unique_for_key(self.nonce),
                Aad::from(pool_uuid),
                buf.as_mut(),
            )
            .map_err(|_| {
                if self.kind == KEY_FILE {
                    KeyError::WrongKeyFile
                } else {
                    KeyError::WrongPassphrase
                }
            })?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(plain);
        Ok(out)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(1)
            .u8(self.kind)
            .u32(self.kdf.memory_kib)
            .u32(self.kdf.time)
            .u32(self.kdf.lanes);
        e.bytes(&self.salt).bytes(&self.nonce).bytes(&self.wrapped);
        e.0
    }

    pub fn decode(raw: &[u8]) -> Result<KeyBlob, KeyError> {
        let mut d = Dec::new(raw);
        let m = |_| KeyError::Malformed;
        if d.u8().map_err(m)? != 1 {
            return Err(KeyError::Malformed);
        }
        let kind = d.u8().map_err(m)?;
        if kind != PASSPHRASE && kind != KEY_FILE {
            return Err(KeyError::Malformed);
        }
        let kdf = Kdf {
            memory_kib: d.u32().map_err(m)?,
            time: d.u32().map_err(m)?,
            lanes: d.u32().map_err(m)?,
        };
        // Bounded here, before anything is derived: a planted blob must not
        // ask for more than mkfs would ever write.
        if !(1..=MAX_KDF_LANES).contains(&kdf.lanes)
            || !(1..=MAX_KDF_TIME).contains(&kdf.time)
            || kdf.memory_kib > MAX_KDF_MEMORY_KIB
            || kdf.memory_kib < 8 * kdf.lanes
        {
            return Err(KeyError::Malformed);
        }
        Ok(KeyBlob {
            kind,
            kdf,
            salt: d.array().map_err(m)?,
            nonce: d.array().map_err(m)?,
            wrapped: d.array().map_err(m)?,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} (argon2id, {} MiB, {} passes, {} lane(s))",
            kind_name(self.kind),
            self.kdf.memory_kib >> 10,
            self.kdf.time,
            self.kdf.lanes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: Kdf = Kdf {
        memory_kib: 64,
        time: 1,
        lanes: 1,
    };

    #[test]
    fn wrap_unwrap_and_wrong_secrets() {
        let master = random_key().unwrap();
        let uuid = [3u8; 16];
        let pass = Secret::Passphrase(Zeroizing::new(b"correct horse".to_vec()));
        let blob = KeyBlob::wrap(&master, &pass, CHEAP, &uuid).unwrap();
        let blob = KeyBlob::decode(&blob.encode()).unwrap();
        assert_eq!(blob.unwrap(&pass, &uuid).unwrap().as_ref(), master.as_ref());
        let wrong = Secret::Passphrase(Zeroizing::new(b"battery staple".to_vec()));
        assert!(matches!(
            blob.unwrap(&wrong, &uuid),
            Err(KeyError::WrongPassphrase)
        ));
        assert!(
            matches!(
                blob.unwrap(&pass, &[4u8; 16]),
                Err(KeyError::WrongPassphrase)
            ),
            "bound to the pool"
        );
        let file = Secret::KeyFile(Zeroizing::new(vec![1u8; 32]));
        assert!(matches!(
            blob.unwrap(&file, &uuid),
            Err(KeyError::WrongKind(..))
        ));
        assert!(KeyBlob::decode(&[9, 9, 9]).is_err());
        // Planted cost parameters are refused before any derivation.
        let mut raw = blob.encode();
        raw[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(KeyBlob::decode(&raw), Err(KeyError::Malformed)));
        let mut raw = blob.encode();
        raw[6..10].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(KeyBlob::decode(&raw), Err(KeyError::Malformed)));
    }
}
