"""uvicorn's HTTP/1.1 protocol with a read timeout: a client has a fixed time to send a whole request.

uvicorn closes idle keep-alive connections, but a client that sends part of a request line, of the headers or of the
body, and then stalls, holds its connection (and, for a body, a request handler) for ever: a handful of such clients
exhaust the server. Here every request starts a deadline at its first byte (or at the connection, for the first
one); if the request has not fully arrived by then, the client gets 408 and the connection is closed.

A request whose head (request line and headers) outgrows ``MAX_REQUEST_HEAD_BYTES`` gets 431, any other request that is
not HTTP/1.1 gets 400, both as JSON like every other refusal (uvicorn answers both with a plain 400). Each refusal is
followed by a lingering close: the rest of what the client sends is read and dropped until it closes its side or the
read timeout passes. Closing a socket that still holds unread bytes makes the kernel reset the connection, and the
client, still sending a 1 MB header, then loses the answer with it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# The largest request head (request line and headers) accepted: h11's own default, named so that the server passes it
# to uvicorn and a refusal can tell a head that outgrew it from one that is malformed.
MAX_REQUEST_HEAD_BYTES = 16 * 1024


def read_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with a read timeout of ``seconds``."""
    return type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), {"read_timeout": seconds})


class ReadTimeoutH11Protocol(H11Protocol):
    read_timeout: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request, read so that the client can read the answer
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
        if self._refused:
            self.transport.close()  # the client kept sending after its answer: the lingering close ends here
            return
        self._refuse(408, "REQUEST_TIMEOUT", f"the request did not arrive within {self.read_timeout:g} s")

    def send_400_response(self, msg: str) -> None:
        """What uvicorn calls when h11 refuses the request's bytes: 431 for a head that outgrew the limit."""
        if len(self.conn.trailing_data[0]) > MAX_REQUEST_HEAD_BYTES:
            self._refuse(
                431,
                "REQUEST_HEADER_FIELDS_TOO_LARGE",
                f"the request line and headers are larger than {MAX_REQUEST_HEAD_BYTES:,} bytes",
            )
        else:
            self._refuse(400, "BAD_REQUEST", "the request is not valid HTTP/1.1")

    def _refuse(self, status: int, error_code: str, message: str) -> None:
        """Answer ``status`` with a JSON error, then close lingering (see the module's description)."""
        response_started = self.cycle is not None and self.cycle.response_started
        if not response_started and self.conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
            body = json.dumps({"error_code": error_code, "message": message}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                for event in (
                    h11.Response(status_code=status, headers=headers),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass  # h11 cannot frame a response in this state; closing is all that is left
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm()
        else:
            self.transport.close()
