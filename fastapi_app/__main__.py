"""Command line: ``python -m fastapi_app ask --model llava --image x.jpg "What is this?"``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from fastapi_app.client import VLMClient
from vlm_engine.settings import MODELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastapi_app")
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="ask a model about an image (KServe v2 to Triton)")
    ask.add_argument("prompt")
    ask.add_argument("--model", default="qwen3-vl", choices=list(MODELS))
    ask.add_argument("--image", help="PNG/JPEG/WebP file (optional: without one, the model answers the text)")
    ask.add_argument("--url", default="http://127.0.0.1:8000", help="http://host:port or grpc://host:port")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = parser.parse_args(argv)
    client = VLMClient(args.url)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        start = time.perf_counter()
        if args.stream:
            for chunk in client.stream(args.model, args.image, args.prompt, **params):
                print(chunk, end="", flush=True)
            print()
            entities = client.last_entities
        else:
            answer = client.chat(args.model, args.image, args.prompt, **params)
            print(answer.text)
            entities = answer.entities
        if entities is not None:  # Kosmos-2's grounded phrases, moondream2's detections
            print(f"entities: {json.dumps(entities)}")
        print(f"({args.model}, {time.perf_counter() - start:.2f} s)", file=sys.stderr)
    except Exception as exc:  # a readable line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
