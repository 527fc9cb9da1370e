"""A safetensors checkpoint: a folder of config.json and safetensors files (shards named by an index).

Opening one reads the config and the tensor headers alone, checked as untrusted input: only regular
files inside the folder, no pickles (scanner.files.no_weights says why), a strict config.
"""

import json
import logging
import math
from contextlib import ExitStack
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    dot_natural_key,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig

from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, load_config
from .errors import CorruptCheckpoint, first_line
from .files import inside, no_weights
from .layout import Layout

logger = logging.getLogger(__name__)


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
            raise CorruptCheckpoint(f"not a valid shard index ({e})", where=index) from e
        missing = [n for n in names if not isinstance(n, str) or not (path / n).exists()]
        if missing:
            raise CorruptCheckpoint(f"names shard(s) that are missing: {', '.join(map(str, missing))}", where=index)
        return [inside(path / n, root, what="weight file") for n in names]
    if (path / "model.safetensors").exists() or (path / "model.safetensors").is_symlink():
        return [inside(path / "model.safetensors", root, what="weight file")]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return [inside(f, root, what="weight file") for f in files]
    raise no_weights([p.name for p in path.iterdir()], path)


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
            raise CorruptCheckpoint(f"not a readable safetensors file ({first_line(e)})", where=file) from e
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
                        f"tensor {key} has dtype {info.dtype}; only unquantized "
                        "F32/F16/BF16 checkpoints can be scanned", where=info.file)
            expected = tuple(meta[target].shape)
            stored = [self.tensors[k].shape for k in keys]
            if target in converted:  # merged (experts) or split (fused qkv): sizes must add up
                total = sum(math.prod(s) for s in stored)
                ok = total % math.prod(expected) == 0
            else:
                ok = stored == [expected]
            if not ok:
                raise CorruptCheckpoint(
                    f"tensor {keys[0]} has shape {list(stored[0])}, "
                    f"but the config implies {list(expected)} for {target}", where=self.tensors[keys[0]].file)

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
                raise CorruptCheckpoint(f"reading {keys[0]} failed ({first_line(e)})", where=self.path) from e
            finally:
                if bars:
                    transformers.utils.logging.enable_progress_bar()
        if info.mismatched_keys or info.conversion_errors:
            raise CorruptCheckpoint(
                f"tensors do not fit the model: {info.mismatched_keys or info.conversion_errors}", where=self.path)
        return sum(math.prod(self.tensors[k].shape) * FLOAT_DTYPES[self.tensors[k].dtype].itemsize for k in keys)

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
        return weight, weight.numel() * FLOAT_DTYPES[info.dtype].itemsize

    def stored_index(self, keys: list[str], layout: Layout, row: int, col: int,
                     expert: int | None) -> tuple[str, list[int]]:
        """The checkpoint tensor holding W[row, col] (of `expert`) and its index there, as stored."""
        return layout.stored_index(keys, row, col, expert)


def _majority_dtype(tensors: dict[str, TensorInfo], path: Path) -> torch.dtype:
    """The float dtype that holds the most parameters (norms are sometimes kept in F32)."""
    counts: dict[str, int] = {}
    for info in tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    floats = {k: v for k, v in counts.items() if k in FLOAT_DTYPES}
    if not floats:
        raise CorruptCheckpoint(f"no float tensors (dtypes {sorted(counts)}); quantized checkpoints are not supported", where=path)
    return FLOAT_DTYPES[max(floats, key=floats.get)]


