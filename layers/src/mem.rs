//! `mem`: a device kept in memory (sparse, 4 KiB pages), or `null`, which
//! stores nothing and reads zeros. Both complete inline, in the submitter's
//! thread: they measure the framework's own cost and serve tests.

use crate::errno::Errno;
use crate::io::{Io, Op};
use crate::layer::{check_range, Layer};
use parking_lot::RwLock;
use std::collections::HashMap;

const PAGE: u64 = 4096;

pub struct Mem {
    capacity: u64,
    /// None: the null device.
    pages: Option<RwLock<HashMap<u64, Box<[u8]>>>>,
}

impl Mem {
    pub fn new(capacity: u64) -> Mem {
        Mem {
            capacity,
            pages: Some(RwLock::new(HashMap::new())),
        }
    }

    pub fn null(capacity: u64) -> Mem {
        Mem {
            capacity,
            pages: None,
        }
    }

    fn read(&self, addr: u64, out: &mut [u8]) {
        let Some(pages) = &self.pages else {
            out.fill(0);
            return;
        };
        let pages = pages.read();
        let mut done = 0usize;
        while done < out.len() {
            let a = addr + done as u64;
            let (page, within) = (a / PAGE, (a % PAGE) as usize);
            let n = (PAGE as usize - within).min(out.len() - done);
            match pages.get(&page) {
                Some(p) => out[done..done + n].copy_from_slice(&p[within..within + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&self, addr: u64, data: &[u8]) {
        let Some(pages) = &self.pages else { return };
        let mut pages = pages.write();
        let mut done = 0usize;
        while done < data.len() {
            let a = addr + done as u64;
            let (page, within) = (a / PAGE, (a % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - done);
            let p = pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn discard(&self, addr: u64, len: u64) {
        let Some(pages) = &self.pages else { return };
        let mut pages = pages.write();
        let (first, end) = (addr.div_ceil(PAGE), (addr + len) / PAGE);
        for p in first..end {
            pages.remove(&p);
        }
        drop(pages);
        // Partial pages at either end read back as zeros, as after a punch.
        let head = (first * PAGE).min(addr + len) - addr;
        self.write(addr, &vec![0; head as usize]);
        let tail_start = (end * PAGE).max(addr);
        if end >= first {
            self.write(tail_start, &vec![0; (addr + len - tail_start) as usize]);
        }
    }
}

impl Layer for Mem {
    fn name(&self) -> String {
        if self.pages.is_some() {
            "mem".into()
        } else {
            "null".into()
        }
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn vectored(&self) -> bool {
        true
    }

    fn submit(&self, io: Io) {
        if io.is_cancelled() {
            io.finish(Err(Errno::ECANCELED));
            return;
        }
        if let Err(e) = check_range(io.addr(), io.len(), self.capacity) {
            io.finish(Err(e));
            return;
        }
        let res = match io.op() {
            Op::Read => {
                let mut addr = io.addr();
                for seg in io.segments() {
                    // SAFETY: a read's buffers belong to this request until it completes.
                    self.read(addr, unsafe { seg.as_mut_slice_unchecked() });
                    addr += seg.len() as u64;
                }
                Ok(io.len())
            }
            Op::Write => {
                let mut addr = io.addr();
                for seg in io.segments() {
                    self.write(addr, seg.as_slice());
                    addr += seg.len() as u64;
                }
                Ok(io.len())
            }
            Op::Discard => {
                self.discard(io.addr(), io.len());
                Ok(io.len())
            }
            Op::Flush => Ok(0),
        };
        io.finish(res);
    }
}

/// Deterministic incompressible bytes (xorshift64) for tests and benchmarks:
/// the same `seed` gives the same bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
