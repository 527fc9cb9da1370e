"""The header of a GGUF file, read once through its bytes: its metadata, tensor table and config.

A GGUF file opens with its metadata (the model's shape under llama.cpp's key names, the tokenizer's
vocabulary and merges) and a table of its tensors; their data follows, aligned. `read_header` reads
that header through a FileBytes, so a local file (pread) and a Hub file (range requests) are read
alike: a first chunk, read further while the tensor table runs past its end, then parsed by
transformers' own GGUF reader (`transformers.integrations.gguf.reader`, which unpacks a buffer with
struct). The tensor table, the config (`gguf_config`) and the tokenizer (scanner.tokens.gguf_tokenizer)
all come from that parse. No tensor data is read and nothing is written to disk.

Not gguf.GGUFReader: it memory-maps a path, so it cannot read a Hub file, and makes a numpy view of
every value (2.1 s for SmolLM2-135M's 1.8 MB header, against 0.08 s). Not AutoConfig/AutoTokenizer
with `gguf_file`: each takes a path and parses the file again, with GGUFReader for most architectures;
three parses were most of a 13 s scan of that model.
"""

import math
import struct
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from huggingface_hub.errors import StrictDataclassError
import transformers
from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING
from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config
from transformers.integrations.gguf.reader import _read_metadata, _read_tensor_table
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, GGUF_TO_TRANSFORMERS_MAPPING

from .checkpoint import check_sizes
from .errors import CorruptCheckpoint, UnsupportedArchitecture, first_line
from .fetch import HEAD_GUESS, FileBytes

MAX_HEADER = 64 << 20  # bytes; the largest vocabularies (256k tokens and their merges) take about 15 MB
GROWTH = 8  # a header cut short by what was read is read again this many times as far
STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")  # decoded; other string arrays are counted
DEFAULT_ALIGNMENT = 32  # of the tensor data, unless general.alignment says otherwise (llama.cpp's default)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where a GGUF tensor's data lies in the file and how it is stored."""

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # outermost dimension first, as numpy and torch see it (the reverse of ne)
    offset: int  # of the data, from the start of the file
    n_bytes: int

    @property
    def ne(self) -> list[int]:
        """The shape as the GGUF header lists it, contiguous dimension first."""
        return list(reversed(self.shape))


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header, parsed."""

    name: str  # the file, as errors name it
    architecture: str  # llama.cpp's name, e.g. "llama", "qwen2"
    metadata: dict  # llama.cpp key -> value; the vocabulary and merges as lists, other string arrays as counts
    tensors: dict[str, GGUFTensorInfo]

    @property
    def parameters(self) -> int:
        """The weights of every tensor, as a model's size is counted."""
        return sum(math.prod(info.shape) for info in self.tensors.values())

    @property
    def data_bytes(self) -> int:
        """The bytes of tensor data: what a scan reads of the file at most."""
        return sum(info.n_bytes for info in self.tensors.values())


def read_header(source: FileBytes) -> GGUFHeader:
    """The header of the GGUF file `source`, read from its first bytes and parsed once.

    Raises:
        CorruptCheckpoint: not a GGUF file, a header cut short or larger than MAX_HEADER, or a tensor
            whose data would run past the end of the file.
    """
    data = bytearray(source.read(0, min(source.size, HEAD_GUESS)))  # a Hub file has read these with its first request
    while (parsed := _parse(data, source.name)) is None:
        if len(data) >= min(source.size, MAX_HEADER):
            why = "ends" if len(data) >= source.size else f"is larger than {MAX_HEADER >> 20} MiB"
            raise CorruptCheckpoint(f"not a readable GGUF file (its header {why} before its tensor table does)",
                                    where=source.name)
        more = min(source.size, MAX_HEADER, len(data) * GROWTH) - len(data)
        data += source.read(len(data), more)
    metadata, entries, end = parsed
    architecture = metadata["general.architecture"]
    if not isinstance(architecture, str):
        raise CorruptCheckpoint("GGUF metadata names no general.architecture", where=source.name)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CorruptCheckpoint(f"general.alignment is {alignment!r}, not a power of two", where=source.name)
    data_start = -(-end // alignment) * alignment
    return GGUFHeader(source.name, architecture, metadata, _tensor_table(entries, data_start, source))


def _parse(data: bytearray, name: str) -> tuple[dict, list[tuple], int] | None:
    """(metadata, tensor entries, end of the tensor table), or None when `data` ends before the table does."""
    try:
        metadata, tensor_count, pos = _read_metadata(data, "the file", STRING_ARRAYS)  # "the file" words its errors
        entries, end = _read_tensor_table(data, tensor_count, pos)
    except struct.error:  # a value past the end of what was read
        return None
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":  # a string cut by the end of what was read
            return None
        raise CorruptCheckpoint(f"not a readable GGUF file ({first_line(e)})", where=name) from None
    except (ValueError, OverflowError, MemoryError) as e:  # the magic, the version, a value type
        raise CorruptCheckpoint(f"not a readable GGUF file ({first_line(e)})", where=name) from None
    return (metadata, entries, end) if end <= len(data) else None


def _tensor_table(entries: list[tuple], data_start: int, source: FileBytes) -> dict[str, GGUFTensorInfo]:
    """Name -> GGUFTensorInfo, each checked: a known type, whole blocks, data inside the file."""
    tensors = {}
    for name, shape, ggml_type, offset in entries:
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise CorruptCheckpoint(f"tensor {name} has ggml type {ggml_type}, which the gguf package does not know",
                                    where=source.name) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if name in tensors or not shape or shape[-1] % block:
            why = "is listed twice" if name in tensors else f"has shape {list(reversed(shape))}, not whole {qtype.name} blocks"
            raise CorruptCheckpoint(f"tensor {name} {why}; not a readable GGUF file", where=source.name)
        info = GGUFTensorInfo(qtype, shape, data_start + offset, math.prod(shape) // block * type_size)
        if info.offset + info.n_bytes > source.size:
            raise CorruptCheckpoint(f"tensor {name} runs past the end of the file ({source.size} bytes); "
                                    "the file is truncated", where=source.name)
        tensors[name] = info
    return tensors


def gguf_config(header: GGUFHeader):
    """The transformers config of a GGUF file, from its metadata as transformers reads it.

    Raises:
        UnsupportedArchitecture: transformers has no GGUF mapping or no model for the architecture.
        CorruptCheckpoint: the metadata lacks a value the config needs, or holds one it refuses.
    """
    try:
        raw = _config_dict(header.metadata, tuple(header.tensors))
    except KeyError as e:
        raise CorruptCheckpoint(f"GGUF metadata lacks {e}, which the config needs", where=header.name) from None
    if raw is None or raw.get("model_type") not in CONFIG_MAPPING:
        raise UnsupportedArchitecture(f"GGUF architecture {header.architecture!r} is not supported by transformers "
                                      f"{transformers.__version__}", where=header.name)
    check_sizes(raw, header.name)
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except (ValueError, KeyError, TypeError, IndexError, StrictDataclassError) as e:
        raise CorruptCheckpoint(f"transformers cannot read its GGUF metadata ({first_line(e)})", where=header.name) from e


def _config_dict(metadata: dict, tensor_names: tuple[str, ...]) -> dict | None:
    """The config dict transformers builds from this metadata (None: it has no mapping for the
    architecture): get_gguf_config where it covers the architecture, else as load_gguf_checkpoint does."""
    if metadata["general.architecture"] in GGUF_CONFIG_ARCHS:
        counted = {key: len(value) if key in STRING_ARRAYS else value for key, value in metadata.items()}
        return get_gguf_config(counted, tensor_names)  # it expects string arrays as their length
    return _legacy_config_dict(metadata, tensor_names)


# llama.cpp's architecture names that transformers knows under another (load_gguf_checkpoint's renames).
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "minimax-m2": "minimax_m2"}
_UNPORTED = ("t5", "gpt-oss", "gpt_oss")  # encoder-decoders, and a rope-scaling rebuild not reproduced here


def _legacy_config_dict(metadata: dict, tensor_names: tuple[str, ...]) -> dict | None:
    """transformers' load_gguf_checkpoint config step (5.23, 5.24), on metadata already parsed.

    That function takes a path and parses the whole file again with gguf's GGUFReader (3 s for
    SmolLM2-135M). Its steps are applied here to the values we hold, with its own tables
    (GGUF_TO_TRANSFORMERS_MAPPING, GGUF_CONFIG_DEFAULTS_MAPPING); tests/test_gguf.py checks the
    result against AutoConfig.from_pretrained(..., gguf_file=...).
    """
    architecture = metadata["general.architecture"]
    if any(name in architecture for name in _UNPORTED):
        return None
    # transformers compares a list holding general.name with "mistral": only that exact name renames.
    updated = "mistral" if "llama" in architecture and metadata.get("general.name") == "mistral" else architecture
    updated = next((new for old, new in _RENAMED.items() if old in architecture), updated)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and updated not in GGUF_SUPPORTED_ARCHITECTURES:
        return None
    config: dict = {}
    if "stablelm" in architecture:
        config["use_qkv_bias"] = any(b in n for n in tensor_names for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
        config["use_parallel_residual"] = not any("ffn_norm" in n for n in tensor_names)
    # llama.cpp writes the output projection only when it is not the embedding matrix.
    config["tie_word_embeddings"] = "output.weight" not in tensor_names or architecture in ("falcon", "bloom")
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {}).items():
        config.setdefault(key, value)
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for key, value in metadata.items():
        prefix, _, config_key = key.replace(architecture, updated).partition(".")
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        renamed = renames.get(prefix, {}).get(config_key)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    if config.get("model_type") in ("gemma3", "gemma4"):  # the file holds the text backbone alone
        config["model_type"] += "_text"
    if config.get("model_type") == "gemma4_text":
        config["eos_token_id"] = [1, 106, 50]  # <eos>, <turn|>, <|tool_response>: as transformers sets them
    if config.get("model_type") == "minimax_m2" and isinstance(config.get("scoring_func"), int):
        config["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(config["scoring_func"], "softmax")
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config
