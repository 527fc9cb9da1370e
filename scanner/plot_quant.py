"""The quantization lab's figure: perplexity against block size, one line per variant, a panel per bit width.

Drawn from the figures `superweight quantize` measured (the catalog's `quantization` rows, or a
scan's `quantization`): blocks of the flattened matrix from small to the whole tensor along the x
axis, per-row groups to their left; for rtn+keep+clip and its control, the best z of each point.
"""

from pathlib import Path

from .plot import save

ORDER = ("rtn", "rtn+keep", "rtn+keep+clip", "rtn+keep-control", "rtn+keep+clip-control")


def quant_series(results: list[dict]) -> tuple[list[str], dict[int, dict[str, list[float | None]]]]:
    """The x labels (groups, then blocks, then the whole tensor) and, per bits and variant, the perplexity
    at each (None where not measured or not finite); the best z where z was swept."""
    groups = sorted({r["group_size"] for r in results if r["group_size"] is not None})
    blocks = sorted({r["block_size"] for r in results if r["block_size"] is not None})
    whole = any(r["block_size"] is None and r["group_size"] is None and not r["variant"].startswith("w8a8")
                for r in results)
    columns = [("group", g) for g in groups] + [("block", b) for b in blocks] + ([("tensor", None)] if whole else [])
    labels = [f"g{v}" if kind == "group" else _block_label(v) if kind == "block" else "tensor" for kind, v in columns]
    series: dict[int, dict[str, list[float | None]]] = {}
    for r in results:
        if r["variant"] not in ORDER:
            continue
        column = ("group", r["group_size"]) if r["group_size"] is not None else (
            ("block", r["block_size"]) if r["block_size"] is not None else ("tensor", None))
        line = series.setdefault(r["bits"], {}).setdefault(r["variant"], [None] * len(columns))
        i = columns.index(column)
        if r["ppl"] is not None and (line[i] is None or r["ppl"] < line[i]):
            line[i] = r["ppl"]
    return labels, series


def _block_label(size: int) -> str:
    root = round(size ** 0.5)
    return f"{root}²" if root * root == size else str(size)


def plot_quant(title: str, base_ppl: float, results: list[dict], out: Path) -> dict:
    """Draw the figure to `out` (PNG); returns what it shows: {"labels", "series", "base_ppl"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series = quant_series(results)
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(5.5 * max(1, len(series)), 4.2), dpi=110, squeeze=False)
    for ax, bits in zip(axes[0], sorted(series, reverse=True), strict=False):
        for variant in ORDER:
            values = series[bits].get(variant)
            if values is None:
                continue
            points = [(i, v) for i, v in enumerate(values) if v is not None]
            ax.plot([i for i, _ in points], [v for _, v in points], marker="o",
                    linestyle="--" if variant.endswith("-control") else "-", label=variant)
        ax.axhline(base_ppl, color="grey", linewidth=0.8, label="unquantized")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.set_title(f"{bits}-bit weights")
        ax.set_xlabel("per-row groups | blocks of the flattened matrix")
        ax.set_ylabel("perplexity")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    save(fig, out)
    return {"labels": labels, "series": series, "base_ppl": base_ppl}
