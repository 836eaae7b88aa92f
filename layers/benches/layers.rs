//! `cargo bench -p stackfs-layers`: the framework's own cost, and the cost of
//! the stack against driving one image file directly, as ratios measured in
//! the same run. Prints medians of 5 runs.

use stackfs_layers::*;
use std::sync::Arc;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// 4 KiB requests through stripe over null devices, in batches of 64.
fn framework_rate() -> f64 {
    let lowers: Vec<Arc<dyn Layer>> = (0..3)
        .map(|_| Counted::wrap(Arc::new(Mem::null(1 << 30))))
        .collect();
    let top = Counted::wrap(Arc::new(Stripe::new(64 << 10, lowers).unwrap()));
    let buf = Buf::zeroed(4096);
    let n = 400_000u64;
    let start = Instant::now();
    let mut addr = 0u64;
    for _ in 0..n / 64 {
        let batch: Vec<Io> = (0..64)
            .map(|_| {
                addr = (addr + 4096) % (1 << 30);
                Io::new(Op::Write, addr, buf.clone(), None)
            })
            .collect();
        top.submit_batch(batch);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// MiB/s of 1 MiB writes then reads at queue depth `qd`, `total` bytes each.
fn stream(layer: &Arc<dyn Layer>, qd: usize, total: u64) -> (f64, f64) {
    let mut out = [0.0; 2];
    for (k, op) in [Op::Write, Op::Read].into_iter().enumerate() {
        let start = Instant::now();
        let mut next = 0u64;
        let mut inflight: std::collections::VecDeque<Waiter> = Default::default();
        while next < total || !inflight.is_empty() {
            while inflight.len() < qd && next < total {
                let w = Waiter::new();
                layer.submit(Io::new(op, next, Buf::zeroed(1 << 20), Some(w.end_io())));
                inflight.push_back(w);
                next += 1 << 20;
            }
            inflight.pop_front().unwrap().wait().expect("bench I/O");
        }
        let _ = submit_wait(&**layer, Op::Flush, 0, Buf::zeroed(0));
        out[k] = total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    }
    (out[0], out[1])
}

/// AES-256-GCM (ring) sealing 64 KiB units, GB/s on one core.
fn aes_gcm_rate() -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let mut unit = vec![0x5au8; 64 << 10];
    let n = 4000u64;
    let start = Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&i.to_le_bytes());
        let _ = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut unit,
            )
            .unwrap();
    }
    (n * (64 << 10)) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The crypt layer sealing 64 KiB detached writes over a null device, GB/s
/// on one core: `write_key` None seals with the master key itself (what
/// every write did before per-mount keys), Some with a derived per-mount key.
fn crypt_layer_rate(per_mount: bool) -> f64 {
    use stackfs_layers::crypt::{Crypt, Keyring};
    let keys = Arc::new(Keyring::new(&[7u8; 32]));
    // Key id zero names the master key: the old data path, byte for byte.
    let id = if per_mount { [9u8; 12] } else { [0u8; 12] };
    let lower: Arc<dyn Layer> = Arc::new(Mem::null(1 << 40));
    let c = Crypt::new(lower, keys, Some(id));
    let n = 4000u64;
    let start = Instant::now();
    for i in 0..n {
        let tag = stackfs_layers::ExtentTag {
            flags: stackfs_layers::io::TAG_DETACHED,
            ..Default::default()
        };
        // A buffer this request alone holds is sealed in place, as compress's output is.
        let (r, _) =
            stackfs_layers::submit_wait_tag(&c, Op::Write, i << 16, Buf::zeroed(64 << 10), tag);
        r.unwrap();
    }
    (n * (64 << 10)) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Compression ratio and GB/s per core of `text` cut into `unit`-byte pieces.
fn compress_rate(text: &[u8], unit: usize, zstd_level: Option<i32>) -> (f64, f64) {
    let mut z = zstd::bulk::Compressor::new(zstd_level.unwrap_or(1)).unwrap();
    let start = Instant::now();
    let mut out = 0usize;
    for piece in text.chunks(unit) {
        let c = match zstd_level {
            Some(_) => z.compress(piece).unwrap().len(),
            None => lz4_flex::block::compress(piece).len(),
        };
        // What the filesystem stores: 4 KiB blocks, raw when that is not smaller.
        out += c.min(piece.len()).div_ceil(4096) * 4096;
    }
    (
        text.len() as f64 / out as f64,
        text.len() as f64 / start.elapsed().as_secs_f64() / 1e9,
    )
}

/// The default stack (`compress=zstd:1,crypt=aes-256-gcm,stripe=64k`, a
/// watchdog over each of 3 image files), as the filesystem drives it: batches
/// of 16 detached 64 KiB units written, then read back with their tags.
/// MB/s of logical bytes, writes then reads, and the devices' kernel entries
/// per batch; `data` is cycled to fill units.
fn default_stack_rate(dir: &std::path::Path, data: &[u8], total: u64) -> (f64, f64, f64) {
    const UNIT: usize = 64 << 10;
    const BATCH: usize = 16;
    let size = 256u64 << 20;
    let devices = (0..3)
        .map(|i| {
            let p = dir.join(format!("default.{i}"));
            std::fs::File::create(&p).unwrap().set_len(size).unwrap();
            Arc::new(Device::open(&p, 0, size, false).unwrap())
        })
        .collect();
    let keys = CryptKeys {
        keyring: Arc::new(Keyring::new(&[7u8; 32])),
        write_key: Some([1; 12]),
    };
    let stack = StackSpec::parse("compress=zstd:1,crypt=aes-256-gcm,stripe=64k")
        .unwrap()
        .build_with(
            devices,
            Some(&keys),
            Some(std::time::Duration::from_secs(30)),
        )
        .unwrap();
    let units: Vec<Buf> = (0..BATCH)
        .map(|i| {
            let piece: Vec<u8> = data
                .iter()
                .cycle()
                .skip(i * 4099)
                .take(UNIT)
                .copied()
                .collect();
            Buf::copy_from(&piece)
        })
        .collect();
    let detached = ExtentTag {
        flags: stackfs_layers::io::TAG_DETACHED,
        ..Default::default()
    };
    let batches = total / (UNIT * BATCH) as u64;
    let mut tags = Vec::new();
    let start = Instant::now();
    for b in 0..batches {
        let waiters: Vec<Waiter> = (0..BATCH).map(|_| Waiter::new()).collect();
        let ios: Vec<Io> = (0..BATCH)
            .map(|i| {
                let addr = (b * BATCH as u64 + i as u64) * UNIT as u64 % size;
                let io = Io::new(Op::Write, addr, units[i].clone(), Some(waiters[i].end_io()));
                io.set_tag(detached);
                io
            })
            .collect();
        stack.top.submit_batch(ios);
        for w in waiters {
            let (r, tag) = w.wait_tag();
            r.expect("bench write");
            tags.push(tag);
        }
    }
    let write = total as f64 / 1e6 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for (b, batch_tags) in tags.chunks(BATCH).enumerate() {
        let waiters: Vec<Waiter> = (0..BATCH).map(|_| Waiter::new()).collect();
        let ios: Vec<Io> = batch_tags
            .iter()
            .enumerate()
            .map(|(i, tag)| {
                let addr = (b * BATCH + i) as u64 * UNIT as u64 % size;
                let io = Io::new(Op::Read, addr, Buf::zeroed(UNIT), Some(waiters[i].end_io()));
                io.set_tag(*tag);
                io
            })
            .collect();
        stack.top.submit_batch(ios);
        for w in waiters {
            w.wait().expect("bench read");
        }
    }
    let read = total as f64 / 1e6 / start.elapsed().as_secs_f64();
    let (mut batches, mut entries) = (0, 0);
    for (_, layer) in stackfs_layers::spec::walk(&stack.top) {
        if let Some(s) = layer
            .stats()
            .filter(|_| layer.name().starts_with("device:"))
        {
            let s = s.snapshot();
            (batches, entries) = (batches + s.batches, entries + s.kernel_entries);
        }
    }
    stack.top.shutdown();
    (write, read, entries as f64 / batches.max(1) as f64)
}

/// A tar of /usr/include (the workload of issue 4), first 64 MiB, if tar works.
fn source_text() -> Option<Vec<u8>> {
    let tar = std::process::Command::new("tar")
        .args(["cf", "-", "-C", "/usr", "include"])
        .output()
        .ok()?;
    let mut text = tar.stdout;
    text.truncate(64 << 20);
    (!text.is_empty()).then_some(text)
}

/// `cargo bench -p stackfs-layers -- default`: the default stack's rows only.
fn default_stack_rows() {
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(dir).unwrap();
    let text =
        source_text().unwrap_or_else(|| b"stackfs default stack bench text ".repeat(1 << 16));
    let noise = stackfs_layers::mem::noise(16 << 20, 3);
    for (name, data) in [("source text", &text), ("random bytes", &noise)] {
        let runs: Vec<(f64, f64, f64)> = (0..5)
            .map(|_| default_stack_rate(dir.path(), data, 128 << 20))
            .collect();
        let write = median(runs.iter().map(|r| r.0).collect());
        let read = median(runs.iter().map(|r| r.1).collect());
        let entries = median(runs.iter().map(|r| r.2).collect());
        println!("default stack over 3 image files, batches of 16 x 64 KiB, {name}: write {write:.0} MB/s, read {read:.0} MB/s (logical bytes, median of 5); {entries:.2} kernel entries per batch per device");
    }
}

/// `cargo bench -p stackfs-layers -- mirror`: `mirror=2` over two image
/// files against one image file, 1 MiB sequential O_DIRECT; queue depth 2
/// stands for two readers (their reads spread over the copies).
fn mirror_rows() {
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(dir).unwrap();
    let size = 512u64 << 20;
    let mk = |name: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        Arc::new(Device::open(&p, 0, size, false).unwrap())
    };
    let single: Arc<dyn Layer> = mk("one.img");
    let mirror = StackSpec::parse("mirror=2")
        .unwrap()
        .build(vec![mk("copy0.img"), mk("copy1.img")])
        .unwrap();
    let total = 256u64 << 20;
    println!("1 MiB sequential O_DIRECT, {} MiB per pass; mirror=2 over 2 image files vs one image file (median of 5 paired passes)", total >> 20);
    println!("{:>4} {:>7} {:>7}", "qd", "write", "read");
    for qd in [1, 2, 8] {
        let ratios: Vec<(f64, f64)> = (0..5)
            .map(|_| {
                let (w1, r1) = stream(&single, qd, total);
                let (w2, r2) = stream(&mirror.top, qd, total);
                (w2 / w1, r2 / r1)
            })
            .collect();
        let write = median(ratios.iter().map(|r| r.0).collect());
        let read = median(ratios.iter().map(|r| r.1).collect());
        println!("{qd:>4} {write:>7.2} {read:>7.2}");
    }
    mirror.top.shutdown();
}

fn main() {
    if std::env::args().skip(1).any(|a| a == "default") {
        return default_stack_rows();
    }
    if std::env::args().skip(1).any(|a| a == "mirror") {
        return mirror_rows();
    }
    println!(
        "AES-256-GCM (ring), 64 KiB units: {:.1} GB/s (median of 5, one core)",
        median((0..5).map(|_| aes_gcm_rate()).collect())
    );
    // Before and after per-mount keys, paired passes in one run.
    let pairs: Vec<(f64, f64)> = (0..5)
        .map(|_| (crypt_layer_rate(false), crypt_layer_rate(true)))
        .collect();
    let old = median(pairs.iter().map(|p| p.0).collect());
    let new = median(pairs.iter().map(|p| p.1).collect());
    let ratio = median(pairs.iter().map(|p| p.1 / p.0).collect());
    println!("crypt layer, 64 KiB detached writes over a null device (median of 5, one core, includes the buffer's allocation): master key (before) {old:.2} GB/s, per-mount derived key (after) {new:.2} GB/s, ratio {ratio:.2}");
    // `cargo bench -p stackfs-layers -- crypt`: only the rows above.
    if std::env::args().skip(1).any(|a| a == "crypt") {
        return;
    }
    // Source text: a tar of /usr/include (the workload of issue 4), first 64 MiB.
    let tar = std::process::Command::new("tar")
        .args(["cf", "-", "-C", "/usr", "include"])
        .output();
    if let Some(t) = tar.ok().filter(|t| !t.stdout.is_empty()) {
        let text = &t.stdout[..t.stdout.len().min(64 << 20)];
        println!(
            "compression of {} MiB of /usr/include (stored in 4 KiB blocks):",
            text.len() >> 20
        );
        for unit in [4 << 10, 16 << 10, 64 << 10, 128 << 10, 1 << 20] {
            let (zr, zs) = compress_rate(text, unit, Some(1));
            let (lr, ls) = compress_rate(text, unit, None);
            println!("  unit {:>4} KiB: zstd -1 ratio {zr:.2} at {zs:.2} GB/s; lz4 ratio {lr:.2} at {ls:.2} GB/s", unit >> 10);
        }
    }

    let rates: Vec<f64> = (0..5).map(|_| framework_rate()).collect();
    println!("framework: 4 KiB requests through stripe over 3 null devices: {:.2} M requests/s (median of 5, one core)", median(rates) / 1e6);

    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(dir).unwrap();
    let size = 768u64 << 20;
    let mk = |name: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        Arc::new(Device::open(&p, 0, size, false).unwrap())
    };
    let single: Arc<dyn Layer> = mk("one.img");
    let total = 512u64 << 20;
    // 64 KiB is the default chunk: a 1 MiB request becomes one vectored request
    // per device. 1 MiB chunks do not split it at all: the difference between
    // the two is what splitting costs on these devices, not the stack.
    for spec in ["stripe=64k", "stripe=1m"] {
        let stack = StackSpec::parse(spec)
            .unwrap()
            .build(vec![
                mk(&format!("{spec}.0")),
                mk(&format!("{spec}.1")),
                mk(&format!("{spec}.2")),
            ])
            .unwrap();
        println!("1 MiB sequential O_DIRECT, {} MiB per pass; {spec} over 3 image files vs one image file directly (median of 5)", total >> 20);
        println!(
            "{:>4} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
            "qd", "write one", "write stack", "ratio", "read one", "read stack", "ratio"
        );
        for qd in [1, 8, 32] {
            let mut r = Vec::new();
            for _ in 0..5 {
                let (w1, r1) = stream(&single, qd, total);
                let (w3, r3) = stream(&stack.top, qd, total);
                r.push((w1, w3, r1, r3));
            }
            // Rates are medians; ratios are medians of each pass's own ratio
            // (the two sides of a pass run back to back, so they share the noise).
            let m = |f: fn(&(f64, f64, f64, f64)) -> f64| median(r.iter().map(f).collect());
            let (w1, w3, r1, r3) = (m(|x| x.0), m(|x| x.1), m(|x| x.2), m(|x| x.3));
            let (wr, rr) = (m(|x| x.1 / x.0), m(|x| x.3 / x.2));
            println!(
                "{qd:>4} {w1:>10.0}MB {w3:>10.0}MB {wr:>7.2} {r1:>10.0}MB {r3:>10.0}MB {rr:>7.2}"
            );
        }
        stack.top.shutdown();
    }
    single.shutdown();
}
