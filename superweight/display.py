"""How the command line shows a scan's progress on stderr: a bar per phase on a terminal, a line per
finished phase in a log or a pipe (see scanner.progress for what a phase is)."""

import os
import sys
import time
from contextlib import contextmanager

import click
from tqdm.auto import tqdm

from superweight.scanner.errors import printable
from superweight.scanner.progress import Progress


class Bars(Progress):
    """One stderr bar per phase, its total known when it starts."""

    def __init__(self, source: str):
        self.source, self.bar = printable(source), None

    def phase(self, name: str, total: int) -> None:
        self.close()
        # mininterval=0: draw every step (hundreds at most), so the count shown is always current
        self.bar = tqdm(total=total, desc=f"{self.source}: {name}", unit="step", leave=False, file=sys.stderr,
                        mininterval=0)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def note(self, text: str) -> None:
        tqdm.write(f"{self.source}: {text}", file=sys.stderr)  # above the bar, which stays

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Lines(Progress):
    """One stderr line per finished phase: `SOURCE: PHASE: done/total in S s`."""

    def __init__(self, source: str):
        self.source, self.current = printable(source), None

    def phase(self, name: str, total: int) -> None:
        self.finish()
        self.current = [name, 0, total, time.monotonic()]

    def step(self) -> None:
        if self.current is not None:
            self.current[1] += 1

    def note(self, text: str) -> None:
        self.finish()  # the phase before it (notes come between phases), so lines stay in order
        click.echo(f"{self.source}: {text}", err=True)

    def finish(self) -> None:
        """Print the phase under way, if any (a failed scan's unfinished phase is left out by not calling this)."""
        if self.current is not None:
            name, done, total, start = self.current
            click.echo(f"{self.source}: {name}: {done}/{total} in {time.monotonic() - start:.1f} s", err=True)
            self.current = None


def progress_mode(flag: bool | None) -> str:
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
def progress_display(source: str, mode: str):
    """The Progress a scan of `source` reports to: bars, lines or nothing (see progress_mode)."""
    display = Bars(source) if mode == "bar" else Lines(source) if mode == "lines" else Progress()
    try:
        yield display
        if isinstance(display, Lines):
            display.finish()  # the last phase; a failed scan's unfinished phase is not printed
    finally:
        if isinstance(display, Bars):
            display.close()
