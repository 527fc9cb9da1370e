"""The DuckDB catalog: one transaction per scan keyed by (repo, revision, scanner version), and export."""

import copy
import dataclasses
import json
import subprocess
import sys
from datetime import datetime

import duckdb
import pytest

from superweight.index.catalog import EXPORT_VERSION, SCHEMA_VERSION, Catalog
from superweight.index.errors import CatalogLocked, CatalogTooNew, CatalogUnavailable
from superweight.index.literature import read_literature
from superweight.scanner.scan import scan
from tests.checkpoints import Plant, make_checkpoint

WHEN = datetime(2026, 11, 23, 12, 0, 0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Real scan results: one with two super weights, one with none."""
    root = tmp_path_factory.mktemp("ckpts")
    two = scan(str(make_checkpoint(root / "two", "llama", [Plant(2, 10, 20), Plant(5, 7, 99)])))
    none = scan(str(make_checkpoint(root / "none", "gpt2", [])))
    return two, none


def rows(catalog, sql="SELECT repo_id, layer, out_channel, in_channel, source FROM catalog ORDER BY repo_id, layer"):
    return catalog.fetch(sql)


def test_scans_with_and_without_super_weights(tmp_path, results):
    two, none = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(two, scanned_at=WHEN)
        catalog.record_scan(none, scanned_at=WHEN)
        got = rows(catalog)
        counts = catalog.fetch("SELECT repo_id, super_weight_count FROM scans ORDER BY repo_id")
    assert got == sorted([(two.source, 2, 10, 20, "scan"), (two.source, 5, 7, 99, "scan"),
                          (none.source, None, None, None, "scan")], key=lambda r: (r[0], r[1] or -1))
    assert dict(counts) == {two.source: 2, none.source: 0}  # "none found" is a row, not an absence


def test_rescanning_a_key_replaces_its_rows(tmp_path, results):
    two, _ = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(two, scanned_at=WHEN)
        catalog.record_scan(two, scanned_at=WHEN)
        assert len(rows(catalog)) == 2
        catalog.record_scan(dataclasses.replace(two, scanner_version="9.9"), scanned_at=WHEN)
        assert len(rows(catalog)) == 4  # another scanner version is another key


def test_a_failed_write_leaves_the_old_rows(tmp_path, results):
    two, _ = results
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(two, scanned_at=WHEN)
        broken = copy.deepcopy(two)
        broken.super_weights[0].layer = None  # violates NOT NULL
        with pytest.raises(CatalogUnavailable, match=r"NOT NULL constraint failed: super_weights.layer\); nothing was changed"):
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
    assert manifest["sha256"] == first.sha256 and manifest["schema_version"] == EXPORT_VERSION
    exported = duckdb.sql(f"SELECT repo_id, layer, \"index\" FROM '{tmp_path / 'a' / 'catalog.parquet'}'").fetchall()
    assert exported == [(none.source, None, None), (two.source, 2, [10, 20]), (two.source, 5, [7, 99])]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["catalog.json", "catalog.parquet"]


def test_a_writer_waits_for_a_process_holding_the_file_and_then_gives_up_clearly(tmp_path):
    path = tmp_path / "c.duckdb"
    Catalog(path).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(path)!r}); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CatalogLocked, match="another process has held this catalog for 0.5 s"):
            Catalog(path, lock_wait=0.5)
    finally:
        holder.communicate("", timeout=30)
    Catalog(path, lock_wait=0.5).record_literature({})  # released: it writes again


# The version 1 schema, as released: a catalog written by an older superweight.
_V1 = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE scans (repo_id VARCHAR NOT NULL, revision VARCHAR NOT NULL, scanner_version VARCHAR NOT NULL,
    source VARCHAR NOT NULL, model_type VARCHAR, num_layers INTEGER, dtype VARCHAR, scanned_at TIMESTAMP,
    super_weight_count INTEGER NOT NULL, PRIMARY KEY (repo_id, revision, scanner_version));
CREATE TABLE super_weights (repo_id VARCHAR NOT NULL, revision VARCHAR NOT NULL, scanner_version VARCHAR NOT NULL,
    ordinal INTEGER NOT NULL, layer INTEGER NOT NULL, expert INTEGER, tensor VARCHAR, out_channel INTEGER NOT NULL,
    in_channel INTEGER NOT NULL, "index" INTEGER[], weight DOUBLE, input_activation DOUBLE, output_activation DOUBLE,
    spike_ratio DOUBLE, note VARCHAR, PRIMARY KEY (repo_id, revision, scanner_version, ordinal));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO scans VALUES ('old/model', 'abc', '0.1.0', 'scan', 'llama', 8, 'float32', '2026-11-01 00:00:00', 1);
INSERT INTO super_weights VALUES ('old/model', 'abc', '0.1.0', 0, 2, NULL, 'model.layers.2.mlp.down_proj.weight',
    10, 20, [10, 20], 2.5, 30.0, 75.0, 400.0, NULL);
"""


def upgraded(path, old_schema: str) -> Catalog:
    """A catalog file written by an older superweight (`old_schema`: its SQL), opened by this one."""
    con = duckdb.connect(str(path))
    con.execute(old_schema)
    con.close()
    catalog = Catalog(path)
    assert catalog.fetch("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    return catalog


def test_a_version_1_catalog_is_upgraded_in_place_keeping_its_rows(tmp_path, results):
    with upgraded(tmp_path / "c.duckdb", _V1) as catalog:
        assert rows(catalog, "SELECT repo_id, layer, out_channel, in_channel, ppl_ratio, hf_tensor, verdict "
                             "FROM catalog") == [("old/model", 2, 10, 20, None, None, "unverified")]
        catalog.record_scan(results[0], scanned_at=WHEN)  # a new scan goes in beside it
        assert len(rows(catalog)) == 3
        catalog.export(tmp_path / "c.parquet")
    exported = duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'c.parquet'}' WHERE ppl_ratio IS NULL").fetchall()
    assert exported == [(3,)]


# A schema-3 catalog as superweight 3 left it: `artifact` outside the key, a quantization table.
_V3 = """
CREATE TABLE meta("key" VARCHAR PRIMARY KEY, "value" VARCHAR NOT NULL);
CREATE TABLE quantization(repo_id VARCHAR NOT NULL, revision VARCHAR NOT NULL, scanner_version VARCHAR NOT NULL,
    variant VARCHAR NOT NULL, bits INTEGER NOT NULL, block_size BIGINT, group_size INTEGER, z DOUBLE, ppl DOUBLE,
    ppl_ratio DOUBLE, base_ppl DOUBLE NOT NULL, eval_tokens INTEGER NOT NULL, measured_at TIMESTAMP);
CREATE TABLE scans(repo_id VARCHAR, revision VARCHAR, scanner_version VARCHAR, "source" VARCHAR NOT NULL,
    model_type VARCHAR, num_layers INTEGER, dtype VARCHAR, scanned_at TIMESTAMP, super_weight_count INTEGER NOT NULL,
    eval_tokens INTEGER, base_ppl DOUBLE, joint_ppl_ratio DOUBLE, base_expected_prob DOUBLE, base_stopword_share DOUBLE,
    artifact VARCHAR, PRIMARY KEY(repo_id, revision, scanner_version));
CREATE TABLE super_weights(repo_id VARCHAR, revision VARCHAR, scanner_version VARCHAR, ordinal INTEGER,
    layer INTEGER NOT NULL, expert INTEGER, tensor VARCHAR, out_channel INTEGER NOT NULL, in_channel INTEGER NOT NULL,
    "index" INTEGER[], weight DOUBLE, input_activation DOUBLE, output_activation DOUBLE, spike_ratio DOUBLE,
    note VARCHAR, hf_tensor VARCHAR, hf_index INTEGER[], ppl_ratio DOUBLE, kl DOUBLE, expected_prob DOUBLE,
    stopword_share DOUBLE, control_ppl_ratio DOUBLE, control_kl DOUBLE, masked BOOLEAN, super_neuron INTEGER,
    super_activation INTEGER, super_activation_value DOUBLE, group_ppl_ratio DOUBLE, group_control_ppl_ratio DOUBLE,
    verdict VARCHAR, PRIMARY KEY(repo_id, revision, scanner_version, ordinal));
INSERT INTO meta VALUES ('schema_version', '3');
INSERT INTO scans (repo_id, revision, scanner_version, source, super_weight_count, base_ppl, artifact) VALUES
    ('old/model', 'abc', '0.3.0', 'scan', 1, 9.5, NULL),
    ('example/gguf', 'def', '0.3.0', 'scan', 1, NULL, 'a.gguf from a package');
INSERT INTO super_weights (repo_id, revision, scanner_version, ordinal, layer, out_channel, in_channel, ppl_ratio,
    verdict) VALUES ('old/model', 'abc', '0.3.0', 0, 2, 10, 20, 30.0, 'super'),
    ('example/gguf', 'def', '0.3.0', 0, 4, 5, 6, NULL, 'unverified');
INSERT INTO quantization VALUES ('old/model', 'abc', '0.3.0', 'rtn', 4, NULL, 128, NULL, 12.0, 1.26, 9.5, 256,
    '2026-11-01 00:00:00');
"""


def test_a_version_3_catalog_is_rebuilt_with_the_artifact_in_its_key(tmp_path, results):
    with upgraded(tmp_path / "c.duckdb", _V3) as catalog:
        assert rows(catalog, "SELECT repo_id, artifact, layer, ppl_ratio, verdict, base_ppl FROM catalog "
                             "ORDER BY repo_id") == [("example/gguf", "a.gguf from a package", 4, None, "unverified", None),
                                                     ("old/model", None, 2, 30.0, "super", 9.5)]
        assert rows(catalog, "SELECT repo_id, artifact, variant, group_size FROM quantization") == [
            ("old/model", "", "rtn", 128)]
        two = results[0]
        for artifact in ("m-Q8_0.gguf", "m-F16.gguf", None):  # one repo and commit, three scans
            catalog.record_scan(dataclasses.replace(two, artifact=artifact), scanned_at=WHEN)
        catalog.record_scan(dataclasses.replace(two, artifact="m-F16.gguf"), scanned_at=WHEN)  # replaces its own
        scans = rows(catalog, f"SELECT artifact, count(*) FROM catalog WHERE repo_id = '{two.name}' GROUP BY ALL "
                              "ORDER BY artifact NULLS FIRST")
        catalog.export(tmp_path / "c.parquet")
    assert scans == [(None, 2), ("m-F16.gguf", 2), ("m-Q8_0.gguf", 2)]
    quant = duckdb.sql(f"SELECT repo_id, artifact FROM '{tmp_path / 'quantization.parquet'}'").fetchall()
    assert quant == [("old/model", None)]  # NULL again outside the tables, as in catalog.parquet


def test_a_catalog_from_a_newer_superweight_is_refused_untouched(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.fetch("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    with pytest.raises(CatalogTooNew, match=f"catalog schema {SCHEMA_VERSION + 1} is newer"):
        Catalog(tmp_path / "c.duckdb")
    con = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    assert con.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION + 1),)
    con.close()


def test_super_activations_and_neurons_are_one_query_away(tmp_path, results):
    """How many distinct super activations a model has, and how large: one SQL query over the catalog."""
    from superweight.index.query import open_session, run_query

    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(results[0], scanned_at=WHEN)
        catalog.record_literature(read_literature())
    con = open_session(catalog=tmp_path / "c.duckdb")
    rows = run_query(con, "SELECT repo_id, count(DISTINCT super_activation), count(DISTINCT super_neuron), "
                             "max(abs(super_activation_value)) FROM catalog GROUP BY repo_id ORDER BY repo_id").rows
    counts = {repo: (activations, neurons, largest) for repo, activations, neurons, largest in rows}
    two = results[0]
    assert counts[two.source][:2] == (2, 2)  # rows 10 and 7, columns 20 and 99
    assert counts[two.source][2] == max(abs(a.value) for a in two.super_activations) > 1000
    assert counts["allenai/OLMo-7B-0724-hf"][:2] == (1, 4)  # row 269 in four layers
    assert counts["microsoft/Phi-3-mini-4k-instruct"][:2] == (4, 2)  # rows 525, 1113, 1693, 2046; columns 808, 2723
    assert counts["allenai/OLMo-7B-0724-hf"][2] is None  # published coordinates carry no measured value


def test_the_catalog_view_has_the_documented_columns_in_order(tmp_path):
    from superweight.index.catalog import COLUMNS

    with Catalog(tmp_path / "c.duckdb") as catalog, catalog.connect() as con:
        names = [d[0] for d in con.execute("SELECT * FROM catalog LIMIT 0").description]
    assert names == list(COLUMNS)
