"""What a crawl scans: new or updated models from the Hub, or a given list, each vetted and pinned.

Discovery asks the Hub for text-generation models with safetensors weights, most recently modified
first (`list_models`), down to `since`. Each model is then pinned to the commit sha of its main
branch and vetted before anything large is downloaded: its file list (safetensors, or one GGUF file;
not gated), its config (no remote code) and its size from the safetensors headers
(`get_safetensors_metadata`), or from the GGUF header, read by range requests.
Hub calls that fail transiently are retried with backoff (scanner.hub.with_retries).
"""

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HFValidationError, NotASafetensorsRepoError, SafetensorsParsingError
from huggingface_hub.utils import validate_repo_id

from superweight.scanner.checkpoint import load_config
from superweight.scanner.errors import (
    GatedRepo, MissingConfig, OverLimit, Refused, ScanError, SourceNotFound, first_line, relocated,
)
from superweight.scanner.fetch import HubFile, Transfer
from superweight.scanner.files import GGUF_SUFFIX, pick_gguf, require_weights
from superweight.scanner.gguf_header import gguf_config, read_header
from superweight.scanner.hub import hub_errors, with_retries

logger = logging.getLogger(__name__)

PIPELINE = "text-generation"


@dataclass(frozen=True)
class VettedModel:
    """A Hub model a crawl was asked about, after vetting: pinned, sized, and either fit to scan or not."""

    repo_id: str
    revision: str  # the commit sha of main; "" when the Hub could not tell us
    parameters: int | None = None  # from the safetensors or GGUF headers
    size_bytes: int | None = None  # bytes of tensor data: what a scan downloads
    refusal: Refused | None = None  # why it will not be scanned (recorded as refused, with its kind)
    error: str | None = None  # why it could not be vetted (recorded as failed)
    artifact: str = ""  # the one GGUF file of a repo of GGUF files; "" for safetensors (the ledger's and catalog's key)


@dataclass(frozen=True)
class HubAccess:
    """Where the Hub is and how hard to try; the token comes from HF_TOKEN (huggingface_hub's default)."""

    endpoint: str | None = None
    attempts: int = 4  # calls per request before a transient failure counts
    backoff: float = 2.0  # seconds before the second call; doubles after each

    def call(self, where: str, request):
        """`request()` with retries, its Hub and network errors as ScanErrors naming `where`."""
        def once():
            with hub_errors(where, endpoint=self.endpoint):
                return request()

        return with_retries(once, attempts=self.attempts, backoff=self.backoff)


def discover(*, hub: HubAccess = HubAccess(), since: datetime | None = None, limit: int = 100) -> list[str]:
    """Text-generation models with safetensors weights, most recently modified first.

    Args:
        since: stop at models last modified before this (naive datetimes are UTC).
        limit: at most this many.
    """
    def listing():
        models = HfApi(endpoint=hub.endpoint).list_models(
            pipeline_tag=PIPELINE, filter=["safetensors"], sort="last_modified", limit=limit,
            expand=["lastModified", "createdAt", "sha", "gated"])
        found = []
        for model in models:  # a generator: its pages are fetched here, inside the call
            modified = model.last_modified or model.created_at
            if since and modified and modified.replace(tzinfo=None) < since.replace(tzinfo=None):
                break  # newest first: everything after is older
            found.append(model.id)
        return found

    return hub.call("list_models", listing)


def vet(repo_id: str, *, hub: HubAccess = HubAccess(), max_params: int | None = None,
        max_bytes: int | None = None, cache_dir=None) -> VettedModel:
    """Pin `repo_id` to main's commit sha and decide whether it can be scanned, without downloading weights."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return VettedModel(repo_id, "", refusal=Refused("not a Hub repo id (owner/name), a folder or an example",
                                                         where=repo_id))
    api = HfApi(endpoint=hub.endpoint)
    try:
        info = hub.call(repo_id, lambda: api.model_info(repo_id, revision="main"))
    except (Refused, SourceNotFound) as e:  # gated, or nothing there to scan
        return VettedModel(repo_id, "", refusal=e if isinstance(e, Refused) else Refused(e.reason, where=e.where))
    except ScanError as e:  # the Hub did not answer
        return VettedModel(repo_id, "", error=str(e))
    try:
        parameters, size, artifact = _checked(repo_id, info, hub, api, cache_dir)
    except Refused as e:
        return VettedModel(repo_id, info.sha, refusal=e)
    except (NotASafetensorsRepoError, SafetensorsParsingError) as e:
        return VettedModel(repo_id, info.sha, refusal=Refused(first_line(e), where=repo_id))
    except ScanError as e:  # the Hub did not answer, or a broken config
        return VettedModel(repo_id, info.sha if isinstance(e, MissingConfig) else "", error=str(e))
    vetted = VettedModel(repo_id, info.sha, parameters, size, artifact=artifact)
    if max_params is not None and parameters > max_params:
        return replace(vetted, refusal=OverLimit(f"{parameters:,} parameters, over the limit of {max_params:,}",
                                                 limit="max_params", value=parameters, bound=max_params))
    if max_bytes is not None and size > max_bytes:
        return replace(vetted, refusal=OverLimit(f"{size / 1e9:.1f} GB of weights, over the download limit of "
                                                 f"{max_bytes / 1e9:.1f} GB", limit="max_cache_gb", value=size,
                                                 bound=max_bytes))
    return vetted


def _checked(repo_id: str, info, hub: HubAccess, api: HfApi, cache_dir) -> tuple[int, int, str]:
    """(parameters, bytes of tensor data, the GGUF file or "") of `repo_id` at `info.sha`, after the checks
    that refuse a model.

    Raises:
        Refused: gated, no safetensors or GGUF weights, not a full checkpoint, remote code, unknown architecture.
    """
    files, where = [s.rfilename for s in info.siblings or []], f"{repo_id}@{info.sha[:12]}"
    if info.gated:
        raise GatedRepo(f"gated ({info.gated}); the crawl scans open models only")
    require_weights(files, None)
    if not any(f.endswith(".safetensors") for f in files):
        return _gguf_checked(repo_id, info.sha, files, hub)
    if "config.json" not in files:  # e.g. an adapter (PEFT) repo tagged text-generation
        raise Refused("no config.json: not a full model checkpoint (an adapter?)")
    config = hub.call(where, lambda: hf_hub_download(repo_id, "config.json", revision=info.sha,
                                                     endpoint=hub.endpoint, cache_dir=cache_dir))
    snapshot = Path(config).parent  # its files link into the repo cache folder's blobs/
    try:
        load_config(snapshot, root=snapshot.parent.parent)  # the scan's own rule: no remote code, a known architecture
    except ScanError as e:
        raise relocated(e, snapshot, where) from None
    meta = hub.call(where, lambda: api.get_safetensors_metadata(repo_id, revision=info.sha))
    size = sum(t.data_offsets[1] - t.data_offsets[0] for file in meta.files_metadata.values()
               for t in file.tensors.values())
    return sum(meta.parameter_count.values()), size, ""


def _gguf_checked(repo_id: str, sha: str, files: list[str], hub: HubAccess) -> tuple[int, int, str]:
    """(parameters, bytes of tensor data, its name) of a repo of GGUF files, from the header of its one GGUF file.

    Raises:
        Refused: several GGUF files (a crawl has no --file to choose one), a split GGUF, an
            architecture transformers does not map.
    """
    where = f"{repo_id}@{sha[:12]}"
    ggufs = [f for f in files if f.endswith(GGUF_SUFFIX)]
    if len(ggufs) > 1:
        raise Refused(f"{len(ggufs)} GGUF files and no safetensors; a crawl scans a repo with one "
                      f"(scan one with: superweight scan {repo_id} --file NAME)")
    name = pick_gguf(files, None, where)

    def header():
        source = HubFile(repo_id, sha, name, name=f"{where}/{name}", transfer=Transfer(), endpoint=hub.endpoint)
        parsed = read_header(source)
        gguf_config(parsed)  # the scan's own rule: an architecture transformers maps, a sound config
        return parsed

    parsed = hub.call(where, header)
    return parsed.parameters, parsed.data_bytes, name
