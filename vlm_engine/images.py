"""Decoding untrusted image bytes with clear errors and size limits."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

from vlm_engine.errors import ImageTooLarge, InvalidImage

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a gray image


def decode_image(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    """Return an RGB image, or raise ``InvalidImage`` / ``ImageTooLarge`` saying what to fix."""
    if not data:
        raise InvalidImage("image is empty: send the bytes of a PNG, JPEG or WebP file")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes, above the limit of {max_bytes} (MAX_IMAGE_BYTES)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidImage(
                f"image bytes are not a recognised image (starts with {data[:8]!r}); "
                f"send a {', '.join(ALLOWED_FORMATS)} file"
            ) from None
        raise ImageTooLarge(f"image is too large to decode safely: {exc}") from None
    if image.format not in ALLOWED_FORMATS:
        raise InvalidImage(f"image format {image.format} is not accepted; send {', '.join(ALLOWED_FORMATS)}")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} (MAX_IMAGE_PIXELS)"
        )
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"image could not be decoded (truncated or corrupt {image.format}): {exc}") from None
    return image.convert("RGB")


def content_key(images: list[bytes]) -> str | None:
    """A hash of a request's image bytes, in order: the key of encoded-image caches."""
    if not images:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for data in images:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
