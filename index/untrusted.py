"""An index read from outside (a downloaded, published or given catalog.parquet), checked before use.

A manifest's sha256 says that a file is the one it names, not that its values are sane: anyone can
publish a catalog.parquet. Before a download replaces the local copy, before `publish` puts an
export out, and before `query`, `export --keep` or `audit` read one, every column's type and every
value is checked here: coordinates are non-negative integers (a layer inside the model's layers),
figures are finite or null, names are plain (no control characters, a bounded length, tensor names
of the characters tensor names have), verdicts and sources are the ones this superweight writes.
The first offending row is named in one line; nothing of such an index is used.

The checks run in DuckDB, over the whole table at once: an index of millions of rows costs one scan.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from superweight.scanner.errors import shown

from .errors import NotACatalog

CONTROL = r"[\x00-\x1f\x7f-\x9f]"  # RE2: what a terminal would act on (scanner.errors.CONTROL)
TENSOR_NAME = r"[A-Za-z0-9_.\-]{1,256}"  # model.layers.11.mlp.down_proj.weight, blk.11.ffn_down.weight
MAX_TEXT = {"note": 4096, "artifact": 4096}  # characters; every other text column at most MAX_NAME
MAX_NAME = 1024
MAX_LAYERS = 4096  # as scanner.config.SIZE_LIMITS allows a config
VERDICTS = ("super", "group", "inert", "unverified")
SOURCES = ("scan", "literature")
# A DuckDB session that reads local files only: no extension is installed or loaded to reach a URL.
CLOSED = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def quoted(path) -> str:
    """A path as the inside of a SQL string literal (table functions take literals, not parameters)."""
    return str(path).replace("'", "''")


@dataclass(frozen=True)
class Rule:
    """One check: `columns` it needs, the SQL that is true for a bad row, and how to word what is wrong."""

    columns: tuple[str, ...]
    bad: str
    says: Callable[[dict], str]


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _coordinate(name: str) -> Rule:
    return Rule((name,), f'"{name}" < 0', lambda r: f"{name} {r[name]} is negative")


def _position(name: str) -> Rule:
    return Rule((name,), f'list_min("{name}") < 0 OR len("{name}") NOT BETWEEN 2 AND 3 OR list_has_any("{name}", [NULL])',
                lambda r: f"{name} {shown(r[name])} is not a position of 2 or 3 non-negative integers")


RULES = (
    Rule(("repo_id",), "repo_id IS NULL OR repo_id = ''", lambda r: "it has no repo_id"),
    Rule(("num_layers",), f"num_layers < 0 OR num_layers > {MAX_LAYERS}",
         lambda r: f"num_layers {r['num_layers']} is not a number of layers (0-{MAX_LAYERS})"),
    _coordinate("layer"),
    Rule(("layer", "num_layers"), "layer >= num_layers",
         lambda r: f"layer {r['layer']} is past the model's {r['num_layers']} layers"),
    Rule(("layer", "out_channel", "in_channel"),
         "(layer IS NULL) <> (out_channel IS NULL) OR (layer IS NULL) <> (in_channel IS NULL)",
         lambda r: f"its coordinates are partly null (layer {r['layer']}, out_channel {r['out_channel']}, "
                   f"in_channel {r['in_channel']}): a super weight has all three, a scan without one none"),
    Rule(("layer", "expert"), "layer IS NULL AND expert IS NOT NULL", lambda r: "it has an expert but no layer"),
    _coordinate("expert"), _coordinate("out_channel"), _coordinate("in_channel"),
    _position("index"), _position("hf_index"),
    Rule(("verdict",), f"verdict NOT IN ({_listed(VERDICTS)})",
         lambda r: f"verdict {shown(r['verdict'])} is not one of {', '.join(VERDICTS)}"),
    Rule(("source",), f"source IS NULL OR source NOT IN ({_listed(SOURCES)})",
         lambda r: f"source {shown(r['source'])} is not one of {', '.join(SOURCES)}"),
    *(Rule((name,), f"NOT regexp_full_match(\"{name}\", '{TENSOR_NAME}')",
           lambda r, name=name: f"{name} {shown(r[name])} is not a tensor name") for name in ("tensor", "hf_tensor")),
)


@functools.cache
def expected_types() -> dict[str, str]:
    """The DuckDB type of each column of the `catalog` view (and so of catalog.parquet)."""
    from .schema import TABLES, VIEW

    with duckdb.connect() as con:
        con.execute(TABLES)
        con.execute(VIEW)
        return {name: kind for name, kind, *_ in con.execute("DESCRIBE catalog").fetchall()}


def check_index(con: duckdb.DuckDBPyConnection, relation: str, *, where: str) -> None:
    """Raise NotACatalog unless every column of `relation` (a table, or read_parquet('...')) in `con` has
    the catalog's type and every row passes the checks above.

    Raises:
        NotACatalog: naming the column, or the first bad row (its number, its repo_id, what is wrong).
    """
    columns = {name: kind for name, kind, *_ in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
    expected = expected_types()
    for name, kind in columns.items():
        if name in expected and kind != expected[name]:
            raise NotACatalog(f"{where}: column {shown(name)} is {kind}, not the catalog's {expected[name]}")
    known = {name: kind for name, kind in columns.items() if name in expected}  # only our names reach the SQL
    rules = [r for r in RULES if set(r.columns) <= set(known)] + _value_rules(known)
    if not rules:
        return
    cases = " ".join(f"WHEN {r.bad} THEN {i}" for i, r in enumerate(rules))
    first = con.execute(
        f"SELECT * FROM (SELECT *, row_number() OVER () AS superweight_row, CASE {cases} END AS superweight_rule, "
        f"count(*) FILTER (WHERE superweight_rule IS NOT NULL) OVER () AS superweight_bad FROM {relation}) "
        "WHERE superweight_rule IS NOT NULL ORDER BY superweight_row LIMIT 1")
    found = first.fetchone()
    if found is None:
        return
    row = dict(zip([d[0] for d in first.description], found))
    others = row["superweight_bad"] - 1
    raise NotACatalog(f"{where}: row {row['superweight_row']} ({shown(row.get('repo_id'))}): "
                      f"{rules[row['superweight_rule']].says(row)}"
                      f"{f' (and {others} more bad rows)' if others else ''}; not a usable index")


def _value_rules(columns: dict[str, str]) -> list[Rule]:
    """Finite figures, and plain text of bounded length, for each column of those types."""
    rules = []
    for name, kind in columns.items():
        if kind == "DOUBLE":
            rules.append(Rule((name,), f'NOT isfinite("{name}")', lambda r, name=name: f"{name} is {r[name]}, not finite"))
        elif kind == "VARCHAR":
            limit = MAX_TEXT.get(name, MAX_NAME)
            rules.append(Rule((name,), f"regexp_matches(\"{name}\", '{CONTROL}')",
                              lambda r, name=name: f"{name} {shown(r[name])} holds control characters"))
            rules.append(Rule((name,), f'length("{name}") > {limit}',
                              lambda r, name=name, limit=limit: f"{name} is {len(r[name])} characters long "
                                                                f"(at most {limit})"))
    return rules
