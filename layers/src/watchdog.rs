//! `watchdog`: a device that stops answering must not hang the filesystem.
//! Every request passing this layer is timed; one older than the timeout is
//! cancelled below (ASYNC_CANCEL in the kernel, or the fault layer's queue)
//! and completes with EIO. The stack builder puts it where data and metadata
//! both pass, above the devices.

use crate::errno::Errno;
use crate::io::{Io, Op};
use crate::layer::Layer;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Tracked {
    started: Instant,
    child: Io,
    expired: Arc<AtomicBool>,
}

struct Shared {
    inflight: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

pub struct Watchdog {
    lower: Arc<dyn Layer>,
    timeout: Duration,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Watchdog {
    pub fn new(lower: Arc<dyn Layer>, timeout: Duration) -> Arc<Watchdog> {
        let shared = Arc::new(Shared {
            inflight: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(s, timeout))
            .expect("spawn watchdog thread");
        Arc::new(Watchdog {
            lower,
            timeout,
            shared,
            thread: Mutex::new(Some(t)),
        })
    }

    fn track(&self, io: &Io) -> Io {
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let expired = Arc::new(AtomicBool::new(false));
        let (shared, flag, timeout) = (self.shared.clone(), expired.clone(), self.timeout);
        let end_io = Box::new(move |_: &Io, r: Result<u64, Errno>| {
            shared.inflight.lock().remove(&id);
            if flag.load(Ordering::SeqCst) && r.is_err() {
                log::error!(
                    "device request timed out after {timeout:?}: cancelled, reported as EIO"
                );
                return Err(Errno::EIO);
            }
            r
        });
        let child = match io.op() {
            Op::Discard => io.child_discard(io.addr(), io.len(), Some(end_io)),
            op => io.child(op, io.addr(), io.buf().clone(), Some(end_io)),
        };
        self.shared.inflight.lock().insert(
            id,
            Tracked {
                started: Instant::now(),
                child: child.clone(),
                expired,
            },
        );
        child
    }
}

fn watch(s: Arc<Shared>, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    loop {
        {
            let mut stop = s.stop.lock();
            if *stop {
                return;
            }
            s.wake.wait_for(&mut stop, tick);
            if *stop {
                return;
            }
        }
        let now = Instant::now();
        let expired: Vec<Io> = s
            .inflight
            .lock()
            .values()
            .filter(|t| {
                now.duration_since(t.started) >= timeout && !t.expired.swap(true, Ordering::SeqCst)
            })
            .map(|t| t.child.clone())
            .collect();
        for io in expired {
            io.cancel();
        }
    }
}

impl Layer for Watchdog {
    fn name(&self) -> String {
        format!("watchdog={}s", self.timeout.as_secs_f32())
    }
    fn capacity(&self) -> u64 {
        self.lower.capacity()
    }
    fn alignment(&self) -> usize {
        self.lower.alignment()
    }
    fn submit(&self, io: Io) {
        self.submit_batch(vec![io]);
    }
    fn submit_batch(&self, ios: Vec<Io>) {
        let children: Vec<Io> = ios.iter().map(|io| self.track(io)).collect();
        self.lower.submit_batch(children);
        for io in ios {
            io.put();
        }
    }
    fn overhead(&self) -> u64 {
        self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
    fn shutdown(&self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        crate::layer::join_unless_current(self.thread.lock().take());
        self.lower.shutdown();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
    }
}
