"""`superweight audit`: did a quantized GGUF file keep its model's super weights (added to the group in superweight.cli)."""

import sys
from pathlib import Path

import click

from superweight import options as opt

from .report import table, to_json

EXIT_DAMAGED = 3  # as "some sources failed": a script can tell a damaged file from an error (1)


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", help="The model it quantizes, as the index names it (default: the file's "
                             "general.base_model.0.repo_url).")
@opt.catalog()
@click.option("--from", "parquet", metavar="PATH_OR_URL", help="Read this catalog.parquet (as query --from).")
@click.option("--verdict", "verdicts", default="super,group,unverified", show_default=True,
              help="The index's super weights to check, by verdict (comma-separated).")
@click.option("--scan", "rescan", is_flag=True,
              help="Also scan the file itself: is each super activation still there?")
@opt.as_json("One JSON object.")
def audit(file, base, catalog_path, parquet, verdicts, rescan, as_json) -> None:
    """Check a quantized GGUF FILE: is each super weight of its base model still there?

    Reads only the quantization blocks that hold the super weights. Exit code 3 when any was
    clipped, changed or destroyed.
    """
    from superweight.cli import SUPERWEIGHT_HOME
    from superweight.index import keep
    from superweight.index.query import choose_index, open_session
    from superweight.scanner import audit as audits
    from superweight.scanner.fetch import LocalFile, Transfer
    from superweight.scanner.gguf_header import read_header

    wanted = tuple(v.strip() for v in verdicts.split(",") if v.strip())
    if not wanted or set(wanted) - set(keep.VERDICTS):
        raise click.BadParameter(f"{verdicts!r}: a comma-separated list of {', '.join(keep.VERDICTS)}",
                                 param_hint="--verdict")
    if base is None:
        source = LocalFile(file, Transfer())
        try:
            base = audits.base_repo(read_header(source))
        finally:
            source.close()
        if base is None:
            raise click.UsageError(f"{file} names no base model (general.base_model.0.repo_url): give --base REPO")
    catalog, parquet, _ = choose_index(catalog_path, parquet, home=SUPERWEIGHT_HOME)
    (model,) = keep.select(open_session(catalog=catalog, parquet=parquet), repo_id=base, verdicts=wanted)
    header, weights = audits.audit(file, model.rows)
    scanned = _super_activations(file, model.rows) if rescan else None
    if as_json:
        click.echo(to_json(audits.as_json(file, base, weights, scanned=scanned)))
    else:
        _print(file, base, weights, scanned)
    if audits.overall(weights) == "damaged" or (scanned and not all(scanned.values())):
        sys.exit(EXIT_DAMAGED)


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
