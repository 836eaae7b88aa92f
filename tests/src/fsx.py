#!/usr/bin/env python3
"""A small fsx: random file operations checked against an in-memory model.

Usage: fsx.py FILE [-n OPS] [-s SEED] [-l MAXLEN] [--mmap] [--falloc]
              [--replay-check]

Every operation is applied to FILE and to a bytearray; after each read,
and at the end, the file must equal the model.  Prints only a summary
(and the failing operation log on a mismatch), so output is stable.
With --replay-check the file is only compared with the model that the
same seed produces, without touching it (for checking after a remount).
"""
import argparse
import ctypes
import mmap
import os
import random
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("-s", type=int, default=1)
    ap.add_argument("-l", type=int, default=1 << 20, help="maximum file size")
    ap.add_argument("--mmap", action="store_true")
    ap.add_argument("--falloc", action="store_true")
    ap.add_argument("--replay-check", action="store_true")
    a = ap.parse_args()

    r = random.Random(a.s)
    model = bytearray()
    log = []
    check_only = a.replay_check
    fd = -1 if check_only else os.open(a.file, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    ops = ["write", "write", "read", "truncate"]
    if a.mmap:
        ops += ["mapwrite", "mapread"]
    if a.falloc:
        ops += ["falloc", "punch", "zero"]
    bad = 0

    def fail(msg):
        nonlocal bad
        bad += 1
        if bad <= 3:
            print("MISMATCH:", msg)
            print("last operations:", *log[-10:], sep="\n  ")

    for i in range(a.n):
        op = r.choice(ops)
        off = r.randrange(a.l)
        length = r.randint(1, min(65536, a.l - off))
        if op == "write":
            data = r.randbytes(length)
            log.append("%d write %d+%d" % (i, off, length))
            if not check_only:
                os.pwrite(fd, data, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + length] = data
        elif op == "read":
            log.append("%d read %d+%d" % (i, off, length))
            if not check_only:
                got = os.pread(fd, length, off)
                if got != bytes(model[off:off + length]):
                    fail("read %d+%d" % (off, length))
        elif op == "truncate":
            size = r.randrange(a.l)
            log.append("%d truncate %d" % (i, size))
            if not check_only:
                os.ftruncate(fd, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif op in ("mapwrite", "mapread"):
            size = len(model)
            if size == 0:
                continue
            off = r.randrange(size)
            length = r.randint(1, min(65536, size - off))
            data = r.randbytes(length) if op == "mapwrite" else None
            log.append("%d %s %d+%d" % (i, op, off, length))
            if check_only:
                if data:
                    model[off:off + length] = data
                continue
            pg = off & ~(mmap.PAGESIZE - 1)
            m = mmap.mmap(fd, off + length - pg, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=pg)
            if data:
                m[off - pg:off - pg + length] = data
                model[off:off + length] = data
                m.flush()
            elif m[off - pg:off - pg + length] != bytes(model[off:off + length]):
                fail("mapread %d+%d" % (off, length))
            m.close()
        else:
            mode = {"falloc": 0, "punch": PUNCH | KEEP, "zero": ZERO}[op]
            if r.random() < 0.5 and op != "punch":
                mode |= KEEP
            log.append("%d %s(mode %#x) %d+%d" % (i, op, mode, off, length))
            if not check_only:
                if libc.fallocate(fd, mode, off, length) != 0:
                    e = ctypes.get_errno()
                    print("fallocate failed:", os.strerror(e))
                    sys.exit(1)
            end = off + length
            if op in ("punch", "zero"):
                stop = min(end, len(model))
                if off < stop:
                    model[off:stop] = bytes(stop - off)
            if not mode & KEEP and end > len(model):
                model.extend(bytes(end - len(model)))

    if not check_only:
        os.close(fd)
    with open(a.file, "rb") as f:
        final = f.read()
    if final != bytes(model):
        fail("final contents (file %d bytes, model %d bytes)" % (len(final), len(model)))
    print("%d operations, final size %d, %s" % (a.n, len(model), "OK" if not bad else "FAILED"))
    sys.exit(1 if bad else 0)


main()
