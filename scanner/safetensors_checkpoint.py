"""A safetensors checkpoint: a folder of config.json and safetensors files (shards named by an index).

Opening one reads the config and the tensor headers alone, checked as untrusted input: only regular
files inside the folder, no pickles (scanner.files.no_weights says why), a strict config.
"""

import json
import logging
import math
from pathlib import Path

import torch
import transformers
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
from .fetch import FileBytes, LocalFile, Transfer
from .files import find_weight_files
from .layout import Layout

logger = logging.getLogger(__name__)


# Bytes per element of every safetensors dtype (F4 packs two to a byte, and is checked as such).
ITEM_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
             "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6,
             "F6_E3M2": 6, "F4": 4, "C64": 64}
MAX_HEADER = 100 << 20  # safetensors' own bound on the JSON header


def read_header(file: FileBytes) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of a safetensors file, from its header alone.

    The header is untrusted: its length, its JSON, every entry's dtype, shape and offsets are
    checked, and so is that each tensor's bytes match its shape, lie inside the file, and overlap
    no other tensor's, before any tensor is read.
    """
    if file.size < 8:
        raise CorruptCheckpoint(f"{file.size} bytes, too short for a safetensors file", where=file.name)
    length = int.from_bytes(file.read(0, 8), "little")
    if length > MAX_HEADER or 8 + length > file.size:
        raise CorruptCheckpoint(f"header length {length} does not fit the file ({file.size} bytes); "
                                "not a safetensors file", where=file.name)
    try:
        header = json.loads(bytes(file.read(8, length)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"not a readable safetensors header ({e})", where=file.name) from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint("the safetensors header is not a JSON object", where=file.name)
    tensors = {name: _entry(file, name, value, 8 + length) for name, value in header.items() if name != "__metadata__"}
    spans = sorted((info.offset, info.offset + info.n_bytes, name) for name, info in tensors.items())
    for (_, end, before), (begin, _, name) in zip(spans, spans[1:]):
        if begin < end:
            raise CorruptCheckpoint(f"tensors {before} and {name} overlap; the header lies", where=file.name)
    return tensors


def _entry(file: FileBytes, name: str, value, data_start: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of whole numbers, offsets that match it."""
    try:
        dtype, shape, (begin, end) = value["dtype"], value["shape"], value["data_offsets"]
        if dtype not in ITEM_BITS or not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end]):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpoint(f"tensor {name}: not a valid header entry ({str(value)[:80]})", where=file.name) from None
    expected = math.ceil(math.prod(shape) * ITEM_BITS[dtype] / 8)
    if end - begin != expected:
        raise CorruptCheckpoint(f"tensor {name}: offsets {begin}-{end} hold {end - begin} bytes, but a {dtype} "
                                f"tensor of shape {shape} takes {expected}; the header lies", where=file.name)
    if data_start + end > file.size:
        raise CorruptCheckpoint(f"tensor {name} runs past the end of the file ({file.size} bytes); "
                                "the file is truncated or its header lies", where=file.name)
    return TensorInfo(file, dtype, tuple(shape), data_start + begin, end - begin)


def local_sources(files: list[Path], transfer: Transfer) -> list[FileBytes]:
    """The weight files of a local folder, read with pread."""
    try:
        return [LocalFile(f, transfer) for f in files]
    except OSError as e:
        raise CorruptCheckpoint(f"cannot open a weight file ({first_line(e)})", where=files[0].parent) from e


class SafetensorsCheckpoint(Checkpoint):
    """A checkpoint folder of config.json and safetensors files.

    Args:
        path: the folder.
        trust_remote_code: allow repo code named by config.json's auto_map.
    """

    def __init__(self, path: Path, *, sources: list[FileBytes] | None = None, transfer: Transfer | None = None,
                 trust_remote_code: bool = False, root: Path | None = None):
        self.path = self.folder = path
        self.root = root or path
        self.config = load_config(path, trust_remote_code=trust_remote_code, root=root)
        self.transfer = transfer or Transfer()
        if sources is None:  # a local folder: its own safetensors files, hashed for its revision
            self.weight_files = find_weight_files(path, root=root)
            self.hashed_files = self.weight_files + [path / "config.json"]
            sources = local_sources(self.weight_files, self.transfer)
        else:  # read remotely: the revision is the commit sha
            self.weight_files, self.hashed_files = [], []
        self.sources = sources
        self.tensors = {}
        for source in sources:
            self.tensors.update(read_header(source))
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
                        "F32/F16/BF16 checkpoints can be scanned", where=info.file.name)
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
                    f"but the config implies {list(expected)} for {target}", where=self.tensors[keys[0]].file.name)

    def load(self, model: nn.Module, raw: dict[str, memoryview], *, dtype: torch.dtype,
             device: torch.device) -> int:
        """Put tensors, given as their stored bytes (`fetch`), into the model through transformers'
        own key conversions.

        Returns:
            The bytes loaded.
        """
        state = {key: self._tensor(key, data) for key, data in raw.items()}
        settings = LoadStateDictConfig(weight_mapping=self.conversions, dtype=dtype, device_map={"": device})
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, once per layer
        try:
            info, _ = convert_and_load_state_dict_in_model(model, state, settings)
        except RuntimeError as e:
            raise CorruptCheckpoint(f"loading {next(iter(raw))} failed ({first_line(e)})", where=self.path) from e
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        if info.mismatched_keys or info.conversion_errors:
            raise CorruptCheckpoint(
                f"tensors do not fit the model: {info.mismatched_keys or info.conversion_errors}", where=self.path)
        return sum(len(data) for data in raw.values())

    def _tensor(self, key: str, data: memoryview) -> torch.Tensor:
        """A tensor over its stored bytes (no copy), in its stored dtype and shape."""
        info = self.tensors[key]
        dtype = FLOAT_DTYPES[info.dtype]
        if not data.nbytes:
            return torch.empty(info.shape, dtype=dtype)
        tensor = torch.frombuffer(data, dtype=dtype)
        if tensor.data_ptr() % dtype.itemsize:  # a misaligned span: copy to aligned memory
            tensor = tensor.clone()
        return tensor.view(info.shape)

    def read_rows(self, key: str, rows: list[int] | range) -> tuple[torch.Tensor, int]:
        """Rows of a 2D tensor (the embedding or the LM head), without reading the rest.

        Returns:
            The rows in the stored dtype, (len(rows), hidden), and the bytes read.
        """
        info = self.tensors[key]
        data, _ = self.read_row_bytes(key, rows)
        weight = torch.frombuffer(data, dtype=FLOAT_DTYPES[info.dtype]).view(len(rows), *info.shape[1:])
        return weight, data.nbytes

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


