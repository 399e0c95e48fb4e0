"""Helpers of the end-to-end tests: bus calls, a bus monitor, processes and cgroups we start,
the fake systemd1, state files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from machined.core.names import bus_label_escape
from machined.linux.cgroups import systemd_v1_mount
from tests.helpers.busdaemon import REPO, BusDaemon
from tests.helpers.client import DEST, MACHINE, MANAGER, MANAGER_PATH
from tests.helpers.daemon import (
    STATE_DIR,
    busctl,
    cgroup2_mount,
    remove_empty_cgroups,
    wait_for,
)
from tests.helpers.process import stop_process

SYSTEMD1 = "org.freedesktop.systemd1"
MOCK_IFACE = "org.freedesktop.DBus.Mock"
FAKE_SYSTEMD1_TEMPLATE = Path(__file__).with_name("fake_systemd1.py")

# Every machine of these tests has a name starting with this, so that teardown can find
# (and only find) our own scopes.
PREFIX = "e2e"

STATE_KEYS = ["NAME", "SCOPE", "SCOPE_JOB", "SERVICE", "ROOT", "ID", "LEADER", "CLASS",
              "REALTIME", "MONOTONIC", "NETIF"]


# ------------------------------------------------------------------------------ names
def machine_path(name: str) -> str:
    return f"{MANAGER_PATH}/machine/{bus_label_escape(name)}"


def scope_name(name: str) -> str:
    """machine-<unit-name-escaped name>.scope (only '-' needs escaping in valid names)."""
    return "machine-" + name.replace("-", "\\x2d") + ".scope"


def unique_name(tag: str) -> str:
    return f"{PREFIX}{tag}{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------------------ bus calls
def bjson(bus: BusDaemon, *args: str, timeout: float = 30) -> Any:
    """busctl --json=short ...; returns the "data" list of the reply."""
    out = busctl(bus, "--json=short", *args, timeout=timeout)
    return json.loads(out.stdout)["data"] if out.stdout.strip() else []


def mcall(bus: BusDaemon, method: str, signature: str = "", *args: Any,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    """A Manager method through busctl (the sender is busctl, never the test process)."""
    extra = [signature, *map(str, args)] if signature else []
    return busctl(bus, "--json=short", "call", DEST, MANAGER_PATH, MANAGER, method, *extra,
                  check=check)


def mcall_data(bus: BusDaemon, method: str, signature: str = "", *args: Any) -> Any:
    out = mcall(bus, method, signature, *args).stdout
    return json.loads(out)["data"] if out.strip() else []


def get_prop(bus: BusDaemon, path: str, iface: str, prop: str) -> Any:
    return bjson(bus, "get-property", DEST, path, iface, prop)


def machine_prop(bus: BusDaemon, name: str, prop: str) -> Any:
    return get_prop(bus, machine_path(name), MACHINE, prop)


def list_machines(bus: BusDaemon) -> list[list[str]]:
    return mcall_data(bus, "ListMachines")[0]


def machine_names(bus: BusDaemon) -> list[str]:
    return [m[0] for m in list_machines(bus)]


def create_args(name: str, leader: int, *, cls: str = "container", service: str = "e2e-test",
                root: str = "", machine_id: bytes = b"") -> list[str]:
    return [name, str(len(machine_id)), *(str(b) for b in machine_id), service, cls,
            str(leader), root]


def create_machine(bus: BusDaemon, name: str, leader: int, props: Iterable[str] = ("0",),
                   **kw: Any) -> str:
    """CreateMachine(name, id, service, class, leader, root, scope_properties)."""
    return str(mcall_data(bus, "CreateMachine", "sayssusa(sv)",
                          *create_args(name, leader, **kw), *props)[0])


def register_machine(bus: BusDaemon, name: str, leader: int,
                     netif: list[int] | None = None, **kw: Any) -> str:
    if netif is None:
        return str(mcall_data(bus, "RegisterMachine", "sayssus",
                              *create_args(name, leader, **kw))[0])
    return str(mcall_data(bus, "RegisterMachineWithNetwork", "sayssusai",
                          *create_args(name, leader, **kw), len(netif), *netif)[0])


def dbus_call_error(bus: BusDaemon, dest: str, path: str, iface: str, method: str,
                    signature: str, args: list[Any], timeout: float = 20) -> tuple[str, str]:
    """Call through dbus-python and return (error name, message); fails if the call succeeds.
    Only for calls where it does not matter that the sender is this process."""
    import dbus

    conn = dbus.bus.BusConnection(bus.address)
    try:
        conn.call_blocking(dest, path, iface, method, signature, args, timeout=timeout)
    except dbus.exceptions.DBusException as e:
        return e.get_dbus_name(), e.get_dbus_message()
    finally:
        conn.close()
    raise AssertionError(f"{method} unexpectedly succeeded")


# ------------------------------------------------------------------------------ monitor
class Monitor:
    """`busctl monitor` in the background; every message as a dict (busctl's JSON). With
    `matches`, only the messages one of those match rules takes (and sync()'s markers)."""

    SYNC = "type='signal',interface='org.e2e.Sync'"

    def __init__(self, bus: BusDaemon, *matches: str) -> None:
        self.bus = bus
        rules = [f"--match={rule}" for rule in (*matches, self.SYNC)] if matches else []
        self.proc = subprocess.Popen(
            ["busctl", "--system", "--json=short", "monitor", *rules], env=bus.env(),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.sync()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.messages.append(msg)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def sync(self, timeout: float = 10) -> None:
        """Emit a marker signal and wait until the monitor has seen it: everything sent on the
        bus before this call is then in `messages`."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        while True:
            busctl(self.bus, "emit", "/e2e/sync", "org.e2e.Sync", "Sync", "s", token)
            try:
                wait_for(lambda: any(m.get("member") == "Sync" and m["payload"]["data"] == [token]
                                     for m in self.snapshot()), 0.5, 0.02)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def signals(self, member: str, interface: str = MANAGER) -> list[list[Any]]:
        return [m["payload"]["data"] for m in self.snapshot()
                if m.get("type") == "signal" and m.get("member") == member
                and m.get("interface") == interface]

    def wait_signal(self, member: str, pred: Callable[[list[Any]], bool] = lambda _a: True,
                    interface: str = MANAGER, timeout: float = 10) -> list[Any]:
        found: list[list[Any]] = []

        def seen() -> bool:
            found[:] = [a for a in self.signals(member, interface) if pred(a)]
            return bool(found)

        wait_for(seen, timeout, what=f"signal {member}")
        return found[0]

    def stop(self) -> None:
        stop_process(self.proc, 5)
        self._thread.join(5)


# ------------------------------------------------------------------------------ processes
class Processes:
    """Processes a test started, each in a session of its own; all killed (whole process
    group) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.extra_pids: list[int] = []

    def spawn(self, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(args, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def sleeper(self, seconds: int = 60) -> subprocess.Popen[Any]:
        return self.spawn(["sleep", str(seconds)])

    def adopt(self, pid: int) -> None:
        """Also kill this PID at teardown (e.g. a container's PID 1)."""
        self.extra_pids.append(pid)

    def cleanup(self) -> None:
        # Containers' PID 1 first: their systemd-nspawn then exits by itself and releases its
        # lock files under /run/systemd/nspawn/locks, which a SIGKILLed nspawn leaves behind.
        for pid in self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        for p in self.procs:
            if self.extra_pids and isinstance(p.args, list) and p.args[0] == "systemd-nspawn":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] not in (b"Z", b"X")


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"PID {pid} has no cgroup2 line")


def scope_dir(name: str) -> Path:
    return Path(cgroup2_mount()) / "machine.slice" / scope_name(name)


def mirror_scope_dir(name: str) -> Path | None:
    """The scope's mirror in the name=systemd hierarchy of a hybrid host, where nspawn puts the
    container too; None on a host without that hierarchy."""
    mount = systemd_v1_mount()
    return Path(mount) / "machine.slice" / scope_name(name) if mount else None


def cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()]
    return pids


def kill_test_cgroups() -> None:
    """Kill whatever is left in scopes of our machines and remove those cgroups."""
    slice_dir = Path(cgroup2_mount()) / "machine.slice"
    if not slice_dir.exists():
        return
    for scope in slice_dir.glob(f"machine-{PREFIX}*.scope"):
        with contextlib.suppress(OSError):
            (scope / "cgroup.kill").write_text("1")
        with contextlib.suppress(AssertionError):
            wait_for(lambda s=scope: not cgroup_pids(s), 5)
        for dirpath, _dirs, _files in os.walk(scope, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
    with contextlib.suppress(OSError):
        slice_dir.rmdir()
    remove_empty_cgroups(systemd_v1_mount(), f"machine-{PREFIX}*.scope")


# ------------------------------------------------------------------------------ state files
def state_file(name: str) -> Path:
    return STATE_DIR / name


def state_items(name: str) -> list[tuple[str, str]]:
    lines = state_file(name).read_text().splitlines()
    assert lines[0] == "# This is private data. Do not parse.", lines
    return [(k, v) for k, _, v in (line.partition("=") for line in lines[1:] if line)]


def unit_link(unit: str) -> Path:
    return STATE_DIR / f"unit:{unit}"


def assert_state_file(name: str, expected: dict[str, str]) -> dict[str, str]:
    """The file has the §7.2 keys in §7.2 order, with at least these values."""
    items = state_items(name)
    keys = [k for k, _ in items]
    assert len(keys) == len(set(keys)), items
    assert all(k in STATE_KEYS for k in keys), items
    assert keys == sorted(keys, key=STATE_KEYS.index), items
    data = dict(items)
    for key, value in expected.items():
        assert data.get(key) == value, (key, items)
    assert ("REALTIME" in data) == ("MONOTONIC" in data)
    assert (state_file(name).stat().st_mode & 0o777) == 0o644
    return data


def assert_machine_gone(bus: BusDaemon, name: str, unit: str | None = None) -> None:
    assert name not in machine_names(bus)
    assert not state_file(name).exists()
    if unit:
        assert not unit_link(unit).is_symlink()
    out = mcall(bus, "GetMachine", "s", name, check=False)
    assert out.returncode != 0 and f"No machine '{name}' known" in out.stderr


# ------------------------------------------------------------------------------ fake systemd1
class FakeSystemd1:
    """python-dbusmock with tests/e2e/fake_systemd1.py, on the test bus."""

    def __init__(self, bus: BusDaemon, **parameters: Any) -> None:
        self.bus = bus
        self.log_path = bus.dir / f"fake-systemd1.{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        args = [sys.executable, "-m", "dbusmock", "--system", "-t", str(FAKE_SYSTEMD1_TEMPLATE)]
        if parameters:
            args += ["-p", json.dumps(parameters)]
        self.proc = subprocess.Popen(args, cwd=REPO, env=bus.env(), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._ready, 15, what="the fake systemd1 to own its name")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("fake systemd1 exited:\n" + self.log)
        out = busctl(self.bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                     "org.freedesktop.DBus", "NameHasOwner", "s", SYSTEMD1, check=False)
        return out.stdout.strip() == "b true"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def mock(self, method: str, signature: str = "", *args: Any) -> Any:
        extra = [signature, *map(str, args)] if signature else []
        return bjson(self.bus, "call", SYSTEMD1, "/org/freedesktop/systemd1", MOCK_IFACE,
                     method, *extra)

    def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        calls = json.loads(self.mock("GetCalls")[0])
        return [c for c in calls if method is None or c["method"] == method]

    def stop(self) -> None:
        stop_process(self.proc, 5)
        self._log.close()


# ------------------------------------------------------------------------------ containers
class Nspawn:
    """`systemd-nspawn --register=yes` of the busybox tree, in a session of its own (the
    Processes tracker kills its process group, and the container's PID 1, at teardown)."""

    def __init__(self, bus: BusDaemon, procs: Processes, tree: Path, name: str,
                 command: list[str], log_dir: Path, keep_unit: bool = False,
                 options: tuple[str, ...] = ()) -> None:
        self.bus = bus
        self.procs = procs
        self.name = name
        self.tree = tree
        args = ["systemd-nspawn", "-q", "--register=yes", "-D", str(tree), "-M", name]
        if keep_unit:
            args.append("--keep-unit")
        args.extend(options)
        self.log_path = log_dir / f"nspawn-{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = procs.spawn([*args, *command], env=bus.env(), stdout=log,
                                    stderr=subprocess.STDOUT)
        self.leader = 0

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_registered(self, timeout: float = 15) -> int:
        def registered() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nspawn exited with {self.proc.returncode}:\n"
                                     + self.output)
            return self.name in machine_names(self.bus)

        wait_for(registered, timeout, 0.05, f"machine {self.name} to be registered")
        self.leader = int(machine_prop(self.bus, self.name, "Leader"))
        self.procs.adopt(self.leader)

        def payload_started() -> bool:
            try:
                comm = Path(f"/proc/{self.leader}/comm").read_text().strip()
            except OSError:
                return True
            return comm != "systemd-nspawn"

        # nspawn registers before its child execs the payload
        wait_for(payload_started, timeout, 0.02, f"the payload of {self.name} to start")
        return self.leader

    def wait_exit(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"container {self.name} still runs after {timeout}s:\n"
                                 + self.output) from None


def machinectl(bus: BusDaemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["machinectl", "--no-pager", *args], env=bus.env(),
                          capture_output=True, text=True, check=check, timeout=30)


def machinectl_show(bus: BusDaemon, name: str) -> dict[str, str]:
    out = machinectl(bus, "show", name).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def method_calls(mon: Monitor, member: str, interface: str = MANAGER) -> list[list[Any]]:
    """Arguments of every call of member seen on the bus so far."""
    mon.sync()
    return [m["payload"]["data"] for m in mon.snapshot()
            if m.get("type") == "method_call" and m.get("member") == member
            and m.get("interface") == interface]
