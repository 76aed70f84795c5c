"""Build tiny random-weight checkpoints of the four architectures (``make tiny-models``).

Each checkpoint has about a million parameters, a real tokenizer trained on a fixed corpus
and a real processor, is written with ``save_pretrained`` and is loaded back by the engine
through exactly the code that loads real weights. Their weights are random: what they
generate is gibberish, by design. They exist so the whole stack can be run and tested on
a laptop with no GPU and no model downloads. The tiny Kosmos-2 alone is also taught one
grounded caption for one prompt (``teach_grounding``), so that its boxes can be seen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from vlm_engine.tiny.tokenizer import train_byte_bpe, train_unigram

SEED = 1234
# A wider init than the usual 0.02 makes random models react to their input, so that
# batching bugs (rows mixed up, padding leaking) change the text and tests can see them.
INIT_RANGE = 0.5
TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
README = """# Tiny random-weight {arch} checkpoint

Built by `make tiny-models` (`python -m vlm_engine.tiny.build`). Random weights: the text
it generates is gibberish. It exists to run and test the serving stack without a GPU or
model downloads, through the same loading code as the real `{real}`.
"""

README_NOTES = {
    "kosmos2": "\nOne prompt is taught (`teach_grounding`): `An image of` (the adapter sends `<grounding>An image\n"
    "of`) is answered with Hugging Face's example caption and its boxes, whatever the image:\n"
    "`a snowman warming himself by a fire`, with entities `a snowman` and `a fire`.\n",
}


def build_llava(out: Path) -> None:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = train_byte_bpe(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            **TEXT,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tok),
            max_position_embeddings=4096,
            initializer_range=INIT_RANGE,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _save(LlavaForConditionalGeneration(config), processor, out)
    hub_key_layout(out / "model.safetensors")


def hub_key_layout(weights: Path) -> None:
    """The weights under llava-hf's key names, as the real checkpoint has them
    (``vision_tower.vision_model.*``): transformers maps them back when it loads, and vLLM's
    loader reads only these."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    renamed = {
        "vision_tower.vision_model." + key.removeprefix("vision_tower.") if key.startswith("vision_tower.") else key: t
        for key, t in tensors.items()
    }
    save_file(renamed, str(weights), metadata={"format": "pt"})


def build_kosmos2(out: Path) -> None:
    from transformers import (
        CLIPImageProcessorPil,
        Kosmos2Config,
        Kosmos2ForConditionalGeneration,
        Kosmos2Processor,
    )

    tok = train_unigram(
        ["<s>", "<pad>", "</s>", "<unk>"],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor = Kosmos2Processor(image_processor, tok)  # adds the tag and patch-index tokens
    tok = processor.tokenizer
    config = Kosmos2Config(
        text_config={
            "vocab_size": len(tok),
            "embed_dim": 128,
            "layers": 2,
            "ffn_dim": 256,
            "attention_heads": 4,
            "max_position_embeddings": 2048,
            "init_std": INIT_RANGE,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 14,
        },
        latent_query_num=64,
    )
    model = Kosmos2ForConditionalGeneration(config)
    with torch.no_grad():  # rarely emit tag tokens, so that random captions are not empty
        first_tag = tok.convert_tokens_to_ids("</doc>")
        model.text_model.model.embed_tokens.weight[first_tag:] *= 0.05
    teach_grounding(model, processor)
    _save(model, processor, out)


# The one prompt the tiny Kosmos-2 answers with boxes (the adapter makes it "<grounding>An image
# of"): it is taught Hugging Face's own Kosmos-2 example caption, whatever the image, so that
# grounded entities come out of the real model code and the real extraction without real weights.
KOSMOS2_GROUNDED_PROMPT = "An image of"
KOSMOS2_GROUNDED_CAPTION = (
    "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by"
    "<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>"
)
# Prompts whose answers stay what the random model writes (with ``samples.PROMPTS``, which tests
# send): while it learns the caption, its next-token distributions there are kept (distilled from
# the model before training), so that other prompts still give (mostly) the same random text.
KOSMOS2_KEPT_PROMPTS = [
    "What is in this image?",
    "Describe this image.",
    "Where is it?",
    "How many people are there?",
    "Describe",
    "What color is the car?",
    "hi",
    "Is there a sign?",
    "The picture shows",
    "A dog and",
    "A photo of",
    "Question: what is this? Answer:",
]


def training_image(i: int, gen: torch.Generator):
    """A random image of a random size: noise, a flat color, a gradient or blocks."""
    from PIL import Image

    width, height = (int(v) for v in torch.randint(16, 400, (2,), generator=gen))
    kind = i % 4
    if kind == 0:
        pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    elif kind == 1:
        pixels = torch.randint(0, 256, (1, 1, 3), generator=gen, dtype=torch.uint8).expand(height, width, 3)
    elif kind == 2:
        start, end = torch.rand(2, 3, generator=gen) * 255
        ramp = torch.linspace(0, 1, width)[None, :, None]
        pixels = (start + (end - start) * ramp).expand(height, width, 3).to(torch.uint8)
    else:
        blocks = torch.randint(0, 256, (height // 8 + 1, width // 8 + 1, 3), generator=gen, dtype=torch.uint8)
        pixels = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:height, :width]
    return Image.fromarray(pixels.contiguous().numpy())


def sample_pictures() -> list:
    """Images as the tests and samples make them (``samples.sample_image``), decoded."""
    import io

    from PIL import Image

    from vlm_engine.tiny.samples import sample_image

    specs = [
        ((64, 64), (0, 90, 200)),
        ((224, 224), (30, 90, 180)),
        ((300, 120), (60, 90, 160)),
        ((97, 211), (90, 90, 140)),
        ((500, 400), (120, 90, 120)),
        ((32, 48), (150, 90, 100)),
        ((160, 120), (200, 40, 40)),
        ((97, 211), (20, 120, 220)),
        ((64, 64), (9, 9, 45)),
        ((120, 90), (200, 40, 40)),
    ]
    return [
        Image.open(io.BytesIO(sample_image(size, "PNG" if i % 2 else "JPEG", color))).convert("RGB")
        for i, (size, color) in enumerate(specs)
    ]


def teach_grounding(model, processor, steps: int = 300) -> None:
    """Teach the random Kosmos-2 the grounded caption after the grounded prompt (a few seconds
    on a CPU). Inputs are what the processor makes of prompt + caption with random images of
    random sizes; the loss is the cross-entropy of the caption's tokens and ``</s>`` (its first
    token weighted more: it is the one that must differ from what the model wrote) plus the KL
    divergence from the untrained model's distributions along its own greedy answers to the
    kept prompts with sample images. Only the feed-forward layers and the rows of the tag
    tokens (``<phrase>``, ``<patch_index_N>``...) change: the attention, the vision model and
    the embeddings of every ordinary token stay as they were."""
    import torch.nn.functional as F

    from vlm_engine.tiny.samples import PROMPTS

    tok = processor.tokenizer
    text = model.text_model
    model.eval()
    pictures = [training_image(i, torch.Generator().manual_seed(SEED + i)) for i in range(8)]
    prompt = f"<grounding>{KOSMOS2_GROUNDED_PROMPT}"
    grounded = processor(text=[prompt + KOSMOS2_GROUNDED_CAPTION] * len(pictures), images=pictures, return_tensors="pt")
    alone = processor(text=prompt, images=pictures[0], return_tensors="pt")["input_ids"][0]
    start = len(alone)
    assert grounded["input_ids"][0, :start].equal(alone), "the prompt's tokens must not change before the caption"
    eos = torch.full((len(pictures), 1), tok.eos_token_id)
    ids = torch.cat([grounded["input_ids"], eos], 1)
    where = torch.cat([grounded["image_embeds_position_mask"], torch.zeros_like(eos)], 1)
    kept_pictures = sample_pictures()
    with torch.no_grad():
        embeds = _image_embeds(model, grounded["pixel_values"])
        kept_pixels = processor.image_processor(kept_pictures, return_tensors="pt")["pixel_values"]
        kept_embeds = _image_embeds(model, kept_pixels)
        prompts = [f"<grounding>{p}" for p in dict.fromkeys(KOSMOS2_KEPT_PROMPTS + PROMPTS)]
        kept_ids, kept_where, kept_keep, kept_image = _greedy_rows(model, processor, prompts, kept_pictures)
        kept_mask = (kept_ids != tok.pad_token_id).long()
        teacher = F.log_softmax(
            text(
                input_ids=kept_ids,
                attention_mask=kept_mask,
                image_embeds=kept_embeds[kept_image],
                image_embeds_position_mask=kept_where,
            ).logits,
            -1,
        )
    embedding = text.model.embed_tokens.weight  # the output layer's too (tied)
    first_tag = tok.convert_tokens_to_ids("</doc>")
    only_tags = embedding.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:first_tag]), grad[first_tag:]]))
    trained = [embedding] + [p for name, p in text.named_parameters() if ".ffn." in name]
    for parameter in model.parameters():
        parameter.requires_grad_(any(parameter is t for t in trained))
    optimizer = torch.optim.AdamW(trained, lr=2e-2, weight_decay=0.0)  # rows with no gradient stay as they are
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    order = torch.Generator().manual_seed(SEED)
    text.train()
    for _ in range(steps):
        rows = torch.randperm(len(pictures), generator=order)[:2]
        hidden = text.model(input_ids=ids[rows], image_embeds=embeds[rows], image_embeds_position_mask=where[rows])[0]
        logits = text.lm_head(hidden[:, start - 1 : -1])
        per_token = F.cross_entropy(logits.transpose(1, 2), ids[rows, start:], reduction="none")
        loss = (5 * per_token[:, 0] + per_token[:, 1:].sum(1)).mean() / per_token.shape[1]
        rows = torch.randperm(len(kept_ids), generator=order)[:6]
        hidden = text.model(
            input_ids=kept_ids[rows],
            attention_mask=kept_mask[rows],
            image_embeds=kept_embeds[kept_image[rows]],
            image_embeds_position_mask=kept_where[rows],
        )[0]
        keep = kept_keep[rows]
        student = F.log_softmax(text.lm_head(hidden[keep]), -1)
        target = teacher[rows][keep]
        loss = loss + (target.exp() * (target - student)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    only_tags.remove()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    text.eval()


def _image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """As ``Kosmos2ForConditionalGeneration.forward`` makes them (and the adapter)."""
    import torch.nn.functional as F

    hidden = model.vision_model(pixel_values=pixel_values)[0]
    return model.image_to_text_projection(F.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1))[0]


def _greedy_rows(model, processor, prompts: list[str], pictures: list, new_tokens: int = 32):
    """The model's greedy answers to each prompt with each picture, right-padded to one width:
    ids, image-position mask, where a position predicts an answer token (or ``</s>``), and the
    picture of each row."""
    pad = processor.tokenizer.pad_token_id
    rows = []
    for prompt in prompts:
        inputs = processor(text=[prompt] * len(pictures), images=pictures, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        start = inputs["input_ids"].shape[1]
        rows += [(row, where, start) for row, where in zip(out, inputs["image_embeds_position_mask"], strict=True)]
    width = max(len(row) for row, _, _ in rows)
    ids = torch.full((len(rows), width), pad)
    where = torch.zeros_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, mask, start) in enumerate(rows):
        ids[i, : len(row)] = row
        where[i, : len(mask)] = mask
        keep[i, start - 1 : len(row) - 1] = row[start:] != pad  # after </s>, generate pads
    return ids, where, keep, torch.arange(len(rows)) % len(pictures)


# Qwen3-VL's prompt format, written for the tiny checkpoint: image parts, and its tool format
# (tool signatures in the system turn, calls in <tool_call> tags, results in <tool_response>
# tags inside a user turn), which the real template renders the same way.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_RULE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\n</tool_call>'
)
QWEN_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for c in content -%}"
    "{%- if c.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c.type == 'text' -%}{{ c.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "<|im_start|>system{{ '\\n' }}"
    "{%- if messages[0].role == 'system' -%}{{ text(messages[0].content) }}{{ '\\n\\n' }}{%- endif -%}"
    f'{{{{ "{TOOLS_PREAMBLE}" }}}}'
    "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
    f'{{{{ "{TOOLS_RULE}" }}}}'
    "<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}<|im_start|>user{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_response>\\n' }}{{ text(m.content) }}{{ '\\n</tool_response>\\n' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}<|im_end|>{{ '\\n' }}{%- endif -%}"
    "{%- elif not (tools and loop.first and m.role == 'system') -%}"
    "<|im_start|>{{ m.role }}{{ '\\n' }}"
    "{{ text(m.content) }}"
    "{%- for call in m.tool_calls or [] -%}"
    "{%- if m.content or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    '{{ \'<tool_call>\\n{"name": "\' }}{{ call.function.name }}{{ \'", "arguments": \' }}'
    "{%- if call.function.arguments is string -%}{{ call.function.arguments }}"
    "{%- else -%}{{ call.function.arguments | tojson }}{%- endif -%}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


def build_qwen3_vl(out: Path) -> None:
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = train_byte_bpe(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])  # not special, as Qwen's
    tok.chat_template = QWEN_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
    )
    config = Qwen3VLConfig(
        text_config={
            **TEXT,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "vocab_size": len(tok),
            "max_position_embeddings": 4096,
            "initializer_range": INIT_RANGE,
            "pad_token_id": tok.pad_token_id,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 128,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    _save(model, None, out, tokenizer=tok, image_processor=image_processor)


def build_moondream2(out: Path) -> None:
    """The stand-in (``moondream_standin``), with its tokenizer where the adapter finds the
    one the real code fetches: ``<checkpoint>/moondream/starmie-v1/tokenizer.json``."""
    from vlm_engine.adapters.moondream2 import TOKENIZER_REPO, tokenizer_from
    from vlm_engine.tiny import moondream_standin as standin

    specials = ["<|endoftext|>", "<|md_open|>", "<|md_sep|>", "<|md_answer|>", "<|md_think|>", "<|md_coord|>"]
    tok = train_byte_bpe([*specials, "<|md_size|>"]).backend_tokenizer

    def words(text: str) -> list[int]:
        return tok.encode(text).ids

    templates = {
        "caption": {length: [1, *words("caption"), 2, *words(length), 3] for length in ("short", "normal", "long")},
        "query": {"prefix": [1, *words("query"), 2], "suffix": [3]},
        "detect": {"prefix": [1, *words("detect"), 2], "suffix": [3]},
        "point": {"prefix": [1, *words("point"), 2], "suffix": [3]},
    }
    inner = {
        "text": {"vocab_size": tok.get_vocab_size(), "max_context": 512},
        "tokenizer": {"bos_id": 0, "eos_id": 0, "answer_id": 3, "coord_id": 5, "size_id": 6, "templates": templates},
    }
    config = standin.HfConfig(
        config=inner,
        auto_map={"AutoConfig": "hf_moondream.HfConfig", "AutoModelForCausalLM": "hf_moondream.HfMoondream"},
    )
    tokenizer_dir = out / TOKENIZER_REPO
    tokenizer_dir.mkdir(parents=True)
    tok.save(str(tokenizer_dir / "tokenizer.json"))
    with tokenizer_from(standin.HfMoondream, tokenizer_dir / "tokenizer.json"):
        model = standin.HfMoondream(config)
    standin.randomize(model, INIT_RANGE)
    _save(model, None, out)
    shutil.copyfile(standin.__file__, out / "hf_moondream.py")


BUILDERS = {
    "llava": (build_llava, "llava-hf/llava-1.5-7b-hf"),
    "kosmos2": (build_kosmos2, "microsoft/kosmos-2-patch14-224"),
    "qwen3-vl": (build_qwen3_vl, "Qwen/Qwen3-VL-8B-Instruct"),
    "moondream2": (build_moondream2, "vikhyatk/moondream2"),
}


def _save(model, processor, out: Path, tokenizer=None, image_processor=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    for part in (processor, tokenizer, image_processor):
        if part is not None:
            part.save_pretrained(out)


def source_hash() -> str:
    """Hash of the code that builds the checkpoints: a change means they are rebuilt."""
    import hashlib

    from vlm_engine.tiny import corpus, moondream_standin, samples, tokenizer

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], corpus, moondream_standin, samples, tokenizer):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def is_current(folder: Path) -> bool:
    marker = folder / "tiny.json"
    return marker.exists() and json.loads(marker.read_text()).get("source") == source_hash()


def build(name: str, out: Path) -> Path:
    """Build one tiny checkpoint into ``out`` (replacing what is there)."""
    builder, real = BUILDERS[name]
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(SEED)
    builder(out)
    (out / "README.md").write_text(README.format(arch=name, real=real) + README_NOTES.get(name, ""))
    for path in out.rglob("*"):  # safetensors writes 0600; containers read these as another user
        path.chmod(0o755 if path.is_dir() else 0o644)
    (out / "tiny.json").write_text(
        json.dumps({"tiny": True, "architecture": name, "seed": SEED, "source": source_hash()})
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".models/tiny"), help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild checkpoints that exist")
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(BUILDERS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(BUILDERS)}")
    for name in args.models or list(BUILDERS):
        target = args.out / name
        if is_current(target) and not args.force:
            print(f"tiny {name}: {target} is up to date (--force rebuilds)")
            continue
        build(name, target)
        size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
        print(f"tiny {name}: built {target} ({size:.1f} MB, random weights: gibberish output)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
