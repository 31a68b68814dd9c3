"""How the CLI reaches a running daemon: its API's address and token, and a small client.

The daemon holds its store file (DuckDB lets one process open it), so while it
runs every command that reads or changes state asks it over HTTP instead. The
address: the file ``<store.path>.api`` the daemon writes once it listens (its URL
and pid), else ``api.host``:``api.port``. The token: ``api.token``, else
``api.token_file``, else ``<store.path>.api-token`` (the daemon makes that one,
mode 0600, when neither is set).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import IO, Any

from finopsd.config import Settings

TIMEOUT_S = 600.0
"""Reads and analyses may take minutes on a large store; connecting may not."""
CONNECT_TIMEOUT_S = 3.0


class DaemonError(RuntimeError):
    """The running daemon could not be asked, or refused: the message says why."""


def address_file(settings: Settings) -> Path:
    """Where the daemon writes its API's URL and pid while it listens."""
    path = settings.store.path
    return path.with_name(path.name + ".api")


def read_token(settings: Settings, *, create: bool = False) -> str | None:
    """The API token (see the module docstring). ``create``: make the default file when
    no token is configured and it does not exist yet (the daemon does, at start)."""
    api = settings.api
    if api.token is not None:
        return api.token.get_secret_value().strip()
    path = api.token_path(settings.store.path)
    if create and api.token_file is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made meanwhile by another process: read it
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_address(settings: Settings, url: str) -> None:
    """Record where the API listens (replaced atomically; removed by ``clear_address``)."""
    path = address_file(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    tmp.replace(path)


def clear_address(settings: Settings) -> None:
    path = address_file(settings)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def base_url(settings: Settings) -> str:
    """The running daemon's API URL: its address file, else the configured address."""
    try:
        data = json.loads(address_file(settings).read_text())
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            return data["url"].rstrip("/")
    except (OSError, ValueError):
        pass
    host = settings.api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


class DaemonClient:
    """Requests to the running daemon's API, errors turned into ``DaemonError``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = base_url(settings)
        self.token = read_token(settings)

    def _client(self) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._request("POST", path, json=body or {})

    def download(self, path: str, params: dict[str, Any], out: IO[bytes]) -> dict[str, str]:
        """Stream ``path``'s body into ``out``; returns the response headers."""
        import httpx

        try:
            with self._client() as client, client.stream("GET", path, params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise(r)
                for chunk in r.iter_bytes():
                    out.write(chunk)
                return dict(r.headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            with self._client() as client:
                r = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if r.status_code >= 400:
            self._raise(r)
        return r.json()

    def _unreachable(self, exc: Exception) -> DaemonError:
        return DaemonError(
            f"the store {self.settings.store.path} is held by a running finopsd, but its API "
            f"at {self.url} does not answer ({type(exc).__name__}: {exc}); check [api] in the "
            "config it runs with"
        )

    def _raise(self, r: Any) -> None:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if r.status_code == 401:
            where = (
                "api.token"
                if self.settings.api.token is not None
                else str(self.settings.api.token_path(self.settings.store.path))
            )
            raise DaemonError(f"the daemon's API refused the token from {where}: {detail}")
        raise DaemonError(f"the daemon answered {r.status_code}: {detail}")
