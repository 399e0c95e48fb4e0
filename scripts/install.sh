#!/bin/bash
# Install this machined as the system's systemd-machined.service, or uninstall it again
# (docs/install.md). Run as root.
#
#   scripts/install.sh wheelhouse DIR                  wheels of machined and its pinned
#                                                      dependencies into DIR (needs PyPI)
#   scripts/install.sh install [--root DIR] [--wheelhouse DIR]
#   scripts/install.sh uninstall [--root DIR]          (also /usr/lib/machined/install.sh)
#
# install puts a virtualenv with the daemon under /usr/lib/machined (from the wheelhouse, with
# pip --no-index: nothing is fetched then, nor at boot), the unit in /etc/systemd/system (it takes
# precedence over the distribution's in /lib/systemd/system) and the D-Bus activation, D-Bus policy
# and polkit files in /usr/share. A distribution file in the way is moved aside with dpkg-divert
# (or kept as FILE.machined-orig without dpkg); everything done is recorded in
# /usr/lib/machined/install.state, and uninstall undoes exactly that. On a running systemd (no
# --root) both reload systemd and the bus and restart systemd-machined if it was running, so the
# registered machines carry over (they live in /run/systemd/machines).
set -euo pipefail

PREFIX=/usr/lib/machined
STATE=$PREFIX/install.state
SRC=$(dirname "$(readlink -f "$0")")/..

usage() { sed -n '5,8s/^# \{0,1\}//p' "$0" >&2; exit 2; }
die() { echo "install.sh: $*" >&2; exit 1; }

CMD=${1:-}; [ $# -gt 0 ] && shift
ROOT=
WHEELHOUSE=
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$(readlink -f "${2:?}"); shift 2;;
        --root=*) ROOT=$(readlink -f "${1#--root=}"); shift;;
        --wheelhouse) WHEELHOUSE=$(readlink -f "${2:?}"); shift 2;;
        --wheelhouse=*) WHEELHOUSE=$(readlink -f "${1#--wheelhouse=}"); shift;;
        *) [ "$CMD" = wheelhouse ] && [ -z "$WHEELHOUSE" ] || usage; WHEELHOUSE=$1; shift;;
    esac
done
[ "$ROOT" = / ] && ROOT=

# Run a program of the target system (its own python3, its own dpkg-divert).
in_target() { if [ -n "$ROOT" ]; then chroot "$ROOT" "$@"; else "$@"; fi; }

# systemd is PID 1 of the system we install into: reload it and the bus afterwards.
live_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ]; }

has_dpkg() { [ -e "$ROOT/var/lib/dpkg/status" ] && in_target sh -c 'command -v dpkg-divert' >/dev/null; }

record() { echo "$*" >> "$ROOT$STATE"; }

# Make the parent directories of a target path, recording each one made.
make_parents() {
    local dir=$(dirname "$1") missing=()
    while [ ! -d "$ROOT$dir" ]; do missing=("$dir" "${missing[@]}"); dir=$(dirname "$dir"); done
    for dir in "${missing[@]}"; do mkdir -m 0755 "$ROOT$dir"; record dir "$dir"; done
}

# Whatever is at PATH (a distribution's file) goes aside, to come back at uninstall. With dpkg
# the path is diverted even when nothing is there yet: a package installed later (say
# systemd-container) then writes its file to PATH.distrib, not over ours.
move_aside() {
    local path=$1
    if has_dpkg; then
        in_target dpkg-divert --quiet --local --rename --divert "$path.distrib" --add "$path"
        record divert "$path"
    elif [ -e "$ROOT$path" ] || [ -L "$ROOT$path" ]; then
        mv "$ROOT$path" "$ROOT$path.machined-orig"
        record backup "$path"
    fi
}

place_file() {   # SOURCE PATH
    make_parents "$2"
    move_aside "$2"
    install -m 0644 "$1" "$ROOT$2"
    record file "$2"
}

place_link() {   # TARGET PATH
    make_parents "$2"
    move_aside "$2"
    ln -s "$1" "$ROOT$2"
    record file "$2"
}

reload_system() {
    live_systemd || return 0
    systemctl daemon-reload
    # dbus-daemon also notices new files by itself; this makes it immediate
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig \
        >/dev/null || true
}

build_wheelhouse() {   # DIR
    mkdir -p "$1"
    local py=$SRC/.venv/bin/python
    [ -x "$py" ] || py=python3
    # sdbus from source against this host's libsystemd, as scripts/setup.sh builds it (the
    # target needs the same Python and libsystemd0)
    local header
    header=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"] + "/Python.h")')
    { pkg-config --exists libsystemd && command -v gcc && [ -e "$header" ]; } >/dev/null 2>&1 ||
        die "building sdbus needs gcc, pkg-config, libsystemd-dev and python3-dev" \
            "(scripts/setup.sh installs them)"
    "$py" -m pip wheel --quiet --no-binary sdbus --wheel-dir "$1" "$SRC"
}

do_install() {
    [ -e "$ROOT$STATE" ] && die "already installed ($STATE exists); uninstall first"
    [ -x "$ROOT/usr/bin/python3" ] || die "$ROOT/usr/bin/python3 is missing"
    in_target /usr/bin/python3 -c 'import ensurepip' 2>/dev/null ||
        die "python3 cannot make virtualenvs (on Debian: apt-get install python3-venv)"
    if [ -z "$WHEELHOUSE" ]; then
        TMP=$(mktemp -d)
        trap 'rm -rf "$TMP"' EXIT
        WHEELHOUSE=$TMP/wheels
        build_wheelhouse "$WHEELHOUSE"
    fi
    [ -e "$ROOT$PREFIX" ] && die "$ROOT$PREFIX exists but is not ours (no install.state)"
    mkdir -m 0755 "$ROOT$PREFIX"   # all of it goes at uninstall
    : > "$ROOT$STATE"
    # the wheels must be visible to the target's pip: copy them in for the time of the install
    local wheels=$PREFIX/.wheels
    cp -r "$WHEELHOUSE" "$ROOT$wheels"
    in_target /usr/bin/python3 -m venv "$PREFIX"
    # only the wheelhouse counts: no index, no pip configuration, no cache under $HOME
    in_target env PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$PREFIX/bin/python3" -m pip install --quiet --no-index --find-links "$wheels" machined
    rm -rf "$ROOT$wheels"
    install -m 0755 "$SRC/scripts/install.sh" "$ROOT$PREFIX/install.sh"

    # With dpkg, the unit goes in the distribution's place (diverted), not in /etc, so that the
    # administrator's own files in /etc still win: `systemctl mask`, `systemctl edit --full`.
    # Without dpkg nothing would keep the package manager from writing over it there: /etc.
    local units=/etc/systemd/system
    if has_dpkg; then units=/lib/systemd/system; fi
    place_file "$SRC/units/systemd-machined.service" "$units/systemd-machined.service"
    # the alias D-Bus activation asks for: systemd-container ships it, a symlink by name
    local alias=dbus-org.freedesktop.machine1.service
    if [ ! -L "$ROOT/lib/systemd/system/$alias" ] && [ ! -L "$ROOT/usr/lib/systemd/system/$alias" ]
    then
        place_link systemd-machined.service "$units/$alias"
    fi
    place_file "$SRC/units/org.freedesktop.machine1.service" \
        /usr/share/dbus-1/system-services/org.freedesktop.machine1.service
    place_file "$SRC/policy/org.freedesktop.machine1.conf" \
        /usr/share/dbus-1/system.d/org.freedesktop.machine1.conf
    place_file "$SRC/policy/org.freedesktop.machine1.policy" \
        /usr/share/polkit-1/actions/org.freedesktop.machine1.policy

    reload_system
    # a running machined (the distribution's) hands over to ours; machines carry over
    if live_systemd; then systemctl try-restart systemd-machined.service; fi
    echo "Installed $(in_target "$PREFIX/bin/python3" -m machined --version) in $ROOT$PREFIX"
}

do_uninstall() {
    [ -e "$ROOT$STATE" ] || die "not installed ($ROOT$STATE is missing)"
    local was_active=no
    if live_systemd && systemctl -q is-active systemd-machined.service; then
        was_active=yes
        systemctl stop systemd-machined.service
    fi
    local kind path
    # undo in reverse order: files, then what they had replaced, then the directories made
    while read -r kind path; do
        case "$kind" in
            file) rm -f "$ROOT$path";;
            divert) in_target dpkg-divert --quiet --local --rename --divert "$path.distrib" \
                        --remove "$path";;
            backup) mv "$ROOT$path.machined-orig" "$ROOT$path";;
            dir) rmdir "$ROOT$path";;
        esac
    done < <(tac "$ROOT$STATE")
    rm -rf "$ROOT$PREFIX"
    reload_system
    if [ $was_active = yes ]; then systemctl start systemd-machined.service || true; fi
    echo "Uninstalled machined from $ROOT$PREFIX"
}

[ "$(id -u)" = 0 ] || [ "$CMD" = wheelhouse ] || die "must be run as root"
case "$CMD" in
    install) do_install;;
    uninstall) do_uninstall;;
    wheelhouse) [ -n "$WHEELHOUSE" ] || usage; build_wheelhouse "$WHEELHOUSE";;
    *) usage;;
esac
