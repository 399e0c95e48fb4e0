"""Standalone in a container: the daemon runs as it would in a container without systemd — its
own cgroup, PID and mount namespaces, cgroup2 mounted at the container's own cgroup — and
systemd-nspawn --register=yes inside that container registers with it, with and without
--keep-unit; machinectl lists and terminates the nested containers, and the scopes the daemon
made live in the container's cgroup subtree and go with their machines. (252 cannot run there:
it needs org.freedesktop.systemd1.)

Everything runs in one shell script inside the namespaces; when its PID namespace ends, every
process in it is gone, and its mounts go with its mount namespace."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import REPO, cgroup2_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, cgroups)")

# A container that stops on SIGTERM (a PID 1 without a handler would ignore it).
PAYLOAD = 'trap "exit 0" TERM; while :; do sleep 1; done'

INNER = r"""
set -u
fail() { echo "@@ FAIL $*"; exit 1; }
waitfor() {  # waitfor SECONDS COMMAND...: until COMMAND succeeds
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $end ] || return 1; sleep 0.1; done
}
mount --make-rprivate /
umount "$CG" && mount -t cgroup2 cgroup2 "$CG" || fail "cgroup2 mount"
for d in /run/systemd/machines /run/systemd/nspawn; do
    mkdir -p "$d" && mount -t tmpfs tmpfs "$d" || fail "tmpfs on $d"
done
echo "@@ cgroup $(grep '^0::' /proc/self/cgroup)"
cd "$REPO"
.venv/bin/python -m tests.helpers.busdaemon --policy open "unix:path=$WORK/bus" > "$WORK/bus.conf"
dbus-daemon --config-file="$WORK/bus.conf" --nofork --nopidfile 2>/dev/null &
export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$WORK/bus"
waitfor 10 test -S "$WORK/bus" || fail "no bus"
.venv/bin/python -m machined > "$WORK/machined.log" 2>&1 &
waitfor 20 busctl status org.freedesktop.machine1 || fail "no daemon"
running() { machinectl list --no-legend | grep -q "^nested "; }
prop() { busctl get-property org.freedesktop.machine1 /org/freedesktop/machine1/machine/nested \
             org.freedesktop.machine1.Machine "$1"; }
# the payload handles SIGTERM (a PID 1 without its handler yet would ignore it)
trapping() { local l; l=$(prop Leader | cut -d' ' -f2)
             (( 0x$(awk '/^SigCgt/ {print $2}' "/proc/$l/status") & 0x4000 )); }

# without --keep-unit: CreateMachine, the daemon makes machine.slice/machine-nested.scope
systemd-nspawn -q --register=yes -D "$TREE" -M nested /bin/sh -c "$PAYLOAD" \
    > "$WORK/nspawn1.log" 2>&1 &
NSPAWN=$!
waitfor 20 running || fail "not registered: $(cat "$WORK/nspawn1.log")"
waitfor 10 trapping || fail "no SIGTERM handler"
echo "@@ unit $(prop Unit)"
echo "@@ leader-cgroup $(grep '^0::' "/proc/$(prop Leader | cut -d' ' -f2)/cgroup")"
machinectl terminate nested || fail "terminate"
waitfor 20 sh -c "! kill -0 $NSPAWN" || fail "nspawn still runs"
waitfor 5 sh -c "! machinectl list --no-legend | grep -q nested" || fail "still listed"
echo "@@ slice-left $(ls -d "$CG/machine.slice" 2>/dev/null)"

# with --keep-unit: RegisterMachine, the unit is nspawn's own (here a service's cgroup)
mkdir "$CG/nspawn-nested.service"
(echo $BASHPID > "$CG/nspawn-nested.service/cgroup.procs" &&
 exec systemd-nspawn -q --register=yes --keep-unit -D "$TREE" -M nested /bin/sh -c "$PAYLOAD") \
    > "$WORK/nspawn2.log" 2>&1 &
NSPAWN=$!
waitfor 20 running || fail "not registered: $(cat "$WORK/nspawn2.log")"
waitfor 10 trapping || fail "no SIGTERM handler"
echo "@@ unit $(prop Unit)"
machinectl terminate nested || fail "terminate"
waitfor 20 sh -c "! kill -0 $NSPAWN" || fail "nspawn still runs"
waitfor 5 sh -c "! machinectl list --no-legend | grep -q nested" || fail "still listed"
grep -E "Traceback|ERROR|CRITICAL" "$WORK/machined.log" && fail "the daemon logged errors"
echo "@@ done"
"""


@pytest.fixture
def container_cgroup() -> Iterator[Path]:
    """The container's cgroup, seen from the host; removed (bottom up) afterwards."""
    cg = Path(cgroup2_mount()) / f"machined-test-ct-{os.getpid()}"
    cg.mkdir()
    try:
        yield cg
    finally:
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        cg.rmdir()


def test_nspawn_registers_with_the_daemon_in_a_container(
        container_cgroup: Path, busybox_tree: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CG": cgroup2_mount(), "REPO": str(REPO), "WORK": str(tmp_path),
           "TREE": str(busybox_tree), "PAYLOAD": PAYLOAD}
    env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    script = tmp_path / "inner.sh"
    script.write_text(INNER)
    enter = (f"echo $$ > {shlex.quote(str(container_cgroup / 'cgroup.procs'))} && "
             f"exec unshare --cgroup --mount --pid --fork --mount-proc bash {script}")
    out = subprocess.run(["sh", "-c", enter], env=env, capture_output=True, text=True,
                         timeout=180).stdout
    log = (tmp_path / "machined.log").read_text() if (tmp_path / "machined.log").exists() else ""
    said = [line[3:] for line in out.splitlines() if line.startswith("@@ ")]
    assert said[-1:] == ["done"], f"{out}\n--- daemon:\n{log}"
    assert said == [
        "cgroup 0::/",  # the container sees its own cgroup as the root
        'unit s "machine-nested.scope"',
        "leader-cgroup 0::/machine.slice/machine-nested.scope/payload",
        "slice-left ",  # the scope and the slice went with the machine
        'unit s "nspawn-nested.service"',
        "done"], out
    # on the host, what the daemon made lived below the container's cgroup, and is gone
    assert [p.name for p in container_cgroup.iterdir() if p.is_dir()] == \
        ["nspawn-nested.service"]
