"""Benchmark the crawl: models per minute with 1 and 2 Ray workers, and where the workers' time goes.

Usage: python bench/crawl.py [--models N] [--keep]

One run does everything:

1. Generates N Llama-shaped float32 checkpoints (hidden 256, 8 layers, ~27 MB each) with a planted
   super weight, commits each as a git repo, and serves them through a local Hub: olah on loopback
   with the tests' HubFront answering /api/models (tests/hub_server.py, tests/hub_front.py).
2. Crawls all N models discovered through the Hub twice: with 1 worker and with 2 workers, each
   time on a fresh local Ray (2 CPUs, loopback, the scan worker's modules preloaded, as `superweight
   crawl` starts one) with a fresh catalog, ledger and scratch, so every model is read and scanned
   again. Wall time is the `crawl()` call, from vetting to the last result written, and includes
   starting the worker actors (each imports torch and transformers once, about 4 s here).
3. Prints models per minute for each, their ratio (2 workers / 1 worker), and the share of the
   workers' time spent waiting on the network vs computing (each scan's own network and compute seconds).
   Exits 1 if a crawl misses a planted super weight.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback (NOTES.md)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import ray  # noqa: E402

from superweight.index.catalog import Catalog  # noqa: E402
from superweight.index.crawl import PRELOADED, CrawlOptions, crawl  # noqa: E402
from superweight.index.ledger import Ledger  # noqa: E402
from superweight.index.crawl import HubAccess, discover  # noqa: E402
from superweight.scanner.scan import ScanOptions  # noqa: E402
from tests.checkpoints import Plant, make_checkpoint  # noqa: E402
from tests.hub_front import HubFront, serve  # noqa: E402
from tests.hub_server import commit_folder, olah_server  # noqa: E402

PLANT = Plant(3, 10, 20)
SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8)


def build(mirrors: Path, count: int) -> list[str]:
    repos = []
    for i in range(count):
        repo_id = f"bench/llama-{i:02d}"
        make_checkpoint(mirrors / "models" / repo_id, "llama", [PLANT], seed=i, **SHAPE)
        commit_folder(mirrors / "models" / repo_id, "bench model", date=f"2026-11-{i + 1:02d}T00:00:00Z")
        repos.append(repo_id)
    return repos


def run(url: str, repos: list[str], workers: int, work: Path) -> dict:
    """Crawl `repos` from the Hub at `url` with `workers` workers into a fresh catalog and ledger under `work`,
    on a fresh local Ray that preloads the scan worker's modules, as `superweight crawl` starts one.

    The wall time is the crawl() call: vetting, starting the actors, the scans and writing the results.
    """
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
             _system_config={"preload_python_modules": list(PRELOADED)})
    options = CrawlOptions(workers=workers, hub=HubAccess(endpoint=url), scan=ScanOptions(endpoint=url),
                           scratch=work / "scratch")
    try:
        with Catalog(work / "catalog.duckdb") as catalog:
            ledger = Ledger(f"sqlite:///{work / 'ledger.sqlite'}")
            start = time.perf_counter()
            report = crawl(repos, catalog=catalog, ledger=ledger, options=options)
            wall = time.perf_counter() - start
            ledger.close()
            found = catalog.fetch("SELECT count(*) FROM catalog WHERE layer = ? AND out_channel = ? AND in_channel = ?",
                                  [PLANT.layer, PLANT.row, PLANT.col])[0][0]
    finally:
        ray.shutdown()
    return {"wall": wall, "found": found, "succeeded": report.counts["succeeded"], "vet": report.vet_seconds,
            "download": report.network_seconds, "scan": report.compute_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the generated repos and results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="superweight-bench-crawl-"))
    try:
        t0 = time.perf_counter()
        build(root / "mirrors", args.models)
        print(f"generated {args.models} checkpoints in {time.perf_counter() - t0:.1f} s under {root}")
        with olah_server(root / "mirrors", root / "olah", probe_repo="bench/llama-00") as hub:
            front = serve(HubFront(upstream=hub.endpoint, mirrors=hub.mirrors))
            repos = discover(hub=HubAccess(endpoint=front.url), limit=args.models)
            results = {w: run(front.url, repos, w, root / f"workers-{w}") for w in (1, 2)}
            front.stop()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ok = True
    for workers, r in results.items():
        per_min = r["succeeded"] / r["wall"] * 60
        share = r["download"] / (r["download"] + r["scan"])
        print(f"{workers} worker(s): {r['succeeded']}/{len(repos)} scanned in {r['wall']:.1f} s = {per_min:.1f} models/min "
              f"(every model vetted by {r['vet']:.1f} s); "
              f"worker time: download {r['download']:.1f} s, scan {r['scan']:.1f} s "
              f"(download share {share:.2f}, download/scan {r['download'] / r['scan']:.2f})")
        ok &= r["found"] == len(repos)
    ratio = (results[2]["succeeded"] / results[2]["wall"]) / (results[1]["succeeded"] / results[1]["wall"])
    print(f"throughput 2 workers / 1 worker: {ratio:.2f} (2 CPUs on this machine)")
    if not ok:
        print("a crawl missed a planted super weight", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
