"""KServe v2 over HTTP without Triton (``INFERENCE_BACKEND=local``): health, metadata, config,
``infer`` (JSON and binary tensors), ``generate`` and ``generate_stream``, for each served
model's face (``<model>``) and stream model (``<model>_stream``), with the inputs, outputs and
errors Triton gives them. The request is read and answered by the same code as Triton's
stream model (``vlm_engine.kserve``), so a greedy request gets the same text from either."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastapi_app.kserve.codec import DTYPES, HEADER, Tensor, decode_request, encode_response, to_json_values
from fastapi_app.kserve.models import KServeModel, served
from vlm_engine import kserve
from vlm_engine.errors import Cancelled, EngineError, InvalidParameter, InvalidRequest, Overloaded
from vlm_engine.scheduler import Event

router = APIRouter(prefix="/v2", tags=["KServe v2 (local backend)"], include_in_schema=False)
VERSION = "2.0.0-vlm-serve"


class KServeError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status


def _error(exc: BaseException) -> KServeError:
    """Engine errors as Triton words them (``<code>: <message>``) with its HTTP statuses."""
    if isinstance(exc, KServeError):
        return exc
    if isinstance(exc, EngineError):
        status = 400 if isinstance(exc, InvalidRequest) else 503 if isinstance(exc, Overloaded) else 500
        if isinstance(exc, Cancelled):
            status = 499
        return KServeError(f"{exc.code}: {exc.message}", status)
    return KServeError(f"{EngineError.code}: {type(exc).__name__}: {exc}", 500)


def _reply(exc: BaseException) -> JSONResponse:
    error = _error(exc)
    return JSONResponse({"error": error.message}, status_code=error.status)


def _models(request: Request) -> dict[str, KServeModel]:
    state = request.app.state
    if not hasattr(state, "kserve_models"):
        state.kserve_models = served(list(state.backend.engines) or state.settings.local_model_list)
    return state.kserve_models


def _model(request: Request, name: str) -> KServeModel:
    model = _models(request).get(name)
    if model is None:
        raise KServeError(f"Request for unknown model: '{name}' is not found", 404)
    return model


def _engine(request: Request, model: KServeModel):
    engine = request.app.state.backend.engines.get(model.base)
    if engine is None:
        raise KServeError(f"Request for unknown model: '{model.name}' has no available versions", 400)
    return engine


# -- health, metadata, config


@router.get("/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    states = await request.app.state.backend.ready()
    return Response(status_code=200 if states and all(states.values()) else 400)


@router.get("")
async def server_metadata() -> dict:
    return {"name": "vlm-serve", "version": VERSION, "extensions": ["binary_tensor_data", "generate"]}


@router.get("/models/{name}")
async def model_metadata(request: Request, name: str):
    try:
        return _model(request, name).metadata()
    except KServeError as exc:
        return _reply(exc)


@router.get("/models/{name}/ready")
async def model_ready(request: Request, name: str) -> Response:
    model = _models(request).get(name)
    return Response(status_code=200 if model and model.base in request.app.state.backend.engines else 400)


@router.get("/models/{name}/config")
async def model_config(request: Request, name: str):
    try:
        return _model(request, name).config
    except KServeError as exc:
        return _reply(exc)


# -- running a request


async def _events(engine, values: dict, streaming: bool) -> AsyncIterator[tuple[Event, int]]:
    """The scheduler's events for one request, and how many answers it has; a caller that
    stops reading cancels its row."""
    gone = threading.Event()
    values = {**values, "streaming": streaming}
    prepared = await asyncio.to_thread(kserve.prepare, engine, values, gone.is_set)
    answers = 1 + len(prepared.siblings)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    engine.submit(prepared, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    finals = 0
    try:
        while finals < answers:
            event = await queue.get()
            if event.error is not None:
                raise event.error
            if event.final:
                finals += 1
                yield event, answers
            elif streaming and event.text:
                yield event, answers
    finally:
        gone.set()


async def _face_answer(engine, model: KServeModel, values: dict) -> dict[str, tuple[str, np.ndarray]]:
    """``<model>``: the whole answer in one response (generated_text; entities; logprobs when asked)."""
    if kserve.asks_several(values["sampling"]):
        raise InvalidParameter(f"{model.base} answers once: send n > 1 to {model.base}_stream")
    result = None
    async for event, _ in _events(engine, values, streaming=False):
        result = event.result
    declares_entities = any(o["name"] == "entities" for o in model.config.get("output", []))
    arrays = kserve.face_outputs(result.text, result.entities, result.logprobs, declares_entities)
    return {name: ("BYTES", array) for name, array in arrays}


async def _stream_responses(engine, model: KServeModel, values: dict) -> AsyncIterator[dict]:
    """``<model>_stream``: one dict of outputs per response."""
    grounding = engine.adapter.grounding
    streaming = values["streaming"]
    async for event, answers in _events(engine, values, streaming):
        arrays = kserve.stream_outputs(event, streaming, answers > 1, grounding)
        yield {name: ("INT32" if array.dtype == np.int32 else "BYTES", array) for name, array in arrays}


def _values(model: KServeModel, tensors: list[Tensor]) -> dict:
    arrays = model.check(tensors)
    return kserve.read_inputs(arrays)


@router.post("/models/{name}/infer")
async def infer(request: Request, name: str) -> Response:
    try:
        model = _model(request, name)
        if model.decoupled:
            raise KServeError(
                f"HTTP end point doesn't support models with decoupled transaction policy: use "
                f"/v2/models/{name}/generate_stream or gRPC streaming for '{name}'",
                400,
            )
        engine = _engine(request, model)
        header, tensors = decode_request(await request.body(), request.headers.get(HEADER))
        outputs = await _face_answer(engine, model, _values(model, tensors))
        body, headers = encode_response(name, header, outputs)
        return Response(body, headers=headers)
    except Exception as exc:
        return _reply(exc)


def _generate_tensors(model: KServeModel, body: object) -> list[Tensor]:
    """Triton's generate extension: each top-level key that names an input is that input (a
    value or a list), with the batch dimension added; ``parameters`` is not an input."""
    if not isinstance(body, dict):
        raise InvalidRequest("the generate request body must be a JSON object of the model's inputs")
    declared = {t["name"]: t for t in model.config.get("input", [])}
    tensors = []
    for key, value in body.items():
        if key in ("parameters", "id"):
            continue
        spec = declared.get(key)
        if spec is None:
            raise InvalidRequest(f"unexpected inference input '{key}' for model '{model.name}'")
        datatype = "BYTES" if spec["data_type"] == "TYPE_STRING" else spec["data_type"].removeprefix("TYPE_")
        values = value if isinstance(value, list) else [value]
        try:
            if datatype == "BYTES":
                array = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in values], dtype=np.object_)
            else:
                array = np.array(values, dtype=DTYPES[datatype])
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"input '{key}': its value is not {datatype}: {exc}") from None
        tensors.append(Tensor(key, datatype, [1, array.size], array.reshape(1, -1)))
    return tensors


def _generate_json(name: str, outputs: dict[str, tuple[str, np.ndarray]]) -> dict:
    reply: dict = {"model_name": name, "model_version": "1"}
    for key, (datatype, array) in outputs.items():
        values = to_json_values(datatype, array)
        reply[key] = values[0] if len(values) == 1 else values
    return reply


async def _json_body(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not JSON: {exc}") from None


async def _generate_request(request: Request, name: str) -> tuple[KServeModel, object, dict]:
    """The model, its engine and the request's values, for generate and generate_stream."""
    model = _model(request, name)
    engine = _engine(request, model)
    return model, engine, _values(model, _generate_tensors(model, await _json_body(request)))


@router.post("/models/{name}/generate")
async def generate(request: Request, name: str):
    try:
        model, engine, values = await _generate_request(request, name)
        if model.decoupled:
            values["streaming"] = False  # generate takes exactly one response
            responses = [r async for r in _stream_responses(engine, model, values)]
            if len(responses) != 1:
                raise KServeError("generate takes one response; this request makes several: use generate_stream", 400)
            return _generate_json(name, responses[0])
        return _generate_json(name, await _face_answer(engine, model, values))
    except Exception as exc:
        return _reply(exc)


@router.post("/models/{name}/generate_stream")
async def generate_stream(request: Request, name: str):
    try:
        model, engine, values = await _generate_request(request, name)
        if model.decoupled:
            responses = _stream_responses(engine, model, values)
            first = await anext(responses)
        else:
            answer = await _face_answer(engine, model, values)
            responses, first = None, answer
    except Exception as exc:
        return _reply(exc)

    async def events() -> AsyncIterator[bytes]:
        yield f"data: {json.dumps(_generate_json(name, first))}\n\n".encode()
        if responses is None:
            return
        try:
            async for outputs in responses:
                yield f"data: {json.dumps(_generate_json(name, outputs))}\n\n".encode()
        except Exception as exc:  # mid-stream: the status line is already sent
            yield f"data: {json.dumps({'error': _error(exc).message})}\n\n".encode()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
