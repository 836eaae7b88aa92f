#!/usr/bin/env python3
"""Print a file's contents as runs of equal bytes: "START-END 0xBB".

Long runs of one byte value (zeros, patterns written with xfs_io -S) make
up most test files, so this describes contents exactly and compactly.
Consecutive runs shorter than 16 bytes are merged and shown as "mixed".
"""
import sys


def runs(data):
    raw = []
    i, n = 0, len(data)
    while i < n:
        j = i
        while j < n and data[j] == data[i]:
            j += 1
        raw.append([i, j, "0x%02x" % data[i]])
        i = j
    # Merge stretches of several short runs (random-looking data) into one
    # "mixed" run; a lone short run keeps its byte value.
    out = []
    for r in raw:
        short = r[1] - r[0] < 16
        if short and out and out[-1][1] - out[-1][0] < 16 + 0 and out[-1][3]:
            out[-1][1] = r[1]
            out[-1][2] = "mixed"
        elif short and out and out[-1][2] == "mixed":
            out[-1][1] = r[1]
        else:
            out.append(r + [short])
    return [(s, e, w) for s, e, w, _ in out]


for path in sys.argv[1:]:
    with open(path, "rb") as f:
        data = f.read()
    print("%s: size %d" % (path.rsplit("/", 1)[-1], len(data)))
    for s, e, what in runs(data):
        print("  %d-%d %s" % (s, e - 1, what))
