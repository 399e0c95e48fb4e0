"""The registry's life cycle with in-memory stand-ins for the scope backend and pidfds."""

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from machined.core.errors import ErrnoError, JobFailed, MachineExists, RemoteError
from machined.core.machine import Machine, MachineClass
from machined.core.registry import Registry
from machined.core.statefile import StateDir
from machined.core.validate import machine_spec


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.jobs: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.job_mode = False  # CreateMachine gets a start job to wait for
        self.pid_units: dict[int, str] = {}
        self.fail_start: RemoteError | None = None
        self.fail_after_scope: RemoteError | None = None  # the scope is made, then an error
        self.start_gate: asyncio.Event | None = None  # StartTransientUnit answers once it is set
        self._n = 0

    async def start_scope(self, m: Machine, properties: list) -> str:  # type: ignore[type-arg]
        self.calls.append(("start", m.name))
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.fail_start:
            raise self.fail_start
        m.unit = f"machine-{m.name}.scope"
        m.own_scope = m.referenced = True
        self.active.add(m.unit)
        if self.fail_after_scope:
            raise self.fail_after_scope
        if self.job_mode:
            self._n += 1
            job = f"/job/{self._n}"
            self.jobs.add(job)
            return job
        return ""

    async def unit_for_registration(self, m: Machine, sender_pid: int) -> None:
        unit = self.pid_units.get(m.leader)
        if unit is None:
            raise ErrnoError(errno.ENXIO, f"Failed to determine unit of process {m.leader} : x")
        m.unit = unit

    def unit_of_pid(self, pid: int) -> str | None:
        return self.pid_units.get(pid)

    async def stop(self, m: Machine) -> str:
        self.calls.append(("stop", m.unit))
        return ""

    async def kill(self, m: Machine, signo: int) -> None:
        self.calls.append(("kill", f"{m.unit}:{signo}"))

    async def unit_is_active(self, m: Machine) -> bool:
        return m.unit in self.active

    async def job_is_active(self, job: str) -> bool:
        return job in self.jobs

    async def release(self, m: Machine) -> None:
        self.calls.append(("release", m.unit))
        m.referenced = False

    def adopt(self, m: Machine) -> bool:
        m.own_scope = m.unit == f"machine-{m.name}.scope"  # as the systemd1 backend's
        return True


class FakeWatcher:
    def __init__(self) -> None:
        self.dead: set[int] = set()
        self.callbacks: dict[int, Callable[[], None]] = {}
        self.signals: list[tuple[int, int]] = []
        self.started: dict[int, int] = {}  # pid -> CLOCK_MONOTONIC µs of its start

    def watch(self, pid: int, on_exit: Callable[[], None]) -> bool:
        if pid in self.dead:
            return False
        self.callbacks[pid] = on_exit
        return True

    def unwatch(self, pid: int) -> None:
        self.callbacks.pop(pid, None)

    def alive(self, pid: int) -> bool:
        return pid not in self.dead

    def started_after(self, pid: int, monotonic_usec: int) -> bool:
        return self.started.get(pid, 0) > monotonic_usec

    def signal(self, pid: int, signo: int) -> None:
        self.signals.append((pid, signo))

    def exit(self, pid: int) -> None:
        self.dead.add(pid)
        self.callbacks.pop(pid)()


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def machine_new(self, m: Machine) -> None:
        self.events.append(("new", m.name))

    def machine_removed(self, m: Machine) -> None:
        self.events.append(("removed", m.name))

    def machine_freed(self, m: Machine) -> None:
        self.events.append(("freed", m.name))


class World:
    def __init__(self, tmp: Path) -> None:
        self.backend = FakeBackend()
        self.watcher = FakeWatcher()
        self.listener = Listener()
        self.statedir = StateDir(tmp)
        self.registry = Registry(self.backend, self.watcher, self.statedir, self.listener,
                                 bytes(range(16)))

    async def settle(self) -> None:
        for _ in range(10):
            await asyncio.sleep(0)


def spec(name: str = "ct", leader: int = 100, cls: str = "container"):  # type: ignore[no-untyped-def]
    return machine_spec(name, b"", "svc", cls, leader, "/srv", [])


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_create_announces_and_writes_state(world: World) -> None:
    await world.registry.start()
    m = await world.registry.create(spec(), [], 42)
    assert m.started and m.unit == "machine-ct.scope" and m.state == "running"
    assert ("new", "ct") in world.listener.events
    assert (world.statedir.path / "ct").read_text().startswith("# This is private data.")
    assert world.registry.by_pid(100) is m
    assert world.registry.get(".host").cls is MachineClass.HOST  # type: ignore[union-attr]


async def test_leader_zero_means_sender(world: World) -> None:
    m = await world.registry.create(spec(leader=0), [], 4242)
    assert m.leader == 4242


async def test_create_waits_for_start_job(world: World) -> None:
    world.backend.job_mode = True
    task = asyncio.ensure_future(world.registry.create(spec(), [], 1))
    await world.settle()
    assert not task.done()
    m = world.registry.get("ct")
    assert m is not None and m.state == "opening" and m.started
    world.registry.job_removed(m.scope_job, m.unit, "done")
    assert (await task) is m and m.state == "running"
    assert "SCOPE_JOB" not in (world.statedir.path / "ct").read_text()


async def test_failed_start_job_gives_jobfailed_and_removes(world: World) -> None:
    world.backend.job_mode = True
    task = asyncio.ensure_future(world.registry.create(spec(), [], 1))
    await world.settle()
    m = world.registry.get("ct")
    assert m is not None
    world.backend.active.discard(m.unit)
    world.backend.jobs.clear()
    world.registry.job_removed(m.scope_job, m.unit, "failed")
    with pytest.raises(JobFailed, match="Start job for unit machine-ct.scope failed with 'failed'"):
        await task
    await world.settle()
    assert world.registry.get("ct") is None
    assert ("removed", "ct") in world.listener.events


async def test_job_removed_before_start_reply_is_not_lost(world: World) -> None:
    world.backend.job_mode = True
    world.registry.job_removed("/job/1", "machine-ct.scope", "done")  # overtakes the reply
    m = await asyncio.wait_for(world.registry.create(spec(), [], 1), 1)
    assert m.state == "running"


async def test_scope_start_error_is_passed_on_and_machine_dropped(world: World) -> None:
    world.backend.fail_start = RemoteError("org.freedesktop.DBus.Error.ServiceUnknown", "nope")
    with pytest.raises(RemoteError):
        await world.registry.create(spec(), [], 1)
    await world.settle()
    assert world.registry.get("ct") is None
    assert ("new", "ct") not in world.listener.events


async def test_a_failed_call_frees_name_and_leader_before_its_reply(world: World) -> None:
    # The next call, even one already queued behind it, finds neither taken (252's GC runs
    # before every message it reads): no settling in between.
    with pytest.raises(ErrnoError):
        await world.registry.register(spec(), 1)
    assert world.registry.get("ct") is None and "ct" not in [m.name for m in world.registry]
    world.backend.fail_start = RemoteError("org.freedesktop.systemd1.UnitExists", "exists")
    with pytest.raises(RemoteError):
        await world.registry.create(spec(), [], 1)
    assert world.registry.get("ct") is None and world.registry.by_pid(100) is None
    world.backend.fail_start = None
    world.backend.pid_units[100] = "foo.service"
    assert (await world.registry.register(spec(), 1)).unit == "foo.service"
    assert ("new", "ct") in world.listener.events


async def test_a_failed_create_stops_the_scope_it_got(world: World) -> None:
    world.backend.fail_after_scope = RemoteError("org.freedesktop.DBus.Error.Failed", "late")
    with pytest.raises(RemoteError):
        await world.registry.create(spec(), [], 1)
    assert world.registry.get("ct") is None
    assert ("stop", "machine-ct.scope") in world.backend.calls
    await world.settle()
    assert ("release", "machine-ct.scope") in world.backend.calls
    assert ("new", "ct") not in world.listener.events


async def test_a_reload_while_the_scope_is_made_keeps_the_machine(world: World) -> None:
    # systemd's Reloading signal has every machine checked: not the one whose scope is on its
    # way (252's StartTransientUnit call is synchronous; it reads no signal meanwhile).
    world.backend.start_gate = asyncio.Event()
    task = asyncio.ensure_future(world.registry.create(spec(), [], 1))
    await world.settle()
    world.registry.manager_reloaded()
    await world.settle()
    world.backend.start_gate.set()
    m = await task
    await world.settle()
    assert world.registry.get("ct") is m and m.started
    assert ("freed", "ct") not in world.listener.events
    world.backend.active.discard(m.unit)  # the GC it was asked for runs after the start
    world.registry.unit_changed(m.unit)
    await world.settle()
    assert world.registry.get("ct") is None


async def test_unregistered_while_its_scope_is_made(world: World) -> None:
    world.backend.start_gate = asyncio.Event()
    task = asyncio.ensure_future(world.registry.create(spec(), [], 1))
    await world.settle()
    m = world.registry.get("ct")
    assert m is not None
    world.registry.unregister(m)
    world.backend.start_gate.set()
    with pytest.raises(ErrnoError, match="Machine ct went away before it started"):
        await task
    await world.settle()
    assert world.registry.get("ct") is None and world.registry.by_pid(100) is None
    assert ("new", "ct") not in world.listener.events
    assert not (world.statedir.path / "ct").exists()
    assert ("release", "machine-ct.scope") in world.backend.calls
    assert ("stop", "machine-ct.scope") not in world.backend.calls  # as an unregistration


async def test_name_and_leader_uniqueness(world: World) -> None:
    await world.registry.create(spec(), [], 1)
    with pytest.raises(MachineExists, match="Machine 'ct' already exists"):
        await world.registry.create(spec(), [], 1)
    with pytest.raises(ErrnoError) as e:
        await world.registry.create(spec(name="other"), [], 1)
    assert e.value.errno == errno.EEXIST
    await world.settle()
    assert world.registry.get("other") is None


async def test_unknown_class_fails_to_start(world: World) -> None:
    with pytest.raises(ErrnoError) as e:
        await world.registry.create(spec(cls=""), [], 1)
    assert e.value.errno == errno.EOPNOTSUPP
    await world.settle()
    assert world.registry.get("ct") is None


async def test_leader_exit_removes_machine(world: World) -> None:
    await world.registry.create(spec(), [], 1)
    await asyncio.sleep(0)  # the leader is watched once the reply is out
    world.watcher.exit(100)
    await world.settle()
    assert world.registry.get("ct") is None
    assert world.listener.events[-2:] == [("removed", "ct"), ("freed", "ct")]
    assert not (world.statedir.path / "ct").exists()
    assert ("stop", "machine-ct.scope") in world.backend.calls  # our scope: leftovers stopped


async def test_leader_dead_before_it_is_watched(world: World) -> None:
    world.backend.pid_units[100] = "foo.service"
    await world.registry.register(spec(), 1)
    world.watcher.dead.add(100)  # between the reply and the watch
    await world.settle()
    assert world.registry.get("ct") is None


async def test_unregistered_before_the_leader_is_watched(world: World) -> None:
    world.backend.pid_units[100] = "foo.service"
    m = await world.registry.register(spec(), 1)
    world.registry.unregister(m)
    await world.settle()
    assert world.watcher.callbacks == {}


async def test_unit_gone_removes_machine(world: World) -> None:
    m = await world.registry.create(spec(), [], 1)
    world.backend.active.discard(m.unit)
    world.registry.unit_changed(m.unit)
    await world.settle()
    assert world.registry.get("ct") is None


async def test_register_uses_leader_unit_and_never_stops_it(world: World) -> None:
    world.backend.pid_units[100] = "foo.service"
    m = await world.registry.register(spec(), 1)
    assert m.unit == "foo.service" and not m.referenced
    world.backend.pid_units[200] = "foo.service"
    # A second machine in the same unit with an unknown class fails; the first unit survives.
    with pytest.raises(ErrnoError):
        await world.registry.register(spec(name="two", leader=200, cls=""), 1)
    await world.settle()
    assert ("stop", "foo.service") not in world.backend.calls
    assert world.registry.get("ct") is m
    assert (world.statedir.path / "unit:foo.service").is_symlink()


async def test_a_failed_registration_lets_the_backend_forget_the_unit(world: World) -> None:
    world.backend.pid_units[100] = "foo.service"
    world.backend.pid_units[200] = "bar.service"
    await world.registry.register(spec(name="one", leader=200), 1)
    for name, leader in (("two", 100), ("three", 200)):  # a unit of its own, one another's
        with pytest.raises(ErrnoError):
            await world.registry.register(spec(name=name, leader=leader, cls=""), 1)
    await world.settle()
    assert ("release", "foo.service") in world.backend.calls
    assert ("release", "bar.service") not in world.backend.calls


async def test_register_without_unit_fails_with_message(world: World) -> None:
    with pytest.raises(ErrnoError, match="Failed to determine unit of process 100 : "):
        await world.registry.register(spec(), 1)
    await world.settle()
    assert world.registry.get("ct") is None


async def test_unregister_keeps_unit_running(world: World) -> None:
    m = await world.registry.create(spec(), [], 1)
    world.registry.unregister(m)
    await world.settle()
    assert world.registry.get("ct") is None
    assert ("stop", m.unit) not in world.backend.calls
    assert ("release", m.unit) in world.backend.calls


async def test_terminate_and_kill(world: World) -> None:
    m = await world.registry.create(spec(), [], 1)
    await world.registry.kill(m, "leader", 9)
    await world.registry.kill(m, "all", 15)
    assert world.watcher.signals == [(100, 9)]
    assert ("kill", "machine-ct.scope:15") in world.backend.calls
    await world.registry.terminate(m)
    assert m.state == "closing"
    with pytest.raises(ErrnoError) as e:
        await world.registry.terminate(world.registry.host)
    assert e.value.errno == errno.EOPNOTSUPP


async def test_host_is_never_collected(world: World) -> None:
    await world.registry.start()
    world.registry.unregister(world.registry.host)
    world.registry.manager_reloaded()
    await world.settle()
    assert world.registry.get(".host") is world.registry.host


async def test_reload_keeps_live_and_drops_dead(world: World, tmp_path: Path) -> None:
    a = await world.registry.create(spec("a", 100), [], 1)
    await world.registry.create(spec("b", 200), [], 1)
    # a new daemon on the same state directory; b's leader died meanwhile
    again = World(tmp_path)
    again.backend.active = {"machine-a.scope", "machine-b.scope"}
    again.watcher.dead.add(200)
    await again.registry.start()
    await again.settle()
    ra = again.registry.get("a")
    assert ra is not None and ra.started and ra.timestamp == a.timestamp
    assert ("new", "a") in again.listener.events
    assert again.registry.get("b") is None
    assert ("new", "b") not in again.listener.events
    assert not (tmp_path / "b").exists()


async def test_reload_drops_a_machine_whose_pid_went_to_a_later_process(
        world: World, tmp_path: Path) -> None:
    """The leader died while no daemon ran and its PID went to a process started later, in
    the same unit: that process is not the machine's (252 would adopt it)."""
    a = await world.registry.create(spec("a", 100), [], 1)
    b = await world.registry.create(spec("b", 200), [], 1)
    assert a.timestamp is not None and b.timestamp is not None
    again = World(tmp_path)
    again.backend.active = {"machine-a.scope", "machine-b.scope"}
    again.watcher.started = {100: a.timestamp.monotonic - 1, 200: b.timestamp.monotonic + 1}
    await again.registry.start()
    await again.settle()
    assert again.registry.get("a") is not None
    assert again.registry.get("b") is None and not (tmp_path / "b").exists()
    assert ("new", "b") not in again.listener.events
    # a file without the machine's start time cannot tell: its machine is kept
    (tmp_path / "c").write_text("NAME=c\nLEADER=300\nCLASS=container\nSCOPE=c.scope\n")
    third = World(tmp_path)
    third.backend.active = {"machine-a.scope", "c.scope"}
    third.watcher.started = {300: 2**62}
    await third.registry.start()
    assert third.registry.get("c") is not None


async def test_a_reloaded_machine_of_ours_has_its_scope_stopped_when_its_leader_dies(
        world: World, tmp_path: Path) -> None:
    """What is left in the scope of a machine this daemon (or the one before it) made is
    stopped with it, as before the restart; the reference on the unit went with the old
    daemon's connection, so nothing is released."""
    await world.registry.create(spec("a", 100), [], 1)
    again = World(tmp_path)
    again.backend.active = {"machine-a.scope"}
    await again.registry.start()
    await again.settle()
    m = again.registry.get("a")
    assert m is not None and m.own_scope and not m.referenced
    again.backend.active.clear()  # the stop (below) empties it
    again.watcher.exit(100)
    await again.settle()
    assert again.registry.get("a") is None
    # release() lets go of what m.referenced says it holds: nothing here (no UnrefUnit)
    assert again.backend.calls == [("stop", "machine-a.scope"), ("release", "machine-a.scope")]


async def test_reload_keeps_every_live_machine_when_the_backend_answers_later(
        world: World, tmp_path: Path) -> None:
    """Regression (found on a booted systemd): with a backend whose checks await a reply, the GC
    task started during reload dropped the machines not checked yet (all but the first)."""
    for i, name in enumerate(("a", "b", "c")):
        await world.registry.create(spec(name, 100 + i), [], 1)
    again = World(tmp_path)
    again.backend.active = {"machine-a.scope", "machine-b.scope", "machine-c.scope"}

    async def unit_is_active(m: Machine) -> bool:
        await asyncio.sleep(0)  # a bus round trip
        return m.unit in again.backend.active

    again.backend.unit_is_active = unit_is_active  # type: ignore[method-assign]
    await again.registry.start()
    await again.settle()
    assert sorted(m.name for m in again.registry if m.name != ".host") == ["a", "b", "c"]
    assert all((tmp_path / name).exists() for name in ("a", "b", "c"))


async def test_every_listener_is_told(tmp_path: Path) -> None:
    """Listeners: the bus layer and nscd's flusher both hear of machines coming and going."""
    from machined.core.ports import Listeners

    world = World(tmp_path)
    second = Listener()
    world.registry = Registry(world.backend, world.watcher, world.statedir,
                              Listeners(world.listener, second), bytes(range(16)))
    await world.registry.start()
    m = await world.registry.create(spec(), [], 42)
    world.registry.unregister(m)
    assert world.listener.events == second.events == [("new", "ct"), ("removed", "ct"),
                                                      ("freed", "ct")]
