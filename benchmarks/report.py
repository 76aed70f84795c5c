"""Benchmark results as JSON, a markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.peer import markdown as peer_markdown

TARGETS = {
    "gain_c16": 5.0,  # llava req/s at concurrency 16 / at 1, through KServe infer
    "infer_vs_ceiling": 0.85,  # llava KServe infer req/s / the engine in-process, concurrency 16
    "infer_vs_stream": 0.90,  # KServe infer / requests sent straight to <model>_stream
    "head_of_line_ratio": 3.0,  # short request during a long answer / idle
    "open_loop_p95_ratio": 0.5,  # in-flight p95 / static p95 where static passes 5 s
    "gateway_added_p50_ms": 3.0,
    "ttft_ratio": 1.10,  # nginx within 10% of direct
    "refusal_p95_ms": 100.0,  # 300 requests at once: the refused ones' p95 latency
}


def verdicts(result: dict) -> list[tuple[str, str, str, bool]]:
    rows = []
    if "gain" in result:
        llava = result["gain"]["models"]["llava"]
        rows += [
            (
                "llava gain at concurrency 16, KServe infer",
                f"{llava['gain_infer']}x",
                f">= {TARGETS['gain_c16']}x",
                llava["gain_infer"] >= TARGETS["gain_c16"],
            ),
            (
                "llava KServe infer / in-process ceiling, concurrency 16",
                f"{llava['infer_vs_ceiling']:.0%}",
                f">= {TARGETS['infer_vs_ceiling']:.0%}",
                llava["infer_vs_ceiling"] >= TARGETS["infer_vs_ceiling"],
            ),
            (
                "llava KServe infer / straight to llava_stream, concurrency 16",
                f"{llava['infer_vs_stream']:.0%}",
                f">= {TARGETS['infer_vs_stream']:.0%}",
                llava["infer_vs_stream"] >= TARGETS["infer_vs_stream"],
            ),
        ]
    if "head_of_line" in result:
        worst = max(result["head_of_line"]["inflight"].items(), key=lambda kv: kv[1]["ratio"])
        rows.append(
            (
                "head-of-line: short request during a long answer / idle (worst model)",
                f"{worst[1]['ratio']}x ({worst[0]})",
                f"<= {TARGETS['head_of_line_ratio']}x",
                worst[1]["ratio"] <= TARGETS["head_of_line_ratio"],
            )
        )
    if "open_loop" in result:
        o = result["open_loop"]
        rows.append(
            (
                f"open loop p95 at {o['at_rate']}/s: in-flight / static",
                f"{o['inflight_p95_s']} s / {o['static_p95_s']} s = {o['p95_ratio']}",
                f"<= {TARGETS['open_loop_p95_ratio']} (static p95 > 5 s)",
                o["p95_ratio"] <= TARGETS["open_loop_p95_ratio"] and o["static_p95_s"] > 5.0,
            )
        )
    if "stack" in result:
        stack = result["stack"]
        rows += [
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
        for route, burst in stack.get("overload", {}).items():
            p95 = burst.get("refusal_p95_ms", float("inf"))
            rows.append(
                (
                    f"300 at once, {route}: refusals' p95 ({burst['refused']} refused)",
                    f"{p95} ms",
                    f"< {TARGETS['refusal_p95_ms']} ms",
                    p95 < TARGETS["refusal_p95_ms"],
                )
            )
    return rows


def _gain(g: dict) -> list[str]:
    levels = sorted({k.split("=")[1] for m in g["models"].values() for k in m["in_process"]}, key=int)
    head = " | ".join(f"c={c}" for c in levels)
    lines = [
        f"## Batching gain ({g['max_tokens']} new tokens, greedy; req/s)",
        "",
        f"| Model | Path | {head} | gain |",
        "|---|---|" + "---|" * (len(levels) + 1),
    ]
    for model, m in g["models"].items():
        for label, runs, gain in (
            ("KServe infer (`" + model + "`)", {c: m["triton"][f"infer c={c}"] for c in levels}, m["gain_infer"]),
            (
                "stream model (`" + model + "_stream`)",
                {c: m["triton"][f"stream c={c}"] for c in levels},
                m["gain_stream"],
            ),
            ("engine in-process (ceiling)", {c: m["in_process"][f"c={c}"] for c in levels}, m["gain_in_process"]),
        ):
            lines.append(f"| {model} | {label} | " + " | ".join(str(runs[c]["rps"]) for c in levels) + f" | {gain}x |")
    lines += [
        "",
        "KServe infer at the highest concurrency, against the ceiling and the stream model: "
        + "; ".join(
            f"{model} {m['infer_vs_ceiling']:.0%} / {m['infer_vs_stream']:.0%}" for model, m in g["models"].items()
        ),
        "",
    ]
    return lines


def _head_of_line(h: dict) -> list[str]:
    lines = [
        "## Head-of-line (8-token request while a long answer generates)",
        "",
        "| Scheduler | Model | long answer (tokens, s) | short alone ms | short during ms | ratio | short first |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, models in h.items():
        lines += [
            f"| {policy} | {model} | {r['long_tokens']}, {r['long_seconds']} | {r['short_idle_ms']} | "
            f"{r['short_during_ms']} | {r['ratio']}x | {'yes' if r['short_finished_before_long'] else 'no'} |"
            for model, r in models.items()
        ]
    return [*lines, ""]


def _open_loop(o: dict) -> list[str]:
    lines = [
        f"## Open loop ({o['model']}: Poisson arrivals for {o['seconds_per_rate']} s per rate, "
        f"max_tokens 16 to 512 log-uniform; goodput = requests/s with TTFT <= {o['ttft_slo_s']} s)",
        "",
        "| Scheduler | rate/s | requests | p50 s | p95 s | TTFT p50 s | TTFT p95 s | goodput/s | tokens/s | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, runs in o["runs"].items():
        lines += [
            f"| {policy} | {r['rate']} | {r['requests']} | {r['p50_s']} | {r['p95_s']} | {r['ttft_p50_s']} | "
            f"{r['ttft_p95_s']} | {r['goodput_rps']} | {r['tokens_per_s']} | {r['failed']} |"
            for r in runs
        ]
    return [*lines, ""]


def _stack(s: dict) -> list[str]:
    lines = ["## Gateway overhead (8 new tokens)", "", "| Path | Concurrency | req/s | p50 ms | p95 ms |"]
    lines += ["|---|---|---|---|---|"]
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
        "## In-process engine vs Triton (FastAPI /v1, 64 new tokens)",
        "",
        "| Backend | req/s | p50 ms | p95 ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} |" for k, r in s["seed_comparison"].items()]
    return [*lines, ""]


def markdown(result: dict) -> str:
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
    lines.append("")
    for key, section in (
        ("gain", _gain),
        ("head_of_line", _head_of_line),
        ("open_loop", _open_loop),
        ("stack", _stack),
        ("peer", peer_markdown),
    ):
        if key in result:
            lines += section(result[key])
    return "\n".join(lines)


def plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "gain" in result:
        fig, ax = plt.subplots(figsize=(7, 4))
        for model, m in result["gain"]["models"].items():
            runs = m["in_process"]
            levels = sorted(int(k.split("=")[1]) for k in runs)
            ax.plot(levels, [m["triton"][f"infer c={c}"]["rps"] for c in levels], marker="o", label=f"{model} infer")
            ax.plot(levels, [runs[f"c={c}"]["rps"] for c in levels], linestyle="--", label=f"{model} in-process")
        ax.set(xlabel="concurrency", ylabel="requests/s", xscale="log", title=f"Batching gain ({result['host']})")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, stem, "throughput"))
    if "open_loop" in result:
        fig, ax = plt.subplots(figsize=(7, 4))
        for policy, runs in result["open_loop"]["runs"].items():
            ax.plot([r["rate"] for r in runs], [r["p95_s"] for r in runs], marker="o", label=f"{policy} p95")
            ax.plot(
                [r["rate"] for r in runs], [r["ttft_p95_s"] for r in runs], linestyle="--", label=f"{policy} TTFT p95"
            )
        ax.set(xlabel="arrivals per second", ylabel="seconds", title="Open loop, llava (Poisson arrivals)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, stem, "p95"))
    return written


def _save(fig, stem: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{result['date'][:10]}-{result['host']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1))
    md_path.write_text(markdown(result))
    return [json_path, md_path, *plots(result, stem)]
