#!/usr/bin/env bash
# A REAL one-node Slurm (slurmctld + slurmd + munge) on this machine, for tests and local trials.
#
#   tests/cluster/slurm_local.sh start    install slurm-wlm/munge if missing, configure, start, wait for `idle`
#   tests/cluster/slurm_local.sh status   print sinfo; exit 0 when the node answers
#   tests/cluster/slurm_local.sh stop     cancel our jobs, stop the daemons this script started (pid files)
#   tests/cluster/slurm_local.sh owned    exit 0 when the running cluster is the one this script started
#   tests/cluster/slurm_local.sh steps    the pids of this cluster's slurmstepd processes (what stop kills)
#   tests/cluster/slurm_local.sh install  install slurm-wlm/munge with apt-get when missing (nothing started)
#
# Needs root (Debian/Ubuntu; apt-get is used only when the daemons are missing). State, spool, pid and log
# files live in $U2PL_SLURM_DIR (default /var/tmp/u2pl-slurm). It writes /etc/slurm/slurm.conf and
# cgroup.conf (an existing foreign slurm.conf is kept as slurm.conf.u2pl-backup and restored on stop).
# Exit codes: 0 ok, 2 not root, 3 packages cannot be installed, 4 daemons did not come up (logs printed),
# 5 a Slurm this script did not start is running (it is left alone).
set -u
ACTION=${1:-status}
DIR=${U2PL_SLURM_DIR:-/var/tmp/u2pl-slurm}
CONF=/etc/slurm/slurm.conf
CGCONF=/etc/slurm/cgroup.conf
MARK="# written by u2pl-scale tests/cluster/slurm_local.sh"
# munged serves both this cluster and slurm_multinode.sh's: one pid file, the last cluster to stop stops it
MUNGED_PID=${U2PL_MUNGED_PID:-/var/tmp/u2pl-munged.pid}

log() { echo "[slurm_local] $*" >&2; }
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (starts slurmctld/slurmd/munged and writes /etc/slurm)"; exit 2
  fi
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    log "slurm-wlm/munge are not installed and apt-get is not available"; exit 3
  fi
  log "installing slurm-wlm and munge with apt-get (about 15 s)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
       >"/tmp/u2pl-slurm-apt.log" 2>&1; then
    tail -20 /tmp/u2pl-slurm-apt.log >&2
    log "apt-get install slurm-wlm munge failed (log: /tmp/u2pl-slurm-apt.log)"; exit 3
  fi
}

node_state() { timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool"
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "keeping the existing $CONF as $CONF.u2pl-backup"
    mv "$CONF" "$CONF.u2pl-backup"
  fi
  if [ -f "$CGCONF" ] && ! grep -qF "$MARK" "$CGCONF" && [ ! -f "$CGCONF.u2pl-backup" ]; then
    mv "$CGCONF" "$CGCONF.u2pl-backup"
  fi
  cat >"$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$(slurm_conf_common)
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat >"$CGCONF" <<EOF
$MARK
$(cgroup_conf)
EOF
}

start() {
  need_root
  install_if_missing
  mkdir -p "$DIR"
  if owned && [ -n "$(node_state)" ]; then
    log "already running: $(node_state)"; return 0
  fi
  if ! pid_alive "$DIR/slurmctld.pid" && foreign_controller; then
    log "a slurmctld this script did not start is running: not adopting or replacing it"; exit 5
  fi
  start_munge
  write_conf
  if ! pid_alive "$DIR/slurmctld.pid"; then
    # a fresh controller starts from empty state: jobs saved by an earlier cluster (a killed test session)
    # would otherwise be resumed and hold the node
    kill_job_steps "$DIR/spool/job"
    rm -rf "$DIR/state" "$DIR/spool" && mkdir -p "$DIR/state" "$DIR/spool"
  fi
  pid_alive "$DIR/slurmctld.pid" || slurmctld -c || { log "slurmctld failed"; tail -20 "$DIR/slurmctld.log" >&2; exit 4; }
  pid_alive "$DIR/slurmd.pid" || slurmd -N localhost || { log "slurmd failed"; tail -20 "$DIR/slurmd.log" >&2; exit 4; }
  local state=""
  for _ in $(seq 120); do
    state=$(node_state)
    case "$state" in
      idle*|mixed*|allocated*) log "up: node localhost is $state"; return 0 ;;
      down*|drain*) timeout 5 scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.5
  done
  log "node did not become idle (state: '${state:-no answer}')"
  tail -20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2
  exit 4
}

foreign_controller() {
  # a live slurmctld neither this script nor slurm_multinode.sh started (that one runs with its own config file,
  # -f .../u2pl-slurm-multi/slurm.conf); a zombie is not one (where pid 1 does not reap, a stopped controller
  # lingers as one)
  local pid multi
  multi=${U2PL_SLURM_MULTI_DIR:-/var/tmp/u2pl-slurm-multi}
  for pid in $(pgrep -x slurmctld 2>/dev/null); do
    [[ $(ps -o stat= -p "$pid" 2>/dev/null) == Z* ]] && continue
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$multi/slurm.conf" && continue
    return 0
  done
  return 1
}

owned() {
  # exit 0 when the running controller is the one this script started (its pid file), else 1
  pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"
}

stop() {
  # cancel the jobs of our controller so a later start does not resume stale work, then stop the daemons we
  # started; a controller this script did not start is not touched
  if ! owned; then
    log "no cluster started by this script is running (nothing stopped)"; return 0
  fi
  timeout 10 scancel --full --quiet -u root >/dev/null 2>&1 || true
  kill_job_steps "$DIR/spool/job"
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  "$(dirname "$0")/slurm_multinode.sh" owned || stop_pidfile "$MUNGED_PID"
  if [ -f "$CONF.u2pl-backup" ]; then mv -f "$CONF.u2pl-backup" "$CONF"; fi
  if [ -f "$CGCONF.u2pl-backup" ]; then mv -f "$CGCONF.u2pl-backup" "$CGCONF"; fi
  log "stopped"
}

status() {
  if timeout 5 sinfo 2>/dev/null; then exit 0; fi
  log "not running"; exit 1
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  owned) owned; exit $? ;;
  steps) our_job_steps ;;
  install) need_root; install_if_missing ;;
  *) echo "usage: $0 start|stop|status|owned|steps|install" >&2; exit 64 ;;
esac
