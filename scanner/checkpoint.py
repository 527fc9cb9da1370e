"""A checkpoint on disk, whatever its format: what every format answers, and the config rules they share.

A checkpoint is a safetensors folder (scanner.safetensors_checkpoint.SafetensorsCheckpoint) or a
GGUF file (scanner.gguf.GGUFCheckpoint), opened by scanner.scan.open_checkpoint; both answer the
same few calls, and both know their tokenizer and their revision. Opening one reads only the config
and the tensor headers, checked as untrusted input: only regular files inside the checkpoint, a
strict config (`load_config`, `check_sizes`), no pickles, no remote code unless trusted. The
weights are read later, a layer at a time, by scanner.loader.StreamingModel.
"""

import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .config import DIGEST_CACHE, NULLABLE_SIZES, SIZE_LIMITS, SUPERWEIGHT_HOME
from .errors import CorruptCheckpoint, MissingConfig, RemoteCodeRefused, UnsupportedArchitecture, first_line
from .fetch import FileBytes
from .files import inside
from .digest import content_hash
from .tokens import load_tokenizer

logger = logging.getLogger(__name__)

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors' names
DTYPE_NAMES = {str(t).removeprefix("torch."): t for t in FLOAT_DTYPES.values()}  # float32, ...: for --dtype


class Checkpoint:
    """What every checkpoint answers besides its format's own calls: its tokenizer and its revision.

    A subclass sets `path` (what was opened), `folder` (hashed file names are relative to it),
    `root` (every file read must lie inside it), `config`, `tensors` (name -> header info),
    `weight_files`, `hashed_files` and `dtype`.
    """

    known_revision: str | None = None  # a Hub commit sha or an example's GGUF hash, set by open_checkpoint
    sources: list[FileBytes] = []  # the weight files' bytes, local or remote, closed by close()

    def span(self, key: str) -> tuple[FileBytes, int, int]:
        """Where tensor `key`'s bytes lie: (file, offset, length)."""
        info = self.tensors[key]
        return info.file, info.offset, info.n_bytes

    def nbytes(self, keys: list[str]) -> int:
        """The stored size of `keys`, in bytes."""
        return sum(self.span(k)[2] for k in keys)

    def fetch(self, keys: list[str]) -> dict[str, memoryview]:
        """The stored bytes of `keys`, read together: one read per run of neighbouring tensors in a file."""
        by_file: dict[int, list[str]] = {}
        for key in keys:
            by_file.setdefault(id(self.span(key)[0]), []).append(key)
        raw = {}
        for names in by_file.values():
            file = self.span(names[0])[0]
            views = file.read_spans([self.span(k)[1:] for k in names])
            raw.update(zip(names, views, strict=True))
        return raw

    @property
    def remote(self) -> bool:
        """Whether its weights are read over the network (reading them again costs what reading them did)."""
        return any(source.remote for source in self.sources)

    def read_row_bytes(self, key: str, rows: list[int] | range) -> tuple[memoryview, int]:
        """The stored bytes of rows of a 2D tensor (rows outermost), writable, and one row's size."""
        file, offset, length = self.span(key)
        row_bytes = length // self.tensors[key].shape[0]
        if isinstance(rows, range) and rows.step == 1:
            return file.read_spans([(offset + rows.start * row_bytes, len(rows) * row_bytes)])[0], row_bytes
        views = file.read_spans([(offset + r * row_bytes, row_bytes) for r in rows])
        return memoryview(bytearray().join(views)), row_bytes

    def close(self) -> None:
        """Let go of the weight files (open descriptors)."""
        for source in self.sources:
            source.close()

    def tokenizer(self):
        """The checkpoint's own tokenizer, or None without a usable one (loaded once)."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def load_tokenizer(self):
        """The tokenizer of the checkpoint's own files, or None (a GGUF builds it from its metadata)."""
        return load_tokenizer(self.folder, root=self.root)

    def revision(self, *, stop: threading.Event | None = None) -> str | None:
        """The known revision, or a local checkpoint's content hash (None once `stop` is set)."""
        if self.known_revision is not None:
            return self.known_revision
        return content_hash(self.hashed_files, self.folder, cache=SUPERWEIGHT_HOME / DIGEST_CACHE, stop=stop)


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor is stored and what its header says."""

    file: FileBytes
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # of its data, from the start of the file
    n_bytes: int


def load_config(path: Path, *, trust_remote_code: bool = False, root: Path | None = None):
    """Read config.json, refusing custom code unless trusted.

    A config with `auto_map` whose `model_type` transformers implements natively (Phi-3 repos do
    this) is read with the native implementation; any other `auto_map` needs the operator's opt-in.
    """
    config_file = path / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        raise MissingConfig("no config.json (is this a model checkpoint folder?)", where=path)
    inside(config_file, root or path, what="config")
    try:
        raw = json.loads(config_file.read_text(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MissingConfig(f"not valid JSON ({e})", where=config_file) from e
    except ValueError as e:  # NaN or Infinity, which JSON does not have but Python reads
        raise MissingConfig(f"{e}", where=config_file) from None
    if not isinstance(raw, dict):
        raise MissingConfig("not a JSON object", where=config_file)
    check_sizes(raw, config_file)
    model_type = raw.get("model_type")
    native = model_type in CONFIG_MAPPING
    if "auto_map" in raw and not native and not trust_remote_code:
        raise RemoteCodeRefused(
            "config.json needs custom code from the repo (auto_map); "
            "pass --trust-remote-code only if you trust it", where=path)
    if not native and not trust_remote_code:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is unknown to transformers {transformers.__version__}", where=path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code and not native)
    except (ValueError, KeyError, TypeError, OSError, StrictDataclassError) as e:  # strict: e.g. heads vs width
        raise MissingConfig(f"transformers cannot read it ({first_line(e)})", where=config_file) from e


def _no_constant(name: str):
    raise ValueError(f"holds {name}, which is not a number a config can use")


def check_sizes(raw: dict, config_file: Path) -> None:
    """Raise MissingConfig unless every size is a positive whole number within SIZE_LIMITS and every number is finite.

    Run on the raw config.json (and any nested text_config) before transformers or torch see it, so
    a string, a null, a negative or an absurd size is one clear line, and nothing is allocated for it.
    """
    for key, value in raw.items():
        if isinstance(value, dict):
            check_sizes(value, config_file)
        elif isinstance(value, float) and not math.isfinite(value):
            raise MissingConfig(f"{key} is {value}, not a finite number", where=config_file)
        elif key in SIZE_LIMITS and not (value is None and key in NULLABLE_SIZES):
            if not isinstance(value, int) or isinstance(value, bool):
                raise MissingConfig(f"{key} is {value!r}, not a whole number", where=config_file)
            if value <= 0:
                raise MissingConfig(f"{key} is {value}, not a positive whole number", where=config_file)
            if value > SIZE_LIMITS[key]:
                raise MissingConfig(f"{key} is {value}, beyond any model (at most {SIZE_LIMITS[key]})", where=config_file)


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|blk)\.(\d+)\.")


def check_layer_count(config, tensors, path: Path) -> None:
    """Raise CorruptCheckpoint when the config claims more decoder layers than the weights hold.

    Counted from the tensor names (`layers.N.`, `h.N.`, `blocks.N.`, GGUF's `blk.N.`) before the model
    is built: a config of 1e9 layers would otherwise build for minutes and gigabytes.
    """
    claimed = config.get_text_config().num_hidden_layers
    held = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
    if held and claimed > len(held):
        raise CorruptCheckpoint(f"config.json says {claimed} decoder layers; the weights hold {len(held)}", where=path)
