"""Architecture adapters, by ``ModelSettings.architecture``."""

from __future__ import annotations

from vlm_engine.adapters.base import Adapter


def adapter_class(architecture: str) -> type[Adapter]:
    """Import only the adapter that is asked for."""
    if architecture == "llava":
        from vlm_engine.adapters.llava import LlavaAdapter

        return LlavaAdapter
    if architecture == "kosmos2":
        from vlm_engine.adapters.kosmos2 import Kosmos2Adapter

        return Kosmos2Adapter
    if architecture == "qwen3_vl":
        from vlm_engine.adapters.qwen3_vl import Qwen3VLAdapter

        return Qwen3VLAdapter
    if architecture == "moondream2":
        from vlm_engine.adapters.moondream2 import Moondream2Adapter

        return Moondream2Adapter
    raise ValueError(f"unknown architecture {architecture!r}")
