"""Working inside machines: each test module gets one daemon on its own bus, shared by its
tests, because the containers they run in are started once per module too."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.busdaemon import BusDaemon
from tests.helpers.daemon import Machined

from .support import module_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[BusDaemon, Machined]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    yield from module_daemon()


@pytest.fixture(scope="module")
def bus(daemon: tuple[BusDaemon, Machined]) -> BusDaemon:
    return daemon[0]
