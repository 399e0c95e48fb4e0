"""The one place where failures become D-Bus error names and messages (spec §3)."""

from __future__ import annotations

import errno
import logging

from ..core import errors as E

log = logging.getLogger(__name__)

DBUS = "org.freedesktop.DBus.Error."
MACHINE1 = "org.freedesktop.machine1."

# sd-bus's bus_error_name_to_errno table, errno -> name (§3.2).
_ERRNO_TO_NAME = {
    errno.ENOMEM: DBUS + "NoMemory",
    errno.EPERM: DBUS + "AccessDenied",
    errno.EACCES: DBUS + "AccessDenied",
    errno.EINVAL: DBUS + "InvalidArgs",
    errno.ESRCH: DBUS + "UnixProcessIdUnknown",
    errno.ENOENT: DBUS + "FileNotFound",
    errno.EEXIST: DBUS + "FileExists",
    errno.ETIMEDOUT: DBUS + "Timeout",
    errno.ETIME: DBUS + "Timeout",
    errno.EIO: DBUS + "IOError",
    errno.ENETRESET: DBUS + "Disconnected",
    errno.ECONNABORTED: DBUS + "Disconnected",
    errno.ECONNRESET: DBUS + "Disconnected",
    errno.EOPNOTSUPP: DBUS + "NotSupported",
    errno.EADDRNOTAVAIL: DBUS + "BadAddress",
    errno.ENOBUFS: DBUS + "LimitsExceeded",
    errno.EADDRINUSE: DBUS + "AddressInUse",
    errno.EBADMSG: DBUS + "InconsistentMessage",
}

_CLASS_TO_NAME: dict[type[E.MachinedError], str] = {
    E.InvalidArgs: DBUS + "InvalidArgs",
    E.NotSupported: DBUS + "NotSupported",
    E.AccessDenied: DBUS + "AccessDenied",
    E.InteractiveAuthorizationRequired: DBUS + "InteractiveAuthorizationRequired",
    E.LimitsExceeded: DBUS + "LimitsExceeded",
    E.NoSuchMachine: MACHINE1 + "NoSuchMachine",
    E.NoSuchImage: MACHINE1 + "NoSuchImage",
    E.NoMachineForPID: MACHINE1 + "NoMachineForPID",
    E.MachineExists: MACHINE1 + "MachineExists",
    E.JobFailed: "org.freedesktop.systemd1.JobFailed",
    E.UnknownObject: DBUS + "UnknownObject",
    E.Failed: DBUS + "Failed",
    E.NoPrivateNetworking: MACHINE1 + "NoPrivateNetworking",
    E.NoSuchUserMapping: MACHINE1 + "NoSuchUserMapping",
    E.NoSuchGroupMapping: MACHINE1 + "NoSuchGroupMapping",
}

# The reverse: a remote error name -> errno, used where machined 252 drops the remote error
# object and keeps only the errno (StopUnit for Terminate, KillUnit for Kill).
_NAME_TO_ERRNO = {
    DBUS + "Failed": errno.EACCES,
    DBUS + "NoMemory": errno.ENOMEM,
    DBUS + "ServiceUnknown": errno.EHOSTUNREACH,
    DBUS + "NameHasNoOwner": errno.ENXIO,
    DBUS + "NoReply": errno.ETIMEDOUT,
    DBUS + "IOError": errno.EIO,
    DBUS + "BadAddress": errno.EADDRNOTAVAIL,
    DBUS + "NotSupported": errno.EOPNOTSUPP,
    DBUS + "LimitsExceeded": errno.ENOBUFS,
    DBUS + "AccessDenied": errno.EACCES,
    DBUS + "AuthFailed": errno.EACCES,
    DBUS + "InteractiveAuthorizationRequired": errno.EACCES,
    DBUS + "NoServer": errno.EHOSTDOWN,
    DBUS + "Timeout": errno.ETIMEDOUT,
    DBUS + "NoNetwork": errno.ENONET,
    DBUS + "AddressInUse": errno.EADDRINUSE,
    DBUS + "Disconnected": errno.ECONNRESET,
    DBUS + "InvalidArgs": errno.EINVAL,
    DBUS + "FileNotFound": errno.ENOENT,
    DBUS + "FileExists": errno.EEXIST,
    DBUS + "UnknownMethod": errno.EBADR,
    DBUS + "UnknownObject": errno.EBADR,
    DBUS + "UnknownInterface": errno.EBADR,
    DBUS + "UnknownProperty": errno.EBADR,
    DBUS + "PropertyReadOnly": errno.EROFS,
    DBUS + "UnixProcessIdUnknown": errno.ESRCH,
    DBUS + "InvalidSignature": errno.EINVAL,
    DBUS + "InconsistentMessage": errno.EBADMSG,
    DBUS + "TimedOut": errno.ETIMEDOUT,
    DBUS + "MatchRuleInvalid": errno.EINVAL,
    DBUS + "InvalidFileContent": errno.EINVAL,
    DBUS + "MatchRuleNotFound": errno.ENOENT,
    DBUS + "SELinuxSecurityContextUnknown": errno.ESRCH,
    DBUS + "ObjectPathInUse": errno.EBUSY,
}
# sd-bus's map of systemd's own error names (bus-common-errors.c): the services machined calls
# (systemd1) and the daemons next to it
_NAME_TO_ERRNO |= {f"org.freedesktop.systemd1.{name}": code for name, code in (
    ("NoSuchUnit", errno.ENOENT), ("NoUnitForPID", errno.ESRCH),
    ("NoUnitForInvocationID", errno.ENOENT), ("UnitExists", errno.EEXIST),
    ("LoadFailed", errno.EIO), ("BadUnitSetting", errno.ENOEXEC),
    ("JobFailed", errno.EREMOTEIO), ("NoSuchJob", errno.ENOENT),
    ("NotSubscribed", errno.EINVAL), ("AlreadySubscribed", errno.EINVAL),
    ("OnlyByDependency", errno.EINVAL), ("TransactionJobsConflicting", errno.EDEADLK),
    ("TransactionOrderIsCyclic", errno.EDEADLK), ("TransactionIsDestructive", errno.EDEADLK),
    ("UnitMasked", errno.ERFKILL), ("UnitGenerated", errno.EADDRNOTAVAIL),
    ("UnitLinked", errno.ELOOP), ("JobTypeNotApplicable", errno.EBADR),
    ("NoIsolation", errno.EPERM), ("ShuttingDown", errno.ECANCELED),
    ("ScopeNotRunning", errno.EHOSTDOWN), ("NoSuchDynamicUser", errno.ESRCH),
    ("NotReferenced", errno.EUNATCH), ("DiskFull", errno.ENOSPC))}
_NAME_TO_ERRNO |= {f"org.freedesktop.machine1.{name}": code for name, code in (
    ("NoSuchMachine", errno.ENXIO), ("NoSuchImage", errno.ENOENT),
    ("NoMachineForPID", errno.ENXIO), ("MachineExists", errno.EEXIST),
    ("NoPrivateNetworking", errno.ENOSYS), ("NoSuchUserMapping", errno.ENXIO),
    ("NoSuchGroupMapping", errno.ENXIO))}
_NAME_TO_ERRNO |= {f"org.freedesktop.login1.{name}": code for name, code in (
    ("NoSuchSession", errno.ENXIO), ("NoSessionForPID", errno.ENXIO),
    ("NoSuchUser", errno.ENXIO), ("NoUserForPID", errno.ENXIO), ("NoSuchSeat", errno.ENXIO),
    ("SessionNotOnSeat", errno.EINVAL), ("NotInControl", errno.EINVAL),
    ("DeviceIsTaken", errno.EINVAL), ("DeviceNotTaken", errno.EINVAL),
    ("OperationInProgress", errno.EINPROGRESS), ("SleepVerbNotSupported", errno.EOPNOTSUPP),
    ("SessionBusy", errno.EBUSY), ("NotYourDevice", errno.EPERM))}


def errno_name(err: int) -> str:
    name = _ERRNO_TO_NAME.get(err)
    if name:
        return name
    symbol = errno.errorcode.get(err)
    return f"System.Error.{symbol}" if symbol else DBUS + "Failed"


def remote_errno(name: str) -> int:
    if name.startswith("System.Error."):
        value = getattr(errno, name.removeprefix("System.Error."), None)
        if isinstance(value, int):
            return value
    return _NAME_TO_ERRNO.get(name, errno.EIO)


def to_dbus(exc: BaseException) -> tuple[str, str]:
    """(error name, message) for any exception; unexpected ones are logged as Failed."""
    if isinstance(exc, E.RemoteError):
        return exc.name, exc.message
    if isinstance(exc, E.ErrnoError):
        return errno_name(exc.errno), exc.message
    if isinstance(exc, E.MachinedError):
        for klass in type(exc).__mro__:
            name = _CLASS_TO_NAME.get(klass)
            if name:
                return name, exc.message
        return DBUS + "Failed", exc.message
    if isinstance(exc, OSError) and exc.errno:
        return errno_name(exc.errno), f"{exc.strerror or ''}"
    log.error("Unexpected error", exc_info=exc)
    return DBUS + "Failed", f"Internal error: {type(exc).__name__}: {exc}"
