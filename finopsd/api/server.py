"""``ApiServer``: uvicorn serving the API in a thread of its own.

A ``Service`` (``finopsd.service.supervisor``): ``start()`` binds the socket
itself (so a busy or forbidden address is an error naming it, and port 0 is known
at once), starts uvicorn on it, returns once it accepts connections and calls
``announce(url)``. ``stop()`` calls ``withdraw()``, asks uvicorn to finish
(requests in flight get ``GRACE_S``) and joins. ``health()`` says whether it
still serves.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from finopsd.service.supervisor import Check

log = logging.getLogger(__name__)

GRACE_S = 5.0


class ApiServerError(RuntimeError):
    """The API cannot listen where it was asked to."""


class ApiServer:
    """The API on ``host``:``port`` (0: any free port; ``port`` then tells which)."""

    name = "api"

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        announce: Callable[[str], None] | None = None,
        withdraw: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self._announce = announce
        self._withdraw = withdraw
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        import uvicorn

        sock = self._bind()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(GRACE_S),
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ApiServerError(
                    f"api: could not serve on {self.host}:{self.port}: {self._error or 'timeout'}"
                )
            time.sleep(0.01)
        log.info("API listening on %s", self.url)
        if self._announce is not None:
            self._announce(self.url)

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.requested_port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ApiServerError(f"api.host: cannot resolve {self.host!r}: {exc}") from None
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ApiServerError(
                f"api: cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc}"
                " (api.host, api.port)"
            ) from None
        sock.setblocking(False)
        return sock

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn exits with SystemExit on a fatal error
            self._error = exc
            log.error("API server stopped: %s", exc)

    def health(self) -> list[Check]:
        alive = self._thread is not None and self._thread.is_alive()
        return [Check("api", alive, "" if alive else f"the API thread stopped: {self._error}")]

    def stop(self) -> None:
        if self._withdraw is not None:
            self._withdraw()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACE_S + 5)
