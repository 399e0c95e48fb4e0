"""The drop-in scenario on a booted Debian 12 (systemd as PID 1, real dbus-daemon and polkitd):
our machined installed as systemd-machined.service, nested `systemd-nspawn --register=yes`,
machinectl verbs, restart, D-Bus activation, polkit for a non-root user, and an uninstall that
leaves the system as it was. The tests share one VM and run in file order."""

from __future__ import annotations

import difflib
import subprocess

import pytest

from tests.helpers.daemon import wait_for

from .conftest import InstalledVM
from .scenario import machine_props, machines, start_container

pytestmark = [pytest.mark.root, pytest.mark.slow]

UNIT = "systemd-machined.service"
# 252's CapabilityBoundingSet= (CAP_KILL CAP_SYS_PTRACE CAP_SYS_ADMIN CAP_SETGID CAP_SYS_CHROOT
# CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER CAP_FSETID CAP_MKNOD
# CAP_LINUX_IMMUTABLE) as a mask
CAPABILITIES = sum(1 << c for c in (5, 19, 21, 6, 18, 2, 1, 0, 3, 4, 27, 9))
POLKIT_RULE = "/etc/polkit-1/rules.d/50-machined-test.rules"


class NotImplementedYet(Exception):
    """The daemon answered NotSupported "... is not implemented yet ..." (issues 3 and 4)."""


# Steps served by other issues: expected to fail with exactly that answer until they land
# (strict: a pass means the marker must go).


def done(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if out.returncode != 0 and "not implemented yet" in out.stderr:
        raise NotImplementedYet(out.stderr.strip())
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def show(vm: InstalledVM, *args: str) -> dict[str, str]:
    out = vm.run("systemctl", "show", *args).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def state_files(vm: InstalledVM) -> list[str]:
    """/run/systemd/machines of the VM (its /run is not in the overlay the host sees)."""
    return vm.run("ls", "-A", "/run/systemd/machines").stdout.split()


def daemon_pid(vm: InstalledVM) -> int:
    return int(show(vm, "-p", "MainPID", UNIT)["MainPID"])


def test_unit_runs_our_daemon(vm: InstalledVM) -> None:
    vm.run("systemctl", "start", UNIT)
    status = vm.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert "Loaded: loaded (/lib/systemd/system/systemd-machined.service; static)" in status
    assert "active (running)" in status
    assert "/usr/lib/machined/bin/python3 -m machined" in status
    assert 'Status: "Processing requests..."' in status  # 252's words
    props = show(vm, "-p", "Type,BusName,FragmentPath,NotifyAccess", UNIT)
    assert props["Type"] == "notify" and props["BusName"] == "org.freedesktop.machine1"
    out = vm.run("cat", f"/proc/{daemon_pid(vm)}/cmdline").stdout
    assert out.split("\0")[:3] == ["/usr/lib/machined/bin/python3", "-m", "machined"]
    # it runs inside 252's sandbox: no new privileges, a seccomp filter, 252's capabilities
    proc = dict(line.split(":\t", 1) for line in
                vm.run("cat", f"/proc/{daemon_pid(vm)}/status").stdout.splitlines())
    assert proc["NoNewPrivs"] == "1" and proc["Seccomp"] == "2"
    assert int(proc["CapBnd"], 16) == CAPABILITIES
    # the userdb service nss-systemd asks for container users (spec §12), as 252's
    sock = vm.run("stat", "-c", "%A %U", "/run/systemd/userdb/io.systemd.Machine").stdout
    assert sock.split() == ["srw-rw-rw-", "root"]
    verify = vm.run("systemd-analyze", "verify", "--man=no", UNIT, check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify


def test_takes_over_the_machines_of_252(vm: InstalledVM) -> None:
    """tinyd was registered with the distribution's machined before install restarted the
    service into ours: ours read 252's state file and controls the machine."""
    props = machine_props(vm, "tinyd")
    assert props["Unit"] == "machine-tinyd.scope" and props["Class"] == "container"
    assert props["RootDirectory"] == "/var/lib/machines/tinyd"
    vm.machinectl("terminate", "tinyd")
    wait_for(lambda: "tinyd" not in machines(vm), 30, 0.1, "tinyd to go away")
    wait_for(lambda: vm.run("systemctl", "is-active", "machine-tinyd.scope", check=False)
             .stdout.strip() != "active", 30, 0.1)


def test_nspawn_create_machine(vm: InstalledVM) -> None:
    """Without --keep-unit: CreateMachine, a machine-NAME.scope through real StartTransientUnit."""
    start_container(vm, "tinya")
    props = machine_props(vm, "tinya")
    assert props["Unit"] == "machine-tinya.scope"
    assert props["Class"] == "container" and props["Service"] == "systemd-nspawn"
    assert props["RootDirectory"] == "/var/lib/machines/tinya"
    scope = vm.run("systemctl", "status", "--no-pager", "machine-tinya.scope").stdout
    assert "active (running)" in scope
    assert "Loaded: loaded (/run/systemd/transient/machine-tinya.scope" in scope
    status = vm.machinectl("status", "tinya").stdout
    assert "Unit: machine-tinya.scope" in status
    assert "sleep 100000" in status  # the cgroup tree


def test_nspawn_register_machine_keep_unit(vm: InstalledVM) -> None:
    """With --keep-unit: RegisterMachine, the machine is the nspawn service itself."""
    start_container(vm, "tinyb", keep_unit=True)
    props = machine_props(vm, "tinyb")
    assert props["Unit"] == "nspawn-tinyb.service"
    status = vm.machinectl("status", "tinyb").stdout
    assert "Unit: nspawn-tinyb.service" in status
    assert "sleep 100000" in status
    assert vm.run("systemctl", "is-active", "machine-tinyb.scope", check=False).returncode != 0


def test_scope_name_escaping(vm: InstalledVM) -> None:
    """A '-' in the name is escaped in the scope's unit name, as systemd expects."""
    start_container(vm, "tiny-e")
    assert machine_props(vm, "tiny-e")["Unit"] == "machine-tiny\\x2de.scope"
    assert vm.run("systemctl", "is-active", "machine-tiny\\x2de.scope").stdout.strip() == "active"
    assert "unit:machine-tiny\\x2de.scope" in state_files(vm)
    vm.machinectl("terminate", "tiny-e")
    wait_for(lambda: "tiny-e" not in machines(vm), 30, 0.1, "tiny-e to go away")


def test_machinectl_list(vm: InstalledVM) -> None:
    rows = {line.split()[0]: line.split() for line in vm.machinectl("list").stdout.splitlines()}
    assert set(rows) == {"tinya", "tinyb"}
    assert rows["tinya"][1:3] == ["container", "systemd-nspawn"]


def test_restart_keeps_machines(vm: InstalledVM) -> None:
    before = {name: machine_props(vm, name) for name in ("tinya", "tinyb")}
    pid = daemon_pid(vm)
    vm.run("systemctl", "restart", UNIT)
    assert daemon_pid(vm) not in (0, pid)
    after = {name: machine_props(vm, name) for name in ("tinya", "tinyb")}
    for name in before:
        for key in ("Leader", "Unit", "Class", "Service", "RootDirectory", "Timestamp"):
            assert after[name][key] == before[name][key], (name, key)
    # and the restarted daemon still controls them: the scope is still watched
    assert vm.run("systemctl", "is-active", "machine-tinya.scope").stdout.strip() == "active"


def test_systemd_reload_keeps_machines(vm: InstalledVM) -> None:
    """daemon-reload (Reloading, then PropertiesChanged of every unit) makes ours recheck every
    machine: all stay."""
    vm.run("systemctl", "daemon-reload")
    assert set(machines(vm)) == {"tinya", "tinyb"}
    assert machine_props(vm, "tinya")["State"] == "running"


def test_kill_all(vm: InstalledVM) -> None:
    """machinectl kill (whom=all) goes through systemd's KillUnit to every process."""
    leader = machine_props(vm, "tinyb")["Leader"]

    def state() -> str:
        stat = vm.run("cat", f"/proc/{leader}/stat").stdout
        return stat[stat.rfind(")") + 2]

    vm.machinectl("kill", "--signal=SIGSTOP", "tinyb")
    wait_for(lambda: state() == "T", 10, 0.1, "the leader to stop")
    vm.machinectl("kill", "--signal=SIGCONT", "tinyb")
    wait_for(lambda: state() != "T", 10, 0.1, "the leader to continue")


def test_dbus_activation(vm: InstalledVM) -> None:
    vm.run("systemctl", "stop", UNIT)
    assert vm.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert set(machines(vm)) == {"tinya", "tinyb"}  # machinectl's call activates the daemon
    assert vm.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    out = vm.run("cat", f"/proc/{daemon_pid(vm)}/cmdline").stdout
    assert out.split("\0")[:3] == ["/usr/lib/machined/bin/python3", "-m", "machined"]


def test_mask_as_252(vm: InstalledVM) -> None:
    # The administrator's /etc wins over the installed unit, as over the distribution's.
    vm.run("systemctl", "stop", UNIT)
    vm.run("systemctl", "mask", UNIT)
    try:
        masked = vm.machinectl("list", check=False)
        assert masked.returncode == 1
        assert "Unit systemd-machined.service is masked." in masked.stderr, masked.stderr
        assert vm.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    finally:
        vm.run("systemctl", "unmask", UNIT)
    assert set(machines(vm)) == {"tinya", "tinyb"}  # activated again, every machine kept


def test_polkit_non_root_terminate(vm: InstalledVM) -> None:
    # polkitd's verdict for a user without a session: auth_admin, which needs an agent
    denied = vm.machinectl("terminate", "tinya", user="alice", check=False)
    assert denied.returncode != 0
    assert denied.stderr == "Could not terminate machine: Interactive authentication required.\n"
    assert "tinya" in machines(vm)
    vm.path(POLKIT_RULE).write_text(
        'polkit.addRule(function(action, subject) {\n'
        '    if ((action.id == "org.freedesktop.machine1.manage-machines" ||\n'
        '         action.id == "org.freedesktop.machine1.shell") && subject.user == "alice")\n'
        '        return polkit.Result.YES;\n'
        '});\n')
    try:
        # polkitd notices the new rule by itself, a moment later
        wait_for(lambda: vm.machinectl("terminate", "tinya", user="alice",
                                       check=False).returncode == 0, 20, 0.2,
                 "polkitd to allow alice")
        wait_for(lambda: "tinya" not in machines(vm), 30, 0.1, "tinya to go away")
        wait_for(lambda: vm.run("systemctl", "is-active", "machine-tinya.scope",
                                check=False).stdout.strip() != "active", 30, 0.1)
    finally:
        vm.path(POLKIT_RULE).unlink()


def test_scope_stopped_through_systemd(vm: InstalledVM) -> None:
    """`systemctl stop machine-NAME.scope`: ours learns it from systemd's signals."""
    start_container(vm, "tinya")
    vm.run("systemctl", "stop", "machine-tinya.scope")
    wait_for(lambda: "tinya" not in machines(vm), 30, 0.1, "tinya to go away")
    assert "tinya" not in state_files(vm) and "unit:machine-tinya.scope" not in state_files(vm)


def test_polkit_non_root_shell(vm: InstalledVM) -> None:
    """Real polkitd denies alice a shell, a rule allows it: in a container with a user namespace
    of its own. In one that shares the host's (tinyb), a shell is root on the host, so only root
    gets it whatever polkit says."""
    start_container(vm, "tinyu", options=("--private-users=pick",
                                          "--private-users-ownership=chown"))
    denied = vm.machinectl("shell", "tinyu", "/bin/true", user="alice", check=False)
    assert denied.returncode != 0 and "Interactive authentication required" in denied.stderr
    vm.path(POLKIT_RULE).write_text(
        'polkit.addRule(function(action, subject) {\n'
        '    if (action.id == "org.freedesktop.machine1.shell" && subject.user == "alice")\n'
        '        return polkit.Result.YES;\n'
        '});\n')
    try:
        wait_for(lambda: vm.machinectl("shell", "tinyu", "/bin/true", user="alice",
                                       check=False).returncode == 0, 20, 0.2)
        host_userns = vm.machinectl("shell", "tinyb", "/bin/true", user="alice", check=False)
        assert host_userns.returncode != 0 and "Access denied" in host_userns.stderr
    finally:
        vm.path(POLKIT_RULE).unlink()
        vm.machinectl("terminate", "tinyu", check=False)


def test_shell(vm: InstalledVM) -> None:
    out = done(vm.machinectl("shell", "tinyb", "/bin/echo", "hello", check=False))
    assert "hello" in out.stdout


def test_host_shell_is_a_service_of_pid1(vm: InstalledVM) -> None:
    """A `.host` shell is started by systemd as 252 starts it (container-shell@N.service, PAM
    session): with the host's own context, not the daemon's sandbox (NoNewPrivileges, bounding
    set, seccomp) nor its cgroup, which a restart of the daemon would kill."""
    out = done(vm.machinectl("shell", ".host", "/bin/sh", "-c",
                             "grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status; "
                             "cat /proc/self/cgroup; echo HOME=$HOME", check=False))
    status = vm.run("grep", "-E", "^CapBnd", "/proc/1/status").stdout.split()[1]
    assert "NoNewPrivs:\t0" in out.stdout, out.stdout
    assert f"CapBnd:\t{status}" in out.stdout, out.stdout
    assert "systemd-machined.service" not in out.stdout, out.stdout
    assert "HOME=/root" in out.stdout, out.stdout
    missing = vm.machinectl("shell", "nobody2@.host", "/bin/true", check=False)
    assert "User 'nobody2' does not exist in machine '.host'." in missing.stderr


def test_container_shell_is_not_in_the_daemons_sandbox(vm: InstalledVM) -> None:
    """A container shell is a transient service of the host's PID 1 that enters the container
    (252 has the container's systemd start it): the container's own context, not the daemon's
    NoNewPrivileges, bounding set and seccomp filters."""
    out = done(vm.machinectl("shell", "tinyb", "/bin/sh", "-c",
                             "grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status", check=False))
    leader = machine_props(vm, "tinyb")["Leader"]
    capbnd = vm.run("grep", "-E", "^CapBnd", f"/proc/{leader}/status").stdout.split()[1]
    assert "NoNewPrivs:\t0" in out.stdout, out.stdout
    assert f"CapBnd:\t{capbnd}" in out.stdout, out.stdout


def test_host_login_is_a_getty(vm: InstalledVM) -> None:
    """A `.host` login is systemd's container-getty@N.service, as in 252: agetty shows
    /etc/issue before its prompt (the login program alone would not)."""
    out = vm.run("sh", "-c", "sleep 4 | timeout 5 machinectl login .host", check=False)
    assert "Connected to the local host" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "login:" in out.stdout, out.stdout
    assert "Debian GNU/Linux 12" in out.stdout, out.stdout


def test_login(vm: InstalledVM) -> None:
    # no getty in a busybox tree: getting the PTY is what counts
    out = vm.run("timeout", "5", "machinectl", "login", "tinyb", check=False, input="")
    if "not implemented yet" in out.stderr:
        raise NotImplementedYet(out.stderr.strip())
    assert "Connected to machine tinyb" in out.stdout + out.stderr


def test_shell_as_another_user(vm: InstalledVM) -> None:
    """In a container in the host's user namespace the program becomes the user in
    machined/enter.py, a service of PID 1 (252 has the container's systemd do it): so the
    daemon needs no CAP_SETUID, and the unit's bounding set is 252's."""
    vm.path("/var/lib/machines/tinyb").chmod(0o755)  # a temp dir's 0700: no way in for nobody
    etc = vm.path("/var/lib/machines/tinyb/etc")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                "nobody:x:65534:65534:nobody:/:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    out = done(vm.machinectl("shell", "--uid=nobody", "tinyb", "/bin/busybox", "id",
                             check=False))
    assert "uid=65534(nobody) gid=65534(nogroup)" in out.stdout, out.stdout + out.stderr


def test_copy_to_and_from(vm: InstalledVM) -> None:
    vm.path("/root/copy-in").write_text("to the container\n")
    # (not to /tmp: nspawn mounts a tmpfs there)
    done(vm.machinectl("copy-to", "tinyb", "/root/copy-in", "/root/copied", check=False))
    assert vm.path("/var/lib/machines/tinyb/root/copied").read_text() == "to the container\n"
    done(vm.machinectl("copy-from", "tinyb", "/etc/hostname", "/root/copy-out", check=False))
    assert vm.path("/root/copy-out").read_text() == "tinyhost\n"


def test_bind(vm: InstalledVM) -> None:
    vm.run("mkdir", "-p", "/root/bind-src")
    vm.path("/root/bind-src/marker").write_text("bound\n")
    done(vm.machinectl("bind", "--mkdir", "tinyb", "/root/bind-src", "/mnt/bound", check=False))
    leader = machine_props(vm, "tinyb")["Leader"]
    assert vm.run("cat", f"/proc/{leader}/root/mnt/bound/marker").stdout == "bound\n"


def test_list_images(vm: InstalledVM) -> None:
    out = done(vm.machinectl("list-images", check=False))
    assert "tiny " in out.stdout


def test_clone_and_remove(vm: InstalledVM) -> None:
    done(vm.machinectl("clone", "tiny", "tinyclone", check=False))
    assert vm.path("/var/lib/machines/tinyclone/bin/busybox").exists()
    done(vm.machinectl("remove", "tinyclone", check=False))
    assert not vm.path("/var/lib/machines/tinyclone").exists()


def test_poweroff(vm: InstalledVM) -> None:
    start_container(vm, "tinyc")
    vm.machinectl("poweroff", "tinyc")
    try:
        wait_for(lambda: "tinyc" not in machines(vm), 30, 0.1, "tinyc to power off")
    except AssertionError:
        raise AssertionError(vm.machinectl("status", "tinyc", check=False).stdout + vm.run(
            "journalctl", "--no-pager", "-n", "30", check=False).stdout) from None
    wait_for(lambda: vm.run("systemctl", "is-active", "nspawn-tinyc", check=False)
             .stdout.strip() != "active", 30, 0.1)


def test_terminate_keep_unit(vm: InstalledVM) -> None:
    vm.machinectl("terminate", "tinyb")
    wait_for(lambda: "tinyb" not in machines(vm), 30, 0.1, "tinyb to go away")
    wait_for(lambda: vm.run("systemctl", "is-active", "nspawn-tinyb", check=False)
             .stdout.strip() != "active", 30, 0.1)


def test_machine_start_and_stop_in_the_journal_as_252(vm: InstalledVM) -> None:
    """The daemon logs to the journal natively, as 252: "New machine" and "terminated" entries
    with 252's MESSAGE_IDs and its NAME and LEADER fields."""
    import json

    def entries(message_id: str) -> list[dict[str, str]]:
        out = vm.run("journalctl", "--no-pager", "--output=json", f"MESSAGE_ID={message_id}",
                     f"_SYSTEMD_UNIT={UNIT}", "_COMM=python3").stdout  # ours, not 252's
        return [json.loads(line) for line in out.splitlines()]

    started = [e for e in entries("24d8d4452573402496068381a6312df2") if e["NAME"] == "tinyc"]
    stopped = [e for e in entries("58432bd3bace477cb514b56381b8a758") if e["NAME"] == "tinyc"]
    assert started and stopped
    for entry, text in ((started[-1], "New machine tinyc."),
                        (stopped[-1], "Machine tinyc terminated.")):
        assert entry["MESSAGE"] == text
        assert entry["PRIORITY"] == "6" and entry["SYSLOG_IDENTIFIER"] == "systemd-machined"
        assert int(entry["LEADER"]) > 1
    assert started[-1]["LEADER"] == stopped[-1]["LEADER"]


def test_daemon_logged_no_warnings(vm: InstalledVM) -> None:
    """Everything above is ordinary work: our daemon logged nothing at warning or worse."""
    def journal(*args: str) -> str:
        return vm.run("journalctl", "--no-pager", "--quiet", "--output=cat",
                      f"_SYSTEMD_UNIT={UNIT}", "_COMM=python3", *args).stdout  # not 252's

    assert "New machine tinyc." in journal("--priority=info")  # the log is there, at its levels
    assert journal("--priority=warning") == ""


def test_uninstall_restores_the_system(vm: InstalledVM) -> None:
    # a machine registered with ours is handed over to the distribution's machined
    start_container(vm, "tinya")
    vm.run("/usr/lib/machined/install.sh", "uninstall", timeout=120)
    after = vm.snapshot()
    assert after == vm.before_install, "".join(difflib.unified_diff(
        vm.before_install.splitlines(True), after.splitlines(True), "before", "after"))
    status = vm.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert "Loaded: loaded (/lib/systemd/system/systemd-machined.service" in status
    assert "/lib/systemd/systemd-machined" in status
    assert "tinya" in machines(vm)
    vm.machinectl("terminate", "tinya")
    wait_for(lambda: "tinya" not in machines(vm), 30, 0.1)
