"""Where a model instance runs: the device Triton assigns to it."""

from __future__ import annotations


def instance_device(args: dict) -> dict[str, str]:
    """Settings for one instance: a KIND_GPU instance runs on the GPU Triton gave it (Triton
    makes one per GPU), as ``device=cuda:<id>``; other kinds keep the ``device`` setting
    (``auto``: the first GPU, or the CPU)."""
    if args.get("model_instance_kind") == "GPU":
        return {"device": f"cuda:{int(args['model_instance_device_id'])}"}
    return {}
