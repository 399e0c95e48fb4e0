"""Metadata of raw and block images (spec §10.8): find the root (or /usr) partition of a GPT
disk image, or take the whole image as one file system, and read it through a read-only loop
device mounted in a private mount namespace of a child process. The loop device is attached
with autoclear by mount(8): when the child's namespace goes away, so do the mount and the
loop device, also when the child fails or is killed.

Run as `python -m machined.linux.dissect IMAGE ROOT_OFFSET ROOT_SIZE USR_OFFSET USR_SIZE`
(inside `unshare --mount`) it is that child: it prints the metadata as JSON."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass

from ..core.envfile import parse_env_bytes
from ..core.errors import ErrnoError
from ..core.images import Metadata, parse_hostname, parse_machine_id
from . import fs as lfs

GENERIC_LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
# Discoverable Partitions Specification: root and /usr types per architecture.
ROOT_TYPES = {
    "x86_64": uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
    "aarch64": uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae"),
    "i686": uuid.UUID("44479540-f297-41b2-9af7-d131d5f0458a"),
}
USR_TYPES = {
    "x86_64": uuid.UUID("8484680c-9521-48c6-9c11-b0720656f69e"),
    "aarch64": uuid.UUID("b0e01050-ee5f-4390-949a-9101b17104e9"),
    "i686": uuid.UUID("75250d76-8cc6-458e-bd66-bd47cc81a812"),
}


# The secondary architecture whose root 252 takes when the native one has none.
SECONDARY = {"x86_64": "i686"}
GPT_FLAG_NO_AUTO = 1 << 63  # "do not mount automatically": dissect passes the partition over


@dataclass(frozen=True)
class Partition:
    offset: int
    size: int


def _partitions(f: object) -> list[tuple[uuid.UUID, Partition]] | None:
    """GPT entries (type, extent) that may be mounted automatically, or None without a GPT."""
    read = f.read  # type: ignore[attr-defined]
    seek = f.seek  # type: ignore[attr-defined]
    for sector in (512, 4096):
        seek(sector)
        header = read(92)
        if len(header) < 92 or header[:8] != b"EFI PART":
            continue
        entries_lba = int.from_bytes(header[72:80], "little")
        count = int.from_bytes(header[80:84], "little")
        size = int.from_bytes(header[84:88], "little")
        if not 128 <= size <= 4096 or count > 1024:
            return []
        seek(entries_lba * sector)
        table = read(count * size)
        out = []
        for i in range(len(table) // size):
            e = table[i * size:(i + 1) * size]
            kind = uuid.UUID(bytes_le=e[:16])
            if kind.int == 0 or int.from_bytes(e[48:56], "little") & GPT_FLAG_NO_AUTO:
                continue
            first = int.from_bytes(e[32:40], "little")
            last = int.from_bytes(e[40:48], "little")
            out.append((kind, Partition(first * sector, (last - first + 1) * sector)))
        return out
    return None


def _by_preference(types: dict[str, uuid.UUID]) -> list[uuid.UUID]:
    """The native architecture's type first, then the secondary one's, then any other."""
    arch = platform.machine()
    first = [a for a in (arch, SECONDARY.get(arch)) if a in types]
    return [types[a] for a in first] + [t for a, t in types.items() if a not in first]


def find_partitions(path: str) -> tuple[Partition | None, Partition | None]:
    """(root, usr) as systemd-dissect's generic-root policy picks them: a root partition (the
    architecture's, else its secondary one's, else any other's), else a single generic Linux
    partition (ENOTUNIQ for several); or the whole image without a partition table (ENXIO
    with one that is not GPT)."""
    with open(path, "rb") as f:
        parts = _partitions(f)
        if parts is None:
            usage, table = _probe(path)
            if table:  # a partition table, but not GPT (MBR, say): no partition to take
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
            if usage not in ("filesystem", "crypto"):  # neither a table nor a file system
                raise OSError(errno.ENOPKG, os.strerror(errno.ENOPKG))
            f.seek(0, os.SEEK_END)
            return Partition(0, f.tell()), None

    def pick(types: dict[str, uuid.UUID]) -> Partition | None:
        for kind in _by_preference(types):
            found = next((p for t, p in parts if t == kind), None)
            if found is not None:
                return found
        return None

    root, usr = pick(ROOT_TYPES), pick(USR_TYPES)
    if root is None and usr is None:
        generic = [p for t, p in parts if t == GENERIC_LINUX]
        if len(generic) > 1:
            raise OSError(errno.ENOTUNIQ, os.strerror(errno.ENOTUNIQ))
        if not generic:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        root = generic[0]
    return root, usr


def _probe(path: str, part: Partition | None = None) -> tuple[str, str]:
    """(USAGE, PTTYPE) that blkid's low-level probe finds at the start of the image, or of
    `part`: "filesystem" or "crypto" for a file system or an encrypted volume, and the type of
    a partition table; "" for what it does not find."""
    extent = ["--offset", str(part.offset), "--size", str(part.size)] if part else []
    out = subprocess.run(["blkid", "-p", "-o", "export", *extent, "--", path],
                         capture_output=True, text=True, check=False)
    found = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return found.get("USAGE", ""), found.get("PTTYPE", "")


def tree_metadata(root: str, raw_image: bool = False) -> Metadata:
    """hostname, machine-id, machine-info and os-release of an image tree, symlinks resolved
    inside it, as 252 reads them (`raw_image`: the tree of a mounted raw image). In a
    directory image an item that is missing, unreadable or malformed is left empty (252 logs
    and ignores it), and /usr/lib/os-release is read only when /etc/os-release does not exist.
    In a raw image (252 reads it in a child) a file that opens but does not read (a directory)
    fails the whole reading; otherwise hostname, machine-id and machine-info that are missing,
    do not resolve or do not open are left empty; an os-release that does not open is passed
    over for the next one, one that does not resolve (a symlink loop) fails the reading, and
    so does having none (ENOMEDIUM: no OS image)."""

    def read(rel: str) -> bytes | None:
        try:
            return lfs.read_in_root(root, rel)
        except lfs.ReadFailed:
            if raw_image:
                raise
            return None
        except OSError:
            return None

    def os_release() -> bytes | None:
        for rel in ("/etc/os-release", "/usr/lib/os-release"):
            try:
                return lfs.read_in_root(root, rel)
            except FileNotFoundError:
                continue
            except lfs.NotOpened:
                if raw_image:
                    continue
                return None
            except OSError:  # ReadFailed, or the path did not resolve
                if raw_image:
                    raise
                return None
        if raw_image:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        return None

    def pairs(data: bytes | None) -> tuple[tuple[str, str], ...]:
        try:
            return tuple(parse_env_bytes(data)) if data is not None else ()
        except ErrnoError:
            return ()

    hostname = read("/etc/hostname")
    machine_id = read("/etc/machine-id")
    machine_info = read("/etc/machine-info")
    return Metadata(
        parse_hostname(hostname.decode("utf-8", "replace")) if hostname is not None else "",
        parse_machine_id(machine_id, first_line=raw_image) if machine_id is not None else b"",
        pairs(machine_info),
        pairs(os_release()),
    )


LOOP_CONTROL = "/dev/loop-control"


def read_metadata(path: str) -> Metadata:
    """Blocking: dissect and mount `path` in a child, return what it found."""
    # 252 opens the loop control device first and fails with its errno: ENOENT where there
    # are no loop devices (a container, PrivateDevices=), where losetup only says it failed.
    os.close(os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK))
    root, usr = find_partitions(path)
    args = [str(x) for p in (root, usr) for x in ((p.offset, p.size) if p else (-1, -1))]
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         sys.executable, "-m", "machined.linux.dissect", path, *args],
        capture_output=True, text=True, check=False, cwd="/", env=_child_env())
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
    if "errno" in data:
        raise OSError(data["errno"], os.strerror(data["errno"]))
    return Metadata(data["hostname"], bytes.fromhex(data["machine_id"]),
                    tuple(map(tuple, data["machine_info"])),
                    tuple(map(tuple, data["os_release"])))


def _child_env() -> dict[str, str]:
    """Make this package importable in the child however the daemon was started."""
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{top}:{path}" if path else top}


def _tool(*args: str) -> str:
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        # mount(2)'s EINVAL (a bad superblock, say), which mount(8) words this way
        code = errno.EINVAL if "wrong fs type" in out.stderr else errno.EIO
        raise OSError(code, f"{args[0]}: {out.stderr.strip()}")
    return out.stdout.strip()


def _mount(image: str, offset: int, size: int, where: str) -> None:
    """A read-only loop device of its own (mount -o loop would share one another user attached
    read-write), detached right after mounting: the kernel then frees it with the mount."""
    dev = _tool("losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                "--sizelimit", str(size), image)
    try:
        try:
            _tool("mount", "-o", "ro,nodev", dev, where)  # 252 mounts with MS_NODEV too
        except OSError:
            # Looked at only when the mount fails: no file system there is what 252's probe
            # before mounting says, EAFNOSUPPORT.
            if not _probe(image, Partition(offset, size))[0]:
                raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT)) from None
            raise
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def _child(argv: list[str]) -> int:
    image, roff, rsize, uoff, usize = argv[0], *map(int, argv[1:5])
    top = tempfile.mkdtemp(prefix="machined-image-")
    mounted: list[str] = []
    try:
        if roff >= 0:
            _mount(image, roff, rsize, top)
            mounted.append(top)
        if uoff >= 0:
            usr = os.path.join(top, "usr")
            os.makedirs(usr, exist_ok=True)
            _mount(image, uoff, usize, usr)
            mounted.append(usr)
        md = tree_metadata(top, raw_image=True)
        print(json.dumps({"hostname": md.hostname, "machine_id": md.machine_id.hex(),
                          "machine_info": md.machine_info, "os_release": md.os_release}))
        return 0
    except OSError as e:
        print(json.dumps({"errno": e.errno or errno.EIO}))
        return 1
    finally:
        for where in reversed(mounted):
            # lazily: a file still open in it must not keep the directory below from going
            subprocess.run(["umount", "--lazy", where], check=False, capture_output=True)
        for leftover in (os.path.join(top, "usr"), top):
            with contextlib.suppress(OSError):
                os.rmdir(leftover)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
