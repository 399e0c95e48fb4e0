#!/bin/bash
# Bring the daemon up on an isolated private system bus with a demo busybox container
# registered through systemd-nspawn, and show how to use machinectl with it. As root.
#   scripts/demo.sh          start (installs what is missing first)
#   scripts/demo.sh stop     stop the container, the daemon and the bus
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
RUN=/run/machined-demo
TREE=/var/lib/machined-demo/tiny

stop() {
    for what in nspawn machined dbus; do
        pid=$(cat "$RUN/$what.pid" 2>/dev/null) || continue
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$RUN"
    echo "Demo stopped."
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ -d "$RUN" ] && { echo "The demo already runs; '$0 stop' first." >&2; exit 1; }

./scripts/setup.sh

mkdir -p "$RUN"; chmod 0755 "$RUN"
ADDR="unix:path=$RUN/system_bus_socket"
.venv/bin/python -m tests.helpers.busdaemon --policy=system "$ADDR" > "$RUN/bus.conf"
setsid dbus-daemon --config-file="$RUN/bus.conf" --nofork --nopidfile \
    </dev/null >"$RUN/dbus.log" 2>&1 &
echo $! > "$RUN/dbus.pid"
for _ in $(seq 100); do [ -S "$RUN/system_bus_socket" ] && break; sleep 0.05; done
export DBUS_SYSTEM_BUS_ADDRESS=$ADDR

setsid .venv/bin/python -m machined --stop-timeout=5 </dev/null >"$RUN/machined.log" 2>&1 &
echo $! > "$RUN/machined.pid"
for _ in $(seq 100); do busctl --system status org.freedesktop.machine1 >/dev/null 2>&1 && break; sleep 0.1; done

# A busybox container tree, then a container that just idles.
if [ ! -x "$TREE/bin/busybox" ]; then
    mkdir -p "$TREE"/{bin,dev,etc,proc,root,run,sys,tmp,usr/lib,var/log}
    cp /bin/busybox "$TREE/bin/busybox"
    for a in sh cat echo hostname ip ls mount ps sleep; do ln -sf busybox "$TREE/bin/$a"; done
    printf 'ID=tiny\nNAME="Tiny"\nPRETTY_NAME="Tiny busybox OS"\nVERSION_ID=1\n' > "$TREE/usr/lib/os-release"
    ln -sf ../usr/lib/os-release "$TREE/etc/os-release"
    echo demo > "$TREE/etc/hostname"
fi
# The payload is the container's PID 1, which gets no signal it has no handler for: the trap
# lets `machinectl terminate` (SIGTERM to the leader) end it at once rather than after the
# stop timeout's SIGKILL.
setsid systemd-nspawn --quiet --register=yes -D "$TREE" -M demo \
    /bin/sh -c 'trap "exit 0" TERM; while :; do sleep 1; done' </dev/null >"$RUN/nspawn.log" 2>&1 &
echo $! > "$RUN/nspawn.pid"
for _ in $(seq 100); do machinectl show demo >/dev/null 2>&1 && break; sleep 0.1; done

machinectl list
cat <<TXT

machined runs on a private system bus, with container "demo" registered through
systemd-nspawn. Point machinectl (or busctl) at that bus:

    export DBUS_SYSTEM_BUS_ADDRESS=$ADDR
    machinectl list
    machinectl status demo
    machinectl show demo
    machinectl shell demo            # a shell in a container that runs no systemd
    machinectl copy-from demo /etc/hostname /tmp/demo-hostname
    machinectl kill demo --signal=SIGCONT
    machinectl terminate demo
    busctl tree org.freedesktop.machine1

Logs: $RUN/machined.log. Stop everything with: $0 stop
TXT
