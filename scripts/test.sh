#!/usr/bin/env bash
# Runs the whole test suite from nothing: venv, Python packages, Debian packages for the Slurm
# testbed (as root), then pytest (which starts and stops the testbed itself).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch==2.13.0 is the CPU wheel available on the dev/CI machines (see README for GPUs).
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'

if [ "$(id -u)" = 0 ]; then
  bash tests/install_system_deps.sh
else
  echo "not root: Slurm testbed dependencies not installed; testbed tests will be skipped" >&2
fi

.venv/bin/ruff check .
# Two workers, each with a testbed of its own (tests/conftest.py): most tests wait on Slurm.
.venv/bin/pytest -q -n 2 --dist worksteal "$@"
