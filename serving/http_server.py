"""An ASGI app served by uvicorn, on the main thread or a thread of its own.

Keep-alive, the connection limit and the graceful-shutdown bound are uvicorn's settings
(``HttpLimits``), not loops of ours. Requests are parsed by httptools (llhttp, in C: alone it took a
third of h11's CPU per request here, 0.05 against 0.14 ms); two things uvicorn's h11 protocol does and
its httptools one does not are added in ``half_close_httptools``: a bound on a request's head, and
an answer for a client that half-closes. The socket is bound when the server is
made, so a port in use is an ``OSError`` the caller can word for its user, before anything runs.
On the main thread uvicorn takes SIGINT and SIGTERM while it serves, shuts down gracefully, then
raises the signal again for the handlers that were there before (a CLI's ``KeyboardInterrupt``);
on another thread it installs none and ``shutdown()`` stops it.

uvicorn's own logging configuration is not applied (``log_config=None``): its loggers propagate
to the process's, and no access log is written (a request line is all it would add, and a
webhook's signed headers never reach a log).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpLimits:
    """What a client may take of the server (uvicorn's settings)."""

    max_connections: int = 64  # open connections and tasks; past it, 503 (limit_concurrency)
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this (timeout_keep_alive)
    max_header_bytes: int = 64 * 1024  # a request's head; past it, 400 (see half_close_httptools)
    graceful_s: int = 10  # on shutdown, requests still running get this long (timeout_graceful_shutdown)


class HttpServer:
    """``app`` on ``host:port``: ``serve_forever()`` here, or ``start_in_thread()``; then
    ``shutdown()`` and ``server_close()``, as ``socketserver`` servers are driven."""

    def __init__(
        self, app: Any, host: str, port: int, limits: HttpLimits | None = None, lifespan: bool = False
    ) -> None:
        import uvicorn

        limits = limits or HttpLimits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)  # OSError: in use, no such address
        self.config = uvicorn.Config(
            app,
            http=half_close_httptools(limits.max_header_bytes),
            lifespan="on" if lifespan else "off",  # the app's startup and shutdown, when it has them
            log_config=None,
            access_log=False,
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=limits.keep_alive_s,
            timeout_graceful_shutdown=limits.graceful_s,
        )
        self.server = uvicorn.Server(self.config)
        self._serving = threading.Event()  # serve_forever was called (or is about to be)
        self._stopped = threading.Event()  # ... and has returned

    @property
    def port(self) -> int:
        """The port bound (the one the system chose when asked for 0)."""
        return int(self.socket.getsockname()[1])

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (or, on the main thread, SIGINT or SIGTERM)."""
        self._serving.set()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start_in_thread(self) -> threading.Thread:
        """Serve on a daemon thread; returns once it runs (its socket already takes connections)."""
        self._serving.set()
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Stop serving: no new connections, running requests finish (up to ``graceful_s``).
        Returns once ``serve_forever`` has."""
        self.server.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket (uvicorn closes it on shutdown too; closing twice is fine)."""
        self.socket.close()


def half_close_httptools(max_head_bytes: int) -> type:
    """uvicorn's httptools protocol, with two additions.

    - A client that shuts its sending side (a half-close: ``shutdown(SHUT_WR)``, ``curl``'s upload
      then wait, a proxy's ``option http-server-close``) still gets its answer; uvicorn closes the
      connection on that EOF, so such a client got none. Here the request's body ends at the EOF
      (one shorter than its Content-Length is a 408 from ``errors.receive_body``), the app
      answers, and the connection closes after the answer. A head cut short by the EOF is a 400,
      once no answer is still owed on the connection.
    - A head still unfinished after ``max_head_bytes`` is a 400 and the connection closes (h11's
      ``max_incomplete_event_size``; httptools keeps no such bound). It is counted by the reads
      that arrive while the head is open; a read in which the previous message ended is not
      counted (it may carry that message's body), so the bound holds within one read's size
      (256 KiB with uvloop, as h11's did)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HalfCloseHttpToolsProtocol(HttpToolsProtocol):
        in_head = False  # a request's head has begun and not ended
        head_bytes = 0
        ended_in_read = False  # a message ended in the read being parsed

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_head, self.head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self.in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.ended_in_read = True
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            self.ended_in_read = False
            super().data_received(data)
            if self.in_head and not self.ended_in_read and not self.transport.is_closing():
                self.head_bytes += len(data)
                if self.head_bytes > max_head_bytes:
                    self.in_head = False
                    self.send_400_response(f"Request head over {max_head_bytes} bytes.")

        def eof_received(self) -> bool | None:
            cycle = self.cycle
            owed = cycle is not None and not cycle.response_complete  # an answer still to write
            if self.in_head and not owed:  # a head cut short, and nothing else to answer
                self.in_head = False
                self.send_400_response("Invalid HTTP request received.")
                return True  # send_400_response closes the connection once written
            if not owed:
                return None  # between requests: close, as uvicorn does
            cycle.keep_alive = False  # the client sends no more: nothing to keep alive
            if cycle.more_body:
                cycle.more_body = False  # the body ends here; the app sees how long it is
                cycle.message_event.set()
            return True  # keep the connection open for the answer

    return HalfCloseHttpToolsProtocol
