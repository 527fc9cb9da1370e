"""What verification measures on: public-domain evaluation texts, next-word prompts and stopwords,
and their token ids for one checkpoint (`evaluation_inputs`)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CannotVerify
from .loader import StreamingModel
from .tokens import continuation, encode, hashed_ids, leading_special, max_positions

# Public-domain English in two registers, the same share of tokens from each: the effect of a
# super weight depends on the text (on SmolLM2, x5 on the novel, x135 on the Constitution).
EVAL_TEXTS = (
    Path(__file__).parent / "data" / "us-constitution.txt",  # Articles I-VII (1787), a U.S. government work
    Path(__file__).parent / "data" / "pride-and-prejudice-1-3.txt",  # Jane Austen (1813), chapters 1-3
)

# Paper-style prompts (arXiv 2411.07191, Fig. 3: "Summer is hot. Winter is" -> " cold"): the next
# word is nearly certain for an intact model.
PROMPTS = (
    ("Summer is hot. Winter is", " cold"),
    ("The capital of France is", " Paris"),
    ("One, two, three, four,", " five"),
    ("Monday, Tuesday, Wednesday,", " Thursday"),
    ("January, February, March,", " April"),
    ("The opposite of up is", " down"),
    ("The sun rises in the east and sets in the", " west"),
    ("Day is light. Night is", " dark"),
)

# Without its super weight a model puts its probability on these (the paper's Fig. 3).
STOPWORDS = (" the", " a", " an", ",", ".", " and", " of", " to", " in", " is", " that", " it",
             " was", " for", " on", " with", " as", " I", " he", "\n")


@dataclass
class Inputs:
    """The token ids of both groups, and what is predicted from them."""

    text: torch.Tensor  # (B, T) evaluation text, in chunks of `context`
    prompts: torch.Tensor  # (P, Tp) prompts, right-padded (causal attention never sees the padding)
    prompt_last: list[int]  # per prompt, the position of its last real token
    expected: list[int] | None  # per prompt, the first token of the expected next word
    stopwords: list[int] | None  # stopwords that are one token after a word
    tokenizer: bool  # False: one hashed id per word (no usable tokenizer), prompt figures unknown


def sequence_length(model_config, config) -> int:
    """Tokens per evaluated sequence: `config.context` (a VerifyConfig's), at most the model's positions."""
    positions = max_positions(model_config)
    return min(config.context, positions or config.context)


def min_tokens(model_config, config) -> int:
    """The fewest evaluation tokens `config` may ask for on this model: a sequence from each text."""
    return len(config.texts) * sequence_length(model_config, config)


def evaluation_inputs(model: StreamingModel, tokenizer, config) -> Inputs:
    """Token ids of the evaluation texts and the prompts of `config` (a VerifyConfig), with the
    checkpoint's tokenizer if it has one.

    Sequences are `config.context` tokens (at most the model's positions), each starting with the
    tokenizer's leading special tokens (BOS), as the model saw text in training.
    """
    vocab = model.tensors[model.embed_key].shape[0]  # embedding rows
    if tokenizer is not None:
        prefix = leading_special(tokenizer)
        body = lambda text: encode(tokenizer, text)  # noqa: E731
        expected = [(continuation(tokenizer, p, w) or [-1])[0] for p, w in config.prompts]
        stopwords = sorted({ids[0] for w in config.stopwords if len(ids := continuation(tokenizer, "x", w)) == 1})
    else:
        prefix = hashed_ids("", model.config)  # the BOS token, if the config has one
        body = lambda text: hashed_ids(text, model.config)[len(prefix):]  # noqa: E731
        expected = stopwords = None
    prompts = [prefix + body(p) for p, _ in config.prompts]
    context = sequence_length(model.config, config)
    step, share = context - len(prefix), config.tokens // len(config.texts)
    chunks = []
    for text in config.texts:
        ids = body(text.read_text(encoding="utf-8"))[:share]
        chunks += [prefix + ids[i : i + step] for i in range(0, len(ids) - step + 1, step)]
    if not chunks:
        raise CannotVerify(f"the evaluation texts give no sequence of {context} tokens")
    width = max(len(p) for p in prompts)
    padded = [p + [p[-1]] * (width - len(p)) for p in prompts]
    bad = sorted({i for ids in [*chunks, *padded, expected or []] for i in ids if not 0 <= i < vocab})
    if bad:
        raise CannotVerify(f"token ids {bad[:3]} of the evaluation fall outside the embedding ({vocab} rows)")
    return Inputs(torch.tensor(chunks), torch.tensor(padded), [len(p) - 1 for p in prompts],
                  expected, stopwords, tokenizer is not None)
