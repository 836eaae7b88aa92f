//! The framework's half of a mapping layer (compress, crypt, stripe,
//! watchdog), in the manner of a device-mapper target's `map`: the layer only
//! says what one request becomes below (`Map::map`); the framework maps every
//! request of a batch, gathers the results per lower layer, hands each lower
//! ONE batch (so the devices at the bottom enter the kernel once per batch,
//! not once per request), and drops the parents' own references once their
//! children are queued. Tags need no handling in the layers: a child starts
//! with its parent's tag, and what the layers below change in it is merged
//! back into the parent when the child completes (`Io`, io.rs).

use crate::errno::Errno;
use crate::io::Io;
use crate::layer::Layer;
use rayon::prelude::*;
use std::sync::Arc;

/// What one request becomes below a mapping layer.
pub enum Mapping {
    /// The request itself goes to lower `i`, unchanged (a flush or discard
    /// through a transform, a read of raw bytes through compress).
    Pass(usize),
    /// Children made with `Io::child*`, each with the index of its lower. The
    /// framework drops the request's own reference once they are queued, so
    /// it completes after its last child, with their bytes or first error.
    Split(Vec<(usize, Io)>),
    /// A copy made with `Io::detached` goes to lower `i`; the layer itself
    /// completes the request (the watchdog: on the copy's answer or its timeout).
    Detached(usize, Io),
    /// Nothing goes below: the request fails here with this errno.
    Fail(Errno),
}

/// A layer described by how it maps one request.
pub trait Map: Send + Sync {
    /// The layers below, indexed as in `Mapping`.
    fn below(&self) -> &[Arc<dyn Layer>];
    /// Map one request (never a cancelled one: the framework fails those
    /// with ECANCELED). Work done here (sealing, compressing) is done in the
    /// submitter's thread, or on every core, see `parallel`.
    fn map(&self, io: &Io) -> Mapping;
    /// Whether mapping this request is heavy CPU work (compression): a batch
    /// holding two or more such requests is mapped on every core.
    fn parallel(&self, _io: &Io) -> bool {
        false
    }
}

/// Submit a batch through a mapping layer: what `Layer::submit_batch` of
/// every mapping layer does.
pub fn submit_batch<M: Map + ?Sized>(layer: &M, ios: Vec<Io>) {
    let mappings = map_all(layer, &ios);
    let below = layer.below();
    let mut batches: Vec<Vec<Io>> = vec![Vec::new(); below.len()];
    let mut parents = Vec::new();
    for (io, mapping) in ios.into_iter().zip(mappings) {
        match mapping {
            Mapping::Pass(i) => queue(&mut batches, i, io),
            Mapping::Split(children) => {
                for (i, child) in children {
                    queue(&mut batches, i, child);
                }
                parents.push(io);
            }
            Mapping::Detached(i, copy) => queue(&mut batches, i, copy),
            Mapping::Fail(e) => {
                io.finish(Err(e));
            }
        }
    }
    // Batch order is kept within each lower: a flush stays behind the
    // writes before it in the batch.
    for (lower, batch) in below.iter().zip(batches) {
        if !batch.is_empty() {
            lower.submit_batch(batch);
        }
    }
    for io in parents {
        io.put();
    }
}

/// Submit one request through a mapping layer (`Layer::submit`).
pub fn submit<M: Map + ?Sized>(layer: &M, io: Io) {
    submit_batch(layer, vec![io]);
}

fn map_one<M: Map + ?Sized>(layer: &M, io: &Io) -> Mapping {
    if io.is_cancelled() {
        return Mapping::Fail(Errno::ECANCELED);
    }
    layer.map(io)
}

fn map_all<M: Map + ?Sized>(layer: &M, ios: &[Io]) -> Vec<Mapping> {
    let heavy = ios.iter().filter(|io| layer.parallel(io)).count();
    if heavy > 1 {
        ios.par_iter().map(|io| map_one(layer, io)).collect()
    } else {
        ios.iter().map(|io| map_one(layer, io)).collect()
    }
}

/// Put a request in the batch of lower `i`; a mapping to a lower that does
/// not exist is a bug in the layer, and fails the request instead of panicking.
fn queue(batches: &mut [Vec<Io>], i: usize, io: Io) {
    match batches.get_mut(i) {
        Some(batch) => batch.push(io),
        None => {
            log::error!("{io:?} mapped to lower {i}, which does not exist");
            io.finish(Err(Errno::EIO));
        }
    }
}
