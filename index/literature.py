"""Published super-weight coordinates (index/data/published_super_weights.csv) as catalog rows.

Each row keeps its source text in `note`; rows whose source says UNCERTAIN stay marked so, with the
prefix "UNCERTAIN: " at the start of the note. They are keyed by (hub id, revision "", scanner
version "literature"): papers do not pin a commit.
"""

import csv
import re
from pathlib import Path

LITERATURE_CSV = Path(__file__).parent / "data" / "published_super_weights.csv"
LITERATURE_VERSION = "literature"  # stands in for the scanner version in the catalog key
_EXPERT = re.compile(r"\(expert (\d+)\)")


def read_literature(path: Path = LITERATURE_CSV) -> dict[str, list[dict]]:
    """hub id -> its published super weights, in file order, with `note` and `expert`."""
    models: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            expert = _EXPERT.search(row["model"])
            note = row["source"]
            if "UNCERTAIN" in note and not note.startswith("UNCERTAIN"):
                note = f"UNCERTAIN: {note}"
            models.setdefault(row["hub_id"], []).append({
                "layer": int(row["layer"]), "out_channel": int(row["row"]), "in_channel": int(row["col"]),
                "expert": int(expert.group(1)) if expert else None, "note": f"{row['model']}: {note}",
            })
    return models
