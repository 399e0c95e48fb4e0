"""Argument checks of the Create/Register/Kill methods, in the order systemd 252 runs them."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from .errors import ErrnoError, InvalidArgs
from .machine import MachineClass
from .names import NAME_MAX, machine_name_is_valid


@dataclass(frozen=True)
class MachineSpec:
    """A validated Create*/Register* request (leader 0 still means "the caller")."""

    name: str
    id: bytes
    service: str
    cls: MachineClass
    leader: int
    root_directory: str
    netif: tuple[int, ...]


_CLASSES = {"container": MachineClass.CONTAINER, "vm": MachineClass.VM}


def machine_spec(
    name: str,
    id_: bytes,
    service: str,
    cls: str,
    leader: int,
    root_directory: str,
    netif: list[int] | None,
) -> MachineSpec:
    """§5.7: name -> id length -> ifindices -> class -> leader==1 -> root."""
    if not machine_name_is_valid(name):
        raise InvalidArgs("Invalid machine name")
    if len(id_) not in (0, 16):
        raise InvalidArgs("Invalid machine ID parameter")
    for ifindex in netif or ():
        if ifindex <= 0:
            raise InvalidArgs(f"Invalid network interface index {ifindex}")
    if cls == "":
        klass = MachineClass.UNKNOWN  # accepted here, fails to start later (EOPNOTSUPP)
    elif cls in _CLASSES:
        klass = _CLASSES[cls]
    else:
        # Debian's fix for CVE-2026-4105 rejects "host" here too.
        raise InvalidArgs("Invalid machine class parameter")
    if leader == 1:
        raise InvalidArgs("Invalid leader PID")
    if root_directory and not root_directory.startswith("/"):
        raise InvalidArgs("Root directory must be empty or an absolute path")
    return MachineSpec(name, bytes(id_) if any(id_) else b"", service, klass, leader,
                       root_directory, tuple(netif or ()))


KILL_WHO = ("", "leader", "all")
NSIG = 65


def kill_args(who: str, signo: int) -> tuple[str, int]:
    if who not in KILL_WHO:
        raise InvalidArgs(f"Invalid kill parameter '{who}'")
    if not 1 <= signo < NSIG:
        raise InvalidArgs(f"Invalid signal {signo}")
    return (who or "all", signo)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def environment_is_valid(env: list[str]) -> bool:
    """strv_env_is_valid(): NAME=value entries, valid names, no duplicate names."""
    seen = set()
    for entry in env:
        name, eq, _value = entry.partition("=")
        if not eq or not _ENV_NAME.match(name) or name in seen:
            return False
        seen.add(name)
    return True


# ---------------------------------------------------------------- working inside machines (§8)
# The program OpenShell runs when no path is given: the user's login shell from the machine's
# user database, else /bin/sh, as a login shell.
SHELL_SCRIPT = ('shell=$(getent passwd "$1" 2>/dev/null | {{ IFS=: read _ _ _ _ _ _ x; '
                'echo "$x"; }})\nexec "${{shell:-/bin/sh}}" -l')


def shell_args(user: str, path: str, args: list[str],
               environment: list[str]) -> tuple[str, str, list[str]]:
    """(user, program, argv) of OpenShell after 252's defaulting and checks (§8.7)."""
    user = user or "root"
    if not path:
        path, argv = "/bin/sh", ["sh", "-c", SHELL_SCRIPT.format(), "sh", user]
    else:
        if not path.startswith("/"):
            raise InvalidArgs(f"Specified path '{path}' is not absolute")
        argv = list(args) if args else [path]
    if not environment_is_valid(environment):
        raise InvalidArgs("Invalid environment assignments")
    return user, path, argv


def path_is_normalized(path: str) -> bool:
    if not path.startswith("/") or "//" in path:
        return False
    return all(part not in (".", "..") for part in path.split("/"))


def bind_args(source: str, destination: str) -> tuple[str, str]:
    if not path_is_normalized(source):
        raise InvalidArgs("Source path must be absolute and normalized.")
    if not destination:
        destination = source
    elif not path_is_normalized(destination):
        raise InvalidArgs("Destination path must be absolute and normalized.")
    return source, destination


COPY_REPLACE = 1


def copy_args(source: str, destination: str, flags: int) -> tuple[str, str, bool]:
    if flags & ~COPY_REPLACE:
        raise InvalidArgs("Invalid argument")
    if not source.startswith("/"):
        raise InvalidArgs("Source path must be absolute.")
    if not destination:
        destination = source
    elif not destination.startswith("/"):
        raise InvalidArgs("Destination path must be absolute.")
    return source, destination, bool(flags & COPY_REPLACE)


PATH_MAX = 4096


def split_path(path: str) -> tuple[str, str]:
    """(directory, file name) of an absolute path, as 252's path_extract_directory() and
    path_extract_filename() split it: trailing slashes and "." components are passed over
    ("/srv/dir/." is "dir" in "/srv"); a last component ".." is EINVAL, and so is a path of
    PATH_MAX bytes or more or a component longer than NAME_MAX; "/" has no file name
    (EADDRNOTAVAIL)."""
    parts = path.split("/")
    if (not path or len(path.encode()) >= PATH_MAX
            or any(len(part.encode()) > NAME_MAX for part in parts)):
        raise ErrnoError(errno.EINVAL)
    while parts and parts[-1] in ("", "."):
        parts.pop()
    if not any(parts):
        raise ErrnoError(errno.EADDRNOTAVAIL)
    if parts[-1] == "..":
        raise ErrnoError(errno.EINVAL)
    return "/".join(parts[:-1]).rstrip("/") or "/", parts[-1]
