"""The crawl's driver: vet and queue models, scan them on Ray workers, and be the one writer of the results.

The driver vets each model against the Hub (pinned sha, safetensors, no remote code, size; vet.py),
skips what the ledger says is settled for this scanner version, and hands the rest to Ray actors
(worker.py, in a WorkerPool: pool.py) one model per actor at a time, as each is vetted: the first
scans start while the rest are still being checked. Workers read each model's
weights straight from the Hub by range requests, keeping its layers in memory while they fit the
worker's share of `max_cache_gb`; with `download`, they download to scratch disk instead, within a
disk budget of `max_cache_gb` for downloads in flight. Each model is claimed in the ledger first, under a lease the driver keeps renewing, so
two crawls never scan the same model. Results come back as dicts and the driver writes the catalog
and the ledger.

Faults: a worker process that dies is replaced by a fresh actor and its model retried (up to
`retries` times); a scan past its timeout is stopped by the worker itself, or its actor is killed;
a failed model is recorded as failed and the crawl goes on. Ctrl-C gives the claimed models back (queued);
a crawl killed outright leaves leases that expire, and a re-run picks those models up.
"""

import logging
import os
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray

from superweight.scanner import __version__
from superweight.scanner.config import SUPERWEIGHT_HOME
from superweight.scanner.errors import first_line, outcome_of, reconsidered
from superweight.scanner.hub import EXAMPLE_PREFIX, source_name
from superweight.scanner.scan import ScanOptions

from ..catalog import Catalog
from ..errors import NoWorkers
from ..ledger import Ledger, costs_of
from .pool import Finished, Job, WorkerPool
from .vet import HubAccess, VettedModel, vet
from .worker import WorkerConfig, actor_class

logger = logging.getLogger(__name__)

VET_THREADS = 4  # models vetted at once: each is a few small Hub requests
VET_POLL = 0.2  # seconds a busy pool waits for a scan before it looks at the vetting again


@dataclass(frozen=True)
class CrawlOptions:
    """How a crawl runs; the defaults are the embedded ones."""

    workers: int | None = None  # None: one per GPU of the cluster, else one per 2 CPUs
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    timeout: float = 1800.0  # seconds per model, download included
    retries: int = 2  # more attempts for a model whose worker process died
    max_cache_gb: float = 50.0  # memory for kept layers, all workers together (with `download`: disk in flight)
    download: bool = False  # download each model to scratch disk rather than read it remotely
    max_requests_per_5min: int | None = None  # the Hub request budget, shared out among the workers
    max_params: int | None = None
    lease_seconds: float = 300.0  # a killed crawl's models are claimable again after this
    start_timeout: float = 900.0  # seconds to wait for any worker to start (autoscalers add nodes in minutes)
    hub: HubAccess = HubAccess()
    scan: ScanOptions = ScanOptions()
    scratch: Path = SUPERWEIGHT_HOME / "crawl-cache"


@dataclass
class CrawlReport:
    """What a crawl did: one outcome per model, counts by state, and time split."""

    outcomes: list[dict] = field(default_factory=list)
    queued: int = 0
    vet_seconds: float = 0.0  # until the driver's Hub checks had vetted every model (they overlap the scans)
    network_seconds: float = 0.0  # scans waiting on bytes: downloads and range reads
    compute_seconds: float = 0.0  # the rest of the scans
    bytes_fetched: int = 0
    requests: int = 0
    seconds: float = 0.0

    @property
    def counts(self) -> Counter:
        return Counter(o["state"] for o in self.outcomes)

    def add(self, outcome: dict) -> None:
        self.outcomes.append(outcome)


def crawl(repo_ids: list[str], *, catalog: Catalog, ledger: Ledger, options: CrawlOptions = CrawlOptions(),
          on_update: Callable[[CrawlReport], None] | None = None) -> CrawlReport:
    """Scan `repo_ids` on the Ray cluster this process is connected to, writing the results.

    Each model is settled as soon as it is vetted (in the order given), and the actors start with
    the first model to scan: the Hub checks of the rest overlap the first scans.

    Args:
        repo_ids: Hub ids, in the order to scan them.
        catalog: the one writer of the catalog.
        ledger: the scan ledger (shared with other crawls).
        on_update: called with the report after each model settles, e.g. to draw progress.

    Returns:
        The report; models whose state is "failed" are in the ledger with their reason.
    """
    start = time.monotonic()
    report = CrawlReport()
    owner = f"crawl:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def check(repo_id: str) -> VettedModel:
        if is_local(repo_id):  # its revision, a content hash, is known only once scanned: always scanned
            return VettedModel(repo_id, revision="")
        try:
            return vet(repo_id, hub=options.hub, max_params=options.max_params, cache_dir=options.scratch / "vet",
                       max_bytes=int(options.max_cache_gb * 1e9) if options.download else None)
        except Exception as e:  # one model's surprise must not end the crawl
            return VettedModel(repo_id, "", error=f"{repo_id}: vetting failed ({type(e).__name__}: {first_line(e)})")

    vetting = _Vetting(list(dict.fromkeys(map(source_name, repo_ids))), check)  # once each, folders by path
    try:
        _run(vetting, report, catalog=catalog, ledger=ledger, options=options, owner=owner,
             update=on_update or (lambda _: None))
    finally:
        vetting.close()  # Ctrl-C: do not vet the rest first
    report.vet_seconds = vetting.seconds
    report.seconds = time.monotonic() - start
    return report


class _Vetting:
    """Models vetted VET_THREADS at a time (Hub round trips overlap), handed out in the order given."""

    def __init__(self, repo_ids: list[str], check: Callable[[str], VettedModel]):
        self._start = time.monotonic()
        self._executor = ThreadPoolExecutor(VET_THREADS)
        self._futures = deque(self._executor.submit(check, r) for r in repo_ids)
        self.seconds = 0.0  # until the last model was vetted

    @property
    def pending(self) -> bool:
        return bool(self._futures)

    def ready(self) -> Iterator[VettedModel]:
        """The next models in order whose vetting has finished; none if the next one is still out."""
        while self._futures and self._futures[0].done():
            yield self._futures.popleft().result()
            if not self._futures:
                self.seconds = time.monotonic() - self._start

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the next model's vetting."""
        if self._futures:
            wait_for([self._futures[0]], timeout=timeout)

    def close(self) -> None:
        self._executor.shutdown(cancel_futures=True)


def is_local(source: str) -> bool:
    """A folder or a built-in example rather than a Hub id (on a cluster, it must exist on every worker)."""
    return source.startswith(EXAMPLE_PREFIX) or Path(source).expanduser().exists()


def _settle_without_scan(vetted: VettedModel, ledger: Ledger, catalog: Catalog, owner: str, *,
                         verify: bool = False) -> tuple[dict | None, tuple[str, ...]]:
    """Record a model that needs no scan (settled, refused, unvettable).

    Returns:
        Its outcome, or None if it is to be scanned; and the settled state its claim may take over.

    Skipped: a key that succeeded and is in this catalog, or that was refused for a reason that
    holds for the commit. A refusal of a reconsidered kind (a limit, gating) is vetted again, and a
    success missing from this catalog (a new --catalog, a lost volume) is scanned again, and so is
    one without measured effects when this crawl verifies.
    """
    key = (vetted.repo_id, vetted.revision, __version__, vetted.artifact)
    outcome = {"repo_id": vetted.repo_id, "revision": vetted.revision}
    record = ledger.record(*key)
    state = record["state"] if record else None
    if state == "succeeded" and catalog.has_scan(*key, verified=verify):
        return {**outcome, "state": "skipped", "reason": "already succeeded"}, ()
    if state == "refused" and not reconsidered(record["refusal"]):
        return {**outcome, "state": "skipped", "reason": "already refused"}, ()
    also = (state,) if state in ("succeeded", "refused") else ()
    ledger.queue(*key)
    if vetted.refusal is None and vetted.error is None:
        return None, also
    record_id = ledger.claim(*key, owner=owner, lease_seconds=60, also=also)
    if record_id is None:
        return {**outcome, "state": "skipped", "reason": "another crawl holds it"}, ()
    settled = outcome_of(vetted.refusal) if vetted.refusal else {"state": "failed", "error": vetted.error}
    ledger.finish(record_id, settled["state"], error=settled["error"], refusal=settled.get("refusal"), owner=owner)
    return {**outcome, **settled}, ()


def _run(vetting: _Vetting, report: CrawlReport, *, catalog, ledger, options: CrawlOptions, owner: str,
         update) -> None:
    """Settle each model as its vetting comes in, and scan those that need it on a pool of actors until
    every model has settled. The pool starts with the first model to scan (a crawl with nothing new
    starts no actor: on an autoscaling cluster, no node).

    A model goes only to an actor that has started: on an autoscaling cluster some actors wait for
    a node, and the others work meanwhile.
    """
    queue: list[Job] = []
    pool, gpus = None, 0.0
    last_renewal = starved_since = time.monotonic()
    try:
        while vetting.pending or queue or (pool is not None and pool.jobs):
            _take_vetted(vetting, queue, report, ledger=ledger, catalog=catalog, owner=owner,
                         verify=options.scan.verify is not None)
            if queue and pool is None:
                make_actor, gpus = _actor_factory(options)
                pool, starved_since = WorkerPool(make_actor, _worker_count(options)), time.monotonic()
            if pool is not None:
                _submit_what_fits(queue, pool, report, ledger=ledger, options=options, owner=owner)
            report.queued = len(queue) + (len(pool.jobs) if pool is not None else 0)
            update(report)
            if pool is None or not pool.jobs:  # work waits for an actor to start, or for vetting
                if queue and time.monotonic() - starved_since > options.start_timeout:
                    raise NoWorkers(f"no scan worker started within {options.start_timeout:.0f} s: the Ray cluster "
                                    f"has no room for an actor with {gpus:g} GPU(s) and 1 CPU; add nodes, or "
                                    "pass --gpus-per-worker 0 to scan on CPUs")
                if queue:
                    pool.wait_for_a_start(timeout=1.0)
                else:
                    vetting.wait(timeout=1.0)
                continue
            starved_since = time.monotonic()
            wait = VET_POLL if vetting.pending else min(1.0, options.lease_seconds / 4)
            for finished in pool.next_finished(timeout=wait):
                retry = _finish(finished, report, catalog=catalog, ledger=ledger, options=options, owner=owner)
                if retry is not None:
                    queue.insert(0, retry)
            # The worker stops itself at the timeout if it can; one stuck in a download is killed after a grace.
            pool.kill_stuck(options.timeout + min(60.0, options.timeout / 2))
            if time.monotonic() - last_renewal > options.lease_seconds / 3:
                ledger.renew(owner, lease_seconds=options.lease_seconds)
                last_renewal = time.monotonic()
        report.queued = 0
        update(report)
    except BaseException:  # Ctrl-C or a driver error: give the claimed models back
        for job in pool.jobs if pool is not None else ():
            ledger.release(job.record_id, owner=owner)
        raise
    finally:
        if pool is not None:
            pool.shutdown()


def _take_vetted(vetting: _Vetting, queue: list[Job], report: CrawlReport, *, ledger, catalog, owner: str,
                 verify: bool) -> None:
    """Settle the models whose vetting is done: recorded in the report, or queued to be scanned."""
    for vetted in vetting.ready():
        outcome, also = _settle_without_scan(vetted, ledger, catalog, owner, verify=verify)
        if outcome is not None:
            report.add(outcome)
        else:
            queue.append(Job(vetted, record_id=0, also=also))


def _submit_what_fits(queue: list[Job], pool: WorkerPool, report: CrawlReport, *, ledger: Ledger,
                      options: CrawlOptions, owner: str) -> None:
    """Claim and submit queued models while a started actor is free (and, downloading, their downloads fit
    the disk budget).

    The first model always goes, however large: the budget bounds models in flight at once.
    """
    budget = int(options.max_cache_gb * 1e9) if options.download else float("inf")
    used = sum(j.model.size_bytes or 0 for j in pool.jobs)
    while queue and pool.has_free_worker() and (not pool.jobs or used + (queue[0].model.size_bytes or 0) <= budget):
        job = queue.pop(0)
        job.record_id = ledger.claim(job.model.repo_id, job.model.revision, __version__, job.model.artifact,
                                     owner=owner, lease_seconds=options.lease_seconds, also=job.also)
        if job.record_id is None:
            report.add({"repo_id": job.model.repo_id, "revision": job.model.revision,
                        "state": "skipped", "reason": "another crawl holds it"})
            continue
        pool.submit(job, timeout=options.timeout)
        used += job.model.size_bytes or 0


def _gpus_per_worker(options: CrawlOptions) -> float:
    if options.gpus_per_worker is not None:
        return options.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _actor_factory(options: CrawlOptions):
    """A function that starts one scan worker actor, and the GPUs each gets."""
    gpus, workers = _gpus_per_worker(options), _worker_count(options)
    share = options.max_requests_per_5min and max(1, options.max_requests_per_5min // workers)
    scan = replace(options.scan, download=options.download, max_requests_per_5min=share or None,
                   cache_gb=options.scan.cache_gb if options.download else options.max_cache_gb / workers)
    config = WorkerConfig(scratch=options.scratch, options=scan, hub_attempts=options.hub.attempts,
                          hub_backoff=options.hub.backoff)
    worker = actor_class(num_gpus=gpus, num_cpus=1)
    return (lambda: worker.remote(config)), gpus


def _worker_count(options: CrawlOptions) -> int:
    """--workers, else one per GPU for GPU workers, else one per 2 CPUs."""
    if options.workers:
        return options.workers
    resources, gpus = ray.cluster_resources(), _gpus_per_worker(options)
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // 2))


def _finish(finished: Finished, report: CrawlReport, *, catalog: Catalog, ledger: Ledger, options: CrawlOptions,
            owner: str) -> Job | None:
    """Record how a job ended, under `owner`'s lease.

    Returns:
        The job to run again (its worker died and retries remain), or None.
    """
    job, outcome = finished.job, finished.outcome
    name = {"repo_id": job.model.repo_id, "revision": job.model.revision}
    if finished.lost is not None:
        what = (f"timed out after {options.timeout:.0f} s" if job.killed
                else f"the worker process died ({type(finished.lost).__name__})")
        error = f"{job.model.repo_id}@{job.model.revision[:12]}: {what}"
        ledger.finish(job.record_id, "failed", error=error, owner=owner)
        if not job.killed and job.attempt <= options.retries:
            logger.warning("%s; trying again (attempt %d)", error, job.attempt + 1)
            return Job(job.model, record_id=0, attempt=job.attempt + 1)
        report.add({**name, "state": "failed", "error": error})
        return None
    if outcome["state"] != "succeeded":
        ledger.finish(job.record_id, outcome["state"], error=outcome["error"], refusal=outcome.get("refusal"),
                      owner=owner)
        report.add({**name, **{k: v for k, v in outcome.items() if k in ("state", "error", "refusal", "limit")}})
        return None
    result = outcome["result"]
    try:
        catalog.record_scan(result)
    except Exception as e:
        ledger.finish(job.record_id, "failed", error=f"catalog write failed: {e}", owner=owner)
        raise
    costs = costs_of(result)
    ledger.finish(job.record_id, "succeeded", revision=result.revision, artifact=result.artifact or "",
                  bytes_read=result.bytes_read, costs=costs, owner=owner)
    report.network_seconds += costs["network_seconds"]
    report.compute_seconds += costs["compute_seconds"]
    report.bytes_fetched += result.bytes_fetched or 0
    report.requests += result.requests or 0
    weights = [{**{k: getattr(w, k) for k in ("layer", "expert", "out_channel", "in_channel", "weight", "verdict")},
                "ppl_ratio": (w.effect or {}).get("ppl_ratio")} for w in result.super_weights]
    report.add({**name, "revision": result.revision, "state": "succeeded", "super_weights": weights,
                "seconds": outcome["seconds"], "worker": outcome["worker"], "gpus": outcome["gpus"]})
    return None
