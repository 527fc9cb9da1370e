"""Each decoder layer's stored bytes, fetched ahead of the compute and kept while they fit a budget.

A streamed pass needs layer i now and layer i+1 next: while layer i computes, the next `window`
layers are in flight on background threads, so the network (or a slow disk) and the compute overlap
and memory holds a few layers. Layers are kept after use while they fit `cache_bytes`: a scan whose
model fits is fetched once, however many passes detection and verification make; one that does
not fit keeps its first layers and fetches the rest again on every pass (`passes` counts the passes
that fetched). Kept layers are the stored bytes, read-only: the loader copies before it changes a
weight.
"""

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .fetch import Transfer

logger = logging.getLogger(__name__)

WINDOW = 2  # layers in flight ahead of the one computing


class LayerFeed:
    """Stored bytes of each layer's tensors, by layer index (see the module docstring).

    Args:
        fetch: reads a layer's tensors: keys -> {key: bytes}.
        layer_keys: each layer's checkpoint keys.
        sizes: each layer's stored size in bytes.
        cache_bytes: how many bytes of layers may be kept between passes.
        transfer: where the time the compute waits for bytes is counted.
    """

    def __init__(self, fetch, layer_keys: list[list[str]], sizes: list[int], *, cache_bytes: int,
                 transfer: Transfer, window: int = WINDOW):
        self.fetch, self.layer_keys, self.transfer, self.window = fetch, layer_keys, transfer, window
        self.keep: set[int] = set()  # the layers kept: the first ones that fit the budget
        total = 0
        for i, size in enumerate(sizes):
            if total + size > cache_bytes:
                break
            total += size
            self.keep.add(i)
        self.fits = len(self.keep) == len(sizes)
        if not self.fits:
            logger.info("%d of %d layers fit the %.2f GB layer cache; the rest are fetched on every pass",
                        len(self.keep), len(sizes), cache_bytes / 1e9)
        self.kept: dict[int, dict] = {}
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="layer-fetch")
        self.passes = 0  # passes that fetched at least one layer from the source
        self._fetched_this_pass = False

    def begin_pass(self, first: int = 0) -> None:
        """A pass over layers first.. starts: put its first layers in flight."""
        self._fetched_this_pass = False
        self._ahead(first - 1)

    def get(self, index: int) -> dict:
        """Layer `index`'s stored bytes, waiting for them if they are still in flight."""
        self._ahead(index)
        if index in self.kept:
            return self.kept[index]
        future = self.pending.pop(index, None) or self._submit(index)
        started = time.perf_counter()
        try:
            raw = future.result()
        finally:
            self.transfer.waited(time.perf_counter() - started)
        if index in self.keep:
            self.kept[index] = raw
        return raw

    def _ahead(self, index: int) -> None:
        """Put the `window` layers after `index` in flight, unless kept or already on their way."""
        for j in range(index + 1, min(index + 1 + self.window, len(self.layer_keys))):
            if j not in self.kept and j not in self.pending:
                self.pending[j] = self._submit(j)

    def _submit(self, index: int) -> Future:
        if not self._fetched_this_pass:
            self._fetched_this_pass = True
            self.passes += 1
        return self.pool.submit(self.fetch, self.layer_keys[index])

    def close(self) -> None:
        """Stop fetching ahead and drop what is kept."""
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        self.kept.clear()
