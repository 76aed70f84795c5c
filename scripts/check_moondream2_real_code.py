"""Check the moondream2 adapter against moondream2's REAL code, with tiny random weights.

    python scripts/check_moondream2_real_code.py --source /path/to/moondream-checkout

``--source`` is a checkout of ``github.com/vikhyat/moondream`` (the code behind revision
2025-06-21 of ``vikhyatk/moondream2`` is its ``moondream/torch/`` of June 2025). Nothing of
it is kept in this repository: its files are copied into a temporary checkpoint folder,
with one change: ``HfConfig`` keeps the sizes written in ``config.json`` (the real one
always uses the full-size defaults, 2B parameters, too slow for random weights on a CPU).
The sizes are small but keep the real shapes the code hard-codes (27 x 27 patches per
crop, so 730 positions per image, and 2048 positions in all). The tokenizer is a tiny one
with the real vocabulary size, put where the adapter looks for ``moondream/starmie-v1``.

It then serves that checkpoint through the engine (the adapter, the in-flight scheduler)
and checks what ``tests/unit/test_moondream2.py`` checks with the stand-in. It needs no
network and no GPU; it is not part of ``make test`` because it needs the external checkout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlm_engine.adapters.moondream2 import TOKENIZER_REPO, tokenizer_from  # noqa: E402
from vlm_engine.chat import Message, single_turn  # noqa: E402
from vlm_engine.engine import VLMEngine  # noqa: E402
from vlm_engine.errors import InvalidRequest, PromptTooLong  # noqa: E402
from vlm_engine.settings import resolve_settings  # noqa: E402
from vlm_engine.tiny.samples import sample_image as image_bytes  # noqa: E402
from vlm_engine.tiny.tokenizer import train_byte_bpe  # noqa: E402

SIZES = {
    "text": {"dim": 128, "ff_dim": 256, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2},  # rotary needs head_dim 64
    "vision": {"enc_dim": 32, "enc_ff_dim": 64, "enc_n_heads": 2, "proj_out_dim": 128, "proj_inner_dim": 64},
    "region": {"dim": 128, "inner_dim": 64, "coord_feat_dim": 32, "size_feat_dim": 32},
}
KEEP_SIZES = ("self.config = {}", 'self.config = kwargs.get("config") or {}')


def build(source: Path, out: Path) -> None:
    """A checkpoint folder of the real code with tiny random weights."""
    code = source / "moondream" / "torch"
    out.mkdir(parents=True)
    for path in code.glob("*.py"):
        text = path.read_text()
        if path.name == "hf_moondream.py":
            assert KEEP_SIZES[0] in text, "hf_moondream.py changed: check HfConfig by hand"
            text = text.replace(*KEEP_SIZES)
        (out / path.name).write_text(text)
    tokenizer = train_byte_bpe(["<|endoftext|>"]).backend_tokenizer
    tokenizer.add_tokens([f" w{i}" for i in range(51200 - tokenizer.get_vocab_size())])  # the real vocab size
    (out / TOKENIZER_REPO).mkdir(parents=True)
    tokenizer.save(str(out / TOKENIZER_REPO / "tokenizer.json"))
    (out / "__init__.py").write_text("")  # importable here, to build the weights
    sys.path.insert(0, str(out.parent))
    hf = importlib.import_module(f"{out.name}.hf_moondream")
    config = hf.HfConfig(config=SIZES)
    with tokenizer_from(hf.HfMoondream, out / TOKENIZER_REPO / "tokenizer.json"):
        model = hf.HfMoondream(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif name.rsplit(".", 2)[-2].startswith(("ln", "post_ln")):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    values = {
        "model_type": "moondream1",
        "config": SIZES,
        "auto_map": {"AutoConfig": "hf_moondream.HfConfig", "AutoModelForCausalLM": "hf_moondream.HfMoondream"},
    }
    (out / "config.json").write_text(json.dumps(values))


def check(models_dir: Path) -> list[str]:
    env = {"VLM_MODELS_DIR": str(models_dir), "WARMUP": "false", "MAX_TOKENS_CAP": "4096"}
    start = time.perf_counter()
    engine = VLMEngine(resolve_settings("moondream2", env=env))
    notes = [f"loaded through the adapter in {time.perf_counter() - start:.1f}s, dtype {engine.adapter.model.dtype}"]
    inner = engine.adapter.model.model
    assert inner.config.text.max_context == 2048 and engine.adapter.image_tokens == 730
    images = [image_bytes((64 + 40 * i, 48 + 30 * i), "PNG", (30 * i, 90, 200 - 20 * i)) for i in range(8)]

    def ask(prompt, image, max_tokens=12):
        return engine.prepare(single_turn(prompt, image), max_tokens, 0.0)

    alone = [engine.generate([ask(f"What is in picture {i}?", images[i], 6 + 2 * i)])[0] for i in range(8)]
    together = engine.generate([ask(f"What is in picture {i}?", images[i], 6 + 2 * i) for i in range(8)])
    assert [r.text for r in together] == [r.text for r in alone], "batched answers differ from single ones"
    notes.append(
        "8 concurrent requests, different images: equal to their single answers "
        f"({len({r.text for r in alone})} distinct)"
    )
    for n in (1, 5, 20):
        result = engine.generate([ask("Describe it.", images[0], n)])[0]
        assert (result.output_tokens, result.finish_reason) == (n, "length"), result
    notes.append("max_tokens 1, 5, 20 reported as 1, 5, 20 tokens, finish_reason length")
    room = 2048 - ask("Describe it.", images[0], 1).inputs.positions
    try:
        ask("Describe it.", images[0], room + 1)
        raise AssertionError("past the context was not refused")
    except PromptTooLong:
        pass
    result = engine.generate([ask("Describe it.", images[0], room)])[0]
    assert result.output_tokens == room, result
    notes.append(f"context: max_tokens {room + 1} refused up front, {room} (the last position) generated in full")
    try:
        ask("/caption", None)
        raise AssertionError("/caption without an image was accepted")
    except InvalidRequest:
        pass
    mixed = engine.generate(
        [
            ask("/caption short", images[1]),
            ask("Say something.", None, 8),
            ask("/detect cat", images[2]),
            ask("/point dog", images[3]),
        ]
    )
    assert mixed[0].text and mixed[1].output_tokens >= 1
    assert mixed[2].entities[0]["boxes"] and mixed[3].entities[0]["points"]
    notes.append(
        f"caption, text-only query, /detect ({len(mixed[2].entities[0]['boxes'])} boxes), "
        f"/point ({len(mixed[3].entities[0]['points'])} points) in one batch"
    )
    history = [Message("user", "What is it?"), Message("assistant", alone[0].text)]
    hits = engine.adapter.image_hits
    engine.generate([engine.prepare([*history, Message("user", "And then?", [images[0]])], 6, 0.0)])
    assert engine.adapter.image_hits == hits + 1
    notes.append("an image seen in an earlier turn is not encoded again")
    engine.close()
    half = VLMEngine(resolve_settings("moondream2", env={**env, "DTYPE": "float16"}))
    assert half.adapter.model.dtype == torch.float16
    assert half.generate([half.prepare(single_turn("Describe it.", images[0]), 4, 0.0)])[0].output_tokens == 4
    half.close()
    notes.append("DTYPE=float16 and float32 (auto on CPU) served, though the code builds bfloat16 weights and crops")
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="a checkout of github.com/vikhyat/moondream")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build(args.source, models / "moondream2")
        for line in check(models):
            print("ok:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
