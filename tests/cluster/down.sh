#!/usr/bin/env bash
# Stop exactly the daemons tests/cluster/up.sh started (by pid file) and cancel leftover jobs.
# Keeps the state directory (configs, munge key, accounting DB) so the next `up.sh` is quick;
# `down.sh --purge` removes it too.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/env.sh"
D="$HPOPT_CLUSTER_DIR"
[ -d "$D/run" ] || { echo "[cluster] nothing to stop in $D"; exit 0; }

if [ -f "$D/run/slurmctld.pid" ] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
  scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi

stop() {  # stop NAME: SIGTERM, wait up to 15 s, then SIGKILL
  local pidfile="$D/run/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "[cluster] stopped $1"
}

for name in slurmd slurmctld slurmdbd acctdb munged; do stop "$name"; done
if [ "${1:-}" = "--purge" ]; then rm -rf "$D"; echo "[cluster] removed $D"; fi
