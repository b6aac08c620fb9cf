#!/usr/bin/env bash
# Sets up everything the tests need (runtime + dev requirements, the package in editable mode) and runs
# the fast suite. Extra arguments go to pytest, e.g. `bash tools/test.sh -m slow` for the slow group.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
python -m pip install --quiet --disable-pip-version-check --no-deps -e .
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec python -m pytest -x -q "$@"
