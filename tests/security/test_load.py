"""Load, short version of bench/bench_load.py (60 s and 10,000 cycles there): 1,000 registered
machines, 50 concurrent clients doing mixed calls for 10 s, then 2,000 register/unregister
cycles. No call fails, and memory does not grow with the cycles (a generous bound: the figures
are in docs/robustness.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_load  # noqa: E402


def test_load_short() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    res = bench_load.run(machines=1000, clients=50, duration=10, cycles=2000)
    print("\n" + bench_load.table(res))
    assert not res.problems
    assert res.calls > 0 and res.errors == 0, res.first_error
    assert res.churn_errors == 0
    assert res.rss_churn_end_kib - res.rss_churn_warm_kib < 16 * 1024
