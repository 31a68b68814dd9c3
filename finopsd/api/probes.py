"""``GET /healthz`` (the process and its threads are alive) and ``GET /readyz`` (it can do
its job); neither needs a token, both answer 503 naming the checks that failed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from finopsd.api.state import Check, ServiceState

router = APIRouter(tags=["probes"])


def _answer(checks: list[Check]) -> JSONResponse:
    ok = all(c.ok for c in checks)
    failed = [c.name for c in checks if not c.ok]
    body = {
        "status": "ok" if ok else "failing",
        "failed": failed,
        "checks": [c.as_dict() for c in checks],
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/healthz", summary="the process and its threads are alive")
def healthz(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    return _answer(state.liveness())


@router.get("/readyz", summary="broker reachable, partitions assigned, store writable, lag low")
def readyz(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    return _answer(state.readiness())
