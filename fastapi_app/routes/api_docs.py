"""The API's documentation pages, served by the service itself: Swagger UI at ``/docs`` and
ReDoc at ``/redoc``. Their scripts and styles come from the pinned ``fastapi-offline`` wheel
(mounted at ``/static/api-docs``), so the pages work on a machine that reaches no CDN, and they
start from ``/static/api-docs.js`` (no inline script), so they keep the web page's
Content-Security-Policy. ReDoc's styles are injected at run time, so ``/redoc`` allows inline
styles and a ``blob:`` worker, nothing more."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from fastapi_app.page_security import PAGE_CSP, REDOC_CSP, security_headers

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/static/api-docs"
router = APIRouter(include_in_schema=False)

SWAGGER_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>vlm-serve — API (Swagger UI)</title>
  <link rel="icon" href="{ASSETS_URL}/favicon.png">
  <link rel="stylesheet" href="{ASSETS_URL}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS_URL}/swagger-ui-bundle.js"></script>
  <script src="/static/api-docs.js"></script>
</body>
</html>
"""

REDOC_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>vlm-serve — API (ReDoc)</title>
  <link rel="icon" href="{ASSETS_URL}/favicon.png">
</head>
<body>
  <redoc spec-url="/openapi.json"></redoc>
  <script src="{ASSETS_URL}/redoc.standalone.js"></script>
</body>
</html>
"""


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui() -> HTMLResponse:
    return HTMLResponse(SWAGGER_PAGE, headers=security_headers(PAGE_CSP))


@router.api_route("/redoc", methods=["GET", "HEAD"])
async def redoc() -> HTMLResponse:
    return HTMLResponse(REDOC_PAGE, headers=security_headers(REDOC_CSP))
