"""Scan one source end to end: resolve it, open it once (`open_checkpoint`), stream it through
detection (and verification), return a ScanResult."""

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import __version__
from .checkpoint import DTYPE_NAMES, Checkpoint
from .config import DEFAULT_CACHE_SHARE, DetectConfig
from .detect import Detector
from .errors import CannotVerify, DeviceUnavailable, InvalidPrompt, ScanError, relocated
from .files import inside
from .gguf import GGUF_SUFFIX, GGUFCheckpoint, find_gguf
from .fetch import FileBytes, HubFile, Pacer, Transfer
from .hub import hub_errors, resolve
from .loader import StreamingModel
from .progress import Progress
from .quantize import QuantConfig, check_lab, quantize_lab
from .result import ScanResult, Verification
from .safetensors_checkpoint import SafetensorsCheckpoint
from .tokens import hashed_ids, max_positions
from .verify import VerifyConfig, verify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanOptions:
    """How to scan; the defaults are the embedded ones."""

    device: str = "auto"  # "auto": the first CUDA GPU if there is one, else the CPU
    dtype: str = "auto"  # "auto": the checkpoint's dtype (float16 is computed in float32 on CPU)
    revision: str | None = None
    trust_remote_code: bool = False
    endpoint: str | None = None
    cache_dir: Path | None = None  # where Hub downloads go (default: the Hub cache, HF_HUB_CACHE)
    download: bool = False  # download a Hub repo's weights to the cache instead of reading them remotely
    gguf_file: str | None = None  # which GGUF file of a repo or folder: a file name, or a quantization (Q4_K_M)
    cache_gb: float | None = None  # memory for layers kept between passes (None: see cache_bytes)
    max_requests_per_5min: int | None = None  # pace Hub range requests under this budget (None: unpaced)
    detect: DetectConfig = field(default_factory=DetectConfig)
    verify: VerifyConfig | None = None  # measure each super weight's effect (scanner.verify); None: don't
    quantize: QuantConfig | None = None  # measure fake-quantized variants (scanner.quantize); None: don't


def pick_device(device: str) -> torch.device:
    """The torch device for `device` ("auto", "cpu", "cuda", "cuda:N"), checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise DeviceUnavailable(f"--device {device}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if chosen.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"--device {device}: only cpu and cuda devices are supported")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (chosen.index or 0) >= count:
            raise DeviceUnavailable(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu")
    return chosen


def open_checkpoint(path: Path, *, trust_remote_code: bool = False, root: Path | None = None,
                    revision: str | None = None, transfer: Transfer | None = None,
                    sources: list[FileBytes] | None = None) -> Checkpoint:
    """The checkpoint at `path`: a GGUF file, a folder holding one GGUF file, or a safetensors folder.

    Args:
        path: the folder or file (a resolved source's path; for a Hub GGUF read remotely, where it would lie).
        trust_remote_code: allow repo code named by config.json's auto_map.
        root: every file read must be a regular file inside it (default: the folder, or the GGUF file's).
        revision: the revision when it is known (a Hub commit sha); else it is the content hash.
        transfer: where the bytes read are counted.
        sources: the weight files, when they are not the folder's own (read remotely).
    """
    path = Path(path)
    transfer = transfer or Transfer()
    if sources is not None and path.suffix == GGUF_SUFFIX:  # a Hub GGUF, read by range requests
        checkpoint = GGUFCheckpoint(path, source=sources[0], root=root, transfer=transfer)
    elif sources is None and (gguf_file := find_gguf(path)) is not None:
        inside(gguf_file, root or gguf_file.parent, what="GGUF file")
        checkpoint = GGUFCheckpoint(gguf_file, root=root or gguf_file.parent, transfer=transfer)  # no code to trust
    else:
        checkpoint = SafetensorsCheckpoint(path, sources=sources, transfer=transfer,
                                           trust_remote_code=trust_remote_code, root=root)
    checkpoint.known_revision = revision
    return checkpoint


def remote_sources(resolved, transfer: Transfer, *, pacer: Pacer | None = None) -> list[FileBytes] | None:
    """The weight files of a Hub repo, read by range requests (None: the source is read locally)."""
    if not resolved.remote:
        return None
    where = f"{resolved.repo_id}@{resolved.revision[:12]}"
    with hub_errors(where, endpoint=resolved.endpoint):
        return [HubFile(resolved.repo_id, resolved.revision, name, name=f"{where}/{name}", transfer=transfer,
                        endpoint=resolved.endpoint, pacer=pacer) for name in resolved.remote]


def cache_bytes(cache_gb: float | None, *, remote: bool) -> int:
    """The layer cache's size: `cache_gb`; else, reading from the Hub, DEFAULT_CACHE_SHARE of the
    machine's memory; else 0: a local file's re-reads come from the OS page cache, and keeping its
    layers as well would hold them in memory twice."""
    if cache_gb is not None:
        return int(cache_gb * 1e9)
    if not remote:
        return 0
    return int(DEFAULT_CACHE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def prompt_ids(prompt: str, config, tokenizer=None) -> tuple[list[int], list[str] | None]:
    """Token ids of `prompt` with the checkpoint's own tokenizer, and the tokens (None without one).

    Without a usable tokenizer (None) each word of the prompt becomes one id (`hashed_ids`):
    deterministic, about as many tokens as a real tokenizer gives, spread over the vocabulary rather
    than on the low byte-fallback ids, and good enough, since the super activation does not depend
    on the prompt's wording (see README).
    """
    if tokenizer is None:
        return hashed_ids(prompt, config), None
    ids = tokenizer(prompt)["input_ids"]
    return ids, tokenizer.convert_ids_to_tokens(ids)


def check_prompt(path: Path, ids: list[int], config) -> None:
    """Raise InvalidPrompt unless the prompt has between 1 and the model's maximum positions of tokens."""
    limit = max_positions(config)
    if not ids:
        raise InvalidPrompt("the prompt gives no tokens; pass a --prompt with words in it", where=path)
    if limit and len(ids) > limit:
        raise InvalidPrompt(f"the prompt has {len(ids)} tokens, more than the model's {limit} positions", where=path)


def _named(error: ScanError, resolved) -> ScanError:
    """`error`, naming a file of a Hub download by its repo and commit rather than by its cache folder."""
    if resolved.repo_id is None or resolved.root is None:
        return error  # a folder the user gave, or a built-in example: its own path is its name
    return relocated(error, resolved.path, f"{resolved.repo_id}@{resolved.revision[:12]}")


def scan_source(source: str, options: ScanOptions = ScanOptions(), *, progress: Progress | None = None) -> dict:
    """`scan`, as the documented JSON object (README "JSON output"): for callers at the JSON edge."""
    return scan(source, options, progress=progress).to_json()


def scan(source: str, options: ScanOptions = ScanOptions(), *, progress: Progress | None = None) -> ScanResult:
    """Find the super weights of one checkpoint, and with `options.verify` measure what they do.

    Args:
        source: a local folder, a GGUF file, a Hub repo id or `example:NAME`.
        options: device, dtype, revision, thresholds, and whether to verify.
        progress: told of each phase (a streamed pass, a read of the LM head) and each step of it.

    Raises:
        ScanError: a subclass naming what is wrong with the source.
    """
    start = time.perf_counter()
    scanned_at = datetime.now(UTC).replace(microsecond=0, tzinfo=None).isoformat()
    device = pick_device(options.device)
    resolved = resolve(source, revision=options.revision, endpoint=options.endpoint, cache_dir=options.cache_dir,
                       download=options.download, gguf_file=options.gguf_file)
    resolved_at = time.perf_counter()
    pool, stop = ThreadPoolExecutor(max_workers=1), threading.Event()
    transfer = Transfer()
    pacer = Pacer(options.max_requests_per_5min) if options.max_requests_per_5min else None
    model = None
    try:
        checkpoint = open_checkpoint(resolved.path, trust_remote_code=options.trust_remote_code, root=resolved.root,
                                     revision=resolved.revision, transfer=transfer,
                                     sources=remote_sources(resolved, transfer, pacer=pacer))
        model = StreamingModel(checkpoint, device=str(device), dtype=DTYPE_NAMES.get(options.dtype),
                               trust_remote_code=options.trust_remote_code,
                               cache_bytes=cache_bytes(options.cache_gb, remote=checkpoint.remote))
        hashing = pool.submit(checkpoint.revision, stop=stop)  # a local checkpoint's hash, while the layers stream
        tokenizer = checkpoint.tokenizer()
        ids, tokens = prompt_ids(options.detect.prompt, model.config, tokenizer)
        check_prompt(resolved.path, ids, model.config)
        if options.quantize is not None:
            check_lab(model, options.quantize)  # before detection: a lab that cannot run costs nothing
        detection = Detector(model, options.detect, progress=progress).run(model.load_static(ids))
        verification = None
        if options.verify is not None:
            try:
                verification = verify(model, detection, tokenizer=tokenizer, config=options.verify, progress=progress)
            except CannotVerify as e:  # the coordinates still stand; the record says why there are no effects
                logger.warning("%s: not verified: %s", source, e)
                verification = Verification(skipped=str(_named(e, resolved)))
        quantization = None  # the lab is what `superweight quantize` is for: a lab that fails fails the scan
        if options.quantize is not None:
            quantization = quantize_lab(model, detection, tokenizer=tokenizer, config=options.quantize,
                                        progress=progress)
        revision = hashing.result()
    except ScanError as e:
        _named(e, resolved)
        raise
    finally:
        stop.set()  # a failed scan does not wait for the hash of the whole checkpoint
        pool.shutdown(wait=True)
        if model is not None:
            model.close()
    return _result(source, options, resolved, model, detection, verification, quantization, revision=revision,
                   tokens=tokens, ids=ids, device=device, transfer=transfer, scanned_at=scanned_at, start=start,
                   resolved_at=resolved_at)


def _result(source, options, resolved, model, detection, verification, quantization, *, revision, tokens, ids,
            device, transfer, scanned_at, start, resolved_at) -> ScanResult:
    """The ScanResult of a finished scan: what was read, what was found, what it cost."""
    return ScanResult(
        source=source, repo_id=resolved.repo_id, revision=revision, artifact=resolved.artifact,
        path=str(resolved.path), model_type=model.config.get_text_config().model_type,
        architecture=type(model.model).__name__, num_layers=model.num_layers, hidden_size=model.hidden_size,
        out_proj=sorted({f"{model.layers_prefix}.N.{p.module_path}" for p in model.out_projs}),
        dtype=resolved.dtype or str(model.checkpoint_dtype).removeprefix("torch."),
        compute_dtype=str(model.dtype).removeprefix("torch."), device=str(device), prompt=options.detect.prompt,
        tokens=tokens if tokens is not None else ids, detection=detection, verification=verification,
        criteria=asdict(options.detect), scanner_version=__version__, scanned_at=scanned_at,
        bytes_read=model.bytes_read, seconds=round(time.perf_counter() - start, 3),
        download_seconds=round(resolved_at - start, 3),  # resolving: the Hub download, if any
        remote=bool(resolved.remote), bytes_fetched=transfer.bytes, requests=transfer.requests,
        passes=model.feed.passes, forwards=model.forwards, wait_seconds=round(transfer.wait_seconds, 3),
        quantization=quantization,
    )
