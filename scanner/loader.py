"""Open a checkpoint and stream it into a model skeleton one decoder layer at a time.

The model is built on the meta device (no memory), every tensor's shape and dtype is checked
against it from the file headers before anything is read, and then each decoder layer is filled
just before it runs and emptied right after. Only the embedding rows of the prompt's tokens are
read; the language-model head only when verifying (scanner.verify), a slice of rows at a time. A checkpoint is a safetensors folder (SafetensorsCheckpoint,
here) or a GGUF file (scanner.gguf.GGUFCheckpoint); both answer the same few calls.
"""

import ctypes
import ctypes.util
import json
import logging
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
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

from .arch import OutProj, find_decoder_layers, find_out_proj
from .config import NULLABLE_SIZES, PICKLE_SUFFIXES, SIZE_LIMITS
from .files import inside
from .gguf import GGUFCheckpoint, find_gguf
from .errors import (
    CannotVerify,
    CorruptCheckpoint,
    MissingConfig,
    RemoteCodeRefused,
    ScanError,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
    first_line,
)

logger = logging.getLogger(__name__)

MIN_LAYERS = 3  # with fewer, the median layer is itself one of the spikes
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


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


class SafetensorsCheckpoint:
    """A checkpoint folder of config.json and safetensors files.

    Args:
        path: the folder.
        trust_remote_code: allow repo code named by config.json's auto_map.
    """

    def __init__(self, path: Path, *, trust_remote_code: bool = False, root: Path | None = None):
        self.path = self.folder = path
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

    def stored_index(self, keys: list[str], kind: str, row: int, col: int, expert: int | None) -> tuple[str, list[int]]:
        """The checkpoint tensor holding W[row, col] (of `expert`) and its index there, as stored."""
        if kind == "experts":
            if len(keys) == 1:  # stored fused, as transformers keeps it in memory
                return keys[0], [expert, row, col]
            return keys[expert], [row, col]  # one tensor per expert, merged in expert order
        if kind == "conv1d":
            return keys[0], [col, row]  # GPT-2 Conv1D stores (in, out)
        return keys[0], [row, col]


def open_checkpoint(path: Path, *, trust_remote_code: bool = False,
                    root: Path | None = None) -> SafetensorsCheckpoint | GGUFCheckpoint:
    """The checkpoint at `path`: a GGUF file, a folder holding one GGUF file, or a safetensors folder.

    Every file it reads must be a regular file inside `root` (default: the folder, or the GGUF file's).
    """
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        inside(gguf_file, root or gguf_file.parent, what="GGUF file")
        return GGUFCheckpoint(gguf_file)  # holds no code: trust_remote_code does not apply
    return SafetensorsCheckpoint(path, trust_remote_code=trust_remote_code, root=root)


class StreamingModel:
    """A model skeleton on the meta device whose weights are read from disk only when needed.

    Args:
        path: the checkpoint folder, or a GGUF file.
        root: every file read must lie inside it (default: the folder, or the GGUF file's folder).
        device: where layers run.
        dtype: the compute dtype; None keeps the checkpoint's (float16 runs as float32 on CPU;
            GGUF is dequantized to float32).
        trust_remote_code: allow repo code named by config.json's auto_map.
    """

    def __init__(self, path: Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, root: Path | None = None):
        self.path = path = Path(path)
        self.device = torch.device(device)
        self.checkpoint = open_checkpoint(path, trust_remote_code=trust_remote_code, root=root)
        self.config = self.checkpoint.config
        self.folder = self.checkpoint.folder  # hashed file names are relative to it
        self.weight_files = self.checkpoint.weight_files
        self.hashed_files = self.checkpoint.hashed_files  # config and weights: a local checkpoint's revision
        self.tensors = self.checkpoint.tensors  # shapes outermost dimension first, GGUF too
        self.checkpoint_dtype: torch.dtype | str = self.checkpoint.dtype  # GGUF: a quantization type, e.g. "Q4_1"
        self.dtype = dtype or self.checkpoint.compute_dtype(self.device)
        check_layer_count(self.config, self.tensors, path)
        try:
            with init_empty_weights(include_buffers=False):
                self.model = AutoModelForCausalLM.from_config(
                    self.config, dtype=self.dtype, trust_remote_code=trust_remote_code
                )
        except ValueError as e:
            raise UnsupportedArchitecture(f"{path}: no causal-LM class for this config ({first_line(e)})") from e
        self.model.eval()
        _move_buffers(self.model, self.device)
        tcfg = self.config.get_text_config()  # multimodal configs nest the decoder's
        self.hidden_size = tcfg.hidden_size
        self.num_layers = tcfg.num_hidden_layers
        if self.num_layers < MIN_LAYERS:
            raise UnsupportedArchitecture(
                f"{path}: {self.num_layers} decoder layer(s); a spike is measured against the median "
                f"layer, which needs at least {MIN_LAYERS}"
            )
        self.base_model = self.model.base_model
        _, self.layers = find_decoder_layers(self.base_model, self.num_layers)
        self.layers_prefix = _module_path(self.model, self.layers)
        # Per layer: some models mix dense and expert MLPs (Qwen3-MoE mlp_only_layers, DeepSeek).
        self.out_projs: list[OutProj] = [find_out_proj(layer, self.hidden_size) for layer in self.layers]
        self._plan_keys()
        self.edits: dict[int, list[tuple[tuple[int, ...], float]]] = {}  # layer -> [(index, value)]
        self.bytes_read = 0  # tensor bytes read from the checkpoint, replays included

    # -- planning -------------------------------------------------------------------------------

    def _plan_keys(self) -> None:
        """Assign every checkpoint key to a layer, the input embedding, other small weights, or skip.

        Checks shapes and dtypes against the skeleton before anything is read.
        """
        meta = self.model.state_dict()
        layer_re = re.compile(rf"^{re.escape(self.layers_prefix)}\.(\d+)\.")
        embed_path = _module_path(self.model, self.model.get_input_embeddings())
        head = self.model.get_output_embeddings()
        head_path = _module_path(self.model, head) if head is not None else None

        self.layer_keys: list[list[str]] = [[] for _ in range(self.num_layers)]
        self.embed_key: str | None = None
        self.other_keys: list[str] = []
        self.key_target: dict[str, str] = {}
        head_key = self.head_bias_key = None
        sources: dict[str, list[str]] = {}
        converted: set[str] = set()  # targets built by a converter (e.g. experts merged into one tensor)
        targets = self.checkpoint.targets(self.model, meta)
        for key in sorted(targets, key=dot_natural_key):
            target, merged = targets[key]
            if head_path and target.startswith(head_path + ".") and target != f"{embed_path}.weight":
                if target == f"{head_path}.weight":
                    head_key = key
                elif target == f"{head_path}.bias":
                    self.head_bias_key = key  # Phi-2, GPT-J, CodeGen: their logits need it
                continue  # the LM head is never needed to find super weights
            self.key_target[key] = target
            sources.setdefault(target, []).append(key)
            if merged:
                converted.add(target)
            match = layer_re.match(target)
            if match:
                self.layer_keys[int(match.group(1))].append(key)
            elif target == f"{embed_path}.weight":
                self.embed_key = key
            else:
                self.other_keys.append(key)
        tied = self.config.get_text_config().tie_word_embeddings
        if self.embed_key is None and head_key is not None and tied:
            self.embed_key = head_key  # tied weights stored under the head's name: the same matrix
            sources[f"{embed_path}.weight"] = [head_key]
        self.head_key = self.embed_key if tied else head_key  # read only to verify (scanner.verify)
        self._check_against_skeleton(meta, sources, converted, head_path, embed_path)

    def _check_against_skeleton(self, meta, sources, converted, head_path, embed_path) -> None:
        """Raise CorruptCheckpoint unless every needed weight is present with the right shape and dtype.

        Needed: every parameter of the model but the LM head (tied weights count once).
        """
        needed = [name for name, _ in self.model.named_parameters()
                  if not (head_path and name.startswith(head_path + ".")) or name == f"{embed_path}.weight"]
        missing = [name for name in needed if name not in sources]
        if missing:
            raise CorruptCheckpoint(
                f"{self.path}: checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[0]}"
            )
        self.checkpoint.check(sources, meta, converted)  # dtypes (or quantization types) and shapes

    # -- loading --------------------------------------------------------------------------------

    def _load(self, keys: list[str]) -> None:
        """Read `keys` from disk into the skeleton."""
        self.bytes_read += self.checkpoint.load(self.model, keys, dtype=self.dtype, device=self.device)

    def load_static(self, token_ids: list[int]) -> torch.Tensor:
        """Load the small non-layer weights and the embedding rows of `token_ids`.

        Returns:
            The ids re-numbered into the reduced embedding table, shape (1, T).
        """
        if self.other_keys:
            self._load(self.other_keys)
        vocab = self.tensors[self.embed_key].shape[0]
        bad = [i for i in token_ids if not 0 <= i < vocab]
        if bad:
            raise CorruptCheckpoint(f"{self.path}: token ids {bad} fall outside the embedding ({vocab} rows)")
        rows = sorted(set(token_ids))
        weight, size = self.checkpoint.read_rows(self.embed_key, rows)  # (len(rows), hidden)
        self.bytes_read += size
        embed = self.model.get_input_embeddings()
        embed.weight = nn.Parameter(weight.to(self.device, self.dtype), requires_grad=False)
        if getattr(embed, "padding_idx", None) is not None:
            embed.padding_idx = None  # it indexes the full table (and only matters for gradients)
        remap = {token: i for i, token in enumerate(rows)}
        return torch.tensor([[remap[t] for t in token_ids]], device=self.device)

    @property
    def head_rows(self) -> int:
        """The vocabulary size of the language-model head."""
        return self.tensors[self.head_key].shape[0]

    def check_head(self) -> None:
        """Raise CannotVerify unless the language-model head (and its bias) can be read: present, (vocab, hidden).

        The scan itself never reads the head, so it is checked only when verifying.
        """
        if self.head_key is None:
            raise CannotVerify(f"{self.path}: checkpoint has no language-model head weight (lm_head.weight)")
        shape = self.tensors[self.head_key].shape
        if len(shape) != 2 or shape[1] != self.hidden_size:
            raise CannotVerify(f"{self.path}: LM head tensor {self.head_key} has shape {list(shape)}, "
                               f"not (vocabulary, {self.hidden_size})")
        bias = self.tensors[self.head_bias_key].shape if self.head_bias_key else (shape[0],)
        if bias != (shape[0],):
            raise CannotVerify(f"{self.path}: LM head bias {self.head_bias_key} has shape {list(bias)}, not [{shape[0]}]")
        parts = {self.head_key: shape, self.head_bias_key: (shape[0],)}
        try:  # the checkpoint's own dtype (safetensors) or quantization type (GGUF) checks
            for key, expected in parts.items():
                if key is not None:
                    self.checkpoint.check({key: [key]}, {key: torch.empty(expected, device="meta")}, set())
        except ScanError as e:
            raise CannotVerify(f"cannot read the LM head: {first_line(e)}") from e

    def read_head(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows start:stop of the language-model head's weight (vocabulary, hidden) and bias, float32 on the device.

        The head is never loaded whole; verification reads it a slice of the vocabulary at a time.
        """
        rows, size = self.checkpoint.read_rows(self.head_key, range(start, stop))
        self.bytes_read += size
        bias = None
        if self.head_bias_key is not None:
            bias, size = self.checkpoint.read_rows(self.head_bias_key, range(start, stop))
            self.bytes_read += size
            bias = bias.reshape(-1).to(self.device, torch.float32)
        return rows.to(self.device, torch.float32), bias

    def load_layer(self, index: int) -> None:
        """Fill decoder layer `index` from disk and apply any pending edits to its out projection."""
        self._load(self.layer_keys[index])
        weight = self.out_proj_weight(index)
        with torch.no_grad():
            for position, value in self.edits.get(index, []):
                weight[position] = value

    def free_layer(self, index: int) -> None:
        """Return decoder layer `index`'s parameters to the meta device, releasing their memory."""
        for module in self.layers[index].modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type != "meta":
                    module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), False)
        _release_freed_memory()

    # -- the MLP output projection --------------------------------------------------------------

    def out_proj_module(self, index: int) -> nn.Module:
        return self.layers[index].get_submodule(self.out_projs[index].module_path)

    def out_proj_weight(self, index: int) -> torch.Tensor:
        return getattr(self.out_proj_module(index), self.out_projs[index].param_name)

    def out_proj_name(self, index: int) -> str:
        """The model parameter name of layer `index`'s out projection weight."""
        spec = self.out_projs[index]
        return f"{self.layers_prefix}.{index}.{spec.module_path}.{spec.param_name}"

    def stored_location(self, layer: int, row: int, col: int, expert: int | None) -> tuple[str, list[int]]:
        """Checkpoint tensor name and index holding W[row, col] of a layer (and expert) as stored.

        For GGUF the index follows the GGUF header's shape, contiguous dimension first: [col, row].
        """
        target = self.out_proj_name(layer)
        keys = sorted((k for k, t in self.key_target.items() if t == target), key=dot_natural_key)
        return self.checkpoint.stored_index(keys, self.out_projs[layer].kind, row, col, expert)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it in its arenas otherwise).

    Converting each layer's tensors allocates and frees hundreds of MB; without this, glibc's
    per-thread arenas and its growing mmap threshold hold on to it and RSS climbs well past one
    layer. A no-op where malloc_trim does not exist.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _majority_dtype(tensors: dict[str, TensorInfo], path: Path) -> torch.dtype:
    """The float dtype that holds the most parameters (norms are sometimes kept in F32)."""
    counts: dict[str, int] = {}
    for info in tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    floats = {k: v for k, v in counts.items() if k in FLOAT_DTYPES}
    if not floats:
        raise CorruptCheckpoint(f"{path}: no float tensors (dtypes {sorted(counts)}); quantized checkpoints are not supported")
    return FLOAT_DTYPES[max(floats, key=floats.get)]


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers (e.g. rotary inv_freq) of a meta-parameter model to `device`."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise UnsupportedArchitecture(f"{type(target).__name__} is not part of {type(root).__name__}")
