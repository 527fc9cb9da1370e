"""The command line's shared options and value types, declared once for every command that takes them."""

import math
import re
from pathlib import Path

import click

from superweight.scanner.config import CATALOG_FILE


class Finite(click.FloatRange):
    """A float range that also refuses NaN and infinities (a NaN compares false with every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Size(click.ParamType):
    """A memory size such as 2GB, 500MB or 1.5GiB."""

    name = "size"
    _FORM = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)

    def convert(self, value, param, ctx):
        if not self._FORM.match(str(value)):
            self.fail(f"{value!r} is not a size like 2GB or 500MB", param, ctx)
        return str(value).strip()


class Count(click.ParamType):
    """A count such as 8e9, 8B, 500M or 8000000000."""

    name = "count"
    _UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        try:
            number = float(text[:-1]) * self._UNITS[text[-1]] if text[-1:] in self._UNITS else float(text)
        except (ValueError, IndexError):
            self.fail(f"{value!r} is not a count like 8e9, 8B or 500M", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} is not a count like 8e9, 8B or 500M", param, ctx)
        return int(number)


def catalog(help: str = f"The catalog database (default: $SUPERWEIGHT_HOME/{CATALOG_FILE}).") -> click.option:
    return click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path), help=help)


def verdicts(default: str, help: str) -> click.option:
    """--verdict: a comma-separated list of the index's verdicts, given to the command as a tuple."""
    from superweight.index.keep import VERDICTS

    def parse(ctx, param, value):
        wanted = tuple(v.strip() for v in value.split(",") if v.strip())
        if not wanted or set(wanted) - set(VERDICTS):
            raise click.BadParameter(f"{value!r}: a comma-separated list of {', '.join(VERDICTS)}")
        return wanted

    return click.option("--verdict", "verdicts", default=default, show_default=True, callback=parse,
                        help=f"{help} ({', '.join(VERDICTS)}, comma-separated).")


def as_json(help: str) -> click.option:
    return click.option("--json", "as_json", is_flag=True, help=help)


def device(help: str = "auto, cpu, cuda or cuda:N.") -> click.option:
    return click.option("--device", default="auto", show_default=True, help=help)


revision = click.option("--revision", help="Hub branch, tag or commit sha (default: main).")

progress = click.option(
    "--progress/--no-progress", default=None,
    help="A bar per phase on stderr (--progress), or nothing (--no-progress). Default: bars on a "
         "terminal, else a line per finished phase; nothing when HF_HUB_DISABLE_PROGRESS_BARS is set.")


def verify(*, default: bool) -> click.option:
    return click.option(
        "--verify/--no-verify", default=default, show_default=True,
        help="Measure what zeroing the super weights does (each super activation's weights together, "
             "each weight alone inside those that matter, controls) and give each a verdict: super, "
             "group or inert (two to four more passes over the layers).")


def download(help: str) -> click.option:
    return click.option("--download", is_flag=True, help=help)


def max_requests(help: str) -> click.option:
    return click.option("--max-requests-per-5min", type=click.IntRange(min=1), default=None, help=help)


def transfer(*, download_help: str) -> list:
    """--download, --cache-gb and --max-requests-per-5min: how a scan reads a Hub repo's weights."""
    return [
        download(download_help),
        click.option("--cache-gb", type=Finite(min=0), default=None,
                     help="Memory for decoder layers kept between a scan's passes, so a model that fits is "
                          "fetched once (default: a quarter of the machine's memory when reading from the Hub; "
                          "0 for local files, re-read from the page cache)."),
        max_requests("Pace Hub range requests to at most this many in any 5 minutes (the Hub's rate "
                     "limit is per token per 5 minutes)."),
    ]


gguf_file = click.option("--file", "gguf_file", metavar="NAME",
                         help="The GGUF file of a Hub repo or folder to scan: its name, or a quantization such as "
                              "Q4_K_M that names one. Needed where there are several.")


def apply(options: list):
    """Decorate a command with each of `options`, in order."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate
