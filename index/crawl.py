"""The crawl: vet and queue models, scan them on Ray workers, and be the one writer of the results.

The driver (this module) vets each model against the Hub (pinned sha, safetensors, no remote code,
size), skips what the ledger says is settled for this scanner version, and hands the rest to Ray
actors (scanner.workers) one model per actor at a time, within a disk budget for downloads. Each
model is claimed in the ledger first, under a lease the driver keeps renewing, so two crawls never
scan the same model. Results come back as dicts and the driver writes the catalog and the ledger.

Faults: a worker process that dies is replaced by a fresh actor and its model retried (up to
`retries` times); a scan past its timeout is stopped by the worker itself, or its actor is killed; a failed
model is recorded as failed and the crawl goes on. Ctrl-C gives the claimed models back (queued);
a crawl killed outright leaves leases that expire, and a re-run picks those models up.
"""

import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

from superweight.scanner import __version__
from superweight.scanner.errors import first_line
from superweight.scanner.config import SUPERWEIGHT_HOME
from superweight.scanner.discover import Candidate, HubAccess, reconsidered, vet
from superweight.scanner.hub import EXAMPLE_PREFIX, source_name
from superweight.scanner.scan import ScanOptions
from superweight.scanner.workers import WorkerConfig, actor_class

from .catalog import Catalog
from .errors import NoWorkers
from .ledger import Ledger

logger = logging.getLogger(__name__)

VET_THREADS = 4  # models vetted at once: each is a few small Hub requests
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


@dataclass(frozen=True)
class CrawlOptions:
    """How a crawl runs; the defaults are the embedded ones."""

    workers: int | None = None  # None: one per GPU of the cluster, else one per 2 CPUs
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    timeout: float = 1800.0  # seconds per model, download included
    retries: int = 2  # more attempts for a model whose worker process died
    max_cache_gb: float = 50.0  # downloads in flight at once, over all workers
    max_params: int | None = None
    lease_seconds: float = 300.0  # a killed crawl's models are claimable again after this
    start_timeout: float = 900.0  # seconds to wait for any worker to start (autoscalers add nodes in minutes)
    hub: HubAccess = HubAccess()
    scan: ScanOptions = ScanOptions()
    scratch: Path = SUPERWEIGHT_HOME / "crawl-cache"


@dataclass
class Job:
    candidate: Candidate
    record_id: int
    attempt: int = 1
    started: float = 0.0  # when it went to a started actor
    actor: object = None
    killed: bool = False  # by the driver, for running past the timeout
    also: tuple[str, ...] = ()  # a settled state its claim may take over (see _settle_without_scan)


@dataclass
class CrawlReport:
    """What a crawl did: one outcome per model, counts by state, and time split."""

    outcomes: list[dict] = field(default_factory=list)
    queued: int = 0
    vet_seconds: float = 0.0  # the driver's Hub checks before any scan
    download_seconds: float = 0.0
    scan_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def counts(self) -> Counter:
        return Counter(o["state"] for o in self.outcomes)

    def add(self, outcome: dict) -> None:
        self.outcomes.append(outcome)


def crawl(repo_ids: list[str], *, catalog: Catalog, ledger: Ledger, options: CrawlOptions = CrawlOptions(),
          on_update: Callable[[CrawlReport], None] | None = None) -> CrawlReport:
    """Scan `repo_ids` on the Ray cluster this process is connected to, writing the results.

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
    update = on_update or (lambda _: None)
    owner = f"crawl:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    pending = []
    def check(repo_id: str) -> Candidate:
        if is_local(repo_id):  # its revision, a content hash, is known only once scanned: always scanned
            return Candidate(repo_id, revision="")
        try:
            return vet(repo_id, hub=options.hub, max_params=options.max_params,
                       max_bytes=int(options.max_cache_gb * 1e9), cache_dir=options.scratch / "vet")
        except Exception as e:  # one model's surprise must not end the crawl
            return Candidate(repo_id, "", error=f"{repo_id}: vetting failed ({type(e).__name__}: {first_line(e)})")

    pool = ThreadPoolExecutor(VET_THREADS)  # Hub round trips overlap; results stay in order
    try:
        for candidate in pool.map(check, dict.fromkeys(map(source_name, repo_ids))):  # once each, folders by path
            outcome, also = _settle_without_scan(candidate, ledger, catalog, owner,
                                                 verify=options.scan.verify is not None)
            if outcome is not None:
                report.add(outcome)
            else:
                pending.append(Job(candidate, record_id=0, also=also))
            report.queued = len(pending)
            update(report)
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C: do not vet the rest first
    report.vet_seconds = time.monotonic() - start
    if pending:
        _run(pending, report, catalog=catalog, ledger=ledger, options=options, owner=owner, update=update)
    report.seconds = time.monotonic() - start
    return report


def is_local(source: str) -> bool:
    """A folder or a built-in example rather than a Hub id (on a cluster, it must exist on every worker)."""
    return source.startswith(EXAMPLE_PREFIX) or Path(source).expanduser().exists()


def _settle_without_scan(candidate: Candidate, ledger: Ledger, catalog: Catalog, owner: str, *,
                         verify: bool = False) -> tuple[dict | None, tuple[str, ...]]:
    """Record a model that needs no scan (settled, refused, unvettable).

    Returns:
        Its outcome, or None if it is to be scanned; and the settled state its claim may take over.

    Skipped: a key that succeeded and is in this catalog, or that was refused for a reason that
    holds for the commit. A refusal for this run's limits or for gating is vetted again, and a
    success missing from this catalog (a new --catalog, a lost volume) is scanned again, and so is
    one without measured effects when this crawl verifies.
    """
    key = (candidate.repo_id, candidate.revision, __version__)
    outcome = {"repo_id": candidate.repo_id, "revision": candidate.revision}
    record = ledger.record(*key)
    state = record["state"] if record else None
    if state == "succeeded" and catalog.has_scan(*key, verified=verify):
        return {**outcome, "state": "skipped", "reason": "already succeeded"}, ()
    if state == "refused" and not reconsidered(record["error"]):
        return {**outcome, "state": "skipped", "reason": "already refused"}, ()
    also = (state,) if state in ("succeeded", "refused") else ()
    ledger.queue(*key)
    if candidate.refusal is None and candidate.error is None:
        return None, also
    record_id = ledger.claim(*key, owner=owner, lease_seconds=60, also=also)
    if record_id is None:
        return {**outcome, "state": "skipped", "reason": "another crawl holds it"}, ()
    state, reason = ("refused", candidate.refusal) if candidate.refusal else ("failed", candidate.error)
    ledger.finish(record_id, state, error=reason, owner=owner)
    return {**outcome, "state": state, "error": reason}, ()


def _run(pending: list[Job], report: CrawlReport, *, catalog, ledger, options: CrawlOptions, owner: str,
         update) -> None:
    """Scan `pending` on a pool of actors until every model has settled.

    A model goes only to an actor that has started: on an autoscaling cluster some actors wait for
    a node, and the others work meanwhile.
    """
    spawn_actor, gpus = _actor_factory(options)
    up = {}  # actor -> ObjectRef of its pid(): ready once the actor has started

    def spawn():
        actor = spawn_actor()
        up[actor] = actor.pid.remote()
        return actor

    actors = [spawn() for _ in range(_worker_count(options))]
    free, inflight = list(actors), {}  # inflight: ObjectRef -> Job
    budget = int(options.max_cache_gb * 1e9)
    queue = list(pending)
    last_renewal = starved_since = time.monotonic()
    try:
        while queue or inflight:
            used = sum(j.candidate.size_bytes or 0 for j in inflight.values())
            idle = [a for a in free if ray.wait([up[a]], timeout=0)[0]]
            while idle and queue and (not inflight or used + (queue[0].candidate.size_bytes or 0) <= budget):
                job = queue.pop(0)
                record_id = ledger.claim(job.candidate.repo_id, job.candidate.revision, __version__, owner=owner,
                                         lease_seconds=options.lease_seconds, also=job.also)
                if record_id is None:
                    report.add({"repo_id": job.candidate.repo_id, "revision": job.candidate.revision,
                                "state": "skipped", "reason": "another crawl holds it"})
                    continue
                job.record_id, job.actor, job.started = record_id, idle.pop(0), time.monotonic()
                free.remove(job.actor)
                inflight[job.actor.scan.remote(job.candidate.repo_id, job.candidate.revision,
                                               timeout=options.timeout)] = job
                used += job.candidate.size_bytes or 0
            report.queued = len(queue) + len(inflight)
            update(report)
            if not inflight:  # work waits for an actor to start
                if queue and time.monotonic() - starved_since > options.start_timeout:
                    raise NoWorkers(f"no scan worker started within {options.start_timeout:.0f} s: the Ray cluster has no "
                                    f"room for an actor with {gpus:g} GPU(s) and 1 CPU; add nodes, or pass "
                                    "--gpus-per-worker 0 to scan on CPUs")
                ray.wait([up[a] for a in free], num_returns=1, timeout=1.0)
                continue
            starved_since = time.monotonic()
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=min(1.0, options.lease_seconds / 4))
            for ref in ready:
                job = inflight.pop(ref)
                retry, lost = _finish(job, ref, report, catalog=catalog, ledger=ledger, options=options, owner=owner)
                lost = lost or job.killed  # its result may have beaten the kill; the actor is gone anyway
                if lost:  # its process died or was killed: a fresh actor takes its place
                    ray.kill(job.actor, no_restart=True)
                    actors.append(spawn())
                free.append(actors[-1] if lost else job.actor)
                if retry is not None:
                    queue.insert(0, retry)
            _stop_overdue(inflight, options)
            if time.monotonic() - last_renewal > options.lease_seconds / 3:
                ledger.renew(owner, lease_seconds=options.lease_seconds)
                last_renewal = time.monotonic()
        report.queued = 0
        update(report)
    except BaseException:  # Ctrl-C or a driver error: give the claimed models back
        for job in inflight.values():
            ledger.release(job.record_id, owner=owner)
        raise
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _gpus_per_worker(options: CrawlOptions) -> float:
    if options.gpus_per_worker is not None:
        return options.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _actor_factory(options: CrawlOptions):
    """A function that starts one scan worker actor, and the GPUs each gets."""
    gpus = _gpus_per_worker(options)
    config = WorkerConfig(scratch=options.scratch, options=options.scan, hub_attempts=options.hub.attempts,
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


def _finish(job: Job, ref, report: CrawlReport, *, catalog: Catalog, ledger: Ledger, options: CrawlOptions,
            owner: str) -> tuple[Job | None, bool]:
    """Record how `job` ended, under `owner`'s lease.

    Returns:
        The job to run again (its worker died and retries remain) or None, and whether the worker was lost.
    """
    name = {"repo_id": job.candidate.repo_id, "revision": job.candidate.revision}
    try:
        outcome = ray.get(ref)
    except WORKER_LOST as e:
        if job.killed:
            error = f"{job.candidate.repo_id}@{job.candidate.revision[:12]}: timed out after {options.timeout:.0f} s"
        else:
            error = f"{job.candidate.repo_id}@{job.candidate.revision[:12]}: the worker process died ({type(e).__name__})"
        ledger.finish(job.record_id, "failed", error=error, owner=owner)
        if not job.killed and job.attempt <= options.retries:
            logger.warning("%s; trying again (attempt %d)", error, job.attempt + 1)
            return Job(job.candidate, record_id=0, attempt=job.attempt + 1), True
        report.add({**name, "state": "failed", "error": error})
        return None, True
    if outcome["state"] == "succeeded":
        result = outcome["result"]
        try:
            catalog.record_scan(result)
        except Exception as e:
            ledger.finish(job.record_id, "failed", error=f"catalog write failed: {e}", owner=owner)
            raise
        ledger.finish(job.record_id, "succeeded", revision=result.revision, bytes_read=result.bytes_read, owner=owner)
        report.download_seconds += result.download_seconds
        report.scan_seconds += result.seconds - result.download_seconds
        weights = [{**{k: getattr(w, k) for k in ("layer", "expert", "out_channel", "in_channel", "weight", "verdict")},
                    "ppl_ratio": (w.effect or {}).get("ppl_ratio")} for w in result.super_weights]
        report.add({**name, "revision": result.revision, "state": "succeeded", "super_weights": weights,
                    "seconds": outcome["seconds"], "worker": outcome["worker"], "gpus": outcome["gpus"]})
    else:
        ledger.finish(job.record_id, outcome["state"], error=outcome["error"], owner=owner)
        report.add({**name, "state": outcome["state"], "error": outcome["error"]})
    return None, False


def _stop_overdue(inflight: dict, options: CrawlOptions) -> None:
    """Kill the actor of a scan well past its timeout (the worker stops itself at the timeout if it can)."""
    grace = min(60.0, options.timeout / 2)
    for job in inflight.values():
        if not job.killed and time.monotonic() - job.started > options.timeout + grace:
            logger.warning("%s: past its timeout; killing its worker", job.candidate.repo_id)
            job.killed = True
            ray.kill(job.actor, no_restart=True)  # its call fails now; a fresh actor replaces it
