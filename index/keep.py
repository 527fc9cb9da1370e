"""Keep-lists: a model's super weights from the index, in the forms quantization tools take.

A keep-list names what a quantizer should leave in high precision. Mainstream tools take module or
tensor names only, never single elements: keeping a super weight there means keeping its whole MLP
down projection (every weight of it; for fused MoE experts, every expert's), which `NOTE` says in
each file's header and the README says in full. The `elements` format is the element-level sidecar
no tool takes yet.

Formats (`FORMATS`), each checked in tests against the real library, schema or grammar:
- `llama.cpp`: `llama-quantize --tensor-type-file`: whitespace-separated `PATTERN=TYPE` tokens, no
  comments; each pattern a regex searched in the (lowercased) GGUF tensor names, so it is anchored.
- `llm-compressor`: a recipe YAML whose QuantizationModifier `ignore` lists the modules.
- `autoround`: `layer_config`, the modules at 16-bit floating point.
- `torchao`: an `FqnToConfig` with the modules (fused experts: the parameter) mapped to None, in
  torchao's serialized form (`torchao.core.config.config_from_dict`; transformers' TorchAoConfig
  takes it as `quant_type`); add a `_default` config for the rest.
- `bitsandbytes`: `llm_int8_skip_modules` (with `lm_head`, which that list replaces the default of).
- `gptqmodel`: `dynamic` rules, `-:` (do not quantize) with an anchored regex per module.
- `elements`: JSON lines, one per super weight: repo, revision, tensor, index, hf_tensor, hf_index,
  value, dtype, verdict, effect.

JSON formats are one object: the tool's argument under its own name, and `_superweight` (what was
kept and why).
"""

import hashlib
import json
import re
from dataclasses import dataclass, field

from superweight.scanner import __version__
from superweight.scanner.errors import printable
from superweight.scanner.files import gguf_tensor_name

from .errors import QueryRefused

FORMATS = ("llama.cpp", "llm-compressor", "autoround", "torchao", "bitsandbytes", "gptqmodel", "elements")
SUFFIX = {"llama.cpp": ".txt", "llm-compressor": ".yaml", "elements": ".jsonl"}  # else .json
VERDICTS = ("super", "group", "inert", "unverified")
DEFAULT_VERDICTS = ("super", "group")
MAX_STEM = 120  # characters of a model's name in a keep-list's file name, of 255 bytes a file name may have
NOTE = ("Quantization tools take module or tensor names, not single weights: keeping a super weight "
        "here keeps its whole MLP down projection (for fused MoE experts, all experts' down projections) "
        "in high precision. The element-level coordinates are in `superweight export --keep elements`.")


@dataclass
class Model:
    """One model revision's super weights chosen for keeping (the catalog's rows, as dicts)."""

    repo_id: str
    revision: str
    scanner_version: str
    rows: list[dict] = field(default_factory=list)

    @property
    def file_stem(self) -> str:
        """OWNER--NAME@REV12: a plain file name whatever the index says (a local folder's path, or a name
        from a downloaded, untrusted index). It never starts with `-` or `.` (`rm *` and `ls` would read
        it as an option, or hide it) and stays well inside a file name's 255 bytes; a name that had to
        be changed to get there (not a Hub id) ends with a hash of the exact repo id, so two names that
        look alike once made plain stay two files."""
        plain = re.sub(r"[^A-Za-z0-9._+-]", "_", self.repo_id.replace("/", "--")).lstrip(".-_")[:MAX_STEM]
        revision = re.sub(r"[^A-Za-z0-9]", "_", (self.revision or "literature")[:12])
        if plain != self.repo_id.replace("/", "--") or not _is_hub_id(self.repo_id):
            plain = f"{plain}~{_digest(self.repo_id)}" if plain else _digest(self.repo_id)
        return f"{plain}@{revision}"

    def modules(self) -> list[str]:
        """The modules holding the super weights, once each, in layer order."""
        return list(dict.fromkeys(m for m in (module_of(r) for r in self.rows) if m is not None))

    def unnamed(self) -> list[dict]:
        """Rows whose module cannot be named (a literature row without a Hugging Face tensor name)."""
        return [r for r in self.rows if module_of(r) is None]


def module_of(row: dict) -> str | None:
    """The transformers module holding a row's super weight: its parameter name less `.weight`; for a
    fused experts parameter (`...mlp.experts.down_proj`), the experts module."""
    name = row.get("hf_tensor") or row.get("tensor")
    if not name or name.startswith("blk."):
        return None
    return name.removesuffix(".weight") if name.endswith(".weight") else name.rsplit(".", 1)[0]


def parameter_of(row: dict) -> str | None:
    """The parameter itself for fused experts (torchao can name parameters), else the module."""
    name = row.get("hf_tensor") or row.get("tensor")
    if name and not name.startswith("blk.") and not name.endswith(".weight"):
        return name
    return module_of(row)


def gguf_name(row: dict) -> str:
    """The GGUF tensor holding a row's super weight."""
    return gguf_tensor_name(row["layer"], row.get("expert"), row.get("tensor"))


def select(con, *, repo_id: str | None = None, revision: str | None = None,
           verdicts: tuple[str, ...] = DEFAULT_VERDICTS) -> list[Model]:
    """Each model's latest scan (or its literature rows, when never scanned), with its super weights of
    `verdicts`, from the `catalog` table of DuckDB connection `con`; one model when `repo_id` is given.

    Raises:
        QueryRefused: `repo_id` (at `revision`) is not in the index.
    """
    where, params = ["true"], []
    if repo_id is not None:
        where.append("repo_id = ?")
        params.append(repo_id)
    if revision is not None:
        where.append("revision LIKE ? || '%'")
        params.append(revision)
    cursor = con.execute(f"SELECT * FROM catalog WHERE {' AND '.join(where)}", params)
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, values)) for values in cursor.fetchall()]
    if repo_id is not None and not rows:
        at = f" at {revision}" if revision else ""
        raise QueryRefused(f"{repo_id}{at}: not in the index (superweight query \"SELECT DISTINCT repo_id FROM "
                           "catalog\" lists what is)")
    latest: dict[str, tuple] = {}
    for r in rows:  # a scan beats literature; a later scan beats an earlier one
        rank = (r.get("source") == "scan", str(r.get("scanned_at") or ""), r.get("scanner_version") or "")
        key = _scan_of(r)
        if r["repo_id"] not in latest or rank > latest[r["repo_id"]][0]:
            latest[r["repo_id"]] = (rank, key)
    models = {}
    for r in sorted(rows, key=_row_order):
        if _scan_of(r) != latest[r["repo_id"]][1]:
            continue
        model = models.setdefault(r["repo_id"], Model(r["repo_id"], r["revision"], r.get("scanner_version")))
        if r.get("layer") is not None and (r.get("verdict") or "unverified") in verdicts:
            model.rows.append(r)
    return list(models.values())


def _scan_of(r: dict) -> tuple:
    """Which scan of its model a catalog row belongs to (a GGUF repo's files are scans apart)."""
    return r["revision"], r.get("scanner_version"), r.get("artifact")


def _row_order(r: dict) -> tuple:
    return (r["repo_id"], r.get("layer") if r.get("layer") is not None else -1,
            r.get("expert") if r.get("expert") is not None else -1, r.get("out_channel") or 0, r.get("in_channel") or 0)


def render(model: Model, fmt: str, *, gguf_type: str = "q8_0", scheme: str = "W4A16") -> str:
    """The keep-list of `model` in format `fmt`, as the text of its file."""
    if fmt == "llama.cpp":
        patterns = dict.fromkeys(f"^{tensor_pattern(gguf_name(r))}$" for r in model.rows)
        return "".join(f"{p}={gguf_type}\n" for p in patterns)
    if fmt == "elements":
        return "".join(json.dumps(_element(model, r), allow_nan=False) + "\n" for r in model.rows)
    modules = model.modules()
    if fmt == "llm-compressor":
        import yaml

        recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
            "targets": ["Linear"], "scheme": scheme, "ignore": ["lm_head", *modules]}}}}
        header = "".join(f"# {line}\n" for line in _header_lines(model, fmt))
        return header + yaml.safe_dump(recipe, sort_keys=False)
    if fmt == "autoround":
        value = {m: {"bits": 16, "data_type": "fp"} for m in modules}
    elif fmt == "torchao":
        fqns = dict.fromkeys(p for p in (parameter_of(r) for r in model.rows) if p is not None)
        value = {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": {f: None for f in fqns}}}
    elif fmt == "bitsandbytes":
        value = ["lm_head", *modules]
    elif fmt == "gptqmodel":
        value = {f"-:^{re.escape(m)}$": {} for m in modules}
    else:
        raise ValueError(f"unknown keep-list format {fmt!r}; one of {', '.join(FORMATS)}")
    argument = {"autoround": "layer_config", "torchao": "quant_type", "bitsandbytes": "llm_int8_skip_modules",
                "gptqmodel": "dynamic"}[fmt]
    meta = {"note": NOTE, "about": _header_lines(model, fmt)[1:], "repo_id": model.repo_id,
            "revision": model.revision, "super_weights": len(model.rows), "modules": modules}
    return json.dumps({"_superweight": meta, argument: value}, indent=2, allow_nan=False) + "\n"


def tensor_pattern(name: str) -> str:
    """An ECMAScript regex matching exactly `name`, as one `llama-quantize --tensor-type-file` token.

    llama-quantize splits its file at whitespace, each token at its first `=`, and lowercases the
    pattern before compiling it with std::regex. So letters, digits and `_` stay, `.` is `\\.`, and every
    other byte (whitespace, `=`, metacharacters, non-ASCII) is a `\\xHH` escape: no whitespace, no `=`,
    and nothing that lowercasing changes.
    """
    return "".join(ch if re.fullmatch(r"[a-z0-9_]", ch) else "\\." if ch == "." else
                   "".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass")) for ch in name)


def _header_lines(model: Model, fmt: str) -> list[str]:
    """What a keep-list says of itself, each a line of plain text (a comment must not end in the
    middle of a name: repo ids from an untrusted index may hold newlines)."""
    lines = [NOTE, f"{printable(model.repo_id)} at {printable(model.revision or '(literature)')}: "
                   f"{len(model.rows)} super weight(s) in {len(model.modules())} module(s); written by "
                   f"superweight {__version__} from the index"]
    if model.unnamed():
        lines.append(f"{len(model.unnamed())} super weight(s) have no Hugging Face module name in the index and "
                     "are not listed here (see --keep elements)")
    return lines


def _element(model: Model, r: dict) -> dict:
    return {"repo_id": model.repo_id, "revision": model.revision, "tensor": r.get("tensor"), "index": r.get("index"),
            "hf_tensor": r.get("hf_tensor"), "hf_index": r.get("hf_index"), "value": r.get("weight"),
            "dtype": r.get("dtype"), "verdict": r.get("verdict") or "unverified",
            "effect": {"ppl_ratio": r.get("ppl_ratio"), "group_ppl_ratio": r.get("group_ppl_ratio"),
                       "control_ppl_ratio": r.get("control_ppl_ratio")},
            "layer": r["layer"], "expert": r.get("expert"), "row": r.get("out_channel"), "col": r.get("in_channel"),
            "gguf_tensor": gguf_name(r), "source": r.get("source")}


def file_name(model: Model, fmt: str) -> str:
    return model.file_stem + "." + fmt.replace(".", "") + SUFFIX.get(fmt, ".json")


def file_names(models: list[Model], fmt: str) -> list[str]:
    """Each model's file name (file_name), made unique among `models` also where only case tells two
    apart (a case-insensitive file system would make them one file): those get the repo id's hash."""
    names = [file_name(m, fmt) for m in models]
    seen: dict[str, int] = {}
    for name in names:
        seen[name.casefold()] = seen.get(name.casefold(), 0) + 1
    return [name if seen[name.casefold()] == 1 else name.replace("@", f"~{_digest(m.repo_id)}@", 1)
            for name, m in zip(names, models)]


def _is_hub_id(repo_id: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return "/" in repo_id


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
