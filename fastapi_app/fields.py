"""Request field types that mean what the OpenAPI document says, no more and no less."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from vlm_engine.errors import InvalidRequest


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 3.0; anything else goes on to the strict int check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integer(**bounds: int) -> Any:
    """An ``int`` with JSON Schema bounds (``ge``, ``le``) that also takes 3.0 for 3."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


PositiveInteger = integer(ge=1)
BOOLEANS = {"true": True, "false": False}


def form_booleans(fields: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    """Multipart fields are text: a boolean is ``true`` or ``false``, not "0" or "yes"."""
    for name in names:
        if name in fields:
            if fields[name] not in BOOLEANS:
                raise InvalidRequest(f"{name} must be true or false, got {fields[name][:20]!r}")
            fields[name] = BOOLEANS[fields[name]]
    return fields
