"""Server-side chat history in SQLite, bounded to the last ``max_history`` turns per session."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    had_image INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_session ON turns (session_id, id);
"""


@dataclass
class Turn:
    model: str
    prompt: str
    response: str
    had_image: bool
    created_at: float

    def as_dict(self) -> dict:
        return asdict(self)


class HistoryStore:
    def __init__(self, path: Path, max_turns: int):
        self.max_turns = max_turns
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def turns(self, session_id: str) -> list[Turn]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model, prompt, response, had_image, created_at FROM turns WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        return [Turn(m, p, r, bool(i), c) for m, p, r, i, c in rows]

    def add(self, session_id: str, model: str, prompt: str, response: str, had_image: bool) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO turns (session_id, model, prompt, response, had_image, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, model, prompt, response, int(had_image), time.time()),
            )
            self._db.execute(
                "DELETE FROM turns WHERE session_id = ? AND id NOT IN "
                "(SELECT id FROM turns WHERE session_id = ? ORDER BY id DESC LIMIT ?)",
                (session_id, session_id, self.max_turns),
            )

    def delete(self, session_id: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,)).rowcount > 0

    def close(self) -> None:
        self._db.close()
