"""The web page for people (plain HTML/JS/CSS, no CDN)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from fastapi_app.page_security import security_headers

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)


PICKER = '<select id="model" aria-label="model"></select>'


@router.api_route("/", methods=["GET", "HEAD"])  # HEAD: load balancers and curl -I
async def index(request: Request):
    """The page with the served models already in its picker (the script marks those not ready
    when ``/v1/models`` answers), so it is never empty, even while that request is slow."""
    settings = request.app.state.settings
    options = "".join(
        f'<option value="{escape(m)}"{" selected" if m == settings.default_model else ""}>{escape(m)}</option>'
        for m in settings.models
    )
    page = (STATIC / "index.html").read_text().replace(PICKER, PICKER.replace("></select>", f">{options}</select>"))
    return HTMLResponse(page, headers=security_headers())
