"""Forwarding a request to a ``<model>_stream`` model over Triton's own gRPC port.

The KServe faces (``<model>``) and ``llm_decoupled`` hold no weights: each request they get
is sent on to ``<model>_stream`` as a gRPC stream to this same tritonserver (plain
``tritonclient``), read on one asyncio thread, and answered through the request's own
response sender. No BLS: synchronous BLS from worker threads corrupted the stub's heap now
and then (``malloc(): unaligned fastbin chunk``, triton-inference-server/server#7517) and
iterating an ``async_exec`` result crashed it. A client that leaves is noticed whenever a
response arrives and every ``CANCEL_POLL_S``, and its stream cancelled, which cancels the row
in the scheduler. Each request asks the stream model for heartbeats (``HEARTBEAT``, a request
parameter): a response without text at least every ``MAX_HELD_STEPS`` steps even when the
answer is not streamed, so the check keeps pace with the steps however fast they are.

The gRPC address is read from the command line of the stub's parent, the tritonserver that
runs it (``--grpc-address``, ``--grpc-port``), unless ``VLM_TRITON_GRPC_URL`` says otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import np_to_triton_dtype

from vlm_engine.kserve import HEARTBEAT

URL_ENV = "VLM_TRITON_GRPC_URL"
CANCEL_POLL_S = 0.2
FINAL_OUTPUT = "finish_reason"  # only a request's final response carries it


@dataclass
class Piece:
    """One response of the stream model: text, entities (Kosmos-2, final), or its error
    message (``"<code>: <message>"``, which ``errors.from_message`` turns back into a class)."""

    text: str = ""
    entities: list | None = None
    error: str | None = None
    final: bool = False
    logprobs: list | None = None


class Forwarder:
    """An asyncio loop on a thread of its own, with one gRPC client to tritonserver."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or os.environ.get(URL_ENV) or own_server_url()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="forward", daemon=True)
        self._thread.start()
        self._client: grpc_aio.InferenceServerClient | None = None
        self._ids = itertools.count(1)

    def run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Start ``coroutine`` on the loop; it must handle its own errors."""
        asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def pieces(
        self,
        model: str,
        arrays: dict[str, np.ndarray],
        outputs: list[str],
        cancelled: Callable[[], bool],
    ) -> AsyncIterator[Piece]:
        """The responses to one request, until its final one; cancelled when ``cancelled()``."""
        if self._client is None:
            self._client = grpc_aio.InferenceServerClient(self.url)
        inputs = []
        for name, array in arrays.items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        answered = asyncio.Event()

        async def requests():
            yield {
                "model_name": model,
                "inputs": inputs,
                "outputs": [InferRequestedOutput(name) for name in {*outputs, FINAL_OUTPUT}],
                "request_id": f"forward-{next(self._ids)}",
                "parameters": {HEARTBEAT: True},
            }
            await answered.wait()  # the request side stays open until the answer is in

        stream = self._client.stream_infer(requests())
        watcher = asyncio.ensure_future(self._watch(stream, cancelled, answered))
        loop = asyncio.get_running_loop()
        try:
            async for result, error in stream:
                if error is not None:
                    yield Piece(error=error.message(), final=True)
                    return
                piece = read_piece(result)
                if piece.final:
                    yield piece
                    return
                if await loop.run_in_executor(None, cancelled):
                    stream.cancel()  # tritonserver cancels the request: the scheduler frees its row
                    raise asyncio.CancelledError
                if piece.text or piece.logprobs is not None:  # not a bare heartbeat
                    yield piece
        finally:
            answered.set()
            watcher.cancel()

    async def _watch(self, stream, cancelled: Callable[[], bool], answered: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not answered.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            if not answered.is_set() and await loop.run_in_executor(None, cancelled):
                stream.cancel()  # tritonserver cancels the request: the scheduler frees its row
                return

    def close(self) -> None:
        async def shutdown() -> None:
            if self._client is not None:
                await self._client.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


def read_piece(result) -> Piece:
    piece = Piece(final=result.as_numpy(FINAL_OUTPUT) is not None)
    text = result.as_numpy("generated_text")
    if text is not None:
        piece.text = text.reshape(-1)[0].decode("utf-8")
    for name in ("entities", "logprobs"):
        value = result.as_numpy(name)
        if value is not None:
            setattr(piece, name, json.loads(value.reshape(-1)[0]))
    return piece


def own_server_url(parent: int | None = None) -> str:
    """The gRPC address of the tritonserver whose stub this process is (its parent)."""
    address, port = "127.0.0.1", "8001"
    try:
        args = Path(f"/proc/{parent or os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        args = []
    for arg in args:
        if arg.startswith("--grpc-port="):
            port = arg.split("=", 1)[1]
        elif arg.startswith("--grpc-address="):
            address = arg.split("=", 1)[1]
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::", "[::]") else address
    return f"{host}:{port}"
