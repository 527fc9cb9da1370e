"""Stream a checkpoint into a model skeleton one decoder layer at a time, and own what runs through it.

The model is built on the meta device (no memory), every tensor's shape and dtype is checked
against it from the file headers before anything is read, and then each decoder layer is filled
just before it runs and emptied right after. Only the embedding rows of the prompt's tokens are
read; the language-model head only when verifying, a slice of rows at a time.

StreamingModel is the one owner of the hooks on the model: a pass (detection, verification) is a
LayerObserver that `observe` wires in for the duration of a forward, and zeroing weights is a
scoped operation, `with model.zeroed(coords):`, applied as layers load.
"""

import ctypes
import ctypes.util
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import dot_natural_key

from .arch import OutProj, find_decoder_layers, find_out_proj
from .checkpoint import Checkpoint, check_layer_count
from .errors import CorruptCheckpoint, UnsupportedArchitecture, first_line
from .feed import LayerFeed
from .progress import Progress

logger = logging.getLogger(__name__)

MIN_LAYERS = 3  # with fewer, the median layer is itself one of the spikes


class LayerObserver:
    """A pass over a StreamingModel's layers: told what each layer gets and makes (see StreamingModel.observe)."""

    def entering(self, index: int, args: tuple, kwargs: dict) -> None:
        """Layer `index` is loaded and about to run on (args, kwargs)."""

    def projected(self, index: int, module: nn.Module, args: tuple, kwargs: dict,
                  output: torch.Tensor) -> torch.Tensor | None:
        """Its MLP output projection ran: return a replacement output, or None to keep it."""

    def leaving(self, index: int, output) -> None:
        """It ran and gave `output` (freed right after)."""


class StreamingModel:
    """A model skeleton on the meta device whose weights are read from a checkpoint only when needed.

    Args:
        checkpoint: the opened checkpoint (scanner.scan.open_checkpoint).
        device: where layers run.
        dtype: the compute dtype; None keeps the checkpoint's (float16 runs as float32 on CPU;
            GGUF is dequantized to float32).
        trust_remote_code: allow repo code named by config.json's auto_map.
        cache_bytes: how many bytes of stored layers may be kept between passes (scanner.feed).
    """

    def __init__(self, checkpoint: Checkpoint, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False, cache_bytes: int = 0):
        self.checkpoint = checkpoint
        self.path = path = checkpoint.path
        self.device = torch.device(device)
        self.config = checkpoint.config
        self.tensors = checkpoint.tensors  # shapes outermost dimension first, GGUF too
        self.checkpoint_dtype: torch.dtype | str = checkpoint.dtype  # GGUF: a quantization type, e.g. "Q4_1"
        self.dtype = dtype or checkpoint.compute_dtype(self.device)
        check_layer_count(self.config, self.tensors, path)
        try:
            with init_empty_weights(include_buffers=False):
                self.model = AutoModelForCausalLM.from_config(
                    self.config, dtype=self.dtype, trust_remote_code=trust_remote_code
                )
        except ValueError as e:
            raise UnsupportedArchitecture(f"no causal-LM class for this config ({first_line(e)})", where=path) from e
        self.model.eval()
        _move_buffers(self.model, self.device)
        tcfg = self.config.get_text_config()  # multimodal configs nest the decoder's
        self.hidden_size = tcfg.hidden_size
        self.num_layers = tcfg.num_hidden_layers
        if self.num_layers < MIN_LAYERS:
            raise UnsupportedArchitecture(
                f"{self.num_layers} decoder layer(s); a spike is measured against the median "
                f"layer, which needs at least {MIN_LAYERS}", where=path)
        self.base_model = self.model.base_model
        _, self.layers = find_decoder_layers(self.base_model, self.num_layers)
        self.layers_prefix = _module_path(self.model, self.layers)
        # Per layer: some models mix dense and expert MLPs (Qwen3-MoE mlp_only_layers, DeepSeek).
        self.out_projs: list[OutProj] = [find_out_proj(layer, self.hidden_size) for layer in self.layers]
        self._plan_keys()
        self._zeroed: dict[int, list[tuple[int, ...]]] = {}  # layer -> positions set to 0 as it loads
        self.bytes_read = 0  # tensor bytes loaded into layers, replays and cached layers included
        self.feed = LayerFeed(checkpoint.fetch, self.layer_keys, [checkpoint.nbytes(k) for k in self.layer_keys],
                              cache_bytes=cache_bytes, transfer=checkpoint.transfer)
        self.forwards = 0  # streamed passes over the layers

    def close(self) -> None:
        """Stop fetching ahead, drop kept layers and let go of the checkpoint's files."""
        self.feed.close()
        self.checkpoint.close()

    # -- what runs through it -------------------------------------------------------------------

    @contextmanager
    def observe(self, observer: LayerObserver, *, progress: Progress | None = None, first: int = 0) -> Iterator[None]:
        """For the block, every forward through the layers streams them and tells `observer`.

        Each layer is read just before it runs (with any zeroed weights applied; its bytes were
        fetched ahead, see scanner.feed), the observer sees its input, its MLP output projection and
        its output, and it is freed right after; each layer read is a step of `progress`. `first`:
        the first layer the forward runs.
        """
        progress = progress or Progress()
        self.forwards += 1
        self.feed.begin_pass(first)
        hooks = []
        for i, layer in enumerate(self.layers):
            def enter(module, args, kwargs, i=i):
                self.load_layer(i)
                observer.entering(i, args, kwargs)
                progress.step()

            def project(module, args, kwargs, output, i=i):
                return observer.projected(i, module, args, kwargs, output)

            def leave(module, args, output, i=i):
                observer.leaving(i, output)
                self.free_layer(i)

            hooks.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            hooks.append(self.out_proj_module(i).register_forward_hook(project, with_kwargs=True))
            hooks.append(layer.register_forward_hook(leave))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def zeroed(self, coords: list[tuple[int, int | None, int, int]]) -> Iterator[None]:
        """For the block, the weights at `coords` ((layer, expert, row, col)) read as 0 when their layers load."""
        saved = self._zeroed
        self._zeroed = {}
        for layer, expert, row, col in coords:
            position = tuple(self.out_projs[layer].layout.hf_index(row, col, expert))
            self._zeroed.setdefault(layer, []).append(position)
        try:
            yield
        finally:
            self._zeroed = saved

    # -- planning -------------------------------------------------------------------------------

    def _plan_keys(self) -> None:
        """Assign every checkpoint key to a layer, the input embedding, other small weights, or skip.

        Checks shapes and dtypes against the skeleton before anything is read.
        """
        meta = self.model.state_dict()
        layer_re = re.compile(rf"^{re.escape(self.layers_prefix)}\.(\d+)\.")
        embed_path = _module_path(self.model, self.model.get_input_embeddings())
        head = self.model.get_output_embeddings()
        head_path = _module_path(self.model, head) if head is not None else None

        self.layer_keys: list[list[str]] = [[] for _ in range(self.num_layers)]
        self.embed_key: str | None = None
        self.other_keys: list[str] = []
        self.key_target: dict[str, str] = {}
        head_key = self.head_bias_key = None
        sources: dict[str, list[str]] = {}
        converted: set[str] = set()  # targets built by a converter (e.g. experts merged into one tensor)
        targets = self.checkpoint.targets(self.model, meta)
        for key in sorted(targets, key=dot_natural_key):
            target, merged = targets[key]
            if head_path and target.startswith(head_path + ".") and target != f"{embed_path}.weight":
                if target == f"{head_path}.weight":
                    head_key = key
                elif target == f"{head_path}.bias":
                    self.head_bias_key = key  # Phi-2, GPT-J, CodeGen: their logits need it
                continue  # the LM head is never needed to find super weights
            self.key_target[key] = target
            sources.setdefault(target, []).append(key)
            if merged:
                converted.add(target)
            match = layer_re.match(target)
            if match:
                self.layer_keys[int(match.group(1))].append(key)
            elif target == f"{embed_path}.weight":
                self.embed_key = key
            else:
                self.other_keys.append(key)
        tied = self.config.get_text_config().tie_word_embeddings
        if self.embed_key is None and head_key is not None and tied:
            self.embed_key = head_key  # tied weights stored under the head's name: the same matrix
            sources[f"{embed_path}.weight"] = [head_key]
        self.head_key = self.embed_key if tied else head_key  # read only to verify (scanner.verify)
        self._check_against_skeleton(meta, sources, converted, head_path, embed_path)

    def _check_against_skeleton(self, meta, sources, converted, head_path, embed_path) -> None:
        """Raise CorruptCheckpoint unless every needed weight is present with the right shape and dtype.

        Needed: every parameter of the model but the LM head (tied weights count once).
        """
        needed = [name for name, _ in self.model.named_parameters()
                  if not (head_path and name.startswith(head_path + ".")) or name == f"{embed_path}.weight"]
        missing = [name for name in needed if name not in sources]
        if missing:
            raise CorruptCheckpoint(
                f"checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[0]}", where=self.path)
        self.checkpoint.check(sources, meta, converted)  # dtypes (or quantization types) and shapes

    # -- loading --------------------------------------------------------------------------------

    def _load(self, keys: list[str], raw: dict | None = None) -> None:
        """Put `keys` into the skeleton: their stored bytes `raw`, or read now."""
        raw = raw if raw is not None else self.checkpoint.fetch(keys)
        self.bytes_read += self.checkpoint.load(self.model, raw, dtype=self.dtype, device=self.device)

    def load_static(self, token_ids: list[int]) -> torch.Tensor:
        """Load the small non-layer weights and the embedding rows of `token_ids`.

        Returns:
            The ids re-numbered into the reduced embedding table, shape (1, T).
        """
        if self.other_keys:
            self._load(self.other_keys)
        vocab = self.tensors[self.embed_key].shape[0]
        bad = [i for i in token_ids if not 0 <= i < vocab]
        if bad:
            raise CorruptCheckpoint(f"token ids {bad} fall outside the embedding ({vocab} rows)", where=self.path)
        rows = sorted(set(token_ids))
        weight, size = self.checkpoint.read_rows(self.embed_key, rows)  # (len(rows), hidden)
        self.bytes_read += size
        embed = self.model.get_input_embeddings()
        embed.weight = nn.Parameter(weight.to(self.device, self.dtype), requires_grad=False)
        if getattr(embed, "padding_idx", None) is not None:
            embed.padding_idx = None  # it indexes the full table (and only matters for gradients)
        remap = {token: i for i, token in enumerate(rows)}
        return torch.tensor([[remap[t] for t in token_ids]], device=self.device)

    def load_layer(self, index: int) -> None:
        """Fill decoder layer `index` from its fetched bytes, with the weights `zeroed` names set to 0."""
        self._load(self.layer_keys[index], self.feed.get(index))
        positions = self._zeroed.get(index, [])
        if positions:  # the weight may share memory with the kept bytes: change a copy
            module, name = self.out_proj_module(index), self.out_projs[index].param_name
            weight = getattr(module, name).detach().clone()
            for position in positions:
                weight[position] = 0.0
            setattr(module, name, nn.Parameter(weight, requires_grad=False))

    def free_layer(self, index: int) -> None:
        """Return decoder layer `index`'s parameters to the meta device, releasing their memory."""
        for module in self.layers[index].modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type != "meta":
                    module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), False)
        _release_freed_memory()

    # -- the MLP output projection --------------------------------------------------------------

    def out_proj_module(self, index: int) -> nn.Module:
        return self.layers[index].get_submodule(self.out_projs[index].module_path)

    def out_proj_weight(self, index: int) -> torch.Tensor:
        return getattr(self.out_proj_module(index), self.out_projs[index].param_name)

    def out_proj_name(self, index: int) -> str:
        """The model parameter name of layer `index`'s out projection weight."""
        spec = self.out_projs[index]
        return f"{self.layers_prefix}.{index}.{spec.module_path}.{spec.param_name}"

    def stored_location(self, layer: int, row: int, col: int, expert: int | None) -> tuple[str, list[int]]:
        """Checkpoint tensor name and index holding W[row, col] of a layer (and expert) as stored.

        For GGUF the index follows the GGUF header's shape, contiguous dimension first: [col, row].
        """
        target = self.out_proj_name(layer)
        keys = sorted((k for k, t in self.key_target.items() if t == target), key=dot_natural_key)
        return self.checkpoint.stored_index(keys, self.out_projs[layer].layout, row, col, expert)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it in its arenas otherwise).

    Converting each layer's tensors allocates and frees hundreds of MB; without this, glibc's
    per-thread arenas and its growing mmap threshold hold on to it and RSS climbs well past one
    layer. A no-op where malloc_trim does not exist.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers (e.g. rotary inv_freq) of a meta-parameter model to `device`."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise UnsupportedArchitecture(f"{type(target).__name__} is not part of {type(root).__name__}")
