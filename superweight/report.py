"""What the command line prints: a scan's report, a crawl's lines, query tables, and JSON lines.

The one formatter of each thing; superweight.cli only chooses between them.
"""

import json
import math
import sys
import traceback

from superweight.index.errors import IndexStoreError
from superweight.scanner.config import DEBUG
from superweight.scanner.errors import OverLimit, ScanError, first_line, printable
from superweight.scanner.result import ScanResult


MAX_MESSAGE = 1000  # characters of an error line; a longer one (a huge name in it) is cut, with a count


def explain(error: Exception, *, source: str | None = None) -> str:
    """One line for the user about `error` (raised for `source`); the traceback only with SUPERWEIGHT_DEBUG=1.

    Errors carry data (`where`, a reason, a refusal's limit); this is where they are worded for the
    command line, e.g. a limit named by the option that sets it. The line is always one line that a
    terminal shows as text: names from untrusted files may hold newlines and ESC sequences.
    """
    if DEBUG:
        traceback.print_exception(error, file=sys.stderr)
    return printable(_worded(error, source), limit=MAX_MESSAGE)


def _worded(error: Exception, source: str | None) -> str:
    if isinstance(error, OverLimit):
        return f"{error} ({_flag(error.limit)})"
    if isinstance(error, (ScanError, IndexStoreError)):
        return str(error)
    hint = "" if DEBUG else " (set SUPERWEIGHT_DEBUG=1 for the traceback)"
    return f"{source}: unexpected {type(error).__name__}: {first_line(error)}{hint}"


def _flag(limit: str) -> str:
    """The option that sets a limit: max_params -> --max-params."""
    return "--" + limit.replace("_", "-")


def to_json(value) -> str:
    """One line of valid JSON: NaN and infinities (which JSON has no words for) become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), default=str, allow_nan=False)


def written(path, rows: int | None, sha256: str) -> str:
    """What export, download, publish and build-index wrote."""
    return f"{path}: {rows} rows, sha256 {sha256}"


def scan_report(result: ScanResult) -> str:
    """A readable report of one scan: the model, its super weights and activations, their effects."""
    rev = (result.revision or "")[:12]
    named = f" ({result.repo_id})" if result.repo_id not in (None, result.source) else ""
    lines = [f"{result.source}{named}  {result.model_type}, {result.num_layers} layers, "
             f"{result.dtype}, revision {rev}, {result.seconds:.1f} s"]
    if result.artifact:
        lines.append(f"  scanned: {result.artifact}")
    if not result.super_weights:
        top = max(result.detection.layers, key=lambda p: p.max_output)
        lines.append(f"  no super weight (loudest layer: {top.layer}, |down_proj output| {top.max_output:.4g})")
    else:
        lines += _weights_table(result)
    if result.verification is not None:
        lines += effects_report(result)
    if result.detection.rejected:
        lines.append(f"  {len(result.detection.rejected)} spike(s) rejected; --json lists them with reasons")
    return "\n".join(printable(line) for line in lines)  # a folder's name may hold anything


def _weights_table(result: ScanResult) -> list[str]:
    lines = [f"  {'layer':>5} {'expert':>6} {'row':>6} {'col':>6} {'weight':>10} {'input':>10} "
             f"{'output':>11} {'token':>5} {'spike':>7} {'pass':>4}  {'verdict':<10} tensor[index]"]
    for w in result.super_weights:
        expert = "-" if w.expert is None else w.expert
        lines.append(f"  {w.layer:>5} {expert:>6} {w.out_channel:>6} {w.in_channel:>6} {w.weight:>10.4g} "
                     f"{w.input_activation:>10.4g} {w.output_activation:>11.5g} {w.token:>5} "
                     f"{'x%.0f' % w.spike_ratio:>7} {w.round:>4}  {w.verdict:<10} {w.tensor}{w.index}")
    for i, a in enumerate(result.super_activations):
        where = ", ".join(str(layer) for layer in a.layers)
        lines.append(f"  super activation {i}: channel {a.channel} reaches {a.value:.5g} (token {a.token}, "
                     f"after layer {a.layer}); {len(a.weights)} weight(s) write it, in layer(s) {where}")
    return lines


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def effects_report(result: ScanResult) -> list[str]:
    """The effect of zeroing each super activation and each super weight, as lines of a report."""
    v = result.verification
    if v.skipped is not None:
        return [f"  not verified: {v.skipped}"]
    lines = [f"  zeroed, on {v.tokens} tokens of {' + '.join(v.texts)} (perplexity {v.base_ppl:.4g}) and "
             f"{len(v.prompts)} prompts (expected word {_percent(v.base_expected_prob)}, "
             f"stopwords {_percent(v.base_stopword_share)}); it matters at ppl x{v.matters:g} and over:"]
    for i, a in enumerate(result.super_activations):
        e = a.effect
        lines.append(f"  super activation {i}, its {len(a.weights)} weight(s) together: ppl x{e['ppl_ratio']:.4g}, "
                     f"KL {e['kl']:.3g}; their controls x{e['control']['ppl_ratio']:.4g}"
                     f"{'' if e['matters'] else ': inert'}")
    lines.append(f"  {'layer':>5} {'row':>6} {'col':>6} {'ppl':>9} {'KL':>8} {'expected':>9} {'stopwords':>9}"
                 f"   control [row, col] = weight: ppl, KL")
    for w in result.super_weights:
        e = w.effect
        if e is None:
            lines.append(f"  {w.layer:>5} {w.out_channel:>6} {w.in_channel:>6}   not measured alone: "
                         "its super activation is inert")
            continue
        c = e["control"]
        lines.append(f"  {w.layer:>5} {w.out_channel:>6} {w.in_channel:>6} {'x%.4g' % e['ppl_ratio']:>9} "
                     f"{e['kl']:>8.3g} {_percent(e['expected_prob']):>9} {_percent(e['stopword_share']):>9}   "
                     f"[{c['out_channel']}, {c['in_channel']}] = {c['weight']:.4g}: x{c['ppl_ratio']:.4g}, {c['kl']:.3g}")
    if len(result.super_activations) > 1:
        lines.append(f"  all {len(result.super_weights)} together: ppl x{v.joint_ppl_ratio:.4g}, KL {v.joint_kl:.3g}")
    lines.append(f"  {v.passes} passes, {v.copies} model copies, {v.seconds:.1f} s")
    return lines


def figure_line(out, data) -> str:
    """What `superweight plot` drew (data: scanner.plot.Figure)."""
    marks = ", ".join(f"layer {layer} [{row}, {col}]" for layer, row, col, _ in data.super_weights) or "no super weight"
    if data.effects:
        marks += "; zeroed: " + ", ".join(f"ppl x{ppl:.3g} (control x{control:.3g})" for _, ppl, control, _ in data.effects)
    return f"{out}: {len(data.layers)} layers, {marks}"


def crawl_counts(report) -> str:
    """A crawl's tally so far (report: index.crawl.CrawlReport)."""
    counts = report.counts
    return (f"{counts['succeeded']} scanned, {counts['refused']} refused, {counts['failed']} failed, "
            f"{counts['skipped']} skipped, {report.queued} queued")


def crawl_summary(report) -> dict:
    """The last JSON line of a crawl."""
    return {**report.counts, "models": len(report.outcomes), "seconds": round(report.seconds, 1),
            "network_seconds": round(report.network_seconds, 1), "compute_seconds": round(report.compute_seconds, 1),
            "bytes_fetched": report.bytes_fetched, "requests": report.requests}


def crawl_line(outcome: dict) -> str:
    """One crawled model: its state and what was found, or why not."""
    if outcome["state"] == "succeeded":
        detail = "; ".join(_outcome_weight(w) for w in outcome["super_weights"]) or "no super weight"
    else:
        detail = outcome.get("error") or outcome.get("reason", "")
        if outcome.get("limit"):  # a refusal for this run's limit: name the option that sets it
            detail += f" ({_flag(outcome['limit'])})"
    return printable(f"{outcome['repo_id']}@{outcome['revision'][:12]}  {outcome['state']}  {detail}")


def _outcome_weight(w: dict) -> str:
    expert = f" expert {w['expert']}" if w["expert"] is not None else ""
    verdict = f" {w['verdict']}" if w.get("verdict", "unverified") != "unverified" else ""
    effect = f" (ppl x{w['ppl_ratio']:.3g} zeroed)" if w.get("ppl_ratio") is not None else ""
    return f"layer {w['layer']}{expert} [{w['out_channel']}, {w['in_channel']}] = {w['weight']:.4g}{verdict}{effect}"


def table(columns: list[str], rows: list) -> list[str]:
    """Rows as aligned text columns under their names (NULL shown empty), one line per row whatever the
    cells hold: control characters (newlines, ESC sequences) are shown as their escapes."""
    cells = [[printable(c) for c in columns]] + [["" if v is None else printable(str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]


def ledger_line(record: dict) -> str:
    """One ledger record: state, attempts, when, what, and its error."""
    when = record["finished_at"] or record["started_at"]
    when = f"{when:%Y-%m-%d %H:%M}" if when else "-".ljust(16)  # queued: not started yet
    artifact = (record.get("artifact") or "").split(" ")[0]  # the file: an example's says more (--json has it all)
    what = f"{record['repo_id']}@{record['revision'][:12]}" + (f" {artifact}" if artifact else "")
    return printable(f"{record['state']:<9} {record['attempts']:>3}  {when}  {what}"
                     + (f"  {record['error']}" if record["error"] else ""))
