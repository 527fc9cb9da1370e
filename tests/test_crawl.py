"""The crawl end to end: discovery through a local Hub, scans on a real local Ray, real ledger and
catalog, and the faults an operator meets (a worker killed mid-scan, the Hub going away, a scan
past its timeout, two crawls at once, Ctrl-C)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from superweight.index.catalog import Catalog
from superweight.index.crawl import CrawlOptions, crawl
from superweight.index.errors import NoWorkers
from superweight.index.ledger import Ledger
from superweight.report import crawl_line
from superweight.index.crawl import HubAccess, discover, vet
from superweight.scanner.scan import ScanOptions
from tests.checkpoints import Plant, make_checkpoint, make_gguf
from tests.hub_front import HubFront, serve
from tests.hub_server import commit_folder, olah_server, tokenized_gguf

pytestmark = pytest.mark.slow  # a real local Ray cluster and Hub (about 4 minutes)

CLI = str(Path(sys.executable).with_name("superweight"))
WAIT = 120  # seconds: upper bound on any one wait in these tests

# (repo id, architecture, plants, last modified): the crawl hub's models, oldest first.
PLANTED = {"crawl/llama": ("llama", [Plant(3, 10, 20)], "2026-11-01T00:00:00Z"),
           "crawl/qwen2": ("qwen2", [Plant(2, 7, 99)], "2026-11-02T00:00:00Z"),
           "crawl/clean": ("llama", [], "2026-11-03T00:00:00Z")}
GATED, REMOTE, WIDE, BROKEN, PICKLE = "crawl/gated", "crawl/remote-code", "crawl/wide", "crawl/broken", "crawl/pickle"
GGUF, GGUF_NAME = "crawl/gguf", "m-Q8_0.gguf"  # a repo of one GGUF file (never discovered: no safetensors tag)


def build_crawl_mirrors(mirrors: Path) -> None:
    models = mirrors / "models"
    for repo_id, (arch, plants, date) in PLANTED.items():
        make_checkpoint(models / repo_id, arch, plants)
        commit_folder(models / repo_id, "tiny model", date=date)
    make_checkpoint(models / GATED, "llama", [Plant(3, 10, 20)])
    commit_folder(models / GATED, "gated", date="2026-11-04T00:00:00Z")
    remote = make_checkpoint(models / REMOTE, "llama", [])
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (remote / "config.json").write_text(json.dumps(config))
    commit_folder(remote, "needs remote code", date="2026-11-05T00:00:00Z")
    make_checkpoint(models / WIDE, "llama", [], hidden_size=128, intermediate_size=256)
    commit_folder(models / WIDE, "more parameters", date="2026-11-06T00:00:00Z")
    broken = make_checkpoint(models / BROKEN, "llama", [])
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header intact, data cut
    commit_folder(broken, "truncated weights", date="2026-11-07T00:00:00Z")
    pickle_only = models / PICKLE
    pickle_only.mkdir(parents=True)
    (pickle_only / "config.json").write_text((models / "crawl/llama/config.json").read_text())
    (pickle_only / "pytorch_model.bin").write_bytes(b"not a pickle: never downloaded\n")
    commit_folder(pickle_only, "pickle only", date="2026-11-08T00:00:00Z")
    (models / GGUF).mkdir(parents=True)
    plain = make_gguf(models / GGUF / "plain.gguf", "llama", [Plant(4, 5, 6)], qtype=GGMLQuantizationType.Q8_0)
    tokenized_gguf(plain, models / GGUF / GGUF_NAME)
    plain.unlink()
    commit_folder(models / GGUF, "one GGUF file", date="2026-10-01T00:00:00Z")


@pytest.fixture(scope="module")
def crawl_hub(tmp_path_factory):
    """olah serving the crawl repos, with a HubFront for /api/models; yields the running olah."""
    root = tmp_path_factory.mktemp("crawl-hub")
    build_crawl_mirrors(root / "mirrors")
    with olah_server(root / "mirrors", root / "olah", probe_repo="crawl/llama") as hub:
        yield hub


@pytest.fixture
def front(crawl_hub):
    """A fresh front (no holds, no faults) on the module's olah."""
    front = serve(HubFront(upstream=crawl_hub.endpoint, mirrors=crawl_hub.mirrors, gated={GATED}))
    yield front
    if not front.stopped.is_set():
        front.stop()


@pytest.fixture
def stores(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    yield catalog, ledger
    catalog.close()
    ledger.close()


def options(front: HubFront, tmp_path: Path, **overrides) -> CrawlOptions:
    hub = HubAccess(endpoint=front.url, attempts=3, backoff=0.05)
    return CrawlOptions(**{"workers": 1, "gpus_per_worker": 0, "hub": hub, "scan": ScanOptions(endpoint=front.url),
                           "scratch": tmp_path / "scratch", **overrides})


def by_repo(report) -> dict[str, dict]:
    return {o["repo_id"]: o for o in report.outcomes}


def found(catalog: Catalog, repo_id: str) -> list[tuple]:
    return catalog.fetch("SELECT layer, out_channel, in_channel FROM catalog WHERE repo_id = ? ORDER BY layer",
                         [repo_id])


def ledger_row(ledger: Ledger, repo_id: str) -> dict:
    (row,) = [r for r in ledger.records() if r["repo_id"] == repo_id]
    return row


# --- discovery and vetting (no Ray) --------------------------------------------------------------

def test_discovery_lists_safetensors_models_newest_first_down_to_since(front):
    hub = HubAccess(endpoint=front.url)
    assert discover(hub=hub, limit=3) == [BROKEN, WIDE, REMOTE]
    assert discover(hub=hub, since=datetime(2026, 11, 4)) == [BROKEN, WIDE, REMOTE, GATED]
    assert PICKLE not in discover(hub=hub)  # no safetensors tag


def test_vetting_pins_the_sha_and_refuses_before_downloading_weights(front, crawl_hub, tmp_path):
    hub = HubAccess(endpoint=front.url)
    ok = vet("crawl/llama", hub=hub, cache_dir=tmp_path)
    assert ok.revision == crawl_hub.sha("crawl/llama") and ok.refusal is None and ok.error is None
    assert ok.parameters > 0 and ok.size_bytes == ok.parameters * 4  # float32

    gated = vet(GATED, hub=hub, cache_dir=tmp_path).refusal
    assert (gated.kind, gated.reconsider) == ("gated", True) and "gated" in str(gated)
    remote = vet(REMOTE, hub=hub, cache_dir=tmp_path)
    assert remote.refusal.kind == "remote_code" and not remote.refusal.reconsider
    assert str(remote.refusal).startswith(f"{REMOTE}@{remote.revision[:12]}: config.json needs custom code from the repo")
    pickled = vet(PICKLE, hub=hub, cache_dir=tmp_path).refusal
    assert pickled.kind == "unsafe" and str(pickled).startswith("only pickle weights (pytorch_model.bin)")
    wide = vet(WIDE, hub=hub, max_params=ok.parameters, cache_dir=tmp_path)
    assert str(wide.refusal) == f"{wide.parameters:,} parameters, over the limit of {ok.parameters:,}"
    assert (wide.refusal.kind, wide.refusal.limit, wide.refusal.value, wide.refusal.bound) == (
        "limit", "max_params", wide.parameters, ok.parameters)
    big = vet("crawl/llama", hub=hub, max_bytes=1000, cache_dir=tmp_path).refusal
    assert (big.limit, big.value, big.bound, big.reconsider) == ("max_cache_gb", ok.size_bytes, 1000, True)
    assert not any(p.suffix == ".safetensors" for p in tmp_path.rglob("*"))  # headers read, no weights saved


@pytest.mark.parametrize("failing", ["/api/models/", "/config.json"])
def test_vetting_retries_a_flaky_hub_then_succeeds(front, tmp_path, failing):
    front.fail_pattern, front.fail_next = failing, 2  # two 503s, then the real answers
    candidate = vet("crawl/llama", hub=HubAccess(endpoint=front.url, attempts=3, backoff=0.01), cache_dir=tmp_path)
    assert candidate.error is None and candidate.revision


# --- crawls on Ray -------------------------------------------------------------------------------

def test_a_crawl_scans_records_and_refuses_and_a_rerun_does_only_new_work(ray_cluster, front, crawl_hub, stores,
                                                                         tmp_path):
    catalog, ledger = stores
    repos = discover(hub=HubAccess(endpoint=front.url)) + [PICKLE]
    limit = max(vet(r, hub=HubAccess(endpoint=front.url), cache_dir=tmp_path).parameters for r in PLANTED)
    report = crawl(repos, catalog=catalog, ledger=ledger, options=options(front, tmp_path, workers=2,
                                                                          max_params=limit))
    outcomes = by_repo(report)
    assert {r: o["state"] for r, o in outcomes.items()} == {
        "crawl/llama": "succeeded", "crawl/qwen2": "succeeded", "crawl/clean": "succeeded",
        GATED: "refused", REMOTE: "refused", WIDE: "refused", PICKLE: "refused", BROKEN: "failed"}
    assert found(catalog, "crawl/llama") == [(3, 10, 20)]
    assert found(catalog, "crawl/qwen2") == [(2, 7, 99)]
    assert found(catalog, "crawl/clean") == [(None, None, None)]  # scanned, none found
    for repo in (GATED, REMOTE, WIDE, PICKLE, BROKEN):  # never in the catalog
        assert found(catalog, repo) == []
    assert outcomes[BROKEN]["error"].startswith(f"{BROKEN}@{crawl_hub.sha(BROKEN)[:12]}/model.safetensors: tensor ")
    assert outcomes[BROKEN]["error"].endswith("the file is truncated or its header lies")
    assert (ledger_row(ledger, BROKEN)["state"], ledger_row(ledger, BROKEN)["refusal"]) == ("failed", None)
    assert {r: ledger_row(ledger, r)["refusal"] for r in (GATED, REMOTE, WIDE, PICKLE)} == {
        GATED: "gated", REMOTE: "remote_code", WIDE: "limit", PICKLE: "unsafe"}  # kinds, not words, decide
    assert list((tmp_path / "scratch").rglob("*.safetensors")) == []  # read remotely: never on disk
    costs = ledger_row(ledger, "crawl/llama")
    assert costs["bytes_fetched"] > 0 and costs["requests"] >= 2  # a header read, then the layers
    assert costs["network_seconds"] >= 0 and costs["compute_seconds"] > 0

    again = crawl(repos, catalog=catalog, ledger=ledger, options=options(front, tmp_path, max_params=limit))
    states = {r: o["state"] for r, o in by_repo(again).items()}
    assert states.pop(BROKEN) == "failed"  # failures are tried again
    assert (states.pop(GATED), states.pop(WIDE)) == ("refused", "refused")  # gating and limits: vetted again
    assert set(states.values()) == {"skipped"}
    assert ledger_row(ledger, "crawl/llama")["attempts"] == 1


def test_a_gguf_repo_is_crawled_under_its_file_and_a_rerun_skips_it(ray_cluster, front, crawl_hub, stores,
                                                                    tmp_path):
    catalog, ledger = stores
    first = crawl([GGUF], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    assert first.outcomes[0]["state"] == "succeeded", first.outcomes[0].get("error")
    assert catalog.fetch("SELECT revision, artifact, dtype, layer, out_channel, in_channel FROM catalog "
                         "WHERE repo_id = ?", [GGUF]) == [(crawl_hub.sha(GGUF), GGUF_NAME, "Q8_0", 4, 5, 6)]
    row = ledger_row(ledger, GGUF)
    assert (row["state"], row["revision"], row["artifact"]) == ("succeeded", crawl_hub.sha(GGUF), GGUF_NAME)
    again = crawl([GGUF], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    assert again.outcomes[0] == {**again.outcomes[0], "state": "skipped", "reason": "already succeeded"}
    assert ledger_row(ledger, GGUF)["attempts"] == 1  # one row: the vetted key is the key the scan wrote


def weights_of(repo_id: str) -> str:
    """The pattern of a scan's weight downloads of `repo_id` (what a worker fetches, not the vetting)."""
    return rf"/{repo_id}/resolve/\w+/model\.safetensors"


def worker_pids() -> set[int]:
    """PIDs of live Ray scan-worker processes (Ray titles them ray::ScanWorker...)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::ScanWorker"):
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


def test_a_worker_killed_mid_scan_is_replaced_and_its_model_retried(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    held = front.hold(weights_of("crawl/qwen2"))  # the scan's downloads wait here
    earlier = worker_pids()  # of earlier tests, perhaps still exiting
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(crawl, ["crawl/qwen2"], catalog=catalog, ledger=ledger,
                              options=options(front, tmp_path))
        assert held.arrived.wait(WAIT), "the scan never asked for its files"
        (pid,) = worker_pids() - earlier
        os.kill(pid, signal.SIGKILL)
        front.holds.remove(held)
        held.release.set()
        report = running.result(timeout=WAIT)
    assert by_repo(report)["crawl/qwen2"]["state"] == "succeeded"
    assert found(catalog, "crawl/qwen2") == [(2, 7, 99)]
    assert ledger_row(ledger, "crawl/qwen2")["attempts"] == 2
    assert pid not in worker_pids()


def test_the_first_model_is_scanned_while_the_next_is_still_being_vetted(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    held = front.hold(r"/crawl/qwen2/resolve/\w+/config\.json")  # the second model's vetting waits here
    scanned = threading.Event()

    def on_update(report):
        if by_repo(report).get("crawl/llama", {}).get("state") == "succeeded":
            scanned.set()

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(crawl, ["crawl/llama", "crawl/qwen2"], catalog=catalog, ledger=ledger,
                              options=options(front, tmp_path), on_update=on_update)
        assert held.arrived.wait(WAIT), "the second model was never vetted"
        first_done = scanned.wait(WAIT)  # with the second model's vetting still held
        front.holds.remove(held)
        held.release.set()
        report = running.result(timeout=WAIT)
    assert first_done, "the first scan waited for the vetting of every model"
    assert [o["state"] for o in report.outcomes] == ["succeeded", "succeeded"]
    assert report.vet_seconds > 0 and found(catalog, "crawl/qwen2") == [(2, 7, 99)]


def test_the_hub_going_away_mid_crawl_fails_that_model_and_keeps_the_rest(ray_cluster, front, crawl_hub, stores,
                                                                          tmp_path):
    catalog, ledger = stores
    held = front.hold(weights_of("crawl/qwen2"))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(crawl, ["crawl/llama", "crawl/qwen2"], catalog=catalog, ledger=ledger,
                              options=options(front, tmp_path))
        assert held.arrived.wait(WAIT)  # llama is done (one worker), qwen2 is downloading
        front.stop()
        report = running.result(timeout=WAIT)
    outcomes = by_repo(report)
    assert outcomes["crawl/llama"]["state"] == "succeeded"
    assert outcomes["crawl/qwen2"]["state"] == "failed"
    assert "Hub request to" in outcomes["crawl/qwen2"]["error"]
    assert found(catalog, "crawl/llama") == [(3, 10, 20)] and found(catalog, "crawl/qwen2") == []

    back = serve(HubFront(upstream=crawl_hub.endpoint, mirrors=crawl_hub.mirrors))  # the Hub is back
    try:
        report = crawl(["crawl/llama", "crawl/qwen2"], catalog=catalog, ledger=ledger, options=options(back, tmp_path))
    finally:
        back.stop()
    assert {r: o["state"] for r, o in by_repo(report).items()} == {"crawl/llama": "skipped", "crawl/qwen2": "succeeded"}
    assert found(catalog, "crawl/qwen2") == [(2, 7, 99)]


def test_a_scan_past_its_timeout_fails_alone(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    held = front.hold(weights_of("crawl/qwen2"))  # never released: the download hangs
    # 8 s: far past what the next model's whole scan takes on a fresh worker (its imports included,
    # about 2 s here), so that one must succeed; the held download is killed at 8 s + 4 s of grace.
    report = crawl(["crawl/qwen2", "crawl/llama"], catalog=catalog, ledger=ledger,
                   options=options(front, tmp_path, timeout=8))
    held.release.set()
    outcomes = by_repo(report)
    assert outcomes["crawl/qwen2"]["state"] == "failed" and "timed out after 8 s" in outcomes["crawl/qwen2"]["error"]
    assert ledger_row(ledger, "crawl/qwen2")["attempts"] == 1  # a timeout is not retried
    assert outcomes["crawl/llama"]["state"] == "succeeded"  # on a fresh worker: the stuck one was killed
    assert ledger_row(ledger, "crawl/llama")["attempts"] == 1


def test_two_crawls_at_once_scan_each_model_once(ray_cluster, front, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    repos = list(PLANTED)
    gate = threading.Barrier(2)

    def one_crawl(name: str):
        with Catalog(tmp_path / f"{name}.duckdb") as catalog:
            ledger = Ledger(url)
            gate.wait(timeout=WAIT)
            try:
                return crawl(repos, catalog=catalog, ledger=ledger, options=options(front, tmp_path / name))
            finally:
                ledger.close()

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(one_crawl, ["a", "b"], timeout=WAIT * 2))
    scanned = [o["repo_id"] for r in reports for o in r.outcomes if o["state"] == "succeeded"]
    assert sorted(scanned) == sorted(repos)  # every model once, none twice
    ledger = Ledger(url)
    assert {r["repo_id"]: r["attempts"] for r in ledger.records()} == dict.fromkeys(repos, 1)
    ledger.close()


def test_gpu_workers_take_a_gpu_each_and_work_goes_only_to_started_ones(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores  # the session's Ray declares one GPU: one of the two GPU workers never starts
    report = crawl(["crawl/llama", "crawl/qwen2"], catalog=catalog, ledger=ledger,
                   options=options(front, tmp_path, workers=2, gpus_per_worker=1))
    assert [o["state"] for o in report.outcomes] == ["succeeded", "succeeded"]
    assert [o["gpus"] for o in report.outcomes] == [["0"], ["0"]]
    assert len({o["worker"] for o in report.outcomes}) == 1


def test_no_room_for_any_worker_is_one_error_and_leaves_the_models_queued(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    with pytest.raises(NoWorkers, match=r"no scan worker started within 2 s: the Ray cluster has no room for an "
                                        r"actor with 2 GPU\(s\)"):
        crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path, gpus_per_worker=2,
                                                                               start_timeout=2))
    assert ledger_row(ledger, "crawl/llama")["state"] == "queued"


# --- the command ---------------------------------------------------------------------------------

def run_crawl_cli(*args: str, home: Path, front: HubFront, address: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "SUPERWEIGHT_HOME": str(home), "HF_ENDPOINT": front.url, "HF_HOME": str(home / "hf")}
    return subprocess.Popen([CLI, "crawl", *args, "--address", address, "--workers", "1", "--gpus-per-worker", "0",
                             "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def crawl_again(repo_id: str, *, home: Path, front: HubFront) -> dict:
    """Crawl `repo_id` in this process, on the stores a CLI crawl with SUPERWEIGHT_HOME=`home` used; its outcome."""
    ledger = Ledger(f"sqlite:///{home / 'ledger.sqlite'}")
    try:
        with Catalog(home / "catalog.duckdb") as catalog:
            (outcome,) = crawl([repo_id], catalog=catalog, ledger=ledger, options=options(front, home)).outcomes
        outcome["attempts"] = ledger_row(ledger, repo_id)["attempts"]
    finally:
        ledger.close()
    return outcome


def test_the_command_joins_the_cluster_and_exits_3_when_a_model_failed(ray_cluster, front, tmp_path):
    site = tmp_path / "site"
    done = run_crawl_cli("crawl/llama", BROKEN, "--json", "--publish", str(site), home=tmp_path, front=front,
                         address=ray_cluster)
    stdout, stderr = done.communicate(timeout=WAIT * 2)
    assert done.returncode == 3, stderr
    *outcomes, summary, published = stdout.splitlines()
    assert published.startswith(f"{site}: 1 rows, sha256 ")  # published after the crawl: llama only
    assert json.loads((site / "catalog.json").read_text())["rows"] == 1
    outcomes, summary = [json.loads(line) for line in outcomes], json.loads(summary)
    assert {o["repo_id"]: o["state"] for o in outcomes} == {"crawl/llama": "succeeded", BROKEN: "failed"}
    assert summary["summary"]["succeeded"] == 1 and summary["summary"]["failed"] == 1
    (weight,) = next(o for o in outcomes if o["repo_id"] == "crawl/llama")["super_weights"]
    assert weight["ppl_ratio"] > 0 and weight["verdict"] == "inert"  # verified by default; a random model's is inert
    with Catalog(tmp_path / "catalog.duckdb", read_only=True) as catalog:
        assert found(catalog, "crawl/llama") == [(3, 10, 20)]


def test_the_index_can_be_queried_and_exported_while_a_crawl_writes_it(ray_cluster, front, tmp_path):
    assert crawl_again("crawl/qwen2", home=tmp_path, front=front)["state"] == "succeeded"  # a first row
    held = front.hold(weights_of("crawl/llama"))
    running = run_crawl_cli("crawl/llama", "--no-verify", home=tmp_path, front=front, address=ray_cluster)
    try:
        assert held.arrived.wait(WAIT)  # the crawl is running, between two writes of the catalog
        env = {**os.environ, "SUPERWEIGHT_HOME": str(tmp_path)}
        query = subprocess.run([CLI, "query", "SELECT repo_id, layer FROM catalog", "--json"], env=env,
                               capture_output=True, text=True, timeout=WAIT)
        export = subprocess.run([CLI, "export", "--out", str(tmp_path / "out" / "catalog.parquet")], env=env,
                                capture_output=True, text=True, timeout=WAIT)
    finally:
        front.holds.remove(held)
        held.release.set()
    assert query.returncode == 0, query.stderr
    assert [json.loads(line) for line in query.stdout.splitlines()] == [{"repo_id": "crawl/qwen2", "layer": 2}]
    assert export.returncode == 0, export.stderr
    assert export.stdout.startswith(f"{tmp_path / 'out' / 'catalog.parquet'}: 1 rows, sha256 ")
    stdout, stderr = running.communicate(timeout=WAIT * 2)
    assert running.returncode == 0, stderr
    with Catalog(tmp_path / "catalog.duckdb", read_only=True) as catalog:
        assert found(catalog, "crawl/llama") == [(3, 10, 20)]  # and the crawl wrote its result after


def test_ctrl_c_gives_the_model_back_and_a_rerun_finishes_it(ray_cluster, front, tmp_path):
    held = front.hold(weights_of("crawl/llama"))
    proc = run_crawl_cli("crawl/llama", home=tmp_path, front=front, address=ray_cluster)
    assert held.arrived.wait(WAIT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=WAIT)
    front.holds.remove(held)
    held.release.set()
    assert proc.returncode != 0
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    assert ledger_row(ledger, "crawl/llama")["state"] == "queued"  # given back, not left running
    ledger.close()

    again = crawl_again("crawl/llama", home=tmp_path, front=front)  # the CLI's part was the Ctrl-C
    assert crawl_line(again).endswith("succeeded  layer 3 [10, 20] = 2.5")  # no verdict, no ppl


def test_a_local_folder_is_crawled_under_its_content_hash(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    folder = make_checkpoint(tmp_path / "local-llama", "llama", [Plant(4, 5, 6)])
    report = crawl([str(folder)], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    (outcome,) = report.outcomes
    assert outcome["state"] == "succeeded" and len(outcome["revision"]) == 64  # sha256 of config and weights
    assert [(w["layer"], w["out_channel"], w["in_channel"]) for w in outcome["super_weights"]] == [(4, 5, 6)]
    assert ledger_row(ledger, str(folder))["revision"] == outcome["revision"]


def test_a_killed_crawl_resumes_once_its_leases_expire(ray_cluster, front, tmp_path):
    held = front.hold(weights_of("crawl/llama"))
    proc = run_crawl_cli("crawl/llama", "--lease-seconds", "1", home=tmp_path, front=front, address=ray_cluster,
                         start_new_session=True)
    assert held.arrived.wait(WAIT)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to give anything back
    proc.communicate(timeout=WAIT)
    front.holds.remove(held)
    held.release.set()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    assert ledger_row(ledger, "crawl/llama")["state"] == "running"  # left claimed by the dead crawl
    ledger.close()

    time.sleep(1.5)  # the dead crawl's 1 s lease runs out
    again = crawl_again("crawl/llama", home=tmp_path, front=front)
    assert (again["state"], again["attempts"]) == ("succeeded", 2)


def test_a_new_worker_deletes_downloads_left_by_dead_workers(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    host = socket.gethostname()
    dead = tmp_path / "scratch" / f"{host}-{2**22 + 12345}" / "org--model"  # beyond pid_max: never alive
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"left by a killed worker")
    report = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    assert report.outcomes[0]["state"] == "succeeded"
    assert not dead.parent.exists()


def test_a_refusal_for_this_runs_limits_is_reconsidered_and_a_missing_catalog_row_rescanned(ray_cluster, front,
                                                                                         tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    with Catalog(tmp_path / "first.duckdb") as catalog:
        first = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path, max_params=10))
        assert first.outcomes[0] == {**first.outcomes[0], "state": "refused", "refusal": "limit", "limit": "max_params"}
        assert ledger.records()[0]["refusal"] == "limit"  # a kind the next crawl reconsiders
        second = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
        assert second.outcomes[0]["state"] == "succeeded"  # the limit is gone: vetted again and scanned
    with Catalog(tmp_path / "second.duckdb") as fresh:  # a new catalog: the ledger alone must not skip
        third = crawl(["crawl/llama"], catalog=fresh, ledger=ledger, options=options(front, tmp_path))
        assert third.outcomes[0]["state"] == "succeeded" and found(fresh, "crawl/llama") == [(3, 10, 20)]
        fourth = crawl(["crawl/llama"], catalog=fresh, ledger=ledger, options=options(front, tmp_path))
        assert fourth.outcomes[0] == {**fourth.outcomes[0], "state": "skipped", "reason": "already succeeded"}
    ledger.close()


def test_a_downloading_crawl_scans_from_scratch_disk_and_cleans_up(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    report = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path, download=True))
    assert report.outcomes[0]["state"] == "succeeded" and found(catalog, "crawl/llama") == [(3, 10, 20)]
    assert list((tmp_path / "scratch").rglob("*.safetensors")) == []  # deleted after the scan
    row = ledger_row(ledger, "crawl/llama")
    assert row["bytes_fetched"] > 0 and row["network_seconds"] > 0  # the download is network time


def test_a_bad_repo_id_is_refused_without_ending_the_crawl(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    report = crawl(["not a repo id!", "crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    assert [o["state"] for o in report.outcomes] == ["refused", "succeeded"]
    assert "not a Hub repo id" in report.outcomes[0]["error"]


def test_a_flaky_download_in_a_worker_is_retried(ray_cluster, front, stores, tmp_path):
    catalog, ledger = stores
    front.fail_pattern, front.fail_next = weights_of("crawl/llama"), 2  # the weights answer 503 twice
    report = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    assert report.outcomes[0]["state"] == "succeeded", report.outcomes[0].get("error")
    assert front.fail_next == 0  # the faults were met, not bypassed


def test_a_verifying_crawl_rescans_an_unverified_success_and_records_its_effects(ray_cluster, front, stores,
                                                                                 tmp_path):
    from superweight.scanner.verify import VerifyConfig

    catalog, ledger = stores
    quick = VerifyConfig(tokens=256, context=64)
    verifying = options(front, tmp_path, scan=ScanOptions(endpoint=front.url, verify=quick))
    plain = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=options(front, tmp_path))
    assert plain.outcomes[0]["state"] == "succeeded" and plain.outcomes[0]["super_weights"][0]["ppl_ratio"] is None

    verified = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=verifying)
    (weight,) = verified.outcomes[0]["super_weights"]
    assert verified.outcomes[0]["state"] == "succeeded" and weight["ppl_ratio"] > 0
    row = catalog.fetch("SELECT ppl_ratio, control_ppl_ratio, kl, eval_tokens FROM catalog "
                        "WHERE repo_id = 'crawl/llama'")
    assert row == [(weight["ppl_ratio"], row[0][1], row[0][2], 256)] and row[0][2] > 0

    again = crawl(["crawl/llama"], catalog=catalog, ledger=ledger, options=verifying)
    assert again.outcomes[0] == {**again.outcomes[0], "state": "skipped", "reason": "already succeeded"}


@pytest.mark.slow  # a CLI subprocess starting its own local Ray: about 15 s
def test_a_crawl_on_its_own_local_ray_warns_of_nothing_the_user_cannot_act_on(tmp_path):
    """README command 1: Ray's notice that it turned token authentication on for the cluster it started
    is not shown; token authentication stays on (Ray writes the cluster's token)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", [Plant(3, 10, 20)])
    env = {**os.environ, "SUPERWEIGHT_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_MODE")  # as a user's shell has it: unset
    done = subprocess.run([CLI, "crawl", str(ckpt), "--no-verify"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.splitlines()[0].endswith("succeeded  layer 3 [10, 20] = 2.5")
    assert (tmp_path / ".ray" / "auth_token").is_file()
