"""Decoding untrusted image bytes with clear errors and size limits."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from typing import Any

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


class PixelCache:
    """An image processor's output per image, by content key (the most recent ``capacity``): a
    chat sends its image again with every turn, and many requests may share one image; those
    skip resizing and normalising it (vLLM keeps a processor cache for the same reason). It
    lives where the inputs are made (an input worker; with ``PREPARE_WORKERS=0`` the request
    threads, hence the lock), for processors whose output is a row of ``pixel_values`` per image."""

    def __init__(self, capacity: int = 32):
        import threading
        from collections import OrderedDict

        self.capacity = capacity
        self.rows: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def pixel_values(self, images: list[Image.Image], keys: list[str], process: Callable[[list], Any]) -> Any:
        """``pixel_values`` of ``images`` (keys in the same order), ``process`` run on the ones not kept."""
        import torch

        with self._lock:
            kept = {key: self.rows[key] for key in keys if key in self.rows}
        missing = [i for i, key in enumerate(keys) if key not in kept]
        if missing:  # processed outside the lock: other requests' images go on meanwhile
            kept |= dict(zip([keys[i] for i in missing], process([images[i] for i in missing]), strict=True))
        with self._lock:
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            for key in keys:
                self.rows[key] = kept[key]
                self.rows.move_to_end(key)
            while len(self.rows) > self.capacity:
                self.rows.popitem(last=False)
        return torch.stack([kept[key] for key in keys])
