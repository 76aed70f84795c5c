#!/usr/bin/env bash
# The Swarm stack (deploy/swarm/vlm-serve.yml) on a 3-node Docker Swarm built on this one
# machine: 1 manager and 2 workers, each its own dockerd in a network namespace this script
# creates. The nodes are joined through a bridge in a fourth namespace (the "switch"); this
# machine reaches them through one more veth, at 192.168.77.1. Requests go to the nodes'
# addresses only (nginx publishes its port in host mode on the manager).
#   1. the network: namespaces vlmsw-sw (switch), vlmsw0..2 (nodes at 192.168.77.10..12);
#   2. one dockerd per node (own data root, exec root and socket under $SWARM_TEST_WORK);
#   3. the images: copied from the dockerd that built them ($SWARM_IMAGES_FROM) with
#      docker save | docker load (Triton's on every node, the rest on the manager);
#   4. swarm init on node 0, join of nodes 1 and 2, docker stack deploy with 2 Triton replicas
#      and the tiny checkpoints;
#   5. checks: both replicas serve requests sent through nginx; `docker service scale
#      triton=3` gives 3 Prometheus targets; a rolling update of Triton under steady load
#      loses no request; a worker that runs a replica is cut off (its link to the switch goes
#      down): requests succeed again within 60 s and its replica is rescheduled;
#   6. the stack removed, the dockerds stopped, the namespaces deleted (also on failure).
# Run as root, after scripts/compose_test.sh built the images (make test-compose runs both).
#
# Environment (defaults):
#   SWARM_IMAGES_FROM=unix:///var/tmp/vlm-serve-compose-test/docker.sock  the builder's dockerd
#   SWARM_TEST_WORK=/var/tmp/vlm-serve-swarm-test   the nodes' state (images kept between runs)
#   SWARM_NGINX_PORT=18080   nginx's port on the manager (192.168.77.10)
#   UP_TIMEOUT=420           seconds the stack may take to become ready
#   PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)

WORK=${SWARM_TEST_WORK:-/var/tmp/vlm-serve-swarm-test}
SOURCE=${SWARM_IMAGES_FROM:-unix:///var/tmp/vlm-serve-compose-test/docker.sock}
NGINX_PORT=${SWARM_NGINX_PORT:-18080}
UP_TIMEOUT=${UP_TIMEOUT:-420}
PYTHON=${PYTHON:-python3}
STACK=vlm
NODES=(0 1 2)
SUBNET=192.168.77
MANAGER_IP=$SUBNET.10
IMAGE_PREFIX=${IMAGE_PREFIX:-vlm-serve}
IMAGE_TAG=${IMAGE_TAG:-latest}
TRITON_IMAGE=$IMAGE_PREFIX/triton-cpu:$IMAGE_TAG
OTHER_IMAGES=("$IMAGE_PREFIX/fastapi:$IMAGE_TAG" "$IMAGE_PREFIX/nginx:$IMAGE_TAG"
  "$IMAGE_PREFIX/nginx-exporter:$IMAGE_TAG" "$IMAGE_PREFIX/prometheus:$IMAGE_TAG")
export DOCKER_CONFIG=${DOCKER_CONFIG:-/var/tmp/vlm-serve-compose-test/docker-config}

SUMMARY=()
log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - T0))" "$*"; }
fail() { log "FAILED: $*"; exit 1; }
note() { SUMMARY+=("$*"); log "$*"; }
on() { local node=$1; shift; docker -H "unix://$WORK/node$node/docker.sock" "$@"; }  # docker on a node

# --- network ------------------------------------------------------------------------------
ns_exists() { [ -e "/run/netns/$1" ]; }

network_down() {
  ip link del vlmsw-host 2>/dev/null || true
  for name in vlmsw0 vlmsw1 vlmsw2 vlmsw-sw; do
    ns_exists "$name" && ip netns del "$name"
  done
  return 0
}

network_up() {
  network_down
  ip netns add vlmsw-sw
  ip -n vlmsw-sw link add br0 type bridge
  ip -n vlmsw-sw link set br0 up
  ip -n vlmsw-sw link set lo up
  # this machine's way in: 192.168.77.1
  ip link add vlmsw-host type veth peer name host netns vlmsw-sw
  ip -n vlmsw-sw link set host master br0 up
  ip addr add "$SUBNET.1/24" dev vlmsw-host
  ip link set vlmsw-host up
  for node in "${NODES[@]}"; do
    ip netns add "vlmsw$node"
    ip -n "vlmsw$node" link set lo up
    ip link add "node$node" netns vlmsw-sw type veth peer name eth0 netns "vlmsw$node"
    ip -n vlmsw-sw link set "node$node" master br0 up
    ip -n "vlmsw$node" addr add "$SUBNET.1$node/24" dev eth0
    ip -n "vlmsw$node" link set eth0 up
  done
}

cut_off() { ip -n vlmsw-sw link set "node$1" down; }   # the node's cable out of the switch
reconnect() { ip -n vlmsw-sw link set "node$1" up; }

# --- dockerd per node ---------------------------------------------------------------------
our_dockerd() {  # is PID a dockerd of node $2 (not an unrelated reused PID)?
  [ -n "${1:-}" ] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q "dockerd.*$WORK/node$2/data"
}

stop_dockerd() {
  local node=$1 pid
  pid=$(cat "$WORK/node$node/dockerd.pid" 2>/dev/null || true)
  our_dockerd "$pid" "$node" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    our_dockerd "$pid" "$node" || return 0
    sleep 0.5
  done
  log "dockerd of node $node did not stop in 30 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

start_dockerd() {
  local node=$1 dir=$WORK/node$1
  stop_dockerd "$node"
  mkdir -p "$dir/data" "$dir/exec"
  rm -f "$dir/docker.sock" "$dir/dockerd.pid"
  # nsenter --net, not `ip netns exec` (which remounts /sys: dockerd then fails on cgroups)
  nsenter --net="/run/netns/vlmsw$node" dockerd --data-root "$dir/data" --exec-root "$dir/exec" \
    -H "unix://$dir/docker.sock" --pidfile "$dir/dockerd.pid" --storage-driver overlay2 --dns "$SUBNET.1" \
    >"$dir/dockerd.log" 2>&1 &
}

wait_dockerd() {
  local node=$1
  for _ in $(seq 1 120); do
    on "$node" version >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  tail -20 "$WORK/node$node/dockerd.log"
  fail "the dockerd of node $node does not answer"
}

# --- images -------------------------------------------------------------------------------
copy_images() {  # $1: node; the rest: images (skipped where the node has the same image)
  local node=$1 image wanted=()
  shift
  for image in "$@"; do
    [ "$(on "$node" image inspect -f '{{.Id}}' "$image" 2>/dev/null)" = "$(docker -H "$SOURCE" image inspect -f '{{.Id}}' "$image")" ] ||
      wanted+=("$image")
  done
  [ "${#wanted[@]}" -gt 0 ] || return 0
  docker -H "$SOURCE" save "${wanted[@]}" | on "$node" load -q >/dev/null
}

# --- the stack ----------------------------------------------------------------------------
stack_env() {  # what make swarm-up sets, with this test's port and the tiny checkpoints
  export NGINX_PORT TRITON_REPLICAS=2 VLM_MODELS_DIR=/models/tiny VLM_MODELS_HOST_DIR=$ROOT/.models HF_HUB_OFFLINE=1
  export NGINX_RATE=10000 NGINX_BURST=10000 NGINX_CONNECTIONS=10000 PROMETHEUS_PORT=19099
  VLM_CONFIG_VERSION=$(cat nginx/templates/vlm.conf.template prometheus/prometheus.yml prometheus/targets/compose.json prometheus/rules/*.yml | sha256sum | cut -c1-12)
  export VLM_CONFIG_VERSION
}
