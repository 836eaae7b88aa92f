//! `stripe`: RAID-0 over N lower layers. Like dm-stripe's map function, it
//! only remaps: a request is carved at chunk boundaries into children that are
//! clones over the parent's buffer; the framework (map.rs) gives each lower
//! the children of a whole batch as one batch.

use crate::buf::Buf;
use crate::io::{Io, Op};
use crate::layer::{check_range, Layer};
use crate::map::{self, Map, Mapping};
use crate::spec::SpecError;
use std::sync::Arc;

pub struct Stripe {
    chunk: u64,
    lowers: Vec<Arc<dyn Layer>>,
    per_lower: u64,
    /// Whether every lower takes vectored requests: then the chunks of one
    /// request that land next to each other on a lower go down as one.
    vectored: bool,
}

/// Most buffers in one vectored request (the kernel's IOV_MAX).
const MAX_SEGS: usize = 1024;

/// The piece of one request bound for one lower, grown while chunks stay contiguous.
struct Run {
    addr: u64,
    len: u64,
    segs: Vec<Buf>,
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
        let vectored = lowers.iter().all(|l| l.vectored());
        Ok(Stripe {
            chunk,
            lowers,
            per_lower,
            vectored,
        })
    }

    /// Split `io` at chunk boundaries into children for each lower. With
    /// vectored lowers, the chunks that follow each other on one lower (chunk
    /// k and k+N of an N-way stripe) become one child over several buffers, so
    /// a 1 MiB request reaches each device as one request, not as 64 KiB pieces.
    fn carve(&self, io: &Io) -> Vec<(usize, Io)> {
        if io.op() == Op::Flush {
            return (0..self.lowers.len())
                .map(|dev| (dev, io.child(Op::Flush, 0, io.buf().clone(), None)))
                .collect();
        }
        let mut children = Vec::new();
        let mut runs: Vec<Option<Run>> = (0..self.lowers.len()).map(|_| None).collect();
        let mut done = 0u64;
        while done < io.len() {
            let addr = io.addr() + done;
            let seg = (self.chunk - addr % self.chunk).min(io.len() - done);
            let (dev, dev_addr) = self.map(addr);
            let buf = (io.op() != Op::Discard).then(|| io.buf().slice(done as usize, seg as usize));
            done += seg;
            let slot = &mut runs[dev];
            if let Some(run) = slot.as_mut() {
                if (self.vectored || io.op() == Op::Discard)
                    && run.addr + run.len == dev_addr
                    && run.segs.len() < MAX_SEGS
                {
                    run.len += seg;
                    run.segs.extend(buf);
                    continue;
                }
                let run = slot.take().expect("checked");
                children.push((dev, Self::child_of(io, run)));
            }
            *slot = Some(Run {
                addr: dev_addr,
                len: seg,
                segs: buf.into_iter().collect(),
            });
        }
        for (dev, run) in runs.into_iter().enumerate() {
            if let Some(run) = run {
                children.push((dev, Self::child_of(io, run)));
            }
        }
        children
    }

    fn child_of(io: &Io, run: Run) -> Io {
        if io.op() == Op::Discard {
            io.child_discard(run.addr, run.len, None)
        } else {
            io.child_vectored(io.op(), run.addr, run.segs)
        }
    }

    /// Where byte `addr` of the stripe lives: (lower index, address there).
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
        map::submit(self, io);
    }

    fn submit_batch(&self, ios: Vec<Io>) {
        map::submit_batch(self, ios);
    }

    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        self.lowers.clone()
    }
}

impl Map for Stripe {
    fn below(&self) -> &[Arc<dyn Layer>] {
        &self.lowers
    }
    fn map(&self, io: &Io) -> Mapping {
        match check_range(io.addr(), io.len(), self.capacity()) {
            Ok(()) => Mapping::Split(self.carve(io)),
            Err(e) => Mapping::Fail(e),
        }
    }
}
