"""Downloading a published catalog: verified against its manifest, replaced atomically, or refused."""

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from index.catalog import Catalog
from index.errors import ChecksumMismatch, DownloadFailed
from index.literature import read_literature
from index.publish import download
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
