"""What a busy neighbour core costs the engine's step, on this machine.

The bare ``generate`` that KServe infer is compared with runs on an idle machine. Served,
the step shares the machine with the work around it (preparing inputs, the KServe face,
tritonserver), which runs on the other core. On a virtual machine the cores may share a
physical core or its memory path, so that work slows the step even though it never takes
the step's core. This measures by how much: one decode step of ``rows`` Qwen3-VL rows,
pinned to one core, alone and beside a process pinned to another core that runs a Python
loop, a matrix product or a memory copy (three kinds of neighbour), alternated.

``python -m benchmarks.neighbour`` prints JSON; ``make bench`` runs it with ``--only kv``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

NEIGHBOURS = {
    "python loop": "while True: pass",
    "matrix product": "import numpy as np\na = np.random.rand(600, 600)\nwhile True: a @ a",
    "memory copy": "import numpy as np\na = np.zeros(2**25)\nb = np.zeros(2**25)\nwhile True: b[:] = a",
}


def _neighbour(code: str, core: int) -> subprocess.Popen:
    pin = f"import os\nos.sched_setaffinity(0, {{{core}}})\n"
    return subprocess.Popen([sys.executable, "-c", pin + code])


def step_cost(models_dir: Path, rows: int = 64, steps: int = 40, rounds: int = 5) -> dict:
    """Median decode-step milliseconds alone and beside each neighbour, and their ratios."""
    from benchmarks.kv_memory import engine
    from benchmarks.peer import fresh_image
    from vlm_engine.chat import single_turn
    from vlm_engine.tiny.samples import PROMPTS

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"skipped": "one core: no neighbour core to measure"}
    own, other = cores[-1], cores[0]
    before_affinity, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {own})
    torch.set_num_threads(1)
    e = engine(models_dir, "qwen3-vl", WARMUP="false", COMPILE_STEP="false", MAX_RUNNING=str(rows))
    try:
        adapter = e.adapter
        seqs = [adapter.start(e.prepare(single_turn(PROMPTS[i % 8], fresh_image()), 64, 0.0), []) for i in range(rows)]
        for seq in seqs:
            adapter.kv.pages.grow(seq.key, seq.length + (rounds * (len(NEIGHBOURS) + 1) + 1) * steps)
        adapter.prefill([(s, 0, s.length) for s in seqs])

        def step_ms() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                adapter.decode(seqs)
            return (time.perf_counter() - start) / steps * 1e3

        step_ms()  # warm
        times: dict[str, list[float]] = {"alone": [], **{name: [] for name in NEIGHBOURS}}
        for _ in range(rounds):
            times["alone"].append(step_ms())
            for name, code in NEIGHBOURS.items():
                process = _neighbour(code, other)
                try:
                    time.sleep(0.3)  # started and busy
                    times[name].append(step_ms())
                finally:
                    process.kill()
                    process.wait()
    finally:
        e.close()
        os.sched_setaffinity(0, before_affinity)
        torch.set_num_threads(before_threads)
    medians = {name: statistics.median(values) for name, values in times.items()}
    out: dict = {"rows": rows, "step_ms": {k: round(v, 2) for k, v in medians.items()}}
    out["slower_by"] = {name: round(medians[name] / medians["alone"] - 1, 3) for name in NEIGHBOURS}
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".models" / "tiny"
    print(json.dumps(step_cost(folder), indent=2))
