"""Command line: `python -m machined`."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from . import COMPAT_SYSTEMD_VERSION, __version__
from .linux import process
from .logs import setup_logging

INTROSPECT_LIST = [
    ("/org/freedesktop/machine1", "org.freedesktop.machine1.Manager"),
    ("/org/freedesktop/machine1/machine", "org.freedesktop.machine1.Machine"),
    ("/org/freedesktop/machine1/image", "org.freedesktop.machine1.Image"),
    ("/org/freedesktop/LogControl1", "org.freedesktop.LogControl1"),
]

def bus_introspect(target: str) -> int:
    if target == "list":
        for path, iface in INTROSPECT_LIST:
            print(f"{path}\t{iface}")
        return 0
    from .bus.image import ImageHandlers, image_interface_template
    from .bus.introspect import node_xml
    from .bus.logcontrol import LogControl
    from .bus.machine import MachineHandlers, machine_interface
    from .bus.manager import Manager
    from .core.images import SearchPath

    handlers = MachineHandlers(None, None)  # type: ignore[arg-type]
    manager = Manager(None, handlers, ImageHandlers(SearchPath(), None, None))  # type: ignore[arg-type]
    # (interface, child nodes) as 252 prints them
    interfaces = {
        "/org/freedesktop/machine1": (manager.interface(), ["machine", "image"]),
        "/org/freedesktop/machine1/machine": (machine_interface(handlers), []),
        "/org/freedesktop/machine1/image": (image_interface_template(), []),
        "/org/freedesktop/LogControl1": (LogControl().interface(), []),
    }
    found = interfaces.get(target)
    if found is None:
        print(f"Object path {target} not found", file=sys.stderr)  # 252's words
        return 1
    sys.stdout.write(node_xml(*found))
    return 0


HELP = """\
systemd-machined [OPTIONS...]

Manage registrations of local VMs and containers.

This program takes no positional arguments.

Options:
  -h --help                 Show this help
     --version              Show package version
     --bus-introspect=PATH  Write D-Bus XML introspection data
     --log-level=LEVEL      Log level: emerg, alert, crit, err, warning, notice,
                            info (default; or $SYSTEMD_LOG_LEVEL), debug
     --scope-backend=auto|systemd1|cgroupfs
                            Who makes machine scopes: org.freedesktop.systemd1,
                            or this daemon (auto: systemd1 when it is on the bus)
     --stop-timeout=SECONDS In cgroupfs scopes, SIGKILL after this long when
                            stopping (default 90)

See the systemd-machined.service(8) man page for details.
"""


class _Parser(argparse.ArgumentParser):
    """252's help text and its words for bad usage (getopt_long's), with exit status 1."""

    def format_help(self) -> str:
        return HELP

    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (--[\w-]+): expected one argument", message)
        if missing:
            message = f"option '{missing.group(1)}' requires an argument"
        self.exit(1, f"{self.prog}: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .bus.logcontrol import LEVELS

    p = _Parser(prog="systemd-machined")  # abbreviations too, as getopt_long
    p.add_argument("--version", action="store_true")
    p.add_argument("--bus-introspect", metavar="PATH")
    p.add_argument("--log-level", default=os.environ.get("SYSTEMD_LOG_LEVEL", "info"),
                   choices=sorted(LEVELS))
    p.add_argument("--scope-backend", choices=("auto", "systemd1", "cgroupfs"), default="auto")
    p.add_argument("--stop-timeout", type=float, default=90.0, metavar="SECONDS")
    p.add_argument("--state-dir", type=Path, default=Path("/run/systemd/machines"),
                   help=argparse.SUPPRESS)  # for benchmarks; sd-login only reads the default
    p.add_argument("--userdb-dir", type=Path, default=Path("/run/systemd/userdb"),
                   help=argparse.SUPPRESS)  # tests: where the userdb socket goes
    p.add_argument("--image-root", default="", help=argparse.SUPPRESS)  # tests: prefix of the
    # image search path (ROOT/var/lib/machines, ROOT/etc/machines, ...)
    args, rest = p.parse_known_args(argv)
    for arg in rest:
        if arg.startswith("-") and arg != "-":
            p.exit(1, f"{p.prog}: unrecognized option '{arg}'\n")
    if rest:
        p.exit(1, "This program takes no arguments.\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"machined {__version__} (compatible with systemd {COMPAT_SYSTEMD_VERSION})")
        return 0
    if args.bus_introspect:
        return bus_introspect(args.bus_introspect)
    os.umask(0o022)
    process.raise_fd_limit()
    setup_logging(args.log_level)
    from .daemon import Options, run

    options = Options(state_dir=args.state_dir, scope_backend=args.scope_backend,
                      stop_timeout=args.stop_timeout, log_level=args.log_level,
                      image_root=args.image_root.rstrip("/"), userdb_dir=args.userdb_dir)
    # uvloop: the event loop in C. Each bus call wakes the loop once, and asyncio's own loop,
    # in Python, cost a lookup about a fifth of the daemon's CPU time (docs/benchmarks.md).
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(options))


if __name__ == "__main__":
    sys.exit(main())
