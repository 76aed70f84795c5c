"""Stored responses of the Responses API (``store``, ``previous_response_id``), in the history
database (SQLite, WAL, full sync, as ``fastapi_app.history``).

Each row keeps one response: its input items (images inline as data URLs, so a continued
conversation sees them again), the response object, and the response it continued. A chain
is read back up to a bound (``MAX_RESPONSE_CHAIN``: the route refuses a longer one unless
``truncation`` is ``auto``). At most ``max_rows`` responses (``MAX_STORED_RESPONSES``) and
``max_bytes`` of them (``MAX_STORED_RESPONSES_MB``) are kept, the oldest deleted first.
Calls block (fsync, busy waits): the routes run them in a thread."""

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
    size INTEGER NOT NULL,
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
    def __init__(self, path: Path, max_rows: int, max_bytes: int, busy_timeout_s: float = 10.0):
        self.max_rows, self.max_bytes = max_rows, max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "size" not in columns:  # a table made before sizes were kept
            with self._db:
                self._db.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
                self._db.execute("UPDATE responses SET size = LENGTH(input_items) + LENGTH(response)")
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, previous_id, input_items, response FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3]))

    def chain(self, response_id: str, limit: int) -> tuple[list[StoredResponse], bool] | None:
        """The conversation that ends with ``response_id``, oldest first, at most ``limit``
        responses, and whether it goes back further; ``None`` when that response is not stored.
        An older link that was deleted or expired ends the conversation there."""
        found: list[StoredResponse] = []
        next_id: str | None = response_id
        while next_id is not None and len(found) <= limit:
            stored = self.get(next_id)
            if stored is None:
                if not found:
                    return None
                break
            found.append(stored)
            next_id = stored.previous_id
        return found[:limit][::-1], len(found) > limit

    def add(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        items, body = json.dumps(input_items), json.dumps(response)
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO responses (id, previous_id, input_items, response, size, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    response["id"],
                    response.get("previous_response_id"),
                    items,
                    body,
                    len(items) + len(body),
                    response["created_at"],
                ),
            )
            # the newest first: rows past max_rows, or past max_bytes in all, go
            self._db.execute(
                "DELETE FROM responses WHERE seq IN (SELECT seq FROM (SELECT seq, "
                "ROW_NUMBER() OVER (ORDER BY seq DESC) AS n, SUM(size) OVER (ORDER BY seq DESC) AS total "
                "FROM responses) WHERE n > ? OR total > ?)",
                (self.max_rows, self.max_bytes),
            )

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
