"""The model runner: one packed forward per step for the HF decoder models.

Each step carries a token for every decoding row and prompt chunks of others as one flat
sequence with per-token positions, no padding, logits only where a token is chosen:

- **decode rows** come from the persistent batch (``batch.PersistentBatch``): their tokens,
  positions, block tables and lengths are views of tensors allocated once and updated by
  difference; after the forward the chosen tokens become the next inputs in place;
- **prompt chunks** are cut from each row's prompt tensors; the images a step's chunks reach
  go through the vision encoder in one batch (``encoder_cache.EncoderCache`` keeps them by
  content), and each chunk takes the slice of encoder output its image tokens cover;
- the pages a step fills are registered by hash (prefix caching, ``kv.manager``).

The adapter describes its model (inputs, positions, image encoding, the forward call); the
runner owns the pool, the batch, the encoder cache and the step.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vlm_engine.batch import PersistentBatch
from vlm_engine.encoder_cache import EncoderCache
from vlm_engine.kv.cache import ATTENTION, COMPILED_ATTENTION, DecodeRows, StepCache, forward_over, pack
from vlm_engine.kv.flashinfer_attention import FlashInferAttention, Layout, layout
from vlm_engine.kv.manager import page_hashes
from vlm_engine.kv.pool import KVPool

if TYPE_CHECKING:
    from vlm_engine.adapters.base import GenerateAdapter, Sequence

log = logging.getLogger("vlm_engine.runner")
Chunk = tuple["Sequence", int, int]  # a row, and the [start, end) of its prompt this step carries


def own_code(module: torch.nn.Module) -> torch.nn.Module:
    """``module``, made an instance of a subclass of its own whose ``forward`` is the same
    function with a code object of its own. torch.compile keeps compiled graphs on the code
    object it first runs (a model class's ``forward``, shared by every instance) under guards;
    without guards on modules (``skip_guard_on_all_nn_modules_unsafe``, for the step's host
    time) a graph traced for one engine's model was taken for another model of the same class
    in the same process (other sizes: a wrong shape at run time). The module itself is still
    what is compiled, so the guards on its weights stay skipped (a closure over it would keep
    them: 10-15% slower); a subclass, not a bound method on the instance, so the model is freed
    as soon as it is dropped. A module with a forward set on the instance (hooks: accelerate's
    offloading) is left as it is."""
    cls = type(module)
    if "forward" in vars(module) or getattr(cls, "_own_code", False):
        return module
    forward = cls.forward
    code = forward.__code__.replace(co_name=f"{forward.__name__}_of_{id(module):x}")
    own = types.FunctionType(code, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__)
    own.__kwdefaults__, own.__qualname__, own.__doc__ = forward.__kwdefaults__, forward.__qualname__, forward.__doc__
    # the signature HF reads, but no ``__wrapped__``: torch.compile would follow it to the shared code
    own.__dict__.update({k: v for k, v in forward.__dict__.items() if k != "__wrapped__"})
    own.__signature__ = inspect.signature(forward)
    module.__class__ = type(cls.__name__, (cls,), {"forward": own, "_own_code": True, "__module__": cls.__module__})
    return module


class ModelRunner:
    def __init__(
        self,
        adapter: GenerateAdapter,
        pool: KVPool,
        read_in_place: bool,
        max_rows: int,
        max_tokens: int,
        compile_step: bool = False,
        compile_chunks: bool = False,
        paged: FlashInferAttention | None = None,
    ):
        self.adapter = adapter
        self.kv = pool
        self.device = adapter.device
        self.read_in_place = read_in_place or paged is not None
        self.paged = paged  # flashinfer's kernels: every row's attention reads its pages in place
        settings = adapter.settings
        self.encoder_cache = EncoderCache(settings.encoded_images, settings.encoder_cache_mb * 2**20)
        self.batch = PersistentBatch(
            max_rows, pool.pages.pages_for(max_tokens) + 1, adapter.position_rows, pool.page_size, self.device
        )
        # steps through torch.compile, dynamic in the rows and tokens, without guards on the
        # modules and weights (they never change while it serves): decode-only steps (the
        # bulk) as the whole model from token ids; with ``compile_chunks`` (``COMPILE_STEP=all``)
        # steps carrying prompt chunks too, as the language model from embeddings made outside
        # the graph (``adapters.embedded``), where the adapter has that module. Else those run
        # eager: HF's image placement by boolean mask makes inductor recompile while serving.
        # Each model gets a forward of its own code first (``own_code``): without module guards,
        # graphs kept for another engine's model of the same class would be taken for this one
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self.compiled_steps = 0  # forwards that ran compiled
        self.compiled_chunk_steps = 0  # ... of them, steps that carried prompt chunks
        self.compiled = self.compiled_chunks = None
        if compile_step:  # a few graphs (one row or token; any number) per model in this process
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled = torch.compile(own_code(adapter.forward_module()), dynamic=True, options=options)
            chunk_module = adapter.chunk_module() if compile_chunks else None
            if chunk_module is not None:
                self.compiled_chunks = torch.compile(own_code(chunk_module), dynamic=True, options=options)

    # -- one step

    def step(self, decodes: list[Sequence], chunks: list[Chunk]) -> tuple[list[Any], list[Any]]:
        """An output per decoding row (in the order given) and per chunk (``None`` for a chunk
        that does not complete its prompt)."""
        self.kv.scrub(self.kv.pages.take_fresh())
        rows, decode = self._decode_rows(decodes)
        self._encode_step_images(chunks)
        pieces = [piece for seq, start, end in chunks for piece in self._image_pieces(seq, start, end)]
        inputs, positions = self._inputs(rows, chunks, bool(pieces))

        def eager() -> dict[str, Any]:  # the model's own inputs, images placed by HF's code
            return {**inputs, **self.adapter.image_inputs(pieces)} if pieces else inputs

        # a step of one token, or with one image token, runs eager: a graph for it (sizes 0 and 1
        # are specialised) would be one more compile while serving
        embedded = bool(chunks) and self.compiled_chunks is not None and positions.shape[-1] > 1
        embedded = embedded and sum(len(piece[0]) for piece in pieces) != 1
        module = self.compiled_chunks if embedded else None if chunks else self.compiled
        step = pack(self.kv, decode, [(s.key, a, b) for s, a, b in chunks], self.device, self.paged is None)
        if self.paged is not None:
            step.paged = self.paged.step(*self._paged_layouts(rows, chunks))
        done = [i for i, (seq, _, end) in enumerate(chunks) if end == seq.length]
        keep = list(range(len(rows))) + [step.chunks[i].end - 1 for i in done]
        last = [s.last for s in rows]
        with torch.inference_mode(), forward_over(self.kv, step):
            out = self._forward(
                self.adapter.embed_step(inputs, pieces, len(rows)) if embedded else eager(),
                positions,
                StepCache(step, 0 if pieces else 1),
                torch.tensor(keep, dtype=torch.long, device=self.device),
                module,
                eager,
            )
            settings = self.batch.sampling[: len(rows)] if rows and not done else None  # decode rows alone
            outputs, chosen = self.choose(out.logits[0], [*rows, *(chunks[i][0] for i in done)], settings)
            if rows:
                self.batch.advance(chosen[: len(rows)])
        for seq, token in zip(rows, last, strict=True):  # only once the forward has run: a failed
            seq.ids.append(token)  # step is tried again, and its tokens must not be counted twice
            seq.cached += 1
        for seq, _, end in chunks:
            seq.cached = end
            if end == seq.length:
                seq.encoded.clear()  # its prompt is in: the encoder outputs it held go back to the cache alone
        for seq in (*rows, *(seq for seq, _, _ in chunks)):
            self._register(seq)
        by_row = dict(zip((s.key for s in rows), outputs[: len(rows)], strict=True))
        finished: list[Any] = [None] * len(chunks)
        for i, output in zip(done, outputs[len(rows) :], strict=True):
            finished[i] = output
        return [by_row[s.key] for s in decodes], finished

    def _forward(
        self, inputs: dict[str, Any], positions: Any, cache: StepCache, keep: Any, module: Any, eager: Callable
    ) -> Any:
        """The step's forward: through ``module`` (compiled) when given, else eager; ``eager()``:
        the inputs of the eager forward, should the compiled one fail."""
        if module is None:
            return self.adapter.forward(inputs, positions, cache, keep)
        config = self.adapter.text_config()
        config._attn_implementation = COMPILED_ATTENTION  # every attention of the graph is the op
        if module is self.compiled_chunks:  # one graph for any count of finished prompts, one included
            torch._dynamo.decorators.mark_unbacked(keep, 0)
        try:
            out = self.adapter.forward(inputs, positions, cache, keep, module=module)
        except torch._dynamo.exc.TorchDynamoException as exc:  # no compiler, an unsupported model: eager
            chunks = module is self.compiled_chunks
            log.warning(
                "%s: the compiled step failed (%s); %s steps run eager",
                self.adapter.settings.name,
                exc,
                "prompt" if chunks else "decode",
            )
            if chunks:
                self.compiled_chunks = None
            else:
                self.compiled = None
            return self.adapter.forward(eager(), positions, cache, keep)
        finally:
            config._attn_implementation = ATTENTION
        self.compiled_steps += 1
        self.compiled_chunk_steps += module is self.compiled_chunks
        return out

    def choose(
        self, logits: torch.Tensor, seqs: list[Sequence], settings: torch.Tensor | None = None
    ) -> tuple[list[Any], torch.Tensor]:
        """Each row's next token (on the host, and the device tensor of them); a row whose
        logits are not usable gets its own error as its output. ``settings``: the rows'
        temperature and top_p from the persistent batch, when the step is its rows alone."""
        from vlm_engine.errors import EngineError
        from vlm_engine.sampling import choose

        choice = choose(logits, [s.params for s in seqs], states=[s.state for s in seqs], settings=settings)
        outputs: list[Any] = []
        rows = zip(seqs, choice.ids, choice.usable, choice.logprobs, strict=True)
        for i, (seq, token, usable, logprob) in enumerate(rows):
            seq.last = token
            if i in choice.errors:  # the row's grammar failed
                outputs.append(choice.errors[i])
            elif not usable:
                outputs.append(EngineError("the model produced non-finite scores for this request"))
            else:
                outputs.append(logprob if logprob is not None else token)
        return outputs, choice.tensor

    def _paged_layouts(self, rows: list[Sequence], chunks: list[Chunk]) -> tuple[Layout | None, Layout | None]:
        """The step's rows as flashinfer's plan takes them (on the host, from the pages the KV
        manager lists): decode rows with one query each, chunks with theirs."""
        pages, size = self.kv.pages.pages, self.kv.page_size
        decodes = layout([(pages(s.key), s.cached + 1, 1) for s in rows], size) if rows else None
        prompts = layout([(pages(s.key), end, end - start) for s, start, end in chunks], size) if chunks else None
        return decodes, prompts

    def _decode_rows(self, decodes: list[Sequence]) -> tuple[list[Sequence], DecodeRows | None]:
        """The decoding rows in the batch's order, and their part of the pack."""
        if not decodes:
            return [], None
        batch = self.batch
        slots = batch.update(decodes, self.kv.pages.pages, self.adapter.next_positions)
        rows: list[Any] = [None] * len(decodes)
        for seq, slot in zip(decodes, slots, strict=True):
            rows[slot] = seq
        n = len(rows)
        return rows, DecodeRows(
            slots=batch.slots(),
            table=batch.tables[:n] if self.read_in_place else batch.tables[:n, : batch.width()],
            lengths=batch.lengths[:n] + 1,
            tokens=sum(s.cached + 1 for s in rows),
            in_place=self.read_in_place,
        )

    def _inputs(self, rows: list[Sequence], chunks: list[Chunk], images: bool) -> tuple[dict[str, Any], Any]:
        """The flat sequence's per-token inputs and positions: decode rows first, then chunks."""
        n = len(rows)
        keys = dict.fromkeys(k for seq, _, _ in chunks for k in seq.tokens) or {"input_ids": None}
        inputs: dict[str, Any] = {}
        for key in keys:
            head = self.batch.tokens[:n] if key == "input_ids" else None
            parts = [seq.tokens[key][start:end] for seq, start, end in chunks]
            if not parts:  # a copy: a view of the batch's tensor would tie a compiled graph to its base
                inputs[key] = head[None].clone()
                continue
            tail = torch.cat(parts).to(self.device)
            if n:
                head = head if head is not None else tail.new_zeros(n)
                tail = torch.cat([head, tail])
            inputs[key] = tail[None]
        if not images:
            inputs = self.adapter.text_only(inputs)
        head = self.batch.positions[:, :n]
        if head.shape[0] == 1:
            head = head[0]
        if chunks:
            tail = torch.cat([seq.positions[..., start:end] for seq, start, end in chunks], -1).to(self.device)
            head = torch.cat([head, tail], -1) if n else tail
        return inputs, head.unsqueeze(-2).clone()  # no view: a compiled graph would be tied to its base

    def _register(self, seq: Sequence) -> None:
        """Its pages filled so far are known by hash: later prompts that start the same way share them."""
        pages, size = self.kv.pages, self.kv.page_size
        if not pages.caching or seq.image_runs is None:
            return
        full = seq.cached // size
        if full > len(seq.hashes):
            parent = seq.hashes[-1] if seq.hashes else b""
            seq.hashes += page_hashes(seq.ids[: full * size], seq.image_runs, size, len(seq.hashes), parent)
        pages.register(seq.key, seq.hashes[:full])

    # -- images: the vision encoder's output, by content, sliced chunk by chunk

    def _image_pieces(self, seq: Sequence, start: int, end: int) -> list[tuple[Any, ...]]:
        """The slices of encoder output that tokens ``[start, end)`` of ``seq`` take, in order."""
        pieces = []
        for index, (first, last, _) in enumerate(seq.image_runs):
            low, high = max(start, first), min(end, last)
            if low < high:
                encoded = seq.encoded[index]  # held since ``_encode_step_images``
                pieces.append(tuple(part[low - first : high - first] for part in encoded))
        return pieces

    def needs_encoder(self, seq: Sequence, start: int, end: int) -> bool:
        """Whether tokens ``[start, end)`` of ``seq`` reach an image that neither the row holds
        nor the encoder cache has (a step carrying them calls the vision encoder)."""
        cache = self.encoder_cache
        for index, (first, last, key) in enumerate(seq.image_runs or []):
            if max(start, first) < min(end, last) and index not in seq.encoded and key not in cache:
                return True
        return False

    def _encode_step_images(self, chunks: list[Chunk]) -> None:
        """Every image the step's chunks reach that is neither held by its row nor in the
        encoder cache goes through the vision encoder in one batch (an image sent by several
        rows, once); each row then holds its images' outputs until its prompt is in."""
        cache = self.encoder_cache
        wanted: dict[str, Any] = {}
        needed: list[tuple[Sequence, int, str]] = []
        for seq, start, end in chunks:
            for index, (first, last, key) in enumerate(seq.image_runs):
                if max(start, first) >= min(end, last) or index in seq.encoded:
                    continue
                needed.append((seq, index, key))
                if key not in cache:
                    wanted.setdefault(key, (seq, index))
        if wanted:
            with torch.inference_mode():
                outputs = self.adapter.encode_images([self.adapter.image_pixels(s, i) for s, i in wanted.values()])
            for key, found in zip(list(wanted), outputs, strict=True):
                cache.keep(key, found)
                wanted[key] = found
        for seq, index, key in needed:
            seq.encoded[index] = wanted[key] if key in wanted else cache.take(key)
