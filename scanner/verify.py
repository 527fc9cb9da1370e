"""Measure what each super weight does: zero its super activation's weights together, each weight
alone, all of them, and same-magnitude controls, and compare the model's next-token predictions
with the original's; then give each weight a verdict.

Everything runs in streamed passes, like the scan: each decoder layer is read just before it runs
and freed after. The evaluation text (public-domain English shipped with the scanner) and the
prompts go through the model with one copy per variant stacked along the batch. Zeroing W[r, c]
only changes output channel r of the MLP output projection, by -W[r, c] * X[:, c], so a variant's
copy is corrected in a hook on the projection; the loaded weights are never changed. The
language-model head is read a slice of the vocabulary at a time, and the softmax statistics are
accumulated online, so it is never whole in memory.

The cost stays bounded however many weights a scan finds. The first stage measures, besides the
original, each super activation (all the weights writing one residual channel, zeroed together),
all of them together, and each group's control. Only inside groups that matter and hold several
weights does a second stage measure each weight alone, with its own control: a model with 15
inert weights in 5 channels costs 12 copies, not 32. Variants go `max_copies` at a time.

The control of a super weight is the weight of the same layer (and expert) whose magnitude is
closest to it outside every super weight's row and column: a weight as large as the layer offers
that is not fed by the massive input (super weights are often the layer's largest, so the control
can be smaller; its value is reported). A group's control zeroes its weights' controls together.
"""

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .result import Detection, Verification
from .errors import CannotVerify
from .head import Head, head_stats
from .loader import LayerObserver, StreamingModel
from .progress import Progress
from .evaluation import EVAL_TEXTS, PROMPTS, STOPWORDS, Inputs, evaluation_inputs

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class VerifyConfig:
    """What the effect of zeroing is measured on."""

    texts: tuple[Path, ...] = EVAL_TEXTS
    tokens: int = 2048  # evaluation tokens, an equal share from the start of each text (each has 4,000+)
    context: int = 512  # tokens per evaluated sequence
    head_slice_rows: int = 16384  # vocabulary rows of the LM head read at once
    prompts: tuple[tuple[str, str], ...] = PROMPTS  # (prompt, expected next word)
    stopwords: tuple[str, ...] = STOPWORDS
    # Zeroing matters when it multiplies perplexity by at least this, and by this much more than
    # zeroing its control does. Measured (README "Verdicts"): SmolLM2's super weight x20.8, its
    # super activation's two weights together x51,880; its second weight alone x1.21; controls
    # 0.9999-1.0004; the spikes of a Qwen2.5-family 0.5B model x0.999-1.017 alone, x1.05 together;
    # published near-inert candidates on other Qwen2.5 models raise NLL by 0.6-3% (x1.006-1.03).
    # The paper's super weights multiply it by orders of magnitude. 2 sits 10x below the smallest
    # super weight and 1.65x above the largest weight that matters only with others.
    matters: float = 2.0
    max_copies: int = 12  # model copies per streamed pass (memory scales with copies x tokens x width)


# One copy of the model in the batch: what it zeroes, as ("weight", k) for super weight k or
# ("control", k) for its control (chosen when k's layer is first loaded).
Variant = tuple[tuple[str, int], ...]


def verify(model: StreamingModel, detection: Detection, *, tokenizer=None,
           config: VerifyConfig = VerifyConfig(), progress: Progress | None = None) -> Verification | None:
    """Measure the effect of zeroing the super weights of `detection` on `model`, and judge each.

    Each super weight of `detection` gets its `effect` (None where it was not measured alone) and
    its `verdict`; each super activation its `effect` (with its controls and whether it matters).

    Raises CannotVerify, before any layer is read, when the model's head or texts rule it out.

    Args:
        model: the streaming model the detection ran on.
        detection: the scan's result.
        tokenizer: the checkpoint's tokenizer, or None to use one hashed id per word.
        config: evaluation text and prompts, the `matters` threshold, copies per pass.
        progress: told of each streamed pass and head read (phases) and each layer or slice read (steps).

    Returns:
        None when there is no super weight; else the model-level figures and what they cost.
    """
    found = detection.super_weights
    if not found:
        return None
    start = time.perf_counter()
    head = Head(model)  # refuses an unusable head before the passes
    inputs = evaluation_inputs(model, tokenizer, config)
    coords = [(w.layer, w.expert, w.out_channel, w.in_channel) for w in found]
    groups = [a.weights for a in detection.super_activations]
    meter = _Meter(model, head, inputs, coords, config, progress=progress or Progress())

    activations, joint = _measure_groups(meter, groups, config)
    per_weight = _measure_alone(meter, groups, activations)
    group_of = {k: g for g, ks in enumerate(groups) for k in ks}
    for k, weight in enumerate(found):
        weight.effect, weight.verdict = per_weight[k], verdict(per_weight[k], activations[group_of[k]], config)
    for activation, effect in zip(detection.super_activations, activations, strict=True):
        activation.effect = effect

    logger.info("verified %d super weight(s) in %.1f s, %d passes", len(found), time.perf_counter() - start,
                meter.passes)
    base = meter.base
    return Verification(
        texts=[t.name for t in config.texts], tokens=int(inputs.text.numel()), context=int(inputs.text.shape[1]),
        tokenizer=inputs.tokenizer, prompts=[p for p, _ in config.prompts],
        expected=[tokenizer.decode([i]) for i in inputs.expected] if inputs.expected else None,
        base_ppl=base["ppl"], base_expected_prob=base["expected_prob"], base_stopword_share=base["stopword_share"],
        joint_ppl_ratio=joint["ppl_ratio"], joint_kl=joint["kl"], matters=config.matters,
        passes=meter.passes, copies=meter.copies, seconds=round(time.perf_counter() - start, 3))


def _measure_groups(meter: "_Meter", groups: list[list[int]], config: VerifyConfig) -> tuple[list[dict], dict]:
    """Stage 1: each super activation's weights zeroed together, all of them, and each group's controls.

    Returns:
        Per group its figures, with its `control` (and the controls' coordinates, `weights`) and
        whether it `matters`; and the figures of all the weights zeroed together.
    """
    together = [tuple(("weight", k) for k in ks) for ks in groups]
    controls = [tuple(("control", k) for k in ks) for ks in groups]
    everything = [tuple(("weight", k) for ks in groups for k in ks)] if len(groups) > 1 else []
    figures = meter.measure(together + everything + controls)
    activations = []
    for g, ks in enumerate(groups):
        control = {**figures[controls[g]], "weights": [meter.chosen[k] for k in ks]}
        activation = {**figures[together[g]], "control": control}
        activations.append({**activation, "matters": matters(activation, config)})
    return activations, figures[everything[0]] if everything else activations[0]


def _measure_alone(meter: "_Meter", groups: list[list[int]], activations: list[dict]) -> list[dict | None]:
    """Stage 2: each weight alone, with its own control, inside groups that matter and hold several.

    Returns:
        Per super weight its figures with its `control` (its coordinates and figures); a group of
        one weight is that weight; None for the weights of inert groups, not measured alone.
    """
    alone = [k for g, ks in enumerate(groups) if activations[g]["matters"] and len(ks) > 1 for k in ks]
    figures = meter.measure([(("weight", k),) for k in alone] + [(("control", k),) for k in alone])
    per_weight: list[dict | None] = [None] * sum(len(ks) for ks in groups)
    for g, ks in enumerate(groups):
        for k in ks:
            if len(ks) == 1:
                group = {key: value for key, value in activations[g].items() if key != "matters"}
                control = {key: value for key, value in group["control"].items() if key != "weights"}
                per_weight[k] = {**group, "control": {**meter.chosen[k], **control}}
            elif k in alone:
                per_weight[k] = {**figures[(("weight", k),)],
                                 "control": {**meter.chosen[k], **figures[(("control", k),)]}}
    return per_weight


def matters(effect: dict, config: VerifyConfig) -> bool:
    """Whether a measured zeroing matters: perplexity x`config.matters` or more, and that much over its control's."""
    ratio, control = effect["ppl_ratio"], effect["control"]["ppl_ratio"]
    return ratio >= config.matters and ratio >= config.matters * control


def verdict(alone: dict | None, group: dict | None, config: VerifyConfig) -> str:
    """A super weight's verdict from its measured effects (None: not measured).

    super: zeroing it alone matters. group: not alone, but zeroing its super activation's weights
    together does. inert: neither. unverified: nothing was measured.
    """
    if group is None:
        return "unverified"
    if alone is not None and matters(alone, config):
        return "super"
    return "group" if matters(group, config) else "inert"


class _Meter:
    """Runs variants through the streamed model, `max_copies` copies per pass, and keeps their figures."""

    def __init__(self, model: StreamingModel, head: "Head", inputs: Inputs, coords: list[tuple],
                 config: VerifyConfig, *, progress: Progress):
        self.model, self.head, self.inputs, self.coords, self.config = model, head, inputs, coords, config
        self.progress = progress
        self.chosen: list[dict | None] = [None] * len(coords)  # each super weight's control, once picked
        remapped = model.load_static(inputs.text.flatten().tolist() + inputs.prompts.flatten().tolist())[0]
        self.text_ids = remapped[: inputs.text.numel()].view_as(inputs.text)
        self.prompt_ids = remapped[inputs.text.numel():].view_as(inputs.prompts)
        self.base: dict | None = None  # the original model's perplexity and prompt figures
        self.base_hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # its final hidden states (text, prompts)
        self.passes = self.copies = 0  # streamed passes over the layers, model copies in them

    def measure(self, variants: list[Variant]) -> dict[Variant, dict]:
        """Each variant's figures relative to the original: ppl_ratio, kl, prompt_kl, expected_prob, stopword_share.

        The first pass also runs the original, the reference of every figure; its final hidden
        states are kept, so later passes need not run it again.
        """
        figures = {}
        while variants:
            take = self.config.max_copies - (self.base_hidden is None)
            chunk, variants = variants[:max(1, take)], variants[max(1, take):]
            figures.update(zip(chunk, self._run(chunk)))
        return figures

    def _run(self, variants: list[Variant]) -> list[dict]:
        """Stream the text and the prompts through one copy per variant (and the original, the first time)."""
        first = self.base_hidden is None
        copies = len(variants) + first
        stream = _VariantStream(self.model, [()] * first + variants, self.coords, self.chosen, progress=self.progress)
        text_hidden, prompt_hidden = self._stream(stream, copies)
        self.copies += len(variants) + first
        last = torch.tensor(self.inputs.prompt_last, device=prompt_hidden.device)
        prompt_hidden = prompt_hidden[:, torch.arange(len(last)), last]  # (V, P, H)
        if first:
            self.base_hidden = (text_hidden[:1].clone(), prompt_hidden[:1].clone())
        else:  # the original goes first: every figure is relative to it
            text_hidden = torch.cat([self.base_hidden[0], text_hidden])
            prompt_hidden = torch.cat([self.base_hidden[1], prompt_hidden])
        targets = self.inputs.text[:, 1:].reshape(-1).to(self.model.device)
        V = len(variants) + 1
        slices = math.ceil(self.head.vocab_size / self.config.head_slice_rows)
        text_hidden = text_hidden.reshape(V, -1, text_hidden.shape[-1])
        expected = torch.tensor(self.inputs.expected or [0] * len(last), device=self.model.device)
        with self.head:  # one read of the head for the text's positions and the prompts' last ones
            self.progress.phase("verify: LM head on the text and prompts", slices)
            both = head_stats(self.head, torch.cat([text_hidden, prompt_hidden], dim=1),
                              torch.cat([targets, expected]), self.inputs.stopwords or [],
                              slice_rows=self.config.head_slice_rows, progress=self.progress)
        n = text_hidden.shape[1]
        text, prompt = ({k: v[:, :n] for k, v in both.items()}, {k: v[:, n:] for k, v in both.items()})
        ppl = torch.exp(text["nll"].mean(dim=1))  # (V,)
        if not bool(torch.isfinite(ppl).all()):
            raise CannotVerify("the evaluation text's perplexity is not finite for some variant (NaN or overflow)")
        if first:
            self.base = {"ppl": float(ppl[0]), **_prompt_figures(prompt, 0, self.inputs)}
        return [{"ppl_ratio": float(ppl[v] / ppl[0]), "kl": float(text["kl"][v].mean()),
                 "prompt_kl": float(prompt["kl"][v].mean()), **_prompt_figures(prompt, v, self.inputs)}
                for v in range(1, V)]


    def _stream(self, stream: "_VariantStream", copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of the text (V, B, T-1, H: each position predicts the next) and the prompts
        (V, P, Tp, H).

        Two passes when the layers fit the cache (the second reads no bytes) or are read locally (the
        page cache serves the second); else one, the prompts right-padded to the text's length and
        run in the same batch (causal attention never sees the padding), so a remote model that does
        not fit is fetched once per measurement, not twice.
        """
        B, T = self.text_ids.shape
        P, Tp = self.prompt_ids.shape
        if self.model.feed.fits or not self.model.checkpoint.remote or Tp > T:
            self.progress.phase(f"verify: {copies} copies of the text", self.model.num_layers)
            text_hidden = stream.run(self.text_ids)[:, :, :-1]
            self.progress.phase(f"verify: {copies} copies of the prompts", self.model.num_layers)
            prompt_hidden = stream.run(self.prompt_ids)
            self.passes += 2
            return text_hidden, prompt_hidden
        self.progress.phase(f"verify: {copies} copies of the text and prompts", self.model.num_layers)
        padded = torch.cat([self.prompt_ids, self.prompt_ids[:, -1:].expand(P, T - Tp)], dim=1)
        hidden = stream.run(torch.cat([self.text_ids, padded]))  # (V, B + P, T, H)
        self.passes += 1
        return hidden[:, :B, :-1], hidden[:, B:, :Tp]


def _prompt_figures(stats: dict, v: int, inputs: Inputs) -> dict:
    """Mean expected-word probability and stopword share of variant `v` over the prompts (None: unknown)."""
    return {"expected_prob": float(torch.exp(-stats["nll"][v]).mean()) if inputs.expected else None,
            "stopword_share": float(stats["stop_share"][v].mean()) if inputs.stopwords else None}


# -- the streamed variants --------------------------------------------------------------------------

def pick_control(w: torch.Tensor, row: int, col: int, weights: list[tuple[int, int]],
                 taken: list[tuple[int, int]] = ()) -> tuple[int, int]:
    """The control of w[row, col] in matrix `w` (out, in): the weight closest to it in magnitude outside
    the rows and columns of every (row, col) in `weights` (the super weights), and not `taken`."""
    w = w.detach()
    gap = (w.abs().float() - abs(float(w[row, col]))).abs()
    for r, c in weights:
        gap[r, :] = math.inf
        gap[:, c] = math.inf
    for r, c in taken:
        gap[r, c] = math.inf
    return divmod(int(gap.argmin()), w.shape[1])


class _VariantStream(LayerObserver):
    """Runs inputs through the streamed model once, with one batch copy per variant.

    `chosen` holds each super weight's control, shared between streams: a control is picked when
    its super weight's layer is first loaded, and the same one serves every later stream.
    """

    def __init__(self, model: StreamingModel, variants: list[Variant], coords: list[tuple],
                 chosen: list[dict | None], *, progress: Progress):
        self.model, self.variants, self.coords, self.chosen = model, variants, coords, chosen
        self.progress = progress

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states, (V, *ids.shape, H), for ids (N, T) repeated once per variant."""
        batch = ids.repeat(len(self.variants), 1)  # variant-major: rows [v*N, (v+1)*N) are variant v
        with self.model.observe(self, progress=self.progress):
            out = self.model.base_model(input_ids=batch, use_cache=False).last_hidden_state
        return out.view(len(self.variants), *ids.shape, -1)

    def entering(self, index: int, args: tuple, kwargs: dict) -> None:
        if any(c[0] == index and self.chosen[k] is None for k, c in enumerate(self.coords)):
            self._choose_controls(index)

    def projected(self, index, module, args, kwargs, output):
        edits = self._edits(index)
        if not edits:
            return None
        if self.model.out_projs[index].layout.experts:
            self._correct_experts(index, module, args, kwargs, output, edits)
        else:
            self._correct_dense(index, module, args, output, edits)
        return output

    def _choose_controls(self, layer: int) -> None:
        """For each super weight of `layer`, the weight of closest magnitude outside all their rows and columns."""
        here = [(k, c) for k, c in enumerate(self.coords) if c[0] == layer]
        for k, (_, expert, row, col) in here:
            w = self._matrix(layer, expert)  # (out, in)
            mine = [(r, c) for _, (_, e, r, c) in here if e == expert]
            taken = [(t["out_channel"], t["in_channel"]) for t in self.chosen  # each super weight its own control
                     if t is not None and t["expert"] == expert and t["layer"] == layer]
            r, c = pick_control(w, row, col, mine, taken)
            self.chosen[k] = {"layer": layer, "expert": expert, "out_channel": r, "in_channel": c,
                              "weight": float(w[r, c])}

    def _matrix(self, layer: int, expert: int | None) -> torch.Tensor:
        """The layer's MLP output projection as (out, in), of `expert` for MoE."""
        return self.model.out_projs[layer].layout.matrix(self.model.out_proj_weight(layer), expert)

    def _edits(self, layer: int) -> dict[tuple[int, int | None, int], list[int]]:
        """(variant, expert, row) -> the columns zeroed there, for every weight zeroed in `layer`."""
        edits = {}
        for v, variant in enumerate(self.variants):
            for kind, k in variant:
                if self.coords[k][0] != layer:
                    continue
                if kind == "weight":
                    _, expert, row, col = self.coords[k]
                else:  # chosen when this layer was loaded, before its projection ran
                    control = self.chosen[k]
                    expert, row, col = control["expert"], control["out_channel"], control["in_channel"]
                edits.setdefault((v, expert, row), []).append(col)
        return edits

    def _correct_dense(self, i: int, module, args: tuple, output: torch.Tensor, edits: dict) -> None:
        """Recompute the edited output rows in float32 from the input, with the zeroed columns left out.

        Recomputing rather than subtracting W[r, c] * X[:, c]: in bfloat16 the super activation's
        rounding step (128 at 24,000) is larger than what a control or a second weight changes.
        """
        V = len(self.variants)
        x = args[0].reshape(V, -1, args[0].shape[-1])  # (V, tokens, I)
        y = output.view(V, -1, output.shape[-1])  # (V, tokens, H), a view: edits land in `output`
        bias = getattr(module, "bias", None)
        for (v, _, row), cols in edits.items():
            w = self._matrix(i, None)[row].float().clone()  # (I,)
            w[cols] = 0.0
            value = x[v].float() @ w + (float(bias[row]) if bias is not None else 0.0)
            y[v, :, row] = value.to(y.dtype)

    def _correct_experts(self, i: int, module, args: tuple, kwargs: dict, output: torch.Tensor, edits: dict) -> None:
        """Subtract each zeroed weight's routed contribution, computed in float32 from the expert's input."""
        layout = self.model.out_projs[i].layout
        routed = {p.expert: p for p in layout.projections(module, args, kwargs, output,
                                                          experts={e for _, e, _ in edits})}
        per_variant = output.shape[0] // len(self.variants)
        for (v, expert, row), cols in edits.items():
            p = routed.get(expert)
            if p is None:
                continue  # no token was routed to this expert
            mine = (p.tokens >= v * per_variant) & (p.tokens < (v + 1) * per_variant)
            removed = p.x[mine][:, cols].float() @ self._matrix(i, expert)[row, cols].float()  # (routed tokens,)
            change = p.routing[mine].float() * removed
            tokens = p.tokens[mine]
            output[tokens, row] = (output[tokens, row].float() - change).to(output.dtype)
