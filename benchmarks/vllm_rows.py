"""vLLM's engine on a real-sized random-weight checkpoint (``make gpu-check``'s vLLM part).

Run with a python that has vLLM (vLLM's venv, ``make vllm-env``), never the project's:
``python vllm_rows.py '<json>'`` with ``{"model": <folder>, "dtype", "rows": [..], "max_tokens",
"prompts": [<text in the model's format>, ...], "side": <image side>, "max_model_len", "cuda"}``. The
weights are vLLM's own random ones (``load_format="dummy"``), like the native engine's in
gpu_check.py. Prints one JSON line: tokens/s per row count (answers run to max_tokens).
"""

from __future__ import annotations

import json
import sys
import time

from PIL import Image
from vllm import LLM, SamplingParams


def main() -> None:
    job = json.loads(sys.argv[1])
    started = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        load_format="dummy",
        max_num_seqs=max(job["rows"]),
        max_model_len=job["max_model_len"],
        limit_mm_per_prompt={"image": 1},
        # CUDA: vLLM's share of the device; CPU: a KV size (vLLM's default share of the machine's
        # memory is refused while other processes hold some)
        **({"gpu_memory_utilization": 0.85} if job["cuda"] else {"kv_cache_memory_bytes": 2**30}),
    )
    load_s = time.perf_counter() - started
    prompts = job["prompts"]

    def batch(rows: int) -> list[dict]:
        out = []
        for i in range(rows):
            image = Image.new("RGB", (job["side"], job["side"]), (40 * i % 255, 90, 200 - 10 * (i % 16)))
            out.append({"prompt": prompts[i % len(prompts)], "multi_modal_data": {"image": image}})
        return out

    sampling = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    llm.generate(batch(2), SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    figures = []
    for rows in job["rows"]:
        requests = batch(rows)
        start = time.perf_counter()
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        figures.append({"rows": rows, "output_tokens": tokens, "tok_s": round(tokens / wall, 1)})
    print(json.dumps({"load_s": round(load_s, 1), "throughput": figures}), flush=True)


if __name__ == "__main__":
    main()
