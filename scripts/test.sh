#!/usr/bin/env bash
# Set up a virtualenv (torch 2.13 CPU first, then hubarches with its test extra) and run the
# test suite. Used by the README's Quickstart and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# Editable, so that the tests import this tree, with its C core built in place.
.venv/bin/python -m pip install -q -e ".[test]"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
