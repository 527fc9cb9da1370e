"""Weights read straight from the Hub by range requests: a remote scan finds what a local scan of the
same files finds, fetches each byte it needs about once and writes none to disk, and rides out or
explains the faults of networks and servers (tests/hub_front.py `Fault`).

Every test talks to the session's local Hub through a fresh HubFront of its own, whose faults it
sets. Retries wait milliseconds here: the module attributes scanner.fetch reads are patched.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import pytest

from superweight.scanner import fetch
from superweight.scanner.errors import CorruptCheckpoint, HubError, HubUnavailable
from superweight.scanner.fetch import Pacer
from superweight.scanner.files import find_weight_files
from superweight.scanner.safetensors_checkpoint import read_header
from superweight.scanner.scan import ScanOptions, scan_source
from superweight.scanner.verify import VerifyConfig
from tests.checkpoints import ARCHS, MOE_ARCHS, Plant, coordinates, make_checkpoint
from tests.hub_front import HubFront, serve
from tests.hub_server import commit_folder

CLI = str(Path(sys.executable).with_name("superweight"))
ATTEMPTS = 3  # tries of one range read, here
WEIGHTS = r"/resolve/[0-9a-f]{40}/model\.safetensors$"  # GETs of a repo's weights (at a pinned sha)
EMBEDDING = r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$"  # the token embedding, in every family
HEAD = r"(lm_head|embed_out)\.weight$"
# Verification's defaults but for size: fewer tokens (quicker), and the LM head read in slices of 100
# of its 256 rows, so that slices of it are range reads too.
VERIFY = VerifyConfig(tokens=256, context=64, head_slice_rows=100)
COSTS = ("source", "repo_id", "revision", "path", "seconds", "download_seconds", "remote", "bytes_fetched",
         "requests", "passes", "wait_seconds", "scanned_at")


def planted(arch: str) -> Plant:
    return Plant(3, 10, 20, expert=1 if arch in MOE_ARCHS else None)


class Repo:
    """A tiny checkpoint committed to the local Hub (`repo_id` at `sha`), and the same files on local disk."""

    def __init__(self, local_hub, repo_id: str, folder: Path):
        self.repo_id, self.folder = repo_id, folder
        self.sha = commit_folder(local_hub.repo(repo_id), "stream test checkpoint")
        self.name = f"{repo_id}@{self.sha[:12]}/model.safetensors"  # how errors name its weights

    def options(self, front: HubFront, cache: Path, **kwargs) -> ScanOptions:
        return ScanOptions(endpoint=front.url, revision=self.sha, cache_dir=cache, **kwargs)

    def offset(self, layer: int) -> int:
        """The byte of model.safetensors where decoder layer `layer`'s first tensor starts."""
        tensors = _header(self.folder)
        return min(info.offset for name, info in tensors.items() if f".layers.{layer}." in name)


def _header(folder: Path) -> dict:
    file = fetch.LocalFile(find_weight_files(folder)[0], fetch.Transfer())
    try:
        return read_header(file)
    finally:
        file.close()


@pytest.fixture(scope="module")
def repos(local_hub, tmp_path_factory) -> dict[str, Repo]:
    """One planted repo per architecture family (`stream/<arch>`), pushed to the session's local Hub."""
    local = tmp_path_factory.mktemp("stream-local")
    found = {}
    for arch in ARCHS:
        repo_id = f"stream/{arch}"
        make_checkpoint(local_hub.repo(repo_id), arch, [planted(arch)])
        found[arch] = Repo(local_hub, repo_id, make_checkpoint(local / arch, arch, [planted(arch)]))
    return found


@pytest.fixture
def front(local_hub):
    """A fresh front (no faults) before the session's local Hub."""
    front = serve(HubFront(upstream=local_hub.endpoint, mirrors=local_hub.mirrors))
    yield front
    front.stop()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(fetch, "HUB_ATTEMPTS", ATTEMPTS)
    monkeypatch.setattr(fetch, "HUB_BACKOFF", 0.01)


# Families whose remote scans are also verified: dense, GPT-2's Conv1D with a tied head, fused experts.
# Verification reads the same layers and head slices in every family; these keep the suite short.
VERIFIED = ("llama", "gpt2", "mixtral")


def verify_for(arch: str) -> VerifyConfig | None:
    return VERIFY if arch in VERIFIED else None


@pytest.fixture(scope="module")
def local_results(repos) -> dict[str, dict]:
    """Each family's local scan (verified for VERIFIED): what every remote scan must match."""
    # Layers kept as a remote scan keeps them (a local scan keeps none by default), so the reads compare.
    return {arch: scan_source(str(repo.folder), ScanOptions(verify=verify_for(arch), cache_gb=1))
            for arch, repo in repos.items()}


@pytest.fixture(scope="module")
def llama_local(repos) -> dict:
    """The llama repo's local detection scan, unverified: what the fault tests' scans must match."""
    return scan_source(str(repos["llama"].folder))


def figures(result: dict) -> dict:
    """A scan's findings and measurements, without what differs between a local and a remote read."""
    found = {k: v for k, v in result.items() if k not in COSTS}
    if found.get("verification"):
        found["verification"] = {k: v for k, v in found["verification"].items() if k != "seconds"}
    return found


def weight_files_on_disk(*roots: Path) -> list[Path]:
    """Files under `roots` that could hold weights: safetensors, or anything over 10 kB (configs are smaller)."""
    return [p for root in roots for p in root.rglob("*")
            if p.is_file() and (p.suffix == ".safetensors" or p.stat().st_size > 10_000)]


# --- what a remote scan finds, fetches and leaves behind -----------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_a_remote_scan_finds_and_measures_what_a_local_scan_does(repos, local_results, front, tmp_path,
                                                                 monkeypatch, arch):
    repo, local = repos[arch], local_results[arch]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    remote = scan_source(repo.repo_id, repo.options(front, tmp_path / "hf", verify=verify_for(arch)))
    p = planted(arch)
    assert coordinates(remote) == {(p.layer, p.expert, p.row, p.col)}
    assert figures(remote) == figures(local)  # spike ratios, weights, every layer's peaks, the effects
    assert (remote["super_weights"][0]["effect"] is not None) is (arch in VERIFIED)
    assert remote["remote"] and remote["passes"] == 1 and not local["remote"]
    # The same reads as from disk, give or take the first request's bytes: the header and what follows it,
    # which serve the reads that fall inside them.
    assert abs(remote["bytes_fetched"] - local["bytes_fetched"]) <= fetch.HEAD_GUESS
    assert weight_files_on_disk(tmp_path) == []  # neither the HF cache nor the temp folder holds weights


def needed_bytes(folder: Path, token_ids: list[int]) -> tuple[int, int]:
    """(bytes a detection scan needs, the decoder layers' share of them): the header, every tensor but
    the token embedding and the LM head, and the embedding rows of the prompt's distinct tokens."""
    tensors = _header(folder)
    header = min(info.offset for info in tensors.values())  # 8 bytes of length, then the JSON
    (embed,) = [info for name, info in tensors.items() if re.search(EMBEDDING, name)]
    table = [embed] + [info for name, info in tensors.items() if re.search(HEAD, name)]
    rows = len(set(token_ids)) * embed.n_bytes // embed.shape[0]
    layers = sum(info.n_bytes for name, info in tensors.items() if ".layers." in name or ".h." in name)
    return header + sum(i.n_bytes for i in tensors.values()) - sum(i.n_bytes for i in table) + rows, layers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "phi3", "gemma"])  # dense, Conv1D, experts, fused, tied
def test_a_remote_scan_fetches_the_bytes_it_needs_once(repos, front, tmp_path, monkeypatch, arch):
    # Read-size constants made for multi-GB files, scaled to these 1-4 MB ones: no header guess past
    # the length prefix, and no gaps read through (1 MB would be most of a tiny model).
    monkeypatch.setattr(fetch, "HEAD_GUESS", 8)
    monkeypatch.setattr(fetch, "HUB_MAX_GAP", 0)
    repo = repos[arch]
    result = scan_source(repo.repo_id, repo.options(front, tmp_path))
    needed, layers = needed_bytes(repo.folder, result["tokens"])
    assert layers < needed <= result["bytes_fetched"] <= 1.05 * needed
    assert result["passes"] == 1 and result["forwards"] > 1  # replays and the last pass used kept layers


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_without_a_layer_cache_every_pass_fetches_again_and_verification_folds_its_passes(repos, local_results,
                                                                                           front, tmp_path, arch):
    repo = repos[arch]
    result = scan_source(repo.repo_id, repo.options(front, tmp_path, cache_gb=0, verify=VERIFY))
    cached = scan_source(repo.repo_id, repo.options(front, tmp_path, verify=VERIFY))
    assert coordinates(result) == coordinates(local_results[arch])
    assert result["passes"] == result["forwards"] > 1 and cached["passes"] == 1
    assert result["bytes_fetched"] > 2 * cached["bytes_fetched"]  # replays and verification fetch again
    # Not kept, a remote model runs the prompts in the text's pass: one pass per measurement, not two.
    assert result["verification"]["passes"] == cached["verification"]["passes"] // 2
    for name in ("base_ppl", "joint_ppl_ratio", "joint_kl"):
        assert result["verification"][name] == pytest.approx(cached["verification"][name], rel=1e-4, abs=1e-6)
    for a, b in zip(cached["super_weights"], result["super_weights"], strict=True):
        for name in ("ppl_ratio", "kl", "prompt_kl"):  # prompt_kl: the padded prompts' figures
            assert b["effect"][name] == pytest.approx(a["effect"][name], rel=1e-3, abs=1e-6)


# --- faults of the network and the server --------------------------------------------------------

def test_a_connection_reset_mid_layer_is_read_again(repos, llama_local, front, tmp_path):
    repo = repos["llama"]
    reset = front.fault("reset", WEIGHTS, covers=repo.offset(4))
    result = scan_source(repo.repo_id, repo.options(front, tmp_path))
    assert reset.hits == 1
    assert figures(result) == figures(llama_local)
    faulted = [a for a in front.answers if a.fault == "reset"]
    again = [a for a in front.answers if a.range == faulted[0].range and a.fault is None and a.status == 206]
    assert len(again) == 1 and again[0].at > faulted[0].at  # the same span, asked for again


def test_a_server_that_ignores_range_fails_the_scan_at_once(repos, front, tmp_path):
    repo = repos["llama"]
    whole = front.fault("whole", WEIGHTS, count=None, covers=repo.offset(4))
    with pytest.raises(HubError) as caught:
        scan_source(repo.repo_id, repo.options(front, tmp_path))
    assert str(caught.value) == (f"{repo.name}: {front.url} answered 200 with the whole file to a range request "
                                 "(it ignores Range); a scan reads only the bytes it needs")
    assert not isinstance(caught.value, HubUnavailable) and whole.hits == 1  # not worth a retry


def test_a_short_body_is_read_again_and_fails_naming_the_file_if_it_stays_short(repos, llama_local, front,
                                                                                   tmp_path):
    repo = repos["llama"]
    once = front.fault("short", WEIGHTS, covers=repo.offset(4))
    result = scan_source(repo.repo_id, repo.options(front, tmp_path / "a"))
    assert once.hits == 1 and figures(result) == figures(llama_local)

    always = front.fault("short", WEIGHTS, count=None, covers=repo.offset(4))
    with pytest.raises(HubUnavailable) as caught:
        scan_source(repo.repo_id, repo.options(front, tmp_path / "b"))
    match = re.fullmatch(rf"{re.escape(repo.name)}: reading bytes (\d+)-(\d+) failed {ATTEMPTS} times "
                         r"\(body ended after (\d+) of (\d+) bytes\)", str(caught.value))
    assert match, str(caught.value)
    first, last, got, asked = map(int, match.groups())
    assert first <= repo.offset(4) <= last and asked == last - first + 1 and got == asked // 2
    assert always.hits == ATTEMPTS


@pytest.mark.parametrize("lie", ["past the end", "overlap"])
def test_a_header_that_lies_about_offsets_is_a_corrupt_checkpoint(local_hub, front, tmp_path, lie):
    folder = make_checkpoint(local_hub.repo(f"stream/lies-{lie.replace(' ', '-')}"), "llama", [Plant(3, 10, 20)])
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    victim, gate = "model.layers.4.mlp.down_proj.weight", "model.layers.4.mlp.gate_proj.weight"
    begin, end = header[victim]["data_offsets"]
    size = len(data) - 8 - length
    if lie == "past the end":
        header[victim]["data_offsets"] = [size, size + end - begin]
    else:
        other = header[gate]["data_offsets"][0]
        header[victim]["data_offsets"] = [other + 4, other + 4 + end - begin]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    repo = Repo(local_hub, f"stream/lies-{lie.replace(' ', '-')}", folder)
    with pytest.raises(CorruptCheckpoint) as caught:
        scan_source(repo.repo_id, repo.options(front, tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{repo.name}: ") and "\n" not in message
    if lie == "past the end":
        assert message == (f"{repo.name}: tensor {victim} runs past the end of the file ({len(weights.read_bytes())} "
                           "bytes); the file is truncated or its header lies")
    else:
        assert message == f"{repo.name}: tensors {gate} and {victim} overlap; the header lies"


def test_a_429_is_waited_out_as_retry_after_says(repos, local_results, front, tmp_path):
    repo = repos["llama"]
    limited = front.fault("429", WEIGHTS, covers=repo.offset(4), retry_after=1)
    result = scan_source(repo.repo_id, repo.options(front, tmp_path))
    assert limited.hits == 1 and coordinates(result) == coordinates(local_results["llama"])
    (refused,) = [a for a in front.answers if a.status == 429]
    (again,) = [a for a in front.answers if a.range == refused.range and a.status == 206]
    assert again.at - refused.at >= 1.0 and result["seconds"] >= 1.0


def test_a_retry_after_of_a_day_on_a_range_read_fails_the_model_at_once(repos, front, tmp_path):
    """Waiting out `Retry-After: 99999` would hold a worker for 27 hours: the scan fails in one line, and
    the error carries the wait, so the crawl's retry of a model does not wait it out either."""
    repo = repos["llama"]
    limited = front.fault("429", WEIGHTS, covers=repo.offset(4), retry_after=99999)
    with pytest.raises(HubUnavailable) as caught:
        scan_source(repo.repo_id, repo.options(front, tmp_path))
    assert limited.hits == 1 and caught.value.retry_after == 99999
    assert str(caught.value).startswith(f"{repo.name}: answered 429, asking to wait 99999 s (Retry-After), more "
                                        "than 600 s")


def test_a_server_trickling_bytes_is_left_after_a_deadline_sized_from_the_length(repos, front, tmp_path, monkeypatch):
    repo = repos["llama"]
    monkeypatch.setattr(fetch, "HUB_TIMEOUT", 1.0)  # the grace before the floor rate applies, here
    monkeypatch.setattr(fetch, "HUB_MIN_RATE", 1e9)
    trickle = front.fault("trickle", WEIGHTS, covers=repo.offset(4), count=None)
    with pytest.raises(HubUnavailable) as caught:
        scan_source(repo.repo_id, repo.options(front, tmp_path))
    assert trickle.hits == ATTEMPTS
    assert re.search(r"failed 3 times \(\d+ of \d+ bytes arrived in 1 s, slower than 1e\+06 kB/s", str(caught.value))


@pytest.mark.parametrize("kind", ["bloat", "bloat-chunked"])
def test_an_api_answer_past_its_bound_is_not_read(repos, front, tmp_path, monkeypatch, kind):
    from superweight.scanner.hub import resolve

    repo = repos["llama"]
    monkeypatch.setattr(fetch, "HUB_MAX_ANSWER", 50_000)
    bloated = front.fault(kind, rf"^/api/models/{repo.repo_id}/", padding=10_000_000)
    with pytest.raises(HubError) as caught:
        resolve(repo.repo_id, revision=repo.sha, endpoint=front.url, cache_dir=tmp_path / "hf")
    assert bloated.hits == 1 and not isinstance(caught.value, HubUnavailable)  # not worth asking again
    assert str(caught.value) == (f"{repo.repo_id}@{repo.sha}: the answer to /api/models/{repo.repo_id}/revision/"
                                 f"{repo.sha} is over 0.0476837 MiB, more than an API answer about a model weighs "
                                 "(SUPERWEIGHT_HUB_MAX_ANSWER); not read")


def test_a_503_storm_is_retried_then_fails_as_hub_unavailable(repos, front, tmp_path):
    repo = repos["llama"]
    storm = front.fault("503", WEIGHTS, count=None)
    with pytest.raises(HubUnavailable) as caught:
        scan_source(repo.repo_id, repo.options(front, tmp_path))
    assert str(caught.value).startswith(f"{repo.name}: ") and "503" in str(caught.value)
    assert storm.hits == ATTEMPTS and "\n" not in str(caught.value)


@pytest.mark.slow  # a CLI subprocess: about 6 s of imports
def test_a_503_storm_through_the_cli_exits_1_with_a_failed_json_line(repos, front, tmp_path):
    repo = repos["llama"]
    storm = front.fault("503", WEIGHTS, count=None)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": front.url,
           "SUPERWEIGHT_HUB_ATTEMPTS": "2", "SUPERWEIGHT_HUB_BACKOFF": "0.01"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([CLI, "scan", repo.repo_id, "--revision", repo.sha, "--json", "--no-record"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    (line,) = [json.loads(text) for text in done.stdout.splitlines()]
    assert line["source"] == repo.repo_id and line["status"] == "failed"
    assert line["error"].startswith(f"{repo.name}: ") and "503" in line["error"]
    assert done.stderr.splitlines()[-1] == f"Error: {line['error']}"
    assert storm.hits == 2


# --- pacing under the Hub's request budget -------------------------------------------------------

def test_the_pacer_blocks_once_the_window_is_spent(monkeypatch):
    monkeypatch.setattr(Pacer, "WINDOW", 0.5)
    pacer = Pacer(2)
    start = time.monotonic()
    pacer.take()
    pacer.take()
    assert time.monotonic() - start < 0.25  # two fit the window
    taken = []
    third = threading.Thread(target=lambda: (pacer.take(), taken.append(time.monotonic())))
    third.start()
    third.join(timeout=5)
    assert taken and taken[0] - start >= 0.5  # the third waited for the first to leave the window


def test_a_paced_scan_keeps_under_its_budget(repos, local_results, front, tmp_path, monkeypatch):
    monkeypatch.setattr(Pacer, "WINDOW", 0.2)
    repo = repos["llama"]
    result = scan_source(repo.repo_id, repo.options(front, tmp_path, max_requests_per_5min=3))
    assert coordinates(result) == coordinates(local_results["llama"])
    ranged = sorted(a.at for a in front.answers if a.range)
    assert len(ranged) == result["requests"] > 3
    # At most 3 in any window: the 4th after a request waits its window out (less the answers' jitter).
    gaps = [later - earlier for earlier, later in zip(ranged, ranged[3:])]
    assert min(gaps) >= 0.15, gaps


def test_a_429_on_the_api_is_retried_after_its_retry_after(repos, front, tmp_path):
    """The crawl retries a HubUnavailable (`with_retries`); a 429's Retry-After, when longer than the
    backoff, is what it waits."""
    from superweight.scanner.hub import resolve, with_retries

    repo = repos["llama"]
    limited = front.fault("429", r"^/api/models/stream/llama", retry_after=1)
    started = time.monotonic()
    resolved = with_retries(lambda: resolve(repo.repo_id, revision=repo.sha, endpoint=front.url,
                                            cache_dir=tmp_path / "hf"), backoff=0.01)
    assert limited.hits == 1 and resolved.revision == repo.sha
    assert time.monotonic() - started >= 1.0


@pytest.mark.parametrize("header, expected", [("3", 3.0), ("0.5", 0.5), ("-2", 0.0), ("soon", None), (None, None)])
def test_retry_after_reads_seconds(header, expected):
    from superweight.scanner.hub import retry_after

    response = httpx2.Response(429, headers={"Retry-After": header} if header is not None else {})
    assert retry_after(response) == expected


def test_retry_after_reads_an_http_date():
    from email.utils import format_datetime

    from superweight.scanner.hub import retry_after

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after(httpx2.Response(429, headers={"Retry-After": when})) <= 31


def test_a_retry_after_too_long_fails_at_once():
    from superweight.scanner.hub import MAX_RETRY_AFTER, with_retries

    calls = []

    def call():
        calls.append(1)
        error = HubUnavailable("answered 429", where="x/y")
        error.retry_after = MAX_RETRY_AFTER + 1
        raise error

    with pytest.raises(HubUnavailable):
        with_retries(call, backoff=0.01)
    assert calls == [1]
