"""A private dbus-daemon of type "system" for tests (never the host's bus)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .process import stop_process

REPO = Path(__file__).resolve().parents[2]
POLICY_FILE = REPO / "policy" / "org.freedesktop.machine1.conf"

OPEN_POLICY = """
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
"""

# Debian's system.conf defaults (deny by default) plus our shipped policy file; root may own
# any name so that mocks of systemd1/polkit can run.
SYSTEM_POLICY = """
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
"""


def bus_config(address: str, policy: str = "open") -> str:
    """A dbus-daemon configuration of type system listening on address; policy "open" lets
    everybody do anything, "system" is Debian's default-deny plus our shipped policy file."""
    if policy not in ("open", "system"):
        raise ValueError(f"unknown bus policy {policy!r}")
    rules = OPEN_POLICY if policy == "open" else SYSTEM_POLICY.format(policy=POLICY_FILE)
    return ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            "<busconfig>\n  <type>system</type>\n"
            f"  <listen>{address}</listen>\n  <auth>EXTERNAL</auth>\n"
            f"{rules}</busconfig>\n")


class BusDaemon:
    def __init__(self, policy: str = "open", prefix: str = "machined-bus.") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(self.dir, 0o755)  # unprivileged test clients must reach the socket
        self.socket = self.dir / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        conf = self.dir / "bus.conf"
        conf.write_text(bus_config(self.address, policy))
        self.log = open(self.dir / "dbus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dbus-daemon did not start: "
                                   + (self.dir / "dbus.log").read_text())
            time.sleep(0.02)

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def stop(self) -> None:
        stop_process(self.proc, 5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    # scripts/demo.sh writes its bus configuration with this: one source for every private bus.
    import argparse

    parser = argparse.ArgumentParser(description="Print a private system bus configuration.")
    parser.add_argument("--policy", choices=("open", "system"), default="system")
    parser.add_argument("address")
    args = parser.parse_args()
    print(bus_config(args.address, args.policy), end="")
