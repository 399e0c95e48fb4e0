#!/usr/bin/env python3
"""Registry benchmark: the real systemd 252 machined against ours, same workload, one run.

Not a test. Each daemon gets its own private dbus-daemon and its own mount namespace with a tmpfs
over /run/systemd/machines (and /run/systemd/userdb, where 252 puts its varlink socket), so the
two never see each other and nothing is left in the host's /run. For each daemon:

  1. spawn N leader processes (sleep), each in its own cgroup
     <cgroup2>/machine.slice/bench-<daemon>-<i>.scope, which is all RegisterMachine needs to find
     a unit without systemd as PID 1;
  2. RegisterMachine all N (1 caller)                                    -> registrations/s
  3. GetMachine, GetMachineByPID, ListMachines with 1 and with C callers -> calls/s
     (each caller is a process with its own bus connection; fixed duration per measurement)
  4. UnregisterMachine all N (1 caller)                                  -> unregistrations/s
  5. VmRSS of the daemon when idle, after registration and at the end.

The same client code (sdbus low-level, synchronous calls, replies not parsed) drives both daemons.
Everything runs under `flock /tmp/machined-tests.lock`, because other test runs on this machine use
/run/systemd/machines, machine.slice and the real machined too.

Run as root from the repository:  sudo .venv/bin/python bench/bench_registry.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import itertools
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helpers import real252  # noqa: E402
from tests.helpers.busdaemon import BusDaemon as TestBusDaemon  # noqa: E402 - needs REPO
from tests.helpers.process import stop_process  # noqa: E402

LOCK_FILE = "/tmp/machined-tests.lock"
STATE_DIR = Path("/run/systemd/machines")
USERDB_DIR = Path("/run/systemd/userdb")  # 252's varlink socket; kept off the host as well
REAL_MACHINED = "/lib/systemd/systemd-machined"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
# Column headings of the two slots; --control runs one daemon in both and relabels them.
COLUMNS = {"real": "real 252", "ours": "ours"}
SECTION = "## Machine registry: real systemd-machined 252 vs. ours"

DEST = "org.freedesktop.machine1"
OBJ = "/org/freedesktop/machine1"
IFACE = "org.freedesktop.machine1.Manager"
CALL_TIMEOUT_USEC = 10_000_000
MAX_ERRORS = 20  # a caller gives up after this many failed calls



def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- host facts
def cgroup2_mount() -> str:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid hosts)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                found.append(fields[4])
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    if not found:
        raise SystemExit("no cgroup2 hierarchy is mounted")
    return found[0]


def proc_status(pid: int, key: str) -> int:
    """A "kB" field of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def inotify_watches(pid: int) -> int:
    """Watches held by all inotify instances of pid (fdinfo lines "inotify wd:...")."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            count += sum(1 for line in f if line.startswith("inotify wd:"))
    return count


def machine_info() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    osname = "?"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"')
    return (f"{osname}, kernel {platform.release()}, {os.cpu_count()} CPU(s) ({cpu}), "
            f"{mem_gib:.0f} GiB RAM, Python {platform.python_version()}")


# --------------------------------------------------------------------------- bus client
def connect(address: str) -> Any:
    from sdbus.sd_bus_internals import sd_bus_open_system

    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    bus = sd_bus_open_system()
    bus.method_call_timeout_usec = CALL_TIMEOUT_USEC
    return bus


def call(bus: Any, member: str, sig: str = "", args: tuple[Any, ...] = (),
         dest: str = DEST, path: str = OBJ, iface: str = IFACE) -> Any:
    msg = bus.new_method_call_message(dest, path, iface, member)
    if sig:
        msg.append_data(sig, *args)
    return bus.call(msg)


def name_has_owner(bus: Any, name: str) -> bool:
    reply = call(bus, "NameHasOwner", "s", (name,), "org.freedesktop.DBus",
                 "/org/freedesktop/DBus", "org.freedesktop.DBus")
    return bool(reply.get_contents())


Calls = list[tuple[str, str, tuple[Any, ...]]]  # (member, signature, arguments)


def _worker(address: str, calls: Calls, offset: int, duration: float | None,
            barrier: Any, results: Any) -> None:
    """One caller: its own connection; either every call of `calls` once (duration None), or
    cycling through them from `offset` until `duration` seconds have passed."""
    try:
        bus = connect(address)
        call(bus, "GetId", "", (), "org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus")  # connected and authenticated before the clock starts
    except BaseException as e:  # noqa: BLE001
        barrier.abort()
        results.put((0, 1, 0.0, 0.0, f"connect: {e!r}"))
        return
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        results.put((0, 1, 0.0, 0.0, "another caller failed to connect"))
        return
    done = errors = 0
    first_error = ""
    t0 = time.monotonic()
    # Each call once, or round and round from this caller's offset until the time is up.
    end = None if duration is None else t0 + duration
    sequence = calls if end is None else itertools.islice(itertools.cycle(calls),
                                                          offset % len(calls), None)
    for member, sig, args in sequence:
        try:
            call(bus, member, sig, args)
        except Exception as e:  # noqa: BLE001
            errors += 1
            first_error = first_error or f"{member}{args}: {e!r}"
            if errors >= MAX_ERRORS:
                break
        done += 1
        if end is not None and time.monotonic() >= end:
            break
    results.put((done, errors, t0, time.monotonic(), first_error))


@dataclass
class Rate:
    calls: int
    seconds: float
    errors: int
    first_error: str = ""

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def run_callers(address: str, calls: Calls, callers: int, duration: float | None) -> Rate:
    """`callers` processes at once. With duration None the calls are split between them."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(callers + 1)
    results = ctx.Queue()
    procs = []
    for k in range(callers):
        mine = calls if duration is not None else calls[k::callers]
        offset = k * max(1, len(calls) // callers)
        p = ctx.Process(target=_worker, args=(address, mine, offset, duration, barrier, results),
                        daemon=True)
        p.start()
        procs.append(p)
    try:
        barrier.wait(timeout=60)
        timeout = 600 if duration is None else duration + 120
        out = [results.get(timeout=timeout) for _ in procs]
    finally:
        join_or_kill(procs)
    calls_done = sum(r[0] for r in out)
    errors = sum(r[1] for r in out)
    started = [r[2] for r in out if r[2]]
    seconds = max(r[3] for r in out) - min(started) if started else 0.0
    first = next((r[4] for r in out if r[4]), "")
    return Rate(calls_done, seconds, errors, first)


def join_or_kill(procs: list[Any]) -> None:
    """Wait for the caller processes; kill those that do not end within 10 s."""
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


# --------------------------------------------------------------------------- processes
class BusDaemon(TestBusDaemon):
    """A private dbus-daemon (type system, open policy) in a temp dir."""

    def __init__(self, tag: str) -> None:
        super().__init__("open", prefix=f"machined-bench-{tag}.")


@dataclass
class Daemon:
    """A machined in its own mount namespace with tmpfs over the state directories.

    unshare and sh exec into the daemon, so proc.pid is the daemon's own PID (checked)."""

    tag: str
    argv: list[str]
    bus: BusDaemon
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def mounts(self) -> list[str]:
        """Shell commands run in the daemon's mount namespace before it starts."""
        return [f"mount -t tmpfs -o mode=0755 tmpfs {STATE_DIR}",
                f"mount -t tmpfs -o mode=0755 tmpfs {USERDB_DIR}"]

    def start(self) -> None:
        self.log_path = self.bus.dir / f"{self.tag}.log"
        script = " && ".join([*self.mounts(), 'exec "$@"'])
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus.address,
               "SYSTEMD_LOG_TARGET": "console"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                 *self.argv],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True)
        bus = connect(self.bus.address)
        deadline = time.monotonic() + 30
        while not name_has_owner(bus, DEST):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.tag} machined exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.tag} machined did not take its name:\n{self.log()}")
            time.sleep(0.05)
        exe = os.readlink(f"/proc/{self.pid}/exe")
        if os.path.basename(exe) in ("unshare", "sh", "dash", "bash"):
            raise RuntimeError(f"PID {self.pid} is {exe}, not the daemon")
        with contextlib.suppress(Exception):
            bus.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time the daemon's threads have used so far, to the nanosecond (schedstat, where
        /proc/PID/stat counts in clock ticks of 10 ms)."""
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)


class Leaders:
    """N `sleep` processes, each moved into its own cgroup machine.slice/bench-TAG-I.scope."""

    def __init__(self, tag: str, n: int, mount: str) -> None:
        self.tag = tag
        self.mount = mount
        self.slice = Path(mount) / "machine.slice"
        self.pids: list[int] = []
        self.cgroups: list[Path] = []
        sleep = shutil.which("sleep") or "/bin/sleep"
        for i in range(n):
            cg = self.slice / f"bench-{tag}-{i}.scope"
            cg.mkdir(exist_ok=True)
            self.cgroups.append(cg)
            pid = os.posix_spawn(sleep, ["sleep", "3600"], {}, setsid=True)
            self.pids.append(pid)
            (cg / "cgroup.procs").write_text(str(pid))

    def unit(self, i: int) -> str:
        return f"bench-{self.tag}-{i}.scope"

    def cleanup(self) -> list[str]:
        """Kill and reap the leaders, remove their cgroups; returns what could not be removed."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()
        left = []
        for cg in self.cgroups:
            if not rmdir_retry(cg):
                left.append(str(cg))
        self.cgroups.clear()
        return left


def rmdir_retry(path: Path, tries: int = 50) -> bool:
    for _ in range(tries):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                return False
            time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- workload
METHODS = ("GetMachine", "GetMachineByPID", "ListMachines")


@dataclass
class Result:
    tag: str
    values: dict[str, float] = field(default_factory=dict)  # medians of rates; memory figures
    samples: dict[str, list[float]] = field(default_factory=dict)  # every slice's rate
    cpu: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # (CPU s, calls)
    ratios: dict[str, list[float]] = field(default_factory=dict)  # ours / real, slice by slice
    problems: list[str] = field(default_factory=list)


def list_count(address: str) -> int:
    bus = connect(address)
    try:
        return len(call(bus, "ListMachines").get_contents())
    finally:
        with contextlib.suppress(Exception):
            bus.close()


class Subject:
    """One daemon under test with its bus, its leaders and its results."""

    def __init__(self, tag: str, argv: list[str], args: argparse.Namespace, mount: str) -> None:
        self.tag = tag
        self.argv = argv
        self.args = args
        self.mount = mount
        self.res = Result(tag)
        self.bus: BusDaemon | None = None
        self.daemon: Daemon | None = None
        self.leaders: Leaders | None = None
        self.calls: dict[str, Calls] = {}

    @property
    def address(self) -> str:
        assert self.bus is not None
        return self.bus.address

    def setup(self) -> None:
        n = self.args.machines
        self.bus = BusDaemon(self.tag)
        self.daemon = Daemon(self.tag, self.argv, self.bus)
        self.daemon.start()
        log(f"{self.tag}: daemon PID {self.daemon.pid} ({' '.join(self.argv)}) on {self.address}")
        time.sleep(0.5)
        self.res.values["rss_idle"] = self.daemon.rss_kib()
        self.res.values["anon_idle"] = proc_status(self.daemon.pid, "RssAnon")
        t = time.monotonic()
        self.leaders = Leaders(self.tag, n, self.mount)
        log(f"{self.tag}: spawned {n} leaders in {time.monotonic() - t:.2f} s")
        names = [f"bench{i}" for i in range(n)]
        pids = self.leaders.pids
        self.calls = {
            "register": [("RegisterMachine", "sayssus",
                          (names[i], b"", "bench", "container", pids[i], "")) for i in range(n)],
            "unregister": [("UnregisterMachine", "s", (name,)) for name in names],
            "GetMachine": [("GetMachine", "s", (name,)) for name in names],
            "GetMachineByPID": [("GetMachineByPID", "u", (pid,)) for pid in pids],
            "ListMachines": [("ListMachines", "", ())],
        }

    def measure(self, key: str, calls: Calls, callers: int, duration: float | None) -> float:
        """One slice of a measurement; returns its rate."""
        assert self.daemon is not None
        with self.profiling(key):
            cpu0 = self.daemon.cpu_seconds()
            rate = run_callers(self.address, calls, callers, duration)
            cpu = self.daemon.cpu_seconds() - cpu0
        if rate.errors:
            self.res.problems.append(f"{key}: {rate.errors} of {rate.calls} calls failed, "
                                     f"first: {rate.first_error}")
        log(f"  {self.tag}: {key}: {rate.calls} calls in {rate.seconds:.2f} s = "
            f"{rate.per_second:,.0f}/s, daemon CPU {cpu / max(rate.calls, 1) * 1e6:.0f} µs/call"
            + (f", {rate.errors} errors" if rate.errors else ""))
        self.res.samples.setdefault(key, []).append(rate.per_second)
        self.res.values[key] = statistics.median(self.res.samples[key])
        self.res.cpu.setdefault(key, []).append((cpu, rate.calls))
        return rate.per_second

    @contextlib.contextmanager
    def profiling(self, key: str) -> Any:
        """With --profile: py-spy samples our daemon during one measurement (collapsed stacks,
        one file per measurement and round). Sampling costs the daemon some throughput."""
        if not self.args.profile or self.tag != "ours":
            yield
            return
        assert self.daemon is not None
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        name = key.replace("/", "-")
        rnd = len(self.res.samples.get(key, [])) + 1
        spy = subprocess.Popen(
            [self.args.py_spy, "record", "--pid", str(self.daemon.pid), "--rate", "500",
             "--format", "raw", "--output", str(out / f"{name}.round{rnd}.txt"), "--nonblocking"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # py-spy attaches
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # writes its output and exits
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()

    def snapshot(self, key: str) -> None:
        assert self.daemon is not None
        if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
            raise RuntimeError(f"{self.tag} machined died (status {self.daemon.proc.returncode})"
                               f":\n{self.daemon.log()[-3000:]}")
        pid = self.daemon.pid
        for name, value in (("rss", self.daemon.rss_kib()),
                            ("anon", proc_status(pid, "RssAnon")), ("fds", fd_count(pid)),
                            ("inotify", inotify_watches(pid))):
            self.res.samples.setdefault(f"{name}_{key}", []).append(value)
            self.res.values[f"{name}_{key}"] = value

    def check_count(self, expected: int, after: str) -> None:
        count = list_count(self.address)
        if count != expected:
            self.res.problems.append(f"after {after} ListMachines has {count} entries, "
                                     f"expected {expected}")

    def teardown(self) -> None:
        if self.daemon is not None:
            rc = self.daemon.stop()
            if rc not in (0, None):
                self.res.problems.append(f"daemon exit status on SIGTERM: {rc}")
            text = self.daemon.log()
            bad = [line for line in text.splitlines()
                   if any(w in line for w in ("Traceback", "ERROR", "CRITICAL", "Failed to"))]
            if bad:
                self.res.problems.append(f"{len(bad)} error line(s) in the daemon log, "
                                         f"first: {bad[0]}")
            if self.args.keep_logs:
                keep = Path(self.args.keep_logs)
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"{self.tag}.log").write_text(text)
        if self.leaders is not None:
            left = self.leaders.cleanup()
            if left:
                self.res.problems.append(f"cgroups left behind: {', '.join(left[:5])}")
        if self.bus is not None:
            self.bus.stop()


def measure_pair(subjects: list[Subject], key: str, calls_of: Any, callers: int,
                 duration: float | None, turn: int) -> None:
    """One slice for each daemon, one right after the other (who goes first alternates), so
    that load from elsewhere on the machine hits both alike; with two daemons the slice's
    ratio ours / real goes into the figures."""
    order = subjects if turn % 2 == 0 else subjects[::-1]
    rates = {s.tag: s.measure(key, calls_of(s), callers, duration) for s in order}
    if "real" in rates and "ours" in rates and rates["real"] > 0:
        ours = next(s for s in subjects if s.tag == "ours")
        ours.res.ratios.setdefault(key, []).append(rates["ours"] / rates["real"])


def run_rounds(subjects: list[Subject], args: argparse.Namespace) -> None:
    """Both daemons run side by side. Each round registers all machines, measures the lookups
    and unregisters all. Every measurement is cut into slices (registrations in --chunks
    chunks, lookups in --slices slices of the duration) that alternate between the daemons;
    the figures are medians over all slices, and the ratio is the median of the slices'
    ratios: on a shared machine whose speed changes from second to second, paired slices
    compare the two daemons under the same load."""
    for s in subjects:
        s.setup()
    n = args.machines
    bounds = [n * i // args.chunks for i in range(args.chunks + 1)]

    def chunk(kind: str, i: int) -> Any:
        return lambda s: s.calls[kind][bounds[i]:bounds[i + 1]]

    turn = 0
    for r in range(args.rounds):
        log(f"=== round {r + 1}/{args.rounds}")
        for i in range(args.chunks):
            measure_pair(subjects, "register", chunk("register", i), 1, None, turn)
            turn += 1
        for s in subjects:
            s.check_count(n + 1, "registration")
        time.sleep(0.5)
        for s in subjects:
            s.snapshot("registered")
        for method in METHODS:
            for callers in (1, args.callers):
                for _ in range(args.slices):
                    measure_pair(subjects, f"{method}/{callers}",
                                 lambda s, m=method: s.calls[m], callers,
                                 args.duration / args.slices, turn)
                    turn += 1
        for i in range(args.chunks):
            measure_pair(subjects, "unregister", chunk("unregister", i), 1, None, turn)
            turn += 1
        for s in subjects:
            s.check_count(1, "unregistration")
        time.sleep(0.5)
        for s in subjects:
            s.snapshot("end")


# --------------------------------------------------------------------------- report
ROWS = [  # key, label, kind: "rate" (target: ours >= real), "mem" (target: ours <= 4x real),
    # "meminfo" and "info" (no target)
    ("register", "RegisterMachine /s (1 caller)", "rate"),
    ("GetMachine/1", "GetMachine calls/s (1 caller)", "rate"),
    ("GetMachine/C", "GetMachine calls/s ({C} callers)", "rate"),
    ("GetMachineByPID/1", "GetMachineByPID calls/s (1 caller)", "rate"),
    ("GetMachineByPID/C", "GetMachineByPID calls/s ({C} callers)", "rate"),
    ("ListMachines/1", "ListMachines calls/s (1 caller, {N}+1 machines)", "rate"),
    ("ListMachines/C", "ListMachines calls/s ({C} callers, {N}+1 machines)", "rate"),
    ("unregister", "UnregisterMachine /s (1 caller)", "rate"),
    ("rss_idle", "RSS idle, MiB", "mem"),
    ("rss_registered_first", "RSS with {N} machines (round 1), MiB", "mem"),
    ("rss_registered", "RSS with {N} machines (round {R}), MiB", "mem"),
    ("rss_end", "RSS after unregistering all (round {R}), MiB", "mem"),
    ("anon_idle", "of which RssAnon (private, not file-backed) idle, MiB", "meminfo"),
    ("anon_registered", "of which RssAnon with {N} machines (round {R}), MiB", "meminfo"),
    ("fds_registered", "open fds with {N} machines", "info"),
    ("fds_end", "open fds after unregistering all", "info"),
    ("inotify_registered", "inotify watches with {N} machines", "info"),
    ("inotify_end", "inotify watches after unregistering all", "info"),
]


def fmt(kind: str, value: float | None) -> str:
    if value is None:
        return "–"
    if kind in ("mem", "meminfo"):
        return f"{value / 1024:.1f}"
    if kind == "info":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def label_of(label: str, args: argparse.Namespace) -> str:
    return label.format(C=args.callers, N=args.machines, R=args.rounds)


def table(real: Result | None, ours: Result | None,
          args: argparse.Namespace) -> tuple[str, list[str]]:
    lines = [f"| metric | {COLUMNS['real']} | {COLUMNS['ours']} | ratio |", "|---|---:|---:|---:|"]
    misses = []
    for key, label, kind in ROWS:
        key = key.replace("/C", f"/{args.callers}")
        if key == "rss_registered_first" and args.rounds == 1:
            continue
        label = label_of(label, args)
        a = real.values.get(key) if real else None
        b = ours.values.get(key) if ours else None
        paired = ours.ratios.get(key) if ours else None
        r = statistics.median(paired) if kind == "rate" and paired else (
            b / a if a and b is not None else None)
        if r is not None and not args.control:
            if kind == "rate" and r < 1:
                misses.append(f"{label}: ours is {r:.2f}x the real daemon")
            if kind == "mem" and r > 4:
                misses.append(f"{label}: ours uses {r:.1f}x the real daemon's RSS (> 4x)")
        lines.append(f"| {label} | {fmt(kind, a)} | {fmt(kind, b)} | "
                     f"{'–' if r is None else f'{r:.2f}'} |")
    return "\n".join(lines) + "\n", misses


def rate_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(key, label) of the rate rows, with this run's caller and machine counts filled in."""
    return [(key.replace("/C", f"/{args.callers}"), label_of(label, args))
            for key, label, kind in ROWS if kind == "rate"]


def column(tag: str) -> str:
    return COLUMNS.get(tag, tag)


def cpu_table(results: dict[str, Result], args: argparse.Namespace) -> str:
    """Daemon CPU time (user + system) per call: what each call costs the daemon itself,
    which the machine's load moves far less than the rates."""
    tags = list(results)
    both = len(tags) == 2
    lines = ["| call | " + " | ".join(map(column, tags)) + (" | ratio |" if both else " |"),
             "|---|" + "---:|" * (len(tags) + both)]
    for key, label in rate_rows(args):
        per_call = []
        for t in tags:
            pairs = results[t].cpu.get(key, [])
            calls = sum(c for _, c in pairs)
            per_call.append(sum(sec for sec, _ in pairs) / calls * 1e6 if calls else None)
        cells = ["–" if v is None else f"{v:,.0f}" for v in per_call]
        if both:
            a, b = per_call
            cells.append(f"{b / a:.2f}" if a and b is not None else "–")
        call = label.replace(" calls/s", "").replace(" /s", "")
        lines.append(f"| {call} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spread_table(results: dict[str, Result], args: argparse.Namespace) -> str:
    """The slices behind the medians: lowest / median / highest rate of each daemon."""
    tags = list(results)
    lines = ["| metric | " + " | ".join(f"{column(t)}: min / median / max" for t in tags) + " |",
             "|---|" + "---:|" * len(tags)]
    for key, label in rate_rows(args):
        cells = []
        for t in tags:
            vals = results[t].samples.get(key, [])
            cells.append(" / ".join(fmt("rate", v) for v in (min(vals), statistics.median(vals),
                                                             max(vals))) if vals else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, tbl: str, cpu: str, spread: str, misses: list[str],
               problems: list[str], args: argparse.Namespace, runtime: float,
               started: datetime.datetime) -> None:
    cmd = "sudo .venv/bin/python bench/bench_registry.py" + (" --quick" if args.quick else "")
    for opt, value, default in (("--machines", args.machines, 100 if args.quick else 1000),
                                ("--duration", args.duration, 1.0 if args.quick else 2.0),
                                ("--rounds", args.rounds, 1 if args.quick else 3),
                                ("--slices", args.slices, 2 if args.quick else 4),
                                ("--chunks", args.chunks, 2 if args.quick else 10),
                                ("--callers", args.callers, 16)):
        if value != default:
            cmd += f" {opt} {value:g}"
    text = [
        SECTION,
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}",
        f"- Machine: {socket.gethostname()}: {machine_info()}",
        "- Real daemon: `/lib/systemd/systemd-machined` (systemd "
        f"{systemd_version()}); ours: `python -m machined --scope-backend=cgroupfs` "
        f"at commit {git_head()}",
        f"- Workload: {args.machines} machines (leaders are `sleep` processes in cgroups "
        "`machine.slice/bench-*.scope`); RegisterMachine/UnregisterMachine sequentially from one "
        f"caller; lookups for {args.duration:g} s each with 1 and with {args.callers} callers "
        "(one process and bus connection each, synchronous calls, replies not parsed, the same "
        "client code for both daemons). Each daemon has its own private dbus-daemon and a tmpfs "
        f"over /run/systemd/machines. Both daemons run side by side; {args.rounds} round(s) of "
        "register → lookups → unregister. Every measurement is cut into slices that alternate "
        f"between the daemons (registrations in {args.chunks} chunks, lookups in "
        f"{args.slices} slices): rates are medians over all slices, and the ratio is the "
        "median of the paired slices' ratios, which compares the daemons under the same load "
        "on a machine whose speed changes from second to second.",
        f"- Benchmark runtime: {runtime:.0f} s",
        f"- How to run: `{cmd}` (root; see bench/README.md)",
        "",
        "ratio = ours / real. Targets: every call path ≥ 1.00, RSS ≤ 4.00.",
        "",
        tbl,
        "Daemon CPU time (user + system) per call in µs, lower is better; ratio = ours / real:",
        "",
        cpu,
        "Spread of the slices (calls per second):",
        "",
        spread,
    ]
    if misses:
        text += ["Targets missed in this run:", ""] + [f"- {m}" for m in misses] + [""]
    else:
        text += ["All targets met in this run.", ""]
    if problems:
        text += ["Problems seen during the run:", ""] + [f"- {p}" for p in problems] + [""]
    replace_section(path, SECTION, "\n".join(text))


def replace_section(path: Path, section: str, text: str) -> None:
    """Put text (starting with the `## section` heading) in place of that section of the
    markdown file, or append it; the other benchmarks' sections stay."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if section in old:
        head, _, rest = old.partition(section)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        new = head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail
    else:
        new = old.rstrip() + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip() + "\n")


def systemd_version() -> str:
    try:
        out = subprocess.run([REAL_MACHINED, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def git_head() -> str:
    """HEAD's short hash, "+ local changes" when machined/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "machined"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + (" + local changes" if dirty.strip() else "")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machines", "-n", type=int, default=None,
                   help="machines to register (default 1000, --quick 100)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per lookup measurement (default 2, --quick 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of register/lookups/unregister (default 3, --quick 1)")
    p.add_argument("--slices", type=int, default=None,
                   help="slices per lookup measurement, alternating between the daemons "
                        "(default 4, --quick 2)")
    p.add_argument("--chunks", type=int, default=None,
                   help="chunks of the registrations and unregistrations, alternating between "
                        "the daemons (default 10, --quick 2)")
    p.add_argument("--callers", type=int, default=16, help="concurrent callers (default 16)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100 machines, 1 round, 1 s per measurement, docs not written")
    p.add_argument("--only", choices=("real", "ours"), help="run one daemon only")
    p.add_argument("--control", choices=("real", "ours"),
                   help="A/A control: the same daemon in both slots, so that the ratios show "
                        "what this machine's noise alone gives (no targets, docs not written)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"markdown file to write (default {DEFAULT_DOCS.relative_to(REPO)}, "
                        "none with --quick)")
    p.add_argument("--no-docs", action="store_true", help="do not write the markdown file")
    p.add_argument("--keep-logs", metavar="DIR", help="copy both daemons' logs to DIR")
    p.add_argument("--profile", metavar="DIR",
                   help="sample our daemon with py-spy during each measurement, collapsed "
                        "stacks to DIR (slows it down; numbers of such a run are not the "
                        "benchmark's)")
    p.add_argument("--py-spy", default=None,
                   help="py-spy binary for --profile (default: .venv/bin/py-spy or PATH)")
    p.add_argument("--python", default=None,
                   help="interpreter for our daemon (default: .venv/bin/python of the repo)")
    args = p.parse_args(argv)
    if args.machines is None:
        args.machines = 100 if args.quick else 1000
    if args.duration is None:
        args.duration = 1.0 if args.quick else 2.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.slices is None:
        args.slices = 2 if args.quick else 4
    if args.chunks is None:
        args.chunks = 2 if args.quick else 10
    if args.output is None and not args.quick:
        args.output = DEFAULT_DOCS
    if args.no_docs or args.profile or args.control:
        args.output = None
    if args.control and (args.only or args.profile):
        p.error("--control runs both slots; it does not go with --only or --profile")
    if args.profile:
        venv_spy = REPO / ".venv" / "bin" / "py-spy"
        args.py_spy = args.py_spy or (str(venv_spy) if venv_spy.exists() else
                                      shutil.which("py-spy"))
        if not args.py_spy:
            p.error("--profile needs py-spy (.venv/bin/pip install py-spy)")
    if (args.machines < 1 or args.callers < 1 or args.duration <= 0 or args.rounds < 1
            or args.slices < 1 or not 1 <= args.chunks <= args.machines):
        p.error("--machines, --callers, --duration, --rounds, --slices and --chunks must be "
                "positive, and --chunks at most --machines")
    return args


def host_dirs(mount: str) -> Any:
    """The mount points for the daemons' tmpfs and the cgroup machine.slice: created if missing,
    removed again afterwards (if empty)."""
    return real252.host_dirs(Path(mount) / "machine.slice")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_registry.py needs root (cgroups, mount namespaces)", file=sys.stderr)
        return 2
    ours_python = args.python or str(REPO / ".venv" / "bin" / "python")
    if not os.path.exists(ours_python):
        ours_python = sys.executable
    daemons = {
        "real": [REAL_MACHINED],
        "ours": [ours_python, "-m", "machined", "--scope-backend=cgroupfs"],
    }
    if args.only:
        daemons = {args.only: daemons[args.only]}
    if args.control:
        name = column(args.control)
        COLUMNS.update(real=f"{name} (A)", ours=f"{name} (B)")
        daemons = {"real": daemons[args.control], "ours": daemons[args.control]}

    def terminate(signo: int, _frame: Any) -> None:
        raise SystemExit(128 + signo)

    signal.signal(signal.SIGTERM, terminate)
    mount = cgroup2_mount()

    started_at = datetime.datetime.now().astimezone()
    with open(LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {LOCK_FILE} (another test run holds it)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        log(f"{args.machines} machines, {args.rounds} round(s), {args.duration:g} s per lookup "
            f"measurement, 1 and {args.callers} callers")
        subjects = [Subject(tag, argv_, args, mount) for tag, argv_ in daemons.items()]
        try:
            with host_dirs(mount):
                try:
                    run_rounds(subjects, args)
                finally:
                    for s in subjects:
                        s.teardown()
        finally:
            runtime = time.monotonic() - t0
            for s in subjects:
                for p in s.res.problems:
                    log(f"problem: {s.tag}: {p}")
    results = {s.tag: s.res for s in subjects}
    for r in results.values():
        if r.samples.get("rss_registered"):
            r.values["rss_registered_first"] = r.samples["rss_registered"][0]

    tbl, misses = table(results.get("real"), results.get("ours"), args)
    cpu = cpu_table(results, args)
    spread = spread_table(results, args)
    problems = [f"{tag}: {p}" for tag, r in results.items() for p in r.problems]
    print()
    print(tbl)
    for m in misses:
        print(f"target missed: {m}")
    for p in problems:
        print(f"problem: {p}")
    print(cpu)
    print(spread)
    print(f"benchmark runtime: {runtime:.0f} s")
    if args.output:
        write_docs(args.output, tbl, cpu, spread, misses, problems, args, runtime, started_at)
        log(f"wrote {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
