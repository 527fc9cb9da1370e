"""Read-only SQL over the index: a view `catalog` (catalog.parquet's columns) and a view `scans` (the ledger).

Queries run in an in-memory DuckDB session in which the catalog database is attached read-only (or
a catalog.parquet is read: a local file directly, a URL or hf://datasets/... fetched first) and the ledger's rows are copied in. Only one SELECT or EXPLAIN
statement is accepted: the index cannot be changed through a query.
"""

import tempfile
from pathlib import Path

import duckdb
from sqlalchemy import DateTime, Integer

from .errors import QueryRefused
from .ledger import Ledger, ScanRecord
from .publish import PARQUET, fetch

_READ = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def open_session(*, catalog: Path | None = None, parquet: str | None = None,
                 ledger_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory session with the `catalog` view (from `catalog` or `parquet`) and the `scans` view."""
    con = duckdb.connect()
    if parquet is not None:
        _read_parquet(con, parquet)
    elif catalog is not None and catalog.is_file():
        con.execute(f"ATTACH '{_quote(catalog)}' AS stored (READ_ONLY)")
        con.execute("CREATE VIEW catalog AS SELECT * FROM stored.catalog")
    columns = ", ".join(f'"{c.name}" {_duck_type(c.type)}' for c in ScanRecord.__table__.columns)
    con.execute(f"CREATE TABLE scans ({columns})")
    if ledger_url is not None:
        ledger = Ledger(ledger_url)
        rows = [list(r.values()) for r in ledger.records()]
        ledger.close()
        if rows:
            con.executemany(f"INSERT INTO scans VALUES ({', '.join('?' * len(rows[0]))})", rows)
    return con


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of one read-only statement.

    Raises:
        QueryRefused: for anything but exactly one SELECT or EXPLAIN, or SQL DuckDB rejects.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"query: {str(e).splitlines()[0]}") from None
    if len(statements) != 1 or statements[0].type not in _READ:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        raise QueryRefused(f"query: only one read-only SELECT is accepted, not {kinds}")
    try:
        result = con.execute(sql)
        return [d[0] for d in result.description], result.fetchall()
    except duckdb.Error as e:
        raise QueryRefused(f"query: {str(e).splitlines()[0]}") from None


def _read_parquet(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """The view (a local file) or table (fetched: URL, hf://datasets/...) `catalog` from a catalog.parquet."""
    try:
        if Path(source).exists():  # a view cannot take a prepared parameter, hence the quoted literal
            con.execute(f"CREATE VIEW catalog AS SELECT * FROM read_parquet('{_quote(source)}')")
            return
        with tempfile.TemporaryDirectory(prefix="superweight-query-") as tmp:
            local = Path(tmp) / PARQUET
            fetch(source, PARQUET, local)  # the download command's fetch: paths, http(s), hf://datasets
            con.execute(f"CREATE TABLE catalog AS SELECT * FROM read_parquet('{_quote(local)}')")
    except duckdb.Error as e:
        raise QueryRefused(f"{source}: not a readable catalog.parquet ({str(e).splitlines()[0]})") from None


def _duck_type(sql_type) -> str:
    if isinstance(sql_type, Integer):
        return "BIGINT"
    if isinstance(sql_type, DateTime):
        return "TIMESTAMP"
    return "VARCHAR"


def _quote(path: Path | str) -> str:
    return str(path).replace("'", "''")
