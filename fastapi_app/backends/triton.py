"""Triton backend: async gRPC streaming to ``<model>_stream`` with one shared client."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from fastapi_app.backends.base import Delta, Final, GenerationRequest
from fastapi_app.settings import Settings
from vlm_engine.chat import to_openai
from vlm_engine.errors import BackendUnavailable, EngineError, Overloaded, from_message

logger = logging.getLogger(__name__)

# tritonclient's message sizes (its defaults are dropped when any option is given), round-robin
# over the replicas, and a ping every 10 s: a replica whose host is cut off is dropped within
# 15 s instead of holding streams until their timeout (vlm_triton.launch lets Triton accept it).
# Triton closes each connection after 5 s (vlm_triton.launch); the name is then looked up again
# (at most once a second), so replicas that leave or join are seen within seconds.
CHANNEL_ARGS = [
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.lb_policy_name", "round_robin"),
]
RETRY_PAUSE_S = 0.2  # doubled at each retry, times 0.5 to 1 at random (concurrent retries do not march in step)


class TritonBackend:
    name = "triton"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.triton_grpc_url
        self.client: grpcclient.InferenceServerClient | None = None
        self._direct: dict[str, grpcclient.InferenceServerClient] = {}  # retries: one client per replica

    async def start(self) -> None:
        # Several replicas ("ipv4:a:8001,b:8001", or a name that resolves to each, "dns:///triton:8001"):
        # each stream goes to the next ready one (round-robin); one address works the same.
        self.client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        for client in self._direct.values():
            await client.close()
        self._direct.clear()

    async def ready(self) -> dict[str, bool]:
        """Triton's model readiness, corrected by its watchdog's (``TRITON_HEALTH_URL``): Triton
        keeps calling a model ready after its stub process died."""
        states = {}
        healing = await self._not_ready_per_watchdog()
        for model in self.settings.models:
            if model in healing or f"{model}_stream" in healing:
                states[model] = False
                continue
            try:
                states[model] = bool(
                    await self.client.is_model_ready(model, client_timeout=2)
                    and await self.client.is_model_ready(f"{model}_stream", client_timeout=2)
                )
            except (InferenceServerException, grpc.RpcError):
                states[model] = False
        return states

    async def _not_ready_per_watchdog(self) -> set[str]:
        """Models no replica serves, per the replicas' watchdogs (``TRITON_HEALTH_URL``, comma-separated)."""
        urls = [u.strip() for u in (self.settings.triton_health_url or "").split(",") if u.strip()]
        if not urls:
            return set()
        urls = [address for url in urls for address in await _each_address(url)]
        async with httpx.AsyncClient(timeout=2) as client:
            healing = [await self._replica_not_ready(client, url) for url in urls]
        return set.intersection(*healing)

    async def _replica_not_ready(self, client: httpx.AsyncClient, url: str) -> set[str]:
        try:
            reply = await client.get(url.rstrip("/") + "/models")
            return set(reply.json()["not_ready"]) if reply.status_code == 200 else self._all()
        except (httpx.HTTPError, ValueError, KeyError):
            return self._all()  # no watchdog answer: that replica is down or restarting

    def _all(self) -> set[str]:
        return set(self.settings.models) | {f"{m}_stream" for m in self.settings.models}

    @staticmethod
    def _inputs(request: GenerationRequest) -> list[grpcclient.InferInput]:
        tensors = []

        def add(name: str, array: np.ndarray, dtype: str) -> None:
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)

        messages = json.dumps(to_openai(request.messages)).encode()
        add("messages", np.array([[messages]], dtype=np.object_), "BYTES")
        if request.max_tokens is not None:
            add("max_tokens", np.array([[request.max_tokens]], dtype=np.int32), "INT32")
        if not request.stream:
            add("stream", np.array([[False]], dtype=np.bool_), "BOOL")
        for name in ("temperature", "top_p"):
            value = getattr(request, name)
            if value is not None:
                add(name, np.array([[_fp32(value)]], dtype=np.float32), "FP32")
        sampling = {**(request.sampling or {}), **(request.tools or {})}  # the stream model splits them again
        if request.n != 1:
            sampling["n"] = request.n
        if request.raw:
            sampling["raw_prompt"] = True
        if request.count_only:
            sampling["count_only"] = True
        if sampling:
            add("sampling_parameters", np.array([[json.dumps(sampling).encode()]], dtype=np.object_), "BYTES")
        return tensors

    def _error(self, exc: Exception) -> EngineError:
        if isinstance(exc, InferenceServerException):
            message = exc.message() or str(exc)
            error = from_message(message)
            if type(error) is not EngineError:
                return error
            lowered = message.lower()
            if "exceeds maximum queue size" in lowered:
                return Overloaded(f"{message}; retry later")
            if "unavailable" in lowered or "connect" in lowered or "not ready" in lowered or "unknown model" in lowered:
                return BackendUnavailable(f"Triton at {self.url} is unavailable: {message}")
            return error
        return BackendUnavailable(f"Triton at {self.url} is unavailable: {exc}")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Final]:
        """Tokens, then the final answer. A replica that fails before the first token (stopping,
        restarting, its host gone) is not the caller's problem: the stream starts again on the
        next replica, up to ``TRITON_RETRIES`` times with growing pauses (about 3 s in all).
        The first try goes through the round-robin channel; retries go to each replica's address
        in turn, so that two retries reach two different replicas. Overload and bad input are
        not retried."""
        first = random.randrange(1 << 16)  # where this request's retries start in the replica list
        for attempt in range(self.settings.triton_retries + 1):
            client = self.client if attempt == 0 else await self._replica_client(first + attempt)
            started = False
            try:
                async for item in self._stream_once(client, request):
                    started = True
                    yield item
                return
            except BackendUnavailable as exc:
                if started or attempt == self.settings.triton_retries:
                    raise
                logger.warning("Triton stream failed before its first token (%s); trying again", exc)
                await asyncio.sleep(RETRY_PAUSE_S * 2**attempt * random.uniform(0.5, 1.0))

    async def _replica_client(self, turn: int) -> grpcclient.InferenceServerClient:
        """A client for one replica: the ``turn``-th address ``TRITON_GRPC_URL`` has now."""
        addresses = await _grpc_addresses(self.url)
        for gone in set(self._direct) - set(addresses):  # replicas that left (rescheduled, scaled down)
            await self._direct.pop(gone).close()
        address = addresses[turn % len(addresses)]
        if address not in self._direct:
            self._direct[address] = grpcclient.InferenceServerClient(address, channel_args=CHANNEL_ARGS)
        return self._direct[address]

    async def _stream_once(
        self, client: grpcclient.InferenceServerClient, request: GenerationRequest
    ) -> AsyncIterator[str | Final]:
        request_id = uuid.uuid4().hex

        async def requests():
            yield {
                "model_name": f"{request.model}_stream",
                "inputs": self._inputs(request),
                "request_id": request_id,
                "enable_empty_final_response": True,
            }

        text: dict[int, list[str]] = {i: [] for i in range(request.n)}  # per answer
        logprobs: dict[int, list[dict] | None] = dict.fromkeys(range(request.n))
        finals = 0
        try:
            responses = client.stream_infer(requests(), stream_timeout=self.settings.triton_timeout_s)
            async for result, error in responses:
                if error is not None:
                    raise self._error(error)
                response = result.get_response()
                names = {o.name for o in response.outputs}
                index = int(result.as_numpy("index").reshape(-1)[0]) if "index" in names else 0
                mine = json.loads(result.as_numpy("logprobs").reshape(-1)[0]) if "logprobs" in names else None
                if mine is not None:
                    logprobs[index] = (logprobs[index] or []) + mine
                if "generated_text" in names:
                    chunk = result.as_numpy("generated_text").reshape(-1)[0].decode("utf-8")
                    if chunk:
                        text[index].append(chunk)
                        yield Delta(chunk, mine, index)
                if "output_tokens" in names:
                    entities = None
                    if "entities" in names:
                        entities = json.loads(result.as_numpy("entities").reshape(-1)[0])
                    stop = None
                    if "stop_sequence" in names:
                        stop = result.as_numpy("stop_sequence").reshape(-1)[0].decode("utf-8")
                    yield Final(
                        "".join(text[index]),
                        int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                        int(result.as_numpy("output_tokens").reshape(-1)[0]),
                        result.as_numpy("finish_reason").reshape(-1)[0].decode(),
                        entities,
                        logprobs[index],
                        index,
                        stop,
                    )
                    finals += 1
                    if finals == request.n:
                        return
                if response.parameters["triton_final_response"].bool_param:
                    break
        except (InferenceServerException, grpc.RpcError, OSError) as exc:
            raise self._error(exc) from None
        raise BackendUnavailable(f"Triton at {self.url} ended the stream without a final answer")


def _fp32(value: float) -> np.float32:
    """Triton's FP32: a positive value too small for it stays positive (top_p 5e-324 is not 0)."""
    single = np.float32(value)
    return np.float32(np.finfo(np.float32).smallest_subnormal) if value > 0 and single == 0 else single


async def _grpc_addresses(target: str) -> list[str]:
    """``TRITON_GRPC_URL`` as one ``host:port`` per replica: ``ipv4:a:8001,b:8001`` as listed,
    ``dns:///triton:8001`` (or ``triton:8001``) with every address the name has now."""
    if target.startswith("ipv4:"):
        return [a.strip() for a in target[len("ipv4:") :].split(",") if a.strip()]
    host_port = target.removeprefix("dns:///").removeprefix("dns:")
    host, _, port = host_port.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return [host_port]  # unknown now: asked as it is, and fails as unavailable
    return sorted({f"{info[4][0]}:{port}" for info in infos if info[0] == socket.AF_INET}) or [host_port]


async def _each_address(url: str) -> list[str]:
    """``http://triton:8003`` -> one URL per address the name has (Compose replicas share a name)."""
    parts = urlsplit(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
    except OSError:
        return [url]  # unknown now (restarting): asked as it is, and found not ready
    hosts = sorted({info[4][0] for info in infos})
    return [f"{parts.scheme}://{f'[{h}]' if ':' in h else h}:{parts.port}" for h in hosts] or [url]
