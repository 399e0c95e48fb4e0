"""org.freedesktop.machine1.Image objects and the image side of the Manager (spec §10, §11):
argument checks in 252's order, authorization, and the blocking work of machined/linux/imagefs
run in worker threads so the daemon keeps answering meanwhile.

252 serves image objects through a fallback vtable. sdbus has none, so an object is exported
for every image a discovery scan (start-up, ListImages, CleanPool) or a lookup (GetImage)
finds; its properties are looked up afresh on each request, with a cache that lives for one
event-loop iteration like 252's."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

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
        self._exported: set[str] = set()
        self.operations = 0
        # between ListImages calls, only what the kernel reports as changed is looked at again
        self._scan_cache = imagecache.ScanCache() if dispatcher is not None else None

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
    def export(self, name: str) -> None:
        if name in self._exported or self.dispatcher is None:
            return
        self.dispatcher.export(image_object_path(name), image_interface(name, self))
        self._exported.add(name)

    def unexport(self, name: str) -> None:
        if name in self._exported and self.dispatcher is not None:
            self.dispatcher.unexport(image_object_path(name), IMAGE_IFACE)
            self._exported.discard(name)

    def unexport_soon(self, name: str) -> None:
        asyncio.get_running_loop().call_soon(self.unexport, name)

    def scan(self) -> dict[str, Image]:
        """Discover every image and keep the exported objects in step with what is there."""
        found = imagefs.discover(self.search, self._scan_cache)
        self._cache = dict(found)  # the lookups of this loop iteration see the same
        self._forget_soon()
        for name in found.keys() - self._exported:
            self.export(name)
        for name in self._exported - found.keys():
            self.unexport(name)
        return found

    # ------------------------------------------------------------- Manager
    def list_images(self, call: Call) -> list[tuple[str, str, bool, int, int, int, str]]:
        return [(i.name, _TYPE_NAMES[i.type], i.read_only, i.crtime, i.mtime, i.usage,
                 image_object_path(i.name)) for i in self.scan().values()]

    def get_image(self, call: Call, name: str) -> str:
        image = self.lookup(name)  # no name check: an invalid name is just not found
        if image is None:
            raise NoSuchImage(name)
        self.export(image.name)
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
        removed = await self._operation(imagefs.clean, self.search, which)
        self.scan()
        return removed

    # ------------------------------------------------------------- Image methods
    async def remove(self, call: Call, image: Image) -> None:
        self._check_operations()
        await self.authority.check(call, MANAGE_IMAGES, {"image": image.name,
                                                         "verb": "remove"})
        await self._operation(imagefs.remove, self.search, image)
        self.unexport(image.name)

    async def rename(self, call: Call, image: Image, new_name: str) -> None:
        check_image_name(new_name)
        await self.authority.check(call, MANAGE_IMAGES, {"image": image.name, "verb": "rename",
                                                         "new_name": new_name})
        await self._blocking(imagefs.rename, self.search, image, new_name)
        self.unexport(image.name)

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


def image_interface(name: str, h: ImageHandlers | None) -> Interface:
    """The Image interface of the image called `name` (h None: for --bus-introspect)."""

    last = [Image(name, "", ImageType.DIRECTORY, False)]

    def image() -> Image:
        assert h is not None
        last[0] = h.current(name)
        return last[0]

    def shown() -> Image:
        """For property reads, which cannot fail in sdbus without a traceback: an image that
        vanished behind our back shows its last state once, and its object goes."""
        assert h is not None
        try:
            return image()
        except NoSuchImage:
            h.unexport_soon(name)
            return last[0]

    def prop(pname: str, sig: str, getter: Callable[[Image], Any]) -> Property:
        return Property(pname, sig, lambda: getter(shown()))

    def method(mname: str, in_sig: str, out_sig: str, action: Callable[..., Any]) -> Method:
        return Method(mname, in_sig, (), out_sig, (),
                      lambda call, *args: action(call, image(), *args))

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
    return image_interface("", None)


__all__ = ["IMAGE_IFACE", "IMAGE_PATH_PREFIX", "ImageHandlers", "image_interface",
           "image_interface_template"]
