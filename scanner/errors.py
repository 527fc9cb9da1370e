"""Named errors raised by the scanner, carrying where and why; the command line words each as one line
(superweight.report.explain)."""

import re
from pathlib import Path

# C0 and C1 control characters and DEL: a terminal acts on them (ESC sequences clear the screen or
# recolour it, CR and newlines forge lines). Text from an untrusted source never reaches it raw.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_SHOWN = 200  # characters of one untrusted value that a message shows; the rest is cut, with a count


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def printable(text: str, *, limit: int | None = None) -> str:
    """`text` safe to show on a terminal: every control character written as its escape (`\\x1b`,
    `\\n`), and with `limit`, at most that many characters before a note of how many were cut."""
    shown = CONTROL.sub(lambda m: repr(m[0])[1:-1], str(text))
    if limit is not None and len(shown) > limit:
        shown = f"{shown[:limit]}... ({len(shown) - limit} more characters)"
    return shown


def shown(value: object) -> str:
    """An untrusted value (a name from a downloaded index, a GGUF file's metadata) as a message quotes it."""
    return printable(repr(value) if not isinstance(value, str) else value, limit=MAX_SHOWN)


class ScanError(Exception):
    """Base class: a checkpoint could not be scanned, for a reason we can explain.

    `reason` says what is wrong; `where` names what it is wrong with (a file, `repo@revision`, an
    option), and a caller that knows a better name for it (a Hub repo rather than its cache folder)
    sets `where` instead of rewriting the message. The message is "where: reason".
    """

    def __init__(self, reason: str, *, where: object = None):
        super().__init__(reason)
        self.reason, self.where = reason, where

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where not in (None, "") else self.reason


class Refused(ScanError):
    """A checkpoint we decline to scan, as opposed to a scan that broke: recorded as refused.

    `kind` is what the ledger stores beside the reason; `reconsider` says whether a later crawl
    vets the model again (a limit of this run, access granted later) or the refusal holds for the
    commit.
    """

    kind = "other"
    reconsider = False


class SourceNotFound(ScanError):
    """The local path or Hub repo does not exist, or does not name one checkpoint."""


class MissingConfig(ScanError):
    """The checkpoint has no usable config.json."""


class UnsafeCheckpoint(Refused):
    """The checkpoint has no safetensors or GGUF weights, only formats we refuse to read (pickle)."""

    kind = "unsafe"


class RemoteCodeRefused(Refused):
    """The config needs custom code from the repo and --trust-remote-code was not given."""

    kind = "remote_code"


class UnsupportedArchitecture(Refused):
    """transformers does not know the architecture, or we cannot find its MLP output projection."""

    kind = "architecture"


class OverLimit(Refused):
    """The checkpoint is larger than this run allows: `limit` names the limit, `value` and `bound` the sizes."""

    kind = "limit"
    reconsider = True

    def __init__(self, reason: str, *, where: object = None, limit: str = "", value: float = 0, bound: float = 0):
        super().__init__(reason, where=where)
        self.limit, self.value, self.bound = limit, value, bound


class GatedRepo(Refused):
    """The Hub repo is gated: a crawl scans open models only, and looks again in case it opens."""

    kind = "gated"
    reconsider = True


class CorruptCheckpoint(ScanError):
    """A safetensors or GGUF file is truncated or unreadable, or its tensors disagree with the config."""


class UnsupportedQuantization(Refused):
    """A GGUF tensor uses a quantization type the gguf package cannot dequantize."""

    kind = "quantization"


class HubError(ScanError):
    """The Hub could not give us the checkpoint (network, auth, missing revision)."""


class HubUnavailable(HubError):
    """The Hub answered 429 or 5xx, timed out, or could not be reached: worth trying again later.

    `retry_after`: the seconds the answer's Retry-After asked for, or None.
    """

    def __init__(self, reason: str, *, where: object = None, retry_after: float | None = None):
        super().__init__(reason, where=where)
        self.retry_after = retry_after


class ScanTimeout(ScanError):
    """The scan ran past its time limit."""


class DeviceUnavailable(ScanError):
    """The requested device does not exist on this machine."""


class InvalidPrompt(ScanError):
    """The prompt gives no tokens, or more than the model has positions for."""


class CannotVerify(ScanError):
    """The effect of zeroing cannot be measured on this model (no usable LM head, unknown logit scaling)."""


class NonFiniteActivation(ScanError):
    """A layer's activations hold NaN or infinite values: the checkpoint's weights or config are broken."""


class InvalidOption(ScanError):
    """An option's value does not fit this model (e.g. --tokens fewer than one evaluation sequence of each text)."""


class InvalidCoordinates(ScanError):
    """A super weight's coordinates from an index (or a base model named by a file) cannot be used as given."""


class CannotWrite(ScanError):
    """A file the command was asked to write (a figure, a converted example) cannot be written there."""


def outcome_of(error: BaseException) -> dict:
    """How a scan that raised `error` ended, as the ledger records it: failed, or refused (declined,
    as opposed to broken) with the refusal's kind, and for a limit its name."""
    if isinstance(error, KeyboardInterrupt):
        return {"state": "failed", "error": "interrupted before it finished (SIGINT or SIGTERM)"}
    outcome = {"state": "failed", "error": str(error) or type(error).__name__}
    if isinstance(error, Refused):
        outcome.update(state="refused", refusal=error.kind)
        if isinstance(error, OverLimit):
            outcome["limit"] = error.limit
    return outcome


def refusal_kinds() -> dict[str, type[Refused]]:
    """Every kind of refusal, by the name the ledger stores."""
    found, todo = {Refused.kind: Refused}, [Refused]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.setdefault(sub.kind, sub)
            todo.append(sub)
    return found


def reconsidered(kind: str | None) -> bool:
    """Whether a refusal of this kind (None: not a refusal) may not hold on the next crawl."""
    refusal = refusal_kinds().get(kind) if kind else None
    return bool(refusal and refusal.reconsider)


def relocated(error: ScanError, folder, name: str) -> ScanError:
    """`error`, naming what lies inside `folder` by `name` instead (a Hub cache snapshot -> `repo@sha`).

    Returns the same error, its `where` changed when it was `folder` or a path inside it.
    """
    try:
        relative = Path(error.where).relative_to(folder)
    except (TypeError, ValueError):  # no path, or one elsewhere
        return error
    error.where = name if relative == Path(".") else f"{name}/{relative}"
    return error
