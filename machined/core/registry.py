"""The machine table and its life cycle: create, register, start, stop, kill, unregister,
garbage collection and reload at start-up (spec §6, §7.4).

How a machine goes away, in one place:
  * its leader exits (pidfd)               -> GC queue -> finalize (MachineRemoved)
  * its unit/scope becomes inactive        -> GC queue -> finalize
  * TerminateMachine                       -> stop the unit -> the above
  * UnregisterMachine                      -> finalize at once; the unit keeps running
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ..logs import MACHINE_START, MACHINE_STOP, info_after_reply
from . import eager
from .errors import ErrnoError, JobFailed, MachinedError, MachineExists
from .machine import Machine, MachineClass, Timestamp, timestamp_is_set
from .ports import ProcessWatcher, RegistryListener, ScopeBackend, ScopeProperties
from .statefile import StateDir
from .validate import MachineSpec

log = logging.getLogger(__name__)

HOST_NAME = ".host"
_MAX_EARLY_JOBS = 1024


class Registry:
    def __init__(
        self,
        backend: ScopeBackend,
        watcher: ProcessWatcher,
        statedir: StateDir,
        listener: RegistryListener,
        host_id: bytes = b"",
    ) -> None:
        self.backend = backend
        self.watcher = watcher
        self.statedir = statedir
        self.listener = listener
        self.machines: dict[str, Machine] = {}
        self.leaders: dict[int, Machine] = {}
        self.units: dict[str, Machine] = {}
        self.host = Machine(
            name=HOST_NAME, cls=MachineClass.HOST, id=host_id, root_directory="/",
            unit="-.slice", leader=1, timestamp=Timestamp.boot(),
        )
        self._gc_queue: OrderedDict[int, Machine] = OrderedDict()
        self._gc_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # releases that wait for systemd
        self._shutting_down = False
        self._create_waiters: dict[int, asyncio.Future[str]] = {}
        self._starting: dict[int, bool] = {}  # machines whose scope is being made: GC asked?
        # JobRemoved can overtake the StartTransientUnit reply on our side of the socket.
        self._finished_jobs: OrderedDict[str, str] = OrderedDict()
        self.generation = 0  # bumped whenever a machine enters or leaves the table

    # ----------------------------------------------------------------- queries
    def __iter__(self) -> Iterator[Machine]:
        return iter(list(self.machines.values()))

    def get(self, name: str) -> Machine | None:
        return self.machines.get(name)

    def by_pid(self, pid: int) -> Machine | None:
        """§6.8: the leader table first, then the unit whose cgroup holds pid."""
        m = self.leaders.get(pid)
        if m is not None:
            return m
        unit = self.backend.unit_of_pid(pid)
        return self.units.get(unit) if unit else None

    # ----------------------------------------------------------------- start-up
    async def start(self) -> None:
        """Add .host, reload the state files, collect the dead, start the rest (§1.2, §7.4)."""
        self.statedir.ensure()
        self._add(self.host)
        reloaded = []
        for m in self.statedir.load():
            if m.name in self.machines:
                continue
            self._add(m)
            if self._leader_came_later(m):  # before adopt(), which takes the unit on
                reason = f"PID {m.leader} is a process started after it"
            elif not m.leader or not self.backend.adopt(m):
                reason = f"leader {m.leader} gone"
            else:
                reloaded.append(m)
                continue
            log.debug("Dropping stale machine %s (%s).", m.name, reason)  # 252 says nothing
            self._finalize(m)
            self._free(m)
        # Checked here, not through the GC queue: its task drops machines that are not started
        # yet, which these all are while the checks await systemd's answers.
        for m in reloaded:
            if self.machines.get(m.name) is not m:
                continue
            try:
                await self._gc_one(m, drop_not_started=False)
            except Exception:
                log.exception("Garbage collection of machine %s failed", m.name)
        for m in self:
            if m is self.host or m.started:
                continue
            try:
                await self._start(m, None)
            except MachinedError as e:
                log.warning("Failed to start machine %s: %s", m.name, e.message)
                self.queue_gc(m)

    def _leader_came_later(self, m: Machine) -> bool:
        """A reloaded machine's leader PID now names a process that started after the machine
        did: its leader died while we were away and the PID went to another (252 would adopt
        it). The machine's start time is in its state file; a file without one is trusted."""
        started = m.timestamp.monotonic if m.timestamp is not None else 0
        return (timestamp_is_set(started) and m.leader > 0
                and self.watcher.started_after(m.leader, started))

    def shutdown(self) -> None:
        """Stop collecting; machines, scopes and state files stay for the next start. Our
        AddRef references on scopes go with the bus connection: 252 sends no UnrefUnit either."""
        # Leaders that die from now on are collected by the next start (from the state files):
        # a collection now would race the bus connection going away.
        self._shutting_down = True
        if self._gc_task is not None:
            self._gc_task.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ----------------------------------------------------------------- create / register
    def _new_machine(self, spec: MachineSpec, sender_pid: int) -> Machine:
        if spec.name in self.machines:
            raise MachineExists(spec.name)
        m = Machine(
            name=spec.name, cls=spec.cls, id=spec.id, service=spec.service,
            root_directory=spec.root_directory, leader=spec.leader or sender_pid,
            netif=list(spec.netif),
        )
        self._add(m)
        return m

    async def create(
        self, spec: MachineSpec, properties: ScopeProperties, sender_pid: int
    ) -> Machine:
        """CreateMachine: a new scope for the leader; returns once its start job is done."""
        m = self._new_machine(spec, sender_pid)
        try:
            await self._start(m, properties)
        except BaseException:
            self._abandon(m)
            raise
        if m.scope_job:
            result = self._finished_jobs.pop(m.scope_job, None)
            if result is None:
                waiter = asyncio.get_running_loop().create_future()
                self._create_waiters[id(m)] = waiter
                try:
                    result = await waiter
                finally:
                    self._create_waiters.pop(id(m), None)
            else:
                self._job_done(m, result)
            if result != "done":
                raise JobFailed(m.unit, result)
        self._save(m)
        return m

    async def register(self, spec: MachineSpec, sender_pid: int) -> Machine:
        """RegisterMachine: the leader already runs in a unit; adopt it."""
        m = self._new_machine(spec, sender_pid)
        try:
            await self.backend.unit_for_registration(m, sender_pid)
            await self._start(m, None)
        except BaseException:
            self._abandon(m)
            raise
        return m

    def _abandon(self, m: Machine) -> None:
        """A create or register that failed. A machine that never started leaves the table
        before the error reply goes out, as in 252, whose GC runs before it reads the next bus
        message: a call right after must not find its name or leader taken. A scope of ours
        that it got meanwhile is stopped in the background, as the GC would stop it."""
        if m.started or self._shutting_down:
            self.queue_gc(m)
            return
        if self.machines.get(m.name) is not m:
            return  # collected meanwhile
        eager.spawn(self._stop_own_scope(m), self._tasks, f"Stopping machine {m.name}")
        self._drop(m)

    async def _stop_own_scope(self, m: Machine) -> None:
        """What is left in a scope this daemon made is stopped (the GC's and a failed start's
        clean-up): unlike 252's, never somebody else's unit (spec §6.11)."""
        if not m.own_scope or m.state == "closing":
            return
        try:
            await self._stop(m)
        except MachinedError as e:
            log.warning("Failed to stop machine %s: %s", m.name, e.message)

    async def _start(self, m: Machine, properties: ScopeProperties | None) -> None:
        """§6.3.3, shared by create, register and start-up."""
        if not m.cls.can_start:
            raise ErrnoError(errno.EOPNOTSUPP)
        if m.started:
            return
        other = self.leaders.get(m.leader)
        if other is not None and other is not m:
            raise ErrnoError(errno.EEXIST)
        self.leaders[m.leader] = m
        if not m.unit:
            await self._start_scope(m, properties or [])
        self.units.setdefault(m.unit, m)
        info_after_reply(log, "New machine %s.", m.name, fields=_journal_fields(MACHINE_START, m))
        if m.timestamp is None:
            m.timestamp = Timestamp.now()
        m.started = True
        self._save(m)
        self.listener.machine_new(m)
        # The leader is watched right after the reply: nobody waits for that, and a leader that
        # exits in between is seen all the same (its pidfd cannot be had, or reports the exit).
        asyncio.get_running_loop().call_soon(self._watch_leader, m)

    async def _start_scope(self, m: Machine, properties: ScopeProperties) -> None:
        """The only wait of a start: 252 makes this call synchronously, so nothing else
        happens to the machine meanwhile. Here the GC leaves it alone until the scope is there
        (a Reloading signal would have it drop the machine that is not started yet) and runs
        afterwards if it was asked for."""
        self._starting[id(m)] = False
        try:
            m.scope_job = await self.backend.start_scope(m, properties)
        finally:
            gc_asked = self._starting.pop(id(m))
        if self.machines.get(m.name) is not m:  # unregistered meanwhile: its scope stays
            self._release(m)
            raise ErrnoError(errno.ECANCELED, f"Machine {m.name} went away before it started")
        if gc_asked:
            asyncio.get_running_loop().call_soon(self.queue_gc, m)

    def _watch_leader(self, m: Machine) -> None:
        if self.leaders.get(m.leader) is not m:
            return  # gone already
        if not self.watcher.watch(m.leader, lambda: self._leader_exited(m)):
            self.queue_gc(m)

    # ----------------------------------------------------------------- stop / kill / unregister
    async def terminate(self, m: Machine) -> None:
        await self._stop(m)

    async def _stop(self, m: Machine) -> None:
        if not m.cls.can_start:
            raise ErrnoError(errno.EOPNOTSUPP)
        # "closing" from the start: GC must not send a second stop while this one is on its way
        was_stopping, m.stopping = m.stopping, True
        if m.unit:
            try:
                m.scope_job = await self.backend.stop(m)
            except BaseException:
                m.stopping = was_stopping
                raise
        self._save(m)

    async def kill(self, m: Machine, who: str, signo: int) -> None:
        if not m.cls.can_start:
            raise ErrnoError(errno.EOPNOTSUPP)
        if not m.unit:
            raise ErrnoError(errno.ESRCH)
        if who == "leader":
            try:
                self.watcher.signal(m.leader, signo)
            except OSError as e:
                raise ErrnoError.from_oserror(e) from None
        else:
            await self.backend.kill(m, signo)

    def unregister(self, m: Machine) -> None:
        """Forget the machine now; its unit keeps running (§6.9)."""
        self._drop(m)

    # ----------------------------------------------------------------- events from outside
    def job_removed(self, job: str, unit: str, result: str) -> None:
        m = self.units.get(unit)
        if m is not None and job == m.scope_job:
            self._job_done(m, result)
            waiter = self._create_waiters.get(id(m))
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
            return
        # Perhaps the start job of a machine whose StartTransientUnit reply we have not seen yet.
        self._remember_job(job, result)
        if m is not None:
            self.queue_gc(m)

    def _job_done(self, m: Machine, result: str) -> None:
        m.scope_job = ""
        self._save(m)
        self.queue_gc(m)

    def _remember_job(self, job: str, result: str) -> None:
        self._finished_jobs[job] = result
        while len(self._finished_jobs) > _MAX_EARLY_JOBS:
            self._finished_jobs.popitem(last=False)

    def unit_changed(self, unit: str) -> None:
        """UnitRemoved, PropertiesChanged of a unit, or our own scope emptied."""
        m = self.units.get(unit)
        if m is not None:
            self.queue_gc(m)

    def manager_reloaded(self) -> None:
        for m in self:
            self.queue_gc(m)

    def _leader_exited(self, m: Machine) -> None:
        if self.machines.get(m.name) is m:
            log.debug("Leader %d of machine %s exited.", m.leader, m.name)
            self.queue_gc(m)

    # ----------------------------------------------------------------- garbage collection
    def queue_gc(self, m: Machine) -> None:
        if m is self.host or self._shutting_down:
            return
        self._gc_queue[id(m)] = m
        if self._gc_task is None or self._gc_task.done():
            self._gc_task = asyncio.get_running_loop().create_task(self._gc_drain(True))

    async def _may_gc(self, m: Machine, drop_not_started: bool) -> bool:
        if m.cls is MachineClass.HOST:
            return False
        if id(m) in self._starting:  # see _start_scope
            self._starting[id(m)] = True
            return False
        if drop_not_started and not m.started:
            return True
        if m.leader and not self.watcher.alive(m.leader):
            return True
        if m.scope_job and await self.backend.job_is_active(m.scope_job):
            return False
        return not (m.unit and await self.backend.unit_is_active(m))

    async def _gc_drain(self, drop_not_started: bool) -> None:
        while self._gc_queue:
            _, m = self._gc_queue.popitem(last=False)
            if self.machines.get(m.name) is not m:
                continue
            try:
                await self._gc_one(m, drop_not_started)
            except Exception:
                log.exception("Garbage collection of machine %s failed", m.name)

    async def _gc_one(self, m: Machine, drop_not_started: bool) -> None:
        if not await self._may_gc(m, drop_not_started):
            return
        await self._stop_own_scope(m)
        if self.machines.get(m.name) is m and await self._may_gc(m, drop_not_started):
            self._drop(m)

    def _drop(self, m: Machine) -> None:
        """Finalize and free m; the backend forgets its scope, in the background if that means
        waiting for systemd."""
        # the unit is this machine's alone, or nobody's (a registration that failed after the
        # backend had started to watch the unit): the backend may forget it
        owns_unit = self.units.get(m.unit, m) is m
        self._finalize(m)
        if m is self.host:  # never leaves the table
            return
        self._free(m)
        if m.referenced or (m.unit and owns_unit):
            self._release(m)

    def _release(self, m: Machine) -> None:
        """The backend forgets m's unit, in the background if that means waiting for systemd."""
        eager.spawn(self.backend.release(m), self._tasks, f"Releasing the unit of machine {m.name}")

    def _finalize(self, m: Machine) -> None:
        """Files unlinked, MachineRemoved emitted (if it was announced)."""
        if m is self.host:
            self.statedir.remove_unit_link(m.unit)
            return
        if m.started:
            info_after_reply(log, "Machine %s terminated.", m.name,
                             fields=_journal_fields(MACHINE_STOP, m))
            m.stopping = True
        if not m.finalized:
            if self.units.get(m.unit) in (None, m):
                self.statedir.remove(m)
            else:
                self.statedir.remove(Machine(name=m.name))  # the unit link is another's
            m.finalized = True
        if m.started:
            m.started = False
            self.listener.machine_removed(m)

    def _free(self, m: Machine) -> None:
        self._gc_queue.pop(id(m), None)
        waiter = self._create_waiters.pop(id(m), None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(ErrnoError(errno.ECANCELED,
                                            f"Machine {m.name} went away before it started"))
        if m.unit and self.units.get(m.unit) is m:
            del self.units[m.unit]
        if self.leaders.get(m.leader) is m:
            del self.leaders[m.leader]
            self.watcher.unwatch(m.leader)
        if self.machines.get(m.name) is m:
            del self.machines[m.name]
            self.generation += 1
            self.listener.machine_freed(m)

    # ----------------------------------------------------------------- helpers
    def _add(self, m: Machine) -> None:
        self.machines[m.name] = m
        self.generation += 1

    def _save(self, m: Machine) -> None:
        if m.started:
            self.statedir.save(m)


def _journal_fields(message_id: str, m: Machine) -> dict[str, str]:
    """What 252 adds to its journal entries of a machine's start and stop."""
    return {"MESSAGE_ID": message_id, "NAME": m.name, "LEADER": str(m.leader)}
