"""Find the decoder layers and each layer's MLP output projection from a model's structure.

transformers names these differently in every family (`mlp.down_proj`, `mlp.c_proj`,
`mlp.dense_4h_to_h`, fused `mlp.experts.down_proj`), so we look for shapes, not names: the decoder
layers are the ModuleList with `num_hidden_layers` entries, and the MLP output projection is the
linear-like leaf of a layer that maps the intermediate width back to the hidden width.
"""

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UnsupportedArchitecture
from .layout import CONV1D, FUSED_EXPERTS, LINEAR, Layout


@dataclass(frozen=True)
class OutProj:
    """Where a layer's MLP output projection lives and how its weight is laid out."""

    module_path: str  # relative to the decoder layer, e.g. "mlp.down_proj"
    param_name: str  # the weight parameter of that module, e.g. "weight" or "down_proj"
    layout: Layout  # LINEAR (out, in), CONV1D (in, out, GPT-2), FUSED_EXPERTS (experts, out, in)


def find_decoder_layers(base_model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """Return (path, layers) of the one ModuleList of the base model with `num_layers` blocks."""
    found = [
        (name, module)
        for name, module in base_model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name.count(".") == 0
    ]
    if len(found) != 1:
        raise UnsupportedArchitecture(
            f"expected one list of {num_layers} decoder layers, found {len(found)}", where=type(base_model).__name__)
    return found[0]


def _linear_shape(module: nn.Module) -> tuple[int, int, Layout] | None:
    """(in_features, out_features, layout) of a linear-like leaf, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, LINEAR
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf, CONV1D
    return None


def find_out_proj(layer: nn.Module, hidden_size: int) -> OutProj:
    """Find the MLP output projection of one decoder layer.

    Args:
        layer: a decoder layer (its parameters may be on the meta device).
        hidden_size: the residual width.

    Returns:
        The OutProj. Dense MLPs: the linear-like leaf outside attention that maps a wider input
        back to `hidden_size`. Mixture of experts: a module holding 3D `gate_up_proj` and
        `down_proj` parameters of shape (experts, hidden, intermediate).
    """
    for path, module in layer.named_modules():
        down = getattr(module, "down_proj", None)
        if isinstance(down, nn.Parameter) and down.dim() == 3 and down.shape[1] == hidden_size:
            if not isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
                raise UnsupportedArchitecture("experts without a fused gate_up_proj", where=type(module).__name__)
            if _has_shared_expert(layer, path, hidden_size):
                raise UnsupportedArchitecture(
                    "experts beside a shared dense expert are not supported yet", where=type(module).__name__)
            return OutProj(path, "down_proj", FUSED_EXPERTS)
    candidates = []
    for path, module in layer.named_modules():
        shape = _linear_shape(module)
        if shape is None or _is_attention(layer, path):
            continue
        fan_in, fan_out, layout = shape
        if fan_out == hidden_size and fan_in > hidden_size:
            candidates.append(OutProj(path, "weight", layout))
    if len(candidates) != 1:
        raise UnsupportedArchitecture(
            f"expected one MLP projection from a wider input to hidden size "
            f"{hidden_size}, found {[c.module_path for c in candidates] or 'none'}", where=type(layer).__name__)
    return candidates[0]


def _is_attention(layer: nn.Module, path: str) -> bool:
    """True when any module on the path is an attention block (its class name says so)."""
    module = layer
    for part in path.split("."):
        module = getattr(module, part)
        if "attention" in type(module).__name__.lower() or "attn" in type(module).__name__.lower():
            return True
    return False


def _has_shared_expert(layer: nn.Module, experts_path: str, hidden_size: int) -> bool:
    """True when the MoE block around `experts_path` also has a dense projection back to hidden size."""
    parent_path, _, experts_name = experts_path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    return any(
        isinstance(module, nn.Linear) and module.out_features == hidden_size and module.in_features > 1
        for path, module in parent.named_modules()
        if not path.startswith(experts_name)
    )
