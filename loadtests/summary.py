"""The summary of a run (per endpoint, per endpoint and model, in total) and the SLO checks.

Built from the samples the locustfile writes (``LOADTEST_SAMPLES``): exact percentiles (locust's
own CSV rounds response times to two significant digits above 100 ms, and to whole
milliseconds below, which erases inter-token gaps), output tokens, failures. Latency
percentiles are over successful requests; failures are counted apart.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from loadtests.config import ITL, MEASUREMENT_TYPES, TTFT, ConfigError

ROW_FIELDS = (
    "requests",
    "failures",
    "error_ratio",
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "max_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p95_ms",
    "output_tokens",
    "output_tokens_per_s",
)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least q% of the values at or below it)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _row(entries: list[dict], elapsed_s: float) -> dict:
    requests = [e for e in entries if e["type"] not in MEASUREMENT_TYPES]
    times = [t for e in requests for t in e["times_ms"]]
    ttft = [t for e in entries if e["type"] == TTFT for t in e["times_ms"]]
    itl = [t for e in entries if e["type"] == ITL for t in e["times_ms"]]
    failures = sum(e["failures"] for e in requests)
    total = len(times) + failures
    tokens = sum(e["output_tokens"] for e in requests)
    token_requests = sum(e["token_requests"] for e in requests)
    errors: dict[str, int] = {}
    for e in requests:
        for message, count in e["errors"].items():
            errors[message] = errors.get(message, 0) + count
    return {
        "requests": total,
        "failures": failures,
        "error_ratio": _round(failures / total, 4) if total else None,
        "rps": _round(total / elapsed_s, 3) if elapsed_s > 0 else None,
        "p50_ms": _round(percentile(times, 50)),
        "p95_ms": _round(percentile(times, 95)),
        "p99_ms": _round(percentile(times, 99)),
        "mean_ms": _round(sum(times) / len(times)) if times else None,
        "max_ms": _round(max(times)) if times else None,
        "ttft_p50_ms": _round(percentile(ttft, 50)),
        "ttft_p95_ms": _round(percentile(ttft, 95)),
        "ttft_p99_ms": _round(percentile(ttft, 99)),
        "ttft_samples": len(ttft),
        "itl_p50_ms": _round(percentile(itl, 50), 3),
        "itl_p95_ms": _round(percentile(itl, 95), 3),
        "itl_samples": len(itl),
        # only answers that report their tokens count (KServe infer answers carry no token count)
        "output_tokens": tokens if token_requests else None,
        "output_tokens_per_s": _round(tokens / elapsed_s, 2) if token_requests and elapsed_s > 0 else None,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


def summarise(samples: dict) -> dict:
    """``samples``: the locustfile's JSON. Returns ``{"run", "total", "endpoints", "models", "rows"}``
    (``models``: one row per model over every endpoint)."""
    elapsed = float(samples.get("elapsed_s") or 0.0)
    entries = samples.get("entries", [])
    keys = sorted({(e["endpoint"], e["model"]) for e in entries if e["type"] not in MEASUREMENT_TYPES})
    rows = []
    for endpoint, model in keys:
        chosen = [e for e in entries if (e["endpoint"], e["model"]) == (endpoint, model)]
        rows.append({"endpoint": endpoint, "model": model, **_row(chosen, elapsed)})
    endpoints = []
    for endpoint in sorted({k[0] for k in keys}):
        chosen = [e for e in entries if e["endpoint"] == endpoint]
        endpoints.append({"endpoint": endpoint, "model": "all", **_row(chosen, elapsed)})
    models = []
    for model in dict.fromkeys(k[1] for k in sorted(keys, key=lambda k: _model_order(k[1], samples))):
        chosen = [e for e in entries if e["model"] == model]
        models.append({"endpoint": "all", "model": model, **_row(chosen, elapsed)})
    total = {"endpoint": "all", "model": "all", **_row(entries, elapsed)}
    run = {**samples.get("settings", {}), "elapsed_s": round(elapsed, 2), "started": samples.get("started")}
    return {"run": run, "total": total, "endpoints": endpoints, "models": models, "rows": rows}


def _model_order(model: str, samples: dict) -> tuple[int, str]:
    """The run's own order of its models (MODELS), then any other by name."""
    named = list(samples.get("settings", {}).get("models") or [])
    return (named.index(model), "") if model in named else (len(named), model)


# SLOs -------------------------------------------------------------------------------------
SLO_NAMES = {
    "SLO_P95_MS": "p95 latency (ms) of every endpoint and model, at most",
    "SLO_P99_MS": "p99 latency (ms) of every endpoint and model, at most",
    "SLO_TTFT_P95_MS": "p95 time to first token (ms) of every streamed model, at most",
    "SLO_ITL_P95_MS": "p95 inter-token latency (ms) of every streamed model, at most",
    "SLO_ERROR_RATIO": "failed / all requests, at most (default 0.01; 'off' to disable)",
    "SLO_MIN_RPS": "requests per second in total, at least",
    "SLO_MIN_TOKENS_PER_S": "output tokens per second in total, at least",
}
DEFAULT_SLOS = {"SLO_ERROR_RATIO": 0.01}


def slo_thresholds(env=None) -> dict[str, float]:
    """The configured thresholds: the environment's ``SLO_*`` values over the defaults."""
    env = os.environ if env is None else env
    thresholds: dict[str, float] = {}
    for name in SLO_NAMES:
        raw = str(env.get(name, "")).strip()
        if raw.lower() in ("off", "none", "no", "false"):
            continue
        if not raw:
            if name in DEFAULT_SLOS:
                thresholds[name] = DEFAULT_SLOS[name]
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if value < 0 or math.isnan(value):
            raise ConfigError(f"{name}={raw!r} must be a number of at least 0")
        thresholds[name] = value
    return thresholds


@dataclass
class Violation:
    slo: str
    scope: str
    measured: float | None
    threshold: float
    message: str

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6g}"


def check_slos(summary: dict, thresholds: dict[str, float]) -> list[Violation]:
    broken: list[Violation] = []

    def at_most(name: str, field: str, label: str, rows: list[dict], unit: str) -> None:
        if name not in thresholds:
            return
        limit = thresholds[name]
        measured_rows = [r for r in rows if r.get(field) is not None]
        if not measured_rows:
            broken.append(Violation(name, "all", None, limit, f"{name}: no {label} was measured, cannot check it"))
        for row in measured_rows:
            if row[field] > limit:
                scope = f"{row['endpoint']} {row['model']}"
                message = f"{name} broken: {scope} {label} {_fmt(row[field])}{unit} > {_fmt(limit)}{unit}"
                broken.append(Violation(name, scope, row[field], limit, message))

    rows = summary["rows"]
    at_most("SLO_P95_MS", "p95_ms", "p95", rows, " ms")
    at_most("SLO_P99_MS", "p99_ms", "p99", rows, " ms")
    at_most("SLO_TTFT_P95_MS", "ttft_p95_ms", "TTFT p95", rows, " ms")
    at_most("SLO_ITL_P95_MS", "itl_p95_ms", "ITL p95", rows, " ms")
    total = summary["total"]
    if "SLO_ERROR_RATIO" in thresholds:
        limit, measured = thresholds["SLO_ERROR_RATIO"], total["error_ratio"]
        if measured is None or measured > limit:
            detail = f"{total['failures']} of {total['requests']} requests failed" if measured is not None else "none"
            message = f"SLO_ERROR_RATIO broken: error ratio {_fmt(measured)} > {_fmt(limit)} ({detail})"
            broken.append(Violation("SLO_ERROR_RATIO", "all", measured, limit, message))
    for name, field, label in (
        ("SLO_MIN_RPS", "rps", "requests/s"),
        ("SLO_MIN_TOKENS_PER_S", "output_tokens_per_s", "output tokens/s"),
    ):
        if name in thresholds:
            limit, measured = thresholds[name], total[field]
            if measured is None or measured < limit:
                message = f"{name} broken: {label} {_fmt(measured)} < {_fmt(limit)}"
                broken.append(Violation(name, "all", measured, limit, message))
    return broken


# Markdown ---------------------------------------------------------------------------------
COLUMNS = (
    ("endpoint", "endpoint"),
    ("model", "model"),
    ("requests", "requests"),
    ("failures", "failed"),
    ("error_ratio", "error ratio"),
    ("rps", "req/s"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p95_ms", "TTFT p95 ms"),
    ("itl_p50_ms", "ITL p50 ms"),
    ("itl_p95_ms", "ITL p95 ms"),
    ("output_tokens", "out tokens"),
    ("output_tokens_per_s", "out tok/s"),
)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if key in ("endpoint", "model") else "---:" for key, _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    return lines


# The terminal ---------------------------------------------------------------------------
# What a person reads first, per model and in total, in 80 columns: the full tables are in
# summary.md. Each column has its own fixed decimals.
BRIEF_COLUMNS = (  # title, width, field, format
    ("req/s", 9, "rps", "{:.2f}"),
    ("TTFT p50 ms", 13, "ttft_p50_ms", "{:.0f}"),
    ("TTFT p95 ms", 13, "ttft_p95_ms", "{:.0f}"),
    ("tok/s", 10, "output_tokens_per_s", "{:.1f}"),
)
ERRORS_WIDTH = 15
BRIEF_WIDTH = 80
MODEL_WIDTH = 16


def _errors(row: dict) -> str:
    if not row.get("requests"):
        return "-"
    return f"{row['failures']} ({100 * row['failures'] / row['requests']:.1f}%)"


def brief(summary: dict) -> list[str]:
    """The few figures a person reads first: per model and in total, requests/s, time to
    first token p50/p95, output tokens/s and failed requests (count and share), each column
    with fixed decimals, in at most 80 columns ("-": not measured, e.g. TTFT of KServe infer)."""
    rows = [*summary.get("models", []), summary["total"]]
    width = min(MODEL_WIDTH, max(len("model"), *(len(str(r["model"])) for r in rows)))
    run = summary.get("run", {})

    def cells(name: str, values: list[str], errors: str) -> str:
        name = name if len(name) <= width else name[: width - 1] + "~"
        line = f"{name:<{width}}" + "".join(f"{v:>{w}}" for v, (_, w, _, _) in zip(values, BRIEF_COLUMNS, strict=True))
        return f"{line}{errors:>{ERRORS_WIDTH}}"

    total = summary["total"]
    lines = [
        f"{total['requests']} requests in {run.get('elapsed_s', 0):.1f} s"
        + (f", {total['failures']} failed" if total["failures"] else ", none failed"),
        cells("model", [title for title, _, _, _ in BRIEF_COLUMNS], "errors"),
    ]
    for row in rows:
        name = "total" if row is total else str(row["model"])
        values = ["-" if row.get(field) is None else fmt.format(row[field]) for _, _, field, fmt in BRIEF_COLUMNS]
        lines.append(cells(name, values, _errors(row)))
    return [line[:BRIEF_WIDTH] for line in lines]


def markdown(summary: dict, violations: list[Violation], thresholds: dict[str, float]) -> str:
    run = summary["run"]
    lines = [
        "# Load test summary",
        "",
        f"- host: {run.get('host')}, profile: {run.get('profile')}, users: {run.get('users')}, "
        f"spawn rate: {run.get('spawn_rate')}/s, duration: {run.get('duration_s')} s "
        f"(measured {run.get('elapsed_s')} s)",
        f"- models: {', '.join(run.get('models') or [])}; max_tokens: {run.get('max_tokens')}"
        + (f"; weights: {run['weights']}" if run.get("weights") else ""),
        "- latencies are of successful requests; TTFT = time to the first streamed content chunk, "
        "ITL = gap between consecutive chunks; out tokens from `usage` (KServe infer reports none)",
        "",
        "## Per endpoint",
        "",
        *_table([*summary["endpoints"], summary["total"]]),
        "",
        "## Per model",
        "",
        *_table([*summary.get("models", []), summary["total"]]),
        "",
        "## Per endpoint and model",
        "",
        *_table(summary["rows"]),
        "",
        "## SLOs",
        "",
    ]
    if not thresholds:
        lines.append("none configured")
    for name, value in thresholds.items():
        broken = [v for v in violations if v.slo == name]
        lines.append(f"- {name} = {_fmt(value)}: " + ("**BROKEN**" if broken else "met"))
        lines += [f"  - {v.message}" for v in broken]
    errors = summary["total"].get("errors") or {}
    if errors:
        lines += ["", "## Most frequent failures", ""]
        lines += [f"- {count} × {message}" for message, count in errors.items()]
    return "\n".join(lines) + "\n"
