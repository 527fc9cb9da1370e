"""Build tiny random checkpoints (safetensors or GGUF) with planted super weights, for the tests and the benchmark.

A planted super weight at (layer, row, col) needs two things, as in real models: a large weight
W[row, col] in the MLP output projection, and a large input activation on channel `col`. The input
is made large by scaling the rows of the MLP's input projections that produce channel `col`.
A decoy is a weight larger than the planted one in a column whose input stays quiet.
"""

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import quantize
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

from superweight.scanner.arch import find_decoder_layers, find_out_proj
from superweight.scanner.config import DEFAULT_PROMPT
from superweight.scanner.scan import prompt_ids

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
    "falcon": {"multi_query": True, "parallel_attn": True, "new_decoder_architecture": False},  # Falcon-7B's layout
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
    boost: float = 10.0  # the input of `col` on the first token becomes this times its input's norm; 1 = leave quiet
    # Read only this channel of the first token's (normalized) MLP input: a later super weight driven
    # by an earlier super activation in residual channel `reads`. None: the whole first-token input.
    reads: int | None = None
    token: int = 0  # the prompt token whose input `col` is aimed at (real super activations: the first)


def build_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random model of family `arch` (others than ARCHS take COMMON and `overrides`)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**COMMON, **ARCH_CONFIGS.get(arch, {}), **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def plant(model, plants: list[Plant]) -> None:
    """Plant super weights (and decoys, with boost=1) into `model` in place, in layer order.

    For each plant the prompt is run up to the layer, and the input rows of channel `col` are aimed
    along what is the first token's own in its MLP input (orthogonal to the other tokens' inputs),
    so that channel is loud on the first token only, as real super activations are. For an expert,
    the router is aimed the same way so the first token is routed to it. Where the MLP output is
    normalized before it joins the residual (Gemma 2, OLMo 2), that norm's gain on `row` is raised
    as trained post-norm models have it, so the super activation is massive in the residual stream too.
    """
    tcfg = model.config.get_text_config()
    _, layers = find_decoder_layers(model.base_model, tcfg.num_hidden_layers)
    ids = torch.tensor([prompt_ids(DEFAULT_PROMPT, model.config)[0]])
    amplified = set()
    for p in sorted(plants, key=lambda p: p.layer):
        if p.boost != 1 and (p.layer, p.row) not in amplified:
            _raise_post_norm_gain(layers[p.layer], p.row)
            amplified.add((p.layer, p.row))
        spec = find_out_proj(layers[p.layer], tcfg.hidden_size)
        mlp = layers[p.layer].get_submodule(spec.module_path.rpartition(".")[0])
        proj = layers[p.layer].get_submodule(spec.module_path)
        direction = _token_input(model, proj if spec.layout.experts else mlp, ids, p.token)
        if p.reads is not None:  # that one channel, with its sign, so the neuron fires on it
            one_hot = torch.zeros_like(direction)
            one_hot[p.reads] = direction[p.reads].sign()
            direction = one_hot
        with torch.no_grad():
            if spec.layout.experts:
                proj.down_proj[p.expert, p.row, p.col] = p.value
                mlp.gate.weight[p.expert] = direction * 10.0  # the token is routed to this expert
                if p.boost != 1:
                    inter = proj.down_proj.shape[2]
                    proj.gate_up_proj[p.expert, [p.col, inter + p.col]] = direction * p.boost
                continue
            weight = proj.weight
            weight[tuple(spec.layout.hf_index(p.row, p.col, None))] = p.value
            if p.boost != 1:
                _aim_inputs(mlp, proj, p.col, direction * p.boost)


def _token_input(model, module, ids, token: int = 0) -> torch.Tensor:
    """A vector v with v . x = |x| for `token`'s input x to `module` when the model reads `ids`, and
    v . x' = 0 for every other token's input x': a channel aimed along it is as loud on that token as
    aiming along x / |x| makes it, and quiet on the others.
    """
    seen = {}

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["h"] = hidden.reshape(-1, hidden.shape[-1]).detach().float().clone()  # (T, H)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    first = seen["h"][token]
    others = torch.cat([seen["h"][:token], seen["h"][token + 1:]])
    own = first
    if len(others):
        basis, _ = torch.linalg.qr(others.T)  # (H, T-1): the span of the other tokens' inputs
        own = first - basis @ (basis.T @ first)
    return (own * (first.norm() / own.norm() ** 2)).to(seen["h"].dtype)


POST_NORM_GAIN = 30.0  # trained post-norm models carry super activations through large gains


def _raise_post_norm_gain(layer: nn.Module, row: int) -> None:
    """Multiply the gain of channel `row` of the norm applied to the MLP output, if the layer has one."""
    norm = getattr(layer, "post_feedforward_layernorm", None)
    if norm is None:
        return
    with torch.no_grad():
        probe = torch.ones(1, norm.weight.shape[0], dtype=norm.weight.dtype)
        before = float(norm(probe)[0, row])  # the output is affine in the gain parameter (w or 1 + w)
        norm.weight[row] += 1.0
        slope = float(norm(probe)[0, row]) - before
        norm.weight[row] += (POST_NORM_GAIN - 1.0) * before / slope - 1.0


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
    """Write a seeded tiny `arch` checkpoint with `plants` to `path` via save_pretrained.

    The same arguments give the same bytes, so each checkpoint is built once per test session and
    copied after that (tests that change the files get a copy of their own).
    """
    key = repr((arch, tuple(plants), seed, dtype, sorted(overrides.items())))
    built = _BUILT.get(key)
    if built is None:
        model = build_model(arch, seed=seed, dtype=dtype, **overrides)
        plant(model, list(plants))
        built = _BUILT[key] = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=_CACHE))
        model.save_pretrained(built)
    shutil.copytree(built, path, dirs_exist_ok=True)
    return path


_CACHE = tempfile.mkdtemp(prefix="superweight-checkpoints-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
_BUILT: dict[str, Path] = {}


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's GGUF names (from gguf's own table), as llama.cpp stores them.

    llama.cpp reorders the rows of Llama's q and k projections for its rotary kernel, which pairs
    neighbouring channels; transformers' GGUF reader undoes that (LlamaTensorProcessor). Only for
    families llama.cpp converts with nothing more than that (llama, qwen2); others would need their
    own changes (Gemma's norms + 1, GPT-2's transposes).
    """
    config = model.config
    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == config.model_type)
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = {}
    for name, tensor in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is None:
            continue
        array = tensor.float().numpy().copy()
        if config.model_type == "llama" and gguf_name.endswith(("attn_q", "attn_k")) and suffix == "weight":
            heads = config.num_attention_heads if gguf_name.endswith("attn_q") else config.num_key_value_heads
            array = _pair_rotary_rows(array, heads)
        tensors[f"{gguf_name}.{suffix}"] = array
    return tensors


def _pair_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, put rotary rows i and i + d/2 next to each other (transformers keeps them d/2 apart)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, config, tensors: dict[str, np.ndarray | tuple[np.ndarray, GGMLQuantizationType]], *,
               qtype: GGMLQuantizationType = GGMLQuantizationType.F32, arch: str | None = None,
               strings: dict[str, str] | None = None) -> Path:
    """Write `tensors` as a GGUF file, matrices quantized to `qtype` (vectors stay F32, as llama.cpp keeps them),
    with `strings` as extra string metadata (e.g. general.base_model.0.repo_url).

    A (uint8 array, type) pair is written as is: bytes already in that type's blocks. The metadata
    holds every config value transformers reads back (its GGUF_CONFIG_MAPPING, inverted, and the BOS
    and EOS ids) and no tokenizer, so a scan reads the prompt one hashed id per word, as for a folder
    without one.
    """
    arch = arch or config.model_type
    writer = GGUFWriter(path, arch)
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING.get(config.model_type, {}).items():
        value = getattr(config, hf_key, None) if hf_key else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int):
            writer.add_uint32(f"{arch}.{gguf_key}", value)
        else:
            writer.add_float32(f"{arch}.{gguf_key}", value)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(getattr(config, key, None), int):  # read back into the config: the prompt starts with BOS
            add(getattr(config, key))
    for key, value in (strings or {}).items():
        writer.add_string(key, value)
    for name, array in tensors.items():
        if isinstance(array, tuple):
            writer.add_tensor(name, array[0], raw_dtype=array[1])
        elif array.ndim >= 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_gguf(path: Path, arch: str, plants: list[Plant] = (), *, seed: int = 0,
              qtype: GGMLQuantizationType = GGMLQuantizationType.F32, strings: dict[str, str] | None = None,
              **overrides) -> Path:
    """Write the same seeded tiny model as make_checkpoint, with `plants`, as one GGUF file at `path`."""
    model = build_model(arch, seed=seed, **overrides)
    plant(model, list(plants))
    return write_gguf(path, model.config, gguf_tensors(model), qtype=qtype, strings=strings)


def streaming(path: Path, **options):
    """A StreamingModel of the checkpoint at `path` (a folder or a GGUF file)."""
    from superweight.scanner.scan import open_checkpoint
    from superweight.scanner.loader import StreamingModel

    return StreamingModel(open_checkpoint(Path(path)), **options)
