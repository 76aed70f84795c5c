"""A request's response sender, safe to share between threads.

Triton frees a request's response factory once its final response is sent, and asking it
afterwards whether the request was cancelled crashes tritonserver (a segfault in
``TRITONBACKEND_ResponseFactoryIsCancelled``, seen under load when one thread polled for
cancellation while another sent the final response). Both go through one lock here, and
nothing is asked or sent after the final response; then Triton's sender is let go (freed at
the interpreter's exit, after the stub's shared memory, it crashes the stub).
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Sender:
    def __init__(self, sender) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        self._closed = False
        self.answers = 1  # a request with n > 1 gets its final response with its last answer
        self.finals = 0  # answers ended so far (the sending thread's count)

    def is_cancelled(self) -> bool:
        with self._lock:
            return not self._closed and self._sender.is_cancelled()

    def send(self, response, flags: int = 0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = bool(flags & FINAL)
            self._sender.send(response, flags=flags)
            if self._closed:  # let Triton's sender go now: one still held when the stub exits crashes it
                self._sender = None
