#!/usr/bin/env python3
"""Run system calls and print their outcome as stable text.

Usage: sc.py OP ARGS... [-- OP ARGS...]...

Each operation prints "OP: OK" (sometimes followed by a value) or
"OP: ERRNAME" such as "OP: EEXIST".  Tests compare this with golden output,
so what a syscall returns is checked exactly, independent of the wording
of coreutils messages.
"""
import ctypes
import errno
import os
import stat
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100

RENAME_FLAGS = {"0": 0, "noreplace": 1, "exchange": 2, "whiteout": 4}
FALLOC_FLAGS = {
    "0": 0,
    "keep": 0x01,                # FALLOC_FL_KEEP_SIZE
    "punch": 0x02 | 0x01,        # PUNCH_HOLE needs KEEP_SIZE
    "zero": 0x10,                # FALLOC_FL_ZERO_RANGE
    "zerokeep": 0x10 | 0x01,
}
OPEN_FLAGS = {
    "rdonly": os.O_RDONLY, "wronly": os.O_WRONLY, "rdwr": os.O_RDWR,
    "creat": os.O_CREAT, "excl": os.O_EXCL, "trunc": os.O_TRUNC,
    "append": os.O_APPEND, "directory": os.O_DIRECTORY,
    "nofollow": os.O_NOFOLLOW, "path": getattr(os, "O_PATH", 0),
}


def check(ret):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def renameat2(old, new, flags):
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                               ctypes.c_char_p, ctypes.c_uint]
    check(libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD,
                         os.fsencode(new), RENAME_FLAGS[flags]))


def fallocate(path, mode, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                   ctypes.c_longlong, ctypes.c_longlong]
        check(libc.fallocate(fd, FALLOC_FLAGS[mode], int(off), int(length)))
    finally:
        os.close(fd)


def open_flags(spec):
    flags = 0
    for f in spec.split(","):
        flags |= OPEN_FLAGS[f]
    return flags


def ftype(mode):
    for test, name in ((stat.S_ISREG, "regular"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char"),
                       (stat.S_ISBLK, "block")):
        if test(mode):
            return name
    return "unknown"


def do(op, a):
    """Run one operation; return the value to print after OK (or None)."""
    if op == "mkdir":
        os.mkdir(a[0], int(a[1], 8) if len(a) > 1 else 0o777)
    elif op == "rmdir":
        os.rmdir(a[0])
    elif op == "unlink":
        os.unlink(a[0])
    elif op == "rename":
        os.rename(a[0], a[1])
    elif op == "renameat2":
        renameat2(a[0], a[1], a[2])
    elif op == "link":
        os.link(a[0], a[1], follow_symlinks=False)
    elif op == "symlink":
        os.symlink(a[0], a[1])
    elif op == "readlink":
        return os.readlink(a[0])
    elif op == "open":
        fd = os.open(a[0], open_flags(a[1]), int(a[2], 8) if len(a) > 2 else 0o644)
        os.close(fd)
    elif op == "mknod":
        kinds = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR,
                 "blk": stat.S_IFBLK, "reg": stat.S_IFREG}
        dev = os.makedev(int(a[2]), int(a[3])) if len(a) > 3 else 0
        os.mknod(a[0], kinds[a[1]] | 0o644, dev)
    elif op == "socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(a[0])
        s.close()
    elif op == "truncate":
        os.truncate(a[0], int(a[1]))
    elif op in ("stat", "lstat"):
        st = os.stat(a[0], follow_symlinks=(op == "stat"))
        return ftype(st.st_mode)
    elif op == "write":
        # write PATH OFFSET LENGTH BYTE: pwrite LENGTH bytes of BYTE
        fd = os.open(a[0], os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, bytes([int(a[3], 0)]) * int(a[2]), int(a[1]))
        finally:
            os.close(fd)
    elif op == "read":
        # read PATH: print the length read, fails with EACCES etc.
        with open(a[0], "rb") as f:
            return str(len(f.read()))
    elif op == "fallocate":
        fallocate(a[0], a[1], a[2], a[3])
    elif op == "setxattr":
        flags = {"": 0, "create": os.XATTR_CREATE,
                 "replace": os.XATTR_REPLACE}[a[3] if len(a) > 3 else ""]
        os.setxattr(a[0], a[1], a[2].encode(), flags, follow_symlinks=False)
    elif op == "getxattr":
        v = os.getxattr(a[0], a[1], follow_symlinks=False)
        return v.decode(errors="replace") if len(v) <= 64 else "len=%d" % len(v)
    elif op == "listxattr":
        return " ".join(sorted(n for n in os.listxattr(a[0], follow_symlinks=False)
                               if n.startswith("user.")))
    elif op == "removexattr":
        os.removexattr(a[0], a[1], follow_symlinks=False)
    elif op == "access":
        m = 0
        for c in a[1]:
            m |= {"r": os.R_OK, "w": os.W_OK, "x": os.X_OK, "f": os.F_OK}[c]
        if not os.access(a[0], m):
            # os.access hides errno; ask again through libc to get it.
            libc.access.argtypes = [ctypes.c_char_p, ctypes.c_int]
            check(libc.access(os.fsencode(a[0]), m))
    elif op == "chmod":
        os.chmod(a[0], int(a[1], 8))
    elif op == "chown":
        os.chown(a[0], int(a[1]), int(a[2]), follow_symlinks=False)
    elif op == "seek":
        # seek PATH data|hole OFFSET
        fd = os.open(a[0], os.O_RDONLY)
        try:
            whence = os.SEEK_DATA if a[1] == "data" else os.SEEK_HOLE
            return str(os.lseek(fd, int(a[2]), whence))
        finally:
            os.close(fd)
    elif op == "opendir":
        return str(len(os.listdir(a[0])))
    elif op == "chdir":
        os.chdir(a[0])
    else:
        raise SystemExit("sc.py: unknown op " + op)
    return None


def main(argv):
    ops, cur = [], []
    for x in argv:
        if x == "--":
            ops.append(cur)
            cur = []
        else:
            cur.append(x)
    ops.append(cur)
    for o in ops:
        if not o:
            continue
        try:
            v = do(o[0], o[1:])
            print("%s: OK%s" % (o[0], "" if v is None else " " + v))
        except OSError as e:
            print("%s: %s" % (o[0], errno.errorcode.get(e.errno, str(e.errno))))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
