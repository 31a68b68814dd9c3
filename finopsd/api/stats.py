"""``GET /v1/stats`` (what ``finopsd stats`` prints) and ``GET /v1/spend`` (priced spend
per period and group)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from finopsd import views
from finopsd.api.state import ServiceState

router = APIRouter(prefix="/v1", tags=["stats"])


@router.get("/stats", summary="rows per table, stored offsets, priced spend")
def get_stats(request: Request) -> dict[str, Any]:
    state: ServiceState = request.app.state.service
    con = state.store.cursor()
    return views.stats(state.store, con, state.settings.pricing.disagreement_tolerance)


@router.get("/spend", summary="priced spend per hour, day or month and group")
def get_spend(
    request: Request,
    group_by: Annotated[
        str, Query(description=f"comma-separated, of: {', '.join(views.SPEND_GROUPS)}")
    ] = "",
    start: Annotated[
        datetime | None, Query(alias="from", description="RFC 3339; default: 30 days ago")
    ] = None,
    end: Annotated[datetime | None, Query(alias="to", description="RFC 3339; default: now")] = None,
    granularity: Annotated[views.Granularity, Query()] = "day",
) -> dict[str, Any]:
    from finopsd.analyzers.spend import refresh

    state: ServiceState = request.app.state.service
    end = _utc(end) if end is not None else datetime.now(UTC)
    start = _utc(start) if start is not None else end - timedelta(days=30)
    if end <= start:
        raise HTTPException(400, f"to ({end.isoformat()}) must be after from ({start.isoformat()})")
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    state.store.write(refresh)  # the hourly rollup, up to the events stored by now
    try:
        return views.spend(
            state.store.cursor(), group_by=groups, start=start, end=end, granularity=granularity
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def _utc(value: datetime) -> datetime:
    """A naive time is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
