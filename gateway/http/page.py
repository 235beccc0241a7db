"""`GET /admin`: the operator page, one self-contained HTML file shipped in the package
(gateway/static/admin.html). The page holds no secret; the admin token the operator types
stays in the tab's sessionStorage and goes to the admin API as a bearer token. The CSP
allows only the page's own inline script and style (by hash) and calls to this origin."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

from gateway.http.routes import Routes


def _hashes(html: str, tag: str) -> str:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
        for b in bodies)


def load_page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy."""
    html = resources.files("gateway").joinpath("static/admin.html").read_text("utf-8")
    csp = (f"default-src 'none'; script-src {_hashes(html, 'script')}; "
           f"style-src {_hashes(html, 'style')}; connect-src 'self'; img-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


def add_routes(app: web.Application) -> None:
    body, csp = load_page()
    headers = {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

    async def admin_page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers=headers)

    Routes(app).get("/admin", admin_page)
