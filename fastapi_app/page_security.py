"""The security headers of the service's HTML pages (the chat page, ``/docs``, ``/redoc``).

nginx sends the same policy for the page, its static files and ``/docs``
(``nginx/templates/vlm.conf.template``; a unit test keeps the two equal), so the pages behave
the same behind nginx and straight from the service."""

from __future__ import annotations

# Nothing from elsewhere: scripts, styles and data only from this origin; images also as
# blob:/data: (an uploaded image's preview, Swagger UI's icons).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# ReDoc injects its styles at run time and searches in a blob: worker.
REDOC_CSP = PAGE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'") + "; worker-src 'self' blob:"


def security_headers(csp: str = PAGE_CSP) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }
