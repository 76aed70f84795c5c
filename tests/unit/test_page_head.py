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


def test_the_pages_carry_their_security_policy_and_nginx_sends_the_same(tmp_path):
    """The chat page and /docs answer with PAGE_CSP from the service itself, /redoc with its own
    (inline styles for ReDoc); nginx's header for the page and /docs is the same string."""
    import re

    from fastapi_app.page_security import PAGE_CSP, REDOC_CSP
    from tests.conftest import ROOT

    app = create_app(Settings(history_db=tmp_path / "h.sqlite3"))
    app.state.backend = ScriptedBackend()
    with TestClient(app) as http:
        page, docs, redoc = http.get("/"), http.get("/docs"), http.get("/redoc")
        assert http.head("/docs").status_code == 200
        bundle = http.get("/static/api-docs/swagger-ui-bundle.js")
    assert page.headers["content-security-policy"] == docs.headers["content-security-policy"] == PAGE_CSP
    assert redoc.headers["content-security-policy"] == REDOC_CSP and "'unsafe-inline'" not in PAGE_CSP
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text
    assert "<script>" not in docs.text and "cdn" not in docs.text + redoc.text
    template = (ROOT / "nginx/templates/vlm.conf.template").read_text()
    location = re.search(r"location ~ \^/\(static/\.\*\|docs\)\?\$ \{(.*?)\n  \}", template, re.S)
    assert location, "nginx has no location for the page and /docs"
    [sent] = re.findall(r'add_header Content-Security-Policy "([^"]+)" always;', location.group(1))
    assert sent == PAGE_CSP
