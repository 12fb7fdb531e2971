#!/usr/bin/env bash
# A REAL four-node Ray cluster on this machine: the head on node1, a worker node on each of node2..4 (network
# namespaces u2r-node1..4 of tests/cluster/netns.sh, 10.77.1.1..4, host names node1..4), one CPU each.
#
#   tests/cluster/ray_multinode.sh start    set up the namespaces, start the head and the workers, wait until all
#                                           nodes are alive; prints the address to give: 10.77.1.1:6390
#   tests/cluster/ray_multinode.sh run K CMD...  run CMD on nodeK as a driver of this cluster (its namespaces and
#                                           auth token), e.g. run 1 python launchers/ray_train.py --address ...
#   tests/cluster/ray_multinode.sh address  print that address
#   tests/cluster/ray_multinode.sh env      print the exports a driver needs (the cluster's auth token file)
#   tests/cluster/ray_multinode.sh stop     stop every process of this cluster (its nodes, drivers started with
#                                           run), remove the namespaces
#   tests/cluster/ray_multinode.sh owned    exit 0 when the running cluster is the one this script started
#
# stop ends every process on those hosts, and nothing else (`ray stop` would kill Ray processes machine-wide,
# other people's too). Pid and log files live in $U2PL_RAY_MULTI_DIR (default /var/tmp/u2pl-ray-multi),
# each node's Ray files in /tmp/u2ray/nodeK.
# Exit codes: 0 ok, 2 not root, 3 ray is not installed, 4 the cluster did not come up (logs printed),
# 5 namespaces exist that netns.sh did not create, 6 no network namespaces on this machine.
set -u
ACTION=${1:-address}
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${U2PL_RAY_MULTI_DIR:-/var/tmp/u2pl-ray-multi}
NODES=${U2PL_NODES:-4}
# its own set of hosts (netns.sh), apart from slurm_multinode.sh's: either cluster can be stopped alone
export U2PL_NETNS=${U2PL_RAY_NETNS:-u2r} U2PL_NET=${U2PL_RAY_NET:-10.77.1}
NET=$U2PL_NET
PORT=6390
ADDRESS=$NET.1:$PORT
PYTHON=${PYTHON:-python3}
TMP_ROOT=/tmp/u2ray  # short: Ray's socket paths under it must stay within the 107 characters of a unix socket
# token authentication with this cluster's own token: Ray 2.5x turns it on for a head that finds a token in
# ~/.ray, and then nodes or drivers without it are refused; drivers need these two variables (`env` prints them)
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token

log() { echo "[ray_multinode] $*" >&2; }
# shellcheck source=common.sh
. "$HERE/common.sh"

owned() {
  local k
  for k in $(seq "$NODES"); do pid_alive "$DIR/node$k.pid" || return 1; done
  return 0
}

alive_nodes() {
  # the node addresses the head's GCS reports alive (the driver's own view, not the processes')
  "$HERE/netns.sh" run 1 timeout 60 "$PYTHON" - "$ADDRESS" <<'EOF' 2>/dev/null
import sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(" ".join(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])))
EOF
}

start_node() {
  # nodeK's Ray: --block keeps `ray start` in the foreground (its pid file says the node runs); each node has its
  # own temp dir, since nodes that share one race for the names of their sockets; setsid: out of the caller's
  # process group, which a Ctrl-C or a timeout may signal
  local k=$1; shift
  setsid "$HERE/netns.sh" run "$k" \
    ray start --block --node-ip-address "$NET.$k" --num-cpus 1 --object-store-memory 100000000 \
    --temp-dir "$TMP_ROOT/node$k" --disable-usage-stats "$@" >"$DIR/node$k.log" 2>&1 </dev/null &
  echo $! >"$DIR/node$k.pid"
}

start() {
  [ "$(id -u)" = 0 ] || { log "needs root (creates network namespaces)"; exit 2; }
  command -v ray >/dev/null || { log "ray is not installed (pip install 'ray[train]')"; exit 3; }
  mkdir -p "$DIR"
  if owned; then log "already running at $ADDRESS"; echo "$ADDRESS"; return 0; fi
  "$HERE/netns.sh" up || exit $?
  "$HERE/netns.sh" check || exit 4
  stop_nodes  # a half-started earlier cluster
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
  fi
  start_node 1 --head --port "$PORT" --include-dashboard false
  local k want got=""
  for _ in $(seq 120); do  # the workers need the head's GCS
    (exec 3<>"/dev/tcp/$NET.1/$PORT") 2>/dev/null && break
    pid_alive "$DIR/node1.pid" || break
    sleep 0.5
  done
  for k in $(seq 2 "$NODES"); do start_node "$k" --address "$ADDRESS"; done
  want=$(for k in $(seq "$NODES"); do echo "$NET.$k"; done | sort | xargs)
  for _ in $(seq 60); do
    got=$(alive_nodes)
    [ "$got" = "$want" ] && { log "up: nodes $got, address $ADDRESS"; echo "$ADDRESS"; return 0; }
    for k in $(seq "$NODES"); do
      pid_alive "$DIR/node$k.pid" || { log "Ray on node$k exited"; tail -20 "$DIR/node$k.log" >&2; stop_nodes; exit 4; }
    done
    sleep 2
  done
  log "not all nodes came up (alive: '${got}', wanted: '$want')"
  tail -n 15 "$DIR"/node*.log >&2
  stop_nodes
  exit 4
}

stop_nodes() {
  # by pid, not `ray stop` (that kills Ray processes machine-wide, other people's too): the pid files, then all
  # that runs in this cluster's namespaces (only its nodes and the drivers started with `run` live there); no
  # graceful shutdown, the cluster is thrown away with its temp dirs
  local k pids
  for k in $(seq "$NODES"); do
    pid_alive "$DIR/node$k.pid" && kill -KILL "$(cat "$DIR/node$k.pid")" 2>/dev/null
    rm -f "$DIR/node$k.pid"
  done
  for _ in $(seq 25); do
    pids=$("$HERE/netns.sh" pids)
    [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null; sleep 0.2
  done
  rm -rf "$TMP_ROOT"
}

stop() {
  stop_nodes
  "$HERE/netns.sh" down --force  # what still runs on these hosts is this cluster's (a driver started with run)
  log "stopped"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  address) echo "$ADDRESS" ;;
  run) shift; exec "$HERE/netns.sh" run "$@" ;;
  env) echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH" ;;
  owned) owned; exit $? ;;
  *) echo "usage: $0 start|stop|run K CMD...|address|env|owned" >&2; exit 64 ;;
esac
