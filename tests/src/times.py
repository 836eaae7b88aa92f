"""Timestamps set by an operation against a clock reading taken just before
it (CLOCK_REALTIME, ns). Usage: times.py DIR SLACK_NS. Prints, per
operation, "ok" when every time it sets is no earlier than the reading less
SLACK_NS. Kernel filesystems stamp from a coarse clock (one tick, up to
10 ms, behind; ext4's multigrain times are fine only when the inode was
looked at since its last change, and not always then), so the slack that
ext4 needs is one tick; exact times need a slack of 0."""
import os, sys, time

d, slack = sys.argv[1], int(sys.argv[2])


def check(name, path, whats, op):
    os.lstat(path)
    t0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
    op()
    st = os.lstat(path)
    bad = [w for w in whats if getattr(st, "st_" + w + "_ns") < t0 - slack]
    print(f"{name}: {'ok' if not bad else 'earlier: ' + ' '.join(bad)}")


f, g, sub = (os.path.join(d, n) for n in ("f", "g", "sub"))


def write():
    with open(f, "a") as x:
        x.write("data")


check("create", d, ["mtime", "ctime"], lambda: open(f, "w").close())
os.lstat(f)
check("write", f, ["mtime", "ctime"], write)
check("truncate", f, ["mtime", "ctime"], lambda: os.truncate(f, 1))
check("chmod", f, ["ctime"], lambda: os.chmod(f, 0o640))
check("chown", f, ["ctime"], lambda: os.chown(f, 1, 1))
check("utimes now", f, ["mtime", "atime", "ctime"], lambda: os.utime(f))
check("link", f, ["ctime"], lambda: os.link(f, g))
check("setxattr", f, ["ctime"], lambda: os.setxattr(f, "user.a", b"1"))
check("mkdir", d, ["mtime", "ctime"], lambda: os.mkdir(sub))
check("rename", d, ["mtime", "ctime"], lambda: os.rename(g, os.path.join(d, "h")))
check("unlink", d, ["mtime", "ctime"], lambda: os.unlink(os.path.join(d, "h")))
check("symlink", d, ["mtime", "ctime"], lambda: os.symlink("x", os.path.join(d, "s")))
