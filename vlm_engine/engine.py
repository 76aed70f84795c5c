"""The engine: validates requests, batches them, streams every row's tokens.

It knows nothing about Triton or HTTP; adapters know the architectures.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from vlm_engine.adapters import adapter_class
from vlm_engine.adapters.base import Adapter, Prepared
from vlm_engine.chat import Message, has_text, single_turn
from vlm_engine.errors import InvalidParameter, InvalidRequest, ModelConfigError, ShuttingDown, TooLarge
from vlm_engine.loading import check_source, cpu_threads, load_error, resolve_device
from vlm_engine.output import Result
from vlm_engine.params import GenerationParams, Sampling, check_logit_bias, resolve_params
from vlm_engine.preparing import InputWorkers, RequestInputs, blank_image, make_inputs, worker_count
from vlm_engine.scheduler import Event, Metrics, Scheduler
from vlm_engine.settings import ModelSettings, resolve_settings
from vlm_engine.tools import resolve_tools

log = logging.getLogger("vlm_engine")


@dataclass
class Chunk:
    """Streaming event of ``stream``: ``text`` for request ``index``; ``result`` on its last."""

    index: int
    text: str
    result: Result | None = None


class VLMEngine:
    """One loaded model and its scheduler. ``prepare`` each request, then ``submit`` it
    (or ``stream``/``generate`` a list of them)."""

    def __init__(
        self,
        settings: ModelSettings,
        load: bool = True,
        metrics: Metrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        if settings.engine != "native":
            raise ModelConfigError(
                f"{settings.name}: ENGINE={settings.engine} runs inside Triton, in vLLM's own environment "
                f"(vlm_engine.vllm_engine); this process serves the native engine: "
                f"set {settings.env_prefix}_ENGINE=native"
            )
        self.settings = settings
        self.on_fatal = on_fatal
        self.device = resolve_device(settings)
        self.adapter: Adapter = adapter_class(settings.architecture)(settings, self.device)
        self.metrics = metrics
        self.scheduler: Scheduler | None = None
        self.input_workers: InputWorkers | None = None
        self.load_seconds = 0.0
        self._vocab_size: int | None = None
        if load:
            self.load()

    @classmethod
    def from_config(
        cls,
        name: str,
        parameters: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> VLMEngine:
        return cls(resolve_settings(name, parameters), metrics=metrics, on_fatal=on_fatal)

    @property
    def name(self) -> str:
        return self.settings.name

    def load(self) -> None:
        check_source(self.settings)
        if str(self.device).startswith("cpu"):
            import torch

            torch.set_num_threads(cpu_threads(self.settings))
        start = time.perf_counter()
        workers = worker_count(self.settings) if self.adapter.inputs_elsewhere else 0
        if workers:  # they load the processor while the weights load
            self.input_workers = InputWorkers(self.settings, workers)
        try:
            self._load_weights()
            self._finish_loading(start)
        except BaseException:  # nothing started for it stays behind: workers, the step loop
            self.close(drain=False)
            raise

    def _finish_loading(self, start: float) -> None:
        self.load_seconds = time.perf_counter() - start
        log.info(
            "%s loaded from %s on %s in %.1fs", self.name, self.settings.model_path, self.device, self.load_seconds
        )
        if self.adapter.kv is not None:
            kv = self.adapter.kv
            log.info(
                "%s: KV cache %.0f MiB, %d pages of %d tokens (%d tokens; %d bytes per token)",
                self.name,
                kv.bytes / 2**20,
                kv.pages.num_pages - 1,
                kv.page_size,
                kv.pages.capacity_tokens,
                kv.shape.bytes_per_token,
            )
        s = self.settings
        self.scheduler = Scheduler(
            self.adapter,
            s.name,
            s.scheduler,
            s.max_running,
            s.max_waiting,
            s.prefill_budget,
            self.metrics,
            s.stream_interval,
            s.max_queue_wait_s,
            self.on_fatal,
            s.stream_gap_ms,
            s.row_trace_file,
            s.prefill_step_multiple,
            s.prefill_gather_steps,
        )
        if self.input_workers is not None:
            waited = time.perf_counter()
            self.input_workers.warm_up()
            log.info(
                "%s: %d input worker process(es) ready (waited %.1f s)",
                self.name,
                self.input_workers.count,
                time.perf_counter() - waited,
            )
        if s.warmup:
            self.warmup()

    def _load_weights(self) -> None:
        try:
            self.adapter.load()
        except ModelConfigError:
            raise
        except (OSError, ValueError) as exc:
            raise load_error(self.settings, exc) from exc
        if self.settings.quantization_type == "none":
            self.adapter.model.to(self.device)
        self.adapter.model.eval()
        self.adapter.setup_kv()

    def close_input_workers(self) -> None:
        if self.input_workers is not None:
            self.input_workers.close()
            self.input_workers = None

    def warmup(self) -> None:
        """One short generation so the first real request does not pay for lazy set-up; with
        ``COMPILE_STEP``, then two rows at once and two prompts without an image, so that
        the compiled step's graphs (decode: one row, any number of rows; prompt chunks: with
        and without image tokens) are built before the model reports ready."""
        started = time.perf_counter()

        def blank_request() -> Prepared:
            blank = blank_image()
            prepared = Prepared(single_turn("Describe the image.", None), resolve_params(self.settings, 2), blank)
            prepared.messages[0].decoded = [blank]
            return prepared

        self.generate([blank_request()])
        runner = getattr(self.adapter, "runner", None)
        if runner is not None and runner.compiled is not None:
            self.generate([blank_request(), blank_request()])
            if runner.compiled_chunks is not None:  # prompts without an image: Qwen3-VL's graph has no DeepStack
                text = [Prepared(single_turn(f"Say {word}.", None), resolve_params(self.settings, 2)) for word in "ab"]
                self.generate(text)
            log.info("%s: step compiled (torch.compile) in %.1f s", self.name, time.perf_counter() - started)

    def prepare(
        self,
        messages: list[Message],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        reserved: bool = False,
        sampling: Mapping[str, Any] | None = None,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        n: int = 1,
        encode: bool = True,
        raw: bool = False,
        count_only: bool = False,
    ) -> Prepared:
        """Validate one request; raises an ``InvalidRequest`` subclass saying what to fix
        (or ``Overloaded`` first, without decoding anything, when the queue is full).
        ``encode=False``: images decoded and every limit checked, but no model inputs made
        (vLLM's engine makes its own: ``vlm_engine.vllm_engine``). ``raw``: the one user
        message's text is the whole prompt (``/v1/completions``). ``count_only``: ``submit``
        answers with the prompt's length at once (``/v1/messages/count_tokens``)."""
        if self.scheduler is not None and not reserved:
            self.scheduler.check_capacity()
        if not any(m.role == "user" for m in messages):
            raise InvalidRequest("the conversation has no user message: send at least one with role 'user'")
        if not any(has_text(m.text) for m in messages if m.role == "user"):
            raise InvalidRequest("prompt is empty: the user messages hold no text; send a question or instruction")
        if any(m.images for m in messages if m.role != "user"):
            raise InvalidRequest("images go in user messages only")
        params = resolve_params(self.settings, max_tokens, temperature, top_p, sampling)
        if raw:
            self._check_raw(messages, tools)
            params = replace(params, raw_prompt=True)
        if params.sampling != Sampling() and not self.adapter.sampling_options:
            asked = [k for k, v in vars(params.sampling).items() if v != getattr(Sampling(), k)]
            raise InvalidParameter(
                f"{self.name} does not support {', '.join(asked)}: send only max_tokens, temperature and top_p"
            )
        if params.sampling.logit_bias:
            check_logit_bias(params.sampling, self.vocab_size(), self.name)
        self._check_n(n)
        params, tools = self._tools(messages, params, tools, tool_choice, parallel_tool_calls)
        count = sum(len(m.images) for m in messages)
        if count > self.adapter.max_images:
            limit = self.adapter.max_images
            where = " (MAX_IMAGES)" if self.adapter.multi_image else ""
            error = TooLarge if self.adapter.multi_image else InvalidRequest  # 413: a setting's limit
            raise error(
                f"{self.name} takes at most {limit} image{'s' if limit > 1 else ''} per request{where}, "
                f"counting every turn; got {count}"
            )
        if encode:
            made = self._make_inputs(messages, params, tools)
        else:  # in this process: another engine encodes
            made = make_inputs(self.adapter, messages, params, tools, encode=False)
        image = next((m.decoded[-1] for m in reversed(messages) if m.decoded), None)
        prepared = Prepared(messages, params, image, cancelled or (lambda: False), made.prompt_tokens, tools=tools)
        prepared.image_keys = made.image_keys
        prepared.inputs = made.inputs
        if encode:
            if not count_only:  # nothing is sampled: no guide to compile
                prepared.state = self._sampling_state(prepared)  # a bad guide: 400 here
        prepared.count_only = count_only
        if encode:
            prepared.input_tokens = self.adapter.prefill_cost(prepared)
        prepared.siblings = [self._sibling(prepared, i, encode) for i in range(1, n)]
        if encode and not count_only:
            self._check_fits(prepared)
        return prepared

    def _check_raw(self, messages: list[Message], tools: Any) -> None:
        if not self.adapter.raw_prompts:
            raise InvalidParameter(
                f"{self.name} does not take raw prompts (completions): its own code writes the prompt"
            )
        if len(messages) != 1 or messages[0].role != "user" or messages[0].images or tools is not None:
            raise InvalidRequest("a raw prompt is one user message of text: no images, turns or tools")

    def _make_inputs(self, messages: list[Message], params: GenerationParams, tools: Any) -> RequestInputs:
        """Images decoded, prompt counted and encoded: in an input worker where there are some."""
        workers = self.input_workers  # once: closing sets it to None
        if workers is not None:
            return workers.make(messages, params, tools)
        return make_inputs(self.adapter, messages, params, tools)

    def _check_n(self, n: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.settings.max_n:
            raise InvalidParameter(f"n must be an integer from 1 to {self.settings.max_n} (MAX_N), got {n!r}")
        if n > 1 and not self.adapter.sampling_options:
            raise InvalidParameter(f"{self.name} does not support n: send n=1")

    def _sibling(self, prepared: Prepared, index: int, encode: bool = True) -> Prepared:
        """Answer ``index`` of an n > 1 request: the same prompt and inputs, its own sampling state
        (a seed becomes seed + index, so the answers differ and each is reproducible)."""
        params = prepared.params
        if params.sampling.seed is not None:
            params = replace(params, sampling=replace(params.sampling, seed=params.sampling.seed + index))
        sibling = replace(prepared, params=params, state=None, siblings=[])
        if encode:
            sibling.state = self._sampling_state(sibling)
        return sibling

    def _sampling_state(self, prepared: Prepared) -> Any:
        """The adapter's sampling state for ``prepared``; a row with a ``logit_bias`` and nothing
        else gets one too, where the sampler keeps its bias on the device (built once, not at
        every step)."""
        from vlm_engine.sampling import RowState

        state = self.adapter.sampling_state(prepared, prepared.inputs)
        if state is None and prepared.params.sampling.logit_bias:
            state = RowState(prepared.params.sampling, (), self.device)
        return state

    def vocab_size(self) -> int:
        """The model's vocabulary size as its scores have it (the text model's ``vocab_size``):
        the bound of ``logit_bias``'s ids. Read from the checkpoint's config where the weights are
        not loaded here (ENGINE=vllm's front, which vLLM checks against the same number)."""
        if self._vocab_size is None:
            if getattr(self.adapter, "model", None) is not None:
                config = self.adapter.text_config()
            else:
                from transformers import AutoConfig

                from vlm_engine.loading import source_kwargs

                config = AutoConfig.from_pretrained(self.settings.model_path, **source_kwargs(self.settings))
                config = getattr(config, "text_config", None) or config
            self._vocab_size = int(config.vocab_size)
        return self._vocab_size

    def _tools(
        self, messages: list[Message], params: GenerationParams, tools: Any, tool_choice: Any, parallel: Any
    ) -> tuple[GenerationParams, list[dict[str, Any]] | None]:
        """Tools for the prompt, and ``tool_choice`` required or named as the answer's grammar."""
        if not isinstance(parallel, bool):
            raise InvalidParameter(f"parallel_tool_calls must be true or false, got {parallel!r}")
        request = resolve_tools(tools, tool_choice, self.adapter.lark_tag, parallel)
        uses_tools = request is not None or any(m.role == "tool" or m.tool_calls for m in messages)
        if uses_tools and not self.adapter.tool_format:
            raise InvalidParameter(
                f"{self.name} has no tool-calling format: send no tools, tool calls or tool results "
                "(qwen3-vl takes them)"
            )
        if request is None:
            return params, None
        if request.guide is not None:
            if params.sampling.guide is not None:
                raise InvalidParameter(
                    "tool_choice 'required' or a named function constrains the answer already: "
                    "send it without response_format or a guided_* field"
                )
            params = replace(params, sampling=replace(params.sampling, guide=request.guide))
        return params, list(request.tools) if request.render else None

    def _check_fits(self, prepared: Prepared) -> None:
        """A request whose prompt and answer could never fit in the KV cache is refused (413)."""
        kv = self.adapter.kv
        if kv is None:
            return
        prompt = self.adapter.prefill_cost(prepared)
        need = prompt + prepared.params.max_tokens
        capacity = kv.pages.capacity_tokens
        if need > capacity:
            room = capacity - prompt
            advice = f"set max_tokens to at most {room}" if room > 0 else "send a shorter prompt or a smaller image"
            raise TooLarge(
                f"this request needs {need} KV tokens ({prompt} for the prompt and its image, max_tokens="
                f"{prepared.params.max_tokens}); {self.name}'s KV cache holds {capacity} tokens "
                f"(KV_CACHE_MB, KV_CACHE_TOKENS or GPU_MEMORY_UTILIZATION): {advice}"
            )

    def submit(self, prepared: Prepared, emit: Callable[[Event], None], reserved: bool = False) -> None:
        """Hand one prepared request to the scheduler; ``emit`` gets its events (loop thread)."""
        if self.scheduler is None:
            raise ShuttingDown(f"{self.name} is not serving")
        if prepared.count_only:  # nothing to generate: its length is known
            if reserved:
                self.scheduler.unreserve()
            emit(Event(result=Result("", 0, "stop", prompt_tokens=prepared.input_tokens)))
            return
        self.scheduler.submit(prepared, emit, reserved)

    def reserve(self) -> None:
        """A place in the queue for a request about to be prepared, or ``Overloaded`` at once."""
        if self.scheduler is None:
            raise ShuttingDown(f"{self.name} is not serving")
        self.scheduler.reserve()

    def unreserve(self) -> None:
        if self.scheduler is not None:
            self.scheduler.unreserve()

    def stream(self, batch: list[Prepared]) -> Iterator[Chunk]:
        """Every request of ``batch`` through the scheduler; chunks carry indices into ``batch``."""
        events: queue.Queue[tuple[int, Event]] = queue.Queue()
        for index, prepared in enumerate(batch):
            self.submit(prepared, lambda event, index=index: events.put((index, event)))
        left = len(batch)
        while left:
            index, event = events.get()
            if event.error is not None:
                raise event.error
            left -= event.final
            yield Chunk(index, event.text, event.result)

    def generate(self, batch: list[Prepared]) -> list[Result]:
        """Whole answers, in ``batch`` order."""
        results: list[Result | None] = [None] * len(batch)
        for chunk in self.stream(batch):
            if chunk.result is not None:
                results[chunk.index] = chunk.result
        return results  # type: ignore[return-value]

    def close(self, drain: bool = True) -> None:
        """Stop the step loop (``finalize``, service shutdown), then the input workers."""
        if self.scheduler is not None:
            self.scheduler.close(drain)
            self.scheduler = None
        self.close_input_workers()
