"""The command line as 252's systemd-machined has it: help, bad usage (getopt_long's words,
exit status 1), and what ours adds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.busdaemon import REPO
from tests.helpers.real252 import REAL_MACHINED


def run(*args: str, real: bool = False) -> tuple[int, str, str]:
    argv = [REAL_MACHINED] if real else [sys.executable, "-m", "machined"]
    out = subprocess.run([*argv, *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    # getopt_long names the program by its argv[0]; ours is always systemd-machined
    return out.returncode, out.stdout, out.stderr.replace(REAL_MACHINED, "systemd-machined")


BAD_USAGE = [
    ["--bogus"],
    ["extra"],
    ["--bus-introspect"],
    ["--bogus", "--bus-introspect=list"],
]


@pytest.mark.parametrize("args", BAD_USAGE, ids=" ".join)
def test_bad_usage_as_252(args: list[str]) -> None:
    ours = run(*args)
    assert ours[0] == 1 and ours[1] == "" and ours[2]
    if Path(REAL_MACHINED).exists():
        assert ours == run(*args, real=True)


def test_help_is_252s_with_our_options() -> None:
    code, out, err = run("--help")
    assert (code, err) == (0, "")
    assert run("-h") == (code, out, err)
    assert "--log-level=LEVEL" in out and "--scope-backend=auto|systemd1|cgroupfs" in out
    if Path(REAL_MACHINED).exists():
        real = run("--help", real=True)[1].replace(REAL_MACHINED, "systemd-machined")
        # every line of 252's help, in its order; ours adds its options' lines in between
        lines = iter(out.splitlines())
        assert all(line in lines for line in real.splitlines())


def test_abbreviated_options_as_getopt_long() -> None:
    code, out, _ = run("--vers")
    assert code == 0 and out.startswith("machined ")


def test_a_bad_option_value() -> None:
    code, out, err = run("--log-level=loud")
    assert code == 1 and out == "" and "--log-level" in err and "'loud'" in err
