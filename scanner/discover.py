"""What a crawl scans: new or updated models from the Hub, or a given list, each vetted and pinned.

Discovery asks the Hub for text-generation models with safetensors weights, most recently modified
first (`list_models`), down to `since`. Each candidate is then pinned to the commit sha of its main
branch and vetted before anything large is downloaded: its file list (safetensors, not gated), its
config (no remote code) and its size from the safetensors headers (`get_safetensors_metadata`).
Hub calls that fail transiently are retried with backoff (scanner.hub.with_retries).
"""

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    SafetensorsParsingError,
    NotASafetensorsRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .config import PICKLE_SUFFIXES
from .errors import HubError, MissingConfig, RemoteCodeRefused, UnsupportedArchitecture, first_line
from .hub import hub_error, with_retries, use_timeouts
from .checkpoint import load_config

logger = logging.getLogger(__name__)

PIPELINE = "text-generation"


@dataclass(frozen=True)
class Candidate:
    """A model a crawl was asked about, after vetting."""

    repo_id: str
    revision: str  # the commit sha of main; "" when the Hub could not tell us
    parameters: int | None = None  # from the safetensors headers
    size_bytes: int | None = None  # bytes of safetensors tensor data: what a scan downloads
    refusal: str | None = None  # why it will not be scanned (recorded as refused)
    error: str | None = None  # why it could not be vetted (recorded as failed)


# Refusals that depend on this run's limits or on access granted later: a later crawl vets such a
# model again instead of skipping it. Every other refusal holds for the commit.
RECONSIDERED = ("(--max-params)", "(--max-cache-gb)", "gated")


def reconsidered(refusal: str | None) -> bool:
    """Whether a recorded refusal may not hold on the next crawl (see RECONSIDERED)."""
    return bool(refusal) and any(mark in refusal for mark in RECONSIDERED)


@dataclass(frozen=True)
class HubAccess:
    """Where the Hub is and how hard to try; the token comes from HF_TOKEN (huggingface_hub's default)."""

    endpoint: str | None = None
    attempts: int = 4  # calls per request before a transient failure counts
    backoff: float = 2.0  # seconds before the second call; doubles after each


def discover(*, hub: HubAccess = HubAccess(), since: datetime | None = None, limit: int = 100) -> list[str]:
    """Text-generation models with safetensors weights, most recently modified first.

    Args:
        since: stop at models last modified before this (naive datetimes are UTC).
        limit: at most this many.
    """
    def listing():
        use_timeouts()
        try:
            models = HfApi(endpoint=hub.endpoint).list_models(
                pipeline_tag=PIPELINE, filter=["safetensors"], sort="last_modified", limit=limit,
                expand=["lastModified", "createdAt", "sha", "gated"])
            found = []
            for model in models:
                modified = model.last_modified or model.created_at
                if since and modified and modified.replace(tzinfo=None) < since.replace(tzinfo=None):
                    break  # newest first: everything after is older
                found.append(model.id)
            return found
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
            raise hub_error("list_models", e, endpoint=hub.endpoint) from e

    return with_retries(listing, attempts=hub.attempts, backoff=hub.backoff)


def vet(repo_id: str, *, hub: HubAccess = HubAccess(), max_params: int | None = None,
        max_bytes: int | None = None, cache_dir=None) -> Candidate:
    """Pin `repo_id` to main's commit sha and decide whether it can be scanned, without downloading weights."""
    api = HfApi(endpoint=hub.endpoint)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return Candidate(repo_id, "", refusal=f"{repo_id}: not a Hub repo id (owner/name), a folder or an example")
    try:
        info = _hub(repo_id, hub, lambda: api.model_info(repo_id, revision="main"))
        sha, files = info.sha, [s.rfilename for s in info.siblings or []]
        if info.gated:
            return Candidate(repo_id, sha, refusal=f"gated ({info.gated}); the crawl scans open models only")
        if not any(f.endswith(".safetensors") for f in files):
            kinds = sorted({f.rsplit(".", 1)[-1] for f in files if f.endswith(PICKLE_SUFFIXES + (".gguf",))})
            return Candidate(repo_id, sha, refusal=f"no safetensors weights (has: {', '.join(kinds) or 'none'})")
        if "config.json" not in files:  # e.g. an adapter (PEFT) repo tagged text-generation
            return Candidate(repo_id, sha, refusal="no config.json: not a full model checkpoint (an adapter?)")
        config = _hub(repo_id, hub, lambda: hf_hub_download(repo_id, "config.json", revision=sha,
                                                            endpoint=hub.endpoint, cache_dir=cache_dir))
        snapshot = Path(config).parent  # its files link into the repo cache folder's blobs/
        load_config(snapshot, root=snapshot.parent.parent)  # the scan's own rule: no remote code, a known architecture
        meta = _hub(repo_id, hub, lambda: api.get_safetensors_metadata(repo_id, revision=sha))
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, NotASafetensorsRepoError,
            SafetensorsParsingError) as e:
        return Candidate(repo_id, "", refusal=first_line(e))
    except (RemoteCodeRefused, UnsupportedArchitecture) as e:
        return Candidate(repo_id, sha, refusal=str(e).replace(str(Path(config).parent), repo_id))
    except HubError as e:
        return Candidate(repo_id, "", error=str(e))
    except MissingConfig as e:
        return Candidate(repo_id, sha, error=str(e).replace(str(Path(config).parent), repo_id))
    parameters = sum(meta.parameter_count.values())
    size = sum(t.data_offsets[1] - t.data_offsets[0] for file in meta.files_metadata.values()
               for t in file.tensors.values())
    if max_params is not None and parameters > max_params:
        return Candidate(repo_id, sha, parameters, size,
                         refusal=f"{parameters:,} parameters, over the limit of {max_params:,} (--max-params)")
    if max_bytes is not None and size > max_bytes:
        return Candidate(repo_id, sha, parameters, size,
                         refusal=f"{size / 1e9:.1f} GB of weights, over the download limit of {max_bytes / 1e9:.1f} GB "
                                 "(--max-cache-gb)")
    return Candidate(repo_id, sha, parameters, size)


def _hub(repo_id: str, hub: HubAccess, call):
    """`call()` with retries; Hub HTTP and network errors become HubError / HubUnavailable."""
    def once():
        use_timeouts()
        try:
            return call()
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, NotASafetensorsRepoError):
            raise
        except (HfHubHTTPError, httpx2.HTTPError, ConnectionError, TimeoutError) as e:
            raise hub_error(repo_id, e, endpoint=hub.endpoint) from e
        except LocalEntryNotFoundError as e:  # hf_hub_download's word for "the Hub did not answer"
            raise hub_error(repo_id, e.__cause__ or e, endpoint=hub.endpoint) from e

    return with_retries(once, attempts=hub.attempts, backoff=hub.backoff)
