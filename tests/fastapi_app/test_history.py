"""The history store keeps every answered turn: WAL, a busy timeout, concurrent sessions,
and a ``kill -9`` of the service in the middle of the load."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
import uuid

import httpx
import pytest

from fastapi_app.history import HistoryStore
from tests.fastapi_app.conftest import ApiProcess, api_env
from vlm_engine.errors import SessionDeleted

MODEL = "llava"  # the quickest tiny checkpoint


def test_the_store_runs_in_wal_mode_and_waits_for_a_busy_database(tmp_path):
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path, max_turns=10, busy_timeout_s=5)
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("busy_timeout") == 5000
    # another writer holds the lock for a while
    other = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()  # before the timer: the wait below is at least its 0.5 s
    threading.Timer(0.5, other.execute, args=("COMMIT",)).start()
    store.add("s", "llava", "hello", "hi", False)  # waits instead of failing with "database is locked"
    assert time.monotonic() - started >= 0.5
    assert [t.prompt for t in store.turns("s")] == ["hello"]
    assert other.execute("SELECT count(*) FROM turns").fetchone()[0] == 1  # a reader beside the writer
    store.close()


async def _session(client: httpx.AsyncClient, url: str, session: str, turns: int, answered: list) -> None:
    for turn in range(turns):
        body = {"session_id": session, "model": MODEL, "prompt": f"turn {turn}", "max_tokens": 2, "temperature": 0}
        reply = await client.post(url + "/api/chat", json=body, timeout=120)
        reply.raise_for_status()
        answered.append((session, turn, reply.json()["response"]))


def _stored(url: str, session: str) -> list[tuple[str, str]]:
    reply = httpx.get(f"{url}/api/sessions/{session}", timeout=30)
    return [] if reply.status_code == 404 else [(t["prompt"], t["response"]) for t in reply.json()["turns"]]


def test_a_deleted_session_stays_deleted_even_for_a_turn_in_flight(tmp_path):
    """A turn answered after its session was deleted (a retry, a slow stream) is refused, not stored."""
    store = HistoryStore(tmp_path / "history.sqlite3", max_turns=10)
    store.add("s1", "llava", "first", "answer", False)
    store.check_open("s1")
    assert store.delete("s1") and not store.delete("s1")
    with pytest.raises(SessionDeleted, match="was deleted"):
        store.check_open("s1")
    with pytest.raises(SessionDeleted):
        store.add("s1", "llava", "second", "late answer", False)
    assert store.turns("s1") == []
    assert not store.delete("never-there")
    store.check_open("never-there")  # deleting an unknown id marks nothing


def test_32_concurrent_sessions_of_5_turns_keep_all_160_in_order(triton, tmp_path_factory):
    env = api_env(tmp_path_factory, TRITON_GRPC_URL=triton.grpc_url, MAX_HISTORY="10")
    api = ApiProcess("api-history", env).start()
    try:
        sessions = [uuid.uuid4().hex for _ in range(32)]
        answered: list = []

        async def run() -> None:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
                await asyncio.gather(*(_session(client, api.url, s, 5, answered) for s in sessions))

        asyncio.run(run())
        assert len(answered) == 160
        for session in sessions:
            expected = [(f"turn {t}", text) for s, t, text in sorted(answered) if s == session]
            assert _stored(api.url, session) == expected
    finally:
        api.stop()


def test_kill_9_in_the_middle_of_the_load_loses_no_answered_turn(triton, tmp_path_factory):
    env = api_env(tmp_path_factory, TRITON_GRPC_URL=triton.grpc_url, MAX_HISTORY="50")
    api = ApiProcess("api-history-kill", env).start()
    answered: list = []
    sessions = [uuid.uuid4().hex for _ in range(16)]

    async def load() -> None:
        async with httpx.AsyncClient() as client:
            await asyncio.gather(
                *(_session(client, api.url, s, 40, answered) for s in sessions), return_exceptions=True
            )

    worker = threading.Thread(target=asyncio.run, args=(load(),))
    worker.start()
    deadline = time.monotonic() + 120
    while len(answered) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    api.process.send_signal(signal.SIGKILL)
    api.process.wait()
    worker.join(120)
    count = len(answered)
    assert 40 <= count < 16 * 40, "the kill must land in the middle of the load"
    restarted = ApiProcess("api-history-kill", env).start()  # the same database file
    try:
        for session in sessions:
            stored = _stored(restarted.url, session)
            mine = [(f"turn {t}", text) for s, t, text in sorted(answered) if s == session]
            assert stored[: len(mine)] == mine, f"session {session}: answered turns missing after kill -9"
            assert len(stored) <= len(mine) + 1  # at most the turn in flight was stored unanswered
    finally:
        restarted.stop()


def test_a_history_file_from_before_the_answer_figures_gets_them(tmp_path):
    """Turns keep how long their answer took and its tokens (the page shows them after a
    reload); a file made before these columns is migrated on open and its old turns say None."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,"
        " model TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT NOT NULL,"
        " had_image INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);"
        "INSERT INTO turns (session_id, model, prompt, response, had_image, created_at)"
        " VALUES ('s', 'llava', 'hi', 'hello', 0, 1.0);"
    )
    old.commit()
    old.close()
    store = HistoryStore(path, max_turns=5)
    store.add("s", "llava", "again", "answer", True, 0.25, 7)
    before, after = store.turns("s")
    assert (before.seconds, before.completion_tokens) == (None, None)
    assert (after.seconds, after.completion_tokens, after.had_image) == (0.25, 7, True)
    store.close()
