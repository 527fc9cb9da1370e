"""Keep-lists: `superweight export --keep FORMAT`, each format loaded by its real library, schema or grammar."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from superweight.cli import cli
from superweight.index.catalog import Catalog
from superweight.index.keep import NOTE
from superweight.scanner.scan import ScanOptions, scan
from superweight.scanner.verify import VerifyConfig
from tests.checkpoints import Plant, make_checkpoint

# A random tiny model's planted weights move perplexity by a few percent; `matters=0` calls them super.
QUICK = VerifyConfig(tokens=256, context=64, head_slice_rows=100, matters=0.0)
DENSE, MOE, UNVERIFIED = "keep/llama", "keep/mixtral", "keep/unverified"


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> dict:
    """A catalog (and its catalog.parquet) of a verified llama with a super weight in layer 2, a
    verified mixtral with one in an expert, and a llama scanned without verification."""
    root = tmp_path_factory.mktemp("keep")
    dense = make_checkpoint(root / "llama", "llama", [Plant(2, 10, 20)])
    moe = make_checkpoint(root / "mixtral", "mixtral", [Plant(2, 10, 20, expert=1)])
    plain = make_checkpoint(root / "plain", "llama", [Plant(3, 10, 20)])
    catalog_path = root / "catalog.duckdb"
    with Catalog(catalog_path) as catalog:
        for repo_id, folder, verify in ((DENSE, dense, QUICK), (MOE, moe, QUICK), (UNVERIFIED, plain, None)):
            result = scan(str(folder), ScanOptions(verify=verify))
            catalog.record_scan(_named(result, repo_id))
        catalog.export(root / "catalog.parquet")
    return {"catalog": catalog_path, "parquet": root / "catalog.parquet", "dense": dense, "root": root}


def _named(result, repo_id):
    import dataclasses

    return dataclasses.replace(result, repo_id=repo_id)


def export(index, *args, ok=True):
    result = CliRunner().invoke(cli, ["export", "--catalog", str(index["catalog"]), *args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def keep(index, fmt, repo_id=DENSE, *args) -> str:
    return export(index, "--keep", fmt, "--repo", repo_id, *args).stdout


def tiny_llama(index) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(index["dense"])
    return transformers.AutoModelForCausalLM.from_config(config)


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def test_the_index_holds_what_the_tests_rely_on(index):
    with Catalog(index["catalog"], read_only=True) as catalog:
        rows = catalog.fetch("SELECT repo_id, layer, expert, hf_tensor, verdict FROM catalog ORDER BY repo_id")
    assert rows == [(DENSE, 2, None, "model.layers.2.mlp.down_proj.weight", "super"),
                    (MOE, 2, 1, "model.layers.2.mlp.experts.down_proj", "super"),
                    (UNVERIFIED, 3, None, "model.layers.3.mlp.down_proj.weight", "unverified")]


def test_llama_cpp_file_follows_the_quantize_grammar_and_names_only_the_kept_tensor(index):
    text = keep(index, "llama.cpp", DENSE, "--type", "f16")
    tokens = text.split()  # llama-quantize reads whitespace-separated NAME=TYPE tokens, no comments
    assert len(tokens) == 1
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = [f"blk.{i}.{kind}.weight" for i in range(30) for kind in kinds] + ["output.weight", "token_embd.weight"]
    for token in tokens:
        name, sep, qtype = token.partition("=")
        assert sep and name and qtype.upper() in GGMLQuantizationType.__members__
        pattern = re.compile(name.lower())  # lowercased, then std::regex_search (ECMAScript: the same here)
        assert [n for n in names if pattern.search(n)] == ["blk.2.ffn_down.weight"]
    moe = keep(index, "llama.cpp", MOE).split()
    assert [n for n in ["blk.2.ffn_down_exps.weight", "blk.2.ffn_down.weight", "blk.12.ffn_down_exps.weight"]
            if re.search(moe[0].partition("=")[0], n)] == ["blk.2.ffn_down_exps.weight"]
    assert moe[0].endswith("=q8_0")


def test_llm_compressor_recipe_ignores_the_kept_module_in_compressed_tensors(index):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    text = keep(index, "llm-compressor")
    assert text.startswith("# " + NOTE)
    modifier = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert modifier["ignore"] == ["lm_head", "model.layers.2.mlp.down_proj"]
    model = tiny_llama(index)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(modifier["scheme"], modifier["targets"])},
                                ignore=modifier["ignore"])
    apply_quantization_config(model, config, show_progress=False)
    quantized = {name for name, module in model.named_modules() if hasattr(module, "quantization_scheme")}
    assert quantized == set(linear_names(model)) - {"lm_head", "model.layers.2.mlp.down_proj"}


TORCHAO = "torchao==0.18.0"
TORCHAO_CHECK = """
import json, sys, warnings
import torch, transformers
warnings.simplefilter("ignore")
from torchao.core.config import config_from_dict
from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_

config = config_from_dict(json.load(open(sys.argv[1]))["quant_type"])
assert isinstance(config, FqnToConfig), type(config)
config.fqn_to_config["_default"] = Int8WeightOnlyConfig()  # the user's choice for everything else
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sys.argv[2]))
quantize_(model, config, filter_fn=None)  # FqnToConfig: names from the model's root
print(json.dumps({name: type(module.weight).__name__ for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear)}))
"""


@pytest.fixture(scope="session")
def torchao_site(tmp_path_factory) -> Path:
    """torchao installed into a folder of its own (see pyproject's test extra for why not in the venv)."""
    site = tmp_path_factory.mktemp("torchao-site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), TORCHAO],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return site


def test_torchao_config_loads_and_leaves_the_kept_module_unquantized(index, torchao_site, tmp_path):
    config = tmp_path / "keep.json"
    config.write_text(keep(index, "torchao"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(torchao_site), *sys.path])}
    done = subprocess.run([sys.executable, "-c", TORCHAO_CHECK, str(config), str(index["dense"])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = json.loads(done.stdout.strip().splitlines()[-1])
    assert kinds.pop("model.layers.2.mlp.down_proj") == "Parameter"
    assert set(kinds.values()) == {"Int8Tensor"}
    moe = json.loads(keep(index, "torchao", MOE))["quant_type"]["_data"]["fqn_to_config"]
    assert moe == {"model.layers.2.mlp.experts.down_proj": None}  # the fused experts parameter itself


def test_bitsandbytes_skip_list_is_what_transformers_skips(index):
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = json.loads(keep(index, "bitsandbytes"))["llm_int8_skip_modules"]
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    assert config.llm_int8_skip_modules == ["lm_head", "model.layers.2.mlp.down_proj"]
    names = linear_names(tiny_llama(index))
    assert {n for n in names if not should_convert_module(n, skip)} == {"lm_head", "model.layers.2.mlp.down_proj"}


def test_gptqmodel_dynamic_rules_skip_exactly_the_kept_module(index):
    dynamic = json.loads(keep(index, "gptqmodel"))["dynamic"]
    names = linear_names(tiny_llama(index)) + ["model.layers.1.mlp.down_proj", "model.layers.120.mlp.down_proj"]
    # GPTQModel's documented rule: a "-:" key is a regex re.match-ed against the module name; a match is not quantized.
    skipped = {n for n in names for key in dynamic if key.startswith("-:") and re.match(key[2:], n)}
    assert skipped == {"model.layers.2.mlp.down_proj"} and all(v == {} for v in dynamic.values())


def test_autoround_layer_config_keeps_the_module_at_16_bit_float(index):
    data = json.loads(keep(index, "autoround"))
    assert data["layer_config"] == {"model.layers.2.mlp.down_proj": {"bits": 16, "data_type": "fp"}}
    assert data["_superweight"]["note"] == NOTE and data["_superweight"]["super_weights"] == 1
    assert set(data["layer_config"]) <= set(linear_names(tiny_llama(index)))


def test_elements_are_the_catalog_rows_one_json_line_each(index):
    (line,) = keep(index, "elements", MOE).splitlines()
    element = json.loads(line)
    assert (element["hf_tensor"], element["hf_index"], element["verdict"]) == \
        ("model.layers.2.mlp.experts.down_proj", [1, 10, 20], "super")
    with Catalog(index["catalog"], read_only=True) as catalog:
        ((weight, ppl_ratio, control),) = catalog.fetch(
            f"SELECT weight, ppl_ratio, control_ppl_ratio FROM catalog WHERE repo_id = '{MOE}'")
    assert element["value"] == weight == pytest.approx(2.5, rel=1e-2)
    assert (element["effect"]["ppl_ratio"], element["effect"]["control_ppl_ratio"]) == (ppl_ratio, control)
    assert ppl_ratio is not None
    assert element["gguf_tensor"] == "blk.2.ffn_down_exps.weight" and element["dtype"]


def test_verdicts_choose_what_is_kept(index):
    result = export(index, "--keep", "elements", "--repo", UNVERIFIED)
    assert result.stdout == "" and "no super weights with verdict super,group" in result.stderr
    (line,) = keep(index, "elements", UNVERIFIED, "--verdict", "unverified").splitlines()
    assert json.loads(line)["hf_tensor"] == "model.layers.3.mlp.down_proj.weight"


def test_every_model_gets_a_file_and_the_parquet_gives_the_same(index, tmp_path):
    export(index, "--keep", "gptqmodel", "--out", str(tmp_path / "db"))
    result = CliRunner().invoke(cli, ["export", "--keep", "gptqmodel", "--from", str(index["parquet"]),
                                      "--out", str(tmp_path / "parquet")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "db").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "parquet").iterdir())
    assert [n.split("@")[0] for n in names] == ["keep--llama", "keep--mixtral", "keep--unverified"]
    for name in names:
        assert (tmp_path / "db" / name).read_text() == (tmp_path / "parquet" / name).read_text()


@pytest.mark.parametrize("args, code, message", [
    (["--keep", "llama.cpp", "--repo", "nobody/nothing"], 1, "nobody/nothing: not in the index"),
    (["--keep", "llama.cpp"], 2, "give --out FOLDER"),
    (["--keep", "llama.cpp", "--repo", DENSE, "--verdict", "great"], 2, "--verdict"),
    (["--keep", "safetensors", "--repo", DENSE], 2, "--keep"),
])
def test_bad_requests_are_one_line_errors(index, args, code, message):
    result = export(index, *args, ok=False)
    assert result.exit_code == code and message in result.output
    assert "Traceback" not in result.output


def test_a_folder_that_is_a_file_is_a_one_line_error(index, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = export(index, "--keep", "elements", "--out", str(blocker), ok=False)
    assert result.exit_code == 1 and "cannot write the keep-list" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("repo_id", ["../../etc/passwd", "a/\x00b", ".hidden/x", "//"])
def test_file_names_from_an_untrusted_index_stay_plain_names(repo_id):
    from superweight.index.keep import Model

    stem = Model(repo_id, "0123456789abcdef", "0.3.0").file_stem
    assert "/" not in stem and "\x00" not in stem and not stem.startswith(".") and stem.endswith("@0123456789ab")
