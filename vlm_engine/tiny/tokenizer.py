"""Tokenizers for the tiny checkpoints, trained offline on a fixed corpus."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlm_engine.tiny.corpus import corpus


def train_byte_bpe(special_tokens: list[str], vocab_size: int = 1000, **named_tokens: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (the GPT-2 / Llama-3 / Qwen family), left padding for batching."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **named_tokens)


def train_unigram(special_tokens: list[str], vocab_size: int = 1000, **named_tokens: str) -> PreTrainedTokenizerFast:
    """SentencePiece-style unigram with metaspace (the XLM-R family used by Kosmos-2)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        unk_token=named_tokens.get("unk_token"),
        # every printable ASCII character, as XLM-R's vocabulary has: a guide can always write JSON
        initial_alphabet=[chr(c) for c in range(33, 127)],
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **named_tokens)
