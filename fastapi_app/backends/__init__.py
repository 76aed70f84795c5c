"""Where generation happens: Triton (default) or the shared engine in-process."""

from __future__ import annotations

from fastapi_app.backends.base import Backend
from fastapi_app.settings import Settings


def make_backend(settings: Settings) -> Backend:
    if settings.inference_backend == "local":
        from fastapi_app.backends.local import LocalBackend

        return LocalBackend(settings)
    from fastapi_app.backends.triton import TritonBackend

    return TritonBackend(settings)
