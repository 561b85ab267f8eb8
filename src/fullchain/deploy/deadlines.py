"""Read deadlines for slow clients: a request's headers and its body must each arrive in bounded time.

uvicorn has no such timeout (its `timeout_keep_alive` covers the idle time between requests and restarts on
every byte received; request read timeouts are its open issue #157), so a client sending half a request
line, or declaring a Content-Length and sending part of it, held a connection and its task for as long as
it liked. ASGI middleware cannot help with the headers: the app is called only once they are complete.

`H11WithDeadlines` is uvicorn's h11 protocol with one timer per connection, following h11's view of the
client: while the next request's headers are awaited (from the connection's start, or the end of the
previous response), the header deadline runs; while its body is awaited, the body deadline. Once the
request is read the timer stops, so a long inference is never cut. On expiry the client gets
`408 Request Timeout` when it has sent part of a request nobody answered yet, and the connection is closed;
a request whose body timed out is marked `scope["state"][READ_TIMED_OUT]` (its app sees a disconnect).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
READ_TIMED_OUT = "read_timed_out"
_TIMEOUT_BODY = b'{"detail": "request not received in time"}'
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                   b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class H11WithDeadlines(H11Protocol):
    """Pass as `uvicorn.Config(http=functools.partial(H11WithDeadlines, header_s=..., body_s=...))`."""

    def __init__(self, *args, header_s: float = HEADER_TIMEOUT_S, body_s: float = BODY_TIMEOUT_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = {h11.IDLE: header_s, h11.SEND_BODY: body_s}
        self.awaiting: object = None  # h11.IDLE (headers), h11.SEND_BODY (body) or None (nothing to read)
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.follow_client()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.follow_client()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.follow_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_deadline()
        super().connection_lost(exc)

    def follow_client(self) -> None:
        """(Re)start the timer when the client moves between awaiting headers, awaiting body and done."""
        state = self.conn.their_state
        awaiting = state if state in self.limits else None
        if awaiting is self.awaiting:
            return
        self.stop_deadline()
        self.awaiting = awaiting
        if awaiting is not None:
            self.deadline = self.loop.call_later(self.limits[awaiting], self.expire)

    def stop_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def expire(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.awaiting is h11.IDLE:
            unanswered = bool(self.conn.trailing_data[0])  # part of a request line or headers arrived
        else:
            unanswered = not self.cycle.response_started
            self.cycle.scope["state"][READ_TIMED_OUT] = unanswered
        if unanswered:
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()
