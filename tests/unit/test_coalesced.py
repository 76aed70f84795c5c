"""The service's stream coalescing (issue 19): a consumer that keeps up gets every chunk; one
that falls behind gets the chunks that piled up joined per answer, in order, finals kept."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_app.backends.base import Delta, Final
from fastapi_app.generation import coalesced
from vlm_engine.errors import EngineError


async def source(items, pause=0.0):
    for item in items:
        if pause:
            await asyncio.sleep(pause)
        yield item


def final(index=0):
    return Final("x", 1, 1, "stop", index=index)


def test_a_fast_consumer_gets_every_chunk():
    async def run():
        return [item async for item in coalesced(source([Delta("a"), Delta("b"), final()], pause=0.01))]

    out = asyncio.run(run())
    assert out[:2] == ["a", "b"] and isinstance(out[2], Final)


def test_a_slow_consumer_gets_the_piled_up_text_joined_per_answer():
    async def run():
        out = []
        items = [Delta("a", [{"t": 1}]), Delta("x", None, 1), Delta("b", [{"t": 2}]), final(1), Delta("c"), final(0)]
        async for item in coalesced(source(items)):
            out.append(item)
            await asyncio.sleep(0.05)  # busy writing to a slow client: the rest piles up
        return out

    out = asyncio.run(run())
    texts = [(str(i), i.index) for i in out if not isinstance(i, Final)]
    assert "".join(t for t, index in texts if index == 0) == "abc" and len(texts) < 4
    assert [i.index for i in out if isinstance(i, Final)] == [1, 0] and isinstance(out[-1], Final)
    joined = next(i for i in out if not isinstance(i, Final) and i.index == 0)
    assert joined.logprobs and [e["t"] for e in joined.logprobs][:2] == [1, 2]


def test_an_error_comes_through_after_the_text_before_it():
    async def failing():
        yield Delta("a")
        raise EngineError("boom")

    async def run():
        seen = []
        with pytest.raises(EngineError, match="boom"):
            async for item in coalesced(failing()):
                seen.append(item)
        return seen

    assert asyncio.run(run()) == ["a"]
