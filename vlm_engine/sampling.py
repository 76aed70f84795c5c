"""Per-row token choice: greedy and sampled rows share one decode step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_engine.params import GenerationParams


@dataclass
class Choice:
    """The chosen tokens on the device (the next step's input) and on the host; ``usable``
    is False for a row whose scores were NaN, +inf or all -inf (its token is meaningless)."""

    tensor: torch.Tensor
    ids: list[int]
    usable: list[bool]


def choose(logits: torch.Tensor, params: Sequence[GenerationParams], generator=None) -> Choice:
    """One token per row of ``logits`` ``[rows, vocab]``, each with its own settings; one
    host synchronisation for the whole step.

    Greedy rows take the argmax of their own logits only, so sampled neighbours never
    change them. Sampled rows use temperature then nucleus (top-p) filtering. A row whose
    scores are unusable gets token 0 and ``usable`` False; the other rows are unaffected.
    """
    logits = logits.float()
    usable = ~(torch.isnan(logits).any(-1) | (logits == torch.inf).any(-1) | (logits == -torch.inf).all(-1))
    logits = torch.where(usable[:, None], logits, torch.zeros_like(logits))
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        temperature = temperature.clamp(min=torch.finfo(torch.float32).tiny)  # 1e-300 is 0 in float32
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
        rows = logits[index]
        # shifted so the largest is 0: a tiny temperature gives 0 and -inf (argmax), not inf/inf
        probs = torch.softmax((rows - rows.max(dim=-1, keepdim=True).values) / temperature[:, None], dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = before < top_p[:, None]
        keep[:, 0] = True  # the likeliest token always stays (top_p 5e-324 is 0 in float32)
        sorted_probs = sorted_probs * keep
        picks = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
        chosen[index] = order.gather(-1, picks).squeeze(-1)
    chosen = torch.where(usable, chosen, torch.zeros_like(chosen))
    host = torch.stack([chosen, usable.long()]).tolist()  # the step's one sync
    return Choice(chosen, host[0], [bool(u) for u in host[1]])


def choose_tokens(logits: torch.Tensor, params: Sequence[GenerationParams], generator=None) -> list[int]:
    """The chosen token ids only (see ``choose``)."""
    return choose(logits, params, generator).ids
