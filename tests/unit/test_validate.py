import pytest

from machined.core.errors import InvalidArgs
from machined.core.machine import MachineClass
from machined.core.validate import environment_is_valid, kill_args, machine_spec

OK = dict(name="ct", id_=b"", service="svc", cls="container", leader=0, root_directory="",
          netif=None)


def spec(**kw):  # type: ignore[no-untyped-def]
    return machine_spec(**{**OK, **kw})


@pytest.mark.parametrize("kw,message", [
    (dict(name="bad_name"), "Invalid machine name"),
    (dict(name=".host"), "Invalid machine name"),
    (dict(id_=b"abc"), "Invalid machine ID parameter"),
    (dict(netif=[0]), "Invalid network interface index 0"),
    (dict(netif=[3, -3]), "Invalid network interface index -3"),
    (dict(cls="host"), "Invalid machine class parameter"),
    (dict(cls="foo"), "Invalid machine class parameter"),
    (dict(leader=1), "Invalid leader PID"),
    (dict(root_directory="rel/dir"), "Root directory must be empty or an absolute path"),
])
def test_rejections(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgs) as e:
        spec(**kw)
    assert e.value.message == message


def test_check_order_name_before_everything() -> None:
    with pytest.raises(InvalidArgs, match="Invalid machine name"):
        spec(name="-x", id_=b"1", cls="foo", leader=1, root_directory="x", netif=[0])
    with pytest.raises(InvalidArgs, match="ID"):
        spec(id_=b"1", cls="foo", leader=1, netif=[0])
    with pytest.raises(InvalidArgs, match="interface index"):
        spec(cls="foo", leader=1, netif=[0])
    with pytest.raises(InvalidArgs, match="class"):
        spec(cls="foo", leader=1)


def test_accepts_and_normalises() -> None:
    s = spec(id_=bytes(16), cls="", netif=[1, 7])
    assert s.id == b"" and s.cls is MachineClass.UNKNOWN and s.netif == (1, 7)
    s = spec(id_=bytes(range(16)), cls="vm", root_directory="/srv/vm")
    assert s.id == bytes(range(16)) and s.cls is MachineClass.VM


def test_kill_args() -> None:
    assert kill_args("", 15) == ("all", 15)
    assert kill_args("leader", 64) == ("leader", 64)
    with pytest.raises(InvalidArgs, match="Invalid kill parameter 'foo'"):
        kill_args("foo", 15)
    for sig in (0, 65, -1):
        with pytest.raises(InvalidArgs, match=f"Invalid signal {sig}"):
            kill_args("all", sig)


def test_environment() -> None:
    assert environment_is_valid(["A=1", "_b=", "C_9=x=y"])
    assert not environment_is_valid(["FOO"])
    assert not environment_is_valid(["1A=x"])
    assert not environment_is_valid(["A=1", "A=2"])


def test_who_may_call_privileged_methods() -> None:
    """sd_bus_query_sender_privilege() with no capabilities from the driver: our UID, or root
    when we are not root."""
    from machined.bus.privileged import sender_is_privileged

    assert sender_is_privileged(0, 0)
    assert not sender_is_privileged(1000, 0)
    assert sender_is_privileged(1000, 1000)
    assert sender_is_privileged(0, 1000)
    assert not sender_is_privileged(1001, 1000)
