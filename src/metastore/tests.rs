//! Unit tests of the store over a mem device, under a tap that counts and
//! fails requests; also redb on top of it.

use super::ondisk::{MAX_TABLES, PAIR, ROOT_TAG};
use super::*;
use redb::{ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};
use stackfs_layers::{submit_wait, Errno, Mem};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

const REGION: u64 = 4 << 20;
const UUID: [u8; 16] = [7; 16];
const S: u64 = SECTOR as u64;
const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");

/// The mem device under a tap that counts writes and flushes and fails
/// chosen requests (by address) a number of times.
struct Tap {
    mem: Mem,
    writes: AtomicU64,
    flushes: AtomicU64,
    fail: Mutex<HashMap<(bool, u64), (Errno, u32)>>,
}

impl Tap {
    fn fail(&self, write: bool, addr: u64, e: Errno, times: u32) {
        self.fail.lock().insert((write, addr), (e, times));
    }
    fn raw(&self, addr: u64, len: usize) -> Vec<u8> {
        let b = Buf::zeroed(len);
        submit_wait(&self.mem, Op::Read, addr, b.clone()).unwrap();
        b.as_slice().to_vec()
    }
    fn poke(&self, addr: u64, bytes: &[u8]) {
        submit_wait(&self.mem, Op::Write, addr, Buf::copy_from(bytes)).unwrap();
    }
}

impl Layer for Tap {
    fn name(&self) -> String {
        "tap".into()
    }
    fn capacity(&self) -> u64 {
        self.mem.capacity()
    }
    fn submit(&self, io: Io) {
        let key = match io.op() {
            Op::Write => {
                self.writes.fetch_add(1, Relaxed);
                Some((true, io.addr()))
            }
            Op::Flush => {
                self.flushes.fetch_add(1, Relaxed);
                None
            }
            Op::Read => Some((false, io.addr())),
            Op::Discard => None,
        };
        let mut fail = self.fail.lock();
        if let Some((e, n)) = key.and_then(|k| fail.get_mut(&k)) {
            if *n > 0 {
                *n -= 1;
                let e = *e;
                drop(fail);
                io.finish(Err(e));
                return;
            }
        }
        drop(fail);
        self.mem.submit(io);
    }
}

fn tap(capacity: u64) -> (Arc<Tap>, Arc<dyn Layer>) {
    let tap = Arc::new(Tap {
        mem: Mem::new(capacity),
        writes: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
        fail: Mutex::new(HashMap::new()),
    });
    let top: Arc<dyn Layer> = tap.clone();
    (tap, top)
}

/// A formatted store over a fresh device.
fn setup() -> (Arc<Tap>, Arc<dyn Layer>) {
    let (tap, top) = tap(REGION);
    MetaStore::format(top.clone(), REGION, UUID).unwrap();
    (tap, top)
}

fn open(top: &Arc<dyn Layer>) -> MetaStore {
    MetaStore::open(top.clone(), REGION, UUID, false, 1).unwrap()
}

fn open_err(top: &Arc<dyn Layer>) -> String {
    MetaStore::open(top.clone(), REGION, UUID, false, 1)
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn put(m: &MetaStore, s: u64, byte: u8) {
    m.write(s * S, &[byte; SECTOR]).unwrap();
}

fn get(m: &MetaStore, s: u64) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; SECTOR];
    m.read(s * S, &mut b).map(|_| b)
}

fn ver(m: &MetaStore, s: u64) -> Ver {
    m.state.lock().expected[s as usize]
}

fn slot_addr(m: &MetaStore, s: u64, k: u64) -> u64 {
    m.pair_addr(s) + k * SLOT
}

/// A store of 8 sectors, sector s holding byte s+1, committed.
fn committed8(top: &Arc<dyn Layer>) -> MetaStore {
    let m = open(top);
    m.set_len(8 * S).unwrap();
    for s in 0..8 {
        put(&m, s, s as u8 + 1);
    }
    m.sync_data().unwrap();
    m
}

#[test]
fn layout_caps_the_store_near_1_gib() {
    let l = Layout::of(4 << 30);
    assert_eq!(l.data * S, 1016 << 20);
    assert_eq!(l.tables, MAX_TABLES as u64);
    let l = Layout::of(16 << 20);
    assert_eq!((l.pairs, l.data, l.tables), (1024, 1021, 2));
    // Data pairs [1, data] and table pairs [pairs - tables, pairs) are disjoint.
    assert!(l.data < l.pairs - l.tables);
}

#[test]
fn zeroed_newest_slot_is_an_error() {
    let (tap, top) = setup();
    let m = committed8(&top);
    put(&m, 3, 0xaa);
    m.sync_data().unwrap();
    let v = ver(&m, 3);
    drop(m);
    tap.poke(
        slot_addr(&open(&top), 3, v.slot()),
        &vec![0u8; SLOT as usize],
    );
    let m = open(&top);
    assert_eq!(get(&m, 2).unwrap(), vec![3u8; SECTOR]);
    let e = get(&m, 3).unwrap_err().to_string();
    assert!(e.contains("metadata sector 3: version"), "{e}");
    assert!(e.contains("zeroed?"), "{e}");
}

#[test]
fn older_version_written_back_is_an_error() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let v1 = ver(&m, 3);
    let old = tap.raw(slot_addr(&m, 3, v1.slot()), SLOT as usize);
    for b in [0x21, 0x22] {
        put(&m, 3, b);
        m.sync_data().unwrap();
    }
    // Two commits later, the current version is in v1's slot again.
    let v3 = ver(&m, 3);
    assert_eq!(v3.slot(), v1.slot());
    drop(m);
    tap.poke(slot_addr(&open(&top), 3, v1.slot()), &old);
    let m = open(&top);
    let e = get(&m, 3).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "sector 3: version {} expected, found versions",
            v3.seq()
        )),
        "{e}"
    );
    assert!(e.contains("rolled back?"), "{e}");
}

#[test]
fn swapped_pairs_are_an_error() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let (a, b) = (m.pair_addr(3), m.pair_addr(4));
    drop(m);
    let (ra, rb) = (tap.raw(a, PAIR as usize), tap.raw(b, PAIR as usize));
    tap.poke(a, &rb);
    tap.poke(b, &ra);
    let m = open(&top);
    let e = get(&m, 3).unwrap_err().to_string();
    assert!(
        e.contains("metadata sector 3:") && e.contains("the slot of sector 4 (moved)"),
        "{e}"
    );
    let e = get(&m, 4).unwrap_err().to_string();
    assert!(
        e.contains("metadata sector 4:") && e.contains("moved"),
        "{e}"
    );
    assert_eq!(get(&m, 5).unwrap(), vec![6u8; SECTOR]);
}

#[test]
fn zeroed_region_has_no_root() {
    let (tap, top) = setup();
    drop(committed8(&top));
    tap.poke(0, &vec![0u8; REGION as usize]);
    let e = open_err(&top);
    assert!(e.contains("no root record"), "{e}");
    // An unformatted region is refused the same way.
    let (_, fresh) = tap_only();
    assert!(open_err(&fresh).contains("no root record"));
}

#[test]
fn zeroed_root_slot_is_reported() {
    let (tap, top) = setup();
    let m = committed8(&top);
    put(&m, 7, 0x99);
    m.sync_data().unwrap();
    let slot = m.state.lock().root_slot;
    drop(m);
    // The newest root erased: the previous one is consistent (one commit
    // older), which cannot be told from a root never written, except
    // that roots from version 2 on always have a written partner.
    tap.poke(slot * SLOT, &vec![0u8; SLOT as usize]);
    let m = open(&top);
    let why = m.fell_back().expect("reported");
    assert!(why.contains("an empty slot, zeroed?"), "{why}");
    assert_eq!(get(&m, 7).unwrap(), vec![8u8; SECTOR]);
    // A store just formatted has one root copy only: nothing to report.
    let (_, fresh) = setup();
    assert!(open(&fresh).fell_back().is_none());
}

#[test]
fn root_two_commits_old_is_detected() {
    let (tap, top) = setup();
    let db = redb::Database::builder()
        .create_with_backend(open(&top))
        .unwrap();
    insert(&db, 0, 10);
    let old = tap.raw(0, PAIR as usize);
    insert(&db, 10, 20);
    insert(&db, 20, 30);
    drop(db);
    // Both root copies replaced by those of two commits earlier.
    tap.poke(0, &old);
    let e = MetaStore::open(top.clone(), REGION, UUID, false, 1)
        .and_then(|m| {
            redb::Database::builder()
                .create_with_backend(m)
                .map(|_| ())
                .map_err(io::Error::other)
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("metadata") && e.contains("expected, found"),
        "{e}"
    );
}

fn tap_only() -> (Arc<Tap>, Arc<dyn Layer>) {
    tap(REGION)
}

#[test]
fn garbage_in_the_other_slot_is_ignored() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let v = ver(&m, 3);
    let other = slot_addr(&m, 3, 1 - v.slot());
    drop(m);
    // A torn write of the next version, never committed.
    tap.poke(other, &mem_noise(SLOT as usize, 1));
    let m = open(&top);
    assert_eq!(get(&m, 3).unwrap(), vec![4u8; SECTOR]);
    assert!(m.fell_back().is_none());
}

fn mem_noise(len: usize, seed: u64) -> Vec<u8> {
    stackfs_layers::mem::noise(len, seed)
}

#[test]
fn torn_root_falls_back_and_holds_writes() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let (seq, slot) = {
        let st = m.state.lock();
        (st.root_seq, st.root_slot)
    };
    put(&m, 5, 0x55);
    m.sync_data().unwrap();
    drop(m);
    // The last root write was torn: the previous root is used.
    tap.poke((1 - slot) * SLOT, &mem_noise(SLOT as usize, 2));
    let m = open(&top);
    let why = m.fell_back().expect("fell back");
    assert!(
        why.contains(&format!("remaining slot (version {seq})")),
        "{why}"
    );
    // The previous commit reads back whole (its versions are still there).
    assert_eq!(get(&m, 5).unwrap(), vec![6u8; SECTOR]);
    // Until released, writes stay in memory.
    let before = tap.writes.load(Relaxed);
    put(&m, 6, 0x66);
    m.sync_data().unwrap();
    assert_eq!(tap.writes.load(Relaxed), before);
    assert_eq!(get(&m, 6).unwrap(), vec![0x66u8; SECTOR]);
    m.watch().release();
    m.sync_data().unwrap();
    assert!(tap.writes.load(Relaxed) > before);
    drop(m);
    let m = open(&top);
    assert!(m.fell_back().is_none());
    assert_eq!(get(&m, 6).unwrap(), vec![0x66u8; SECTOR]);
}

#[test]
fn eio_on_a_root_slot_falls_back() {
    let (tap, top) = setup();
    let m = committed8(&top);
    put(&m, 7, 0x99);
    m.sync_data().unwrap();
    let slot = m.state.lock().root_slot;
    drop(m);
    tap.fail(false, slot * SLOT, Errno::EIO, 1);
    let m = open(&top);
    assert!(m.fell_back().unwrap().contains("EIO"));
    // Exactly the last commit is lost, consistently.
    assert_eq!(get(&m, 7).unwrap(), vec![8u8; SECTOR]);
    assert_eq!(get(&m, 6).unwrap(), vec![7u8; SECTOR]);
}

#[test]
fn crash_between_the_phases_gives_the_previous_commit() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let v1 = ver(&m, 5);
    let root = tap.raw(0, PAIR as usize);
    // The next commit grows the store and rewrites every sector ...
    m.set_len(12 * S).unwrap();
    for s in 0..12 {
        put(&m, s, 0x40 + s as u8);
    }
    m.sync_data().unwrap();
    let v2 = ver(&m, 5);
    assert_ne!(v2.slot(), v1.slot());
    drop(m);
    // ... but its root never reached the disk; one data write was torn.
    tap.poke(0, &root);
    let orphan = tap.raw(slot_addr(&open(&top), 5, v2.slot()), SLOT as usize);
    tap.poke(
        slot_addr(&open(&top), 6, 1 - v1.slot()),
        &mem_noise(SLOT as usize, 3),
    );
    let m = open(&top);
    assert_eq!(m.len().unwrap(), 8 * S);
    for s in 0..8 {
        assert_eq!(get(&m, s).unwrap(), vec![s as u8 + 1; SECTOR], "sector {s}");
    }
    // Writing on: the new version of sector 5 takes the orphan's slot.
    put(&m, 5, 0x77);
    m.sync_data().unwrap();
    let v3 = ver(&m, 5);
    assert_eq!(v3.slot(), v2.slot());
    // Sequence numbers are never reused: the orphan, written back, is
    // not taken for the committed version.
    assert!(v3.seq() > v2.seq());
    drop(m);
    tap.poke(slot_addr(&open(&top), 5, v2.slot()), &orphan);
    let m = open(&top);
    let e = get(&m, 5).unwrap_err().to_string();
    assert!(e.contains("metadata sector 5:"), "{e}");
}

#[test]
fn failed_root_write_is_retried_before_anything_else() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let slot = m.state.lock().root_slot;
    // Prime the sequence reservation so the failing write is the commit's.
    put(&m, 1, 0x11);
    m.sync_data().unwrap();
    // Roots alternate: the next one goes where the one before last is.
    tap.fail(true, slot * SLOT, Errno::EIO, 1);
    put(&m, 2, 0x12);
    assert!(m.sync_data().is_err());
    // Reads go on from the versions just written.
    assert_eq!(get(&m, 2).unwrap(), vec![0x12u8; SECTOR]);
    put(&m, 2, 0x13);
    m.sync_data().unwrap();
    drop(m);
    let m = open(&top);
    assert_eq!(get(&m, 1).unwrap(), vec![0x11u8; SECTOR]);
    assert_eq!(get(&m, 2).unwrap(), vec![0x13u8; SECTOR]);
}

#[test]
fn read_errors_and_retries() {
    let (tap, top) = setup();
    let m = committed8(&top);
    let v = ver(&m, 3);
    let at = slot_addr(&m, 3, v.slot());
    drop(m);
    // A timeout is retried once.
    tap.fail(false, at, Errno::ETIMEDOUT, 1);
    let m = open(&top);
    assert_eq!(get(&m, 3).unwrap(), vec![4u8; SECTOR]);
    drop(m);
    tap.fail(false, at, Errno::ETIMEDOUT, 2);
    let e = get(&open(&top), 3).unwrap_err().to_string();
    assert!(e.contains("sector 3") && e.contains("fails to read"), "{e}");
    // EIO (a failed MAC under crypt) is not retried, and the other
    // slot's version is never used instead.
    tap.fail(false, at, Errno::EIO, 1);
    let e = get(&open(&top), 3).unwrap_err().to_string();
    assert!(e.contains("sector 3") && e.contains("EIO"), "{e}");
}

#[test]
fn overflow_write_outs_keep_the_commit() {
    let region = 160 << 20;
    let (_tap, top) = tap(region);
    MetaStore::format(top.clone(), region, UUID).unwrap();
    let open = || MetaStore::open(top.clone(), region, UUID, false, 1).unwrap();
    let n = MAX_DIRTY as u64 + 100;
    let m = open();
    m.set_len(n * S).unwrap();
    for s in 0..n {
        put(&m, s, 1);
    }
    m.sync_data().unwrap();
    // Two overflows without a commit, then a crash.
    for b in [2, 3] {
        for s in 0..n {
            put(&m, s, b);
        }
    }
    assert!(!m.state.lock().unflushed.is_empty());
    drop(m);
    let m = open();
    for s in [0, 77, n - 1] {
        assert_eq!(get(&m, s).unwrap(), vec![1u8; SECTOR]);
    }
    for s in 0..n {
        put(&m, s, 4);
    }
    m.sync_data().unwrap();
    drop(m);
    let m = open();
    for s in [0, 77, n - 1] {
        assert_eq!(get(&m, s).unwrap(), vec![4u8; SECTOR]);
    }
}

#[test]
fn shrink_and_grow_read_zeros_and_the_cap_is_enforced() {
    let (_tap, top) = setup();
    let m = committed8(&top);
    m.set_len(2 * S + 100).unwrap();
    m.set_len(8 * S).unwrap();
    let mut b = vec![0u8; SECTOR];
    m.read(2 * S, &mut b).unwrap();
    assert_eq!(&b[..100], &[3u8; 100][..]);
    assert!(b[100..].iter().all(|x| *x == 0));
    assert_eq!(get(&m, 5).unwrap(), vec![0u8; SECTOR]);
    m.sync_data().unwrap();
    drop(m);
    let m = open(&top);
    assert_eq!(get(&m, 5).unwrap(), vec![0u8; SECTOR]);
    assert_eq!(get(&m, 1).unwrap(), vec![2u8; SECTOR]);
    let e = m.set_len(m.layout.data * S + 1).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::StorageFull);
}

/// Write a store in the format before version tables: the pairs of
/// `sectors` (seq 5, slot 1, the bytes; and an older seq 4 of garbage in
/// slot 0) and the length record at pair 0 (seq 9; a shorter seq 8).
fn write_legacy(top: &Arc<dyn Layer>, len: u64, sectors: &[(u64, Vec<u8>)]) {
    let m = MetaStore::new(top.clone(), REGION, UUID, false, 1).unwrap();
    let mut ios = Vec::new();
    for (s, bytes) in sectors {
        ios.push(m.seal_write(*s, Ver::new(5, 1), bytes));
        ios.push(m.seal_write(*s, Ver::new(4, 0), &mem_noise(SECTOR, *s)));
    }
    let mut rec = vec![0u8; SECTOR];
    rec[0..8].copy_from_slice(&len.to_le_bytes());
    rec[8..16].copy_from_slice(&(len + 3 * S).to_le_bytes());
    ios.push(m.seal_write(ROOT_SECTOR, Ver::new(9, 0), &rec));
    rec[0..8].copy_from_slice(&(len - S).to_le_bytes());
    ios.push(m.seal_write(ROOT_SECTOR, Ver::new(8, 1), &rec));
    m.submit_all(ios, true).unwrap();
}

fn rows(db: &redb::Database) -> Vec<(u64, Vec<u8>)> {
    let rtx = db.begin_read().unwrap();
    let t = rtx.open_table(ROWS).unwrap();
    t.iter()
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            (k.value(), v.value().to_vec())
        })
        .collect()
}

fn insert(db: &redb::Database, from: u64, to: u64) {
    let tx = db.begin_write().unwrap();
    {
        let mut t = tx.open_table(ROWS).unwrap();
        for i in from..to {
            t.insert(i, &mem_noise(300, i)[..]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn want(to: u64) -> Vec<(u64, Vec<u8>)> {
    (0..to).map(|i| (i, mem_noise(300, i))).collect()
}

#[test]
fn legacy_store_is_read_and_upgraded() {
    // A database built on a versioned store, copied out sector by sector.
    let (_t, src) = setup();
    let db = redb::Database::builder()
        .create_with_backend(open(&src))
        .unwrap();
    insert(&db, 0, 200);
    drop(db);
    let m = open(&src);
    let len = m.len().unwrap();
    let sectors: Vec<(u64, Vec<u8>)> = (0..len / S).map(|s| (s, get(&m, s).unwrap())).collect();
    drop(m);
    let (tap, top) = tap_only();
    write_legacy(&top, len, &sectors);
    // Read-only: read as before, nothing written.
    let writes = tap.writes.load(Relaxed);
    let ro = MetaStore::open(top.clone(), REGION, UUID, true, 1).unwrap();
    assert_eq!(ro.state.lock().format, Format::LegacyReadOnly);
    let db = redb::Database::builder().create_with_backend(ro).unwrap();
    assert_eq!(rows(&db), want(200));
    drop(db);
    assert_eq!(tap.writes.load(Relaxed), writes);
    // Read-write: upgraded at the first write-out.
    let db = redb::Database::builder()
        .create_with_backend(open(&top))
        .unwrap();
    assert_eq!(rows(&db), want(200));
    insert(&db, 200, 300);
    drop(db);
    let m = open(&top);
    {
        let st = m.state.lock();
        assert_eq!(st.format, Format::Versioned);
        assert!(!st.root.tables.is_empty());
    }
    let root = tap.raw(m.state.lock().root_slot * SLOT, SECTOR);
    assert_eq!(&root[..8], &ROOT_TAG);
    let db = redb::Database::builder().create_with_backend(m).unwrap();
    assert_eq!(rows(&db), want(300));
}

#[test]
fn redb_survives_reopen() {
    let (_tap, top) = setup();
    let db = redb::Database::builder()
        .create_with_backend(open(&top))
        .unwrap();
    for k in 0..10 {
        insert(&db, k * 100, (k + 1) * 100);
    }
    drop(db);
    let mut db = redb::Database::builder()
        .create_with_backend(open(&top))
        .unwrap();
    assert_eq!(rows(&db), want(1000));
    assert!(db.check_integrity().unwrap());
    insert(&db, 1000, 1100);
    drop(db);
    let db = redb::Database::builder()
        .create_with_backend(open(&top))
        .unwrap();
    assert_eq!(rows(&db), want(1100));
}

/// `cargo test --release -p stackfs --lib metastore::tests::bench -- --ignored --nocapture`
#[test]
#[ignore]
fn bench() {
    let (tap, top) = self::tap(256 << 20);
    let region = 64 << 20;
    MetaStore::format(top.clone(), region, [7; 16]).unwrap();
    let s = MetaStore::open(top.clone(), region, [7; 16], false, 1).unwrap();
    s.set_len(8 << 20).unwrap();
    let n = 5000u64;
    let (w0, f0) = (tap.writes.load(Relaxed), tap.flushes.load(Relaxed));
    let t = std::time::Instant::now();
    for i in 0..n {
        let off = (i * 7919 % 2000) * 4096;
        s.write(off, &[i as u8 | 1; 4096 * 4]).unwrap();
        s.sync_data().unwrap();
    }
    let el = t.elapsed();
    eprintln!(
        "BENCH raw: {n} x (4 sectors + sync_data): {el:?} = {:.1} us each; {:.2} writes, {:.2} flushes each",
        el.as_secs_f64() * 1e6 / n as f64,
        (tap.writes.load(Relaxed) - w0) as f64 / n as f64,
        (tap.flushes.load(Relaxed) - f0) as f64 / n as f64
    );
    drop(s);
    let (tap, top) = self::tap(256 << 20);
    MetaStore::format(top.clone(), region, [7; 16]).unwrap();
    let db = redb::Database::builder()
        .create_with_backend(MetaStore::open(top.clone(), region, [7; 16], false, 1).unwrap())
        .unwrap();
    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let n = 2000u64;
    let (w0, f0) = (tap.writes.load(Relaxed), tap.flushes.load(Relaxed));
    let t = std::time::Instant::now();
    for i in 0..n {
        let tx = db.begin_write().unwrap();
        tx.open_table(T)
            .unwrap()
            .insert(i, &[1u8; 100][..])
            .unwrap();
        tx.commit().unwrap();
    }
    let el = t.elapsed();
    eprintln!(
        "BENCH redb: {n} durable commits: {el:?} = {:.1} us each; {:.2} writes, {:.2} flushes each",
        el.as_secs_f64() * 1e6 / n as f64,
        (tap.writes.load(Relaxed) - w0) as f64 / n as f64,
        (tap.flushes.load(Relaxed) - f0) as f64 / n as f64
    );
}
