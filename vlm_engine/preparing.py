"""Making a request's model inputs: decoding its images, counting and tokenizing its prompt,
running the processor. One function does it (``make_inputs``), on the request's thread or in
a worker process (``InputWorkers``, ``PREPARE_WORKERS``).

Why processes: making the inputs holds the GIL most of the time it runs (LLaVA: about 5 ms a
request, 46% of it with the GIL held), and the step loop needs the GIL between every kernel.
Measured on 2 cores (one torch thread), a LLaVA decode step of 16 rows took 3.3 ms alone,
7.0 ms beside one preparing thread and 8.5 ms beside two; beside a preparing *process* it
took 4.3 ms. vLLM keeps its processor in the API server's process for the same reason.

A worker loads the tokenizer and processor only (no weights). It sends back the inputs as
NumPy arrays (pickled as bytes: cheaper than torch's shared-memory handles for tensors this
small) and, in place of each decoded image, its size. A worker that dies (killed, out of
memory) is replaced, and the request is tried once more on the new one. Workers are started
as a Python process of their own with a socket (not ``multiprocessing``'s
spawn, which runs the calling script's main module again: a script without a
``__main__`` guard would start engines in its workers).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_engine.chat import Message, prompt_message
from vlm_engine.errors import EngineError, ModelConfigError, PromptTooLong, ShuttingDown
from vlm_engine.images import content_key, decode_image
from vlm_engine.settings import ModelSettings

log = logging.getLogger("vlm_engine.preparing")
BLANK = (224, 224)  # the gray image of text-only chats with a model that requires one
SOCKET_BUFFER = 8 * 2**20  # the kernel caps it (4 MB here): an image's pixels in one go
PYTHON_ENV = "VLM_PYTHON"  # the interpreter of the workers (Triton's launcher sets its own)
CALL_TIMEOUT_S = 120.0  # a worker silent this long on one request is killed and replaced
START_TIMEOUT_S = 600.0  # its first answer: the tokenizer and processor loaded


@dataclass(frozen=True)
class ImageSize:
    """A decoded image whose pixels stayed in the worker that made the inputs: its size."""

    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass
class RequestInputs:
    """What ``make_inputs`` made for one request."""

    inputs: Any  # the adapter's ``encode_row``: tensors by name (HF models), a task (moondream2)
    prompt_tokens: int  # of the messages' text, for the prompt-length limit
    image_keys: list[str]  # each image's content key, in order (prefix and encoder caches)
    decoded: list[list[Any]]  # per message, its decoded images (``ImageSize`` from a worker)


def blank_image() -> Image.Image:
    return Image.new("RGB", BLANK, (127, 127, 127))


def make_inputs(adapter: Any, messages: list[Message], params: Any, tools: Any, encode: bool = True) -> RequestInputs:
    """Decode and check the images, check the prompt's length, encode the inputs (unless not
    ``encode``: another engine makes its own); raises an ``InvalidRequest`` subclass saying what to fix."""
    from vlm_engine.adapters.base import Prepared, pixels_key

    settings: ModelSettings = adapter.settings
    image = None
    for message in messages:
        message.decoded = [decode_image(d, settings.max_image_pixels, settings.max_image_bytes) for d in message.images]
        image = message.decoded[-1] if message.decoded else image
    tokens = adapter.count_tokens("\n".join(m.text for m in messages))
    if tokens > settings.max_prompt_tokens:
        raise PromptTooLong(
            f"prompt is {tokens} tokens, above the limit of {settings.max_prompt_tokens} (MAX_PROMPT_TOKENS)"
        )
    keys = [content_key([data]) for m in messages for data in m.images]
    if image is None and adapter.requires_image:
        image = blank_image()
        prompt_message(messages).decoded = [image]
        keys = [pixels_key(image)]
    prepared = Prepared(messages, params, image, prompt_tokens=tokens, image_keys=keys, tools=tools)
    inputs = adapter.encode_row(prepared) if encode else None
    return RequestInputs(inputs, tokens, keys, [list(m.decoded) for m in messages])


# -- in a worker process (``serve``; its classes pickle by this module's name, so not run as ``-m``)


def _make_in_worker(adapter: Any, messages: list[Message], params: Any, tools: Any) -> RequestInputs:
    made = make_inputs(adapter, messages, params, tools)
    made.inputs = {name: value.numpy() for name, value in made.inputs.items()}
    made.decoded = [[ImageSize(*image.size) for image in images] for images in made.decoded]
    return made


def serve(fd: int) -> None:
    """A worker: load what the settings (the first message) name, answer ``(ok, value)`` to
    each ``(messages, params, tools)`` until the engine closes the connection."""
    import torch

    from vlm_engine.adapters import adapter_class

    torch.set_num_threads(1)
    connection = Connection(fd)
    settings: ModelSettings = connection.recv()
    adapter = adapter_class(settings.architecture)(settings, "cpu")
    adapter.load_inputs()
    connection.send((True, os.getpid()))
    while True:
        try:
            args = connection.recv()
        except EOFError:
            return
        try:
            reply: tuple[bool, Any] = (True, _make_in_worker(adapter, *args))
        except EngineError as exc:
            reply = (False, exc)
        except Exception as exc:  # pickled back as the engine's error, whatever raised it
            reply = (False, EngineError(f"making the request's inputs failed: {type(exc).__name__}: {exc}"))
        connection.send(reply)


# -- in the engine's process


def python_executable() -> str:
    """The interpreter workers start with: ``VLM_PYTHON`` (Triton's launcher sets its own),
    else this one, or, where this process is not a Python executable (Triton's Python-backend
    stub embeds one), one of its environment's."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    if os.path.basename(sys.executable or "").startswith("python"):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (version, "python3", "python"):
        path = os.path.join(sys.exec_prefix, "bin", candidate)
        if os.access(path, os.X_OK):
            return path
    raise ModelConfigError(
        f"no Python executable for the input workers in {sys.exec_prefix}/bin: set {PYTHON_ENV} to one, "
        "or PREPARE_WORKERS=0"
    )


class WorkerDied(Exception):
    """The worker process ended while it held a request."""


class Worker:
    """One worker process and the engine's end of its socket."""

    def __init__(self, settings: ModelSettings):
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        env.update(PYTHONUTF8="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(
            [python_executable(), "-c", f"from vlm_engine.preparing import serve; serve({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.connection = Connection(ours.detach())
        self.ready = False
        self.call_timeout_s = CALL_TIMEOUT_S
        try:
            self.connection.send(settings)
        except OSError:  # it has already exited: the first call says so
            self.connection.close()

    def call(self, *args: Any) -> Any:
        try:
            if not self.ready:  # its first answer: the processor is loaded
                self._receive(START_TIMEOUT_S)
                self.ready = True
            self.connection.send(args)
            ok, value = self._receive(self.call_timeout_s)
        except (EOFError, OSError, TypeError) as exc:  # TypeError: its connection closed meanwhile
            raise WorkerDied(f"exit code {self.process.poll()}") from exc
        if not ok:
            raise value
        return value

    def _receive(self, timeout: float) -> Any:
        if not self.connection.poll(timeout):
            self.process.kill()
            raise WorkerDied(f"no answer in {timeout:.0f} s; killed")
        return self.connection.recv()

    def close(self) -> None:
        self.connection.close()  # the worker reads EOF and returns
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class InputWorkers:
    """``count`` worker processes making requests' inputs (``make_inputs``) for one model; a
    request takes an idle one (or waits for one)."""

    def __init__(self, settings: ModelSettings, count: int):
        self.settings = settings
        self.count = count
        self._lock = threading.Lock()
        self._closed = False
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._workers: list[Worker] = []
        try:
            for _ in range(count):  # they load while the weights load
                self._workers.append(Worker(settings))
        except BaseException:
            self.close()
            raise
        for worker in self._workers:
            self._idle.put(worker)
        log.info("%s: %d input worker(s) started with %s", settings.name, count, python_executable())

    def warm_up(self) -> None:
        """Make one request's inputs (a 16x16 PNG) on every worker: waits for the processor to
        load (a broken one fails here) and pays the first call's lazy set-up."""
        import io

        from vlm_engine.chat import single_turn
        from vlm_engine.errors import InvalidRequest
        from vlm_engine.params import resolve_params

        data = io.BytesIO()
        Image.new("RGB", (16, 16), (127, 127, 127)).save(data, format="PNG")
        for worker in self._workers:
            try:
                worker.call(single_turn("Describe the image.", data.getvalue()), resolve_params(self.settings, 2), None)
            except InvalidRequest:  # limits set below a 16x16 image: the worker is up all the same
                pass
            except WorkerDied as exc:
                raise ModelConfigError(
                    f"{self.settings.name}: the input worker could not load the tokenizer and processor from "
                    f"{self.settings.model_path} ({exc}; its error is in the log above); PREPARE_WORKERS=0 "
                    "prepares requests in the engine's process instead"
                ) from None

    def make(self, messages: list[Message], params: Any, tools: Any) -> RequestInputs:
        """``make_inputs`` in a worker; the arrays come back as tensors, the images as sizes. A
        worker that dies is replaced and the request tried once more."""
        import torch

        worker = self._take()
        try:
            try:
                made = worker.call(messages, params, tools)
            except WorkerDied as exc:
                log.warning("%s: an input worker died (%s); starting another", self.settings.name, exc)
                worker = self._replace(worker)
                try:
                    made = worker.call(messages, params, tools)
                except WorkerDied:
                    worker = self._replace(worker)
                    raise EngineError(
                        f"{self.settings.name}: the process making this request's inputs died twice on it; "
                        "the image may be too large for this machine's memory"
                    ) from None
        finally:
            if self._closed:
                worker.close()
            self._idle.put(worker)
        made.inputs = {name: torch.from_numpy(value) for name, value in made.inputs.items()}
        for message, decoded in zip(messages, made.decoded, strict=True):
            message.decoded = decoded
        return made

    def _take(self) -> Worker:
        """An idle worker (waiting for one), or ``ShuttingDown`` once closing."""
        while True:
            if self._closed:
                raise ShuttingDown(f"{self.settings.name} is shutting down")
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                continue

    def _replace(self, dead: Worker) -> Worker:
        """A new worker in ``dead``'s place (none once closing: the request is refused)."""
        dead.close()
        with self._lock:
            if self._closed:
                raise ShuttingDown(f"{self.settings.name} shut down while this request was prepared")
            worker = Worker(self.settings)
            self._workers[self._workers.index(dead)] = worker
            return worker

    def pids(self) -> list[int]:
        """The workers' process ids (tests, diagnostics)."""
        return [worker.process.pid for worker in self._workers]

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the workers: the idle ones at once; one still making a request's inputs is
        waited for up to ``wait_s``, then killed (its request is refused as shutting down)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        deadline = time.monotonic() + wait_s
        idle: list[Worker] = []
        for _ in workers:
            try:
                idle.append(self._idle.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for worker in workers:
            if worker in idle:
                worker.close()
            else:  # its request's thread sees it die, closes it and refuses the request
                worker.process.kill()


def worker_count(settings: ModelSettings) -> int:
    """``PREPARE_WORKERS``; auto: one on a machine of up to 4 cores, else a quarter of them (at most 4)."""
    if settings.prepare_workers is not None:
        return settings.prepare_workers
    cores = os.cpu_count() or 2
    return 1 if cores <= 4 else min(4, cores // 4)
