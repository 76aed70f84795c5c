#!/usr/bin/env bash
# Print how to run the stack here: "gpu" (docker-compose.yml), "cpu" (docker-compose-cpu.yml)
# or "local" (processes, no Docker). VLM_STACK_MODE=gpu|cpu|local overrides the detection.
set -uo pipefail
if [ -n "${VLM_STACK_MODE:-}" ]; then
  case "$VLM_STACK_MODE" in gpu|cpu|local) echo "$VLM_STACK_MODE"; exit 0 ;; esac
  echo "VLM_STACK_MODE must be gpu, cpu or local, got '$VLM_STACK_MODE'" >&2; exit 2
fi
if [ "${INFERENCE_BACKEND:-}" = "local" ]; then
  echo local; exit 0  # no tritonserver: the service answers KServe v2 itself (local processes only)
fi
docker_ok() {
  command -v docker >/dev/null 2>&1 || return 1
  timeout 20 docker info >/dev/null 2>&1 || return 1
  timeout 20 docker compose version >/dev/null 2>&1
}
gpu_ok() {
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  timeout 20 nvidia-smi -L >/dev/null 2>&1 || return 1
  # Docker must be able to hand the GPU to containers (NVIDIA container toolkit).
  timeout 20 docker info 2>/dev/null | grep -qi nvidia && return 0
  command -v nvidia-ctk >/dev/null 2>&1 || command -v nvidia-container-runtime >/dev/null 2>&1
}
if ! docker_ok; then echo local
elif gpu_ok; then echo gpu
else echo cpu
fi
