//! `fault`: a test layer in the manner of dm-flakey and dm-delay. It passes
//! requests through unchanged unless a rule matches: fail them with an errno,
//! delay them, hang them until cancelled, or, after a "power cut", acknowledge
//! writes while dropping them. A torn write lets only its first bytes reach
//! the device and then cuts the power.
//!
//! Rules are changed at run time through `FaultControl`, either by calls or by
//! one-line text commands (see `FaultControl::command`), so a mounted
//! filesystem can be steered from a test. All fault layers of a stack share
//! one control: a power cut stops every device at the same instant, and a
//! rule may name one device (`dev=N`).

use crate::errno::Errno;
use crate::io::{Io, Op};
use crate::layer::Layer;
use parking_lot::{Condvar, Mutex};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub enum FaultAction {
    Error(Errno),
    Delay(Duration),
    Hang,
    /// Only the first `n` bytes of a write reach the device; then the power is cut.
    Tear(u64),
}

#[derive(Clone, Debug)]
pub struct FaultRule {
    /// None: every op.
    pub op: Option<Op>,
    /// Requests overlapping `[start, end)`; None: everywhere.
    pub range: Option<(u64, u64)>,
    /// Act on every nth matching request (1: all).
    pub every: u64,
    /// Only on the fault layer above device N (pool order); None: all.
    pub dev: Option<usize>,
    pub action: FaultAction,
}

impl FaultRule {
    pub fn new(op: Option<Op>, action: FaultAction) -> FaultRule {
        FaultRule {
            op,
            range: None,
            every: 1,
            dev: None,
            action,
        }
    }

    fn matches(&self, io: &Io, dev: Option<usize>) -> bool {
        if self.dev.is_some_and(|d| Some(d) != dev) {
            return false;
        }
        self.op.is_none_or(|op| op == io.op())
            && self
                .range
                .is_none_or(|(s, e)| io.addr() < e && io.addr() + io.len().max(1) > s)
    }
}

/// The switches of one fault layer, shared with whoever steers it.
#[derive(Default)]
pub struct FaultControl {
    rules: Mutex<Vec<(FaultRule, u64)>>,
    power_cut: AtomicBool,
    /// Writes still allowed before the power is cut; negative: no cut planned.
    writes_left: AtomicI64,
    pub dropped_writes: AtomicU64,
    /// Writes let through to the devices.
    pub written: AtomicU64,
    pub injected: AtomicU64,
    hung: Mutex<Vec<(Io, Arc<AtomicBool>)>>,
}

impl FaultControl {
    pub fn new() -> Arc<FaultControl> {
        let c = FaultControl::default();
        c.writes_left.store(-1, Ordering::Relaxed);
        Arc::new(c)
    }

    pub fn add_rule(&self, rule: FaultRule) {
        self.rules.lock().push((rule, 0));
    }

    /// Remove every rule, release hung requests, restore power.
    pub fn clear(&self) {
        self.rules.lock().clear();
        self.power_cut.store(false, Ordering::SeqCst);
        self.writes_left.store(-1, Ordering::SeqCst);
    }

    /// From now on writes are acknowledged and dropped, flushes acknowledged.
    pub fn cut_power(&self) {
        self.power_cut.store(true, Ordering::SeqCst);
    }

    /// Let `n` more writes through, then cut the power.
    pub fn cut_after_writes(&self, n: u64) {
        self.writes_left.store(n as i64, Ordering::SeqCst);
        if n == 0 {
            self.cut_power();
        }
    }

    pub fn is_power_cut(&self) -> bool {
        self.power_cut.load(Ordering::SeqCst)
    }

    pub fn hung_count(&self) -> usize {
        self.hung.lock().len()
    }

    /// One line for people and tests: power state and counters.
    pub fn status(&self) -> String {
        format!(
            "power={} writes={} dropped={} injected={} hung={}",
            if self.is_power_cut() { "cut" } else { "on" },
            self.written.load(Ordering::SeqCst),
            self.dropped_writes.load(Ordering::SeqCst),
            self.injected.load(Ordering::SeqCst),
            self.hung_count()
        )
    }

    /// Apply a text command:
    /// `error [OP] [range=START-END] [every=N] [errno=NAME|NUM]`,
    /// `delay [OP] ... ms=N`, `hang [OP] ...`, `tear BYTES [OP] ...`,
    /// `cut`, `cut-after N`, `clear`. OP is read, write, flush, discard or any.
    pub fn command(&self, line: &str) -> Result<(), String> {
        let mut words = line.split_whitespace();
        let verb = words.next().ok_or("empty fault command")?;
        match verb {
            "clear" => return Ok(self.clear()),
            "cut" => return Ok(self.cut_power()),
            "cut-after" => {
                let n = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ok_or("cut-after needs a count")?;
                return Ok(self.cut_after_writes(n));
            }
            _ => {}
        }
        let mut rule = FaultRule::new(None, FaultAction::Hang);
        let mut errno = Errno::EIO;
        let mut ms = None;
        let mut tear = None;
        if verb == "tear" {
            tear = Some(
                words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .ok_or("tear needs a byte count")?,
            );
        }
        for w in words {
            let (k, v) = w.split_once('=').unwrap_or((w, ""));
            match k {
                "read" => rule.op = Some(Op::Read),
                "write" => rule.op = Some(Op::Write),
                "flush" => rule.op = Some(Op::Flush),
                "discard" => rule.op = Some(Op::Discard),
                "any" => rule.op = None,
                "dev" => rule.dev = Some(v.parse().map_err(|_| format!("bad dev= value {v:?}"))?),
                "every" => {
                    rule.every = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(format!("bad every= value {v:?}"))?
                }
                "ms" => {
                    ms = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("bad ms= value {v:?}"))?,
                    )
                }
                "errno" => errno = parse_errno(v).ok_or(format!("unknown errno {v:?}"))?,
                "range" => {
                    let (s, e) = v
                        .split_once('-')
                        .ok_or(format!("range= wants START-END, got {v:?}"))?;
                    let (s, e) = (parse_num(s)?, parse_num(e)?);
                    if s >= e {
                        return Err(format!("empty range {v:?}"));
                    }
                    rule.range = Some((s, e));
                }
                _ => return Err(format!("unknown word {w:?} in fault command")),
            }
        }
        rule.action = match verb {
            "error" => FaultAction::Error(errno),
            "delay" => FaultAction::Delay(Duration::from_millis(ms.ok_or("delay needs ms=N")?)),
            "hang" => FaultAction::Hang,
            "tear" => FaultAction::Tear(tear.unwrap_or(0)),
            other => return Err(format!("unknown fault command {other:?}")),
        };
        self.add_rule(rule);
        Ok(())
    }

    /// The action for this request, if any rule fires.
    fn action_for(&self, io: &Io, dev: Option<usize>) -> Option<FaultAction> {
        let mut rules = self.rules.lock();
        for (rule, seen) in rules.iter_mut() {
            if rule.matches(io, dev) {
                *seen += 1;
                if *seen % rule.every == 0 {
                    self.injected.fetch_add(1, Ordering::Relaxed);
                    return Some(rule.action.clone());
                }
            }
        }
        None
    }

    /// Count a write against a planned cut; true if this write is past it.
    fn write_is_lost(&self) -> bool {
        if self.is_power_cut() {
            return true;
        }
        let left = self.writes_left.load(Ordering::SeqCst);
        if left < 0 {
            return false;
        }
        // Decrement only while positive; the write that takes it to zero still lands.
        match self
            .writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 0).then(|| n - 1)
            }) {
            Ok(1) => {
                self.cut_power();
                false
            }
            Ok(_) => false,
            Err(_) => {
                self.cut_power();
                true
            }
        }
    }
}

fn parse_num(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or(format!("bad number {s:?}"))
}

fn parse_errno(s: &str) -> Option<Errno> {
    Some(Errno(match s.to_ascii_uppercase().as_str() {
        "EIO" => libc::EIO,
        "ENOSPC" => libc::ENOSPC,
        "EROFS" => libc::EROFS,
        "ENOMEM" => libc::ENOMEM,
        "ETIMEDOUT" => libc::ETIMEDOUT,
        "ENODEV" => libc::ENODEV,
        n => n.parse().ok().filter(|n| *n > 0)?,
    }))
}

struct Delayed {
    due: Instant,
    seq: u64,
    io: Io,
    claim: Arc<AtomicBool>,
}
impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        self.seq == o.seq
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    // BinaryHeap is a max-heap: the earliest deadline must compare greatest.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.due.cmp(&self.due).then(o.seq.cmp(&self.seq))
    }
}

struct DelayQueue {
    heap: Mutex<(BinaryHeap<Delayed>, u64, bool)>,
    wake: Condvar,
}

pub struct Fault {
    lower: Arc<dyn Layer>,
    ctl: Arc<FaultControl>,
    /// The device below (pool order), when this layer sits under the stripe.
    device: Option<usize>,
    delays: Arc<DelayQueue>,
    timer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Fault {
    pub fn new(lower: Arc<dyn Layer>, ctl: Arc<FaultControl>, device: Option<usize>) -> Arc<Fault> {
        let delays = Arc::new(DelayQueue {
            heap: Mutex::new((BinaryHeap::new(), 0, false)),
            wake: Condvar::new(),
        });
        let f = Arc::new(Fault {
            lower,
            ctl,
            device,
            delays: delays.clone(),
            timer: Mutex::new(None),
        });
        let lower = f.lower.clone();
        let t = std::thread::Builder::new()
            .name("fault-delay".into())
            .spawn(move || run_delays(delays, lower))
            .expect("spawn fault delay thread");
        *f.timer.lock() = Some(t);
        f
    }

    pub fn control(&self) -> Arc<FaultControl> {
        self.ctl.clone()
    }

    /// Pass every hung request down, as if the device woke up.
    pub fn release_hung(&self) {
        let hung = std::mem::take(&mut *self.ctl.hung.lock());
        for (io, claim) in hung {
            if !claim.swap(true, Ordering::SeqCst) {
                io.clear_canceller();
                self.lower.submit(io);
            }
        }
    }

    fn route(&self, io: Io, pass: &mut Vec<Io>) {
        if matches!(io.op(), Op::Write | Op::Discard) && self.ctl.write_is_lost() {
            self.ctl.dropped_writes.fetch_add(1, Ordering::Relaxed);
            let n = io.len();
            io.finish(Ok(n));
            return;
        }
        if io.op() == Op::Flush && self.ctl.is_power_cut() {
            io.finish(Ok(0));
            return;
        }
        if io.op() == Op::Write {
            self.ctl.written.fetch_add(1, Ordering::SeqCst);
        }
        match self.ctl.action_for(&io, self.device) {
            None => pass.push(io),
            Some(FaultAction::Error(e)) => {
                io.finish(Err(e));
            }
            Some(FaultAction::Hang) => {
                let claim = Arc::new(AtomicBool::new(false));
                self.ctl.hung.lock().push((io.clone(), claim.clone()));
                let ctl = self.ctl.clone();
                let me = io.clone();
                io.set_canceller(move || {
                    if !claim.swap(true, Ordering::SeqCst) {
                        ctl.hung.lock().retain(|(h, _)| !h.same(&me));
                        me.finish(Err(Errno::ECANCELED));
                    }
                });
            }
            Some(FaultAction::Delay(d)) => {
                let claim = Arc::new(AtomicBool::new(false));
                let me = io.clone();
                let c = claim.clone();
                {
                    let mut q = self.delays.heap.lock();
                    q.1 += 1;
                    let seq = q.1;
                    q.0.push(Delayed {
                        due: Instant::now() + d,
                        seq,
                        io: io.clone(),
                        claim,
                    });
                }
                self.delays.wake.notify_all();
                io.set_canceller(move || {
                    if !c.swap(true, Ordering::SeqCst) {
                        me.finish(Err(Errno::ECANCELED));
                    }
                });
            }
            Some(FaultAction::Tear(keep)) if io.op() == Op::Write => {
                let keep = keep.min(io.len());
                self.ctl.cut_power();
                if keep == 0 {
                    let n = io.len();
                    io.finish(Ok(n));
                    return;
                }
                // The first part lands; the caller is told the whole write did.
                let n = io.len();
                let part = io.child(
                    Op::Write,
                    io.addr(),
                    io.buf().slice(0, keep as usize),
                    Some(Box::new(move |_, r| r.map(|_| n))),
                );
                self.lower.submit(part);
                io.put();
            }
            Some(FaultAction::Tear(_)) => pass.push(io),
        }
    }
}

fn run_delays(q: Arc<DelayQueue>, lower: Arc<dyn Layer>) {
    let mut heap = q.heap.lock();
    loop {
        if heap.2 {
            // Stopping: what is still waiting is cancelled, never lost.
            let left: Vec<Delayed> = heap.0.drain().collect();
            drop(heap);
            for d in left {
                if !d.claim.swap(true, Ordering::SeqCst) {
                    d.io.finish(Err(Errno::ECANCELED));
                }
            }
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while heap.0.peek().is_some_and(|d| d.due <= now) {
            due.push(heap.0.pop().expect("peeked"));
        }
        if !due.is_empty() {
            drop(heap);
            for d in due {
                if !d.claim.swap(true, Ordering::SeqCst) {
                    d.io.clear_canceller();
                    lower.submit(d.io);
                }
            }
            heap = q.heap.lock();
            continue;
        }
        match heap.0.peek().map(|d| d.due) {
            Some(t) => {
                q.wake.wait_until(&mut heap, t);
            }
            None => q.wake.wait(&mut heap),
        }
    }
}

impl Layer for Fault {
    fn name(&self) -> String {
        "fault".into()
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
        let mut pass = Vec::with_capacity(ios.len());
        for io in ios {
            self.route(io, &mut pass);
        }
        if !pass.is_empty() {
            self.lower.submit_batch(pass);
        }
    }
    fn overhead(&self) -> u64 {
        self.lower.overhead()
    }
    fn lowers(&self) -> Vec<Arc<dyn Layer>> {
        vec![self.lower.clone()]
    }
    fn shutdown(&self) {
        // Hung requests would never end otherwise.
        let hung = std::mem::take(&mut *self.ctl.hung.lock());
        for (io, claim) in hung {
            if !claim.swap(true, Ordering::SeqCst) {
                io.finish(Err(Errno::ECANCELED));
            }
        }
        self.delays.heap.lock().2 = true;
        self.delays.wake.notify_all();
        crate::layer::join_unless_current(self.timer.lock().take());
        self.lower.shutdown();
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        self.delays.heap.lock().2 = true;
        self.delays.wake.notify_all();
    }
}
