"""The language-model head, read a slice of the vocabulary at a time, for verification's figures.

The head is never whole in memory: each slice's logits are folded into running sums (log-sum-exp,
the original's expectations for KL, the target and stopword logits), rescaled whenever a slice
raises the running maximum. The logits come from the model's own causal-LM forward on given hidden
states, so whatever the class does to its head's output (Gemma 2's soft-capping, Cohere's and
Granite's scaling, a head bias) applies exactly, without a table of model types to keep up to date.
"""

import math

import torch
from torch import nn

from .errors import CannotVerify, ScanError, first_line
from .loader import StreamingModel
from .progress import Progress


def head_stats(head: "Head", hidden: torch.Tensor, targets: torch.Tensor,
               stopwords: list[int], *, slice_rows: int, progress: Progress) -> dict:
    """Per variant and position: -log p(target), KL from variant 0, and the stopwords' probability share.

    hidden: (V, N, H) final hidden states; targets: (N,). The vocabulary is read `slice_rows` at a
    time; each variant's log-sum-exp, and variant 0's expectation of (its logits - the variant's),
    are accumulated online, rescaled whenever a slice raises the running maximum.
    """
    V, N, _ = hidden.shape
    h = hidden.float()
    zeros = lambda *shape: torch.zeros(*shape, device=h.device)  # noqa: E731
    acc = {"peak": torch.full((V, N), -math.inf, device=h.device),  # running max logit
           "total": zeros(V, N),  # sum exp(logit - peak)
           "cross": zeros(V, N),  # sum exp(base logit - base peak) * (base logit - logit)
           "target": zeros(V, N), "stop": zeros(V, N, len(stopwords))}
    stop = torch.tensor(stopwords, dtype=torch.long, device=h.device)
    vocab = head.vocab_size
    for lo in range(0, vocab, slice_rows):
        rows, bias = head.read_rows(lo, min(lo + slice_rows, vocab))  # (S, H), (S,) or None
        step = max(1, (1 << 24) // (V * rows.shape[0]))  # positions per product: logits stay ~64 MB
        for n in range(0, N, step):
            span = slice(n, min(n + step, N))
            _accumulate(acc, span, head.logits(h[:, span], rows, bias), lo, targets[span], stop)
        progress.step()
    lse = acc["peak"] + torch.log(acc["total"])  # (V, N)
    return {
        "nll": lse - acc["target"],
        "kl": (acc["cross"] / acc["total"][0] - lse[0] + lse).clamp_min(0.0),
        "stop_share": torch.exp(acc["stop"] - lse[..., None]).sum(dim=2),
    }


def _accumulate(acc: dict, span: slice, logits: torch.Tensor, lo: int, targets: torch.Tensor,
                stop: torch.Tensor) -> None:
    """Fold logits (V, n, S) of vocabulary ids lo.. at positions `span` into the running sums."""
    peak = acc["peak"][:, span]
    new_peak = torch.maximum(peak, logits.amax(dim=2))
    scale = torch.exp(peak - new_peak)
    base = torch.exp(logits[0] - new_peak[0, :, None])  # (n, S), unnormalised base probabilities
    acc["cross"][:, span] = acc["cross"][:, span] * scale[0] + (base * (logits[0] - logits)).sum(dim=2)
    acc["total"][:, span] = acc["total"][:, span] * scale + torch.exp(logits - new_peak[..., None]).sum(dim=2)
    acc["peak"][:, span] = new_peak
    inside = (targets >= lo) & (targets < lo + logits.shape[2])
    if inside.any():
        where = torch.nonzero(inside).squeeze(1)
        acc["target"][:, span][:, where] = logits[:, where, targets[where] - lo]
    here = (stop >= lo) & (stop < lo + logits.shape[2])
    if here.any():
        acc["stop"][:, span][:, :, here] = logits[:, :, stop[here] - lo]


class _Outputs:
    """The base model's output as a causal-LM forward reads it: the hidden states, and None for the rest."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name):  # past_key_values, attentions, cross_attentions, router_logits, ...
        return None

    def __getitem__(self, index):  # older forwards read outputs[0]
        return (self.last_hidden_state,)[index]


class _Given(nn.Module):
    """Stands in for the base model inside the causal-LM forward: returns the hidden states it was given."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> _Outputs:
        return _Outputs(self.hidden)


class Head:
    """The model's own causal-LM forward on given hidden states and given rows of the head.

    Whatever the class does to its head's output (Gemma 2's soft-capping, Cohere's and Granite's
    scaling, ...) is then applied exactly, without a table of model types to keep up to date.
    Use as a context manager: the base model and the head's parameters are put back on exit.
    """

    def __init__(self, model: StreamingModel):
        self.model = model
        self.causal, self.head = model.model, model.model.get_output_embeddings()
        self.prefix = model.model.base_model_prefix
        if not isinstance(self.head, nn.Linear):
            raise CannotVerify("an LM head that is not a linear layer", where=type(self.head).__name__)
        self._check_stored()
        self.given = _Given()

    @property
    def vocab_size(self) -> int:
        """The vocabulary size of the language-model head."""
        return self.model.tensors[self.model.head_key].shape[0]

    def _check_stored(self) -> None:
        """Raise CannotVerify unless the checkpoint's head (and its bias) can be read: present, (vocab, hidden).

        The scan itself never reads the head, so it is checked only when verifying.
        """
        model = self.model
        if model.head_key is None:
            raise CannotVerify("checkpoint has no language-model head weight (lm_head.weight)", where=model.path)
        shape = model.tensors[model.head_key].shape
        if len(shape) != 2 or shape[1] != model.hidden_size:
            raise CannotVerify(f"LM head tensor {model.head_key} has shape {list(shape)}, "
                               f"not (vocabulary, {model.hidden_size})", where=model.path)
        bias = model.tensors[model.head_bias_key].shape if model.head_bias_key else (shape[0],)
        if bias != (shape[0],):
            raise CannotVerify(f"LM head bias {model.head_bias_key} has shape {list(bias)}, not [{shape[0]}]",
                               where=model.path)
        try:  # the checkpoint's own dtype (safetensors) or quantization type (GGUF) checks
            for key, expected in {model.head_key: shape, model.head_bias_key: (shape[0],)}.items():
                if key is not None:
                    model.checkpoint.check({key: [key]}, {key: torch.empty(expected, device="meta")}, set())
        except ScanError as e:
            raise CannotVerify(f"cannot read the LM head: {first_line(e)}") from e

    def read_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows start:stop of the head's weight (vocabulary, hidden) and bias, float32 on the device.

        The head is never loaded whole; verification reads it a slice of the vocabulary at a time.
        """
        model = self.model
        rows, size = model.checkpoint.read_rows(model.head_key, range(start, stop))
        model.bytes_read += size
        bias = None
        if model.head_bias_key is not None:
            bias, size = model.checkpoint.read_rows(model.head_bias_key, range(start, stop))
            model.bytes_read += size
            bias = bias.reshape(-1).to(model.device, torch.float32)
        return rows.to(model.device, torch.float32), bias

    def __enter__(self) -> "Head":
        self.saved = (getattr(self.causal, self.prefix), self.head.weight, self.head.bias)
        setattr(self.causal, self.prefix, self.given)
        return self

    def __exit__(self, *exc) -> None:
        base, self.head.weight, self.head.bias = self.saved
        setattr(self.causal, self.prefix, base)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(V, n, H) hidden states and (S, H) head rows -> (V, n, S) float32 logits, as the model makes them."""
        self.given.hidden = hidden
        self.head.weight = nn.Parameter(rows, requires_grad=False)
        self.head.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        dummy = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return self.causal(input_ids=dummy, use_cache=False).logits.float()
