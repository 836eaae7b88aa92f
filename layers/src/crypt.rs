//! `crypt`: authenticated encryption (AES-256-GCM) of every request.
//!
//! Keys. The pool's master key never encrypts anything itself (except in
//! blocks written before per-mount keys existed, which still read). Each
//! read-write mount draws a random 96-bit *key id* and encrypts everything it
//! writes under `HKDF-SHA256(master, key id)`, with a 64-bit counter as the
//! nonce, starting from 0. A (key, nonce) pair can therefore repeat only if
//! two mounts draw the same key id (probability 2^-96 per pair of mounts),
//! whatever happens to the devices: a copied image, a snapshot, a superblock
//! rolled back, or a crash all lead to a new mount and a new key. Every
//! stored block carries its key id next to its nonce, so it reads back under
//! the key that wrote it; derived keys are cached.
//!
//! A write of `len` bytes at address A is stored as
//! `nonce (12) | key id (12) | ciphertext (len) | tag (16)`, zero-padded to
//! 4 KiB, at A (inline: the metadata store's slots), or, when the request's
//! extent tag says `TAG_DETACHED`, as the ciphertext alone, with nonce, key id
//! and MAC returned in the tag for the caller to keep (file data: the extent
//! map holds them, so an extent takes no extra space and cannot be rolled
//! back on its own). The associated data is the address and the length, so a
//! block cannot be moved elsewhere, or cut, without failing its tag. A read
//! with a bad tag completes with EIO, never with the bytes. A stored block of
//! all zeros is space never written (it reads as zeros): the filesystem's own
//! checks (kept in authenticated metadata) catch a block zeroed by someone else.
//!
//! The 12-byte nonce of the current format is `counter (8 LE) | "KID2"`; the
//! format before per-mount keys had `counter (8) | 0 (4)` under the master key
//! and no key id (`nonce | ciphertext | tag`): inline blocks of that format
//! are recognised by the four zero bytes and still read.

use crate::buf::Buf;
use crate::errno::Errno;
use crate::io::{Io, Op, TAG_DETACHED};
use crate::layer::Layer;
use crate::map::{self, Map, Mapping};
use parking_lot::RwLock;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use zeroize::Zeroizing;

pub const NONCE_LEN: usize = 12;
pub const KEY_ID_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes crypt adds to every inline request (before padding to 4 KiB).
pub const OVERHEAD: u64 = (NONCE_LEN + KEY_ID_LEN + TAG_LEN) as u64;
/// What an inline block of the format before per-mount keys carried.
const LEGACY_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// The last four nonce bytes of the current format (zeros before it).
const MARKER: [u8; 4] = *b"KID2";
/// Key derivation salt: binds derived keys to this use.
const HKDF_SALT: &[u8] = b"stackfs per-mount data key v2";

/// Names the key a block was sealed with; all zeros: the master key itself
/// (blocks written before per-mount keys).
pub type KeyId = [u8; KEY_ID_LEN];
const LEGACY_ID: KeyId = [0; KEY_ID_LEN];
/// Derived keys kept at most (a pool has one per read-write mount it ever had).
const KEY_CACHE: usize = 4096;

/// The master key and the keys derived from it, by key id.
pub struct Keyring {
    master: Zeroizing<[u8; 32]>,
    derived: RwLock<HashMap<KeyId, Arc<LessSafeKey>>>,
}

fn aes_key(raw: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("AES-256 takes a 32-byte key"))
}

impl Keyring {
    pub fn new(master: &[u8; 32]) -> Keyring {
        Keyring {
            master: Zeroizing::new(*master),
            derived: RwLock::new(HashMap::new()),
        }
    }

    /// The key blocks with this id were sealed with.
    pub fn key(&self, id: &KeyId) -> Arc<LessSafeKey> {
        if let Some(k) = self.derived.read().get(id) {
            return k.clone();
        }
        let k = Arc::new(if *id == LEGACY_ID {
            aes_key(self.master.as_ref())
        } else {
            let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, HKDF_SALT)
                .extract(self.master.as_ref());
            let info = [&id[..]];
            let okm = prk
                .expand(&info, &AES_256_GCM)
                .expect("one AES-256 key is a valid HKDF output length");
            LessSafeKey::new(UnboundKey::from(okm))
        });
        let mut d = self.derived.write();
        if d.len() >= KEY_CACHE {
            d.clear();
        }
        d.insert(*id, k.clone());
        k
    }
}

/// What a read-write mount encrypts with: its own key and nonce counter.
struct Writer {
    id: KeyId,
    key: Arc<LessSafeKey>,
    counter: AtomicU64,
}

pub struct Crypt {
    lower: Arc<dyn Layer>,
    keys: Arc<Keyring>,
    /// None on a read-only stack: writes fail with EROFS.
    writer: Option<Writer>,
}

fn round4k(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

fn aad(addr: u64, len: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&addr.to_le_bytes());
    a[8..].copy_from_slice(&len.to_le_bytes());
    a
}

fn auth_failed(len: u64, addr: u64) -> Errno {
    log::error!("crypt: authentication failed for {len} bytes at pool address {addr}");
    Errno::EIO
}

impl Crypt {
    /// `write_key` is this mount's fresh random key id (None: read-only).
    pub fn new(lower: Arc<dyn Layer>, keys: Arc<Keyring>, write_key: Option<KeyId>) -> Crypt {
        let writer = write_key.map(|id| Writer {
            id,
            key: keys.key(&id),
            counter: AtomicU64::new(0),
        });
        Crypt {
            lower,
            keys,
            writer,
        }
    }

    /// Seal `data` in place under this mount's key (a request's `len` bytes
    /// at `addr`, both bound in as associated data): nonce, key id and tag.
    fn seal(
        &self,
        addr: u64,
        len: u64,
        data: &mut [u8],
    ) -> Result<([u8; NONCE_LEN], KeyId, Tag), Errno> {
        let w = self.writer.as_ref().ok_or(Errno::EROFS)?;
        let counter = w.counter.fetch_add(1, Ordering::Relaxed);
        if counter == u64::MAX {
            return Err(Errno::EIO);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
        nonce[8..].copy_from_slice(&MARKER);
        let tag = w
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(addr, len)),
                data,
            )
            .map_err(|_| Errno::EIO)?;
        Ok((nonce, w.id, tag))
    }

    /// Seal a write into the child that carries it below; nonce, key id and
    /// MAC of a detached write go into the request's tag.
    fn write(&self, io: &Io) -> Mapping {
        let len = io.len();
        let mut tag = io.tag();
        if tag.flags & TAG_DETACHED != 0 {
            // A buffer that only this request holds (compress's output) is
            // encrypted where it is; one the caller still holds (its data,
            // needed again if the write fails) is copied first.
            let out = if io.buf().is_unique() {
                io.buf().clone()
            } else {
                Buf::copy_from(io.buf().as_slice())
            };
            // SAFETY: `out` is either a fresh copy or memory no other window
            // shares (checked above; the request's own handle is the only one).
            let plain = unsafe { out.as_mut_slice_unchecked() };
            let (nonce, id, mac) = match self.seal(io.addr(), len, plain) {
                Ok(s) => s,
                Err(e) => return Mapping::Fail(e),
            };
            tag.nonce[..NONCE_LEN].copy_from_slice(&nonce);
            tag.nonce[NONCE_LEN..].copy_from_slice(&id);
            tag.mac.copy_from_slice(mac.as_ref());
            io.set_tag(tag);
            return Mapping::Split(vec![(0, io.child(Op::Write, io.addr(), out, None))]);
        }
        let mut out = Buf::zeroed(round4k(len + OVERHEAD) as usize);
        let s = out.as_mut_slice();
        let head = NONCE_LEN + KEY_ID_LEN;
        let body = &mut s[head..head + len as usize];
        body.copy_from_slice(io.buf().as_slice());
        let (nonce, id, mac) = match self.seal(io.addr(), len, body) {
            Ok(x) => x,
            Err(e) => return Mapping::Fail(e),
        };
        s[..NONCE_LEN].copy_from_slice(&nonce);
        s[NONCE_LEN..head].copy_from_slice(&id);
        s[head + len as usize..head + len as usize + TAG_LEN].copy_from_slice(mac.as_ref());
        let child = io.child(
            Op::Write,
            io.addr(),
            out,
            Some(Box::new(move |_, r| r.map(|_| len))),
        );
        Mapping::Split(vec![(0, child)])
    }

    /// A read goes below whole (detached: into the caller's buffer; inline:
    /// into a buffer for the sealed block) and is opened on completion.
    fn read(&self, io: &Io) -> Mapping {
        let len = io.len();
        let keys = self.keys.clone();
        let (addr, dst) = (io.addr(), io.buf().clone());
        let tag = io.tag();
        if tag.flags & TAG_DETACHED != 0 {
            let nonce: [u8; NONCE_LEN] = tag.nonce[..NONCE_LEN].try_into().expect("12 bytes");
            let id: KeyId = tag.nonce[NONCE_LEN..].try_into().expect("12 bytes");
            let end_io = Box::new(move |_: &Io, r: Result<u64, Errno>| {
                r?;
                // SAFETY: the read has completed; nobody looks at the buffer before
                // this request completes, and on failure it is wiped.
                let out = unsafe { dst.as_mut_slice_unchecked() };
                match keys.key(&id).open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad(addr, len)),
                    ring::aead::Tag::from(tag.mac),
                    out,
                    0..,
                ) {
                    Ok(_) => Ok(len),
                    Err(_) => {
                        out.fill(0);
                        Err(auth_failed(len, addr))
                    }
                }
            });
            let child = io.child(Op::Read, addr, io.buf().clone(), Some(end_io));
            return Mapping::Split(vec![(0, child)]);
        }
        let raw = Buf::zeroed(round4k(len + OVERHEAD) as usize);
        let end_io = Box::new(move |child: &Io, r: Result<u64, Errno>| {
            r?;
            // SAFETY: both reads have completed; the child's buffer is ours alone
            // now and the parent's buffer is not looked at until the parent completes.
            let (raw, out) = unsafe {
                (
                    child.buf().as_mut_slice_unchecked(),
                    dst.as_mut_slice_unchecked(),
                )
            };
            if raw.iter().all(|b| *b == 0) {
                out.fill(0);
                return Ok(len);
            }
            let plain = open_inline(&keys, addr, len, raw).ok_or_else(|| auth_failed(len, addr))?;
            out.copy_from_slice(&plain[..len as usize]);
            Ok(len)
        });
        let child = io.child(Op::Read, addr, raw, Some(end_io));
        Mapping::Split(vec![(0, child)])
    }
}

impl Map for Crypt {
    fn below(&self) -> &[Arc<dyn Layer>] {
        std::slice::from_ref(&self.lower)
    }
    fn map(&self, io: &Io) -> Mapping {
        match io.op() {
            Op::Write => self.write(io),
            Op::Read => self.read(io),
            Op::Flush | Op::Discard => Mapping::Pass(0),
        }
    }
}

/// Open an inline block read back whole (`raw`, a multiple of 4 KiB) for a
/// request of `len` bytes at `addr`: the plaintext, at least `len` bytes.
/// A block of the format before per-mount keys filled its 4 KiB-rounded
/// space: its ciphertext is `raw.len() - 28` bytes under the master key.
fn open_inline<'a>(keys: &Keyring, addr: u64, len: u64, raw: &'a mut [u8]) -> Option<&'a [u8]> {
    let nonce: [u8; NONCE_LEN] = raw.get(..NONCE_LEN)?.try_into().ok()?;
    let (id, start, ct_len) = if nonce[8..] == MARKER {
        let id: KeyId = raw[NONCE_LEN..NONCE_LEN + KEY_ID_LEN].try_into().ok()?;
        (id, NONCE_LEN + KEY_ID_LEN, len as usize)
    } else if nonce[8..] == [0; 4] {
        let ct_len = raw.len().checked_sub(LEGACY_OVERHEAD)?;
        (LEGACY_ID, NONCE_LEN, ct_len.max(len as usize))
    } else {
        return None;
    };
    let sealed = raw.get_mut(start..start + ct_len + TAG_LEN)?;
    let plain = keys
        .key(&id)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(addr, ct_len as u64)),
            sealed,
        )
        .ok()?;
    (plain.len() >= len as usize).then_some(&*plain)
}

impl Layer for Crypt {
    fn name(&self) -> String {
        "crypt=aes-256-gcm".into()
    }
    fn capacity(&self) -> u64 {
        self.lower.capacity()
    }
    fn submit(&self, io: Io) {
        map::submit(self, io);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        map::submit_batch(self, ios);
    }
    fn overhead(&self) -> u64 {
        OVERHEAD + self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{ExtentTag, Waiter};
    use crate::mem::Mem;

    fn stack(keys: &Arc<Keyring>, id: Option<KeyId>) -> (Arc<Mem>, Crypt) {
        let mem = Arc::new(Mem::new(1 << 20));
        let c = Crypt::new(mem.clone(), keys.clone(), id);
        (mem, c)
    }

    fn write(c: &Crypt, addr: u64, data: &[u8], detached: bool) -> (Result<u64, Errno>, ExtentTag) {
        let w = Waiter::new();
        let io = Io::new(Op::Write, addr, Buf::copy_from(data), Some(w.end_io()));
        if detached {
            io.set_tag(ExtentTag {
                flags: TAG_DETACHED,
                ..ExtentTag::default()
            });
        }
        c.submit(io);
        w.wait_tag()
    }

    fn read(c: &Crypt, addr: u64, len: usize, tag: Option<ExtentTag>) -> Result<Vec<u8>, Errno> {
        let w = Waiter::new();
        let buf = Buf::zeroed(len);
        let io = Io::new(Op::Read, addr, buf.clone(), Some(w.end_io()));
        if let Some(t) = tag {
            io.set_tag(t);
        }
        c.submit(io);
        w.wait().map(|_| buf.as_slice().to_vec())
    }

    #[test]
    fn each_mount_key_reads_back_and_nonces_never_repeat_across_mounts() {
        let keys = Arc::new(Keyring::new(&[9u8; 32]));
        let (mem, a) = stack(&keys, Some([1; 12]));
        let b = Crypt::new(mem.clone(), keys.clone(), Some([2; 12]));
        let data = vec![0x42u8; 8192];
        let (r, ta) = write(&a, 0, &data, true);
        r.unwrap();
        let (r, tb) = write(&b, 65536, &data, true);
        r.unwrap();
        // Both mounts start their counters at 0: same nonce, different key id.
        assert_eq!(ta.nonce[..12], tb.nonce[..12]);
        assert_ne!(ta.nonce[12..], tb.nonce[12..]);
        assert_ne!(ta.mac, tb.mac, "different keys give different ciphertexts");
        // Any stack of the pool reads any mount's blocks.
        let ro = Crypt::new(mem.clone(), keys.clone(), None);
        assert_eq!(read(&ro, 0, 8192, Some(ta)).unwrap(), data);
        assert_eq!(read(&ro, 65536, 8192, Some(tb)).unwrap(), data);
        // Claiming another key id fails the tag.
        let mut forged = ta;
        forged.nonce[12..].copy_from_slice(&[2; 12]);
        assert_eq!(read(&ro, 0, 8192, Some(forged)), Err(Errno::EIO));
        // Inline blocks carry their key id.
        write(&a, 131072, &data[..4000], false).0.unwrap();
        write(&b, 139264, &data[..4000], false).0.unwrap();
        assert_eq!(read(&ro, 131072, 4000, None).unwrap(), &data[..4000]);
        assert_eq!(read(&ro, 139264, 4000, None).unwrap(), &data[..4000]);
        // A read-only stack cannot encrypt.
        assert_eq!(write(&ro, 0, &data, true).0, Err(Errno::EROFS));
    }

    #[test]
    fn blocks_of_the_format_before_per_mount_keys_still_read() {
        let master = [5u8; 32];
        let keys = Arc::new(Keyring::new(&master));
        let (mem, c) = stack(&keys, None);
        // An inline block as the old code wrote it: nonce | ct | tag under the
        // master key, the request sized to fill 8 KiB.
        let len = 8192 - LEGACY_OVERHEAD;
        let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let mut raw = vec![0u8; 8192];
        let nonce = [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        raw[..12].copy_from_slice(&nonce);
        raw[12..12 + len].copy_from_slice(&plain);
        let tag = aes_key(&master)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(16384, len as u64)),
                &mut raw[12..12 + len],
            )
            .unwrap();
        raw[12 + len..].copy_from_slice(tag.as_ref());
        crate::submit_wait(&*mem, Op::Write, 16384, Buf::copy_from(&raw)).unwrap();
        // Today's request for the same slot is 12 bytes shorter.
        let now = 8192 - OVERHEAD as usize;
        assert_eq!(read(&c, 16384, now, None).unwrap(), &plain[..now]);
        // A detached extent of the old format: key id zero.
        let mut data = vec![0x11u8; 4096];
        let mac = aes_key(&master)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(0, 4096)),
                &mut data,
            )
            .unwrap();
        crate::submit_wait(&*mem, Op::Write, 0, Buf::copy_from(&data)).unwrap();
        let mut t = ExtentTag {
            flags: TAG_DETACHED,
            ..ExtentTag::default()
        };
        t.nonce[..12].copy_from_slice(&nonce);
        t.mac.copy_from_slice(mac.as_ref());
        assert_eq!(read(&c, 0, 4096, Some(t)).unwrap(), vec![0x11u8; 4096]);
    }
}
