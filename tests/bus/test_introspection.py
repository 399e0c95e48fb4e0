"""Introspection and standard interfaces, compared with systemd-machined 252 (spec §2, App. A)."""

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.helpers.busdaemon import REPO, BusDaemon
from tests.helpers.daemon import Machined, busctl
from tests.helpers.real252 import REAL_MACHINED

DATA = Path(__file__).resolve().parents[1] / "data" / "introspect-252"
DEST = "org.freedesktop.machine1"


def members(xml: str, interface: str) -> list[tuple[str, ...]]:
    """(kind, name, arg type/direction/name..., annotations...) for every member, in order."""
    root = ET.fromstring(xml if xml.lstrip().startswith("<") and "<node" in xml
                         else f"<node>{xml}</node>")
    out = []
    for iface in root.iter("interface"):
        if iface.get("name") != interface:
            continue
        for el in iface:
            item: list[str] = [el.tag, el.get("name") or ""]
            for child in el:
                if child.tag == "arg":
                    item.append(f"arg {child.get('type')} {child.get('name')} {child.get('direction')}")
                else:
                    item.append(f"annotation {child.get('name')}={child.get('value')}")
            if el.tag == "property":
                item.append(f"{el.get('type')} {el.get('access')}")
            out.append(tuple(item))
    return out


def live_xml(bus: BusDaemon, path: str) -> str:
    out = busctl(bus, "call", DEST, path, "org.freedesktop.DBus.Introspectable", "Introspect")
    text = out.stdout.strip()
    assert text.startswith("s ")
    # busctl prints the string C-escaped and quoted
    return bytes(text[3:-1], "utf-8").decode("unicode_escape")


def test_manager_machine_logcontrol_match_252(machined: Machined, bus: BusDaemon) -> None:
    for path, name, iface in [
        ("/org/freedesktop/machine1", "manager", "org.freedesktop.machine1.Manager"),
        ("/org/freedesktop/machine1/machine/_2ehost", "machine", "org.freedesktop.machine1.Machine"),
        ("/org/freedesktop/LogControl1", "logcontrol", "org.freedesktop.LogControl1"),
    ]:
        # same members in the same order, signatures, argument names and annotations
        ours = members(live_xml(bus, path), iface)
        ref = members((DATA / f"{name}.xml").read_text(), iface)
        assert ours == ref, f"{iface} differs from 252"


def test_bus_introspect_option_matches_live_and_252(machined: Machined, bus: BusDaemon) -> None:
    listing = subprocess.run([sys.executable, "-m", "machined", "--bus-introspect=list"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert listing.splitlines() == [
        "/org/freedesktop/machine1\torg.freedesktop.machine1.Manager",
        "/org/freedesktop/machine1/machine\torg.freedesktop.machine1.Machine",
        "/org/freedesktop/machine1/image\torg.freedesktop.machine1.Image",
        "/org/freedesktop/LogControl1\torg.freedesktop.LogControl1",
    ]
    for path, live_path, name in [
        ("/org/freedesktop/machine1", "/org/freedesktop/machine1", "manager"),
        ("/org/freedesktop/machine1/machine", "/org/freedesktop/machine1/machine/_2ehost",
         "machine"),
        ("/org/freedesktop/machine1/image", None, "image"),
        ("/org/freedesktop/LogControl1", "/org/freedesktop/LogControl1", "logcontrol"),
    ]:
        offline = subprocess.run([sys.executable, "-m", "machined", f"--bus-introspect={path}"],
                                 cwd=REPO, capture_output=True, text=True, check=True).stdout
        iface = re.search(r'<interface name="(org\.freedesktop\.(?:machine1\.\w+|LogControl1))"',
                          (DATA / f"{name}.xml").read_text())
        assert iface
        ref = members((DATA / f"{name}.xml").read_text(), iface.group(1))
        assert members(offline, iface.group(1)) == ref
        if Path(REAL_MACHINED).exists():  # 252's own --bus-introspect, byte for byte
            real = subprocess.run([REAL_MACHINED, f"--bus-introspect={path}"],
                                  capture_output=True, text=True, check=True).stdout
            assert offline == real
        if live_path:
            live = live_xml(bus, live_path)
            # every interface block (standard ones included) is what sd-bus itself generates;
            # the child nodes depend on what is registered
            strip = re.compile(r' <node name="[^"]*"/>\n')
            assert strip.sub("", live).rstrip() == strip.sub("", offline).rstrip()


def test_intermediate_nodes_and_tree(machined: Machined, bus: BusDaemon) -> None:
    root = live_xml(bus, "/org/freedesktop/machine1")
    assert '<node name="machine"/>' in root
    tree = busctl(bus, "tree", "--list", DEST).stdout.split()
    assert "/org/freedesktop/machine1/machine/_2ehost" in tree
    assert "/org/freedesktop/machine1/machine" in tree
    assert "/org/freedesktop" in tree


def test_getall_empty_interface_returns_everything(machined: Machined, bus: BusDaemon) -> None:
    out = busctl(bus, "call", DEST, "/org/freedesktop/machine1/machine/_2ehost",
                 "org.freedesktop.DBus.Properties", "GetAll", "s", "").stdout
    for key in ("Name", "Id", "Timestamp", "TimestampMonotonic", "Service", "Unit", "Leader",
                "Class", "RootDirectory", "NetworkInterfaces", "State"):
        assert f'"{key}"' in out
    assert '"Scope"' not in out  # hidden, as in 252
    scope = busctl(bus, "get-property", DEST, "/org/freedesktop/machine1/machine/_2ehost",
                   "org.freedesktop.machine1.Machine", "Scope").stdout
    assert scope.strip() == 's "-.slice"'
    manager = busctl(bus, "call", DEST, "/org/freedesktop/machine1",
                     "org.freedesktop.DBus.Properties", "GetAll", "s", "").stdout
    assert manager.strip() == ('a{sv} 3 "PoolPath" s "/var/lib/machines" "PoolUsage" t '
                               '18446744073709551615 "PoolLimit" t 18446744073709551615')


def test_host_machine_properties(machined: Machined, bus: BusDaemon) -> None:
    def get(prop: str) -> str:
        return busctl(bus, "get-property", DEST, "/org/freedesktop/machine1/machine/_2ehost",
                      "org.freedesktop.machine1.Machine", prop).stdout.strip()

    machine_id = Path("/etc/machine-id").read_text().strip()
    assert get("Name") == 's ".host"'
    assert get("Class") == 's "host"'
    assert get("Leader") == "u 1"
    assert get("RootDirectory") == 's "/"'
    assert get("Unit") == 's "-.slice"'
    assert get("Service") == 's ""'
    assert get("State") == 's "running"'
    assert get("NetworkInterfaces") == "ai 0"
    idbytes = get("Id").split()[2:]
    assert "".join(f"{int(b):02x}" for b in idbytes) == machine_id
    # CLOCK_MONOTONIC at boot: 0, or the µs that passed between reading the clocks (as in 252)
    assert 0 <= int(get("TimestampMonotonic").split()[1]) < 1000


def test_peer_and_logcontrol(machined: Machined, bus: BusDaemon) -> None:
    busctl(bus, "call", DEST, "/org/freedesktop/machine1", "org.freedesktop.DBus.Peer", "Ping")
    out = busctl(bus, "get-property", DEST, "/org/freedesktop/LogControl1",
                 "org.freedesktop.LogControl1", "SyslogIdentifier").stdout
    assert out.strip() == 's "systemd-machined"'
    busctl(bus, "set-property", DEST, "/org/freedesktop/LogControl1",
           "org.freedesktop.LogControl1", "LogLevel", "s", "info")
    out = busctl(bus, "get-property", DEST, "/org/freedesktop/LogControl1",
                 "org.freedesktop.LogControl1", "LogLevel").stdout
    assert out.strip() == 's "info"'


def test_bus_introspect_of_an_unknown_path() -> None:
    ours = subprocess.run([sys.executable, "-m", "machined", "--bus-introspect=/nope"],
                          cwd=REPO, capture_output=True, text=True)
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, "", "Object path /nope not found\n")
    if Path(REAL_MACHINED).exists():
        real = subprocess.run([REAL_MACHINED, "--bus-introspect=/nope"],
                              capture_output=True, text=True)
        assert (real.returncode, real.stdout, real.stderr) == (1, "", "Object path /nope not found\n")
