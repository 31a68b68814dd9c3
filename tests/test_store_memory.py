"""The store as the daemon opens it: DuckDB's memory budget and where it spills."""

from __future__ import annotations

from pathlib import Path

from finopsd.config import load_settings
from finopsd.daemon import daemon_store


def _settings(tmp_path: Path, **env: str):
    return load_settings(None, env={"FINOPSD_STORE__PATH": str(tmp_path / "s.duckdb"), **env})


def _duckdb(store, name: str) -> str:
    row = (
        store.cursor()
        .execute("SELECT value FROM duckdb_settings() WHERE name = ?", [name])
        .fetchone()
    )
    return row[0]


def test_daemon_store_has_a_memory_budget_and_spills_beside_the_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.store.memory_limit == "128MiB"
    with daemon_store(settings) as store:
        assert _duckdb(store, "memory_limit") == "128.0 MiB"
        assert _duckdb(store, "threads") == "1"
        # DuckDB's default for a file database: <file>.tmp, next to the store
        assert _duckdb(store, "temp_directory") == str(tmp_path / "s.duckdb.tmp")


def test_a_query_larger_than_the_budget_spills_instead_of_failing(tmp_path: Path) -> None:
    settings = _settings(tmp_path, FINOPSD_STORE__MEMORY_LIMIT="32MiB")
    with daemon_store(settings) as store:
        # a hash aggregate of 2 M distinct string keys: without a temp_directory DuckDB
        # 1.5.5 refuses it at 32 MiB (OutOfMemoryException)
        row = (
            store.cursor()
            .execute(
                "SELECT count(*), sum(n) FROM (SELECT 'k-' || i AS k, count(*) AS n "
                "FROM range(2000000) t(i) GROUP BY k)"
            )
            .fetchone()
        )
        assert row == (2_000_000, 2_000_000)


def test_an_empty_memory_limit_lets_duckdb_decide(tmp_path: Path) -> None:
    settings = _settings(tmp_path, FINOPSD_STORE__MEMORY_LIMIT="")
    with daemon_store(settings) as store:
        assert _duckdb(store, "memory_limit") != "128.0 MiB"
