"""The daemon under systemd: READY=1, WATCHDOG=1, STATUS= and STOPPING=1 on a real
NOTIFY_SOCKET datagram socket, pings while the store thread waits for an analyzer's
write lock, and none while an ingest thread is stuck.

The daemon runs in this process (in a thread) against the session's embedded broker,
so that the test can wedge its store thread: ``_store`` is made to wait on an event,
as a store thread blocked in a call that never returns would.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DaemonSetup, Topics, produce_messages, wait_for

import finopsd.service.ingest
from finopsd.config import load_settings
from finopsd.daemon import Daemon
from finopsd.ingest.loadgen import UsageLoad

MakeConfig = Callable[..., DaemonSetup]


class Datagrams:
    """Every datagram that arrives on a bound AF_UNIX socket, gathered by a thread."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            with self._lock:
                self.got.append((time.monotonic(), data.decode()))

    def since(self, t: float) -> list[str]:
        with self._lock:
            return [m for at, m in self.got if at >= t]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_notify_ready_watchdog_stopping_and_no_pings_while_wedged(
    topics: Topics, make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = Datagrams(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(finopsd.service.ingest, "WEDGED_S", 3.0)
    setup = make_config("svc", analyzers={"first_run_delay_s": 86400})
    daemon = Daemon(load_settings(setup.config, env={}))
    runner = threading.Thread(target=daemon.run, daemon=True)
    began = time.monotonic()
    runner.start()
    try:
        wait_for(
            lambda: any("READY=1" in m for m in notify.since(began)),
            timeout=60,
            what="READY=1",
            context=lambda: repr(notify.got),
        )
        ready = next(m for m in notify.since(began) if "READY=1" in m)
        assert "STATUS=" in ready and "partitions" in ready
        assert "NOTIFY_SOCKET" not in os.environ  # not passed on to children
        wait_for(lambda: notify.since(began).count("WATCHDOG=1") >= 2, timeout=10, what="two pings")
        url = json.loads(setup.store.with_name(setup.store.name + ".api").read_text())["url"]
        assert httpx.get(f"{url}/healthz").status_code == 200

        worker = daemon._ingestor.worker if daemon._ingestor is not None else None
        assert worker is not None
        load = UsageLoad(seed=3, start=datetime.now(UTC))
        events = iter(load)

        # an analyzer's long transaction holds the write lock: the store thread waits for
        # it, which is not being stuck
        release = threading.Event()

        def long_transaction() -> None:
            with worker.store._writing():
                release.wait()

        holder = threading.Thread(target=long_transaction, name="analyzers", daemon=True)
        holder.start()
        produce_messages(topics.bootstrap, topics.usage, itertools.islice(events, 20))
        waiting = time.monotonic()
        time.sleep(5.0)  # beyond WEDGED_S
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 200, health.text
        (progress,) = [c for c in health.json()["checks"] if c["name"] == "ingest-progress"]
        assert "write lock (analyzers" in progress["detail"]
        assert "WATCHDOG=1" in notify.since(waiting)
        release.set()
        holder.join()

        # wedge the store thread: it takes the next batch and never comes back
        gate = threading.Event()
        store_batch = worker._store

        def wedged(batch: Any) -> None:
            gate.wait()
            store_batch(batch)

        monkeypatch.setattr(worker, "_store", wedged)
        produce_messages(topics.bootstrap, topics.usage, itertools.islice(events, 50))
        health = wait_for(
            lambda: (r := httpx.get(f"{url}/healthz")).status_code == 503 and r,
            timeout=30,
            what="/healthz failing",
        )
        assert health.json()["failed"] == ["ingest-progress"]
        quiet = time.monotonic()
        time.sleep(3.0)  # three ping intervals
        assert "WATCHDOG=1" not in notify.since(quiet)

        gate.set()  # the thread comes back: health, and the pings, return
        back = time.monotonic()
        wait_for(lambda: "WATCHDOG=1" in notify.since(back), timeout=10, what="pings again")
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stopping = time.monotonic()
        daemon.stop()
        runner.join(60)
        notify.close()
    assert not runner.is_alive()
    assert any("STOPPING=1" in m for m in notify.since(stopping))
