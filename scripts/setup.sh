#!/bin/bash
# Install everything this project needs on a Debian 12 machine (run as root): Debian packages,
# a virtualenv at .venv with the pinned Python dependencies (and the test tools with --test),
# and /run/systemd/system (machinectl refuses to run without it).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TESTS=0
[ "${1:-}" = --test ] && WITH_TESTS=1

PACKAGES=(dbus dbus-bin systemd-container busybox-static python3 python3-venv util-linux procps
          iproute2 btrfs-progs mount)
# sdbus is built from its source against Debian's libsystemd (see below)
PACKAGES+=(gcc libc6-dev pkg-config libsystemd-dev python3-dev)
# Test tools: dbus-python and PyGObject for python-dbusmock come from Debian (a venv with
# --system-site-packages sees them), tmux/script to drive terminals, btrfs/e2fs for images.
TEST_PACKAGES=(python3-dbus python3-gi tmux btrfs-progs e2fsprogs libsystemd0 debootstrap fdisk acl
               libnss-mymachines libnss-systemd)
[ $WITH_TESTS = 1 ] && PACKAGES+=("${TEST_PACKAGES[@]}")

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's own interpreter, as on the hosts we replace machined on.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# sdbus from its source, linked to Debian's libsystemd0: the very sd-bus 252's machined uses, and
# the full C API instead of the limited one PyPI's abi3 wheel is built for, which costs every call
# (docs/benchmarks.md). A venv made before holds the wheel: that one is built again.
SPEC=.
[ $WITH_TESTS = 1 ] && SPEC='.[test]'
.venv/bin/python -m pip install -q --no-binary sdbus -e "$SPEC"
if ! .venv/bin/python -c 'import sdbus.sd_bus_internals as m; print(m.__file__)' | grep -q cpython-; then
    .venv/bin/python -m pip install -q --force-reinstall --no-deps --no-binary sdbus \
        "$(grep -o '"sdbus==[^"]*"' pyproject.toml | tr -d '"')"
fi

mkdir -p /run/systemd/system /run/systemd/machines
echo "Set up: $(.venv/bin/python -m machined --version)"
