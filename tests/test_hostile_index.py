"""An index from elsewhere is untrusted input: hostile names and values in a catalog.parquet (or in a
local catalog's folder names, or in a GGUF file's metadata) never reach a terminal raw, never break a
keep-list's format, and are refused in one line before anything uses them, keeping the local copy.

Every output here is parsed back by the real parser (csv, json, yaml, the llama-quantize grammar).
"""

import csv
import dataclasses
import io
import json
import re

import duckdb
import pytest
import yaml
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from superweight.cli import cli
from superweight.index import keep
from superweight.index.catalog import Catalog
from superweight.index.errors import NotACatalog
from superweight.index.publish import download
from superweight.scanner.scan import ScanOptions, scan
from superweight.scanner.verify import VerifyConfig
from tests.checkpoints import Plant, make_checkpoint, make_gguf
from tests.test_errors import assert_one_line_error

# A tiny model's planted weight moves perplexity by a few percent; `matters=0` calls it super.
QUICK = VerifyConfig(tokens=256, context=64, head_slice_rows=100, matters=0.0)
ESC = "\x1b[2J\x1b[31m"  # clear the screen, turn red
# Eight models whose names attack a terminal, a file system and each keep-list format.
NAMES = [
    "plain/model",
    f"evil/{ESC}red",
    "forged/x\r\nfake/row  3  [1, 2]",  # a newline and a CR: a second, forged table row
    "yaml/x\nquant_stage: {evil: 1}\n# ",  # a newline would end a YAML comment and start a stage
    "Case/Model", "case/model",  # one file on a case-insensitive file system
    "/tmp/data/--rf",  # a local folder: its file name must not start with '-'
    "long/" + "x" * 400,  # too long for a file name
]


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """One verified scan of a planted llama (layer 2, [10, 20]), and its catalog under each of NAMES."""
    root = tmp_path_factory.mktemp("hostile")
    result = scan(str(make_checkpoint(root / "m", "llama", [Plant(2, 10, 20)])), ScanOptions(verify=QUICK))
    catalog = root / "catalog.duckdb"
    with Catalog(catalog) as writer:
        for name in NAMES:
            writer.record_scan(dataclasses.replace(result, repo_id=name))
    with Catalog(root / "clean.duckdb") as writer:  # what a hostile publisher starts from
        for name in ("plain/model", "plain/other"):
            writer.record_scan(dataclasses.replace(result, repo_id=name))
        writer.export(root / "good" / "catalog.parquet")
    return {"result": result, "catalog": catalog, "good": root / "good" / "catalog.parquet", "root": root}


# -- what a terminal is shown ---------------------------------------------------------------------

def test_a_table_of_hostile_names_is_one_line_per_row_and_sends_no_escape(scanned):
    result = run("query", "SELECT repo_id, layer FROM catalog ORDER BY repo_id", "--catalog", scanned["catalog"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(NAMES) + 1  # the header and one line per row: nothing forged
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", result.stdout)
    assert any(line.startswith("evil/\\x1b[2J\\x1b[31mred") for line in lines)


def test_csv_and_json_keep_the_exact_names_for_a_parser(scanned):
    sql = "SELECT repo_id FROM catalog ORDER BY repo_id"
    as_csv = run("query", sql, "--catalog", scanned["catalog"], "--csv")
    # (the bytes: click's `stdout` turns CRLF into LF)
    assert [row[0] for row in csv.reader(io.StringIO(as_csv.stdout_bytes.decode()))][1:] == sorted(NAMES)
    as_json = run("query", sql, "--catalog", scanned["catalog"], "--json")
    assert [json.loads(line)["repo_id"] for line in as_json.stdout.splitlines()] == sorted(NAMES)


def test_csv_on_a_terminal_shows_control_characters_as_escapes(scanned, monkeypatch):
    monkeypatch.setattr("superweight.cli_index.on_terminal", lambda: True)
    result = run("query", "SELECT repo_id FROM catalog ORDER BY repo_id", "--catalog", scanned["catalog"], "--csv")
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", result.stdout)
    rows = [row[0] for row in csv.reader(io.StringIO(result.stdout))]
    assert "evil/\\x1b[2J\\x1b[31mred" in rows and len(rows) == len(NAMES) + 1


# -- keep-lists of hostile names --------------------------------------------------------------------

def llama_cpp_tokens(text: str) -> list[tuple[str, str]]:
    """llama-quantize's reading of a --tensor-type-file: whitespace-separated tokens, each split at its
    first '=', the pattern lowercased (ECMAScript; Python's re agrees on the escapes written here)."""
    return [(token.split("=", 1)[0].lower(), token.split("=", 1)[1]) for token in text.split()]


@pytest.mark.parametrize("fmt", keep.FORMATS)
def test_every_format_parses_back_for_every_name_and_each_model_gets_its_own_file(scanned, fmt, tmp_path):
    result = run("export", "--keep", fmt, "--catalog", scanned["catalog"], "--out", tmp_path)
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.iterdir())
    assert len(files) == len(NAMES)
    assert all(not f.name.startswith(("-", ".")) and len(f.name.encode()) <= 255 for f in files)
    assert not any(re.search(r"[^A-Za-z0-9._@+~-]", f.name) for f in files)
    tensor = scanned["result"].super_weights[0].hf_tensor
    for file in files:
        text = file.read_text()
        if fmt == "llama.cpp":
            ((pattern, kind),) = llama_cpp_tokens(text)
            assert kind == "q8_0" and re.search(pattern, "blk.2.ffn_down.weight")
            assert not re.search(pattern, "blk.12.ffn_down.weight")
        elif fmt == "llm-compressor":
            recipe = yaml.safe_load(text)
            assert list(recipe) == ["quant_stage"]  # no stage gained from a name
            ignore = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["ignore"]
            assert ignore == ["lm_head", tensor.removesuffix(".weight")]
        elif fmt == "elements":
            (element,) = [json.loads(line) for line in text.splitlines()]
            assert element["repo_id"] in NAMES and element["hf_tensor"] == tensor
        else:
            assert json.loads(text)["_superweight"]["repo_id"] in NAMES
    if fmt == "elements":  # each model's file holds that model: the names survive exactly
        names = {json.loads(f.read_text())["repo_id"] for f in files}
        assert names == set(NAMES)


def test_a_file_that_cannot_be_written_is_one_line_and_the_others_are_written(scanned, tmp_path):
    models = keep.select(duckdb.connect(str(scanned["catalog"]), read_only=True))
    blocked = dict(zip((m.repo_id for m in models), keep.file_names(models, "elements")))["plain/model"]
    (tmp_path / blocked).mkdir()  # a folder where that model's file would go
    (tmp_path / blocked / "x").write_text("")
    result = run("export", "--keep", "elements", "--catalog", scanned["catalog"], "--out", tmp_path)
    assert result.exit_code == 3
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert blocked in error and "cannot write the keep-list" in error
    assert len(list(tmp_path.iterdir())) == len(NAMES)  # the seven others, and the folder in the way
    assert f"wrote {len(NAMES) - 1} keep-list(s)" in result.stderr


def test_keep_lists_of_unverified_rows_say_why_they_keep_nothing(scanned, tmp_path):
    catalog = tmp_path / "unverified.duckdb"
    with Catalog(catalog) as writer:  # scanned without --verify: its one row is `unverified`
        writer.record_scan(dataclasses.replace(scan(str(scanned["root"] / "m")), repo_id="plain/unverified"))
    result = run("export", "--keep", "bitsandbytes", "--catalog", catalog, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "no super weight of the index has verdict super,group" in result.stderr
    assert "--verdict super,group,unverified" in result.stderr


# -- a hostile published index ------------------------------------------------------------------

def publish_like(source, target, sql: str):
    """A catalog.parquet made from `source` by `sql` (over table `c`), with a manifest that matches it:
    what anyone can publish."""
    from superweight.scanner.digest import file_sha256

    target.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"CREATE TABLE c AS SELECT * FROM read_parquet('{source}')")
    con.execute(f"COPY ({sql}) TO '{target / 'catalog.parquet'}' (FORMAT parquet)")
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{target / 'catalog.parquet'}')").fetchone()[0]
    manifest = {"file": "catalog.parquet", "sha256": file_sha256(target / "catalog.parquet"), "rows": rows,
                "schema_version": 3, "created": "2026-12-01T00:00:00+00:00"}
    (target / "catalog.json").write_text(json.dumps(manifest))
    return target / "catalog.parquet"


PLAIN = "repo_id = 'plain/model'"
HOSTILE = {  # what is changed in plain/model's row -> what the refusal says
    "escape in repo_id": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN repo_id || chr(27) || '[2J' ELSE repo_id END "
                          "AS repo_id) FROM c", "holds control characters"),
    "layer -1": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN -1 ELSE layer END AS layer) FROM c", "layer -1 is negative"),
    "layer past the model": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN 99 ELSE layer END AS layer) FROM c",
                             "layer 99 is past the model's"),
    "null coordinates": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN NULL ELSE out_channel END AS out_channel) FROM c",
                         "coordinates are partly null"),
    "NaN value": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN 'nan'::DOUBLE ELSE weight END AS weight) FROM c",
                  "weight is nan, not finite"),
    "NaN coordinate": ("SELECT * REPLACE (layer::DOUBLE AS layer) FROM c", "column layer is DOUBLE"),
    "a tensor name with a space": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN 'blk.2 x=f32' ELSE tensor END AS tensor) "
                                   "FROM c", "is not a tensor name"),
    "an unknown verdict": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN 'trust me' ELSE verdict END AS verdict) FROM c",
                           "verdict trust me is not one of"),
    "a huge name": (f"SELECT * REPLACE (CASE WHEN {PLAIN} THEN repeat('x', 100000) ELSE repo_id END AS repo_id) FROM c",
                    "repo_id is 100000 characters long"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_download_refuses_a_hostile_index_and_keeps_the_local_copy(scanned, case, tmp_path):
    sql, says = HOSTILE[case]
    parquet = publish_like(scanned["good"], tmp_path / "pub", sql)
    dest = tmp_path / "home" / "catalog.parquet"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with pytest.raises(NotACatalog) as refused:
        download(str(parquet), dest)
    assert says in str(refused.value) and "\n" not in str(refused.value) and len(str(refused.value)) < 1000
    assert dest.read_bytes() == b"old" and sorted(p.name for p in dest.parent.iterdir()) == ["catalog.parquet"]


@pytest.mark.parametrize("command", [["export", "--keep", "elements", "--repo", "plain/model"],
                                     ["query", "SELECT * FROM catalog"], ["download"]])
def test_every_reader_of_a_hostile_index_refuses_it_in_one_line(scanned, command, tmp_path, home):
    sql, says = HOSTILE["NaN value"]
    parquet = publish_like(scanned["good"], tmp_path / "pub", sql)
    args = [*command, parquet] if command == ["download"] else [*command, "--from", parquet]
    result = run(*args)
    assert_one_line_error(result, says)
    assert result.stdout == ""


def test_audit_refuses_a_hostile_index_before_reading_the_file(scanned, tmp_path, home):
    sql, says = HOSTILE["layer -1"]
    parquet = publish_like(scanned["good"], tmp_path / "pub", sql)
    gguf = make_gguf(tmp_path / "m.gguf", "llama", [Plant(2, 10, 20)], qtype=GGMLQuantizationType.Q8_0)
    assert_one_line_error(run("audit", gguf, "--base", "plain/model", "--from", parquet), says)


@pytest.mark.parametrize("url, says", [
    ("https://huggingface.co/org/model\nError: forged line", "does not name a Hub repo"),
    ("https://huggingface.co/org/" + "m" * 1_000_000, "more characters"),
    (f"https://huggingface.co/{ESC}/x", "does not name a Hub repo"),
])
def test_a_gguf_files_base_name_is_checked_and_shown_plainly(url, says, tmp_path, home):
    gguf = make_gguf(tmp_path / "m.gguf", "llama", [], qtype=GGMLQuantizationType.Q8_0,
                     strings={"general.base_model.0.repo_url": url})
    result = run("audit", gguf)
    assert_one_line_error(result, says)
    assert "\x1b" not in result.stderr and len(result.stderr) < 1100


# -- publishing what download accepts ---------------------------------------------------------------

def test_a_manifest_without_its_creation_time_is_one_line(scanned, tmp_path):
    parquet = publish_like(scanned["good"], tmp_path / "pub", "SELECT * FROM c")
    manifest = json.loads((tmp_path / "pub" / "catalog.json").read_text())
    del manifest["created"]
    (tmp_path / "pub" / "catalog.json").write_text(json.dumps(manifest))
    for args in (["publish", tmp_path / "site", "--file", parquet], ["download", parquet, "--out", tmp_path / "c.parquet"]):
        assert_one_line_error(run(*args), "created None is not an ISO 8601 time")
    assert not (tmp_path / "site").exists()


def test_a_schema_1_export_that_download_accepts_publishes_with_its_own_columns(scanned, tmp_path):
    from superweight.index.schema import KEY_COLUMNS

    parquet = publish_like(scanned["good"], tmp_path / "pub", f"SELECT {', '.join(map(repr, KEY_COLUMNS))} FROM c"
                           .replace("'", '"'))
    manifest = json.loads((tmp_path / "pub" / "catalog.json").read_text())
    (tmp_path / "pub" / "catalog.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    assert run("download", parquet, "--out", tmp_path / "copy" / "catalog.parquet").exit_code == 0
    result = run("publish", tmp_path / "site", "--file", parquet)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "site" / "README.md").read_text()
    assert "| `out_channel` | int32 |" in card and "| `verdict` |" not in card  # the columns it has, no others
