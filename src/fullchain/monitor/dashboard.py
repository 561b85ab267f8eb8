"""The ``/dashboard`` page: live charts of a server's own ``/metrics``, shipped inside the package (no CDN).

`dashboard_router()` is mounted by `ds serve` and by the training endpoint. The page (static/dashboard.html,
.js, .css) polls ``/metrics`` on the same origin once a second, parses the Prometheus text and draws each
series on a small hand-written canvas chart: a charting library would be the only dependency, and the
page needs nothing but lines.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def _asset(name: str) -> str:
    return files("fullchain.monitor").joinpath("static", name).read_text(encoding="utf-8")


def dashboard_router() -> APIRouter:
    """GET /dashboard (the page) and GET /dashboard/static/{dashboard.js,dashboard.css}."""
    router = APIRouter()

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_asset("dashboard.html"))

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, f"no dashboard asset {name!r}")
        return Response(_asset(name), media_type=ASSETS[name])

    return router
