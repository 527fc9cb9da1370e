"""Build tiny random checkpoints with planted super weights, for the tests and the benchmark.

A planted super weight at (layer, row, col) needs two things, as in real models: a large weight
W[row, col] in the MLP output projection, and a large input activation on channel `col`. The input
is made large by scaling the rows of the MLP's input projections that produce channel `col`.
A decoy is a weight larger than the planted one in a column whose input stays quiet.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from scanner.arch import find_decoder_layers, find_out_proj
from scanner.config import DEFAULT_PROMPT
from scanner.scan import prompt_ids

# Small but with enough layers that a median layer is quiet even with two planted spikes.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
ARCH_CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "phi3": {"pad_token_id": 200},  # real Phi-3 and OLMo-2 pad ids lie far beyond the prompt's rows
    "olmo": {},
    "olmo2": {"pad_token_id": 250},
    "gpt_neox": {"rotary_pct": 0.25},
    "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 8, "n_head": 4, "n_positions": 128},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": 16},
}
ARCHS = sorted(ARCH_CONFIGS)
MOE_ARCHS = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class Plant:
    """W[row, col] of `layer`'s MLP output projection (of `expert` for MoE) set to `value`."""

    layer: int
    row: int
    col: int
    value: float = 2.5
    expert: int | None = None
    boost: float = 10.0  # input rows of `col` become this times the first token's unit input; 1 = leave quiet


def build_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random model of family `arch`."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**COMMON, **ARCH_CONFIGS[arch], **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def plant(model, plants: list[Plant]) -> None:
    """Plant super weights (and decoys, with boost=1) into `model` in place, in layer order.

    For each plant the prompt is run up to the layer, and the input rows of channel `col` are aimed
    along the MLP input of the first token, so that channel is loud there, as real super
    activations are on the first token. For an expert, the router is aimed the same way so the
    first token is routed to it.
    """
    tcfg = model.config.get_text_config()
    _, layers = find_decoder_layers(model.base_model, tcfg.num_hidden_layers)
    ids = torch.tensor([prompt_ids(Path("/nonexistent"), DEFAULT_PROMPT, model.config)[0]])
    for p in sorted(plants, key=lambda p: p.layer):
        spec = find_out_proj(layers[p.layer], tcfg.hidden_size)
        mlp = layers[p.layer].get_submodule(spec.module_path.rpartition(".")[0])
        proj = layers[p.layer].get_submodule(spec.module_path)
        direction = _first_token_input(model, proj if spec.kind == "experts" else mlp, ids)
        with torch.no_grad():
            if spec.kind == "experts":
                proj.down_proj[p.expert, p.row, p.col] = p.value
                mlp.gate.weight[p.expert] = direction * 10.0  # token 0 is routed to this expert
                if p.boost != 1:
                    inter = proj.down_proj.shape[2]
                    proj.gate_up_proj[p.expert, [p.col, inter + p.col]] = direction * p.boost
                continue
            weight = proj.weight
            weight[(p.col, p.row) if spec.kind == "conv1d" else (p.row, p.col)] = p.value
            if p.boost != 1:
                _aim_inputs(mlp, proj, p.col, direction * p.boost)


def _first_token_input(model, module, ids) -> torch.Tensor:
    """Unit vector of the first token's input to `module` when the model reads `ids`."""
    seen = {}

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["h"] = hidden.reshape(-1, hidden.shape[-1])[0].detach().clone()

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["h"] / seen["h"].norm()


def _aim_inputs(mlp: nn.Module, proj: nn.Module, col: int, row: torch.Tensor) -> None:
    """Set every input-side row that feeds intermediate channel `col` to `row` (gate and up alike)."""
    inter = proj.weight.shape[0] if isinstance(proj, Conv1D) else proj.weight.shape[1]
    for module in mlp.modules():
        if module is proj:
            continue
        if isinstance(module, Conv1D) and module.nf == inter:
            module.weight[:, col] = row
        elif isinstance(module, nn.Linear) and module.out_features == 2 * inter:
            module.weight[[col, inter + col]] = row
        elif isinstance(module, nn.Linear) and module.out_features == inter:
            module.weight[col] = row


def coordinates(result: dict) -> set[tuple]:
    """(layer, expert, row, col) of each super weight a scan reported."""
    return {(w["layer"], w["expert"], w["out_channel"], w["in_channel"]) for w in result["super_weights"]}


def make_checkpoint(path: Path, arch: str, plants: list[Plant] = (), *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a seeded tiny `arch` checkpoint with `plants` to `path` via save_pretrained."""
    model = build_model(arch, seed=seed, dtype=dtype, **overrides)
    plant(model, list(plants))
    model.save_pretrained(path)
    return path
