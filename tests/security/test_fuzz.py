"""Hostile input (hypothesis): thousands of calls with random arguments, right and wrong
signatures, huge strings and odd file descriptors, to every method the daemon introspects. Every
call gets a reply or a proper D-Bus error, the daemon never crashes, hangs or logs a traceback,
and its memory and file descriptors do not grow without bound.

The host stays out of reach: the daemon runs with a private image pool (--image-root) and
cgroupfs scopes; leaders are the test's own sleepers (or PIDs that cannot exist); methods that
act inside a machine (shell, copy, bind mount, PTY) are only aimed at machines that do not
exist; `.host` is never a target of a changing call.
"""

from __future__ import annotations

import contextlib
import os
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdbus.sd_bus_internals import SdBus, SdBusBaseError

from machined.bus.client import remote_error
from tests.helpers.busdaemon import BusDaemon
from tests.helpers.client import DEST, MANAGER_PATH, connect
from tests.helpers.daemon import Machined

from .conftest import (
    Sleepers,
    image_root,
    make_image,
    remove_tree,
    rss_kib,
    start_daemon,
    stop_daemon,
)

EXAMPLES = int(os.environ.get("MACHINED_FUZZ_EXAMPLES", "3000"))
# Machines to aim at; one that a call removed is replaced under a new name (an unregistered
# machine's scope keeps running, so its name stays taken by the scope).
MACHINES = ["fuzz1", "fuzz2"]
_machine_counter = [2]
IMAGES = ["fuzzimg", "fuzz.img", ".fuzzhidden"]
# Acting inside a machine: never aimed at a machine that exists (it would be the host here).
INSIDE = {"OpenMachinePTY", "OpenMachineLogin", "OpenMachineShell", "BindMountMachine",
          "CopyFromMachine", "CopyToMachine", "CopyFromMachineWithFlags",
          "CopyToMachineWithFlags", "OpenMachineRootDirectory", "OpenPTY", "OpenLogin",
          "OpenShell", "BindMount", "CopyFrom", "CopyTo", "CopyFromWithFlags",
          "CopyToWithFlags", "OpenRootDirectory"}
IMAGE_CHANGES = {"RemoveImage", "RenameImage", "CloneImage", "MarkImageReadOnly",
                 "SetImageLimit"}
LEADER_ARG = {"CreateMachine": 4, "CreateMachineWithNetwork": 4, "RegisterMachine": 4,
              "RegisterMachineWithNetwork": 4}
PROPER_ERROR_PREFIXES = ("org.freedesktop.DBus.Error.", "org.freedesktop.machine1.",
                         "System.Error.", "org.freedesktop.systemd1.")
MACHINE1 = "org.freedesktop.machine1."
NO_ANSWER = ("org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Timeout",
             "org.freedesktop.DBus.Error.Disconnected")


@dataclass(frozen=True)
class Target:
    path: str
    iface: str
    member: str
    sig: str


# ------------------------------------------------------------------ values of a signature
def split_signature(sig: str) -> list[str]:
    """The complete types of a signature ("sa{ss}(ii)" -> ["s", "a{ss}", "(ii)"])."""
    out, i = [], 0
    while i < len(sig):
        j = _end_of_type(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _end_of_type(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return _end_of_type(sig, i + 1)
    if c in "({":
        close, depth, j = {"(": ")", "{": "}"}[c], 0, i
        while True:
            if sig[j] == c:
                depth += 1
            elif sig[j] == close:
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
    return i + 1


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=40)
HUGE = st.builds(lambda c, n: c * n, st.sampled_from(["a", "/", "é", ".", "\x01", "_2e"]),
                 st.integers(256, 300_000))
NAMES = st.sampled_from(["", ".", "..", "a/b", "../x", "/", ".host", "all", "leader", "hidden",
                         "/tmp/fuzz-nonexistent", "-", "a" * 64, "a" * 65, "a" * 255,
                         "a" * 256, ".#x", "x.raw", *IMAGES])
STRING = st.one_of(TEXT, NAMES, HUGE, st.deferred(lambda: st.sampled_from(MACHINES)))
OBJECT_PATH = st.from_regex(r"\A(/|(/[A-Za-z0-9_]{1,8}){1,4})\Z")
SIGNATURES = ["", "s", "u", "i", "t", "b", "y", "h", "ay", "as", "ai", "a{ss}", "a(sv)", "v",
              "(su)", "ss", "su", "ssi", "sss", "ssst", "sssbb", "sssasas", "sayssus",
              "sayssusa(sv)", "sayssusai", "sayssusaia(sv)", "ssb", "sb", "st", "ssv", "x", "d",
              "o", "g", "aay", "a{sv}"]


def value_of(t: str, fds: list[int]) -> st.SearchStrategy[Any]:
    simple: dict[str, st.SearchStrategy[Any]] = {
        "y": st.integers(0, 255), "b": st.booleans(), "n": st.integers(-2**15, 2**15 - 1),
        "q": st.integers(0, 2**16 - 1), "i": st.integers(-2**31, 2**31 - 1),
        "u": st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 65535, 2**32 - 1])),
        "x": st.integers(-2**63, 2**63 - 1),
        "t": st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1])),
        "d": st.floats(allow_nan=True), "s": STRING, "o": OBJECT_PATH,
        "g": st.sampled_from(SIGNATURES), "h": st.sampled_from(fds),
    }
    if t in simple:
        return simple[t]
    if t == "ay":
        return st.one_of(st.binary(max_size=40), st.binary(min_size=16, max_size=16),
                         st.builds(bytes, st.integers(1000, 100_000)))
    if t.startswith("a{"):
        k, v = split_signature(t[2:-1])
        return st.dictionaries(value_of(k, fds), value_of(v, fds), max_size=4)
    if t.startswith("a"):
        return st.lists(value_of(t[1:], fds), max_size=4)
    if t.startswith("("):
        return st.tuples(*(value_of(x, fds) for x in split_signature(t[1:-1])))
    if t == "v":
        inner = st.sampled_from(["s", "u", "b", "as", "t", "i"])
        return inner.flatmap(lambda s: st.tuples(st.just(s), value_of(s, fds)))
    raise AssertionError(f"no strategy for {t!r}")


def args_of(sig: str, fds: list[int]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(*(value_of(t, fds) for t in split_signature(sig)))


# ------------------------------------------------------------------ the world
class Fuzz:
    def __init__(self, bus: BusDaemon, daemon: Machined, images: Path,
                 sleepers: Sleepers) -> None:
        self.daemon, self.images, self.sleepers = daemon, images, sleepers
        self.bus: SdBus = connect(bus)  # a hang shows as Timeout/NoReply
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.fds = self._odd_fds()
        self.targets = self._targets()

    def _odd_fds(self) -> list[int]:
        r, w = os.pipe()
        a, b = socket.socketpair()
        self._keep = [a, b]
        return [os.open("/dev/null", os.O_RDWR), r, w, os.dup(a.fileno()),
                os.open("/", os.O_RDONLY | os.O_DIRECTORY), os.open("/", os.O_PATH)]

    def call(self, path: str, iface: str, member: str, sig: str,
             args: tuple[Any, ...]) -> tuple[str, Any]:
        msg = self.bus.new_method_call_message(DEST, path, iface, member)
        if sig:
            msg.append_data(sig, *args)
        self.calls += 1
        try:
            reply = self.bus.call(msg)
        except SdBusBaseError as e:
            err = remote_error(e)
            self.errors[err.name] = self.errors.get(err.name, 0) + 1
            return "error", (err.name, err.message)
        return "ok", reply.parse_to_tuple()

    def _targets(self) -> list[Target]:
        self.prepare()
        paths = [MANAGER_PATH, f"{MANAGER_PATH}/machine/{MACHINES[0]}",
                 f"{MANAGER_PATH}/image/{IMAGES[0]}", "/org/freedesktop/LogControl1"]
        found: list[Target] = []
        for path in paths:
            kind, answer = self.call(path, "org.freedesktop.DBus.Introspectable", "Introspect",
                                     "", ())
            assert kind == "ok", answer
            for iface in ET.fromstring(answer[0]).iter("interface"):
                for m in iface.iter("method"):
                    sig = "".join(a.get("type", "") for a in m.iter("arg")
                                  if a.get("direction", "in") == "in")
                    found.append(Target(path, iface.get("name", ""), m.get("name", ""), sig))
        return found

    def prepare(self) -> None:
        """Machines and images to aim at; made again if a call removed them."""
        for name in IMAGES:
            make_image(self.images, name)
        for i, name in enumerate(MACHINES):
            kind, _ = self.call(MANAGER_PATH, "org.freedesktop.machine1.Manager", "GetMachine",
                                "s", (name,))
            if kind != "ok":
                _machine_counter[0] += 1
                name = MACHINES[i] = f"fuzz{_machine_counter[0]}"
                leader = self.sleepers.start_orphan()
                kind, answer = self.call(MANAGER_PATH, "org.freedesktop.machine1.Manager",
                                         "RegisterMachine", "sayssus",
                                         (name, b"", "fuzz", "container", leader, ""))
                assert kind == "ok", answer

    def defuse(self, t: Target, sig: str, args: tuple[Any, ...], draw: Any) -> tuple[Any, ...]:
        """Keep a call with the method's own signature away from the host."""
        if sig != t.sig or not args:
            return args
        a = list(args)
        if t.member in INSIDE and t.iface.endswith(".Manager"):
            a[0] = "fuzz-nonexistent-" + str(a[0])[:20]
        if t.member in LEADER_ARG:
            a[LEADER_ARG[t.member]] = draw(st.sampled_from(["sleeper", 1, "gone"]))
            if a[4] == "sleeper":
                a[4] = self.sleepers.start_orphan()
            elif a[4] == "gone":
                a[4] = draw(st.integers(2**22 + 1, 2**32 - 1))  # above any pid_max
        if t.member in IMAGE_CHANGES and a[0] == ".host":
            a[0] = IMAGES[0]
        if t.member in ("KillMachine", "TerminateMachine", "UnregisterMachine") \
                and a[0] == ".host":
            a[0] = MACHINES[0]
        return tuple(a)

    def close(self) -> None:
        self.bus.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for s in self._keep:
            s.close()


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    bus = BusDaemon("open")
    images = image_root()
    sleepers = Sleepers()
    daemon = start_daemon(bus, images)
    f = None
    try:
        f = Fuzz(bus, daemon, images, sleepers)
        yield f
    finally:
        try:
            if f is not None:
                f.close()
            sleepers.close()
            errors = stop_daemon(daemon)
        finally:
            bus.stop()
            remove_tree(images)
    assert not errors, "machined logged unexpected errors:\n" + "\n".join(errors[:20])


def target_of(t: Target) -> str:
    return f"{t.iface}.{t.member}"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_every_method_is_fuzzed(fuzz: Fuzz) -> None:
    members = {target_of(t) for t in fuzz.targets}
    for wanted in ("org.freedesktop.machine1.Manager.CreateMachine",
                   "org.freedesktop.machine1.Machine.OpenShell",
                   "org.freedesktop.machine1.Image.Clone",
                   "org.freedesktop.DBus.Properties.Set",
                   "org.freedesktop.DBus.Peer.Ping"):
        assert wanted in members
    assert len(members) > 60


def test_fuzz(fuzz: Fuzz) -> None:
    pid = fuzz.daemon.pid
    warm = min(300, EXAMPLES // 10)
    state: dict[str, int] = {"n": 0}
    baseline: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_call(data: st.DataObject) -> None:
        state["n"] += 1
        if state["n"] == warm:
            baseline["rss"], baseline["fds"] = rss_kib(pid), fd_count(pid)
        if state["n"] % 200 == 0:
            fuzz.prepare()
        t = data.draw(st.sampled_from(fuzz.targets))
        right = data.draw(st.integers(0, 3)) > 0  # mostly the right signature
        sig = t.sig if right else data.draw(st.sampled_from(SIGNATURES))
        args = data.draw(args_of(sig, fuzz.fds))
        args = fuzz.defuse(t, sig, args, data.draw)
        path = t.path
        if t.iface.endswith(".Machine"):
            path = f"{MANAGER_PATH}/machine/" + (
                "fuzz_2dnonexistent" if t.member in INSIDE else data.draw(st.sampled_from(MACHINES)))
        kind, answer = fuzz.call(path, t.iface, t.member, sig, args)
        if kind == "error":
            name, message = answer
            assert name.startswith(PROPER_ERROR_PREFIXES), (t, sig, answer)
            assert name not in NO_ANSWER, (t, sig, answer)
            # no Python traceback in an answer (hypothesis also draws the strings it finds in
            # the code, this word among them, and an answer may quote its argument)
            assert "Traceback" not in message or "Traceback" in repr(args), (t, sig, answer)
            if sig != t.sig and t.iface.startswith(MACHINE1):
                assert name in ("org.freedesktop.DBus.Error.InvalidArgs",
                                "org.freedesktop.DBus.Error.UnknownObject"), (t, sig, answer)
        elif t.iface.startswith(MACHINE1):
            # sd-bus checks the whole signature of vtable methods only: Peer, Introspectable
            # and Properties read what they need and ignore the rest, and so do we
            assert sig == t.sig, (t, sig, "a wrong signature was accepted")
        assert fuzz.daemon.proc is not None and fuzz.daemon.proc.poll() is None, "daemon died"

    one_call()
    assert fuzz.calls >= EXAMPLES
    kind, answer = fuzz.call(MANAGER_PATH, "org.freedesktop.machine1.Manager", "ListMachines",
                             "", ())
    assert kind == "ok", answer
    rss, fds = rss_kib(pid), fd_count(pid)
    print(f"\nfuzz: {fuzz.calls} calls, errors by name {sorted(fuzz.errors.items())}; "
          f"RSS {baseline.get('rss')} KiB after warm-up -> {rss} KiB; fds "
          f"{baseline.get('fds')} -> {fds}")
    Path(os.environ.get("MACHINED_FUZZ_REPORT", "/dev/null")).write_text(
        f"calls={fuzz.calls} rss_warm_kib={baseline.get('rss')} rss_end_kib={rss} "
        f"fds_warm={baseline.get('fds')} fds_end={fds}\n")
    # generous bounds: growth from caches is fine, growth per call is not
    assert rss - baseline["rss"] < 64 * 1024
    assert fds - baseline["fds"] < 32

