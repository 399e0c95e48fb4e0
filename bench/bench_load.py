#!/usr/bin/env python3
"""Load: many machines, many concurrent clients, and registration churn, against our daemon.

Not a test (tests/security/test_load.py runs a short version of the same code). The daemon runs
as in bench_registry.py: a private dbus-daemon, its own mount namespace with tmpfs over
/run/systemd/machines, leaders in cgroups of their own, cgroupfs scopes, a private empty image
pool. Measured:

  1. register --machines machines (1 caller);
  2. --clients processes, each with its own connection, for --duration seconds doing mixed
     calls (GetMachine, GetMachineByPID, Properties.GetAll of a machine, ListMachines,
     GetImage, ListImages, Peer.Ping): calls, errors, p50/p99/max latency;
  3. unregister them all, then --churn cycles of RegisterMachine + UnregisterMachine: VmRSS
     after the first tenth of the cycles (warm) and at the end.

Run as root from the repository:  .venv/bin/python bench/bench_load.py [--quick]
(it takes /tmp/machined-tests.lock itself).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_registry as br  # noqa: E402  (private bus, daemon in a namespace, leaders)

MACHINE_IFACE = "org.freedesktop.machine1.Machine"
CallSpec = tuple[str, str, str, str, tuple[Any, ...]]  # path, interface, member, signature, args


@dataclass
class LoadResult:
    machines: int = 0
    clients: int = 0
    duration: float = 0.0
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    churn: int = 0
    churn_errors: int = 0
    churn_seconds: float = 0.0
    rss_idle_kib: int = 0
    rss_loaded_kib: int = 0
    rss_after_clients_kib: int = 0
    rss_churn_warm_kib: int = 0
    rss_churn_end_kib: int = 0
    problems: list[str] = field(default_factory=list)


def mixed_calls(names: list[str], pids: list[int]) -> list[CallSpec]:
    """(path, interface, member, signature, args): lookups mostly, a listing now and then."""
    out: list[CallSpec] = []
    for i, (name, pid) in enumerate(zip(names, pids, strict=True)):
        out.append((br.OBJ, br.IFACE, "GetMachine", "s", (name,)))
        out.append((br.OBJ, br.IFACE, "GetMachineByPID", "u", (pid,)))
        out.append((f"{br.OBJ}/machine/{name}", "org.freedesktop.DBus.Properties", "GetAll",
                    "s", (MACHINE_IFACE,)))
        out.append((br.OBJ, "org.freedesktop.DBus.Peer", "Ping", "", ()))
        if i % 10 == 0:
            out.append((br.OBJ, br.IFACE, "ListMachines", "", ()))
            out.append((br.OBJ, br.IFACE, "GetImage", "s", (".host",)))
            out.append((br.OBJ, br.IFACE, "ListImages", "", ()))
    return out


def _client(address: str, calls: list[CallSpec], offset: int,
            duration: float, barrier: Any, results: Any) -> None:
    try:
        bus = br.connect(address)
        br.call(bus, "GetId", "", (), "org.freedesktop.DBus", "/org/freedesktop/DBus",
                "org.freedesktop.DBus")
        barrier.wait()
    except BaseException as e:  # noqa: BLE001
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.abort()
        results.put((0, 1, f"connect: {e!r}", []))
        return
    latencies: list[float] = []
    errors = 0
    first = ""
    n = len(calls)
    i = offset % n
    end = time.monotonic() + duration
    while True:
        path, iface, member, sig, args = calls[i]
        t = time.perf_counter()
        try:
            br.call(bus, member, sig, args, br.DEST, path, iface)
        except Exception as e:  # noqa: BLE001
            errors += 1
            first = first or f"{member}{args}: {e!r}"
        latencies.append(time.perf_counter() - t)
        i = i + 1 if i + 1 < n else 0
        if time.monotonic() >= end:
            break
    results.put((len(latencies), errors, first, latencies))


def run_clients(address: str, calls: list[CallSpec],
                clients: int, duration: float, res: LoadResult) -> None:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_client, daemon=True,
                         args=(address, calls, k * (len(calls) // clients), duration, barrier,
                               results)) for k in range(clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=60)
        out = [results.get(timeout=duration + 120) for _ in procs]
    finally:
        br.join_or_kill(procs)
    lat = sorted(x for r in out for x in r[3])
    res.calls = sum(r[0] for r in out)
    res.errors = sum(r[1] for r in out)
    res.first_error = next((r[2] for r in out if r[2]), "")
    if lat:
        res.p50_ms = statistics.median(lat) * 1000
        res.p99_ms = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        res.max_ms = lat[-1] * 1000


def churn(bus: Any, pids: list[int], cycles: int, daemon: br.Daemon, res: LoadResult) -> None:
    t0 = time.monotonic()
    warm_at = max(1, cycles // 10)
    for k in range(cycles):
        name = f"churn{k}"
        try:
            br.call(bus, "RegisterMachine", "sayssus",
                    (name, b"", "bench", "container", pids[k % len(pids)], ""))
            br.call(bus, "UnregisterMachine", "s", (name,))
        except Exception as e:  # noqa: BLE001
            res.churn_errors += 1
            if res.churn_errors == 1:
                res.problems.append(f"churn {name}: {e!r}")
        if k + 1 == warm_at:
            res.rss_churn_warm_kib = daemon.rss_kib()
    res.churn_seconds = time.monotonic() - t0
    res.rss_churn_end_kib = daemon.rss_kib()


def run(machines: int, clients: int, duration: float, cycles: int,
        python: str = sys.executable) -> LoadResult:
    """One load run; the caller holds /tmp/machined-tests.lock."""
    res = LoadResult(machines=machines, clients=clients, duration=duration, churn=cycles)
    mount = br.cgroup2_mount()
    images = tempfile.mkdtemp(prefix="machined-load-images.")
    (Path(images) / "var/lib/machines").mkdir(parents=True)
    bus = daemon = leaders = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(br.host_dirs(mount))
        try:
            bus = br.BusDaemon("load")
            daemon = br.Daemon("ours", [python, "-m", "machined", "--scope-backend=cgroupfs",
                                        "--log-level=warning", f"--image-root={images}"], bus)
            daemon.start()
            res.rss_idle_kib = daemon.rss_kib()
            leaders = br.Leaders("load", machines, mount)
            names = [f"load{i}" for i in range(machines)]
            client = br.connect(bus.address)
            for name, pid in zip(names, leaders.pids, strict=True):
                br.call(client, "RegisterMachine", "sayssus",
                        (name, b"", "bench", "container", pid, ""))
            res.rss_loaded_kib = daemon.rss_kib()
            run_clients(bus.address, mixed_calls(names, leaders.pids), clients, duration, res)
            res.rss_after_clients_kib = daemon.rss_kib()
            for name in names:
                br.call(client, "UnregisterMachine", "s", (name,))
            churn(client, leaders.pids, cycles, daemon, res)
            if br.list_count(bus.address) != 1:
                res.problems.append("machines left after the churn")
            if daemon.proc is not None and daemon.proc.poll() is not None:
                res.problems.append(f"daemon died: {daemon.log()[-2000:]}")
        finally:
            if daemon is not None:
                rc = daemon.stop()
                if rc not in (0, None):
                    res.problems.append(f"daemon exit status {rc}")
                bad = [ln for ln in daemon.log().splitlines()
                       if "Traceback" in ln or "ERROR" in ln or "CRITICAL" in ln]
                if bad:
                    res.problems.append(f"daemon log: {bad[0]}")
            if leaders is not None:
                left = leaders.cleanup()
                if left:
                    res.problems.append(f"cgroups left: {left[:3]}")
            if bus is not None:
                bus.stop()
            with contextlib.suppress(OSError):
                for d in ("var/lib/machines", "var/lib", "var", ""):
                    os.rmdir(Path(images) / d)
    return res


def table(res: LoadResult) -> str:
    mib = 1024
    return "\n".join([
        "| Measure | Value |",
        "|---|---|",
        f"| machines registered / concurrent clients / duration | {res.machines} / "
        f"{res.clients} / {res.duration:g} s |",
        f"| mixed calls tried / failed | {res.calls:,} / {res.errors} |",
        f"| throughput | {res.calls / res.duration:,.0f} calls/s |",
        f"| latency p50 / p99 / max | {res.p50_ms:.1f} / {res.p99_ms:.1f} / {res.max_ms:.0f} ms |",
        f"| RSS idle / {res.machines} machines / after the clients | "
        f"{res.rss_idle_kib / mib:.1f} / {res.rss_loaded_kib / mib:.1f} / "
        f"{res.rss_after_clients_kib / mib:.1f} MiB |",
        f"| register+unregister cycles / failed / time | {res.churn:,} / {res.churn_errors} / "
        f"{res.churn_seconds:.1f} s |",
        f"| RSS after {res.churn // 10:,} cycles / after {res.churn:,} | "
        f"{res.rss_churn_warm_kib / mib:.1f} / {res.rss_churn_end_kib / mib:.1f} MiB |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, default=1000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--churn", type=int, default=10_000)
    p.add_argument("--quick", action="store_true", help="10 s, 2,000 churn cycles")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.churn = 10.0, 2000
    if os.geteuid() != 0:
        print("bench_load.py needs root", file=sys.stderr)
        return 2
    python = str(br.REPO / ".venv" / "bin" / "python")
    with open(br.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = run(args.machines, args.clients, args.duration, args.churn,
                  python if os.path.exists(python) else sys.executable)
    print(br.machine_info())
    print(table(res))
    for problem in res.problems:
        print("PROBLEM:", problem)
    return 1 if res.problems or res.errors or res.churn_errors else 0


if __name__ == "__main__":
    sys.exit(main())
