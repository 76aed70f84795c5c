"""Test images (generated with Pillow at start-up), prompts and request bodies.

No locust here: these are plain functions the user classes and the tests share.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from functools import cached_property

from PIL import Image, ImageDraw

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# Prompts of several lengths (the tiny checkpoints' tokenizers make the long one ~200 tokens;
# the service refuses prompts above MAX_PROMPT_TOKENS, 2048 by default).
PROMPTS = {
    "short": ["What is this?", "Describe it.", "An image of"],
    "medium": [
        "What objects are in this image, and what colours are they?",
        "Describe the scene in one or two sentences, mentioning the main shapes.",
        "Is there a red rectangle in this picture? Where is the blue ellipse?",
    ],
    "long": [
        "Please look carefully at this picture and describe every object you can see, where each one is "
        "placed relative to the others, what colours and textures it has, how the light seems to fall on it, "
        "and what the scene as a whole might be about. Then list anything that looks unusual or out of place, "
        "and finish with a one-sentence caption that would suit the image in a photo album.",
        "You are helping a person who cannot see this image. Explain the layout from the top left corner to "
        "the bottom right corner, name the dominant colours and the way they blend into each other, count the "
        "distinct shapes, say which shape is the largest and which is the smallest, and describe the background "
        "gradient. Keep the answer factual and avoid guessing about things that are not visible.",
    ],
}
# Follow-up turns of a REST conversation (text only: the history carries the context).
FOLLOW_UPS = ["And what else?", "Can you say more about the colours?", "Why?", "Summarise that in five words."]


def all_prompts() -> list[str]:
    return [p for group in PROMPTS.values() for p in group]


def make_image(size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    """An RGB picture with gradients, a rectangle and an ellipse, encoded as ``fmt``."""
    width, height = size
    red = Image.linear_gradient("L").resize(size)
    green = Image.linear_gradient("L").rotate(90 + 90 * (seed % 3)).resize(size)
    blue = Image.radial_gradient("L").resize(size)
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    shift = seed * 7 % max(1, width // 8)
    draw.rectangle([width // 8 + shift, height // 8, width // 3 + shift, height // 2], fill=(230, 40, 40))
    draw.ellipse(
        [width // 2, height // 3, width * 7 // 8, height * 7 // 8],
        fill=(30, 60 + seed * 40 % 160, 220),
        outline=(0, 0, 0),
        width=max(1, width // 100),
    )
    out = io.BytesIO()
    image.save(out, fmt, **({} if fmt == "PNG" else {"quality": 85}))
    return out.getvalue()


@dataclass(frozen=True)
class Picture:
    name: str  # e.g. "320x240.webp"
    fmt: str  # PNG, JPEG, WEBP
    data: bytes

    @property
    def mime(self) -> str:
        return MIME[self.fmt]

    @cached_property
    def b64(self) -> str:
        return base64.b64encode(self.data).decode()

    @cached_property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.b64}"

    @cached_property
    def kserve_json_input(self) -> str:
        """The JSON text of the ``image`` input (serialised once: it is the bulk of the body)."""
        return json.dumps({"name": "image", "datatype": "UINT8", "shape": [1, len(self.data)], "data": list(self.data)})


def make_images(sizes: list[tuple[int, int]], formats: list[str]) -> list[Picture]:
    images = []
    for i, size in enumerate(sizes):
        for j, fmt in enumerate(formats):
            data = make_image(size, fmt, seed=i * len(formats) + j)
            images.append(Picture(f"{size[0]}x{size[1]}.{fmt.lower()}", fmt, data))
    return images


def kserve_json_body(prompt: str, image: Picture, max_tokens: int) -> bytes:
    """KServe v2 infer request, JSON only: prompt BYTES [1,1], image UINT8 [1,N], max_tokens INT32 [1,1]."""
    prompt_input = json.dumps({"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]})
    tokens_input = json.dumps({"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [max_tokens]})
    return f'{{"inputs": [{prompt_input}, {image.kserve_json_input}, {tokens_input}]}}'.encode()


def kserve_binary_body(prompt: str, image: Picture, max_tokens: int) -> tuple[bytes, dict[str, str]]:
    """The same request with Triton's binary tensor extension, built by tritonclient's helpers."""
    import numpy as np
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    prompt_input = InferInput("prompt", [1, 1], "BYTES")
    prompt_input.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object), binary_data=True)
    image_input = InferInput("image", [1, len(image.data)], "UINT8")
    image_input.set_data_from_numpy(np.frombuffer(image.data, dtype=np.uint8).reshape(1, -1), binary_data=True)
    tokens_input = InferInput("max_tokens", [1, 1], "INT32")
    tokens_input.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32), binary_data=True)
    body, json_size = InferenceServerClient.generate_request_body(
        [prompt_input, image_input, tokens_input],
        outputs=[InferRequestedOutput("generated_text", binary_data=False)],
    )
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def openai_stream_body(model: str, prompt: str, image: Picture, max_tokens: int) -> dict:
    return {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": image.data_url}},
                ],
            }
        ],
    }


def rest_chat_body(session_id: str, model: str, prompt: str, image: Picture | None, max_tokens: int) -> dict:
    body = {"session_id": session_id, "model": model, "prompt": prompt, "max_tokens": max_tokens}
    if image is not None:
        body["image"] = image.b64
    return body
