"""The real 252 decides: the same calls, in the same order, to systemd's machined 252 and to ours,
each on a private bus of its own with the same machines registered and the same image pool, must
get the same answers (error names and messages word for word, or the same results).

Left out on purpose, where ours does more than 252 can here (docs/compatibility.md): calls that
252 answers by asking org.freedesktop.systemd1, which is not on these buses (CreateMachine that
passes validation, TerminateMachine and KillMachine of a registered machine, who="all"), and
calls that act inside a machine whose leader runs in the host's namespaces (shells, copies, bind
mounts, PTYs), which are only made with arguments that fail before they act.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sdbus.sd_bus_internals import SdBus, SdBusBaseError

from machined.bus.client import remote_error
from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import DEST, RawClient, connect, outcome
from tests.helpers.client import IMAGE as IMG
from tests.helpers.client import MACHINE as MACH
from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.client import PROPERTIES as PROPS
from tests.helpers.daemon import cgroup2_mount, wait_for
from tests.helpers.leaders import CgroupLeaders
from tests.helpers.real252 import (
    REAL_MACHINED,
    STATE_DIR,
    difference,
    host_dirs,
    map_strings,
    side_by_side,
    without_times,
)

from .support import Monitor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, mounts)")

ID16 = bytes(range(1, 17))
NO_PID = 4_000_000  # above any pid_max: no such process
# paths that exist nowhere: calls that get past their checks find nothing to copy or mount
NO_A, NO_B = "/nonexistent-difftest/a", "/nonexistent-difftest/b"

# (name, class) registered with both daemons at the start
MACHINES = [("difft", "container"), ("difft-vm", "vm")]


def make_pool(root: Path) -> Path:
    """The same pool for both daemons: a directory image with os-release and hostname, an
    empty one and a hidden one."""
    pool = root / "var/lib/machines"
    for name, files in (("diffimg", {"etc/os-release": "ID=difftest\nNAME=Diff\n",
                                     "etc/hostname": "diffhost\n",
                                     "etc/machine-info": "PRETTY_HOSTNAME=Diff\n"}),
                        ("diffempty", {}), (".diffhidden", {})):
        image = pool / name
        image.mkdir(parents=True)
        for rel, text in files.items():
            (image / rel).parent.mkdir(parents=True, exist_ok=True)
            (image / rel).write_text(text)
    return pool


def cases(leaders: dict[str, int]) -> list[tuple[str, str, str, str, tuple[Any, ...]]]:
    """(path, interface, member, signature, arguments), in the order they are made; `leaders`
    are the PIDs of the fixture's processes by role."""
    L = leaders
    mpath = f"{M}/machine/difft"
    long_name = "x" * 65
    c: list[tuple[str, str, str, str, tuple[Any, ...]]] = []

    def mgr(member: str, sig: str = "", *args: Any) -> None:
        c.append((M, MGR, member, sig, args))

    # lookups
    for name in ("difft", "difft-vm", ".host", "", "nope", long_name, "a/b", "-x", "difft."):
        mgr("GetMachine", "s", name)
    for pid in (L["difft"], L["difft-vm"], L["free"], L["nounit"], L["difft-other"],
                L["difft-below"], 1, 0, NO_PID, 2**31, 2**32 - 1):
        mgr("GetMachineByPID", "u", pid)
    mgr("ListMachines")
    # registration: every check, in 252's order, each failing before anything is made
    reg = ("difft-new", b"", "test", "container", L["free"], "/")
    invalid: list[tuple[Any, ...]] = [
        ("",) + reg[1:], (long_name,) + reg[1:], ("a/b",) + reg[1:], (".host",) + reg[1:],
        ("-x",) + reg[1:], ("a..b",) + reg[1:],
        reg[:1] + (b"12345",) + reg[2:], reg[:1] + (bytes(15),) + reg[2:],
        reg[:3] + ("bogus",) + reg[4:], reg[:3] + ("host",) + reg[4:],
        reg[:3] + ("Container",) + reg[4:],
        reg[:4] + (1,) + reg[5:], reg[:5] + ("relative",), reg[:5] + ("rel/../x",),
        ("difft",) + reg[1:], ("bogus name!",) + reg[1:3] + ("bogus",) + reg[4:],
        ("difft",) + reg[1:4] + (1,) + reg[5:], reg[:1] + (b"1",) + reg[2:3] + ("bogus",) + reg[4:],
    ]
    for v in invalid:
        mgr("RegisterMachine", "sayssus", *v)
        mgr("CreateMachine", "sayssusa(sv)", *v, [])
        mgr("CreateMachineWithNetwork", "sayssusaia(sv)", *v, [-1], [])
    mgr("RegisterMachine", "sayssus", *reg[:4], NO_PID, "/")
    # the privileged members on other objects and interfaces (ours takes their calls by member)
    for path, iface in ((mpath, MGR), (M, MACH), (f"{M}/machine/_2ehost", MGR),
                        (f"{M}/nonexistent", MGR)):
        c.append((path, iface, "RegisterMachine", "sayssus", reg))
        c.append((path, iface, "CreateMachine", "sayssusa(sv)", (*reg, [])))
        c.append((path, iface, "OpenMachinePTY", "s", ("difft",)))
    mgr("RegisterMachine", "sayssus", "difft-kthread", *reg[1:4], 2, "")  # kthreadd: no unit
    for ifindices in ([-3], [0], [1, -1]):
        mgr("RegisterMachineWithNetwork", "sayssusai", *reg, ifindices)
    mgr("RegisterMachineWithNetwork", "sayssusai", *reg[:4], 1, "/", [2**31 - 1])
    mgr("CreateMachine", "sayssusa(sv)", *reg[:5], "relative", [("Bogus", ("s", "x"))])
    # registrations that work, seen from every side, and taken back
    mgr("RegisterMachine", "sayssus", "x" * 64, b"", "", "container", L["free2"], "")
    mgr("UnregisterMachine", "s", "x" * 64)
    mgr("RegisterMachine", "sayssus", "difft-new", ID16, "unit-test", "vm", L["free"], "/srv")
    mgr("GetMachine", "s", "difft-new")
    mgr("GetMachineByPID", "u", L["free"])
    mgr("ListMachines")
    c.append((f"{M}/machine/difft_2dnew", PROPS, "GetAll", "s", (MACH,)))
    mgr("RegisterMachine", "sayssus", "difft-new", b"", "", "container", L["free2"], "/")
    mgr("RegisterMachine", "sayssus", "difft-new2", b"", "", "container", L["free"], "/")
    mgr("GetMachine", "s", "difft-new2")
    mgr("UnregisterMachine", "s", "difft-new")
    mgr("UnregisterMachine", "s", "difft-new")
    mgr("GetMachine", "s", "difft-new")
    mgr("RegisterMachineWithNetwork", "sayssusai", "difft-net", bytes(16), "", "vm", L["free"],
        "", [7, 3])
    c.append((f"{M}/machine/difft_2dnet", PROPS, "GetAll", "s", (MACH,)))
    mgr("UnregisterMachine", "s", "difft-net")
    # any spelling of a name finds its object (hex digits in either case, escaped letters, the
    # label cut at an escaped NUL)
    for label in ("_64ifft", "dif_66t", "difft_00", "difft_00junk", "dif_46t", "DIFFT", "_2Ehost"):
        c.append((f"{M}/machine/{label}", PROPS, "Get", "ss", (MACH, "Name")))
    for label in ("diff_69mg", "_64iffimg", "diffimg_00", "diff_49mg"):
        c.append((f"{M}/image/{label}", PROPS, "Get", "ss", (IMG, "Name")))
    # the other machine-wide calls, with what fails before they act
    for name in ("nope", ""):
        for member, sig, rest in (
                ("UnregisterMachine", "s", ()), ("TerminateMachine", "s", ()),
                ("KillMachine", "ssi", ("all", 15)), ("GetMachineAddresses", "s", ()),
                ("GetMachineOSRelease", "s", ()), ("OpenMachinePTY", "s", ()),
                ("OpenMachineLogin", "s", ()),
                ("OpenMachineShell", "sssasas", ("", "", [], [])),
                ("BindMountMachine", "sssbb", (NO_A, NO_B, False, False)),
                ("CopyFromMachine", "sss", (NO_A, NO_B)), ("CopyToMachine", "sss", (NO_A, NO_B)),
                ("CopyFromMachineWithFlags", "ssst", (NO_A, NO_B, 0)),
                ("CopyToMachineWithFlags", "ssst", (NO_A, NO_B, 0)),
                ("OpenMachineRootDirectory", "s", ()), ("GetMachineUIDShift", "s", ()),
                ("MapFromMachineUser", "su", (0,)), ("MapFromMachineGroup", "su", (0,))):
            mgr(member, sig, name, *rest)
    for who, signo in (("foo", 15), ("all", 0), ("all", 65), ("leader", -1), ("", 0)):
        mgr("KillMachine", "ssi", "difft", who, signo)
    mgr("KillMachine", "ssi", ".host", "all", 15)
    mgr("TerminateMachine", "s", ".host")
    mgr("GetMachineUIDShift", "s", "difft")
    mgr("GetMachineUIDShift", "s", "difft-vm")
    mgr("GetMachineAddresses", "s", "difft-vm")
    mgr("GetMachineOSRelease", "s", "difft-vm")
    for src, dst in (("rel", NO_B), (NO_A, "rel"), ("", NO_B), (NO_A, "")):
        mgr("BindMountMachine", "sssbb", "difft", src, dst, False, False)
        mgr("CopyFromMachine", "sss", "difft", src, dst)
        mgr("CopyToMachine", "sss", "difft", src, dst)
    for flags in (1, 2, 2**63):
        mgr("CopyToMachineWithFlags", "ssst", "difft", NO_A, NO_B, flags)
    mgr("BindMountMachine", "sssbb", "difft-vm", NO_A, NO_B, False, False)
    mgr("CopyFromMachine", "sss", "difft-vm", NO_A, NO_B)
    mgr("OpenMachineShell", "sssasas", "difft", "root", "relative", [], [])
    mgr("OpenMachineShell", "sssasas", "difft", "", "", [], ["NOEQUALS"])
    mgr("OpenMachinePTY", "s", "difft-vm")
    mgr("OpenMachineLogin", "s", "difft-vm")
    mgr("OpenMachineShell", "sssasas", "difft-vm", "", "", [], [])
    mgr("OpenMachineRootDirectory", "s", "difft-vm")
    for uid in (0, 1000, 2**32 - 1):
        mgr("MapFromMachineUser", "su", "difft", uid)
        mgr("MapFromMachineGroup", "su", "difft", uid)
        mgr("MapToMachineUser", "u", uid)
        mgr("MapToMachineGroup", "u", uid)
    # a machine's own object, and objects that are not there
    for member, sig, args in (("Kill", "si", ("foo", 15)), ("Kill", "si", ("all", 0)),
                              ("GetUIDShift", "", ()), ("BindMount", "ssbb", ("rel", NO_B, False, False)),
                              ("CopyFrom", "ss", ("rel", NO_B)), ("CopyTo", "ss", (NO_A, "rel"))):
        c.append((mpath, MACH, member, sig, args))
    c.append((mpath, PROPS, "Get", "ss", (MACH, "Name")))
    c.append((mpath, PROPS, "Get", "ss", (MACH, "Nope")))
    c.append((mpath, PROPS, "Get", "ss", ("org.example.Nope", "Name")))
    c.append((mpath, PROPS, "Set", "ssv", (MACH, "Name", ("s", "x"))))
    c.append((mpath, MACH, "Nope", "", ()))
    for path in (f"{M}/machine/nope", f"{M}/machine/_2ehost", f"{M}/machine", f"{M}/nope",
                 f"{M}/image/nope"):
        c.append((path, PROPS, "GetAll", "s", (MACH,)))
        c.append((path, MACH, "Terminate", "", ()))
    c.append((f"{M}/machine/_2ehost", PROPS, "Get", "ss", (MACH, "Class")))
    mgr("Nope")
    mgr("GetMachine", "i", 5)
    mgr("GetMachine", "ss", "a", "b")
    c.append((M, PROPS, "Get", "ss", (MGR, "PoolPath")))
    c.append((M, PROPS, "Get", "ss", (MGR, "Nope")))
    # images: lookups, metadata and what each check refuses
    for name in ("diffimg", "diffempty", "nope", "", ".", "..", "a/b", ".#tmp", "x" * 256,
                 ".host"):
        mgr("GetImage", "s", name)
    for member in ("GetImageHostname", "GetImageMachineID", "GetImageMachineInfo",
                   "GetImageOSRelease"):
        for name in ("diffimg", "diffempty", "nope", "a/b"):
            mgr(member, "s", name)
    image_calls: list[tuple[str, str, tuple[Any, ...]]] = [
        ("RemoveImage", "s", ("nope",)), ("RemoveImage", "s", ("a/b",)),
        ("RenameImage", "ss", ("nope", "x")), ("RenameImage", "ss", ("diffimg", "a/b")),
        ("RenameImage", "ss", ("diffimg", "diffempty")),
        ("CloneImage", "ssb", ("nope", "x", False)), ("CloneImage", "ssb", ("diffimg", "", False)),
        ("CloneImage", "ssb", ("diffimg", "diffempty", False)),
        ("MarkImageReadOnly", "sb", ("nope", True)), ("SetImageLimit", "st", ("nope", 1)),
        ("SetImageLimit", "st", ("diffimg", 2**64 - 1)),
        ("CleanPool", "s", ("bogus",)), ("CleanPool", "s", ("",)),
    ]
    for member, sig, image_args in image_calls:
        mgr(member, sig, *image_args)
    ipath = f"{M}/image/diffimg"
    for prop in ("Name", "Path", "Type", "ReadOnly", "Usage", "Limit", "UsageExclusive",
                 "LimitExclusive", "Nope"):
        c.append((ipath, PROPS, "Get", "ss", (IMG, prop)))
    c.append((ipath, IMG, "GetHostname", "", ()))
    c.append((ipath, IMG, "GetOSRelease", "", ()))
    c.append((ipath, IMG, "Rename", "s", ("a/b",)))
    c.append((ipath, IMG, "Clone", "sb", ("..", False)))
    c.append((f"{M}/image/nope", IMG, "GetHostname", "", ()))
    # changes that work, each daemon on its own copy of the pool
    def image_property(image: str, name: str) -> None:
        c.append((f"{M}/image/{image}", PROPS, "Get", "ss", (IMG, name)))

    mgr("RenameImage", "ss", "diffempty", "diffempty2")
    mgr("GetImage", "s", "diffempty")
    mgr("GetImage", "s", "diffempty2")
    mgr("MarkImageReadOnly", "sb", "diffimg", True)
    image_property("diffimg", "ReadOnly")
    mgr("MarkImageReadOnly", "sb", "diffimg", False)
    mgr("CloneImage", "ssb", "diffimg", "diffclone", True)
    image_property("diffclone", "ReadOnly")
    mgr("GetImageOSRelease", "s", "diffclone")
    mgr("RemoveImage", "s", "diffclone")
    mgr("RemoveImage", "s", "diffclone")
    mgr("RenameImage", "ss", "diffimg", "diffimg2")
    mgr("GetImageHostname", "s", "diffimg2")
    image_property("diffimg2", "Name")
    mgr("RemoveImage", "s", "diffempty2")
    mgr("RemoveImage", "s", "diffimg2")
    mgr("GetImage", "s", "diffimg2")
    # LogControl1: bad values (refused with their message, or the access check first) and a
    # wrong value type; the good ones are test_log_control_as_252s's
    lc, lci = "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1"
    for prop, value in (("LogLevel", ("s", "bogus")), ("LogTarget", ("s", "")),
                        ("LogLevel", ("u", 7)), ("SyslogIdentifier", ("s", "x")),
                        ("Nope", ("s", "x"))):
        c.append((lc, PROPS, "Set", "ssv", (lci, prop, value)))
    return c


def normal(result: tuple[str, Any], member: str, root: str = "") -> tuple[str, Any]:
    """What has to be equal: lists that 252 gives in hash order are compared sorted, a
    registration's times are each daemon's own, and ours finds the pool under `root`
    (--image-root) where 252 has it bind-mounted over /var/lib/machines."""
    kind, value = result
    if kind != "ok":
        return result
    if root:
        value = map_strings(value, lambda v: v.removeprefix(root))
    if member == "ListMachines":
        return kind, sorted(value[0])
    if member == "ListImages":  # without the times: each daemon has its own copy of the pool
        return kind, sorted((*i[:3], *i[5:]) for i in value[0])
    if member == "GetAll" and value and isinstance(value[0], dict):
        return kind, {k: v for k, v in value[0].items()
                      if k not in ("Timestamp", "TimestampMonotonic")}
    return kind, value


@dataclass
class Pair:
    real: SdBus
    ours: SdBus
    buses: dict[str, BusDaemon]
    ours_root: str  # ours' --image-root
    real_state: Path  # 252's /run/systemd/machines, in its mount namespace
    leaders: dict[str, int]  # PIDs by role (see pair())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if not os.path.exists(REAL_MACHINED):
        pytest.fail(f"{REAL_MACHINED} is missing: the set-up installs systemd-container")
    root = Path(cgroup2_mount())
    slice_dir = root / "machine.slice"
    leaders = CgroupLeaders()
    pools = {who: make_pool(tmp_path_factory.mktemp(f"pool-{who}")) for who in ("real", "ours")}
    ours_root = str(pools["ours"].parents[2])
    with host_dirs(slice_dir):
        try:
            pids = {role: leaders.sleeper(slice_dir / f"difftest-{i}.scope")
                    for i, role in enumerate(["difft", "difft-vm", "free", "free2"])}
            pids["nounit"] = leaders.sleeper(root / "difftest-nounit")
            # not leaders: another process of difft's scope, and one in a cgroup below it
            pids["difft-other"] = leaders.sleeper(slice_dir / "difftest-0.scope")
            pids["difft-below"] = leaders.sleeper(slice_dir / "difftest-0.scope/payload")
            leaders.track(slice_dir / "machine-difft\\x2dnounit.scope")  # ours makes it
            with side_by_side("--scope-backend=cgroupfs", f"--image-root={ours_root}",
                              pool=pools["real"]) as two:
                assert two.real is not None and two.real_bus is not None
                buses = {"real": two.real_bus, "ours": two.ours_bus}
                conns = {who: connect(bus) for who, bus in buses.items()}
                for conn in conns.values():
                    for name, cls in MACHINES:
                        got = outcome(conn, M, MGR, "RegisterMachine", "sayssus", name, b"",
                                      "test", cls, pids[name], "/")
                        assert got[0] == "ok", got
                yield Pair(conns["real"], conns["ours"], buses, ours_root,
                           Path(f"/proc/{two.real.proc.pid}/root{STATE_DIR}"), pids)
        finally:
            leaders.close()


MACHINECTL = [
    ["list"], ["list", "--all"], ["list", "--output=json"], ["list", "--no-legend"],
    ["status", "difft"], ["status", "difft-vm", "difft"], ["status", ".host"], ["status", "nope"],
    ["show", "difft"], ["show", "--all", "difft-vm"], ["show", "-p", "Name,Leader", "difft"],
    ["show"], ["show", "nope"],
    ["list-images"], ["list-images", "--all"], ["list-images", "--output=json"],
    ["image-status", "diffimg"], ["image-status", "nope"], ["show-image", "diffimg"],
    ["show-image"], ["show-image", "nope"],
    ["terminate", "nope"], ["poweroff", "nope"], ["reboot", "nope"], ["kill", "nope"],
    ["kill", "--signal=0", "difft"], ["kill", "--kill-whom=foo", "difft"],
    ["terminate", ".host"], ["login", "nope"], ["shell", "nope"], ["bind", "nope", "/x"],
    ["copy-to", "nope", "/x"], ["copy-from", "difft-vm", "/x", "/tmp/x"],
    ["remove", "nope"], ["rename", "nope", "x"], ["rename", "diffimg", "a/b"],
    ["clone", "nope", "x"], ["read-only", "nope"], ["set-limit", "nope", "1G"],
    ["clean"], ["list-images", "--all"], ["bogus-verb"],
]


def test_machinectl_sees_what_it_sees_with_252(pair: Pair) -> None:
    """The unchanged machinectl, verb by verb, against each daemon: the same output, once the
    times of day (each daemon's own registration) and ours' pool root are taken out."""
    differ = []
    for verb in MACHINECTL:
        seen = {}
        for who, bus in pair.buses.items():
            out = subprocess.run(["machinectl", "--no-pager", *verb], env=bus.env(),
                                 capture_output=True, text=True, timeout=30)
            text = f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
            if who == "ours":
                text = text.replace(pair.ours_root, "")
            seen[who] = without_times(text)
        if seen["real"] != seen["ours"]:
            differ.append(f"machinectl {' '.join(verb)}\n--- 252:\n{seen['real']}\n"
                          f"--- ours:\n{seen['ours']}")
    assert not differ, "\n".join(differ)


def _methods(conn: SdBus, path: str) -> list[tuple[str, str, str]]:
    """(interface, member, input signature) of every method 252 introspects at path."""
    kind, (xml,) = outcome(conn, path, "org.freedesktop.DBus.Introspectable", "Introspect")
    assert kind == "ok", xml
    return [(iface.get("name", ""), m.get("name", ""),
             "".join(a.get("type", "") for a in m.iter("arg") if a.get("direction") != "out"))
            for iface in ET.fromstring(xml).iter("interface") for m in iface.iter("method")]


def _introspection(conn: SdBus, path: str) -> str:
    kind, (xml,) = outcome(conn, path, "org.freedesktop.DBus.Introspectable", "Introspect")
    assert kind == "ok", xml
    return str(xml)


def test_introspection_as_252s(pair: Pair) -> None:
    """The introspection data, byte for byte: the standard interfaces, the DOCTYPE, the members
    in 252's order, the child nodes."""
    for path in (M, f"{M}/machine/difft", f"{M}/machine/_2ehost", f"{M}/image/diffimg"):
        real, ours = (_introspection(conn, path) for conn in (pair.real, pair.ours))
        assert ours == real, path


def test_every_method_refuses_a_wrong_signature_as_252(pair: Pair) -> None:
    """Every method of every object kind, called with a signature none of them takes (sd-bus
    answers org.freedesktop.DBus.Peer whatever the arguments, in both)."""
    differ = []
    for path in (M, f"{M}/machine/difft", f"{M}/machine/_2ehost", f"{M}/image/diffimg"):
        methods = _methods(pair.real, path)
        assert methods == _methods(pair.ours, path)
        for iface, member, _sig in methods:
            real, ours = (outcome(conn, path, iface, member, "x", 42)
                          for conn in (pair.real, pair.ours))
            if real != ours or (real[0] != "error" and iface != "org.freedesktop.DBus.Peer"):
                differ.append(difference(f"{path} {iface}.{member}", real, ours))
    assert not differ, "\n".join(differ)


# Every Manager method with the empty value of each argument: all refused before they act.
ZERO = {"s": "", "u": 0, "i": 0, "t": 0, "b": False, "ay": b"", "ai": [], "as": [],
        "a(sv)": []}


def test_empty_arguments_as_252(pair: Pair) -> None:
    differ = []
    for iface, member, sig in _methods(pair.real, M):
        if iface != MGR or member in ("SetPoolLimit",):  # that one would set a quota
            continue
        args = [ZERO[t] for t in re.findall(r"a\(sv\)|a.|.", sig)]
        real, ours = (outcome(conn, M, iface, member, sig, *args)
                      for conn in (pair.real, pair.ours))
        real, ours = normal(real, member), normal(ours, member, pair.ours_root)
        if real != ours:
            differ.append(difference(f"{member}({sig}) {args}", real, ours))
    assert not differ, "\n".join(differ)


def test_same_answers_as_252(pair: Pair) -> None:
    differ = []
    catalogue = cases(pair.leaders)
    for path, iface, member, sig, args in catalogue:
        real = normal(outcome(pair.real, path, iface, member, sig, *args), member)
        ours = normal(outcome(pair.ours, path, iface, member, sig, *args), member,
                      pair.ours_root)
        if real != ours:
            differ.append(difference(f"{path} {iface}.{member}({sig}) {args!r}", real, ours))
    assert not differ, (f"{len(differ)} of {len(catalogue)} answers differ from 252's:\n"
                        + "\n".join(differ))



def test_state_files_as_252s(pair: Pair) -> None:
    """/run/systemd/machines: the same files and unit: links, the same lines in the same order
    (but for the times of each daemon's own registration)."""
    def files(d: Path) -> dict[str, str]:
        out = {}
        for f in sorted(d.iterdir()):
            if f.is_symlink():
                out[f.name] = "-> " + os.readlink(f)
            elif not f.name.startswith("."):
                out[f.name] = "".join(line for line in f.read_text().splitlines(keepends=True)
                                      if not line.startswith(("REALTIME=", "MONOTONIC=")))
        return out
    args = ("difft-state", ID16, "svc", "vm", pair.leaders["free2"], "/srv", [7, 3])
    for conn in (pair.real, pair.ours):
        got = outcome(conn, M, MGR, "RegisterMachineWithNetwork", "sayssusai", *args)
        assert got[0] == "ok", got
    try:
        real = files(pair.real_state)
        assert "NETIF=7 3\n" in real["difft-state"] and "ID=" in real["difft-state"], real
        assert real == files(STATE_DIR)
    finally:
        for conn in (pair.real, pair.ours):
            outcome(conn, M, MGR, "UnregisterMachine", "s", "difft-state")
    assert files(pair.real_state) == files(STATE_DIR)


def test_a_caller_inside_a_machine(pair: Pair) -> None:
    """A caller in difft's scope: GetMachineByPID(0) and the machine/self object are difft."""
    scope = Path(cgroup2_mount()) / "machine.slice/difftest-0.scope"
    clients = {who: RawClient(bus) for who, bus in pair.buses.items()}
    try:
        answers = {}
        for who, client in clients.items():
            (scope / "cgroup.procs").write_text(str(client.proc.pid))
            answers[who] = [
                client.call(M, MGR, "GetMachineByPID", "u", (0,)),
                client.call(f"{M}/machine/self", PROPS, "Get", "ss", (MACH, "Name")),
                client.call(f"{M}/machine/self", MACH, "GetUIDShift")]
        assert answers["real"] == answers["ours"], answers
        assert answers["real"][:2] == [("ok", (f"{M}/machine/difft",)),
                                       ("ok", (("s", "difft"),))], answers
    finally:
        for c in clients.values():
            c.close()


def test_signals_as_252s(pair: Pair) -> None:
    """What the daemons signal while machines come and go (and a registration fails)."""
    monitors = {who: Monitor(bus) for who, bus in pair.buses.items()}
    try:
        for conn in (pair.real, pair.ours):
            for call in (("RegisterMachine", "sayssus", "difft-sig", b"", "", "vm",
                          pair.leaders["free2"], ""),
                         ("RegisterMachine", "sayssus", "difft-sig2", b"", "", "vm",
                          pair.leaders["free2"], ""),  # its leader is taken
                         ("UnregisterMachine", "s", "difft-sig"),
                         ("UnregisterMachine", "s", "difft-sig")):
                outcome(conn, M, MGR, *call)
        seen = {}
        for who, monitor in monitors.items():
            monitor.sync()
            seen[who] = [(m["path"], m["interface"], m["member"], m["payload"]["data"])
                         for m in monitor.snapshot()
                         if m.get("type") == "signal" and m["path"].startswith(M)]
        assert seen["real"] == seen["ours"], seen
        assert [s[2] for s in seen["real"]] == ["MachineNew", "MachineRemoved"], seen
    finally:
        for monitor in monitors.values():
            monitor.stop()


def test_host_machine(pair: Pair) -> None:
    """What `.host` answers about itself: os-release, UID shift and maps, addresses, its root
    directory and a PTY of the host's."""
    for member, sig, args in (("GetMachineOSRelease", "s", (".host",)),
                              ("GetMachineUIDShift", "s", (".host",)),
                              ("MapFromMachineUser", "su", (".host", 1000)),
                              ("MapFromMachineGroup", "su", (".host", 1000)),
                              ("BindMountMachine", "sssbb", (".host", NO_A, NO_B, False, True)),
                              ("CopyToMachine", "sss", (".host", NO_A, NO_B))):
        real, ours = (outcome(c, M, MGR, member, sig, *args) for c in (pair.real, pair.ours))
        assert real == ours, (member, real, ours)
    real, ours = (outcome(c, M, MGR, "GetMachineAddresses", "s", ".host")
                  for c in (pair.real, pair.ours))
    assert real[0] == ours[0] == "ok" and real[1][0] == ours[1][0], (real, ours)  # in order
    fds = []
    try:
        for conn in (pair.real, pair.ours):
            kind, (fd,) = outcome(conn, M, MGR, "OpenMachineRootDirectory", "s", ".host")
            fds.append(fd)
            assert kind == "ok" and os.fstat(fd).st_ino == os.stat("/").st_ino
            kind, (fd, name) = outcome(conn, M, MGR, "OpenMachinePTY", "s", ".host")
            fds.append(fd)
            assert kind == "ok" and re.fullmatch(r"/dev/pts/\d+", name), name
            assert os.path.exists(name)
    finally:
        for fd in fds:
            os.close(fd)


def test_host_times(pair: Pair) -> None:
    """`.host` dates from the boot: the same realtime in both (read at each daemon's start, so
    a few µs apart at most), and CLOCK_MONOTONIC's 0 (252's may be the µs between its reading
    of the clocks; ours reads them so that it is never more)."""
    host = f"{M}/machine/_2ehost"
    stamps = {who: [outcome(conn, host, PROPS, "Get", "ss", MACH, prop)[1][0][1]
                    for prop in ("Timestamp", "TimestampMonotonic")]
              for who, conn in (("real", pair.real), ("ours", pair.ours))}
    assert abs(stamps["real"][0] - stamps["ours"][0]) < 1000, stamps
    assert stamps["real"][1] < 10 and stamps["ours"][1] == 0, stamps


def test_log_control_as_252s(pair: Pair) -> None:
    """LogControl1: every one of 252's log targets and levels set and read back, bad ones
    refused with the same words; the level is put back at the end."""
    lc, iface = "/org/freedesktop/LogControl1", "org.freedesktop.LogControl1"
    differ = []
    steps: list[tuple[str, str]] = [("LogTarget", t) for t in (
        "console", "console-prefixed", "kmsg", "journal", "journal-or-kmsg", "syslog",
        "syslog-or-kmsg", "null", "auto", "bogus", "")]
    steps += [("LogLevel", lv) for lv in ("debug", "notice", "bogus", "7", "info")]
    for prop, value in steps:
        seen = {}
        for who, conn in (("real", pair.real), ("ours", pair.ours)):
            put = outcome(conn, lc, PROPS, "Set", "ssv", iface, prop, ("s", value))
            seen[who] = (put, outcome(conn, lc, PROPS, "Get", "ss", iface, prop),
                         outcome(conn, lc, PROPS, "Get", "ss", iface, "SyslogIdentifier"))
        if seen["real"] != seen["ours"]:
            differ.append(difference(f"{prop} = {value!r}", seen["real"], seen["ours"]))
    assert not differ, "\n".join(differ)


def test_same_answers_for_an_unprivileged_caller(pair: Pair) -> None:
    """The same catalogue as nobody, with no polkit on either bus: the same refusals, and the
    same answers to what anyone may ask."""
    clients = {who: RawClient(bus, user="nobody") for who, bus in pair.buses.items()}
    try:
        differ = []
        catalogue = cases(pair.leaders)
        for path, iface, member, sig, args in catalogue:
            real, ours = (normal(_as_outcome(clients[who].call(path, iface, member, sig,
                                                                   args), clients[who]),
                                 member, pair.ours_root if who == "ours" else "")
                          for who in ("real", "ours"))
            if real != ours:
                differ.append(difference(f"{path} {iface}.{member}({sig}) {args!r}", real,
                                         ours))
    finally:
        for c in clients.values():
            c.close()
    assert not differ, (f"{len(differ)} of {len(catalogue)} answers differ from 252's:\n"
                        + "\n".join(differ))


async def _pipelined(bus: BusDaemon, calls: list[tuple[str, str, Any]]) -> list[tuple[str, Any]]:
    """Manager calls sent one after the other on one connection before any reply is read, so
    that the daemon reads them together."""
    conn = connect(bus)
    try:
        sent = []
        for member, sig, args in calls:
            msg = conn.new_method_call_message(DEST, M, MGR, member)
            if sig:
                msg.append_data(sig, *args)
            sent.append(conn.call_async(msg))
        answers: list[tuple[str, Any]] = []
        for reply in await asyncio.gather(*sent, return_exceptions=True):
            if isinstance(reply, SdBusBaseError):
                err = remote_error(reply)
                answers.append(("error", (err.name, err.message)))
            else:
                answers.append(("ok", reply.parse_to_tuple()))
        return answers
    finally:
        conn.close()


def test_a_failed_registration_leaves_nothing_for_the_next_call(pair: Pair) -> None:
    """252 collects a failed registration before it reads the next message: the calls queued
    behind it find neither its name nor its leader taken."""
    leader = pair.leaders["free2"]
    fails = [("sayssus", ("difft-pipe", b"", "test", "container", NO_PID, "")),  # no process
             ("sayssus", ("difft-pipe", b"", "test", "container", pair.leaders["difft"], ""))]
    for sig, bad in fails:  # the second: a leader that is another machine's
        calls = [("RegisterMachine", sig, bad), ("GetMachine", "s", ("difft-pipe",)),
                 ("ListMachines", "", ()), ("RegisterMachine", sig, (*bad[:4], leader, ""))]
        answers = {who: [normal(answer, member) for answer, (member, _s, _a) in
                         zip(asyncio.run(_pipelined(pair.buses[who], calls)), calls, strict=True)]
                   for who in ("real", "ours")}
        assert answers["ours"] == answers["real"], answers
        assert answers["ours"][-1] == ("ok", (f"{M}/machine/difft_2dpipe",)), answers
        for conn in (pair.real, pair.ours):
            assert outcome(conn, M, MGR, "UnregisterMachine", "s", "difft-pipe")[0] == "ok"


def _as_outcome(answer: tuple[Any, ...], client: RawClient) -> tuple[str, Any]:
    """A RawClient's answer as outcome() gives it; the caller's PID (which GetMachineByPID(0)
    names) is each client's own."""
    if answer[0] != "error":
        return answer[0], answer[1]
    name, message = answer[1:]
    return "error", (name, message.replace(str(client.proc.pid), "CALLER"))


def test_beyond_252_a_leader_in_no_unit(pair: Pair) -> None:
    """Where ours does more (standalone mode): 252 cannot register a leader whose cgroup is no
    unit; ours gives it a scope of its own, which terminating the machine takes away again."""
    leader = pair.leaders["nounit"]
    args = ("difft-nounit", b"", "test", "container", leader, "/")
    assert outcome(pair.real, M, MGR, "RegisterMachine", "sayssus", *args) == (
        "error", ("System.Error.ENXIO",
                  f"Failed to determine unit of process {leader} : No such device or address"))
    assert outcome(pair.ours, M, MGR, "RegisterMachine", "sayssus", *args) == (
        "ok", (f"{M}/machine/difft_2dnounit",))
    unit = "machine-difft\\x2dnounit.scope"
    assert outcome(pair.ours, f"{M}/machine/difft_2dnounit", PROPS, "Get", "ss",
                   MACH, "Unit") == ("ok", (("s", unit),))
    scope = Path(cgroup2_mount()) / "machine.slice" / unit
    assert str(leader) in (scope / "cgroup.procs").read_text().split()
    assert outcome(pair.ours, M, MGR, "TerminateMachine", "s", "difft-nounit") == ("ok", ())
    wait_for(lambda: outcome(pair.ours, M, MGR, "GetMachine", "s", "difft-nounit")[0] == "error",
             10, what="the machine to go")
    wait_for(lambda: not scope.exists(), 10, what="its scope to be removed")
