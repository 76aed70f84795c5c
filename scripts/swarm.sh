#!/usr/bin/env bash
# make swarm-up / make swarm-down: the stack on Docker Swarm (deploy/swarm/vlm-serve.yml).
#   up    makes a one-node swarm when this daemon is in none (join more nodes to it with
#         `docker swarm join-token worker`), builds the images when they are missing (CPU;
#         SWARM_GPU=1: the GPU Triton image and deploy/swarm/gpu.yml), deploys the stack and
#         waits until nginx says ready
#   down  docker stack rm, and waits until its containers are gone
# Environment (defaults): STACK=vlm, NGINX_PORT=80, TRITON_REPLICAS=1, SWARM_GPU=0,
#   VLM_MODELS_DIR=/models/tiny (empty: real weights from the HF cache),
#   VLM_MODELS_HOST_DIR=<this repository>/.models (must exist on every node),
#   SWARM_URL=http://127.0.0.1:$NGINX_PORT (where to wait for readiness), UP_TIMEOUT=900,
#   API_KEYS (sets NGINX_AUTH_REQUEST=/_auth), DOCKER_HOST (another daemon: a manager).
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=${STACK:-vlm}
FILES=(-c deploy/swarm/vlm-serve.yml)
[ "${SWARM_GPU:-0}" = 1 ] && FILES+=(-c deploy/swarm/gpu.yml)

say() { echo "swarm: $*"; }

# What the stack file reads: the tiny checkpoints by default, config names that change with
# the config files' content (a Swarm config cannot change in place), gateway keys.
export NGINX_PORT=${NGINX_PORT:-80} VLM_MODELS_DIR=${VLM_MODELS_DIR-/models/tiny}
export VLM_MODELS_HOST_DIR=${VLM_MODELS_HOST_DIR:-$PWD/.models}
VLM_CONFIG_VERSION=$(cat nginx/templates/vlm.conf.template prometheus/prometheus.yml prometheus/targets/*.json \
  prometheus/rules/*.yml | sha256sum | cut -c1-12)
export VLM_CONFIG_VERSION
[ -z "${API_KEYS:-}" ] || export NGINX_AUTH_REQUEST=${NGINX_AUTH_REQUEST:-/_auth}

up() {
  docker info >/dev/null 2>&1 || { say "no Docker daemon answers (start dockerd, or set DOCKER_HOST)"; exit 1; }
  if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
    say "this daemon is in no swarm: docker swarm init (a one-node swarm)"
    docker swarm init >/dev/null || { say "docker swarm init failed: several addresses? docker swarm init --advertise-addr <address>"; exit 1; }
  fi
  [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] || { say "this node is not a manager"; exit 1; }
  local compose=docker-compose-cpu.yml
  [ "${SWARM_GPU:-0}" = 1 ] && compose=docker-compose.yml
  local missing
  missing=$(docker stack config "${FILES[@]}" | awk '$1 == "image:" {print $2}' | sort -u |
    while read -r image; do docker image inspect "$image" >/dev/null 2>&1 || echo "$image"; done)
  if [ -n "$missing" ]; then
    say "building the missing images: $(echo "$missing" | tr '\n' ' ')"
    docker compose -f "$compose" build
  fi
  [ -d "$VLM_MODELS_HOST_DIR" ] || { say "$VLM_MODELS_HOST_DIR does not exist (make tiny-models, or set VLM_MODELS_HOST_DIR)"; exit 1; }
  say "docker stack deploy $STACK (Triton replicas: ${TRITON_REPLICAS:-1})"
  docker stack deploy --resolve-image never "${FILES[@]}" "$STACK"
  local url=${SWARM_URL:-http://127.0.0.1:$NGINX_PORT} started=$SECONDS deadline=$((SECONDS + ${UP_TIMEOUT:-900}))
  until curl -fsS --max-time 5 "$url/health/ready" >/dev/null 2>&1; do
    if [ "$SECONDS" -gt "$deadline" ]; then
      say "not ready after ${UP_TIMEOUT:-900} s:"
      docker stack services "$STACK"
      exit 1
    fi
    [ $(((SECONDS - started) % 15)) != 0 ] || say "waiting for $url/health/ready ($((SECONDS - started)) s): $(docker stack services "$STACK" --format '{{.Name}} {{.Replicas}}' | tr '\n' ' ')"
    sleep 1
  done
  say "ready in $((SECONDS - started)) s: $url/ (page), $url/v1 (OpenAI), $url/v2 (KServe)"
}

down() {
  docker stack rm "$STACK" >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    [ -z "$(docker ps -q --filter "label=com.docker.stack.namespace=$STACK")" ] && break
    sleep 1
  done
  say "stack $STACK removed"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
