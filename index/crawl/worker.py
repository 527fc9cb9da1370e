"""The crawl's Ray actor: it scans one model at a time, reading its weights from the Hub, and cleans up.

An actor imports torch and transformers once and then scans whatever the driver hands it. A model's
weights are read remotely by range requests (scanner.fetch), its layers kept in memory while they fit
the worker's cache; its config and tokenizer files go to a folder under the actor's scratch
directory, deleted after the scan. With `download` set, the weights go there too, so a worker's
disk holds one model at a time. The result is a plain dict: the driver, not the worker, writes the
ledger and the catalog.
"""

import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from superweight.scanner.errors import ScanError, ScanTimeout, outcome_of
from superweight.scanner.files import alive
from superweight.scanner.hub import with_retries
from superweight.scanner.progress import Progress
from superweight.scanner.scan import ScanOptions
from superweight.scanner.scan import scan as scan_checkpoint


# What a local Ray's idle worker processes import before an actor arrives (torch, transformers: seconds),
# so that an actor starts at once: ray.init(_system_config={"preload_python_modules": [...]}).
PRELOADED = (__name__,)


@dataclass(frozen=True)
class WorkerConfig:
    """What every scan of a crawl shares."""

    scratch: Path  # a model's files go to scratch/<host>-<pid>/<model>, deleted after each scan
    options: ScanOptions = ScanOptions()
    hub_attempts: int = 4
    hub_backoff: float = 2.0  # seconds


class ScanWorker:
    """Scans one model at a time (as a Ray actor; see `actor_class`)."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        host = socket.gethostname()
        self.scratch = Path(config.scratch) / f"{host}-{os.getpid()}"
        # Downloads of workers on this host that died mid-scan (killed, out of memory) count
        # against the disk budget until someone deletes them: the next worker to start does.
        for folder in Path(config.scratch).glob(f"{host}-*"):
            pid = folder.name.removeprefix(f"{host}-")
            if pid.isdigit() and not alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)  # left by an earlier process with this pid

    def pid(self) -> int:
        return os.getpid()

    def scan(self, repo_id: str, revision: str, *, timeout: float) -> dict:
        """Scan `repo_id` at commit `revision` (or a folder or example, revision "") within `timeout` seconds.

        Returns:
            {"state": "succeeded", "result": <a ScanResult>} or {"state": "failed" or
            "refused", "error": one line} (a refusal with its "refusal" kind: `outcome_of`), with
            "worker", "gpus" and "seconds".
        """
        start = time.monotonic()
        deadline = start + timeout
        cache = self.scratch / repo_id.replace("/", "--")
        options = replace(self.config.options, revision=revision or None, cache_dir=cache)  # "": a folder

        class Deadline(Progress):  # the scan stops itself between two steps once its time is up
            where = ""

            def phase(self, name: str, total: int) -> None:
                self.where = name

            def step(self) -> None:
                if time.monotonic() > deadline:
                    raise ScanTimeout(f"timed out after {timeout:.0f} s, in {self.where}",
                                      where=f"{repo_id}@{revision[:12]}")

        outcome: dict = {"worker": f"{socket.gethostname()}:{os.getpid()}",
                         "gpus": ray.get_runtime_context().get_accelerator_ids().get("GPU", [])}
        try:
            result = with_retries(lambda: scan_checkpoint(repo_id, options, progress=Deadline()),
                                  attempts=self.config.hub_attempts, backoff=self.config.hub_backoff)
            outcome.update(state="succeeded", result=result)
        except ScanError as e:  # the scan names a Hub file by repo@sha, not by this worker's scratch folder
            outcome.update(outcome_of(e))
        except Exception as e:  # a bug or a broken checkpoint: this model fails, the worker goes on
            outcome.update(state="failed", error=f"{repo_id}@{revision[:12]}: {type(e).__name__}: {e}".splitlines()[0])
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        outcome["seconds"] = round(time.monotonic() - start, 3)
        return outcome


def actor_class(*, num_gpus: float, num_cpus: float):
    """ScanWorker as a Ray actor class. Not restarted by Ray: the driver replaces a dead actor and
    decides whether to retry its model."""
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0, max_task_retries=0)(ScanWorker)
