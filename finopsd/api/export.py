"""``GET /v1/export/focus``: a FOCUS 1.2 file of [from, to), streamed (CSV or Parquet).

The body is the file ``finopsd export focus`` writes; the ``X-Finopsd-Export``
header holds its summary as JSON (rows, billed and list cost, what was left out).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from finopsd.api.state import ServiceState

router = APIRouter(prefix="/v1", tags=["export"])

CSV_ROWS_PER_CHUNK = 2000


@router.get(
    "/export/focus", summary="a FOCUS 1.2 file of [from, to)", response_class=StreamingResponse
)
def export_focus(
    request: Request,
    start: Annotated[str, Query(alias="from", description="RFC 3339 or YYYY-MM-DD (UTC)")],
    end: Annotated[str, Query(alias="to", description="RFC 3339 or YYYY-MM-DD (UTC)")],
    format: Annotated[Literal["csv", "parquet"], Query()] = "csv",
    billing_account: Annotated[str | None, Query(max_length=200)] = None,
) -> StreamingResponse:
    from finopsd.reports import focus

    state: ServiceState = request.app.state.service
    try:
        lo, hi = focus.parse_bound(start), focus.parse_bound(end)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if hi <= lo:
        raise HTTPException(400, "to must be after from")
    con = state.store.cursor()
    kwargs = {} if billing_account is None else {"billing_account": billing_account}
    try:
        table = focus.focus_table(con, lo, hi, prices=state.prices, **kwargs)
    except focus.PeriodError as exc:
        raise HTTPException(400, str(exc)) from None
    summary = focus.export_summary(table, focus.skipped_events(con, lo, hi), lo, hi, format)
    name = focus.default_output_name(lo, hi, format)
    headers = {
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Finopsd-Export": json.dumps(summary, separators=(",", ":")),
    }
    if format == "csv":
        return StreamingResponse(_csv_chunks(table), media_type="text/csv", headers=headers)
    return StreamingResponse(
        _parquet_chunks(table), media_type="application/vnd.apache.parquet", headers=headers
    )


def _csv_chunks(table: Any) -> Iterator[bytes]:
    from finopsd.reports import focus

    buf = io.StringIO(newline="")
    writer = csv.writer(buf, quoting=csv.QUOTE_MINIMAL)
    for i, row in enumerate(focus.csv_rows(table), start=1):
        writer.writerow(row)
        if i % CSV_ROWS_PER_CHUNK == 0:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()


def _parquet_chunks(table: Any) -> Iterator[bytes]:
    from finopsd.reports import focus

    with tempfile.TemporaryDirectory(prefix="finopsd-export-") as tmp:
        path = f"{tmp}/export.parquet"
        focus.write_parquet(table, path)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
