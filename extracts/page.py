"""``GET /``: the page for people, and its few static files (SPEC: Web page and metrics).

One HTML file, one plain script and one stylesheet, shipped inside the package
(``extracts/static``), read once and served as they are: no build step, nothing
from another host. The page is public (it holds no data); everything it shows
comes from the ``/api`` routes, called with the token the person pastes. A strict
Content-Security-Policy allows only this origin's script, style and fetches.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response

from extracts.http import NotFound

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded service serves its own script at once
}
ASSET_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
STATIC = files("extracts") / "static"
INDEX = (STATIC / "index.html").read_bytes()
ASSETS = {name: (STATIC / name).read_bytes() for name in ASSET_TYPES}
ETAGS = {name: '"' + hashlib.sha256(body).hexdigest()[:32] + '"' for name, body in ASSETS.items()}


async def index(request: Request) -> Response:
    """The page: the token form first, then schemas, extracts, runs and downloads."""
    return Response(INDEX, media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(request: Request) -> Response:
    """The page's script, stylesheet and icon; any other name is a 404."""
    name = request.path_params["name"]
    if name not in ASSETS:
        raise NotFound(f"No asset {name!r}; the page uses {', '.join(ASSETS)}")
    headers = {**HEADERS, "Content-Type": ASSET_TYPES[name], "ETag": ETAGS[name]}
    if ETAGS[name] in request.headers.get("if-none-match", ""):  # the browser's copy is current
        return Response(status_code=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    return Response(ASSETS[name], headers=headers)
