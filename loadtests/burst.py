"""A burst of simultaneous HTTP requests, timed from the moment each one is sent.

A Python HTTP client serialises its own work: with 300 requests in one event loop the last
one leaves long after the first, and its "latency" counts that wait. Here every connection
is opened first, each request is pre-encoded bytes written in one call, and each reply is
timed from its own write; so the figures are the server's, as 300 separate clients see them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    seconds: float
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def _request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read(reader: asyncio.StreamReader, sent: float) -> Reply:
    status_line = await reader.readline()
    seconds = time.perf_counter() - sent
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.read()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return Reply(int(status_line.split()[1]), seconds, headers, body)


def _unchunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


async def _burst(url: str, path: str, body: bytes, count: int, headers: dict[str, str]) -> list[Reply]:
    parts = urlsplit(url)
    request = _request(parts.netloc, path, body, headers)
    connections = await asyncio.gather(*(asyncio.open_connection(parts.hostname, parts.port) for _ in range(count)))
    sent = []
    for _, writer in connections:  # one write each: the kernel takes it at once
        sent.append(time.perf_counter())
        writer.write(request)
    replies = await asyncio.gather(*(_read(reader, t) for (reader, _), t in zip(connections, sent, strict=True)))
    for _, writer in connections:
        writer.close()
    return list(replies)


def burst(
    url: str, path: str, payload: dict | bytes, count: int = 300, headers: dict[str, str] | None = None
) -> list[Reply]:
    """``count`` POSTs of ``payload`` (JSON) to ``url + path`` at once; one ``Reply`` each, in order."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return asyncio.run(_burst(url, path, body, count, headers or {}))


def refusal_figures(replies: list[Reply]) -> dict:
    """Counts, and the refusals' (503) latency percentiles in ms."""
    refused = [r.seconds * 1000 for r in replies if r.status == 503]
    figures = {"requests": len(replies), "refused": len(refused), "answered": sum(r.status == 200 for r in replies)}
    if refused:
        figures.update(
            refusal_p50_ms=round(percentile(refused, 0.5), 1),
            refusal_p95_ms=round(percentile(refused, 0.95), 1),
            refusal_max_ms=round(max(refused), 1),
        )
    return figures


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[int(fraction * (len(ordered) - 1))]
