"""Per-row token choice: greedy and sampled rows share one decode step.

Each row brings its own settings (``GenerationParams``) and, when it needs one, its own
``RowState``: a generator for a ``seed``, the counts of the tokens it has produced for the
penalties, the grammar matcher of a structured answer, its ``logit_bias`` on the device. The
state lives with the request, so it outlives a preemption.

A row's scores go through, in order: its ``logit_bias`` (added), its penalties, its guide's
mask, then greedy choice or temperature and top-p (vLLM's order: biases before penalties).
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
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias's ids and values (``bias_of``)

    def counted(self, vocab: int, device) -> None:
        """Its counts exist (made on its first penalised step: the prompt's tokens are seen)."""
        if self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in self.prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            self.seen[ids] = True

    def produced(self, token: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def bias_of(sampling: Sampling, state: RowState | None, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's ``logit_bias`` as device tensors: token ids (long) and biases (float32); kept in
    its state, so they are made once per request rather than at every step. Ids past the
    scores' width are left out: ``VLMEngine.prepare`` refuses them, and a row that skipped it (a
    request built by hand) must not index past the scores (on CUDA a device-side assert, fatal
    to every row)."""
    if state is not None and state.bias is not None:
        return state.bias
    pairs = [(token, bias) for token, bias in sampling.logit_bias if token < vocab]
    ids = torch.tensor([token for token, _ in pairs], dtype=torch.long, device=device)
    values = torch.tensor([bias for _, bias in pairs], dtype=torch.float32, device=device)
    if state is not None:
        state.bias = (ids, values)
    return ids, values


def add_bias(
    logits: torch.Tensor, rows: list[int], params: Sequence[GenerationParams], states: Sequence[RowState | None]
) -> None:
    """Each of ``rows``' ``logit_bias`` added to its scores in ``logits`` ``[rows, vocab]``
    (float32), in place: one sparse ``index_put_`` for all of them (an ``index_add_`` for one)."""
    vocab, device = logits.shape[-1], logits.device
    biases = [bias_of(params[i].sampling, states[i], vocab, device) for i in rows]
    if len(rows) == 1:
        ids, values = biases[0]
        logits[rows[0]].index_add_(0, ids, values)
        return
    at = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(ids) for ids, _ in biases])).to(device)
    ids = torch.cat([ids for ids, _ in biases])
    values = torch.cat([values for _, values in biases])
    logits.index_put_((at, ids), values, accumulate=True)


def penalise(logits: torch.Tensor, rows: list[int], states: Sequence[RowState | None]) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with the penalties of ``rows``, applied to them together:
    OpenAI's frequency and presence penalties over each answer so far, transformers'
    repetition penalty over prompt and answer."""
    vocab, device = logits.shape[-1], logits.device
    chosen = [states[i] for i in rows]
    for state in chosen:
        state.counted(vocab, device)
    counts = torch.stack([state.counts for state in chosen])
    seen = torch.stack([state.seen for state in chosen])
    settings = torch.tensor(
        [[s.frequency_penalty, s.presence_penalty, s.repetition_penalty] for s in (st.sampling for st in chosen)],
        dtype=logits.dtype,
        device=device,
    )
    at = torch.tensor(rows, device=device)
    part = logits[at] - settings[:, :1] * counts - settings[:, 1:2] * (counts > 0)
    repetition = settings[:, 2:3]
    part = torch.where(seen, torch.where(part > 0, part / repetition, part * repetition), part)
    # a penalty of 5e-324 is 0 in float32: keep every score finite so sampling stays defined
    big = torch.finfo(torch.float32).max / 4
    logits = logits.clone()
    logits[at] = torch.nan_to_num(part, nan=0.0, posinf=big, neginf=-big)
    return logits


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
    settings: torch.Tensor | None = None,
) -> Choice:
    """One token per row of ``logits`` ``[rows, vocab]``, each with its own settings.

    Greedy rows take the argmax of their own (biased, penalised, grammar-masked) logits, so
    sampled neighbours never change them: a ``logit_bias`` of -100 bans a token for them too,
    +100 all but forces it. Sampled rows use top-k, temperature, then nucleus (top-p) filtering; a seeded row
    draws from its own generator. A row whose scores are unusable gets token 0 and ``usable``
    False; the other rows are unaffected. ``settings`` ``[rows, 2]`` (temperature, top_p on
    the device: the persistent batch's) spares building them from ``params``.
    """
    states = states or [None] * len(params)
    logits = logits.float()
    usable = ~(torch.isnan(logits).any(-1) | (logits == torch.inf).any(-1) | (logits == -torch.inf).all(-1))
    logits = torch.where(usable[:, None], logits, torch.zeros_like(logits))  # a new tensor: the model's stays
    raw = logits  # logprobs are the model's own, before biases and penalties (vLLM's raw logprobs)
    biased = [i for i, p in enumerate(params) if p.sampling.logit_bias]
    if biased:
        if any(p.sampling.logprobs for p in params):
            logits = logits.clone()  # ``raw`` is read for them
        add_bias(logits, biased, params, states)
    penalised = [i for i, s in enumerate(states) if s is not None and s.sampling.penalised]
    if penalised:
        logits = penalise(logits, penalised, states)
    guided = [i for i, s in enumerate(states) if s is not None and s.matcher is not None]
    if guided:
        from vlm_engine.guided import allowed_tokens

        allowed = allowed_tokens(
            [states[i].matcher for i in guided], states[guided[0]].mask_vocab, logits.shape[-1], logits.device
        )
        if not penalised and not biased:
            logits = logits.clone()
        at = torch.tensor(guided, device=logits.device)
        logits[at] = logits[at].masked_fill(~allowed, -torch.inf)
        blocked = torch.zeros_like(usable)
        blocked[at] = ~allowed.any(-1)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        if settings is None:
            settings = torch.tensor([[p.temperature, p.top_p] for p in params], device=logits.device)
        temperature, top_p = settings[index].unbind(-1)
        temperature = temperature.clamp(min=torch.finfo(torch.float32).tiny)  # 1e-300 is 0 in float32
        rows = logits[index]
        top_k = [params[i].sampling.top_k for i in sampled]
        if any(top_k):
            rows = keep_top_k(rows, top_k)
        # shifted so the largest is 0: a tiny temperature gives 0 and -inf (argmax), not inf/inf
        probs = torch.softmax((rows - rows.max(dim=-1, keepdim=True).values) / temperature[:, None], dim=-1)
        order = None
        if any(params[i].top_p < 1 for i in sampled):  # nucleus filtering: the only reason to sort
            probs, order = torch.sort(probs, descending=True, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs
            keep = before < top_p[:, None]
            keep[:, 0] = True  # the likeliest token always stays (top_p 5e-324 is 0 in float32)
            probs = probs * keep
            probs = probs / probs.sum(-1, keepdim=True)
        seeded = [j for j, i in enumerate(sampled) if states[i] is not None and states[i].generator is not None]
        shared = [j for j in range(len(sampled)) if j not in set(seeded)]
        picks = torch.zeros(len(sampled), 1, dtype=torch.long, device=logits.device)
        if shared:
            at = torch.tensor(shared, device=logits.device)
            picks[at] = torch.multinomial(probs[at], 1, generator=generator)
        for j in seeded:  # its own generator: its draws do not depend on the other rows
            picks[j] = torch.multinomial(probs[j : j + 1], 1, generator=states[sampled[j]].generator)[0]
        chosen[index] = (order.gather(-1, picks) if order is not None else picks).squeeze(-1)
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


def keep_top_k(rows: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Each row's ``k`` likeliest tokens kept, the rest at -inf (``k`` 0: all kept; ties at
    the k-th score stay too)."""
    widest = min(max(top_k), rows.shape[-1])
    kth = rows.topk(widest, dim=-1).values
    at = torch.tensor([min(k, widest) - 1 if k else 0 for k in top_k], device=rows.device)
    threshold = kth.gather(-1, at[:, None])
    off = torch.tensor([k == 0 for k in top_k], device=rows.device)
    threshold = torch.where(off[:, None], torch.full_like(threshold, -torch.inf), threshold)
    return rows.masked_fill(rows < threshold, -torch.inf)


def choose_tokens(logits: torch.Tensor, params: Sequence[GenerationParams], generator=None) -> list[int]:
    """The chosen token ids only (see ``choose``)."""
    return choose(logits, params, generator).ids
