"""The checks of scripts/dynamo_test.sh, run on host A against Dynamo's frontend.

Each check prints one line starting with "RESULT"; the script fails if any check fails:
1. every model of the repository answers through the frontend (the four faces with the same
   greedy text as Triton, their ``_stream`` models and ``llm_decoupled`` over gRPC streaming);
2. the workers on both hosts take requests (their own Dynamo request counters);
3. (a figure, line "FIGURE") requests/s at concurrency 16 through Dynamo and straight to host A's Triton;
4. host B's worker is killed under load: only its requests in flight fail, and requests go on
   through host A's worker (the time to the last failure is printed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.helpers import (
    GREEDY,
    MODELS,
    chat_text,
    infer_grpc,
    kill_under_load,
    llm_decoupled_grpc,
    metric,
    stream_grpc,
)
from vlm_engine.tiny.samples import sample_image

IMAGE = sample_image((97, 211), "JPEG", (20, 120, 220))
failures: list[str] = []


def result(name: str, ok: bool, detail: str) -> None:
    print(f"RESULT {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def every_model(frontend: str, triton: str) -> None:
    for model in MODELS:
        direct = infer_grpc(triton, model, "What is this?", IMAGE, max_tokens=10, **GREEDY)
        through = infer_grpc(frontend, model, "What is this?", IMAGE, max_tokens=10, **GREEDY)
        texts = stream_grpc(frontend, f"{model}_stream", "What is this?", IMAGE, max_tokens=10, **GREEDY)
        same = through == direct == "".join(texts)
        result(f"{model} through Dynamo", same, f"infer and a stream of {len(texts)} responses give Triton's answer")
    chat = [{"role": "user", "content": "Hello"}]
    try:
        direct = llm_decoupled_grpc(triton, chat, max_tokens=6, temperature=0.0)
        events = llm_decoupled_grpc(frontend, chat, max_tokens=6, temperature=0.0)
        same = chat_text(events) == chat_text(direct) != "" and events[-1] == {"type": "complete"}
        result("llm_decoupled through Dynamo", same, f"{len(events)} events, Triton's text")
    except Exception as exc:
        result("llm_decoupled through Dynamo", False, repr(exc))


def served(status: str) -> float:
    return metric(status, "dynamo_component_requests_total")


def rate(url: str, n: int = 64, concurrency: int = 16) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: infer_grpc(url, "llava", "Describe it.", IMAGE, max_tokens=16), range(n)))
    return n / (time.perf_counter() - started)


def both_hosts_and_rates(frontend: str, triton: str, worker_a: str, worker_b: str) -> None:
    before = served(worker_a), served(worker_b)
    through = rate(frontend)
    taken = served(worker_a) - before[0], served(worker_b) - before[1]
    result("both hosts' workers take requests", min(taken) > 0, f"host A {taken[0]:.0f}, host B {taken[1]:.0f} of 64")
    direct = rate(triton)
    # a figure for the notes, not a pass/fail check: both hosts share this machine's cores
    print(f"FIGURE requests/s at concurrency 16: Dynamo {through:.1f}/s (two hosts), Triton A alone {direct:.1f}/s")


def worker_killed(frontend: str, pid: int, after_s: float) -> None:
    figures = kill_under_load(frontend, IMAGE, lambda: os.kill(pid, signal.SIGKILL), after_s=after_s)
    failed_after = figures["sent_after_failed"]
    # only those sent in the moment before the router saw the worker fail may fail: the frontend
    # leaves an unreachable worker out for 30 s (the launcher's DYN_RUNTIME_INHIBITED_DURATION_SECS),
    # longer than its etcd record lives
    good = figures["answered_before"] and not [at for at in failed_after if at >= 1.0]
    good = good and figures["sent_after"] - len(failed_after) >= 8
    result(
        "host B's worker killed under load",
        good,
        f"{figures['in_flight_failed']} of {figures['in_flight']} requests in flight failed; "
        f"of {figures['sent_after']} sent after the kill {len(failed_after)} failed (at {failed_after} s), "
        "the rest answered through host A",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--frontend", "--triton", "--worker-a", "--worker-b"):
        parser.add_argument(name, required=True)
    parser.add_argument("--kill-pid", type=int, required=True)
    parser.add_argument("--after-kill-s", type=float, default=float(os.environ.get("DYNAMO_AFTER_KILL_S", 10)))
    args = parser.parse_args()
    every_model(args.frontend, args.triton)
    both_hosts_and_rates(args.frontend, args.triton, args.worker_a, args.worker_b)
    worker_killed(args.frontend, args.kill_pid, args.after_kill_s)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
