"""Who may call what (spec §4, policy/org.freedesktop.machine1.conf): every method of every
interface, called as root and as nobody on a bus with the shipped policy, with polkit absent,
denying and allowing (python-dbusmock's polkitd template).

The expectations come from ONE table (ROWS): per method whether the shipped policy lets a
non-root peer send it, which authorization the daemon applies (none, sd-bus "privileged", or a
polkit action) and what an authorized caller gets with the harmless arguments used here.
`expected()` derives the outcome for each (caller, polkit mode) from that row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import IMAGE, MACHINE, MANAGER, MANAGER_PATH, RawClient
from tests.helpers.daemon import Machined

from .conftest import (
    PREFIX,
    Polkit,
    Sleepers,
    make_image,
)

MM = "org.freedesktop.machine1.manage-machines"
MI = "org.freedesktop.machine1.manage-images"
PRIV = "privileged"  # sd-bus refuses non-root callers before the handler runs
PROPS = "org.freedesktop.DBus.Properties"
LOGCONTROL = "org.freedesktop.LogControl1"
U64_MAX = 2**64 - 1

# Outcomes
OK = "ok"
AUTHORIZED = "authorized"  # got past authorization: any answer but a refusal or "not implemented"
BUS_DENIED = "bus-denied"  # dbus-daemon refused to deliver (shipped policy)
PRIV_DENIED = "priv-denied"  # "Access to X.Y() not permitted."
DENIED = "denied"  # polkit (or its absence) said no: AccessDenied "Permission denied"
NO_PRIVATE_NET = "org.freedesktop.machine1.NoPrivateNetworking"

SHARED = "secauth"  # a machine the non-destructive rows share
IMG = "secimg"  # an image the non-destructive rows share
# Placeholders filled in per case: a fresh machine / image that the call may consume, a new name
FRESH, FRESH_PATH, FRESH_IMG, FRESH_IMG_PATH, NEW, LEADER = (
    "{fresh}", "{fresh_path}", "{fresh_img}", "{fresh_img_path}", "{new}", "{leader}")
MPATH = f"{MANAGER_PATH}/machine/{SHARED}"
IPATH = f"{MANAGER_PATH}/image/{IMG}"


@dataclass(frozen=True)
class Row:
    path: str
    iface: str
    member: str
    sig: str
    args: tuple[Any, ...]
    policy: bool  # the shipped policy lets non-root peers send it
    auth: str | None  # None, PRIV, or the polkit action
    result: str  # OK, AUTHORIZED or the D-Bus error name an authorized caller gets
    # The shared machine is in the host's user namespace: a shell there is root on the host, so
    # only root gets one, whatever polkit says (see test_attacks). A login still asks for a
    # password, so polkit decides.
    root_only: bool = False

    @property
    def id(self) -> str:
        return f"{self.iface.rsplit('.', 1)[-1]}.{self.member}"


def mgr(member: str, sig: str, args: tuple[Any, ...], policy: bool, auth: str | None,
        result: str = OK, root_only: bool = False) -> Row:
    return Row(MANAGER_PATH, MANAGER, member, sig, args, policy, auth, result, root_only)


def mach(member: str, sig: str, args: tuple[Any, ...], policy: bool, auth: str | None,
         result: str = OK, root_only: bool = False, path: str = MPATH) -> Row:
    return Row(path, MACHINE, member, sig, args, policy, auth, result, root_only)


def img(member: str, sig: str, args: tuple[Any, ...], auth: str | None, result: str = OK,
        path: str = IPATH) -> Row:
    return Row(path, IMAGE, member, sig, args, True, auth, result)


BAD_CREATE = ("bad_name", b"", "", "container", 0, "")
INVALID = "org.freedesktop.DBus.Error.InvalidArgs"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"

ROWS = [
    # Manager (spec §2.3 columns Priv / Polkit; the policy file's allow list)
    mgr("GetMachine", "s", (SHARED,), True, None),
    mgr("GetImage", "s", (IMG,), True, None),
    mgr("GetMachineByPID", "u", (LEADER,), True, None),
    mgr("ListMachines", "", (), True, None),
    mgr("ListImages", "", (), True, None),
    # privileged: root passes sd-bus's check and reaches validation (harmless: invalid name)
    mgr("CreateMachine", "sayssusa(sv)", (*BAD_CREATE, []), False, PRIV, INVALID),
    mgr("CreateMachineWithNetwork", "sayssusaia(sv)", (*BAD_CREATE, [], []), False, PRIV,
        INVALID),
    mgr("RegisterMachine", "sayssus", BAD_CREATE, False, PRIV, INVALID),
    mgr("RegisterMachineWithNetwork", "sayssusai", (*BAD_CREATE, []), False, PRIV, INVALID),
    mgr("UnregisterMachine", "s", (FRESH,), True, MM),
    mgr("TerminateMachine", "s", (FRESH,), True, MM),
    mgr("KillMachine", "ssi", (SHARED, "leader", 18), True, MM),  # SIGCONT: harmless
    # the shared machine uses the host's network namespace
    mgr("GetMachineAddresses", "s", (SHARED,), True, None, NO_PRIVATE_NET),
    mgr("GetMachineOSRelease", "s", (SHARED,), True, None),
    mgr("OpenMachinePTY", "s", (SHARED,), False, PRIV),
    mgr("OpenMachineLogin", "s", (SHARED,), True, "org.freedesktop.machine1.login", AUTHORIZED),
    mgr("OpenMachineShell", "sssasas", (SHARED, "root", "/bin/true", [], []), True,
        "org.freedesktop.machine1.shell", AUTHORIZED, root_only=True),
    mgr("BindMountMachine", "sssbb", (SHARED, "/nonexistent-sec", "/mnt", False, False), True,
        MM, AUTHORIZED),
    mgr("CopyFromMachine", "sss", (SHARED, "/nonexistent-sec", "/nonexistent-sec"), True, MM,
        AUTHORIZED),
    mgr("CopyToMachine", "sss", (SHARED, "/nonexistent-sec", "/nonexistent-sec"), True, MM,
        AUTHORIZED),
    mgr("CopyFromMachineWithFlags", "ssst", (SHARED, "/nonexistent-sec", "/nonexistent-sec", 0),
        False, MM, AUTHORIZED),
    mgr("CopyToMachineWithFlags", "ssst", (SHARED, "/nonexistent-sec", "/nonexistent-sec", 0),
        False, MM, AUTHORIZED),
    mgr("OpenMachineRootDirectory", "s", (SHARED,), False, MM),
    mgr("GetMachineUIDShift", "s", (SHARED,), True, None),
    mgr("RemoveImage", "s", (FRESH_IMG,), True, MI),
    mgr("RenameImage", "ss", (FRESH_IMG, NEW), True, MI),
    mgr("CloneImage", "ssb", (IMG, NEW, False), True, MI),
    mgr("MarkImageReadOnly", "sb", (IMG, False), True, MI),
    mgr("GetImageHostname", "s", (IMG,), True, None),
    mgr("GetImageMachineID", "s", (IMG,), True, None),
    mgr("GetImageMachineInfo", "s", (IMG,), True, None),
    mgr("GetImageOSRelease", "s", (IMG,), True, None),
    # the private pool is on ext4: no quota, so an authorized caller hears NotSupported
    mgr("SetPoolLimit", "t", (U64_MAX,), True, MM, NOT_SUPPORTED),
    mgr("SetImageLimit", "st", (IMG, U64_MAX), True, MI, NOT_SUPPORTED),
    mgr("CleanPool", "s", ("hidden",), True, MM),
    mgr("MapFromMachineUser", "su", (SHARED, 0), True, None),
    mgr("MapToMachineUser", "u", (0,), True, None, "org.freedesktop.machine1.NoSuchUserMapping"),
    mgr("MapFromMachineGroup", "su", (SHARED, 0), True, None),
    mgr("MapToMachineGroup", "u", (0,), True, None,
        "org.freedesktop.machine1.NoSuchGroupMapping"),
    # Machine objects (spec §2.4)
    mach("Terminate", "", (), True, MM, path=FRESH_PATH),
    mach("Kill", "si", ("leader", 18), True, MM),
    mach("GetAddresses", "", (), True, None, NO_PRIVATE_NET),
    mach("GetOSRelease", "", (), True, None),
    mach("GetUIDShift", "", (), True, None),
    # not root-only at sd-bus level, but the policy keeps non-root callers out
    mach("OpenPTY", "", (), False, "org.freedesktop.machine1.open-pty"),
    mach("OpenLogin", "", (), True, "org.freedesktop.machine1.login", AUTHORIZED),
    mach("OpenShell", "ssasas", ("root", "/bin/true", [], []), True,
         "org.freedesktop.machine1.shell", AUTHORIZED, root_only=True),
    mach("BindMount", "ssbb", ("/nonexistent-sec", "/mnt", False, False), True, MM, AUTHORIZED),
    mach("CopyFrom", "ss", ("/nonexistent-sec", "/nonexistent-sec"), True, MM, AUTHORIZED),
    mach("CopyTo", "ss", ("/nonexistent-sec", "/nonexistent-sec"), True, MM, AUTHORIZED),
    mach("CopyFromWithFlags", "sst", ("/nonexistent-sec", "/nonexistent-sec", 0), False, MM,
         AUTHORIZED),
    mach("CopyToWithFlags", "sst", ("/nonexistent-sec", "/nonexistent-sec", 0), False, MM,
         AUTHORIZED),
    mach("OpenRootDirectory", "", (), False, MM),
    # Image objects (spec §2.5)
    img("Remove", "", (), MI, path=FRESH_IMG_PATH),
    img("Rename", "s", (NEW,), MI, path=FRESH_IMG_PATH),
    img("Clone", "sb", (NEW, False), MI),
    img("MarkReadOnly", "b", (False,), MI),
    img("SetLimit", "t", (U64_MAX,), MI, NOT_SUPPORTED),
    img("GetHostname", "", (), None),
    img("GetMachineID", "", (), None),
    img("GetMachineInfo", "", (), None),
    img("GetOSRelease", "", (), None),
    # Standard interfaces, and the writable LogControl1 properties
    Row(MANAGER_PATH, PROPS, "Get", "ss", (MANAGER, "PoolPath"), True, None, OK),
    Row(MANAGER_PATH, PROPS, "GetAll", "s", ("",), True, None, OK),
    Row(MPATH, PROPS, "GetAll", "s", (MACHINE,), True, None, OK),
    Row(IPATH, PROPS, "Get", "ss", (IMAGE, "Name"), True, None, OK),
    Row(MANAGER_PATH, PROPS, "Set", "ssv", (MANAGER, "PoolPath", ("s", "/x")), False, None,
        "org.freedesktop.DBus.Error.PropertyReadOnly"),
    Row("/org/freedesktop/LogControl1", PROPS, "Set", "ssv",
        (LOGCONTROL, "LogLevel", ("s", "debug")), False, None, OK),
    Row("/org/freedesktop/LogControl1", PROPS, "Get", "ss", (LOGCONTROL, "LogTarget"), True,
        None, OK),
    Row(MANAGER_PATH, "org.freedesktop.DBus.Introspectable", "Introspect", "", (), True, None,
        OK),
    Row(MPATH, "org.freedesktop.DBus.Peer", "Ping", "", (), True, None, OK),
    Row(MANAGER_PATH, "org.freedesktop.DBus.Peer", "GetMachineId", "", (), True, None, OK),
]

MODES = ("absent", "deny", "allow")
USERS = ("root", "nobody")


def expected(row: Row, user: str, mode: str) -> str:
    if user == "root":
        return row.result
    if not row.policy:
        return BUS_DENIED
    if row.auth == PRIV:
        return PRIV_DENIED
    if row.root_only:
        return DENIED
    if row.auth is None or mode == "allow":
        return row.result
    return DENIED


def outcome(answer: tuple[Any, ...], wanted: str) -> str:
    """Classify an answer in the terms of `expected`."""
    if answer[0] == "ok":
        return AUTHORIZED if wanted == AUTHORIZED else OK
    _, name, message = answer
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        if message.startswith("Rejected send message"):
            return BUS_DENIED
        if message.startswith("Access to ") and message.endswith("not permitted."):
            return PRIV_DENIED
        if message == "Permission denied":
            return DENIED
        return f"{name}: {message}"
    if name == "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired":
        return f"{name}: {message}"
    if "not implemented yet" in message:
        return f"{name}: {message}"
    if wanted == AUTHORIZED:
        return AUTHORIZED
    return str(name)


class World:
    """The daemon's surroundings for one polkit mode: shared machine and image, fresh ones."""

    def __init__(self, bus: BusDaemon, root: Path, sleepers: Sleepers, root_client: RawClient,
                 polkit: Polkit, mode: str) -> None:
        self.bus, self.root, self.sleepers, self.rc = bus, root, sleepers, root_client
        self.polkit, self.mode = polkit, mode
        self.counter = itertools.count()
        self.leader = 0
        self.ensure_shared()

    def register(self, name: str) -> int:
        leader = self.sleepers.start().pid
        answer = self.rc.manager("RegisterMachine", "sayssus", name, b"", "sec", "container",
                                 leader, "")
        assert answer[0] == "ok", answer
        return leader

    def ensure_shared(self) -> None:
        answer = self.rc.call(MPATH, PROPS, "Get", "ss", (MACHINE, "Leader"))
        if answer[0] == "ok":
            self.leader = answer[1][0][1]
        else:
            self.leader = self.register(SHARED)
        make_image(self.root, IMG)

    def fill(self, value: Any, subst: dict[str, str]) -> Any:
        if isinstance(value, str) and value in subst:
            return subst[value]
        if value == LEADER:
            return self.leader
        return value

    def prepare(self, row: Row) -> Row:
        self.ensure_shared()
        n = next(self.counter)
        subst = {NEW: f"{PREFIX}new{self.mode}{n}"}
        if FRESH in row.args or row.path == FRESH_PATH:
            fresh = f"{PREFIX}m{self.mode}{n}"
            self.register(fresh)
            subst[FRESH] = fresh
            subst[FRESH_PATH] = f"{MANAGER_PATH}/machine/{fresh}"
        if FRESH_IMG in row.args or row.path == FRESH_IMG_PATH:
            fresh_img = f"{PREFIX}img{self.mode}{n}"
            make_image(self.root, fresh_img)
            subst[FRESH_IMG] = fresh_img
            subst[FRESH_IMG_PATH] = f"{MANAGER_PATH}/image/{fresh_img}"
        args = tuple(self.fill(a, subst) for a in row.args)
        return Row(subst.get(row.path, row.path), row.iface, row.member, row.sig, args,
                   row.policy, row.auth, row.result, row.root_only)


@pytest.fixture(scope="module", params=MODES)
def world(request: pytest.FixtureRequest, sec_bus: BusDaemon, sec_images: Path,
          sec_daemon: Machined, sleepers: Sleepers, root_client: RawClient) -> Iterator[World]:
    mode: str = request.param
    polkit = Polkit(sec_bus)
    if mode != "absent":
        polkit.start()
    try:
        yield World(sec_bus, sec_images, sleepers, root_client, polkit, mode)
    finally:
        polkit.stop()


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_matrix(world: World, root_client: RawClient, nobody_client: RawClient, row: Row,
                user: str) -> None:
    want = expected(row, user, world.mode)
    case = world.prepare(row)
    if world.mode == "allow" and isinstance(row.auth, str) and row.auth != PRIV:
        world.polkit.allow(row.auth)  # only this action: the daemon must ask for the right one
    client = root_client if user == "root" else nobody_client
    answer = client.call(case.path, case.iface, case.member, case.sig, case.args)
    assert outcome(answer, want) == want, answer


def test_every_method_is_in_the_table(world: World, root_client: RawClient) -> None:
    """The table covers each method the daemon introspects on its three interfaces."""
    import xml.etree.ElementTree as ET

    covered = {(r.iface, r.member) for r in ROWS}
    for path, iface in ((MANAGER_PATH, MANAGER), (MPATH, MACHINE), (IPATH, IMAGE)):
        answer = root_client.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
        assert answer[0] == "ok", answer
        node = ET.fromstring(answer[1][0])
        for i in node.iter("interface"):
            if i.get("name") == iface:
                for m in i.iter("method"):
                    assert (iface, m.get("name")) in covered, m.get("name")
