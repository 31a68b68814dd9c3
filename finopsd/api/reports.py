"""``GET /v1/reports/weekly?week=2026-W48``: the weekly report as JSON (what ``finopsd
report --json`` prints under ``report``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from finopsd.api.state import ServiceState
from finopsd.reports import weekly

router = APIRouter(prefix="/v1", tags=["reports"])


@router.get("/reports/weekly", summary="the weekly savings report of one ISO week")
def weekly_report(
    request: Request,
    week: Annotated[
        str | None, Query(max_length=8, description="ISO week, e.g. 2026-W48 (default: last)")
    ] = None,
) -> dict[str, Any]:
    state: ServiceState = request.app.state.service
    try:
        chosen = weekly.Week.parse(week) if week else weekly.Week.last_complete()
    except weekly.ReportError as exc:
        raise HTTPException(400, str(exc)) from None
    return weekly.build(state.store.cursor(), chosen)
