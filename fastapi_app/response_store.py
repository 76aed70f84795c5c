"""Stored responses of the Responses API (``store``, ``previous_response_id``), in the history
database (SQLite, WAL, full sync, as ``fastapi_app.history``).

Each row keeps one response: its input items (images inline as data URLs, so a continued
conversation sees them again), the response object, and the response it continued. A chain
is read back up to ``max_chain`` responses (``MAX_HISTORY``, the same bound as a session's
turns); at most ``max_rows`` responses are kept (``MAX_STORED_RESPONSES``), the oldest deleted
first."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    previous_id TEXT,
    input_items TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass
class StoredResponse:
    id: str
    previous_id: str | None
    input_items: list[dict[str, Any]]
    response: dict[str, Any]


class ResponseStore:
    def __init__(self, path: Path, max_chain: int, max_rows: int, busy_timeout_s: float = 10.0):
        self.max_chain, self.max_rows = max_chain, max_rows
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, previous_id, input_items, response FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3]))

    def chain(self, response_id: str) -> list[StoredResponse] | None:
        """The conversation that ends with ``response_id``, oldest first (at most ``max_chain``
        responses); ``None`` when that response is not stored."""
        found: list[StoredResponse] = []
        next_id: str | None = response_id
        while next_id is not None and len(found) < self.max_chain:
            stored = self.get(next_id)
            if stored is None:
                if not found:
                    return None
                break  # an older link was deleted or expired: the conversation starts after it
            found.append(stored)
            next_id = stored.previous_id
        return found[::-1]

    def add(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO responses (id, previous_id, input_items, response, created_at) VALUES (?, ?, ?, ?, ?)",
                (
                    response["id"],
                    response.get("previous_response_id"),
                    json.dumps(input_items),
                    json.dumps(response),
                    response["created_at"],
                ),
            )
            self._db.execute(
                "DELETE FROM responses WHERE seq NOT IN (SELECT seq FROM responses ORDER BY seq DESC LIMIT ?)",
                (self.max_rows,),
            )

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        self._db.close()
