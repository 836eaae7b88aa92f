//! The superblock: one 4 KiB record at the start of every device, with a
//! backup copy in the device's last 4 KiB. Its byte layout is documented in
//! ARCHITECTURE.md ("On-disk format"); this file is the only code that reads
//! or writes it.

use crate::codec::{Dec, Enc};
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const SB_SIZE: usize = 4096;
pub const MAGIC: &[u8; 8] = b"STACKFS\x01";
/// Version 2 adds the MAC of encrypted pools; version 1 (no MAC) still opens
/// and is rewritten as version 2 by the first read-write mount.
pub const FORMAT_VERSION: u32 = 2;
/// Where the MAC sits: the 32 bytes before the CRC.
const MAC_AT: usize = SB_SIZE - 4 - 32;
/// Where a device's share of the pool starts: the first MiB holds the superblock.
pub const DATA_START: u64 = 1 << 20;
/// Longest layer spec a superblock stores.
pub const MAX_SPEC: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Format version this copy was read with (written: always FORMAT_VERSION).
    pub version: u32,
    pub pool_uuid: [u8; 16],
    pub device_uuid: [u8; 16],
    pub index: u32,
    pub count: u32,
    /// Bytes of each device given to the stripe (the same on every device).
    pub per_device: u64,
    /// Bytes at the start of pool space that hold the metadata store.
    pub meta_len: u64,
    pub created: u64,
    /// Bumped when the key material changes (passwd).
    pub generation: u64,
    /// First crypt nonce no mount has claimed yet (see crypt.rs).
    pub nonce_next: u64,
    pub spec: String,
    /// Key material (KDF parameters, wrapped master key); empty when unencrypted.
    pub keys: Vec<u8>,
    /// The members' copies (mirrored pools): which missed writes, a replace
    /// in progress. Encoded as an empty field while there is nothing to say,
    /// so that superblocks written before it had the field read the same.
    pub states: MemberStates,
    /// HMAC-SHA256 of every field above (bytes 0..4060 as encoded) under a
    /// key derived from the master key; zeros on unencrypted pools and in
    /// version 1.
    pub mac: [u8; 32],
}

/// What the pool knows about its members' copies. Every member present
/// carries it; the copy with the highest `seq` is the current one (a member
/// that was away keeps an older one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberStates {
    /// Bumped by every change.
    pub seq: u64,
    /// Members that missed writes, each with its resync cursor: the pool
    /// address below which it is whole again.
    pub stale: Vec<(u32, u64)>,
    /// A replace in progress.
    pub replace: Option<Replacing>,
}

/// A member being rebuilt onto a new device (`stackfs replace`). The new
/// device gets its superblock only when it is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacing {
    pub index: u32,
    /// The new device, as given (reopened to resume after a restart).
    pub path: String,
    pub device_uuid: [u8; 16],
    /// The pool address below which the new device is complete.
    pub cursor: u64,
}

impl MemberStates {
    /// Nothing to say: encoded as no bytes.
    pub fn is_empty(&self) -> bool {
        self.seq == 0 && self.stale.is_empty() && self.replace.is_none()
    }

    pub fn is_stale(&self, index: u32) -> bool {
        self.stale.iter().any(|(i, _)| *i == index)
    }

    /// Record member `index` as stale, whole again below `cursor`.
    pub fn mark_stale(&mut self, index: u32, cursor: u64) {
        match self.stale.iter_mut().find(|(i, _)| *i == index) {
            Some(entry) => entry.1 = cursor,
            None => {
                self.stale.push((index, cursor));
                self.stale.sort_unstable();
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut e = Enc::default();
        e.u64(self.seq);
        e.u32(self.stale.len() as u32);
        for (index, cursor) in &self.stale {
            e.u32(*index).u64(*cursor);
        }
        match &self.replace {
            None => {
                e.u8(0);
            }
            Some(r) => {
                e.u8(1).u32(r.index).u64(r.cursor).bytes(&r.device_uuid);
                e.blob(r.path.as_bytes());
            }
        }
        e.0
    }

    fn decode(raw: &[u8]) -> Result<MemberStates, crate::codec::Short> {
        if raw.is_empty() {
            return Ok(MemberStates::default());
        }
        let mut d = Dec::new(raw);
        let seq = d.u64()?;
        let n = d.u32()?;
        if n > 1024 {
            return Err(crate::codec::Short);
        }
        let mut stale = Vec::new();
        for _ in 0..n {
            stale.push((d.u32()?, d.u64()?));
        }
        let replace = match d.u8()? {
            0 => None,
            _ => Some(Replacing {
                index: d.u32()?,
                cursor: d.u64()?,
                device_uuid: d.array()?,
                path: String::from_utf8_lossy(d.blob()?).into_owned(),
            }),
        };
        let states = MemberStates {
            seq,
            stale,
            replace,
        };
        // One encoding only: the MAC covers the fields as re-encoded.
        if !d.rest().is_empty() || states.encode() != raw {
            return Err(crate::codec::Short);
        }
        Ok(states)
    }
}

/// The key that authenticates superblocks (derived from the master key).
pub struct SbKey(ring::hmac::Key);

impl SbKey {
    pub fn derive(master: &[u8; 32]) -> SbKey {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"stackfs superblock mac v2")
            .extract(master);
        let info = [&b"superblock"[..]];
        let okm = prk
            .expand(&info, ring::hmac::HMAC_SHA256)
            .expect("one HMAC key is a valid HKDF output length");
        SbKey(ring::hmac::Key::from(okm))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SbError {
    #[error("no stackfs superblock (magic not found)")]
    NotStackfs,
    #[error("format version {0} is not supported by this stackfs (supports {FORMAT_VERSION})")]
    Version(u32),
    #[error("superblock checksum mismatch")]
    Checksum,
    #[error("superblock is malformed: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Superblock {
    /// The bytes the MAC covers: every field, as written.
    fn body(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(MAGIC);
        e.u32(FORMAT_VERSION);
        e.u32(0);
        e.bytes(&self.pool_uuid);
        e.bytes(&self.device_uuid);
        e.u32(self.index);
        e.u32(self.count);
        e.u64(self.per_device);
        e.u64(self.meta_len);
        e.u64(self.created);
        e.u64(self.generation);
        e.u64(self.nonce_next);
        e.blob(self.spec.as_bytes());
        e.blob(&self.keys);
        e.blob(&self.states.encode());
        let mut out = e.0;
        assert!(out.len() <= MAC_AT, "superblock fields exceed 4 KiB");
        out.resize(MAC_AT, 0);
        out
    }

    /// Compute the MAC (encrypted pools): call after every change, before `encode`.
    pub fn seal(&mut self, key: &SbKey) {
        self.version = FORMAT_VERSION;
        let tag = ring::hmac::sign(&key.0, &self.body());
        self.mac.copy_from_slice(tag.as_ref());
    }

    /// Whether this copy's MAC is right (a version-1 copy has none: false).
    pub fn verify(&self, key: &SbKey) -> bool {
        self.version >= 2 && ring::hmac::verify(&key.0, &self.body(), &self.mac).is_ok()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.mac);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Superblock, SbError> {
        if raw.len() < SB_SIZE || &raw[..8] != MAGIC {
            return Err(SbError::NotStackfs);
        }
        let stored = u32::from_le_bytes(raw[SB_SIZE - 4..SB_SIZE].try_into().expect("4 bytes"));
        if crc32c::crc32c(&raw[..SB_SIZE - 4]) != stored {
            return Err(SbError::Checksum);
        }
        let mut d = Dec::new(&raw[8..SB_SIZE - 4]);
        let m = |_| SbError::Malformed("truncated field");
        let version = d.u32().map_err(m)?;
        if version == 0 || version > FORMAT_VERSION {
            return Err(SbError::Version(version));
        }
        if d.u32().map_err(m)? != 0 {
            return Err(SbError::Malformed("reserved field is not zero"));
        }
        let sb = Superblock {
            version,
            pool_uuid: d.array().map_err(m)?,
            device_uuid: d.array().map_err(m)?,
            index: d.u32().map_err(m)?,
            count: d.u32().map_err(m)?,
            per_device: d.u64().map_err(m)?,
            meta_len: d.u64().map_err(m)?,
            created: d.u64().map_err(m)?,
            generation: d.u64().map_err(m)?,
            nonce_next: d.u64().map_err(m)?,
            spec: String::from_utf8(d.blob().map_err(m)?.to_vec())
                .map_err(|_| SbError::Malformed("spec is not UTF-8"))?,
            keys: d.blob().map_err(m)?.to_vec(),
            states: MemberStates::decode(d.blob().map_err(m)?)
                .map_err(|_| SbError::Malformed("member states"))?,
            mac: if version >= 2 {
                raw[MAC_AT..MAC_AT + 32].try_into().expect("32 bytes")
            } else {
                [0; 32]
            },
        };
        // Every byte counts: the MAC is computed over the fields re-encoded,
        // so bytes that decoding would ignore must be zero.
        let pad = d.rest().len().saturating_sub(SB_SIZE - 4 - MAC_AT);
        if d.rest()[..pad].iter().any(|b| *b != 0) {
            return Err(SbError::Malformed("non-zero bytes after the fields"));
        }
        if sb.count == 0 || sb.index >= sb.count {
            return Err(SbError::Malformed("device index out of range"));
        }
        Ok(sb)
    }
}

/// Offset of the backup copy on a device of `size` bytes.
pub fn backup_offset(size: u64) -> u64 {
    (size / SB_SIZE as u64) * SB_SIZE as u64 - SB_SIZE as u64
}

/// What was found on one device.
pub struct Found {
    pub sb: Superblock,
    /// The primary copy was unreadable and the backup was used.
    pub used_backup: Option<SbError>,
    /// The backup copy, when it reads (the primary may still fail its MAC).
    pub backup: Option<Superblock>,
}

pub fn read(file: &File, size: u64) -> Result<Found, SbError> {
    let mut raw = vec![0u8; SB_SIZE];
    file.read_exact_at(&mut raw, 0)?;
    let primary = Superblock::decode(&raw);
    let backup = if size >= 2 * SB_SIZE as u64 {
        file.read_exact_at(&mut raw, backup_offset(size))?;
        Superblock::decode(&raw).ok()
    } else {
        None
    };
    match (primary, backup) {
        (Ok(sb), backup) => Ok(Found {
            sb,
            used_backup: None,
            backup,
        }),
        (Err(e), Some(b)) => Ok(Found {
            sb: b.clone(),
            used_backup: Some(e),
            backup: Some(b),
        }),
        // Neither copy: report what the primary said (unformatted, damaged...).
        (Err(e), None) => Err(e),
    }
}

/// Write both copies: the backup first and durably, then the primary, so at
/// every instant at least one valid copy exists.
pub fn write(file: &File, size: u64, sb: &Superblock) -> std::io::Result<()> {
    let raw = sb.encode();
    file.write_all_at(&raw, backup_offset(size))?;
    file.sync_data()?;
    file.write_all_at(&raw, 0)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            mac: [0; 32],
            pool_uuid: [1; 16],
            device_uuid: [2; 16],
            index: 1,
            count: 3,
            per_device: 1 << 30,
            meta_len: 64 << 20,
            created: 1,
            generation: 0,
            nonce_next: 0,
            spec: "stripe=64k".into(),
            keys: vec![],
            states: MemberStates::default(),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let raw = sample().encode();
        assert_eq!(raw.len(), SB_SIZE);
        assert_eq!(Superblock::decode(&raw).unwrap(), sample());
        let mut bad = raw.clone();
        bad[100] ^= 1;
        assert!(matches!(Superblock::decode(&bad), Err(SbError::Checksum)));
        assert!(matches!(
            Superblock::decode(&[0u8; SB_SIZE]),
            Err(SbError::NotStackfs)
        ));
        assert!(matches!(
            Superblock::decode(&raw[..100]),
            Err(SbError::NotStackfs)
        ));
    }

    #[test]
    fn member_states_round_trip_and_have_one_encoding() {
        let mut sb = sample();
        sb.states = MemberStates {
            seq: 9,
            stale: vec![(1, 4 << 20), (3, 0)],
            replace: Some(Replacing {
                index: 2,
                path: "/dev/loop7".into(),
                device_uuid: [5; 16],
                cursor: 123,
            }),
        };
        let raw = sb.encode();
        assert_eq!(Superblock::decode(&raw).unwrap(), sb);
        // Empty states take no bytes: superblocks written before the field read the same.
        assert!(MemberStates::default().encode().is_empty());
        let mut padded = MemberStates::default().encode();
        padded.extend_from_slice(&[0; 16]);
        assert!(MemberStates::decode(&padded).is_err());
    }

    #[test]
    fn the_mac_covers_every_field() {
        let key = SbKey::derive(&[7; 32]);
        let mut sb = sample();
        sb.keys = vec![1; 90];
        sb.seal(&key);
        let raw = sb.encode();
        assert!(Superblock::decode(&raw).unwrap().verify(&key));
        assert!(!sb.verify(&SbKey::derive(&[8; 32])), "another pool's key");
        // Change any byte of the fields (recomputing the CRC, as an attacker
        // can): the MAC fails.
        for at in (8..300).step_by(7) {
            let mut bad = raw.clone();
            bad[at] ^= 0x10;
            let crc = crc32c::crc32c(&bad[..SB_SIZE - 4]);
            bad[SB_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
            if let Ok(d) = Superblock::decode(&bad) {
                assert!(!d.verify(&key), "byte {at} changed unnoticed");
            }
        }
        // Claiming version 1 (no MAC) does not pass as authenticated.
        let mut v1 = Superblock::decode(&raw).unwrap();
        v1.version = 1;
        assert!(!v1.verify(&key));
    }
}
