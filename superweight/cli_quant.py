"""`superweight quantize` (the quantization lab) and `superweight audit` (did a quantized GGUF file keep
its model's super weights); added to the command group in superweight.cli."""

import math
import sys
from pathlib import Path

import click

from superweight import options as opt
from superweight.scanner.errors import printable
from superweight.scanner.config import FULL_LAB, MAX_BITS, MAX_TOKENS, LabGrid

from .display import progress_display, progress_mode
from .report import table, to_json

EXIT_DAMAGED = 3  # as "some sources failed": a script can tell a damaged file from an error (1)


def _default(name: str, grid: LabGrid = LabGrid()) -> str:
    """A grid setting as the option takes it: 4 / 512^2,tensor / 9."""
    def word(v):
        if v is None:
            return "tensor"
        root = math.isqrt(v) if isinstance(v, int) else 0
        return f"{root}^2" if root > 64 and root * root == v else f"{v:g}"
    return ",".join(word(v) for v in getattr(grid, name))


def _numbers(kind, *, low: float, high: float, allow_tensor: bool = False):
    """A click callback: a comma-separated list of `kind` between `low` and `high` (ints also as N^K;
    "tensor" as None when allowed), each checked before anything is computed from it."""
    def parse(ctx, param, value):
        if value is None:
            return None
        items = []
        for item in (v.strip() for v in value.split(",") if v.strip()):
            try:
                items.append(None if allow_tensor and item == "tensor" else _number(item, kind, high))
            except ValueError:
                raise click.BadParameter(f"{item!r} is not a {kind.__name__}{' or N^K' if kind is int else ''}") from None
            if items[-1] is not None and not (math.isfinite(items[-1]) and low <= items[-1] <= high):
                raise click.BadParameter(f"{item[:40]!r}: must be between {_bound(low)} and {_bound(high)}")
        if not items:
            raise click.BadParameter("give at least one value")
        return tuple(items)
    return parse


def _bound(value: float) -> str:
    """A range's end as the option could take it: 2^48 rather than 2.81475e+14."""
    power = math.log2(value) if value > 1024 else 0
    return f"2^{power:.0f}" if power and power == int(power) else f"{value:g}"


def _number(item: str, kind, high: float):
    """`item` as `kind`; N^K is computed only when its size is known to be at most about `high`
    (3^99999999 would take minutes to compute and is refused by its length alone)."""
    if kind is int and "^" in item:
        base, _, power = item.partition("^")
        base, power = int(base), int(power)
        if base > 1 and power * math.log2(base) > math.log2(high) + 1:
            return math.inf  # out of range; not computed
        return base ** power
    if len(item) > 40:  # a number that long is out of every range here; int() of it costs time
        return math.inf
    return kind(item)


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--bits", callback=_numbers(int, low=1, high=MAX_BITS),
              help=f"Weight bits to try, 1-{MAX_BITS} (default {_default('bits')}).")
@click.option("--block-size", "block_sizes", callback=_numbers(int, low=1, high=2**48, allow_tensor=True),
              help="1-D runs of the flattened weight matrix (the paper's blocks; a block larger than a matrix is "
                   f"the matrix); 'tensor': the whole tensor (default {_default('block_sizes')}).")
@click.option("--group-size", "group_sizes", callback=_numbers(int, low=1, high=2**32),
              help="Per-row groups of this many inputs, the usual layout (a group wider than a row is the row; "
                   f"default {_default('group_sizes')}).")
@click.option("--z", "z", callback=_numbers(float, low=0.1, high=1000),
              help="Clipping thresholds of rtn+keep+clip: |w| > mean(|w|) + z std(|w|) per block "
                   f"(default {_default('z')}).")
@click.option("--full", is_flag=True,
              help=f"The full sweep: bits {_default('bits', FULL_LAB)}, blocks {_default('block_sizes', FULL_LAB)}, groups "
                   f"{_default('group_sizes', FULL_LAB)}, z {_default('z', FULL_LAB)} (hours on a CPU); options given "
                   "still apply.")
@click.option("--activations/--no-activations", default=True, show_default=True, help="The W8A8 variants.")
@click.option("--controls/--no-controls", default=True, show_default=True,
              help="The same variants keeping a same-magnitude ordinary weight instead.")
@click.option("--tokens", type=click.IntRange(min=2, max=MAX_TOKENS), default=2048, show_default=True,
              help="Evaluation tokens (at least two of the model's sequences, one from each text).")
@opt.progress
@click.option("--record/--no-record", default=True, show_default=True,
              help="Write the scan and the figures to the catalog (and the attempt to the ledger).")
@opt.catalog()
@opt.revision
@opt.device()
@opt.as_json("One JSON object per source: source, revision, base_ppl and results.")
def quantize(sources, bits, block_sizes, group_sizes, z, full, activations, controls, tokens, progress, record,
             catalog_path, revision, device, as_json) -> None:
    """Measure what keeping super weights buys round-to-nearest quantization.

    Scans SOURCE (detection; no verification), then streams the evaluation text through
    fake-quantized copies of every linear layer of its decoder layers and reports each variant's
    perplexity against the unquantized model's (README "The quantization lab").
    """
    from superweight.cli import DIGEST_CACHE, SUPERWEIGHT_HOME, each_source
    from superweight.scanner.digest import hash_sources_ahead

    hash_sources_ahead(sources, cache=SUPERWEIGHT_HOME / DIGEST_CACHE)  # while torch and transformers import
    from superweight.scanner.quantize import QuantConfig
    from superweight.scanner.scan import ScanOptions
    from superweight.scanner.verify import VerifyConfig

    grid = FULL_LAB if full else LabGrid()
    config = QuantConfig(bits=bits or grid.bits, block_sizes=block_sizes or grid.block_sizes,
                         group_sizes=group_sizes or grid.group_sizes, z=z or grid.z, activations=activations,
                         controls=controls, evaluation=VerifyConfig(tokens=tokens))
    options = ScanOptions(device=device, revision=revision, quantize=config)
    mode = progress_mode(progress)
    each_source(sources, record=record, catalog_path=catalog_path,
                handle=lambda run, source: _quantize_one(run, source, options, as_json=as_json, progress=mode))


def _quantize_one(run, source: str, options, *, as_json: bool, progress: str) -> bool:
    from superweight.cli import _report_failure

    try:
        with progress_display(source, progress) as display:
            result = run(source, options, progress=display)
    except Exception as e:  # one bad source must not stop the others
        _report_failure(e, source, as_json=as_json)
        return False
    lab = result.quantization
    if as_json:
        click.echo(to_json({"source": source, "status": "ok", "revision": result.revision,
                            "super_weights": len(result.super_weights), "base_ppl": lab["base_ppl"],
                            "tokens": lab["tokens"], "passes": lab["passes"], "results": lab["results"]}))
    else:
        _print_lab(result, lab)
    return True


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", help="The model it quantizes, as the index names it (default: the file's "
                             "general.base_model.0.repo_url).")
@opt.catalog()
@click.option("--from", "parquet", metavar="PATH_OR_URL", help="Read this catalog.parquet (as query --from).")
@opt.verdicts("super,group,unverified", "The index's super weights to check, by verdict")
@click.option("--scan", "rescan", is_flag=True,
              help="Also scan the file itself: is each super activation still there?")
@opt.as_json("One JSON object.")
def audit(file, base, catalog_path, parquet, verdicts, rescan, as_json) -> None:
    """Check a quantized GGUF FILE: did its base model's super weights survive?

    Reads only the quantization blocks that hold the super weights. Exit code 3 when any was
    clipped, changed or destroyed.
    """
    from superweight.index.errors import IndexStoreError
    from superweight.scanner import audit as audits
    from superweight.scanner.errors import ScanError

    from .report import explain

    try:
        base, weights, scanned = _audit(file, base, catalog_path, parquet, verdicts, rescan)
    except (ScanError, IndexStoreError) as e:
        if as_json:  # stdout stays JSON: one line saying what failed
            click.echo(to_json({"file": str(file), "status": "failed", "error": explain(e, source=str(file))}))
        raise
    if as_json:
        click.echo(to_json({"status": "ok", **audits.as_json(file, base, weights, scanned=scanned)}))
    else:
        _print(file, base, weights, scanned)
    if audits.overall(weights) == "damaged" or (scanned and not all(scanned.values())):
        sys.exit(EXIT_DAMAGED)


def _audit(file: Path, base: str | None, catalog_path, parquet, wanted: tuple[str, ...], rescan: bool):
    """(base, the audited weights, the super activations found by a scan or None)."""
    from superweight.cli import SUPERWEIGHT_HOME
    from superweight.index import keep
    from superweight.index.query import choose_index, open_session
    from superweight.scanner import audit as audits
    from superweight.scanner.fetch import LocalFile, Transfer
    from superweight.scanner.gguf_header import read_header

    source = LocalFile(file, Transfer())
    try:
        header = read_header(source)  # once: for the base it names, and for the blocks' places
        base = base or audits.base_repo(header, where=file)
        if base is None:
            raise click.UsageError(f"{file} names no base model (general.base_model.0.repo_url): give --base REPO")
        catalog, parquet, _ = choose_index(catalog_path, parquet, home=SUPERWEIGHT_HOME)
        (model,) = keep.select(open_session(catalog=catalog, parquet=parquet), repo_id=base, verdicts=wanted)
        weights = audits.read_blocks(source, header, model.rows)
    finally:
        source.close()
    return base, weights, _super_activations(file, model.rows) if rescan else None


def _print_lab(result, lab: dict) -> None:
    from superweight.scanner.quantize import best_clip

    click.echo(printable(f"{result.name} @ {result.revision[:12]}: {len(result.super_weights)} super weight(s)"))
    click.echo(f"  base perplexity {lab['base_ppl']:.4g} on {lab['tokens']} tokens; ppl ratio per variant "
               "(clip: the best z)")
    cells: dict[tuple, dict] = {}
    for r in best_clip(lab["results"]):
        shape = "tensor" if r["block_size"] is None and r["group_size"] is None else (
            f"block {r['block_size']}" if r["block_size"] else f"group {r['group_size']}")
        if r["variant"].startswith("w8a8"):
            shape = "per row"
        ratio = "inf" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.4g}"
        cells.setdefault((r["bits"], shape), {})[r["variant"]] = ratio + (f" (z {r['z']:g})" if r["z"] else "")
    names = list(dict.fromkeys(r["variant"] for r in lab["results"]))
    rows = [(bits, shape, *(row.get(n, "") for n in names)) for (bits, shape), row in cells.items()]
    for line in table(["bits", "weights", *names], rows):
        click.echo("  " + line)


def _super_activations(file: Path, rows: list[dict]) -> dict[str, bool]:
    """Scan the file: for each super activation of the base model (layer, channel), does the scan of the
    quantized file find a super weight writing that channel?"""
    from superweight.scanner.scan import scan

    found = {(w.layer, w.out_channel) for w in scan(str(file)).super_weights}
    return {f"layer {r['layer']} channel {r['out_channel']}": (r["layer"], r["out_channel"]) in found for r in rows}


def _print(file: Path, base: str, weights, scanned: dict[str, bool] | None) -> None:
    from superweight.scanner.audit import TOLERANCE, overall

    click.echo(f"{file}: {len(weights)} super weight(s) of {base}")
    columns = ["tensor", "index", "type", "original", "stored", "rel error", "scale", "largest", "verdict"]
    rows = [(w.tensor, f"{'' if w.expert is None else f'{w.expert}, '}{w.row}, {w.col}", w.qtype, f"{w.original:.6g}",
             "non-finite" if w.stored is None else f"{w.stored:.6g}",
             "-" if w.rel_error is None else f"{w.rel_error:.2%}", "-" if w.scale is None else f"{w.scale:.4g}",
             "yes" if w.largest_in_block else "no", w.verdict) for w in weights]
    for line in table(columns, rows):
        click.echo(line)
    for activation, alive in (scanned or {}).items():
        click.echo(f"super activation {activation}: {'still found' if alive else 'NOT FOUND'} in a scan of the file")
    click.echo(f"verdict: {overall(weights)} (kept: within {TOLERANCE:.0%} of the original)")


def plot_quant(source: str, out: Path, revision: str | None, catalog_path: Path | None) -> None:
    """The quantization figure of SOURCE's latest measured revision (or `revision`), from the catalog."""
    import duckdb

    from superweight.cli_index import existing_catalog
    from superweight.index.catalog import Catalog
    from superweight.scanner.plot_quant import plot_quant as draw

    name = str(Path(source).resolve()) if Path(source).exists() else source  # as the catalog names folders
    with Catalog(existing_catalog(catalog_path), read_only=True) as catalog:
        try:
            rows = catalog.fetch_dicts(
                "SELECT * FROM quantization WHERE repo_id = ? AND (? IS NULL OR revision LIKE ? || '%') "
                "ORDER BY measured_at DESC, revision", [name, revision, revision])
        except duckdb.CatalogException:  # a catalog from before the quantization lab
            rows = []
    if not rows:
        raise click.ClickException(f"{source}: no quantization figures in the catalog; run "
                                   f"'superweight quantize {source}' first")
    key = ("revision", "scanner_version", "artifact")  # one scan's figures: a GGUF repo's files are scans apart
    latest = [r for r in rows if all(r[k] == rows[0][k] for k in key)]
    data = draw(f"{name} @ {latest[0]['revision'][:12]}", latest[0]["base_ppl"], latest, out)
    click.echo(f"wrote {out}: {sum(len(v) for v in data['series'].values())} line(s) over {len(data['labels'])} "
               "weight layout(s)")
