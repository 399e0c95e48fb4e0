"""org.freedesktop.machine1.Image objects and the image side of the Manager (spec §10, §11):
argument checks in 252's order, authorization, and the blocking work of machined/linux/imagefs
run in worker threads so the daemon keeps answering meanwhile.

Like 252, one fallback vtable serves every image object: its find callback looks the image up
on disk, with a cache that lives for one event-loop iteration like 252's, so images made or
removed behind the daemon's back are (or stop being) objects at once."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.eager import keep_task
from ..core.errors import ErrnoError, LimitsExceeded, NoSuchImage
from ..core.images import (
    IMAGE_PATH_PREFIX,
    Image,
    ImageType,
    SearchPath,
    check_image_name,
    check_limit,
    clean_mode,
    image_object_path,
)
from ..core.names import bus_label_unescape
from ..linux import imagecache, imagefs
from .auth import MANAGE_IMAGES, MANAGE_MACHINES, Authority
from .objects import Call, Dispatcher, Interface, Method, Property

log = logging.getLogger(__name__)

IMAGE_IFACE = "org.freedesktop.machine1.Image"
MAX_OPERATIONS = 64
_TYPE_NAMES = {t: t.value for t in ImageType}
T = TypeVar("T")


class ImageHandlers:
    def __init__(self, search: SearchPath, authority: Authority,
                 dispatcher: Dispatcher | None) -> None:
        self.search = search
        self.authority = authority
        self.dispatcher = dispatcher
        self._cache: dict[str, Image | None] = {}
        self._cache_clear_scheduled = False
        self.operations = 0
        # between ListImages calls, only what the kernel reports as changed is looked at again
        self._scan_cache = imagecache.ScanCache() if dispatcher is not None else None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- lookups
    def _remember(self, name: str, image: Image | None) -> None:
        self._cache[name] = image
        self._forget_soon()

    def _forget_soon(self) -> None:
        if not self._cache_clear_scheduled:  # once per loop iteration
            try:
                asyncio.get_running_loop().call_soon(self._forget)
                self._cache_clear_scheduled = True
            except RuntimeError:
                self._cache.clear()

    def _forget(self) -> None:
        self._cache.clear()
        self._cache_clear_scheduled = False

    def lookup(self, name: str) -> Image | None:
        if name in self._cache:
            return self._cache[name]
        image = imagefs.find(self.search, name)
        self._remember(name, image)
        return image

    def current(self, name: str) -> Image:
        image = self.lookup(name)
        if image is None:
            raise NoSuchImage(name)
        return image

    def by_name(self, name: str) -> Image:
        """image(name) of §11: name check, then lookup."""
        return self.current(check_image_name(name))

    def changed(self) -> None:
        """After an operation, nothing cached is trusted."""
        self._forget()

    # ------------------------------------------------------------- objects
    def serve(self) -> None:
        assert self.dispatcher is not None
        self._fallback = self.dispatcher.export_fallback(
            IMAGE_PATH_PREFIX, image_interface(self), self.find,
            lambda: [image_object_path(name) for name in self.scan()])
        keep_task(self._remove_unfinished_clones(), self._tasks)

    async def _remove_unfinished_clones(self) -> None:
        """In the background: a large unfinished copy must not hold up the start."""
        try:
            names = await asyncio.to_thread(imagefs.remove_unfinished_clones, self.search)
        except OSError as e:
            if e.errno != errno.ECANCELED:  # the daemon is stopping: the next start goes on
                log.warning("Failed to remove unfinished clones in %s: %s", self.search.pool, e)
            return
        for name in names:
            log.debug("Removed %s, left by a clone that did not finish.", name)

    def stop(self) -> None:
        """The daemon is stopping: clones in progress are cut short, none starts."""
        imagefs.stop_operations()

    def close(self) -> None:
        self._fallback.close()

    def find(self, path: str) -> Image | None:
        label = path.removeprefix(IMAGE_PATH_PREFIX + "/")
        if label == path or not label or "/" in label:
            return None
        # any spelling of the name finds the image, as in 252 (not only image.object_path's)
        return self.lookup(bus_label_unescape(label))

    def scan(self) -> dict[str, Image]:
        """Discover every image."""
        found = imagefs.discover(self.search, self._scan_cache)
        self._cache = dict(found)  # the lookups of this loop iteration see the same
        self._forget_soon()
        return found

    # ------------------------------------------------------------- Manager
    def list_images(self, call: Call) -> list[tuple[str, str, bool, int, int, int, str]]:
        return [(i.name, _TYPE_NAMES[i.type], i.read_only, i.crtime, i.mtime, i.usage,
                 image_object_path(i.name)) for i in self.scan().values()]

    def get_image(self, call: Call, name: str) -> str:
        image = self.lookup(name)  # no name check: an invalid name is just not found
        if image is None:
            raise NoSuchImage(name)
        return image.object_path

    def redirect(self, action: Callable[..., Any]) -> Callable[..., Any]:
        return lambda call, name, *args: action(call, self.by_name(name), *args)

    def pool_path(self) -> str:
        return self.search.pool

    def pool_usage(self) -> int:
        return imagefs.pool_quota(self.search).referenced

    def pool_limit(self) -> int:
        return imagefs.pool_quota(self.search).referenced_max

    async def set_pool_limit(self, call: Call, size: int) -> None:
        check_limit(size)
        await self.authority.check(call, MANAGE_MACHINES, {"verb": "set_pool_limit"})
        await self._blocking(imagefs.set_pool_limit, self.search, size)

    async def clean_pool(self, call: Call, mode: str) -> list[tuple[str, int]]:
        self._check_operations()
        which = clean_mode(mode)
        await self.authority.check(call, MANAGE_MACHINES, {"verb": "clean_pool",
                                                           "mode": which.value})
        return await self._operation(imagefs.clean, self.search, which)

    # ------------------------------------------------------------- Image methods
    async def remove(self, call: Call, image: Image) -> None:
        self._check_operations()
        await self.authority.check(call, MANAGE_IMAGES, {"image": image.name,
                                                         "verb": "remove"})
        await self._operation(imagefs.remove, self.search, image)

    async def rename(self, call: Call, image: Image, new_name: str) -> None:
        check_image_name(new_name)
        await self.authority.check(call, MANAGE_IMAGES, {"image": image.name, "verb": "rename",
                                                         "new_name": new_name})
        await self._blocking(imagefs.rename, self.search, image, new_name)

    async def clone(self, call: Call, image: Image, new_name: str, read_only: bool) -> None:
        self._check_operations()
        check_image_name(new_name)
        await self.authority.check(call, MANAGE_IMAGES, {"image": image.name, "verb": "clone",
                                                         "new_name": new_name})
        await self._operation(imagefs.clone, self.search, image, new_name, read_only)

    async def mark_read_only(self, call: Call, image: Image, read_only: bool) -> None:
        await self.authority.check(call, MANAGE_IMAGES, {
            "image": image.name, "verb": "mark_read_only", "read_only": "1" if read_only else "0"})
        await self._blocking(imagefs.mark_read_only, image, read_only)

    async def set_limit(self, call: Call, image: Image, size: int) -> None:
        check_limit(size)
        await self.authority.check(call, MANAGE_IMAGES, {"machine": image.name,
                                                         "verb": "set_limit"})
        await self._blocking(imagefs.set_image_limit, image, size)

    async def get_hostname(self, call: Call, image: Image) -> str:
        return (await self._blocking(imagefs.read_metadata, image)).hostname

    async def get_machine_id(self, call: Call, image: Image) -> bytes:
        return (await self._blocking(imagefs.read_metadata, image)).machine_id

    async def get_machine_info(self, call: Call, image: Image) -> dict[str, str]:
        return dict((await self._blocking(imagefs.read_metadata, image)).machine_info)

    async def get_os_release(self, call: Call, image: Image) -> dict[str, str]:
        return dict((await self._blocking(imagefs.read_metadata, image)).os_release)

    # ------------------------------------------------------------- running the work
    def _check_operations(self) -> None:
        if self.operations >= MAX_OPERATIONS:
            raise LimitsExceeded("Too many ongoing operations.")

    async def _operation(self, fn: Callable[..., T], *args: Any) -> T:
        """An asynchronous operation (§9): counted against the limit of 64."""
        self.operations += 1
        try:
            return await self._blocking(fn, *args)
        finally:
            self.operations -= 1

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            # The kernel's or a tool's words stay in the log; the client gets strerror().
            log.debug("%s failed: %s", getattr(fn, "__name__", fn), e)
            raise ErrnoError(e.errno or errno.EIO) from None
        finally:
            self.changed()


def image_interface(h: ImageHandlers | None) -> Interface:
    """The Image interface, one for all images: handlers take (call, image, *args) and getters
    the image (see Dispatcher.export_fallback); h None: for --bus-introspect."""

    def prop(pname: str, sig: str, getter: Callable[[Image], Any]) -> Property:
        return Property(pname, sig, getter)

    def method(mname: str, in_sig: str, out_sig: str, action: Callable[..., Any]) -> Method:
        return Method(mname, in_sig, (), out_sig, (), action)

    def on(attr: str) -> Callable[..., Any]:
        return lambda *args: getattr(h, attr)(*args)

    return Interface(
        IMAGE_IFACE,
        properties=[
            prop("Name", "s", lambda i: i.name),
            prop("Path", "s", lambda i: i.path),
            prop("Type", "s", lambda i: i.type.value),
            prop("ReadOnly", "b", lambda i: i.read_only),
            prop("CreationTimestamp", "t", lambda i: i.crtime),
            prop("ModificationTimestamp", "t", lambda i: i.mtime),
            prop("Usage", "t", lambda i: i.usage),
            prop("Limit", "t", lambda i: i.limit),
            prop("UsageExclusive", "t", lambda i: i.usage_exclusive),
            prop("LimitExclusive", "t", lambda i: i.limit_exclusive),
        ],
        methods=[
            method("Remove", "", "", on("remove")),
            method("Rename", "s", "", on("rename")),
            method("Clone", "sb", "", on("clone")),
            method("MarkReadOnly", "b", "", on("mark_read_only")),
            method("SetLimit", "t", "", on("set_limit")),
            method("GetHostname", "", "s", on("get_hostname")),
            method("GetMachineID", "", "ay", on("get_machine_id")),
            method("GetMachineInfo", "", "a{ss}", on("get_machine_info")),
            method("GetOSRelease", "", "a{ss}", on("get_os_release")),
        ],
    )


def image_interface_template() -> Interface:
    """For --bus-introspect of /org/freedesktop/machine1/image."""
    return image_interface(None)


__all__ = ["IMAGE_IFACE", "IMAGE_PATH_PREFIX", "ImageHandlers", "image_interface",
           "image_interface_template"]
