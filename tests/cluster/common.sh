# Shell functions the cluster scripts share (sourced; each script sets DIR and defines log() first).

# alive and not a zombie (kill -0 succeeds on one whose parent has not reaped it yet)
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid") != Z* ]]
}

# stop the daemon of a pid file (TERM, then KILL after 10 s) and remove the file
stop_pidfile() {
  if pid_alive "$1"; then
    kill "$(cat "$1")" 2>/dev/null
    for _ in $(seq 50); do pid_alive "$1" || break; sleep 0.2; done
    pid_alive "$1" && kill -9 "$(cat "$1")" 2>/dev/null
  fi
  rm -f "$1"
}

# munged for every cluster here (its socket is a file all namespaces share); pid file $MUNGED_PID
start_munge() {
  if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    return 0  # a munged already answers (ours, the other cluster script's or the system's)
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  munged --force --pid-file="$MUNGED_PID" --log-file="$DIR/munged.log" || { log "munged failed to start"; exit 4; }
  for _ in $(seq 50); do
    timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "munged does not answer"; cat "$DIR/munged.log" >&2; exit 4
}

# the slurmstepd processes of this cluster: they run in its directory (a foreign cluster's are left alone)
our_job_steps() {
  local pid
  for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in "$DIR"|"$DIR"/*) echo "$pid" ;; esac
  done
}

# job steps (slurmstepd and the tasks under it) outlive the daemons when those are stopped abruptly; $1: a pgrep
# pattern of this cluster's batch scripts (under its spool directory), killed with their sruns
kill_job_steps() {
  local pid steps
  steps=$(our_job_steps)
  [ -n "$steps" ] && kill -TERM $steps 2>/dev/null
  sleep 0.5
  steps=$(our_job_steps)
  [ -n "$steps" ] && kill -KILL $steps 2>/dev/null
  for pid in $(pgrep -f "$1" 2>/dev/null); do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  return 0
}

# slurm.conf settings every cluster here shares (daemons as root, munge, no cgroups, no accounting)
slurm_conf_common() {
  cat <<'EOF'
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
# short waits so requeue/cancel tests do not idle (SIGTERM -> SIGKILL after KillWait seconds)
KillWait=5
MinJobAge=30
EOF
}

# cgroup.conf: no constraints (CgroupPlugin=disabled is refused by Debian's Slurm 22.05, and slurmd then exits)
cgroup_conf() {
  cat <<'EOF'
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
EOF
}
