"""Who may call `ds serve`: the bearer token, checked before a request body is read, and the refusal to
serve beyond this machine without one.

With `--token-file`, every path but the probes (`/healthz`, `/readyz`, which orchestrators call without
credentials and which reveal only up/ready) needs `Authorization: Bearer <token>`: `/v1/predict`, and also
`/metrics` (traffic and latency figures), `/dashboard` (it draws `/metrics`), `/openapi.json` and its
`/docs` pages (the model's input schema). Protecting everything else is the conservative choice: a scraper
or a proxy can send the header; a probe cannot.

The check is ASGI middleware rather than a FastAPI dependency because a dependency runs after the body
is parsed: an unauthenticated client could make the server read and parse megabytes. Here a request
without the token gets 401 from its headers alone, before `receive()` is called.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from fullchain.errors import UserError

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to answer anyone who reaches the port unless a token guards it or the operator opted out."""
    if token is None and not insecure and not is_loopback(host):
        raise UserError(f"--host {host} serves beyond this machine: give --token-file FILE (a bearer token), "
                        "or --insecure when an authenticating proxy stands in front of the server")


class BearerAuth:
    """401 with `WWW-Authenticate: Bearer` for any request but the probes that lacks the token."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.authorized(Headers(scope=scope)):
            return await self.app(scope, receive, send)
        response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def authorized(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = f"{scheme.lower()} {credentials.strip()}".encode()
        return hmac.compare_digest(given, self.expected)
