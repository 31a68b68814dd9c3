"""systemd's notify protocol (``sd_notify``), without libsystemd.

A service started with ``Type=notify`` finds the address of the service manager's
socket in ``$NOTIFY_SOCKET`` (a file-system path, or an abstract socket written
with a leading ``@``) and sends it datagrams of newline-separated ``KEY=value``
assignments: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``,
``STOPPING=1`` when shutting down, ``WATCHDOG=1`` as a keep-alive while
``WatchdogSec=`` is set, ``EXTEND_TIMEOUT_USEC=`` to ask for more time to start
or stop. The kernel attaches the sender's pid to each datagram; with
``NotifyAccess=main`` systemd only listens to the main process, so these are sent
from the daemon's own process, never a child.

``Notifier`` sends; without ``$NOTIFY_SOCKET`` (not run by systemd) every call
is a no-op. A failed send never raises: it is logged once and the daemon goes
on (a message lost is a status not shown, or a ping missed, which the watchdog
tolerates by design). ``Watchdog`` turns the daemon's own health checks into
pings: it only pings from the caller's loop, when the caller says it is healthy,
so a wedged loop or a failing check stops the pings and systemd restarts the
service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0
"""Longest a send may wait for room in the service manager's socket buffer."""


def parse_address(value: str | None) -> str | bytes | None:
    """The ``AF_UNIX`` address ``$NOTIFY_SOCKET`` names, or None when it names none.

    An absolute path is a socket in the file system; ``@name`` is the abstract
    socket ``\\0name``. Anything else (empty, relative, systemd 254's ``vsock:``)
    is not an address this module can send to: ``ValueError``, except for an
    empty or missing value, which is None.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @abstract")


def watchdog_timeout_s(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd set for process ``pid``, in seconds, or None.

    ``$WATCHDOG_USEC`` is the timeout in microseconds; it applies only if
    ``$WATCHDOG_PID`` is unset or equal to ``pid`` (a child that inherited the
    environment must not ping for its parent). A value that is not a positive
    integer is logged and taken as no watchdog.
    """
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a process id; watchdog not enabled", owner)
            return None
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("WATCHDOG_USEC=%r is not a positive integer; watchdog not enabled", usec)
        return None
    return value / 1_000_000


class Notifier:
    """Sends notifications to the service manager at ``address``; None: sends nothing.

    ``watchdog_s`` is the watchdog timeout that applies to this process (None: no
    watchdog; ``watchdog()`` then sends nothing). Every send returns True when the
    datagram left, False otherwise; none raises. The first failure of a run of
    failures (no socket there, refused, buffer full for ``SEND_TIMEOUT_S``) is logged
    as a warning, the rest are not; the first success after them is logged too.
    Safe to use from several threads. ``close()`` releases the socket; a later send
    opens a new one.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_environ(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset_environment: bool = False,
    ) -> Notifier:
        """The notifier systemd's environment asks for (``os.environ`` by default).

        ``pid`` is this process's id (``os.getpid()``), matched against
        ``$WATCHDOG_PID``. An unusable ``$NOTIFY_SOCKET`` is logged and gives a
        notifier that sends nothing. With ``unset_environment`` (and a mutable
        ``env``), ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are
        removed from it, so that processes started later do not inherit them.
        """
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        try:
            address = parse_address(env.get("NOTIFY_SOCKET"))
        except ValueError as exc:
            log.warning("%s; not notifying the service manager", exc)
            address = None
        watchdog = watchdog_timeout_s(env, pid) if address is not None else None
        if unset_environment and isinstance(env, MutableMapping):
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(address, watchdog_s=watchdog)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True if it was sent.

        A newline inside an assignment would start another one: it is replaced
        by a space.
        """
        if self.address is None or not assignments:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(message, self.address)
            except OSError as exc:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "cannot notify the service manager at %s (%s); carrying on, "
                        "further failures are not logged",
                        self._shown_address,
                        exc.strerror or exc,
                    )
                return False
            if self._failing:
                self._failing = False
                log.info("notifying the service manager at %s again", self._shown_address)
            return True

    @property
    def _shown_address(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode(errors="replace")
        return str(self.address)

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete (with ``Type=notify``, the unit is now active)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status is not None else []))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line for ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status is not None else []))

    def mainpid(self, pid: int) -> bool:
        """``MAINPID=pid``: the service's main process is ``pid``."""
        return self.send(f"MAINPID={pid}")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: start-up (or stop) needs up to ``seconds`` more from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, the keep-alive ping; sends nothing when no watchdog applies."""
        if self.watchdog_s is None:
            return False
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watchdog:
    """Keeps systemd's watchdog fed while, and only while, the daemon says it is healthy.

    The contract for the daemon's supervising loop:

    - call ``beat(ok)`` on every iteration, at least every ``interval_s / 2``
      (better: every second or so), with ``ok`` the result of the daemon's own
      health checks (its services alive and making progress, or idle and able to);
    - ``beat`` sends ``WATCHDOG=1`` when ``ok`` is true and at least ``interval_s``
      has passed since the last ping (the first healthy beat pings at once), so at
      most one ping every ``interval_s``, half the watchdog timeout; a ping that
      could not be sent is not tried again before the next interval;
    - nothing pings but ``beat``: there is no thread of its own. A loop that
      wedges sends no beats, a failing check sends no pings, and after the
      watchdog timeout without a ping systemd kills the service (``SIGABRT``) and
      ``Restart=on-failure`` starts it again. A check that recovers before then
      resumes the pings, so only failures that last about the timeout restart it.

    ``status(text)`` sends ``STATUS=text`` when ``text`` differs from the last one
    sent. Without a watchdog (``enabled`` false: no ``WATCHDOG_USEC`` for this
    process) ``beat`` sends nothing but still logs health changes. ``clock`` is
    the monotonic clock in seconds (replaced in tests).
    """

    def __init__(self, notifier: Notifier, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.timeout_s = notifier.watchdog_s
        self.interval_s = self.timeout_s / 2 if self.timeout_s is not None else None
        self._clock = clock
        self._last_ping: float | None = None
        self._healthy = True
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd expects pings from this process."""
        return self.interval_s is not None

    @property
    def healthy(self) -> bool:
        """What the last beat said (True before the first)."""
        return self._healthy

    def beat(self, ok: bool = True, reason: str = "") -> bool:
        """One iteration of the caller's loop; ``ok``: healthy. True if a ping was sent.

        ``reason`` says what failed; it is logged once when health is lost (and a
        line when it comes back), not on every beat.
        """
        if ok != self._healthy:
            self._healthy = ok
            if not ok:
                log.warning(
                    "health check failing%s; %s",
                    f": {reason}" if reason else "",
                    f"no watchdog pings: systemd restarts the service in {self.timeout_s:g}s "
                    "unless it recovers"
                    if self.timeout_s is not None
                    else "no watchdog to restart the service",
                )
            else:
                log.info("health check passing again")
        if not ok or self.interval_s is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.interval_s:
            return False
        self._last_ping = now
        return self.notifier.watchdog()

    def until_due(self) -> float | None:
        """Seconds until a healthy beat would ping (0: now); None without a watchdog.

        A loop may wait ``min(its own period, until_due())`` between beats.
        """
        if self.interval_s is None:
            return None
        if self._last_ping is None:
            return 0.0
        return max(0.0, self._last_ping + self.interval_s - self._clock())

    def status(self, text: str) -> bool:
        """``STATUS=text`` if it differs from the last status sent; True if sent."""
        if text == self._status:
            return False
        sent = self.notifier.status(text)
        if sent:
            self._status = text
        return sent
