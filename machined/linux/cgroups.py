"""The cgroup2 hierarchy: where it is mounted, which unit a process is in, scopes we make.

Paths handled here are cgroup paths relative to the hierarchy root ("/machine.slice/x.scope").
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from functools import cache

from ..core.errors import ErrnoError
from ..core.names import unit_name_is_valid
from .process import read_proc

# What opening a cgroup's file gives when the cgroup was removed meanwhile.
_GONE = (errno.ENOENT, errno.ENODEV)
# ... and reading cgroup.procs of a threaded cgroup, whose processes its threaded domain lists.
_NOT_LISTED = (*_GONE, errno.EOPNOTSUPP)


def _raise_unless_gone(e: OSError) -> None:
    """os.walk() would pass over a directory it cannot list (EMFILE, say) in silence."""
    if e.errno not in _GONE:
        raise e


@cache
def cgroup2_mount() -> str | None:
    """The mount point of the cgroup2 hierarchy (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
    hybrid host), found in mountinfo rather than assumed."""
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    found = []
    for fields in mounts:
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2":
            found.append(fields[4].replace("\\040", " "))
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    return found[0] if found else None


def pid_cgroup(pid: int) -> str:
    """The cgroup2 ("0::") path of pid, else its name=systemd path. ESRCH if pid is gone."""
    try:
        text = read_proc(pid, "cgroup").decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        raise ErrnoError(errno.ESRCH) from None
    except OSError as e:
        raise ErrnoError.from_oserror(e) from None
    # Found directly rather than by splitting every line: this runs for every registration.
    if text.startswith("0::"):
        start = 3
    else:
        at = text.find("\n0::")
        start = at + 4 if at >= 0 else -1
    if start >= 0:
        end = text.find("\n", start)
        return text[start:] if end < 0 else text[start:end]
    for line in text.splitlines():
        _hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "name=systemd":
            return path
    raise ErrnoError(errno.ENOMEDIUM)


@cache
def _root_shift() -> str:
    """PID 1's cgroup minus /init.scope: the prefix to strip from every path (cg_shift_path).
    Read once: PID 1 does not change cgroups under a running machined."""
    try:
        root = pid_cgroup(1)
    except ErrnoError:
        return ""
    for suffix in ("/init.scope", "/system.slice", "/system"):
        if root.endswith(suffix):
            root = root[: -len(suffix)]
            break
    return "" if root == "/" else root


def _cg_unescape(component: str) -> str:
    return component[1:] if component.startswith("_") else component


def unit_of_cgroup(path: str) -> str | None:
    """§6.8: skip leading slices; the next component, if a valid non-slice unit, is the unit."""
    shift = _root_shift()
    if shift and (path == shift or path.startswith(shift + "/")):
        path = path[len(shift):]
    for component in path.strip("/").split("/"):
        if not component:
            return None
        name = _cg_unescape(component)
        if name.endswith(".slice") and unit_name_is_valid(name):
            continue
        return name if unit_name_is_valid(name) else None
    return None


def unit_prefix(path: str, unit: str) -> str | None:
    """The part of a cgroup path up to and including the component naming unit."""
    parts = path.strip("/").split("/")
    for i, component in enumerate(parts):
        if _cg_unescape(component) == unit:
            return "/" + "/".join(parts[: i + 1])
    return None


def slice_path(slice_name: str) -> str:
    """systemd's slice nesting: "a-b.slice" lives at /a.slice/a-b.slice."""
    if slice_name in ("", "-.slice"):
        return ""
    stem = slice_name.removesuffix(".slice")
    parts = stem.split("-")
    return "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


# Where write_note() keeps its data, tried in this order.
NOTE_ATTRIBUTES = ("trusted.machined.scope", "user.machined.scope")


class Hierarchy:
    """Operations on cgroups of the hierarchy mounted at `mount`: the cgroup2 one, or (for
    removing what nspawn mirrors there) the name=systemd one of a hybrid host."""

    def __init__(self, mount: str) -> None:
        self.mount = mount

    def fs(self, path: str) -> str:
        return self.mount + path

    def exists(self, path: str) -> bool:
        return os.path.isdir(self.fs(path))

    def children(self, path: str) -> list[str]:
        """Names of the child cgroups of path ([] if path does not exist)."""
        try:
            with os.scandir(self.fs(path)) as it:
                return [e.name for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def create(self, path: str) -> None:
        os.makedirs(self.fs(path), mode=0o755, exist_ok=True)

    def attach(self, path: str, pid: int) -> None:
        with open(self.fs(path) + "/cgroup.procs", "w") as f:
            f.write(str(pid))

    def populated(self, path: str) -> bool:
        try:
            fd = os.open(self.fs(path) + "/cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
            try:
                events = os.read(fd, 4096)  # "populated N\nfrozen N\n": one read
            finally:
                os.close(fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ENODEV:  # removed between open() and read()
                return False
            raise
        for line in events.split(b"\n"):
            key, _, value = line.partition(b" ")
            if key == b"populated":
                return value.strip() == b"1"
        return any(True for _ in self.pids(path))

    def _dirs_bottom_up(self, path: str) -> list[str]:
        out: list[str] = []
        for dirpath, _dirnames, _files in os.walk(self.fs(path), topdown=False,
                                                  onerror=_raise_unless_gone):
            out.append(dirpath)
        return out

    def pids(self, path: str) -> Iterator[int]:
        """The processes of the subtree; an OSError other than a cgroup going meanwhile (EMFILE,
        EACCES) is raised: none of them must pass for an empty cgroup."""
        for dirpath in self._dirs_bottom_up(path):
            try:
                with open(dirpath + "/cgroup.procs") as f:
                    procs = f.read()
            except OSError as e:
                if e.errno in _NOT_LISTED:
                    continue
                raise
            yield from (int(line) for line in procs.split())

    def kill(self, path: str, signo: int) -> int:
        """Signal every process in the subtree; returns how many were signalled."""
        if signo == signal.SIGKILL and os.path.exists(self.fs(path) + "/cgroup.kill"):
            try:
                with open(self.fs(path) + "/cgroup.kill", "w") as f:
                    f.write("1")
                return 1
            except OSError as e:
                if e.errno not in _GONE:
                    raise
                return 0
        count = 0
        for pid in self.pids(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)
                count += 1
        return count

    def remove(self, path: str) -> bool:
        """rmdir the subtree bottom-up; False if something is still in it."""
        ok = True
        for dirpath in self._dirs_bottom_up(path):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok

    def machine_scopes(self) -> dict[str, str]:
        """unit -> path of every cgroup named machine-*.scope at the root or in a slice, slices
        nested as systemd nests them: where the scopes of machines we no longer know are."""
        found: dict[str, str] = {}
        pending = [""]
        while pending:
            parent = pending.pop()
            for name in self.children(parent):
                unit = _cg_unescape(name)
                if unit.endswith(".slice"):
                    pending.append(f"{parent}/{name}")
                elif unit.startswith("machine-") and unit.endswith(".scope"):
                    found[unit] = f"{parent}/{name}"
        return found

    def write_note(self, path: str, data: bytes) -> None:
        """Keep data with the cgroup itself, in an extended attribute of its directory (as
        systemd keeps a unit's invocation id), so that it goes when the cgroup goes."""
        error = OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        for attribute in NOTE_ATTRIBUTES:
            try:
                os.setxattr(self.fs(path), attribute, data)
                return
            except OSError as e:  # trusted.* needs CAP_SYS_ADMIN, user.* kernel 5.7
                error = e
        raise error

    def read_note(self, path: str) -> bytes | None:
        for attribute in NOTE_ATTRIBUTES:
            try:
                return os.getxattr(self.fs(path), attribute)
            except OSError:
                continue
        return None

    def remove_empty_parents(self, path: str) -> None:
        """rmdir the slices above path while they are empty (as systemd collects them)."""
        parent = os.path.dirname(path)
        while parent not in ("", "/") and parent.endswith(".slice"):
            try:
                os.rmdir(self.fs(parent))
            except OSError:
                return
            parent = os.path.dirname(parent)


def _named_mounts() -> dict[str, str]:
    """Mount points of the cgroup2 hierarchy ("") and of v1 named hierarchies ("name=X")."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return found
    for fields in mounts:
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        point = fields[4].replace("\\040", " ")
        if fstype == "cgroup2":
            found.setdefault("", point)
        elif fstype == "cgroup":
            for opt in options:
                if opt.startswith("name="):
                    found.setdefault(opt, point)
    if "" in found and cgroup2_mount():
        found[""] = cgroup2_mount() or found[""]
    return found


def systemd_v1_mount() -> str | None:
    """The mount point of the name=systemd v1 hierarchy of a hybrid host, if there is one."""
    return _named_mounts().get("name=systemd")


def procs_files_of(pid: int) -> list[str]:
    """The cgroup.procs files that put a process where pid is: its cgroup2 cgroup and, on
    hybrid hosts, its name=systemd cgroup (what the tools inside a container look at)."""
    try:
        lines = read_proc(pid, "cgroup").decode("utf-8", "surrogateescape").splitlines()
    except OSError as e:
        raise ErrnoError.from_oserror(e) from None
    mounts = _named_mounts()
    files = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        key = "" if hid == "0" and not controllers else controllers
        if key in mounts and (key == "" or key == "name=systemd"):
            files.append(os.path.join(mounts[key] + path, "cgroup.procs"))
    return files
