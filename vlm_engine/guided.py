"""Structured output: a grammar per row (JSON schema, JSON object, regex, choice) through llguidance.

``Grammars`` belongs to one loaded model: it wraps the model's tokenizer for llguidance once and
compiles each request's ``Guide`` into an ``LLMatcher`` on the request's thread, so a bad schema
is a 400 before the request is queued. In the decode step, ``allowed_tokens`` turns the matchers
of the guided rows into one boolean mask ``[rows, vocab]`` on the device (one small bitmask copy),
and ``advance`` feeds each row's chosen token back to its matcher.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from vlm_engine.errors import EngineError, GuideNotWritable, InvalidParameter
from vlm_engine.params import Guide

# compact JSON (no free whitespace): a model cannot pad an answer with endless spaces; a schema
# may still ask for whitespace with {"x-guidance": {"whitespace_flexible": true}}
JSON_DEFAULTS = {"whitespace_flexible": False}
METASPACE = "\u2581"


class Grammars:
    """llguidance's view of one model's tokenizer, and a matcher per guided request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._llg: Any = None
        self._lock = threading.Lock()

    def tokenizer_for_llguidance(self) -> Any:
        """Built once (about a second for a 150k vocabulary), on the first guided request."""
        with self._lock:
            if self._llg is None:
                self._llg = _llg_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._llg

    @property
    def mask_vocab(self) -> int:
        return self.tokenizer_for_llguidance().vocab_size

    def matcher(self, guide: Guide) -> Any:
        """A fresh matcher for ``guide``; ``InvalidParameter`` says what is wrong with it."""
        from llguidance import LLMatcher

        grammar = grammar_of(guide)
        matcher = LLMatcher(self.tokenizer_for_llguidance(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParameter(f"{guide.describe()} cannot be used: {_first_line(matcher.get_error())}")
        if not matcher.is_accepting() and not self._writes_a_first_token(matcher):
            raise GuideNotWritable(
                f"{guide.describe()} cannot be written with this model's vocabulary: no token writes the "
                "text it must start with; leave out the characters the model cannot write"
            )
        return matcher

    def _writes_a_first_token(self, matcher: Any) -> bool:
        """Whether the grammar's first mask allows a token other than end-of-sequence (llguidance
        allows only end-of-sequence where no token can write what comes next)."""
        mask = bytearray(matcher.compute_bitmask())
        for eos in self.eos_ids:
            if eos // 8 < len(mask):
                mask[eos // 8] &= ~(1 << (eos % 8)) & 0xFF
        return any(mask)


def grammar_of(guide: Guide) -> str:
    """llguidance's grammar text for ``guide``."""
    from llguidance import LLMatcher

    if guide.kind in ("json_schema", "json_object"):
        try:
            return LLMatcher.grammar_from_json_schema(guide.spec, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise InvalidParameter(f"{guide.describe()} is not a JSON schema: {exc}") from None
    if guide.kind == "regex":
        return LLMatcher.grammar_from_regex(guide.spec)
    if guide.kind == "lark":  # made by the engine (tool calls, vlm_engine.tools)
        return LLMatcher.grammar_from_lark(guide.spec)
    # choice: a Lark rule of string literals (JSON string syntax), so no character is special
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(guide.spec)))


def allowed_tokens(matchers: Sequence[Any], mask_vocab: int, vocab: int, device: Any) -> Any:
    """Boolean ``[len(matchers), vocab]`` on ``device``: the tokens each matcher accepts next.
    ``mask_vocab`` is llguidance's vocabulary size; tokens past it (padding rows of the output
    layer) are never allowed. (Not ``llguidance.torch``: importing it starts torch.compile.)"""
    import torch

    rows, words = len(matchers), (mask_vocab + 31) // 32
    bitmask = _host_buffer(rows, words, str(device).startswith("cuda"))
    _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), words * 4, rows)
    packed = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    bits = ((packed[:, :, None] >> shifts) & 1).reshape(rows, -1).bool()
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.cat([bits, bits.new_zeros(rows, vocab - bits.shape[1])], dim=1)


_BUFFERS = threading.local()  # one per step thread (each model's scheduler has its own)


def _host_buffer(rows: int, words: int, pinned: bool) -> Any:
    """The bitmask's host memory, reused across steps (pinned on CUDA, so the copy is async; the
    step's host sync comes before the next step writes it again)."""
    import torch

    buffer = getattr(_BUFFERS, "bitmask", None)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != words:
        buffer = _BUFFERS.bitmask = torch.empty((max(rows, 16), words), dtype=torch.int32, pin_memory=pinned)
    return buffer[:rows]


def advance(matcher: Any, token: int) -> EngineError | None:
    """Feed the chosen ``token`` to ``matcher``; the row's error when that ends it badly: the
    request's (400) where llguidance stopped because nothing could write the rest, the engine's
    (500) where the mask allowed a token the grammar then refused (a vocabulary mismatch)."""
    if not matcher.consume_token(token):
        return EngineError(f"structured output failed: {_first_line(matcher.get_error())}")
    if matcher.is_stopped() and not matcher.is_accepting():
        return GuideNotWritable(
            "structured output failed: the grammar asks for text this model's vocabulary cannot write, "
            "so the answer ended before the grammar was complete"
        )
    return None


_EXECUTOR: Any = None


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        import os

        from llguidance import LLExecutor

        _EXECUTOR = LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
    return _EXECUTOR


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown grammar error"


def _llg_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> Any:
    """llguidance reads byte-level BPE tokenizers (GPT-2, Qwen, Llama 3) itself; sentencepiece-style
    vocabularies (Metaspace ``▁``, byte fallback ``<0x0A>``: Kosmos-2's XLM-R Unigram, LLaVA-1.5's
    Llama BPE) get each token's bytes from this module."""
    import llguidance.hf
    from llguidance import LLTokenizer, TokenizerWrapper

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
    except ValueError:
        return LLTokenizer(TokenizerWrapper(_SentencePieceBytes(tokenizer)), n_vocab=vocab_size, eos_token=eos_ids)


class _SentencePieceBytes:
    """What ``TokenizerWrapper`` needs: every token's bytes, the special ids, and a tokenizer of
    text (greedy longest match over the same bytes, so forced text never gains a leading ``▁``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(set(tokenizer.all_special_ids))
        special = set(self.special_token_ids)
        self.tokens: list[bytes] = []
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            piece = piece or ""
            if i in special:
                data = piece.encode()
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                data = bytes([int(piece[3:5], 16)])
            else:
                data = piece.replace(METASPACE, " ").encode()
            self.tokens.append(data)
            if i not in special and data:
                self._ids.setdefault(data, i)
        self._longest = max((len(b) for b in self._ids), default=1)

    def __call__(self, text: str) -> list[int]:
        if isinstance(text, bytes):
            raise TypeError("text only")  # tells TokenizerWrapper to pass str
        data, out, at = text.encode(), [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at : at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                break  # a byte the vocabulary cannot write: what follows it cannot be written either
        return out
