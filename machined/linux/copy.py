"""Copying files and trees between the host and a container (spec §8.9).

The child enters the container's mount namespace only; the container side is opened there, so
its symlinks resolve inside the container, never on the host. Below the two top directories
everything is done relative to directory fds with O_NOFOLLOW: a symlink is copied as a symlink
and never followed, also when the container swaps a directory for one during the copy.

Hard links within a copied tree stay hard links, as 252's COPY_HARDLINKS keeps them: the first
copy of an inode with more than one link is linked into a hidden store directory in the
destination's top directory, named after the source's device and inode, and later names of the
same inode are linked from there. The store is removed when the tree is done.

Into an existing tree, as 252's COPY_MERGE and COPY_REPLACE do it (compared with the live 252):
existing directories are merged into and keep their owner, mode and times; below the top an
entry that exists already is left as it is, unless replacing, which replaces everything but
directories (an existing directory stays, where a file was to go); an entry that fails does not
stop the others, and the copy then fails with the last such error. At the top, an existing
target fails with EEXIST, also when replacing a directory with something else."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
import sys
from dataclasses import dataclass

from ..core.validate import split_path
from . import namespaces as ns

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Owner:
    """Force this owner on everything copied (a UID shift), or keep the source's (None)."""
    uid: int | None = None
    gid: int | None = None


def open_parent(path: str) -> tuple[int, str]:
    """(fd of the directory, file name) of an absolute path that split_path() accepts."""
    parent, name = split_path(path)
    return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name


def copy_entry(src_dir: int, src: str, dst_dir: int, dst: str, replace: bool,
               owner: Owner) -> None:
    """Copy `src` (a file of any kind, or a tree) to `dst`."""
    # As deep as the fds go, as 252's copy (two per level; EMFILE beyond): the walk recurses
    # two frames per level, so Python's own limit must not stop it first.
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        sys.setrecursionlimit(max(sys.getrecursionlimit(), soft + 1000))
    _TreeCopy(replace, owner).entry(src_dir, src, dst_dir, dst)


class _TreeCopy:
    """One copy: how it treats existing targets, the owner it forces, and the hard-link store
    of its top directory."""

    def __init__(self, replace: bool, owner: Owner) -> None:
        self.replace = replace
        self.owner = owner
        self.links: HardLinks | None = None

    def entry(self, src_dir: int, src: str, dst_dir: int, dst: str) -> None:
        st = os.stat(src, dir_fd=src_dir, follow_symlinks=False)
        uid = st.st_uid if self.owner.uid is None else self.owner.uid
        gid = st.st_gid if self.owner.gid is None else self.owner.gid
        if stat.S_ISDIR(st.st_mode):
            self._dir(src_dir, src, dst_dir, dst, st, uid, gid)
            return
        replace = self.replace
        if stat.S_ISLNK(st.st_mode):  # symlinks are copied, never linked (as in 252)
            target = os.readlink(src, dir_fd=src_dir)
            _create(lambda: os.symlink(target, dst, dir_fd=dst_dir), dst_dir, dst, replace)
            _copy_node_metadata(dst_dir, dst, st, uid, gid)
            return
        regular = stat.S_ISREG(st.st_mode)
        if not (regular or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        links = self.links
        if links is not None and links.link(st, dst_dir, dst, replace):
            return
        if regular:
            _copy_file(src_dir, src, dst_dir, dst, replace, st, uid, gid)
        else:  # FIFOs, device nodes and sockets are made anew, as 252's copy makes them
            _create(lambda: os.mknod(dst, st.st_mode, st.st_rdev, dir_fd=dst_dir), dst_dir,
                    dst, replace)
            _copy_node_metadata(dst_dir, dst, st, uid, gid)
        if links is not None:
            links.remember(st, dst_dir, dst)

    def _dir(self, src_dir: int, src: str, dst_dir: int, dst: str, st: os.stat_result,
             uid: int, gid: int) -> None:
        fin = os.open(src, _DIR, dir_fd=src_dir)
        try:
            created = True
            try:
                os.mkdir(dst, 0o700, dir_fd=dst_dir)
            except FileExistsError:
                created = False  # merged into, and left with its own owner, mode and times
            fout = os.open(dst, _DIR, dir_fd=dst_dir)  # ENOTDIR where something else is
            store = HardLinks(fout) if self.links is None else None  # the top directory
            if store is not None:
                self.links = store
            failed: OSError | None = None
            try:
                for name in os.listdir(fin):
                    try:
                        self.entry(fin, name, fout, name)
                    except FileExistsError:
                        pass  # left as it is, as 252 leaves it
                    except OSError as e:
                        failed = e  # the other entries are copied all the same
                if store is not None:  # before the directory's times are set
                    store.close()
                if created:
                    _copy_metadata(fin, fout, st, uid, gid)
            finally:
                if store is not None:
                    store.close()
                os.close(fout)
        finally:
            os.close(fin)
        if failed is not None:
            raise failed


def _copy_node_metadata(dst_dir: int, dst: str, st: os.stat_result, uid: int,
                        gid: int) -> None:
    """Owner and times of a symlink or node just made; its mode came with it (the copy child
    runs with umask 0)."""
    os.chown(dst, uid, gid, dir_fd=dst_dir, follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


class HardLinks:
    """The store of a tree's copied inodes that have more than one link, made in the
    destination's top directory when the first one is seen (spec §8.9: hard links preserved)."""

    def __init__(self, top_fd: int) -> None:
        self._top_fd = top_fd
        self._name = ".#hardlink" + os.urandom(8).hex()  # not secrets: it loads OpenSSL (RSS)
        self._fd = -1

    @staticmethod
    def _key(st: os.stat_result) -> str:
        return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"

    def link(self, st: os.stat_result, dst_dir: int, dst: str, replace: bool) -> bool:
        """Make `dst` a link of the inode's earlier copy; False when there is none (or the
        link cannot be made, across file systems say): then it is copied."""
        if st.st_nlink <= 1 or self._fd < 0:
            return False
        key = self._key(st)
        try:
            _create(lambda: os.link(key, dst, src_dir_fd=self._fd, dst_dir_fd=dst_dir,
                                    follow_symlinks=False), dst_dir, dst, replace)
        except FileExistsError:
            raise  # the target exists and is not to be replaced: as a copy would fail
        except OSError:
            return False
        return True

    def remember(self, st: os.stat_result, dst_dir: int, dst: str) -> None:
        """Keep the fresh copy `dst` of a linked inode for its other names (best effort, as
        in 252: without it they become copies)."""
        if st.st_nlink <= 1:
            return
        try:
            if self._fd < 0:
                os.mkdir(self._name, 0o700, dir_fd=self._top_fd)
                self._fd = os.open(self._name, _DIR, dir_fd=self._top_fd)
            os.link(dst, self._key(st), src_dir_fd=dst_dir, dst_dir_fd=self._fd,
                    follow_symlinks=False)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            for name in os.listdir(self._fd):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self._fd)
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(OSError):
            os.rmdir(self._name, dir_fd=self._top_fd)


def _create(make: object, dst_dir: int, dst: str, replace: bool) -> None:
    assert callable(make)
    try:
        make()
    except FileExistsError as exists:
        if not replace:
            raise
        try:
            os.unlink(dst, dir_fd=dst_dir)
        except OSError:
            raise exists from None  # a directory is not replaced: still EEXIST, as in 252
        make()


def _copy_file(src_dir: int, src: str, dst_dir: int, dst: str, replace: bool,
               st: os.stat_result, uid: int, gid: int) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fout = -1

        def make() -> None:
            nonlocal fout
            fout = os.open(dst, flags, 0o600, dir_fd=dst_dir)

        _create(make, dst_dir, dst, replace)
        try:
            _copy_bytes(fin, fout, st.st_size)
            _copy_metadata(fin, fout, st, uid, gid)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _copy_bytes(fin: int, fout: int, size: int) -> None:
    try:
        while os.copy_file_range(fin, fout, 1 << 30):  # reflinks where the filesystem can
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    os.lseek(fin, 0, os.SEEK_SET)
    os.lseek(fout, 0, os.SEEK_SET)
    while chunk := os.read(fin, 1 << 20):
        os.write(fout, chunk)


def _copy_metadata(fin: int, fout: int, st: os.stat_result, uid: int, gid: int) -> None:
    """Owner (shifted), mode, xattrs and times of the source, in that order: chown clears
    set-id bits, so the mode comes after it."""
    os.fchown(fout, uid, gid)
    os.fchmod(fout, stat.S_IMODE(st.st_mode))
    _copy_xattrs(fin, fout)
    os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_xattrs(fin: int, fout: int) -> None:
    """The user.* extended attributes, the only ones 252's copy takes along (not security.*,
    which would carry file capabilities into a container, nor trusted.*)."""
    with contextlib.suppress(OSError):
        for name in os.listxattr(fin):
            if name.startswith("user."):
                with contextlib.suppress(OSError):
                    os.setxattr(fout, name, os.getxattr(fin, name))


def fork_copy(leader: int, host_dir: int, host_name: str, container_path: str, to_container: bool,
              replace: bool, owner: Owner) -> tuple[int, socket.socket]:
    """Fork the copy child; host_dir is the host parent directory, opened by the caller."""
    target = ns.Target.open(leader, ("mnt",), root=True)

    def work(sock: socket.socket) -> None:
        ns.set_name("(sd-copy)")
        os.umask(0)  # nodes are made with their source's mode (files and directories get it set)
        # The mount namespace and the leader's root (a leader may be chrooted inside its
        # namespace): container paths resolve from the container's "/", never the host's.
        target.enter()
        cdir, cname = open_parent(container_path)
        if to_container:
            copy_entry(host_dir, host_name, cdir, cname, replace, owner)
        else:
            copy_entry(cdir, cname, host_dir, host_name, replace, owner)

    try:
        return ns.fork_child(work, (*target.fds, host_dir))
    finally:
        target.close()
