#!/usr/bin/env python3
"""Write a new file, then fsync it and time the fsync.

Usage: hangwrite.py PATH SIZE SEED

Creates PATH, writes SIZE pseudo-random (incompressible, from SEED) bytes,
fsyncs and closes it.  Each step prints one line as soon as it returns, so
that a caller polling the output sees the fsync's outcome even if close()
then blocks:

    write: OK | write: ERRNAME
    fsync: OK SECONDS | fsync: ERRNAME SECONDS
    close: OK | close: ERRNAME

ERRNAME is the errno's symbolic name (EIO); SECONDS is the time fsync(2)
took, with two decimals.  A failed write does not skip the fsync.
"""
import errno
import os
import random
import sys
import time


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def name(e):
    return errno.errorcode.get(e.errno, "E%d" % e.errno)


def main():
    if len(sys.argv) != 4:
        sys.stderr.write(__doc__)
        return 2
    path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = random.Random(seed).randbytes(size)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        say("write: OK")
    except OSError as e:
        say("write: " + name(e))
    start = time.monotonic()
    try:
        os.fsync(fd)
        say("fsync: OK %.2f" % (time.monotonic() - start))
    except OSError as e:
        say("fsync: %s %.2f" % (name(e), time.monotonic() - start))
    try:
        os.close(fd)
        say("close: OK")
    except OSError as e:
        say("close: " + name(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
