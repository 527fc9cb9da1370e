"""End to end through the index: scan -> catalog -> export -> download -> query, and a crash."""

import json
import subprocess
import sys

from click.testing import CliRunner

from superweight.index.catalog import Catalog
from superweight.cli import cli
from tests.checkpoints import Plant, make_checkpoint


def test_scan_export_download_query(tmp_path, monkeypatch):
    monkeypatch.setattr("superweight.cli.SUPERWEIGHT_HOME", tmp_path / "home")
    monkeypatch.delenv("SUPERWEIGHT_LEDGER_URL", raising=False)
    model = make_checkpoint(tmp_path / "model", "mistral", [Plant(2, 10, 20), Plant(5, 7, 99)])
    run = CliRunner().invoke

    assert run(cli, ["scan", str(model)]).exit_code == 0
    assert run(cli, ["export", "--out", str(tmp_path / "pub" / "catalog.parquet")]).exit_code == 0
    assert run(cli, ["download", str(tmp_path / "pub")]).exit_code == 0
    result = run(cli, ["query", "SELECT layer, out_channel, in_channel, source FROM catalog ORDER BY layer",
                       "--from", str(tmp_path / "home" / "catalog.parquet"), "--json"])

    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"layer": 2, "out_channel": 10, "in_channel": 20, "source": "scan"},
        {"layer": 5, "out_channel": 7, "in_channel": 99, "source": "scan"},
    ]


def test_a_crash_after_the_commit_leaves_a_consistent_catalog(tmp_path):
    """A writer killed right after committing a scan: the scan is there, whole, and exports."""
    model = make_checkpoint(tmp_path / "model", "llama", [Plant(3, 10, 20)])
    catalog = tmp_path / "c.duckdb"
    published = tmp_path / "pub" / "catalog.parquet"
    with Catalog(catalog) as c:
        c.export(published)  # an earlier, empty export
    before = published.read_bytes()
    crash = ("import os, sys; from superweight.index.catalog import Catalog; from superweight.scanner.scan import scan; "
             f"c = Catalog({str(catalog)!r}); c.record_scan(scan({str(model)!r})); os._exit(137)")

    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=300)

    assert done.returncode == 137, done.stderr
    assert published.read_bytes() == before  # the crash never touched the published file
    with Catalog(catalog) as c:
        rows = c.fetch("SELECT layer, out_channel, in_channel FROM catalog")
        count = c.fetch("SELECT super_weight_count FROM scans")
        manifest = c.export(published)
    assert rows == [(3, 10, 20)] and count == [(1,)]
    assert manifest.rows == 1
