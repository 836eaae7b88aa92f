#!/usr/bin/env python3
"""Print the data/hole layout of a file found with SEEK_DATA/SEEK_HOLE.

Output is one line per extent, "data START-END" or "hole START-END",
which only depends on where the file has data, not on timing.
"""
import errno
import os
import sys

for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    print("%s: size %d" % (path.rsplit("/", 1)[-1], size))
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size
        if data > off:
            print("  hole %d-%d" % (off, data - 1))
        if data >= size:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        print("  data %d-%d" % (data, hole - 1))
        off = hole
    os.close(fd)
