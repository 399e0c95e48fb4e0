"""Standalone scopes: the daemon itself manages machine.slice/machine-NAME.scope in the cgroup2
hierarchy when no org.freedesktop.systemd1 is there to ask (hosts and containers without
systemd as PID 1).

What systemd would do for a scope, done here:
  * CreateMachine: make the cgroup (honouring the caller's Slice=) and move the leader in;
  * RegisterMachine: use the unit the leader's cgroup names; if it is in none (nothing manages
    it), give it a scope of its own, together with the caller when the caller is the leader's
    parent in the same cgroup (that is what `systemd-nspawn --keep-unit` means by "my unit");
  * stop: KillSignal= (default SIGTERM) to the leader (KillMode=mixed, nspawn's choice) or to
    every process, SIGKILL to what is left after TimeoutStopUSec=;
  * a scope we made is removed as soon as it is empty, and the registry is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..core.errors import ErrnoError, InvalidArgs, RemoteError
from ..core.machine import Machine
from ..core.names import machine_scope_name, unit_name_is_valid
from ..core.ports import ScopeProperties
from ..linux import cgroups
from ..linux.inotify import IN_MODIFY, Inotify
from ..linux.process import parent_pid, pid_exists
from . import common

log = logging.getLogger(__name__)

DEFAULT_SLICE = "machine.slice"
# An emptied scope that something joined just before its rmdir is tried again after 0.2 s, then
# twice as long each time, for about half a minute.
_REMOVE_RETRY = 0.2
_REMOVE_ATTEMPTS = 7


@dataclass
class Scope:
    unit: str
    path: str  # cgroup path relative to the hierarchy root
    owned: bool  # we created it, so we remove it when it empties
    kill_signal: int = signal.SIGTERM
    kill_mode: str = "control-group"
    stop_timeout: float = 90.0
    watch: int = -1
    stopping: asyncio.Task[None] | None = None


class CgroupfsBackend:
    name = "cgroupfs"

    def __init__(
        self,
        hierarchy: cgroups.Hierarchy,
        inotify: Inotify,
        unit_changed: Callable[[str], None],
        stop_timeout: float = 90.0,
        mirror: cgroups.Hierarchy | None = None,
    ) -> None:
        self.hierarchy = hierarchy
        self.inotify = inotify
        self.unit_changed = unit_changed
        self.stop_timeout = stop_timeout
        # A hybrid host's name=systemd hierarchy, where nspawn mirrors the scope it is in
        self.mirror = mirror
        self.scopes: dict[str, Scope] = {}
        self._scopes_found: dict[str, str] | None = None  # machine scopes seen at start-up

    # ------------------------------------------------------------- scope bookkeeping
    def _track(self, scope: Scope) -> None:
        old = self.scopes.pop(scope.unit, None)
        if old is not None and old.watch >= 0:
            self.inotify.remove(old.watch)
        self.scopes[scope.unit] = scope
        # Watched right after the reply: the kernel's walk of the cgroup path makes the watch one
        # of a registration's dearest steps, and nobody waits for it.
        asyncio.get_running_loop().call_soon(self._watch, scope)

    def _watch(self, scope: Scope) -> None:
        if self.scopes.get(scope.unit) is not scope:
            return  # forgotten meanwhile
        try:
            scope.watch = self.inotify.add(self.hierarchy.fs(scope.path) + "/cgroup.events",
                                           IN_MODIFY, lambda: self._events(scope))
        except OSError as e:
            log.debug("Cannot watch %s: %s", scope.path, e)
            return
        self._events(scope)  # it may have emptied before the watch was there

    def _events(self, scope: Scope) -> None:
        if self._forget_if_empty(scope):
            self.unit_changed(scope.unit)

    def _forget_if_empty(self, scope: Scope) -> bool:
        """False while the scope holds processes, and while that cannot be told (EMFILE, say:
        then it counts as active, as errors do in the systemd1 backend, and the leader's exit
        still has its machine checked)."""
        try:
            if self.hierarchy.populated(scope.path):
                return False
        except OSError as e:
            log.warning("Cannot tell whether scope %s is empty: %s", scope.unit, e.strerror)
            return False
        self._untrack(scope)
        if scope.owned:
            self._remove(scope.path)
        return True

    def _remove(self, path: str, attempt: int = 0) -> None:
        """Remove an empty scope we made, with the slices it leaves empty, as systemd collects
        them: in the cgroup2 hierarchy and in its mirror in the name=systemd one. A process
        can join it between the check that it is empty and the rmdir (a shell's helper that
        enters the machine as it goes, and leaves at once): then again a little later."""
        removed = all(self._remove_from(h, path) for h in (self.hierarchy, self.mirror)
                      if h is not None)
        if not removed and attempt < _REMOVE_ATTEMPTS:
            asyncio.get_running_loop().call_later(_REMOVE_RETRY * 2**attempt, self._remove, path,
                                                  attempt + 1)

    @staticmethod
    def _remove_from(hierarchy: cgroups.Hierarchy, path: str) -> bool:
        try:
            if hierarchy.exists(path) and not hierarchy.remove(path):
                return False
            hierarchy.remove_empty_parents(path)
        except OSError as e:  # EMFILE, say
            log.debug("Cannot remove %s yet: %s", path, e)
            return False
        return True

    def _new_scope(self, unit: str, slice_name: str, pids: list[int],
                   registering: bool = False) -> Scope:
        path = cgroups.slice_path(slice_name) + "/" + unit
        if self.hierarchy.exists(path) and self.hierarchy.populated(path):
            raise RemoteError("org.freedesktop.systemd1.UnitExists", f"Unit {unit} already exists.")
        try:
            self.hierarchy.create(path)
            for pid in pids:
                self.hierarchy.attach(path, pid)
        except OSError as e:
            self.hierarchy.remove(path)
            if registering and e.errno == errno.EINVAL:  # a kernel thread: in no unit, as 252
                raise common.no_unit(pids[0], errno.ENXIO) from None
            err = errno.ESRCH if e.errno in (errno.ESRCH, errno.EINVAL) else (e.errno or errno.EIO)
            raise ErrnoError(err, f"Failed to move PID {pids[0]} into scope {unit}: "
                                  f"{ErrnoError(err).message}") from None
        return Scope(unit=unit, path=path, owned=True, stop_timeout=self.stop_timeout)

    # ------------------------------------------------------------- ScopeBackend
    async def start_scope(self, m: Machine, properties: ScopeProperties) -> str:
        unit = machine_scope_name(m.name)
        settings = scope_settings(properties)  # refused before anything is made
        scope = self._new_scope(unit, settings.slice, [m.leader])
        apply_stop_settings(scope, settings)
        note = stop_note(settings)
        if note:  # without PID 1, nobody else keeps them for the daemon's next start
            self._keep_note(scope, note)
        self._track(scope)
        m.unit = unit
        m.own_scope = m.referenced = True
        return ""

    async def unit_for_registration(self, m: Machine, sender_pid: int) -> None:
        try:
            m.unit, cgroup = common.leader_unit(m.leader)
        except ErrnoError as e:
            if e.errno != errno.ENXIO:
                raise
        else:
            path = cgroups.unit_prefix(cgroup, m.unit)
            if path is not None and m.unit not in self.scopes:
                self._track(Scope(unit=m.unit, path=path, owned=False,
                                  stop_timeout=self.stop_timeout))
            return
        # Nothing manages the leader: give it a scope of its own.
        pids = [m.leader]
        if self._is_supervisor(sender_pid, m.leader):
            pids.append(sender_pid)
        unit = machine_scope_name(m.name)
        self._track(self._new_scope(unit, DEFAULT_SLICE, pids, registering=True))
        m.unit = unit
        m.own_scope = m.referenced = True

    @staticmethod
    def _is_supervisor(sender_pid: int, leader: int) -> bool:
        """The caller is the leader's parent in the same cgroup, as `systemd-nspawn --keep-unit`
        is: the leader's unit is the caller's own, so both belong in the new scope. Any other
        caller (a manager registering some process) stays where it is."""
        if sender_pid in (0, 1, leader) or parent_pid(leader) != sender_pid:
            return False
        try:
            return cgroups.pid_cgroup(sender_pid) == cgroups.pid_cgroup(leader)
        except ErrnoError:
            return False

    def unit_of_pid(self, pid: int) -> str | None:
        return common.unit_of_pid(pid)

    async def stop(self, m: Machine) -> str:
        scope = self.scopes.get(m.unit)
        if scope is not None and scope.stopping is None:
            deadline = time.monotonic() + scope.stop_timeout
            # KillSignal= now: a stop that cannot signal (EMFILE, say) is the caller's error
            self._signal_stop(scope, m.leader)
            if scope.owned:  # a restart in between must not forget the SIGKILL: PID 1 would not
                self._keep_note(scope, stop_note(settings_of(scope), deadline))
            self._kill_at(scope, deadline)
        return ""

    def _signal_stop(self, scope: Scope, leader: int) -> None:
        try:
            if scope.kill_mode == "mixed":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, scope.kill_signal)
            else:
                self.hierarchy.kill(scope.path, scope.kill_signal)
        except OSError as e:
            raise ErrnoError.from_oserror(e) from None

    def _keep_note(self, scope: Scope, note: bytes) -> None:
        try:
            self.hierarchy.write_note(scope.path, note)
        except OSError as e:
            log.debug("Cannot keep how %s is to be stopped: %s", scope.unit, e)

    def _kill_at(self, scope: Scope, deadline: float) -> None:
        scope.stopping = asyncio.get_running_loop().create_task(self._stop(scope, deadline))

    async def _stop(self, scope: Scope, deadline: float) -> None:
        """After KillSignal=: SIGKILL for what is left at the deadline (CLOCK_MONOTONIC). A
        cgroup file that cannot be read or written for a while (EMFILE, say) only delays it."""
        try:
            while not await self._emptied_by(scope, deadline):
                log.info("Scope %s did not stop in time, killing it.", scope.unit)
                try:
                    self.hierarchy.kill(scope.path, signal.SIGKILL)
                    return
                except OSError as e:
                    log.warning("Failed to kill scope %s, trying again: %s", scope.unit, e)
                    deadline = time.monotonic() + 1
        finally:
            scope.stopping = None

    async def _emptied_by(self, scope: Scope, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                if not self.hierarchy.populated(scope.path):
                    return True
            except OSError as e:
                log.debug("Cannot tell whether %s is empty: %s", scope.unit, e)
            await asyncio.sleep(0.1)
        return False

    async def kill(self, m: Machine, signo: int) -> None:
        scope = self.scopes.get(m.unit)
        if scope is None:
            raise ErrnoError(errno.ENOENT)
        self.hierarchy.kill(scope.path, signo)

    async def unit_is_active(self, m: Machine) -> bool:
        scope = self.scopes.get(m.unit)
        if scope is None:
            return False
        return not self._forget_if_empty(scope)

    async def job_is_active(self, job: str) -> bool:
        return False

    async def release(self, m: Machine) -> None:
        m.referenced = False
        scope = self.scopes.get(m.unit)
        if scope is None:
            return
        if scope.owned:
            self._forget_if_empty(scope)
        else:  # someone else's unit: stop watching it, it outlives the machine
            self._untrack(scope)

    def _untrack(self, scope: Scope) -> None:
        if self.scopes.get(scope.unit) is scope:
            del self.scopes[scope.unit]
            if scope.watch >= 0:
                self.inotify.remove(scope.watch)

    def adopt(self, m: Machine) -> bool:
        if not pid_exists(m.leader):
            self._remove_stale_scope(m)
            return False
        if not m.unit:
            return True
        try:
            path = cgroups.unit_prefix(cgroups.pid_cgroup(m.leader), m.unit)
        except ErrnoError:
            return False
        if path is None:
            return False  # the leader is not in its unit: the PID was reused
        owned = m.unit == machine_scope_name(m.name) and path.endswith("/" + m.unit)
        scope = Scope(unit=m.unit, path=path, owned=owned, stop_timeout=self.stop_timeout)
        self._track(scope)
        if owned:
            note = self.hierarchy.read_note(path)
            apply_stop_settings(scope, read_stop_note(note))
            self._resume_stop(scope, note)
        m.own_scope = m.referenced = owned
        return True

    def _resume_stop(self, scope: Scope, note: bytes | None) -> None:
        """A stop the daemon was killed or stopped in the middle of goes on to its SIGKILL."""
        deadline = read_stop_deadline(note)
        if deadline is not None:
            log.debug("Scope %s is being stopped, until %.1f s from now.", scope.unit,
                      deadline - time.monotonic())
            self._kill_at(scope, deadline)

    def collect_orphans(self) -> None:
        """After the reload: scopes of ours that no machine claims are registrations the daemon
        was killed in the middle of (after making the scope, before writing the state file).
        Nobody asked for them to be kept; remove each once it is empty."""
        scopes = self._scopes_at_start()
        for unit, path in scopes.items():
            if unit in self.scopes:
                continue
            scope = Scope(unit=unit, path=path, owned=True, stop_timeout=self.stop_timeout)
            if not self._forget_if_empty(scope):
                log.info("Scope %s belongs to no machine; removing it once it is empty.", unit)
                self._track(scope)
                self._resume_stop(scope, self.hierarchy.read_note(path))
        # mirrors whose cgroup2 scope went without them: empty ones go (rmdir fails otherwise)
        if self.mirror is not None:
            for unit, path in self.mirror.machine_scopes().items():
                if unit not in scopes and unit not in self.scopes:
                    self._remove_from(self.mirror, path)
        self._scopes_found = None

    def _scopes_at_start(self) -> dict[str, str]:
        """The machine scopes in any slice (a caller's Slice= puts them anywhere), looked for
        once at start-up: those of machines that went while the daemon was away."""
        if self._scopes_found is None:
            self._scopes_found = self.hierarchy.machine_scopes()
        return self._scopes_found

    def _remove_stale_scope(self, m: Machine) -> None:
        """A machine dropped at start-up: remove its scope if we made it and it is empty."""
        if m.unit != machine_scope_name(m.name):
            return
        path = self._scopes_at_start().get(m.unit)
        if path is not None and not self.hierarchy.populated(path):
            self._remove(path)

    async def close(self) -> None:
        for scope in list(self.scopes.values()):
            if scope.stopping is not None:
                scope.stopping.cancel()


@dataclass(frozen=True)
class ScopeSettings:
    slice: str = DEFAULT_SLICE
    kill_signal: int = signal.SIGTERM
    kill_mode: str = "control-group"
    stop_timeout: float | None = None  # seconds; None: the daemon's --stop-timeout


KILL_MODES = ("control-group", "process", "mixed", "none")
DEFAULT_STOP = ScopeSettings()
# the scope properties this backend applies, with their D-Bus types
APPLIED_TYPES = {"Slice": "s", "KillSignal": "i", "KillMode": "s", "TimeoutStopUSec": "t"}


def scope_settings(properties: ScopeProperties) -> ScopeSettings:
    """The scope properties this backend applies, refused as systemd's StartTransientUnit
    refuses them (a value of another D-Bus type is ENXIO, as sd_bus_message_read() gives;
    the rest are InvalidArgs in systemd's words). Others are accepted and not applied."""
    settings = ScopeSettings()
    for name, (sig, value) in properties:
        if name not in APPLIED_TYPES:
            continue
        if sig != APPLIED_TYPES[name]:
            raise ErrnoError(errno.ENXIO)
        if name == "Slice":
            if not unit_name_is_valid(value) or "@" in value:
                raise InvalidArgs(f"Invalid unit name '{value}'")
            if not value.endswith(".slice"):
                raise InvalidArgs(f"Unit name '{value}' is not a slice")
            settings = replace(settings, slice=value)
        elif name == "KillSignal":
            if not 1 <= value < 65:  # SIGNAL_VALID()
                raise InvalidArgs(f"Invalid KillSignal setting: {value}")
            settings = replace(settings, kill_signal=value)
        elif name == "KillMode":
            if value not in KILL_MODES:
                raise InvalidArgs(f"Invalid KillMode setting: {value}")
            settings = replace(settings, kill_mode=value)
        else:
            settings = replace(settings, stop_timeout=value / 1e6)
    return settings


def apply_stop_settings(scope: Scope, settings: ScopeSettings) -> None:
    scope.kill_signal = settings.kill_signal
    scope.kill_mode = settings.kill_mode
    if settings.stop_timeout is not None:
        scope.stop_timeout = settings.stop_timeout


def settings_of(scope: Scope) -> ScopeSettings:
    return ScopeSettings(kill_signal=scope.kill_signal, kill_mode=scope.kill_mode,
                         stop_timeout=scope.stop_timeout)


def stop_note(settings: ScopeSettings, stopping_until: float | None = None) -> bytes:
    """How the scope is to be stopped, in systemd's words, when the caller asked for anything
    but the defaults (empty otherwise), and when a stop under way gives up waiting (its
    CLOCK_MONOTONIC deadline, which a restart does not change): kept with the cgroup for the
    daemon's next start."""
    if replace(settings, slice=DEFAULT_SLICE) == DEFAULT_STOP and stopping_until is None:
        return b""
    lines = [f"KillSignal={settings.kill_signal}", f"KillMode={settings.kill_mode}"]
    if settings.stop_timeout is not None:
        lines.append(f"TimeoutStopUSec={round(settings.stop_timeout * 1e6)}")
    if stopping_until is not None:
        lines.append(f"StopDeadlineUSec={round(stopping_until * 1e6)}")
    return "".join(line + "\n" for line in lines).encode()


def _note_fields(note: bytes | None) -> dict[str, str]:
    """The KEY=value lines of a scope's note."""
    fields = {}
    for line in (note or b"").decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


def read_stop_deadline(note: bytes | None) -> float | None:
    value = _note_fields(note).get("StopDeadlineUSec", "")
    return int(value) / 1e6 if value.isdigit() else None


def read_stop_note(note: bytes | None) -> ScopeSettings:
    """The settings of stop_note(); what is missing or not understood keeps its default."""
    fields = _note_fields(note)
    settings = DEFAULT_STOP
    signo, mode, timeout = (fields.get(k, "") for k in
                            ("KillSignal", "KillMode", "TimeoutStopUSec"))
    if signo.isdigit() and 1 <= int(signo) < 65:
        settings = replace(settings, kill_signal=int(signo))
    if mode in KILL_MODES:
        settings = replace(settings, kill_mode=mode)
    if timeout.isdigit():
        settings = replace(settings, stop_timeout=int(timeout) / 1e6)
    return settings
