"""The savings ledger: what each live action saved, measured on the requests it touched.

Per action and UTC day: the touched requests' actual cost (as ingested and priced)
and their counterfactual cost — the *same requests* (the same token counts, the same
day's prices, through the same ``PriceBook.price``) under the configuration before
the action:

- response cache (``gateway.cache`` mode ``response``): the scope's cache hits since
  the change, priced as if the model had answered (``cache_hit`` false). Exact: every
  hit is counted, so the interval is the figure itself.
- prompt caching (``gateway.cache`` mode ``prompt_prefix``): the scope's requests
  since the change, their cached and cache-write tokens priced as plain input.
  Exact, as above.
- reroute and cascade (``gateway.route``, ``gateway.cascade``): the scope's requests
  (its tags and the model asked for) since the change, each priced as if served by
  every model that served the scope before the action, weighted by its share then.
  The interval is 95 % of a normal approximation of the day's sum over the
  per-request differences (the mix before is an expectation, not a replay).

Realised = counterfactual − actual. Other kinds are not measured here (their
rows say so); projected savings of findings are never added to these.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finopsd.pricing import COST_SCHEMA, PriceBook

log = logging.getLogger(__name__)

SCOPE_COLUMNS = {"tenant": "tenant", "team": "team", "app": "app", "feature": "feature"}
NONE = "(none)"  # how analyzers name a missing tag in a scope
MEASURED = ("gateway.cache", "gateway.route", "gateway.cascade")


@dataclass(frozen=True)
class LedgerDay:
    action_id: str
    day: date
    requests: int
    actual_usd: float
    counterfactual_usd: float
    saved_low_usd: float
    saved_high_usd: float
    unpriced: int
    method: str

    @property
    def saved_usd(self) -> float:
        return self.counterfactual_usd - self.actual_usd


def scope_filter(scope: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """SQL (over ``usage_events``) selecting a finding scope's tags; "(none)" is NULL."""
    clauses, params = [], []
    for key, column in SCOPE_COLUMNS.items():
        if key not in scope or scope[key] is None:
            continue
        if scope[key] == NONE:
            clauses.append(f"{column} IS NULL")
        else:
            clauses.append(f"{column} = ?")
            params.append(scope[key])
    if scope.get("provider") not in (None, NONE):
        clauses.append("provider = ?")
        params.append(scope["provider"])
    return (" AND ".join(clauses) or "true"), params


SERVED = "coalesce(response_model, request_model)"
"""The model that answered a request (a gateway's group is its request model)."""


def route_filter(scope: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """A reroute's scope: its tags and the model asked for (``scope['model']``), whichever
    model the gateway then sent the request to (``SERVED``)."""
    where, args = scope_filter(scope)
    if scope.get("model"):
        where += " AND request_model = ?"
        args.append(scope["model"])
    return where, args


def compute(
    con: duckdb.DuckDBPyConnection,
    prices: PriceBook,
    action: Mapping[str, Any],
    *,
    now: datetime | None = None,
    since: date | None = None,
) -> list[LedgerDay]:
    """The ledger days of one action (a row of ``actions`` as a dict), from its first
    change (or from the UTC day ``since``, when the days before are recorded already)
    to its end (or ``now``)."""
    spec = _json(action["spec"])
    kind = spec["actuator"]
    start = action.get("applied_at")
    if start is None or kind not in MEASURED:
        return []
    if since is not None:
        start = max(start, datetime(since.year, since.month, since.day, tzinfo=UTC))
    end = action.get("ended_at") or now or datetime.now(UTC)
    params = spec.get("params") or {}
    scope = params.get("scope") or params.get("match") or _json(action["scope"])
    where, args = scope_filter(scope)
    baseline = _json(action.get("baseline")) or {}
    shares: dict[str, float] = dict(baseline.get("shares") or {})
    if kind == "gateway.cache" and params.get("mode") == "response":
        where += " AND cache_hit"
        method = "exact: each response-cache hit priced as the model's answer"
    elif kind == "gateway.cache":
        where += " AND request_model = ?" if params.get("model") else ""
        args += [params["model"]] if params.get("model") else []
        method = "exact: cached and cache-write tokens priced as plain input"
    else:
        where, args = route_filter(scope)
        shares = dict(baseline.get("served") or shares)
        method = "the same requests priced under the mix before the action (expected cost)"
        if not shares:
            return []
    rows = con.execute(
        f"SELECT * FROM usage_events WHERE ts >= ? AND ts < ? AND {where} ORDER BY ts",
        [start, end, *args],
    ).to_arrow_table()
    if isinstance(rows, pa.RecordBatchReader):  # pragma: no cover - duckdb version dependent
        rows = rows.read_all()
    if rows.num_rows == 0:
        return []
    actual = np.nan_to_num(rows.column("cost_usd").to_numpy(zero_copy_only=False).astype(float))
    unpriced_actual = pc.is_null(rows.column("cost_usd")).to_numpy(zero_copy_only=False)
    base = rows.drop_columns([f.name for f in COST_SCHEMA])
    if kind == "gateway.cache" and params.get("mode") == "response":
        counter, unpriced_cf = _priced(prices, _set(base, cache_hit=False))
    elif kind == "gateway.cache":
        counter, unpriced_cf = _priced(
            prices, _set(base, cache_read_input_tokens=None, cache_creation_input_tokens=None)
        )
    else:
        counter = np.zeros(rows.num_rows)
        unpriced_cf = np.zeros(rows.num_rows, dtype=bool)
        total = sum(shares.values()) or 1.0
        for model, share in shares.items():
            cost, missing = _priced(
                prices,
                _set(base, request_model=model, response_model=model, deployment=None),
            )
            counter += cost * (share / total)
            unpriced_cf |= missing
    exact = kind == "gateway.cache"
    days = rows.column("ts").to_pylist()
    by_day: dict[date, list[int]] = {}
    for i, ts in enumerate(days):
        by_day.setdefault(ts.astimezone(UTC).date(), []).append(i)
    out = []
    for day, idx in sorted(by_day.items()):
        ix = np.array(idx)
        ok = ix[~(unpriced_actual[ix] | unpriced_cf[ix])]
        act, cf = float(actual[ok].sum()), float(counter[ok].sum())
        saved = cf - act
        if exact or ok.size < 2:
            low = high = saved
        else:
            half = 1.96 * math.sqrt(ok.size) * float(np.std(counter[ok] - actual[ok], ddof=1))
            low, high = saved - half, saved + half
        out.append(
            LedgerDay(
                action["id"],
                day,
                int(ok.size),
                act,
                cf,
                low,
                high,
                int(ix.size - ok.size),
                method,
            )
        )
    return out


def record(con: duckdb.DuckDBPyConnection, days: list[LedgerDay]) -> None:
    """Replace the ledger rows of these days (the caller holds the write transaction)."""
    now = datetime.now(UTC)
    con.executemany(
        "INSERT OR REPLACE INTO savings_ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [
                d.action_id,
                d.day,
                d.requests,
                d.actual_usd,
                d.counterfactual_usd,
                d.saved_usd,
                d.saved_low_usd,
                d.saved_high_usd,
                d.unpriced,
                d.method,
                now,
            ]
            for d in days
        ],
    )


def totals(con: duckdb.DuckDBPyConnection, action_id: str | None = None) -> list[dict[str, Any]]:
    """Per action: days, requests, actual, counterfactual, saved and its interval (the
    day intervals added: a conservative bound)."""
    sql = (
        "SELECT action_id, count(*) AS days, min(day) AS first_day, max(day) AS last_day, "
        "sum(requests) AS requests, sum(actual_usd) AS actual_usd, "
        "sum(counterfactual_usd) AS counterfactual_usd, sum(saved_usd) AS saved_usd, "
        "sum(saved_low_usd) AS saved_low_usd, sum(saved_high_usd) AS saved_high_usd, "
        "sum(unpriced) AS unpriced, any_value(method) AS method FROM savings_ledger"
    )
    params: list[Any] = []
    if action_id is not None:
        sql += " WHERE action_id = ?"
        params.append(action_id)
    cur = con.execute(sql + " GROUP BY action_id ORDER BY saved_usd DESC", params)
    names = [d[0] for d in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _priced(prices: PriceBook, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    priced, _ = prices.price(rows)
    col = priced.column("cost_usd")
    missing = pc.is_null(col).to_numpy(zero_copy_only=False)
    return np.nan_to_num(col.to_numpy(zero_copy_only=False).astype(float)), missing


def _set(rows: pa.Table, **values: Any) -> pa.Table:
    """``rows`` with the named columns replaced by one value (None: NULL); the gateway's
    own cost is dropped, since it priced the request that happened."""
    values.setdefault("gateway_cost_usd", None)
    for name, value in values.items():
        if name not in rows.column_names:
            continue
        i = rows.column_names.index(name)
        field = rows.schema.field(i)
        column = (
            pa.nulls(rows.num_rows, field.type)
            if value is None
            else pa.array([value] * rows.num_rows, field.type)
        )
        rows = rows.set_column(i, field, column)
    return rows


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
