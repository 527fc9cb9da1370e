"""The crawl's pool of scan actors: each scans one model at a time, and the pool replaces the ones that die.

Like Ray's `ray.util.ActorPool` (submit work, take finished work), with what a crawl on a real
cluster adds: an actor is handed work only once it has started (an autoscaler may take minutes to
add its node), an actor whose process died is replaced by a fresh one, and one stuck past its
deadline is killed.
"""

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

from .vet import VettedModel

logger = logging.getLogger(__name__)

WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


@dataclass
class Job:
    """One model's scan, from its claim in the ledger until it settles."""

    model: VettedModel
    record_id: int
    attempt: int = 1
    started: float = 0.0  # when it went to a started actor
    actor: object = None
    killed: bool = False  # by the pool, for running past its deadline
    also: tuple[str, ...] = ()  # a settled state its claim may take over (see driver._settle_without_scan)


@dataclass
class Finished:
    """A job whose call returned: the worker's outcome, or the error that says its actor is gone."""

    job: Job
    outcome: dict | None
    lost: Exception | None = None  # the actor died (or was killed) before it answered


class WorkerPool:
    """Scan actors made by `make_actor()`, `size` of them, each given one job at a time."""

    def __init__(self, make_actor: Callable[[], object], size: int):
        self._make = make_actor
        self._started: dict = {}  # actor -> ObjectRef of its pid(): ready once the actor has started
        self._idle: list = []
        self._busy: dict = {}  # ObjectRef of a scan -> its Job
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        actor = self._make()
        self._started[actor] = actor.pid.remote()
        self._idle.append(actor)

    @property
    def jobs(self) -> list[Job]:
        """The jobs in flight."""
        return list(self._busy.values())

    def _free(self) -> Iterator:
        """Idle actors that have started, checked one at a time: they can take a job now."""
        return (a for a in self._idle if ray.wait([self._started[a]], timeout=0)[0])

    def has_free_worker(self) -> bool:
        """Whether an idle actor has started and can take a job now."""
        return next(self._free(), None) is not None

    def wait_for_a_start(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for an idle actor to start."""
        if self._idle:
            ray.wait([self._started[a] for a in self._idle], num_returns=1, timeout=timeout)

    def submit(self, job: Job, *, timeout: float) -> None:
        """Hand `job` to a started idle actor (there must be one: `has_free_worker`)."""
        job.actor = next(self._free())
        self._idle.remove(job.actor)
        job.started = time.monotonic()
        self._busy[job.actor.scan.remote(job.model.repo_id, job.model.revision, timeout=timeout)] = job

    def next_finished(self, timeout: float) -> list[Finished]:
        """The jobs that finished within `timeout` seconds (at most one; none if time ran out).

        A finished job's actor takes the next one, or, if it died or was killed, a fresh actor does.
        """
        ready, _ = ray.wait(list(self._busy), num_returns=1, timeout=timeout)
        finished = []
        for ref in ready:
            job = self._busy.pop(ref)
            try:
                done = Finished(job, ray.get(ref))
            except WORKER_LOST as e:
                done = Finished(job, None, lost=e)
            if done.lost is not None or job.killed:  # a result may beat the kill: the actor is gone anyway
                self.replace_dead(job.actor)
            else:
                self._idle.append(job.actor)
            finished.append(done)
        return finished

    def replace_dead(self, actor) -> None:
        """Put a fresh actor in the place of `actor`, whose process died or was killed."""
        ray.kill(actor, no_restart=True)
        self._started.pop(actor, None)
        self._spawn()

    def kill_stuck(self, deadline: float) -> None:
        """Kill the actor of every job running longer than `deadline` seconds; its call then fails as lost."""
        for job in self._busy.values():
            if not job.killed and time.monotonic() - job.started > deadline:
                logger.warning("%s: past its timeout; killing its worker", job.model.repo_id)
                job.killed = True
                ray.kill(job.actor, no_restart=True)

    def shutdown(self) -> None:
        """Kill every actor of the pool."""
        for actor in self._started:
            ray.kill(actor, no_restart=True)
        self._started, self._idle, self._busy = {}, [], {}
