"""Byte ranges of checkpoint files, read from a local disk or straight from the Hub, and counted.

A scan reads a checkpoint as byte spans: the safetensors or GGUF header, then each decoder layer's
tensors coalesced into as few spans as the file layout allows, the embedding rows of the prompt's
tokens, and slices of the LM head. A `FileBytes` answers those spans: `LocalFile` by mapping each
span (its pages faulted in by the read-ahead thread, never copied, unmapped with the layer),
`HubFile` with HTTP range requests through huggingface_hub's shared session and its auth headers.
Nothing is written to disk. Every read is counted in the scan's `Transfer`.

A range request is checked: a server that answers 200 (it ignored Range), a Content-Range for other
bytes, or a body of the wrong length is an error naming the file, never a wrong result. A body cut
short by the network, a read slower than a floor rate (a server trickling bytes), and a 429 or 5xx
are fetched again from the start of the span, after a backoff or the answer's Retry-After (capped:
scanner.retry); this is the one level that retries a range.
"""

import errno
import logging
import mmap
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import httpx2
import numpy as np
from huggingface_hub import constants, get_session, hf_hub_url
from huggingface_hub.utils import build_hf_headers

from . import __version__
from .config import HUB_ATTEMPTS, HUB_BACKOFF, HUB_MAX_ANSWER, HUB_MIN_RATE, HUB_TIMEOUT
from .errors import CorruptCheckpoint, HubError, HubUnavailable, first_line
from .retry import MAX_RETRY_AFTER, TRANSIENT_STATUS, retry_after

logger = logging.getLogger(__name__)

HEAD_GUESS = 1 << 18  # bytes read with a file's first request: the header of most safetensors files
MAX_GAP = 1 << 16  # bytes between two wanted spans of a local file that are read rather than split into two reads
# The same over HTTP, where a request costs a round trip (20-50 ms to the Hub; 1 MB takes 20 ms at 50 MB/s)
# and counts against the Hub's request budget: verification's embedding rows (thousands, spread over the
# vocabulary) would otherwise be hundreds of requests, one after the other.
HUB_MAX_GAP = 1 << 20
MADV_POPULATE_READ = 22  # Linux 5.14+: fault a mapping's pages in now, reading them (Python 3.11 lacks the name)


def empty_buffer(length: int) -> memoryview:
    """A writable buffer of `length` bytes, not zeroed.

    Not a bytearray: `bytearray(n)` zeroes its n bytes while holding the GIL, and a read-ahead thread
    doing that for a 100 MB layer stalls the compute thread for tens of milliseconds a layer (1.4 s of a
    3 GB scan, measured). An unzeroed array is touched first by the read itself, outside the GIL.
    """
    return memoryview(np.empty(length, dtype=np.uint8)).cast("B")


@dataclass
class Transfer:
    """What a scan moved: bytes and requests (range reads), and the seconds its compute waited for them."""

    bytes: int = 0
    requests: int = 0
    wait_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, size: int, requests: int = 1) -> None:
        with self.lock:
            self.bytes += size
            self.requests += requests

    def waited(self, seconds: float) -> None:
        with self.lock:
            self.wait_seconds += seconds


class FileBytes:
    """One checkpoint file, read by byte spans. Subclasses set `name` (for errors) and `size`."""

    remote = False  # read over the network: reading it again costs what reading it first did
    name: str
    size: int

    def read(self, offset: int, length: int) -> memoryview:
        """Bytes offset:offset+length, exactly (writable), or a ScanError naming the file."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what reading holds open (nothing, unless a subclass says otherwise)."""

    def max_gap(self) -> int:
        """Bytes between two wanted spans that are read rather than split into two reads (read at call
        time: tests and benchmarks scale it)."""
        return MAX_GAP

    def read_spans(self, spans: list[tuple[int, int]]) -> list[memoryview]:
        """The bytes of each (offset, length), reading nearby spans together (gaps up to max_gap()).

        Returns:
            One view per span, in the order given.
        """
        for offset, length in spans:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise CorruptCheckpoint(f"bytes {offset}-{offset + length} lie past the end of the file "
                                        f"({self.size} bytes); the file is truncated or its header lies", where=self.name)
        views: list[memoryview | None] = [None] * len(spans)
        for start, stop, members in coalesce(spans, self.max_gap()):
            data = memoryview(self.read(start, stop - start))
            for i in members:
                offset, length = spans[i]
                views[i] = data[offset - start: offset - start + length]
        return views


def coalesce(spans: list[tuple[int, int]], max_gap: int = MAX_GAP) -> list[tuple[int, int, list[int]]]:
    """Group (offset, length) spans into reads: (start, stop, indices of the spans inside), by offset."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    reads: list[tuple[int, int, list[int]]] = []
    for i in order:
        offset, length = spans[i]
        if reads and offset <= reads[-1][1] + max_gap:
            start, stop, members = reads[-1]
            reads[-1] = (start, max(stop, offset + length), members + [i])
        else:
            reads.append((offset, offset + length, [i]))
    return reads


class LocalFile(FileBytes):
    """A file on a local (or network) file system, read by mapping each span; open until close() (or collected).

    A span is mapped privately (copy on write: the loader may change a weight, the file never
    changes) and its pages are faulted in at once on the calling thread, the read-ahead thread, so
    the disk's latency falls there and not on the compute. Nothing is copied: the mapped pages are
    the page cache's own, and they leave the process when the last view of the span is dropped (a
    freed layer), so a scan's memory stays at the layers it holds.
    """

    def __init__(self, path, transfer: Transfer):
        self.path, self.name, self.transfer = path, str(path), transfer
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close(), or when collected)
        self.fd = self.file.fileno()
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> memoryview:
        if length == 0:
            return empty_buffer(0)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(self.fd, offset + length - start, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except ValueError:  # Python checks the span against the file's size now
            raise self._cut_short(offset, length) from None
        try:
            mapping.madvise(MADV_POPULATE_READ)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EFAULT: pages past the end of a file cut short since
                mapping.close()
                raise self._cut_short(offset, length) from None
            mapping.madvise(mmap.MADV_WILLNEED)  # a kernel before 5.14: read ahead, asynchronously
        self.transfer.count(length)
        return memoryview(mapping)[offset - start:]

    def _cut_short(self, offset: int, length: int) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"ends before byte {offset + length} (it had {self.size} bytes when opened); "
                                 "the file is truncated", where=self.name)

    def close(self) -> None:
        self.file.close()


class HubFile(FileBytes):
    """A file of a Hub repo at a pinned commit, read by HTTP range requests; never stored on disk.

    Args:
        repo_id, revision, filename: the file (revision: a commit sha).
        name: how errors name it (`repo@sha12/filename`).
        transfer: where its bytes and requests are counted.
        endpoint, token: the Hub (default HF_ENDPOINT and the cached login).
        pacer: paces requests under a per-5-minute budget (None: unpaced).
    """

    remote = True

    def __init__(self, repo_id: str, revision: str, filename: str, *, name: str, transfer: Transfer,
                 endpoint: str | None = None, token: str | None = None, pacer: "Pacer | None" = None):
        self.url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
        self.name, self.transfer, self.pacer = name, transfer, pacer
        self.endpoint = endpoint or constants.ENDPOINT
        self.headers = build_hf_headers(token=token, library_name="superweight", library_version=__version__)
        self.head, self.size = self._get(0, HEAD_GUESS, up_to_end=True)  # most headers, and the size

    def max_gap(self) -> int:
        return HUB_MAX_GAP

    def read(self, offset: int, length: int) -> memoryview:
        if offset + length <= len(self.head):
            buffer = empty_buffer(length)
            buffer[:] = self.head[offset:offset + length]
            return buffer
        data, _ = self._get(offset, length)
        return data

    def _get(self, offset: int, length: int, *, up_to_end: bool = False) -> tuple[memoryview, int]:
        """Bytes offset:offset+length (fewer if `up_to_end` and the file ends first) and the file's size.

        The one retry of a range read (scanner.retry): a dropped connection, a body cut short, a read
        slower than HUB_MIN_RATE, or a 429 or 5xx is tried again from the span's start, HUB_ATTEMPTS
        times in all, after a doubling backoff or what Retry-After asks for when longer; a Retry-After
        over MAX_RETRY_AFTER fails at once.
        """
        for attempt in range(1, HUB_ATTEMPTS + 1):
            try:
                return self._attempt(offset, length, up_to_end)
            except _TryAgain as e:
                asked = e.retry_after or 0.0
                if asked > MAX_RETRY_AFTER:
                    raise HubUnavailable(f"{e}, asking to wait {asked:.0f} s (Retry-After), more than "
                                         f"{MAX_RETRY_AFTER:.0f} s; try again later", where=self.name,
                                         retry_after=asked) from None
                if attempt == HUB_ATTEMPTS:
                    raise HubUnavailable(f"reading bytes {offset}-{offset + length - 1} failed {attempt} times ({e})",
                                         where=self.name, retry_after=e.retry_after) from e
                delay = max(HUB_BACKOFF * 2 ** (attempt - 1), asked)
                logger.warning("%s: bytes %d-%d: %s; reading them again in %.1f s", self.name, offset,
                               offset + length - 1, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self, offset: int, length: int, up_to_end: bool) -> tuple[memoryview, int]:
        if self.pacer is not None:
            self.pacer.take()
        last = offset + length - 1
        headers = {**self.headers, "Range": f"bytes={offset}-{last}"}
        deadline = time.monotonic() + HUB_TIMEOUT + length / HUB_MIN_RATE  # a trickle is not read forever
        try:
            with get_session().stream("GET", self.url, headers=headers, timeout=HUB_TIMEOUT, follow_redirects=True,
                                      extensions={"superweight.transfer": self.transfer}) as response:
                if response.status_code in TRANSIENT_STATUS:
                    raise _TryAgain(f"answered {response.status_code}", retry_after=retry_after(response))
                if response.status_code == 200:
                    raise HubError(f"{self.endpoint} answered 200 with the whole file to a range request "
                                   "(it ignores Range); a scan reads only the bytes it needs", where=self.name)
                if response.status_code != 206:
                    raise HubError(f"range request answered {response.status_code}", where=self.name)
                total, last = _content_range(response.headers.get("Content-Range", ""), offset, last, self.name,
                                             up_to_end=up_to_end)
                length = last + 1 - offset
                buffer, done = empty_buffer(length), 0
                for chunk in response.iter_bytes():  # as they arrive: the deadline is checked on each
                    if done + len(chunk) > length:
                        raise HubError(f"answered more than the {length} bytes asked for", where=self.name)
                    buffer[done:done + len(chunk)] = chunk
                    done += len(chunk)
                    if done < length and time.monotonic() > deadline:
                        raise _TryAgain(f"{done} of {length} bytes arrived in {HUB_TIMEOUT + length / HUB_MIN_RATE:.0f} s, "
                                        f"slower than {HUB_MIN_RATE / 1e3:g} kB/s (SUPERWEIGHT_HUB_MIN_RATE)")
        except httpx2.TransportError as e:  # a dropped connection, a timeout: tried again by _get
            raise _TryAgain(first_line(e)) from e
        if done != length:
            raise _TryAgain(f"body ended after {done} of {length} bytes")
        self.transfer.count(length, requests=0)  # requests are counted as sent (see count_request)
        return buffer, total


class _TryAgain(Exception):
    """A range read that may succeed if sent again (a dropped connection, a body cut short, a trickle, a 429
    or 5xx), with the seconds a Retry-After asked for."""

    def __init__(self, reason: str, *, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _content_range(header: str, first: int, last: int, name: str, *, up_to_end: bool = False) -> tuple[int, int]:
    """(total size, last byte) from `bytes FIRST-LAST/TOTAL`, checked against the span asked for.

    With `up_to_end`, a span that stops early at the end of the file is accepted.
    """
    try:
        unit, _, rest = header.partition(" ")
        span, _, total = rest.partition("/")
        start, _, stop = span.partition("-")
        ends = int(stop) == last or (up_to_end and int(stop) < last and int(stop) == int(total) - 1)
        if unit != "bytes" or int(start) != first or not ends:
            raise ValueError
        return int(total), int(stop)
    except ValueError:
        raise HubError(f"answered Content-Range {header!r} to a request for bytes {first}-{last}", where=name) from None


def bound_api_answer(response: httpx2.Response) -> None:
    """A response hook on huggingface_hub's session: an API answer (model info, a listing) may weigh at
    most HUB_MAX_ANSWER bytes, declared or streamed, so a hostile or broken server cannot make a scan
    or a crawl read 100 MB of JSON into memory (and parse it into ten times that). Files are not API
    answers: downloads and range reads are bounded by what the scan asked for."""
    if not response.request.url.path.startswith("/api/"):
        return
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > HUB_MAX_ANSWER:
        raise _too_large(response)
    response.stream = _Bounded(response)


class _Bounded(httpx2.SyncByteStream):
    """A response body that stops with a HubError past HUB_MAX_ANSWER bytes."""

    def __init__(self, response: httpx2.Response):
        self.response, self.inner, self.seen = response, response.stream, 0

    def __iter__(self):
        for chunk in self.inner:
            self.seen += len(chunk)
            if self.seen > HUB_MAX_ANSWER:
                raise _too_large(self.response)
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _too_large(response: httpx2.Response) -> HubError:
    return HubError(f"the answer to {response.request.url.path} is over {HUB_MAX_ANSWER / 2**20:g} MiB, more than an "
                    "API answer about a model weighs (SUPERWEIGHT_HUB_MAX_ANSWER); not read")


def count_request(request: httpx2.Request) -> None:
    """A request hook on huggingface_hub's session: counts each request (retries and redirects too) of a scan."""
    transfer = request.extensions.get("superweight.transfer")
    if transfer is not None:
        transfer.count(0)


class Pacer:
    """At most `per_5min` requests in any 5 minutes (the Hub's rate-limit window), shared by threads.

    `take()` blocks until a request fits the window; the Hub counts requests per token, so a crawl
    gives each worker its share of the budget.
    """

    WINDOW = 300.0

    def __init__(self, per_5min: int):
        self.per_5min = per_5min
        self.sent: deque[float] = deque()
        self.lock = threading.Lock()

    def take(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                while self.sent and now - self.sent[0] >= self.WINDOW:
                    self.sent.popleft()
                if len(self.sent) < self.per_5min:
                    self.sent.append(now)
                    return
                wait = self.WINDOW - (now - self.sent[0])
            logger.info("request budget of %d per 5 minutes spent; waiting %.0f s", self.per_5min, wait)
            time.sleep(wait)
