"""What every architecture adapter provides, and the shared path for HF decoder models.

The scheduler (``vlm_engine.scheduler``) drives adapters through four verbs:

- ``prefill(group)``: encode and run the prompts of newly admitted requests; returns the
  group's model state and each row's first output.
- ``merge(a, b)``: one state holding the rows of ``a`` then those of ``b``.
- ``decode(state)``: one more output for every row of ``state``.
- ``select(state, keep)``: only the rows ``keep`` (released rows leave).
- ``release(state)``: the last rows have left (optional: memory to reuse).

An output is a token id (HF models) or a text chunk (moondream2's own API), turned into
text by the row's ``decoder``.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlm_engine.chat import Message
from vlm_engine.params import GenerationParams
from vlm_engine.settings import ModelSettings
from vlm_engine.streaming import RowText

if TYPE_CHECKING:  # torch only where a model is loaded: the service image has none
    from vlm_engine.kv import KVBatch


@dataclass
class Prepared:
    """A validated request: decoded images, resolved parameters."""

    messages: list[Message]
    params: GenerationParams
    image: Image.Image | None = None
    cancelled: Callable[[], bool] = lambda: False
    prompt_tokens: int = 0
    inputs: Any = None  # model inputs encoded on the request's thread (``Adapter.encode_row``)


@dataclass
class Result:
    text: str
    output_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    entities: list[dict[str, Any]] | None = None
    prompt_tokens: int = 0  # text tokens of the conversation (image tokens not counted)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "image_embeds_position_mask", "mm_token_type_ids")


@dataclass
class RowStep:
    """What one output did to a row: new visible text, tokens used, end of the answer."""

    delta: str = ""
    tokens: int = 1
    stop: bool = False


class RowDecoder(ABC):
    """Turns one row's outputs into text as they come."""

    @abstractmethod
    def push(self, output: Any) -> RowStep: ...

    @abstractmethod
    def finish(self, finish_reason: str) -> tuple[str, Result]:
        """The text not sent yet, and the row's result."""


class Adapter(ABC):
    """One architecture: loading, prompt format, and the scheduler's four verbs."""

    max_images = 1
    requires_image = False  # a blank image is supplied for text-only chats
    image_tokens = 256  # rough prompt cost of an image, for the prefill budget
    grounding = False  # results carry ``entities`` (boxes or points)

    def __init__(self, settings: ModelSettings, device: str):
        self.settings = settings
        self.device = device
        self._count_lock = threading.Lock()

    @abstractmethod
    def load(self) -> None:
        """Load weights, tokenizer and processor from ``settings.model_path``."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of user text, for the prompt-length limit (called from request threads)."""

    def encode_row(self, prepared: Prepared) -> Any:
        """Model inputs of one request, computed on the request's thread (not the step loop's)."""
        return None

    def prefill_cost(self, prepared: Prepared) -> int:
        """Tokens a prefill of ``prepared`` processes, about (the prefill budget's unit)."""
        if prepared.inputs is not None and "input_ids" in prepared.inputs:
            return int(prepared.inputs["input_ids"].shape[-1])
        images = sum(len(m.decoded) for m in prepared.messages)
        return prepared.prompt_tokens + self.image_tokens * max(images, prepared.image is not None)

    @abstractmethod
    def decoder(self, prepared: Prepared) -> RowDecoder: ...

    @abstractmethod
    def prefill(self, group: list[Prepared]) -> tuple[Any, list[Any]]: ...

    @abstractmethod
    def decode(self, state: Any) -> list[Any]: ...

    @abstractmethod
    def merge(self, a: Any, b: Any) -> Any: ...

    @abstractmethod
    def select(self, state: Any, keep: list[int]) -> Any: ...

    def release(self, state: Any) -> None:
        """Every row of ``state`` has left the batch (nothing to do for most adapters)."""
        return None


class TokenDecoder(RowDecoder):
    """Token ids to text for HF models; EOS ends the answer and is not counted."""

    def __init__(self, adapter: GenerateAdapter):
        self.adapter = adapter
        self.text = RowText(adapter.visible_text)
        self.eos = set() if adapter.settings.ignore_eos else adapter.eos

    def push(self, output: int) -> RowStep:
        if output in self.eos:
            return RowStep(tokens=0, stop=True)
        return RowStep(self.text.push(output))

    def finish(self, finish_reason: str) -> tuple[str, Result]:
        result = self.adapter.finish(self.text.ids, finish_reason)
        return self.text.flush(result.text), result


class GenerateAdapter(Adapter):
    """HF decoder models (LLaVA, Kosmos-2, Qwen3-VL): one shared KV cache for all rows.

    Positions are passed explicitly for every row, so a row's tokens never depend on the
    padding that other rows bring into the batch.
    """

    model: Any
    tokenizer: Any

    @abstractmethod
    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        """Model inputs for ``group`` as the model's processor makes them (called per row)."""

    def encode_row(self, prepared: Prepared) -> dict[str, Any]:
        with self._count_lock:
            return self.encode([prepared])

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """One batch from rows encoded alone: sequences left-padded, image tensors stacked."""
        import torch

        length = max(row["input_ids"].shape[-1] for row in rows)
        batch: dict[str, Any] = {}
        for key in dict.fromkeys(k for row in rows for k in row):  # rows without an image lack some
            tensors = [row[key] for row in rows if key in row]
            if key in SEQUENCE_KEYS:
                fill = self.pad_id if key == "input_ids" else 0
                tensors = [
                    torch.cat([t.new_full((t.shape[0], length - t.shape[-1]), fill), t], dim=-1) for t in tensors
                ]
            batch[key] = torch.cat(tensors)
        return batch

    def after_load(self) -> None:
        self._counter = copy.deepcopy(self.tokenizer)  # request threads never share the Rust object
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in eos if e is not None}
        self.image_tokens = self.estimate_image_tokens()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos))

    def estimate_image_tokens(self) -> int:
        return 256

    def visible_text(self, ids: list[int]) -> str:
        backend = getattr(self.tokenizer, "_tokenizer", None)  # the Rust tokenizer: no Python overhead
        if backend is not None:
            return backend.decode(ids, skip_special_tokens=True).strip()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def finish(self, ids: list[int], finish_reason: str) -> Result:
        return Result(self.visible_text(ids), len(ids), finish_reason)

    def count_tokens(self, text: str) -> int:
        with self._count_lock:
            return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def decoder(self, prepared: Prepared) -> RowDecoder:
        return TokenDecoder(self)

    # -- positions: text positions by default; Kosmos-2 and Qwen3-VL override these

    def prefill_positions(self, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Position ids for the prompt, and per-row state that decoding needs."""
        mask = inputs["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return positions, {}

    def decode_positions(self, state: KVBatch) -> Any:
        return state.positions[:, None]

    def advance(self, state: KVBatch) -> None:
        state.positions += 1

    def forward_prefill(self, inputs: dict[str, Any], positions: Any) -> Any:
        from vlm_engine.kv import new_cache

        return self.model(
            **inputs,
            position_ids=positions,
            past_key_values=new_cache(self.model.config),
            use_cache=True,
            logits_to_keep=1,
        )

    def decoder_model(self) -> Any:
        """What a decode step runs: the whole model (Kosmos-2: its text model)."""
        return self.model

    def forward_decode(self, tokens: Any, mask: Any, positions: Any, cache: Any) -> Any:
        return self.decoder_model()(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )

    # -- the scheduler's verbs

    def prefill(self, group: list[Prepared]) -> tuple[KVBatch, list[int]]:
        import torch

        from vlm_engine.kv import KVBatch
        from vlm_engine.sampling import choose_tokens

        rows = [p.inputs if p.inputs is not None else self.encode_row(p) for p in group]
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in self.collate(rows).items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        mask = inputs["attention_mask"]
        positions, extra = self.prefill_positions(inputs)
        with torch.inference_mode():
            out = self.forward_prefill(inputs, positions)
        params = [p.params for p in group]
        tokens = choose_tokens(out.logits[:, -1], params)
        extra["tokens"] = torch.tensor(tokens, device=mask.device)
        state = KVBatch(out.past_key_values, mask.clone(), mask.sum(-1), extra, params)
        return state, tokens

    def decode(self, state: KVBatch) -> list[int]:
        import torch

        from vlm_engine.sampling import choose_tokens

        state.mask = torch.cat([state.mask, state.mask.new_ones(state.rows, 1)], dim=1)
        with torch.inference_mode():
            out = self.forward_decode(
                state.extra["tokens"][:, None], state.mask, self.decode_positions(state), state.cache
            )
        self.advance(state)
        tokens = choose_tokens(out.logits[:, -1], state.params)
        state.extra["tokens"] = torch.tensor(tokens, device=state.mask.device)
        return tokens

    def merge(self, a: KVBatch, b: KVBatch) -> KVBatch:
        from vlm_engine import kv

        return kv.merge(a, b, self.model.config)

    def select(self, state: KVBatch, keep: list[int]) -> KVBatch:
        from vlm_engine import kv

        return kv.select(state, keep, self.model.config)
