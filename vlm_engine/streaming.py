"""Per-row text state: incremental decoding that only ever extends what was sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RowText:
    """Incremental text of one row: emits only stable extensions of what was sent."""

    decode: Callable[[list[int]], str]
    ids: list[int] = field(default_factory=list)
    emitted: str = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        stable = text.rstrip()  # trailing spaces may be stripped or merged later
        if stable.endswith("\ufffd") or not stable.startswith(self.emitted):
            return ""
        delta = stable[len(self.emitted) :]
        self.emitted = stable
        return delta

    def flush(self, final_text: str) -> str:
        """The rest of ``final_text``; it extends what was sent unless decoding was unstable."""
        if not final_text.startswith(self.emitted):
            return ""
        delta = final_text[len(self.emitted) :]
        self.emitted = final_text
        return delta
