#!/usr/bin/env bash
# Bring the whole stack up, the way this machine allows: Docker Compose with the GPU file on
# an NVIDIA host, the CPU file without a GPU, local processes without Docker.
#   ./triton_start.sh [up|down|status|logs]      (default: up)
# Environment: NGINX_PORT (80), VLM_MODELS_DIR (empty: real weights), VLM_STACK_MODE (force),
# VLM_SYSTEM_PACKAGES=skip (local mode: start without the system packages that are missing).
set -euo pipefail
cd "$(dirname "$0")"
command=${1:-up}
mode=$(./scripts/detect.sh)
PYTHON=${PYTHON:-python3}
compose_file=docker-compose-cpu.yml
[ "$mode" = gpu ] && compose_file=docker-compose.yml
echo "[stack] mode: $mode$([ "$mode" != local ] && echo " ($compose_file)")"
if [ "$mode" = local ]; then
  # nginx, prometheus and the exporter: installed now as root with apt, or the command to run
  # (VLM_SYSTEM_PACKAGES=skip starts without whatever is missing).
  if [ "$command" = up ] && [ "${VLM_SYSTEM_PACKAGES:-}" != skip ]; then
    ./scripts/system_packages.sh || exit $?
  fi
  exec "$PYTHON" -m vlm_stack "$command"
fi
# Compose mounts ./.models at /models: a checkpoint folder under it is passed by its container
# path; `make up` (nothing set) means real weights from the HF cache volume.
case "${VLM_MODELS_DIR-}" in
  "$PWD"/.models/*) export VLM_MODELS_DIR="/models/${VLM_MODELS_DIR#"$PWD"/.models/}" ;;
  .models/*) export VLM_MODELS_DIR="/models/${VLM_MODELS_DIR#.models/}" ;;
  "") export VLM_MODELS_DIR="" ;;
  /models/*) ;;
  *) echo "VLM_MODELS_DIR must be under ./.models for Compose (it is mounted at /models)" >&2; exit 2 ;;
esac
# Grafana comes from its public image; COMPOSE_PROFILES= (empty) leaves it out offline.
export COMPOSE_PROFILES=${COMPOSE_PROFILES-grafana}
case "$command" in
  up) docker compose -f "$compose_file" up -d --build --wait
      echo "vlm-serve is up: http://localhost$([ "${NGINX_PORT:-80}" != 80 ] && echo ":${NGINX_PORT}")/" ;;
  down) docker compose -f "$compose_file" down ;;
  status) docker compose -f "$compose_file" ps ;;
  logs) docker compose -f "$compose_file" logs --tail=100 ;;
  *) echo "usage: $0 [up|down|status|logs]" >&2; exit 2 ;;
esac
