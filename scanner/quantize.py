"""The quantization lab: what keeping the super weights (and the super activation) in high precision
buys plain round-to-nearest quantization, measured on the model itself.

Every linear layer of the decoder layers is fake-quantized as the layer streams in (weights and
activations quantized and dequantized in the compute dtype; the loaded weights, the checkpoint and
the norms, embeddings and LM head are left as they are), and perplexity on the shipped evaluation
text (the texts `--verify` uses, the same tokens) is compared with the unquantized model's. Variants
run as copies stacked along the batch, as many per streamed pass as a quarter of memory holds (each pass
reads every layer once; `copies_per_pass`); each layer's quantized weights exist only while it runs.

Weights: asymmetric min-max round-to-nearest with 2^bits - 1 levels, over 1-D runs of `block_size`
elements of the flattened (out, in) matrix (the paper's blocks: 128^2 ... 1024^2, or the whole
tensor), or over per-row groups of `group_size` inputs. Variants:
- `rtn`: plain;
- `rtn+keep`: the super weights restored to their full-precision values after quantization;
- `rtn+keep+clip`: per block, weights with |w| > mean(|w|) + z std(|w|) clipped to that bound before
  quantizing (outliers then do not stretch the scale), the super weights restored; one row per z;
- `rtn+keep-control`, `rtn+keep+clip-control`: the same, restoring instead each super weight's
  control (the weight of its matrix closest in magnitude outside every super weight's row and
  column, as verification picks it): does keeping *a* large weight do as much?
Activations (W8A8: weights 8-bit per row, the input of every linear layer 8-bit per tensor):
- `w8a8`: plain;
- `w8a8+keep-act`: the super activation's channels (the residual channel it writes, at every linear
  that reads the residual stream from its layer on, and the down projection's input channel that
  drives it) replaced by the tensor's median before the scale is set, and restored after, so the
  massive value neither sets the scale nor is rounded.
"""

import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .config import LabGrid
from .errors import CannotVerify, InvalidOption
from .evaluation import evaluation_inputs, min_tokens, sequence_length
from .head import Head, head_stats
from .loader import LayerObserver, StreamingModel
from .progress import Progress
from .result import Detection
from .verify import VerifyConfig, pick_control

logger = logging.getLogger(__name__)

MEMORY_SHARE = 0.25  # of the machine's memory, for the copies' activations in one pass


@dataclass(frozen=True)
class QuantConfig:
    """What the lab measures (see the module docstring); the grid's defaults are LabGrid's."""

    bits: tuple[int, ...] = LabGrid.bits
    block_sizes: tuple[int | None, ...] = LabGrid.block_sizes
    group_sizes: tuple[int, ...] = LabGrid.group_sizes
    z: tuple[float, ...] = LabGrid.z
    activations: bool = True  # the W8A8 variants
    controls: bool = True
    evaluation: VerifyConfig = field(default_factory=VerifyConfig)  # texts, tokens, context, head slices
    max_copies: int | None = None  # copies per streamed pass; None: as many as MEMORY_SHARE of memory holds


@dataclass(frozen=True)
class Variant:
    """One fake-quantized copy of the model."""

    variant: str
    bits: int
    block_size: int | None = None  # 1-D runs of the flattened matrix; None with group_size None: the whole tensor
    group_size: int | None = None  # per-row groups of this many inputs
    z: float | None = None
    act_bits: int | None = None  # activations quantized per tensor (W8A8)
    per_row: bool = False  # weights per output row (W8A8), block_size and group_size None

    @property
    def keep(self) -> str | None:
        """What is restored after quantization: the super weights, their controls, or nothing."""
        if self.variant.endswith("-control"):
            return "control"
        return "weights" if "+keep" in self.variant and "keep-act" not in self.variant else None


def variants(config: QuantConfig) -> list[Variant]:
    """Every variant the config asks for, weights first (by bits, then block, then group), then W8A8."""
    shapes = [(b, None) for b in config.block_sizes] + [(None, g) for g in config.group_sizes]
    found = []
    for bits in config.bits:
        for block, group in shapes:
            found += [Variant("rtn", bits, block, group), Variant("rtn+keep", bits, block, group)]
            found += [Variant("rtn+keep+clip", bits, block, group, z) for z in config.z]
            if config.controls:
                found.append(Variant("rtn+keep-control", bits, block, group))
                found += [Variant("rtn+keep+clip-control", bits, block, group, z) for z in config.z]
    if config.activations:
        found += [Variant("w8a8", 8, act_bits=8, per_row=True), Variant("w8a8+keep-act", 8, act_bits=8, per_row=True)]
    return list(dict.fromkeys(found))


def fake_quantize(w: torch.Tensor, bits: int, *, block_size: int | None = None, group_size: int | None = None,
                  z: float | None = None) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest of matrix `w` (out, in), quantized and dequantized, in float32.

    Blocks are 1-D runs of `block_size` elements of the flattened matrix (the last one shorter),
    groups are `group_size` consecutive inputs of a row (the last one shorter), neither: the whole
    tensor. A block larger than the matrix is the matrix, a group wider than a row is the row (the
    padding would be NaN that is no weight, and a block of 10^12 would allocate terabytes). With `z`,
    each block's weights beyond mean(|w|) + z std(|w|) are first clipped to it.
    """
    x = w.detach().float()
    if group_size is not None:
        runs = x.reshape(x.shape[0], -1)
        n = min(group_size, runs.shape[1])
    else:
        runs = x.reshape(1, -1)
        n = min(block_size or x.numel(), x.numel())
    pad = (-runs.shape[1]) % n
    padded = F.pad(runs, (0, pad), value=math.nan).reshape(runs.shape[0], -1, n)  # NaN: not a weight
    real = ~torch.isnan(padded)
    if z is not None:
        a = padded.abs()
        count = real.sum(-1, keepdim=True).clamp_min(1)
        mean = torch.nansum(a, -1, keepdim=True) / count
        std = torch.sqrt(torch.nansum((a - mean) ** 2, -1, keepdim=True) / count)
        bound = mean + z * std
        padded = torch.where(real, torch.maximum(torch.minimum(padded, bound), -bound), padded)
    lo = torch.where(real, padded, math.inf).amin(-1, keepdim=True)
    hi = torch.where(real, padded, -math.inf).amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(padded / scale) + zero, 0, levels)
    out = ((q - zero) * scale).reshape(runs.shape[0], -1)[:, : runs.shape[1]]
    return out.reshape(w.shape)


def quantize_activation(x: torch.Tensor, bits: int, keep: list[int]) -> torch.Tensor:
    """x quantized per tensor (asymmetric min-max); the channels `keep` set to the median first and restored after."""
    flat = x.float()
    saved = flat[..., keep].clone() if keep else None
    if keep:
        flat = flat.clone()
        flat[..., keep] = flat.median()
    lo, hi = flat.amin(), flat.amax()
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale)
    out = (torch.clamp(torch.round(flat / scale) + zero, 0, levels) - zero) * scale
    if keep:
        out[..., keep] = saved
    return out.to(x.dtype)


# -- the streamed copies ----------------------------------------------------------------------------

class _QuantStream(LayerObserver):
    """Runs the text through one batch copy per variant, every linear layer of a loaded decoder layer
    computing each copy with that copy's fake-quantized weight (and input)."""

    def __init__(self, model: StreamingModel, chunk: list[Variant | None], plan: "_Plan",
                 progress: Progress | None = None):
        self.model, self.chunk, self.plan, self.progress = model, chunk, plan, progress
        self.patched: list[nn.Module] = []

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        batch = ids.repeat(len(self.chunk), 1)  # variant-major
        try:
            with self.model.observe(self, progress=self.progress):
                out = self.model.base_model(input_ids=batch, use_cache=False).last_hidden_state
        finally:
            self._restore()  # a pass that failed midway leaves no module computing copies
        return out.view(len(self.chunk), *ids.shape, -1)

    def entering(self, index: int, args: tuple, kwargs: dict) -> None:
        for name, module in self.model.layers[index].named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                module.forward = self._forward(index, name, module)
                self.patched.append(module)

    def leaving(self, index: int, output) -> None:
        self._restore()

    def _restore(self) -> None:
        for module in self.patched:
            del module.forward  # the class's own again
        self.patched.clear()

    def _forward(self, layer: int, name: str, module: nn.Module):
        conv1d = not isinstance(module, nn.Linear)  # GPT-2's Conv1D: weight (in, out), y = x W + b

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = module.weight.t() if conv1d else module.weight  # (out, in)
            outs = []
            for v, part in zip(self.chunk, x.chunk(len(self.chunk)), strict=True):
                weight = w if v is None else self.plan.weight(layer, name, w, v).to(w.dtype)
                if v is not None and v.act_bits:
                    part = quantize_activation(part, v.act_bits, self.plan.kept_channels(layer, name, v, w.shape[1]))
                outs.append(F.linear(part, weight, module.bias))
            return torch.cat(outs)

        return forward


class _Plan:
    """What each variant keeps: the super weights and their controls (by layer, module and position in
    the (out, in) matrix), and the super activation's channels."""

    def __init__(self, model: StreamingModel, detection: Detection):
        self.model = model
        self.out_name = {i: model.out_projs[i].module_path for i in range(model.num_layers)}
        self.weights: dict[int, list[tuple[int, int]]] = {}
        for w in detection.super_weights:
            self.weights.setdefault(w.layer, []).append((w.out_channel, w.in_channel))
        self.controls: dict[int, list[tuple[int, int]]] = {}
        self.first = min(self.weights, default=model.num_layers)
        self.channels = sorted({w.out_channel for w in detection.super_weights})  # residual channels
        self.inputs = {layer: sorted({c for _, c in cs}) for layer, cs in self.weights.items()}

    def weight(self, layer: int, name: str, w: torch.Tensor, v: Variant) -> torch.Tensor:
        """Variant v's fake-quantized (out, in) weight of module `name` of `layer`, in float32."""
        w = w.detach()
        if v.per_row:
            q = fake_quantize(w, v.bits, group_size=w.shape[1])
        else:
            q = fake_quantize(w, v.bits, block_size=v.block_size, group_size=v.group_size, z=v.z)
        if v.keep is not None and name == self.out_name[layer] and layer in self.weights:
            for r, c in (self.weights if v.keep == "weights" else self._controls(layer, w))[layer]:
                q[r, c] = w[r, c].float()
        return q

    def _controls(self, layer: int, w: torch.Tensor) -> dict[int, list[tuple[int, int]]]:
        if layer not in self.controls:
            chosen = []
            for r, c in self.weights[layer]:
                chosen.append(pick_control(w, r, c, self.weights[layer], chosen))
            self.controls[layer] = chosen
        return self.controls

    def kept_channels(self, layer: int, name: str, v: Variant, width: int) -> list[int]:
        """The input channels of module `name` of `layer` that variant v keeps out of activation quantization."""
        if v.variant != "w8a8+keep-act" or layer < self.first:
            return []
        if name == self.out_name[layer]:
            return self.inputs.get(layer, [])
        return self.channels if width == self.model.hidden_size else []


# -- the measurement --------------------------------------------------------------------------------

def check_lab(model: StreamingModel, config: QuantConfig) -> None:
    """Raise before any work when the lab cannot run on `model` as `config` asks.

    Raises:
        CannotVerify: the model's experts are fused parameters (no linear layers to quantize).
        InvalidOption: fewer evaluation tokens than one of the model's sequences from each text.
    """
    if any(spec.layout.experts for spec in model.out_projs):
        raise CannotVerify("quantize: this model's MoE experts are fused parameters, not linear layers; "
                           "fake quantization covers dense MLPs only")
    evaluation = config.evaluation
    needed = min_tokens(model.config, evaluation)
    if evaluation.tokens < needed:
        raise InvalidOption(f"--tokens {evaluation.tokens}: the evaluation needs at least {needed} tokens on this "
                            f"model ({len(evaluation.texts)} texts, sequences of "
                            f"{sequence_length(model.config, evaluation)} tokens)")


def quantize_lab(model: StreamingModel, detection: Detection, *, tokenizer=None, config: QuantConfig = QuantConfig(),
                 progress: Progress | None = None) -> dict:
    """Perplexity of every variant of `config` on the evaluation text, against the unquantized model's.

    Returns:
        {"base_ppl", "tokens", "context", "passes", "results": [{variant, bits, block_size, group_size, z,
        ppl, ppl_ratio}]}; a variant whose perplexity is not finite has ppl and ppl_ratio None.

    Raises:
        CannotVerify: the head or the texts rule out measuring, the unquantized perplexity is not finite,
            or check_lab's reasons.
    """
    check_lab(model, config)
    progress = progress or Progress()
    head = Head(model)
    inputs = evaluation_inputs(model, tokenizer, config.evaluation)
    text_ids = model.load_static(inputs.text.flatten().tolist())[0].view_as(inputs.text)
    targets = inputs.text[:, 1:].reshape(-1).to(model.device)
    plan = _Plan(model, detection)
    todo: list[Variant | None] = [None] + [v for v in variants(config) if v.keep is None or plan.weights]
    ppl: dict[Variant | None, float] = {}
    per_pass = config.max_copies or copies_per_pass(model, int(inputs.text.numel()), int(inputs.text.shape[1]))
    slices = math.ceil(head.vocab_size / config.evaluation.head_slice_rows)
    planned = math.ceil(len(todo) / per_pass)
    progress.note(f"quantize: {len(todo) - 1} variants and the unquantized model, {len(todo)} copies of "
                  f"{inputs.text.numel()} tokens, {per_pass} per pass: {planned} pass(es) over {model.num_layers} layers")
    passes, started = 0, time.monotonic()
    for start in range(0, len(todo), per_pass):
        chunk = todo[start:start + per_pass]
        progress.phase(f"quantize: {len(chunk)} copies of the text", model.num_layers)
        hidden = _QuantStream(model, chunk, plan, progress).run(text_ids)[:, :, :-1]
        passes += 1
        with head:
            progress.phase("quantize: LM head", slices)
            stats = head_stats(head, hidden.reshape(len(chunk), -1, hidden.shape[-1]), targets, [],
                               slice_rows=config.evaluation.head_slice_rows, progress=progress)
        ppl.update(zip(chunk, torch.exp(stats["nll"].mean(dim=1)).tolist(), strict=True))
        if passes == 1 and planned > 1:  # the first pass times the rest (the last may hold fewer copies)
            took = time.monotonic() - started
            progress.note(f"quantize: pass 1 of {planned} took {took:.0f} s; about "
                          f"{took * (len(todo) - len(chunk)) / len(chunk):.0f} s to go")
    base = ppl.pop(None)
    if not math.isfinite(base):
        raise CannotVerify("the unquantized model's perplexity on the evaluation text is not finite")
    results = []
    for v, value in ppl.items():
        finite = math.isfinite(value)
        results.append({"variant": v.variant, "bits": v.bits, "block_size": v.block_size, "group_size": v.group_size,
                        "z": v.z, "ppl": value if finite else None, "ppl_ratio": value / base if finite else None})
    logger.info("quantize: %d variants in %d passes", len(results), passes)
    return {"base_ppl": base, "tokens": int(inputs.text.numel()), "context": int(inputs.text.shape[1]),
            "passes": passes, "results": results}


def copies_per_pass(model: StreamingModel, tokens: int, context: int, budget: int | None = None) -> int:
    """How many copies of `tokens` tokens (in sequences of `context`) one streamed pass holds in `budget`
    bytes (default MEMORY_SHARE of the machine's memory): per copy, a layer's float32 activations (the
    residual stream in and out, the MLP's intermediate twice, the attention's q, k, v, output and
    scores) and the final hidden states."""
    if budget is None:
        budget = int(MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    text = model.config.get_text_config()
    intermediate = getattr(text, "intermediate_size", None) or 4 * model.hidden_size
    heads = getattr(text, "num_attention_heads", None) or 1
    per_copy = 4 * tokens * (2 * intermediate + 7 * model.hidden_size + heads * context)
    return max(1, min(256, budget // per_copy))


def best_clip(results: list[dict]) -> list[dict]:
    """Of each (variant, bits, block_size, group_size) swept over z, the row with the lowest perplexity;
    the other rows as they are."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["variant"], r["bits"], r["block_size"], r["group_size"])
        if key not in best or (r["ppl"] is not None and (best[key]["ppl"] is None or r["ppl"] < best[key]["ppl"])):
            best[key] = r
    return list(best.values())
