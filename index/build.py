"""Build the published index from the repo: the literature plus the committed scan results.

`superweight build-index` imports index/data/published_super_weights.csv and every scan result in
index/data/scans/*.json (the JSON lines `superweight scan --json` prints) into a throwaway catalog
and exports it. The inputs are committed, so the same repo always builds the same catalog.parquet;
tests/test_build.py checks the committed file (index/data/catalog.parquet, shipped in the package)
against a fresh build, and a fresh scan against the
committed scan results.
"""

import json
import tempfile
from pathlib import Path

from superweight.scanner.result import ScanResult

from .catalog import Catalog, Manifest
from .literature import read_literature

SCANS_DIR = Path(__file__).parent / "data" / "scans"
# The published index as this repo builds it, shipped inside the package: what `query`, `export --keep`
# and `audit` read where there is no local catalog and nothing downloaded (offline, a fresh install).
PUBLISHED = Path(__file__).parent / "data" / "catalog.parquet"


def read_scans(folder: Path = SCANS_DIR) -> list[ScanResult]:
    """The successful scan results committed in `folder`, in file order."""
    results = []
    for file in sorted(folder.glob("*.json")):
        for line in file.read_text().splitlines():
            result = json.loads(line)
            if result.get("status") == "ok":
                results.append(ScanResult.from_json(result))
    return results


def build_index(out: Path, *, scans: Path = SCANS_DIR) -> Manifest:
    """Write catalog.parquet (and catalog.json) at `out` from the literature and the committed scans."""
    with tempfile.TemporaryDirectory(prefix="superweight-build-") as tmp, Catalog(Path(tmp) / "c.duckdb") as catalog:
        catalog.record_literature(read_literature())
        for result in read_scans(scans):
            catalog.record_scan(result)
        return catalog.export(out)
