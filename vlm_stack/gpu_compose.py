"""One Triton per GPU with Docker Compose: an override of docker-compose.yml that gives the
``triton`` service one GPU (``device_ids``) and adds one service per further GPU, each
answering to the name ``triton`` too (a network alias), so nginx, the service and Prometheus
find every one of them as they find Compose replicas.

Compose's ``deploy.replicas`` cannot do it: each replica would get the same GPUs.
``triton_start.sh`` writes the override when the GPU file is used with more than one GPU
(``TRITON_REPLICAS``, default: every GPU; ``TRITON_GPUS=0,2`` picks them):

    python -m vlm_stack.gpu_compose 0,1,2,3 > .cache/compose-gpus.yml
    docker compose -f docker-compose.yml -f .cache/compose-gpus.yml up -d --wait
"""

from __future__ import annotations

import argparse
import sys

import yaml

BASE = "docker-compose.yml"


class _Override(dict):
    """A mapping written with Compose's ``!override`` tag (replace, do not merge)."""


def _override(dumper: yaml.Dumper, data: _Override) -> yaml.Node:
    return dumper.represent_mapping("!override", dict(data))


yaml.add_representer(_Override, _override)


def gpu_reservation(gpu: str) -> dict:
    device = {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}
    return {"resources": _Override(reservations={"devices": [device]})}


VLLM_OVERRIDE = "docker-compose.vllm.yml"  # ENGINE=vllm: what the further Tritons take from it too


def vllm_parts(path: str = VLLM_OVERRIDE) -> dict:
    """``triton``'s image, build arguments and environment in the ENGINE=vllm override (the same
    image name must come from the same build)."""
    with open(path) as file:
        triton = yaml.safe_load(file)["services"]["triton"]
    return {key: triton[key] for key in ("image", "build", "environment")}


def override(gpus: list[str], base: str = BASE, vllm: dict | None = None) -> dict:
    """The override for these GPU ids: ``triton`` on the first, ``triton-gpu<id>`` on each other
    (with ``vllm``'s image and environment: ``vllm_parts``, as the first has them)."""
    if not gpus or len(set(gpus)) != len(gpus) or not all(g.isdigit() for g in gpus):
        raise ValueError(f"GPU ids must be distinct numbers, got {gpus}")

    def alias() -> dict:
        return {"networks": {"default": {"aliases": ["triton"]}}}

    services = {"triton": {"deploy": gpu_reservation(gpus[0]), **alias()}}
    for gpu in gpus[1:]:
        services[f"triton-gpu{gpu}"] = {
            "extends": {"file": base, "service": "triton"},
            "deploy": gpu_reservation(gpu),
            **(vllm or {}),
            **alias(),
        }
    return {"services": services}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpus", help="comma-separated GPU ids, e.g. 0,1")
    parser.add_argument("--base", default=BASE, help="the Compose file to extend (relative to the project folder)")
    parser.add_argument("--vllm", action="store_true", help=f"ENGINE=vllm: every Triton as {VLLM_OVERRIDE} makes it")
    args = parser.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    try:
        text = yaml.dump(override(gpus, args.base, vllm_parts() if args.vllm else None), sort_keys=False)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(f"# written by python -m vlm_stack.gpu_compose {','.join(gpus)}: one Triton per GPU\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
