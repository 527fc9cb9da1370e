"""The crawl, in one place: which models (vet.py), who scans them (worker.py, pool.py), and the one
writer of their results (driver.py).

    discover / a list of ids -> vet (pinned sha, refusals, size) -> the ledger's claim -> a WorkerPool
    of Ray actors, each scanning one model at a time -> outcomes -> the driver writes ledger and catalog
"""

from .driver import CrawlOptions, CrawlReport, crawl, is_local
from .pool import Job, WorkerPool
from .vet import HubAccess, VettedModel, discover, vet
from .worker import PRELOADED, ScanWorker, WorkerConfig, actor_class

__all__ = ["PRELOADED", "CrawlOptions", "CrawlReport", "HubAccess", "Job", "ScanWorker", "VettedModel", "WorkerConfig",
           "WorkerPool", "actor_class", "crawl", "discover", "is_local", "vet"]
