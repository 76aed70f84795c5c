"""``HEAD /`` answers like ``GET /`` without the body (issue 27: ``curl -I`` and HEAD-based
load-balancer checks got 405)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fastapi_app.main import create_app
from fastapi_app.settings import Settings
from tests.unit.test_protocol_rooms import ScriptedBackend


def test_head_on_the_page_is_a_200_without_a_body(tmp_path):
    app = create_app(Settings(history_db=tmp_path / "h.sqlite3"))
    app.state.backend = ScriptedBackend()
    with TestClient(app) as http:
        page, head = http.get("/"), http.head("/")
    assert page.status_code == head.status_code == 200
    assert head.headers["content-type"] == page.headers["content-type"] and head.content == b""
    assert int(head.headers["content-length"]) == len(page.content)
