"""Fetching ``http(s)`` image URLs, only when enabled: size cap, timeout, no private targets."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx

from fastapi_app.settings import Settings
from vlm_engine.errors import InvalidImage


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


async def _check_host(host: str, port: int) -> None:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InvalidImage(f"image URL host {host!r} does not resolve") from None
    for info in infos:
        if not _public(info[4][0]):
            raise InvalidImage(
                f"image URL host {host!r} is a private, loopback or reserved address ({info[4][0]}); "
                "only public hosts are fetched"
            )


async def fetch_as_data_url(url: str, settings: Settings) -> str:
    """Download ``url`` (no redirects) and return it as a ``data:`` URL."""
    if not settings.allow_remote_images:
        raise InvalidImage(
            "remote image URLs are disabled on this server (ALLOW_REMOTE_IMAGES=false); "
            "send the image inline as a data:image/...;base64 URL"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidImage(f"image URL must be http(s) with a host, got {url[:80]!r}")
    await _check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    cap = settings.remote_image_max_bytes
    try:
        async with httpx.AsyncClient(timeout=settings.remote_image_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as reply:
                if reply.status_code != 200:
                    raise InvalidImage(f"image URL answered HTTP {reply.status_code}")
                data = bytearray()
                async for block in reply.aiter_bytes():
                    data += block
                    if len(data) > cap:
                        raise InvalidImage(f"image URL body is over the limit of {cap} bytes")
    except httpx.HTTPError as exc:
        raise InvalidImage(f"image URL could not be fetched: {type(exc).__name__}: {exc}") from None
    return "data:application/octet-stream;base64," + base64.b64encode(bytes(data)).decode()
