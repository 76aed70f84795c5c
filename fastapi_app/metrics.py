"""Prometheus metrics of the service (scraped at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from vlm_engine import metrics as names
from vlm_engine.scheduler import Metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

REQUESTS = Counter("vlm_http_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "vlm_http_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("vlm_http_requests_in_flight", "HTTP requests being served", ["route"])
GENERATIONS = Counter("vlm_generations_total", "Generations by model and outcome", ["model", "status"])
GENERATION_SECONDS = Histogram(
    "vlm_generation_duration_seconds", "Whole generation time", ["model"], buckets=LATENCY_BUCKETS
)
TIME_TO_FIRST_TOKEN = Histogram(
    "vlm_time_to_first_token_seconds", "Time to the first text chunk", ["model"], buckets=LATENCY_BUCKETS
)
INTER_TOKEN = Histogram("vlm_inter_token_seconds", "Time between text chunks", ["model"], buckets=TOKEN_BUCKETS)
OUTPUT_TOKENS = Counter("vlm_output_tokens_total", "Generated tokens", ["model"])


class SchedulerMetrics(Metrics):
    """The in-process engine's scheduler (local backend), under the names Triton uses."""

    running = Gauge(*names.RUNNING, ["model"])
    waiting = Gauge(*names.WAITING, ["model"])
    steps = Histogram(*names.STEP, ["model", "kind"], buckets=names.STEP_BUCKETS)
    wait = Histogram(*names.QUEUE_WAIT, ["model"], buckets=names.WAIT_BUCKETS)
    generated = Counter(*names.TOKENS, ["model"])
    reports = Counter(*names.REPORTS, ["model"])
    prefix_queried = Counter(*names.PREFIX_QUERIED, ["model"])
    prefix_hit = Counter(*names.PREFIX_HIT, ["model"])

    def __init__(self, model: str):
        self.model = model
        self.reports.labels(model)  # on the page from the start (0): readers wait for it to advance

    def queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model).set(running)
        self.waiting.labels(self.model).set(waiting)

    def waited(self, seconds: float) -> None:
        self.wait.labels(self.model).observe(seconds)

    def step(self, kind: str, seconds: float, rows: int) -> None:
        self.steps.labels(self.model, kind).observe(seconds)

    def tokens(self, count: int) -> None:
        if count:
            self.generated.labels(self.model).inc(count)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self.prefix_queried.labels(self.model).inc(queried)
        self.prefix_hit.labels(self.model).inc(hit)

    def reported(self) -> None:
        self.reports.labels(self.model).inc()
