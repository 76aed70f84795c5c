"""Typed engine errors, mapped once at each edge (Triton error codes, HTTP statuses)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``code`` is a stable machine-readable name, ``status`` an HTTP status."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(EngineError):
    """The request is malformed or out of range: the client must change it."""

    code = "invalid_request"
    status = 400


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class ImageTooLarge(InvalidRequest):
    code = "image_too_large"


class InvalidParameter(InvalidRequest):
    code = "invalid_parameter"


class GuideNotWritable(InvalidRequest):
    """Structured output this model's vocabulary cannot finish: the grammar asks for a character
    no token writes (a sentencepiece vocabulary without byte fallback, such as Kosmos-2's)."""

    code = "guide_not_writable"


class TooLarge(InvalidRequest):
    """Well formed, but more than the model takes: a prompt past its context, ``max_tokens``
    past its cap. 413, not 400: the OpenAPI document's ranges are the service's, and a model's
    own limits (moondream2's 2048 positions) can be smaller."""

    code = "too_large"
    status = 413


class PromptTooLong(TooLarge):
    code = "prompt_too_long"


class MaxTokensTooLarge(TooLarge):
    code = "max_tokens_too_large"


class UnknownModel(InvalidRequest):
    code = "unknown_model"
    status = 404


class Overloaded(EngineError):
    code = "overloaded"
    status = 503


class Cancelled(EngineError):
    code = "cancelled"
    status = 499


class ModelConfigError(EngineError):
    """The model cannot be loaded as configured (bad path, quantization on CPU, ...)."""

    code = "model_config_error"


def error_classes() -> dict[str, type[EngineError]]:
    """Every engine error class by its ``code``."""
    found: dict[str, type[EngineError]] = {}
    pending: list[type[EngineError]] = [EngineError]
    while pending:
        cls = pending.pop()
        found[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return found


def from_message(message: str) -> EngineError:
    """Rebuild an error from ``"<code>: <message>"`` (how errors cross BLS, which drops codes)."""
    code, sep, text = message.partition(": ")
    cls = error_classes().get(code) if sep else None
    return cls(text) if cls else EngineError(message)


class BackendUnavailable(EngineError):
    """The inference backend (Triton) cannot be reached or is not ready."""

    code = "backend_unavailable"
    status = 503


class NotFound(InvalidRequest):
    code = "not_found"
    status = 404


class SessionDeleted(InvalidRequest):
    code = "session_deleted"
    status = 409


class ShuttingDown(Overloaded):
    """The model is stopping: requests still queued or running are refused."""

    code = "shutting_down"
