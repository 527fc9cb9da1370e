"""Verification: the effect of zeroing each super weight, all of them, and a control, measured on the
streamed model, checked against zeroing the weight in a whole in-memory model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet
import pytest
import torch
from transformers import AutoModelForCausalLM

from index.catalog import Catalog
from scanner.detect import Detector
from scanner.config import DetectConfig
from scanner.loader import StreamingModel
from scanner.scan import ScanOptions, prompt_ids, scan_source
from scanner.verify import VerifyConfig, _inputs, verify
from tests.checkpoints import ARCHS, MOE_ARCHS, Plant, make_checkpoint

CLI = str(Path(sys.executable).with_name("superweight"))
# Small enough to be quick; head_rows below the vocabulary (256) so the head is read in slices.
QUICK = VerifyConfig(tokens=256, context=64, head_rows=100)


def planted(arch: str) -> list[Plant]:
    """A super weight and, in the same layer (and expert), a decoy as large on a quiet input."""
    expert = 1 if arch in MOE_ARCHS else None
    return [Plant(2, 10, 20, expert=expert), Plant(2, 30, 40, value=2.6, boost=1.0, expert=expert)]


@pytest.mark.parametrize("arch", ARCHS)
def test_zeroing_a_planted_super_weight_moves_predictions_far_more_than_its_decoy(tmp_path, arch):
    result = scan_source(str(make_checkpoint(tmp_path / arch, arch, planted(arch))), ScanOptions(verify=QUICK))

    (weight,) = result["super_weights"]
    effect, control = weight["effect"], weight["effect"]["control"]
    # The decoy is the weight closest in magnitude outside the super weight's row and column: the control.
    assert (control["out_channel"], control["in_channel"]) == (30, 40)
    assert control["weight"] == pytest.approx(2.6)
    assert effect["kl"] > 1e-3 and effect["kl"] > 5 * control["kl"]
    assert result["verification"]["tokens"] == 256 and result["verification"]["tokenizer"] is False
    assert effect["expected_prob"] is None  # without a tokenizer there is no expected word


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])  # dense, Conv1D, fused experts
def test_the_figures_equal_zeroing_the_weight_in_a_whole_model(tmp_path, arch):
    plants = [Plant(2, 10, 20, expert=1 if arch in MOE_ARCHS else None), Plant(5, 7, 99)]
    if arch in MOE_ARCHS:
        plants[1] = Plant(5, 7, 99, expert=0)
    ckpt = make_checkpoint(tmp_path / arch, arch, plants)
    sm = StreamingModel(ckpt)
    ids, _ = prompt_ids(ckpt, DetectConfig().prompt, sm.config)
    detection = Detector(sm, DetectConfig()).run(sm.load_static(ids))
    assert len(detection.super_weights) == 2
    figures = verify(sm, detection, config=QUICK)

    text = _inputs(sm, None, QUICK).text  # (B, T): the same sequences the streamed pass read
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    base = _log_probs(model, text)
    zeroed = []
    for w in detection.super_weights:
        with _zeroed(model, [(w.layer, w.expert, w.out_channel, w.in_channel)]):
            zeroed.append(_log_probs(model, text))
    with _zeroed(model, [(w.layer, w.expert, w.out_channel, w.in_channel) for w in detection.super_weights]):
        joint = _log_probs(model, text)

    for w, logp, effect in zip(detection.super_weights, zeroed, figures["per_weight"]):
        assert effect["ppl_ratio"] == pytest.approx(_ppl(logp, text) / _ppl(base, text), rel=1e-4)
        assert effect["kl"] == pytest.approx(_kl(base, logp), rel=1e-3, abs=1e-6)
        control = effect["control"]
        with _zeroed(model, [(w.layer, w.expert, control["out_channel"], control["in_channel"])]):
            assert control["ppl_ratio"] == pytest.approx(_ppl(_log_probs(model, text), text) / _ppl(base, text),
                                                         rel=1e-4)
    assert figures["joint_ppl_ratio"] == pytest.approx(_ppl(joint, text) / _ppl(base, text), rel=1e-4)
    assert figures["base_ppl"] == pytest.approx(_ppl(base, text), rel=1e-4)


def test_each_super_weight_gets_its_own_control_outside_their_rows_and_columns(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", [Plant(2, 10, 20), Plant(2, 11, 21, value=2.4)])
    result = scan_source(str(ckpt), ScanOptions(verify=QUICK))
    controls = [(w["effect"]["control"]["out_channel"], w["effect"]["control"]["in_channel"])
                for w in result["super_weights"]]
    assert len(result["super_weights"]) == 2 and len(set(controls)) == 2
    assert all(r not in (10, 11) and c not in (20, 21) for r, c in controls)


def test_a_model_without_super_weights_has_nothing_to_verify(tmp_path):
    result = scan_source(str(make_checkpoint(tmp_path / "m", "llama", [])), ScanOptions(verify=QUICK))
    assert result["super_weights"] == [] and result["verification"] is None


def test_scan_verify_records_the_effects_in_the_catalog_and_its_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", planted("llama"))
    env_home = {"SUPERWEIGHT_HOME": str(tmp_path / "home"), "PATH": str(Path(sys.executable).parent)}
    scan = subprocess.run([CLI, "scan", str(ckpt), "--verify", "--catalog", str(tmp_path / "c.duckdb")],
                          capture_output=True, text=True, env=env_home, timeout=600)
    assert scan.returncode == 0, scan.stderr
    assert "zeroed, on 2048 tokens of us-constitution.txt + pride-and-prejudice-1-3.txt" in scan.stdout
    export = subprocess.run([CLI, "export", "--catalog", str(tmp_path / "c.duckdb"), "--out", str(tmp_path / "c.parquet")],
                            capture_output=True, text=True, env=env_home, timeout=120)
    assert export.returncode == 0, export.stderr

    (row,) = pyarrow.parquet.read_table(tmp_path / "c.parquet").to_pylist()
    assert (row["layer"], row["out_channel"], row["in_channel"]) == (2, 10, 20)
    assert row["hf_tensor"] == "model.layers.2.mlp.down_proj.weight" and row["hf_index"] == [10, 20]
    assert row["eval_tokens"] == 2048 and row["base_ppl"] > 1
    assert row["kl"] > 5 * row["control_kl"] and row["control_ppl_ratio"] == pytest.approx(1, abs=0.05)
    assert row["joint_ppl_ratio"] == row["ppl_ratio"]  # one super weight: all of them is this one
    assert row["expected_prob"] is None and row["base_expected_prob"] is None  # no tokenizer


def test_an_unverified_scan_has_null_effects(tmp_path):
    result = scan_source(str(make_checkpoint(tmp_path / "m", "llama", planted("llama"))))
    assert result["verification"] is None and "effect" not in result["super_weights"][0]
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(result)
        assert catalog.con.execute("SELECT ppl_ratio, kl, eval_tokens FROM catalog").fetchall() == [(None, None, None)]
        assert catalog.has_scan(result["source"], result["revision"], result["scanner_version"])
        assert not catalog.has_scan(result["source"], result["revision"], result["scanner_version"], verified=True)


# -- the reference: a whole model in memory ----------------------------------------------------------

@torch.no_grad()
def _log_probs(model, text: torch.Tensor) -> torch.Tensor:
    """log p(next token) over the vocabulary at every position but the last: (B, T-1, V)."""
    return torch.log_softmax(model(text).logits[:, :-1].float(), dim=-1)


def _ppl(log_probs: torch.Tensor, text: torch.Tensor) -> float:
    return math.exp(-log_probs.gather(2, text[:, 1:, None]).mean().item())


def _kl(base: torch.Tensor, other: torch.Tensor) -> float:
    return (base.exp() * (base - other)).sum(dim=-1).mean().item()


class _zeroed:
    """Zero (layer, expert, row, col) weights of the MLP output projections of a whole model, then restore."""

    def __init__(self, model, coords):
        from scanner.arch import find_decoder_layers, find_out_proj

        tcfg = model.config.get_text_config()
        _, layers = find_decoder_layers(model.base_model, tcfg.num_hidden_layers)
        self.cells = []
        for layer, expert, row, col in coords:
            spec = find_out_proj(layers[layer], tcfg.hidden_size)
            weight = getattr(layers[layer].get_submodule(spec.module_path), spec.param_name)
            index = (expert, row, col) if spec.kind == "experts" else (col, row) if spec.kind == "conv1d" else (row, col)
            self.cells.append((weight, index))

    def __enter__(self):
        self.saved = [weight.data[index].item() for weight, index in self.cells]
        for weight, index in self.cells:
            weight.data[index] = 0.0

    def __exit__(self, *exc):
        for (weight, index), value in zip(self.cells, self.saved):
            weight.data[index] = value
