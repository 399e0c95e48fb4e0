"""Images on disk (spec §10): discovery and lookup over the search path, what each entry is,
and the blocking work of every image operation. Callers run the slow ones (clone, remove,
clean, raw metadata) off the event loop."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterable, Iterator

from ..core.errors import ErrnoError, NotSupported
from ..core.images import (
    HOST_IMAGE,
    UINT64_MAX,
    CleanMode,
    Image,
    ImageType,
    Metadata,
    SearchPath,
    refuse_vendor_or_host,
    to_clean,
)
from ..core.names import image_name_is_valid
from . import btrfs, dissect, rmtree
from . import fs as lfs
from .imagecache import ScanCache
from .imagelock import name_lock, path_lock
from .process import WORKER_CHILDREN
from .rmtree import remove_tree

CRTIME_XATTR = "user.crtime_usec"
QUOTA_ONLY_ON_BTRFS = "Quota is only supported on btrfs."


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# ------------------------------------------------------------------ what an entry is
def _crtime(path: str, birth: int) -> int:
    """The older of the birth time and the user.crtime_usec xattr (§10.5)."""
    try:
        raw = os.getxattr(path, CRTIME_XATTR)
    except OSError:
        return birth
    if len(raw) == 8:
        xattr = int(struct.unpack("<Q", raw)[0])
        if xattr and (not birth or xattr < birth):
            return xattr
    return birth


class _Dir:
    """A search directory, resolved, with what all its entries share."""

    def __init__(self, search: SearchPath, path: str) -> None:
        self.path = path
        self.vendor = search.is_vendor_dir(path)
        st = lfs.statx(path)
        self.dev, self.ino, self.mnt_id = st.dev, st.ino, st.mnt_id
        self.read_only = lfs.mount_read_only(path)

    def read_only_mount(self, path: str, st: lfs.Statx) -> bool:
        # faccessat(W_OK) == EROFS: only an entry on another mount can differ from its directory
        # (a bind mount of the same file system too: the mount, not the device, tells)
        if st.mnt_id is not None and st.mnt_id == self.mnt_id:
            return self.read_only
        return lfs.mount_read_only(path)


def inspect(d: _Dir, name: str, path: str, st: lfs.Statx) -> Image | None:
    """The image at `path` (already stat'ed, symlinks followed), or None if it is none."""
    base_ro = d.vendor or d.read_only_mount(path, st)
    if stat.S_ISDIR(st.mode):
        if st.ino == btrfs.SUBVOLUME_INODE and lfs.is_btrfs(path):
            q = btrfs.quota(path)
            return Image(name, path, ImageType.SUBVOLUME,
                         base_ro or btrfs.subvolume_read_only(path), _crtime(path, st.btime_usec),
                         0, q.referenced, q.exclusive, q.referenced_max, q.exclusive_max,
                         d.vendor)
        immutable = st.immutable if st.immutable is not None else lfs.is_immutable(path)
        return Image(name, path, ImageType.DIRECTORY, base_ro or immutable,
                     _crtime(path, st.btime_usec), 0, vendor=d.vendor)
    if stat.S_ISREG(st.mode):
        usage = st.blocks * 512
        return Image(name, path, ImageType.RAW, base_ro or not st.mode & 0o222,
                     _crtime(path, st.btime_usec), st.mtime_usec, usage, usage, st.size,
                     st.size, d.vendor)
    if stat.S_ISBLK(st.mode):
        size, ro = UINT64_MAX, base_ro or not st.mode & 0o222
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                size = lfs.block_size(fd) or UINT64_MAX
                ro = ro or lfs.block_read_only(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        return Image(name, path, ImageType.BLOCK, ro, 0, 0, size, size, size, size, d.vendor)
    return None


def host_image() -> Image:
    return Image(HOST_IMAGE, "/", ImageType.DIRECTORY, False, lfs.birth_time_usec("/"), 0)


def _dirs(search: SearchPath) -> Iterator[_Dir]:
    for d in search.dirs:
        try:
            yield _Dir(search, os.path.realpath(d, strict=True))
        except OSError:
            continue


def find(search: SearchPath, name: str) -> Image | None:
    """Look one name up (§10.2); None if it is nowhere (or invalid)."""
    if not image_name_is_valid(name):
        return None
    for d in _dirs(search):
        path = f"{d.path}/{name}"
        try:  # only a missing entry is passed over, as in 252 (a symlink loop is ELOOP)
            st = lfs.statx(path)
        except FileNotFoundError:
            path += ".raw"
            try:
                st = lfs.statx(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.mode):
                continue
        else:
            if not (stat.S_ISDIR(st.mode) or stat.S_ISBLK(st.mode)):
                continue
        try:
            image = inspect(d, name, path, st)
        except FileNotFoundError:
            continue
        if image is not None:
            return image
    return host_image() if name == HOST_IMAGE else None


def _entry_image(d: _Dir, entry: str) -> Image | None:
    """The image a directory entry is, if any (§10.3)."""
    path = f"{d.path}/{entry}"
    try:  # an entry that cannot be stat'ed fails the listing, as in 252, unless it is gone
        st = lfs.statx(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.mode):
        if not entry.endswith(".raw"):
            return None
        name = entry[:-4]
    elif stat.S_ISDIR(st.mode) or stat.S_ISBLK(st.mode):
        name = entry
    else:
        return None
    if not image_name_is_valid(name):
        return None
    try:
        return inspect(d, name, path, st)
    except FileNotFoundError:
        return None


def discover(search: SearchPath, cache: ScanCache | None = None) -> dict[str, Image]:
    """Every image on the search path, earlier directories first (§10.3), plus `.host`.
    With a cache, an entry whose stat() did not change since the last scan is not looked at
    again."""
    found: dict[str, Image] = {}
    with cache.lock if cache else contextlib.nullcontext():
        for d in _dirs(search):
            try:
                if cache is None:
                    images: Iterable[Image | None] = (
                        _entry_image(d, e) for e in os.listdir(d.path))
                else:
                    images = cache.images(d.path, (d.dev, d.ino, d.read_only),
                                          functools.partial(_entry_image, d))
                for image in images:
                    if image is not None and image.name not in found:
                        found[image.name] = image
            except FileNotFoundError:  # the directory went away meanwhile
                continue
    if HOST_IMAGE not in found:
        found[HOST_IMAGE] = host_image()
    return found


# ------------------------------------------------------------------ metadata
def read_metadata(image: Image) -> Metadata:
    """Blocking: raw and block images are looked at through a read-only loop device."""
    try:
        with path_lock(image.path, exclusive=False):
            if image.type in (ImageType.DIRECTORY, ImageType.SUBVOLUME):
                return dissect.tree_metadata(image.path)
            return dissect.read_metadata(image.path)
    except OSError as e:
        raise ErrnoError.from_oserror(e, "Failed to read image metadata") from None


# ------------------------------------------------------------------ removing
def _remove_image_files(image: Image) -> None:
    if image.type is ImageType.SUBVOLUME:
        try:
            os.unlink(image.path)  # a symlink to the subvolume
            return
        except IsADirectoryError:
            pass
        remove_tree(image.path)
    elif image.type is ImageType.DIRECTORY:
        if os.path.islink(image.path):
            os.unlink(image.path)
            return
        with contextlib.suppress(OSError):
            lfs.set_immutable(image.path, False)
        remove_tree(image.path)
    elif image.type is ImageType.BLOCK:
        if not image.path.startswith("/dev/"):
            os.unlink(image.path)
    else:
        os.unlink(image.path)


def remove(search: SearchPath, image: Image) -> None:
    refuse_vendor_or_host(image)
    with path_lock(image.path, exclusive=True):
        _remove_image_files(image)
    for side in search.side_files(image):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(side)


def clean(search: SearchPath, mode: CleanMode) -> list[tuple[str, int]]:
    removed = []
    for image in sorted(discover(search).values(), key=lambda i: i.name):
        if not to_clean(image, mode):
            continue
        try:
            remove(search, image)
        except OSError as e:
            if e.errno == errno.EBUSY:
                continue
            raise ErrnoError.from_oserror(e, f"Failed to remove image {image.name}") from None
        removed.append((image.name, image.usage_exclusive))
    return removed


# ------------------------------------------------------------------ renaming
def rename(search: SearchPath, image: Image, new_name: str) -> None:
    refuse_vendor_or_host(image)
    with path_lock(image.path, exclusive=True), name_lock(new_name):
        if find(search, new_name) is not None:
            raise _err(errno.EEXIST)
        if image.type is ImageType.BLOCK and image.path.startswith("/dev/"):
            raise _err(errno.EROFS)
        suffix = ".raw" if image.type is ImageType.RAW else ""
        new_path = f"{image.directory}/{new_name}{suffix}"
        immutable = image.type is ImageType.DIRECTORY and lfs.is_immutable(image.path)
        if immutable:
            lfs.set_immutable(image.path, False)
        try:
            lfs.rename_noreplace(image.path, new_path)
        finally:
            if immutable:
                with contextlib.suppress(OSError):
                    lfs.set_immutable(new_path if os.path.exists(new_path) else image.path,
                                      True)
    for old, new in zip(search.side_files(image), search.side_files(image, new_name),
                        strict=True):
        with contextlib.suppress(OSError):
            lfs.rename_noreplace(old, new)


# ------------------------------------------------------------------ cloning
def _cp(*args: str) -> None:
    out = WORKER_CHILDREN.run(["cp", *args])
    if out.returncode < 0:  # killed: the daemon is stopping
        raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))
    if out.returncode != 0:
        # cp reports strerror() texts: give the client the errno behind the first one known
        err = next((code for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                      errno.ENAMETOOLONG, errno.EROFS)
                    if os.strerror(code) in out.stderr), errno.EIO)
        lines = out.stderr.strip().splitlines()  # one per failing file: a full pool, say
        more = f" (and {len(lines) - 3} more lines)" if len(lines) > 3 else ""
        raise OSError(err, "cp: " + "; ".join(lines[:3]) + more)


class _Top:
    """The top directory of a copy as it was made: 252 copies into it, so the source's top
    lends it nothing (mode, owner, xattrs, ACLs, times)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stat = os.lstat(path)
        self.xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                       for k in os.listxattr(path, follow_symlinks=False)}

    def restore(self) -> None:
        """Undo what `cp -a` gave the top; its mtime is now, when the copy ended."""
        for k in os.listxattr(self.path, follow_symlinks=False):
            if k not in self.xattrs:
                with contextlib.suppress(OSError):  # what a security module keeps stays
                    os.removexattr(self.path, k, follow_symlinks=False)
        for k, value in self.xattrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(self.path, k, value, follow_symlinks=False)
        os.chown(self.path, self.stat.st_uid, self.stat.st_gid, follow_symlinks=False)
        os.chmod(self.path, stat.S_IMODE(self.stat.st_mode))
        os.utime(self.path)


def _clone_tree(image: Image, tmp: str, read_only: bool) -> None:
    if image.type is ImageType.SUBVOLUME:
        btrfs.snapshot(image.path, tmp, read_only)
        return
    subvolume = False
    if lfs.is_btrfs(os.path.dirname(tmp)):
        with contextlib.suppress(OSError):
            btrfs.create_subvolume(tmp)
            subvolume = True
    if not subvolume:
        os.mkdir(tmp, 0o755)
    made = _Top(tmp)
    elsewhere = _other_file_systems(image.path)
    # A faithful copy: owners, modes, timestamps, xattrs and ACLs, hard links, device nodes,
    # sparse files; reflinks where the file system shares extents; one file system only.
    _cp("-a", "-x", "--reflink=auto", "--sparse=auto", "-T", image.path + "/.", tmp)
    for rel in sorted(elsewhere, reverse=True):  # cp -x leaves them empty; 252 leaves them out
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(tmp, rel))
    made.restore()
    if read_only:
        if subvolume:
            btrfs.set_subvolume_read_only(tmp, True)
        else:
            lfs.set_immutable(tmp, True)


def _other_file_systems(root: str) -> set[str]:
    """Directories below `root` (relative to it) that are another file system: mount points,
    and nested btrfs subvolumes; a copy of the tree does not go into them."""
    top = os.path.realpath(root)
    found = {os.path.relpath(p, top) for p in lfs.mounts_below(top)}
    device = os.lstat(top).st_dev
    for dirpath, dirnames, _files in os.walk(top):
        for d in list(dirnames):
            path = os.path.join(dirpath, d)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_dev != device:
                    found.add(os.path.relpath(path, top))
                    dirnames.remove(d)
    return found


def _clone_raw(image: Image, tmp: str, read_only: bool) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with contextlib.suppress(OSError):
            lfs.set_inode_flag(fd, lfs.FS_NOCOW_FL, True)
    finally:
        os.close(fd)
    _cp("--reflink=auto", "--sparse=always", image.path, tmp)
    with contextlib.suppress(OSError):
        os.setxattr(tmp, CRTIME_XATTR, struct.pack("<Q", image.crtime))
    os.chmod(tmp, 0o444 if read_only else 0o644)


def _discard(tmp: str) -> None:
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            lfs.set_immutable(tmp, False)
        remove_tree(tmp)
    else:
        os.unlink(tmp)


# A clone is copied under this hidden name in the pool, then renamed.
UNFINISHED_CLONE = ".#machined-clone-"


def clone(search: SearchPath, image: Image, new_name: str, read_only: bool) -> None:
    """Copy into the main pool under a hidden temporary name, then rename: a failed clone
    leaves nothing visible behind."""
    with name_lock(new_name):
        if find(search, new_name) is not None:
            raise _err(errno.EEXIST)
        if image.type is ImageType.BLOCK:
            raise _err(errno.EOPNOTSUPP)
        os.makedirs(search.pool, 0o700, exist_ok=True)
        suffix = ".raw" if image.type is ImageType.RAW else ""
        final = f"{search.pool}/{new_name}{suffix}"
        tmp = tempfile.mktemp(prefix=f"{UNFINISHED_CLONE}{new_name}.", dir=search.pool)
        try:
            if image.type is ImageType.RAW:
                _clone_raw(image, tmp, read_only)
            else:
                _clone_tree(image, tmp, read_only)
            if read_only and image.type is ImageType.DIRECTORY and lfs.is_immutable(tmp):
                # renaming an immutable directory is refused: flip the bit around the rename
                lfs.set_immutable(tmp, False)
                lfs.rename_noreplace(tmp, final)
                lfs.set_immutable(final, True)
            else:
                lfs.rename_noreplace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                _discard(tmp)
            raise
    for old, new in zip(search.side_files(image), search.side_files(image, new_name),
                        strict=True):
        _copy_side_file(old, new)


def _copy_side_file(source: str, dest: str) -> None:
    if not os.path.exists(source):
        return
    tmp = tempfile.mktemp(prefix=".#", dir=os.path.dirname(dest))
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o664)
        lfs.rename_noreplace(tmp, dest)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ------------------------------------------------------------------ read-only, limits
def mark_read_only(image: Image, read_only: bool) -> None:
    refuse_vendor_or_host(image)
    with path_lock(image.path, exclusive=True):
        if image.type is ImageType.SUBVOLUME:
            btrfs.set_subvolume_read_only(image.path, read_only)
        elif image.type is ImageType.DIRECTORY:
            lfs.set_immutable(image.path, read_only)
        elif image.type is ImageType.RAW:
            mode = os.stat(image.path).st_mode & 0o444
            os.chmod(image.path, mode | (0 if read_only else 0o200))
        else:
            fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                lfs.block_set_read_only(fd, read_only)
            finally:
                os.close(fd)


def set_image_limit(image: Image, size: int) -> None:
    refuse_vendor_or_host(image)
    if image.type is not ImageType.SUBVOLUME:
        raise _err(errno.EOPNOTSUPP)
    btrfs.set_limit(image.path, size)


def pool_quota(search: SearchPath) -> btrfs.Quota:
    pool = search.pool
    try:
        if btrfs.is_subvolume(pool):
            return btrfs.quota(pool)
    except OSError:
        pass
    return btrfs.Quota()


def set_pool_limit(search: SearchPath, size: int) -> None:
    pool = search.pool
    base = pool if os.path.exists(pool) else os.path.dirname(pool)
    if not lfs.is_btrfs(base):
        raise NotSupported(QUOTA_ONLY_ON_BTRFS)
    try:
        if not os.path.exists(pool):
            btrfs.create_subvolume(pool)
        with contextlib.suppress(OSError):
            btrfs.enable_quota(pool)
        if not btrfs.is_subvolume(pool):
            raise NotSupported(QUOTA_ONLY_ON_BTRFS)
        btrfs.set_limit(pool, size)
    except OSError as e:
        raise ErrnoError.from_oserror(e, "Failed to adjust quota limit") from None


def stop_operations() -> None:
    """At shutdown: the copies of clones in progress are killed and removals stopped where
    they are, so that their threads end at once; no new one starts. A clone's unfinished copy
    is left to the next start (remove_unfinished_clones)."""
    WORKER_CHILDREN.kill_all()
    rmtree.stop()


def remove_unfinished_clones(search: SearchPath) -> list[str]:
    """The hidden copies that clones of a daemon killed or stopped meanwhile left in the pool:
    removed (their names returned). Nothing else is named so, and no clone runs yet."""
    try:
        names = [n for n in os.listdir(search.pool) if n.startswith(UNFINISHED_CLONE)]
    except FileNotFoundError:
        return []
    for name in names:
        _discard(f"{search.pool}/{name}")
    return names
