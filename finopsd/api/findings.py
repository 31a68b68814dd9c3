"""``GET /v1/findings`` (filtered, paginated) and ``GET /v1/findings/{id}``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request

from finopsd import views
from finopsd.api.state import ServiceState

router = APIRouter(prefix="/v1", tags=["findings"])


@router.get("/findings", summary="stored findings, the largest monthly saving first")
def list_findings(
    request: Request,
    kind: Annotated[str | None, Query(description="a kind, or an analyzer's name")] = None,
    tenant: Annotated[str | None, Query(description="the scope's tenant")] = None,
    status: Annotated[Literal["open", "resolved", "dismissed"], Query()] = "open",
    min_savings_usd: Annotated[float, Query(ge=0, le=1e15)] = 0.0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> dict[str, Any]:
    state: ServiceState = request.app.state.service
    return views.findings(
        state.store.cursor(),
        kind=kind,
        tenant=tenant,
        status=status,
        min_savings_usd=min_savings_usd,
        limit=limit,
        offset=offset,
    )


@router.get("/findings/{finding_id}", summary="one finding, with its evidence")
def get_finding(request: Request, finding_id: str) -> dict[str, Any]:
    state: ServiceState = request.app.state.service
    found = views.finding(state.store.cursor(), finding_id)
    if found is None:
        raise HTTPException(404, f"no finding {finding_id!r}")
    return found
