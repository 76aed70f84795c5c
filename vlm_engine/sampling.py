"""Per-row token choice: greedy and sampled rows share one decode step.

Each row brings its own settings (``GenerationParams``) and, when it needs one, its own
``RowState``: a generator for a ``seed``, the counts of the tokens it has produced for the
penalties, the grammar matcher of a structured answer. The state lives with the request, so
it outlives a preemption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_engine.errors import EngineError, GuideNotWritable
from vlm_engine.params import GenerationParams, Sampling


class RowState:
    """One request's sampling state on the device."""

    def __init__(
        self, sampling: Sampling, prompt_ids: Sequence[int], device, matcher: Any = None, mask_vocab: int = 0
    ) -> None:
        self.sampling = sampling
        self.matcher = matcher  # llguidance LLMatcher (``guided.Grammars.matcher``)
        self.mask_vocab = mask_vocab
        self.device = device
        self.prompt_ids = list(prompt_ids)
        self.generator: torch.Generator | None = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed % 2**64)
        self.counts: torch.Tensor | None = None  # [vocab] tokens produced so far
        self.seen: torch.Tensor | None = None  # [vocab] tokens in the prompt or produced

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[vocab]`` with this row's penalties (OpenAI's frequency and presence
        penalties over the answer so far; transformers' repetition penalty over prompt and answer)."""
        s = self.sampling
        if self.counts is None:
            self.counts = torch.zeros(logits.shape[-1], device=logits.device)
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            ids = torch.tensor([i for i in self.prompt_ids if 0 <= i < logits.shape[-1]], device=logits.device)
            self.seen[ids] = True
        if s.frequency_penalty:
            logits = logits - s.frequency_penalty * self.counts
        if s.presence_penalty:
            logits = logits - s.presence_penalty * (self.counts > 0)
        if s.repetition_penalty != 1.0:
            scaled = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(self.seen, scaled, logits)
        # a penalty of 5e-324 is 0 in float32: keep every score finite so sampling stays defined
        big = torch.finfo(torch.float32).max / 4
        return torch.nan_to_num(logits, nan=0.0, posinf=big, neginf=-big)

    def produced(self, token: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the ``top`` alternatives, ``(id, logprob)``
    best first, from the model's own distribution (before penalties and temperature)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Choice:
    """The chosen tokens on the device (the next step's input) and on the host; ``usable``
    is False for a row whose scores were NaN, +inf or all -inf (its token is meaningless);
    ``logprobs`` for the rows that asked for them; ``errors`` for rows whose grammar failed
    (``GuideNotWritable`` where the vocabulary cannot write what it asks for)."""

    tensor: torch.Tensor
    ids: list[int]
    usable: list[bool]
    logprobs: list[TokenLogprob | None]
    errors: dict[int, EngineError] = field(default_factory=dict)


def choose(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    generator=None,
    states: Sequence[RowState | None] | None = None,
) -> Choice:
    """One token per row of ``logits`` ``[rows, vocab]``, each with its own settings.

    Greedy rows take the argmax of their own (penalised, grammar-masked) logits, so sampled
    neighbours never change them. Sampled rows use temperature then nucleus (top-p) filtering; a seeded row
    draws from its own generator. A row whose scores are unusable gets token 0 and ``usable``
    False; the other rows are unaffected.
    """
    states = states or [None] * len(params)
    logits = logits.float()
    usable = ~(torch.isnan(logits).any(-1) | (logits == torch.inf).any(-1) | (logits == -torch.inf).all(-1))
    logits = torch.where(usable[:, None], logits, torch.zeros_like(logits))
    raw = logits
    penalised = [i for i, s in enumerate(states) if s is not None and s.sampling.penalised]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            logits[i] = states[i].penalise(logits[i])
    guided = [i for i, s in enumerate(states) if s is not None and s.matcher is not None]
    if guided:
        from vlm_engine.guided import allowed_tokens

        allowed = allowed_tokens(
            [states[i].matcher for i in guided], states[guided[0]].mask_vocab, logits.shape[-1], logits.device
        )
        if not penalised:
            logits = logits.clone()
        at = torch.tensor(guided, device=logits.device)
        logits[at] = logits[at].masked_fill(~allowed, -torch.inf)
        blocked = torch.zeros_like(usable)
        blocked[at] = ~allowed.any(-1)
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
        sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
        seeded = [j for j, i in enumerate(sampled) if states[i] is not None and states[i].generator is not None]
        shared = [j for j in range(len(sampled)) if j not in set(seeded)]
        picks = torch.zeros(len(sampled), 1, dtype=torch.long, device=logits.device)
        if shared:
            at = torch.tensor(shared, device=logits.device)
            picks[at] = torch.multinomial(sorted_probs[at], 1, generator=generator)
        for j in seeded:  # its own generator: its draws do not depend on the other rows
            picks[j] = torch.multinomial(sorted_probs[j : j + 1], 1, generator=states[sampled[j]].generator)[0]
        chosen[index] = order.gather(-1, picks).squeeze(-1)
    if guided:
        usable = usable & ~blocked
    chosen = torch.where(usable, chosen, torch.zeros_like(chosen))
    for i in penalised:
        states[i].produced(chosen[i])
    wanted = [i for i, p in enumerate(params) if p.sampling.logprobs]
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    if wanted:
        at = torch.tensor(wanted, device=logits.device)
        lp = torch.log_softmax(raw[at], dim=-1)
        mine = lp.gather(-1, chosen[at][:, None]).squeeze(-1)
        k = max(max(params[i].sampling.top_logprobs for i in wanted), 1)
        top = lp.topk(k, dim=-1)
        host_lp = [mine.tolist(), top.values.tolist(), top.indices.tolist()]
    stacked = [chosen, usable.long()] + ([blocked.long()] if guided else [])
    host = torch.stack(stacked).tolist()  # the step's one sync (two with logprobs)
    for n, i in enumerate(wanted):
        count = params[i].sampling.top_logprobs
        pairs = tuple(zip(host_lp[2][n][:count], host_lp[1][n][:count], strict=True))
        logprobs[i] = TokenLogprob(host[0][i], host_lp[0][n], pairs)
    errors: dict[int, EngineError] = {}
    if guided:
        from vlm_engine.guided import advance

        for i in guided:
            if host[2][i]:
                message = "structured output failed: the grammar allows no token this model can write here"
                errors[i] = GuideNotWritable(message)
            elif host[1][i]:
                error = advance(states[i].matcher, host[0][i])
                if error is not None:
                    errors[i] = error
    return Choice(chosen, host[0], [bool(u) and i not in errors for i, u in enumerate(host[1])], logprobs, errors)


def choose_tokens(logits: torch.Tensor, params: Sequence[GenerationParams], generator=None) -> list[int]:
    """The chosen token ids only (see ``choose``)."""
    return choose(logits, params, generator).ids
