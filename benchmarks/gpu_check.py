"""The engine on a GPU with real-sized models: ``make gpu-check`` (issue 17, deliverable 6).

Builds random-weight models from the real configurations of Qwen3-VL-8B-Instruct and
LLaVA-1.5-7B (layers, heads, hidden sizes, vocabulary and vision towers as published; the
tokenizer and processor come from the tiny checkpoints, so the text is gibberish and most
sampled ids decode to nothing: figures here count tokens, never read text). The weights are
initialised on the device (no download, no 16 GB file); everything else loads through the
engine's own code. Then, in-process, in bf16 on CUDA:

- output tokens/s at 1/16/64 rows, against the HBM-bandwidth bound of a decode step
  ((text weights + the KV the step reads) / bandwidth, 4.8 TB/s for an H200) and against the
  bare model's batched ``generate`` on the same requests;
- a decode step split into GPU time (the kernels' own time, from the profiler) and host time
  (the rest of the step's wall time: Python, launches, syncs);
- the KV budget chosen (GPU_MEMORY_UTILIZATION) and the device's peak memory;
- a preemption under a forced small budget (KV_CACHE_TOKENS): the rows still finish, and agree
  with the same rows run with room;
- greedy agreement of batched rows with the same rows run one at a time;
- which attention read the pages (``attention``): flashinfer's in-place kernels where
  flashinfer imports (bf16/fp16 on CUDA), else the gather path; with flashinfer, the same rows
  and the largest row count again with ``PAGED_ATTENTION=gather`` (``gather``: agreement and
  tokens/s, the figure that says what reading pages in place is worth);
- vLLM's engine (``--vllm``, default on CUDA) on the same checkpoint with its own random
  weights, the same rows, prompts and answer lengths: tokens/s beside ours
  (``benchmarks/vllm_rows.py``, in vLLM's venv from ``make vllm-env`` or an interpreter that
  has vLLM; where there is none it says so and the rest runs).

bf16 kernels pick different reduction orders for different batch sizes, so on a GPU rows
agree with a tolerance (reported, never asserted); on CPU in float32 they must agree exactly.

``--scale tiny --device cpu`` runs the same code on shrunken configs in seconds: the CPU path
that CI runs so that this check cannot rot. Output: JSON on stdout and in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlm_engine.chat import single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.settings import resolve_settings
from vlm_engine.tiny.samples import PROMPTS, sample_image

ROOT = Path(__file__).resolve().parent.parent
HBM_BYTES_PER_S = 4.8e12  # H200

# The published configurations (config.json of each model), the parts that set the cost.
REAL: dict[str, dict[str, Any]] = {
    "qwen3-vl": {
        "source": "Qwen/Qwen3-VL-8B-Instruct",
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        "vision": {
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        "image_size": 448,  # 28 x 28 patches: 196 image tokens
    },
    "llava": {
        "source": "llava-hf/llava-1.5-7b-hf",
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
        },
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "image_size": 336,  # 576 image tokens
    },
}

# --scale tiny: the same structure, small enough for a CPU (vocabulary kept real).
SHRINK_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
SHRINK = {
    "qwen3-vl": {
        "text": {
            **SHRINK_TEXT,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        },
        "vision": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0, 1],
        },
        "image_size": 128,
    },
    "llava": {
        "text": {**SHRINK_TEXT, "num_key_value_heads": 4, "head_dim": 32},
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "projection_dim": 64,
        },
        "image_size": 224,
    },
}
# --scale kv-heavy: cheap to compute, heavy in KV (16 layers of 8 KV heads of 64: 64 KiB per
# token in float32, 32x the tiny checkpoint's), so that KV traffic weighs on a CPU as it does
# on a GPU (``make bench`` part ``kv``).
KV_HEAVY = {
    "llava": {
        **SHRINK["llava"],
        "text": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 16,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 64,
        },
    }
}
SCALES = {"tiny": SHRINK, "kv-heavy": KV_HEAVY}


def make_checkpoint(model: str, scale: str, tiny_dir: Path, out: Path) -> Path:
    """A checkpoint folder with the real (or shrunken) config and the tiny tokenizer and
    processor; no weights (``random_weights`` makes them on the device)."""
    from transformers import AutoConfig

    source = tiny_dir / model
    if not (source / "config.json").exists():
        raise SystemExit(f"no tiny checkpoint at {source}: run `make tiny-models` first")
    spec = REAL[model] if scale == "real" else {**REAL[model], **SCALES[scale][model]}
    folder = out / model
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json", "tiny.json"):
            shutil.copy(path, folder / path.name)
    config = AutoConfig.from_pretrained(source)
    text, vision = config.text_config, config.vision_config
    for key, value in {**REAL[model]["text"], **spec["text"]}.items():
        setattr(text, key, value)
    for key, value in {**REAL[model]["vision"], **spec["vision"]}.items():
        setattr(vision, key, value)
    text.initializer_range = 0.02
    config.save_pretrained(folder)
    side = spec["image_size"]
    if model == "llava":  # the processor's crop follows the vision tower
        path = folder / "processor_config.json"
        data = json.loads(path.read_text())
        data["image_processor"]["size"] = {"shortest_edge": vision.image_size}
        data["image_processor"]["crop_size"] = {"height": vision.image_size, "width": vision.image_size}
        path.write_text(json.dumps(data, indent=2))
    else:  # images up to the benchmark's size keep their resolution
        path = folder / "preprocessor_config.json"
        data = json.loads(path.read_text())
        data["size"] = {"shortest_edge": 32 * 32, "longest_edge": (side + 32) ** 2}
        path.write_text(json.dumps(data, indent=2))
    return folder


@contextlib.contextmanager
def random_weights(device: str):
    """``from_pretrained`` builds the model from its config with random weights, on ``device``."""
    from transformers import AutoConfig, PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]

    def build(cls, path, *args, **kwargs):
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(0)
        with torch.device(device):
            return cls._from_config(
                config, dtype=kwargs.get("dtype"), attn_implementation=kwargs.get("attn_implementation")
            )

    PreTrainedModel.from_pretrained = classmethod(build)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


class StepTimer:
    """Wraps the adapter's ``step``: wall time, rows and KV tokens read per decode-only step; on
    CUDA, a few steps under the profiler for the kernels' own time."""

    def __init__(self, adapter: Any, device: str):
        self.adapter, self.device = adapter, device
        self.original = adapter.step
        self.steps: list[tuple[float, int, int]] = []  # (seconds, rows, KV tokens read)
        self.profile_left = 0
        self.profiled: list[tuple[float, float, int]] = []  # (wall s, kernel s, rows)
        adapter.step = self.step

    def step(self, seqs: list[Any], chunks: list[Any]) -> tuple[list[Any], list[Any]]:
        if chunks:  # a step carrying prompt chunks: not a decode step's figure
            return self.original(seqs, chunks)
        kv_tokens = sum(s.cached + 1 for s in seqs)
        if self.profile_left > 0 and self.device.startswith("cuda"):
            self.profile_left -= 1
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                out = self.original(seqs, chunks)
                wall = time.perf_counter() - start
            kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
            self.profiled.append((wall, kernel_us / 1e6, len(seqs)))
            return out
        start = time.perf_counter()
        out = self.original(seqs, chunks)
        self.steps.append((time.perf_counter() - start, len(seqs), kv_tokens))
        return out


def text_weight_bytes(adapter: Any) -> int:
    """Bytes a decode step reads in weights: everything but the vision tower and projector."""
    skip = ("visual", "vision_tower", "multi_modal_projector", "vision_model", "image_to_text_projection")
    return sum(
        p.numel() * p.element_size() for name, p in adapter.model.named_parameters() if not any(s in name for s in skip)
    )


def requests(e: VLMEngine, rows: int, max_tokens: int, side: int, offset: int = 0) -> list[Any]:
    out = []
    for i in range(offset, offset + rows):
        image = sample_image((side, side), "PNG", (40 * i % 255, 90, 200 - 10 * (i % 16)))
        out.append(e.prepare(single_turn(PROMPTS[i % len(PROMPTS)], image), max_tokens, 0.0))
    return out


def run_ids(e: VLMEngine, batch: list[Any]) -> list[list[int]]:
    """Generated token ids of each request (the text of random weights says nothing)."""
    finish = e.adapter.finish

    def keep(token_ids: list[int], reason: str):
        result = finish(token_ids, reason)
        result.token_ids = list(token_ids)
        return result

    e.adapter.finish = keep
    try:
        return [r.token_ids for r in e.generate(batch)]
    finally:
        e.adapter.finish = finish


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far batched rows follow single rows: exact rows, and the mean shared prefix."""
    exact = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    return {"rows": len(a), "exact_rows": exact, "mean_shared_prefix": round(statistics.mean(prefix), 3)}


def engine(folder: Path, model: str, device: str, dtype: str, **env: str) -> VLMEngine:
    settings = resolve_settings(
        model,
        env={
            f"{model.upper().replace('-', '_')}_MODEL_PATH": str(folder),
            "DEVICE": device,
            "DTYPE": dtype,
            "WARMUP": "true",
            "IGNORE_EOS": "true",
            "MAX_PROMPT_TOKENS": "256",
            "MAX_TOKENS_CAP": "256",
            "PREPARE_WORKERS": "0",  # the bare generate batches the decoded images
            **env,
        },
    )
    with random_weights(device):
        return VLMEngine(settings)


def throughput(e: VLMEngine, rows: int, max_tokens: int, side: int, bandwidth: float, device: str) -> dict:
    timer = StepTimer(e.adapter, device)
    try:
        batch = requests(e, rows, max_tokens, side)
        timer.profile_left = 0
        start = time.perf_counter()
        ids = run_ids(e, batch)
        wall = time.perf_counter() - start
        tokens = sum(len(x) for x in ids)
        steps = [s for s in timer.steps if s[1] == rows] or timer.steps
        step_s = statistics.median(s[0] for s in steps)
        weights = text_weight_bytes(e.adapter)
        per_token = e.adapter.kv.shape.bytes_per_token
        kv_read = statistics.median(s[2] for s in steps) * per_token
        bound_step = (weights + kv_read) / bandwidth
        out: dict[str, Any] = {
            "rows": rows,
            "output_tokens": tokens,
            "tok_s": round(tokens / wall, 1),
            "decode_step_ms": round(step_s * 1000, 2),
            "decode_tok_s": round(rows / step_s, 1),
            "bound_tok_s": round(rows / bound_step, 1),
            "decode_over_bound": round(bound_step / step_s, 3),
            "weights_gb": round(weights / 1e9, 2),
            "kv_read_per_step_mb": round(kv_read / 1e6, 1),
        }
        if device.startswith("cuda"):  # a few more steps at this batch under the profiler
            timer.profile_left = 6
            run_ids(e, requests(e, rows, 8, side, offset=rows))
            full = [p for p in timer.profiled if p[2] == rows] or timer.profiled
            if full:
                gpu = statistics.median(p[1] for p in full)
                out["step_gpu_ms"] = round(gpu * 1000, 2)
                out["step_host_ms"] = round(max(step_s - gpu, 0.0) * 1000, 2)
        return out
    finally:
        e.adapter.step = timer.original


def bare_generate(e: VLMEngine, rows: int, max_tokens: int, side: int, device: str) -> float:
    """Tokens/s of the model's own batched ``generate`` on the same requests."""
    adapter = e.adapter
    inputs = adapter.encode(requests(e, rows, max_tokens, side))  # the processor's padded batch
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(adapter.model.dtype)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        out = adapter.model.generate(
            **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=adapter.pad_id
        )
        sync(device)
        seconds = time.perf_counter() - start
    return (out.shape[-1] - inputs["input_ids"].shape[-1]) * rows / seconds


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def preemption(
    folder: Path,
    model: str,
    device: str,
    dtype: str,
    rows: int,
    max_tokens: int,
    side: int,
    roomy: list[list[int]],
    prompt: int,
) -> dict:
    """The same rows with a KV budget that holds their prompts but not their answers."""
    # every prompt fits (in whole pages), half of every answer does; one whole row always fits
    page = 16
    tokens = max(rows * -(-prompt // page) * page + rows * max_tokens // 2, prompt + max_tokens + 4 * page)
    e = engine(
        folder,
        model,
        device,
        dtype,
        KV_CACHE_TOKENS=str(tokens),
        KV_PAGE_TOKENS=str(page),
        MAX_RUNNING=str(rows),
        MAX_WAITING=str(rows),
    )
    try:
        ids = run_ids(e, requests(e, rows, max_tokens, side))
        stats = e.scheduler.stats
        return {
            "kv_tokens": e.adapter.kv.pages.capacity_tokens,
            "preempted": stats.preempted,
            "out_of_memory": stats.out_of_memory,
            "finished": sum(len(x) == max_tokens for x in ids),
            "agreement_with_room": agreement(ids, roomy),
        }
    finally:
        e.close()


def attention_path(e: VLMEngine) -> str:
    """How the engine's attention reads the KV pages (``kv.cache``, ``kv.flashinfer_attention``)."""
    runner = e.adapter.runner
    if runner.paged is not None:
        return "flashinfer"
    return "cpu kernel (decode rows)" if runner.read_in_place else "gather"


def gather_side(
    folder: Path, model: str, device: str, dtype: str, args: argparse.Namespace, side: int, batched: list[list[int]]
) -> dict:
    """flashinfer's in-place attention against the gather path on the same weights: greedy
    agreement of the same batched rows (bf16 kernels differ in rounding: reported, not asserted)
    and tokens/s at the largest row count."""
    rows = max(args.rows)
    e = engine(folder, model, device, dtype, PAGED_ATTENTION="gather", MAX_RUNNING=str(rows), MAX_WAITING=str(2 * rows))
    try:
        ids = run_ids(e, requests(e, args.agreement_rows, args.max_tokens, side))
        figures = throughput(e, rows, args.max_tokens, side, args.bandwidth, device)
        return {"agreement_with_flashinfer": agreement(ids, batched), "throughput": figures}
    finally:
        e.close()
        del e
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def vllm_python() -> tuple[str | None, str]:
    """A python with vLLM: vLLM's venv (``make vllm-env``), else this one if it has vLLM."""
    from vlm_triton import vllm_env

    if vllm_env.problem(vllm_env.PACKAGES) is None:
        return str(vllm_env.python(vllm_env.PACKAGES)), f"{vllm_env.VLLM} (make vllm-env)"
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, "this interpreter's vllm"
    return None, "no vLLM here: run `make vllm-env` (or use an interpreter that has vllm)"


def vllm_job(folder: Path, e: VLMEngine, args: argparse.Namespace, side: int) -> dict:
    """What vLLM's side runs: the same checkpoint, rows, answer lengths and prompt text."""
    made = requests(e, 4, 1, side)
    return {
        "model": str(folder.resolve()),
        "dtype": args.dtype,
        "rows": args.rows,
        "max_tokens": args.max_tokens,
        "prompts": [e.adapter.prompt(p) for p in made],  # the engine's own prompt text
        "side": side,
        "max_model_len": max(1024, max(e.adapter.prefill_cost(p) for p in made) + args.max_tokens),
        "cuda": args.device.startswith("cuda"),
    }


def vllm_side(folder: Path, job: dict, args: argparse.Namespace, say) -> dict:
    """vLLM's engine on the same checkpoint (after ours has let the device go): tokens/s beside ours."""
    python, where = vllm_python()
    if python is None:
        return {"skipped": where}
    say(f"vLLM ({where}): {args.rows} rows x {args.max_tokens} tokens")
    # the machine's variables only: nothing of this process's set-up (threads, paths) leaks into vLLM's
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env |= {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).with_name("vllm_rows.py")
    done = subprocess.run([python, str(script), json.dumps(job)], capture_output=True, text=True, env=env, timeout=3600)
    log = args.work / f"vllm-{folder.name}.log"
    log.write_text(done.stdout + done.stderr)
    figures = [line for line in done.stdout.splitlines() if line.startswith('{"load_s"')]
    if not figures:  # (vLLM's own exit can fail after the figures are out: they count)
        return {"failed": f"vLLM exited with {done.returncode} and no figures; its log: {log}"}
    return {"vllm": where, **json.loads(figures[-1])}


def check_model(model: str, args: argparse.Namespace, say) -> dict:
    device, dtype = args.device, args.dtype
    side = (REAL[model] if args.scale == "real" else SCALES[args.scale][model])["image_size"]
    folder = make_checkpoint(model, args.scale, args.tiny_dir, args.work)
    say(f"{model}: building random weights from {REAL[model]['source']}'s config ({args.scale}) on {device}")
    start = time.perf_counter()
    rows = {"MAX_RUNNING": str(max(args.rows)), "MAX_WAITING": str(2 * max(args.rows))}
    e = engine(folder, model, device, dtype, COMPILE_STEP=args.compile_step, **rows)
    out: dict[str, Any] = {"model": model, "source": REAL[model]["source"], "scale": args.scale}
    try:
        kv = e.adapter.kv
        out["load_s"] = round(time.perf_counter() - start, 1)
        out["dtype"] = str(e.adapter.model.dtype)
        out["compiled_step"] = e.adapter.runner.compiled is not None
        out["attention"] = attention_path(e)
        out["kv_budget"] = {
            "gib": round(kv.bytes / 2**30, 2),
            "tokens": kv.pages.capacity_tokens,
            "bytes_per_token": kv.shape.bytes_per_token,
            "gpu_memory_utilization": e.settings.gpu_memory_utilization,
        }
        out["prompt_tokens"] = e.adapter.prefill_cost(requests(e, 1, 1, side)[0])
        out["throughput"] = []
        for rows in args.rows:
            say(f"{model}: {rows} rows x {args.max_tokens} tokens")
            figures = throughput(e, rows, args.max_tokens, side, args.bandwidth, device)
            if rows in args.generate_rows:
                bare = bare_generate(e, rows, args.max_tokens, side, device)
                figures["generate_tok_s"] = round(bare, 1)
                figures["engine_over_generate"] = round(figures["tok_s"] / bare, 3)
            out["throughput"].append(figures)
            say(f"{model}: {figures}")
        n = args.agreement_rows
        say(f"{model}: greedy agreement, {n} rows batched against one at a time")
        same = requests(e, n, args.max_tokens, side)
        prompt = max(e.adapter.prefill_cost(p) for p in same)
        batched = run_ids(e, same)
        single = [run_ids(e, [p])[0] for p in requests(e, n, args.max_tokens, side)]
        out["greedy_agreement"] = agreement(batched, single)
        job = vllm_job(folder, e, args, side) if args.vllm else None
        if device.startswith("cuda"):
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["device_memory_gib"] = round(torch.cuda.mem_get_info()[1] / 2**30, 2)
    finally:
        e.close()
        del e
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if out["attention"] == "flashinfer":
        say(f"{model}: the same rows with PAGED_ATTENTION=gather (pages gathered for SDPA)")
        out["gather"] = gather_side(folder, model, device, dtype, args, side, batched)
        say(f"{model}: gather {out['gather']}")
    say(f"{model}: preemption under a small KV budget")
    out["preemption"] = preemption(folder, model, device, dtype, n, args.max_tokens, side, batched, prompt)
    say(f"{model}: {out['preemption']}")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if job is not None:
        out["vllm"] = vllm_side(folder, job, args, say)
        say(f"{model}: vLLM {out['vllm']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["real", "tiny"], default=None, help="default: real on CUDA, tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--models", nargs="*", default=["qwen3-vl", "llava"], choices=list(REAL))
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 16, 64])
    parser.add_argument("--generate-rows", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--agreement-rows", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--bandwidth", type=float, default=HBM_BYTES_PER_S, help="bytes/s (H200: 4.8e12)")
    parser.add_argument("--tiny-dir", type=Path, default=ROOT / ".models" / "tiny")
    parser.add_argument("--work", type=Path, default=ROOT / ".models" / "gpu-check")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--strict", action="store_true", help="fail unless batched and preempted rows agree exactly")
    parser.add_argument(
        "--compile-step",
        choices=["auto", "true", "false"],
        default="auto",
        help="COMPILE_STEP of the engine (auto: on for CPU, off on CUDA until measured here)",
    )
    parser.add_argument(
        "--vllm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also vLLM's engine on the same checkpoints (default: on CUDA; needs make vllm-env or vllm here)",
    )
    args = parser.parse_args(argv)
    args.vllm = args.device.startswith("cuda") if args.vllm is None else args.vllm
    args.scale = args.scale or ("real" if args.device.startswith("cuda") else "tiny")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[gpu-check {time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "bandwidth_bytes_per_s": args.bandwidth,
        "models": [check_model(model, args, say) for model in args.models],
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.strict:
        for m in report["models"]:
            a, p = m["greedy_agreement"], m["preemption"]
            if (
                a["exact_rows"] != a["rows"]
                or p["agreement_with_room"]["exact_rows"] != p["agreement_with_room"]["rows"]
            ):
                say(f"{m['model']}: rows disagree ({a}, {p['agreement_with_room']})")
                return 1
            if p["preempted"] == 0 or p["finished"] != a["rows"]:
                say(f"{m['model']}: the small budget forced no preemption or rows did not finish ({p})")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
