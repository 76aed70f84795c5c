"""The scheduler's metrics: one set of names, exported by Triton (custom metrics of the
Python backend) and by the service's ``/metrics`` (local backend). Label: ``model``."""

from __future__ import annotations

RUNNING = ("vlm_scheduler_running_rows", "Rows in the running (decoding) batch")
WAITING = ("vlm_scheduler_waiting_requests", "Requests waiting for admission")
STEP = ("vlm_scheduler_step_seconds", "Duration of one scheduler step, by kind (prefill, decode)")
QUEUE_WAIT = ("vlm_scheduler_queue_wait_seconds", "Time from submission to admission into the batch")
TOKENS = ("vlm_scheduler_generated_tokens", "Tokens generated (counter; exported with _total)")
PREFIX_QUERIED = (
    "vlm_prefix_cache_queried_tokens",
    "Prompt tokens looked up in the prefix cache at admission (counter; exported with _total)",
)
PREFIX_HIT = (
    "vlm_prefix_cache_hit_tokens",
    "Prompt tokens found in the prefix cache, not prefilled again (counter; exported with _total)",
)
REPORTS = (
    "vlm_scheduler_reports",
    "Metric reports (about one a second; exported with _total): once it has advanced twice, the others are current",
)

STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
WAIT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
