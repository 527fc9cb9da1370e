"""The commands over the index: `export` (catalog.parquet, or keep-lists), `query`, `download`,
`publish`, `build-index` and `ledger`; added to the command group in superweight.cli."""

import sys
from pathlib import Path

import click

from superweight import options as opt
from superweight.index.keep import DEFAULT_VERDICTS, FORMATS
from superweight.scanner.config import CATALOG_FILE
from superweight.scanner.errors import printable

from .report import MAX_MESSAGE, ledger_line, table, to_json, written

EXIT_SOME_FAILED = 3  # some models' keep-lists could not be written (as `scan`'s "some sources failed")


def _home() -> Path:
    """SUPERWEIGHT_HOME as the command group read it (superweight.cli, where tests set it)."""
    from superweight import cli

    return cli.SUPERWEIGHT_HOME


def existing_catalog(catalog_path: Path | None) -> Path:
    """The catalog to read, which a scan must have written already."""
    path = catalog_path or _home() / CATALOG_FILE
    if not path.is_file():
        raise click.ClickException(f"{path}: no catalog yet; run 'superweight scan' first")
    return path


def on_terminal() -> bool:
    """Whether stdout is a terminal, which acts on control characters (ls quotes names there too)."""
    return sys.stdout.isatty()


@click.command()
@click.option("--out", type=click.Path(path_type=Path),
              help="Where to write (default: catalog.parquet, with catalog.json beside it). With --keep: the file "
                   "(default: stdout) for --repo, else a folder that gets one file per model.")
@opt.catalog()
@click.option("--keep", "keep_format", type=click.Choice(FORMATS),
              help="Write keep-lists instead: the super weights' modules (or tensors, or elements) in this tool's form.")
@click.option("--repo", "repo_id", help="With --keep: this model only (its latest scan).")
@click.option("--revision", help="With --keep and --repo: this revision (a prefix of its sha or content hash).")
@opt.verdicts(",".join(DEFAULT_VERDICTS), "With --keep: the verdicts to keep")
@click.option("--from", "parquet", metavar="PATH_OR_URL", help="With --keep: read this catalog.parquet (as query --from).")
@click.option("--type", "gguf_type", default="q8_0", show_default=True, help="With --keep llama.cpp: the type kept tensors get.")
@click.option("--scheme", default="W4A16", show_default=True, help="With --keep llm-compressor: the recipe's scheme.")
def export(out, catalog_path, keep_format, repo_id, revision, verdicts, parquet, gguf_type, scheme) -> None:
    """Write catalog.parquet and its manifest, or keep-lists (--keep).

    catalog.json goes beside catalog.parquet, and quantization.parquet when the catalog holds
    `superweight quantize` figures. With --keep: what quantization tools should leave in high
    precision, in each tool's own form (README "Commands over the index").
    """
    if keep_format is not None:
        _export_keep(out, catalog_path, parquet, keep_format, repo_id=repo_id, revision=revision, verdicts=verdicts,
                     gguf_type=gguf_type, scheme=scheme)
        return
    from superweight.index.catalog import Catalog

    out = out or Path("catalog.parquet")
    with Catalog(existing_catalog(catalog_path), read_only=True) as catalog:
        manifest = catalog.export(out)
    click.echo(written(out, manifest.rows, manifest.sha256))


def _export_keep(out, catalog_path, parquet, fmt, *, repo_id, revision, verdicts, gguf_type, scheme) -> None:
    """Keep-lists from the index (the local catalog, else the downloaded or given catalog.parquet)."""
    from superweight.index import keep
    from superweight.index.query import choose_index, open_session

    catalog, parquet, note = choose_index(catalog_path, parquet, home=_home())
    models = keep.select(open_session(catalog=catalog, parquet=parquet), repo_id=repo_id, revision=revision,
                         verdicts=verdicts)
    click.echo(f"export: reading {note}; {keep.NOTE}", err=True)
    if repo_id is not None:
        text = keep.render(models[0], fmt, gguf_type=gguf_type, scheme=scheme)
        if not models[0].rows:
            click.echo(f"export: {printable(repo_id)} has no super weights with verdict {','.join(verdicts)}; "
                       "--verdict super,group,unverified also keeps the spikes not yet verified", err=True)
        if out is None or str(out) == "-":
            click.echo(text, nl=False)
        else:
            _write_keep(out, text)
            click.echo(f"wrote {out}", err=True)
        return
    if out is None:
        raise click.UsageError("--keep without --repo writes one file per model: give --out FOLDER")
    failed = 0
    for model, name in zip(models, keep.file_names(models, fmt)):
        try:
            _write_keep(out / name, keep.render(model, fmt, gguf_type=gguf_type, scheme=scheme))
        except click.ClickException as e:  # one model's file that cannot be written: say so, write the others
            click.echo(f"Error: {e.message}", err=True)
            failed += 1
    empty = [m for m in models if not m.rows]
    click.echo(f"wrote {len(models) - failed} keep-list(s) to {out}", err=True)
    if empty:
        whose = "of the index" if len(empty) == len(models) else f"of {len(empty)} of the {len(models)} models"
        click.echo(f"export: no super weight {whose} has verdict {','.join(verdicts)}, so their keep-lists keep "
                   "nothing; --verdict super,group,unverified also keeps the spikes not yet verified", err=True)
    if failed:
        sys.exit(1 if failed == len(models) else EXIT_SOME_FAILED)


def _write_keep(path: Path, text: str) -> None:
    """Write a keep-list aside and rename it into place; a place that cannot be written is one line."""
    from superweight.scanner.files import written_aside

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_aside(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise click.ClickException(printable(f"{path}: cannot write the keep-list ({e.strerror or e})",
                                             limit=MAX_MESSAGE)) from None


@click.command()
@click.argument("sql")
@click.option("--from", "source", metavar="PATH_OR_URL",
              help="Query this catalog.parquet (a path, an http(s) URL or hf://datasets/OWNER/NAME).")
@opt.catalog(f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}, else the downloaded "
             "$SUPERWEIGHT_HOME/catalog.parquet).")
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated values with a header.")
@opt.as_json("One JSON object per line per row.")
@click.option("--timeout", type=opt.Finite(min=0, min_open=True), default=60, show_default=True,
              help="Stop the query after this many seconds.")
@click.option("--max-memory", type=opt.Size(), default="2GB", show_default=True, help="Memory the query may use.")
@click.option("--max-rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Print at most this many rows.")
def query(sql, source, catalog_path, as_csv, as_json, timeout, max_memory, max_rows) -> None:
    """Run one read-only SELECT over the tables `catalog` and `scans` (the ledger).

    The query cannot write, read other files, reach the network or load extensions.
    """
    import csv

    from superweight.index.ledger import default_url
    from superweight.index.query import Limits, check_is_one_read, choose_index, open_session, run_query

    limits = Limits(timeout=timeout, max_memory=max_memory, max_rows=max_rows)
    check_is_one_read(sql)
    catalog, parquet, note = choose_index(catalog_path, source, home=_home())
    con = open_session(catalog=catalog, parquet=parquet, ledger_url=default_url(_home()), limits=limits)
    result = run_query(con, sql, limits=limits)
    click.echo(f"query: reading {note}", err=True)
    if as_json:
        for row in result.rows:
            click.echo(to_json(dict(zip(result.columns, row))))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        rows = [result.columns, *result.rows]
        if on_terminal():  # the values as text a terminal shows; a pipe or a file gets them exactly
            rows = [[printable(v) if isinstance(v, str) else v for v in row] for row in rows]
        writer.writerows(rows)
    else:
        for line in table(result.columns, result.rows):
            click.echo(line)
    if result.cut:
        click.echo(f"query: printed the first {max_rows} rows; there are more (raise --max-rows)", err=True)


@click.command()
@click.argument("source", required=False)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="The local copy to replace (default: $SUPERWEIGHT_HOME/catalog.parquet).")
def download(source, out) -> None:
    """Fetch a published catalog.parquet, verify its sha256, replace the local copy.

    SOURCE is a folder or path, an http(s) URL of catalog.parquet, or hf://datasets/OWNER/NAME
    (default: $SUPERWEIGHT_INDEX_URL or the project's published location).
    """
    from superweight.index.publish import DEFAULT_INDEX
    from superweight.index.publish import download as fetch

    dest = out or _home() / "catalog.parquet"
    manifest = fetch(source or DEFAULT_INDEX, dest)
    click.echo(written(dest, manifest.get("rows"), manifest["sha256"]))


@click.command()
@click.argument("target")
@click.option("--file", "parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Publish this export (catalog.parquet with its catalog.json) instead of exporting the local catalog.")
@opt.catalog()
@click.option("--private", is_flag=True, help="Create the dataset repo private, if it does not exist yet.")
def publish(target, parquet, catalog_path, private) -> None:
    """Publish catalog.parquet, its manifest and a dataset card.

    TARGET is a folder or hf://datasets/OWNER/NAME (one commit; the token comes from HF_TOKEN).
    """
    from superweight.index.catalog import Catalog
    from superweight.index.publish import publish as publish_to, publish_catalog

    if parquet is not None:
        show_published(publish_to(target, parquet, private=private))
        return
    with Catalog(existing_catalog(catalog_path), read_only=True) as catalog:
        show_published(publish_catalog(catalog, target, private=private))


def show_published(published) -> None:
    click.echo(written(published.target, published.manifest["rows"], published.manifest["sha256"]))
    if published.commit_url:
        click.echo(f"commit {published.commit_url}")


@click.command(name="build-index")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write; catalog.json goes beside it (default: the index shipped in the package, "
                   "index/data/catalog.parquet of a checkout).")
def build_index_command(out) -> None:
    """Rebuild the shipped index from the literature and the committed scans."""
    from superweight.index.build import PUBLISHED, build_index

    out = out or PUBLISHED
    manifest = build_index(out)
    click.echo(written(out, manifest.rows, manifest.sha256))


@click.command(name="ledger")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "refused"]),
              help="Only records in this state.")
@opt.as_json("One JSON object per line per record.")
def ledger_command(state, as_json) -> None:
    """Show the scan ledger: what was scanned, when, and why it failed."""
    from superweight.index.errors import LedgerUnavailable
    from superweight.index.ledger import Ledger, default_url, read_records

    url = default_url(_home())
    try:
        ledger = Ledger(url)  # upgrades an older ledger and expires lapsed leases
        records = ledger.records(state=state)
        ledger.close()
    except LedgerUnavailable:  # one it may not write (a read-only home): read it as it is
        records = [r for r in read_records(url) if state is None or r["state"] == state]
    for r in records:
        click.echo(to_json(r) if as_json else ledger_line(r))
