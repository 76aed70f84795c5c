"""moondream2 through its own remote code (``trust_remote_code``) under transformers 5.

The real code (``vikhyat/moondream`` ``moondream/torch/``, revision 2025-06-21 of
``vikhyatk/moondream2``) has an API, not a forward pass: ``encode_image``, ``query``,
``caption``, ``detect``, ``point``. This adapter works around what it does under
transformers 5 (``docs/MOONDREAM2.md`` lists each point and how it was checked):

- **Loading.** ``HfMoondream`` never calls ``post_init()``; a subclass does. Its
  non-persistent tables (``attn_mask``, ``text.freqs_cis``) come back uninitialised, so
  they are computed again. The code builds bfloat16 weights and prepares image crops in
  bfloat16 whatever is asked: weights are cast to the configured dtype (float32 on CPU,
  float16 on GPUs without bfloat16) and the crops at the vision encoder's entry. Failures
  become the engine's ``ModelConfigError``.
- **Tokenizer.** The code fetches ``moondream/starmie-v1`` at construction (latest
  revision, default cache). While it loads, that call reads the pinned revision from the
  configured cache (``make models`` puts it there), or a copy inside the checkpoint folder.
- **One cache inside the model.** ``query`` writes the image into the model's KV cache
  (``model.text.blocks[i].kv_cache``) at once; its stream prefills the prompt and decodes
  into it later. Each row owns cache buffers, bound into the model before its call and
  before each of its steps (rebinding costs nothing; about 384 MiB a row for the real
  model, pooled).
- **Steps and counts.** Every scheduler step advances each row by one chunk (a word: the
  stream yields per word). Tokens are counted exactly by wrapping ``_decode_one_tok``,
  which the stream calls once per generated token; a row that reached ``max_tokens``
  ends with ``length``.
- **Limits.** 2048 positions in all, about 730 per image: a request whose image, prompt
  and ``max_tokens`` do not fit is refused before it runs, as are bad commands.
- **Commands.** ``/caption [short|normal|long]``, ``/detect <object>`` (boxes) and
  ``/point <object>`` (points) as the prompt; their coordinates (0..1) come back as
  ``entities``, like Kosmos-2's. Anything else is a question for ``query``.
- **Images across turns.** Encoded images (the vision encoder's output, already in the
  cache) are kept by content hash for ``ENCODED_IMAGES`` requests, so the next turn about
  the same image skips the vision encoder.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_engine.adapters.base import Adapter, Prepared
from vlm_engine.chat import prompt_message
from vlm_engine.errors import InvalidParameter, InvalidRequest, ModelConfigError, PromptTooLong
from vlm_engine.loading import from_pretrained_kwargs, resolve_dtype
from vlm_engine.output import Result, RowDecoder, RowStep

TOKENIZER_REPO = "moondream/starmie-v1"  # what the real code asks for
TOKENIZER_REVISION = "35192e10a54e36eabe0a7cc57a2c1aab371cafc5"  # pinned here; the code asks for "main"
CAPTION_LENGTHS = ("short", "normal", "long")
SMALLEST_TEMPERATURE = 1e-30  # logits / 1e-30 stay finite in bfloat16; still the argmax in effect
COMMANDS = ("/caption", "/detect", "/point")
_END = object()


@dataclass
class Task:
    """What one request asks of the model, checked on the request's thread."""

    kind: str  # "query" | "caption" | "detect" | "point"
    argument: str  # the question, the caption length, or the object to find
    positions: int  # context positions the image and prompt take
    image_key: str | None = None
    max_objects: int = 0


@dataclass
class Output:
    """One step of a row: a text chunk (or the end), and the tokens generated so far."""

    text: Any
    tokens: int
    entities: list[dict[str, Any]] | None = None


class _Row:
    def __init__(self, task: Task, prepared: Any = None):
        self.task = task
        self.prepared = prepared
        self.caches: list[tuple[Any, Any]] = []
        self.stream: Iterator[str] = iter(())
        self.tokens = 0
        self.entities: list[dict[str, Any]] | None = None


class ChunkDecoder(RowDecoder):
    def __init__(self, task: Task | None, max_tokens: int):
        self.grounding = task is not None and task.kind in ("detect", "point")
        self.max_tokens = max_tokens
        self.chunks: list[str] = []
        self.tokens = 0
        self.entities: list[dict[str, Any]] | None = None

    def push(self, output: Any) -> RowStep:
        if isinstance(output, BaseException):
            raise output
        new, self.tokens = output.tokens - self.tokens, output.tokens
        self.entities = output.entities if output.entities is not None else self.entities
        if output.text is _END:
            return RowStep(tokens=new, stop=True)
        self.chunks.append(output.text)
        return RowStep(output.text, tokens=new)

    def finish(self, finish_reason: str) -> tuple[str, Result]:
        if finish_reason != "cancelled":
            # the model's own loop stops at max_tokens; grounding runs to its end in one step
            finish_reason = "length" if self.tokens >= self.max_tokens and not self.grounding else "stop"
        return "", Result("".join(self.chunks), self.tokens, finish_reason, self.entities)


def _remote_modules(model_class: type) -> list[Any]:
    package = model_class.__module__.rpartition(".")[0]
    return [
        module
        for name, module in list(sys.modules.items())
        if name == model_class.__module__ or (package and name.startswith(package + "."))
    ]


@contextmanager
def tokenizer_from(model_class: type, path: Path):
    """While the remote code is built, its ``Tokenizer.from_pretrained(...)`` reads ``path``.

    Only the modules of the model's own package are touched, and only for the duration."""
    from tokenizers import Tokenizer

    class PinnedTokenizer:
        @staticmethod
        def from_pretrained(identifier: str, *args: Any, **kwargs: Any) -> Tokenizer:
            return Tokenizer.from_file(str(path))

    modules = [m for m in _remote_modules(model_class) if getattr(m, "Tokenizer", None) is Tokenizer]
    for module in modules:
        module.Tokenizer = PinnedTokenizer
    try:
        yield
    finally:
        for module in modules:
            module.Tokenizer = Tokenizer


def with_post_init(model_class: type) -> type:
    """The remote class, calling ``post_init()`` as transformers 5 requires."""

    def __init__(self, config):
        model_class.__init__(self, config)
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__})


def image_positions(config: Any) -> int:
    """Context positions one encoded image takes: BOS and one per patch of a crop."""
    return 1 + (config.vision.crop_size // config.vision.enc_patch_size) ** 2


def restore_tables(inner: Any) -> None:
    """Compute again the non-persistent buffers that transformers 5 leaves uninitialised:
    the causal mask (the image prefix attends both ways) and the rotary cos/sin table."""
    import torch

    context = inner.config.text.max_context
    prefix = image_positions(inner.config)
    mask = torch.ones(1, 1, context, context, dtype=torch.bool).tril()
    mask[..., :prefix, :prefix] = True
    inner.attn_mask = mask.to(inner.attn_mask.device)
    old = inner.text.freqs_cis
    pairs = old.shape[-2]
    frequencies = 1.0 / 10000.0 ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float32) / (2 * pairs))
    angles = torch.outer(torch.arange(context, dtype=torch.float32), frequencies)
    inner.text.freqs_cis = torch.stack([angles.cos(), angles.sin()], dim=-1).to(old.device)


class Moondream2Adapter(Adapter):
    image_tokens = 730
    grounding = True
    raw_prompts = False  # its own query code writes the prompt

    def load(self) -> None:
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        s = self.settings
        if s.quantization_type != "none":
            raise ModelConfigError("moondream2 runs its own code: QUANTIZATION_TYPE must be none for it")
        kwargs = from_pretrained_kwargs(s, self.device, trust_remote_code=True)
        kwargs.pop("trust_remote_code")
        dtype = kwargs.pop("dtype")
        source = {"revision": kwargs["revision"], "cache_dir": kwargs["cache_dir"]}
        tokenizer = self.tokenizer_file()
        try:
            config = AutoConfig.from_pretrained(s.model_path, trust_remote_code=True, **source)
            remote = get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], s.model_path, **source)
            with tokenizer_from(remote, tokenizer):
                model = with_post_init(remote).from_pretrained(s.model_path, config=config, dtype=dtype, **kwargs)
        except (OSError, ValueError, ModelConfigError):
            raise  # the engine says how to download or where to point
        except Exception as exc:
            raise ModelConfigError(
                f"moondream2's own code from {s.model_path!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        dtype = resolve_dtype(s, self.device)
        model.to(dtype)
        inner = model.model
        restore_tables(inner)
        self._vision_input_as(inner, dtype)
        model._setup_caches()  # the cache modules the rows' buffers are bound into
        # A text-only query would replace those modules with new, zeroed ones; the row's own
        # buffers serve it as well (it masks everything past its own positions).
        inner._setup_caches = lambda: None
        self.model, self.inner = model, inner
        self.tokenizer = inner.tokenizer
        self._counter = type(inner.tokenizer).from_str(inner.tokenizer.to_str())  # for request threads
        self._count_decode_calls(inner)
        config = inner.config
        self.context = config.text.max_context
        self.image_tokens = image_positions(config)
        self.templates = config.tokenizer.templates
        self.bos_id = config.tokenizer.bos_id
        self._pool: list[list[tuple[Any, Any]]] = []
        self._images: OrderedDict[str, Any] = OrderedDict()
        self.image_hits = 0
        smallest = min(len(ids) for ids in self.templates["caption"].values())
        s.max_tokens_cap = min(s.max_tokens_cap, self.context - self.image_tokens - smallest)
        s.max_prompt_tokens = min(s.max_prompt_tokens, self.context - self.image_tokens - smallest - 1)

    def tokenizer_file(self) -> Path:
        """The tokenizer the remote code fetches, at the pinned revision, found offline."""
        s = self.settings
        repo = s.tokenizer_repo or TOKENIZER_REPO
        for folder in (Path(s.model_path) / repo, Path(repo).expanduser()):
            if (folder / "tokenizer.json").is_file():  # a copy beside the weights (air-gapped sites, tiny)
                return folder / "tokenizer.json"
        from huggingface_hub import hf_hub_download

        revision = s.tokenizer_revision or TOKENIZER_REVISION
        try:
            return Path(hf_hub_download(repo, "tokenizer.json", revision=revision, cache_dir=s.hf_cache_dir))
        except Exception as exc:
            raise ModelConfigError(
                f"moondream2's tokenizer {repo}@{revision} is not in the cache "
                f"({s.hf_cache_dir or 'HF default'}) and could not be downloaded ({type(exc).__name__}). "
                "Fetch it with `make models MODELS=moondream2`, or put its tokenizer.json in "
                f"{Path(s.model_path) / repo}"
            ) from exc

    @staticmethod
    def _vision_input_as(inner: Any, dtype: Any) -> None:
        """The code prepares image crops in bfloat16 whatever the weights are: cast them to the
        weights' dtype at the vision encoder's entry (the seam its own ``compile()`` uses)."""
        original = inner._vis_enc

        def encode(crops: Any) -> Any:
            return original(crops.to(dtype))

        inner._vis_enc = encode

    def _count_decode_calls(self, inner: Any) -> None:
        """The stream calls ``_decode_one_tok`` once per generated token: count them per row."""
        original = inner._decode_one_tok
        self._active: _Row | None = None

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._active is not None:
                self._active.tokens += 1
            return original(*args, **kwargs)

        inner._decode_one_tok = counted

    # -- requests (request threads)

    def count_tokens(self, text: str) -> int:
        with self._count_lock:
            return len(self._counter.encode(text).ids)

    def question(self, prepared: Prepared) -> str:
        """The other turns are given to ``query`` as context before the question (the last user message)."""
        last = prompt_message(prepared.messages)
        others = [m for m in prepared.messages if m is not last and m.text.strip()]
        context = "\n".join(f"{m.role}: {m.text.strip()}" for m in others)
        return f"{context}\n{last.text.strip()}" if context else last.text.strip()

    def encode_row(self, prepared: Prepared) -> Task:
        """Parse the command, check its arguments and the context; a bad request fails here."""
        command, _, rest = prompt_message(prepared.messages).text.strip().partition(" ")
        kind = command.lower()[1:] if command.lower() in COMMANDS else "query"
        argument = rest.strip() if kind != "query" else self.question(prepared)
        if kind != "query" and prepared.image is None:
            raise InvalidRequest(f"/{kind} needs an image: attach one to the request")
        if kind == "caption":
            argument = argument.lower() or "normal"
            if argument not in CAPTION_LENGTHS:
                raise InvalidParameter(f"/caption takes one of {', '.join(CAPTION_LENGTHS)}, got {argument!r}")
            prompt = len(self.templates["caption"][argument])
        else:
            if not argument:
                raise InvalidRequest(f"/{kind} needs something to look for, as in '/{kind} person'")
            template = self.templates[kind]
            text = " " + argument if kind != "query" else argument
            with self._count_lock:
                prompt = len(template["prefix"]) + len(self._counter.encode(text).ids) + len(template["suffix"])
            if kind == "query":  # the code appends the suffix twice, and a text-only query starts with BOS
                prompt += len(template["suffix"]) + (1 if prepared.image is None else 0)
        used = (self.image_tokens if prepared.image is not None else 0) + prompt
        task = Task(kind, argument, used, self._image_key(prepared))
        if kind in ("detect", "point"):
            per_object = 3 if kind == "detect" else 2  # x, y (and size), then the next token
            task.max_objects = min(self.settings.max_objects, (self.context - used) // per_object)
            if task.max_objects < 1:
                raise PromptTooLong(f"'{argument[:40]}' leaves no room in moondream2's {self.context} positions")
            return task
        max_tokens = prepared.params.max_tokens
        if used + max_tokens > self.context:
            room = self.context - used
            raise PromptTooLong(
                f"moondream2's context is {self.context} positions: this request needs {used} for its image and "
                f"prompt and max_tokens={max_tokens} more. "
                + (f"Set max_tokens to at most {room}." if room > 0 else "Shorten the prompt.")
            )
        return task

    def _image_key(self, prepared: Prepared) -> str | None:
        if prepared.image is None:
            return None
        data = next((m.images[-1] for m in reversed(prepared.messages) if m.images), None)
        return hashlib.sha256(data).hexdigest() if data is not None else None

    def prefill_cost(self, prepared: Prepared) -> int:
        return prepared.inputs.positions if isinstance(prepared.inputs, Task) else self.image_tokens

    def decoder(self, prepared: Prepared) -> RowDecoder:
        return ChunkDecoder(prepared.inputs, prepared.params.max_tokens)

    # -- rows (the step loop's thread)

    def _modules(self) -> list[Any]:
        return [block.kv_cache for block in self.inner.text.blocks]

    def _bind(self, caches: list[tuple[Any, Any]]) -> None:
        for module, (keys, values) in zip(self._modules(), caches, strict=True):
            module.k_cache, module.v_cache = keys, values

    def _new_caches(self) -> list[tuple[Any, Any]]:
        import torch

        if self._pool:  # zeroed: masked positions must not hold a stale inf or NaN
            caches = self._pool.pop()
            for keys, values in caches:
                keys.zero_()
                values.zero_()
            return caches
        return [(torch.zeros_like(m.k_cache), torch.zeros_like(m.v_cache)) for m in self._modules()]

    def _encoded(self, prepared: Prepared, task: Task) -> Any:
        """The encoded image, from earlier turns when the same image was seen lately."""
        if task.image_key in self._images:
            self._images.move_to_end(task.image_key)
            self.image_hits += 1
            return self._images[task.image_key]
        encoded = self.model.encode_image(prepared.image, {"variant": None})
        if task.image_key and self.settings.encoded_images > 0:
            self._images[task.image_key] = encoded
            while len(self._images) > self.settings.encoded_images:
                self._images.popitem(last=False)
        return encoded

    def _start(self, prepared: Prepared, row: _Row) -> None:
        task, params = row.task, prepared.params
        row.caches = self._new_caches()
        self._bind(row.caches)
        image = self._encoded(prepared, task) if prepared.image is not None else None
        # its code divides the logits by the temperature: 1e-300 would make them inf, then NaN
        temperature = max(params.temperature, SMALLEST_TEMPERATURE) if params.temperature > 0 else 0.0
        settings = {"variant": None, "max_tokens": params.max_tokens, "temperature": temperature}
        settings["top_p"] = params.top_p
        if task.kind == "caption":
            row.stream = self.model.caption(image, length=task.argument, stream=True, settings=settings)["caption"]
        elif task.kind == "query":
            row.stream = self.model.query(image, task.argument, stream=True, settings=settings)["answer"]
        else:  # grounding runs to its end now
            locate = self.model.detect if task.kind == "detect" else self.model.point
            found = locate(image, task.argument, {"variant": None, "max_objects": task.max_objects})
            row.entities = [grounded(task, found)]
            row.stream = iter([summary(task, row.entities[0])])

    def _next(self, row: _Row) -> Any:
        self._bind(row.caches)
        self._active = row
        try:
            return Output(next(row.stream, _END), row.tokens, row.entities)
        except Exception as exc:  # this row's error only
            return exc
        finally:
            self._active = None

    def start(self, prepared: Prepared, generated: list[int]) -> _Row:
        task = prepared.inputs if isinstance(prepared.inputs, Task) else self.encode_row(prepared)
        return _Row(task, prepared)

    def prefill(self, items: list[tuple[_Row, int, int]]) -> list[Any]:
        """Each row's image and prompt through the model's own code (one chunk per row)."""
        outputs = []
        for row, _, _ in items:
            self._active = row
            try:
                self._start(row.prepared, row)
                outputs.append(self._next(row))
            except Exception as exc:  # fails this row alone
                outputs.append(exc)
            finally:
                self._active = None
        return outputs

    def decode(self, state: list[_Row]) -> list[Any]:
        return [self._next(row) for row in state]

    def free(self, row: _Row) -> None:
        """A released row's buffers serve the next rows (up to ``max_running`` sets kept)."""
        if row.caches and len(self._pool) < self.settings.max_running:
            self._pool.append(row.caches)
        row.caches = []
        row.stream = iter(())


def grounded(task: Task, found: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """moondream2's boxes or points as an entity (Kosmos-2's shape), clipped to the image."""

    def clip(value: float) -> float:
        return min(1.0, max(0.0, float(value)))

    entity: dict[str, Any] = {"phrase": task.argument, "span": [0, len(task.argument)]}
    if task.kind == "detect":
        entity["boxes"] = [[clip(o[k]) for k in ("x_min", "y_min", "x_max", "y_max")] for o in found["objects"]]
    else:
        entity["points"] = [[clip(p["x"]), clip(p["y"])] for p in found["points"]]
    return entity


def summary(task: Task, entity: dict[str, Any]) -> str:
    """The answer's text for a grounding request: what was looked for, how many were found."""
    if task.kind == "detect":
        count = len(entity["boxes"])
        return f"{task.argument}: {count} {'box' if count == 1 else 'boxes'}"
    count = len(entity["points"])
    return f"{task.argument}: {count} {'point' if count == 1 else 'points'}"
