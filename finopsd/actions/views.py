"""Actions as the CLI and the API show them: plain data ``json.dumps`` takes as it is."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

import duckdb

from finopsd.actions import ledger

JSON_COLUMNS = ("scope", "spec", "plan", "baseline", "verdict", "detail")


def action(row: dict[str, Any]) -> dict[str, Any]:
    """One ``actions`` (or ``action_audit``) row: JSON columns parsed, times ISO 8601."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, datetime | date):
            value = value.isoformat()
        out[key] = value
    return out


def detail(
    con: duckdb.DuckDBPyConnection, row: dict[str, Any], audit: list[dict[str, Any]]
) -> dict[str, Any]:
    """An action with its audit trail and its measured savings (``finopsd actions show``)."""
    totals = ledger.totals(con, row["id"])
    return {
        **action(row),
        "audit": [action(a) for a in audit],
        "savings": savings_row(totals[0]) if totals else None,
    }


def savings(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Realised savings per action from the ledger, and their sum (``actions savings``)."""
    rows = [savings_row(r) for r in ledger.totals(con)]
    return {
        "note": "realised: measured on the requests each action touched, against the same "
        "requests priced under the configuration before it; projections are not included",
        "actions": rows,
        "saved_usd": sum(r["saved_usd"] for r in rows),
        "saved_low_usd": sum(r["saved_low_usd"] for r in rows),
        "saved_high_usd": sum(r["saved_high_usd"] for r in rows),
    }


def savings_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.isoformat() if isinstance(v, date) else (float(v) if k.endswith("_usd") else v))
        for k, v in r.items()
    }
