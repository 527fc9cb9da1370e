"""Resolve a SOURCE (local folder or GGUF file, Hub repo id, or built-in example) to a local checkpoint.

Hub access goes through huggingface_hub, so HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN and the normal
cache all apply. A Hub checkpoint is pinned to its commit sha before anything is downloaded, and
only the files a scan needs are fetched (never pickle weights). A local checkpoint's revision is a
content hash of its config and weights. A Hub repo is read as safetensors when it holds them, else
as one of its GGUF files (`--file`), whose header holds its config and tokenizer.
"""

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub 2.x's HTTP client: its transport errors are not HfHubHTTPError
from huggingface_hub import HfApi, constants, get_session, hf_hub_download, snapshot_download
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .config import CHECKPOINT_PATTERNS, DIGEST_CACHE, HUB_TIMEOUT, SUPERWEIGHT_HOME
from .errors import GatedRepo, HubError, HubUnavailable, ScanError, SourceNotFound, first_line
from .examples import example_checkpoint, find_example
from .fetch import bound_api_answer, count_request
from .retry import MAX_RETRY_AFTER, TRANSIENT_STATUS, retry_after
from .digest import content_hash
from .files import GGUF_SUFFIX, gguf_only, pick_gguf, require_weights

logger = logging.getLogger(__name__)

EXAMPLE_PREFIX = "example:"


@dataclass(frozen=True)
class Resolved:
    """A source made local."""

    source: str  # as the user gave it
    path: Path  # the checkpoint folder, or a GGUF file
    repo_id: str | None  # the Hub repo (for an example, the model it ships); None for local folders
    revision: str | None  # the Hub commit sha, an example's GGUF hash; None until a local folder is hashed
    artifact: str | None = None  # a Hub repo's GGUF file read; an example's file (not the repo's own weights)
    dtype: str | None = None  # the weights' own precision when the files read hold another (examples)
    root: Path | None = None  # every file read must lie inside it (None: the folder, or the file's folder)
    remote: tuple[str, ...] = ()  # weight files read from the Hub by range requests, at `revision`
    endpoint: str | None = None  # the Hub they are read from (None: HF_ENDPOINT or huggingface.co)


def source_name(source: str) -> str:
    """The name a source is recorded under: a local folder or file by its absolute path, however it
    was typed (`m`, `m/`, `./m` and `/abs/m` are one checkpoint); anything else as given."""
    if source.startswith(EXAMPLE_PREFIX):
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def resolve(source: str, *, revision: str | None = None, endpoint: str | None = None,
            token: str | None = None, cache_dir: Path | None = None, download: bool = False,
            gguf_file: str | None = None) -> Resolved:
    """Find `source`: a local path, or a Hub repo pinned to a commit.

    A Hub repo's weights are read remotely (`Resolved.remote`), unless `download` is set or the Hub
    is offline (HF_HUB_OFFLINE: the cache alone serves); its config and tokenizer files are small
    and go to the Hub cache either way.

    Args:
        source: a checkpoint folder, a .gguf file, `owner/name` on the Hub, or `example:NAME`.
        revision: branch, tag or sha on the Hub (default "main"); ignored for folders.
        endpoint: the Hub to use (default HF_ENDPOINT or huggingface.co).
        token: a Hub token (default HF_TOKEN / the cached login).
        cache_dir: the Hub cache (default HF_HUB_CACHE).
        download: download the weights into the Hub cache and read them from there.
        gguf_file: the GGUF file of a folder or repo to scan (files.pick_gguf), even beside safetensors.

    Returns:
        The Resolved source. Hub checkpoints carry their commit sha.
    """
    path = Path(source).expanduser()
    if gguf_file is not None and (source.startswith(EXAMPLE_PREFIX) or path.is_file()):
        raise SourceNotFound(f"--file {gguf_file} picks a GGUF file of a folder or a Hub repo, and this is neither",
                             where=source)
    if source.startswith(EXAMPLE_PREFIX):
        return _example(source)
    if path.exists():
        if not path.is_dir() and path.suffix != GGUF_SUFFIX:
            raise SourceNotFound(
                "not a folder or a .gguf file; give the checkpoint folder that holds config.json", where=source)
        if gguf_file is not None:  # the folder's own files stay its root: a linked file must not lead out of it
            chosen = pick_gguf([p.name for p in path.iterdir()], gguf_file, source)
            return Resolved(source, path.resolve() / chosen, None, None, root=path.resolve())
        return Resolved(source, path.resolve(), None, None)
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise SourceNotFound("no such folder, and not a Hub repo id (owner/name)", where=source) from None
    return _download(source, revision or "main", endpoint=endpoint, token=token, cache_dir=cache_dir,
                     weights=download, gguf_file=gguf_file)


def _example(source: str) -> Resolved:
    """A built-in example: named by the model it ships, revised by its GGUF file's content hash."""
    example = find_example(source[len(EXAMPLE_PREFIX):])
    gguf = example.gguf()
    revision = content_hash([gguf], gguf.parent, cache=SUPERWEIGHT_HOME / DIGEST_CACHE)
    folder = example_checkpoint(example, revision, home=SUPERWEIGHT_HOME)
    return Resolved(source, folder, example.repo_id, revision, artifact=example.artifact, dtype=example.quantization)


def use_timeouts() -> None:
    """Give every huggingface_hub request a timeout (HUB_TIMEOUT seconds to connect, or between bytes),
    and every API answer a bound on its size (fetch.bound_api_answer).

    huggingface_hub's shared client sets none, and most of its calls pass `timeout=None`: an endpoint
    that accepts connections and never answers would hold a scan or a crawl forever. A request hook
    fills in the timeouts a request lacks (a download's own is kept). Called before Hub work, since
    the shared client can be replaced.
    """
    client = get_session()
    hooks = client.event_hooks
    if _bound_timeouts not in hooks["request"]:
        client.event_hooks = {**hooks, "request": [*hooks["request"], _bound_timeouts, count_request],
                              "response": [*hooks["response"], bound_api_answer]}


def _bound_timeouts(request: httpx2.Request) -> None:
    timeout = dict(request.extensions.get("timeout") or {})
    for phase in ("connect", "read", "write", "pool"):
        if timeout.get(phase) is None:
            timeout[phase] = HUB_TIMEOUT
    request.extensions["timeout"] = timeout


def _download(repo_id: str, revision: str, *, endpoint, token, cache_dir, weights: bool,
              gguf_file: str | None = None) -> Resolved:
    """Pin `revision` to a sha, pick the weight files (refusing repos of pickles alone), and fetch only
    what a scan reads: the small files (none for a GGUF), and the weights too when `weights` is set
    or the Hub is offline."""
    where = f"{repo_id}@{revision}"
    gguf = None  # the GGUF file read, when the repo is read as GGUF
    with hub_errors(where, endpoint=endpoint):
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
        except OfflineModeIsEnabled:
            info = None  # HF_HUB_OFFLINE=1: the cache alone decides
        patterns, remote = CHECKPOINT_PATTERNS, []
        if info is not None:
            files = [s.rfilename for s in info.siblings or []]
            remote = _weight_files(where, repo_id, files, revision=info.sha, endpoint=endpoint, token=token,
                                   cache_dir=cache_dir, gguf_file=gguf_file)
            gguf = remote[0] if remote[0].endswith(GGUF_SUFFIX) else None
            small = [] if gguf else [f for f in CHECKPOINT_PATTERNS if "*" not in f and f in files]
            patterns, remote = (small + remote, []) if weights else (small, remote)
        if gguf is not None and not weights:  # a GGUF read remotely holds its config too: nothing to download
            folder = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
            folder = folder / "snapshots" / info.sha  # where it would lie, for errors to name
        else:
            folder = _snapshot(repo_id, revision, patterns, endpoint=endpoint, token=token, cache_dir=cache_dir,
                               offline=info is None, where=where)
    folder = Path(folder)
    if info is None:  # offline: the cached snapshot decides which GGUF file, as for a local folder
        names = [p.name for p in folder.iterdir()]
        if gguf_file is not None or gguf_only(names):
            gguf = pick_gguf(names, gguf_file, where)
    if info is not None and folder.name != info.sha:
        raise HubError(f"moved from {info.sha[:12]} to {folder.name[:12]} while downloading; scan again", where=where)
    logger.info("%s resolved to %s", where, folder)
    # Snapshot files link into the repo's blobs/: the repo's cache folder is what they may resolve into.
    # A GGUF's path is where the file lies in the snapshot, or would if it were downloaded: errors name it.
    return Resolved(repo_id, folder / gguf if gguf else folder, repo_id, folder.name,  # named by commit sha
                    artifact=gguf, root=folder.parent.parent, remote=tuple(remote), endpoint=endpoint)


def _snapshot(repo_id: str, revision: str, patterns: list[str], *, endpoint, token, cache_dir, offline: bool,
              where: str) -> str:
    """snapshot_download of `patterns`, from the cache alone when `offline`."""
    try:
        # Ask for the revision as given (not info.sha) so the cache records refs/<revision> and a
        # later offline scan can find it; the snapshot folder's name is the commit actually fetched.
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint,
                                 token=token, cache_dir=cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError:
        if not offline:
            raise  # online, but a download got no answer
        raise HubError("not in the local Hub cache, and the Hub is offline (HF_HUB_OFFLINE)", where=where) from None


@contextlib.contextmanager
def hub_errors(where: str, *, endpoint: str | None):
    """Hub requests with timeouts, whose failures become ScanErrors naming `where`.

    Gated and missing repos and revisions get their own errors; anything else the Hub or the
    network raises becomes a HubError, or HubUnavailable when trying again may help (`with_retries`).
    """
    use_timeouts()
    try:
        yield
    except ScanError as e:  # raised by our own hooks (an answer too large): name what it was for
        e.where = e.where or where
        raise
    except GatedRepoError:
        raise GatedRepo("gated repo; accept its terms on the Hub and set HF_TOKEN", where=where) from None
    except RepositoryNotFoundError:
        raise SourceNotFound("no such model on the Hub (or it is private: set HF_TOKEN)", where=where) from None
    except RevisionNotFoundError:
        raise SourceNotFound("no such revision", where=where) from None
    except LocalEntryNotFoundError as e:  # huggingface_hub's word for "the Hub did not answer"
        raise hub_error(where, e.__cause__ or e, endpoint=endpoint) from e
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:  # OSError: also a cache folder that cannot be written
        raise hub_error(where, e, endpoint=endpoint) from e


def hub_error(where: str, error: Exception, *, endpoint: str | None) -> HubError:
    """A one-line HubError for a failed Hub request: HubUnavailable when trying again may help, with
    the seconds its Retry-After asks for (`retry_after`, or None)."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    transient = isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError)) or status in TRANSIENT_STATUS
    reason = (f"Hub request to {endpoint or constants.ENDPOINT} failed ({first_line(error)}); "
              "check HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 to scan from the cache")
    if transient:
        return HubUnavailable(reason, where=where, retry_after=retry_after(response))
    return HubError(reason, where=where)


def with_retries(call, *, attempts: int = 4, backoff: float = 2.0):
    """Run `call()`, trying again after HubUnavailable with exponential backoff (backoff, 2x, 4x... seconds),
    or after what the answer's Retry-After asked for when that is longer (at most MAX_RETRY_AFTER).

    Raises:
        The last HubUnavailable once `attempts` calls have failed; any other error at once.
    """
    for attempt in range(attempts):
        try:
            return call()
        except HubUnavailable as e:
            asked = e.retry_after or 0.0
            if attempt == attempts - 1 or asked > MAX_RETRY_AFTER:  # "come back much later": fail now
                raise
            delay = max(backoff * 2**attempt, asked)  # a 429's Retry-After, when it asks for longer
            logger.warning("%s; trying again in %.1f s (%d of %d)", first_line(e), delay, attempt + 2, attempts)
            time.sleep(delay)


def _weight_files(where: str, repo_id: str, files: list[str], *, revision: str, endpoint, token,
                  cache_dir, gguf_file: str | None = None) -> list[str]:
    """Exactly the weight files a scan reads: the ones the loader will use.

    Safetensors when the repo holds them and no GGUF file is asked for, else one GGUF file
    (files.pick_gguf); a repo of pickles alone is refused. With a shard index only the shards it
    names are read (Mistral repos also ship a consolidated.safetensors of the same weights).
    """
    require_weights(files, where)
    if gguf_file is not None or not any(f.endswith(".safetensors") for f in files):
        return [pick_gguf(files, gguf_file, where)]
    wanted = []
    if "model.safetensors.index.json" in files:
        index = hf_hub_download(repo_id, "model.safetensors.index.json", revision=revision, endpoint=endpoint,
                                token=token, cache_dir=cache_dir)
        with open(index) as f:
            wanted += sorted(set(json.load(f)["weight_map"].values()))
    elif "model.safetensors" in files:
        wanted.append("model.safetensors")
    else:
        wanted += [f for f in files if f.endswith(".safetensors") and "/" not in f]
    return wanted
