"""The detection figure of a scan, like the paper's: per layer, the peak |input| and |output| of the
MLP output projection on a log scale, with the super weights marked and rejected spikes shown.

Drawn from a scan result (scanner.scan.scan_source), so the figure shows exactly what the scan
judged: the first pass through the unmodified model.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    """What the figure shows, as data (the PNG is drawn from this)."""

    title: str
    layers: list[int]
    max_input: list[float]
    max_output: list[float]
    super_weights: list[tuple[int, int, int, float]]  # (layer, out_channel, in_channel, |output activation|)
    rejected: list[tuple[int, float, str]]  # (layer, |output activation|, reason)


def figure_data(result: dict) -> Figure:
    """The series and marks of `result`'s detection figure."""
    peaks = sorted(result["layers"], key=lambda p: p["layer"])
    where = result.get("repo_id") or result["source"]
    return Figure(
        title=f"{where}@{(result.get('revision') or '')[:12]}: MLP output projection, one prompt",
        layers=[p["layer"] for p in peaks],
        max_input=[p["max_input"] for p in peaks],
        max_output=[p["max_output"] for p in peaks],
        super_weights=[(w["layer"], w["out_channel"], w["in_channel"], abs(w["output_activation"]))
                       for w in result["super_weights"]],
        rejected=[(r["layer"], abs(r["output_activation"]), r["reason"]) for r in result.get("rejected", [])],
    )


def plot(result: dict, out: Path) -> Figure:
    """Draw `result`'s detection figure to `out` (PNG) and return its data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = figure_data(result)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.semilogy(data.layers, data.max_input, marker="o", ms=3, label="peak |input| (down_proj)")
    ax.semilogy(data.layers, data.max_output, marker="s", ms=3, label="peak |output| (down_proj)")
    for i, (layer, row, col, value) in enumerate(data.super_weights):
        ax.scatter([layer], [value], s=120, facecolors="none", edgecolors="red", zorder=3,
                   label="super weight" if i == 0 else None)
        ax.annotate(f"L{layer} [{row}, {col}]", (layer, value), textcoords="offset points", xytext=(6, 6 + 10 * i),
                    color="red", fontsize=8)
    for i, (layer, value, _reason) in enumerate(data.rejected):
        ax.scatter([layer], [value], marker="x", color="gray", zorder=3,
                   label="rejected spike (see the scan's reasons)" if i == 0 else None)
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation| over tokens and channels")
    ax.set_title(data.title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return data
