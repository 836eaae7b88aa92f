//! `compress`: lz4 or zstd per request (the filesystem sends 64 KiB units).
//! A unit is stored compressed only when that saves at least one 4 KiB block
//! below (after the lower layers' overhead); otherwise the raw bytes go down
//! unchanged, without a copy. The codec and compressed length are recorded
//! in the request's extent tag; the filesystem keeps them in the extent map
//! and hands them back on reads.

use crate::buf::Buf;
use crate::errno::Errno;
use crate::io::{Io, Op, TAG_DETACHED, TAG_RAW};
use crate::layer::{transform, Layer};
use std::cell::RefCell;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    Zstd(i32),
}

/// Codec numbers in extent tags (0: raw).
pub const RAW: u8 = 0;
pub const LZ4: u8 = 1;
pub const ZSTD: u8 = 2;

pub struct Compress {
    lower: Arc<dyn Layer>,
    codec: Codec,
}

thread_local! {
    // One zstd context per thread and level: creating one per unit costs more than compressing it.
    static ZSTD_CTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

fn zstd_compress(level: i32, data: &[u8]) -> Option<Vec<u8>> {
    ZSTD_CTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        c.as_mut()?.1.compress(data).ok()
    })
}

fn blocks(n: u64) -> u64 {
    n.div_ceil(4096)
}

impl Compress {
    pub fn new(lower: Arc<dyn Layer>, codec: Codec) -> Compress {
        Compress { lower, codec }
    }

    fn write(&self, io: Io) {
        let len = io.len();
        let data = io.buf().as_slice();
        let (id, packed) = match self.codec {
            Codec::Lz4 => (LZ4, Some(lz4_flex::block::compress(data))),
            Codec::Zstd(level) => (ZSTD, zstd_compress(level, data)),
        };
        let mut tag = io.tag();
        let over = if tag.flags & TAG_DETACHED != 0 {
            0
        } else {
            self.lower.overhead()
        };
        tag.logical_len = len as u32;
        let packed = packed.filter(|p| {
            tag.flags & TAG_RAW == 0 && blocks(p.len() as u64 + over) < blocks(len + over)
        });
        (tag.codec, tag.stored_len) = match &packed {
            Some(p) => (id, p.len() as u32),
            None => (RAW, len as u32),
        };
        io.set_tag(tag);
        // What the layers below record (crypt's nonce and MAC) goes back up.
        let parent = io.clone();
        let end_io = Box::new(move |child: &Io, r: Result<u64, Errno>| {
            let below = child.tag();
            let mut t = parent.tag();
            (t.nonce, t.mac) = (below.nonce, below.mac);
            parent.set_tag(t);
            r.map(|_| len)
        });
        let buf = match &packed {
            Some(p) => Buf::copy_from(p),
            None => io.buf().clone(),
        };
        let child = io.child(Op::Write, io.addr(), buf, Some(end_io));
        self.lower.submit(child);
        io.put();
    }

    fn read(&self, io: Io) {
        let tag = io.tag();
        if tag.codec == RAW {
            self.lower.submit(io);
            return;
        }
        let (len, dst, codec, addr) = (io.len(), io.buf().clone(), tag.codec, io.addr());
        let end_io = Box::new(move |child: &Io, r: Result<u64, Errno>| {
            r?;
            // SAFETY: the parent's read buffer is not looked at before it completes.
            let out = unsafe { dst.as_mut_slice_unchecked() };
            let src = child.buf().as_slice();
            let n = match codec {
                LZ4 => lz4_flex::block::decompress_into(src, out).ok(),
                ZSTD => zstd::bulk::decompress_to_buffer(src, out).ok(),
                _ => None,
            };
            if n != Some(len as usize) {
                log::error!("compress: unit at pool address {addr} does not decompress to {len} bytes (codec {codec})");
                return Err(Errno::EIO);
            }
            Ok(len)
        });
        let child = io.child(
            Op::Read,
            io.addr(),
            Buf::zeroed(tag.stored_len as usize),
            Some(end_io),
        );
        self.lower.submit(child);
        io.put();
    }
}

impl Layer for Compress {
    fn name(&self) -> String {
        match self.codec {
            Codec::Lz4 => "compress=lz4".into(),
            Codec::Zstd(l) => format!("compress=zstd:{l}"),
        }
    }
    fn capacity(&self) -> u64 {
        self.lower.capacity()
    }
    fn submit(&self, io: Io) {
        transform(io, &*self.lower, |io| self.write(io), |io| self.read(io));
    }
    fn overhead(&self) -> u64 {
        self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
}
