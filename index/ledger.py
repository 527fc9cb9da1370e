"""The scan ledger: every scan attempt and how it ended, in SQLAlchemy (SQLite by default, or PostgreSQL).

One row per (repo_id, revision, scanner_version, artifact): its state (queued, running, succeeded, failed,
refused), how many attempts it took, the last error (and for a refusal its kind), which worker ran it, when, and how many bytes
it read. The schema is created and upgraded by Alembic migrations (index/migrations) on open; a
ledger already at the newest one is opened with one query, without importing Alembic.

Crawls coordinate through leases: `claim` moves a queued or failed row (or a running one whose
lease has expired) to running for one owner in a single conditional UPDATE, so of two crawls
started at once exactly one gets each model. The owner renews its leases while it works; a crawl
that is killed stops renewing, and its models become claimable when their leases expire.
"""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    BigInteger, CheckConstraint, DateTime, Float, Integer, String, Text, UniqueConstraint, and_, create_engine, inspect,
    or_, select, text, update,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from superweight.scanner.errors import first_line

from .errors import LedgerUnavailable
from .schema import catalog_key  # a ledger row's key is its scan's catalog key

STATES = ("queued", "running", "succeeded", "failed", "refused")
SCAN_LEASE_SECONDS = 600  # how long a `superweight scan` holds its key between renewals (once a minute)
STOPPED = "stopped without finishing (its process ended, or its lease lapsed); scan it again"
MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "0005"  # the newest migration's revision (tests/test_ledger.py holds it to index/migrations)


def default_url(home: Path) -> str:
    """SUPERWEIGHT_LEDGER_URL, or a SQLite file under `home`."""
    return os.getenv("SUPERWEIGHT_LEDGER_URL") or f"sqlite:///{home / 'ledger.sqlite'}"


class Base(DeclarativeBase):
    pass


class ScanRecord(Base):
    """One checkpoint at one revision (one GGUF file of it, for a repo of several), scanned by one scanner version."""

    __tablename__ = "scans"
    __table_args__ = (
        UniqueConstraint("repo_id", "revision", "scanner_version", "artifact", name="uq_scans_key"),
        CheckConstraint(f"state IN {STATES}", name="ck_scans_state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(512))
    revision: Mapped[str] = mapped_column(String(128))  # "" until a source is resolved
    scanner_version: Mapped[str] = mapped_column(String(32))
    # a Hub repo's GGUF file (or the --file asked for, until resolved); '' for its own safetensors (0005)
    artifact: Mapped[str] = mapped_column(String(512), default="", server_default="")
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    refusal: Mapped[str | None] = mapped_column(String(32))  # a refused row's kind (scanner.errors.Refused.kind)
    worker: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    bytes_read: Mapped[int | None] = mapped_column(BigInteger)
    bytes_fetched: Mapped[int | None] = mapped_column(BigInteger)  # from the Hub or the disk (migration 0004)
    requests: Mapped[int | None] = mapped_column(Integer)  # HTTP requests (remote) or reads (local)
    network_seconds: Mapped[float | None] = mapped_column(Float)  # waiting on bytes: downloads and range reads
    compute_seconds: Mapped[float | None] = mapped_column(Float)  # the rest of the scan
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)

    def to_dict(self) -> dict:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns}


COSTS = ("bytes_fetched", "requests", "network_seconds", "compute_seconds")


def costs_of(result) -> dict:
    """The ledger's cost columns of a ScanResult: network time is the download plus the waits for bytes."""
    network = (result.download_seconds or 0.0) + (result.wait_seconds or 0.0)
    return {"bytes_fetched": result.bytes_fetched, "requests": result.requests,
            "network_seconds": round(network, 3), "compute_seconds": round(max(0.0, result.seconds - network), 3)}


class Ledger:
    """A ledger database, migrated to the newest schema when opened.

    Args:
        url: a SQLAlchemy URL, e.g. sqlite:///path or postgresql+psycopg://user@host/db.
    """

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = create_engine(url, pool_pre_ping=True)  # a PostgreSQL restart mid-crawl
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise LedgerUnavailable(f"{_safe_or_raw(url)}: not a ledger URL ({first_line(e)}); set "
                                    "SUPERWEIGHT_LEDGER_URL to e.g. postgresql+psycopg://user@host/db") from None
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            upgrade(self.engine)
        except DBAPIError as e:  # unreachable, not a database, read-only
            self.engine.dispose()
            raise LedgerUnavailable(f"{_safe(url)}: cannot open the ledger ({first_line(e.orig)})") from None
        except OSError as e:  # its folder or the migration lock file cannot be written
            self.engine.dispose()
            raise LedgerUnavailable(f"{_safe(url)}: cannot open the ledger ({e.strerror}: {e.filename}); "
                                    "set SUPERWEIGHT_HOME to a writable folder") from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """A session in one transaction. A database that refuses the write (a read-only file: the open
        itself writes nothing) is one LedgerUnavailable line; a duplicate key stays an IntegrityError."""
        try:
            with Session(self.engine) as session, session.begin():
                yield session
        except IntegrityError:
            raise
        except DBAPIError as e:
            raise LedgerUnavailable(f"{_safe(self.url)}: cannot write the ledger ({first_line(e.orig)}); set "
                                    "SUPERWEIGHT_HOME or SUPERWEIGHT_LEDGER_URL to one it can write") from None

    def start(self, repo_id: str, revision: str, scanner_version: str, artifact: str = "", *, worker: str) -> int:
        """Mark an attempt as running (a new row, or the next attempt of an old one); return its id."""
        key = catalog_key(repo_id, revision, scanner_version, artifact)
        with self._writing() as session:
            record = session.scalars(select(ScanRecord).filter_by(**key)).one_or_none()
            if record is None:
                record = ScanRecord(**key, attempts=0)
                session.add(record)
            record.state, record.worker, record.error, record.refusal = "running", worker, None, None
            record.attempts += 1
            record.started_at, record.finished_at = _now(), None
            record.lease_owner = worker  # a killed `scan` frees the key for crawls when this expires
            record.lease_expires_at = _now() + timedelta(seconds=SCAN_LEASE_SECONDS)
            session.flush()
            return record.id

    def finish(self, record_id: int, state: str, *, revision: str | None = None, artifact: str | None = None,
               error: str | None = None, refusal: str | None = None, bytes_read: int | None = None,
               costs: dict | None = None, owner: str | None = None) -> bool:
        """Record how attempt `record_id` ended: succeeded, failed or refused (with the reason, and the
        refusal's kind: "other" when not given).

        With `owner`, only while `owner` still holds the key's lease; returns whether it was recorded.

        `revision` is the one the attempt resolved (a Hub sha, a folder's content hash) when it was
        started under the requested one ("main", or "" for a folder); an existing row for the
        resolved revision absorbs the attempt; `artifact` likewise (the GGUF file read, for the --file
        asked for, or for '' when the repo's one GGUF file was read). `costs`: what a scan moved and where its time went
        (`costs_of`).
        """
        if state not in ("succeeded", "failed", "refused"):
            raise ValueError(f"an attempt ends succeeded, failed or refused, not {state!r}")
        with self._writing() as session:
            record = session.get(ScanRecord, record_id)
            if owner is not None and record.lease_owner != owner:
                return False  # our lease lapsed and another crawl took the key over: its word counts
            key = catalog_key(record.repo_id, record.revision if revision is None else revision,
                              record.scanner_version, record.artifact if artifact is None else artifact)
            if (key["revision"], key["artifact"]) != (record.revision, record.artifact):
                resolved = session.scalars(select(ScanRecord).filter_by(**key)).one_or_none()
                if resolved is None:
                    record.revision, record.artifact = key["revision"], key["artifact"]
                else:
                    resolved.attempts += record.attempts
                    resolved.worker, resolved.started_at = record.worker, record.started_at
                    session.delete(record)
                    record = resolved
            record.state, record.error, record.bytes_read, record.finished_at = state, error, bytes_read, _now()
            record.refusal = (refusal or "other") if state == "refused" else None
            for name in COSTS:
                setattr(record, name, (costs or {}).get(name))
            record.lease_owner = record.lease_expires_at = None
        return True

    def record(self, repo_id: str, revision: str, scanner_version: str, artifact: str = "") -> dict | None:
        """The key's row, or None if it was never seen."""
        with Session(self.engine) as session:
            record = session.scalars(select(ScanRecord).filter_by(
                **catalog_key(repo_id, revision, scanner_version, artifact))).one_or_none()
            return record.to_dict() if record else None

    def queue(self, repo_id: str, revision: str, scanner_version: str, artifact: str = "") -> None:
        """Make sure the key has a row: a new one is queued; an existing one is left as it is."""
        key = catalog_key(repo_id, revision, scanner_version, artifact)
        try:
            with self._writing() as session:
                if session.scalar(select(ScanRecord.id).filter_by(**key)) is None:
                    session.add(ScanRecord(**key, state="queued", attempts=0))
        except IntegrityError:
            pass  # another crawl queued it between our check and our insert: it has its row

    def claim(self, repo_id: str, revision: str, scanner_version: str, artifact: str = "", *, owner: str,
              lease_seconds: float, also: tuple[str, ...] = ()) -> int | None:
        """Start an attempt if nobody else holds the key: returns its record id, or None.

        Claimable: queued or failed rows, rows in a state named in `also`, and running rows whose
        lease has expired (or that have none: written before leases existed). The check and the
        change are one UPDATE, so concurrent claims cannot both succeed.
        """
        now = _now()
        claimable = or_(ScanRecord.state.in_(("queued", "failed", *also)),
                        and_(ScanRecord.state == "running",
                             or_(ScanRecord.lease_expires_at < now, ScanRecord.lease_expires_at.is_(None))))
        with self._writing() as session:
            record_id = session.scalar(
                update(ScanRecord).filter_by(**catalog_key(repo_id, revision, scanner_version, artifact))
                .where(claimable)
                .values(state="running", attempts=ScanRecord.attempts + 1, worker=owner, error=None, refusal=None,
                        started_at=now, finished_at=None, lease_owner=owner,
                        lease_expires_at=now + timedelta(seconds=lease_seconds))
                .returning(ScanRecord.id)
            )
        return record_id

    def renew(self, owner: str, *, lease_seconds: float) -> int:
        """Extend every running lease `owner` holds; returns how many."""
        with self._writing() as session:
            return session.execute(
                update(ScanRecord).where(ScanRecord.lease_owner == owner, ScanRecord.state == "running")
                .values(lease_expires_at=_now() + timedelta(seconds=lease_seconds))
            ).rowcount

    def release(self, record_id: int, *, owner: str) -> None:
        """Give a key `owner` claimed back unfinished (the crawl was interrupted): queued again, no lease."""
        with self._writing() as session:
            session.execute(update(ScanRecord).where(ScanRecord.id == record_id, ScanRecord.state == "running",
                                                     ScanRecord.lease_owner == owner)
                            .values(state="queued", lease_owner=None, lease_expires_at=None, finished_at=_now()))

    def expire(self) -> int:
        """Mark running rows whose lease has lapsed as failed (their scan or crawl was killed); returns how many.

        A crawl claims such rows again on its own (claim); this makes the ledger say what happened.
        """
        now = _now()
        with self._writing() as session:
            return session.execute(
                update(ScanRecord).where(ScanRecord.state == "running", ScanRecord.lease_expires_at < now)
                .values(state="failed", error=STOPPED, finished_at=now, lease_owner=None, lease_expires_at=None)
            ).rowcount

    def records(self, *, state: str | None = None) -> list[dict]:
        """All records, newest first, optionally only those in `state` (lapsed leases expired first)."""
        self.expire()
        query = select(ScanRecord).order_by(ScanRecord.started_at.desc(), ScanRecord.id.desc())
        if state is not None:
            query = query.filter_by(state=state)
        with Session(self.engine) as session:
            return [r.to_dict() for r in session.scalars(query)]


def read_records(url: str) -> list[dict]:
    """The ledger's rows, newest first, read without migrating or writing anything.

    For `superweight query`, which must work where it may not write (a read-only SUPERWEIGHT_HOME):
    a SQLite ledger that does not exist yet has no rows.

    Raises:
        LedgerUnavailable: the database cannot be read, or is older than this superweight.
    """
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return []
    try:
        engine = create_engine(url)
    except (ArgumentError, NoSuchModuleError, ImportError) as e:
        raise LedgerUnavailable(f"{_safe_or_raw(url)}: not a ledger URL ({first_line(e)})") from None
    try:
        with Session(engine) as session:
            query = select(ScanRecord).order_by(ScanRecord.started_at.desc(), ScanRecord.id.desc())
            return [_as_expired(r.to_dict()) for r in session.scalars(query)]
    except DBAPIError as e:
        raise LedgerUnavailable(f"{_safe(url)}: cannot read the ledger ({first_line(e.orig)}); "
                                "`superweight ledger` upgrades an older one") from None
    finally:
        engine.dispose()


def _as_expired(record: dict) -> dict:
    """A row as `Ledger.expire` would leave it (for readers that may not write)."""
    expires = record.get("lease_expires_at")
    if record["state"] == "running" and expires is not None and expires < _now():
        return {**record, "state": "failed", "error": STOPPED, "lease_owner": None, "lease_expires_at": None}
    return record


def upgrade(engine) -> None:
    """Create or upgrade the ledger schema to the newest migration, one process at a time.

    Two crawls opening a new ledger at once would both create the tables: PostgreSQL serializes
    them with a transaction-scoped advisory lock, a SQLite file with a lock file beside it. A ledger
    already at HEAD costs one query: Alembic (a third of a second to import) is not loaded.
    """
    if _revision(engine) == HEAD:
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _revision(engine) -> str | None:
    """The ledger's Alembic revision, or None for a new database (connection errors are raised)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


_MIGRATION_LOCK_KEY = 0x5375706572  # any fixed 64-bit number; "Super" in ASCII


@contextmanager
def _migration_lock(engine):
    """An exclusive lock on `<file>.lock` for a SQLite file; nothing for other databases."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _safe_or_raw(url: str) -> str:
    """The URL without its password, or a URL too broken to parse cut before anything like one."""
    try:
        return _safe(url)
    except (ArgumentError, ValueError):
        return url.split("@")[-1] if "@" in url else url.split("://")[0] + "://..."

