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
