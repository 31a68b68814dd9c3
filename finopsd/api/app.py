"""``create_app``: the FastAPI application, its bearer-token auth and request ids.

Auth: ``Authorization: Bearer <token>``, compared in constant time. Every ``/v1``
endpoint needs it for writes (``POST``); reads (``GET /v1/...``, ``/metrics``) need
it unless ``api.public_reads``. ``/healthz``, ``/readyz``, ``/openapi.json`` and
``/docs`` never do. A refused request answers 401 and changes nothing.
``POST /v1/slack/interactions`` is Slack's: authenticated by Slack's request signature
instead of the token (``finopsd.api.slack``).

Request ids: a request's ``X-Request-ID`` (up to 64 safe characters) or a new one
is echoed in the response and set in ``finopsd.logctx.REQUEST_ID`` for its
duration, so every log line about it carries it; each request is logged once
(method, path, status, milliseconds). An unexpected error answers 500 with the
request id and is logged without the request's headers.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from finopsd.api import actions, analyze, export, findings, metrics, probes, reports, slack, stats
from finopsd.api.state import ServiceState
from finopsd.logctx import REQUEST_ID
from finopsd.store import StoreUnavailable

log = logging.getLogger("finopsd.api")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_bearer = HTTPBearer(auto_error=False, description="the daemon's API token (api.token_file)")


class TokenAuth:
    """FastAPI dependencies that check the bearer token: ``read`` and ``write``."""

    def __init__(self, token: str, *, public_reads: bool) -> None:
        self._token = token.encode()
        self.public_reads = public_reads

    def _check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                401, "a bearer token is needed", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(credentials.credentials.encode(), self._token):
            raise HTTPException(
                401, "the bearer token is not valid", headers={"WWW-Authenticate": "Bearer"}
            )

    def read(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        if not self.public_reads:
            self._check(credentials)

    def write(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        self._check(credentials)


def create_app(state: ServiceState, token: str) -> FastAPI:
    """The API over ``state``, guarded by ``token`` (see the module docstring)."""
    app = FastAPI(
        title="finopsd",
        version="1",
        summary="FinOps daemon for AI: spend, findings, exports",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = state
    auth = TokenAuth(token, public_reads=state.settings.api.public_reads)
    reads = [Depends(auth.read)]
    app.include_router(probes.router)
    app.include_router(metrics.router, dependencies=reads)
    app.include_router(stats.router, dependencies=reads)
    app.include_router(findings.router, dependencies=reads)
    app.include_router(export.router, dependencies=reads)
    app.include_router(analyze.router, dependencies=[Depends(auth.write)])
    app.include_router(reports.router, dependencies=reads)
    app.include_router(actions.reads, dependencies=reads)
    app.include_router(actions.writes, dependencies=[Depends(auth.write)])
    app.state.slack = slack.Interactions.from_settings(state.settings.slack)
    app.include_router(slack.router)  # signed by Slack: no bearer token

    @app.middleware("http")
    async def request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get("x-request-id", "")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        token_ = REQUEST_ID.set(rid)
        began = time.perf_counter()
        try:
            response = await call_next(request)
            response.headers["X-Request-ID"] = rid
            log.info(
                "%s %s %d %.1f ms [%s]",
                request.method,
                request.url.path,
                response.status_code,
                (time.perf_counter() - began) * 1000,
                rid,
            )
        finally:
            REQUEST_ID.reset(token_)
        return response

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("store unavailable: %s [%s]", exc, REQUEST_ID.get())
        return JSONResponse({"detail": f"the store is unavailable: {exc}"}, status_code=503)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = REQUEST_ID.get()
        log.error(
            "%s %s failed: %s: %s [%s]",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
            rid,
        )
        body: dict[str, Any] = {"detail": "internal error", "request_id": rid}
        return JSONResponse(body, status_code=500)

    return app
