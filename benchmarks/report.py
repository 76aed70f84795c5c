"""Benchmark results as JSON, a markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {
    "batching_gain_c16": 4.0,  # x the requests/s of unbatched, identical answers
    "gateway_added_p50_ms": 3.0,
    "ttft_ratio": 1.10,  # nginx within 10% of direct
}


def verdicts(result: dict) -> list[tuple[str, str, str, bool]]:
    gain = result["batching"]["gain_by_concurrency"].get("16")
    stack = result["stack"]
    rows = [
        (
            "dynamic batching gain at concurrency 16",
            f"{gain}x (identical answers: {result['batching']['identical_answers']})",
            f">= {TARGETS['batching_gain_c16']}x",
            gain is not None and gain >= TARGETS["batching_gain_c16"] and result["batching"]["identical_answers"],
        ),
        (
            "gateway p50 added (nginx -> FastAPI -> Triton vs Triton)",
            f"{stack['gateway_added_ms']['p50']} ms",
            f"<= {TARGETS['gateway_added_p50_ms']} ms",
            stack["gateway_added_ms"]["p50"] <= TARGETS["gateway_added_p50_ms"],
        ),
        (
            "time to first token, nginx / direct",
            f"{stack['ttft_ratio_nginx_vs_direct']}",
            f"<= {TARGETS['ttft_ratio']}",
            stack["ttft_ratio_nginx_vs_direct"] <= TARGETS["ttft_ratio"],
        ),
        ("cold start: stack up to first answer", f"{stack['cold_start_s']} s", "(recorded)", True),
    ]
    return rows


def markdown(result: dict) -> str:
    b, s = result["batching"], result["stack"]
    lines = [
        f"# Benchmark {result['date']} on {result['host']}",
        "",
        f"{result['machine']['cpus']} CPUs, {result['machine']['platform']}, Python {result['machine']['python']}; "
        f"checkpoints: {result['checkpoints']}{' (tiny random weights)' if result['tiny'] else ''}; "
        f"run took {result['seconds']} s.",
        "",
        "## Targets",
        "",
        "| Figure | Measured | Target | Met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {m} | {t} | {'yes' if ok else '**no**'} |" for a, m, t, ok in verdicts(result)]
    lines += [
        "",
        f"## Dynamic batching ({b['model']}, {b['max_tokens']} new tokens, greedy, KServe infer)",
        "",
        "| Configuration | Concurrency | req/s | p50 ms | p95 ms | failed |",
        "|---|---|---|---|---|---|",
    ]
    for label, runs in b["runs"].items():
        lines += [
            f"| {label} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['failed']} |"
            for r in runs
        ]
    lines += [
        "",
        "Gain (req/s on / off): " + ", ".join(f"c={c}: {g}x" for c, g in b["gain_by_concurrency"].items()),
        "",
        "Executions vs inferences of the stream model: "
        + ", ".join(
            f"{k}: {v['inferences']} inferences in {v['executions']} executions" for k, v in b["executions"].items()
        ),
        "",
        "## Gateway overhead (8 new tokens)",
        "",
        "| Path | Concurrency | req/s | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} |" for k, r in s["gateway"].items()
    ]
    lines += [
        "",
        f"Added by nginx -> FastAPI: p50 {s['gateway_added_ms']['p50']} ms, p95 {s['gateway_added_ms']['p95']} ms; "
        f"throughput ratio at concurrency 8: {s['gateway_throughput_ratio_c8']}.",
        "",
        "## Streaming (generate_stream, 64 new tokens)",
        "",
        "| Path | TTFT p50 ms | per-chunk ms | total p50 ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {r['ttft_p50_ms']} | {r['inter_chunk_ms']} | {r['p50_ms']} |" for k, r in s["streaming"].items()
    ]
    lines += [
        "",
        "## The seed comparison: in-process engine vs Triton (FastAPI /v1, 64 new tokens)",
        "",
        "| Backend | req/s | p50 ms | p95 ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} |" for k, r in s["seed_comparison"].items()]
    return "\n".join(lines) + "\n"


def plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, ylabel, name in (("rps", "requests/s", "throughput"), ("p95_ms", "p95 latency (ms)", "p95")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, runs in result["batching"]["runs"].items():
            ax.plot([r["concurrency"] for r in runs], [r[key] for r in runs], marker="o", label=label)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{result['batching']['model']}, {result['batching']['max_tokens']} new tokens ({result['host']})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = stem.with_name(f"{stem.name}-{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{result['date'][:10]}-{result['host']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1))
    md_path.write_text(markdown(result))
    return [json_path, md_path, *plots(result, stem)]
