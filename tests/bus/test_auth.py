"""Who may do what (spec §4): sd-bus's privileged methods, polkit for the rest, the D-Bus policy.

polkit itself cannot run here; python-dbusmock's polkitd template stands in for it.
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl, cgroup2_mount, clean_state, wait_for
from tests.helpers.leaders import CgroupLeaders

DEST = "org.freedesktop.machine1"
PATH = "/org/freedesktop/machine1"
IFACE = "org.freedesktop.machine1.Manager"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "300"])
    yield p
    p.kill()
    p.wait()


def register(bus: BusDaemon, name: str, pid: int) -> None:
    busctl(bus, "call", DEST, PATH, IFACE, "RegisterMachine", "sayssus", name, "0", "test",
           "container", str(pid), "")


def test_privileged_methods_refused_by_sd_bus(machined: Machined, bus: BusDaemon) -> None:
    # sd-bus refuses these before looking at the arguments (dbus-send cannot write a(sv)).
    register_args = ["string:x", "array:byte:", "string:", "string:container", "uint32:0",
                     "string:"]
    for method, args in (("CreateMachine", register_args), ("RegisterMachine", register_args),
                         ("OpenMachinePTY", ["string:.host"])):
        out = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "dbus-send",
             "--system", "--print-reply", f"--dest={DEST}", PATH, f"{IFACE}.{method}", *args],
            env=bus.env(), capture_output=True, text=True)
        assert out.stderr.strip() == (f"Error org.freedesktop.DBus.Error.AccessDenied: Access to "
                                      f"{IFACE}.{method}() not permitted.")


# One connection, three registrations (a process of its own: registering its own child would
# move the caller into the machine's scope, as for `systemd-nspawn --keep-unit`).
REGISTER_THREE = """
import sys
from sdbus.sd_bus_internals import sd_bus_open_system
caller = sd_bus_open_system()
for i, pid in enumerate(sys.argv[1:]):
    msg = caller.new_method_call_message("org.freedesktop.machine1", "/org/freedesktop/machine1",
                                         "org.freedesktop.machine1.Manager", "RegisterMachine")
    msg.append_data("sayssus", f"once{i}", b"", "test", "container", int(pid), "")
    print(caller.call(msg).get_contents())
"""


def test_privileged_calls_ask_the_bus_for_credentials_once_per_connection(
        machined: Machined, bus: BusDaemon) -> None:
    """sd-bus would ask the bus driver for the caller's credentials on every privileged call;
    the daemon asks once per connection (a connection's credentials never change)."""
    leaders = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    monitor = subprocess.Popen(
        ["dbus-monitor", "--system", "--monitor", "destination='org.freedesktop.DBus'"],
        env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)  # the monitor is in place
        out = subprocess.run([sys.executable, "-c", REGISTER_THREE, *(str(p.pid) for p in leaders)],
                             env=bus.env(), capture_output=True, text=True, check=True, timeout=30)
        assert out.stdout.split() == [f"{PATH}/machine/once{i}" for i in range(3)]
        time.sleep(0.5)
    finally:
        monitor.terminate()
        seen, _ = monitor.communicate(timeout=10)
        for leader in leaders:
            leader.kill()
            leader.wait()
    # sd-bus itself asks with GetConnectionUnixUser, the daemon with GetConnectionCredentials
    asked = [line for line in seen.splitlines() if "member=GetConnection" in line]
    assert len(asked) == 1, seen


def test_no_polkit_denies_unprivileged(machined: Machined, bus: BusDaemon,
                                       sleeper: subprocess.Popen[bytes]) -> None:
    register(bus, "authct", sleeper.pid)
    for args in (["TerminateMachine", "s", "authct"], ["KillMachine", "ssi", "authct", "all", "0"],
                 ["KillMachine", "ssi", "authct", "all", "18"],
                 ["UnregisterMachine", "s", "authct"]):
        out = busctl(bus, "call", DEST, PATH, IFACE, *args, user="nobody", check=False)
        expected = "Invalid signal 0" if args[-1] == "0" else "Access denied"
        assert out.stderr.strip() == f"Call failed: {expected}", args
    assert sleeper.poll() is None
    busctl(bus, "call", DEST, PATH, IFACE, "GetMachine", "s", "authct", user="nobody")


@pytest.fixture
def polkit(bus: BusDaemon) -> Iterator[BusDaemon]:
    log = bus.dir / "polkit.calls"
    proc = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "-t", "polkitd",
                             "-l", str(log)], env=bus.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: busctl(bus, "status", "org.freedesktop.PolicyKit1",
                                check=False).returncode == 0, 15, what="mock polkitd")
        yield bus
    finally:
        proc.terminate()
        proc.wait()


def polkit_allow(bus: BusDaemon, *actions: str) -> None:
    busctl(bus, "call", "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
           "org.freedesktop.DBus.Mock", "SetAllowed", "as", str(len(actions)), *actions)


def test_polkit_decides_for_unprivileged(polkit: BusDaemon, sleeper: subprocess.Popen[bytes]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bus = polkit
    clean_state()
    d = Machined(bus, "--scope-backend=cgroupfs", "--stop-timeout=3")
    try:
        register(bus, "authct", sleeper.pid)
        out = busctl(bus, "call", DEST, PATH, IFACE, "KillMachine", "ssi", "authct", "all", "18",
                     user="nobody", check=False)
        assert out.stderr.strip() == "Call failed: Access denied"
        polkit_allow(bus, "org.freedesktop.machine1.manage-machines")
        busctl(bus, "call", DEST, PATH, IFACE, "KillMachine", "ssi", "authct", "all", "18",
               user="nobody")
        busctl(bus, "call", DEST, PATH, IFACE, "TerminateMachine", "s", "authct", user="nobody")
        wait_for(lambda: sleeper.poll() is not None, 10, what="the terminated leader to exit")
        calls = (bus.dir / "polkit.calls").read_text()
        assert "CheckAuthorization" in calls
        assert "org.freedesktop.machine1.manage-machines" in calls
        assert "terminate" in calls and "authct" in calls
        time.sleep(0.2)
    finally:
        d.stop()
        clean_state()
    assert not d.unexpected_errors()


def slow_polkit(bus: BusDaemon, authorized: bool, seconds: float = 2) -> None:
    """polkit answers CheckAuthorization only after `seconds`: time for the test to change
    things while the question is pending."""
    code = (f"import time; time.sleep({seconds}); ret = ({authorized}, False, {{}})")
    busctl(bus, "call", "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
           "org.freedesktop.DBus.Mock", "AddMethod", "sssss",
           "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization", "(sa{sv})sa{ss}us",
           "(bba{ss})", code)


def test_the_call_runs_again_once_polkit_answered(polkit: BusDaemon) -> None:
    """As 252's sd-bus: when polkit answers, the call is run again from the start. A machine
    unregistered meanwhile is no longer known (NoSuchMachine, whatever polkit said); one
    registered anew under the name is the one the call acts on."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bus = polkit
    clean_state()
    d = Machined(bus, "--scope-backend=cgroupfs", "--stop-timeout=3")
    leaders = CgroupLeaders()
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    log = bus.dir / "polkit.calls"
    try:
        first, second = (leaders.sleeper(slice_dir / f"pkrace-{i}.scope") for i in (1, 2))
        for authorized in (False, True):
            register(bus, "pkrace", first)
            slow_polkit(bus, authorized)
            asked = log.read_text().count("CheckAuthorization") if log.exists() else 0
            call = subprocess.Popen(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "busctl",
                 "--system", "call", DEST, PATH, IFACE, "UnregisterMachine", "s", "pkrace"],
                env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda a=asked: log.read_text().count("CheckAuthorization") > a, 10,
                     what="the question to reach polkit")
            busctl(bus, "call", DEST, PATH, IFACE, "UnregisterMachine", "s", "pkrace")
            if authorized:
                register(bus, "pkrace", second)
            _out, err = call.communicate(timeout=30)
            if authorized:  # the new machine went
                assert call.returncode == 0, err
                out = busctl(bus, "call", DEST, PATH, IFACE, "ListMachines")
                assert "pkrace" not in out.stdout
            else:
                assert err.strip() == "Call failed: No machine 'pkrace' known", err
    finally:
        d.stop()
        leaders.close()
        clean_state()
    assert not d.unexpected_errors()


def test_shipped_policy_filters_at_the_bus(system_bus: BusDaemon,
                                           sleeper: subprocess.Popen[bytes]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    clean_state()
    d = Machined(system_bus, "--scope-backend=cgroupfs")
    try:
        # allowed through the policy, then decided by the daemon
        busctl(system_bus, "call", DEST, PATH, IFACE, "ListMachines", user="nobody")
        busctl(system_bus, "introspect", DEST, PATH, user="nobody")
        # not in the policy: dbus-daemon refuses before machined sees it
        for args in (["CreateMachine", "sayssusa(sv)", "x", "0", "", "container", "0", "", "0"],
                     ["CopyToMachineWithFlags", "ssst", "x", "/a", "/b", "0"],
                     ["OpenMachineRootDirectory", "s", "x"]):
            out = busctl(system_bus, "call", DEST, PATH, IFACE, *args, user="nobody", check=False)
            assert out.returncode != 0 and "Access denied" in out.stderr, args
        out = busctl(system_bus, "set-property", DEST, "/org/freedesktop/LogControl1",
                     "org.freedesktop.LogControl1", "LogLevel", "s", "debug", user="nobody",
                     check=False)
        assert out.returncode != 0
        register(system_bus, "polct", sleeper.pid)
        out = busctl(system_bus, "call", DEST, PATH, IFACE, "TerminateMachine", "s", "polct",
                     user="nobody", check=False)
        assert out.stderr.strip() == "Call failed: Access denied"
    finally:
        d.stop()
        clean_state()
