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
# Run as root, after scripts/compose_test.sh built the images (make test-compose; its dockerd
# is started again here when it is down). make test-swarm runs this; .ci/run calls it.
#
# Environment (defaults):
#   COMPOSE_TEST_WORK=/var/tmp/vlm-serve-compose-test   the image builder's dockerd state
#   SWARM_IMAGES_FROM=unix://$COMPOSE_TEST_WORK/docker.sock   or another daemon with the images
#   SWARM_TEST_WORK=/var/tmp/vlm-serve-swarm-test   the nodes' state (images kept between runs)
#   SWARM_NGINX_PORT=18080   nginx's port on the manager (192.168.77.10)
#   UP_TIMEOUT=420           seconds the stack may take to become ready
#   PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)

WORK=${SWARM_TEST_WORK:-/var/tmp/vlm-serve-swarm-test}
BUILDER=${COMPOSE_TEST_WORK:-/var/tmp/vlm-serve-compose-test}  # scripts/compose_test.sh's dockerd
SOURCE=${SWARM_IMAGES_FROM:-unix://$BUILDER/docker.sock}
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
export DOCKER_CONFIG=${DOCKER_CONFIG:-$BUILDER/docker-config}  # compose_test.sh put the compose plugin there

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
  [ -n "${1:-}" ] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -q "dockerd.*$WORK/node$2/data"
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
BUILDER_PID=
start_builder() {  # compose_test.sh's dockerd (stopped at its end), for its images
  docker -H "$SOURCE" version >/dev/null 2>&1 && return 0
  [ "$SOURCE" = "unix://$BUILDER/docker.sock" ] && [ -d "$BUILDER/data" ] ||
    fail "no dockerd answers at $SOURCE: run make test-compose first (it builds the images)"
  rm -f "$BUILDER/docker.sock"
  dockerd --data-root "$BUILDER/data" --exec-root "$BUILDER/exec" -H "$SOURCE" --pidfile "$BUILDER/dockerd.pid" \
    --storage-driver overlay2 >"$WORK/builder-dockerd.log" 2>&1 &
  BUILDER_PID=$!
  for _ in $(seq 1 120); do
    docker -H "$SOURCE" version >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  fail "the image builder's dockerd did not start (log: $WORK/builder-dockerd.log)"
}

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
stack_env() {  # for scripts/swarm.sh (make swarm-up): this test's ports, 2 replicas, the tiny checkpoints
  export NGINX_PORT TRITON_REPLICAS=2 VLM_MODELS_DIR=/models/tiny VLM_MODELS_HOST_DIR=$ROOT/.models HF_HUB_OFFLINE=1
  export NGINX_RATE=10000 NGINX_BURST=10000 NGINX_CONNECTIONS=10000 PROMETHEUS_PORT=19099
  export SWARM_URL=http://$MANAGER_IP:$NGINX_PORT UP_TIMEOUT
}

DNS_PID=
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -S "$WORK/node0/docker.sock" ] && on 0 info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null | grep -q active; then
    if [ "$rc" != 0 ]; then
      log "diagnostics: services, Triton tasks, the last lines of each container on the manager"
      on 0 service ls
      on 0 service ps --no-trunc vlm_triton | head -20
      for container in $(on 0 ps -aq | head -12); do
        echo "--- $(on 0 inspect -f '{{.Name}} {{.State.Status}}' "$container")"
        on 0 logs --tail 15 "$container" 2>&1
      done
    fi
    log "docker stack rm $STACK"
    on 0 stack rm "$STACK" >/dev/null
  fi
  for node in "${NODES[@]}"; do
    [ -S "$WORK/node$node/docker.sock" ] && timeout 30 docker -H "unix://$WORK/node$node/docker.sock" swarm leave --force >/dev/null 2>&1
    stop_dockerd "$node"
  done
  # the node that was cut off leaves its overlay network namespaces mounted: unmount them, or
  # they pile up run after run and keep its folder from being removed
  awk -v work="$WORK/" 'index($2, work) == 1 {print $2}' /proc/mounts | xargs -r -n1 umount -l
  [ -z "$DNS_PID" ] || kill "$DNS_PID" 2>/dev/null
  if [ -n "$BUILDER_PID" ]; then
    kill -TERM "$BUILDER_PID" 2>/dev/null
    timeout 60 tail --pid="$BUILDER_PID" -f /dev/null
  fi
  network_down
  if [ "${#SUMMARY[@]}" -gt 0 ]; then
    echo "== swarm summary"
    printf '   %s\n' "${SUMMARY[@]}"
  fi
  log "swarm test $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $(($(date +%s) - T0)) s"
  exit "$rc"
}

main() {
  [ "$(id -u)" = 0 ] || fail "run as root (network namespaces, dockerd)"
  command -v ip >/dev/null || { log "apt-get install iproute2"; apt-get install -y -q iproute2 >/dev/null; }
  for tool in ip nsenter dockerd docker curl; do
    command -v "$tool" >/dev/null || fail "$tool is missing (make test-compose installs docker.io and curl)"
  done
  mkdir -p "$WORK"
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  start_builder
  docker -H "$SOURCE" image inspect "$TRITON_IMAGE" "${OTHER_IMAGES[@]}" >/dev/null ||
    fail "the images are not in $SOURCE: build them first (make test-compose)"

  log "stack files: docker stack config (the CLI's own loader), CPU and GPU"
  stack_env
  docker stack config -c deploy/swarm/vlm-serve.yml >/dev/null || fail "docker stack config deploy/swarm/vlm-serve.yml"
  docker stack config -c deploy/swarm/vlm-serve.yml -c deploy/swarm/gpu.yml >/dev/null ||
    fail "docker stack config with deploy/swarm/gpu.yml"

  for node in "${NODES[@]}"; do stop_dockerd "$node"; done  # of an earlier run
  log "network: a switch namespace and 3 node namespaces ($SUBNET.10-12), this machine at $SUBNET.1"
  network_up
  # the nodes' upstream DNS: knows no name, answers at once (Docker's embedded DNS asks it for
  # every name that is not a service; with no answer each lookup would take 20 s)
  "$PYTHON" scripts/nxdomain_dns.py "$SUBNET.1" >"$WORK/dns.log" 2>&1 &
  DNS_PID=$!

  local start
  start=$(date +%s)
  for node in "${NODES[@]}"; do
    rm -rf "$WORK/node$node/data/swarm"  # a new swarm each run
    start_dockerd "$node"
  done
  for node in "${NODES[@]}"; do
    wait_dockerd "$node"
    on "$node" volume prune -f >/dev/null  # an earlier run's Prometheus data and chat history
  done
  note "3 dockerds $(on 0 version --format '{{.Server.Version}}') up in $(($(date +%s) - start)) s"

  start=$(date +%s)
  local copies=()
  for node in "${NODES[@]}"; do
    copy_images "$node" "$TRITON_IMAGE" &
    copies+=($!)
  done
  for pid in "${copies[@]}"; do wait "$pid" || fail "copying $TRITON_IMAGE to a node"; done
  copy_images 0 "${OTHER_IMAGES[@]}"
  note "images copied to the nodes in $(($(date +%s) - start)) s (Triton's on each, the rest on the manager)"

  start=$(date +%s)
  on 0 swarm init --advertise-addr "$MANAGER_IP" --default-addr-pool 10.201.0.0/16 >/dev/null
  local token
  token=$(on 0 swarm join-token -q worker)
  for node in 1 2; do
    on "$node" swarm join --advertise-addr "$SUBNET.1$node" --token "$token" "$MANAGER_IP:2377" >/dev/null
  done
  [ "$(on 0 node ls -q | wc -l)" = 3 ] || fail "the swarm does not have 3 nodes"
  note "swarm of 3 nodes (1 manager, 2 workers) in $(($(date +%s) - start)) s"

  start=$(date +%s)
  log "make swarm-up on the manager (TRITON_REPLICAS=2, tiny checkpoints)"
  DOCKER_HOST=unix://$WORK/node0/docker.sock STACK=$STACK ./scripts/swarm.sh up || fail "scripts/swarm.sh up"
  note "make swarm-up: deployed and ready through nginx in $(($(date +%s) - start)) s"
  "$PYTHON" scripts/swarm_checks.py --work "$WORK" --url "http://$MANAGER_IP:$NGINX_PORT" \
    --prometheus "http://$MANAGER_IP:$PROMETHEUS_PORT" --up-timeout "$UP_TIMEOUT" | tee "$WORK/checks.log" ||
    fail "swarm checks (above)"
  local reloads
  reloads=$(on 0 logs "$(on 0 ps -q --filter name=vlm_nginx.1 | head -1)" 2>&1 | grep -c "upstream addresses changed" || true)
  [ "$reloads" -gt 0 ] || fail "nginx never reloaded its upstreams from DNS"
  note "nginx reloaded its upstreams $reloads times as tasks came and went"
  while read -r line; do note "${line#RESULT }"; done < <(grep '^RESULT' "$WORK/checks.log")
}

main "$@"
