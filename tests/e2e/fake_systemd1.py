"""python-dbusmock template: a fake org.freedesktop.systemd1 for the daemon's systemd1 backend.

Start it with `python -m dbusmock --system -t tests/e2e/fake_systemd1.py` on a private bus.

What it does, enough for machined's CreateMachine/Terminate/Kill/GC paths:
  * StartTransientUnit(name, mode, properties, aux) records the call (property names, variant
    signatures and values, in order), makes the scope cgroup in the cgroup2 hierarchy and moves
    the "PIDs" there, and returns a job path. The job finishes (JobRemoved(id, job, unit,
    result)) after a short delay ("auto" mode) or when the test calls FinishJob ("manual").
  * StopUnit kills the scope's processes (SIGTERM, SIGKILL after a while); the stop job finishes
    once the cgroup is empty: JobRemoved "done", ActiveState "inactive", UnitRemoved.
  * KillUnit signals every process of the scope; UnrefUnit, Subscribe only record the call.
  * Properties.Get of org.freedesktop.systemd1.Unit ActiveState on unit objects
    (/org/freedesktop/systemd1/unit/<escaped>) and of org.freedesktop.systemd1.Job State on job
    objects; a finished job gives org.freedesktop.DBus.Error.UnknownObject, an unknown unit
    org.freedesktop.systemd1.NoSuchUnit.
Test-only methods on org.freedesktop.DBus.Mock: GetCalls() -> s (JSON), SetJobMode(s mode),
SetStartResult(s result), SetJobDelay(u ms), SetStopReplyDelay(u ms), FinishJob(o job,
s result), PendingJobs() -> ao, SetUnitCallError(s name) (StopUnit and KillUnit answer that
error until it is set to "").
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import dbus
import dbus.service
from dbusmock import MOCK_IFACE
from gi.repository import GLib

from machined.core.names import bus_label_escape, bus_label_unescape
from machined.linux.cgroups import cgroup2_mount, slice_path

BUS_NAME = "org.freedesktop.systemd1"
MAIN_OBJ = "/org/freedesktop/systemd1"
MAIN_IFACE = "org.freedesktop.systemd1.Manager"
SYSTEM_BUS = True

UNIT_IFACE = "org.freedesktop.systemd1.Unit"
JOB_IFACE = "org.freedesktop.systemd1.Job"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
UNIT_PREFIX = MAIN_OBJ + "/unit"
JOB_PREFIX = MAIN_OBJ + "/job"
STOP_SIGKILL_MS = 1500

_BASIC = {
    dbus.Boolean: "b", dbus.Byte: "y", dbus.Int16: "n", dbus.UInt16: "q", dbus.Int32: "i",
    dbus.UInt32: "u", dbus.Int64: "x", dbus.UInt64: "t", dbus.Double: "d", dbus.String: "s",
    dbus.ObjectPath: "o", dbus.Signature: "g",
}


_MOUNT = cgroup2_mount()
assert _MOUNT is not None, "no cgroup2 hierarchy"
CGROOT = _MOUNT


def signature_of(value: Any) -> str:
    """The D-Bus signature of a value as dbus-python received it."""
    for cls, sig in _BASIC.items():
        if type(value) is cls:
            return sig
    if isinstance(value, dbus.Dictionary):
        return "a{" + str(value.signature) + "}"
    if isinstance(value, dbus.Array):
        return "a" + str(value.signature)
    if isinstance(value, dbus.Struct):
        return "(" + "".join(signature_of(v) for v in value) + ")"
    raise TypeError(f"cannot tell the signature of {value!r}")


def plain(value: Any) -> Any:
    """dbus-python values as JSON-able Python values."""
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, dbus.Dictionary):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, dbus.Array | dbus.Struct | list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def cgroup_pids(cg: str) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(CGROOT + cg):
        with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
            pids += [int(x) for x in f.read().split()]
    return pids


def remove_cgroup(cg: str) -> None:
    for dirpath, _dirs, _files in os.walk(CGROOT + cg, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _dbus_error(name: str, message: str) -> dbus.exceptions.DBusException:
    return dbus.exceptions.DBusException(message, name=name)


class UnitTree(dbus.service.FallbackObject):
    """Every object below /org/freedesktop/systemd1/unit."""

    # dbusmock replaces dbus-python's method lookup with one that looks here first
    methods: dict[str, Any] = {}
    interface = PROPS_IFACE

    def __init__(self, conn: Any, mock: Any) -> None:
        super().__init__(conn, UNIT_PREFIX)
        self.mock = mock

    @dbus.service.method(PROPS_IFACE, in_signature="ss", out_signature="v", rel_path_keyword="rel")
    def Get(self, interface: str, prop: str, rel: str = "") -> Any:  # noqa: N802
        unit = bus_label_unescape(rel.lstrip("/"))
        u = self.mock.units.get(unit)
        if u is None:
            raise _dbus_error("org.freedesktop.systemd1.NoSuchUnit", f"Unit {unit} not loaded.")
        if interface == UNIT_IFACE and prop == "ActiveState":
            return dbus.String(u["state"], variant_level=1)
        if interface == UNIT_IFACE and prop == "Id":
            return dbus.String(unit, variant_level=1)
        raise _dbus_error("org.freedesktop.DBus.Error.UnknownProperty",
                          f"Unknown interface {interface} or property {prop}.")

    @dbus.service.signal(PROPS_IFACE, signature="sa{sv}as", rel_path_keyword="rel_path")
    def PropertiesChanged(self, interface: str, changed: Any, invalidated: Any,  # noqa: N802
                          rel_path: str = "") -> None:
        pass


class JobTree(dbus.service.FallbackObject):
    """Every object below /org/freedesktop/systemd1/job."""

    # dbusmock replaces dbus-python's method lookup with one that looks here first
    methods: dict[str, Any] = {}
    interface = PROPS_IFACE

    def __init__(self, conn: Any, mock: Any) -> None:
        super().__init__(conn, JOB_PREFIX)
        self.mock = mock

    @dbus.service.method(PROPS_IFACE, in_signature="ss", out_signature="v", rel_path_keyword="rel")
    def Get(self, interface: str, prop: str, rel: str = "") -> Any:  # noqa: N802
        path = JOB_PREFIX + rel
        job = self.mock.jobs.get(path)
        if job is None:
            raise _dbus_error("org.freedesktop.DBus.Error.UnknownObject",
                              f"Unknown object '{path}'.")
        if interface == JOB_IFACE and prop == "State":
            return dbus.String("running", variant_level=1)
        raise _dbus_error("org.freedesktop.DBus.Error.UnknownProperty",
                          f"Unknown interface {interface} or property {prop}.")


def load(mock: Any, parameters: dict[str, Any]) -> None:
    mock.units = {}  # name -> {"cgroup", "state", "props"}
    mock.jobs = {}  # path -> {"id", "unit", "kind", "result"}
    mock.calls = []
    mock.next_job_id = 1
    mock.job_mode = str(parameters.get("job_mode", "auto"))
    mock.start_result = str(parameters.get("start_result", "done"))
    mock.job_delay_ms = int(parameters.get("job_delay_ms", 100))
    mock.stop_reply_delay_ms = int(parameters.get("stop_reply_delay_ms", 0))
    mock.unit_call_error = ""
    mock.unit_tree = UnitTree(mock.connection, mock)
    mock.job_tree = JobTree(mock.connection, mock)
    mock.AddProperties(MAIN_IFACE, {"Version": "252-e2e-fake"})
    GLib.timeout_add(100, lambda: _watch_units(mock) or True)


def _record(mock: Any, method: str, *args: Any) -> None:
    mock.calls.append({"method": method, "args": [plain(a) for a in args]})


def _new_job(mock: Any, unit: str, kind: str) -> str:
    job_id = mock.next_job_id
    mock.next_job_id += 1
    path = f"{JOB_PREFIX}/{job_id}"
    mock.jobs[path] = {"id": job_id, "unit": unit, "kind": kind}
    mock.EmitSignal(MAIN_IFACE, "JobNew", "uos", [job_id, path, unit])
    return path


def _finish_job(mock: Any, path: str, result: str) -> None:
    job = mock.jobs.pop(path, None)
    if job is None:
        return
    u = mock.units.get(job["unit"])
    if job["kind"] == "start" and u is not None and result != "done":
        _set_state(mock, job["unit"], "failed")
    mock.EmitSignal(MAIN_IFACE, "JobRemoved", "uoss", [job["id"], path, job["unit"], result])


def _set_state(mock: Any, unit: str, state: str) -> None:
    u = mock.units.get(unit)
    if u is None or u["state"] == state:
        return
    u["state"] = state
    mock.unit_tree.PropertiesChanged(UNIT_IFACE, dbus.Dictionary(
        {"ActiveState": dbus.String(state, variant_level=1)}, signature="sv"),
        dbus.Array([], signature="s"), rel_path="/" + bus_label_escape(unit))


def _drop_unit(mock: Any, unit: str) -> None:
    u = mock.units.pop(unit, None)
    if u is None:
        return
    remove_cgroup(u["cgroup"])
    mock.EmitSignal(MAIN_IFACE, "UnitRemoved", "so", [unit, f"{UNIT_PREFIX}/"
                                                            f"{bus_label_escape(unit)}"])


def _watch_units(mock: Any) -> None:
    """Like PID 1: a scope whose cgroup emptied is inactive and goes away, its stop job done."""
    for unit, u in list(mock.units.items()):
        if u["state"] in ("active", "deactivating") and not cgroup_pids(u["cgroup"]):
            if any(j["unit"] == unit and j["kind"] == "start" for j in mock.jobs.values()):
                continue
            for path, job in list(mock.jobs.items()):
                if job["unit"] == unit and job["kind"] == "stop":
                    _finish_job(mock, path, "done")
            _set_state(mock, unit, "inactive")
            _drop_unit(mock, unit)


@dbus.service.method(MAIN_IFACE, in_signature="ssa(sv)a(sa(sv))", out_signature="o")
def StartTransientUnit(self: Any, name: str, mode: str, properties: Any,  # noqa: N802
                       aux: Any) -> str:
    name = str(name)
    self.calls.append({
        "method": "StartTransientUnit",
        "args": [name, str(mode),
                 [[str(k), signature_of(v), plain(v)] for k, v in properties], plain(aux)],
    })
    if name in self.units:
        raise _dbus_error("org.freedesktop.systemd1.UnitExists", f"Unit {name} already exists.")
    props = {str(k): v for k, v in properties}
    cg = slice_path(str(props.get("Slice", "machine.slice"))) + "/" + name
    os.makedirs(CGROOT + cg, exist_ok=True)
    for pid in props.get("PIDs", []):
        try:
            with open(CGROOT + cg + "/cgroup.procs", "w") as f:
                f.write(str(int(pid)))
        except OSError as e:
            remove_cgroup(cg)
            raise _dbus_error("org.freedesktop.DBus.Error.Failed",
                              f"Failed to move PID {pid} into {cg}: {e}") from None
    self.units[name] = {"cgroup": cg, "state": "active", "props": props}
    self.EmitSignal(MAIN_IFACE, "UnitNew", "so", [name, f"{UNIT_PREFIX}/{bus_label_escape(name)}"])
    job = _new_job(self, name, "start")
    if self.job_mode == "auto":
        result = self.start_result
        GLib.timeout_add(self.job_delay_ms, lambda: _finish_job(self, job, result) or False)
    return job


@dbus.service.method(MAIN_IFACE, in_signature="ss", out_signature="o",
                     async_callbacks=("reply", "error"))
def StopUnit(self: Any, name: str, mode: str, reply: Any, error: Any) -> None:  # noqa: N802
    """Replies with the stop job, then SIGTERMs the scope (SIGKILL later), like PID 1. With
    SetStopReplyDelay(ms > 0) it kills first and replies only after that delay: a busy PID 1."""
    _record(self, "StopUnit", name, mode)
    name = str(name)
    if self.unit_call_error:
        error(_dbus_error(self.unit_call_error, "Refused by the test."))
        return
    u = self.units.get(name)
    if u is None:
        error(_dbus_error("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded."))
        return
    job = _new_job(self, name, "stop")
    _set_state(self, name, "deactivating")
    cg = u["cgroup"]

    def kill(signo: int) -> bool:
        for pid in cgroup_pids(cg):
            with contextlib.suppress(OSError):
                os.kill(pid, signo)
        return False

    if self.stop_reply_delay_ms:
        kill(signal.SIGTERM)
        GLib.timeout_add(self.stop_reply_delay_ms, lambda: reply(job) or False)
    else:
        reply(job)
        GLib.timeout_add(50, lambda: kill(signal.SIGTERM))
    GLib.timeout_add(STOP_SIGKILL_MS, lambda: kill(signal.SIGKILL))


@dbus.service.method(MAIN_IFACE, in_signature="ssi", out_signature="")
def KillUnit(self: Any, name: str, who: str, signo: int) -> None:  # noqa: N802
    _record(self, "KillUnit", name, who, signo)
    if self.unit_call_error:
        raise _dbus_error(self.unit_call_error, "Refused by the test.")
    u = self.units.get(str(name))
    if u is None:
        raise _dbus_error("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
    for pid in cgroup_pids(u["cgroup"]):
        with contextlib.suppress(OSError):
            os.kill(pid, int(signo))


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="")
def UnrefUnit(self: Any, name: str) -> None:  # noqa: N802
    _record(self, "UnrefUnit", name)


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="")
def Subscribe(self: Any) -> None:  # noqa: N802
    _record(self, "Subscribe")


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="s")
def GetCalls(self: Any) -> str:  # noqa: N802
    return json.dumps(self.calls)


@dbus.service.method(MOCK_IFACE, in_signature="s", out_signature="")
def SetJobMode(self: Any, mode: str) -> None:  # noqa: N802
    self.job_mode = str(mode)


@dbus.service.method(MOCK_IFACE, in_signature="s", out_signature="")
def SetStartResult(self: Any, result: str) -> None:  # noqa: N802
    self.start_result = str(result)


@dbus.service.method(MOCK_IFACE, in_signature="u", out_signature="")
def SetJobDelay(self: Any, ms: int) -> None:  # noqa: N802
    self.job_delay_ms = int(ms)


@dbus.service.method(MOCK_IFACE, in_signature="u", out_signature="")
def SetStopReplyDelay(self: Any, ms: int) -> None:  # noqa: N802
    self.stop_reply_delay_ms = int(ms)


@dbus.service.method(MOCK_IFACE, in_signature="s", out_signature="")
def SetUnitCallError(self: Any, name: str) -> None:  # noqa: N802
    self.unit_call_error = str(name)


@dbus.service.method(MOCK_IFACE, in_signature="os", out_signature="")
def FinishJob(self: Any, job: str, result: str) -> None:  # noqa: N802
    if str(job) not in self.jobs:
        raise _dbus_error("org.freedesktop.DBus.Error.UnknownObject", f"No job {job}")
    _finish_job(self, str(job), str(result))


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="ao")
def PendingJobs(self: Any) -> list[str]:  # noqa: N802
    return dbus.Array(sorted(self.jobs), signature="o")
