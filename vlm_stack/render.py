"""Rendering ``${NAME}`` placeholders (what the nginx image's envsubst does), strictly."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``${NAME}``; a name without a value is an error, not an empty string."""
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
