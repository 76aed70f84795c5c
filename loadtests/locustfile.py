"""Locust user classes for the vlm-serve stack, reached through nginx.

- ``KServeInferUser``: ``POST /v2/models/<model>/infer`` (KServe v2, JSON body; ``KSERVE_BINARY=1``
  for the binary tensor extension built with tritonclient), the models in turn.
- ``OpenAIStreamUser``: ``POST /v1/chat/completions`` with ``stream: true`` and a ``data:`` image
  URL. Besides the request itself it records ``TTFT`` (time to the first content chunk) and
  ``ITL`` (the gap between consecutive content chunks) as locust entries of their own, and
  the output tokens the answer reports in ``usage``.
- ``RestChatUser``: ``POST /api/chat`` with server-side history, one session id per user: a
  conversation of ``CHAT_TURNS`` turns (the first with an image, then text follow-ups), then
  ``DELETE /api/sessions/<id>`` (recorded as ``rest-chat-reset``) and the next conversation.
- ``MixedUser``: the three above from each user, in the proportions of ``WEIGHTS``.

Entry names are ``"<endpoint> <model>"``; every event carries ``context`` with ``endpoint``,
``model`` and (when known) ``output_tokens``. With ``LOADTEST_SAMPLES=<path>`` every sample is
also written there as JSON when the test stops (``loadtests.run`` builds its summary from it).

Run it with ``python -m loadtests.run`` (headless, summary, SLOs) or ``python -m loadtests.run --ui``.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # loaded by path (locust -f loadtests/locustfile.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from locust import HttpUser, between, constant, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from loadtests import payloads
from loadtests.config import CHAT_RESET, ENDPOINTS, ITL, TTFT, Settings, weighted_schedule

SETTINGS = Settings.from_env()
IMAGES = payloads.make_images(SETTINGS.image_sizes, SETTINGS.image_formats)
PROMPTS = payloads.all_prompts()
_user_numbers = itertools.count()


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _http_failure(response) -> str:
    if not response.status_code:  # no answer: locust keeps the connection error
        return f"no answer: {_short(repr(response.error))}"
    return f"HTTP {response.status_code}: {_short(response.text)}"


class VLMUser(HttpUser):
    """What every user shares: settings, pictures, prompts, the models in turn."""

    abstract = True
    host = SETTINGS.host
    wait_time = constant(SETTINGS.wait[0]) if SETTINGS.wait[0] == SETTINGS.wait[1] else between(*SETTINGS.wait)

    def on_start(self) -> None:
        self.number = next(_user_numbers)
        self.rng = random.Random()
        models = SETTINGS.models
        # requests go round the models, each user starting at another one
        start = self.number % len(models)
        self.model_cycle = itertools.cycle(models[start:] + models[:start])
        # one REST conversation per user: its own session id and model
        self.session_id = f"loadtest-{uuid.uuid4().hex[:16]}"
        self.chat_model = models[self.number % len(models)]
        self.chat_turn = 0

    def _fire(self, request_type: str, name: str, ms: float, context: dict) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=ms,
            response_length=0,
            exception=None,
            context=context,
        )

    # KServe v2 infer ------------------------------------------------------------------------
    def kserve_infer(self) -> None:
        model = next(self.model_cycle)
        image, prompt = self.rng.choice(IMAGES), self.rng.choice(PROMPTS)
        if SETTINGS.kserve_binary:
            body, headers = payloads.kserve_binary_body(prompt, image, SETTINGS.max_tokens)
        else:
            body = payloads.kserve_json_body(prompt, image, SETTINGS.max_tokens)
            headers = {"Content-Type": "application/json"}
        endpoint = ENDPOINTS["infer"]
        with self.client.post(
            f"/v2/models/{model}/infer",
            data=body,
            headers=headers,
            name=f"{endpoint} {model}",
            context={"endpoint": endpoint, "model": model, "image": image.name},
            timeout=SETTINGS.request_timeout_s,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(_http_failure(response))
                return
            try:
                outputs = {out["name"]: out for out in response.json()["outputs"]}
                text = outputs["generated_text"]["data"][0]
                if not isinstance(text, str):
                    raise TypeError(f"generated_text is {type(text).__name__}, not text")
            except Exception as exc:
                response.failure(f"not a KServe answer with generated_text: {exc!r}")
                return
            response.success()

    # OpenAI chat, streamed ----------------------------------------------------------------
    def openai_stream(self) -> None:
        model = next(self.model_cycle)
        image, prompt = self.rng.choice(IMAGES), self.rng.choice(PROMPTS)
        endpoint = ENDPOINTS["stream"]
        name = f"{endpoint} {model}"
        arrivals: list[float] = []
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            json=payloads.openai_stream_body(model, prompt, image, SETTINGS.max_tokens),
            name=name,
            context={"endpoint": endpoint, "model": model, "image": image.name},
            stream=True,
            timeout=SETTINGS.request_timeout_s,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(_http_failure(response))
                return
            done, finish, usage, error, size = False, None, None, None, 0
            try:
                for line in response.iter_lines():
                    size += len(line) + 1
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments and pings
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"]
                        continue
                    choice = event["choices"][0]
                    if choice["delta"].get("content"):
                        arrivals.append(time.perf_counter())
                    finish = choice.get("finish_reason") or finish
                    usage = event.get("usage") or usage
            except Exception as exc:  # a broken stream, bad JSON
                response.failure(f"stream broken after {len(arrivals)} chunks: {exc!r}")
                return
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = size
            if error is not None:
                response.failure(f"error event in the stream: {_short(json.dumps(error))}")
                return
            if not done or finish is None:
                response.failure(f"stream ended without {'[DONE]' if not done else 'a finish_reason'}")
                return
            tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
            # (locust copies the context it was given: write into the one it reports)
            response.request_meta["context"]["output_tokens"] = tokens if isinstance(tokens, int) else len(arrivals)
            response.request_meta["context"]["chunks"] = len(arrivals)
            response.success()
        if arrivals:
            self._fire(TTFT, name, (arrivals[0] - started) * 1000, {"endpoint": endpoint, "model": model})
            for before, after in itertools.pairwise(arrivals):
                self._fire(ITL, name, (after - before) * 1000, {"endpoint": endpoint, "model": model})

    # REST chat with history ---------------------------------------------------------------
    def rest_chat(self) -> None:
        model, endpoint = self.chat_model, ENDPOINTS["chat"]
        first = self.chat_turn == 0
        image = self.rng.choice(IMAGES) if first else None
        prompt = self.rng.choice(PROMPTS if first else payloads.FOLLOW_UPS)
        with self.client.post(
            "/api/chat",
            json=payloads.rest_chat_body(self.session_id, model, prompt, image, SETTINGS.max_tokens),
            name=f"{endpoint} {model}",
            context={"endpoint": endpoint, "model": model, "turn": self.chat_turn + 1},
            timeout=SETTINGS.request_timeout_s,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(_http_failure(response))
            else:
                try:
                    answer = response.json()
                    if answer["session_id"] != self.session_id or not isinstance(answer["response"], str):
                        raise ValueError(f"unexpected answer {_short(json.dumps(answer))}")
                    response.request_meta["context"]["output_tokens"] = int(answer["usage"]["completion_tokens"])
                except Exception as exc:
                    response.failure(f"not a chat answer: {exc!r}")
                else:
                    response.success()
        self.chat_turn += 1
        if SETTINGS.chat_turns and self.chat_turn >= SETTINGS.chat_turns:
            self.chat_turn = 0
            with self.client.delete(
                f"/api/sessions/{self.session_id}",
                name=f"{CHAT_RESET} {model}",
                context={"endpoint": CHAT_RESET, "model": model},
                timeout=SETTINGS.request_timeout_s,
                catch_response=True,
            ) as response:
                if response.status_code == 204:
                    response.success()
                else:
                    response.failure(_http_failure(response))
            self.session_id = f"loadtest-{uuid.uuid4().hex[:16]}"  # a deleted session stays deleted


class KServeInferUser(VLMUser):
    @task
    def infer(self) -> None:
        self.kserve_infer()


class OpenAIStreamUser(VLMUser):
    @task
    def stream(self) -> None:
        self.openai_stream()


class RestChatUser(VLMUser):
    @task
    def chat(self) -> None:
        self.rest_chat()


class MixedUser(VLMUser):
    """Every kind of request from each user, in the proportions of ``WEIGHTS``: each user goes
    round a smooth weighted schedule (``infer=2,stream=1,chat=1`` -> infer, stream, chat, infer),
    starting at another place than the user before, so even a few users send every kind."""

    def on_start(self) -> None:
        super().on_start()
        methods = {"infer": self.kserve_infer, "stream": self.openai_stream, "chat": self.rest_chat}
        schedule = [methods[kind] for kind in weighted_schedule(SETTINGS.weights)]
        start = self.number % len(schedule)
        self.schedule = itertools.cycle(schedule[start:] + schedule[:start])

    @task
    def mixed(self) -> None:
        next(self.schedule)()


# Every sample, for the runner's summary (exact percentiles, output tokens). ---------------
class _Samples:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str, str], dict] = {}
        self.failures_at: list[list] = []  # [wall time, endpoint, message] of every failure
        self.started = self.stopped = None

    def add(self, request_type, name, response_time, exception, context) -> None:
        context = context or {}
        endpoint = context.get("endpoint") or name
        key = (request_type, endpoint, context.get("model", ""))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = {
                "type": request_type,
                "endpoint": key[1],
                "model": key[2],
                "name": name,
                "times_ms": [],
                "failures": 0,
                "errors": defaultdict(int),
                "output_tokens": 0,
                "token_requests": 0,
            }
        if exception:
            entry["failures"] += 1
            entry["errors"][_short(str(exception), 300)] += 1
            self.failures_at.append([round(time.time(), 3), key[1], _short(str(exception), 200)])  # for the soak
            return
        entry["times_ms"].append(round(float(response_time), 3))
        tokens = context.get("output_tokens")
        if isinstance(tokens, int):
            entry["output_tokens"] += tokens
            entry["token_requests"] += 1

    def dump(self, path: str, environment) -> None:
        elapsed = (self.stopped or time.time()) - (self.started or time.time())
        document = {"started": self.started, "stopped": self.stopped, "elapsed_s": elapsed}
        document["settings"] = SETTINGS.as_dict()
        document["entries"] = [{**e, "errors": dict(e["errors"])} for e in self.entries.values()]
        document["failures_at"] = self.failures_at
        runner = getattr(environment, "runner", None)
        document["exceptions"] = [
            {"count": e["count"], "message": e["msg"], "traceback": e["traceback"]}
            for e in (runner.exceptions.values() if runner is not None else [])
        ]
        Path(path).write_text(json.dumps(document))


SAMPLES = _Samples()


@events.request.add_listener
def _on_request(request_type, name, response_time, response_length, exception=None, context=None, **_):
    SAMPLES.add(request_type, name, response_time, exception, context)


@events.test_start.add_listener
def _on_test_start(**_):
    SAMPLES.__init__()
    SAMPLES.started = time.time()


@events.test_stop.add_listener
def _on_test_stop(environment, **_):
    SAMPLES.stopped = time.time()
    if os.environ.get("LOADTEST_SAMPLES"):
        SAMPLES.dump(os.environ["LOADTEST_SAMPLES"], environment)


@events.quitting.add_listener
def _on_quitting(environment, **_):
    """Rewrite ``--csv``'s stats, failures and exceptions with the final numbers: locust 2.47
    writes them once a second, so its files miss what finished in the last second."""
    prefix = os.environ.get("LOADTEST_CSV_PREFIX")
    if not prefix:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("_stats.csv", writer.requests_csv),
        ("_failures.csv", writer.failures_csv),
        ("_exceptions.csv", writer.exceptions_csv),
    ):
        with open(prefix + suffix, "w", newline="") as handle:
            write(csv.writer(handle))
