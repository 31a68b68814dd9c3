"""``POST /v1/analyze``: run the analyzers (all, or some) now; the findings they return."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from finopsd import views
from finopsd.api.state import ServiceState

router = APIRouter(prefix="/v1", tags=["analyze"])


class AnalyzeRequest(BaseModel):
    """Which analyzers (all when unset) over how many days (``analyzers.window_days``)."""

    model_config = ConfigDict(extra="forbid")

    only: list[str] | None = Field(None, max_length=64, description="analyzer names")
    window_days: float | None = Field(None, gt=0, le=366)


@router.post("/analyze", summary="run the analyzers now and store their findings")
def analyze(request: Request, body: AnalyzeRequest | None = None) -> dict[str, Any]:
    state: ServiceState = request.app.state.service
    body = body or AnalyzeRequest()
    try:
        runs = state.analyze(body.only, body.window_days)
    except ValueError as exc:  # an unknown analyzer
        raise HTTPException(400, str(exc)) from None
    return views.analysis(runs, body.window_days or state.settings.analyzers.window_days)
