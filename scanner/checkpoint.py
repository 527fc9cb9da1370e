"""A checkpoint on disk, whatever its format: its config, its tensors' headers, and reads of them.

A checkpoint is a safetensors folder (SafetensorsCheckpoint, here) or a GGUF file
(scanner.gguf.GGUFCheckpoint); both answer the same few calls, and both know their tokenizer and
their revision. Opening one reads only the config and the tensor headers, checked as untrusted
input: only regular files inside the checkpoint, a strict config, no pickles, no remote code
unless trusted. The weights are read later, a layer at a time, by scanner.loader.StreamingModel.
"""

import json
import logging
import math
import re
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    dot_natural_key,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .config import DIGEST_CACHE, NULLABLE_SIZES, PICKLE_SUFFIXES, SIZE_LIMITS, SUPERWEIGHT_HOME
from .errors import CorruptCheckpoint, MissingConfig, RemoteCodeRefused, UnsafeCheckpoint, UnsupportedArchitecture, first_line
from .files import inside
from .layout import Layout

logger = logging.getLogger(__name__)

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


class Checkpoint:
    """What every checkpoint answers besides its format's own calls: its tokenizer and its revision.

    A subclass sets `path` (what was opened), `folder` (hashed file names are relative to it),
    `root` (every file read must lie inside it), `config`, `tensors` (name -> header info),
    `weight_files`, `hashed_files` and `dtype`.
    """

    known_revision: str | None = None  # a Hub commit sha or an example's GGUF hash, set by open_checkpoint

    def tokenizer(self):
        """The checkpoint's own tokenizer, or None without a usable one (loaded once)."""
        from .tokens import load_tokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer(self.path, root=self.root)
        return self._tokenizer

    def revision(self, *, stop: threading.Event | None = None) -> str | None:
        """The known revision, or a local checkpoint's content hash (None once `stop` is set)."""
        if self.known_revision is not None:
            return self.known_revision
        from .hub import content_hash

        return content_hash(self.hashed_files, self.folder, cache=SUPERWEIGHT_HOME / DIGEST_CACHE, stop=stop)


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor is stored and what its header says."""

    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]


def load_config(path: Path, *, trust_remote_code: bool = False, root: Path | None = None):
    """Read config.json, refusing custom code unless trusted.

    A config with `auto_map` whose `model_type` transformers implements natively (Phi-3 repos do
    this) is read with the native implementation; any other `auto_map` needs the operator's opt-in.
    """
    config_file = path / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        raise MissingConfig(f"{path}: no config.json (is this a model checkpoint folder?)")
    inside(config_file, root or path, what="config")
    try:
        raw = json.loads(config_file.read_text(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MissingConfig(f"{config_file}: not valid JSON ({e})") from e
    except ValueError as e:  # NaN or Infinity, which JSON does not have but Python reads
        raise MissingConfig(f"{config_file}: {e}") from None
    if not isinstance(raw, dict):
        raise MissingConfig(f"{config_file}: not a JSON object")
    check_sizes(raw, config_file)
    model_type = raw.get("model_type")
    native = model_type in CONFIG_MAPPING
    if "auto_map" in raw and not native and not trust_remote_code:
        raise RemoteCodeRefused(
            f"{path}: config.json needs custom code from the repo (auto_map); "
            "pass --trust-remote-code only if you trust it"
        )
    if not native and not trust_remote_code:
        raise UnsupportedArchitecture(
            f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code and not native)
    except (ValueError, KeyError, TypeError, OSError, StrictDataclassError) as e:  # strict: e.g. heads vs width
        raise MissingConfig(f"{config_file}: transformers cannot read it ({first_line(e)})") from e


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
            raise MissingConfig(f"{config_file}: {key} is {value}, not a finite number")
        elif key in SIZE_LIMITS and not (value is None and key in NULLABLE_SIZES):
            if not isinstance(value, int) or isinstance(value, bool):
                raise MissingConfig(f"{config_file}: {key} is {value!r}, not a whole number")
            if value <= 0:
                raise MissingConfig(f"{config_file}: {key} is {value}, not a positive whole number")
            if value > SIZE_LIMITS[key]:
                raise MissingConfig(f"{config_file}: {key} is {value}, beyond any model (at most {SIZE_LIMITS[key]})")


def check_layer_count(config, tensors, path: Path) -> None:
    """Raise CorruptCheckpoint when the config claims more decoder layers than the weights hold.

    Counted from the tensor names (`layers.N.`, `h.N.`, `blocks.N.`, GGUF's `blk.N.`) before the model
    is built: a config of 1e9 layers would otherwise build for minutes and gigabytes.
    """
    claimed = config.get_text_config().num_hidden_layers
    held = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
    if held and claimed > len(held):
        raise CorruptCheckpoint(f"{path}: config.json says {claimed} decoder layers; the weights hold {len(held)}")


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|blk)\.(\d+)\.")


def find_weight_files(path: Path, *, root: Path | None = None) -> list[Path]:
    """The safetensors files that hold the model, refusing pickle-only checkpoints.

    Every file must be a regular file inside `root` (default `path`): a shard index or a link
    pointing elsewhere on the machine, or a FIFO, is refused.
    """
    root = root or path
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        inside(index, root, what="shard index")
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"{index}: not a valid shard index ({e})") from e
        missing = [n for n in names if not isinstance(n, str) or not (path / n).exists()]
        if missing:
            raise CorruptCheckpoint(f"{index}: names shard(s) that are missing: {', '.join(map(str, missing))}")
        return [inside(path / n, root, what="weight file") for n in names]
    if (path / "model.safetensors").exists() or (path / "model.safetensors").is_symlink():
        return [inside(path / "model.safetensors", root, what="weight file")]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return [inside(f, root, what="weight file") for f in files]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpoint(
            f"{path}: only pickle weights ({', '.join(pickles)}); superweight reads safetensors and GGUF "
            "only and never unpickles. Convert the checkpoint to safetensors first"
        )
    raise CorruptCheckpoint(f"{path}: no .safetensors or .gguf weights found")


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor, from the safetensors headers alone."""
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_slice(name)
                    tensors[name] = TensorInfo(file, tensor.get_dtype(), tuple(tensor.get_shape()))
        except (SafetensorError, OSError) as e:
            raise CorruptCheckpoint(f"{file}: not a readable safetensors file ({first_line(e)})") from e
    return tensors


class SafetensorsCheckpoint(Checkpoint):
    """A checkpoint folder of config.json and safetensors files.

    Args:
        path: the folder.
        trust_remote_code: allow repo code named by config.json's auto_map.
    """

    def __init__(self, path: Path, *, trust_remote_code: bool = False, root: Path | None = None):
        self.path = self.folder = path
        self.root = root or path
        self.config = load_config(path, trust_remote_code=trust_remote_code, root=root)
        self.weight_files = find_weight_files(path, root=root)
        self.hashed_files = self.weight_files + [path / "config.json"]  # what a local folder's revision hashes
        self.tensors = read_headers(self.weight_files)
        self.dtype = _majority_dtype(self.tensors, path)
        self.conversions = []  # transformers' key conversions for the model, set by targets()

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype layers run in unless one is asked for: the checkpoint's, float16 as float32 on CPU."""
        if device.type == "cpu" and self.dtype == torch.float16:
            return torch.float32  # CPU float16 kernels are slow and partly missing
        return self.dtype

    def targets(self, model: nn.Module, meta: dict) -> dict[str, tuple[str, bool]]:
        """Checkpoint key -> (model state-dict name, whether a converter builds it), via transformers' renamings."""
        self.conversions = get_model_conversion_mapping(model)
        renamings = [t for t in self.conversions if isinstance(t, WeightRenaming)]
        converters = [t for t in self.conversions if isinstance(t, WeightConverter)]
        prefix = model.base_model_prefix
        found = {}
        for key in sorted(self.tensors, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            if target not in meta:
                logger.debug("%s: checkpoint tensor %s is not used by the model", self.path, key)
                continue
            found[key] = (target, pattern is not None)
        return found

    def check(self, sources: dict[str, list[str]], meta: dict, converted: set[str]) -> None:
        """Raise CorruptCheckpoint unless every tensor is unquantized and has the shape the config implies."""
        for target, keys in sources.items():
            for key in keys:
                info = self.tensors[key]
                if info.dtype not in FLOAT_DTYPES:
                    raise CorruptCheckpoint(
                        f"{info.file}: tensor {key} has dtype {info.dtype}; only unquantized "
                        "F32/F16/BF16 checkpoints can be scanned"
                    )
            expected = tuple(meta[target].shape)
            stored = [self.tensors[k].shape for k in keys]
            if target in converted:  # merged (experts) or split (fused qkv): sizes must add up
                total = sum(math.prod(s) for s in stored)
                ok = total % math.prod(expected) == 0
            else:
                ok = stored == [expected]
            if not ok:
                raise CorruptCheckpoint(
                    f"{self.tensors[keys[0]].file}: tensor {keys[0]} has shape {list(stored[0])}, "
                    f"but the config implies {list(expected)} for {target}"
                )

    def load(self, model: nn.Module, keys: list[str], *, dtype: torch.dtype, device: torch.device) -> int:
        """Read `keys` from disk into the model, through transformers' own key conversions.

        Returns:
            The bytes read.
        """
        with ExitStack() as stack:
            handles = {}
            state = {}
            for key in keys:
                file = self.tensors[key].file
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                state[key] = handles[file].get_slice(key)
            settings = LoadStateDictConfig(weight_mapping=self.conversions, dtype=dtype, device_map={"": device})
            bars = transformers.utils.logging.is_progress_bar_enabled()
            transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, once per layer
            try:
                info, _ = convert_and_load_state_dict_in_model(model, state, settings)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CorruptCheckpoint(f"{self.path}: reading {keys[0]} failed ({first_line(e)})") from e
            finally:
                if bars:
                    transformers.utils.logging.enable_progress_bar()
        if info.mismatched_keys or info.conversion_errors:
            raise CorruptCheckpoint(
                f"{self.path}: tensors do not fit the model: {info.mismatched_keys or info.conversion_errors}"
            )
        return sum(math.prod(self.tensors[k].shape) * DTYPE_BYTES[self.tensors[k].dtype] for k in keys)

    def read_rows(self, key: str, rows: list[int] | range) -> tuple[torch.Tensor, int]:
        """Rows of a 2D tensor (the embedding or the LM head), without reading the rest.

        Returns:
            The rows in the stored dtype, (len(rows), hidden), and the bytes read.
        """
        info = self.tensors[key]
        with safe_open(info.file, framework="pt", device="cpu") as f:
            table = f.get_slice(key)
            if isinstance(rows, range) and rows.step == 1:
                weight = table[rows.start : rows.stop]
            else:
                weight = torch.cat([table[i : i + 1] for i in rows])
        return weight, weight.numel() * DTYPE_BYTES[info.dtype]

    def stored_index(self, keys: list[str], layout: Layout, row: int, col: int,
                     expert: int | None) -> tuple[str, list[int]]:
        """The checkpoint tensor holding W[row, col] (of `expert`) and its index there, as stored."""
        return layout.stored_index(keys, row, col, expert)


def open_checkpoint(path: Path, *, trust_remote_code: bool = False, root: Path | None = None,
                    revision: str | None = None) -> Checkpoint:
    """The checkpoint at `path`: a GGUF file, a folder holding one GGUF file, or a safetensors folder.

    Args:
        path: the folder or file (a resolved source's path).
        trust_remote_code: allow repo code named by config.json's auto_map.
        root: every file read must be a regular file inside it (default: the folder, or the GGUF file's).
        revision: the revision when it is known (a Hub commit sha); else it is the content hash.
    """
    from .gguf import GGUFCheckpoint, find_gguf

    path = Path(path)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        inside(gguf_file, root or gguf_file.parent, what="GGUF file")
        checkpoint = GGUFCheckpoint(gguf_file, root=root or gguf_file.parent)  # no code: nothing to trust
    else:
        checkpoint = SafetensorsCheckpoint(path, trust_remote_code=trust_remote_code, root=root)
    checkpoint.known_revision = revision
    return checkpoint


def _majority_dtype(tensors: dict[str, TensorInfo], path: Path) -> torch.dtype:
    """The float dtype that holds the most parameters (norms are sometimes kept in F32)."""
    counts: dict[str, int] = {}
    for info in tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    floats = {k: v for k, v in counts.items() if k in FLOAT_DTYPES}
    if not floats:
        raise CorruptCheckpoint(f"{path}: no float tensors (dtypes {sorted(counts)}); quantized checkpoints are not supported")
    return FLOAT_DTYPES[max(floats, key=floats.get)]


