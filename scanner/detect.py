"""Detect super weights with one prompt: spike, attribute, remove, re-run for what was masked.

Each pass records, for every decoder layer's MLP output projection (down_proj), the peak |input|
and the peak |output| with their token and channel. While the layer's weights are in memory each
loud output Y[t, r] is attributed to the input channels: a column c is a candidate when its
contribution W[r, c] * X[t, c] explains a share of Y[t, r] (the largest always, others while they
explain at least `min_share`), so a large weight on a quiet input is never chosen.

Every weight that meets all criteria in the unmodified model is a super weight, wherever it is:
later layers that amplify the same residual channel are read off the same pass. All of a pass's
super weights are then zeroed at once and the layers from the earliest of them re-run, only to
find weights that were *masked* (they qualify once louder ones are gone); this repeats until a
pass finds nothing new, so the number of passes follows the masking depth, not the number of
weights. Weights are grouped into super neurons (same layer, expert and input channel) and super
activations (same residual channel).
"""

import logging
import statistics
from dataclasses import asdict, dataclass

import torch

from .config import DetectConfig
from .errors import NonFiniteActivation
from .result import Detection, LayerPeak, SuperActivation, SuperNeuron, SuperWeight
from .layout import Projection
from .loader import LayerObserver, StreamingModel
from .progress import Progress

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A loud output Y[t, r] attributed to one weight W[r, c] that contributes to it.

    Per loud output the column contributing most is always a candidate; further columns are while
    each explains at least `min_share` of Y[t, r] (two or three weights can write one row).
    """

    layer: int
    expert: int | None
    out_channel: int  # r
    token: int  # t
    output_activation: float  # Y[t, r], signed
    in_channel: int  # c = argmax_j |W[r, j] * X[t, j]|
    weight: float  # W[r, c]
    input_activation: float  # X[t, c]
    share: float  # W[r, c] * X[t, c] / Y[t, r]: how much of the output this one weight explains
    row_ratio: float  # |Y[t, r]| / median_j |Y[t, j]|: does one channel stand out, or the whole token?
    residual: float = 0.0  # the residual stream h[t, r] entering the layer, signed
    residual_ratio: float = 0.0  # |h[t, r]| / median_j |h[t, j]|: is the residual already massive there?
    delta: float = 0.0  # what the whole layer adds to h[t, r] (post-norm archs rescale Y first)


TOP_K = 8  # loud output channels kept per layer and pass
MAX_COLUMNS = 4  # columns kept per loud output: at most 4 can each explain a quarter of it (with no cancelling)


def _analyse(layer, x, y, w_row, *, min_share: float, expert=None) -> tuple[LayerPeak, list[Candidate]]:
    """Peaks and top candidates of one projection. x: (T, I), y: (T, H); w_row(r) -> (I,) row of W.

    Per loud output Y[t, r], the columns in order of their contribution towards Y[t, r]'s sign: the
    first always, the next ones while they explain at least `min_share` of it.
    """
    x, y = x.float(), y.float()
    t_in, c_in = divmod(int(x.abs().argmax()), x.shape[1])
    t_out, r_out = divmod(int(y.abs().argmax()), y.shape[1])
    peak = LayerPeak(layer, float(x[t_in, c_in].abs()), c_in, t_in, float(y[t_out, r_out].abs()), r_out, t_out, expert)
    token_median = y.abs().median(dim=1).values.clamp_min(1e-30)  # (T,)
    loudest, tokens = y.abs().max(dim=0)  # per output channel: (H,), (H,)
    candidates = []
    for r in loudest.topk(min(TOP_K, y.shape[1])).indices.tolist():
        t = int(tokens[r])
        row = w_row(r).float()
        contrib = row * x[t]  # (I,)
        out = float(y[t, r])
        towards = contrib * (1.0 if out >= 0 else -1.0)  # positive where a weight pushes Y[t, r] outward
        for rank, c in enumerate(towards.topk(min(MAX_COLUMNS, len(towards))).indices.tolist()):
            share = float(contrib[c]) / out if out else 0.0
            if rank and share < min_share:
                break
            candidates.append(Candidate(
                layer=layer, expert=expert, out_channel=r, token=t, output_activation=out, in_channel=c,
                weight=float(row[c]), input_activation=float(x[t, c]), share=share,
                row_ratio=abs(out) / float(token_median[t]),
            ))
    return peak, candidates


class Detector(LayerObserver):
    """Runs the passes over a StreamingModel and finds its super weights; observes the layers it streams.

    Args:
        model: the streaming model (weights on disk until needed).
        config: thresholds and prompt.
        progress: told of each pass (a phase) and each layer read (a step).
    """

    def __init__(self, model: StreamingModel, config: DetectConfig, *, progress: Progress | None = None):
        self.model = model
        self.progress = progress or Progress()
        self.config = config
        self.peaks: list[LayerPeak | None] = [None] * model.num_layers
        self.candidates: list[list[Candidate]] = [[] for _ in range(model.num_layers)]
        self.inputs: list[tuple | None] = [None] * model.num_layers  # (args, kwargs) each layer got
        # The residual stream of the unmodified model after each layer: per channel, the signed value
        # of largest magnitude over the tokens, and its token. (L, H) each; filled by the first pass.
        self.stream_value = torch.zeros(model.num_layers, model.hidden_size)
        self.stream_token = torch.zeros(model.num_layers, model.hidden_size, dtype=torch.long)
        self._first_pass = False
        self.cancellers: set[tuple] = set()

    # -- what each layer shows ------------------------------------------------------------------

    def entering(self, index: int, args: tuple, kwargs: dict) -> None:
        self.inputs[index] = (args, kwargs)

    def projected(self, index, module, args, kwargs, output) -> None:
        spec = self.model.out_projs[index]
        _check_finite(self.model.path, index, output=output)
        projections = spec.layout.projections(module, args, kwargs, output)
        for p in projections:
            _check_finite(self.model.path, index, input=p.x, output=p.y)
        weight = getattr(module, spec.param_name)
        self._record(index, *_analyse_layer(index, projections, lambda e: spec.layout.matrix(weight, e),
                                            min_share=self.config.min_share))

    def leaving(self, index: int, output) -> None:
        out = (output[0] if isinstance(output, tuple) else output).reshape(-1, self.model.hidden_size)  # (T, H)
        for cand in self.candidates[index]:
            cand.delta = float(out[cand.token, cand.out_channel]) - cand.residual
        if self._first_pass:
            token = out.abs().argmax(dim=0)  # (H,)
            self.stream_value[index] = out.gather(0, token[None])[0].float().cpu()
            self.stream_token[index] = token.cpu()

    def _record(self, i: int, peak: LayerPeak, candidates: list[Candidate]) -> None:
        """Keep a layer's analysis, noting the residual stream each candidate adds to."""
        residual = _hidden(*self.inputs[i]).reshape(-1, self.model.hidden_size).float()  # (T, H)
        token_median = residual.abs().median(dim=1).values.clamp_min(1e-30)
        for cand in candidates:
            cand.residual = float(residual[cand.token, cand.out_channel])
            cand.residual_ratio = abs(cand.residual) / float(token_median[cand.token])
        self.peaks[i], self.candidates[i] = peak, candidates

    # -- passes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def first_pass(self, input_ids: torch.Tensor) -> None:
        """Run the base model's own forward; the layers stream and every layer's input is recorded."""
        self._first_pass = True
        self.progress.phase("detect: pass 1", self.model.num_layers)
        try:
            with self.model.observe(self, progress=self.progress):
                self.model.base_model(input_ids=input_ids, use_cache=False)
        finally:
            self._first_pass = False

    @torch.no_grad()
    def replay(self, start: int, zeroed: list[tuple], *, name: str = "detect: replay") -> None:
        """Re-run layers start.. with the weights at `zeroed` read as 0, from the recorded input of
        `start` (earlier layers are unchanged)."""
        self.progress.phase(name, self.model.num_layers - start)
        hidden = _hidden(*self.inputs[start])
        with self.model.observe(self, progress=self.progress, first=start), self.model.zeroed(zeroed):
            for i in range(start, self.model.num_layers):
                args, kwargs = self.inputs[i]
                if args:
                    out = self.model.layers[i](hidden, *args[1:], **kwargs)
                else:
                    out = self.model.layers[i](**{**kwargs, "hidden_states": hidden})
                hidden = out[0] if isinstance(out, tuple) else out

    # -- detection ------------------------------------------------------------------------------

    def run(self, input_ids: torch.Tensor) -> Detection:
        """Find all super weights: every qualifying weight of a pass, then what their removal unmasks."""
        self.first_pass(input_ids)
        first = list(self.peaks)
        # Judged in the original model: removing an earlier super weight leaves a canceller with
        # nothing to cancel, and it would then look like a creator.
        self.cancellers = {(c.layer, c.expert, c.out_channel) for cs in self.candidates for c in cs
                           if _cancels(c, self.config.row_ratio)}
        found, rejected = [], {}
        rounds, truncated = 1, False
        picks = self._qualifying(found, rejected)
        while picks:
            found += [self._found(*pick, round=rounds) for pick in picks]
            if rounds == self.config.max_rounds:
                truncated = True  # no pass left to look for weights these removals unmask
                break
            # Weights within one pass do not interact (each is judged on the same forward), so all
            # go at once; the layers before the earliest of them are unchanged.
            self.replay(min(cand.layer for cand, _, _ in picks), [_coords(w) for w in found],
                        name=f"detect: pass {rounds + 1}")
            rounds += 1
            picks = self._qualifying(found, rejected)
        neurons, activations = self._group(found)
        return Detection(found, first, list(rejected.values()), rounds, truncated, neurons, activations)

    def _qualifying(self, found: list[SuperWeight], rejected: dict) -> list[tuple[Candidate, float, float]]:
        """Every candidate of this pass that meets every criterion and is not `found` yet, in layer order.

        A spike that fails goes into `rejected` (keyed by (layer, expert, row, col)) the first time,
        with its figures and reasons, and leaves it if a later pass finds it (it was masked).
        """
        cfg = self.config
        median_out = statistics.median(p.max_output for p in self.peaks) or 1e-30
        median_in = statistics.median(p.max_input for p in self.peaks) or 1e-30
        done = {_coords(w) for w in found}
        picks = []
        for layer in range(self.model.num_layers):
            for cand in self.candidates[layer]:
                spike = abs(cand.output_activation) / median_out
                if spike < cfg.spike_ratio:
                    break  # candidates are sorted loudest first
                key = (cand.layer, cand.expert, cand.out_channel, cand.in_channel)
                if key in done:
                    continue
                in_ratio = abs(cand.input_activation) / median_in
                reasons = [
                    why for failed, why in (
                        (cand.row_ratio < cfg.row_ratio, "diffuse: the whole token is loud, not one channel"),
                        (cand.share < cfg.min_share, "no single weight explains the output"),
                        (in_ratio < cfg.input_ratio, "quiet input: a large weight alone"),
                        ((cand.layer, cand.expert, cand.out_channel) in self.cancellers or _cancels(cand, cfg.row_ratio),
                         "cancels: opposes a residual activation that is already massive"),
                    ) if failed
                ]
                if not reasons:
                    picks.append((cand, spike, in_ratio))
                    rejected.pop(key, None)
                elif key not in rejected:
                    rejected[key] = {**asdict(cand), "spike_ratio": spike, "input_ratio": in_ratio,
                                     "reason": "; ".join(reasons)}
        return picks

    def _found(self, cand: Candidate, spike: float, in_ratio: float, *, round: int) -> SuperWeight:
        """`cand`'s weight as a super weight, located in the model and in the checkpoint."""
        r, c, e = cand.out_channel, cand.in_channel, cand.expert
        tensor, index = self.model.stored_location(cand.layer, r, c, e)
        logger.info("layer %d%s: super weight [%d, %d] = %.4g drives %.4g (x%.0f the median layer's peak), pass %d",
                    cand.layer, f" expert {e}" if e is not None else "", r, c, cand.weight,
                    cand.output_activation, spike, round)
        return SuperWeight(
            layer=cand.layer, expert=e, out_channel=r, in_channel=c, tensor=tensor, index=index,
            hf_tensor=self.model.out_proj_name(cand.layer),
            hf_index=self.model.out_projs[cand.layer].layout.hf_index(r, c, e),
            weight=cand.weight, input_activation=cand.input_activation,
            output_activation=cand.output_activation, token=cand.token,
            spike_ratio=spike, input_ratio=in_ratio, row_ratio=cand.row_ratio, share=cand.share, round=round,
        )

    def _group(self, found: list[SuperWeight]) -> tuple[list[SuperNeuron], list[SuperActivation]]:
        """Group `found` into super neurons and super activations (numbered in the order found)."""
        neurons: dict[tuple, SuperNeuron] = {}
        activations: dict[int, SuperActivation] = {}
        for i, w in enumerate(found):
            neuron = neurons.setdefault((w.layer, w.expert, w.in_channel),
                                        SuperNeuron(w.layer, w.expert, w.in_channel, []))
            neuron.weights.append(i)
            w.neuron = list(neurons).index((w.layer, w.expert, w.in_channel))
            if w.out_channel not in activations:
                layer = int(self.stream_value[:, w.out_channel].abs().argmax())
                activations[w.out_channel] = SuperActivation(
                    channel=w.out_channel, value=float(self.stream_value[layer, w.out_channel]),
                    token=int(self.stream_token[layer, w.out_channel]), layer=layer, weights=[], layers=[])
            activation = activations[w.out_channel]
            activation.weights.append(i)
            activation.layers = sorted(set(activation.layers) | {w.layer})
            w.activation = list(activations).index(w.out_channel)
        return list(neurons.values()), list(activations.values())


def _coords(w: SuperWeight) -> tuple[int, int | None, int, int]:
    return w.layer, w.expert, w.out_channel, w.in_channel


def _check_finite(path, layer: int, **tensors: torch.Tensor) -> None:
    """Raise NonFiniteActivation when a projection's input or output holds NaN or infinities.

    A NaN weight or a NaN norm epsilon would otherwise spread to every channel and pass every
    ratio, giving super weights at one coordinate in every layer.
    """
    for which, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteActivation(
                f"layer {layer}: the MLP output projection's {which} holds NaN or infinite values; "
                "the checkpoint's weights or config are broken", where=path)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positionally or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _cancels(cand: Candidate, massive: float) -> bool:
    """True when the layer pushes against a residual value that is already massive.

    Massive means an outlier within its token's residual (`massive` times the median channel)
    and of the order of the layer's own change. Judged in the residual stream's scale (the
    layer's change, not the raw down_proj output), so post-norm architectures such as Gemma 2
    and OLMo 2, whose MLP output is normalized before it is added, are judged like the others.
    """
    opposed = cand.residual * cand.delta < 0
    return opposed and cand.residual_ratio >= massive and abs(cand.residual) >= 0.25 * abs(cand.delta)


def _analyse_layer(layer: int, projections: list[Projection], matrix, *,
                   min_share: float) -> tuple[LayerPeak, list[Candidate]]:
    """Peaks and top candidates of one layer's projection, over its experts for MoE.

    `matrix(expert)` gives the (out, in) weight. Token positions of routed experts are mapped back
    to the prompt's, and the loudest TOP_K outputs over all experts are kept.
    """
    peak, candidates = None, []
    for p in projections:
        w = matrix(p.expert)
        found_peak, found = _analyse(layer, p.x, p.y, lambda r, w=w: w[r], min_share=min_share, expert=p.expert)
        if p.tokens is not None:
            found_peak.input_token = int(p.tokens[found_peak.input_token])
            found_peak.output_token = int(p.tokens[found_peak.output_token])
            for cand in found:
                cand.token = int(p.tokens[cand.token])
        candidates += found
        peak = found_peak if peak is None else _merge_peaks(peak, found_peak)
    if len(projections) == 1:
        return peak, candidates
    candidates.sort(key=lambda c: -abs(c.output_activation))  # stable: a row's columns stay in order
    rows = list(dict.fromkeys((c.expert, c.out_channel, c.token) for c in candidates))[:TOP_K]
    return peak, [c for c in candidates if (c.expert, c.out_channel, c.token) in rows]


def _merge_peaks(a: LayerPeak, b: LayerPeak) -> LayerPeak:
    """One layer's peaks over two experts: the loudest output and the loudest input."""
    out = b if b.max_output > a.max_output else a
    inp = b if b.max_input > a.max_input else a
    return LayerPeak(a.layer, inp.max_input, inp.input_channel, inp.input_token,
                     out.max_output, out.output_channel, out.output_token, out.expert)
