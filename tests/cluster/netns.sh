#!/usr/bin/env bash
# Four "hosts" on this machine: network namespaces joined by a bridge, each with its own address and host name.
#
#   tests/cluster/netns.sh up             create the bridge br-$U2PL_NETNS ($NET.254 on this machine) and the
#                                         namespaces $U2PL_NETNS-node1..4 ($NET.1..4; /etc/netns/<name>/hosts maps
#                                         node1..4 and ctl to those addresses inside them)
#   tests/cluster/netns.sh check          TCP from every namespace (and this machine) to node1 works
#   tests/cluster/netns.sh run K CMD...   run CMD "on" nodeK: in its network namespace, with host name nodeK
#   tests/cluster/netns.sh pids           the processes running in the namespaces
#   tests/cluster/netns.sh down [--force] delete what `up` created; with processes still inside, refuse unless
#                                         --force (then they are killed: only what was started in them lives there)
#   tests/cluster/netns.sh owned          exit 0 when the namespaces are the ones this script created
#
# A set of hosts is named by U2PL_NETNS (default u2) on the network U2PL_NET (default 10.77.0, a /24):
# slurm_multinode.sh and ray_multinode.sh each use their own set, so either can be stopped alone.
# Needs root. The addresses are used only inside the namespaces and on the bridge; nothing else is touched
# (/etc/hosts stays as it is: `ip netns exec` mounts /etc/netns/<name>/hosts over it inside each namespace).
# Exit codes: 0 ok, 1 down refused (processes inside), 2 not root, 3 iproute2/unshare missing and not installable,
# 4 the namespaces could not be set up or do not talk (details printed), 5 a bridge or namespace of these names
# exists that this script did not create (left alone), 6 this kernel/container does not allow network namespaces.
set -u
ACTION=${1:-owned}
SET=${U2PL_NETNS:-u2}
NODES=${U2PL_NODES:-4}
NET=${U2PL_NET:-10.77.0}
BRIDGE=br-$SET
PREFIX=$SET-node
PYTHON=${PYTHON:-python3}
MARK=/run/u2pl-netns-$SET.owner  # on tmpfs, like the namespaces themselves: both go away with a reboot
if ! [[ $SET =~ ^[a-z0-9]{1,6}$ && $NET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ && $NODES =~ ^[1-9]$ ]]; then
  # interface names have at most 15 characters (v-<set>-node<K>)
  echo "[netns] bad U2PL_NETNS='$SET' (1-6 of a-z0-9), U2PL_NET='$NET' (a.b.c) or U2PL_NODES='$NODES' (1-9)" >&2
  exit 64
fi

log() { echo "[netns] $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then log "needs root (creates network namespaces and a bridge)"; exit 2; fi
}

install_if_missing() {
  command -v ip >/dev/null && command -v unshare >/dev/null && return 0
  command -v apt-get >/dev/null || { log "iproute2 (ip) or util-linux (unshare) missing and no apt-get"; exit 3; }
  log "installing iproute2 with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux; } \
    >/tmp/u2pl-netns-apt.log 2>&1 || { tail -20 /tmp/u2pl-netns-apt.log >&2; log "apt-get failed"; exit 3; }
}

owned() { [ -f "$MARK" ]; }

exists() {
  ip link show "$BRIDGE" >/dev/null 2>&1 && return 0
  local k
  for k in $(seq "$NODES"); do [ -e "/run/netns/$PREFIX$k" ] && return 0; done
  return 1
}

hosts_file() {
  echo "127.0.0.1 localhost"
  echo "$NET.254 ctl"
  local k
  for k in $(seq "$NODES"); do echo "$NET.$k node$k"; done
}

up() {
  need_root
  install_if_missing
  if owned && ip link show "$BRIDGE" >/dev/null 2>&1; then log "already up"; return 0; fi
  if ! owned && exists; then
    log "a bridge $BRIDGE or namespace $PREFIX* exists that this script did not create: leaving it alone"; exit 5
  fi
  if ip -4 -o addr show | grep -qF " $NET."; then
    log "addresses of $NET.0/24 are in use on this machine already: choose another network (U2PL_NET)"; exit 5
  fi
  # probe first: containers without CAP_SYS_ADMIN/CAP_NET_ADMIN refuse here, before anything is created
  if ! unshare --net true 2>/dev/null; then
    log "this machine does not allow network namespaces (unshare --net fails)"; exit 6
  fi
  echo "$$ $(date +%s)" >"$MARK"  # from here on `down` removes whatever exists, also after a half-done `up`
  {
    ip link add "$BRIDGE" type bridge && ip link set "$BRIDGE" up && ip addr add "$NET.254/24" dev "$BRIDGE"
  } || { log "cannot create the bridge $BRIDGE"; down_all; exit 6; }
  local k
  for k in $(seq "$NODES"); do
    local ns=$PREFIX$k
    {
      ip netns add "$ns" &&
      ip link add "v-$ns" type veth peer name eth0 netns "$ns" &&
      ip link set "v-$ns" master "$BRIDGE" && ip link set "v-$ns" up &&
      ip netns exec "$ns" ip addr add "$NET.$k/24" dev eth0 &&
      ip netns exec "$ns" ip link set eth0 up && ip netns exec "$ns" ip link set lo up
    } || { log "cannot set up namespace $ns"; down_all; exit 4; }
    mkdir -p "/etc/netns/$ns"
    hosts_file >"/etc/netns/$ns/hosts"
  done
  log "up: $NODES namespaces ${PREFIX}1..$NODES at $NET.1..$NODES, this machine $NET.254 on $BRIDGE"
}

check() {
  # a listener on node1, a connection from every other node and from this machine: the bridge forwards
  local port=29399 k py_listen py_connect
  py_listen="import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('$NET.1',$port)); s.listen()
s.settimeout(20); n=0
while n < int(sys.argv[1]):
    c,_=s.accept(); c.sendall(socket.gethostname().encode()); c.close(); n+=1"
  py_connect="import socket,time,sys
for _ in range(100):
    try:
        print(socket.create_connection(('node1',$port),timeout=5).recv(64).decode()); sys.exit(0)
    except OSError: time.sleep(0.1)
sys.exit(1)"
  run 1 "$PYTHON" -c "$py_listen" "$NODES" &
  local listener=$! bad=0 got
  for k in $(seq 2 "$NODES"); do
    got=$(run "$k" "$PYTHON" -c "$py_connect") || true
    [ "$got" = node1 ] || { log "node$k cannot reach node1 ($NET.1:$port) through $BRIDGE (got '${got}')"; bad=1; }
  done
  got=$("$PYTHON" -c "${py_connect/node1/$NET.1}") || true
  [ "$got" = node1 ] || { log "this machine cannot reach node1 at $NET.1 (got '${got}')"; bad=1; }
  kill "$listener" 2>/dev/null; wait "$listener" 2>/dev/null
  if [ $bad != 0 ]; then
    log "the bridge does not forward between namespaces (a firewall with net.bridge.bridge-nf-call-iptables=1?)"
    exit 4
  fi
  log "ok: nodes 2..$NODES and this machine reach node1"
}

run() {
  # run CMD in nodeK's network namespace with its own host name (a UTS namespace): socket.gethostname() == nodeK
  local k=$1; shift
  exec ip netns exec "$PREFIX$k" unshare --uts sh -c 'hostname "$0" && exec "$@"' "node$k" "$@"
}

ns_pids() {
  local k
  for k in $(seq "$NODES"); do [ -e "/run/netns/$PREFIX$k" ] && ip netns pids "$PREFIX$k" 2>/dev/null; done
  return 0
}

down_all() {
  local k pids
  pids=$(ns_pids)
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null
    for _ in $(seq 30); do [ -z "$(ns_pids)" ] && break; sleep 0.2; done
    pids=$(ns_pids); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null && sleep 0.2
  fi
  for k in $(seq "$NODES"); do
    [ -e "/run/netns/$PREFIX$k" ] && ip netns del "$PREFIX$k"
    ip link del "v-$PREFIX$k" >/dev/null 2>&1  # gone with its namespace already, unless that failed half-way
    rm -rf "/etc/netns/$PREFIX$k"
  done
  rmdir /etc/netns 2>/dev/null
  ip link del "$BRIDGE" >/dev/null 2>&1
  rm -f "$MARK"
  return 0
}

down() {
  need_root
  if ! owned; then log "no namespaces created by this script (nothing removed)"; return 0; fi
  if [ "${1:-}" != "--force" ] && [ -n "$(ns_pids)" ]; then
    log "processes still run in the namespaces (stop their clusters first, or use down --force): $(ns_pids | xargs)"
    exit 1
  fi
  down_all
  log "down"
}

case "$ACTION" in
  up) up ;;
  check) check ;;
  run) shift; [ $# -ge 2 ] || { echo "usage: $0 run K CMD..." >&2; exit 64; }; run "$@" ;;
  pids) ns_pids ;;
  down) down "${2:-}" ;;
  owned) owned; exit $? ;;
  *) echo "usage: $0 up|check|run K CMD...|pids|down [--force]|owned" >&2; exit 64 ;;
esac
