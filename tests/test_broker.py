"""The embedded broker is owned: it dies with finopsd, SIGTERM stops it, a taken port is
reported, never silently shared. Real processes, real signals, /proc for the children."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import clean_env, wait_for

from finopsd.ingest.broker import BrokerError, EmbeddedBroker, free_port, tansu_binary


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def tansu_child(pid: int) -> int:
    def find() -> int | None:
        for child in children(pid):
            if Path(f"/proc/{child}/exe").resolve() == tansu_binary().resolve():
                return child
        return None

    return wait_for(find, timeout=15, what=f"a Tansu child of {pid}")


def test_broker_command_stops_its_broker_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f"[embedded_broker]\nport = {port}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finopsd", "broker", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode() for _ in range(2)]
        assert any("embedded broker on" in line for line in lines), lines
        broker = tansu_child(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        wait_for(lambda: not alive(broker), timeout=10, what="the broker to stop")
    finally:
        proc.kill()


def test_the_broker_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """kill -9 of the process that started it: the broker goes too (no orphan holding the
    port for the next start)."""
    script = textwrap.dedent(
        """
        import sys, time
        from finopsd.ingest.broker import EmbeddedBroker
        b = EmbeddedBroker("127.0.0.1", int(sys.argv[1]))
        b.start()
        print("up", flush=True)
        time.sleep(600)
        """
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, env=clean_env()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        broker = tansu_child(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not alive(broker), timeout=10, what="the orphaned broker to die")
        wait_for(lambda: not listening(port), timeout=10, what=f"port {port} to be released")
        b = EmbeddedBroker("127.0.0.1", port)  # the port is free again
        b.start()
        b.stop()
    finally:
        proc.kill()


def test_a_taken_port_is_reported_not_shared(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(BrokerError, match=r"already in use.*embedded_broker\.port"):
            EmbeddedBroker("127.0.0.1", port).start()
        config = tmp_path / "c.toml"
        config.write_text(
            f"[embedded_broker]\nport = {port}\n[store]\npath = '{tmp_path / 's.duckdb'}'\n"
            "[api]\nport = 0\n"
        )
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "finopsd", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_the_listener_is_known_to_be_ours() -> None:
    """How start() tells its own broker from another process on the port: /proc's socket
    inodes of the listening port against the child's file descriptors."""
    import os

    from finopsd.ingest.broker import _holds_listener

    with EmbeddedBroker("127.0.0.1", free_port()) as b, socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        other = mine.getsockname()[1]
        assert _holds_listener(b.pid, b.port) is True
        assert _holds_listener(os.getpid(), b.port) is False
        assert _holds_listener(os.getpid(), other) is True
        assert _holds_listener(b.pid, other) is False


def test_the_log_file_directory_is_created(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "tansu.log"
    with EmbeddedBroker("127.0.0.1", free_port(), log_file=log):
        assert log.is_file()
