#!/usr/bin/env bash
# Demo: build stackfs, make a pool of three 1 GiB image files, mount it, use it.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v fusermount3 >/dev/null; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
fi
cargo build --release -q
bin=$PWD/target/release/stackfs
demo=${DEMO_DIR:-/tmp/stackfs-demo}
mkdir -p "$demo/mnt"
mountpoint -q "$demo/mnt" && $bin umount "$demo/mnt"
src="$demo/a.img:$demo/b.img:$demo/c.img"
# The default stack compresses, encrypts and stripes. A real pool would take
# its passphrase from a prompt or --passphrase-file; the demo uses a fixed one.
export STACKFS_PASSPHRASE=${STACKFS_PASSPHRASE:-demo passphrase}
$bin mkfs --force --size 1G "$demo/a.img" "$demo/b.img" "$demo/c.img"
$bin mount "$src" "$demo/mnt"
echo "mounted: $(grep " $demo/mnt " /proc/mounts)"
cp -r /usr/include/linux "$demo/mnt/include"
head -c 64M /dev/urandom > "$demo/random"
cp "$demo/random" "$demo/mnt/random"
sync "$demo/mnt/random"
df -h "$demo/mnt"
# stackfs umount returns once the daemon has written everything and let go.
$bin umount "$demo/mnt"
$bin mount "$src" "$demo/mnt"
cmp "$demo/random" "$demo/mnt/random" && echo "64 MiB of random data read back intact after remount"
diff -r /usr/include/linux "$demo/mnt/include" && echo "/usr/include/linux copied intact ($(find "$demo/mnt/include" -type f | wc -l) files)"
$bin info "$src" || true
$bin umount "$demo/mnt"
echo "demo pool left in $demo (mount it again with: $bin mount $src $demo/mnt; passphrase: $STACKFS_PASSPHRASE)"
