"""The checks of scripts/dynamo_test.sh, run on host A against Dynamo's frontend.

Each check prints one line starting with "RESULT"; the script fails if any check fails:
1. every model of the repository answers through the frontend (the four faces with the same
   greedy text as Triton, their ``_stream`` models and ``llm_decoupled`` over gRPC streaming);
2. the workers on both hosts take requests (their own Dynamo request counters);
3. requests/s at concurrency 16 through Dynamo (two workers) and straight to host A's Triton;
4. host B's worker is killed under load: only its requests in flight fail, and requests go on
   through host A's worker (the time to the last failure is printed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.helpers import GREEDY, MODELS, infer_grpc, llm_decoupled_grpc, metric, stream_grpc
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
        result("llm_decoupled through Dynamo", events == direct, f"{len(events)} events, as from Triton")
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
    result("requests/s at concurrency 16", True, f"Dynamo {through:.1f}/s (two hosts), Triton A alone {direct:.1f}/s")


def kill_under_load(frontend: str, pid: int) -> None:
    outcomes: list[tuple[float, float, bool]] = []  # sent, done, answered
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                infer_grpc(frontend, "llava", "What is this?", IMAGE, max_tokens=16)
                outcomes.append((sent, time.monotonic(), True))
            except InferenceServerException:
                outcomes.append((sent, time.monotonic(), False))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    time.sleep(10)
    stop.set()
    for thread in threads:
        thread.join(60)
    in_flight = [ok for sent, done, ok in outcomes if sent < killed <= done]
    after = [(sent - killed, ok) for sent, done, ok in outcomes if sent >= killed]
    failed_after = [round(at, 1) for at, ok in after if not ok]
    # Dynamo's router tries a dead worker again once or twice until discovery drops its record
    good = all(ok for _, done, ok in outcomes if done < killed) and len(failed_after) <= 3
    good = good and len(after) - len(failed_after) >= 8
    result(
        "host B's worker killed under load",
        good,
        f"{in_flight.count(False)} of {len(in_flight)} requests in flight failed; of {len(after)} sent after the kill "
        f"{len(failed_after)} failed (at {failed_after} s), the rest answered through host A",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--frontend", "--triton", "--worker-a", "--worker-b"):
        parser.add_argument(name, required=True)
    parser.add_argument("--kill-pid", type=int, required=True)
    args = parser.parse_args()
    every_model(args.frontend, args.triton)
    both_hosts_and_rates(args.frontend, args.triton, args.worker_a, args.worker_b)
    kill_under_load(args.frontend, args.kill_pid)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
