"""The scheduler's metrics as Triton custom metrics (served on Triton's metrics port)."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from vlm_engine import metrics as names
from vlm_engine.scheduler import Metrics


class TritonMetrics(Metrics):
    def __init__(self, model: str):
        family = pb_utils.MetricFamily
        labels = {"model": model}
        name, description = names.TOKENS
        # The families must outlive their metrics: keep both.
        self.families = {
            "running": family(*names.RUNNING, kind=family.GAUGE),
            "waiting": family(*names.WAITING, kind=family.GAUGE),
            "step": family(*names.STEP, kind=family.HISTOGRAM),
            "wait": family(*names.QUEUE_WAIT, kind=family.HISTOGRAM),
            "tokens": family(f"{name}_total", description, kind=family.COUNTER),
            "reports": family(f"{names.REPORTS[0]}_total", names.REPORTS[1], kind=family.COUNTER),
            "queried": family(f"{names.PREFIX_QUERIED[0]}_total", names.PREFIX_QUERIED[1], kind=family.COUNTER),
            "hit": family(f"{names.PREFIX_HIT[0]}_total", names.PREFIX_HIT[1], kind=family.COUNTER),
        }
        self.running = self.families["running"].Metric(labels=labels)
        self.waiting = self.families["waiting"].Metric(labels=labels)
        self.steps = {
            kind: self.families["step"].Metric(labels={**labels, "kind": kind}, buckets=names.STEP_BUCKETS)
            for kind in ("prefill", "decode")
        }
        self.wait = self.families["wait"].Metric(labels=labels, buckets=names.WAIT_BUCKETS)
        self.generated = self.families["tokens"].Metric(labels=labels)
        self.reports = self.families["reports"].Metric(labels=labels)
        self.queried = self.families["queried"].Metric(labels=labels)
        self.hit = self.families["hit"].Metric(labels=labels)

    def queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def waited(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def step(self, kind: str, seconds: float, rows: int) -> None:
        self.steps[kind].observe(seconds)

    def tokens(self, count: int) -> None:
        if count:
            self.generated.increment(count)

    def prefix_cache(self, queried: int, hit: int) -> None:
        if queried:
            self.queried.increment(queried)
        if hit:
            self.hit.increment(hit)

    def reported(self) -> None:
        self.reports.increment(1)
