#!/usr/bin/env bash
# A REAL four-node Slurm on this machine: slurmctld here (10.77.0.254), one slurmd per network namespace
# (u2s-node1..4 of tests/cluster/netns.sh: hosts node1..4 at 10.77.0.1..4, each with its own host name), munge
# shared (its socket is a file). Jobs run on those hosts; sbatch/srun/squeue work from here with SLURM_CONF set.
#
#   tests/cluster/slurm_multinode.sh start    set up the namespaces, install slurm-wlm/munge if missing, start,
#                                             wait until node1..4 are idle
#   tests/cluster/slurm_multinode.sh env      print `export SLURM_CONF=...`: Slurm commands then talk to this cluster
#   tests/cluster/slurm_multinode.sh run K CMD...  run CMD on nodeK (its network namespace and host name)
#   tests/cluster/slurm_multinode.sh status   sinfo of this cluster; exit 0 when it answers
#   tests/cluster/slurm_multinode.sh stop     cancel its jobs, stop its daemons (pid files) and all else on its hosts,
#                                             remove the namespaces
#   tests/cluster/slurm_multinode.sh owned    exit 0 when the running cluster is the one this script started
#
# It has its own configuration ($DIR/slurm.conf, passed as SLURM_CONF; /etc/slurm is not touched), state, ports
# (controller 6827) and cluster name, so the one-node cluster of slurm_local.sh can run beside it. Files live in
# $U2PL_SLURM_MULTI_DIR (default /var/tmp/u2pl-slurm-multi).
# Exit codes: 0 ok, 2 not root, 3 packages cannot be installed, 4 daemons did not come up (logs printed),
# 5 namespaces or a controller of this configuration exist that this script did not start (left alone),
# 6 no network namespaces on this machine.
set -u
ACTION=${1:-status}
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${U2PL_SLURM_MULTI_DIR:-/var/tmp/u2pl-slurm-multi}
NODES=${U2PL_NODES:-4}
# its own set of hosts (netns.sh), apart from ray_multinode.sh's: either cluster can be stopped alone
export U2PL_NETNS=${U2PL_SLURM_NETNS:-u2s} U2PL_NET=${U2PL_SLURM_NET:-10.77.0}
NET=$U2PL_NET
PORT=6827
# munged serves both this cluster and slurm_local.sh's: one pid file, the last cluster to stop stops it
MUNGED_PID=${U2PL_MUNGED_PID:-/var/tmp/u2pl-munged.pid}
export SLURM_CONF=$DIR/slurm.conf

log() { echo "[slurm_multinode] $*" >&2; }
# shellcheck source=common.sh
. "$HERE/common.sh"

states() { timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # each node claims the machine's cores (a slurmd refuses a configuration above what it sees) and a share of
  # the memory, so that a job of up to $cpus tasks fits on one node as on the one-node cluster
  mem_mb=$(awk -v n="$NODES" '/MemTotal/ {printf "%d", $2 / 1024 * 0.8 / n}' /proc/meminfo)
  mkdir -p "$DIR/state" "$DIR/spool"
  cat >"$SLURM_CONF" <<EOF
# written by u2pl-scale tests/cluster/slurm_multinode.sh
ClusterName=u2multi
SlurmctldHost=localhost($NET.254)
SlurmctldPort=$PORT
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
$(slurm_conf_common)
NodeName=node[1-$NODES] NodeAddr=$NET.[1-$NODES] CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat >"$DIR/cgroup.conf" <<EOF
$(cgroup_conf)
EOF
}

owned() {
  pid_alive "$DIR/slurmctld.pid" || return 1
  local k
  for k in $(seq "$NODES"); do pid_alive "$DIR/slurmd-node$k.pid" || return 1; done
  return 0
}

foreign_controller() {
  # a slurmctld of this configuration that this script did not start (its pid file would name it)
  local pid
  for pid in $(pgrep -x slurmctld 2>/dev/null); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$SLURM_CONF" \
       && [ "$pid" != "$(cat "$DIR/slurmctld.pid" 2>/dev/null)" ]; then
      return 0
    fi
  done
  return 1
}

start() {
  [ "$(id -u)" = 0 ] || { log "needs root (starts slurmctld/slurmd/munged, creates network namespaces)"; exit 2; }
  "$HERE/slurm_local.sh" install || exit 3
  mkdir -p "$DIR"
  if owned && [ "$(states | grep -c -E ' (idle|mixed|allocated)$')" = "$NODES" ]; then
    log "already running"; return 0
  fi
  foreign_controller && { log "a slurmctld with $SLURM_CONF runs that this script did not start"; exit 5; }
  "$HERE/netns.sh" up || exit $?
  "$HERE/netns.sh" check || exit 4
  start_munge
  if ! pid_alive "$DIR/slurmctld.pid"; then
    # a fresh controller starts from empty state: stale jobs of a killed session would hold nodes
    kill_job_steps "$DIR/spool/node[0-9]*/job"
    rm -rf "$DIR/state" "$DIR/spool"
    write_conf
    slurmctld -f "$SLURM_CONF" || { log "slurmctld failed"; tail -20 "$DIR/slurmctld.log" >&2; exit 4; }
  fi
  local k
  for k in $(seq "$NODES"); do
    mkdir -p "$DIR/spool/node$k"
    # slurmd daemonises inside nodeK's namespaces; so do the job steps it starts (host name nodeK, address .K)
    pid_alive "$DIR/slurmd-node$k.pid" || "$HERE/netns.sh" run "$k" slurmd -f "$SLURM_CONF" -N "node$k" \
      || { log "slurmd on node$k failed"; tail -20 "$DIR/slurmd-node$k.log" >&2; exit 4; }
  done
  local now=""
  for _ in $(seq 120); do
    now=$(states)
    if [ "$(echo "$now" | grep -c -E ' (idle|mixed|allocated)$')" = "$NODES" ]; then
      log "up: $(echo "$now" | xargs)"; return 0
    fi
    echo "$now" | awk '$2 ~ /^(down|drain)/ {print $1}' | while read -r node; do
      timeout 5 scontrol update nodename="$node" state=resume >/dev/null 2>&1
    done
    sleep 0.5
  done
  log "nodes did not become idle: ${now:-no answer}"
  tail -n 15 "$DIR"/slurmctld.log "$DIR"/slurmd-node*.log >&2
  exit 4
}

stop() {
  # a half-started cluster (no controller, some slurmd) is stopped the same way; the namespaces go last
  pid_alive "$DIR/slurmctld.pid" && { timeout 10 scancel --full --quiet -u root >/dev/null 2>&1 || true; }
  kill_job_steps "$DIR/spool/node[0-9]*/job"
  local f
  for f in "$DIR"/slurmd-node*.pid "$DIR/slurmctld.pid"; do stop_pidfile "$f"; done
  "$HERE/slurm_local.sh" owned || stop_pidfile "$MUNGED_PID"
  "$HERE/netns.sh" down --force  # what still runs on these hosts is this cluster's (a job's orphans, a driver)
  log "stopped"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  run) shift; exec "$HERE/netns.sh" run "$@" ;;
  status) states | grep . && exit 0; log "not running"; exit 1 ;;
  owned) owned; exit $? ;;
  steps) our_job_steps ;;
  *) echo "usage: $0 start|stop|env|run K CMD...|status|owned|steps" >&2; exit 64 ;;
esac
