#!/usr/bin/env python3
"""Image benchmark: the real systemd 252 machined against ours on the same image pool, one run.

Not a test. A pool is made in a temp dir: 1,000 directory images (small OS trees), and
separately 100 raw images (sparse 64 MiB files holding an ext4 file system). Each daemon runs on
its own private dbus-daemon, in its own mount namespace with the pool bind-mounted over
/var/lib/machines (and tmpfs over /run/systemd/machines and /run/systemd/userdb, as in
bench_registry.py), so both see exactly the same images and the host's /var/lib/machines is
never touched. Measured, alternating between the daemons, best of --rounds:

  * ListImages, one caller, for --duration seconds             -> ms per call
  * `machinectl list-images` (the unchanged client), --runs times -> median wall time

Run as root from the repository:  sudo .venv/bin/python bench/bench_images.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_registry as br  # noqa: E402  (the private-bus and client helpers)

REPO = br.REPO
POOL_MOUNT = Path("/var/lib/machines")
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Images: ListImages and machinectl list-images"


def make_pool(kind: str, count: int) -> Path:
    pool = Path(tempfile.mkdtemp(prefix=f"machined-bench-pool-{kind}."))
    if kind == "directory":
        for i in range(count):
            root = pool / f"img{i:04d}"
            (root / "etc").mkdir(parents=True)
            (root / "usr/lib").mkdir(parents=True)
            (root / "usr/lib/os-release").write_text("ID=bench\nPRETTY_NAME=Bench\n")
            (root / "etc/hostname").write_text(f"img{i}\n")
    else:
        first = pool / "raw0000.raw"
        subprocess.run(["truncate", "-s", "64M", str(first)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(first)], check=True)
        for i in range(1, count):
            subprocess.run(["cp", "--sparse=always", str(first), str(pool / f"raw{i:04d}.raw")],
                           check=True)
    return pool


class PoolDaemon(br.Daemon):
    """br.Daemon with the pool bind-mounted over /var/lib/machines in its namespace."""

    pool: Path = Path()

    def mounts(self) -> list[str]:
        return [*super().mounts(), f"mount --bind {self.pool} {POOL_MOUNT}"]


def list_images_ms(address: str, duration: float) -> tuple[float, int]:
    """Mean ms per ListImages over `duration` seconds (after one warm-up call), and the number
    of images in the reply."""
    bus = br.connect(address)
    reply = br.call(bus, "ListImages")
    n = len(reply.get_contents())
    calls = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < duration:
        br.call(bus, "ListImages")
        calls += 1
    elapsed = time.monotonic() - t0
    with contextlib.suppress(Exception):
        bus.close()
    return elapsed / calls * 1000, n


def machinectl_ms(address: str, runs: int) -> float:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run(["machinectl", "--no-pager", "list-images"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        times.append((time.monotonic() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--directories", type=int, default=1000)
    p.add_argument("--raws", type=int, default=100)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smaller, shorter, writes nothing")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.directories, args.raws, args.duration, args.runs, args.rounds = 100, 10, 1, 3, 1
        args.no_docs = True
    if os.geteuid() != 0:
        raise SystemExit("needs root")

    lock = open(br.LOCK_FILE, "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    created_mount = not POOL_MOUNT.exists()
    POOL_MOUNT.mkdir(parents=True, exist_ok=True)
    for d in (br.STATE_DIR, br.USERDB_DIR):
        d.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[float]] = {}
    counts: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    pools: list[Path] = []
    try:
        for kind, count in (("directory", args.directories), ("raw", args.raws)):
            br.log(f"making {count} {kind} images")
            pool = make_pool(kind, count)
            pools.append(pool)
            running: dict[str, tuple[PoolDaemon, br.BusDaemon]] = {}
            try:
                for tag, argv in (("real", [br.REAL_MACHINED]),
                                  ("ours", [sys.executable, "-m", "machined",
                                            "--log-level=warning"])):
                    bus = br.BusDaemon(tag)
                    d = PoolDaemon(tag, argv, bus)
                    d.pool = pool
                    d.start()
                    running[tag] = (d, bus)
                for _ in range(args.rounds):
                    for tag, (_d, bus) in running.items():
                        ms, n = list_images_ms(bus.address, args.duration)
                        results.setdefault((kind, f"ListImages {tag}"), []).append(ms)
                        counts[(kind, tag)] = n
                        results.setdefault((kind, f"machinectl {tag}"), []).append(
                            machinectl_ms(bus.address, args.runs))
                for tag, (d, _bus) in running.items():
                    if counts.get((kind, tag)) != count + 1:
                        problems.append(f"{tag} listed {counts.get((kind, tag))} {kind} "
                                        f"images, expected {count + 1} (with .host)")
                    if "Traceback" in d.log():
                        problems.append(f"{tag} logged a traceback:\n{d.log()}")
            finally:
                for d, bus in running.values():
                    d.stop()
                    bus.stop()
    finally:
        for pool in pools:
            shutil.rmtree(pool, ignore_errors=True)
        if created_mount:
            with contextlib.suppress(OSError):
                POOL_MOUNT.rmdir()
        lock.close()

    rows = []
    for kind, count in (("directory", args.directories), ("raw", args.raws)):
        for what in ("ListImages", "machinectl"):
            real = min(results[(kind, f"{what} real")])
            ours = min(results[(kind, f"{what} ours")])
            label = (f"ListImages, {count} {kind} images (ms/call)" if what == "ListImages"
                     else f"`machinectl list-images`, {count} {kind} images (ms)")
            rows.append((label, real, ours, real / ours))
    table = ["| metric (best of rounds; lower is better) | real 252 | ours | speed-up "
             "(real/ours) |", "|---|---|---|---|"]
    table += [f"| {label} | {real:.1f} | {ours:.1f} | {ratio:.2f} |"
              for label, real, ours, ratio in rows]
    every = ["| measurement | every round (ms) |", "|---|---|"]
    every += [f"| {kind}: {what} | {', '.join(f'{v:.1f}' for v in vals)} |"
              for (kind, what), vals in results.items()]
    text = "\n".join([
        SECTION, "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC with "
        f"`bench/bench_images.py` on {br.machine_info()}.",
        "Both daemons see the same pool bind-mounted over /var/lib/machines in their own mount "
        "namespace, each on its own private bus; ListImages is called by one sdbus client for "
        f"{args.duration:g} s per round; `machinectl list-images` is the median of {args.runs} "
        f"runs; {args.rounds} rounds, alternating. Both are steady-state figures: ours keeps "
        "what a scan found for entries whose stat() did not change (docs/compatibility.md); "
        "its first scan, which looks at every entry, takes about twice as long.", "",
        *table, "", *every, "",
        "Problems: " + ("; ".join(problems) if problems else "none"), ""])
    print(text)
    if not args.no_docs:
        br.replace_section(DOCS, SECTION, text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
