"""`superweight crawl`: scan new Hub models, or given ones, on a Ray cluster (added to the group in superweight.cli)."""

import logging
import sys
from contextlib import ExitStack

import click

from superweight import options as opt
from superweight.scanner.errors import first_line

from .report import crawl_counts, crawl_line, crawl_summary, to_json


@click.command()
@click.argument("repo_ids", nargs=-1)
@click.option("--repos", "repos_file", type=click.File(), help="Scan the repo ids in this file (one per line, # comments).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="Discovery: models modified on or after this date (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Discovery: at most this many models.")
@click.option("--max-params", type=opt.Count(), help="Refuse models with more parameters, e.g. 8e9 or 8B.")
@click.option("--address", envvar="RAY_ADDRESS", help="Join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray).")
@click.option("--workers", type=click.IntRange(min=1), help="Scan workers (default: one per GPU, else one per 2 CPUs).")
@click.option("--gpus-per-worker", type=opt.Finite(min=0), help="GPUs per worker (default: 1 if the cluster has GPUs, else 0).")
@click.option("--timeout", type=opt.Finite(min=1), default=1800, show_default=True, help="Seconds per model, download included.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help="More attempts for a model whose worker died.")
@click.option("--max-cache-gb", type=opt.Finite(min=0.001), default=50, show_default=True,
              help="Memory for decoder layers kept between a scan's passes, all workers together (each worker "
                   "gets its share); with --download, disk for downloads in flight, and bigger models are refused.")
@opt.download("Download each model to the workers' scratch disk instead of reading it from the Hub by range requests.")
@opt.max_requests("Pace the workers' Hub range requests to this many in any 5 minutes, shared out among them.")
@click.option("--lease-seconds", type=opt.Finite(min=1), default=300, show_default=True,
              help="A killed crawl's models can be claimed by another after this long.")
@opt.device("auto, cpu, cuda or cuda:N, on each worker.")
@opt.catalog()
@click.option("--publish", "publish_target", metavar="TARGET", help="Afterwards, publish the catalog here (as `superweight publish`).")
@click.option("--progress/--no-progress", default=None, help="A progress bar on stderr (default: when stderr is a terminal).")
@opt.as_json("One JSON object per line per model, then a summary line.")
@opt.verify(default=True)
def crawl(repo_ids, repos_file, since, limit, max_params, address, workers, gpus_per_worker, timeout, retries,
          max_cache_gb, download, max_requests_per_5min, lease_seconds, device, catalog_path, publish_target, progress,
          as_json, verify) -> None:
    """Scan new Hub models, or the given ones, on a Ray cluster.

    REPO_ID is a Hub id, a checkpoint folder or example:smollm2. Without REPO_IDS or --repos,
    discovers text-generation models with safetensors weights on the Hub, most recently modified
    first. Exit code 3 when any model failed (see `superweight ledger`).
    """
    from huggingface_hub import constants as hf_constants

    from superweight.cli import EXIT_SOME_FAILED, _open_stores  # the command group's own helpers
    from superweight.cli_index import show_published

    from superweight.index.crawl import CrawlOptions, HubAccess, discover
    from superweight.index.crawl import crawl as run_crawl
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
                           download=download, max_requests_per_5min=max_requests_per_5min,
                           hub=HubAccess(endpoint=endpoint),
                           scan=ScanOptions(device=device, endpoint=endpoint, verify=VerifyConfig() if verify else None))
    if not ids:
        ids = discover(hub=options.hub, since=since, limit=limit)
    if progress is None:
        progress = sys.stderr.isatty()
    with ExitStack() as stores:
        catalog, ledger = _open_stores(stores, catalog_path)
        _join_ray(stores, address)
        bar = stores.enter_context(click.progressbar(length=len(ids), label="crawl", file=sys.stderr,
                                                     hidden=not progress, item_show_func=lambda r: r))
        shown = [0]

        def on_update(report) -> None:
            bar.update(len(report.outcomes) - shown[0], crawl_counts(report))
            shown[0] = len(report.outcomes)

        report = run_crawl(ids, catalog=catalog, ledger=ledger, options=options, on_update=on_update)
        bar.render_finish()
        for outcome in report.outcomes:
            click.echo(to_json(outcome) if as_json else crawl_line(outcome))
        click.echo(to_json({"summary": crawl_summary(report)}) if as_json
                   else f"crawl: {crawl_counts(report)} in {report.seconds:.0f} s")
        if publish_target:
            from superweight.index.publish import publish_catalog

            show_published(publish_catalog(catalog, publish_target))
    if report.counts["failed"]:
        sys.exit(EXIT_SOME_FAILED)


def _join_ray(stores: ExitStack, address: str | None) -> None:
    """Join the Ray cluster at `address` (else start a local one, stopped when `stores` closes), unless joined."""
    import ray
    from superweight.index.crawl import PRELOADED

    if ray.is_initialized():
        return
    preload = {} if address else {"_system_config": {"preload_python_modules": list(PRELOADED)}}
    if not address:
        # A Ray we start ourselves keeps Ray's default for a new local cluster, token authentication on;
        # Ray warns that it chose it, which the user of `superweight crawl` can do nothing about.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, **preload)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise click.ClickException(f"--address {address}: cannot join the Ray cluster ({first_line(e)})") from None
    stores.callback(ray.shutdown)
