"""`superweight audit FILE.gguf`: each super weight of the base model, read back from its quantization block."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from superweight.cli import cli
from superweight.index.catalog import Catalog
from superweight.scanner import audit
from superweight.index.build import PUBLISHED
from superweight.scanner.fetch import HEAD_GUESS
from superweight.scanner.scan import scan
from tests.checkpoints import Plant, make_checkpoint, make_gguf

BASE = "audit/llama"
INDEX = PUBLISHED  # the committed index
Q = GGMLQuantizationType
# The super weight, and beside it in its 32-weight block (row 7, columns 32-63) a quiet weight that
# is larger and of the other sign: Q4_0 maps the block's largest magnitude to -8, so +2.5 can reach
# only 7/8 of 2.6 (2.275): quantization clips it. Q8_0 keeps it.
PLANTS = [Plant(2, 7, 33), Plant(2, 7, 34, value=-2.6, boost=1.0)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The base model scanned into a catalog, and GGUF quantizations of it."""
    root = tmp_path_factory.mktemp("audit")
    result = scan(str(make_checkpoint(root / "base", "llama", PLANTS)))
    import dataclasses

    with Catalog(root / "catalog.duckdb") as catalog:
        catalog.record_scan(dataclasses.replace(result, repo_id=BASE))
    files = {q: make_gguf(root / f"model-{q.name}.gguf", "llama", PLANTS, qtype=q,
                          strings={"general.base_model.0.repo_url": f"https://huggingface.co/{BASE}"})
             for q in (Q.Q8_0, Q.Q5_0, Q.Q4_1, Q.Q4_0)}
    return {"catalog": root / "catalog.duckdb", "files": files, "found": result.super_weights, "root": root}


def run(base, *args):
    return CliRunner().invoke(cli, ["audit", "--catalog", str(base["catalog"]), *args])


def test_the_base_model_has_the_one_planted_super_weight(base):
    assert [(w.layer, w.out_channel, w.in_channel, w.weight) for w in base["found"]] == [(2, 7, 33, 2.5)]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_1, Q.Q4_0], ids=lambda q: q.name)
def test_the_stored_value_is_what_the_gguf_package_dequantizes_there(base, qtype):
    path = base["files"][qtype]
    (weight,) = audit.audit(path, [{"layer": 2, "expert": None, "out_channel": 7, "in_channel": 33,
                                   "weight": 2.5, "tensor": None}])
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "blk.2.ffn_down.weight")
    whole = dequantize(tensor.data, qtype)  # (n_embd, n_ff): every block, by the gguf package
    assert weight.stored == pytest.approx(float(whole[7, 33]), abs=1e-6)
    assert weight.block_absmax == pytest.approx(float(np.abs(whole[7, 32:64]).max()), abs=1e-6)
    assert (weight.tensor, weight.qtype) == ("blk.2.ffn_down.weight", qtype.name)


def test_q8_0_keeps_the_super_weight(base):
    result = run(base, str(base["files"][Q.Q8_0]), "--base", BASE, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (weight,) = report["super_weights"]
    assert report["verdict"] == "intact" and weight["verdict"] == "kept"
    assert weight["rel_error"] < 0.01 and weight["scale"] == pytest.approx(2.6 / 127, rel=1e-3)
    assert weight["largest_in_block"] is False  # the quiet -2.6 is larger


def test_q4_0_clips_the_super_weight_and_the_audit_says_so(base):
    result = run(base, str(base["files"][Q.Q4_0]), "--base", BASE)
    assert result.exit_code == 3, result.output
    assert "verdict: damaged" in result.stdout and "clipped" in result.stdout
    report = json.loads(run(base, str(base["files"][Q.Q4_0]), "--base", BASE, "--json").stdout)
    (weight,) = report["super_weights"]
    assert weight["stored"] == pytest.approx(2.6 * 7 / 8, rel=1e-2) and weight["rel_error"] > 0.05
    assert weight["verdict"] == "clipped"


def test_the_base_model_is_read_from_the_files_metadata(base):
    result = run(base, str(base["files"][Q.Q8_0]), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["base"] == BASE


def test_only_the_header_and_the_blocks_are_read(base):
    from superweight.scanner.fetch import Transfer

    path = base["files"][Q.Q8_0]
    transfer = Transfer()
    audit.audit(path, [{"layer": 2, "expert": None, "out_channel": 7, "in_channel": 33, "weight": 2.5}],
                transfer=transfer)
    # The header's first read (it fits), then the one 34-byte Q8_0 block: two reads.
    assert (transfer.bytes, transfer.requests) == (min(path.stat().st_size, HEAD_GUESS) + 34, 2)


def test_a_scan_of_the_file_finds_the_super_activation(base):
    result = run(base, str(base["files"][Q.Q8_0]), "--base", BASE, "--scan", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["super_activations"] == {"layer 2 channel 7": True}


@pytest.mark.parametrize("args, code, message", [
    (["--base", "nobody/nothing"], 1, "nobody/nothing: not in the index"),
    (["--verdict", "great"], 2, "--verdict"),
])
def test_bad_requests_are_one_line_errors(base, args, code, message):
    result = run(base, str(base["files"][Q.Q8_0]), *args)
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output


def test_a_file_that_names_no_base_needs_base(base, tmp_path):
    plain = make_gguf(tmp_path / "plain.gguf", "llama", PLANTS, qtype=Q.Q8_0)
    result = run(base, str(plain))
    assert result.exit_code == 2 and "give --base" in result.output


def test_a_file_of_another_model_is_one_line(base, tmp_path):
    other = make_gguf(tmp_path / "other.gguf", "llama", [], qtype=Q.Q8_0, num_hidden_layers=2)
    result = run(base, str(other), "--base", BASE)
    assert result.exit_code == 1 and "has no tensor blk.2.ffn_down.weight" in result.output


@pytest.mark.slow
def test_the_real_smollm2_requantized_to_q8_0_keeps_its_super_weights(smollm2, tmp_path):
    """The converted SmolLM2 folder (dequantized from its shipped Q4_1), written again as Q8_0, audited
    against the committed index's rows for it."""
    import transformers

    from tests.checkpoints import gguf_tensors, write_gguf

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype="float32")
    path = write_gguf(tmp_path / "smollm2-Q8_0.gguf", model.config, gguf_tensors(model), qtype=Q.Q8_0)
    result = CliRunner().invoke(cli, ["audit", str(path), "--from", str(INDEX), "--json",
                                      "--base", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    weights = {(w["layer"], w["row"], w["col"]): w for w in report["super_weights"]}
    assert set(weights) == {(11, 507, 1229), (11, 507, 1487)} and report["verdict"] == "intact"
    assert all(w["rel_error"] < 0.01 and w["largest_in_block"] for w in weights.values())


def test_json_output_stays_json_when_the_audit_fails(base, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a GGUF file")
    result = run(base, str(not_gguf), "--base", BASE, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["status"] == "failed" and "not a readable GGUF file" in report["error"]
