"""``configs/gpu.pbtxt`` of each stream model: its ``config.pbtxt`` with one instance on every
GPU (``KIND_GPU``) instead of one instance that places itself (``KIND_MODEL``).

One tritonserver then uses all the GPUs it sees: Triton starts an instance per GPU and
tells each its device, which the engine honours (``vlm_triton.placement``). Triton reads
these files when started with ``--model-config-name=gpu`` (``TRITON_MODEL_CONFIG=gpu``);
a model without one (the KServe facades) keeps its ``config.pbtxt``.

The files are written from the ``config.pbtxt`` files, never by hand:
``python -m vlm_triton.gpu_configs`` (``--check``: fail when one is out of date; make test
checks it too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_triton.launch import ROOT

REPOSITORY = ROOT / "triton_models"
ONE_INSTANCE = "instance_group [ { kind: KIND_MODEL, count: 1 } ]"
EVERY_GPU = "instance_group [ { kind: KIND_GPU, count: 1 } ]"
HEADER = "# Written by python -m vlm_triton.gpu_configs from ../config.pbtxt: one instance per GPU.\n"


def stream_models(repository: Path = REPOSITORY) -> list[Path]:
    return sorted(p.parent for p in repository.glob("*_stream/config.pbtxt"))


def gpu_config(model_dir: Path) -> str:
    text = (model_dir / "config.pbtxt").read_text()
    if text.count(ONE_INSTANCE) != 1:
        raise ValueError(f"{model_dir}/config.pbtxt: expected one line '{ONE_INSTANCE}'")
    lines = [line for line in text.replace(ONE_INSTANCE, EVERY_GPU).splitlines(keepends=True)]
    lines = [line for line in lines if not line.startswith("# KIND_MODEL:")]
    return HEADER + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a file is missing or out of date")
    args = parser.parse_args(argv)
    stale = []
    for model_dir in stream_models():
        path = model_dir / "configs" / "gpu.pbtxt"
        wanted = gpu_config(model_dir)
        if path.exists() and path.read_text() == wanted:
            continue
        if args.check:
            stale.append(str(path))
            continue
        path.parent.mkdir(exist_ok=True)
        path.write_text(wanted)
        print(f"wrote {path}")
    if stale:
        print(f"out of date (python -m vlm_triton.gpu_configs): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
