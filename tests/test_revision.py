"""A local folder's revision: a content hash, with per-file digests cached while files are unchanged."""

import hashlib
import json
import os
import threading

from superweight.scanner import digest
from superweight.scanner.digest import content_hash
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


def test_digests_computed_ahead_are_used_and_agree(tmp_path, monkeypatch):
    ckpt, files = checkpoint_files(tmp_path)
    expected = content_hash(files, ckpt)
    digest.hash_sources_ahead([str(ckpt)])
    for future in list(digest._ahead.values()):
        future.result(timeout=30)
    read_again = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda path, stop=None: read_again.append(path) or real(path, stop))
    assert content_hash(files, ckpt) == expected
    assert read_again == []  # both digests came from the thread that started ahead


def test_a_file_changed_after_hashing_ahead_is_read_again(tmp_path):
    ckpt, files = checkpoint_files(tmp_path)
    digest.hash_ahead(files)
    for future in list(digest._ahead.values()):
        future.result(timeout=30)
    stat = files[1].stat()
    files[1].write_text(files[1].read_text().replace("{", "{\"changed\": 1, ", 1))
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert content_hash(files, ckpt) == content_hash(files, ckpt, cache=None)
    fresh = hashlib.sha256(files[1].read_bytes()).hexdigest()
    assert digest.file_sha256(files[1]) == fresh


def test_hash_sources_ahead_skips_what_is_not_a_local_checkpoint(tmp_path):
    before = dict(digest._ahead)
    digest.hash_sources_ahead(["owner/name", str(tmp_path / "missing"), str(tmp_path)])  # tmp_path: no weights
    assert digest._ahead == before


def test_a_file_hash_is_the_sha256_of_its_bytes(tmp_path):
    for size in (0, 1, 5 << 20):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        assert digest.file_sha256(path, step=1 << 20) == hashlib.sha256(path.read_bytes()).hexdigest()
