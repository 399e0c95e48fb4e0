"""The D-Bus policy and polkit actions we ship say what systemd 252's own say (Debian's
systemd-container package installs those): element for element, text and attributes alike;
only comments and layout differ."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.helpers.busdaemon import REPO

SHIPPED = {
    "policy/org.freedesktop.machine1.conf": "/usr/share/dbus-1/system.d/org.freedesktop.machine1.conf",
    "policy/org.freedesktop.machine1.policy":
        "/usr/share/polkit-1/actions/org.freedesktop.machine1.policy",
}


def canonical(path: Path) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """(tag, attributes, text) of every element in document order."""
    return [(el.tag, tuple(sorted(el.attrib.items())), (el.text or "").strip())
            for el in ET.parse(path).getroot().iter()]


@pytest.mark.parametrize("ours", sorted(SHIPPED))
def test_same_as_252s(ours: str) -> None:
    shipped = Path(SHIPPED[ours])
    if not shipped.exists():
        pytest.skip(f"{shipped} is not installed (systemd-container)")
    assert canonical(REPO / ours) == canonical(shipped)
    doctype = [line for line in (REPO / ours).read_text().splitlines() if "dtd" in line]
    assert doctype and all(line in shipped.read_text() for line in doctype)
