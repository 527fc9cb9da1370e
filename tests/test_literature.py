"""Published coordinates become `literature` rows of the catalog, uncertain ones marked."""

import csv

from superweight.index.catalog import Catalog
from superweight.index.literature import LITERATURE_CSV, read_literature


def test_every_published_row_is_imported(tmp_path):
    published = list(csv.DictReader(open(LITERATURE_CSV, newline="")))
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_literature(read_literature())
        catalog.record_literature(read_literature())  # importing again replaces, never duplicates
        rows = catalog.fetch(
            "SELECT repo_id, layer, out_channel, in_channel, expert, note FROM catalog WHERE source = 'literature'"
        )
    assert len(rows) == len(published) == 47
    assert sorted((r[0], r[1], r[2], r[3]) for r in rows) == sorted(
        (p["hub_id"], int(p["layer"]), int(p["row"]), int(p["col"])) for p in published)
    llama7b = [r for r in rows if r[0] == "huggyllama/llama-7b"]
    assert [(r[1], r[2], r[3]) for r in llama7b] == [(2, 3968, 7003)]  # the paper's Table 2


def test_uncertain_rows_stay_marked_and_experts_are_parsed():
    models = read_literature()
    olmo = models["allenai/OLMo-1B-0724-hf"]
    assert sum("UNCERTAIN" in w["note"] for w in olmo) == 1
    uncertain = next(w for w in olmo if "UNCERTAIN" in w["note"])
    assert (uncertain["layer"], uncertain["out_channel"], uncertain["in_channel"]) == (1, 1764, 8041)
    assert [w["expert"] for w in models["Qwen/Qwen3-30B-A3B"]] == [68, 92, 82]
    assert all(w["expert"] is None for w in models["meta-llama/Meta-Llama-3-8B"])
