"""Read a GGUF checkpoint (llama.cpp's format) one tensor at a time, for the streaming loader.

A GGUF file holds the config, the tokenizer and the weights, and no code or pickle. Its header is
read by byte ranges, of a local file or of a Hub file, and parsed once (scanner.gguf_header): the
tensor table, the config and the tokenizer all come from that parse. GGUF tensor names
(`blk.11.ffn_down.weight`) are matched to transformers parameters with gguf's name table and
transformers' per-architecture tensor processors, which also undo what llama.cpp changed on
conversion (the q/k row permutation of Llama attention, Gemma's norm offset, GPT-2's transposes).
A tensor is read (from disk or the Hub) and dequantized (`dequantize_bytes`) only when its decoder
layer is loaded; of the embedding only the rows of the prompt's tokens are read.

GGUF lists shapes contiguous dimension first (ggml's `ne` order): a down projection that
transformers holds as (hidden, intermediate) is listed as [intermediate, hidden], so the weight
W[row, col] of a layer is at index [col, row] of its GGUF tensor.
"""

import logging
import math
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGML_QUANT_SIZES, get_tensor_name_map
from gguf.quants import dequantize, quant_shape_to_byte_shape
from torch import nn
from transformers.integrations.gguf.dequant import GGML_BLOCK as TORCH_DEQUANT_BLOCKS
from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from .checkpoint import Checkpoint
from .errors import CorruptCheckpoint, SourceNotFound, UnsupportedArchitecture, UnsupportedQuantization
from .fetch import FileBytes, LocalFile, Transfer
from .files import GGUF_SUFFIX, gguf_only
from .gguf_header import GGUFTensorInfo, gguf_config, read_header
from .tokens import gguf_tokenizer

logger = logging.getLogger(__name__)


def find_gguf(path: Path) -> Path | None:
    """The GGUF file a source names: a .gguf file, or the one .gguf of a folder without safetensors.

    Returns:
        The file, or None when `path` is a safetensors checkpoint (or nothing GGUF).

    Raises:
        SourceNotFound: a folder holds several GGUF files and no safetensors.
    """
    if path.exists() and not path.is_dir():  # a file, or something posing as one (checked before it is read)
        return path if path.suffix == GGUF_SUFFIX else None
    names = [p.name for p in path.iterdir()] if path.is_dir() else []
    if not gguf_only(names):
        return None
    files = sorted(path / n for n in names if n.endswith(GGUF_SUFFIX))  # the folder read once
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise SourceNotFound(f"{len(files)} GGUF files ({names}); give the path of the one to scan, "
                             "or pass --file NAME", where=path)
    return files[0] if files else None


class GGUFCheckpoint(Checkpoint):
    """One GGUF file: its config, its tensor table, and reads of single tensors or rows.

    Args:
        file: the .gguf file (for a Hub file, its would-be path in the Hub cache: errors name it).
        source: its bytes when they are not read from `file` (a HubFile); its revision is then known.
        root: every file read must lie inside it (default: the file's folder).
    """

    def __init__(self, file: Path, *, source: FileBytes | None = None, root: Path | None = None,
                 transfer: Transfer | None = None):
        self.path = file
        self.folder = file.parent
        self.root = root or file.parent
        self.transfer = transfer or Transfer()
        local = source is None
        self.source = LocalFile(file, self.transfer) if local else source
        self.sources = [self.source]
        # The config and tokenizer are in the file too; a Hub file's revision is its commit, not a hash.
        self.weight_files, self.hashed_files = ([file], [file]) if local else ([], [])
        try:
            self.header = read_header(self.source)
            self.config = gguf_config(self.header)
        except BaseException:
            self.close()
            raise
        self.architecture, self.tensors = self.header.architecture, self.header.tensors
        self.dtype = _majority_quant(self.tensors)  # a name such as "Q4_1", reported as the scan's dtype
        self.processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.config.to_dict())
        self.names: dict[str, str] = {}  # GGUF name, as the processors key it -> model state-dict name
        self.key_target: dict[str, str] = {}  # GGUF tensor name -> model state-dict name, for those used

    def load_tokenizer(self):
        """The tokenizer the GGUF metadata describes, or None."""
        return gguf_tokenizer(self.header.metadata, self.architecture, where=self.path)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype layers run in unless one is asked for: dequantized weights are float32."""
        return torch.float32

    # -- planning -------------------------------------------------------------------------------

    def targets(self, model: nn.Module, meta: dict) -> dict[str, tuple[str, bool]]:
        """GGUF tensor name -> (model state-dict name, whether several tensors merge into it)."""
        self.names = self._name_map(list(meta))
        self.key_target = {}
        for key in self.tensors:
            # Processors that merge expert tensors key them without ".weight" (blk.N.ffn_up_exps).
            target = self.names.get(key) or self.names.get(key.removesuffix(".weight"))
            if target in meta:
                self.key_target[key] = target
            else:
                logger.debug("%s: GGUF tensor %s is not used by the model", self.path, key)
        counts = Counter(self.key_target.values())
        return {key: (target, counts[target] > 1) for key, target in self.key_target.items()}

    def _name_map(self, hf_names: list[str]) -> dict[str, str]:
        """GGUF name -> model state-dict name, for every name gguf's table knows.

        Looked up as transformers' `get_gguf_hf_weights_map` does, with the same processor hooks,
        in gguf's own table for the file's architecture. That function rebuilds the table once per
        submodule (6 s for SmolLM2-135M); this builds it once (10 ms).
        """
        arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == self.architecture), None)
        if arch is None:
            raise UnsupportedArchitecture(f"the gguf package has no tensor names for {self.architecture!r}", where=self.path)
        table = get_tensor_name_map(arch, self.config.get_text_config().num_hidden_layers)
        names: dict[str, str] = {}
        for hf_name in hf_names:
            name = self.processor.preprocess_name(hf_name)  # MoE: experts.N.x -> the fused experts.x
            base, suffix = name, ""
            if name.endswith((".weight", ".bias")):
                base, dot, suffix = name.rpartition(".")
                suffix = dot + suffix
            found = _lookup(table, base)
            if found is None:
                self.processor.perform_fallback_tensor_mapping(names, suffix, "", name)
            else:
                names.setdefault(found + suffix, name)
        return names

    def check(self, sources: dict[str, list[str]], meta: dict, converted: set[str]) -> None:
        """Raise unless every tensor can be dequantized and has the shape the config implies.

        Raises:
            UnsupportedQuantization: a quantization type the gguf package cannot dequantize.
            CorruptCheckpoint: a shape that disagrees with the config.
        """
        for target, keys in sources.items():
            for key in keys:
                qtype = self.tensors[key].qtype
                if not _can_dequantize(qtype):
                    raise UnsupportedQuantization(
                        f"tensor {key} is {qtype.name}, which the gguf package cannot dequantize; "
                        "use a GGUF with another quantization", where=self.path)
            expected = tuple(meta[target].shape)
            stored = [self.tensors[k].shape for k in keys]
            if target in converted:  # expert tensors merged into one: sizes must add up
                ok = sum(math.prod(s) for s in stored) == math.prod(expected)
            else:  # GPT-2's Conv1D weights are stored transposed, and the processor turns them back
                ok = stored[0] in (expected, expected[::-1])
            if not ok:
                raise CorruptCheckpoint(
                    f"tensor {keys[0]} has shape {self.tensors[keys[0]].ne} (GGUF order), "
                    f"but the config implies {list(reversed(expected))} for {target}", where=self.path)

    # -- reading --------------------------------------------------------------------------------

    def span(self, key: str) -> tuple[FileBytes, int, int]:
        info = self.tensors[key]
        return self.source, info.offset, info.n_bytes

    def load(self, model: nn.Module, raw: dict[str, memoryview], *, dtype: torch.dtype, device: torch.device) -> int:
        """Dequantize tensors, given as their stored bytes (`fetch`), and put them into the model's parameters.

        Returns:
            The bytes loaded.
        """
        state: dict[str, np.ndarray | torch.Tensor] = {}
        merged: dict[str, dict] = {"tensors": {}}  # where processors put the expert tensors they merge
        for key, data in raw.items():
            result = self.processor.process(weights=self._dequantize(key, data), name=key,
                                            tensor_key_mapping=self.names, parsed_parameters=merged)
            if result.name is not None:  # None: the processor merged it into `merged`
                state[self.key_target[result.name]] = result.weights
        state.update(merged["tensors"])
        for target, weights in state.items():
            tensor = torch.from_numpy(np.ascontiguousarray(weights)) if isinstance(weights, np.ndarray) else weights
            _assign(model, target, tensor.to(device, dtype), self.path)
        return sum(len(data) for data in raw.values())

    def read_rows(self, key: str, rows: list[int] | range) -> tuple[torch.Tensor, int]:
        """Rows of a 2D tensor (the embedding or the LM head), dequantized without reading the rest.

        No tensor processor changes these two tensors' values (GPT-2's only renames its head).

        Returns:
            The rows as float32, (len(rows), hidden), and the bytes read.
        """
        data, _ = self.read_row_bytes(key, rows)
        info = self.tensors[key]
        values = dequantize_bytes(data, info.qtype, (len(rows), *info.shape[1:]))
        return torch.from_numpy(np.array(values, dtype=np.float32)), data.nbytes

    def _dequantize(self, key: str, data: memoryview) -> np.ndarray:
        """One whole tensor from its stored bytes, dequantized to float32 in its stored (numpy) shape."""
        return dequantize_bytes(data, self.tensors[key].qtype, self.tensors[key].shape)

    def stored_index(self, keys: list[str], layout, row: int, col: int, expert: int | None) -> tuple[str, list[int]]:
        """The GGUF tensor holding W[row, col] (of `expert`) and its index there, in ne order.

        llama.cpp stores every matrix as (out, in) rows, GPT-2's Conv1D ones included, so the
        index is [col, row], and [col, row, expert] for a stacked experts tensor.
        """
        return keys[0], [col, row] if expert is None else [col, row, expert]


def _lookup(table, name: str) -> str | None:
    """gguf's name for a module path, also trying the path below each prefix.

    transformers does the same by recursing into submodules: Bloom's GGUF tensors were converted
    from BloomModel, whose names lack the `transformer.` prefix.
    """
    parts = name.split(".")
    for start in range(len(parts)):
        found = table.get_name(".".join(parts[start:]))
        if found is not None:
            return found
    return None


def dequantize_bytes(data: memoryview | bytes, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Stored bytes of a tensor of `shape` (outermost first) and type `qtype` -> its float32 values, in `shape`.

    Block types that transformers' torch kernels cover (Q4_0, Q4_1, Q8_0, the K-quants, the IQ types)
    go through them: the same values as gguf.quants.dequantize (tests/test_gguf.py) in half its time
    (3 ms against 6 ms for an 885k-weight Q4_1 matrix, one core; a SmolLM2-135M scan's median went
    from 3.2 s to 2.2 s). The rest (F32, F16, BF16, Q5_0, Q5_1, ...) go through gguf.quants.dequantize.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if int(qtype) in TORCH_DEQUANT_BLOCKS:
        blocks = torch.from_numpy(raw if raw.flags.writeable else raw.copy())
        return torch_dequantize(blocks, int(qtype)).reshape(shape).numpy()
    return dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype)


@cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """True when transformers' kernels or gguf.quants.dequantize implement `qtype` (tried on one block of zeros)."""
    if int(qtype) in TORCH_DEQUANT_BLOCKS:
        return True
    _, size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros(size, dtype=np.uint8), qtype)
    except NotImplementedError:  # also the integer types (I8..I64) and F64, which hold no weights
        return False
    return True


def _majority_quant(tensors: dict[str, GGUFTensorInfo]) -> str:
    """The quantization type holding most MLP weights (`ffn_*` matrices), e.g. "Q4_1"."""
    counts: Counter[str] = Counter()
    for name, info in tensors.items():
        if ".ffn_" in name and len(info.shape) >= 2:
            counts[info.qtype.name] += math.prod(info.shape)
    if not counts:  # no MLP tensor under the standard names: all matrices count
        counts.update({info.qtype.name: math.prod(info.shape) for info in tensors.values() if len(info.shape) >= 2})
    return counts.most_common(1)[0][0] if counts else "unknown"


def _assign(model: nn.Module, target: str, tensor: torch.Tensor, path: Path) -> None:
    """Replace the meta parameter (or buffer) `target` of `model` by `tensor`, checking its shape."""
    module_path, _, name = target.rpartition(".")
    module = model.get_submodule(module_path)
    current = module._parameters.get(name)
    if current is None:
        current = module._buffers[name]
    if tuple(current.shape) != tuple(tensor.shape):
        raise CorruptCheckpoint(
            f"the tensor for {target} has shape {list(tensor.shape)} once converted, expected {list(current.shape)}", where=path)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor
