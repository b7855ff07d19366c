#!/usr/bin/env bash
# The whole test run on a fresh Debian 12 machine, as root: install what is missing, make a venv
# with CPU torch, install hpopt, bring up the real Slurm + MariaDB test cluster, run pytest, and
# tear the cluster down again. Extra arguments go to pytest (e.g. `tests/run.sh -k db -x`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${HPOPT_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
fi
# Headless Chromium renders the HTML reports in tests/unit/test_results_browser.py.
command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# Torch first: 2.13.0 is a CPU build that lies on disk; an unpinned torch would pull a CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0 \
  || { echo "[tests] torch==2.13.0 not available here; installing the default torch build"; "${PIP[@]}" install torch; }
"${PIP[@]}" install -e ".[dev]"

bash tests/cluster/up.sh
trap 'bash "$REPO/tests/cluster/down.sh"' EXIT
source tests/cluster/env.sh
export HPOPT_REQUIRE_CLUSTER=1 PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -m pytest "$@"
