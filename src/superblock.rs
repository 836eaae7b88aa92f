//! The superblock: one 4 KiB record at the start of every device, with a
//! backup copy in the device's last 4 KiB. Its byte layout is documented in
//! ARCHITECTURE.md ("On-disk format"); this file is the only code that reads
//! or writes it.

use crate::codec::{Dec, Enc};
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const SB_SIZE: usize = 4096;
pub const MAGIC: &[u8; 8] = b"STACKFS\x01";
pub const FORMAT_VERSION: u32 = 1;
/// Where a device's share of the pool starts: the first MiB holds the superblock.
pub const DATA_START: u64 = 1 << 20;
/// Longest layer spec a superblock stores.
pub const MAX_SPEC: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
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
    pub fn encode(&self) -> Vec<u8> {
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
        let mut out = e.0;
        assert!(out.len() <= SB_SIZE - 4, "superblock fields exceed 4 KiB");
        out.resize(SB_SIZE - 4, 0);
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
        if version != FORMAT_VERSION {
            return Err(SbError::Version(version));
        }
        d.u32().map_err(m)?;
        let sb = Superblock {
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
        };
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
}

pub fn read(file: &File, size: u64) -> Result<Found, SbError> {
    let mut raw = vec![0u8; SB_SIZE];
    file.read_exact_at(&mut raw, 0)?;
    let primary = Superblock::decode(&raw);
    let primary_err = match primary {
        Ok(sb) => {
            return Ok(Found {
                sb,
                used_backup: None,
            })
        }
        Err(e) => e,
    };
    if size < 2 * SB_SIZE as u64 {
        return Err(primary_err);
    }
    file.read_exact_at(&mut raw, backup_offset(size))?;
    match Superblock::decode(&raw) {
        Ok(sb) => Ok(Found {
            sb,
            used_backup: Some(primary_err),
        }),
        // Neither copy: report what the primary said (unformatted, damaged...).
        Err(_) => Err(primary_err),
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
}
