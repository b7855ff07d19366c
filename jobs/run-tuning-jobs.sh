#!/usr/bin/env bash
# Start (or resume) a hyperparameter search from a login node, in one line:
#
#   jobs/run-tuning-jobs.sh [WORKERS] [TRIALS] [extra `hpopt launch` options...]
#
#   WORKERS  worker jobs to run at once (default 8)
#   TRIALS   the study's budget: finished trials across all workers. A new study is created with
#            it (default 100); for an existing study it becomes the new budget (omit it, or pass
#            "-", to keep the stored one).
#   e.g.     jobs/run-tuning-jobs.sh 8 200 --time 2:00:00 --partition gpu-a100
#
# Steps: load the environment -> make sure the DB job runs (`hpopt db start`) -> create the study or
# resume it -> launch the workers -> print the command to watch them.
# Safe to run twice: the DB job and the study are reused, and workers are launched only when none
# of this study's workers are queued or running (`hpopt launch --unless-active`; the live ones are
# listed instead) and its budget is not finished yet. Raise the budget with a bigger TRIALS (a
# finished search then resumes); to add workers to a running one, use `hpopt launch -n N -s NAME`.
#
# Settings (environment variables, all optional):
#   STUDY=tuning                      study name
#   SPACE=examples/space.yaml         search space of a new study
#   SPLIT=data/splits/default.json    split manifest of a new study (`hpopt split SOURCE --name default`)
#   CONFIG_BASE=                      base trainer config (YAML/JSON) of a new study
#   GPU=1                             1: one GPU per worker (`--gpu`); 0: CPU workers
#   HPOPT_MODULES="anaconda3 mariadb" modules to `module load` first
#   HPOPT_VENV=.venv                  virtualenv to activate (if it exists)
#   HPOPT_BIN=hpopt                   the hpopt command
#   plus hpopt's own: HPOPT_CONFIG, HPOPT_RUN_DIR, HPOPT_SLURM_ACCOUNT, ...
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
positive() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

WORKERS="${1:-8}"
TRIALS="${2:--}"
shift $(( $# < 2 ? $# : 2 ))
positive "$WORKERS" || { echo "WORKERS must be a positive integer, got '$WORKERS'" >&2; usage; }
[[ "$TRIALS" == "-" ]] || positive "$TRIALS" || { echo "TRIALS must be a positive integer or '-', got '$TRIALS'" >&2; usage; }

STUDY="${STUDY:-tuning}"
SPACE="${SPACE:-examples/space.yaml}"
SPLIT="${SPLIT:-data/splits/default.json}"
CONFIG_BASE="${CONFIG_BASE:-}"
GPU="${GPU:-1}"

# --- environment ----------------------------------------------------------------------------------
if [[ -n "${HPOPT_MODULES:-}" ]]; then
  type module >/dev/null 2>&1 || { echo "HPOPT_MODULES is set but the \`module\` command is not available" >&2; exit 1; }
  for mod in $HPOPT_MODULES; do module load "$mod"; done
fi
VENV="${HPOPT_VENV:-.venv}"
if [[ -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
read -r -a HPOPT <<< "${HPOPT_BIN:-hpopt}"
command -v "${HPOPT[0]}" >/dev/null || { echo "'${HPOPT[0]}' not found: activate hpopt's environment or set HPOPT_VENV" >&2; exit 1; }

local_mode=0
if ! command -v sbatch >/dev/null; then local_mode=1; fi
for arg in "$@"; do [[ "$arg" == "--local" ]] && local_mode=1; done

# --- the DB job (Slurm only; local mode keeps the study in the run directory's journal file) -------
if (( ! local_mode )); then
  "${HPOPT[@]}" db start
fi

# --- the study -------------------------------------------------------------------------------------
if "${HPOPT[@]}" study show "$STUDY" --json >/dev/null 2>&1; then
  echo "study $STUDY exists: resuming it"
  if [[ "$TRIALS" != "-" ]]; then "${HPOPT[@]}" study budget "$STUDY" "$TRIALS"; fi
else
  budget="$TRIALS"; [[ "$budget" == "-" ]] && budget=100
  create=("${HPOPT[@]}" study create "$STUDY" --space "$SPACE" --split "$SPLIT" --budget "$budget")
  [[ -n "$CONFIG_BASE" ]] && create+=(--config-base "$CONFIG_BASE")
  "${create[@]}"
fi

# --- the workers -----------------------------------------------------------------------------------
launch=("${HPOPT[@]}" launch --workers "$WORKERS" --study "$STUDY" --unless-active)
[[ "$GPU" == "1" ]] && (( ! local_mode )) && launch+=(--gpu)
"${launch[@]}" "$@"

echo
echo "watch the search:  hpopt status --study $STUDY --watch"
