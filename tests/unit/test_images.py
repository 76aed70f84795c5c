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
