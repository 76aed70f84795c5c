"""What every architecture adapter provides, and the shared path for HF decoder models.

The scheduler (``vlm_engine.scheduler``) drives adapters through these verbs, on sequences
(one per running request) that it owns:

- ``start(prepared, generated)``: a new sequence for a request (``generated``: tokens it
  already produced before it was preempted; they are prefilled again with its prompt);
- ``prompt_length(seq)`` and ``chunk_end(seq, start, budget)``: how its prompt is split
  into prefill chunks (a chunk may split an image: it takes its slice of the encoder output);
- ``prefix_hit(seq)``: the cached pages its prompt can start from (prefix caching);
- ``step(decodes, chunks)``: one step: one more output for every decoding sequence, and a
  prompt chunk of others; the first output of each sequence whose prompt is complete
  (``None`` for the others). HF models run it as **one packed forward** (``runner``);
  ``prefill`` and ``decode`` are its two halves;
- ``free(seq)``: the sequence left; its KV references are given back.

The KV memory of HF models is a pool of pages (``vlm_engine.kv``), sized once; the
scheduler asks ``kv.pages`` whether a request fits, grows rows page by page and preempts
when it runs out. An output is a token id (HF models) or a text chunk (moondream2's own
API), turned into text by the row's ``decoder`` (``vlm_engine.output``); an exception as an
output fails that row alone. Adapters describe their model (inputs, positions, image encoder,
the forward call); the runner (``vlm_engine.runner``) owns the step.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlm_engine.chat import Message
from vlm_engine.kv.manager import page_hashes
from vlm_engine.output import Result, RowDecoder, StreamText, TokenDecoder
from vlm_engine.params import GenerationParams
from vlm_engine.settings import ModelSettings

log = logging.getLogger("vlm_engine.adapters")

if TYPE_CHECKING:  # torch only where a model is loaded: the service image has none
    from vlm_engine.kv.pool import KVPool


@dataclass
class Prepared:
    """A validated request: decoded images, resolved parameters."""

    messages: list[Message]
    params: GenerationParams
    image: Image.Image | None = None
    cancelled: Callable[[], bool] = lambda: False
    prompt_tokens: int = 0
    inputs: Any = None  # model inputs encoded on the request's thread (``Adapter.encode_row``)
    state: Any = None  # sampling state that outlives a preemption (``sampling.RowState``)
    image_keys: list[str] = field(default_factory=list)  # content hash of each image: prefix and encoder caches
    tools: list[dict[str, Any]] | None = None  # tools the prompt lists (OpenAI's function objects)
    siblings: list[Prepared] = field(default_factory=list)  # answers 2..n of the same prompt (n > 1)
    streamed: bool = True  # its edge sends text as it comes; else only the answer (and heartbeats)
    input_tokens: int = 0  # the whole prompt the model reads (template, image tokens): usage's count
    count_only: bool = False  # answer with the prompt's length, generate nothing (count_tokens)

    @property
    def images(self) -> list[Image.Image]:
        """Every decoded image of the conversation, in order."""
        return [image for message in self.messages for image in message.decoded]


SEQUENCE_KEYS = ("input_ids", "attention_mask", "image_embeds_position_mask", "mm_token_type_ids")
PROMPT_POSITIONS = "prompt_positions"  # an adapter's positions of the prompt, made with its inputs (Qwen3-VL)


class Adapter(ABC):
    """One architecture: loading, prompt format, and the scheduler's verbs."""

    multi_image = False  # several images per request (up to MAX_IMAGES); else one
    tool_format: str | None = None  # how the prompt lists tools and the model calls them (vlm_engine.tools)
    requires_image = False  # a blank image is supplied for text-only chats
    image_tokens = 256  # rough prompt cost of an image, for the prefill budget
    grounding = False  # results carry ``entities`` (boxes or points)
    resumable = False  # a preempted sequence can be started again from its tokens so far
    inputs_elsewhere = False  # its request inputs can be made in a worker process (``vlm_engine.preparing``)
    sampling_options = False  # takes seed, stop, penalties and logprobs
    kv: KVPool | None = None  # paged KV memory (None: the adapter keeps its own per row)

    def __init__(self, settings: ModelSettings, device: str):
        self.settings = settings
        self.max_images = settings.max_images if self.multi_image else 1
        self.device = device
        self._count_lock = threading.Lock()

    @abstractmethod
    def load(self) -> None:
        """Load weights, tokenizer and processor from ``settings.model_path``."""

    def setup_kv(self) -> None:
        """Allocate KV memory once the weights are loaded (and warmed up, on CUDA)."""
        return None

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of user text, for the prompt-length limit (called from request threads)."""

    def encode_row(self, prepared: Prepared) -> Any:
        """Model inputs of one request, made before it is queued (``vlm_engine.preparing``: on the
        request's thread or in an input worker), never in the step loop."""
        return None

    def sampling_state(self, prepared: Prepared, inputs: Any) -> Any:
        """Per-request sampling state (``sampling.RowState``), for adapters that take options."""
        return None

    raw_prompts = True  # takes a prompt as written (``/v1/completions``): ``prompt_text``

    def prompt_text(self, prepared: Prepared) -> str:
        """The text the model reads: the chat template's (``prompt``), or the user's text as it
        is for a raw prompt (``GenerationParams.raw_prompt``)."""
        if prepared.params.raw_prompt:
            return prepared.messages[-1].text
        return self.prompt(prepared)

    def prompt(self, prepared: Prepared) -> str:
        """The conversation in the model's chat format."""
        raise NotImplementedError

    def prefill_cost(self, prepared: Prepared) -> int:
        """Tokens a prefill of ``prepared`` processes, about (the prefill budget's unit)."""
        if prepared.inputs is not None and "input_ids" in prepared.inputs:
            return int(prepared.inputs["input_ids"].shape[-1])
        images = sum(len(m.decoded) for m in prepared.messages)
        return prepared.prompt_tokens + self.image_tokens * max(images, prepared.image is not None)

    @abstractmethod
    def decoder(self, prepared: Prepared) -> RowDecoder: ...

    @abstractmethod
    def start(self, prepared: Prepared, generated: list[int]) -> Any: ...

    def prompt_length(self, seq: Any) -> int:
        return 1

    def chunk_end(self, seq: Any, start: int, budget: int) -> int:
        return self.prompt_length(seq)

    @abstractmethod
    def prefill(self, items: list[tuple[Any, int, int]]) -> list[Any]: ...

    @abstractmethod
    def decode(self, seqs: list[Any]) -> list[Any]: ...

    def step(self, decodes: list[Any], chunks: list[tuple[Any, int, int]]) -> tuple[list[Any], list[Any]]:
        """One step: an output per decoding sequence, and per chunk (``None`` for a chunk that
        does not complete its prompt). Here two calls; ``GenerateAdapter`` packs one forward."""
        prefilled = self.prefill(chunks) if chunks else []
        return (self.decode(decodes) if decodes else []), prefilled

    def prefix_hit(self, seq: Any) -> list[int]:
        """KV pages (cached) that ``seq``'s prompt can start from; none for adapters without a pool."""
        return []

    def needs_encoder(self, seq: Any, start: int, end: int) -> bool:
        """Whether prompt tokens ``[start, end)`` reach an image the vision encoder has yet to encode."""
        return False

    def lark_tag(self, text: str) -> str:
        """``text`` as a Lark literal (``GenerateAdapter``: the token that writes it, if any)."""
        return json.dumps(text)

    def free(self, seq: Any) -> None:
        return None


def pixels_key(image: Image.Image | None) -> str:
    """A content key for an image the request did not send as bytes (a blank one the engine made)."""
    import hashlib

    if image is None:
        return "none"
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(eq=False)
class Sequence:
    """One request in the pool: its prompt (and tokens regenerated after a preemption), its
    positions, and how much of it has KV in the pool."""

    key: int
    tokens: dict[str, Any]  # per-token tensors [length]: input_ids, mm_token_type_ids, ...
    images: dict[str, Any]  # pixel_values, image_grid_thw: every image of the prompt
    positions: Any  # [length] text positions, or [4, length] (Qwen3-VL: text then M-RoPE)
    next_position: int  # text position of the first token after the prompt
    next_mrope: int | None
    params: GenerationParams
    cached: int = 0  # tokens whose K/V is in the pool
    last: int | None = None  # the last chosen token (not in the pool yet)
    state: Any = None  # its sampling state (``sampling.RowState``), when it needs one
    ids: list[int] = field(default_factory=list)  # every token fed so far: prompt, then each decoded one
    image_runs: list[tuple[int, int, str]] = field(default_factory=list)  # each image's tokens and content key
    hashes: list[bytes] = field(default_factory=list)  # of its full pages (``kv.manager.page_hashes``)
    encoded: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # its images' encoder outputs, while prefilling

    @property
    def length(self) -> int:
        return int(self.tokens["input_ids"].shape[-1])


class GenerateAdapter(Adapter):
    """HF decoder models (LLaVA, Kosmos-2, Qwen3-VL) over the paged KV pool.

    Positions are passed explicitly for every row, so a row's tokens never depend on the
    other rows of a forward; attention reads each row's own pages under a per-row mask.
    """

    model: Any
    tokenizer: Any
    resumable = True
    sampling_options = True  # seed, stop, penalties, logprobs, guides
    grammars: Any = None  # ``guided.Grammars``, made on the first guided request
    position_rows = 1  # rows of a token's position (Qwen3-VL: text, then three of M-RoPE)
    inputs_elsewhere = True  # its processor and tokenizer load without the weights (input workers)
    runner: Any = None  # ``runner.ModelRunner``, made with the KV pool

    @abstractmethod
    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        """Model inputs for ``group`` as the model's processor makes them (called per row)."""

    def encode_row(self, prepared: Prepared) -> dict[str, Any]:
        with self._count_lock:
            return self.encode([prepared])

    @abstractmethod
    def load_processor(self) -> None:
        """The tokenizer and processor alone: what making a request's inputs needs."""

    @abstractmethod
    def load_model(self) -> None:
        """The weights (``self.model``), after ``load_processor``."""

    def load(self) -> None:
        self.load_inputs()
        self.load_model()
        self.after_load()

    def load_inputs(self) -> None:
        """``load_processor``, then a tokenizer of its own for counting prompt tokens."""
        self.load_processor()
        self._counter = copy.deepcopy(self.tokenizer)  # request threads never share the Rust object

    def after_load(self) -> None:
        from vlm_engine.kv.cache import ATTENTION

        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in eos if e is not None}
        self.image_tokens = self.estimate_image_tokens()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos))
        self.text_config()._attn_implementation = ATTENTION  # the vision tower keeps its own
        self._keys = itertools.count(1)

    def text_config(self) -> Any:
        return self.model.config.text_config

    def setup_kv(self) -> None:
        import torch

        from vlm_engine.kv import flashinfer_attention
        from vlm_engine.kv.cache import in_place
        from vlm_engine.kv.pool import KVPool, budget_bytes, kv_shape
        from vlm_engine.runner import ModelRunner

        s = self.settings
        shape = kv_shape(self.text_config(), self.model.dtype)
        paged = None  # flashinfer's kernels and workspace, allocated before the KV budget is measured
        if flashinfer_attention.usable(self.device, shape.dtype, s.paged_attention):
            paged = flashinfer_attention.FlashInferAttention(self.device, s.kv_page_tokens, shape.dtype)
            config = self.text_config()
            heads = getattr(config, "num_attention_heads", None) or config.attention_heads
            if not paged.works(heads, shape.kv_heads, shape.head_dim):
                paged = None
        row_tokens = s.max_prompt_tokens + self.max_image_tokens() + s.max_tokens_cap
        fallback = s.max_running * row_tokens * shape.bytes_per_token
        page_bytes = s.kv_page_tokens * shape.bytes_per_token
        if s.kv_cache_tokens:
            budget = -(-s.kv_cache_tokens // s.kv_page_tokens) * page_bytes
        else:
            budget = budget_bytes(s.kv_cache_mb, s.gpu_memory_utilization, self.device, fallback)
        pages = max(2, budget // page_bytes + 1)
        self.kv = KVPool(shape, pages, s.kv_page_tokens, self.device, s.prefix_caching)
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        read_in_place = paged is not None or in_place(self.device, s.paged_attention)  # the CPU kernel: built once
        log.info(
            "%s: attention %s (%.1f s)",
            s.name,
            "reads pages in place (flashinfer)"
            if paged is not None
            else "of decode rows reads pages in place"
            if read_in_place
            else "gathers pages",
            time.perf_counter() - started,
        )
        on_cuda = str(self.device).startswith("cuda")
        compile_step = s.compile_step in ("true", "all") or (s.compile_step == "auto" and not on_cuda)
        self.runner = ModelRunner(
            self,
            self.kv,
            read_in_place,
            s.max_running,
            row_tokens,
            compile_step,
            s.compile_step == "all",
            paged=paged,
        )

    @property
    def read_in_place(self) -> bool:
        """Decode attention reads the pool's pages in place (``kv.cache.in_place``)."""
        return self.runner.read_in_place

    @property
    def vision_encoded(self) -> int:
        """Images run through the vision encoder."""
        return self.runner.encoder_cache.encoded

    @property
    def encoder_hits(self) -> int:
        """Images whose encoder output came from the encoder cache."""
        return self.runner.encoder_cache.hits

    def max_image_tokens(self) -> int:
        return self.image_tokens

    def stream_text(self) -> StreamText:
        return StreamText(self.tokenizer._tokenizer)

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
        return TokenDecoder(self, prepared.params)

    def logprob_entry(self, logprob: Any) -> dict[str, Any]:
        """One token's logprobs in OpenAI's shape (``token``, ``logprob``, ``bytes``, ``top_logprobs``)."""

        def token(token_id: int, value: float) -> dict[str, Any]:
            text = self.tokenizer._tokenizer.decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        entry = token(logprob.token, logprob.logprob)
        entry["top_logprobs"] = [token(i, v) for i, v in logprob.top]
        return entry

    # -- positions: text positions by default; Kosmos-2 and Qwen3-VL override these

    def sequence_positions(self, inputs: dict[str, Any]) -> tuple[Any, int, int | None]:
        """Positions of one unpadded prompt, the next text position, the next M-RoPE position."""
        import torch

        length = int(inputs["input_ids"].shape[-1])
        return torch.arange(length), length, None

    def positions_made(self, positions: Any) -> tuple[Any, int, int | None]:
        """``sequence_positions``'s answer from the positions ``encode_row`` made (``PROMPT_POSITIONS``)."""
        return positions, int(positions.shape[-1]), None

    def next_positions(self, seq: Sequence) -> list[int]:
        """The position of ``seq``'s next token (after its ``cached`` tokens), one per position row."""
        return [seq.next_position + seq.cached - seq.length]

    def image_mask(self, tokens: dict[str, Any]) -> Any:
        """Which prompt tokens stand for an image (their embeddings come from the vision encoder)."""
        if "image_embeds_position_mask" in tokens:
            return tokens["image_embeds_position_mask"].bool()
        if "mm_token_type_ids" in tokens:
            return tokens["mm_token_type_ids"] != 0
        image_id = getattr(self.model.config, "image_token_id", None)
        return tokens["input_ids"] == image_id

    def forward_module(self) -> Any:
        """The module a step calls (what ``COMPILE_STEP`` compiles)."""
        return self.model

    def chunk_module(self) -> Any:
        """The module that steps carrying prompt chunks run compiled, from embeddings made
        outside the graph (``adapters.embedded``); None: those steps run eager."""
        return None

    def embed_step(self, inputs: dict[str, Any], pieces: list[tuple[Any, ...]], decodes: int) -> dict[str, Any]:
        """``chunk_module``'s inputs for a step's flat ``inputs`` (``decodes`` rows first):
        token embeddings, with the image rows of ``pieces`` at the chunks' image tokens."""
        import torch

        from vlm_engine.adapters.embedded import embed

        if not pieces:
            return {"inputs_embeds": embed(self.model, inputs, None, None)}
        rows = torch.cat([piece[0] for piece in pieces])
        return {"inputs_embeds": embed(self.model, inputs, rows, self.step_image_mask(inputs, decodes))}

    def step_image_mask(self, inputs: dict[str, Any], decodes: int) -> Any:
        """Which tokens of a step's flat ``inputs`` are image tokens (``decodes`` rows first:
        a decode row's token is never an image's, whatever its id)."""
        mask = self.image_mask({key: value[0] for key, value in inputs.items()})
        mask[:decodes] = False
        return mask

    def forward(self, inputs: dict[str, Any], positions: Any, cache: Any, keep: Any, module: Any = None) -> Any:
        """One packed forward; ``keep``: the positions whose logits are needed; ``module``: the
        compiled ``forward_module`` when the runner has one."""
        module = module if module is not None else self.forward_module()
        return module(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=keep)

    # -- the scheduler's verbs

    def start(self, prepared: Prepared, generated: list[int]) -> Sequence:
        import torch

        inputs = prepared.inputs if prepared.inputs is not None else self.encode_row(prepared)
        tokens = {k: v[0] for k, v in inputs.items() if k in SEQUENCE_KEYS and k != "attention_mask"}
        images = {k: v for k, v in inputs.items() if k not in SEQUENCE_KEYS and k != PROMPT_POSITIONS}
        runs = self.image_runs(tokens, prepared) if images else []
        if generated:  # resumed after a preemption: its answer so far is prompt now
            more = torch.tensor(generated, dtype=tokens["input_ids"].dtype)
            tokens = {
                k: torch.cat([v, more if k == "input_ids" else v.new_zeros(len(more))]) for k, v in tokens.items()
            }
        made = inputs.get(PROMPT_POSITIONS)
        if made is not None and not generated:  # made with the inputs, off the step loop
            positions, following, mrope = self.positions_made(made)
        else:
            whole = {k: v[None] for k, v in tokens.items()}
            whole["attention_mask"] = torch.ones_like(whole["input_ids"])
            whole.update(images)
            positions, following, mrope = self.sequence_positions(whole)
        if prepared.state is None:
            prepared.state = self.sampling_state(prepared, inputs)
        seq = Sequence(
            next(self._keys),
            tokens,
            images,
            positions,
            following,
            mrope,
            prepared.params,
            state=prepared.state,
            ids=tokens["input_ids"].tolist(),
        )
        seq.image_runs = runs
        if self.kv is not None and self.kv.pages.caching:
            seq.hashes = page_hashes(seq.ids, seq.image_runs, self.kv.page_size)
        return seq

    def image_runs(self, tokens: dict[str, Any], prepared: Prepared) -> list[tuple[int, int, str]]:
        """Each image's tokens (one run of image tokens per image, in order) and its content key."""
        import torch

        from vlm_engine.errors import EngineError

        mask = self.image_mask(tokens).int()
        edges = torch.diff(mask, prepend=mask.new_zeros(1), append=mask.new_zeros(1))
        starts, ends = (edges == 1).nonzero()[:, 0].tolist(), (edges == -1).nonzero()[:, 0].tolist()
        keys = prepared.image_keys or [pixels_key(image) for image in prepared.images or [prepared.image]]
        if len(starts) != len(keys):
            raise EngineError(f"{self.settings.name}: the prompt has {len(starts)} image runs for {len(keys)} images")
        return list(zip(starts, ends, keys, strict=True))

    def lark_tag(self, text: str) -> str:
        """``text`` in a Lark grammar: its own token (``<[id]>``) where the vocabulary has one
        added for it (Qwen's ``<tool_call>``), else the characters."""
        token = self.tokenizer.convert_tokens_to_ids(text)
        added = token is not None and token != self.tokenizer.unk_token_id and text in self.tokenizer.get_added_vocab()
        return f"<[{token}]>" if added else json.dumps(text)

    def sampling_state(self, prepared: Prepared, inputs: dict[str, Any]) -> Any:
        """The request's ``RowState`` when it needs one (seed, penalties, a guide); compiling a
        guide raises ``InvalidParameter``, so this runs on the request's thread."""
        from vlm_engine.guided import Grammars
        from vlm_engine.sampling import RowState

        s = prepared.params.sampling
        if s.seed is None and not s.penalised and s.guide is None:
            return None
        matcher = mask_vocab = None
        if s.guide is not None:
            with self._count_lock:
                if self.grammars is None:
                    self.grammars = Grammars(self.tokenizer, self.text_config().vocab_size, self.eos)
            matcher, mask_vocab = self.grammars.matcher(s.guide), self.grammars.mask_vocab
        return RowState(s, inputs["input_ids"][0].tolist(), self.device, matcher, mask_vocab or 0)

    def prompt_length(self, seq: Sequence) -> int:
        return seq.length

    def chunk_end(self, seq: Sequence, start: int, budget: int) -> int:
        """Chunks may split an image: each takes the slice of its encoder output it covers."""
        return min(seq.length, start + max(budget, 1))

    def free(self, seq: Sequence) -> None:
        self.kv.pages.free(seq.key)

    def prefix_hit(self, seq: Sequence) -> list[int]:
        """The cached pages ``seq``'s prompt can start from: its full pages found by hash, up to
        (not including) its last prompt token, whose logits it needs. A hit may end inside an
        image: the rest of its tokens take their slice of the (cached) encoder output."""
        return self.kv.pages.match(seq.hashes[: (seq.length - 1) // self.kv.page_size])

    def needs_encoder(self, seq: Sequence, start: int, end: int) -> bool:
        return self.runner.needs_encoder(seq, start, end)

    def prefill(self, items: list[tuple[Sequence, int, int]]) -> list[Any]:
        return self.step([], items)[1]

    def decode(self, seqs: list[Sequence]) -> list[Any]:
        return self.step(seqs, [])[0]

    def step(self, decodes: list[Sequence], chunks: list[tuple[Sequence, int, int]]) -> tuple[list[Any], list[Any]]:
        """One packed forward (``runner.ModelRunner``)."""
        return self.runner.step(decodes, chunks)

    def image_pixels(self, seq: Sequence, index: int) -> dict[str, Any]:
        """The processor's inputs of image ``index`` alone (one image per row of pixel values)."""
        return {"pixel_values": seq.images["pixel_values"][index : index + 1]}

    @staticmethod
    def pixel_batch(pixels: list[dict[str, Any]]) -> dict[str, Any]:
        """Several images' processor inputs as one batch (each key's rows one after another)."""
        import torch

        return {key: torch.cat([p[key] for p in pixels]) for key in pixels[0]}

    @abstractmethod
    def encode_images(self, pixels: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """Images (``image_pixels`` each) through the vision encoder in one batch; per image,
        tensors with one row per image token (the embeddings first; Qwen3-VL adds its
        DeepStack features)."""

    @abstractmethod
    def image_inputs(self, pieces: list[tuple[Any, ...]]) -> dict[str, Any]:
        """Model inputs that place ``pieces`` (slices of encoder outputs, in the order of the
        image tokens of the packed forward) at those tokens."""

    def text_only(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs of a forward with no image tokens in it (Kosmos-2 drops its image mask)."""
        return inputs
