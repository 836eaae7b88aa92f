//! `bay`: the place of one member below a mirror. It holds the member's
//! device and stands for it in the stack (name, counters, the layers below
//! are the device's), so that a device can be put in while the pool runs
//! (`stackfs replace`), or the bay can stay empty: a member missing from a
//! degraded mount, where every request fails with EIO at once and the
//! mirror reads from the other copies.

use crate::errno::Errno;
use crate::io::Io;
use crate::layer::{Layer, Repairs, Stats};
use parking_lot::RwLock;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub struct Bay {
    device: RwLock<Option<Arc<dyn Layer>>>,
    /// What the pool uses of the member (a device put in may be larger).
    capacity: u64,
    vectored: bool,
    /// Shown while the bay is empty.
    missing_name: String,
}

impl Bay {
    /// A bay holding `device` (None: empty) of `capacity` bytes.
    pub fn new(device: Option<Arc<dyn Layer>>, capacity: u64, name: String) -> Arc<Bay> {
        let vectored = device.as_ref().is_none_or(|d| d.vectored());
        Arc::new(Bay {
            device: RwLock::new(device),
            capacity,
            vectored,
            missing_name: format!("missing:{name}"),
        })
    }

    /// Put `device` in; returns the one it replaces. Requests already sent
    /// to the old device complete there.
    pub fn insert(&self, device: Arc<dyn Layer>) -> Result<Option<Arc<dyn Layer>>, String> {
        if device.capacity() < self.capacity {
            return Err(format!(
                "{} holds {} bytes; the member needs {}",
                device.name(),
                device.capacity(),
                self.capacity
            ));
        }
        Ok(self.device.write().replace(device))
    }

    /// The device in the bay, if any.
    pub fn device(&self) -> Option<Arc<dyn Layer>> {
        self.device.read().clone()
    }
}

impl Layer for Bay {
    fn name(&self) -> String {
        match &*self.device.read() {
            Some(d) => d.name(),
            None => self.missing_name.clone(),
        }
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn alignment(&self) -> usize {
        self.device().map_or(4096, |d| d.alignment())
    }
    fn submit(&self, io: Io) {
        self.submit_batch(vec![io]);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        match self.device() {
            Some(d) => d.submit_batch(ios),
            None => {
                for io in ios {
                    io.finish(Err(Errno::EIO));
                }
            }
        }
    }
    fn overhead(&self) -> u64 {
        self.device().map_or(0, |d| d.overhead())
    }
    fn vectored(&self) -> bool {
        self.vectored
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        self.device().map_or_else(Vec::new, |d| d.lowers())
    }
    fn stats(&self) -> Option<Arc<Stats>> {
        self.device().and_then(|d| d.stats())
    }
    fn kernel_entries(&self) -> Option<Arc<AtomicU64>> {
        self.device().and_then(|d| d.kernel_entries())
    }
    fn repairs(&self) -> Option<Arc<Repairs>> {
        None
    }
    fn shutdown(&self) {
        if let Some(d) = self.device() {
            d.shutdown();
        }
    }
}
