"""`superweight scan` records every attempt in the ledger and every finished scan in the catalog."""

import hashlib
import json
import pickle
import subprocess
import sys

import duckdb
import pytest
from click.testing import CliRunner

from superweight.cli import cli
from tests.checkpoints import Plant, make_checkpoint


def catalog_rows(path):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT repo_id, layer, out_channel, in_channel FROM catalog ORDER BY layer").fetchall()


def ledger(*args):
    result = CliRunner().invoke(cli, ["ledger", "--json", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_success_failure_and_refusal_are_each_recorded(tmp_path, home):
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))

    result = CliRunner().invoke(cli, ["scan", str(good), str(tmp_path / "missing"), str(pickled), "--json"])

    assert result.exit_code == 3
    scanned = json.loads(result.stdout.splitlines()[0])
    assert catalog_rows(home / "catalog.duckdb") == [(str(good), 3, 10, 20)]  # only the success
    states = {r["repo_id"]: r for r in ledger()}
    assert states[str(good)]["state"] == "succeeded"
    assert states[str(good)]["revision"] == scanned["revision"]
    assert states[str(good)]["bytes_read"] == scanned["bytes_read"] > 0
    assert states[str(tmp_path / "missing")]["state"] == "failed"
    assert "no such folder" in states[str(tmp_path / "missing")]["error"]
    assert states[str(pickled)]["state"] == "refused"
    assert "only pickle weights" in states[str(pickled)]["error"]
    assert [r["repo_id"] for r in ledger("--state", "refused")] == [str(pickled)]


def test_rescanning_replaces_and_counts_attempts(tmp_path, home):
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    for _ in range(2):
        assert CliRunner().invoke(cli, ["scan", str(good)]).exit_code == 0
    assert catalog_rows(home / "catalog.duckdb") == [(str(good), 3, 10, 20)]
    (record,) = ledger()
    assert (record["state"], record["attempts"]) == ("succeeded", 2)


def test_no_record_writes_nothing(tmp_path, home):
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    assert CliRunner().invoke(cli, ["scan", str(good), "--no-record"]).exit_code == 0
    assert not (home / "catalog.duckdb").exists() and not (home / "ledger.sqlite").exists()


def test_a_second_writer_is_told_and_the_catalog_is_kept(tmp_path, home, monkeypatch):
    monkeypatch.setattr("superweight.index.catalog.LOCK_WAIT", 1.0)
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    catalog = tmp_path / "held.duckdb"
    assert CliRunner().invoke(cli, ["scan", str(good), "--catalog", str(catalog)]).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(catalog)!r}); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(cli, ["scan", str(good), "--catalog", str(catalog)])
    finally:
        holder.communicate("", timeout=30)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {catalog}: another process has held this catalog for 1 s; wait for it or use --catalog\n"
    assert catalog_rows(catalog) == [(str(good), 3, 10, 20)]


def test_export_writes_the_parquet_and_its_manifest(tmp_path, home):
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    assert CliRunner().invoke(cli, ["scan", str(good)]).exit_code == 0
    out = tmp_path / "pub" / "catalog.parquet"

    result = CliRunner().invoke(cli, ["export", "--out", str(out)])

    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "pub" / "catalog.json").read_text())
    assert result.stdout == f"{out}: 1 rows, sha256 {manifest['sha256']}\n"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == manifest["sha256"]
    assert duckdb.sql(f"SELECT repo_id, layer, out_channel, in_channel FROM '{out}'").fetchall() == [(str(good), 3, 10, 20)]


def test_export_without_a_catalog(tmp_path, home):
    result = CliRunner().invoke(cli, ["export", "--out", str(tmp_path / "c.parquet")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {home / 'catalog.duckdb'}: no catalog yet; run 'superweight scan' first\n"


def test_query_reads_the_catalog_and_the_ledger(tmp_path, home):
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    CliRunner().invoke(cli, ["scan", str(good), str(tmp_path / "missing")])

    table = CliRunner().invoke(cli, ["query", "SELECT layer, out_channel, in_channel FROM catalog"])
    as_csv = CliRunner().invoke(cli, ["query", "SELECT repo_id, state FROM scans ORDER BY repo_id", "--csv"])
    as_json = CliRunner().invoke(cli, ["query", "SELECT count(*) AS n FROM scans WHERE state = 'failed'", "--json"])

    assert table.stdout.splitlines() == ["layer  out_channel  in_channel", "3      10           20"]
    assert as_csv.stdout == f"repo_id,state\n{good},succeeded\n{tmp_path / 'missing'},failed\n"
    assert json.loads(as_json.stdout) == {"n": 1}


def test_query_from_an_exported_parquet(tmp_path, home):
    good = make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])
    CliRunner().invoke(cli, ["scan", str(good)])
    out = tmp_path / "catalog.parquet"
    CliRunner().invoke(cli, ["export", "--out", str(out)])

    result = CliRunner().invoke(cli, ["query", "SELECT \"index\" FROM catalog", "--from", str(out), "--json"])

    assert json.loads(result.stdout) == {"index": [10, 20]}


@pytest.mark.parametrize("sql", ["DELETE FROM catalog", "CREATE TABLE x (a INT)", "SELECT 1; DROP VIEW catalog",
                                 "COPY catalog TO '/tmp/x.csv'", "ATTACH '/tmp/other.db'"])
def test_query_refuses_writes(tmp_path, home, sql):
    result = CliRunner().invoke(cli, ["query", sql])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: query: only one read-only SELECT is accepted, not ")


def test_one_folder_typed_four_ways_is_one_checkpoint(tmp_path, home, monkeypatch):
    make_checkpoint(tmp_path / "m", "llama", [Plant(3, 10, 20)])
    monkeypatch.chdir(tmp_path)
    for typed in ("m", "m/", "./m", str(tmp_path / "m")):
        assert CliRunner().invoke(cli, ["scan", typed]).exit_code == 0
    assert catalog_rows(home / "catalog.duckdb") == [(str(tmp_path / "m"), 3, 10, 20)]
    (record,) = ledger()
    assert (record["repo_id"], record["attempts"]) == (str(tmp_path / "m"), 4)
