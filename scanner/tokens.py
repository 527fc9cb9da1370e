"""Token ids from a checkpoint's own tokenizer (its files, or a GGUF's metadata; never remote code), or
one hashed id per word without one.

Words are looked up as continuations (what `prompt + word` adds to `prompt`), not encoded alone:
SentencePiece tokenizers (Llama 2, Mistral) put a "▁" piece before text that starts with a space,
so " cold" encoded alone is ["▁", "▁cold"], while after "Winter is" it is one token.
"""

import hashlib
import logging
from pathlib import Path

from .files import inside

logger = logging.getLogger(__name__)


# Files transformers may read to build a tokenizer from a folder: each must be a regular file inside it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "config.json")


# GGUF metadata keys (under tokenizer.ggml.) of the special tokens, as transformers' get_gguf_tokenizer names them.
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


def load_tokenizer(path: Path, *, root: Path | None = None):
    """The tokenizer of the checkpoint folder `path`; None without a usable one.

    Raises:
        UnsafeCheckpoint: a tokenizer file links outside `root` (default `path`) or is not a regular file.
    """
    present = [path / name for name in TOKENIZER_FILES if (path / name).exists() or (path / name).is_symlink()]
    for file in present:
        inside(file, root or path, what="tokenizer file")
    if not {"tokenizer.json", "tokenizer_config.json"} & {f.name for f in present}:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        tokenizer("probe")
        return tokenizer
    except (ValueError, OSError, KeyError, TypeError) as e:
        logger.warning("%s: tokenizer unusable (%s); using one id per word", path, e)
        return None


def gguf_tokenizer(metadata: dict, architecture: str, *, where):
    """The tokenizer a GGUF file's metadata describes, built by transformers' own GGUF conversion; None
    without a usable one.

    Args:
        metadata: the parsed metadata (scanner.gguf_header), the vocabulary and merges as lists.
        architecture: llama.cpp's name for it (general.architecture), which picks some builders.
        where: the file, for the warning when its tokenizer is unusable.
    """
    if not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        return None  # no vocabulary in the file
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    try:
        tokenizer_dict, tokenizer_config = _gguf_tokenizer_fields(metadata)
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        tokenizer = TokenizersBackend(tokenizer_object=backend, **tokenizer_config, **extra)
        tokenizer("probe")
        return tokenizer
    except (ValueError, KeyError, TypeError, IndexError) as e:
        logger.warning("%s: tokenizer unusable (%s); using one id per word", where, e)
        return None


def _gguf_tokenizer_fields(metadata: dict) -> tuple[dict, dict]:
    """(tokenizer_dict, tokenizer_config) from GGUF metadata, as transformers' get_gguf_tokenizer groups
    them (that function takes a path and parses the file again)."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
    elif tokenizer.get("tokenizer_type") == "gemma4":
        config["add_bos_token"] = False  # its chat template writes <bos> itself
    for name, key in GGUF_SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return tokenizer, config


def hashed_ids(text: str, config) -> list[int]:
    """One id per word of `text` (its sha256 modulo the vocabulary size), after the config's BOS token."""
    vocab = config.get_text_config().vocab_size
    bos = getattr(config.get_text_config(), "bos_token_id", None)
    words = [int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "big") % vocab for w in text.split()]
    return ([bos] if isinstance(bos, int) and 0 <= bos < vocab else []) + words


def encode(tokenizer, text: str) -> list[int]:
    """Ids of `text` without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def leading_special(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before text (BOS), if any; never a trailing EOS."""
    plain, full = encode(tokenizer, "x"), tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def continuation(tokenizer, text: str, word: str) -> list[int]:
    """The ids that `text + word` has beyond those of `text` (from the first one that differs)."""
    before, after = encode(tokenizer, text), encode(tokenizer, text + word)
    same = 0
    while same < min(len(before), len(after)) and before[same] == after[same]:
        same += 1
    return after[same:]


def max_positions(config) -> int | None:
    """The longest sequence the model takes (max_position_embeddings, or n_positions for GPT-2), if it says."""
    tcfg = config.get_text_config()
    return getattr(tcfg, "max_position_embeddings", None) or getattr(tcfg, "n_positions", None)
