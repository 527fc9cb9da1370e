"""What a scan reports as it goes: phases, each with its number of steps known when it starts.

A phase is one streamed pass over the decoder layers (a step is a layer read), or one read of the
language-model head (a step is a slice of the vocabulary). The scan calls `phase` and `step`; the
command line draws bars or prints lines, a crawl worker checks its deadline on each step, and a
recorded scan renews its ledger lease. A long phase may also `note` what it plans and how long it
expects to take (the quantization lab's copies and passes). The base class does nothing.
"""


class Progress:
    """Receives a scan's phases and steps; does nothing unless a subclass says otherwise."""

    def phase(self, name: str, total: int) -> None:
        """A phase starts: `total` steps named `name` (e.g. "detect: pass 1", 30 layers)."""

    def step(self) -> None:
        """One step of the current phase is done."""

    def note(self, text: str) -> None:
        """A line for the user about the work under way: its plan, an estimate of what is left."""


class Relay(Progress):
    """Passes phases and steps on to another Progress (for subclasses that add to them)."""

    def __init__(self, inner: Progress | None = None):
        self.inner = inner or Progress()

    def phase(self, name: str, total: int) -> None:
        self.inner.phase(name, total)

    def step(self) -> None:
        self.inner.step()

    def note(self, text: str) -> None:
        self.inner.note(text)
