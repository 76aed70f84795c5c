"""Local backend (the direct path): the shared engine in this process, one request at a time
per model, generation in a worker thread so the event loop keeps serving."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

from dotenv import dotenv_values

from fastapi_app.backends.base import Final, GenerationRequest
from fastapi_app.settings import Settings
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import UnknownModel
from vlm_engine.settings import env_prefix, resolve_settings

_END = object()


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engines: dict[str, VLMEngine] = {}
        self.locks: dict[str, threading.Lock] = {}

    def _env(self, model: str) -> dict[str, str]:
        """Model settings come from the environment, and from .env like the service's own."""
        env = {k: v for k, v in dotenv_values(".env").items() if v} | dict(os.environ)
        key = f"{env_prefix(model)}_MODEL_PATH"
        if self.settings.model_path and len(self.settings.local_model_list) == 1 and not env.get(key):
            env[key] = self.settings.model_path  # the seed's MODEL_PATH
        return env

    async def start(self) -> None:
        for model in self.settings.local_model_list:
            settings = resolve_settings(model, env=self._env(model))
            self.engines[model] = await asyncio.to_thread(VLMEngine, settings)
            self.locks[model] = threading.Lock()

    async def close(self) -> None:
        self.engines.clear()

    async def ready(self) -> dict[str, bool]:
        return {model: model in self.engines for model in self.settings.models}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Final]:
        engine = self.engines.get(request.model)
        if engine is None:
            raise UnknownModel(f"model {request.model!r} is not loaded here; loaded: {', '.join(self.engines)}")
        stop = threading.Event()
        prepared = await asyncio.to_thread(
            engine.prepare, request.messages, request.max_tokens, request.temperature, request.top_p, stop.is_set
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                with self.locks[request.model]:
                    for chunk in engine.stream([prepared]):
                        loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, _END)

        worker = threading.Thread(target=work, name=f"local-{request.model}", daemon=True)
        worker.start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if item.text:
                    yield item.text
                if item.result is not None:
                    r = item.result
                    yield Final(r.text, r.prompt_tokens, r.output_tokens, r.finish_reason, r.entities)
        finally:
            stop.set()  # a client that went away cancels the generation
