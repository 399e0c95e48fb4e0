"""Error names and messages on the wire, as systemd-machined 252 sends them (spec §15)."""

import subprocess

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined, busctl

DEST = "org.freedesktop.machine1"
PATH = "/org/freedesktop/machine1"
IFACE = "org.freedesktop.machine1.Manager"


def call_error(bus: BusDaemon, method: str, sig: str = "", *args: str,
               path: str = PATH, iface: str = IFACE) -> str:
    """The `name: message` of a failed call (busctl --verbose-free, via dbus-send)."""
    out = subprocess.run(
        ["dbus-send", "--system", "--print-reply", f"--dest={DEST}", path,
         f"{iface}.{method}", *args], env=bus.env(), capture_output=True, text=True)
    assert out.returncode != 0, f"{method} succeeded: {out.stdout}"
    return out.stderr.strip().removeprefix("Error ")


CASES = [
    ("GetMachine", ["string:foo"], "org.freedesktop.machine1.NoSuchMachine: No machine 'foo' known"),
    ("GetMachine", ["string:"], "org.freedesktop.machine1.NoSuchMachine: No machine '' known"),
    ("GetMachineByPID", ["uint32:1"],
     "org.freedesktop.machine1.NoMachineForPID: PID 1 does not belong to any known machine"),
    ("GetMachineByPID", ["uint32:4294967295"], "org.freedesktop.DBus.Error.InvalidArgs: Invalid argument"),
    ("KillMachine", ["string:.host", "string:foo", "int32:15"],
     "org.freedesktop.DBus.Error.InvalidArgs: Invalid kill parameter 'foo'"),
    ("KillMachine", ["string:.host", "string:all", "int32:0"],
     "org.freedesktop.DBus.Error.InvalidArgs: Invalid signal 0"),
    ("KillMachine", ["string:.host", "string:all", "int32:65"],
     "org.freedesktop.DBus.Error.InvalidArgs: Invalid signal 65"),
    ("KillMachine", ["string:.host", "string:all", "int32:15"],
     "org.freedesktop.DBus.Error.NotSupported: Operation not supported"),
    ("KillMachine", ["string:nope", "string:foo", "int32:0"],
     "org.freedesktop.machine1.NoSuchMachine: No machine 'nope' known"),
    ("TerminateMachine", ["string:.host"],
     "org.freedesktop.DBus.Error.NotSupported: Operation not supported"),
    ("TerminateMachine", ["string:nope"], "org.freedesktop.machine1.NoSuchMachine: No machine 'nope' known"),
    ("UnregisterMachine", ["string:nope"], "org.freedesktop.machine1.NoSuchMachine: No machine 'nope' known"),
    ("Foo", [], "org.freedesktop.DBus.Error.UnknownMethod: Unknown method Foo or interface "
                "org.freedesktop.machine1.Manager."),
    ("GetMachine", ["int32:5"], "org.freedesktop.DBus.Error.InvalidArgs: Invalid arguments 'i' to "
                                "call org.freedesktop.machine1.Manager.GetMachine(), expecting 's'."),
    # the privileged methods, answered before sd-bus's dispatch (bus/privileged.py), say the same
    ("RegisterMachine", ["string:x"], "org.freedesktop.DBus.Error.InvalidArgs: Invalid arguments "
     "'s' to call org.freedesktop.machine1.Manager.RegisterMachine(), expecting 'sayssus'."),
    ("OpenMachinePTY", [], "org.freedesktop.DBus.Error.InvalidArgs: Invalid arguments '' to call "
                           "org.freedesktop.machine1.Manager.OpenMachinePTY(), expecting 's'."),
]


@pytest.mark.parametrize("method,args,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_catalogue(machined: Machined, bus: BusDaemon, method: str, args: list[str],
                   expected: str) -> None:
    assert call_error(bus, method, "", *args) == expected


CREATE_CASES = [
    (dict(name="bad_name"), "Invalid machine name"),
    (dict(name="-bad"), "Invalid machine name"),
    (dict(name="x" * 65), "Invalid machine name"),
    (dict(name=".host"), "Invalid machine name"),
    (dict(ident=["3", "1", "2", "3"]), "Invalid machine ID parameter"),
    (dict(cls="host"), "Invalid machine class parameter"),
    (dict(cls="foo"), "Invalid machine class parameter"),
    (dict(leader="1"), "Invalid leader PID"),
    (dict(root="rel/dir"), "Root directory must be empty or an absolute path"),
]


@pytest.mark.parametrize("kw,message", CREATE_CASES)
def test_create_and_register_validation(machined: Machined, bus: BusDaemon,
                                        kw: dict[str, object], message: str) -> None:
    a: dict[str, object] = {"name": "ct", "ident": ["0"], "cls": "container", "leader": "0",
                            "root": "", **kw}
    values = [a["name"], *a["ident"], "svc", a["cls"], a["leader"], a["root"]]  # type: ignore[misc]
    for method, sig, extra in (("CreateMachine", "sayssusa(sv)", ["0"]),
                               ("RegisterMachine", "sayssus", [])):
        out = busctl(bus, "call", "--", DEST, PATH, IFACE, method, sig, *map(str, values), *extra,
                     check=False)
        assert out.returncode != 0
        assert out.stderr.strip() == f"Call failed: {message}"


def test_network_indices_validated(machined: Machined, bus: BusDaemon) -> None:
    for bad in ("0", "-3"):
        out = busctl(bus, "call", "--", DEST, PATH, IFACE, "RegisterMachineWithNetwork", "sayssusai",
                     "ct", "0", "svc", "container", "0", "", "2", "5", bad, check=False)
        assert out.stderr.strip() == f"Call failed: Invalid network interface index {bad}"


def test_register_errors_from_cgroup_lookup(machined: Machined, bus: BusDaemon) -> None:
    out = busctl(bus, "call", DEST, PATH, IFACE, "RegisterMachine", "sayssus", "ct", "0", "svc",
                 "container", "999999", "", check=False)
    assert out.stderr.strip() == ("Call failed: Failed to determine unit of process 999999 : "
                                  "No such process")
    assert call_error(bus, "GetMachine", "", "string:ct").endswith("No machine 'ct' known")


def test_unknown_object_property_and_readonly(machined: Machined, bus: BusDaemon) -> None:
    assert call_error(bus, "Get", "", "string:org.freedesktop.machine1.Machine", "string:Name",
                      path="/org/freedesktop/machine1/machine/nope",
                      iface="org.freedesktop.DBus.Properties") == (
        "org.freedesktop.DBus.Error.UnknownObject: Unknown object "
        "'/org/freedesktop/machine1/machine/nope'.")
    assert call_error(bus, "Get", "", "string:org.freedesktop.machine1.Machine", "string:Foo",
                      path="/org/freedesktop/machine1/machine/_2ehost",
                      iface="org.freedesktop.DBus.Properties") == (
        "org.freedesktop.DBus.Error.UnknownProperty: Unknown interface "
        "org.freedesktop.machine1.Machine or property Foo.")
    assert call_error(bus, "GetAll", "", "string:org.freedesktop.Foo",
                      path="/org/freedesktop/machine1/machine/_2ehost",
                      iface="org.freedesktop.DBus.Properties") == (
        "org.freedesktop.DBus.Error.UnknownInterface: Unknown interface 'org.freedesktop.Foo'.")
    assert call_error(bus, "Set", "", "string:org.freedesktop.machine1.Machine", "string:Name",
                      "variant:string:x", path="/org/freedesktop/machine1/machine/_2ehost",
                      iface="org.freedesktop.DBus.Properties") == (
        "org.freedesktop.DBus.Error.PropertyReadOnly: Property 'Name' is not writable.")



def test_unregister_host_succeeds(machined: Machined, bus: BusDaemon) -> None:
    busctl(bus, "call", DEST, PATH, IFACE, "UnregisterMachine", "s", ".host")
    busctl(bus, "call", DEST, PATH, IFACE, "GetMachine", "s", ".host")


def test_daemon_keeps_serving_after_bad_calls(machined: Machined, bus: BusDaemon) -> None:
    for _ in range(3):
        call_error(bus, "KillMachine", "", "string:.host", "string:x", "int32:99")
        call_error(bus, "CreateMachine", "", "string:x")
    out = busctl(bus, "call", DEST, PATH, IFACE, "ListMachines")
    assert '".host"' in out.stdout
