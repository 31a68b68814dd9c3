"""The daemon's HTTP API (FastAPI on uvicorn, in the daemon's own process).

- ``app.py``: ``create_app(state)``: the application, its auth and request ids;
- ``state.py``: ``ServiceState``: what the API may read of the running daemon;
- ``probes.py``: ``/healthz`` and ``/readyz`` (no auth);
- ``metrics.py``: ``/metrics`` (Prometheus text, collected at scrape time);
- ``stats.py``: ``/v1/stats``, ``/v1/spend``;
- ``findings.py``: ``/v1/findings``, ``/v1/findings/{id}``;
- ``analyze.py``: ``POST /v1/analyze``;
- ``export.py``: ``/v1/export/focus`` (streamed);
- ``server.py``: ``ApiServer``: uvicorn in a thread of its own, started and stopped
  by the daemon.

Handlers are plain functions: FastAPI runs them on its worker threads, each with a
store cursor of its own, never on ingest's threads; a failing request answers 500
and changes nothing else.
"""
