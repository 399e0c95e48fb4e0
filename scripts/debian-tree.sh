#!/bin/bash
# Build (once) and print the path of a cached Debian bookworm tree that boots with systemd as
# PID 1: the "test VM" for booted-container and drop-in tests. The cache is keyed by the package
# list, so changing it rebuilds. Never modify the cached tree: boot a copy or an overlay of it.
# Usage: scripts/debian-tree.sh            (prints the tree's path on stdout)
set -euo pipefail

CACHE=${MACHINED_TEST_CACHE:-/var/cache/machined-tests}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS=systemd,systemd-sysv,dbus,dbus-user-session,polkitd,libpam-systemd,systemd-container,iproute2,python3,python3-venv,busybox-static,procps,util-linux,less
KEY=$(echo "$PKGS" | sha256sum | cut -c1-12)
TREE=$CACHE/bookworm-$KEY

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one builder at a time; the others wait and reuse its result
if [ ! -e "$TREE/.complete" ]; then
    command -v debootstrap >/dev/null || {
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }
    rm -rf "$TREE.tmp"
    echo "debootstrap bookworm into $TREE (one-off, a minute or two)" >&2
    debootstrap --variant=minbase --include="$PKGS" bookworm "$TREE.tmp" "$MIRROR" >&2
    echo testvm > "$TREE.tmp/etc/hostname"
    chroot "$TREE.tmp" passwd -d root >/dev/null      # empty root password: logins in tests
    : > "$TREE.tmp/etc/machine-id"                    # generated at first boot
    rm -f "$TREE.tmp/var/cache/apt/archives/"*.deb
    touch "$TREE.tmp/.complete"
    mv "$TREE.tmp" "$TREE"
fi
echo "$TREE"
