#!/bin/bash
# Install everything and run the whole test suite (this is what CI runs). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
set +e
# One test run at a time on a machine: the tests share /run/systemd/machines and machine.slice.
flock /tmp/machined-tests.lock .venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
[ $rc = 5 ] && { echo "no tests were collected" >&2; exit 1; }
exit $rc
