"""The id of the HTTP request a thread is serving, for every log line written meanwhile."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("finopsd_request_id", default=None)
"""Set by the API for the duration of a request (its ``X-Request-ID``)."""
