"""Image pools and images made by the tests on real file systems: a pool root (passed to the
daemon as --image-root), directory trees, a btrfs file system on a loop file, GPT and bare ext4
raw images, loop block devices. Everything is undone by `Pool.cleanup()`."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def make_tree(path: Path, hostname: str = "tinyhost", os_id: str = "tiny",
              machine_id: str = "") -> Path:
    """A small OS tree: os-release (via an absolute symlink, resolved inside the image),
    hostname, machine-id, machine-info."""
    for d in ("etc", "usr/lib", "bin"):
        (path / d).mkdir(parents=True, exist_ok=True)
    (path / "usr/lib/os-release").write_text(
        f'ID={os_id}\nNAME="Tiny"\nPRETTY_NAME="Tiny busybox OS"\nVERSION_ID=1\n')
    (path / "etc/os-release").symlink_to("/usr/lib/os-release")
    (path / "etc/hostname").write_text(f"{hostname}\n")
    if machine_id:
        (path / "etc/machine-id").write_text(machine_id + "\n")
    (path / "etc/machine-info").write_text("DEPLOYMENT=test\n")
    return path


def make_node(path: Path, kind: str) -> None:
    """Something other than a regular file at `path`: "dir", "fifo", "socket", "loop" (a
    symlink to itself), or the device node "null" or "zero" (mknod: root only)."""
    if kind == "dir":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(path.parent)  # a relative name: test paths may be longer than sun_path
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(cwd)
    else:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, {"null": 3, "zero": 5}[kind]))


def deep_tree(top: Path, levels: int, name: str = "abcdefgh") -> None:
    """`levels` nested directories below `top` and a file at the bottom, made fd-relative:
    far deeper than PATH_MAX lets paths go."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


class Pool:
    """A pool root: ROOT/var/lib/machines is the main pool, ROOT/usr/lib/machines a vendor
    directory, ROOT/etc/systemd/nspawn the settings directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="machined-pool."))
        self.pool = self.root / "var/lib/machines"
        self.vendor = self.root / "usr/lib/machines"
        self.etc = self.root / "etc/machines"
        self.settings = self.root / "etc/systemd/nspawn"
        for d in (self.pool, self.vendor, self.etc, self.settings):
            d.mkdir(parents=True)
        self.mounts: list[Path] = []
        self.loops: list[str] = []

    # ------------------------------------------------------------- images
    def directory(self, name: str, where: Path | None = None, **kw: str) -> Path:
        return make_tree((where or self.pool) / name, **kw)

    def tree_source(self, name: str) -> Path:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        return make_tree(src, hostname=f"{name}host", os_id=name)

    def bare_raw(self, name: str, size: str = "16M") -> Path:
        """A raw image that is one ext4 file system."""
        path = self.pool / f"{name}.raw"
        run("truncate", "-s", size, str(path))
        run("mkfs.ext4", "-q", "-F", "-d", str(self.tree_source(name)), str(path))
        return path

    def gpt_raw(self, name: str) -> Path:
        """A GPT disk image with an ext4 root partition (x86-64 root type) at 1 MiB."""
        path = self.pool / f"{name}.raw"
        run("truncate", "-s", "40M", str(path))
        subprocess.run(["sfdisk", "-q", str(path)], input=(
            "label: gpt\n"
            f"start=2048, size=65536, type={ROOT_X86_64}, name=root\n"),
            text=True, check=True, capture_output=True)
        run("mkfs.ext4", "-q", "-F", "-d", str(self.tree_source(name)), "-E",
            "offset=1048576", str(path), "32M")
        return path

    def loop_device(self, backing: Path) -> str:
        dev = run("losetup", "--find", "--show", str(backing)).strip()
        self.loops.append(dev)
        return dev

    def btrfs(self, quota: bool, size: str = "256M") -> None:
        """Mount a fresh btrfs (on a loop file) as the main pool."""
        backing = self.root / "btrfs.img"
        run("truncate", "-s", size, str(backing))
        run("mkfs.btrfs", "-q", "-f", str(backing))
        dev = self.loop_device(backing)
        run("mount", dev, str(self.pool))
        self.mounts.append(self.pool)
        if quota:
            run("btrfs", "quota", "enable", str(self.pool))

    # ------------------------------------------------------------- teardown
    def cleanup(self) -> None:
        for path in [*self.root.rglob("*")] if self.root.exists() else []:
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    subprocess.run(["chattr", "-i", str(path)], capture_output=True,
                                   check=False)
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices whose backing file is `path` (none may be left behind)."""
    out = run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE")
    return [line.split()[0] for line in out.splitlines()
            if len(line.split()) > 1 and line.split()[1] == str(path)]


def mounts_below(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path))]


def is_immutable(path: Path) -> bool:
    out = run("lsattr", "-d", str(path))
    return "i" in out.split()[0]


def same_owner_mode(a: Path, b: Path) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_uid, sa.st_gid, sa.st_mode) == (sb.st_uid, sb.st_gid, sb.st_mode)
