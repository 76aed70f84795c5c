"""``python -m vlm_dynamo.worker``: one running tritonserver's models as NVIDIA Dynamo workers.

The worker asks Triton (KServe gRPC) for its ready models and registers each with Dynamo
as a tensor model (``ModelType.TensorBased``) under its Triton name, with Triton's own
``ModelConfig``, so the Dynamo frontend's KServe gRPC server answers metadata and config
as Triton does. Each request the frontend routes here is forwarded to Triton over gRPC:
``infer`` for a plain model, one gRPC stream for a decoupled one (its responses go back one
by one). Triton stays the stubs' parent and its watchdog (``vlm_triton.serve``) still heals
them; the worker only adds one loopback hop.

A client that leaves cancels its forwarded request (Triton's models see ``is_cancelled``).
Triton's answers to bad input (400 / INVALID_ARGUMENT with a message) reach the client
with that message, marked as the request's fault (Dynamo 1.6.1 still gives every worker
error on unary ``ModelInfer`` the gRPC code INTERNAL; a worker cannot change that).
If Triton stops answering, the worker exits, so discovery drops it and the frontend routes
to the other workers until the supervisor has started it again (it waits for Triton before
registering).

Settings (flags or env): ``--triton`` (``DYNAMO_TRITON_URL``), ``--namespace``
(``DYN_NAMESPACE``, default ``vlm``), ``--discovery-backend`` (``DYN_DISCOVERY_BACKEND``:
``file`` on one host with ``DYN_FILE_KV``, ``etcd`` across hosts with ``ETCD_ENDPOINTS``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from tritonclient.grpc import aio as grpcaio
from tritonclient.utils import InferenceServerException

from vlm_dynamo.tensors import TensorError, from_dynamo_parameters, response, to_infer_inputs
from vlm_engine.errors import error_classes

log = logging.getLogger("vlm_dynamo.worker")
COMPONENT = "triton"  # every worker serves the same endpoints: the frontend balances across them
HEALTH_CHECK_KEY = "_HEALTH_CHECK"  # Dynamo's canary marker: answer without running the model
EMPTY_FINAL = "triton_enable_empty_final_response"  # tritonclient's request parameter


def endpoint_name(model: str) -> str:
    """A Dynamo endpoint name for a Triton model: ``[a-z0-9_-]`` plus a short hash, so that no
    endpoint name is a prefix of another (discovery looks endpoints up by prefix)."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^a-z0-9_-]', '_', model.lower())}_{digest}"


CLIENT_STATUSES = ("INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "ALREADY_EXISTS")


def is_clients_fault(exc: InferenceServerException) -> bool:
    """Whether Triton refused the request itself: a 4xx gRPC status, or (in a stream, where
    Triton sends no status) a message that starts with one of the engine's 4xx codes."""
    status = str(exc.status() or "")
    if any(code in status for code in CLIENT_STATUSES):
        return True
    code = (exc.message() or "").split(":", 1)[0].strip()
    kind = error_classes().get(code)
    return kind is not None and 400 <= kind.status < 500


def forwarded_error(exc: InferenceServerException) -> Exception:
    """Triton's error as the worker raises it: Triton's own message, marked as the client's
    fault (Dynamo's ``InvalidArgument``) when the client can fix it."""
    message = exc.message() or str(exc)
    if is_clients_fault(exc):
        return invalid_argument(message)
    if "UNAVAILABLE" in str(exc.status() or ""):
        return RuntimeError(f"Triton is unavailable, try again: {message}")
    return RuntimeError(message)


def invalid_argument(message: str) -> Exception:
    """Dynamo's ``InvalidArgument`` (it tells the client the request is at fault)."""
    from dynamo.llm.exceptions import InvalidArgument

    return InvalidArgument(message)


class ModelForwarder:
    """Forwards one model's requests from Dynamo to Triton."""

    def __init__(self, client: grpcaio.InferenceServerClient, name: str, decoupled: bool):
        self.client = client
        self.name = name
        self.decoupled = decoupled

    async def generate(self, request: dict[str, Any], context: Any = None) -> AsyncIterator[dict[str, Any]]:
        """One request from the frontend. ``context``: Dynamo's (it passes one to a handler
        with a parameter of that name), stopped or killed when the client leaves."""
        if request.get(HEALTH_CHECK_KEY) is True:
            yield {"model": self.name, "id": "", "tensors": []}
            return
        request_id = str(request.get("id") or "")
        parameters = from_dynamo_parameters(request.get("parameters"))
        wants_empty_final = bool(parameters.pop(EMPTY_FINAL, False))
        try:
            inputs = to_infer_inputs(request.get("tensors") or [])
        except TensorError as exc:
            raise invalid_argument(str(exc)) from None
        if not self.decoupled:
            infer = asyncio.ensure_future(
                self.client.infer(self.name, inputs, request_id=request_id, parameters=parameters or None)
            )
            if context is not None:  # a client that leaves: the call is cancelled, and Triton's request
                stopped = asyncio.ensure_future(context.async_killed_or_stopped())
                await asyncio.wait({infer, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not infer.done():
                    infer.cancel()
                    return
            try:
                result = await infer
            except InferenceServerException as exc:
                raise forwarded_error(exc) from None
            yield response(self.name, request_id, result)
            return
        async for item in self._stream(inputs, request_id, parameters, wants_empty_final, context):
            yield item

    async def _stream(
        self, inputs: list, request_id: str, parameters: dict[str, Any], wants_empty_final: bool, context: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """One request over its own gRPC stream. Triton always sends the final flag (so the
        worker knows the end); an empty final response reaches the client only if it asked.
        A client that leaves: Dynamo stops the request's context (and stops reading this
        generator, without closing it), so a watcher cancels the gRPC call then, and Triton
        cancels the request (its model sees ``is_cancelled``)."""

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.name,
                "inputs": inputs,
                "request_id": request_id,
                "parameters": parameters or None,
                "enable_empty_final_response": True,
            }

        stream = self.client.stream_infer(one_request())
        watcher = asyncio.ensure_future(_cancel_when_stopped(stream, context)) if context is not None else None
        try:
            async for result, error in stream:
                if error is not None:
                    raise forwarded_error(error)
                answer = result.get_response()
                final = answer.parameters.get("triton_final_response")
                if answer.outputs or wants_empty_final:
                    yield response(self.name, request_id, result)
                if final is not None and final.bool_param:
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            stream.cancel()  # nothing once the call has ended; else Triton cancels the request


async def _cancel_when_stopped(stream: Any, context: Any) -> None:
    """Cancel ``stream`` (the gRPC call to Triton) once Dynamo stops or kills the request."""
    await context.async_killed_or_stopped()
    stream.cancel()


async def wait_for_triton(client: grpcaio.InferenceServerClient, url: str, timeout_s: float) -> list[str]:
    """Wait until Triton is ready and return its ready models' names (progress every 10 s)."""
    started = last = time.monotonic()
    while True:
        try:
            if await client.is_server_ready():
                index = await client.get_model_repository_index()
                ready = sorted({m.name for m in index.models if m.state == "READY"})
                if ready:
                    return ready
        except InferenceServerException:
            pass
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise SystemExit(f"Triton at {url} not ready after {timeout_s:.0f}s")
        if time.monotonic() - last >= 10:
            log.info("waiting for Triton at %s (%.0fs)", url, waited)
            last = time.monotonic()
        await asyncio.sleep(0.5)


async def serve_model(runtime: Any, client: grpcaio.InferenceServerClient, name: str, namespace: str, endpoints: list):
    from dynamo.llm import ModelInput, ModelType, WorkerType, register_model

    config = (await client.get_model_config(name)).config
    endpoint = runtime.endpoint(f"{namespace}.{COMPONENT}.{endpoint_name(name)}")
    endpoints.append(endpoint)
    await register_model(
        ModelInput.Tensor,
        ModelType.TensorBased,
        endpoint,
        name,
        worker_type=WorkerType.Aggregated,
        tensor_model_config={
            "name": "",
            "inputs": [],
            "outputs": [],
            "triton_model_config": config.SerializeToString(),
        },
    )
    forwarder = ModelForwarder(client, name, config.model_transaction_policy.decoupled)
    log.info("serving %s (%s)", name, "decoupled" if forwarder.decoupled else "one response per request")
    await endpoint.serve_endpoint(forwarder.generate, health_check_payload={"model": name, HEALTH_CHECK_KEY: True})


async def watch_triton(client: grpcaio.InferenceServerClient, misses_allowed: int = 3) -> None:
    """Return once Triton has failed ``misses_allowed`` readiness checks in a row."""
    misses = 0
    while misses < misses_allowed:
        await asyncio.sleep(1.0)
        try:
            misses = 0 if await client.is_server_ready() else misses + 1
        except InferenceServerException:
            misses += 1


async def run(args: argparse.Namespace) -> int:
    from dynamo.common.utils.graceful_shutdown import install_signal_handlers
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    client = grpcaio.InferenceServerClient(args.triton)
    models = await wait_for_triton(client, args.triton, args.wait_s)
    runtime = DistributedRuntime(loop, args.discovery_backend, args.request_plane)
    endpoints: list = []
    install_signal_handlers(loop, runtime, endpoints)
    log.info("Triton at %s has %d ready models: %s", args.triton, len(models), ", ".join(models))
    serving = [asyncio.create_task(serve_model(runtime, client, m, args.namespace, endpoints)) for m in models]
    watch = asyncio.create_task(watch_triton(client))
    done, _ = await asyncio.wait([watch, *serving], return_when=asyncio.FIRST_COMPLETED)
    if watch in done:
        log.error("Triton at %s stopped answering; leaving so that discovery drops this worker", args.triton)
        code = 1
    else:
        failed = [t for t in done if t.exception() is not None]
        for task in failed:
            log.error("an endpoint stopped: %s", task.exception())
        code = 1 if failed else 0
    from dynamo.common.utils.graceful_shutdown import graceful_shutdown_with_discovery

    await graceful_shutdown_with_discovery(runtime, endpoints, grace_period_s=0)
    await client.close()
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", default=env.get("DYNAMO_TRITON_URL", "127.0.0.1:8001"), help="Triton gRPC address")
    parser.add_argument("--namespace", default=env.get("DYN_NAMESPACE", "vlm"))
    parser.add_argument(
        "--discovery-backend", default=env.get("DYN_DISCOVERY_BACKEND", "file"), choices=["file", "etcd", "mem"]
    )
    parser.add_argument("--request-plane", default=env.get("DYN_REQUEST_PLANE", "tcp"), choices=["tcp", "nats"])
    parser.add_argument("--wait-s", type=float, default=float(env.get("DYNAMO_WORKER_WAIT_S", "900")))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        sys.exit(asyncio.run(run(args)))
    sys.exit(uvloop.run(run(args)))


if __name__ == "__main__":
    main()
