"""The committed catalog.parquet (index/data/, shipped in the package) is what `superweight build-index` makes from the repo, and the
committed scan of the real model is what a scan gives today."""

import json

import pytest

from superweight.index.build import PUBLISHED, build_index, read_scans
from superweight.scanner.scan import scan_source


def test_committed_catalog_equals_a_fresh_build(tmp_path):
    manifest = build_index(tmp_path / "catalog.parquet")

    assert (tmp_path / "catalog.parquet").read_bytes() == PUBLISHED.read_bytes(), (
        "index/data/catalog.parquet is stale: run `superweight build-index` and commit it with catalog.json")
    committed = json.loads(PUBLISHED.with_suffix(".json").read_text())
    assert (committed["sha256"], committed["rows"]) == (manifest.sha256, manifest.rows)


def test_committed_scan_of_smollm2_is_reproduced(smollm2):
    (committed,) = [r.to_json() for r in read_scans() if r.source == "example:smollm2"]

    fresh = scan_source("example:smollm2")  # the fixture placed the converted checkpoint for it

    # The published rows carry the evidence: zeroing the first super weight breaks the model.
    effect = committed["super_weights"][0]["effect"]
    assert effect["ppl_ratio"] > 10 and effect["control"]["ppl_ratio"] == pytest.approx(1, abs=0.01)

    # Named by the Hub id of the model it ships, revised by the shipped GGUF file: no installed version enters.
    assert (fresh["repo_id"], fresh["revision"]) == (committed["repo_id"], committed["revision"])
    assert committed["repo_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and committed["dtype"] == "Q4_1"
    assert fresh["scanner_version"] == committed["scanner_version"], (
        "a new scanner version: rescan with `superweight scan example:smollm2 --json --no-record`")
    for new, old in zip(fresh["super_weights"], committed["super_weights"], strict=True):
        assert (new["layer"], new["out_channel"], new["in_channel"], new["tensor"], new["index"]) == (
            old["layer"], old["out_channel"], old["in_channel"], old["tensor"], old["index"])
        assert new["weight"] == old["weight"]  # read from the file
        assert new["output_activation"] == pytest.approx(old["output_activation"], rel=1e-3)
