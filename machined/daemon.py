"""Start-up, wiring and shutdown of the daemon (spec §1.2)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from sdbus.sd_bus_internals import (
    SdBus,
    SdBusRequestNameError,
    SdBusRequestNameExistsError,
    sd_bus_open_system,
)

from .bus import client
from .bus.auth import Authority
from .bus.image import ImageHandlers
from .bus.logcontrol import PATH as LOGCONTROL_PATH
from .bus.logcontrol import LogControl
from .bus.machine import MANAGER_PATH, MachineHandlers, MachineObjects
from .bus.manager import Manager
from .bus.objects import Dispatcher
from .core.images import SearchPath
from .core.ports import Listeners, ScopeBackend
from .core.registry import Registry
from .core.statefile import StateDir
from .core.userdb import UserDatabase
from .linux import cgroups, facts
from .linux.inotify import Inotify
from .linux.notify import sd_notify, watchdog_interval
from .linux.nscd import NscdFlusher
from .linux.process import PidfdWatcher
from .scopes.cgroupfs import CgroupfsBackend
from .scopes.systemd1 import Systemd1Backend
from .varlink import SOCKET_NAME, VarlinkServer, userdb_methods

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.machine1"
BUS_CHECK_INTERVAL = 2.0  # seconds between checks that the bus connection still exists


@dataclass
class Options:
    state_dir: Path = Path("/run/systemd/machines")
    scope_backend: str = "auto"  # auto | systemd1 | cgroupfs
    stop_timeout: float = 90.0
    log_level: str = "info"
    image_root: str = ""  # prefix of the image search path (tests, benchmarks)
    userdb_dir: Path = Path("/run/systemd/userdb")  # where nss-systemd looks for userdb services


def host_machine_id() -> bytes:
    try:
        return bytes.fromhex(Path("/etc/machine-id").read_text().strip())
    except (OSError, ValueError):
        return b""


async def _choose_backend(
    bus: SdBus, options: Options, registry_ref: list[Registry]
) -> ScopeBackend:
    wanted = options.scope_backend
    if wanted == "auto":
        has_systemd = await client.name_has_owner(bus, "org.freedesktop.systemd1")
        wanted = "systemd1" if has_systemd else "cgroupfs"
    if wanted == "systemd1":
        backend = Systemd1Backend(bus)
        await backend.subscribe(
            lambda job, unit, result: registry_ref[0].job_removed(job, unit, result),
            lambda unit: registry_ref[0].unit_changed(unit),
            lambda: registry_ref[0].manager_reloaded(),
        )
        return backend
    mount = cgroups.cgroup2_mount()
    if mount is None:
        raise SystemExit("No cgroup2 hierarchy is mounted; the cgroupfs backend needs one.")
    mirror = cgroups.systemd_v1_mount()
    return CgroupfsBackend(cgroups.Hierarchy(mount), Inotify(asyncio.get_running_loop()),
                           lambda unit: registry_ref[0].unit_changed(unit),
                           stop_timeout=options.stop_timeout,
                           mirror=cgroups.Hierarchy(mirror) if mirror else None)


async def run(options: Options) -> int:
    loop = asyncio.get_running_loop()
    statedir = StateDir(options.state_dir)
    statedir.ensure()  # others test for this directory to see whether machined is there

    stop = asyncio.Event()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)

    bus = sd_bus_open_system()
    dispatcher = Dispatcher(bus)
    authority = Authority(bus)
    logcontrol = LogControl(options.log_level)
    dispatcher.export(LOGCONTROL_PATH, logcontrol.interface())

    registry_ref: list[Registry] = []
    backend = await _choose_backend(bus, options, registry_ref)
    watcher = PidfdWatcher(loop)
    objects = MachineObjects(dispatcher)
    # MachineNew/MachineRemoved on the bus, then nscd's caches flushed, as 252 does
    registry = Registry(backend, watcher, statedir, Listeners(objects, NscdFlusher()),
                        host_machine_id())
    registry_ref.append(registry)
    handlers = MachineHandlers(registry, authority,
                               backend if isinstance(backend, Systemd1Backend) else None)
    objects.serve(registry, handlers)
    images = ImageHandlers(SearchPath(options.image_root), authority, dispatcher)
    images.serve()
    dispatcher.export(MANAGER_PATH, Manager(registry, handlers, images).interface())
    log.debug("Using the %s scope backend.", backend.name)  # 252 logs nothing at start

    userdb = VarlinkServer(userdb_methods(UserDatabase(
        registry.__iter__, registry.get, lambda m, kind: facts.read_id_map(m.leader, kind))))
    try:
        await userdb.start(options.userdb_dir / SOCKET_NAME)
    except OSError as e:
        # 252 does not start then; nothing else depends on this service, so carry on
        log.warning("Failed to bind to varlink socket in %s: %s; running without the userdb "
                    "service.", options.userdb_dir, e.strerror)

    # Reload before taking the name: 252 reloads with blocking calls, so no client (one that
    # activated us, say) ever sees the machine list before the state files are read. The
    # reloaded machines' MachineNew go out once the name is ours, as 252's do.
    dispatcher.hold_signals()
    await registry.start()
    if isinstance(backend, CgroupfsBackend):
        backend.collect_orphans()
    try:
        await bus.request_name_async(BUS_NAME, 0)  # not queued: sd-bus's flags 0, as 252's
    except SdBusRequestNameExistsError:
        # 252 says so too, then lingers with its connection closed; we exit
        log.error("Failed to acquire %s: Requested service name already owned.", BUS_NAME)
        return 1
    except SdBusRequestNameError as e:
        log.error("Failed to acquire %s: %s", BUS_NAME, str(e) or type(e).__name__)
        return 1
    dispatcher.release_signals()
    sd_notify("READY=1\nSTATUS=Processing requests...")  # 252's words
    log.debug("Ready: %d machine(s) registered.", len(registry.machines) - 1)

    watchdog = None
    interval = watchdog_interval()
    if interval:
        async def ping() -> None:
            while True:
                sd_notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        watchdog = loop.create_task(ping())

    # The bus daemon going away (stopped, restarted) leaves us unreachable: exit with an error
    # so that the unit's Restart= starts us again on the new bus; state files keep the machines.
    bus_lost = False

    async def watch_bus() -> None:
        nonlocal bus_lost
        while await client.connected(bus):
            await asyncio.sleep(BUS_CHECK_INTERVAL)
        log.error("Lost the connection to the bus, exiting.")
        bus_lost = True
        stop.set()

    bus_watch = loop.create_task(watch_bus())

    await stop.wait()
    bus_watch.cancel()
    log.debug("Shutting down.")
    sd_notify("STOPPING=1\nSTATUS=Shutting down...")  # 252's words
    if watchdog is not None:
        watchdog.cancel()
    images.stop()
    handlers.inside.stop()
    await dispatcher.drain()
    registry.shutdown()
    if isinstance(backend, CgroupfsBackend):
        await backend.close()
    watcher.close()
    userdb.close()
    objects.close()
    images.close()
    dispatcher.close()
    with contextlib.suppress(Exception):
        bus.close()
    return 1 if bus_lost else 0
