"""Sample prompts and generated images, shared by tests, benchmarks and load tests."""

from __future__ import annotations

import io

from PIL import Image

PROMPTS = [
    "What is in this image?",
    "Describe the picture in detail.",
    "How many people are there?",
    "What color is the car?",
    "Is there a sign? What does it say?",
    "Describe this image.",
    "What is on the table next to the window?",
    "Where was this photo taken?",
]


def sample_image(size: tuple[int, int], fmt: str = "PNG", color=(200, 40, 40)) -> bytes:
    """An image with some structure (stripes over a color), encoded as ``fmt``."""
    width, height = size
    image = Image.new("RGB", size, color)
    for x in range(0, width, max(1, width // 16)):
        for y in range(height):
            image.putpixel((x, y), ((x * 7) % 256, (y * 5) % 256, 128))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()
