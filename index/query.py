"""Read-only SQL over the index: a table `catalog` (catalog.parquet's columns) and a table `scans` (the ledger).

A query runs in an in-memory DuckDB session that holds copies of the catalog (read from the local
catalog database, which is then detached at once, so a writer is held up for no longer than the
copy; or from a catalog.parquet: a local file, or a URL or hf://datasets/... fetched first) and of
the ledger's rows. Before the query runs, the session is closed to the outside: DuckDB's own
settings turn off file system and network access and extension installs and loads, spilling to
disk is off, memory is capped, and the settings are locked so a query cannot turn them back on.
Only one SELECT (or EXPLAIN of one) is accepted, and it is interrupted at its timeout.
"""

import json
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
from sqlalchemy import DateTime, Integer

from superweight.scanner.errors import first_line

from .build import PUBLISHED
from .catalog import attach_read_only
from .errors import QueryRefused
from .ledger import ScanRecord, read_records
from .publish import PARQUET, fetch
from .untrusted import CLOSED, check_index, quoted

_READ = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALYZE\s+)?", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """What one query may take."""

    timeout: float = 60.0  # seconds, then it is interrupted
    max_memory: str = "2GB"  # DuckDB's memory limit for the session (no spilling to disk)
    max_rows: int = 1_000_000  # rows returned at most; the rest are cut, with a note


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple]
    cut: bool  # more rows than Limits.max_rows


def choose_index(catalog: Path | None, parquet: str | None, *, home: Path) -> tuple[Path | None, str | None, str]:
    """Which index a query reads, and a note saying so: --from, else the local catalog, else the
    downloaded catalog.parquet in `home`.

    Raises:
        QueryRefused: there is none of them.
    """
    from superweight.scanner.config import CATALOG_FILE

    if parquet is not None:
        return None, parquet, parquet
    local = catalog or home / CATALOG_FILE
    if local.is_file():
        return local, None, str(local)
    downloaded = home / PARQUET
    if catalog is None and downloaded.is_file():
        return None, str(downloaded), f"{downloaded} (no local catalog)"
    if catalog is None and PUBLISHED.is_file():
        return None, str(PUBLISHED), f"the index shipped with superweight ({_snapshot(PUBLISHED)}; no local catalog " \
                                     "and none downloaded: 'superweight download' fetches the latest)"
    raise QueryRefused(f"{local}: no index here; run 'superweight download' for the published one, or "
                       "'superweight scan' to make one, or give --from")


def _snapshot(parquet: Path) -> str:
    """How many rows a shipped index has and how old it is, from its manifest."""
    try:
        manifest = json.loads(parquet.with_suffix(".json").read_text())
        return f"{manifest['rows']} rows, built {manifest['created'][:10]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest unreadable"


def open_session(*, catalog: Path | None = None, parquet: str | None = None, ledger_url: str | None = None,
                 limits: Limits = Limits()) -> duckdb.DuckDBPyConnection:
    """A closed in-memory session with the tables `catalog` (from `catalog` or `parquet`) and `scans`.

    Raises:
        QueryRefused: the catalog or parquet cannot be read, or `limits.max_memory` is not a size.
    """
    con = duckdb.connect(config=CLOSED)
    try:
        con.execute("SET max_memory = ?", [limits.max_memory])
    except duckdb.Error:
        raise QueryRefused(f"--max-memory {limits.max_memory}: not a size DuckDB knows (e.g. 2GB, 500MB)") from None
    if parquet is not None:
        _read_parquet(con, parquet)
    elif catalog is not None:
        with attach_read_only(con, catalog, "stored"):
            con.execute("CREATE TABLE catalog AS SELECT * FROM stored.catalog")
    columns = ", ".join(f'"{c.name}" {_duck_type(c.type)}' for c in ScanRecord.__table__.columns)
    con.execute(f"CREATE TABLE scans ({columns})")
    rows = [list(r.values()) for r in read_records(ledger_url)] if ledger_url else []
    if rows:
        con.executemany(f"INSERT INTO scans VALUES ({', '.join('?' * len(rows[0]))})", rows)
    _close_to_the_outside(con)
    return con


def _close_to_the_outside(con: duckdb.DuckDBPyConnection) -> None:
    """No file, network or extension access from here on, no spilling to disk, and no way back."""
    con.execute("SET temp_directory = ''")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_query(con: duckdb.DuckDBPyConnection, sql: str, *, limits: Limits = Limits()) -> Result:
    """Column names and rows of one read-only statement, within `limits`.

    Raises:
        QueryRefused: for anything but exactly one SELECT (or EXPLAIN of one), SQL DuckDB rejects or
        cannot run within the limits.
    """
    _check_is_one_read(con, sql)
    outcome: dict = {}

    def execute() -> None:
        try:
            result = con.execute(sql)
            rows = result.fetchmany(limits.max_rows + 1)
            outcome["result"] = Result([d[0] for d in result.description], rows[: limits.max_rows],
                                       len(rows) > limits.max_rows)
        except duckdb.Error as e:
            outcome["error"] = e

    worker = threading.Thread(target=execute, name="superweight-query", daemon=True)
    worker.start()
    worker.join(limits.timeout)
    if worker.is_alive():
        con.interrupt()
        worker.join()
        raise QueryRefused(f"query: stopped after {limits.timeout:g} s; narrow it, or raise --timeout")
    error = outcome.get("error")
    if isinstance(error, duckdb.OutOfMemoryException):
        raise QueryRefused(f"query: needs more memory than --max-memory {limits.max_memory} allows; "
                           "narrow it, or raise --max-memory")
    if error is not None:
        raise QueryRefused(f"query: {first_line(error)}")
    return outcome["result"]


def check_is_one_read(sql: str) -> None:
    """Raise QueryRefused unless `sql` is exactly one SELECT, or EXPLAIN [ANALYZE] of one (before any index is read)."""
    with duckdb.connect() as parser:
        _check_is_one_read(parser, sql)


def _check_is_one_read(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryRefused unless `sql` is exactly one SELECT, or EXPLAIN [ANALYZE] of one."""
    try:
        statements = con.extract_statements(sql)
        inner = con.extract_statements(_EXPLAIN.sub("", sql, count=1)) if _is_explain(statements) else statements
    except duckdb.Error as e:
        raise QueryRefused(f"query: {first_line(e)}") from None
    if len(statements) != 1 or len(inner) != 1 or inner[0].type not in _READ:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        if len(statements) == 1 and _is_explain(statements):
            kinds = f"EXPLAIN of {', '.join(s.type.name for s in inner) or 'nothing'}"
        raise QueryRefused(f"query: only one read-only SELECT is accepted, not {kinds}")


def _is_explain(statements) -> bool:
    return len(statements) == 1 and statements[0].type == duckdb.StatementType.EXPLAIN


def _read_parquet(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """The table `catalog` from a catalog.parquet (a local file, or fetched: URL, hf://datasets/...),
    its values checked (an index from elsewhere is untrusted)."""
    try:
        if Path(source).exists():
            con.execute(f"CREATE TABLE catalog AS SELECT * FROM read_parquet('{quoted(source)}')")
        else:
            with tempfile.TemporaryDirectory(prefix="superweight-query-") as tmp:
                local = Path(tmp) / PARQUET
                fetch(source, PARQUET, local)  # the download command's fetch: paths, http(s), hf://datasets
                con.execute(f"CREATE TABLE catalog AS SELECT * FROM read_parquet('{quoted(local)}')")
    except duckdb.Error as e:
        raise QueryRefused(f"{source}: not a readable catalog.parquet ({first_line(e)})") from None
    check_index(con, "catalog", where=source)


def _duck_type(sql_type) -> str:
    if isinstance(sql_type, Integer):
        return "BIGINT"
    if isinstance(sql_type, DateTime):
        return "TIMESTAMP"
    return "VARCHAR"

