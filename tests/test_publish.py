"""Publishing the index: to a folder, and to a Hub dataset repo in one commit, then back down.

The Hub side is real HTTP end to end: `superweight publish hf://datasets/...` talks to a loopback
endpoint that accepts commits and writes them into git repos olah serves (tests/hub_commits.py),
and `superweight download` reads them back through olah.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from superweight.index.catalog import COLUMNS, Catalog
from superweight.index.errors import PublishFailed
from superweight.index.literature import read_literature
from superweight.index.publish import publish
from superweight.scanner.digest import file_sha256
from superweight.cli import cli
from tests.hub_commits import CommitEndpoint, serve
from tests.hub_server import git

CLI = str(Path(sys.executable).with_name("superweight"))
TOKEN = "hf_test_0123456789abcdef"  # what the endpoint wants; must never appear in any output


@pytest.fixture
def export(tmp_path) -> Path:
    """An exported catalog.parquet (47 literature rows) with its catalog.json."""
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_literature(read_literature())
        catalog.export(tmp_path / "export" / "catalog.parquet")
    return tmp_path / "export" / "catalog.parquet"


@pytest.fixture
def commits(local_hub):
    """A commit endpoint writing into the local Hub's mirrors; yields (state, url)."""
    state = CommitEndpoint(mirrors=local_hub.mirrors, token=TOKEN)
    server, url = serve(state)
    yield state, url
    server.shutdown()
    server.server_close()


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    child_env = {**os.environ, **env}
    return subprocess.run([CLI, *args], env=child_env, capture_output=True, text=True, timeout=120)


# --- a folder ------------------------------------------------------------------------------------

def test_publish_to_a_folder_writes_the_export_its_manifest_and_a_card(export, tmp_path):
    target = tmp_path / "site" / "index"
    result = CliRunner().invoke(cli, ["publish", str(target), "--file", str(export)])
    assert result.exit_code == 0, result.output

    assert sorted(p.name for p in target.iterdir()) == ["README.md", "catalog.json", "catalog.parquet"]
    assert (target / "catalog.parquet").read_bytes() == export.read_bytes()
    manifest = json.loads((target / "catalog.json").read_text())
    assert manifest["sha256"] == file_sha256(export) and manifest["rows"] == 47
    card = (target / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "data_files: catalog.parquet" in card
    for name, meaning in COLUMNS.items():  # every column documented, with its type
        assert f"| `{name}` |" in card and meaning in card
    assert result.stdout == f"{target}: 47 rows, sha256 {manifest['sha256']}\n"

    # What was published downloads and verifies like any published index.
    dest = tmp_path / "copy" / "catalog.parquet"
    assert CliRunner().invoke(cli, ["download", str(target), "--out", str(dest)]).exit_code == 0
    assert dest.read_bytes() == export.read_bytes()


def test_publish_exports_the_local_catalog_by_default(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_literature(read_literature())
    target = tmp_path / "index"
    result = CliRunner().invoke(cli, ["publish", str(target), "--catalog", str(tmp_path / "c.duckdb")])
    assert result.exit_code == 0, result.output
    assert json.loads((target / "catalog.json").read_text())["rows"] == 47


def test_an_export_that_does_not_match_its_manifest_is_not_published(export, tmp_path):
    export.write_bytes(export.read_bytes() + b"tampered")
    target = tmp_path / "index"
    with pytest.raises(PublishFailed, match="does not match the sha256 in catalog.json"):
        publish(str(target), export)
    assert not target.exists()


def test_an_export_without_its_manifest_is_not_published(export, tmp_path):
    export.with_suffix(".json").unlink()
    result = CliRunner().invoke(cli, ["publish", str(tmp_path / "index"), "--file", str(export)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: {export}: no manifest catalog.json beside it; write both with 'superweight export'"
    ]


def test_other_url_schemes_are_refused(export):
    with pytest.raises(PublishFailed, match="publish to a folder or to hf://datasets/OWNER/NAME"):
        publish("hf://models/org/name", export)


def test_republishing_a_folder_replaces_the_files(export, tmp_path):
    target = tmp_path / "index"
    publish(str(target), export)
    (target / "catalog.parquet").write_bytes(b"stale")
    publish(str(target), export)
    assert (target / "catalog.parquet").read_bytes() == export.read_bytes()
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "catalog.json", "catalog.parquet"]


# --- a Hub dataset repo --------------------------------------------------------------------------

def test_publish_to_the_hub_is_one_commit_and_downloads_back_through_the_hub(export, commits, local_hub, tmp_path):
    state, url = commits
    target = "hf://datasets/testorg/index-roundtrip"

    done = run_cli("publish", target, "--file", str(export), HF_ENDPOINT=url, HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    repo = local_hub.mirrors / "datasets" / "testorg" / "index-roundtrip"
    assert git(repo, "rev-list", "--count", "main").strip() == "1"
    assert sorted(git(repo, "ls-tree", "-r", "--name-only", "main").split()) == [
        "README.md", "catalog.json", "catalog.parquet"]
    sha = file_sha256(export)
    assert git(repo, "log", "-1", "--format=%s").strip() == f"superweight index: 47 rows, sha256 {sha[:12]}"
    assert {r.authorization for r in state.requests} == {f"Bearer {TOKEN}"}
    assert done.stdout.splitlines()[0] == f"{target}: 47 rows, sha256 {sha}"

    # A second publish (one more model) is one more commit on the same repo.
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_literature(read_literature())
        catalog.record_literature({"testorg/extra": [{"layer": 1, "expert": None, "out_channel": 2,
                                                      "in_channel": 3, "note": "test"}]})
        manifest = catalog.export(tmp_path / "second" / "catalog.parquet")
    done = run_cli("publish", target, "--file", str(tmp_path / "second" / "catalog.parquet"),
                   HF_ENDPOINT=url, HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert git(repo, "rev-list", "--count", "main").strip() == "2"

    # Downloaded back through the (read-only) local Hub, verified against its manifest.
    dest = tmp_path / "home" / "catalog.parquet"
    done = run_cli("download", target, "--out", str(dest), HF_ENDPOINT=local_hub.endpoint,
                   HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert file_sha256(dest) == manifest.sha256
    assert json.loads(dest.with_name("catalog.json").read_text())["rows"] == 48


def test_publish_to_the_hub_needs_a_token_from_the_environment(export, commits, monkeypatch):
    state, url = commits
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishFailed, match="needs a write token in the HF_TOKEN environment variable"):
        publish("hf://datasets/testorg/no-token", export, endpoint=url)
    assert state.requests == []  # refused before any request


def test_a_rejected_token_is_one_line_that_does_not_show_it(export, commits, local_hub):
    state, url = commits
    wrong = "hf_wrong_fedcba9876543210"
    done = run_cli("publish", "hf://datasets/testorg/wrong-token", "--file", str(export),
                   HF_ENDPOINT=url, HF_TOKEN=wrong)
    assert done.returncode != 0
    assert wrong not in done.stdout + done.stderr
    assert done.stderr.startswith("Error: hf://datasets/testorg/wrong-token: upload failed (")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (local_hub.mirrors / "datasets" / "testorg" / "wrong-token").exists()
