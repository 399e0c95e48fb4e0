"""`python -m machined.enter SPEC`: the program of a container shell or login, as a transient
service of the host's service manager (bus/inside.py starts it so where systemd runs): with the
host's context, not the daemon's sandbox, which 252's shells never get either (the container's
own systemd starts them). Our stdio is the container's PTY; SPEC (JSON) names the leader, by
PID and start time, and the program."""

from __future__ import annotations

import json
import sys

from .linux import process, terminal


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    leader = int(spec["leader"])
    if process.start_ticks(leader) != spec["started"]:
        print("The machine's leader is gone.", file=sys.stderr)
        return 1
    program = terminal.Program(spec["user"], spec["path"], spec["argv"], spec["environment"],
                               tuple(spec["alternatives"]))
    return terminal.run_in_container(leader, program, spec["cgroup_procs"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
