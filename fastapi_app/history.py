"""Server-side chat history in SQLite, bounded to the last ``max_history`` turns per session.

The database runs in WAL mode (readers never block the writer) with a busy timeout (a
second writer, such as another service process on the same file, waits instead of failing),
and every turn is committed with a full sync before its answer is sent: a turn that was
answered survives a ``kill -9`` of the service.

A deleted session stays deleted: its id is kept (``deleted_sessions``) and a later turn for it,
even one already in flight when it was deleted, is refused (``SessionDeleted``, 409).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm_engine.errors import SessionDeleted

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    had_image INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    seconds REAL,
    completion_tokens INTEGER
);
CREATE INDEX IF NOT EXISTS turns_session ON turns (session_id, id);
CREATE TABLE IF NOT EXISTS deleted_sessions (session_id TEXT PRIMARY KEY, deleted_at REAL NOT NULL);
"""
# columns added since the first release: a file made before them gets them on open (NULL in old turns)
ADDED_COLUMNS = {"seconds": "REAL", "completion_tokens": "INTEGER"}


@dataclass
class Turn:
    model: str
    prompt: str
    response: str
    had_image: bool
    created_at: float
    seconds: float | None = None  # how long the answer took (None in turns kept before it was recorded)
    completion_tokens: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class HistoryStore:
    def __init__(self, path: Path, max_turns: int, busy_timeout_s: float = 10.0):
        self.max_turns = max_turns
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"history database {path} cannot use WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(turns)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in present:
                try:
                    self._db.execute(f"ALTER TABLE turns ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
        self._lock = threading.Lock()

    def pragma(self, name: str):
        """A PRAGMA's value (``journal_mode``, ``busy_timeout``), for checks."""
        with self._lock:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def turns(self, session_id: str) -> list[Turn]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model, prompt, response, had_image, created_at, seconds, completion_tokens "
                "FROM turns WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        return [Turn(m, p, r, bool(i), c, s, n) for m, p, r, i, c, s, n in rows]

    def check_open(self, session_id: str) -> None:
        """``SessionDeleted`` for an id that was deleted."""
        with self._lock:
            self._check_open(session_id)

    def _check_open(self, session_id: str) -> None:
        if self._db.execute("SELECT 1 FROM deleted_sessions WHERE session_id = ?", (session_id,)).fetchone():
            raise SessionDeleted(f"session {session_id!r} was deleted; start another (a new session_id)")

    def add(
        self,
        session_id: str,
        model: str,
        prompt: str,
        response: str,
        had_image: bool,
        seconds: float | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        with self._lock, self._db:
            self._check_open(session_id)
            self._db.execute(
                "INSERT INTO turns (session_id, model, prompt, response, had_image, created_at, seconds, "
                "completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, model, prompt, response, int(had_image), time.time(), seconds, completion_tokens),
            )
            self._db.execute(
                "DELETE FROM turns WHERE session_id = ? AND id NOT IN "
                "(SELECT id FROM turns WHERE session_id = ? ORDER BY id DESC LIMIT ?)",
                (session_id, session_id, self.max_turns),
            )

    def delete(self, session_id: str) -> bool:
        with self._lock, self._db:
            if self._db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,)).rowcount == 0:
                return False
            self._db.execute("INSERT OR REPLACE INTO deleted_sessions VALUES (?, ?)", (session_id, time.time()))
            return True

    def close(self) -> None:
        self._db.close()
