"""How a layer's MLP output projection holds its weight, and everything that follows from that.

transformers keeps the projection in one of three layouts: a Linear weight (out, in), GPT-2's
Conv1D weight (in, out), or transformers 5's fused experts (experts, out, in) beside a fused
gate_up_proj. Each layout is one small class with the same few methods, and every reader of a
projection (detection, verification, the checkpoint's own index, the tests' planting) goes
through them: nothing else decides where W[row, col] is.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedArchitecture


@dataclass
class Projection:
    """What a projection computed for some tokens: Y = X W^T, before any routing weight.

    For dense layers, every token of the batch; for a routed expert, the tokens routed to it.
    """

    expert: int | None
    x: torch.Tensor  # (tokens, intermediate): the projection's input
    y: torch.Tensor  # (tokens, hidden): its output
    tokens: torch.Tensor | None = None  # (tokens,) positions in the flattened batch; None: all, in order
    routing: torch.Tensor | None = None  # (tokens,) each token's routing weight for this expert


class Layout:
    """Where W[row, col] of one projection is; the base of the three layouts."""

    name = ""
    experts = False

    def matrix(self, weight: torch.Tensor, expert: int | None) -> torch.Tensor:
        """The projection's (out, in) matrix, a view of `weight`."""
        raise NotImplementedError

    def hf_index(self, row: int, col: int, expert: int | None) -> list[int]:
        """The position of W[row, col] in the transformers parameter."""
        raise NotImplementedError

    def stored_index(self, keys: list[str], row: int, col: int, expert: int | None) -> tuple[str, list[int]]:
        """The safetensors tensor (of the parameter's `keys`, in order) holding W[row, col], and its index there."""
        return keys[0], self.hf_index(row, col, expert)

    def projections(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, *,
                    experts: set[int] | None = None) -> list[Projection]:
        """The projection's input and output for one call of `module` (its forward hook's arguments)."""
        x = args[0]
        return [Projection(None, x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1]))]


class Linear(Layout):
    """nn.Linear: weight (out, in)."""

    name = "linear"

    def matrix(self, weight, expert):
        return weight

    def hf_index(self, row, col, expert):
        return [row, col]


class Conv1D(Layout):
    """GPT-2's Conv1D: weight (in, out), stored that way too."""

    name = "conv1d"

    def matrix(self, weight, expert):
        return weight.T

    def hf_index(self, row, col, expert):
        return [col, row]


class FusedExperts(Layout):
    """transformers 5's fused MoE experts: down_proj (experts, out, in) beside gate_up_proj (experts, 2I, H).

    The module's forward mixes the routed experts' outputs with their routing weights; each
    expert's own projection is recomputed here from the routing it was given, and checked against
    the module's output, so a different expert layout fails loudly instead of giving wrong figures.
    """

    name = "experts"
    experts = True

    def matrix(self, weight, expert):
        return weight[expert]

    def hf_index(self, row, col, expert):
        return [expert, row, col]

    def stored_index(self, keys, row, col, expert):
        if len(keys) == 1:  # stored fused, as transformers keeps it in memory
            return keys[0], [expert, row, col]
        return keys[expert], [row, col]  # one tensor per expert, merged in expert order

    def projections(self, module, args, kwargs, output, *, experts=None):
        hidden, index, weights = routing_inputs(args, kwargs)  # (N, H), (N, k), (N, k)
        routed = torch.unique(index).tolist()
        check = experts is None  # only a full recomputation can be compared with the output
        rebuilt = torch.zeros_like(output, dtype=torch.float32) if check else None
        found = []
        for e in routed if check else [e for e in routed if e in experts]:
            tokens, slots = torch.where(index == e)
            gate, up = F.linear(hidden[tokens], module.gate_up_proj[e]).chunk(2, dim=-1)
            x = module.act_fn(gate) * up  # (tokens routed to e, I)
            y = F.linear(x, module.down_proj[e])  # (tokens routed to e, H)
            routing = weights[tokens, slots]
            if check:
                rebuilt.index_add_(0, tokens, y.float() * routing[:, None].float())
            found.append(Projection(e, x, y, tokens, routing))
        if check:
            scale = float(output.float().abs().max()) or 1.0
            if float((rebuilt - output.float()).abs().max()) > 1e-2 * scale:
                raise UnsupportedArchitecture("recomputed experts disagree with the module", where=type(module).__name__)
        return found


def routing_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (N, H), top_k_index (N, k), top_k_weights (N, k)) passed to a fused experts module."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    return values[0], values[1], values[2]


LINEAR, CONV1D, FUSED_EXPERTS = Linear(), Conv1D(), FusedExperts()
