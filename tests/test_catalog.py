"""The DuckDB catalog: one transaction per scan keyed by (repo, revision, scanner version), and export."""

import json
import subprocess
import sys
from datetime import datetime

import duckdb
import pytest

from index.catalog import SCHEMA_VERSION, Catalog
from index.errors import CatalogLocked
from scanner.scan import scan_source
from tests.checkpoints import Plant, make_checkpoint

WHEN = datetime(2026, 11, 23, 12, 0, 0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Real scan results: one with two super weights, one with none."""
    root = tmp_path_factory.mktemp("ckpts")
    two = scan_source(str(make_checkpoint(root / "two", "llama", [Plant(2, 10, 20), Plant(5, 7, 99)])))
    none = scan_source(str(make_checkpoint(root / "none", "gpt2", [])))
    return two, none


def rows(catalog, sql="SELECT repo_id, layer, out_channel, in_channel, source FROM catalog ORDER BY repo_id, layer"):
    return catalog.con.execute(sql).fetchall()


def test_scans_with_and_without_super_weights(tmp_path, results):
    two, none = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(two, scanned_at=WHEN)
        catalog.record_scan(none, scanned_at=WHEN)
        got = rows(catalog)
        counts = catalog.con.execute("SELECT repo_id, super_weight_count FROM scans ORDER BY repo_id").fetchall()
    assert got == sorted([(two["source"], 2, 10, 20, "scan"), (two["source"], 5, 7, 99, "scan"),
                          (none["source"], None, None, None, "scan")], key=lambda r: (r[0], r[1] or -1))
    assert dict(counts) == {two["source"]: 2, none["source"]: 0}  # "none found" is a row, not an absence


def test_rescanning_a_key_replaces_its_rows(tmp_path, results):
    two, _ = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(two, scanned_at=WHEN)
        catalog.record_scan(two, scanned_at=WHEN)
        assert len(rows(catalog)) == 2
        catalog.record_scan({**two, "scanner_version": "9.9"}, scanned_at=WHEN)
        assert len(rows(catalog)) == 4  # another scanner version is another key


def test_a_failed_write_leaves_the_old_rows(tmp_path, results):
    two, _ = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(two, scanned_at=WHEN)
        broken = {**two, "super_weights": [{**two["super_weights"][0], "layer": None}]}  # violates NOT NULL
        with pytest.raises(duckdb.ConstraintException):
            catalog.record_scan(broken, scanned_at=WHEN)
        assert len(rows(catalog)) == 2


def test_export_is_deterministic_with_a_manifest(tmp_path, results):
    two, none = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(none, scanned_at=WHEN)
        catalog.record_scan(two, scanned_at=WHEN)
        first = catalog.export(tmp_path / "a" / "catalog.parquet")
        again = catalog.export(tmp_path / "b" / "catalog.parquet")
    assert first.sha256 == again.sha256 and first.rows == 3
    manifest = json.loads((tmp_path / "a" / "catalog.json").read_text())
    assert manifest["sha256"] == first.sha256 and manifest["schema_version"] == SCHEMA_VERSION
    exported = duckdb.sql(f"SELECT repo_id, layer, \"index\" FROM '{tmp_path / 'a' / 'catalog.parquet'}'").fetchall()
    assert exported == [(none["source"], None, None), (two["source"], 2, [10, 20]), (two["source"], 5, [7, 99])]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["catalog.json", "catalog.parquet"]


def test_a_second_writer_gets_a_clear_message(tmp_path):
    path = tmp_path / "c.duckdb"
    Catalog(path).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(path)!r}); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CatalogLocked, match="another process is writing this catalog"):
            Catalog(path)
    finally:
        holder.communicate("", timeout=30)
