#!/usr/bin/env bash
# Bring up a real one-node Slurm 22.05 cluster (slurmctld + slurmd + slurmdbd, munge) on 127.0.0.1
# with partitions `cpu` (default) and `gpu`, 4 fake GPUs, and sacct backed by a private MariaDB.
# Run as root on Debian 12. Idempotent: a second run leaves a healthy cluster alone.
# Afterwards: `source tests/cluster/env.sh` (exports SLURM_CONF) and use sbatch/squeue/sacct.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/env.sh"
D="$HPOPT_CLUSTER_DIR"

log() { echo "[cluster] $*"; }
die() { echo "[cluster] error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld, slurmd, slurmdbd)"

install_packages() {
  local need=()
  for bin in slurmctld:slurmctld slurmd:slurmd slurmdbd:slurmdbd sbatch:slurm-client \
             munged:munge mariadbd:mariadb-server mariadb:mariadb-client; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${bin%%:*}" ] || need+=("${bin#*:}")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps Debian's maintainer scripts from starting the system services.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
  fi
}

alive() { [ -f "$D/run/$1.pid" ] && kill -0 "$(cat "$D/run/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for DESCRIPTION SECONDS COMMAND...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within ${secs}s; logs in $D/log"
}

write_configs() {
  local host cpus
  host="$(hostname -s)"
  cpus=8   # more than the box has (config_overrides) so workers + DB job fit at once
  mkdir -p "$D"/{etc,run,log,spool/ctld,spool/d,munge,acctdb}
  chmod 755 "$D" "$D/munge"
  for i in 0 1 2 3; do [ -c "$D/nvidia$i" ] || { rm -f "$D/nvidia$i"; mknod "$D/nvidia$i" c 195 "$i"; }; done
  cat > "$D/etc/slurm.conf" <<CONF
ClusterName=$HPOPT_CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$HPOPT_CTLD_PORT
SlurmdPort=$HPOPT_SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$HPOPT_DBD_PORT
AccountingStoragePass=$D/munge/munge.socket
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
KillWait=5
MinJobAge=30
InactiveLimit=0
OverTimeLimit=0
MessageTimeout=20
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=64000 Gres=gpu:4 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
PartitionName=gpu Nodes=$host Default=NO MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  cat > "$D/etc/gres.conf" <<CONF
AutoDetect=off
Name=gpu File=$D/nvidia[0-3]
CONF
  cat > "$D/etc/cgroup.conf" <<CONF
CgroupPlugin=autodetect
CONF
  cat > "$D/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$HPOPT_DBD_PORT
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$HPOPT_ACCTDB_PORT
StorageUser=slurm
StoragePass=slurmdbd-local-only
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$D/etc/slurmdbd.conf"
}

start_munge() {
  alive munged && return 0
  [ -s "$D/munge/munge.key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$D/munge/munge.key" status=none; chmod 400 "$D/munge/munge.key"; }
  munged --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
    --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munge.seed"
  wait_for munged 10 munge -S "$D/munge/munge.socket" -n
}

acctdb_sql() { mariadb --socket="$D/acctdb.sock" -uroot "$@"; }

start_acctdb() {
  alive acctdb && return 0
  if [ ! -d "$D/acctdb/mysql" ]; then
    mariadb-install-db --datadir="$D/acctdb" --user=root --auth-root-authentication-method=socket \
      --skip-test-db >"$D/log/acctdb-install.log" 2>&1 || die "mariadb-install-db failed (see $D/log/acctdb-install.log)"
  fi
  mariadbd --no-defaults --datadir="$D/acctdb" --user=root --socket="$D/acctdb.sock" \
    --port="$HPOPT_ACCTDB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --pid-file="$D/run/acctdb.pid" --log-error="$D/log/acctdb.log" \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
  wait_for "accounting MariaDB" 30 acctdb_sql -e "SELECT 1"
  acctdb_sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmdbd-local-only';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_daemon() {  # start_daemon NAME ARGS...
  local name=$1; shift
  alive "$name" && return 0
  "$name" -D "$@" >>"$D/log/$name.out" 2>&1 &
  echo $! > "$D/run/$name.pid"
}

register_accounts() {
  local user; user="$(id -un)"
  sacctmgr -i show cluster -n 2>/dev/null | grep -q "$HPOPT_CLUSTER_NAME" || sacctmgr -i add cluster "$HPOPT_CLUSTER_NAME" >/dev/null
  sacctmgr -i -n show account hpopt | grep -q hpopt || sacctmgr -i add account hpopt Cluster="$HPOPT_CLUSTER_NAME" >/dev/null
  sacctmgr -i -n show user "$user" | grep -q "$user" || sacctmgr -i add user "$user" Account=hpopt Cluster="$HPOPT_CLUSTER_NAME" >/dev/null
}

install_packages
write_configs
start_munge
start_acctdb
start_daemon slurmdbd
wait_for slurmdbd 30 sacctmgr -n show cluster
register_accounts
start_daemon slurmctld -i
wait_for slurmctld 30 scontrol ping
start_daemon slurmd -N "$(hostname -s)"
wait_for "node idle" 60 bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
log "up: $(sinfo -h -o '%P %a %D %T %G' | tr '\n' ';') SLURM_CONF=$SLURM_CONF"
