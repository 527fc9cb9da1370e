"""Every published super-weight pattern, replicated in a tiny model, is found exactly.

For each model in index/data/published_super_weights.csv the coordinates have a shape: how many
layers, which of them write the same residual channel (row), which weights read the same
intermediate channel (column), and for MoE which experts. A replica keeps that shape in a tiny
random model of the same family: the same layer numbers, distinct rows and columns mapped to small
distinct ones. The first layer to write a row creates its super activation; a later weight that
writes a row already written reads that super activation (it is driven by it, as the later OLMo,
Llama-30B and Phi-3 weights are). The README's literature table is generated from the same
patterns (`readme_table`), and a test keeps the two in step.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

from superweight.index.literature import read_literature
from superweight.scanner.scan import scan_source
from tests.checkpoints import Plant, coordinates, make_checkpoint

ROOT = Path(__file__).parent.parent

# Model name prefix (the CSV's `model` column) -> the tiny replica's family.
FAMILIES = {"Llama": "llama", "Meta-Llama": "llama", "LLaVA": "llama", "TowerBase": "llama", "Mistral": "mistral",
            "OLMo": "olmo", "Phi-3": "phi3", "Gemma": "gemma", "Falcon": "falcon", "Qwen3-30B-A3B": "qwen3_moe",
            "Qwen2": "qwen2"}


@dataclass(frozen=True)
class Pattern:
    """The published coordinates of one model: (layer, expert, row, col) each."""

    repo_id: str
    model: str
    weights: tuple[tuple[int, int | None, int, int], ...]
    uncertain: tuple[tuple[int, int | None, int, int], ...]  # marked UNCERTAIN in the CSV, left out of `weights`

    @property
    def family(self) -> str:
        return next(family for prefix, family in FAMILIES.items() if self.model.startswith(prefix))

    @property
    def layers(self) -> int:
        """Decoder layers of the replica: room after the last super weight, and at least 8."""
        return max(8, max(w[0] for w in self.weights) + 3)

    def replica(self) -> list[Plant]:
        """The pattern in a tiny model: rows from 10, columns from 20, experts from 1, layers as published."""
        rows = {r: 10 + i for i, r in enumerate(dict.fromkeys(w[2] for w in self.weights))}
        cols = {c: 20 + i for i, c in enumerate(dict.fromkeys(w[3] for w in self.weights))}
        experts = {e: 1 + i for i, e in enumerate(dict.fromkeys(w[1] for w in self.weights if w[1] is not None))}
        plants, written = [], set()
        for layer in sorted({w[0] for w in self.weights}):
            here = [w for w in self.weights if w[0] == layer]
            for expert, col in dict.fromkeys((w[1], w[3]) for w in here):
                neuron_rows = [w[2] for w in here if (w[1], w[3]) == (expert, col)]
                earlier = [r for r in neuron_rows if r in written]
                reads = rows[earlier[0]] if earlier else None  # driven by a super activation that exists already
                plants += [Plant(layer, rows[r], cols[col], expert=experts.get(expert), reads=reads)
                           for r in neuron_rows]
            written |= {w[2] for w in here}
        return plants

    def shape(self) -> str:
        """The pattern in words: layers, super activations (rows), super neurons (columns)."""
        layers = sorted({w[0] for w in self.weights})
        rows = {w[2] for w in self.weights}
        neurons = {(w[0], w[1], w[3]) for w in self.weights}
        parts = [f"{len(self.weights)} weight{'s' * (len(self.weights) > 1)} in layer{'s' * (len(layers) > 1)} "
                 + ", ".join(map(str, layers)),
                 f"{len(rows)} row{'s' * (len(rows) > 1)}", f"{len(neurons)} column{'s' * (len(neurons) > 1)}"]
        later = [w for w in self.weights if w[0] > min(x[0] for x in self.weights if x[2] == w[2])]
        if later:
            parts.append(f"{len(later)} in later layers writing an earlier row")
        if any(w[1] is not None for w in self.weights):
            parts.append("experts " + ", ".join(str(w[1]) for w in self.weights))
        return "; ".join(parts)


def published_patterns() -> list[Pattern]:
    """One pattern per model of the literature CSV; UNCERTAIN rows count only where every row is."""
    patterns = []
    for repo_id, rows in read_literature().items():
        coords = [(r["layer"], r["expert"], r["out_channel"], r["in_channel"]) for r in rows]
        uncertain = [c for c, r in zip(coords, rows) if r["note"].split(": ", 1)[1].startswith("UNCERTAIN")]
        certain = [c for c in coords if c not in uncertain] or coords
        model = rows[0]["note"].split(": ", 1)[0].split(" (")[0]
        patterns.append(Pattern(repo_id, model, tuple(dict.fromkeys(certain)),
                                tuple(c for c in uncertain if c not in certain)))
    return patterns


PATTERNS = {p.repo_id: p for p in published_patterns()}


@pytest.mark.parametrize("repo_id", PATTERNS)
def test_a_replica_of_the_published_pattern_is_found_exactly(tmp_path, repo_id):
    pattern = PATTERNS[repo_id]
    plants = pattern.replica()
    make_checkpoint(tmp_path, pattern.family, plants, num_hidden_layers=pattern.layers)

    result = scan_source(str(tmp_path))

    assert coordinates(result) == {(p.layer, p.expert, p.row, p.col) for p in plants}
    assert len(result["super_activations"]) == len({w[2] for w in pattern.weights})
    assert len(result["super_neurons"]) == len({(w[0], w[1], w[3]) for w in pattern.weights})
    assert not result["truncated"]


def _coords(weights) -> str:
    return "; ".join(f"{layer}{f' e{expert}' if expert is not None else ''}: [{row}, {col}]"
                     for layer, expert, row, col in weights)


def readme_table() -> str:
    """The README's literature table: each published model, its pattern, and the replica test's verdict."""
    lines = ["| model | published (layer: [row, col]) | pattern | replica (family) found exactly |",
             "| --- | --- | --- | --- |"]
    for p in PATTERNS.values():
        left_out = f" (left out, UNCERTAIN: {_coords(p.uncertain)})" if p.uncertain else ""
        lines.append(f"| {p.model} (`{p.repo_id}`) | {_coords(p.weights)}{left_out} | {p.shape()} | "
                     f"yes ({p.family}, {p.layers} layers) |")
    return "\n".join(lines)


def test_the_readme_lists_every_published_pattern():
    assert readme_table() in (ROOT / "README.md").read_text(), (
        "README literature table is stale: paste tests.test_published.readme_table()")
