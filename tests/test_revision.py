"""A local folder's revision: a content hash, with per-file digests cached while files are unchanged."""

import json
import os
import threading

from superweight.scanner.hub import content_hash
from tests.checkpoints import make_checkpoint


def checkpoint_files(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", [])
    return ckpt, [ckpt / "model.safetensors", ckpt / "config.json"]


def test_cached_and_uncached_hashes_agree(tmp_path):
    ckpt, files = checkpoint_files(tmp_path)
    cache = tmp_path / "digests.json"
    assert content_hash(files, ckpt, cache=cache) == content_hash(files, ckpt)
    assert set(json.loads(cache.read_text())) == {str(f) for f in files}


def test_unchanged_files_are_not_read_again_and_changed_ones_are(tmp_path):
    ckpt, files = checkpoint_files(tmp_path)
    cache = tmp_path / "digests.json"
    first = content_hash(files, ckpt, cache=cache)

    # A cached digest is trusted while size, mtime and inode match: a planted fake one shows through.
    known = json.loads(cache.read_text())
    known[str(files[0])]["sha256"] = "0" * 64
    cache.write_text(json.dumps(known))
    assert content_hash(files, ckpt, cache=cache) != first

    # Rewriting the file changes its stamp (mtime and ctime at least; the inode may be reused), so
    # it is read again. The mtime is moved explicitly: coarse clocks could give the same one.
    stat = files[0].stat()
    files[0].write_bytes(files[0].read_bytes())
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert content_hash(files, ckpt, cache=cache) == first


def test_an_unwritable_cache_only_warns(tmp_path, caplog):
    ckpt, files = checkpoint_files(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert content_hash(files, ckpt, cache=blocker / "digests.json") == content_hash(files, ckpt)
    assert "cannot write the digest cache" in caplog.text


def test_hashing_stops_when_asked(tmp_path):
    ckpt, files = checkpoint_files(tmp_path)
    stop = threading.Event()
    stop.set()
    assert content_hash(files, ckpt, stop=stop) is None


def test_an_unreadable_cache_is_replaced(tmp_path):
    ckpt, files = checkpoint_files(tmp_path)
    cache = tmp_path / "digests.json"
    cache.write_text("{truncated")
    assert content_hash(files, ckpt, cache=cache) == content_hash(files, ckpt)
    assert json.loads(cache.read_text())
