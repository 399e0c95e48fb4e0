#!/usr/bin/env python3
"""userdb benchmark: GetUserRecord on io.systemd.Machine, the real systemd 252 machined against
ours, one run.

Not a test. One container is registered with both daemons: a `sleep` in a user namespace of its
own (UIDs 0..65535 -> 100000..165535) in cgroup machine.slice/bench-userdb.scope. Each daemon
runs as in bench_registry.py (private dbus-daemon, own mount namespace, tmpfs over
/run/systemd/machines and /run/systemd/userdb); the clients reach its socket through
/proc/PID/root. Calls, each answered before the next is sent, for --duration seconds per slice,
slices alternating between the daemons, medians over --slices slices:

  * by UID (a hit: "vu-benchct-N"), by name, and a miss (an unmapped UID, NoRecordFound),
  * from 1 connection, and from --callers processes with a connection each.

Run as root from the repository:  sudo .venv/bin/python bench/bench_userdb.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_registry as br  # noqa: E402  (private buses, daemons in mount namespaces)

from tests.helpers.userns import spawn_userns_leader  # noqa: E402

DOCS = br.REPO / "docs" / "benchmarks.md"
SECTION = "## userdb: GetUserRecord on io.systemd.Machine"
SVC = "io.systemd.Machine"
MACHINE = "benchct"


def request(kind: str, i: int) -> bytes:
    params: dict[str, object] = {"service": SVC}
    if kind == "uid":
        params["uid"] = 100000 + i % 60000
    elif kind == "name":
        params["userName"] = f"vu-{MACHINE}-{i % 60000}"
    else:
        params["uid"] = 900000 + i % 60000
    return json.dumps({"method": "io.systemd.UserDatabase.GetUserRecord",
                       "parameters": params}).encode() + b"\0"


def _caller(path: str, kind: str, duration: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    calls = errors = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        start = time.monotonic()
        end = start + duration
        while time.monotonic() < end:
            s.sendall(request(kind, calls))
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = s.recv(65536)
                if not chunk:
                    out.put((calls, errors + 1, time.monotonic() - start))
                    return
                reply += chunk
            expected = b'"error"' in reply if kind == "miss" else b'"record"' in reply
            errors += not expected
            calls += 1
        out.put((calls, errors, time.monotonic() - start))


def measure(path: str, kind: str, callers: int, duration: float) -> tuple[float, int]:
    """(calls/s, errors) of `callers` processes for `duration` seconds."""
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_caller, args=(path, kind, duration, q)) for _ in range(callers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=duration + 30) for _ in procs]
    br.join_or_kill(procs)
    return sum(r[0] for r in results) / max(r[2] for r in results), sum(r[1] for r in results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1.0, help="seconds per slice (default 1)")
    p.add_argument("--slices", type=int, default=6, help="slices per measurement (default 6)")
    p.add_argument("--callers", type=int, default=16, help="concurrent callers (default 16)")
    p.add_argument("--quick", action="store_true", help="2 slices of 0.5 s; docs not written")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.slices, args.no_docs = 0.5, 2, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_userdb.py needs root (cgroups, namespaces)", file=sys.stderr)
        return 2
    mount = br.cgroup2_mount()
    ours_python = str(br.REPO / ".venv" / "bin" / "python")
    argvs = {"real": [br.REAL_MACHINED],
             "ours": [ours_python, "-m", "machined", "--scope-backend=cgroupfs"]}
    rates: dict[tuple[str, str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    problems: list[str] = []
    started = time.monotonic()
    with open(br.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        scope = Path(mount) / "machine.slice" / "bench-userdb.scope"
        running: dict[str, tuple[br.Daemon, br.BusDaemon]] = {}
        with br.host_dirs(mount):
            try:
                leader = spawn_userns_leader(scope, "0 100000 65536", "0 200000 65536")
                for tag, daemon_argv in argvs.items():
                    bus = br.BusDaemon(f"udb-{tag}")
                    d = br.Daemon(tag, daemon_argv, bus)
                    running[tag] = (d, bus)
                    d.start()
                    subprocess.run(
                        ["busctl", f"--address={bus.address}", "call",
                         "org.freedesktop.machine1", "/org/freedesktop/machine1",
                         "org.freedesktop.machine1.Manager", "RegisterMachine", "sayssus",
                         MACHINE, "0", "bench", "container", str(leader), "/"],
                        check=True, capture_output=True)
                paths = {tag: f"/proc/{d.pid}/root/run/systemd/userdb/{SVC}"
                         for tag, (d, _bus) in running.items()}
                for kind in ("uid", "name", "miss"):
                    for callers in (1, args.callers):
                        for i in range(args.slices):
                            pair = {}
                            for tag in (("real", "ours") if i % 2 == 0 else ("ours", "real")):
                                d = running[tag][0]
                                cpu0 = d.cpu_seconds()
                                rate, errors = measure(paths[tag], kind, callers, args.duration)
                                used = d.cpu_seconds() - cpu0
                                if errors:
                                    problems.append(f"{tag} {kind}: {errors} wrong answers")
                                rates.setdefault((tag, kind, callers), []).append(rate)
                                cpu.setdefault((tag, kind), []).append(
                                    used / max(rate * args.duration, 1) * 1e6)
                                pair[tag] = rate
                            ratios.setdefault((kind, callers), []).append(
                                pair["ours"] / pair["real"])
                            br.log(f"{kind} x{callers} slice {i + 1}: real {pair['real']:,.0f}/s,"
                                   f" ours {pair['ours']:,.0f}/s")
                for tag, (d, _bus) in running.items():
                    if "Traceback" in d.log():
                        problems.append(f"{tag} logged a traceback:\n{d.log()}")
            finally:
                for d, bus in running.values():
                    d.stop()
                    bus.stop()
                with contextlib.suppress(OSError):
                    (scope / "cgroup.kill").write_text("1")
                br.rmdir_retry(scope)

    labels = {"uid": "by UID (found)", "name": "by name (found)", "miss": "by UID (not found)"}
    table = ["| GetUserRecord | callers | real 252 calls/s | ours calls/s | ratio |",
             "|---|---:|---:|---:|---:|"]
    for kind, label in labels.items():
        for callers in (1, args.callers):
            real = statistics.median(rates[("real", kind, callers)])
            ours = statistics.median(rates[("ours", kind, callers)])
            ratio = statistics.median(ratios[(kind, callers)])
            table.append(f"| {label} | {callers} | {real:,.0f} | {ours:,.0f} | {ratio:.2f} |")
    cpu_rows = ["| GetUserRecord | real 252 µs | ours µs |", "|---|---:|---:|"]
    for kind, label in labels.items():
        cpu_rows.append(f"| {label} | {statistics.median(cpu[('real', kind)]):.0f} | "
                        f"{statistics.median(cpu[('ours', kind)]):.0f} |")
    text = "\n".join([
        SECTION, "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC with "
        f"`bench/bench_userdb.py` on {br.machine_info()}, ours at commit {br.git_head()}, "
        f"in {time.monotonic() - started:.0f} s.",
        "One user-namespaced container registered with each daemon; Varlink calls on the "
        "daemon's /run/systemd/userdb/io.systemd.Machine, each answered before the next, from one "
        f"connection and from {args.callers} processes with a connection each; {args.slices} "
        f"slices of {args.duration:g} s per measurement, alternating between the daemons. Rates "
        "are medians; ratio = ours / real, the median of the paired slices' ratios.", "",
        *table, "",
        "Daemon CPU time per call (one caller and many together, median of slices):", "",
        *cpu_rows, "",
        "Problems: " + ("; ".join(problems) if problems else "none"), ""])
    print(text)
    if not args.no_docs:
        br.replace_section(DOCS, SECTION, text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
