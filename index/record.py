"""Scan a source and record it: the ledger gets every attempt, the catalog every finished scan.

The caller owns the one Catalog writer and the Ledger; a failed or refused scan is written to the
ledger with its reason and never to the catalog.
"""

import os
import socket

from scanner import __version__
from scanner.errors import RemoteCodeRefused, UnsafeCheckpoint, UnsupportedArchitecture, UnsupportedQuantization
from scanner.hub import source_name
from scanner.scan import ScanOptions, scan_source

from .catalog import Catalog
from .ledger import Ledger

# Checkpoints we decline to scan, as opposed to scans that broke.
REFUSALS = (UnsafeCheckpoint, RemoteCodeRefused, UnsupportedArchitecture, UnsupportedQuantization)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def scan_and_record(source: str, options: ScanOptions, *, catalog: Catalog, ledger: Ledger,
                    worker: str | None = None, on_layer=None) -> dict:
    """Scan `source`, write it to the catalog, and keep the ledger in step.

    Returns:
        The scan result (see scanner.scan.scan_source).

    Raises:
        The scan's or the catalog's exception, after recording it in the ledger as failed or refused.
    """
    record_id = ledger.start(source_name(source), options.revision or "", __version__, worker=worker or worker_name())
    try:
        result = scan_source(source, options, on_layer=on_layer)
        catalog.record_scan(result)
    except Exception as e:
        state = "refused" if isinstance(e, REFUSALS) else "failed"
        ledger.finish(record_id, state, error=str(e) or type(e).__name__)
        raise
    ledger.finish(record_id, "succeeded", revision=result["revision"], bytes_read=result["bytes_read"])
    return result
