"""The catalog: finished scans in a DuckDB file, and their export as catalog.parquet.

DuckDB lets one process at a time hold the file for writing, and while it does no other process
can open it at all. So nothing keeps the file open: each write is one short connection and one
transaction keyed by (repo_id, revision, scanner_version, artifact), and each read copies what it needs and
lets go. A writer or reader that finds the file taken waits for it (`lock_wait` seconds) instead of
failing, so queries and exports work while a scan or a crawl is writing. Re-scanning a key replaces
its rows (keeping the measured effects when a plain re-scan finds the same coordinates). A scan
that found nothing is a `scans` row with `super_weight_count = 0`; a failed scan is never written
here (the ledger records failures), and a model never scanned has no row.
"""

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from superweight.scanner.errors import first_line
from superweight.scanner.files import written_aside
from superweight.scanner.result import ScanResult
from superweight.scanner.digest import file_sha256

from .errors import CatalogLocked, CatalogTooNew, CatalogUnavailable, NonFiniteFigures
from .schema import (  # noqa: F401  (COLUMNS: re-exported)
    COLUMNS, EXPORT_ORDER, EXPORT_VERSION, KEY, KEY_WHERE, QUANT_EXPORT_ORDER, QUANT_PARQUET, QUANT_SETTING, SCAN_EFFECTS,
    SCHEMA_VERSION, TABLES, VIEW, catalog_key, quant_rows, scan_row, weight_rows,
)

logger = logging.getLogger(__name__)

# Seconds a writer or a reader waits while another process holds the file (a commit takes far less).
LOCK_WAIT = float(os.getenv("SUPERWEIGHT_LOCK_WAIT", "30"))

@dataclass(frozen=True)
class Manifest:
    """catalog.json: what a published catalog.parquet is."""

    file: str
    sha256: str
    rows: int
    schema_version: int
    created: str  # ISO 8601, UTC


class Catalog:
    """A catalog database file, written by short transactions or read; no connection is held between calls.

    Args:
        path: the DuckDB file; created with the schema when missing (writers only).
        read_only: only read (and never create or upgrade) the file.
        lock_wait: seconds to wait while another process holds the file.
    """

    def __init__(self, path: Path, *, read_only: bool = False, lock_wait: float | None = None):
        self.path, self.read_only = Path(path), read_only
        self.lock_wait = LOCK_WAIT if lock_wait is None else lock_wait
        if read_only:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CatalogUnavailable(f"{self.path.parent}: cannot create the catalog's folder ({e.strerror}); "
                                     "set SUPERWEIGHT_HOME or --catalog to a writable place") from None
        with self.connect() as con:
            self._create_or_upgrade(con)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short connection (read-only for a read-only catalog), closed when the block ends."""
        con = connect(self.path, read_only=self.read_only, wait=self.lock_wait)
        try:
            yield con
        finally:
            con.close()

    def fetch(self, sql: str, params: list | None = None) -> list[tuple]:
        """All rows of one statement, on a short connection."""
        with self.connect() as con:
            return con.execute(sql, params or []).fetchall()

    def fetch_dicts(self, sql: str, params: list | None = None) -> list[dict]:
        """All rows of one statement as dicts by column name."""
        with self.connect() as con:
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def _create_or_upgrade(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the schema, or bring an older file's up to this version, in one transaction."""
        version = _schema_version(con)
        if version is not None and version > SCHEMA_VERSION:
            raise CatalogTooNew(f"{self.path}: catalog schema {version} is newer than this superweight's "
                                f"({SCHEMA_VERSION}); upgrade superweight or use another --catalog")
        with _transaction(con, self.path):
            if version is not None and version < SCHEMA_VERSION:
                _rebuild(con, version)
            else:
                con.execute(TABLES)
            con.execute(VIEW)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def close(self) -> None:
        """Nothing to close (no connection is held); kept so a Catalog is a context manager."""

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has_scan(self, repo_id: str, revision: str, scanner_version: str, artifact: str = "", *,
                 verified: bool = False) -> bool:
        """Whether this catalog holds the finished scan of the key (with its effects measured, if `verified`)."""
        where = " AND (eval_tokens IS NOT NULL OR super_weight_count = 0)" if verified else ""
        key = catalog_key(repo_id, revision, scanner_version, artifact)
        return self.fetch(f"SELECT count(*) FROM scans WHERE {KEY_WHERE}{where}", _params(key))[0][0] > 0

    def record_scan(self, result: ScanResult, *, scanned_at: datetime | None = None) -> str | None:
        """Write one finished scan, replacing its key's rows.

        `scanned_at` defaults to the result's own, then to now (UTC). The effect columns are filled
        when the scan was verified. A scan that was not verified keeps the effects the key's
        earlier scan measured when it found the same coordinates.

        Returns:
            A note when earlier measured effects were kept or dropped, else None.
        """
        _check_finite(result)
        key = catalog_key(result.name, result.revision, result.scanner_version, result.artifact)
        scan, weights = scan_row(result, key, scanned_at), weight_rows(result, key)
        quant = quant_rows(result, key, scan["scanned_at"])  # measured in the same scan
        with self.connect() as con, _transaction(con, self.path):
            note = _keep_effects(con, key, scan, weights) if result.verification is None else None
            _replace(con, key, scan, weights)
            replaced = _replace_figures(con, key, quant)
        if note:
            logger.warning("%s@%s: %s", key["repo_id"], key["revision"][:12], note)
        if replaced:
            logger.info("%s@%s: replaced %d quantization figure(s) measured earlier with the same settings",
                        key["repo_id"], key["revision"][:12], replaced)
        return note

    def record_literature(self, models: dict[str, list[dict]]) -> None:
        """Write published coordinates (see index.literature) as `source = 'literature'` rows."""
        from .literature import LITERATURE_VERSION

        with self.connect() as con, _transaction(con, self.path):
            for repo_id, weights in models.items():
                key = catalog_key(repo_id, "", LITERATURE_VERSION)
                scan = {**key, "source": "literature", "super_weight_count": len(weights)}
                neurons = list(dict.fromkeys((w["layer"], w["expert"], w["in_channel"]) for w in weights))
                activations = list(dict.fromkeys(w["out_channel"] for w in weights))
                rows = [{**key, "ordinal": i, "layer": w["layer"], "expert": w["expert"],
                         "out_channel": w["out_channel"], "in_channel": w["in_channel"],
                         "index": [w["out_channel"], w["in_channel"]], "note": w["note"],
                         "super_neuron": neurons.index((w["layer"], w["expert"], w["in_channel"])),
                         "super_activation": activations.index(w["out_channel"]), "verdict": "unverified"}
                        for i, w in enumerate(weights)]
                _replace(con, key, scan, rows)

    def export(self, out: Path) -> Manifest:
        """Write catalog.parquet (zstd, stable row order) and catalog.json beside it, each atomically.

        Each file is written aside and renamed into place, so a reader sees the old export or the
        new one, never half of one; the manifest is renamed last. A failed export leaves nothing.
        """
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with written_aside(out) as tmp, self.connect() as con:
                _copy_parquet(con, f"SELECT * FROM catalog ORDER BY {EXPORT_ORDER}", tmp)
                rows = con.execute("SELECT count(*) FROM catalog").fetchone()[0]
                manifest = Manifest(out.name, file_sha256(tmp), rows, EXPORT_VERSION,
                                    datetime.now(UTC).isoformat(timespec="seconds"))
            self._export_quantization(out.with_name(QUANT_PARQUET))
            with written_aside(out.with_suffix(".json")) as tmp:
                tmp.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
        except (OSError, duckdb.IOException) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            raise CatalogUnavailable(f"{out}: cannot write the export ({reason})") from None
        return manifest

    def _export_quantization(self, out: Path) -> None:
        """quantization.parquet beside the export, when the catalog holds quantization figures."""
        with self.connect() as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'quantization'"
                               ).fetchone()[0]:
                return  # a catalog written before the table existed, opened read-only
            if not con.execute("SELECT count(*) FROM quantization").fetchone()[0]:
                return
            with written_aside(out) as tmp:
                _copy_parquet(con, "SELECT * REPLACE (NULLIF(artifact, '') AS artifact) FROM quantization "
                                   f"ORDER BY {QUANT_EXPORT_ORDER}", tmp)


def _copy_parquet(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    """Write the rows of `query` to `path` as zstd Parquet, byte for byte the same for the same rows."""
    con.execute("SET threads = 1")  # one writer thread: the same catalog gives the same bytes
    escaped = str(path).replace("'", "''")
    con.execute(f"COPY ({query}) TO '{escaped}' (FORMAT parquet, COMPRESSION zstd)")


def connect(path: Path, *, read_only: bool, wait: float) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to the catalog file, waiting up to `wait` seconds while another process holds it.

    Raises:
        CatalogLocked: still held after `wait` seconds.
        CatalogUnavailable: not a DuckDB catalog, or not readable.
    """
    deadline, delay = time.monotonic() + wait, 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as e:
            if isinstance(e, duckdb.IOException) and "lock" in str(e).lower():
                if time.monotonic() + delay > deadline:
                    raise CatalogLocked(f"{path}: another process has held this catalog for {wait:g} s; "
                                        "wait for it or use --catalog") from None
            elif path.exists() and not _is_duckdb(path):
                raise CatalogUnavailable(f"{path}: not a readable catalog ({first_line(e)}); move it aside, "
                                         "and rescan or run superweight download") from None
            else:  # a read-only or full disk, no permission
                raise CatalogUnavailable(f"{path}: cannot open the catalog ({first_line(e)}); set SUPERWEIGHT_HOME "
                                         "or --catalog to a writable place") from None
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


@contextmanager
def attach_read_only(con: duckdb.DuckDBPyConnection, path: Path, alias: str, *,
                     wait: float | None = None) -> Iterator[None]:
    """Attach the catalog file read-only to `con` as `alias` for the block, waiting while a writer holds it."""
    wait = LOCK_WAIT if wait is None else wait
    deadline, delay = time.monotonic() + wait, 0.05
    quoted = str(path).replace("'", "''")
    while True:
        try:
            con.execute(f"ATTACH '{quoted}' AS {alias} (READ_ONLY)")
            break
        except duckdb.Error as e:
            if not isinstance(e, duckdb.IOException) or "lock" not in str(e).lower():
                raise CatalogUnavailable(f"{path}: not a readable catalog ({first_line(e)})") from None
            if time.monotonic() + delay > deadline:
                raise CatalogLocked(f"{path}: another process has held this catalog for {wait:g} s") from None
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
    try:
        yield
    finally:
        con.execute(f"DETACH {alias}")


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection, path: Path) -> Iterator[None]:
    """One transaction; a failure (a full disk, say) rolls it back and is one CatalogUnavailable line."""
    con.begin()
    try:
        yield
        con.commit()
    except duckdb.Error as e:
        try:
            con.rollback()
        except duckdb.Error:
            pass  # the failed commit has ended the transaction already
        raise CatalogUnavailable(f"{path}: cannot write the catalog ({first_line(e)}); nothing was changed") from None
    except BaseException:
        con.rollback()
        raise


def _is_duckdb(path: Path) -> bool:
    """Whether the file starts like a DuckDB database (its magic bytes "DUCK" at offset 8)."""
    try:
        with open(path, "rb") as f:
            return f.read(12)[8:12] == b"DUCK"
    except OSError:
        return True  # unreadable: say so as a disk problem, not as a bad file


_TABLES = ("scans", "super_weights", "quantization")


def _rebuild(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Bring the tables of an older schema to this one's, inside the caller's transaction.

    Each table is created anew (columns, defaults and keys as a new file has them) and its rows are
    copied by column name; a column the old file lacks is left NULL. Schema 4 put `artifact` in the
    key: the old rows take '' (the repo's own weights) or their scan's artifact.
    """
    con.execute("DROP VIEW IF EXISTS catalog")
    names = con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()
    old = {name for (name,) in names if name in _TABLES}
    for table in old:
        con.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    con.execute(TABLES)
    if "scans" in old:
        con.execute("ALTER TABLE scans_old ADD COLUMN IF NOT EXISTS artifact VARCHAR")
        con.execute("INSERT INTO scans BY NAME SELECT * REPLACE (coalesce(artifact, '') AS artifact) FROM scans_old")
    for table in old - {"scans"}:  # a scan's rows of another table take its artifact
        con.execute(f"INSERT INTO {table} BY NAME SELECT t.*, s.artifact FROM {table}_old t "
                    "JOIN scans s USING (repo_id, revision, scanner_version)")
    for table in old:
        con.execute(f"DROP TABLE {table}_old")
    if version < 3:  # nothing before schema 3 carried a verdict
        con.execute("UPDATE super_weights SET verdict = 'unverified' WHERE verdict IS NULL")


def _schema_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The schema version recorded in the file, or None for a new file."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta'").fetchone()[0]:
        return None
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


# What --verify measures, per scan and per super weight: kept by a plain re-scan of the same coordinates.
_WEIGHT_EFFECTS = ("verdict", "ppl_ratio", "kl", "expected_prob", "stopword_share", "control_ppl_ratio",
                   "control_kl", "group_ppl_ratio", "group_control_ppl_ratio")
_COORDINATES = ("layer", "expert", "out_channel", "in_channel")


def _keep_effects(con: duckdb.DuckDBPyConnection, key: dict, scan: dict, weights: list[dict]) -> str | None:
    """Carry the key's measured effects over to an unverified re-scan that found the same coordinates.

    Returns:
        What happened to earlier effects, or None when there were none.
    """
    where = f"WHERE {KEY_WHERE}"
    old = con.execute(f"SELECT {', '.join(SCAN_EFFECTS)} FROM scans {where}", _params(key)).fetchone()
    if old is None or old[0] is None:
        return None
    columns = ", ".join(_COORDINATES + _WEIGHT_EFFECTS)
    old_weights = con.execute(f"SELECT {columns} FROM super_weights {where} ORDER BY ordinal", _params(key)).fetchall()
    if [row[:4] for row in old_weights] != [tuple(w[c] for c in _COORDINATES) for w in weights]:
        return "replaced a verified scan whose coordinates differ; its effects are gone (rescan with --verify)"
    scan.update(zip(SCAN_EFFECTS, old))
    for w, row in zip(weights, old_weights):
        w.update(zip(_WEIGHT_EFFECTS, row[4:]))
    return "kept the effects measured by the earlier verified scan (same coordinates)"


def _replace(con: duckdb.DuckDBPyConnection, key: dict, scan: dict, weights: list[dict]) -> None:
    """Delete `key`'s rows and insert the new ones (columns by name), inside the caller's transaction."""
    for table in ("super_weights", "scans"):
        _delete(con, table, key)
    for table, rows in (("scans", [scan]), ("super_weights", weights)):
        _insert(con, table, rows)


def _replace_figures(con: duckdb.DuckDBPyConnection, key: dict, rows: list[dict]) -> int:
    """Write quantization rows, each replacing only the key's row of the same setting (QUANT_SETTING):
    figures of other settings stay, so `quantize --bits 8` then `--bits 4` keeps both. Returns how many
    earlier rows were replaced."""
    same = " AND ".join(f"{name} IS NOT DISTINCT FROM ?" for name in QUANT_SETTING)
    replaced = 0
    for row in rows:
        params = _params(key) + [row[name] for name in QUANT_SETTING]
        replaced += con.execute(f"DELETE FROM quantization WHERE {KEY_WHERE} AND {same}", params).fetchone()[0]
    _insert(con, "quantization", rows)
    return replaced


def _delete(con: duckdb.DuckDBPyConnection, table: str, key: dict) -> None:
    """Delete `key`'s rows of `table`, inside the caller's transaction."""
    con.execute(f"DELETE FROM {table} WHERE {KEY_WHERE}", _params(key))


def _params(key: dict) -> list:
    """The parameters of KEY_WHERE for `key`."""
    return [key[name] for name in KEY]


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict]) -> None:
    """Insert rows (columns by name) inside the caller's transaction."""
    for row in rows:
        names = ", ".join(f'"{name}"' for name in row)
        con.execute(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def _check_finite(result: ScanResult) -> None:
    """Raise NonFiniteFigures for a NaN or infinite number anywhere in a scan result: never a row."""
    def walk(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteFigures(f"{result.name}: {where} is {value}; a scan with non-finite figures is not recorded")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
    walk(result.to_json(), "")

