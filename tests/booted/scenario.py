"""Steps of the booted scenario shared by the fixture and the tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.helpers.daemon import wait_for

if TYPE_CHECKING:
    from .conftest import InstalledVM

# A container payload that powers off on SIGRTMIN+4, as systemd would; nspawn stops it on
# SIGTERM by itself.
POWEROFF_SIGNAL = 38  # SIGRTMIN+4
PAYLOAD = ["/bin/sh", "-c", f"trap 'exit 0' {POWEROFF_SIGNAL}; sleep 100000 & wait"]


def machine_props(vm: InstalledVM, name: str) -> dict[str, str]:
    out = vm.machinectl("show", name).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def machines(vm: InstalledVM) -> list[str]:
    return [line.split()[0] for line in vm.machinectl("list").stdout.splitlines() if line]


def start_container(vm: InstalledVM, name: str, keep_unit: bool = False,
                    options: tuple[str, ...] = ()) -> None:
    """`systemd-nspawn --register=yes` of a busybox tree, as the service nspawn-NAME."""
    nspawn = ["systemd-nspawn", "--quiet", "--register=yes", "-D", f"/var/lib/machines/{name}",
              "-M", name, *options]
    if keep_unit:
        nspawn.append("--keep-unit")
    vm.run("systemd-run", "--collect", f"--unit=nspawn-{name}", "--", *nspawn, *PAYLOAD)

    def registered() -> bool:
        if vm.run("systemctl", "is-failed", "--quiet", f"nspawn-{name}", check=False) \
                .returncode == 0:
            raise AssertionError(vm.run("journalctl", "--no-pager", "-u", f"nspawn-{name}",
                                        check=False).stdout)
        return name in machines(vm)

    wait_for(registered, 30, 0.1, f"machine {name}")
    # nspawn registers before the payload runs: wait until its trap is in place
    leader = machine_props(vm, name)["Leader"]

    def trapped() -> bool:
        status = vm.run("cat", f"/proc/{leader}/status").stdout
        caught = next(line.split()[1] for line in status.splitlines()
                      if line.startswith("SigCgt:"))
        return bool(int(caught, 16) & (1 << (POWEROFF_SIGNAL - 1)))

    wait_for(trapped, 30, 0.1, f"the payload of {name}")
