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


class PromptTooLong(InvalidRequest):
    code = "prompt_too_long"


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
