"""vLLM's own offline answers (``vllm.LLM``), for comparing with the stack's ENGINE=vllm answers.

Run with the python of vLLM's venv (``vlm_triton.vllm_env``), never the project's:
``python vllm_offline.py '<json>'`` where the JSON is a list of jobs, each
``{"model": <checkpoint folder>, "prompt": <text in the model's own format>, "image": <file>,
"max_tokens": N, "ignore_eos": bool}``. Prints one JSON list: each job's greedy answer, stripped.
Nothing of this repository is imported: the prompt is the caller's, written out by hand.
"""

from __future__ import annotations

import json
import sys

from PIL import Image
from vllm import LLM, SamplingParams


def main() -> None:
    answers = []
    for job in json.loads(sys.argv[1]):
        llm = LLM(model=job["model"], dtype="float32", max_model_len=4096, enforce_eager=True)
        image = Image.open(job["image"]).convert("RGB")
        sampling = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=job["ignore_eos"])
        [output] = llm.generate({"prompt": job["prompt"], "multi_modal_data": {"image": image}}, sampling)
        answers.append(output.outputs[0].text.strip())
        llm.llm_engine.engine_core.shutdown()
        del llm
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
