"""Per-row token choice: greedy and sampled rows share one decode step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_engine.params import GenerationParams


def choose_tokens(logits: torch.Tensor, params: Sequence[GenerationParams], generator=None) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]``, each with its own settings.

    Greedy rows take the argmax of their own logits only, so sampled neighbours never
    change them. Sampled rows use temperature then nucleus (top-p) filtering.
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs * (before < top_p[:, None])  # the first token always stays
        picks = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
        chosen[index] = order.gather(-1, picks).squeeze(-1)
    return chosen.tolist()
