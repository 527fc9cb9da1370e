"""Token ids from a checkpoint's own tokenizer (never remote code), or one hashed id per word without one.

Words are looked up as continuations (what `prompt + word` adds to `prompt`), not encoded alone:
SentencePiece tokenizers (Llama 2, Mistral) put a "▁" piece before text that starts with a space,
so " cold" encoded alone is ["▁", "▁cold"], while after "Winter is" it is one token.
"""

import hashlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer (a GGUF file's included), or None without a usable one."""
    from .gguf import find_gguf

    gguf_file = find_gguf(path)
    if gguf_file is None and not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
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
