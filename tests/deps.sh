#!/bin/bash
# Install the programs the tests use (Debian/Ubuntu).  Idempotent and
# silent when everything is already there.
set -e
pkgs="xfsprogs attr util-linux python3 fuse3 acl"
missing=
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "deps.sh: need root to install:$missing" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "deps.sh: installing$missing"
# Install directly when the package lists are fresh enough; update once if not.
apt-get install -y -qq $missing >/dev/null 2>&1 || {
	apt-get update -qq >/dev/null
	apt-get install -y -qq $missing >/dev/null
}
