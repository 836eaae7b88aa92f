#!/usr/bin/env python3
"""Directory streams under renames, read with getdents64 and a 4 KiB buffer.

Usage: dirstream.py DIR COUNT [ROUNDS]

Makes COUNT empty files in DIR (which must be empty), then:
1. reads DIR with getdents64 and, as each entry comes back, renames it to
   NAME.x and back ROUNDS times (default 2); every name must come back
   exactly once and no NAME.x at all (a kernel filesystem keeps a name at
   its place in the stream: ext4 orders by a hash of the name);
2. reads DIR whole, recording each entry's d_off, and checks that seeking
   to the d_off of an entry resumes with the entry after it (telldir and
   seekdir), also after some entries were renamed away and back.

Prints fixed lines when all is well, what went wrong otherwise.
"""
import ctypes
import os
import platform
import struct
import sys

SYS_GETDENTS64 = {
    "x86_64": 217,
    "aarch64": 61,
    "riscv64": 61,
    "ppc64le": 202,
    "s390x": 220,
    "i686": 220,
    "i386": 220,
}[platform.machine()]

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
BUF = ctypes.create_string_buffer(4096)


def getdents(fd):
    """One getdents64 call: [(name, d_off)], empty at the end."""
    n = libc.syscall(ctypes.c_long(SYS_GETDENTS64), ctypes.c_int(fd), BUF,
                     ctypes.c_size_t(len(BUF)))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    raw = BUF.raw[:n]
    out, pos = [], 0
    while pos < n:
        _ino, off, reclen, _typ = struct.unpack_from("<QqHB", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append((name, off))
        pos += reclen
    return out


def read_all(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    out = []
    while True:
        batch = getdents(fd)
        if not batch:
            return out
        out.extend(e for e in batch if e[0] not in (b".", b".."))


def main():
    top, count = sys.argv[1], int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    names = [b"file-%d" % i for i in range(count)]
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for n in names:
        os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    print("created %d files" % count)

    # 1. Rename every entry away and back as the stream returns it.
    seen = {}
    while True:
        batch = getdents(fd)
        # A stream that hands renamed entries out again may never end.
        if not batch or sum(seen.values()) > 2 * count:
            break
        for name, _off in batch:
            if name in (b".", b".."):
                continue
            seen[name] = seen.get(name, 0) + 1
            if name.endswith(b".x"):
                continue
            for _ in range(rounds):
                os.rename(name, name + b".x", src_dir_fd=fd, dst_dir_fd=fd)
                os.rename(name + b".x", name, src_dir_fd=fd, dst_dir_fd=fd)
    want = set(names)
    twice = sorted(n for n, c in seen.items() if c > 1)
    renamed = sorted(n for n in seen if n.endswith(b".x"))
    missing = sorted(want - set(seen))
    extra = sorted(set(seen) - want - set(renamed))
    if twice or renamed or missing or extra:
        print("stream: %d entries, %d names twice (%s), %d .x names (%s), "
              "%d missing (%s), %d unknown (%s)" % (
                  sum(seen.values()), len(twice), twice[:5], len(renamed),
                  renamed[:5], len(missing), missing[:5], len(extra),
                  extra[:5]))
    else:
        print("stream under renames: every name once, no renamed name")

    # 2. Offsets: seeking to an entry's d_off resumes after that entry.
    listing = read_all(fd)
    if sorted(n for n, _ in listing) != sorted(names):
        print("listing after renames: %d entries" % len(listing))
    step = max(1, len(listing) // 25)
    probes = list(range(0, len(listing), step)) + [len(listing) - 1]

    def check_seeks(when):
        bad = []
        for i in probes:
            os.lseek(fd, listing[i][1], os.SEEK_SET)
            got = getdents(fd)
            first = got[0][0] if got else None
            expect = listing[i + 1][0] if i + 1 < len(listing) else None
            if first != expect:
                bad.append((i, listing[i][0], expect, first))
        if bad:
            print("seek %s: %d of %d wrong, e.g. %s" % (when, len(bad),
                                                      len(probes), bad[:3]))
        else:
            print("seek %s: each offset resumes after its entry" % when)

    check_seeks("before renames")
    for i in probes:
        n = listing[i][0]
        for _ in range(rounds):
            os.rename(n, n + b".x", src_dir_fd=fd, dst_dir_fd=fd)
            os.rename(n + b".x", n, src_dir_fd=fd, dst_dir_fd=fd)
    check_seeks("after renames")
    again = read_all(fd)
    if again != listing:
        print("order changed by renames away and back")
    else:
        print("order unchanged by renames away and back")
    os.close(fd)


if __name__ == "__main__":
    main()
