#!/usr/bin/env bash
# Bring the whole stack up, the way this machine allows: Docker Compose with the GPU file on
# an NVIDIA host, the CPU file without a GPU, local processes without Docker.
#   ./triton_start.sh [up|down|status|logs [-f|--follow]]      (default: up)
# Environment: NGINX_PORT (80), VLM_MODELS_DIR (empty: real weights), VLM_STACK_MODE (force),
# TRITON_REPLICAS (Triton servers; GPU hosts: one per GPU by default), TRITON_GPUS (0,1,...),
# VLM_SYSTEM_PACKAGES=skip (local mode: start without the system packages that are missing).
set -euo pipefail
cd "$(dirname "$0")"
command=${1:-up}
follow=()  # logs -f: follow every log (Compose: docker compose logs -f; local: python -m vlm_stack logs --follow)
if [ "$command" = logs ]; then
  for arg in "${@:2}"; do
    case "$arg" in
      -f|--follow) follow=(--follow) ;;
      *) echo "usage: $0 logs [-f|--follow]" >&2; exit 2 ;;
    esac
  done
fi
mode=$(./scripts/detect.sh)
PYTHON=${PYTHON:-python3}
compose_file=docker-compose-cpu.yml
[ "$mode" = gpu ] && compose_file=docker-compose.yml
echo "[stack] mode: $mode$([ "$mode" != local ] && echo " ($compose_file)")"
case "$(echo "${DYNAMO:-0}" | tr '[:upper:]' '[:lower:]')" in 1|true|yes) dynamo=1 ;; *) dynamo=0 ;; esac
if [ "$dynamo" = 1 ] && [ "$mode" != local ] && [ "$command" = up ]; then
  echo "DYNAMO=1 runs with local processes: add VLM_STACK_MODE=local (or use make dynamo-up)" >&2; exit 2
fi
if [ "$mode" = local ]; then
  # nginx, prometheus and the exporter: installed now as root with apt, or the command to run
  # (VLM_SYSTEM_PACKAGES=skip starts without whatever is missing).
  if [ "$command" = up ] && [ "${VLM_SYSTEM_PACKAGES:-}" != skip ]; then
    ./scripts/system_packages.sh || exit $?
  fi
  exec "$PYTHON" -m vlm_stack "$command" ${follow[@]+"${follow[@]}"}
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
compose=(docker compose -f "$compose_file")
# ENGINE=vllm (LLaVA and Qwen3-VL on vLLM's engine, docs/ENGINES.md): the GPU image with vLLM's
# environment (docker-compose.vllm.yml); on CPU hosts it runs with local processes.
vllm=0
for engine in "${ENGINE:-}" "${LLAVA_ENGINE:-}" "${QWEN3_VL_ENGINE:-}"; do
  [ "$(echo "$engine" | tr '[:upper:]' '[:lower:]')" = vllm ] && vllm=1
done
if [ "$vllm" = 1 ] && [ "$mode" = cpu ] && [ "$command" = up ]; then
  echo "ENGINE=vllm on a CPU host runs with local processes: add VLM_STACK_MODE=local (after make vllm-env)" >&2; exit 2
fi
[ "$vllm" = 1 ] && [ "$mode" = gpu ] && compose+=(-f docker-compose.vllm.yml)
# GPU hosts: one Triton per GPU (TRITON_GPUS=0,2 picks them; TRITON_REPLICAS=N the first N),
# each with its own device_ids, all under the name "triton" (vlm_stack/gpu_compose.py).
gpu_override=.cache/compose-gpus.yml
if [ "$mode" = gpu ] && [ "$command" = up ]; then
  gpus=${TRITON_GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | head -n "${TRITON_REPLICAS:-64}" | paste -sd, -)}
  rm -f "$gpu_override"
  if [ "$(echo "$gpus" | tr ',' '\n' | grep -c .)" -gt 1 ]; then
    mkdir -p .cache
    "$PYTHON" -m vlm_stack.gpu_compose "$gpus" $([ "$vllm" = 1 ] && echo --vllm) >"$gpu_override"
    echo "[stack] one Triton per GPU: $gpus ($gpu_override)"
  fi
fi
[ "$mode" = gpu ] && [ -f "$gpu_override" ] && compose+=(-f "$gpu_override")
case "$command" in
  up) "${compose[@]}" up -d --build --wait
      echo "vlm-serve is up: http://localhost$([ "${NGINX_PORT:-80}" != 80 ] && echo ":${NGINX_PORT}")/" ;;
  down) "${compose[@]}" down --remove-orphans ;;
  status) "${compose[@]}" ps ;;
  logs) "${compose[@]}" logs --tail=100 ${follow[@]+-f} ;;
  *) echo "usage: $0 [up|down|status|logs [-f]]" >&2; exit 2 ;;
esac
