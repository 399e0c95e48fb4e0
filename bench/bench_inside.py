#!/usr/bin/env python3
"""`machinectl list` with N running containers: the real systemd 252 machined against ours, on
the same containers, in one run. Not a test.

machinectl list asks every machine's OS release and addresses (GetMachineOSRelease,
GetMachineAddresses), so each listing enters every container twice. The containers are
busybox trees (hard-linked copies of one), run by `systemd-nspawn --keep-unit --register=no
--private-network`, each started inside its own cgroup machine.slice/benchin-I.scope (all the
real daemon needs to accept RegisterMachine without systemd as PID 1). Both daemons run side by
side, each on its own private bus and in its own mount namespace (see bench_registry.py), and
get every container registered; the listings alternate between them.

Run as root from the repository:  .venv/bin/python bench/bench_inside.py [-n 100] [--runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_registry as br  # noqa: E402

DEFAULT_DOCS = br.REPO / "docs" / "benchmarks.md"
LEGACY_SYSTEMD = Path("/sys/fs/cgroup/systemd")
SECTION = "## Working inside machines: `machinectl list` with running containers"
APPLETS = ("sh", "sleep", "cat", "ls")


def busybox_tree(path: Path) -> Path:
    for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "tmp", "usr/lib", "var"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", path / "bin/busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    (path / "usr/lib/os-release").write_text('ID=tiny\nNAME="Tiny"\nVERSION_ID=1\n')
    (path / "etc/os-release").symlink_to("../usr/lib/os-release")
    path.chmod(0o755)
    return path


class Container:
    def __init__(self, i: int, base: Path, workdir: Path, mount: str) -> None:
        self.name = f"benchin{i}"
        self.root = workdir / self.name
        subprocess.run(["cp", "-al", str(base), str(self.root)], check=True)
        self.cgroup = Path(mount) / "machine.slice" / f"{self.name}.scope"
        # where nspawn mirrors that cgroup on a hybrid host (the name=systemd hierarchy)
        self.mirror = LEGACY_SYSTEMD / "machine.slice" / f"{self.name}.scope"
        self.cgroup.mkdir(exist_ok=True)
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"'
        self.proc = subprocess.Popen(
            ["sh", "-c", script, "sh", "systemd-nspawn", "-q", "--keep-unit", "--register=no",
             "--private-network", "-D", str(self.root), "-M", self.name,
             "/bin/sh", "-c", "while :; do sleep 1000; done"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.leader = 0

    def wait_leader(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn of {self.name} exited with {self.proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
                for pid in map(int, kids.split()):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "sh":
                        self.leader = pid
                        return pid
            time.sleep(0.05)
        raise RuntimeError(f"container {self.name} did not start")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            (self.cgroup / "cgroup.kill").write_text("1")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        # nspawn removes its propagation directory only when it exits by itself
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        for dirpath, _dirs, _files in [*os.walk(self.mirror, topdown=False),
                                       *os.walk(self.cgroup, topdown=False)]:
            for _ in range(50):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def machinectl_list(address: str) -> tuple[float, str]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
    t = time.monotonic()
    out = subprocess.run(["machinectl", "--no-pager", "list"], env=env, capture_output=True,
                         text=True, timeout=300)
    elapsed = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return elapsed, out.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--containers", type=int, default=100)
    p.add_argument("--runs", type=int, default=10, help="listings per daemon (default 10)")
    p.add_argument("--output", type=Path, default=DEFAULT_DOCS)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_inside.py needs root", file=sys.stderr)
        return 2
    mount = br.cgroup2_mount()
    ours_python = str(br.REPO / ".venv" / "bin" / "python")
    if not os.path.exists(ours_python):
        ours_python = sys.executable
    daemons = {"real": [br.REAL_MACHINED],
               "ours": [ours_python, "-m", "machined", "--scope-backend=cgroupfs"]}
    started_at = datetime.datetime.now().astimezone()
    times: dict[str, list[float]] = {tag: [] for tag in daemons}
    listed: dict[str, str] = {}
    with open(br.LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            br.log(f"waiting for {br.LOCK_FILE}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="machined-bench-inside."))
        containers: list[Container] = []
        buses: dict[str, br.BusDaemon] = {}
        procs: dict[str, br.Daemon] = {}
        try:
            with br.host_dirs(mount):
                base = busybox_tree(workdir / "base")
                br.log(f"starting {args.containers} containers")
                containers = [Container(i, base, workdir, mount)
                              for i in range(args.containers)]
                for c in containers:
                    c.wait_leader()
                br.log(f"containers up after {time.monotonic() - t0:.1f} s")
                for tag, argv in daemons.items():
                    buses[tag] = br.BusDaemon(tag)
                    procs[tag] = br.Daemon(tag, argv, buses[tag])
                    procs[tag].start()
                    bus = br.connect(buses[tag].address)
                    for c in containers:
                        br.call(bus, "RegisterMachine", "sayssus",
                                (c.name, b"", "bench", "container", c.leader, str(c.root)))
                    bus.close()
                for tag in daemons:  # warm-up (imports, caches), not counted
                    machinectl_list(buses[tag].address)
                for _ in range(args.runs):
                    for tag in daemons:
                        elapsed, out = machinectl_list(buses[tag].address)
                        times[tag].append(elapsed)
                        listed[tag] = out
        finally:
            for d in procs.values():
                d.stop()
            for b in buses.values():
                b.stop()
            for c in containers:
                c.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        runtime = time.monotonic() - t0
    for tag, out in listed.items():
        rows = [line.split() for line in out.splitlines()]
        ok = sum(1 for r in rows if len(r) >= 5 and r[0].startswith("benchin") and r[3] == "tiny"
                 and r[4] == "1")
        if ok != args.containers:
            br.log(f"{tag}: only {ok} of {args.containers} rows show the OS:\n{out}")
            return 1
    med = {tag: statistics.median(t) for tag, t in times.items()}
    best = {tag: min(t) for tag, t in times.items()}
    table = ["| daemon | median s | best s | listings |", "|---|---:|---:|---:|"]
    for tag in daemons:
        table.append(f"| {'real 252' if tag == 'real' else 'ours'} | {med[tag]:.3f} | "
                     f"{best[tag]:.3f} | {len(times[tag])} |")
    ratio = med["real"] / med["ours"] if med["ours"] else 0.0
    table.append(f"\nspeed ratio (real median / ours median, ≥ 1.00 = at least as fast): "
                 f"**{ratio:.2f}**")
    text = "\n".join(table)
    print(text)
    br.log(f"benchmark runtime {runtime:.0f} s")
    if not args.no_docs:
        write_docs(args.output, text, args, runtime, started_at)
    return 0


def write_docs(path: Path, table: str, args: argparse.Namespace, runtime: float,
               started: datetime.datetime) -> None:
    section = "\n".join([
        SECTION, "",
        f"- Date: {started.astimezone(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {br.machine_info()}",
        f"- Workload: {args.containers} busybox containers (`systemd-nspawn --keep-unit "
        "--register=no --private-network`, each in machine.slice/benchin-I.scope), registered "
        "with both daemons; `machinectl --no-pager list` (one ListMachines, then per machine "
        "GetMachineOSRelease and GetMachineAddresses) run "
        f"{args.runs} times against each daemon, alternating, after one warm-up listing each. "
        "Wall time of the whole machinectl process.",
        f"- Real daemon: `{br.REAL_MACHINED}`; ours: `python -m machined "
        "--scope-backend=cgroupfs`",
        f"- Benchmark runtime: {runtime:.0f} s",
        "- How to run: `sudo .venv/bin/python bench/bench_inside.py` (root)", "",
        table, ""])
    br.replace_section(path, SECTION, section)
    br.log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
