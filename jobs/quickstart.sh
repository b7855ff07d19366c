#!/usr/bin/env bash
# The README's main job on a fresh machine, in local mode (no Slurm, no DB server needed):
#   set up .venv -> EMT demo data -> fixed split -> study -> 2 local workers for a few minutes (or
#   until the small budget is finished) -> status and the best trial.
# Everything it makes lives in quickstart/ (data, split, run directory with the journal storage and
# the worker logs). Run it again to resume the same study; QUICKSTART_FRESH=1 starts over.
#
# Settings (environment variables, all optional):
#   QUICKSTART_DIR=quickstart   QUICKSTART_WORKERS=2   QUICKSTART_BUDGET=12   QUICKSTART_MINUTES=5
#   QUICKSTART_IMAGES=200 (demo structures)   QUICKSTART_EPOCHS=15 (per trial)
#   HPOPT_VENV=.venv   PYTHON=python3
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HPOPT_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
DIR="${QUICKSTART_DIR:-$REPO/quickstart}"
WORKERS="${QUICKSTART_WORKERS:-2}"
BUDGET="${QUICKSTART_BUDGET:-12}"
MINUTES="${QUICKSTART_MINUTES:-5}"
IMAGES="${QUICKSTART_IMAGES:-200}"
EPOCHS="${QUICKSTART_EPOCHS:-15}"
STUDY=quickstart
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "environment: $VENV"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# torch first, pinned: an unpinned torch (or one pulled in by hpopt) would be a multi-GB CUDA build
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0
# -I: ignore the current directory, so a checkout next to us does not pass for an installed hpopt
installed="$("$VENV/bin/python" -I -c 'import hpopt, pathlib; print(pathlib.Path(hpopt.__file__).resolve().parents[1])' 2>/dev/null || true)"
[[ "$installed" == "$REPO" && -x "$VENV/bin/hpopt" ]] || "${PIP[@]}" install -e "$REPO"
export PATH="$VENV/bin:$PATH"

# local mode throughout: the run directory (journal storage, logs) lives in $DIR, never in a cluster profile
mkdir -p "$DIR"
cd "$DIR"
export HPOPT_CONFIG="$DIR/hpopt.toml" HPOPT_RUN_DIR="$DIR/run"
[[ -f hpopt.toml ]] || printf 'preset = "local"\nrun_dir = "run"\n' > hpopt.toml
# two workers share the cores; one math thread each keeps them from fighting over them
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ "${QUICKSTART_FRESH:-0}" == "1" ]]; then rm -rf run; fi

step "demo data: $IMAGES EMT structures"
[[ -f data/demo.traj ]] || hpopt data make-demo data/demo.traj --images "$IMAGES"

step "fixed train/validation/test split"
[[ -f data/splits/demo.json ]] || hpopt split data/demo.traj --name demo

step "study $STUDY: budget $BUDGET trials, $EPOCHS epochs each"
if hpopt study show "$STUDY" --json >/dev/null 2>&1; then
  echo "study $STUDY exists: resuming it"
else
  hpopt study create "$STUDY" --space "$REPO/examples/space.yaml" --split data/splits/demo.json \
    --budget "$BUDGET" --set "optim.epochs=$EPOCHS"
fi

step "$WORKERS local workers, at most $MINUTES minutes"
hpopt launch --local --workers "$WORKERS" --study "$STUDY" --time "$MINUTES" --wait

step "status"
hpopt status --study "$STUDY" || [[ $? -eq 2 ]]  # 2: something needs attention, shown above

step "best trial"
hpopt best --study "$STUDY"
echo
echo "run directory: $DIR/run (worker logs in run/logs/workers); more: hpopt report --study $STUDY"
