"""The scan ledger: every scan attempt and how it ended, in SQLAlchemy (SQLite by default, or PostgreSQL).

One row per (repo_id, revision, scanner_version): its state (queued, running, succeeded, failed,
refused), how many attempts it took, the last error, which worker ran it, when, and how many bytes
it read. The schema is created and upgraded by Alembic migrations (index/migrations) on open.
"""

import os
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import CheckConstraint, DateTime, Integer, String, Text, UniqueConstraint, create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import LedgerUnavailable

STATES = ("queued", "running", "succeeded", "failed", "refused")
MIGRATIONS = Path(__file__).parent / "migrations"


def default_url(home: Path) -> str:
    """SUPERWEIGHT_LEDGER_URL, or a SQLite file under `home`."""
    return os.getenv("SUPERWEIGHT_LEDGER_URL") or f"sqlite:///{home / 'ledger.sqlite'}"


class Base(DeclarativeBase):
    pass


class ScanRecord(Base):
    """One checkpoint at one revision, scanned by one scanner version."""

    __tablename__ = "scans"
    __table_args__ = (
        UniqueConstraint("repo_id", "revision", "scanner_version", name="uq_scans_key"),
        CheckConstraint(f"state IN {STATES}", name="ck_scans_state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(512))
    revision: Mapped[str] = mapped_column(String(128))  # "" until a source is resolved
    scanner_version: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    bytes_read: Mapped[int | None] = mapped_column(Integer)

    def to_dict(self) -> dict:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns}


class Ledger:
    """A ledger database, migrated to the newest schema when opened.

    Args:
        url: a SQLAlchemy URL, e.g. sqlite:///path or postgresql+psycopg://user@host/db.
    """

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url)
        try:
            upgrade(self.engine)
        except OperationalError as e:
            raise LedgerUnavailable(f"{_safe(url)}: cannot open the ledger ({str(e.orig).strip().splitlines()[0]})") from None

    def close(self) -> None:
        self.engine.dispose()

    def start(self, repo_id: str, revision: str, scanner_version: str, *, worker: str) -> int:
        """Mark an attempt as running (a new row, or the next attempt of an old one); return its id."""
        with Session(self.engine) as session, session.begin():
            record = session.scalars(select(ScanRecord).filter_by(
                repo_id=repo_id, revision=revision, scanner_version=scanner_version)).one_or_none()
            if record is None:
                record = ScanRecord(repo_id=repo_id, revision=revision, scanner_version=scanner_version, attempts=0)
                session.add(record)
            record.state, record.worker, record.error = "running", worker, None
            record.attempts += 1
            record.started_at, record.finished_at = _now(), None
            session.flush()
            return record.id

    def finish(self, record_id: int, state: str, *, revision: str | None = None, error: str | None = None,
               bytes_read: int | None = None) -> None:
        """Record how attempt `record_id` ended: succeeded, failed or refused (with the reason).

        `revision` is the one the attempt resolved (a Hub sha, a folder's content hash) when it was
        started under the requested one ("main", or "" for a folder); an existing row for the
        resolved revision absorbs the attempt.
        """
        if state not in ("succeeded", "failed", "refused"):
            raise ValueError(f"an attempt ends succeeded, failed or refused, not {state!r}")
        with Session(self.engine) as session, session.begin():
            record = session.get(ScanRecord, record_id)
            if revision is not None and revision != record.revision:
                resolved = session.scalars(select(ScanRecord).filter_by(
                    repo_id=record.repo_id, revision=revision, scanner_version=record.scanner_version)).one_or_none()
                if resolved is None:
                    record.revision = revision
                else:
                    resolved.attempts += record.attempts
                    resolved.worker, resolved.started_at = record.worker, record.started_at
                    session.delete(record)
                    record = resolved
            record.state, record.error, record.bytes_read, record.finished_at = state, error, bytes_read, _now()

    def records(self, *, state: str | None = None) -> list[dict]:
        """All records, newest first, optionally only those in `state`."""
        query = select(ScanRecord).order_by(ScanRecord.started_at.desc(), ScanRecord.id.desc())
        if state is not None:
            query = query.filter_by(state=state)
        with Session(self.engine) as session:
            return [r.to_dict() for r in session.scalars(query)]


def upgrade(engine) -> None:
    """Create or upgrade the ledger schema to the newest migration."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
