"""`superweight query` is data only: one read, no file written or read outside the index, no network,
bounded in time and memory, and one line for whatever it refuses."""

import json
import shutil

import pytest
from click.testing import CliRunner

from superweight.index.build import PUBLISHED, build_index
from superweight.cli import cli
from tests.test_errors import assert_one_line_error


@pytest.fixture
def home(home):
    """The test's SUPERWEIGHT_HOME holding only a downloaded catalog.parquet (the committed index) and its manifest."""
    home.mkdir()
    build_index(home / "catalog.parquet")
    return home


def query(*args):
    return CliRunner().invoke(cli, ["query", *map(str, args)])


# Each writes a file, reads one from outside the index, or reaches the network, if it runs.
ESCAPES = {
    "explain analyze copy": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'",
    "explain analyze insert": "EXPLAIN ANALYZE INSERT INTO catalog SELECT * FROM catalog",
    "explain analyze create": "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
    "copy": "COPY catalog TO '{target}'",
    "read a local file": "SELECT * FROM read_text('{secret}')",
    "glob the file system": "SELECT * FROM glob('{secret_dir}/*')",
    "read a url": "SELECT * FROM read_parquet('https://example.org/x.parquet')",
    "attach": "ATTACH '{target}' AS other",
    "install an extension": "INSTALL httpfs",
    "turn access back on": "SET enable_external_access = true",
    "two statements": "SELECT 1; SELECT 2",
    "pragma": "CALL pragma_version()",
}


@pytest.mark.parametrize("case", ESCAPES)
def test_a_query_that_would_escape_is_refused_and_writes_nothing(tmp_path, home, case):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for queries\n")
    target = tmp_path / "written.txt"
    before = sorted(p.name for p in home.iterdir())
    sql = ESCAPES[case].format(target=target, secret=secret, secret_dir=tmp_path)

    result = query(sql)

    assert_one_line_error(result, "query: ")
    assert "not for queries" not in result.output
    assert not target.exists()
    assert sorted(p.name for p in home.iterdir()) == before  # the downloaded catalog untouched


def test_an_endless_query_stops_at_its_timeout(home):
    result = query("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
                   "--timeout", "2")
    assert_one_line_error(result, "query: stopped after 2 s", "--timeout")


def test_a_query_past_its_memory_is_one_line(home):
    result = query("SELECT list(a.note || b.note || c.note) FROM catalog a, catalog b, catalog c, catalog d",
                   "--max-memory", "100MB", "--timeout", "60")
    assert_one_line_error(result, "query: ", "--max-memory 100MB")


def test_rows_past_the_limit_are_cut_with_a_note(home):
    result = query("SELECT * FROM range(10)", "--max-rows", "3", "--json")
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"range": 0}, {"range": 1}, {"range": 2}]
    assert "first 3 rows" in result.stderr and "--max-rows" in result.stderr


@pytest.mark.parametrize("option,value", [("--timeout", "0"), ("--timeout", "nan"), ("--max-rows", "0"),
                                          ("--max-memory", "lots")])
def test_bad_limits_are_usage_errors(home, option, value):
    result = query("SELECT 1", option, value)
    assert result.exit_code == 2 and "Invalid value" in result.stderr


def test_reads_still_work_and_say_which_index_they_read(home):
    result = query("SELECT count(DISTINCT repo_id) AS models FROM catalog WHERE source = 'literature'", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"models": 19}
    # No local catalog.duckdb: the downloaded catalog.parquet is the default, and the user is told.
    assert result.stderr == f"query: reading {home / 'catalog.parquet'} (no local catalog)\n"


@pytest.mark.parametrize("sql", ["EXPLAIN SELECT 1", "EXPLAIN ANALYZE SELECT count(*) FROM catalog",
                                 "DESCRIBE catalog", "SUMMARIZE catalog", "FROM catalog LIMIT 1"])
def test_plain_reads_are_accepted(home, sql):
    assert query(sql).exit_code == 0


def test_without_a_local_or_downloaded_index_it_reads_the_shipped_one_and_says_so(home, monkeypatch):
    """Offline on a fresh install `download` cannot help: the index built into the package answers."""
    shutil.rmtree(home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = query("SELECT count(*) AS n FROM catalog", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(PUBLISHED.with_suffix(".json").read_text())
    assert json.loads(result.stdout) == {"n": manifest["rows"]}
    assert result.stderr == (f"query: reading the index shipped with superweight ({manifest['rows']} rows, built "
                             f"{manifest['created'][:10]}; no local catalog and none downloaded: 'superweight "
                             "download' fetches the latest)\n")


def test_a_missing_catalog_asked_for_by_name_is_one_line(home, tmp_path):
    result = query("SELECT 1 FROM catalog", "--catalog", tmp_path / "nope.duckdb")
    assert_one_line_error(result, "nope.duckdb: no index here", "superweight download")
