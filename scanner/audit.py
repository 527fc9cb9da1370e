"""Did a quantized GGUF file keep its model's super weights? Read only the blocks that hold them.

For each super weight the index knows for the base model, the GGUF tensor holding it is found
(llama.cpp names every MLP down projection `blk.L.ffn_down`, fused experts `ffn_down_exps`), the one
quantization block holding the element is read (a few dozen bytes, not the file) and dequantized,
and the stored value is compared with the original: its relative error, the block's scale, whether
it is still the largest weight of its block, and a verdict. Round-to-nearest keeps a block's
largest weight nearly exactly (it sets the scale); what clips a super weight is a larger weight of
the opposite sign in its block (Q4_0 maps the largest magnitude to -8, so the other sign stops at
+7), a scale search that trades the outlier for the rest (the K-quants with an importance matrix),
or a scale that overflows float16.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import CorruptCheckpoint, InvalidCoordinates, shown
from .fetch import LocalFile, Transfer
from .files import gguf_tensor_name
from .gguf import dequantize_bytes
from .gguf_header import GGUFHeader, read_header

TOLERANCE = 0.05  # a stored value within 5% of the original is kept; below it by more, clipped
# Block types whose first two bytes are the block's float16 scale `d`.
SCALE_FIRST = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
               GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0}


@dataclass
class WeightAudit:
    """One super weight as the quantized file stores it."""

    layer: int
    expert: int | None
    row: int
    col: int
    tensor: str  # the GGUF tensor
    qtype: str
    original: float  # the value in the base model (the index)
    stored: float | None  # dequantized from the file; None when not finite
    rel_error: float | None
    scale: float | None  # the block's float16 scale d (legacy block types), else None
    block_absmax: float | None  # the largest |weight| of its block, dequantized
    largest_in_block: bool
    verdict: str  # kept, clipped, changed or destroyed


def base_repo(header: GGUFHeader, *, where: object = None) -> str | None:
    """The Hub id of the model the file says it was made from (general.base_model.0.repo_url), if any.

    Raises:
        InvalidCoordinates: the URL names no Hub repo (the file's metadata is untrusted text).
    """
    url = header.metadata.get("general.base_model.0.repo_url")
    if url is None:
        return None
    parts = url.rstrip("/").split("/") if isinstance(url, str) else []
    repo_id = "/".join(parts[-2:]) if len(parts) >= 2 else ""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InvalidCoordinates(f"general.base_model.0.repo_url {shown(url)} does not name a Hub repo; "
                                 "give --base REPO", where=where) from None
    return repo_id


def audit(path: Path, rows: list[dict], *, transfer: Transfer | None = None) -> list[WeightAudit]:
    """Read, from the GGUF file at `path`, the block of each super weight in `rows` (the index's rows:
    layer, expert, out_channel, in_channel, weight, tensor) and judge it; what was read is counted
    in `transfer`."""
    source = LocalFile(path, transfer or Transfer())
    try:
        return read_blocks(source, read_header(source), rows)
    finally:
        source.close()


def read_blocks(source: LocalFile, header: GGUFHeader, rows: list[dict]) -> list[WeightAudit]:
    """audit() for a file already open, its header already read."""
    return [_audit_one(source, header, row) for row in rows]


def _audit_one(source: LocalFile, header: GGUFHeader, row: dict) -> WeightAudit:
    layer, expert, r, c = row["layer"], row.get("expert"), row["out_channel"], row["in_channel"]
    coordinates = (layer, r, c) if expert is None else (layer, expert, r, c)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in coordinates):
        raise InvalidCoordinates(f"the index gives a super weight at layer {layer}, expert {expert}, [{r}, {c}]: "
                                 "coordinates are non-negative integers", where=source.name)
    name = gguf_tensor_name(layer, expert, row.get("tensor"))
    info = header.tensors.get(name)
    if info is None:
        raise CorruptCheckpoint(f"has no tensor {name}, where the super weight of layer {layer} lies; "
                                "is it a quantization of this model?", where=source.name)
    shape = info.shape  # (n_embd, n_ff), or (n_expert, n_embd, n_ff)
    if r >= shape[-2] or c >= shape[-1] or (expert is not None and (len(shape) < 3 or expert >= shape[0])):
        raise CorruptCheckpoint(f"tensor {name} has shape {list(shape)}; the super weight at "
                                f"[{r}, {c}]{'' if expert is None else f' of expert {expert}'} does not fit it",
                                where=source.name)
    flat = ((expert or 0) * shape[-2] + r) * shape[-1] + c
    block_size, type_size = GGML_QUANT_SIZES[info.qtype]
    raw = source.read(info.offset + flat // block_size * type_size, type_size)
    values = dequantize_bytes(raw, info.qtype, (block_size,)).astype(np.float64).reshape(-1)
    stored = float(values[flat % block_size])
    scale = float(np.frombuffer(raw[:2], dtype=np.float16)[0]) if info.qtype in SCALE_FIRST else None
    original = float(row["weight"])
    finite = bool(np.isfinite(values).all())
    absmax = float(np.abs(values).max()) if finite else None
    largest = finite and abs(stored) >= absmax
    rel = abs(stored - original) / abs(original) if finite and original else None
    return WeightAudit(layer, expert, r, c, name, info.qtype.name, original, stored if math.isfinite(stored) else None,
                       rel, scale if scale is None or math.isfinite(scale) else None, absmax, largest,
                       _verdict(original, stored, rel, finite))


def _verdict(original: float, stored: float, rel: float | None, finite: bool) -> str:
    if not finite or stored == 0.0:
        return "destroyed"
    if rel is not None and rel <= TOLERANCE:
        return "kept"
    if abs(stored) < abs(original) * (1 - TOLERANCE) and math.copysign(1, stored) == math.copysign(1, original):
        return "clipped"
    return "changed"


def overall(weights: list[WeightAudit]) -> str:
    """intact: every super weight kept; damaged: any clipped, changed or destroyed; empty: none to check."""
    if not weights:
        return "empty"
    return "intact" if all(w.verdict == "kept" for w in weights) else "damaged"


def as_json(path: Path, base: str, weights: list[WeightAudit], *, scanned: dict | None = None) -> dict:
    return {"file": str(path), "base": base, "verdict": overall(weights), "tolerance": TOLERANCE,
            "super_weights": [asdict(w) for w in weights], **({"super_activations": scanned} if scanned else {})}
