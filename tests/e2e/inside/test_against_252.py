"""Working inside a container, the real 252 decides: one busybox container (started by
systemd-nspawn, registered with ours), registered with 252 as well, and the same calls to both.
Copies and bind mounts of the two daemons go to paths of their own ("-real", "-ours"), which
are compared once that suffix is taken out; what the calls leave in the container is compared
too.

Where ours does more (the tests named beyond_252): 252 opens logins and shells through the
container's own system bus, which a busybox container has not, and makes bind mounts through a
propagation that needs the host's mounts shared; ours does both itself."""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sdbus.sd_bus_internals import SdBus

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import MACHINE as MACH
from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.client import PROPERTIES as PROPS
from tests.helpers.client import connect, outcome
from tests.helpers.daemon import Machined, cgroup2_mount, have, wait_for
from tests.helpers.leaders import CgroupLeaders
from tests.helpers.real252 import (
    REAL_MACHINED,
    RealMachined,
    difference,
    host_dirs,
    map_strings,
)
from tests.helpers.userns import spawn_userns_leader

from ..support import Nspawn, Processes
from .support import Containers, busybox_copy

pytestmark = pytest.mark.skipif(not have("systemd-nspawn"), reason="needs systemd-nspawn")

WHO = ("real", "ours")


@dataclass
class Pair:
    conns: dict[str, SdBus]
    ct: Nspawn
    host: Path  # a host directory for copies and bind mounts
    userns: bool  # the container has its own user and network namespaces

    @property
    def shift(self) -> int:
        return int(Path(f"/proc/{self.ct.leader}/uid_map").read_text().split()[1])

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.ct.leader}/root")


# The containers: one in the host's user and network namespaces, one with its own of both.
KINDS = {
    "plain": ("while :; do sleep 1; done", ()),
    "userns": ("ip link set lo up; ip link set host0 up; ip addr add 192.168.253.2/24 dev host0; "
               "ip -6 addr add fd00:253::2/64 dev host0; echo ready > /tmp/ready; "
               "while :; do sleep 1; done",
               ("--private-users=pick", "--private-users-ownership=chown", "--network-veth")),
}


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request: pytest.FixtureRequest, daemon: tuple[BusDaemon, Machined],
         busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if not os.path.exists(REAL_MACHINED):
        pytest.fail(f"{REAL_MACHINED} is missing: the set-up installs systemd-container")
    bus, machined = daemon
    tree = busybox_copy(busybox_tree, tmp_path_factory.mktemp("bb252") / "root")
    host = tmp_path_factory.mktemp("host252")
    (host / "file").write_text("hello")
    os.chmod(host / "file", 0o640)
    os.chown(host / "file", 1234, 4321)
    for xattr in ("user.kept", "trusted.not-copied"):  # 252 copies user.* only
        os.setxattr(host / "file", xattr, b"1")
    (host / "dir/sub").mkdir(parents=True)
    (host / "dir/sub/inner").write_text("inner")
    os.link(host / "dir/sub/inner", host / "dir/hard")  # copies keep hard links
    (host / "dir/link").symlink_to("sub/inner")
    os.mkfifo(host / "dir/fifo", 0o666)  # made with this mode, whatever the umask
    os.chmod(host / "dir/fifo", 0o666)
    with socket.socket(socket.AF_UNIX) as sock:  # copied too, as a socket inode
        sock.bind(str(host / "dir/sock"))
    cts = Containers(bus, machined, Processes(), tmp_path_factory.mktemp("bb252-ct"))
    real_bus: BusDaemon | None = None
    real: RealMachined | None = None
    try:
        script, options = KINDS[request.param]
        ct = cts.start(tree, "diff", script, options)
        if options:
            wait_for(Path(f"/proc/{ct.leader}/root/tmp/ready").exists, 15,
                     what="the container's network setup")
        ours = connect(bus)
        with host_dirs():
            real_bus = BusDaemon("open")
            real = RealMachined(real_bus)
            conn = connect(real_bus)
            path = f"{M}/machine/{ct.name}"
            props = outcome(ours, path, PROPS, "GetAll", "s", MACH)[1][0]
            got = outcome(conn, M, MGR, "RegisterMachineWithNetwork", "sayssusai", ct.name,
                          props["Id"][1], props["Service"][1], "container", ct.leader,
                          props["RootDirectory"][1], props["NetworkInterfaces"][1])
            assert got[0] == "ok", got
            yield Pair({"real": conn, "ours": ours}, ct, host, request.param == "userns")
    finally:
        if real is not None:
            real.stop()
        if real_bus is not None:
            real_bus.stop()
        cts.close()


def both(pair: Pair, member: str, sig: str, *args: Any, path: str = M,
         iface: str = MGR) -> dict[str, tuple[str, Any]]:
    """The call made to each daemon; "{who}" in a string argument becomes its name."""
    def fill(who: str, a: Any) -> Any:
        return a.replace("{who}", who) if isinstance(a, str) else a
    return {who: outcome(pair.conns[who], path, iface, member, sig, *(fill(who, a) for a in args))
            for who in WHO}


def same(answers: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """Both answers, with each daemon's own suffix taken out, must be equal; returns it."""
    real, ours = (map_strings(answers[who], lambda v, w=who: v.replace(f"-{w}", "-WHO"))
                  for who in WHO)
    assert real == ours, difference("", answers["real"], answers["ours"])
    result: tuple[str, Any] = real
    return result


def tree_of(path: Path) -> list[tuple[str, int, int, int, str, str, list[str]]]:
    """What a copy or a bind mount left: names, modes, owners, contents, for each hard link
    within the tree the first name of its inode, and the names of the extended attributes."""
    out = []
    first_name: dict[int, str] = {}
    for p in sorted([path, *path.rglob("*")]):
        st = os.lstat(p)
        name = str(p.relative_to(path))
        body = (os.readlink(p) if stat.S_ISLNK(st.st_mode)
                else p.read_text() if stat.S_ISREG(st.st_mode) else "")
        same_as = first_name.setdefault(st.st_ino, name) if not stat.S_ISDIR(st.st_mode) else name
        xattrs = sorted(os.listxattr(p, follow_symlinks=False))
        out.append((name, st.st_mode, st.st_uid, st.st_gid, body, same_as, xattrs))
    return out


def test_facts_of_the_container(pair: Pair) -> None:
    n = pair.ct.name
    for member, sig, args in (("GetMachineOSRelease", "s", (n,)),
                              ("GetMachineUIDShift", "s", (n,)),
                              ("MapFromMachineUser", "su", (n, 1000)),
                              ("MapFromMachineGroup", "su", (n, 10)),
                              ("MapToMachineUser", "u", (1000,)),
                              ("MapToMachineGroup", "u", (1000,)),
                              ("KillMachine", "ssi", (n, "leader", 18)),  # SIGCONT
                              ("KillMachine", "ssi", (n, "leader", 0)),
                              ("MapFromMachineUser", "su", (n, 70000)),
                              ("MapToMachineUser", "u", (pair.shift + 1000,)),
                              ("MapToMachineUser", "u", (pair.shift + 65535,)),  # 65535 in
                              ("MapToMachineGroup", "u", (pair.shift + 5,)),
                              ("MapToMachineUser", "u", (4_000_000_000,))):
        same(both(pair, member, sig, *args))
    addresses = same(both(pair, "GetMachineAddresses", "s", n))
    assert (addresses[0] == "ok") == pair.userns, addresses  # else NoPrivateNetworking
    machine = f"{M}/machine/{n}"
    own: list[tuple[str, str, tuple[Any, ...]]] = [("GetOSRelease", "", ()), ("GetUIDShift", "", ()),
                                                   ("Kill", "si", ("leader", 18))]
    for member, sig, args in own:
        same(both(pair, member, sig, *args, path=machine, iface=MACH))
    answers = both(pair, "GetAll", "s", MACH, path=machine, iface=PROPS)
    for who in WHO:
        for stamp in ("Timestamp", "TimestampMonotonic"):
            answers[who][1][0].pop(stamp)
    same(answers)


# os-release files the two must read alike (252's env-file parser is a character state machine).
OS_RELEASES = [
    b"ID=plain\nNAME=\"Quoted Name\"\n# comment\n; comment\nPRETTY='single'\n",
    b"C='mi'x\"ed\"\nD=\"a\\nb\\$c\\\"d\"\nE='p\\\nq'\nF=one\\\n  two\n",
    b"export A=1\n1A=x\nA-B=y\nA B=two words\n  LEAD=1\nTRAIL  =2\n=x\n==y\nNOVALUE\n",
    b"B=\"val  \"  \nA=val # comment\nC=\"q\" # c\nH=#not\nI= #x\nJ='q' tail\n",
    b"# comment \\\nSTILL=comment\nX=1\nX=2\nA=\"open\nB=2\n",
    b"A=1\rB=2\r\nC=3",
    b"\xef\xbb\xbfA=1\nB=2\n",
    b"B=\xff\xfe\n",  # not UTF-8: refused
    b"A=1\nB=a\0b\n",  # a NUL byte: refused
    b"",  # a directory there instead
]


@pytest.mark.parametrize("content", OS_RELEASES, ids=range(len(OS_RELEASES)))
def test_os_release_read_as_252(pair: Pair, content: bytes) -> None:
    etc = pair.root / "etc/os-release"
    saved = os.readlink(etc)
    etc.unlink()
    try:
        if content:
            etc.write_bytes(content)
        else:
            etc.mkdir()  # not a file: both fail alike
        same(both(pair, "GetMachineOSRelease", "s", pair.ct.name))
    finally:
        if etc.is_dir():
            etc.rmdir()
        else:
            etc.unlink(missing_ok=True)
        etc.symlink_to(saved)


def test_a_complex_id_mapping(pair: Pair) -> None:
    """A leader whose user namespace maps two ranges: GetMachineUIDShift says it is complex,
    copies and bind mounts get 252's bare ENXIO, the maps still go line by line."""
    if pair.userns:
        return  # once is enough
    leaders = CgroupLeaders()
    scope = Path(cgroup2_mount()) / "machine.slice/cplxtest.scope"
    leaders.track(scope)
    idmap = "0 100000 65536\n65536 400000 10\n"
    try:
        leader = spawn_userns_leader(scope, idmap, idmap)
        for conn in pair.conns.values():
            assert outcome(conn, M, MGR, "RegisterMachine", "sayssus", "cplx", b"", "test",
                           "container", leader, "/")[0] == "ok"
        host = pair.host
        for member, sig, args in (
                ("GetMachineUIDShift", "s", ("cplx",)),
                ("CopyToMachine", "sss", ("cplx", f"{host}/file", "/tmp/cplx-{who}")),
                ("CopyFromMachine", "sss", ("cplx", "/etc/hostname", f"{host}/cplx-{{who}}")),
                ("BindMountMachine", "sssbb", ("cplx", f"{host}/dir", "/mnt/cplx", False, True)),
                ("MapToMachineUser", "u", (400005,)),
                ("MapFromMachineUser", "su", ("cplx", 65540))):
            same(both(pair, member, sig, *args))
    finally:
        for conn in pair.conns.values():
            outcome(conn, M, MGR, "UnregisterMachine", "s", "cplx")
        leaders.close()


def test_root_directory_and_pty(pair: Pair) -> None:
    n = pair.ct.name
    fds = []
    try:
        answers = both(pair, "OpenMachineRootDirectory", "s", n)
        fds += [answers[who][1][0] for who in WHO]
        assert [os.fstat(fd).st_ino for fd in fds] == [os.stat(pair.root).st_ino] * 2
        answers = both(pair, "OpenMachinePTY", "s", n)
        for who in WHO:
            kind, (fd, name) = answers[who]
            fds.append(fd)
            assert kind == "ok" and re.fullmatch(r"/dev/pts/\d+", name), (who, name)
            # the terminal is the container's: its pts file system, not the host's
            assert os.path.exists(pair.root / name.lstrip("/"))
    finally:
        for fd in fds:
            os.close(fd)


def test_copies(pair: Pair) -> None:
    n, host = pair.ct.name, pair.host
    steps: list[tuple[str, str, tuple[Any, ...]]] = [
        ("CopyToMachine", "sss", (n, f"{host}/file", "/tmp/file-{who}")),
        ("CopyToMachine", "sss", (n, f"{host}/file", "/tmp/file-{who}")),  # exists
        ("CopyToMachineWithFlags", "ssst", (n, f"{host}/file", "/tmp/file-{who}", 1)),
        ("CopyToMachine", "sss", (n, f"{host}/dir", "/tmp/dir-{who}")),
        ("CopyToMachine", "sss", (n, f"{host}/dir", "/tmp/dir-{who}/sub")),
        ("CopyToMachine", "sss", (n, f"{host}/dir", "/tmp/dir-{who}")),  # merged: all there
        ("CopyToMachineWithFlags", "ssst", (n, f"{host}/dir", "/tmp/dir-{who}", 1)),
        ("CopyToMachine", "sss", (n, f"{host}/nope", "/tmp/nope-{who}")),
        ("CopyToMachine", "sss", (n, f"{host}/file", "/no/such/dir/x-{who}")),
        ("CopyToMachine", "sss", (n, f"{host}/file", "/tmp")),
        ("CopyFromMachine", "sss", (n, "/etc/hostname", f"{host}/hostname-{{who}}")),
        ("CopyFromMachine", "sss", (n, "/etc/hostname", f"{host}/hostname-{{who}}")),
        ("CopyFromMachineWithFlags", "ssst", (n, "/etc/passwd", f"{host}/hostname-{{who}}", 1)),
        ("CopyFromMachine", "sss", (n, "/tmp/dir-{who}", f"{host}/back-{{who}}")),
        ("CopyFromMachine", "sss", (n, "/nonexistent", f"{host}/x-{{who}}")),
        ("CopyFromMachine", "sss", (n, "/etc/hostname", f"{host}/no/such/x-{{who}}")),
        # file names as 252's path_extract_filename() finds them
        ("CopyToMachine", "sss", (n, f"{host}/dir/.", "/tmp/dot-{who}/.")),
        ("CopyToMachine", "sss", (n, f"{host}/dir/..", "/tmp/up-{who}")),
        ("CopyToMachine", "sss", (n, f"{host}/file", "/tmp/.")),
        ("CopyToMachine", "sss", (n, f"{host}/file", "/tmp/..")),
        ("CopyToMachine", "sss", (n, f"{host}/{'x' * 256}", "/tmp/long-{who}")),
        ("CopyFromMachine", "sss", (n, "/" + "d/" * 2048 + "f", f"{host}/long-{{who}}")),
        ("CopyFromMachine", "sss", (n, "/", f"{host}/root-{{who}}")),
        # a directory onto a file that is there, and the other way round
        ("CopyToMachine", "sss", (n, f"{host}/dir", "/tmp/file-{who}")),
        ("CopyToMachineWithFlags", "ssst", (n, f"{host}/dir", "/tmp/file-{who}", 1)),
        ("CopyFromMachine", "sss", (n, "/tmp/dir-{who}", f"{host}/hostname-{{who}}")),
        ("CopyFromMachineWithFlags", "ssst", (n, "/tmp/dir-{who}", f"{host}/hostname-{{who}}", 1)),
        ("CopyToMachineWithFlags", "ssst", (n, f"{host}/file", "/tmp/dir-{who}", 1)),
    ]
    for member, sig, args in steps:
        same(both(pair, member, sig, *args))
    inside = pair.root / "tmp"
    for name in ("file", "dir", "dot"):
        assert tree_of(inside / f"{name}-real") == tree_of(inside / f"{name}-ours"), name
    for name in ("hostname", "back"):
        assert tree_of(host / f"{name}-real") == tree_of(host / f"{name}-ours"), name
    for tree in (inside / "dir-ours", host / "back-ours"):  # both kept the hard link
        assert {e[0]: e[5] for e in tree_of(tree)}["sub/inner"] == "hard", tree


def test_copies_into_an_existing_tree(pair: Pair) -> None:
    """Merged into: what exists stays (also the modes of directories), unless replacing,
    which replaces all but directories; a file where a directory is stays a directory."""
    n, host, inside = pair.ct.name, pair.host, pair.root / "tmp"
    src = host / "merge"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("new")
    (src / "d/added").write_text("added")
    (src / "top").write_text("new top")
    (src / "file-here").write_text("a file where the target has a directory")
    for who in WHO:
        target = inside / f"merge-{who}"
        (target / "d").mkdir(parents=True)
        os.chmod(target / "d", 0o700)
        os.chmod(target, 0o711)
        (target / "d/f").write_text("old")
        (target / "top").write_text("old top")
        (target / "file-here").mkdir()
    for member, sig, args in (
            ("CopyToMachine", "sss", (n, str(src), "/tmp/merge-{who}")),
            ("CopyToMachineWithFlags", "ssst", (n, str(src / "top"), "/tmp/merge-{who}/d", 1)),
            ("CopyFromMachine", "sss", (n, "/tmp/merge-{who}", f"{host}/merged-{{who}}"))):
        same(both(pair, member, sig, *args))
    for tree in (inside / "merge-{}", host / "merged-{}"):
        assert tree_of(Path(str(tree).format("real"))) == tree_of(Path(str(tree).format("ours")))
    assert (inside / "merge-ours/d/f").read_text() == "old"
    same(both(pair, "CopyToMachineWithFlags", "ssst", n, str(src), "/tmp/merge-{who}", 1))
    assert tree_of(inside / "merge-real") == tree_of(inside / "merge-ours")
    assert (inside / "merge-ours/d/f").read_text() == "new"


def test_bind_mount_errors(pair: Pair) -> None:
    n, host = pair.ct.name, pair.host
    for args in ((n, f"{host}/nope", "/mnt/nope", False, True), (n, "rel", "/mnt/x", False, True),
                 (n, f"{host}/dir", "rel", False, True), (n, f"{host}/dir", "/a/../b", False, True),
                 (n, f"{host}/dir", "/etc/hostname", False, False),
                 (n, f"{host}/file", "/etc", False, False),
                 *([(n, f"{host}/dir", "/mnt/dir", False, True)] if pair.userns else [])):
        same(both(pair, "BindMountMachine", "sssbb", *args))


def test_beyond_252_bind_mounts(pair: Pair) -> None:
    """252 mounts through nspawn's propagation directory, which only carries mounts into the
    container where the host's mounts are shared (systemd as PID 1 makes them so); here they are
    private, and 252's move of the mount fails. Ours enters the container's mount namespace.
    Into a user-namespaced container both refuse alike."""
    n, host = pair.ct.name, pair.host
    if pair.userns:  # both refuse, before anything is mounted
        assert same(both(pair, "BindMountMachine", "sssbb", n, f"{host}/dir", "/mnt/dir", False,
                         True)) == ("error", ("org.freedesktop.DBus.Error.NotSupported",
                                              "Can't bind mount on container with user "
                                              "namespacing applied."))
        return
    mnt = pair.root / "mnt"
    for source, dest, read_only in ((f"{host}/dir", "/mnt/dir", False),
                                    (f"{host}/dir", "/mnt/ro", True),
                                    (f"{host}/file", "/mnt/file", False)):
        args = (n, source, dest + "-{who}", read_only, True)
        answers = both(pair, "BindMountMachine", "sssbb", *args)
        assert answers["real"] == ("error", (
            "org.freedesktop.DBus.Error.InvalidArgs",
            f"Failed to mount {source} on {dest}-real in machine's namespace: Invalid argument"))
        assert answers["ours"] == ("ok", ())
        assert tree_of(Path(source)) == tree_of(pair.root / f"{dest.lstrip('/')}-ours")
    with pytest.raises(OSError) as e:
        (mnt / "ro-ours" / "x").write_text("x")
    assert e.value.errno == 30  # EROFS


def test_beyond_252_login_and_shell(pair: Pair) -> None:
    """252 asks the container's own system bus, which busybox has not; ours opens them."""
    n = pair.ct.name
    for member, sig, args in (("OpenMachineLogin", "s", (n,)),
                              ("OpenMachineShell", "sssasas", (n, "", "", [], []))):
        answers = both(pair, member, sig, *args)
        assert answers["real"] == ("error", ("org.freedesktop.DBus.Error.FileNotFound",
                                             f"There is no system bus in container {n}.")), \
            answers["real"]
        kind, (fd, name) = answers["ours"]
        os.close(fd)
        assert kind == "ok" and re.fullmatch(r"/dev/pts/\d+", name), answers["ours"]
