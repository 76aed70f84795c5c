"""Local backend (the direct path): the shared engine in this process. Its scheduler batches
concurrent requests in flight, exactly as in Triton; events cross to the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

from dotenv import dotenv_values

from fastapi_app.backends.base import Delta, Final, GenerationRequest
from fastapi_app.metrics import SchedulerMetrics
from fastapi_app.settings import Settings
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import UnknownModel
from vlm_engine.scheduler import Event
from vlm_engine.settings import env_prefix, resolve_settings


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engines: dict[str, VLMEngine] = {}

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
            self.engines[model] = await asyncio.to_thread(VLMEngine, settings, True, SchedulerMetrics(model))

    async def close(self) -> None:
        engines, self.engines = list(self.engines.values()), {}
        for engine in engines:
            await asyncio.to_thread(engine.close)

    async def ready(self) -> dict[str, bool]:
        return {model: model in self.engines for model in self.settings.models}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Final]:
        engine = self.engines.get(request.model)
        if engine is None:
            raise UnknownModel(f"model {request.model!r} is not loaded here; loaded: {', '.join(self.engines)}")
        gone = threading.Event()
        prepared = await asyncio.to_thread(
            engine.prepare,
            request.messages,
            request.max_tokens,
            request.temperature,
            request.top_p,
            gone.is_set,
            sampling=request.sampling,
            **(request.tools or {}),
            n=request.n,
            raw=request.raw,
            count_only=request.count_only,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        engine.submit(prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        finals = 0
        try:
            while True:
                event = await events.get()
                if event.error is not None:
                    raise event.error
                if event.text:
                    yield Delta(event.text, event.logprobs, event.index)
                if event.result is not None:
                    r = event.result
                    yield Final(
                        r.text,
                        r.prompt_tokens,
                        r.output_tokens,
                        r.finish_reason,
                        r.entities,
                        r.logprobs,
                        event.index,
                        r.stop_sequence,
                    )
                    finals += 1
                    if finals == request.n:
                        return
        finally:
            gone.set()  # a client that went away cancels its row; its neighbours go on
