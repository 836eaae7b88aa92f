#!/usr/bin/env python3
"""Tampering with stackfs pool images, for the "tamper" test group.

Everything here works on unmounted pool image files, the way an attacker
with access to the devices would: superblock fields are changed and the
superblock CRC32C recomputed (so only the MAC can notice), metadata slots
are zeroed or rolled back, data chunks are swapped.  Also: populate a
mounted pool with files and keep reference copies, verify a mount against
them (never a wrong byte), and audit `stackfs debug-nonces` listings.

  tamper.py sb-show IMG...
  tamper.py sb-edit COPIES FIELD IMG...        COPIES: primary|backup|both
  tamper.py sb-save OUT IMG...  /  sb-restore IN
  tamper.py geometry IMG...
  tamper.py meta-snap OUT IMG...
  tamper.py meta-changed SNAP IMG...
  tamper.py slot-zero ADDR IMG...
  tamper.py pair-restore SNAP ADDR IMG...
  tamper.py region-zero IMG...
  tamper.py data-swap IMG...
  tamper.py digest IMG...
  tamper.py populate MNT REF [more|other SEED]
  tamper.py verify MNT REF
  tamper.py noreuse LISTING...
  tamper.py nonces BASE A B

Layout (see ARCHITECTURE.md): each device has its primary superblock at 0,
its share of pool space from 1 MiB, its backup superblock in its last
4 KiB.  Pool address A lies on device (A // CHUNK) % N at file offset
1 MiB + (A // CHUNK // N) * CHUNK + A % CHUNK.
"""
import errno
import hashlib
import os
import pickle
import random
import struct
import sys

SB = 4096
MAC_AT = SB - 4 - 32
CRC_AT = SB - 4
MAGIC = b"STACKFS\x01"
DATA_START = 1 << 20
SLOT = 8192
PAIR = 2 * SLOT
UNIT = 64 << 10


# --- CRC32C (Castagnoli), table driven ----------------------------------

def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_T = _crc_table()


def crc32c(data):
    c = 0xFFFFFFFF
    t = _T
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --- superblocks ------------------------------------------------------------

def backup_offset(size):
    return size // SB * SB - SB


def copy_offsets(path):
    size = os.path.getsize(path)
    return {"primary": 0, "backup": backup_offset(size)}


def read_at(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        d = f.read(n)
    return d + bytes(n - len(d))


def write_at(path, off, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_sb(raw):
    """The fields of a superblock copy, or None if it is not one."""
    if raw[:8] != MAGIC:
        return None
    f = {}
    (f["version"], f["reserved"]) = struct.unpack_from("<II", raw, 8)
    f["pool_uuid"] = raw[16:32]
    f["device_uuid"] = raw[32:48]
    (f["index"], f["count"], f["per_device"], f["meta_len"], f["created"],
     f["generation"], f["nonce_next"]) = struct.unpack_from("<IIQQQQQ", raw, 48)
    n = struct.unpack_from("<I", raw, 96)[0]
    f["spec"] = raw[100:100 + n].decode("utf-8", "replace")
    f["keys_at"] = 100 + n
    m = struct.unpack_from("<I", raw, 100 + n)[0]
    f["keys"] = raw[104 + n:104 + n + m]
    f["mac"] = raw[MAC_AT:CRC_AT]
    f["crc_ok"] = crc32c(raw[:CRC_AT]) == struct.unpack_from("<I", raw, CRC_AT)[0]
    return f


def encode_body(f):
    """Re-encode the fields (everything before the MAC), zero padded."""
    b = bytearray(MAGIC)
    b += struct.pack("<II", f["version"], f["reserved"])
    b += f["pool_uuid"] + f["device_uuid"]
    b += struct.pack("<IIQQQQQ", f["index"], f["count"], f["per_device"],
                     f["meta_len"], f["created"], f["generation"], f["nonce_next"])
    s = f["spec"].encode()
    b += struct.pack("<I", len(s)) + s
    b += struct.pack("<I", len(f["keys"])) + f["keys"]
    assert len(b) <= MAC_AT
    return bytes(b) + bytes(MAC_AT - len(b))


def with_crc(raw):
    raw = bytearray(raw[:CRC_AT])
    return bytes(raw) + struct.pack("<I", crc32c(raw))


def parse_size(s):
    s = s.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def spec_chunk(spec):
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k.strip() == "stripe":
            return parse_size(v)
    return None


def spec_without_crypt(spec):
    return ",".join(p for p in spec.split(",") if not p.strip().startswith("crypt"))


# Byte changes per field class; each keeps the copy decodable (magic,
# version, UTF-8 spec, index < count) so that only the MAC can object.
FIELDS = ["pool_uuid", "device_uuid", "index", "count", "per_device", "meta_len",
          "created", "generation", "nonce_next", "spec", "keys", "mac"]


def edit(raw, field):
    f = parse_sb(raw)
    if f is None:
        raise SystemExit("not a superblock")
    raw = bytearray(raw)
    if field == "pool_uuid":
        raw[16] ^= 0x01
    elif field == "device_uuid":
        raw[32] ^= 0x01
    elif field == "index":
        new = (f["index"] + 1) % f["count"] if f["count"] > 1 else f["index"] ^ 1
        struct.pack_into("<I", raw, 48, new)
    elif field == "count":
        struct.pack_into("<I", raw, 52, f["count"] + 1)
    elif field == "per_device":
        raw[57] ^= 0x01
    elif field == "meta_len":
        raw[65] ^= 0x01
    elif field == "created":
        raw[72] ^= 0x01
    elif field == "generation":
        raw[80] ^= 0x01
    elif field == "nonce_next":
        raw[88] ^= 0x01
    elif field == "spec":
        # An ASCII letter stays ASCII: "compress" -> "bompress".
        raw[100] ^= 0x01
    elif field == "keys":
        if not f["keys"]:
            raise SystemExit("no key material to change")
        raw[f["keys_at"] + 4 + len(f["keys"]) - 1] ^= 0x01
    elif field == "mac":
        raw[MAC_AT] ^= 0x01
    elif field == "nonce_next-rollback":
        # Back to 0; a pool whose nonce_next is 0 already (per-mount keys
        # leave it unused) gets a claim that never happened instead.
        if f["nonce_next"]:
            struct.pack_into("<Q", raw, 88, 0)
        else:
            print("nonce_next is 0 already; setting it to 2^32", file=sys.stderr)
            struct.pack_into("<Q", raw, 88, 1 << 32)
    elif field == "nocrypt":
        f["spec"] = spec_without_crypt(f["spec"])
        raw[:MAC_AT] = encode_body(f)
    elif field == "nocrypt+nokeys":
        f["spec"] = spec_without_crypt(f["spec"])
        f["keys"] = b""
        raw[:MAC_AT] = encode_body(f)
        raw[MAC_AT:CRC_AT] = bytes(32)
    else:
        raise SystemExit("unknown field %s" % field)
    return with_crc(raw)


def cmd_sb_show(imgs):
    for p in imgs:
        for which, off in copy_offsets(p).items():
            f = parse_sb(read_at(p, off, SB))
            if f is None:
                print("%s %s: no superblock" % (p, which))
                continue
            print("%s %s: index %d/%d version %d generation %d nonce_next %d "
                  "meta_len %d per_device %d spec %r keys %d bytes crc %s" % (
                      p, which, f["index"], f["count"], f["version"], f["generation"],
                      f["nonce_next"], f["meta_len"], f["per_device"], f["spec"],
                      len(f["keys"]), "ok" if f["crc_ok"] else "BAD"))


def cmd_sb_edit(copies, field, imgs):
    for p in imgs:
        offs = copy_offsets(p)
        which = ["primary", "backup"] if copies == "both" else [copies]
        for w in which:
            raw = read_at(p, offs[w], SB)
            new = edit(raw, field)
            assert parse_sb(new)["crc_ok"]
            if new == raw:
                raise SystemExit("%s %s: %s edit changed nothing" % (p, w, field))
            write_at(p, offs[w], new)


def cmd_sb_save(out, imgs):
    saved = {}
    for p in imgs:
        for w, off in copy_offsets(p).items():
            saved[(os.path.abspath(p), off)] = read_at(p, off, SB)
    with open(out, "wb") as f:
        pickle.dump(saved, f)


def cmd_sb_restore(inp):
    with open(inp, "rb") as f:
        saved = pickle.load(f)
    for (p, off), raw in sorted(saved.items()):
        write_at(p, off, raw)


# --- pool geometry and addresses -----------------------------------------

class Pool:
    def __init__(self, imgs):
        devs = {}
        first = None
        for p in imgs:
            f = None
            for off in copy_offsets(p).values():
                f = parse_sb(read_at(p, off, SB))
                if f is not None and f["crc_ok"]:
                    break
            if f is None:
                raise SystemExit("%s: no superblock" % p)
            devs[f["index"]] = p
            first = first or f
        self.n = first["count"]
        if sorted(devs) != list(range(self.n)):
            raise SystemExit("device indices %s, expected 0..%d" % (sorted(devs), self.n - 1))
        self.paths = [devs[i] for i in range(self.n)]
        self.chunk = spec_chunk(first["spec"]) or first["per_device"]
        self.meta_len = first["meta_len"]
        self.per_device = first["per_device"]
        self.capacity = self.per_device * self.n
        self.fds = [os.open(p, os.O_RDWR) for p in self.paths]

    def locate(self, addr):
        """(device, file offset, bytes left in this chunk) of a pool address."""
        c = addr // self.chunk
        within = addr % self.chunk
        return (c % self.n, DATA_START + (c // self.n) * self.chunk + within,
                self.chunk - within)

    def address(self, dev, off):
        rel = off - DATA_START
        row, within = divmod(rel, self.chunk)
        return (row * self.n + dev) * self.chunk + within

    def read(self, addr, n):
        out = bytearray()
        while n > 0:
            d, off, left = self.locate(addr)
            k = min(n, left)
            b = os.pread(self.fds[d], k, off)
            out += b + bytes(k - len(b))
            addr += k
            n -= k
        return bytes(out)

    def write(self, addr, data):
        while data:
            d, off, left = self.locate(addr)
            k = min(len(data), left)
            os.pwrite(self.fds[d], data[:k], off)
            addr += k
            data = data[k:]

    def sync(self):
        for fd in self.fds:
            os.fsync(fd)

    def data_ranges(self, dev, start, end):
        """Allocated (non-hole) byte ranges of a device file in [start, end)."""
        fd = self.fds[dev]
        off = start
        while off < end:
            try:
                s = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                return
            if s >= end:
                return
            e = min(os.lseek(fd, s, os.SEEK_HOLE), end)
            yield s, e
            off = e

    def blocks(self, size, lo, hi):
        """Pool addresses of the size-aligned blocks in [lo, hi) that are not
        holes in the image files, with their bytes (non-zero ones only)."""
        found = {}
        for dev in range(self.n):
            end = DATA_START + self.per_device
            for s, e in self.data_ranges(dev, DATA_START, end):
                # Device offsets are size-aligned exactly when pool addresses are
                # (size divides the chunk).
                s = DATA_START + (s - DATA_START) // size * size
                for off in range(s, e, size):
                    a = self.address(dev, off)
                    if lo <= a < hi and a not in found:
                        found[a] = None
        out = {}
        for a in sorted(found):
            b = self.read(a, size)
            if any(b):
                out[a] = b
        return out


def cmd_geometry(imgs):
    p = Pool(imgs)
    print("devices %d chunk %d meta_len %d per_device %d" % (p.n, p.chunk, p.meta_len, p.per_device))


# --- metadata slots ----------------------------------------------------------

def meta_slots(pool):
    return pool.blocks(SLOT, 0, pool.meta_len)


def cmd_meta_snap(out, imgs):
    pool = Pool(imgs)
    with open(out, "wb") as f:
        pickle.dump(meta_slots(pool), f)


def nonce_counter(slot):
    """How recent a slot is: under crypt, the counter of its clear nonce
    (bytes 8..12 are b"KID2"; comparable within one mount's key id);
    without crypt, the sequence number stamped after the 4 KiB payload."""
    if slot[8:12] == b"KID2":
        return struct.unpack_from("<Q", slot, 0)[0]
    return struct.unpack_from("<Q", slot, 4096)[0]


def changed_pairs(snap, now):
    """{pair address: [changed slot addresses]}, the root pair left out."""
    pairs = {}
    for a in sorted(set(snap) | set(now)):
        if snap.get(a, bytes(SLOT)) != now.get(a, bytes(SLOT)) and a >= PAIR:
            pairs.setdefault(a // PAIR * PAIR, []).append(a)
    return pairs


def cmd_meta_changed(snapfile, imgs):
    """One line per changed slot pair: "PAIR NEWEST_SLOT COUNTER NSLOTS"."""
    pool = Pool(imgs)
    with open(snapfile, "rb") as f:
        snap = pickle.load(f)
    now = meta_slots(pool)
    for pair, slots in sorted(changed_pairs(snap, now).items()):
        # The newest version is the changed slot sealed last: within one
        # mount, the higher nonce counter.
        live = [a for a in slots if any(now.get(a, b""))]
        if not live:
            continue
        newest = max(live, key=lambda a: nonce_counter(now[a]))
        print("%d %d %d %d" % (pair, newest, nonce_counter(now[newest]), len(slots)))


def cmd_slot_zero(addr, imgs):
    pool = Pool(imgs)
    pool.write(addr, bytes(SLOT))
    pool.sync()


def cmd_pair_restore(snapfile, pair, imgs):
    pool = Pool(imgs)
    with open(snapfile, "rb") as f:
        snap = pickle.load(f)
    for a in (pair, pair + SLOT):
        pool.write(a, snap.get(a, bytes(SLOT)))
    pool.sync()


def cmd_region_zero(imgs):
    pool = Pool(imgs)
    n = 0
    for a in meta_slots(pool):
        pool.write(a, bytes(SLOT))
        n += 1
    pool.sync()
    print("zeroed %d slots" % n, file=sys.stderr)


# --- data extents -------------------------------------------------------------

def cmd_data_swap(imgs):
    """Swap the first two different non-zero 64 KiB-aligned chunks of the
    data region; print their pool addresses."""
    pool = Pool(imgs)
    lo = (pool.meta_len + UNIT - 1) // UNIT * UNIT
    blocks = pool.blocks(UNIT, lo, pool.capacity)
    addrs = sorted(blocks)
    if not addrs:
        raise SystemExit("no data in the data region")
    a = addrs[0]
    b = next((x for x in addrs[1:] if blocks[x] != blocks[a]), None)
    if b is None:
        raise SystemExit("no two different data chunks")
    pool.write(a, blocks[b])
    pool.write(b, blocks[a])
    pool.sync()
    print("%d %d" % (a, b))


def cmd_digest(imgs):
    """A digest of the images' contents (sparse-aware), one line per image."""
    for p in imgs:
        h = hashlib.sha256()
        fd = os.open(p, os.O_RDONLY)
        size = os.fstat(fd).st_size
        h.update(str(size).encode())
        off = 0
        while off < size:
            try:
                s = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            e = os.lseek(fd, s, os.SEEK_HOLE)
            pos = s
            while pos < e:
                b = os.pread(fd, min(1 << 20, e - pos), pos)
                if not b:
                    break
                # Zero blocks hash like holes.
                for i in range(0, len(b), 4096):
                    blk = b[i:i + 4096]
                    if any(blk):
                        h.update(struct.pack("<Q", pos + i) + blk)
                pos += len(b)
            off = e
        os.close(fd)
        print(h.hexdigest(), os.path.basename(p))


# --- files: populate and verify -----------------------------------------------

def put(mnt, ref, rel, data, mode="wb", at=None):
    for root in (mnt, ref):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if at is None:
            with open(path, mode) as f:
                f.write(data)
        else:
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(data)


def cmd_populate(mnt, ref, phase="first", seed="1"):
    r = random.Random("%s-%s" % (phase, seed))
    if phase == "first":
        put(mnt, ref, "big", r.randbytes(1 << 20))
        for d in range(3):
            for i in range(8):
                n = r.choice([0, 1, 100, 4096, 5000, 70000])
                text = "".join("line %d of file %d/%d %s\n" % (k, d, i, r.random())
                               for k in range(n // 40 + 1)).encode()[:n]
                put(mnt, ref, "tree/d%d/f%d" % (d, i), text)
        put(mnt, ref, "tree/d0/sub/deep", b"deep file\n" * 500)
        put(mnt, ref, "zeros", bytes(200000))
    elif phase == "more":
        # Change existing files (so that an old metadata version would point
        # at other contents) and add new ones.
        put(mnt, ref, "big", r.randbytes(128 << 10), at=256 << 10)
        put(mnt, ref, "tree/d1/f3", b"appended\n" * 100, mode="ab")
        put(mnt, ref, "tree/d2/f0", b"rewritten " * 1000)
        for i in range(6):
            put(mnt, ref, "new/n%d" % i, r.randbytes(r.choice([100, 9000, 66000])))
    else:
        # A different set of new files (another copy of the pool).
        for i in range(5):
            put(mnt, ref, "%s/x%d" % (phase, i), r.randbytes(r.choice([300, 20000, 131072])))
    with open(ref.rstrip("/") + ".sha256", "w") as out:
        for path in sorted(files_of(ref)):
            with open(os.path.join(ref, path), "rb") as f:
                out.write("%s  %s\n" % (hashlib.sha256(f.read()).hexdigest(), path))


def files_of(ref):
    for root, dirs, files in os.walk(ref):
        for name in files:
            yield os.path.relpath(os.path.join(root, name), ref)


def check_file(path, want):
    """'ok', 'WRONG: why', or an errno name."""
    try:
        st = os.stat(path)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    pos = 0
    try:
        while True:
            try:
                b = os.pread(fd, 65536, pos)
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e.errno))
            if not b:
                break
            if b != want[pos:pos + len(b)]:
                return "WRONG: bytes %d-%d differ" % (pos, pos + len(b) - 1)
            pos += len(b)
    finally:
        os.close(fd)
    if pos != len(want):
        return "WRONG: read %d bytes, want %d" % (pos, len(want))
    if st.st_size != len(want):
        return "WRONG: size %d, want %d" % (st.st_size, len(want))
    return "ok"


def cmd_verify(mnt, ref):
    """Exit 0: every file identical; 1: some files fail with an I/O error
    (none wrong); 2: a wrong byte or size, or a file missing without error."""
    counts = {}
    bad = 0
    # Walk the mount too: readdir of damaged directories must fail, not lie.
    try:
        for root, dirs, files in os.walk(mnt, onerror=lambda e: print(
                "walk: %s: %s" % (e.filename, errno.errorcode.get(e.errno)), file=sys.stderr)):
            pass
    except OSError as e:
        print("walk: %s" % e, file=sys.stderr)
    for rel in sorted(files_of(ref)):
        with open(os.path.join(ref, rel), "rb") as f:
            want = f.read()
        r = check_file(os.path.join(mnt, rel), want)
        if r == "ENOENT":
            r = "MISSING (ENOENT, no I/O error)"
        print("  %s: %s" % (rel, r), file=sys.stderr)
        key = r.split(":")[0].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
        if r.startswith("WRONG") or r.startswith("MISSING"):
            bad += 1
    print("verify: " + ", ".join("%s %d" % kv for kv in sorted(counts.items())), file=sys.stderr)
    if bad:
        sys.exit(2)
    sys.exit(0 if set(counts) == {"ok"} else 1)


# --- nonce audit ------------------------------------------------------------------

def read_nonces(path):
    """{(keyid, nonce): set of identities} from a debug-nonces listing."""
    out = {}
    lines = 0
    with open(path) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if w[0] == "extent" and len(w) == 6:
                key, ident = (w[3], w[4]), ("extent", w[5])
            elif w[0] == "slot" and len(w) == 4:
                key, ident = (w[2], w[3]), ("slot", w[1])
            else:
                raise SystemExit("%s: cannot parse %r" % (path, line))
            out.setdefault(key, set()).add(ident)
            lines += 1
    return out, lines


def cmd_noreuse(paths):
    """Exit 0 if no (key id, nonce) seals two different things in any listing."""
    ok = True
    for path in paths:
        pairs, lines = read_nonces(path)
        reused = {k: v for k, v in pairs.items() if len(v) > 1}
        print("%s: %d sealed blocks, %d distinct (key id, nonce), %d key ids, %d reused" % (
            os.path.basename(path), lines, len(pairs), len({k[0] for k in pairs}), len(reused)))
        for k, v in sorted(reused.items())[:10]:
            print("  REUSED %s %s: %s" % (k[0], k[1], sorted(v)))
        if reused or not pairs:
            ok = False
    sys.exit(0 if ok else 1)


def cmd_nonces(base, a, b):
    """Exit 0 if the (key id, nonce) pairs new in A and new in B are disjoint
    (and neither copy is without new ones); `noreuse` checks each listing."""
    ok = True
    sets = {}
    for name, path in (("base", base), ("A", a), ("B", b)):
        pairs, lines = read_nonces(path)
        reused = {k: v for k, v in pairs.items() if len(v) > 1}
        keyids = sorted({k[0] for k in pairs})
        print("%s: %d sealed blocks, %d distinct (key id, nonce), %d key ids, %d reused" % (
            name, lines, len(pairs), len(keyids), len(reused)))
        for k, v in sorted(reused.items())[:10]:
            print("  REUSED %s %s: %s" % (k[0], k[1], sorted(v)))
        sets[name] = pairs
    new_a = set(sets["A"]) - set(sets["base"])
    new_b = set(sets["B"]) - set(sets["base"])
    both = new_a & new_b
    print("new in A: %d, new in B: %d, new in both: %d" % (len(new_a), len(new_b), len(both)))
    print("write key ids new in A: %s" % sorted({k[0] for k in new_a} - {k[0] for k in sets["base"]}))
    print("write key ids new in B: %s" % sorted({k[0] for k in new_b} - {k[0] for k in sets["base"]}))
    for k in sorted(both)[:10]:
        print("  IN BOTH %s %s: A %s, B %s" % (k[0], k[1], sorted(sets["A"][k]), sorted(sets["B"][k])))
    if both or not new_a or not new_b:
        ok = False
    sys.exit(0 if ok else 1)


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    c, a = argv[1], argv[2:]
    if c == "sb-show":
        cmd_sb_show(a)
    elif c == "sb-edit":
        cmd_sb_edit(a[0], a[1], a[2:])
    elif c == "sb-save":
        cmd_sb_save(a[0], a[1:])
    elif c == "sb-restore":
        cmd_sb_restore(a[0])
    elif c == "geometry":
        cmd_geometry(a)
    elif c == "meta-snap":
        cmd_meta_snap(a[0], a[1:])
    elif c == "meta-changed":
        cmd_meta_changed(a[0], a[1:])
    elif c == "slot-zero":
        cmd_slot_zero(int(a[0]), a[1:])
    elif c == "pair-restore":
        cmd_pair_restore(a[0], int(a[1]), a[2:])
    elif c == "region-zero":
        cmd_region_zero(a)
    elif c == "data-swap":
        cmd_data_swap(a)
    elif c == "digest":
        cmd_digest(a)
    elif c == "populate":
        cmd_populate(*a)
    elif c == "verify":
        cmd_verify(a[0], a[1])
    elif c == "noreuse":
        cmd_noreuse(a)
    elif c == "nonces":
        cmd_nonces(a[0], a[1], a[2])
    else:
        raise SystemExit("unknown command %s\n%s" % (c, __doc__))


if __name__ == "__main__":
    main(sys.argv)
