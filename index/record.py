"""Scan a source and record it: the ledger gets every attempt, the catalog every finished scan.

The caller owns the one Catalog writer and the Ledger; a failed or refused scan is written to the
ledger with its reason and never to the catalog.
"""

import os
import socket
import time

from superweight.scanner import __version__
from superweight.scanner.errors import outcome_of
from superweight.scanner.hub import source_name
from superweight.scanner.progress import Progress, Relay
from superweight.scanner.result import ScanResult
from superweight.scanner.scan import ScanOptions, scan

from .catalog import Catalog
from .ledger import SCAN_LEASE_SECONDS, Ledger, costs_of

RENEW_EVERY = 60.0  # seconds between lease renewals of a running scan (its lease lasts SCAN_LEASE_SECONDS)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Renewing(Relay):
    """Renews the scan's ledger lease as its steps go by (at most once every RENEW_EVERY seconds)."""

    def __init__(self, ledger: Ledger, worker: str, inner: Progress | None):
        super().__init__(inner)
        self.ledger, self.worker, self.renewed = ledger, worker, time.monotonic()

    def step(self) -> None:
        if time.monotonic() - self.renewed > RENEW_EVERY:  # a live scan keeps its key; a killed one lets it lapse
            self.ledger.renew(self.worker, lease_seconds=SCAN_LEASE_SECONDS)
            self.renewed = time.monotonic()
        super().step()


def scan_and_record(source: str, options: ScanOptions, *, catalog: Catalog, ledger: Ledger,
                    worker: str | None = None, progress: Progress | None = None) -> ScanResult:
    """Scan `source`, write it to the catalog, and keep the ledger in step.

    Returns:
        The scan result.

    Raises:
        The scan's or the catalog's exception, after recording it in the ledger as failed or refused.
    """
    worker = worker or worker_name()
    record_id = ledger.start(source_name(source), options.revision or "", __version__, options.gguf_file or "",
                             worker=worker)
    try:
        result = scan(source, options, progress=_Renewing(ledger, worker, progress))
        catalog.record_scan(result)
    except (Exception, KeyboardInterrupt) as e:  # Ctrl-C (or SIGTERM, see superweight.cli) too: failed, not running
        settled = outcome_of(e)
        ledger.finish(record_id, settled["state"], error=settled["error"], refusal=settled.get("refusal"))
        raise
    ledger.finish(record_id, "succeeded", revision=result.revision, artifact=result.artifact or "",
                  bytes_read=result.bytes_read, costs=costs_of(result))
    return result
