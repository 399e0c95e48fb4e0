"""systemd-nspawn --register=yes against the daemon (cgroupfs backend): CreateMachineWithNetwork
(no --keep-unit) and RegisterMachineWithNetwork (--keep-unit, the leader in the root cgroup), the
views machinectl/busctl/state files/cgroups give of the running container, and its clean removal
when the container exits by itself."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, wait_for

from .support import (
    Monitor,
    Nspawn,
    Processes,
    assert_machine_gone,
    assert_state_file,
    cgroup_of,
    cgroup_pids,
    list_machines,
    machine_path,
    machine_prop,
    machinectl,
    machinectl_show,
    mcall_data,
    method_calls,
    mirror_scope_dir,
    scope_dir,
    scope_name,
    unique_name,
    unit_link,
)

CREATE_METHODS = ("CreateMachine", "CreateMachineWithNetwork", "RegisterMachine",
                  "RegisterMachineWithNetwork")


@pytest.mark.usefixtures("need_nspawn")
@pytest.mark.parametrize("keep_unit", [False, True], ids=["create", "keep-unit"])
def test_nspawn_container_lifecycle(bus: BusDaemon, machined: Machined, monitor: Monitor,
                                    procs: Processes, busybox_tree: Path, tmp_path: Path,
                                    keep_unit: bool) -> None:
    name = unique_name("ns")
    unit = scope_name(name)
    path = machine_path(name)
    ct = Nspawn(bus, procs, busybox_tree, name, ["/bin/sleep", "6"], tmp_path,
                keep_unit=keep_unit)
    leader = ct.wait_registered()
    started = time.monotonic()
    assert leader not in (0, 1, ct.proc.pid)

    # nspawn picked the method we expect, and the daemon announced the machine.
    used = [m for m in CREATE_METHODS if method_calls(monitor, m)]
    assert used == ["RegisterMachineWithNetwork" if keep_unit else "CreateMachineWithNetwork"]
    assert monitor.wait_signal("MachineNew", lambda a: a[0] == name) == [name, path]

    # busctl ListMachines and machinectl list
    assert [name, "container", "systemd-nspawn", path] in list_machines(bus)
    listing = machinectl(bus, "list").stdout
    rows = [line.split() for line in listing.splitlines()]
    assert [name, "container", "systemd-nspawn"] in [r[:3] for r in rows], listing
    assert not any(r and r[0] == ".host" for r in rows), listing

    # machinectl status
    status = machinectl(bus, "status", name).stdout
    header = re.search(rf"^{re.escape(name)}\(([0-9a-f]{{32}})\)$", status, re.M)
    assert header, status
    machine_id = header.group(1)
    assert re.search(rf"^\s*Leader: {leader} \(sleep\)$", status, re.M), status
    assert re.search(rf"^\s*Unit: {re.escape(unit)}$", status, re.M), status
    assert re.search(rf"^\s*Root: {re.escape(str(busybox_tree))}$", status, re.M), status
    assert re.search(r"^\s*Service: systemd-nspawn; class container$", status, re.M), status

    # machinectl show
    show = machinectl_show(bus, name)
    assert show["Name"] == name
    assert show["Id"] == machine_id
    assert show["Class"] == "container"
    assert show["Service"] == "systemd-nspawn"
    assert show["Unit"] == unit
    assert show["Leader"] == str(leader)
    assert show["RootDirectory"] == str(busybox_tree)
    assert show["State"] == "running"
    assert "NetworkInterfaces" not in show  # no veth: empty, hidden by machinectl

    # the state file (§7.2) and the unit symlink
    data = assert_state_file(name, {
        "NAME": name, "SCOPE": unit, "SERVICE": "systemd-nspawn", "ROOT": str(busybox_tree),
        "ID": machine_id, "LEADER": str(leader), "CLASS": "container",
    })
    assert list(data) == ["NAME", "SCOPE", "SERVICE", "ROOT", "ID", "LEADER", "CLASS",
                          "REALTIME", "MONOTONIC"]
    assert int(data["REALTIME"]) == machine_prop(bus, name, "Timestamp")
    assert int(data["MONOTONIC"]) == machine_prop(bus, name, "TimestampMonotonic")
    assert os.readlink(unit_link(unit)) == name

    # the scope cgroup, with the leader inside (nspawn moves it on to payload/)
    scope = scope_dir(name)
    assert scope.is_dir()
    cg = cgroup_of(leader)
    assert cg == f"/machine.slice/{unit}" or cg.startswith(f"/machine.slice/{unit}/"), cg
    assert leader in cgroup_pids(scope)
    mirror = mirror_scope_dir(name)
    if mirror is not None:  # a hybrid host: nspawn mirrors its cgroup there
        assert mirror.is_dir()
    if keep_unit:
        # "my unit" of nspawn --keep-unit: it shares the scope it asked for
        assert ct.proc.pid in cgroup_pids(scope)
    else:
        assert ct.proc.pid not in cgroup_pids(scope)

    assert mcall_data(bus, "GetMachineByPID", "u", leader) == [path]
    assert time.monotonic() - started < 5.5, "the checks took too long for `sleep 6`"

    # The container exits by itself: the machine goes away within a second or two.
    assert ct.wait_exit(10) == 0, ct.output
    exited = time.monotonic()
    removed = monitor.wait_signal("MachineRemoved", lambda a: a[0] == name, timeout=2)
    assert removed == [name, path]
    wait_for(lambda: not scope.exists(), 2, what=f"{scope} to be removed")
    assert time.monotonic() - exited < 2.5
    assert_machine_gone(bus, name, unit)
    assert not (scope.parent / unit).exists()
    if mirror is not None:  # removed with the scope, as systemd removes it everywhere
        wait_for(lambda: not mirror.exists(), 2, what=f"{mirror} to be removed")
    # exactly one announcement each way
    assert monitor.signals("MachineNew").count([name, path]) == 1
    assert monitor.signals("MachineRemoved").count([name, path]) == 1

