"""Downloading a published catalog: verified against its manifest, replaced atomically, or refused."""

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from superweight.index.catalog import Catalog
from superweight.index.errors import ChecksumMismatch, DownloadFailed
from superweight.index.literature import read_literature
from superweight.index.publish import download
from superweight.cli import cli


@pytest.fixture
def published(tmp_path):
    """A folder holding an exported catalog.parquet and catalog.json."""
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_literature(read_literature())
        catalog.export(tmp_path / "pub" / "catalog.parquet")
    return tmp_path / "pub"


@pytest.fixture
def http_server(published):
    """The published folder served over HTTP on 127.0.0.1."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(published))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def test_download_over_http_replaces_the_local_copy(http_server, published, tmp_path):
    dest = tmp_path / "home" / "catalog.parquet"
    dest.parent.mkdir()
    dest.write_bytes(b"old")

    manifest = download(f"{http_server}/catalog.parquet", dest)

    assert dest.read_bytes() == (published / "catalog.parquet").read_bytes()
    assert json.loads((dest.parent / "catalog.json").read_text()) == manifest
    assert manifest["rows"] == 47
    assert sorted(p.name for p in dest.parent.iterdir()) == ["catalog.json", "catalog.parquet"]  # no temp left


def test_a_checksum_mismatch_is_refused_and_the_old_copy_kept(published, tmp_path):
    manifest = json.loads((published / "catalog.json").read_text())
    (published / "catalog.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    dest = tmp_path / "home" / "catalog.parquet"
    dest.parent.mkdir()
    dest.write_bytes(b"old")

    with pytest.raises(ChecksumMismatch, match="its manifest says 0000000000000000...; kept the local copy"):
        download(str(published), dest)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["catalog.parquet"]


def test_an_unreachable_source_is_one_line(tmp_path):
    with pytest.raises(DownloadFailed, match=r"^http://127.0.0.1:9/catalog.parquet: cannot fetch catalog.parquet \("):
        download("http://127.0.0.1:9/catalog.parquet", tmp_path / "catalog.parquet")


def test_the_cli_downloads_and_reports(published, tmp_path):
    dest = tmp_path / "catalog.parquet"
    result = CliRunner().invoke(cli, ["download", str(published / "catalog.parquet"), "--out", str(dest)])
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(dest.read_bytes()).hexdigest()
    assert result.stdout == f"{dest}: 47 rows, sha256 {sha}\n"


def test_query_from_a_url_reads_it_through_the_same_fetch(http_server):
    result = CliRunner().invoke(cli, ["query", "SELECT count(*) AS n FROM catalog WHERE source = 'literature'",
                                      "--from", f"{http_server}/catalog.parquet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"n": 47}


def _forge(folder, data: bytes, **manifest_changes):
    """Replace the published catalog.parquet with `data` and make its manifest agree (sha256 and all)."""
    (folder / "catalog.parquet").write_bytes(data)
    manifest = json.loads((folder / "catalog.json").read_text())
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), **manifest_changes)
    (folder / "catalog.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not ...}))


def _local_copy(tmp_path):
    """A local catalog.parquet that must survive every refused download."""
    local = tmp_path / "home" / "catalog.parquet"
    local.parent.mkdir()
    local.write_bytes(b"the old copy")
    return local


@pytest.mark.parametrize("case", ["text file", "other parquet", "rows disagree", "newer schema",
                                  "sha256 a number", "no rows"])
def test_a_file_that_is_not_a_catalog_is_refused_and_the_old_copy_kept(published, tmp_path, case):
    import duckdb

    other = tmp_path / "other.parquet"
    duckdb.sql(f"COPY (SELECT 1 AS a, 'x' AS b) TO '{other}' (FORMAT parquet)")
    parquet = (published / "catalog.parquet").read_bytes()
    forged = {
        "text file": (b"#!/bin/sh\necho pwned\n", {}),
        "other parquet": (other.read_bytes(), {}),
        "rows disagree": (parquet, {"rows": 3}),
        "newer schema": (parquet, {"schema_version": 99}),
        "sha256 a number": (parquet, {}),
        "no rows": (parquet, {"rows": ...}),
    }[case]
    _forge(published, forged[0], **forged[1])
    if case == "sha256 a number":
        manifest = json.loads((published / "catalog.json").read_text())
        (published / "catalog.json").write_text(json.dumps({**manifest, "sha256": 12345}))
    local = _local_copy(tmp_path)

    result = CliRunner().invoke(cli, ["download", str(published), "--out", str(local)])

    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"Error: {published}: ")
    assert "Traceback" not in result.output
    assert local.read_bytes() == b"the old copy"
    assert sorted(p.name for p in local.parent.iterdir()) == ["catalog.parquet"]  # nothing left beside it


def test_a_download_into_a_read_only_folder_is_one_line(published, small_disk):
    home = small_disk("home", read_only=True, files={"catalog.parquet": b"the old copy"})
    result = CliRunner().invoke(cli, ["download", str(published), "--out", str(home / "catalog.parquet")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr == f"Error: {home}: cannot write the download here (Read-only file system)\n"
    assert (home / "catalog.parquet").read_bytes() == b"the old copy"


@pytest.mark.parametrize("case", ["not a catalog", "no rows", "sha256 a number"])
def test_publish_refuses_a_file_that_is_not_a_catalog(published, tmp_path, case):
    if case == "not a catalog":
        _forge(published, b"hello\n")
    elif case == "no rows":
        _forge(published, (published / "catalog.parquet").read_bytes(), rows=...)
    else:
        manifest = json.loads((published / "catalog.json").read_text())
        (published / "catalog.json").write_text(json.dumps({**manifest, "sha256": 7}))

    result = CliRunner().invoke(cli, ["publish", str(tmp_path / "site"), "--file", str(published / "catalog.parquet")])

    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "site").exists()
