#!/usr/bin/env python3
"""Directories removed while open or in use, as a kernel filesystem shows them.

Usage: deaddir.py DIR [--count-inodes]

In DIR (empty): fstat of an open directory removed by rmdir, and of one
replaced by rename(2); stat of a removed working directory; fstat of an open
unlinked file (the control).  Each must succeed, with st_nlink 0; reading or
creating entries in a removed directory fails with ENOENT.  With
--count-inodes, the filesystem's used inode count (statfs) must be back where
it started once everything is closed: nothing removed is left behind.
Prints fixed lines when all is well.
"""
import ctypes
import errno
import os
import platform
import stat
import sys
import time

SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61}.get(
    platform.machine(), 217)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def kind(st):
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "regular file"
    return "mode %o" % st.st_mode


def outcome(f):
    try:
        f()
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def getdents(fd):
    buf = ctypes.create_string_buffer(4096)
    n = libc.syscall(ctypes.c_long(SYS_GETDENTS64), ctypes.c_int(fd), buf,
                     ctypes.c_size_t(4096))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def used_inodes(path):
    s = os.statvfs(path)
    return s.f_files - s.f_ffree


def main():
    top = os.path.abspath(sys.argv[1])
    count = "--count-inodes" in sys.argv[2:]
    os.chdir(top)
    before = used_inodes(top)

    # rmdir of an open directory.
    what = "rmdir while open"
    os.mkdir("d")
    fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY)
    ino = os.fstat(fd).st_ino
    os.rmdir("d")
    st = os.fstat(fd)
    print("%s: fstat: %s, nlink %d%s" % (what, kind(st), st.st_nlink,
                                         "" if st.st_ino == ino else ", other inode"))
    print("%s: getdents: %s" % (what, outcome(lambda: getdents(fd))))
    print("%s: create in it: %s" % (what, outcome(lambda: os.close(
        os.open("x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)))))
    print("%s: mkdir in it: %s" % (what, outcome(lambda: os.mkdir("y", dir_fd=fd))))
    time.sleep(1.1)  # past the attribute timeout: asked again
    st = os.fstat(fd)
    print("%s: fstat later: %s, nlink %d" % (what, kind(st), st.st_nlink))
    os.close(fd)

    # rename(2) of a directory over an open (empty) one.
    what = "replaced by rename while open"
    os.mkdir("d")
    os.mkdir("e")
    os.close(os.open("e/f", os.O_CREAT | os.O_WRONLY, 0o644))
    fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY)
    ino = os.fstat(fd).st_ino
    os.rename("e", "d")
    st = os.fstat(fd)
    print("%s: fstat: %s, nlink %d%s" % (what, kind(st), st.st_nlink,
                                         "" if st.st_ino == ino else ", other inode"))
    print("%s: getdents: %s" % (what, outcome(lambda: getdents(fd))))
    print("%s: create in it: %s" % (what, outcome(lambda: os.close(
        os.open("x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)))))
    st = os.stat("d")
    print("%s: new d: %s, nlink %d, %s, entries %s" % (
        what, kind(st), st.st_nlink,
        "other inode" if st.st_ino != ino else "same inode",
        sorted(os.listdir("d"))))
    os.close(fd)

    # A removed working directory (held by the kernel, not open).
    what = "removed working directory"
    os.mkdir("c")
    os.chdir("c")
    os.rmdir(os.path.join(top, "c"))
    st = os.stat(".")
    print("%s: stat .: %s, nlink %d" % (what, kind(st), st.st_nlink))
    print("%s: create in it: %s" % (what, outcome(lambda: os.close(
        os.open("x", os.O_CREAT | os.O_WRONLY, 0o644)))))
    os.chdir(top)

    # The control: an open unlinked file.
    what = "unlinked while open"
    fd = os.open("f", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"data")
    os.unlink("f")
    st = os.fstat(fd)
    data = os.pread(fd, 16, 0)
    print("%s: fstat: %s, nlink %d, reads back %r" % (what, kind(st), st.st_nlink,
                                                      data.decode()))
    os.close(fd)

    # Clean up what the test made; then nothing removed may stay behind.
    os.unlink("d/f")
    os.rmdir("d")
    if count:
        # Forgets and releases reach the filesystem asynchronously.
        deadline = time.time() + 10
        while used_inodes(top) != before and time.time() < deadline:
            time.sleep(0.1)
        left = used_inodes(top) - before
        if left:
            print("%d inode(s) left behind" % left)
            return
    print("no inode left behind")


if __name__ == "__main__":
    main()
