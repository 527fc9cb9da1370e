"""The index on broken disks and broken files: one line each, nothing already recorded lost, nothing left behind.

Full and read-only disks are real small file systems (the `small_disk` fixture mounts a tmpfs).
"""

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from superweight.index.catalog import Catalog
from superweight.index.errors import LedgerUnavailable
from superweight.index.ledger import Ledger, default_url
from superweight.index.literature import read_literature
from superweight.cli import cli
from tests.checkpoints import Plant, make_checkpoint
from tests.test_errors import assert_one_line_error


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "good", "llama", [Plant(3, 10, 20)])


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def rows(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT repo_id, layer FROM catalog ORDER BY repo_id").fetchall()


# -- broken files ---------------------------------------------------------------------------------

def test_a_corrupt_catalog_is_one_line_for_every_command(home, good, tmp_path):
    home.mkdir()
    (home / "catalog.duckdb").write_bytes(b"this is not a DuckDB database" * 100)
    for args in (["scan", good], ["query", "SELECT 1 FROM catalog"], ["export", "--out", tmp_path / "x.parquet"]):
        assert_one_line_error(invoke(*args), str(home / "catalog.duckdb"), "not a readable catalog")
    assert not (tmp_path / "x.parquet").exists()


def test_a_corrupt_ledger_is_one_line(home, good):
    home.mkdir()
    (home / "ledger.sqlite").write_bytes(b"this is not a SQLite database" * 100)
    for args in (["scan", good], ["ledger"], ["query", "SELECT 1"]):
        assert_one_line_error(invoke(*args), "ledger.sqlite", "cannot")


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://user@host/db", "postgresql+psycopg://user:secret@127.0.0.1:9/db"])
def test_a_bad_ledger_url_is_one_line_without_its_password(home, good, monkeypatch, url):
    monkeypatch.setenv("SUPERWEIGHT_LEDGER_URL", url)
    result = invoke("scan", good)
    assert_one_line_error(result, "ledger")
    assert "secret" not in result.output


# -- read-only and full disks ---------------------------------------------------------------------

def test_a_read_only_home_is_one_line_for_writers_and_readable_for_readers(good, small_disk, monkeypatch, tmp_path):
    seed = tmp_path / "seed"
    monkeypatch.setattr("superweight.cli.SUPERWEIGHT_HOME", seed)
    assert invoke("scan", good).exit_code == 0  # a catalog and a ledger, made where it can write
    files = {name: (seed / name).read_bytes() for name in ("catalog.duckdb", "ledger.sqlite")}
    home = small_disk("home", "64m", read_only=True, files=files)
    monkeypatch.setattr("superweight.cli.SUPERWEIGHT_HOME", home)

    assert_one_line_error(invoke("scan", good), str(home), "Read-only file system")
    query = invoke("query", "SELECT layer FROM catalog", "--json")
    assert query.exit_code == 0, query.output
    assert query.stdout == '{"layer": 3}\n'
    ledger = invoke("ledger", "--json")
    assert ledger.exit_code == 0, ledger.output
    assert '"state": "succeeded"' in ledger.stdout
    writer = Ledger(default_url(home))  # opens (already migrated: nothing to write), then cannot write
    with pytest.raises(LedgerUnavailable) as caught:
        writer.start("org/model", "main", "0.0.1", worker="w")
    assert str(caught.value) == (f"sqlite:///{home / 'ledger.sqlite'}: cannot write the ledger (attempt to write a "
                                 "readonly database); set SUPERWEIGHT_HOME or SUPERWEIGHT_LEDGER_URL to one it can write")
    writer.close()


def test_a_full_disk_while_recording_is_one_line_and_loses_nothing(good, small_disk, monkeypatch, tmp_path):
    home = small_disk("home", "3m")
    monkeypatch.setattr("superweight.cli.SUPERWEIGHT_HOME", home)
    with Catalog(home / "catalog.duckdb") as catalog:
        catalog.record_literature(read_literature())
    before = rows(home / "catalog.duckdb")
    filler = home / "filler"
    with open(filler, "wb") as f:  # take every byte that is left
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass

    result = invoke("scan", good)

    assert_one_line_error(result, "No space left on device")
    filler.unlink()
    assert rows(home / "catalog.duckdb") == before


def test_export_into_a_read_only_folder_is_one_line(home, good, small_disk):
    assert invoke("scan", good).exit_code == 0
    target = small_disk("site", read_only=True)
    assert_one_line_error(invoke("export", "--out", target / "catalog.parquet"), str(target), "Read-only file system")


def test_plot_to_an_unwritable_path_is_one_line(good, small_disk):
    target = small_disk("figures", read_only=True)
    result = invoke("plot", good, "--out", target / "f.png")
    assert_one_line_error(result, str(target / "f.png"), "cannot write")


# -- what failures leave behind -------------------------------------------------------------------

def test_a_killed_export_leaves_nothing_once_the_next_one_runs(home, good, tmp_path):
    assert invoke("scan", good).exit_code == 0
    out = tmp_path / "out" / "catalog.parquet"
    out.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out.with_name(f".catalog.parquet.{dead.stdout.strip()}.tmp")  # what a killed export left
    stale.write_bytes(b"\0" * 1000)

    assert invoke("export", "--out", out).exit_code == 0

    assert sorted(p.name for p in out.parent.iterdir()) == ["catalog.json", "catalog.parquet"]


def test_a_full_disk_while_converting_leaves_no_partial_folder(small_disk, tmp_path):
    from superweight.scanner.examples import convert_gguf
    from superweight.scanner.errors import ScanError
    from tests.checkpoints import make_gguf

    gguf = make_gguf(tmp_path / "m.gguf", "llama", [Plant(3, 10, 20)])
    disk = small_disk("examples", "64k")
    with pytest.raises(ScanError, match="No space left on device"):
        convert_gguf(gguf, disk / "m")
    assert list(disk.iterdir()) == []


def test_a_scan_killed_while_running_expires_in_the_ledger(home, good, monkeypatch):
    from superweight.index.ledger import Ledger, default_url

    monkeypatch.setattr("superweight.index.ledger.SCAN_LEASE_SECONDS", 0.0)  # a killed scan's lease lapses at once
    ledger = Ledger(default_url(home))
    ledger.start(str(good), "", "0.3.0", worker="host:1")  # started, then the process was killed
    ledger.close()

    (record,) = [r for r in invoke_json("ledger", "--json") if r["repo_id"] == str(good)]
    assert record["state"] == "failed"
    assert record["error"] == "stopped without finishing (its process ended, or its lease lapsed); scan it again"


def invoke_json(*args):
    import json

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_tests_run_as_root_in_ci():
    if os.getenv("CI"):
        assert os.geteuid() == 0, "the full-disk and read-only tests need root, as CI has"


def test_a_running_scan_renews_its_lease(home, good, monkeypatch):
    from datetime import datetime, timedelta

    from superweight.index.catalog import Catalog
    from superweight.index.ledger import Ledger, default_url
    from superweight.index.record import scan_and_record
    from superweight.scanner.progress import Progress
    from superweight.scanner.scan import ScanOptions

    monkeypatch.setattr("superweight.index.record.RENEW_EVERY", 0.0)
    monkeypatch.setattr("superweight.index.record.SCAN_LEASE_SECONDS", 10**6)
    ledger = Ledger(default_url(home))
    leases = []

    class Watch(Progress):
        def step(self):
            (record,) = [r for r in ledger.records() if r["state"] == "running"]
            leases.append(record["lease_expires_at"])

    scan_and_record(str(good), ScanOptions(), catalog=Catalog(home / "catalog.duckdb"), ledger=ledger, progress=Watch())
    ledger.close()
    assert leases and min(leases) > datetime.utcnow() + timedelta(days=10)  # renewed well past its first 600 s
