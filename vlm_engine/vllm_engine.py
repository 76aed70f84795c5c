"""vLLM's engine behind this engine's interface (``ENGINE=vllm``: llava and qwen3-vl, in Triton).

Requests are checked and their prompts written by the native engine's own code
(``VLMEngine.prepare(encode=False)``: messages, images and their limits, parameters, tools,
guides), so both engines take the same requests and refuse the same ones with the same
errors. vLLM's ``AsyncLLM`` then tokenizes, processes the images, schedules and samples.
Its asyncio loop runs on a thread of its own; each answer's events reach ``emit`` as the
native scheduler's do (the first text at once, then at most every ``STREAM_GAP_MS``; the
answer stripped of surrounding whitespace). n > 1 is n vLLM requests, seed + index each, as
the native engine does it.

This module imports vLLM, so it runs only in vLLM's environment (``vlm_triton.vllm_env``),
where Triton's Python backend starts the models that ask for it (``vlm_triton.repository``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_engine.adapters.base import Prepared
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import (
    EngineError,
    InvalidRequest,
    ModelConfigError,
    Overloaded,
    PromptTooLong,
    ShuttingDown,
)
from vlm_engine.loading import cpu_threads
from vlm_engine.output import Result
from vlm_engine.params import Guide
from vlm_engine.scheduler import Event, Metrics
from vlm_engine.settings import ModelSettings

log = logging.getLogger("vlm_engine.vllm")

REPOSITORY = Path(__file__).resolve().parents[1]


def keep_subprocesses_in_this_environment() -> None:
    """Python processes vLLM starts (its model registry inspects architectures in one) read
    ``PYTHONPATH``; tritonserver's lists the project's site-packages, whose torch, transformers
    and cloudpickle would come before vLLM's own there (a cloudpickle 2 made every start fail).
    Only this repository stays on it."""
    os.environ["PYTHONPATH"] = str(REPOSITORY)


# How often a housekeeping thread asks every answer's client whether it left (an IPC call to
# tritonserver each: asked at every output instead, they took ~80% of the asyncio loop's time
# at 64 rows), and how often it reports metrics and looks at the engine core's health.
CANCEL_CHECK_S = 0.1
REPORT_S = 1.0
CPU_KV_CACHE_MB = 4096  # vLLM's KV cache on CPU when KV_CACHE_MB is unset (vLLM's own former default)
SHUTDOWN_S = 3.0  # vLLM's engine process stops within this, or is killed (Triton waits 10 s)
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def engine_arguments(settings: ModelSettings, adapter: Any, device: str) -> dict[str, Any]:
    """``AsyncEngineArgs`` for ``settings``: the same weights, dtype, row and image limits as the
    native engine; vLLM's own defaults for the rest (its scheduler, KV blocks, prefix caching)."""
    if settings.quantization_type != "none":
        raise ModelConfigError(
            f"{settings.name}: QUANTIZATION_TYPE={settings.quantization_type} is the native engine's "
            "(bitsandbytes); with ENGINE=vllm give MODEL_PATH a quantized checkpoint vLLM reads"
        )
    dtype = settings.dtype
    if dtype == "auto" and not device.startswith("cuda"):
        dtype = "float32"  # as the native engine on CPU
    image_tokens = settings.max_image_tokens * adapter.max_images
    length = settings.max_prompt_tokens + image_tokens + settings.max_tokens_cap
    arguments: dict[str, Any] = {
        "model": settings.model_path,
        "revision": settings.model_revision,
        "download_dir": settings.hf_cache_dir,
        "dtype": dtype,
        # IGNORE_EOS (benchmarks, tests): every answer runs to max_tokens, past the checkpoint's positions
        "max_model_len": length if settings.ignore_eos else min(length, model_positions(settings)),
        "max_num_seqs": settings.max_running,
        "limit_mm_per_prompt": {"image": adapter.max_images},
        "enable_prefix_caching": settings.prefix_caching,
        # llguidance and compact JSON (no free whitespace), as the native engine's guides (vlm_engine.guided)
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
        "disable_log_stats": True,
    }
    if not device.startswith("cuda"):
        arguments["distributed_executor_backend"] = "uni"  # see VllmEngine._start
    if settings.compile_step == "false":  # COMPILE_STEP=false: no torch.compile (and no CUDA graphs)
        arguments["enforce_eager"] = True
    if device.startswith("cuda"):
        arguments["gpu_memory_utilization"] = settings.gpu_memory_utilization
    else:  # a size, not vLLM's default share of the machine's memory (refused when others use it)
        arguments["kv_cache_memory_bytes"] = (settings.kv_cache_mb or CPU_KV_CACHE_MB) * 2**20
    processor = getattr(adapter, "image_processor", None)
    if settings.architecture == "qwen3_vl" and processor is not None:
        size = processor.size  # MAX_IMAGE_TOKENS: the adapter's cap, so both engines see the same image tokens
        arguments["mm_processor_kwargs"] = {
            "size": {"longest_edge": size.longest_edge, "shortest_edge": size.shortest_edge}
        }
    return arguments


def visible_gpu(device: str, env: Mapping[str, str]) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for vLLM's engine on ``device``: vLLM takes no device index and
    runs on the first GPU it sees, so an instance Triton placed on ``cuda:<i>`` (one per GPU,
    ``TRITON_MODEL_CONFIG=gpu``) must see only GPU ``i`` (counted, as Triton counts it, among
    the GPUs this process sees). None: leave it (the CPU, or ``cuda`` without an index)."""
    if not device.startswith("cuda:"):
        return None
    index = int(device.split(":", 1)[1])
    seen = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not seen:
        return str(index)
    if index >= len(seen):
        raise ModelConfigError(f"{device} is not one of the GPUs CUDA_VISIBLE_DEVICES={','.join(seen)} shows")
    return seen[index]


def model_positions(settings: ModelSettings) -> int:
    """The longest sequence the checkpoint's text model takes."""
    from transformers import AutoConfig

    from vlm_engine.loading import source_kwargs

    config = AutoConfig.from_pretrained(settings.model_path, **source_kwargs(settings))
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 4096))


def guide_arguments(guide: Guide) -> dict[str, Any]:
    """A native ``Guide`` as vLLM's ``StructuredOutputsParams`` fields."""
    if guide.kind == "json_schema":
        return {"json": json.loads(guide.spec)}
    if guide.kind == "json_object":
        return {"json_object": True}
    if guide.kind == "choice":
        return {"choice": json.loads(guide.spec)}
    if guide.kind == "regex":
        return {"regex": guide.spec}
    return {"grammar": guide.spec}  # "lark": the tool-call grammar (llguidance reads it as vLLM's guidance backend)


def sampling_arguments(prepared: Prepared, ignore_eos: bool) -> dict[str, Any]:
    """``SamplingParams`` fields for one answer (``guide`` apart: ``guide_arguments``)."""
    params, sampling = prepared.params, prepared.params.sampling
    if prepared.count_only:  # vLLM tokenizes the prompt: one token, then its length is known
        return {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": sampling.top_k or 0,  # 0: every token (vLLM's default)
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "repetition_penalty": sampling.repetition_penalty,
        "logprobs": sampling.top_logprobs if sampling.logprobs else None,
        # int ids, checked by the native engine first (``VLMEngine.prepare``: ids in the vocabulary,
        # biases in [-100, 100], at most 1024), so vLLM's own checks never see one it would refuse
        "logit_bias": dict(sampling.logit_bias) or None,
        # IGNORE_EOS (benchmarks, tests) leaves a guided answer alone: its grammar says where it ends
        "ignore_eos": ignore_eos and sampling.guide is None,
        "skip_special_tokens": True,
    }


class VisibleText:
    """An answer's text as vLLM's deltas add to it, sent as the native engine sends it: leading
    whitespace dropped and trailing whitespace held back, so what is sent is always a prefix
    of the answer (stripped)."""

    def __init__(self) -> None:
        self.full = ""
        self.sent = ""

    def push(self, delta: str) -> str:
        self.full += delta
        visible = self.full.strip()
        out = visible[len(self.sent) :]
        self.sent = visible
        return out

    @property
    def answer(self) -> str:
        return self.full.strip()


@dataclass
class Answer:
    """One of a request's answers in vLLM."""

    prepared: Prepared
    index: int
    emit: Callable[[Event], None]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    task: asyncio.Task | None = None
    tokens: int = 0
    submitted: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)  # ROW_TRACE_FILE only
    cancel_seen: dict[str, Any] | None = None  # when the engine saw the client leave


class VllmEngine:
    """vLLM's ``AsyncLLM`` for one model, with ``VLMEngine``'s verbs: ``prepare``, ``reserve``,
    ``submit``, ``close``."""

    def __init__(
        self,
        settings: ModelSettings,
        metrics: Metrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        started = time.perf_counter()
        if (gpu := visible_gpu(settings.device, os.environ)) is not None:
            # before anything in this process asks CUDA (the front resolves the device): what
            # the driver sees is fixed at its start, and vLLM's engine process inherits it
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            settings = settings.model_copy(update={"device": "cuda:0"})
        self.settings = settings
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.front = VLMEngine(settings.model_copy(update={"engine": "native"}), load=False)
        self.adapter = self.front.adapter
        self.device = self.front.device
        self.adapter.load_inputs()  # tokenizer and processor: prompts, counts, logprobs' tokens
        self._lock = threading.Lock()
        self._answers: dict[str, Answer] = {}
        self._reserved = 0
        self._closing = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self.llm: Any = None
        try:
            self.llm = self._call(self._start(), timeout=None)
            self._call(self._warm_up(), timeout=None)
        except BaseException:
            self.close(drain=False)
            raise
        self._tokens = 0  # generated since the last report
        self._stop = threading.Event()  # the housekeeper's: set once nothing runs any more
        self._housekeeper = threading.Thread(target=self._housekeeping, name="vllm-housekeeping", daemon=True)
        self._housekeeper.start()
        self.load_seconds = time.perf_counter() - started
        log.info("%s: vLLM's engine ready in %.1f s", self.name, self.load_seconds)

    @property
    def name(self) -> str:
        return self.settings.name

    def _call(self, coroutine, timeout: float | None = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> Any:
        keep_subprocesses_in_this_environment()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not self.device.startswith("cuda"):
            # CPU_THREADS threads, not pinned: vLLM would pin its compute to every core but one
            # and leave that one to Triton, the service and nginx (VLLM_CPU_OMP_THREADS_BIND wins)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads(self.settings)))
            # the model in the engine core's process (vLLM's "uni" executor, which its CPU platform
            # allows only with this unset): no worker process whose shared-memory queue the engine
            # core spins on between steps (it took ~60% of a core at 64 rows here)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.settings.ignore_eos:
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        arguments = engine_arguments(self.settings, self.adapter, self.device)
        log.info("%s: starting vLLM's engine: %s", self.name, arguments)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))

    async def _warm_up(self) -> None:
        """One short answer, so that the first request does not pay for lazy set-up."""
        from vllm import SamplingParams

        from vlm_engine.chat import single_turn

        prepared = self.front.prepare(single_turn("Describe the image.", None), max_tokens=2, encode=False)
        async for _ in self.llm.generate(self._prompt(prepared), SamplingParams(max_tokens=2), uuid.uuid4().hex):
            pass

    # -- requests

    def prepare(self, messages: list, reserved: bool = False, **options: Any) -> Prepared:
        """As ``VLMEngine.prepare``: checked, images decoded, prompt counted; vLLM makes the inputs."""
        if not reserved:
            self.reserve()
            self.unreserve()
        return self.front.prepare(messages, reserved=True, encode=False, **options)

    def reserve(self) -> None:
        """A place for a request about to be prepared, or ``Overloaded`` at once."""
        with self._lock:
            if self._closing:
                raise ShuttingDown(f"{self.name} is not serving")
            limit = self.settings.max_running + self.settings.max_waiting
            if self._reserved + len(self._answers) >= limit:
                raise Overloaded(
                    f"{self.name} has {limit} requests running or waiting (MAX_RUNNING + MAX_WAITING); "
                    "try again shortly"
                )
            self._reserved += 1

    def unreserve(self) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, prepared: Prepared, emit: Callable[[Event], None], reserved: bool = False) -> None:
        """Start the request's answers in vLLM; ``emit`` gets their events (on vLLM's loop thread)."""
        answers = [Answer(p, i, emit) for i, p in enumerate((prepared, *prepared.siblings))]
        with self._lock:
            if reserved:
                self._reserved = max(0, self._reserved - 1)
            if self._closing:
                raise ShuttingDown(f"{self.name} is not serving")
            for answer in answers:
                self._answers[answer.request_id] = answer
        for answer in answers:
            self.loop.call_soon_threadsafe(self._begin, answer)

    def _begin(self, answer: Answer) -> None:
        answer.task = self.loop.create_task(self._run(answer))

    def _prompt(self, prepared: Prepared) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt": self.adapter.prompt_text(prepared)}
        images = prepared.images
        if images:
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return prompt

    def _sampling(self, prepared: Prepared) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        arguments = sampling_arguments(prepared, self.settings.ignore_eos)
        guide = prepared.params.sampling.guide
        if guide is not None and not prepared.count_only:
            arguments["structured_outputs"] = StructuredOutputsParams(**guide_arguments(guide))
        return SamplingParams(output_kind=RequestOutputKind.DELTA, **arguments)

    async def _run(self, answer: Answer) -> None:
        prepared, text = answer.prepared, VisibleText()
        asked_logprobs, top = prepared.params.sampling.logprobs, prepared.params.sampling.top_logprobs
        logprobs: list[dict] = []
        pending, pending_logprobs, last_sent = "", [], 0.0
        gap = self.settings.stream_gap_ms / 1000
        finish, stop_sequence, prompt_tokens = "stop", None, prepared.prompt_tokens
        try:
            stream = self.llm.generate(self._prompt(prepared), self._sampling(prepared), answer.request_id)
            async for output in stream:
                if output.prompt_token_ids:  # the whole prompt, image tokens included (usage)
                    prompt_tokens = len(output.prompt_token_ids)
                if prepared.count_only:
                    if output.finished:
                        break
                    continue
                completion = output.outputs[0]
                answer.tokens += len(completion.token_ids)
                if self.settings.row_trace_file:
                    answer.token_times += [time.monotonic()] * len(completion.token_ids)
                entries = self._logprob_entries(completion.logprobs, top) if asked_logprobs else []
                logprobs += entries
                pending += text.push(completion.text)
                pending_logprobs += entries
                if output.finished:
                    finish = FINISH_REASONS.get(completion.finish_reason or "stop", "stop")
                    if finish == "stop" and isinstance(completion.stop_reason, str):
                        stop_sequence = completion.stop_reason  # a stop string (an int: a stop token)
                    break
                now = time.monotonic()
                if (pending or pending_logprobs) and (last_sent == 0.0 or now - last_sent >= gap):
                    answer.emit(Event(pending, logprobs=pending_logprobs or None, index=answer.index))
                    pending, pending_logprobs, last_sent = "", [], now
        except asyncio.CancelledError:  # the client left (vLLM's generate aborts the request)
            finish = "cancelled"
        except Exception as exc:
            self._finished(answer, type(exc).__name__)
            answer.emit(Event(error=self._error(exc), index=answer.index))
            return
        self._finished(answer, finish)
        self._tokens += answer.tokens  # reported by the housekeeper (a metric update is an IPC call)
        result = Result(
            text.answer,
            answer.tokens,
            finish,
            prompt_tokens=prompt_tokens,
            logprobs=logprobs if asked_logprobs else None,
            stop_sequence=stop_sequence,
        )
        rest = pending if finish != "cancelled" else ""  # what push returned and was not sent yet
        answer.emit(Event(rest, result, logprobs=pending_logprobs or None, index=answer.index))

    def _saw_cancel(self, answer: Answer) -> None:
        if answer.cancel_seen is None:
            answer.cancel_seen = {"time": time.monotonic(), "tokens": answer.tokens}

    def _finished(self, answer: Answer, end: str) -> None:
        with self._lock:
            self._answers.pop(answer.request_id, None)
        if self.settings.row_trace_file:  # as the native scheduler's trace (ROW_TRACE_FILE)
            record = {
                "model": self.name,
                "index": answer.index,
                "end": end,
                "prompt_tokens": answer.prepared.prompt_tokens,
                "tokens": answer.tokens,
                "submitted": answer.submitted,
                "ended": time.monotonic(),
                "cancel_seen": answer.cancel_seen,
                "token_times": answer.token_times,
            }
            with open(self.settings.row_trace_file, "a", encoding="utf-8") as trace:
                trace.write(json.dumps(record) + "\n")

    def _error(self, exc: Exception) -> BaseException:
        """vLLM's refusal as the engine's error; a dead engine core is fatal (the model reloads)."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if isinstance(exc, EngineDeadError):
            self._fatal(exc)
            return EngineError(f"{self.name}: vLLM's engine core died; the model is being reloaded")
        cause = exc.__cause__ if isinstance(exc, EngineGenerateError) else exc
        if isinstance(cause, (ValueError, VLLMClientError)):  # vLLM's input checks
            message = str(cause)
            if "longer than the maximum model length" in message:
                return PromptTooLong(f"{message} (MAX_PROMPT_TOKENS, MAX_IMAGE_TOKENS, MAX_TOKENS_CAP)")
            return InvalidRequest(f"vLLM refused the request: {message}")
        return EngineError(f"{self.name}: vLLM failed on this request: {type(cause).__name__}: {cause}")

    def _fatal(self, exc: BaseException) -> None:
        log.error("%s: vLLM's engine core is dead: %s", self.name, exc)
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _logprob_entries(self, steps: Any, top: int) -> list[dict[str, Any]]:
        """vLLM's per-token logprobs in OpenAI's shape: each step's dict holds the sampled token
        first, then the ``top`` most likely (ranks 1..top; the sampled one may be among them)."""
        decode = self.adapter.tokenizer._tokenizer.decode

        def token(token_id: int, value: float) -> dict[str, Any]:
            text = decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        entries = []
        for step in steps or []:
            sampled = next(iter(step))
            entry = token(sampled, step[sampled].logprob)
            ranked = sorted((lp.rank, i, lp.logprob) for i, lp in step.items() if lp.rank and lp.rank <= top)
            entry["top_logprobs"] = [token(i, value) for _, i, value in ranked]
            entries.append(entry)
        return entries

    def _housekeeping(self) -> None:
        """Off the asyncio loop: clients that left (their answers are cancelled, which aborts
        them in vLLM), metrics, and a dead engine core (noticed while idle too)."""
        last_report, last_reported = 0.0, (-1, 0)
        while not self._stop.wait(CANCEL_CHECK_S):
            with self._lock:
                answers = list(self._answers.values())
            for answer in answers:
                task = answer.task
                if task is not None and not task.done() and answer.prepared.cancelled():
                    self._saw_cancel(answer)
                    self.loop.call_soon_threadsafe(task.cancel)
            if time.monotonic() - last_report < REPORT_S:
                continue
            last_report = time.monotonic()
            reported = (len(answers), self._tokens)
            if self.metrics is not None and (reported != (0, 0) or last_reported != (0, 0)):
                # an idle engine makes no IPC calls: a stub killed mid-call can take Triton down
                tokens, self._tokens = self._tokens, 0
                self.metrics.tokens(tokens)
                self.metrics.queue(len(answers), 0)  # vLLM's own split of running and waiting is its own
                self.metrics.reported()
            last_reported = reported
            llm = self.llm
            if llm is not None and llm.errored:
                self._fatal(llm.dead_error)
                return

    def running(self) -> int:
        """Answers in vLLM now (tests, diagnostics)."""
        with self._lock:
            return len(self._answers)

    def close(self, drain: bool = True, wait_s: float = 30.0) -> None:
        """Refuse new requests; let the running ones finish (``drain``, bounded), then stop vLLM."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + (wait_s if drain else 0.0)
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        housekeeper = getattr(self, "_housekeeper", None)
        if housekeeper is not None:  # stopped before vLLM is: a stopping engine core is not a dead one
            self._stop.set()
            housekeeper.join(timeout=5)
        if self.llm is not None:  # nothing is running now: its processes get 3 s, then SIGKILL
            self.llm.shutdown(timeout=SHUTDOWN_S)
            self.llm = None
        if self._thread.is_alive():  # nothing of the loop is left for the interpreter's exit to finalize
            asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()
        self.metrics = None

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
