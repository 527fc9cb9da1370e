"""Token ids from a checkpoint's own tokenizer (never remote code), or one hashed id per word without one.

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


def load_tokenizer(path: Path, *, root: Path | None = None, gguf_file: Path | None = None):
    """The tokenizer of the checkpoint folder `path`, or the one in `gguf_file`'s metadata; None
    without a usable one.

    Raises:
        UnsafeCheckpoint: a tokenizer file links outside `root` (default `path`) or is not a regular file.
    """
    if gguf_file is None:
        present = [path / name for name in TOKENIZER_FILES if (path / name).exists() or (path / name).is_symlink()]
        for file in present:
            inside(file, root or path, what="tokenizer file")
        if not {"tokenizer.json", "tokenizer_config.json"} & {f.name for f in present}:
            return None
    from transformers import AutoTokenizer

    where, gguf = (gguf_file.parent, {"gguf_file": gguf_file.name}) if gguf_file else (path, {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **gguf)
        tokenizer("probe")
        return tokenizer
    except (ValueError, OSError, KeyError, TypeError) as e:
        logger.warning("%s: tokenizer unusable (%s); using one id per word", path, e)
        return None


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
