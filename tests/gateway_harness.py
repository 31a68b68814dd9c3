"""A real LiteLLM proxy in front of tiny local upstreams, logging through finopsd's callback.

What runs, all on 127.0.0.1:

- ``Upstream``: an OpenAI-compatible chat-completions server (stdlib
  ``http.server``, one thread per request) standing in for a provider or a vLLM
  deployment. It reports ``usage`` (``prompt_tokens`` from ``rough_tokens``,
  ``completion_tokens`` as configured), counts what it served, and can be told
  at run time to fail (HTTP 500, 429, ...) or to answer slowly.
- ``LiteLLMProxy``: the ``litellm`` command of ``.venv-litellm`` (``make litellm``
  installs it; ``FINOPSD_LITELLM_BIN`` names another binary) as a child process,
  on a config.yaml this harness writes into a work directory, with
  ``deploy/litellm/finopsd_kafka_logger.py`` copied beside it and named in
  ``litellm_settings.callbacks`` as ``finopsd_kafka_logger.handler``: LiteLLM loads
  ``<module>.<instance>`` from a ``<module>.py`` in the config file's directory
  (https://docs.litellm.ai/docs/proxy/streaming_logging). The callback publishes
  every call's ``StandardLoggingPayload`` to the proxy's Kafka topic, as in
  production.
- ``send``: one chat request through the proxy (httpx), with finopsd's tags in the
  request body's ``metadata``.

LiteLLM's proxy, as found with litellm 1.108.7 (the version ``make litellm`` pins:
the newest whose ``proxy`` extra resolved from the package index when it was chosen):

- it refuses to start without a master key (``LITELLM_MASTER_KEY``), and downloads
  its model price map at start unless ``LITELLM_LOCAL_MODEL_COST_MAP=True``;
- without a database its config is read only at start: a change is applied by a
  restart (``LiteLLMProxy.restart``, 5-10 s), which is how finopsd's actions will
  apply one. Readiness: ``GET /health/readiness`` (no auth;
  https://docs.litellm.ai/docs/proxy/health);
- the proxy calls the callback's async hooks; a record's key and ``id`` are the
  upstream's response id for a success (a cache hit's is that id plus
  ``_cache_hit<time>``), a fresh uuid for a failure;
- ``model`` is the deployment's ``openai/<name>``, ``model_group`` the group asked
  for, and ``response.model`` the group too (LiteLLM rewrites it), not the name
  the upstream answered with;
- the router retries a failed call twice by default (``router_settings.num_retries``);
- the request body's ``metadata`` arrives as ``metadata.requester_metadata``, the
  body's ``user`` as ``end_user``, its ``tags`` in ``request_tags`` (beside two
  ``User-Agent: ...`` tags LiteLLM adds);
- the recipe connects to Kafka on first use, from a thread of its own: the proxy
  starts and serves with Kafka away, dropping records until it answers
  (tests/test_litellm_recipe.py).

Tests get the fixtures (``upstreams``, ``litellm_proxy``) with
``pytest_plugins = ("gateway_harness",)``, after
``pytest.register_assert_rewrite("gateway_harness")`` and before importing from
it (see tests/test_gateway_harness.py). They fail, saying so, when the proxy is not
installed (``make test`` installs it): a test that cannot run is not a pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition

from finopsd.events import UsageEvent
from finopsd.ingest.broker import EmbeddedBroker, ensure_topics
from finopsd.ingest.formats import LiteLLMDecoder
from finopsd.ingest.formats._common import Problem

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "deploy" / "litellm" / "finopsd_kafka_logger.py"
CALLBACK = "finopsd_kafka_logger.handler"
"""``litellm_settings.callbacks`` entry: module file beside config.yaml, then its instance."""
LITELLM_BIN = Path(
    os.environ.get("FINOPSD_LITELLM_BIN") or REPO_ROOT / ".venv-litellm" / "bin" / "litellm"
)
DEFAULT_MASTER_KEY = "sk-finopsd-harness"
TAG_KEYS = ("tenant", "team", "app", "feature")


# -- the upstream -----------------------------------------------------------------------------


def rough_tokens(text: str) -> int:
    """The upstream's token count of one message: ceil(characters / 4), at least 1."""
    return max(1, math.ceil(len(text) / 4))


def message_text(content: Any) -> str:
    """The text of a chat message's ``content``: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


@dataclass(frozen=True)
class Served:
    """One request an upstream answered (``status`` 200) or failed on purpose."""

    seq: int
    path: str
    model: str | None
    """The ``model`` of the request body (LiteLLM sends the name after ``openai/``)."""
    prompt: str
    """The messages' texts joined by newlines."""
    prompt_tokens: int
    completion_tokens: int
    status: int
    body: Mapping[str, Any] = field(repr=False)


class Upstream:
    """An OpenAI-compatible chat-completions server on 127.0.0.1, in a thread.

    ``POST /v1/chat/completions`` (and ``/chat/completions``) answers a valid,
    non-streaming chat completion whose ``model`` is this upstream's ``name`` and
    whose ``usage`` reports ``prompt_tokens`` = the sum of ``rough_tokens`` over the
    request's messages and ``completion_tokens`` as configured; ``GET /v1/models``
    lists ``name``. Run-time controls (``fail``, ``heal``, ``slow``) apply to the
    requests that arrive after the call. Every counter and the log are guarded by
    one lock; ``served`` counts answers with status 200, ``failed`` answers failed
    on purpose. Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, name: str, *, completion_tokens: int = 8, reply: str | None = None) -> None:
        self.name = name
        self.completion_tokens = completion_tokens
        self.reply = reply if reply is not None else f"answer from {name}"
        self._lock = threading.Lock()
        self._log: list[Served] = []
        self._fail_status: int | None = None
        self._fail_left: int | None = None
        self._delay_s = 0.0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> Upstream:
        """Listen on a free port of 127.0.0.1 and serve in a daemon thread."""
        assert self._server is None, f"upstream {self.name} already runs"
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"upstream-{self.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, f"upstream {self.name} is not running"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The OpenAI base URL (``api_base``): ``http://127.0.0.1:<port>/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- run-time controls --

    def fail(self, status: int = 500, *, times: int | None = None) -> None:
        """Answer the next ``times`` chat requests (all, if None) with HTTP ``status``.

        The body is an OpenAI-style error object; a 429 carries ``Retry-After: 0``.
        """
        with self._lock:
            self._fail_status, self._fail_left = status, times

    def heal(self) -> None:
        """Answer normally again (and without delay)."""
        with self._lock:
            self._fail_status, self._fail_left, self._delay_s = None, None, 0.0

    def slow(self, delay_s: float) -> None:
        """Wait ``delay_s`` seconds before each answer (0: no delay)."""
        with self._lock:
            self._delay_s = delay_s

    def reset(self) -> None:
        """Forget what was served (counters and log); controls are kept."""
        with self._lock:
            self._log.clear()

    # -- what it served --

    @property
    def log(self) -> list[Served]:
        """A copy of every chat request answered or failed, in arrival order."""
        with self._lock:
            return list(self._log)

    @property
    def served(self) -> int:
        with self._lock:
            return sum(1 for s in self._log if s.status == 200)

    @property
    def failed(self) -> int:
        with self._lock:
            return sum(1 for s in self._log if s.status != 200)

    @property
    def prompts(self) -> list[str]:
        """The prompts answered with status 200, in order."""
        return [s.prompt for s in self.log if s.status == 200]

    def served_for(self, prompt: str) -> list[Served]:
        """The successful answers to ``prompt`` (its messages' texts joined by newlines)."""
        return [s for s in self.log if s.status == 200 and s.prompt == prompt]

    def count(self, text: str, *, status: int | None = 200) -> int:
        """How many requests whose prompt contains ``text`` got ``status`` (None: any)."""
        return sum(1 for s in self.log if text in s.prompt and status in (None, s.status))

    # -- the handler's side --

    def _answer(self, path: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any], float]:
        """(status, JSON body, delay) for one chat request; logs it."""
        messages = body.get("messages")
        texts = [message_text(m.get("content")) for m in messages or [] if isinstance(m, dict)]
        prompt = "\n".join(texts)
        prompt_tokens = sum(rough_tokens(t) for t in texts) if texts else 1
        with self._lock:
            status = 200
            if self._fail_status is not None and self._fail_left != 0:
                status = self._fail_status
                if self._fail_left is not None:
                    self._fail_left -= 1
            seq = len(self._log) + 1
            delay = self._delay_s
            self._log.append(
                Served(
                    seq=seq,
                    path=path,
                    model=body.get("model") if isinstance(body.get("model"), str) else None,
                    prompt=prompt,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=self.completion_tokens if status == 200 else 0,
                    status=status,
                    body=body,
                )
            )
        if status != 200:
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            error = {"message": f"{self.name} told to fail ({status})", "type": kind}
            return status, {"error": {**error, "param": None, "code": kind}}, delay
        return (
            200,
            {
                "id": f"chatcmpl-{self.name}-{seq}-{uuid.uuid4().hex[:8]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.name,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "total_tokens": prompt_tokens + self.completion_tokens,
                },
            },
            delay,
        )


def _handler_for(upstream: Upstream) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: LiteLLM's httpx client reuses connections

        def _send_json(
            self, status: int, doc: Mapping[str, Any], headers: Mapping[str, str] | None = None
        ) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                model = {"id": upstream.name, "object": "model", "owned_by": "finopsd-tests"}
                self._send_json(200, {"object": "list", "data": [model]})
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.split("?")[0] not in ("/v1/chat/completions", "/chat/completions"):
                self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._send_json(400, {"error": {"message": "body is not JSON"}})
                return
            if not isinstance(body, dict) or body.get("stream"):
                self._send_json(400, {"error": {"message": "a non-streaming chat request only"}})
                return
            status, doc, delay = upstream._answer(self.path, body)
            if delay > 0:
                time.sleep(delay)
            self._send_json(status, doc, {"Retry-After": "0"} if status == 429 else None)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


# -- the proxy --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deployment(
    model_name: str, upstream: Upstream, *, weight: float | None = None, **litellm_params: Any
) -> dict[str, Any]:
    """A ``model_list`` entry: ``model_name`` (the group clients ask for) served by
    ``upstream`` as ``openai/<upstream.name>`` at its URL with a dummy key; ``weight``
    (relative, for ``simple-shuffle``) and any other ``litellm_params`` as given."""
    params: dict[str, Any] = {
        "model": f"openai/{upstream.name}",
        "api_base": upstream.url,
        "api_key": "sk-upstream-dummy",
        **litellm_params,
    }
    if weight is not None:
        params["weight"] = weight
    return {"model_name": model_name, "litellm_params": params}


try:  # resolved here: the child must not load libraries between fork and exec
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (Linux prctl)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


class LiteLLMProxy:
    """``litellm --config <workdir>/config.yaml --host 127.0.0.1 --port <port>``, a child.

    ``config`` is the dict written to config.yaml at each ``start()``: edit it (or
    pass a new one to ``restart(config)``) and restart to apply a change. The
    callback's settings come from the environment: ``FINOPSD_KAFKA_BOOTSTRAP`` =
    ``bootstrap``, ``FINOPSD_LITELLM_TOPIC`` = ``topic``. The child runs in a
    process group of its own and is SIGKILLed if the test process dies; ``stop()``
    ends the group (SIGTERM, then SIGKILL). The port is kept across restarts, so
    ``url`` does not change. Output goes to ``<workdir>/litellm.log``, appended
    to across restarts.
    """

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        *,
        bootstrap: str,
        topic: str,
        master_key: str = DEFAULT_MASTER_KEY,
        binary: Path = LITELLM_BIN,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config: dict[str, Any] = json.loads(json.dumps(config))  # a deep, plain copy
        self.bootstrap = bootstrap
        self.topic = topic
        self.master_key = master_key
        self.binary = binary
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "litellm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.last_start_s: float | None = None
        """Seconds the latest start took until ready."""
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> httpx.Client:
        """An httpx client for the proxy (kept; closed by ``stop()``), not using env proxies."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60, trust_env=False)
        return self._client

    def write_config(self) -> Path:
        """Write ``config`` (with finopsd's callback added) and the callback module."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECIPE, self.workdir / RECIPE.name)
        config = json.loads(json.dumps(self.config))
        settings = config.setdefault("litellm_settings", {})
        callbacks = list(settings.get("callbacks") or [])
        if CALLBACK not in callbacks:
            callbacks.append(CALLBACK)
        settings["callbacks"] = callbacks
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def _env(self) -> dict[str, str]:
        drop = ("FINOPSD_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "LITELLM_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(
            {
                "LITELLM_MASTER_KEY": self.master_key,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "FINOPSD_KAFKA_BOOTSTRAP": self.bootstrap,
                "FINOPSD_LITELLM_TOPIC": self.topic,
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0, *, write: bool = True) -> LiteLLMProxy:
        """Write the config (unless ``write`` is False: start on config.yaml as it is, as
        a service manager would after someone edited it), start the proxy and wait until
        ``/health/readiness`` is 200.

        Fails (with the log's tail) if the process exits or is not ready in ``timeout`` s.
        """
        assert not self.alive, "the proxy already runs"
        if not self.binary.exists():
            pytest.fail(f"no LiteLLM proxy at {self.binary}: run `make litellm` (make test does)")
        if write:
            self.write_config()
        began = time.monotonic()
        with open(self.log_path, "ab") as out:
            out.write(f"--- start {self.starts + 1} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "--config",
                    str(self.config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1
        self._wait_ready(timeout)
        self.last_start_s = time.monotonic() - began
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2, trust_env=False) as probe:
            while True:
                if not self.alive:
                    rc = self.proc.poll() if self.proc is not None else None
                    pytest.fail(f"the LiteLLM proxy exited with status {rc}\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if probe.get("/health/readiness").status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    self.stop()
                    pytest.fail(
                        f"the LiteLLM proxy was not ready within {timeout:.0f}s\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> int | None:
        """End the proxy's process group: SIGTERM, SIGKILL after ``timeout`` s (idempotent).

        Returns the exit status (None if it never ran). Also closes ``client()``.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # anything left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def restart(self, config: Mapping[str, Any] | None = None, timeout: float = 120.0) -> None:
        """Stop, then start on ``config`` (if given, it replaces ``self.config``)."""
        if config is not None:
            self.config = json.loads(json.dumps(config))
        self.stop()
        self.start(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- tail of {self.log_path} ---\n{self.log_text()[-chars:]}"


RELOAD_CLIENT = """
import pathlib, sys, time, uuid
requests = pathlib.Path(sys.argv[1])
ask = uuid.uuid4().hex
(requests / f"restart-{ask}").write_text("")
done = requests / f"done-{ask}"
deadline = time.monotonic() + float(sys.argv[2])
while not done.exists():
    if time.monotonic() > deadline:
        sys.exit("the proxy was not restarted in time")
    time.sleep(0.1)
answer = done.read_text()
if answer:
    sys.exit(answer)
"""
"""``python -c RELOAD_CLIENT DIR TIMEOUT``: ask a ``ServiceManager`` watching DIR to restart
its proxy and wait until it has (exit 1 with its error otherwise)."""


class ServiceManager:
    """Restarts one proxy on request, on its config.yaml as it is: the stand-in for
    ``systemctl restart litellm`` that finopsd's reload command calls
    (``reload_command()``). A thread watches ``directory`` for ``restart-<id>`` files and
    answers each with ``done-<id>`` (empty: restarted and ready; else the error)."""

    def __init__(self, proxy: LiteLLMProxy, directory: Path) -> None:
        self.proxy = proxy
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="service-manager", daemon=True)

    def reload_command(self, timeout_s: float = 120.0) -> list[str]:
        return [sys.executable, "-c", RELOAD_CLIENT, str(self.directory), str(timeout_s)]

    def start(self) -> ServiceManager:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            for ask in sorted(self.directory.glob("restart-*")):
                answer = ""
                try:
                    self.proxy.stop()
                    self.proxy.start(write=False)
                    self.restarts += 1
                except BaseException as exc:  # pytest.fail raises a BaseException
                    answer = f"restart failed: {exc}"[:2000] or "restart failed"
                (self.directory / ask.name.replace("restart-", "done-")).write_text(answer)
                ask.unlink()


# -- requests ---------------------------------------------------------------------------------


def send(
    proxy: LiteLLMProxy,
    model: str,
    prompt: str,
    *,
    tags: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    request_tags: Sequence[str] | None = None,
    user: str | None = None,
    quality_score: float | None = None,
    extra: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> httpx.Response:
    """POST one chat request (one user message, ``prompt``) to the proxy's
    ``/v1/chat/completions`` with its master key; returns the response, whatever its
    status.

    Where things go in the request body, and where they arrive in the
    ``StandardLoggingPayload``:

    - ``tags`` (finopsd's ``tenant``, ``team``, ``app``, ``feature``) and
      ``metadata`` are merged into the body's ``metadata`` object; LiteLLM copies it
      to the payload's ``metadata.requester_metadata``, where finopsd's litellm
      decoder reads a tag the virtual key does not give (the master key gives none).
    - ``quality_score`` goes in that ``metadata`` too (a number), as an eval pipeline
      that scores the request would attach it; finopsd's decoder does not read it.
    - ``request_tags``: the body's ``tags`` list (LiteLLM's spend-tracking tags: the
      payload's ``request_tags``, after which LiteLLM adds ``User-Agent: ...`` tags).
    - ``user``: the body's ``user`` (the payload's ``end_user``).
    - ``extra``: more body fields (e.g. ``max_tokens``, ``cache``).
    """
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    meta: dict[str, Any] = {**(metadata or {}), **(tags or {})}
    if quality_score is not None:
        meta["quality_score"] = quality_score
    if meta:
        body["metadata"] = meta
    if request_tags is not None:
        body["tags"] = list(request_tags)
    if user is not None:
        body["user"] = user
    body.update(extra or {})
    return proxy.client().post(
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {proxy.master_key}"},
        timeout=timeout,
    )


# -- what reached Kafka -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedCall:
    """One record of the proxy's topic: its key, raw value and the decoded payload."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    payload: dict[str, Any]

    @property
    def requester_metadata(self) -> dict[str, Any]:
        """What the caller put in the request body's ``metadata`` ({} if none)."""
        meta = self.payload.get("metadata") or {}
        return dict(meta.get("requester_metadata") or {})


def read_calls(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    where: Callable[[LoggedCall], bool] = lambda call: True,
    timeout: float = 30.0,
    settle_s: float = 0.5,
) -> list[LoggedCall]:
    """The topic's records (all partitions, from the beginning) that satisfy ``where``,
    in (partition, offset) order, once at least ``count`` are there; fails after
    ``timeout`` s. Reads ``settle_s`` longer so that extra records show up too."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    calls: list[LoggedCall] = []
    try:
        partitions = consumer.partitions_for_topic(topic) or {0}
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()

        def poll(ms: int) -> None:
            for batch in consumer.poll(timeout_ms=ms).values():
                for r in batch:
                    call = LoggedCall(r.partition, r.offset, r.key, r.value, json.loads(r.value))
                    if where(call):
                        calls.append(call)

        deadline = time.monotonic() + timeout
        while len(calls) < count:
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f}s reading {topic}: {len(calls)} of {count} "
                    "matching records"
                )
            poll(200)
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            poll(100)
    finally:
        consumer.close(autocommit=False)
    return sorted(calls, key=lambda c: (c.partition, c.offset))


def decode_calls(calls: Sequence[LoggedCall]) -> list[UsageEvent]:
    """finopsd's litellm decoder over each record's value, validated by ``UsageEvent``
    (what ingest does, without the store); fails on any record it refuses."""
    decoder = LiteLLMDecoder()
    events: list[UsageEvent] = []
    for call in calls:
        problems: list[Problem] = []
        found = decoder.candidates(call.value, problems)
        assert not problems, f"record {call.partition}@{call.offset}: {problems}"
        events.extend(UsageEvent.model_validate(c.wire) for c in found)
    return events


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Callable[..., Upstream]]:
    """``upstreams(name, completion_tokens=8, reply=None)``: a started ``Upstream``;
    all are stopped when the module's tests are done."""
    started: list[Upstream] = []

    def make(name: str, **kwargs: Any) -> Upstream:
        upstream = Upstream(name, **kwargs).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


@pytest.fixture(scope="module")
def litellm_proxy(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LiteLLMProxy]]:
    """``litellm_proxy(config, partitions=1, **kwargs)``: a started, ready ``LiteLLMProxy``
    on the session broker, logging to a topic of its own (``proxy.topic``, created
    with ``partitions``); ``kwargs`` go to ``LiteLLMProxy``. Fails when the proxy is
    not installed. Every proxy's process group is ended when the module's tests are
    done, whatever their outcome."""
    started: list[LiteLLMProxy] = []

    def make(config: Mapping[str, Any], *, partitions: int = 1, **kwargs: Any) -> LiteLLMProxy:
        if not LITELLM_BIN.exists() and "binary" not in kwargs:
            pytest.fail(f"no LiteLLM proxy at {LITELLM_BIN}: run `make litellm` (make test does)")
        topic = f"litellm.{uuid.uuid4().hex[:12]}"
        ensure_topics(broker.bootstrap, {topic: partitions})
        proxy = LiteLLMProxy(
            tmp_path_factory.mktemp("litellm"),
            config,
            bootstrap=broker.bootstrap,
            topic=topic,
            **kwargs,
        )
        started.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in started:
            proxy.stop()


__all__ = [
    "CALLBACK",
    "LITELLM_BIN",
    "TAG_KEYS",
    "LiteLLMProxy",
    "LoggedCall",
    "Served",
    "ServiceManager",
    "Upstream",
    "decode_calls",
    "deployment",
    "free_port",
    "litellm_proxy",
    "read_calls",
    "rough_tokens",
    "send",
    "upstreams",
]
