"""Constants (overridable by environment) and the typed detection settings."""

import os
from dataclasses import dataclass
from pathlib import Path

# The prompt of the paper (Yu et al. 2024, arXiv 2411.07191, Sec. 3.1).
DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."

SUPERWEIGHT_HOME = Path(
    os.getenv("SUPERWEIGHT_HOME", Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "superweight")
)
DEBUG = os.getenv("SUPERWEIGHT_DEBUG", "") not in ("", "0")
HUB_TIMEOUT = float(os.getenv("SUPERWEIGHT_HUB_TIMEOUT", "30"))  # seconds any one Hub request may wait for bytes
HUB_ATTEMPTS = int(os.getenv("SUPERWEIGHT_HUB_ATTEMPTS", "4"))  # tries of one range read before a scan fails
HUB_BACKOFF = float(os.getenv("SUPERWEIGHT_HUB_BACKOFF", "1"))  # seconds before the first retry, doubling after
# Bytes per second a range read may not fall below (after HUB_TIMEOUT of grace): slower than any link a
# scan can use (a 1 GB layer would take three hours), fast enough that a server trickling bytes is left.
HUB_MIN_RATE = float(os.getenv("SUPERWEIGHT_HUB_MIN_RATE", "100000"))
# Bytes a Hub API answer may weigh: a model's info with thousands of files is a few MB.
HUB_MAX_ANSWER = int(os.getenv("SUPERWEIGHT_HUB_MAX_ANSWER", str(16 * 2**20)))
DEFAULT_CACHE_SHARE = 0.25  # of the machine's memory, for layers kept between a scan's passes (--cache-gb)
CATALOG_FILE = "catalog.duckdb"  # under SUPERWEIGHT_HOME unless --catalog
DIGEST_CACHE = "file-digests.json"  # per-file sha256s of local checkpoints, under SUPERWEIGHT_HOME

# Files a scan needs from a checkpoint; everything else in a repo is left alone.
CHECKPOINT_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class DetectConfig:
    """How a spike is told apart from ordinary activations. README 'Detection criteria' justifies each."""

    prompt: str = DEFAULT_PROMPT
    # A layer spikes when its peak |down_proj output| is this many times the median layer's peak.
    spike_ratio: float = 50.0
    # The spiking channel must stand this many times above the median channel of the same token
    # (otherwise a loud input is just spread over a whole column of ordinary weights).
    row_ratio: float = 20.0
    # The chosen weight must contribute at least this share of the spiking output value.
    min_share: float = 0.25
    # The input activation that drives it must be this many times the median layer's peak |input|.
    input_ratio: float = 5.0
    # Safety bound on remove-and-rerun rounds (published models have at most 7 super weights).
    max_rounds: int = 16


@dataclass(frozen=True)
class LabGrid:
    """Which fake quantizations the lab sweeps (`superweight quantize`; scanner.quantize).

    The default is a lab a CPU finishes in minutes (SmolLM2-135M on 2 cores: 17 variants, about 5
    minutes), chosen from what the full sweep showed there: 4 bits is where keeping the super weight
    decides (over whole tensors clip+keep takes x20,280 to x54; 512^2 blocks x2,415 to x63), per-row
    groups of 128 are the usual layout to compare with, and z = 9 was the best clip at 4 bits.
    """

    bits: tuple[int, ...] = (4,)
    block_sizes: tuple[int | None, ...] = (512 ** 2, None)  # None: the whole tensor
    group_sizes: tuple[int, ...] = (128,)
    z: tuple[float, ...] = (9.0,)


# `superweight quantize --full`: the paper's block sizes and the usual bit widths (hours on a CPU).
FULL_LAB = LabGrid(bits=(8, 4, 3), block_sizes=(128 ** 2, 256 ** 2, 512 ** 2, 1024 ** 2, None),
                   group_sizes=(64, 128), z=(3.0, 5.0, 7.0, 9.0, 11.0))
MAX_BITS = 16  # 2^16 levels already round finer than bfloat16 stores a weight
# Evaluation tokens at most: an equal share from each shipped text, which holds 3,300-5,600 tokens.
MAX_TOKENS = 6144


# Sizes a config.json may give, each far above any released model (largest known in the comment),
# checked before anything is built: a config is untrusted, and a size of 1e12 would be allocated.
SIZE_LIMITS = {
    "hidden_size": 2**20, "n_embd": 2**20, "d_model": 2**20,  # 16,384 (Llama-3.1-405B)
    "intermediate_size": 2**21, "n_inner": 2**21, "ffn_hidden_size": 2**21, "moe_intermediate_size": 2**21,  # 53,248
    "num_hidden_layers": 2**12, "n_layer": 2**12,  # 126
    "num_attention_heads": 2**14, "n_head": 2**14, "num_key_value_heads": 2**14, "head_dim": 2**16,  # 128, 256
    "vocab_size": 2**24,  # 262,144 (Gemma 3)
    "max_position_embeddings": 2**27, "n_positions": 2**27, "n_ctx": 2**27,  # 10,485,760 (Llama 4 Scout)
    "num_local_experts": 2**16, "num_experts": 2**16, "num_experts_per_tok": 2**16,  # 384 (Kimi K2)
}
# Of those, the ones null may stand for (derived from others, or no experts).
NULLABLE_SIZES = {"head_dim", "num_key_value_heads", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
                  "num_local_experts", "num_experts", "num_experts_per_tok", "n_ctx"}
