#!/usr/bin/env bash
# make gpu-check: the engine on this machine's GPU with real-sized random-weight Qwen3-VL-8B and
# LLaVA-1.5-7B (benchmarks/gpu_check.py; its figures go to benchmarks/results/gpu_check.json).
# Without CUDA it runs the same code on shrunken configs in seconds (the path CI runs).
#
# A GPU machine with no network (a lent H200 has torch, but not these pins):
#   ./scripts/gpu_check.sh --fetch-wheels   # here: the engine's pinned packages for Python 3.12 into .whl/
#   then there, with .whl and .models/tiny carried:  ./scripts/gpu_check.sh [gpu_check options]
# Carried wheels are installed into /tmp/vlm-gpu-check-site and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PINS=(transformers==5.23.0 tokenizers==0.23.3 huggingface-hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2
  httpcore2==2.16.2 truststore==0.10.5 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
  typing-inspection==0.4.2)

if [ "${1:-}" = --fetch-wheels ]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  platforms=()
  for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
    manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${PINS[@]}"
  echo "wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl and .models/tiny"
  exit 0
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/vlm-gpu-check-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f .models/tiny/qwen3-vl/config.json ] || { echo "no tiny checkpoints in .models/tiny: run make tiny-models" >&2; exit 2; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_check "$@"
