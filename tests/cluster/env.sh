# Shared settings of the test cluster; sourced by up.sh, down.sh and the test runner.
# Everything lives under one state directory so teardown can find exactly what it started.
export HPOPT_CLUSTER_DIR="${HPOPT_CLUSTER_DIR:-/var/tmp/hpopt-cluster}"
export HPOPT_CLUSTER_NAME="${HPOPT_CLUSTER_NAME:-hpoptci}"
export HPOPT_CTLD_PORT="${HPOPT_CTLD_PORT:-16817}"
export HPOPT_SLURMD_PORT="${HPOPT_SLURMD_PORT:-16818}"
export HPOPT_DBD_PORT="${HPOPT_DBD_PORT:-16819}"
export HPOPT_ACCTDB_PORT="${HPOPT_ACCTDB_PORT:-16306}"
export SLURM_CONF="$HPOPT_CLUSTER_DIR/etc/slurm.conf"
