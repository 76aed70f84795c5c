import io

import pytest
from PIL import Image

from tests.conftest import image_bytes
from vlm_engine.errors import ImageTooLarge, InvalidImage
from vlm_engine.images import decode_image

LIMITS = {"max_pixels": 1_000_000, "max_bytes": 2_000_000}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(image_bytes((40, 30), fmt), **LIMITS)
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize(
    ("data", "error", "says"),
    [
        (b"", InvalidImage, "image is empty"),
        (b"GIF89a-but-not-really", InvalidImage, "not a recognised image"),
        (b"hello world", InvalidImage, "not a recognised image"),
    ],
)
def test_bad_bytes_say_what_is_wrong(data, error, says):
    with pytest.raises(error, match=says):
        decode_image(data, **LIMITS)


def test_truncated_png_is_an_error_not_a_gray_image():
    data = image_bytes((200, 200), "PNG")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_pixel_limit_is_checked_before_decoding():
    data = image_bytes((1001, 1000), "PNG")
    with pytest.raises(ImageTooLarge, match=r"1001x1000 = 1001000 pixels.*MAX_IMAGE_PIXELS"):
        decode_image(data, **LIMITS)


def test_byte_limit():
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_BYTES"):
        decode_image(image_bytes((300, 300), "BMP"), max_pixels=10**7, max_bytes=1000)


def test_unsupported_format_is_named():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF")
    with pytest.raises(InvalidImage, match="TIFF is not accepted"):
        decode_image(out.getvalue(), **LIMITS)


def test_llavas_inputs_equal_the_processors_and_a_repeated_image_is_not_processed_again(tiny_models_dir):
    """LLaVA's input rows are the HF processor's own (ids, mask, pixels), with each image's pixels
    kept by its content key: a chat's next turn, or another request with the same image, skips
    the image processor."""
    import torch

    from vlm_engine.adapters.base import Prepared
    from vlm_engine.adapters.llava import LlavaAdapter
    from vlm_engine.chat import Message
    from vlm_engine.params import resolve_params
    from vlm_engine.preparing import make_inputs
    from vlm_engine.settings import resolve_settings

    settings = resolve_settings("llava", env={"VLM_MODELS_DIR": str(tiny_models_dir)})
    adapter = LlavaAdapter(settings, "cpu")
    adapter.load_inputs()
    first, second = image_bytes((320, 240), "PNG", (30, 90, 200)), image_bytes((64, 300), "JPEG", (3, 9, 20))
    chat = [
        Message("user", "What is this?", [first]),
        Message("assistant", "A thing."),
        Message("user", "And this one?", [second]),
    ]
    params = resolve_params(settings, 8)
    made = make_inputs(adapter, chat, params, None).inputs
    images = [image for message in chat for image in message.decoded]
    text = adapter.prompt_text(Prepared(chat, params, images[-1]))
    expected = adapter.processor(images=images, text=[text], padding=True, return_tensors="pt")
    assert set(made) == set(expected)
    assert all(torch.equal(made[name], expected[name]) for name in expected)
    assert (adapter.pixels.misses, adapter.pixels.hits) == (2, 0)
    again = make_inputs(adapter, [Message("user", "Again?", [second])], params, None).inputs  # the same bytes
    assert (adapter.pixels.misses, adapter.pixels.hits) == (2, 1)
    assert torch.equal(again["pixel_values"][0], made["pixel_values"][1])


def test_the_pixel_cache_serves_request_threads_at_once():
    """With PREPARE_WORKERS=0 requests make their inputs on their own threads: the cache is
    shared by them, evicting while others read, and every answer is its own image's pixels."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from vlm_engine.images import PixelCache

    cache = PixelCache(capacity=3)

    def process(images):
        return [torch.full((2,), float(i)) for i in images]

    def ask(n: int) -> bool:
        keys = [f"k{(n + j) % 7}" for j in range(3)]
        images = [(n + j) % 7 for j in range(3)]
        return torch.equal(cache.pixel_values(images, keys, process)[:, 0], torch.tensor(images, dtype=torch.float))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(ask, range(2000)))
    assert len(cache.rows) == 3 and cache.hits + cache.misses == 6000
