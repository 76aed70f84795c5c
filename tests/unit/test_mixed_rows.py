"""One running batch of differently-sampled rows (issue 18): a grammar row, a seeded sampled
row, a penalised greedy row and a plain greedy row, joining a batch that already runs, each
get exactly the answer they get alone."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_scheduler import Request, make_engine, prepare
from tests.unit.test_structured_output import SCHEMA

KINDS = {
    "grammar": (0.0, {"guide": {"json_schema": SCHEMA}}),
    "seeded": (1.0, {"seed": 11}),
    "penalised": (0.0, {"frequency_penalty": 1.5, "repetition_penalty": 1.3}),
    "greedy": (0.0, {}),
}


@pytest.mark.parametrize("model", ["llava", "qwen3-vl", "kosmos2"])
def test_four_kinds_of_rows_in_one_batch_get_their_solo_answers(tiny_models_dir, model):
    engine = make_engine(tiny_models_dir, model)
    try:
        alone = {}
        for i, (kind, (temperature, sampling)) in enumerate(KINDS.items()):
            alone[kind] = engine.generate([prepare(engine, i, 96, temperature, sampling=sampling)])[0].text
        json.loads(alone["grammar"])
        requests = {}
        for i, (kind, (temperature, sampling)) in enumerate(KINDS.items()):
            requests[kind] = Request(engine, prepare(engine, i, 96, temperature, sampling=sampling))
            requests[kind].first_text()  # the next kind joins a batch that is already running
        assert {kind: r.result().text for kind, r in requests.items()} == alone
        assert engine.scheduler.stats.largest_batch >= 2
    finally:
        engine.close()
