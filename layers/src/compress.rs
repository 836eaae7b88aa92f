//! `compress`: lz4 or zstd per request (the filesystem sends 64 KiB units).
//! A unit is stored compressed only when that saves at least one 4 KiB block
//! below (after the lower layers' overhead); otherwise the raw bytes go down
//! unchanged, without a copy. The codec and compressed length are recorded
//! in the request's extent tag; the filesystem keeps them in the extent map
//! and hands them back on reads.

use crate::buf::Buf;
use crate::errno::Errno;
use crate::io::{Io, Op, TAG_DETACHED, TAG_RAW};
use crate::layer::Layer;
use crate::map::{self, Map, Mapping};
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
/// Set in a codec number when the stored bytes were padded with zeros to a
/// whole 4 KiB block (so that they go to the device with O_DIRECT); the
/// compressed length in the tag is the unpadded one.
pub const PADDED: u8 = 0x80;

pub struct Compress {
    lower: Arc<dyn Layer>,
    codec: Codec,
}

thread_local! {
    // One zstd context per thread and level: creating one per unit costs more than compressing it.
    static ZSTD_CTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Compress `data` into `out`; None when it does not fit.
fn zstd_compress(level: i32, data: &[u8], out: &mut [u8]) -> Option<usize> {
    ZSTD_CTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        c.as_mut()?.1.compress_to_buffer(data, out).ok()
    })
}

fn blocks(n: u64) -> u64 {
    n.div_ceil(4096)
}

/// Sampled bytes per unit for the entropy estimate, and the entropy (bits
/// per byte) above which a unit is stored without trying to compress it.
const SAMPLE_RUN: usize = 32;
const SAMPLE_STRIDE: usize = 512;
const MAX_ENTROPY: f64 = 7.5;

/// A cheap guess, in the manner of btrfs's compression heuristic: the byte
/// entropy of runs sampled across the unit. Data that is already compressed
/// or encrypted sits near 8 bits per byte, where zstd would spend its full
/// time (about 120 µs per 64 KiB) to save nothing or next to nothing;
/// computing this costs a few microseconds. Small units are always tried.
fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < 4 * SAMPLE_STRIDE {
        return false;
    }
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for (i, stride) in (0..data.len()).step_by(SAMPLE_STRIDE).enumerate() {
        // Runs at varying offsets within each stride: data with a header at
        // every 512-byte or 4 KiB boundary must not be sampled only there.
        let start = stride + (i * 97) % (SAMPLE_STRIDE - SAMPLE_RUN);
        for &b in &data[start.min(data.len())..(start + SAMPLE_RUN).min(data.len())] {
            counts[b as usize] += 1;
            n += 1;
        }
    }
    // H = log2(n) - sum(c * log2(c)) / n, with c * log2(c) from a table.
    static CLOG: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let table = CLOG.get_or_init(|| {
        (0..=(64 << 10) / SAMPLE_STRIDE * SAMPLE_RUN)
            .map(|c| {
                if c == 0 {
                    0.0
                } else {
                    c as f32 * (c as f32).log2()
                }
            })
            .collect()
    });
    let sum: f32 = counts
        .iter()
        .map(|&c| {
            table
                .get(c as usize)
                .copied()
                .unwrap_or_else(|| c as f32 * (c as f32).log2())
        })
        .sum();
    let n = n as f32;
    (n.log2() - sum / n) as f64 > MAX_ENTROPY
}

impl Compress {
    pub fn new(lower: Arc<dyn Layer>, codec: Codec) -> Compress {
        Compress { lower, codec }
    }

    /// The compressed form of `data`, straight into a buffer for the layer
    /// below, when it is at most `room` bytes (so that it saves a block).
    fn pack(&self, data: &[u8], room: u64) -> Option<(u8, Buf)> {
        if room == 0 || looks_incompressible(data) {
            return None;
        }
        let (id, n, mut out) = match self.codec {
            Codec::Lz4 => {
                // lz4 wants room for the worst case, whatever it then uses.
                let mut out = Buf::zeroed(lz4_flex::block::get_maximum_output_size(data.len()));
                let n = lz4_flex::block::compress_into(data, out.as_mut_slice()).ok();
                (LZ4, n, out)
            }
            Codec::Zstd(level) => {
                let mut out = Buf::zeroed(room as usize);
                let n = zstd_compress(level, data, out.as_mut_slice());
                (ZSTD, n, out)
            }
        };
        let n = n.filter(|n| *n as u64 <= room)?;
        out.set_len(n);
        Some((id, out))
    }

    /// Bytes to read back for a stored unit: padded ones to the whole block.
    fn stored_read_len(codec: u8, stored: u32) -> usize {
        if codec & PADDED != 0 {
            (stored as usize).div_ceil(4096) * 4096
        } else {
            stored as usize
        }
    }

    /// Compress a write and make the child that carries it below. Codec and
    /// lengths go into the request's tag (and so into the child's); what the
    /// layers below add (crypt's nonce and MAC) comes back up by itself.
    fn write_child(&self, io: &Io) -> Io {
        let len = io.len();
        let mut tag = io.tag();
        let over = if tag.flags & TAG_DETACHED != 0 {
            0
        } else {
            self.lower.overhead()
        };
        tag.logical_len = len as u32;
        // Kept only when it saves at least one 4 KiB block below.
        let room = (blocks(len + over).saturating_sub(1) * 4096).saturating_sub(over);
        let packed = (tag.flags & TAG_RAW == 0)
            .then(|| self.pack(io.buf().as_slice(), room))
            .flatten();
        (tag.codec, tag.stored_len) = match &packed {
            Some((id, p)) => (*id, p.len() as u32),
            None => (RAW, len as u32),
        };
        // Without overhead below (detached crypt, or none), pad the output to
        // whole blocks: the space is allocated in blocks anyway, and an
        // aligned request goes to the device with O_DIRECT, not through the
        // page cache. The buffer's zeroed capacity covers the padding.
        let packed = packed.map(|(_, mut p)| {
            if over == 0 && p.capacity() >= p.len().div_ceil(4096) * 4096 {
                tag.codec |= PADDED;
                p.set_len(p.len().div_ceil(4096) * 4096);
            }
            p
        });
        io.set_tag(tag);
        let buf = match packed {
            Some(p) => p,
            None => io.buf().clone(),
        };
        // The child writes the stored bytes; the caller wrote `len`.
        let end_io = Box::new(move |_: &Io, r: Result<u64, Errno>| r.map(|_| len));
        io.child(Op::Write, io.addr(), buf, Some(end_io))
    }

    /// A raw unit is read where it is; a compressed one into a buffer of
    /// its stored size, decompressed into the caller's on completion.
    fn read_mapping(&self, io: &Io) -> Mapping {
        let tag = io.tag();
        if tag.codec == RAW {
            return Mapping::Pass(0);
        }
        let (len, dst, codec, addr) = (io.len(), io.buf().clone(), tag.codec, io.addr());
        let stored = tag.stored_len as usize;
        let end_io = Box::new(move |child: &Io, r: Result<u64, Errno>| {
            r?;
            // SAFETY: the parent's read buffer is not looked at before it completes.
            let out = unsafe { dst.as_mut_slice_unchecked() };
            let src = &child.buf().as_slice()[..stored.min(child.buf().len())];
            let n = match codec & !PADDED {
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
            Buf::zeroed(Self::stored_read_len(tag.codec, tag.stored_len)),
            Some(end_io),
        );
        Mapping::Split(vec![(0, child)])
    }
}

impl Map for Compress {
    fn below(&self) -> &[Arc<dyn Layer>] {
        std::slice::from_ref(&self.lower)
    }
    fn map(&self, io: &Io) -> Mapping {
        match io.op() {
            Op::Write => Mapping::Split(vec![(0, self.write_child(io))]),
            Op::Read => self.read_mapping(io),
            Op::Flush | Op::Discard => Mapping::Pass(0),
        }
    }
    /// zstd is the dominant cost of a write: a batch's writes are compressed
    /// on every core.
    fn parallel(&self, io: &Io) -> bool {
        io.op() == Op::Write
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
        map::submit(self, io);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        map::submit_batch(self, ios);
    }
    fn overhead(&self) -> u64 {
        self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::looks_incompressible;

    fn random(len: usize) -> Vec<u8> {
        crate::mem::noise(len, 0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn entropy_guess_skips_only_noise() {
        assert!(looks_incompressible(&random(65536)));
        let text: Vec<u8> = b"stackfs compresses text like this line; "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        assert!(!looks_incompressible(&text));
        // Half noise, half zeros: compressible by half, so it is tried.
        let mut half = random(65536);
        for chunk in half.chunks_mut(1024) {
            chunk[..512].fill(0);
        }
        assert!(!looks_incompressible(&half));
        assert!(
            !looks_incompressible(&random(1000)),
            "small units are always tried"
        );
    }
}
