"""A local checkpoint's revision: a sha256 over its files' sha256s, cached per file, started early.

Hashing a 3 GB checkpoint takes about 1.8 s here, most of its scan's time. The command
line starts it on a thread of its own before it imports torch and transformers (`hash_ahead`,
about 4 s of imports on one core), and the scan's `content_hash` takes the digests from there;
hashlib releases the GIL, so the hashing runs on the other core meanwhile.
"""

import hashlib
import json
import logging
import mmap
import os
import threading
from concurrent.futures import CancelledError, Future
from pathlib import Path

from .errors import ScanError
from .files import GGUF_SUFFIX, find_weight_files, written_aside

logger = logging.getLogger(__name__)

WAIT_STEP = 0.1  # seconds between looks at a scan's stop event while a digest is being computed ahead

_ahead: dict[tuple[str, tuple[int, ...]], Future] = {}  # (path, stamp) -> its sha256, being computed
_ahead_lock = threading.Lock()


def _stamp(file: Path) -> tuple[int, ...]:
    """What says a file is unchanged without reading it (as git's index does)."""
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def hash_ahead(files: list[Path], *, cache: Path | None = None) -> None:
    """Start computing the sha256 of `files` on a daemon thread, for a content_hash to come.

    Files the digest `cache` already knows, and files that cannot be read now, are left to
    content_hash. The thread dies with the process: a scan that fails early does not wait for it.
    """
    known = _read_digests(cache)
    jobs = []
    with _ahead_lock:
        for file in files:
            try:
                key = (str(file), _stamp(file))
            except OSError:
                continue
            entry = known.get(key[0])
            if key in _ahead or (entry is not None and entry.get("stamp") == list(key[1])):
                continue
            _ahead[key] = Future()
            jobs.append((file, _ahead[key]))
    if jobs:
        threading.Thread(target=_compute, args=(jobs,), name="hash-ahead", daemon=True).start()


def hash_sources_ahead(sources: list[str], *, cache: Path | None = None) -> None:
    """hash_ahead the files that make the revision of each local checkpoint among `sources` (a
    folder's safetensors files and config, or a GGUF file); Hub ids and unreadable paths are left
    to the scan, which says what is wrong with them."""
    files = []
    for source in sources:
        path = Path(source).resolve()
        try:
            if path.is_dir():
                files += [*find_weight_files(path), path / "config.json"]
            elif path.suffix == GGUF_SUFFIX and path.is_file():
                files.append(path)
        except (ScanError, OSError):
            continue
    hash_ahead(files, cache=cache)


def _compute(jobs: list[tuple[Path, Future]]) -> None:
    for file, future in jobs:
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(file_sha256(file))
        except Exception as e:  # handed to whoever waits, who then hashes the file itself
            future.set_exception(e)


def _hashed_ahead(file: Path, stamp: tuple[int, ...], stop: threading.Event | None) -> str | None:
    """The digest hash_ahead computed for this version of `file`, waiting for it; None if there is none
    (or `stop` was set)."""
    with _ahead_lock:
        future = _ahead.pop((str(file), stamp), None)
    if future is None:
        return None
    while True:
        try:
            return future.result(timeout=WAIT_STEP)
        except TimeoutError:
            if stop is not None and stop.is_set():
                future.cancel()
                return None
        except (Exception, CancelledError):  # the reader hashes the file itself, and says what is wrong
            return None


def content_hash(files: list[Path], root: Path, *, cache: Path | None = None,
                 stop: threading.Event | None = None) -> str | None:
    """sha256 over the names and sha256s of `files` (relative to `root`): a local folder's revision.

    Args:
        files: the files that define the checkpoint (config and weights).
        root: the folder the names are taken relative to.
        cache: a JSON file of per-file digests keyed by path, size, mtime, ctime and inode (as
            git's index does), so a folder that has not changed is not read again; None to always read.
        stop: when set, hashing ends early and returns None (the scan it served has failed).
    """
    known = _read_digests(cache)
    digest = hashlib.sha256()
    for file in sorted(files):
        stamp = _stamp(file)
        entry = known.get(str(file))
        if entry is None or entry.get("stamp") != list(stamp):
            file_sha = _hashed_ahead(file, stamp, stop) or file_sha256(file, stop)
            if file_sha is None:
                return None
            entry = known[str(file)] = {"stamp": list(stamp), "sha256": file_sha}
        digest.update(f"{file.relative_to(root)}\0{entry['sha256']}\n".encode())
    _write_digests(cache, known)
    return digest.hexdigest()


def file_sha256(path: Path, stop: threading.Event | None = None, step: int = 64 << 20) -> str | None:
    """sha256 of a file, or None once `stop` is set.

    The file is mapped and hashed `step` bytes per update, each step unmapped once hashed (so the
    process's memory does not grow with the file). hashlib releases the GIL for the whole of an
    update: with small reads (256 KiB) the hashing thread had to win the GIL back 4,000 times a GB
    from a thread importing torch, and ran at half speed beside it. Alone: 0.6 s a GB here.
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapping:
            mapping.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapping)
            try:
                for offset in range(0, size, step):
                    if stop is not None and stop.is_set():
                        return None
                    digest.update(view[offset:offset + step])
                    mapping.madvise(mmap.MADV_DONTNEED, offset, min(step, size - offset))
            finally:
                view.release()
    return digest.hexdigest()


def _read_digests(cache: Path | None) -> dict:
    if cache is None or not cache.is_file():
        return {}
    try:
        known = json.loads(cache.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        logger.warning("%s: unreadable digest cache, starting afresh", cache)
        return {}
    return known if isinstance(known, dict) else {}


def _write_digests(cache: Path | None, known: dict) -> None:
    """Write the digests aside, then rename: a reader never sees half a file, and the last writer wins."""
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with written_aside(cache) as tmp:
            tmp.write_text(json.dumps(known, sort_keys=True))
    except OSError as e:  # a cache is an optimization: never fail a finished scan over it
        logger.warning("%s: cannot write the digest cache (%s)", cache, e)
