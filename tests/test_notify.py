"""The systemd notify protocol, against a real AF_UNIX datagram socket as NOTIFY_SOCKET.

The receiving socket stands where systemd's would: bound in the test's directory
(or in the abstract namespace), with ``SO_PASSCRED`` so that each datagram carries
the sender's pid, which is what ``NotifyAccess=main`` judges it by.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from finopsd.service.notify import Notifier, Watchdog, parse_address, watchdog_timeout_s

RECV_TIMEOUT_S = 10.0  # a bound on waiting for a datagram that should come, not a measurement
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """The service manager's end: a bound ``SOCK_DGRAM`` socket that reads datagrams."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    @property
    def env_value(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def recv(self) -> tuple[str, int]:
        """The next datagram and its sender's pid; fails if none comes within the bound."""
        self.sock.settimeout(RECV_TIMEOUT_S)
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = UCRED.unpack(payload[: UCRED.size])[0]
        return data.decode(), pid

    def pending(self) -> list[str]:
        """Every datagram already queued (a local datagram is queued before sendto returns)."""
        out = []
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(data.decode())

    def close(self) -> None:
        self.sock.close()
        if isinstance(self.address, str):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(str(tmp_path / "notify"))
    yield r
    r.close()


def notifier_for(receiver: Receiver, **env: str) -> Notifier:
    return Notifier.from_environ({"NOTIFY_SOCKET": receiver.env_value, **env})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ready_status_watchdog_stopping_arrive_as_datagrams(receiver: Receiver) -> None:
    with notifier_for(receiver, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())) as n:
        assert n.enabled and n.watchdog_s == 30.0
        assert n.ready()
        assert n.status("ingesting 3 topics")
        assert n.watchdog()
        assert n.mainpid(4242)
        assert n.extend_timeout(90)
        assert n.stopping(status="stopping: storing the batch in flight")
    got = [receiver.recv() for _ in range(6)]
    assert [text for text, _ in got] == [
        "READY=1",
        "STATUS=ingesting 3 topics",
        "WATCHDOG=1",
        "MAINPID=4242",
        "EXTEND_TIMEOUT_USEC=90000000",
        "STOPPING=1\nSTATUS=stopping: storing the batch in flight",
    ]
    # the kernel names the sender: this process, as NotifyAccess=main requires
    assert {pid for _, pid in got} == {os.getpid()}


def test_abstract_socket(receiver: Receiver) -> None:
    abstract = Receiver(b"\0finopsd-test-" + uuid.uuid4().hex.encode())
    try:
        assert abstract.env_value.startswith("@finopsd-test-")
        with notifier_for(abstract) as n:
            assert n.ready(status="ready")
        assert abstract.recv()[0] == "READY=1\nSTATUS=ready"
    finally:
        abstract.close()
    assert receiver.pending() == []  # nothing went to the file-system socket


def test_a_newline_in_a_status_does_not_start_another_assignment(receiver: Receiver) -> None:
    with notifier_for(receiver) as n:
        n.status("broker unreachable\nREADY=1")
    assert receiver.recv()[0] == "STATUS=broker unreachable READY=1"


def test_without_notify_socket_every_call_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="finopsd.service.notify")
    n = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not n.enabled and n.watchdog_s is None
    assert not any([n.ready(), n.status("x"), n.watchdog(), n.stopping(), n.mainpid(1)])
    w = Watchdog(n)
    assert not w.enabled and not w.beat(True) and not w.status("x")
    assert w.until_due() is None
    assert n._sock is None  # no socket was even opened
    assert caplog.records == []


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_an_unusable_notify_socket_is_logged_and_sends_nothing(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError):
        parse_address(value)
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not n.enabled and not n.ready()
    assert "not notifying the service manager" in caplog.text


def test_a_socket_that_disappears_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "notify")
    first = Receiver(path)
    n = notifier_for(first, WATCHDOG_USEC="2000000")
    assert n.ready()
    assert first.recv()[0] == "READY=1"
    first.close()  # the service manager's socket is gone (closed and unlinked)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finopsd.service.notify"):
        results = [n.status("a"), n.watchdog(), n.watchdog(), n.stopping()]
        assert results == [False] * 4
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert path in warnings[0].getMessage()
        # a socket that exists but is not bound by anyone: refused, still not logged again
        Path(path).touch()
        assert not n.watchdog()
        Path(path).unlink()
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        # back again: sends go through, and that is said once
        second = Receiver(path)
        try:
            assert n.watchdog()
            assert second.recv()[0] == "WATCHDOG=1"
            assert "again" in caplog.records[-1].getMessage()
        finally:
            second.close()
    n.close()


def test_watchdog_pid_of_another_process_means_no_pings(receiver: Receiver) -> None:
    other = os.getppid()
    assert other != os.getpid()
    n = notifier_for(receiver, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(other))
    assert n.enabled and n.watchdog_s is None
    clock = FakeClock()
    w = Watchdog(n, clock=clock)
    assert not w.enabled
    for _ in range(5):
        assert not w.beat(True)
        clock.now += 60
    assert not n.watchdog()
    assert n.status("still notifying")  # the rest of the protocol still applies
    assert receiver.pending() == ["STATUS=still notifying"]
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),  # no WATCHDOG_PID: it applies
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "77"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "78"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({}, None),
    ],
)
def test_watchdog_timeout_from_the_environment(env: dict[str, str], expected: float) -> None:
    assert watchdog_timeout_s(env, 77) == expected


def test_unset_environment_keeps_children_from_inheriting(receiver: Receiver) -> None:
    env = {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    n = Notifier.from_environ(env, unset_environment=True)
    assert env == {"PATH": "/usr/bin"}
    assert n.enabled and n.watchdog_s == 30.0
    assert n.watchdog()
    assert receiver.recv()[0] == "WATCHDOG=1"
    n.close()


def test_watchdog_pings_at_half_the_timeout_while_healthy(receiver: Receiver) -> None:
    clock = FakeClock()
    n = notifier_for(receiver, WATCHDOG_USEC="30000000")
    w = Watchdog(n, clock=clock)
    assert w.enabled and w.timeout_s == 30.0 and w.interval_s == 15.0
    assert w.until_due() == 0.0
    pinged_at = []
    for step in range(121):  # a loop beating every 0.5 s for a minute
        clock.now = 1000.0 + step * 0.5
        if w.beat(True):
            pinged_at.append(clock.now - 1000.0)
            assert receiver.pending() == ["WATCHDOG=1"]
        else:
            assert receiver.pending() == []
    assert pinged_at == [0.0, 15.0, 30.0, 45.0, 60.0]
    clock.now = 1064.0
    assert w.until_due() == pytest.approx(11.0)
    n.close()


def test_watchdog_stops_pinging_when_unhealthy_and_resumes(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    n = notifier_for(receiver, WATCHDOG_USEC="30000000")
    w = Watchdog(n, clock=clock)
    assert w.beat(True)
    receiver.pending()
    caplog.set_level(logging.INFO, logger="finopsd.service.notify")
    for _ in range(10):  # a minute of failing checks: not one ping
        clock.now += 6
        assert not w.beat(False, reason="ingest: no poll for 300s")
    assert receiver.pending() == []
    assert not w.healthy
    failing = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failing) == 1
    assert "ingest: no poll for 300s" in failing[0] and "30s" in failing[0]
    clock.now += 1
    assert w.beat(True)  # recovered: the first healthy beat pings at once (it is overdue)
    assert receiver.pending() == ["WATCHDOG=1"]
    assert "passing again" in caplog.records[-1].getMessage()
    n.close()


def test_watchdog_sends_nothing_when_beats_stop(receiver: Receiver) -> None:
    clock = FakeClock()
    n = notifier_for(receiver, WATCHDOG_USEC="30000000")
    threads = threading.active_count()
    w = Watchdog(n, clock=clock)
    assert w.beat(True)
    assert receiver.pending() == ["WATCHDOG=1"]
    clock.now += 3600  # the loop wedged for an hour: nothing of the watchdog's runs by itself
    assert threading.active_count() == threads
    assert receiver.pending() == []
    assert w.until_due() == 0.0
    assert w.beat(True)  # the next beat that comes pings again
    assert receiver.pending() == ["WATCHDOG=1"]
    n.close()


def test_status_is_sent_only_when_it_changes(receiver: Receiver) -> None:
    w = Watchdog(notifier_for(receiver))
    assert not w.enabled  # no WATCHDOG_USEC: status still works
    sent = [w.status(t) for t in ["starting", "starting", "ingesting", "ingesting", "starting"]]
    assert sent == [True, False, True, False, True]
    assert receiver.pending() == ["STATUS=starting", "STATUS=ingesting", "STATUS=starting"]
    w.notifier.close()


def test_a_child_process_notifies_from_its_own_environment(receiver: Receiver) -> None:
    """``from_environ()`` with no arguments reads os.environ and os.getpid(), as a
    daemon started by systemd does: READY arrives with the child's pid, and with
    WATCHDOG_PID naming its parent it sends no ping."""
    script = textwrap.dedent(
        """
        from finopsd.service.notify import Notifier, Watchdog
        n = Notifier.from_environ()
        w = Watchdog(n)
        n.ready(status=f"watchdog={w.enabled}")
        w.beat(True)
        n.stopping()
        """
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "10000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True
    )
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr
    ready, pid = receiver.recv()
    assert ready == "READY=1\nSTATUS=watchdog=False"
    assert pid == child.pid
    assert receiver.recv()[0] == "STOPPING=1"
    assert receiver.pending() == []
