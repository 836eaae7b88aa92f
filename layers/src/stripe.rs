//! `stripe`: RAID-0 over N lower layers. Like dm-stripe's map function, it
//! only remaps: a request is carved at chunk boundaries into children that are
//! clones over the parent's buffer, and each lower gets its children as one batch.

use crate::io::{Io, Op};
use crate::layer::{check_range, Layer};
use crate::spec::SpecError;
use std::sync::Arc;

pub struct Stripe {
    chunk: u64,
    lowers: Vec<Arc<dyn Layer>>,
    per_lower: u64,
}

impl Stripe {
    pub fn new(chunk: u64, lowers: Vec<Arc<dyn Layer>>) -> Result<Stripe, SpecError> {
        if chunk == 0 || chunk % 4096 != 0 {
            return Err(SpecError::BadParam {
                layer: "stripe".into(),
                why: format!("chunk size {chunk} is not a multiple of 4 KiB"),
            });
        }
        if lowers.is_empty() {
            return Err(SpecError::BadParam {
                layer: "stripe".into(),
                why: "no devices below".into(),
            });
        }
        let min = lowers.iter().map(|l| l.capacity()).min().unwrap_or(0);
        let per_lower = min / chunk * chunk;
        Ok(Stripe {
            chunk,
            lowers,
            per_lower,
        })
    }

    /// Where byte `addr` of the stripe lives: (lower index, address there).
    fn carve(&self, io: &Io, batches: &mut [Vec<Io>]) {
        if io.op() == Op::Flush {
            for b in batches.iter_mut() {
                b.push(io.child(Op::Flush, 0, io.buf().clone(), None));
            }
            return;
        }
        let mut done = 0u64;
        while done < io.len() {
            let addr = io.addr() + done;
            let seg = (self.chunk - addr % self.chunk).min(io.len() - done);
            let (dev, dev_addr) = self.map(addr);
            let child = if io.op() == Op::Discard {
                io.child_discard(dev_addr, seg, None)
            } else {
                io.child(
                    io.op(),
                    dev_addr,
                    io.buf().slice(done as usize, seg as usize),
                    None,
                )
            };
            batches[dev].push(child);
            done += seg;
        }
    }

    pub fn map(&self, addr: u64) -> (usize, u64) {
        let n = self.lowers.len() as u64;
        let chunk_no = addr / self.chunk;
        let dev = (chunk_no % n) as usize;
        (dev, (chunk_no / n) * self.chunk + addr % self.chunk)
    }
}

impl Layer for Stripe {
    fn name(&self) -> String {
        format!("stripe={}k", self.chunk / 1024)
    }

    fn capacity(&self) -> u64 {
        self.per_lower * self.lowers.len() as u64
    }

    fn submit(&self, io: Io) {
        self.submit_batch(vec![io]);
    }

    /// All children of all requests go to each lower as one batch.
    fn submit_batch(&self, ios: Vec<Io>) {
        let mut batches: Vec<Vec<Io>> = vec![Vec::new(); self.lowers.len()];
        let mut parents = Vec::with_capacity(ios.len());
        for io in ios {
            if let Err(e) = check_range(io.addr(), io.len(), self.capacity()) {
                io.finish(Err(e));
                continue;
            }
            self.carve(&io, &mut batches);
            parents.push(io);
        }
        for (lower, batch) in self.lowers.iter().zip(batches) {
            if !batch.is_empty() {
                lower.submit_batch(batch);
            }
        }
        for io in parents {
            io.put();
        }
    }

    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        self.lowers.clone()
    }
}
