"""A bus client that sends whatever it is told, as raw messages (sdbus low level).

Run as a child process (possibly as another user, through setpriv): each stdin line is the
repr() of (destination, path, interface, member, signature, args, flags); each stdout line is the
repr() of ("ok", reply_values) or ("error", name, message). Bytes, tuples and dicts survive
repr()/ast.literal_eval, so the test and this client agree on values without a schema.
"""

from __future__ import annotations

import ast
import sys
from typing import Any

from sdbus.sd_bus_internals import SdBus, sd_bus_open_system

from tests.helpers.client import outcome


def call(bus: SdBus, request: tuple[Any, ...]) -> tuple[Any, ...]:
    dest, path, iface, member, sig, args = request[:6]
    kind, value = outcome(bus, path, iface, member, sig, *args, dest=dest)
    return (kind, *value) if kind == "error" else (kind, value)


def main() -> int:
    bus = sd_bus_open_system()
    for line in sys.stdin:
        try:
            request = ast.literal_eval(line)
            answer = call(bus, request)
        except (ValueError, TypeError, OverflowError, SyntaxError) as e:
            # the client could not even build the message (sdbus refuses the values)
            answer = ("unsendable", type(e).__name__, str(e))
        sys.stdout.write(repr(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
