"""Print the pinned requirements one image needs, taken from pyproject.toml.

    python3 docker/pinned.py triton [fastapi ...] > requirements.txt

pyproject.toml stays the single place where versions are pinned; this only chooses the
subset each image needs (the FastAPI image talks to Triton and needs no torch). Plain
regular expressions, no tomllib, so that it also runs on the GPU image's Python 3.10.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# image -> requirement names (extras given here replace pyproject's)
GROUPS = {
    # Triton's Python-backend stubs: the shared engine and vlm_triton (the KServe faces
    # forward over the server's own gRPC port with tritonclient.grpc.aio).
    "triton": [
        "torch",
        "transformers",
        "tokenizers",
        "llguidance",
        "safetensors",
        "huggingface-hub",
        "pillow",
        "numpy",
        "pydantic",
        "tritonclient[grpc]",
    ],
    # The FastAPI service with the Triton backend (INFERENCE_BACKEND=triton): no torch.
    # tritonclient: gRPC only (the service uses tritonclient.grpc.aio).
    "fastapi": [
        "fastapi",
        "starlette",
        "uvicorn",
        "sse-starlette",
        "python-multipart",
        "fastapi-offline",  # /docs and /redoc assets, served offline
        "httpx",
        "prometheus-client",
        "tritonclient[grpc]",
        "numpy",
        "pillow",
        "pydantic",
        "pydantic-settings",
        "python-dotenv",
        "requests",
    ],
}

REQUIREMENT = re.compile(r'^\s*"(?P<name>[A-Za-z0-9_.-]+)(?P<extras>\[[^\]]*\])?(?P<spec>[^";]*)"')


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(pyproject: Path) -> dict[str, str]:
    """name -> version specifier of [project] dependencies."""
    text = pyproject.read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    if not block:
        raise SystemExit(f"no dependencies list in {pyproject}")
    pins = {}
    for line in block.group(1).splitlines():
        match = REQUIREMENT.match(line)
        if match:
            pins[normalise(match["name"])] = match["spec"].strip()
    return pins


def main(argv: list[str]) -> int:
    groups = argv or ["triton"]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.exists():  # inside an image build the file sits next to this one
        pyproject = Path(__file__).resolve().parent / "pyproject.toml"
    pins = pinned(pyproject)
    lines: dict[str, str] = {}
    for group in groups:
        for entry in GROUPS[group]:
            name, _, extras = entry.partition("[")
            key = normalise(name)
            if key not in pins:
                raise SystemExit(f"{name} is not pinned in {pyproject}")
            if not pins[key].startswith("=="):
                raise SystemExit(f"{name} must be pinned with == in {pyproject} (found {pins[key]!r})")
            lines.setdefault(key, f"{name}{'[' + extras if extras else ''}{pins[key]}")
    print("\n".join(lines.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
