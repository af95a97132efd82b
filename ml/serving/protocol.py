"""uvicorn's HTTP/1.1 protocol with a read timeout: a client has a fixed time to send a whole request.

uvicorn closes idle keep-alive connections, but a client that sends part of a request line, of the headers or of the
body, and then stalls, holds its connection (and, for a body, a request handler) for ever: a handful of such clients
exhaust the server. Here every request starts a deadline at its first byte (or at the connection, for the first
one); if the request has not fully arrived by then, the client gets 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def read_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with a read timeout of ``seconds``."""
    return type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), {"read_timeout": seconds})


class ReadTimeoutH11Protocol(H11Protocol):
    read_timeout: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        response_started = self.cycle is not None and self.cycle.response_started
        if not response_started and self.conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
            message = f"the request did not arrive within {self.read_timeout:g} s"
            body = json.dumps({"error_code": "REQUEST_TIMEOUT", "message": message}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                for event in (h11.Response(status_code=408, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass  # h11 cannot frame a response in this state; closing is all that is left
        self.transport.close()
