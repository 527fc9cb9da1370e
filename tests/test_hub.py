"""Hub access end to end against a real local Hub (olah on 127.0.0.1): pinning, filtering, errors, offline.

conftest.py fixes HF_ENDPOINT to a dead port before huggingface_hub is imported, so in-process
calls pass `endpoint=` and CLI subprocesses get HF_ENDPOINT (and a fresh HF_HOME) in their env.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from superweight.scanner.errors import HubError, SourceNotFound, UnsafeCheckpoint
from superweight.scanner.hub import resolve
from superweight.scanner.scan import ScanOptions, scan_source
from tests.checkpoints import coordinates
from tests.hub_server import FIRST_PLANT, LATEST_PLANT, olah_server

TINY = "testorg/tiny-llama"
SHARDED = "testorg/tiny-llama-sharded"
CLI = str(Path(sys.executable).with_name("superweight"))  # the installed console script
CLI_TIMEOUT = 120  # seconds; a run costs 5-8 s here, most of it importing torch


def planted(p) -> set[tuple]:
    return {(p.layer, p.expert, p.row, p.col)}


def cli_scan(*args: str, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `superweight scan ARGS` in a child with its own HF_HOME (and any extra env)."""
    child_env = {**os.environ, "HF_HOME": str(hf_home), **env}
    child_env.pop("HF_HUB_CACHE", None)  # derived from HF_HOME
    return subprocess.run([CLI, "scan", *args], env=child_env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# --- pinning to a commit -------------------------------------------------------------------------

def test_scan_main_pins_the_latest_commit(local_hub):
    main = local_hub.sha(TINY)
    result = scan_source(TINY, ScanOptions(endpoint=local_hub.endpoint, revision="main"))
    assert (result["source"], result["repo_id"], result["revision"]) == (TINY, TINY, main)
    assert Path(result["path"]).name == main
    assert coordinates(result) == planted(LATEST_PLANT)
    assert result["remote"] and result["bytes_fetched"] > 0 and result["passes"] == 1
    assert not any(p.suffix == ".safetensors" for p in Path(result["path"]).iterdir())  # read remotely


def test_scan_an_old_sha_reads_that_commit(local_hub):
    first, latest = local_hub.shas(TINY)
    assert first != latest
    result = scan_source(TINY, ScanOptions(endpoint=local_hub.endpoint, revision=first))
    assert (result["repo_id"], result["revision"]) == (TINY, first)
    assert coordinates(result) == planted(FIRST_PLANT)


@pytest.mark.parametrize("download", [False, True], ids=["remote", "downloaded"])
def test_scan_a_sharded_checkpoint(local_hub, tmp_path, download):
    result = scan_source(SHARDED, ScanOptions(endpoint=local_hub.endpoint, revision="main", cache_dir=tmp_path,
                                              download=download))
    assert result["revision"] == local_hub.sha(SHARDED)
    files = {p.name for p in Path(result["path"]).iterdir()}
    shards = {f for f in local_hub.git_files(SHARDED) if f.startswith("model-") and f.endswith(".safetensors")}
    assert len(shards) > 1 and "consolidated.safetensors" in local_hub.git_files(SHARDED)
    assert files == {"config.json", "model.safetensors.index.json", *(shards if download else ())}
    assert result["remote"] is not download
    assert coordinates(result) == planted(FIRST_PLANT)


def test_resolve_defaults_to_main(local_hub, tmp_path):
    resolved = resolve(TINY, endpoint=local_hub.endpoint, cache_dir=tmp_path)
    assert resolved.revision == local_hub.sha(TINY)
    assert resolved.path == tmp_path / "models--testorg--tiny-llama" / "snapshots" / resolved.revision


# --- fetching only what a scan reads -------------------------------------------------------------

@pytest.mark.parametrize("download", [False, True], ids=["remote", "downloaded"])
def test_only_config_and_safetensors_are_fetched(local_hub, tmp_path, download):
    in_repo = set(local_hub.git_files(TINY))
    assert {"pytorch_model.bin", "README.md", "generation_config.json"} <= in_repo  # so this test can fail
    resolved = resolve(TINY, revision="main", endpoint=local_hub.endpoint, cache_dir=tmp_path, download=download)
    weights = {"model.safetensors"} if download else set()
    assert {p.name for p in resolved.path.iterdir()} == {"config.json", *weights}
    assert resolved.remote == (() if download else ("model.safetensors",))
    blobs = tmp_path / "models--testorg--tiny-llama" / "blobs"
    assert len(list(blobs.iterdir())) == 1 + len(weights)  # nothing else fetched, not even partly


def test_pickle_only_repo_is_refused_before_download(local_hub, tmp_path):
    with pytest.raises(UnsafeCheckpoint) as caught:
        resolve("testorg/pickle-only", revision="main", endpoint=local_hub.endpoint, cache_dir=tmp_path)
    assert str(caught.value) == ("testorg/pickle-only@main: only pickle weights (pytorch_model.bin); superweight "
                                 "never unpickles: it reads safetensors and GGUF. Convert the checkpoint to "
                                 "safetensors first")
    assert (caught.value.where, caught.value.kind) == ("testorg/pickle-only@main", "unsafe")
    assert not (tmp_path / "models--testorg--pickle-only").exists()


# --- what is not there ---------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id, revision", [("testorg/no-such-model", "main"), (TINY, "no-such-branch")])
def test_missing_repo_or_revision_is_source_not_found(local_hub, tmp_path, repo_id, revision):
    with pytest.raises(SourceNotFound) as caught:
        resolve(repo_id, revision=revision, endpoint=local_hub.endpoint, cache_dir=tmp_path)
    # olah answers a missing branch like a missing repo (401 RepoNotFound), so only the prefix is shared.
    assert str(caught.value).startswith(f"{repo_id}@{revision}: ")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / f"models--{repo_id.replace('/', '--')}").exists()


def test_hub_going_away_is_a_hub_error(local_hub, tmp_path):
    with olah_server(local_hub.mirrors, tmp_path / "olah") as hub:  # a second server, ours to stop
        assert resolve(TINY, endpoint=hub.endpoint, cache_dir=tmp_path / "a").revision == local_hub.sha(TINY)
    with pytest.raises(HubError) as caught:  # its port is closed now
        resolve(TINY, endpoint=hub.endpoint, cache_dir=tmp_path / "b")
    message = str(caught.value)
    assert message.startswith(f"{TINY}@main: Hub request to {hub.endpoint} failed (")
    assert message.endswith("or set HF_HUB_OFFLINE=1 to scan from the cache")
    assert "\n" not in message
    done = cli_scan(TINY, "--json", hf_home=tmp_path / "hf", HF_ENDPOINT=hub.endpoint)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"Error: {message}"]
    assert json_lines(done.stdout) == [{"source": TINY, "status": "failed", "error": message}]


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_scans_hub_repos_as_json_lines(local_hub, tmp_path):
    done = cli_scan(TINY, SHARDED, "--json", hf_home=tmp_path / "hf", HF_ENDPOINT=local_hub.endpoint)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    tiny, sharded = json_lines(done.stdout)
    assert (tiny["status"], tiny["source"], tiny["revision"]) == ("ok", TINY, local_hub.sha(TINY))
    assert coordinates(tiny) == planted(LATEST_PLANT)
    assert (sharded["status"], sharded["source"], sharded["revision"]) == ("ok", SHARDED, local_hub.sha(SHARDED))
    assert coordinates(sharded) == planted(FIRST_PLANT)
    assert Path(tiny["path"]).is_relative_to(tmp_path / "hf" / "hub")
    weights = [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size > 10_000]
    assert weights == []  # the weights were read remotely: the cache holds config files alone


def test_cli_offline_with_an_empty_cache_explains_itself(tmp_path):
    done = cli_scan(TINY, "--json", hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    message = f"{TINY}@main: not in the local Hub cache, and the Hub is offline (HF_HUB_OFFLINE)"
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"Error: {message}"]
    assert json_lines(done.stdout) == [{"source": TINY, "status": "failed", "error": message}]


def test_cli_offline_scans_what_an_online_scan_downloaded(local_hub, tmp_path):
    cache = tmp_path / "hf" / "hub"
    online = resolve(TINY, endpoint=local_hub.endpoint, cache_dir=cache, download=True)  # `scan --download`
    done = cli_scan(TINY, "--json", hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    ref = cache / "models--testorg--tiny-llama" / "refs" / "main"
    assert done.returncode == 0, (
        f"offline scan of a cached repo failed: {done.stderr.strip()!r}; refs/main in the cache: "
        f"{ref.read_text() if ref.is_file() else 'missing'} (scanner/hub.py downloads the pinned sha, "
        "so huggingface_hub never records which commit 'main' is)"
    )
    (line,) = json_lines(done.stdout)
    assert (line["status"], line["revision"], line["path"]) == ("ok", online.revision, str(online.path))
    assert coordinates(line) == planted(LATEST_PLANT)
