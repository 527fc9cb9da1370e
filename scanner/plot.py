"""The detection figure of a scan, like the paper's: per layer, the peak |input| and |output| of the
MLP output projection on a log scale, with the super weights marked and rejected spikes shown.
A verified scan adds a second panel with the evidence: the perplexity ratio of zeroing each super
weight, its control, and all of them together, with the expected-word probability on the prompts.

Drawn from a scan result (a scanner.result.ScanResult), so the figure shows exactly what the scan
judged: the first pass through the unmodified model.
"""

from dataclasses import dataclass
from pathlib import Path

from .errors import CannotWrite
from .files import written_aside
from .result import ScanResult


@dataclass(frozen=True)
class Figure:
    """What the figure shows, as data (the PNG is drawn from this)."""

    title: str
    layers: list[int]
    max_input: list[float]
    max_output: list[float]
    super_weights: list[tuple[int, int, int, float]]  # (layer, out_channel, in_channel, |output activation|)
    rejected: list[tuple[int, float, str]]  # (layer, |output activation|, reason)
    effects: tuple[tuple[str, float, float, float | None], ...] = ()  # (label, ppl ratio, control's, expected prob)
    groups: tuple[tuple[str, float, float], ...] = ()  # per super activation: (label, ppl ratio, its controls')
    joint_ppl_ratio: float | None = None  # all super weights zeroed together
    activations: int = 0  # super activations
    matters: float | None = None  # the verdicts' threshold on the perplexity ratio
    base_expected_prob: float | None = None


def figure_data(result: ScanResult) -> Figure:
    """The series and marks of `result`'s detection figure."""
    peaks = sorted(result.detection.layers, key=lambda p: p.layer)
    verification = result.verification if result.verification and result.verification.skipped is None else None
    return Figure(
        title=f"{result.repo_id or result.source}@{(result.revision or '')[:12]}: MLP output projection, one prompt",
        layers=[p.layer for p in peaks],
        max_input=[p.max_input for p in peaks],
        max_output=[p.max_output for p in peaks],
        super_weights=[(w.layer, w.out_channel, w.in_channel, abs(w.output_activation)) for w in result.super_weights],
        rejected=[(r["layer"], abs(r["output_activation"]), r["reason"]) for r in result.detection.rejected],
        effects=tuple((f"L{w.layer}" + (f" E{w.expert}" if w.expert is not None else "")
                       + f" [{w.out_channel}, {w.in_channel}]\n{w.verdict}", w.effect["ppl_ratio"],
                       w.effect["control"]["ppl_ratio"], w.effect["expected_prob"])
                      for w in result.super_weights if w.effect),
        groups=tuple((f"channel {a.channel}\n{len(a.weights)} together", a.effect["ppl_ratio"],
                      a.effect["control"]["ppl_ratio"])
                     for a in result.super_activations if a.effect and len(a.weights) > 1),
        joint_ppl_ratio=verification.joint_ppl_ratio if verification else None,
        activations=len(result.super_activations),
        matters=verification.matters if verification else None,
        base_expected_prob=verification.base_expected_prob if verification else None,
    )


def plot(result: ScanResult, out: Path) -> Figure:
    """Draw `result`'s detection figure (and its effects, if verified) to `out` (PNG) and return its data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = figure_data(result)
    if data.effects:
        fig, (ax, ax_effect) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=110, width_ratios=(3, 2))
        _draw_effects(ax_effect, data)
    else:
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    _draw_detection(ax, data)
    save(fig, out)
    return data


def save(fig, out: Path) -> None:
    """Write `fig` to `out` as a PNG, aside and renamed into place, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with written_aside(Path(out)) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as e:
        raise CannotWrite(f"cannot write the figure ({e.strerror or e})", where=out) from None
    finally:
        plt.close(fig)


def _draw_detection(ax, data: Figure) -> None:
    ax.semilogy(data.layers, data.max_input, marker="o", ms=3, label="peak |input| (down_proj)")
    ax.semilogy(data.layers, data.max_output, marker="s", ms=3, label="peak |output| (down_proj)")
    marks: dict[tuple[int, float], list[str]] = {}  # weights of one pass writing one row share a point
    for layer, row, col, value in data.super_weights:
        marks.setdefault((layer, value), []).append(f"[{row}, {col}]")
    for i, ((layer, value), cells) in enumerate(marks.items()):
        ax.scatter([layer], [value], s=120, facecolors="none", edgecolors="red", zorder=3,
                   label="super weight" if i == 0 else None)
        ax.annotate(f"L{layer} " + ", ".join(cells), (layer, value), textcoords="offset points",
                    xytext=(6, 6 + 10 * i), color="red", fontsize=8)
    for i, (layer, value, _reason) in enumerate(data.rejected):
        ax.scatter([layer], [value], marker="x", color="gray", zorder=3,
                   label="rejected spike (see the scan's reasons)" if i == 0 else None)
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation| over tokens and channels")
    ax.set_title(data.title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def _draw_effects(ax, data: Figure) -> None:
    """Bars: perplexity ratio with each super weight zeroed, each super activation's weights zeroed
    together (where it has several), and with their controls zeroed (log scale)."""
    x = range(len(data.effects) + len(data.groups))
    zeroed = [ppl for _, ppl, _, _ in data.effects] + [ppl for _, ppl, _ in data.groups]
    control = [ppl for _, _, ppl, _ in data.effects] + [ppl for _, _, ppl in data.groups]
    colors = ["tab:red"] * len(data.effects) + ["darkred"] * len(data.groups)
    ax.bar([i - 0.2 for i in x], zeroed, width=0.4, color=colors, label="zeroed")
    ax.bar([i + 0.2 for i in x], control, width=0.4, color="tab:gray", label="control zeroed")
    notes = [(ppl, prob) for _, ppl, _, prob in data.effects] + [(ppl, None) for _, ppl, _ in data.groups]
    for i, (ppl, prob) in enumerate(notes):
        note = f"x{ppl:.3g}" + (f"\np(expected) {100 * prob:.1f}%" if prob is not None else "")
        ax.annotate(note, (i - 0.2, ppl), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    if data.joint_ppl_ratio is not None and data.activations > 1:  # with one, it is that group's bar
        ax.axhline(data.joint_ppl_ratio, color="tab:red", ls="--", lw=1,
                   label=f"all zeroed: x{data.joint_ppl_ratio:.3g}")
    ax.axhline(1.0, color="black", lw=0.8)
    if data.matters is not None:
        ax.axhline(data.matters, color="black", ls=":", lw=1, label=f"matters from x{data.matters:g}")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [label for label, *_ in data.effects] + [label for label, *_ in data.groups], fontsize=8)
    ax.set_ylabel("perplexity / original perplexity")
    base = "" if data.base_expected_prob is None else f"; p(expected) intact: {100 * data.base_expected_prob:.1f}%"
    ax.set_title(f"effect of zeroing{base}", fontsize=9)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8)
