//! `crypt`: authenticated encryption (AES-256-GCM) of every request.
//!
//! A write of `len` bytes at address A is stored as
//! `nonce (12) | ciphertext (len) | tag (16)`, zero-padded to 4 KiB, at A
//! (inline: the metadata store's slots), or, when the request's extent tag
//! says `TAG_DETACHED`, as the ciphertext alone, with nonce and MAC returned
//! in the tag for the caller to keep (file data: the extent map holds them,
//! so an extent takes no extra space and cannot be rolled back on its own).
//! The associated data is the address and the length, so a block cannot be
//! moved elsewhere, or cut, without failing its tag. A read with a bad tag
//! completes with EIO, never with the bytes. A stored block of all zeros is
//! space never written (it reads as zeros): the filesystem's own checksums
//! (kept in authenticated metadata) catch a block zeroed by someone else.
//!
//! Nonces are never reused under one key: each is the next value of a 64-bit
//! counter handed out by a `NonceSource`, whose blocks of values are claimed
//! durably (in the superblocks) before any value of the block is used.

use crate::buf::Buf;
use crate::errno::Errno;
use crate::io::{Io, Op, TAG_DETACHED};
use crate::layer::{transform, Layer};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use std::sync::Arc;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes crypt adds to every request (before padding to 4 KiB).
pub const OVERHEAD: u64 = (NONCE_LEN + TAG_LEN) as u64;

/// Hands out nonce counter values, each at most once per key.
pub trait NonceSource: Send + Sync {
    fn next(&self) -> Result<u64, Errno>;
}

pub struct Crypt {
    lower: Arc<dyn Layer>,
    key: Arc<LessSafeKey>,
    nonces: Arc<dyn NonceSource>,
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

impl Crypt {
    /// `key` is the 32-byte data key; the caller keeps (and zeroes) its copy.
    pub fn new(lower: Arc<dyn Layer>, key: &[u8; 32], nonces: Arc<dyn NonceSource>) -> Crypt {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key");
        Crypt {
            lower,
            key: Arc::new(LessSafeKey::new(unbound)),
            nonces,
        }
    }

    /// Encrypt `data` in place (a request's `len` bytes at `addr`, both bound
    /// in as associated data); the authentication tag.
    fn seal(&self, nonce: [u8; NONCE_LEN], addr: u64, len: u64, data: &mut [u8]) -> Tag {
        self.key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(addr, len)),
                data,
            )
            .expect("AES-GCM sealing cannot fail for in-range lengths")
    }

    fn write(&self, io: Io) {
        let len = io.len();
        let counter = match self.nonces.next() {
            Ok(c) => c,
            Err(e) => {
                io.finish(Err(e));
                return;
            }
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
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
            let mac = self.seal(nonce, io.addr(), len, plain);
            tag.nonce = [0; 24];
            tag.nonce[..NONCE_LEN].copy_from_slice(&nonce);
            tag.mac.copy_from_slice(mac.as_ref());
            io.set_tag(tag);
            let child = io.child(Op::Write, io.addr(), out, None);
            self.lower.submit(child);
            io.put();
            return;
        }
        let mut out = Buf::zeroed(round4k(len + OVERHEAD) as usize);
        let s = out.as_mut_slice();
        s[..NONCE_LEN].copy_from_slice(&nonce);
        let body = &mut s[NONCE_LEN..NONCE_LEN + len as usize];
        body.copy_from_slice(io.buf().as_slice());
        let tag = self.seal(nonce, io.addr(), len, body);
        s[NONCE_LEN + len as usize..NONCE_LEN + len as usize + TAG_LEN]
            .copy_from_slice(tag.as_ref());
        let child = io.child(
            Op::Write,
            io.addr(),
            out,
            Some(Box::new(move |_, r| r.map(|_| len))),
        );
        self.lower.submit(child);
        io.put();
    }

    fn read(&self, io: Io) {
        let len = io.len();
        let key = self.key.clone();
        let (addr, dst) = (io.addr(), io.buf().clone());
        let tag = io.tag();
        if tag.flags & TAG_DETACHED != 0 {
            let nonce: [u8; NONCE_LEN] = tag.nonce[..NONCE_LEN].try_into().expect("12 bytes");
            let end_io = Box::new(move |_: &Io, r: Result<u64, Errno>| {
                r?;
                // SAFETY: the read has completed; nobody looks at the buffer before
                // this request completes, and on failure it is wiped.
                let out = unsafe { dst.as_mut_slice_unchecked() };
                match key.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad(addr, len)),
                    ring::aead::Tag::from(tag.mac),
                    out,
                    0..,
                ) {
                    Ok(_) => Ok(len),
                    Err(_) => {
                        out.fill(0);
                        log::error!(
                            "crypt: authentication failed for {len} bytes at pool address {addr}"
                        );
                        Err(Errno::EIO)
                    }
                }
            });
            let child = io.child(Op::Read, addr, io.buf().clone(), Some(end_io));
            self.lower.submit(child);
            io.put();
            return;
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
            let nonce: [u8; NONCE_LEN] = raw[..NONCE_LEN].try_into().expect("12 bytes");
            let sealed = &mut raw[NONCE_LEN..NONCE_LEN + len as usize + TAG_LEN];
            match key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(addr, len)),
                sealed,
            ) {
                Ok(plain) => {
                    out.copy_from_slice(plain);
                    Ok(len)
                }
                Err(_) => {
                    log::error!(
                        "crypt: authentication failed for {len} bytes at pool address {addr}"
                    );
                    Err(Errno::EIO)
                }
            }
        });
        let child = io.child(Op::Read, addr, raw, Some(end_io));
        self.lower.submit(child);
        io.put();
    }
}

impl Layer for Crypt {
    fn name(&self) -> String {
        "crypt=aes-256-gcm".into()
    }
    fn capacity(&self) -> u64 {
        self.lower.capacity()
    }
    fn submit(&self, io: Io) {
        transform(io, &*self.lower, |io| self.write(io), |io| self.read(io));
    }
    fn overhead(&self) -> u64 {
        OVERHEAD + self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
}
